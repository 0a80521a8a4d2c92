import sys, psycopg
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    user, recovery, pid, port = conn.execute(
        "select current_user, pg_is_in_recovery(), pg_backend_pid(), inet_server_port()"
    ).fetchone()
    assert conn.info.backend_pid > 0
    print(user, recovery, port, pid == conn.info.backend_pid, conn.pgconn.ssl_in_use)
