import sys, psycopg
# One client of the pooled port: argv[1] the connection string, argv[2] a client number k,
# argv[3] rounds. Every statement's text holds k, so two clients' psycopg statement names
# (_pg3_0, _pg3_1, ...) stand for different queries: a router that mixes clients' statements
# returns wrong numbers, which the asserts catch. Prints one line per part.
dsn, k, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tag = f"c{k}"
with psycopg.connect(dsn, autocommit=True) as conn:
    assert conn.prepare_threshold == 5
    conn.execute("delete from pooled_items where client = %s", (tag,))
    # Autocommit: the same query `rounds` times, prepared by psycopg from the 6th on.
    for i in range(rounds):
        (v,) = conn.execute(f"select %s::int * {k}", (i,)).fetchone()
        assert v == i * k, (i, v)
    print(tag, "autocommit", rounds)
    # Prepared from the first execution.
    for i in range(rounds):
        (v,) = conn.execute(f"select %s::text || '-{tag}'", (str(i),), prepare=True).fetchone()
        assert v == f"{i}-{tag}", (i, v)
    print(tag, "prepared", rounds)
    # Explicit transactions: each sees its own uncommitted row.
    for i in range(rounds):
        with conn.transaction():
            conn.execute("insert into pooled_items values (%s, %s)", (tag, i))
            (n,) = conn.execute(
                "select count(*) from pooled_items where client = %s", (tag,)).fetchone()
            assert n == i + 1, (i, n)
    # A transaction that fails is rolled back and the connection goes on.
    try:
        with conn.transaction():
            conn.execute("insert into pooled_items values (%s, -1)", (tag,))
            conn.execute("select 1/0")
        failed = "none"
    except psycopg.Error as e:
        failed = e.sqlstate
    (n,) = conn.execute("select count(*) from pooled_items where client = %s", (tag,)).fetchone()
    print(tag, "transactions", n, failed)
    # Pipeline mode, in autocommit and inside a transaction.
    with conn.pipeline():
        curs = [conn.execute(f"select %s::int + {k}", (i,)) for i in range(10)]
    first = [c.fetchone()[0] for c in curs]
    with conn.transaction(), conn.pipeline():
        conn.execute("insert into pooled_items values (%s, %s)", (tag, 1000))
        cur = conn.execute("select count(*) from pooled_items where client = %s", (tag,))
    (n,) = cur.fetchone()
    print(tag, "pipeline", first == [i + k for i in range(10)], n)
    # A pipeline with an error: the statements after it are skipped, the connection goes on.
    try:
        with conn.pipeline():
            conn.execute("select 1")
            conn.execute("select 1/0")
            conn.execute("select 2")
        failed = "none"
    except psycopg.Error as e:
        failed = e.sqlstate
    (v,) = conn.execute(f"select {k}").fetchone()
    print(tag, "pipeline error", failed, v)
# Without autocommit: psycopg opens the transactions itself.
with psycopg.connect(dsn) as conn:
    for i in range(rounds):
        (v,) = conn.execute(f"select %s::int - {k}", (i,)).fetchone()
        assert v == i - k, (i, v)
        if i % 2 == 0:
            conn.commit()
        else:
            conn.rollback()
    print(tag, "implicit transactions", rounds)
