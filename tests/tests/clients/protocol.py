import sys, psycopg
# argv[1] asks for the newest protocol (max_protocol_version=latest, libpq 18: 3.2); the router
# answers NegotiateProtocolVersion, and libpq must accept it and go on at 3.0.
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    (one,) = conn.execute("select 1").fetchone()
    print(conn.pgconn.full_protocol_version, one)
