"""An ORM's long IN list through the pooled port: a statement with 5,000 parameters, whose
Parse (text and types) and Bind are each longer than the router's 20 KiB buffers, prepared
by psycopg (prepare=True) and run in several transactions, each with other values."""
import sys

import psycopg

dsn, rounds = sys.argv[1], int(sys.argv[2])
n = 5000
query = "SELECT count(*), sum(g) FROM generate_series(1, 100000) g WHERE g IN ({})".format(
    ", ".join(["%s"] * n)
)
with psycopg.connect(dsn, autocommit=True) as conn:
    for r in range(rounds):
        values = [r * n + i + 1 for i in range(n)]
        row = conn.execute(query, values, prepare=True).fetchone()
        assert row == (n, sum(values)), (r, row)
        with conn.transaction():
            row = conn.execute(query, values[::-1], prepare=True).fetchone()
            assert row == (n, sum(values)), (r, row)
        print("ok", r)
