import sys, threading, time, psycopg
dsn, method, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
for _ in range(rounds):
    with psycopg.connect(dsn, autocommit=True) as conn, \
            psycopg.connect(dsn, autocommit=True) as watcher:
        pid = conn.info.backend_pid
        def cancel_when_running():
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                row = watcher.execute(
                    "select state from pg_stat_activity where pid = %s"
                    " and query = 'select pg_sleep(30)'", (pid,)).fetchone()
                if row is not None and row[0] == "active":
                    # cancel_safe (libpq's PQcancelBlocking) reports a cancel connection that
                    # did not end cleanly, e.g. TLS closed without close_notify.
                    try:
                        getattr(conn, method)()
                    except Exception as e:
                        print("cancel failed:", e)
                    return
                time.sleep(0.02)
        canceller = threading.Thread(target=cancel_when_running)
        canceller.start()
        start = time.monotonic()
        try:
            conn.execute("select pg_sleep(30)")
            outcome = "completed"
        except psycopg.Error as e:
            outcome = e.sqlstate
        elapsed = time.monotonic() - start
        canceller.join()
        print(outcome, elapsed < 10)
