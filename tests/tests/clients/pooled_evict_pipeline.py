"""PgBouncer's test_evict_statement_cache_pipeline_failure (test/test_prepared.py; flaky in
PgBouncer, its issue #1480), against the pooled port with max_prepared_statements = 1: in one
pipeline a statement is prepared, a bad one fails to prepare (and evicts nothing the client
still needs), and the first is prepared and run again. Then the same with a second good
statement in the pipeline, so the backend must evict inside it. Prints "ok" per round."""
import sys

import psycopg

dsn, rounds = sys.argv[1], int(sys.argv[2])
with psycopg.connect(dsn, autocommit=True) as conn:
    for r in range(rounds):
        with conn.pipeline() as p:
            p.sync()
            curs = [conn.cursor() for _ in range(3)]
            curs[0].execute("SELECT 1", prepare=True)
            try:
                curs[1].execute("bad query", prepare=True)
                p.sync()
            except psycopg.errors.SyntaxError:
                pass
            else:
                sys.exit(f"round {r}: the bad query did not fail")
            assert curs[0].fetchall() == [(1,)], r
            curs[0].execute("SELECT 1", prepare=True)
            p.sync()
            assert curs[0].fetchall() == [(1,)], r
            # Two statements in one pipeline on a backend that keeps one.
            curs[1].execute("SELECT %s::int + 1", (r,), prepare=True)
            curs[2].execute("SELECT %s::int + 2", (r,), prepare=True)
            curs[0].execute("SELECT 1", prepare=True)
            p.sync()
            assert curs[1].fetchall() == [(r + 1,)], r
            assert curs[2].fetchall() == [(r + 2,)], r
            assert curs[0].fetchall() == [(1,)], r
        print("ok", r)
