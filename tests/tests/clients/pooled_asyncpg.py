import asyncio, sys
from urllib.parse import quote
import asyncpg
# One asyncpg client of the pooled port: argv[1] port, argv[2] user, argv[3] password, argv[4]
# the CA file (verify-full against "localhost"), argv[5] a client number k, argv[6] rounds.
# asyncpg prepares every statement under its own names (__asyncpg_stmt_1__, ...), so two clients
# use the same names for different queries; every statement's text or arguments hold k, so a
# router that mixes clients' statements returns wrong numbers, which the asserts catch. Odd
# clients use direct SSL, even ones the SSLRequest. Prints one line per part.
port, user, password, ca = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
k, rounds = int(sys.argv[5]), int(sys.argv[6])
tag = f"a{k}"
app = f"asyncpg-{k}"
schema = f"s{k % 2 + 1}"
negotiation = "direct" if k % 2 else "postgres"
dsn = (f"postgresql://{quote(user)}:{quote(password)}@localhost:{port}/postgres?sslmode=verify-full"
       f"&sslrootcert={quote(ca)}&sslnegotiation={negotiation}")


def connect_args():
    return dict(dsn=dsn, timeout=30,
                server_settings={"application_name": app, "search_path": f"{schema}, public"})


async def session(conn):
    """What this client started with, read in a transaction of its own."""
    return tuple(await conn.fetchrow(
        "select current_setting('application_name'), current_setting('search_path'), "
        "(select v from t)"))


async def main():
    conn = await asyncpg.connect(**connect_args())
    start = (app, f"{schema}, public", f"in {schema}")
    assert await session(conn) == start, await session(conn)
    await conn.execute("delete from pooled_items where client = $1", tag)
    # The statement cache: each query prepared once (Parse, Describe, Sync), then bound in
    # transactions of its own, on whichever backend the client gets.
    for i in range(rounds):
        v = await conn.fetchval(f"select $1::int * {k}", i)
        assert v == i * k, (i, v)
        assert await conn.fetchval("select $1::text || $2::text", str(i), tag) == f"{i}{tag}"
    print(tag, "cached", rounds)
    # An explicit prepared statement, run between other clients' transactions.
    stmt = await conn.prepare("select $1::int + $2::int, $3::text")
    for i in range(rounds):
        row = await stmt.fetchrow(i, k, tag)
        assert tuple(row) == (i + k, tag), (i, row)
    print(tag, "prepared", rounds, [a.name for a in stmt.get_attributes()])
    # Transactions that see their own uncommitted rows; one that fails is rolled back.
    for i in range(rounds):
        async with conn.transaction():
            await conn.execute("insert into pooled_items values ($1, $2)", tag, i)
            n = await conn.fetchval("select count(*) from pooled_items where client = $1", tag)
            assert n == i + 1, (i, n)
    try:
        async with conn.transaction():
            await conn.execute("insert into pooled_items values ($1, -1)", tag)
            await conn.execute("select 1/0")
        failed = "none"
    except asyncpg.PostgresError as e:
        failed = e.sqlstate
    n = await conn.fetchval("select count(*) from pooled_items where client = $1", tag)
    print(tag, "transactions", n, failed)
    # executemany: one pipeline of Bind/Execute, a Sync at its end, atomic.
    await conn.executemany("insert into pooled_items values ($1, $2)",
                           [(tag, 1000 + i) for i in range(50)])
    try:
        await conn.executemany("insert into pooled_items values ($1, $2)",
                               [(tag, 2000), (tag, None), (tag, 2001)])
        failed = "none"
    except asyncpg.PostgresError as e:
        failed = e.sqlstate
    n = await conn.fetchval("select count(*) from pooled_items where client = $1", tag)
    print(tag, "executemany", n, failed)
    # Binary COPY in (copy_records_to_table) and out (copy_from_query).
    await conn.copy_records_to_table("pooled_items", records=[(tag, 5000 + i) for i in range(200)])
    out = bytearray()

    async def sink(chunk):
        out.extend(chunk)
    await conn.copy_from_query("select n from pooled_items where client = $1 and n >= 5000",
                               tag, output=sink)
    copied = sorted(int(line) for line in out.decode().split())
    print(tag, "copy", len(copied), copied == list(range(5000, 5200)))
    # A cursor inside a transaction: one portal fetched 64 rows at a time.
    async with conn.transaction():
        total = 0
        async for r in conn.cursor("select g * $1::int from generate_series(1, 1000) g", k,
                                   prefetch=64):
            total += r[0]
    print(tag, "cursor", total == k * 500500)
    # A type of the database's own: asyncpg reads its description (an introspection query,
    # prepared like any other) the first time it meets it.
    moods = await conn.fetchval("select array_agg(m) from unnest($1::mood[]) m",
                                ["happy", "sad"] if k % 2 else ["sad"])
    print(tag, "enum", moods)
    # A SET outside a transaction stays with this client; the startup values come back on RESET.
    await conn.execute(f"set application_name = 'asyncpg-set-{k}'")
    names = [await conn.fetchval("select current_setting('application_name')")
             for _ in range(rounds)]
    await conn.execute("reset application_name")
    print(tag, "set", set(names) == {f"asyncpg-set-{k}"}, await session(conn) == start)
    # A multi-statement simple query.
    await conn.execute(f"insert into pooled_items values ('{tag}', 9000); "
                       f"insert into pooled_items values ('{tag}', 9001)")
    n = await conn.fetchval("select count(*) from pooled_items where client = $1 and n >= 9000",
                            tag)
    print(tag, "script", n)
    await conn.close()

    # asyncpg's own pool: every release runs its reset (SELECT pg_advisory_unlock_all();
    # CLOSE ALL; UNLISTEN *; RESET ALL;), so what one borrower SET is gone for the next.
    pool = await asyncpg.create_pool(min_size=2, max_size=2, **connect_args())
    seen = []
    for i in range(rounds):
        async with pool.acquire() as c:
            seen.append(await session(c) == start)
            await c.execute(f"set search_path = public; set application_name = 'borrowed-{k}-{i}'")
            assert await c.fetchval("select current_setting('application_name')") \
                == f"borrowed-{k}-{i}"
            assert await c.fetchval("select $1::int * 2", i) == 2 * i
    async with pool.acquire() as c:
        seen.append(await session(c) == start)
    await pool.close()
    print(tag, "pool", all(seen), len(seen))


asyncio.run(main())
