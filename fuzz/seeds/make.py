"""Writes the seed inputs in seeds/<target>/: the protocol's own fixtures, one file each.

Run from fuzz/: python3 seeds/make.py. libFuzzer grows its corpus (corpus/, not in git) from
these; they are small and readable so a target starts from valid messages, not from nothing.
"""

import os
import struct

PENCIL = (
    "SCRAM-SHA-256$4096:dt0VTpPKsVNTtGqnoexviw==$"
    "+FroXuxQwwjAPmegfOtLdhprA4WtoVjaP+t71cyxNm4=:HQvUzao4lDuxfhHm9POp7fW/eEA1FYL7qnTl7Nkrs7s="
)


def u16(n):
    return struct.pack(">H", n)


def startup_packet(code, rest=b""):
    return struct.pack(">II", 8 + len(rest), code) + rest


def frame(tag, body):
    return tag + struct.pack(">I", 4 + len(body)) + body


def two(flags, first, second):
    return bytes([flags]) + u16(len(first)) + first + second


def sealed(outer_type, plaintext):
    return b"\x01" + bytes([outer_type]) + u16(len(plaintext)) + plaintext


def sealed_by_router(plaintext):
    return b"\x02" + u16(len(plaintext)) + plaintext


MESSAGES = {
    "auth_sasl": b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0",
    "auth_md5": b"\0\0\0\x05\x01\x02\x03\x04",
    "auth_continue": b"\0\0\0\x0br=abc,s=c2FsdA==,i=4096",
    "error": b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed\0Fauth.c\0L326\0\0",
    "notice": b"SFEHLER\0C42P01\0Mnein\0Dd\0Hh\0\0",
    "parameter_status": b"TimeZone\0Etc/UTC\0",
    "backend_key_data": b"\x00\x00\x30\x39\xde\xad\xbe\xef",
    "negotiate": b"\0\x03\0\0\0\0\0\x02_pq_.a\0_pq_.b\0",
    "ready": b"I",
    "sasl_initial": b"SCRAM-SHA-256\0\x00\x00\x00\x25n,,n=,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa",
    "query": b"SELECT 1\0",
}

CLIENT_FIRST = b"n,,n=,r=rOprNGfwEbeRWgbNEkqO"
CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqOSeRvEr+NoNcE,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)

CATALOG = f"""
[[branch]]
id = "b1"
primary = "127.0.0.1:5433"
replicas = ["127.0.0.1:5434", "[::1]:5435"]
[branch.roles]
app = "{PENCIL}"
"my.dotted.role" = "{PENCIL}"

[[branch]]
id = "b-2_x"
primary = "10.0.0.1:5432"
""".encode()

CONFIG = b"""
workers = 2
catalog = "catalog.toml"
[tls]
cert = "server.crt"
key = "server.key"
[listen]
direct = "127.0.0.1:5432"
[timeouts]
startup = "10s"
connect = "5s"
drain = "30s"
health_check_interval = "2s"
[limits]
max_client_connections = 10000
"""

SEEDS = {
    "startup": {
        "startup": startup_packet(
            0x00030000,
            b"user\0app.br_1|replica\0database\0shop\0_pq_.x\0on\0application_name\0psql\0\0",
        ),
        "startup_3_2": startup_packet(0x00030002, b"user\0u\0\0"),
        "ssl_request": startup_packet(0x04D2162F),
        "gssenc_request": startup_packet(0x04D21630),
        "cancel": startup_packet(0x04D2162E, b"\x00\x00\x30\x39\xde\xad\xbe\xef"),
    },
    "frames": {
        "backend_stream": u16(1024)
        + frame(b"R", b"\0\0\0\0")
        + frame(b"S", MESSAGES["parameter_status"])
        + frame(b"K", MESSAGES["backend_key_data"])
        + frame(b"E", MESSAGES["error"])
        + frame(b"Z", b"I")
        + b"Z\0\0",
        "frontend_stream": u16(8192)
        + frame(b"p", MESSAGES["sasl_initial"])
        + frame(b"Q", MESSAGES["query"])
        + frame(b"X", b""),
    },
    "messages": MESSAGES,
    "scram_server": {
        "unsigned": two(0, CLIENT_FIRST, CLIENT_FINAL),
        "signed": two(1, CLIENT_FIRST, b""),
        "signed_extension": two(1, b"y,,n=user,r=abc,x=1", b",y=2"),
        "mock": two(3, CLIENT_FIRST, b""),
    },
    "scram_client": {
        "signed": two(3, b"ServerPart,s=c2FsdA==,i=4096", b""),
        "unsigned": two(2, b"ServerPart,s=c2FsdA==,i=4096,x=y", b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
        "error": two(2, b"ServerPart,s=c2FsdA==,i=1", b"e=invalid-proof"),
    },
    "route": {
        "user": b"\x00my.dotted.role.b1|replica",
        "sni": b"\x03app|replica\xffb1.db.example.com",
        "sni_catalog_form": b"\x05app\xffb-2.db.localhost",
    },
    "verifier": {"pencil": PENCIL.encode()},
    "catalog": {"catalog": CATALOG},
    "config": {"config": CONFIG},
    "tls_record": {
        suite + name: bytes([n]) + ops
        for n, suite in [(0, "tls13_aes"), (1, "tls13_chacha"), (2, "tls12_aes"), (3, "tls12_chacha")]
        for name, ops in {
            "_data": sealed(0x17, b"hello\x17\0\0")
            + sealed_by_router(b"world")
            + sealed(0x17, b"SELECT 1")
            + sealed(0x15, b"\x01\x00"),
            "_key_update": sealed(0x17, b"\x18\0\0\x01\x01\x16")
            + sealed(0x17, b"after\x17")
            + sealed_by_router(b"x" * 16400),
        }.items()
    },
}

for target, seeds in SEEDS.items():
    os.makedirs(f"seeds/{target}", exist_ok=True)
    for name, data in seeds.items():
        with open(f"seeds/{target}/{name}", "wb") as f:
            f.write(data)
