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
[pool]
pool_size = 20
min_pool_size = 2
max_client_connections = 0
max_prepared_statements = 200
query_wait_timeout = "120s"
query_wait_notify = "5s"
client_idle_timeout = "0s"
idle_transaction_timeout = "30s"
server_idle_timeout = "600s"
server_lifetime = "3600s"
"""

# tls_differential: the layout in router/src/tls/differential.rs.
def td_setup(suite, with_finished=False):
    return bytes([suite | (8 if with_finished else 0)])


def td_data(n, fill=0):
    return b"\x00" + u16(n) + bytes([fill])


def td_record(content, outer=0x17, version=0x0303, inner=0x17, pad=0, wire_aad=False, no_inner=False):
    flags = (1 if wire_aad else 0) | (2 if no_inner else 0)
    return b"\x01" + bytes([flags, outer]) + u16(version) + bytes([inner]) + u16(pad) + u16(len(content)) + content


def td_handshake(content):
    return td_record(content, outer=0x17, inner=0x16)


def td_filler(n, byte=0, outer=0x17, inner=0x17):
    return b"\x02" + bytes([outer, inner]) + u16(n) + bytes([byte])


def td_key_update(request):
    return b"\x03" + bytes([request])


def td_alert(level, description):
    return b"\x04" + bytes([level, description])


def td_raw(data):
    return b"\x05" + u16(len(data)) + data


def td_flip(at, bit):
    return b"\x06" + u16(at) + bytes([bit])


TD_DELIVER = b"\x07"


def td_server(n):
    return b"\x08" + u16(n)


def td_sequence(delta):
    return b"\x09" + bytes([delta & 0xFF])


def td_repeat(n):
    return b"\x0a" + bytes([n])


def td_split(at):
    return b"\x0b" + u16(at)


# A ClientHello rustls parses: TLS 1.2, a random, no session id, one suite, no compression.
CLIENT_HELLO_BODY = b"\x03\x03" + bytes(range(32)) + b"\x00" + b"\x00\x02\xc0\x2b" + b"\x01\x00"
CLIENT_HELLO = b"\x01" + struct.pack(">I", len(CLIENT_HELLO_BODY))[1:] + CLIENT_HELLO_BODY

TD_SUITES = ["tls13_aes128", "tls13_aes256", "tls13_chacha", "tls12_aes128", "tls12_aes256", "tls12_chacha"]


def tls_differential_seeds():
    seeds = {}
    for n, suite in enumerate(TD_SUITES):
        tls13 = n < 3
        seeds[suite + "_session"] = (
            td_setup(n)
            + td_data(10, 1)
            + (td_key_update(1) if tls13 else b"")
            + TD_DELIVER
            + td_server(100)
            + td_data(16384, 7)
            + td_data(3616, 8)
            + td_split(9)
            + TD_DELIVER
            + td_server(20000)
            + td_alert(1, 0)
            + td_data(5, 3)
        )
        seeds[suite + "_records"] = (
            td_setup(n)
            + td_record(b"odd header", outer=0x16, version=0x0301)
            + td_record(b"padded", pad=300)
            + td_record(b"", inner=0x17)
            + td_handshake(b"\x14\x00\x00\x02ab")
        )
        seeds[suite + "_tampered"] = td_setup(n) + td_data(3) + TD_DELIVER + td_data(30) + td_flip(7, 2)
        seeds[suite + "_empty_records"] = td_setup(n) + td_data(0) + td_repeat(31) + td_data(1) + td_data(0) + td_repeat(40)
        seeds[suite + "_warnings"] = td_setup(n) + td_alert(1, 90 if tls13 else 42) + td_repeat(5)
        seeds[suite + "_ccs_and_garbage"] = td_setup(n) + td_data(4) + TD_DELIVER + td_raw(b"\x14\x03\x03\x00\x01\x01")
        seeds[suite + "_replay"] = td_setup(n) + td_data(4) + td_sequence(-1) + td_data(4)
        seeds[suite + "_overflow"] = td_setup(n) + td_record(b"x" * 16384, pad=1) + td_data(16385)
    for n in range(3):
        suite = TD_SUITES[n]
        seeds[suite + "_key_update_first_flight"] = (
            td_setup(n, with_finished=True)
            + td_key_update(1)
            + td_data(30, 9)
            + TD_DELIVER
            + td_server(10)
            + td_key_update(1)
            + td_repeat(30)
            + td_data(1)
            + td_server(10)
        )
        seeds[suite + "_key_update_bound"] = td_setup(n) + td_key_update(1) + td_repeat(32) + td_data(1)
        seeds[suite + "_key_update_split"] = (
            td_setup(n)
            + td_handshake(b"\x18\x00")
            + td_handshake(b"\x00\x01")
            + td_handshake(b"\x01")
            + td_data(8)
            + td_handshake(b"\x18\x00\x00\x01\x00\x18")
        )
        seeds[suite + "_interleaved"] = td_setup(n) + td_handshake(b"\x18\x00\x00") + td_data(2)
        seeds[suite + "_no_inner_type"] = td_setup(n) + td_record(b"", no_inner=True, pad=3)
        seeds[suite + "_inner_ccs"] = td_setup(n) + td_record(b"\x01", inner=0x14)
        seeds[suite + "_inner_heartbeat"] = td_setup(n) + td_record(b"hb", inner=0x18)
        seeds[suite + "_wire_aad"] = td_setup(n) + td_record(b"aad", outer=0x16, version=0x0301, wire_aad=True)
    # A handshake message whose records outgrow rustls's 64 KiB buffer, and one too large.
    seeds["tls13_handshake_window"] = (
        td_setup(0) + td_handshake(b"\x77\x00\xff\xf0") + td_filler(16000, 0, inner=0x16) + td_repeat(4)
    )
    seeds["tls13_handshake_too_large"] = td_setup(0) + td_handshake(b"\x77\x01\x00\x00")
    seeds["tls13_client_hello"] = td_setup(0) + td_handshake(CLIENT_HELLO)
    for n in range(3, 6):
        seeds[TD_SUITES[n] + "_renegotiation"] = (
            td_setup(n)
            + td_record(CLIENT_HELLO, outer=0x16, inner=0x16)
            + td_data(5)
            + TD_DELIVER
            + td_server(7)
            + td_record(CLIENT_HELLO, outer=0x16, inner=0x16)
        )
    # Inputs the fuzzer found where the record layer differed from rustls (fixed since).
    seeds["found_partial_header"] = td_setup(5) + td_raw(b"\x00\x09\x27\x00")
    seeds["found_finished_cut_short"] = td_setup(0, with_finished=True) + td_flip(10, 6)
    seeds["found_renegotiation_then_no_data"] = (
        td_setup(5) + td_record(CLIENT_HELLO, outer=0x16, inner=0x16) + td_data(5) + TD_DELIVER + td_server(0)
    )
    seeds["found_server_data_64k"] = td_setup(2) + td_key_update(1) + TD_DELIVER + td_server(65535)
    seeds["found_kept_handshake_bytes"] = (
        td_setup(0) + td_record(b"", outer=0x16, inner=0x16, pad=10000) + TD_DELIVER + td_data(100) + td_data(16000)
    )
    return seeds


PROXY_V2 = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v2(version_command, family, body):
    return PROXY_V2 + bytes([version_command, family]) + u16(len(body)) + body


PROXY_V4_BODY = bytes([203, 0, 113, 7, 10, 0, 0, 1]) + u16(5555) + u16(5432)
PROXY_V6_BODY = (
    bytes.fromhex("20010db8000000000000000000000007")
    + bytes.fromhex("20010db8000000000000000000000001")
    + u16(40000)
    + u16(6432)
)

SEEDS = {
    "startup": {
        "startup": startup_packet(
            0x00030000,
            b"user\0app.br_1|replica\0database\0shop\0_pq_.x\0on\0application_name\0psql\0\0",
        ),
        "startup_3_2": startup_packet(0x00030002, b"user\0u\0\0"),
        "options": startup_packet(
            0x00030000,
            b"user\0app.b1\0options\0-c statement_timeout=5s --lock-timeout=1s "
            b"-csearch_path=my\\ schema,public -c\0TimeZone\0UTC\0\0",
        ),
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
    # The first byte: bit 0 asks for a bound of 3 prepared statements per backend (evictions);
    # the other bits say where the client's bytes end (127: all of them), the rest being the
    # backend's reply types.
    "pooled": {
        "extended": b"\xff"
        + frame(b"P", b"s1\0select $1\0\0\0")
        + frame(b"B", b"\0s1\0\0\0\0\x01\0\0\0\x011\0\0")
        + frame(b"D", b"Ps1\0")
        + frame(b"E", b"\0\0\0\0\0")
        + frame(b"S", b"")
        + frame(b"C", b"Ss1\0")
        + frame(b"H", b""),
        "simple": b"\xfe"
        + frame(b"Q", b"DEALLOCATE ALL;\0")
        + frame(b"Q", b"select 1; /* ; */ select ';'; PREPARE p AS select $$;$$\0")
        + frame(b"Q", b"DISCARD ALL\0"),
        "parameters": b"\xfe"
        + frame(b"Q", b"SET search_path TO a, b; RESET TimeZone; SET SESSION x.y = DEFAULT\0")
        + frame(b"P", b"r\0SET LOCAL statement_timeout = 5\0\0\0")
        + frame(b"B", b"\0r\0\0\0\0\0\0\0")
        + frame(b"S", b""),
        "replies": b"\x81"
        + frame(b"P", b"a\0select 1\0\0\0")
        + frame(b"P", b"b\0select 2\0\0\0")
        + frame(b"S", b"")
        + b"1E1Z",
    },
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
    "tls_differential": tls_differential_seeds(),
    # What HAProxy's send-proxy-v2 writes, then the client's first bytes (an SSLRequest).
    "proxy_header": {
        "ipv4": proxy_v2(0x21, 0x11, PROXY_V4_BODY) + startup_packet(0x04D2162F),
        "ipv6": proxy_v2(0x21, 0x21, PROXY_V6_BODY),
        "local": proxy_v2(0x20, 0x00, b""),
        "tlvs": proxy_v2(0x21, 0x11, PROXY_V4_BODY + b"\xea\x00\x05\x01vpce" + b"\x05\x00\x03abc"),
    },
    # Fields of a forwarded cancel: pid (a pooled one, tag 3), secret, nonce, origin, clock
    # offset, the bit to flip.
    "peer_cancel": {
        "pooled_key": struct.pack(">II", (3 << 22) | 12345, 0xDEADBEEF)
        + bytes(range(16)) + b"node-one" + struct.pack(">IH", 42, 331),
    },
}

for target, seeds in SEEDS.items():
    os.makedirs(f"seeds/{target}", exist_ok=True)
    for name, data in seeds.items():
        with open(f"seeds/{target}/{name}", "wb") as f:
            f.write(data)
