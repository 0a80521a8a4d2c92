import sys, psycopg
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    pid = conn.info.backend_pid
    print(pid)
    print("pids agree", conn.execute("select pg_backend_pid()").fetchone()[0] == pid)
    target = "pg_backend_pid()" if sys.argv[2] == "self" else str(pid)
    try:
        conn.execute("select pg_terminate_backend(" + target + ")")
        print("no error")
    except psycopg.Error as e:
        print("error", e.sqlstate, conn.closed)
