import sys, threading, time, psycopg
# Cancel through the pooled port: argv[1] the router's connection string, argv[2] a superuser
# connection string straight to PostgreSQL (to watch pg_stat_activity), argv[3] the role name,
# argv[4] rounds. Prints one line per round, then the idle-cancel line and the pid line.
dsn, admin_dsn, role, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
SLEEP = "select pg_sleep(10)"

def wait_active(watcher, query):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        row = watcher.execute(
            "select count(*) from pg_stat_activity where usename = %s and query = %s"
            " and state = 'active'", (role, query)).fetchone()
        if row[0] == 1:
            return
        time.sleep(0.02)
    raise AssertionError(f"{query} never became active")

with psycopg.connect(admin_dsn, autocommit=True) as watcher:
    for _ in range(rounds):
        with psycopg.connect(dsn, autocommit=True) as conn:
            canceller = threading.Thread(
                target=lambda: (wait_active(watcher, SLEEP), conn.cancel_safe()))
            canceller.start()
            start = time.monotonic()
            try:
                conn.execute(SLEEP)
                outcome = "completed"
            except psycopg.Error as e:
                outcome = e.sqlstate
            elapsed = time.monotonic() - start
            canceller.join()
            (after,) = conn.execute("select 'works'").fetchone()
            print("busy", outcome, elapsed < 3, after)

    # A cancel for a client that holds no backend sends nothing: the query another client runs
    # meanwhile completes, and the idle client's next query works.
    with psycopg.connect(dsn, autocommit=True) as busy, \
            psycopg.connect(dsn, autocommit=True) as idle:
        (v,) = idle.execute("select 1").fetchone()
        query = "select 'done' from pg_sleep(1)"
        result = []
        def run():
            try:
                result.append(busy.execute(query).fetchone()[0])
            except psycopg.Error as e:
                result.append(e.sqlstate)
        runner = threading.Thread(target=run)
        runner.start()
        wait_active(watcher, query)
        idle.cancel_safe()
        runner.join()
        (after,) = idle.execute("select 'works'").fetchone()
        print("idle", result[0], after)

    # The pid of BackendKeyData is the router's, not a backend's.
    with psycopg.connect(dsn, autocommit=True) as conn:
        told = conn.info.backend_pid
        (real,) = conn.execute("select pg_backend_pid()").fetchone()
        (listed,) = watcher.execute(
            "select count(*) from pg_stat_activity where pid = %s", (told,)).fetchone()
        print("pid", told != real, listed)
