import asyncio, sys
from urllib.parse import quote
import asyncpg
# asyncpg and a DDL that changes a prepared statement's row shape, on a pool of two backends:
# argv[1] port, argv[2] user, argv[3] password, argv[4] the CA file. On PostgreSQL itself the
# statement fails with 0A000 ("cached plan must not change result type"), which asyncpg answers
# outside a transaction by preparing it again and reading the new type. Through a pooler that
# prepares the statement anew on another backend, asyncpg would read the new float4 column's
# bytes as the int4 it was told of; and a value written by a statement prepared before a DDL
# that changes its parameter's type. Prints what each step read.
port, user, password, ca = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dsn = (f"postgresql://{quote(user)}:{quote(password)}@localhost:{port}/postgres"
       f"?sslmode=verify-full&sslrootcert={quote(ca)}&sslnegotiation=direct")


async def main():
    a = await asyncpg.connect(dsn)
    holder = await asyncpg.connect(dsn)
    await a.execute("drop table if exists drv_shape; create table drv_shape (a int); "
                    "insert into drv_shape values (1)")
    # The holder keeps one backend (X) in a block: `a` prepares and runs the statement on the
    # other (Y). X goes back last, so it is lent next.
    hold = holder.transaction()
    await hold.start()
    x = await holder.fetchval("select pg_backend_pid()")
    rows = await a.fetch("select * from drv_shape")
    y = await a.fetchval("select pg_backend_pid()")
    print("before", [tuple(r) for r in rows], x != y)
    await hold.commit()
    await holder.execute("alter table drv_shape alter column a type float4 using a + 0.5")
    rows = await a.fetch("select * from drv_shape")
    print("after", [tuple(r) for r in rows])
    # Inside a transaction asyncpg cannot prepare again: it raises, and the block is aborted.
    await holder.execute("alter table drv_shape alter column a type numeric")
    try:
        async with a.transaction():
            await a.fetch("select * from drv_shape")
        print("in a block", "no error")
    except asyncpg.exceptions.InvalidCachedStatementError as e:
        print("in a block", type(e).__name__, e.sqlstate)
    rows = await a.fetch("select * from drv_shape")
    print("then", [tuple(r) for r in rows])
    # A parameter's type: the session's plan keeps int4 (what asyncpg was told, and encodes 1
    # by) through a DDL that makes the column float4; PostgreSQL casts it and stores 1.0. A
    # backend given the statement after the DDL must be told int4 too, or it reads the binary
    # int4 as a float4 (1.4e-45).
    await a.execute("drop table if exists drv_types; create table drv_types (a int)")
    hold = holder.transaction()
    await hold.start()
    await holder.fetchval("select 1")
    await a.execute("insert into drv_types values ($1)", 1)
    await hold.commit()
    await holder.execute("alter table drv_types alter column a type float4")
    await a.execute("insert into drv_types values ($1)", 1)
    print("written", [r[0] for r in await a.fetch("select a from drv_types")])
    await holder.close()
    await a.close()


asyncio.run(main())
