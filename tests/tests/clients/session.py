import sys, psycopg
from psycopg.pq import TransactionStatus
dsn = sys.argv[1]
with psycopg.connect(dsn, autocommit=True) as a, psycopg.connect(dsn, autocommit=True) as b:
    a.execute("create temp table session_items (x int)")
    a.execute("insert into session_items values (1), (2)")
    print("temp", a.execute("select count(*) from session_items").fetchone()[0])
    try:
        b.execute("select count(*) from session_items")
        print("other session sees the temp table")
    except psycopg.Error as e:
        print("other", e.sqlstate)
    a.execute("set search_path = pg_temp, public")
    a.execute("set work_mem = '7MB'")
    a.execute("select 1")
    print("search_path", a.execute("show search_path").fetchone()[0])
    print("work_mem", a.execute("show work_mem").fetchone()[0])
    a.execute("listen clients_chan")
    b_sql_pid = b.execute("select pg_backend_pid()").fetchone()[0]
    b.execute("notify clients_chan, 'hello from b'")
    for n in a.notifies(timeout=10, stop_after=1):
        print("notify", n.channel, repr(n.payload), n.pid == b.info.backend_pid,
              n.pid == b_sql_pid, n.pid != a.info.backend_pid)
    a.execute("begin")
    print("status", a.info.transaction_status == TransactionStatus.INTRANS)
    for i in range(50):
        a.execute("insert into session_items values (%s)", (i,))
    print("inside", a.execute("select count(*) from session_items").fetchone()[0])
    a.execute("rollback")
    print("status", a.info.transaction_status == TransactionStatus.IDLE)
    print("after", a.execute("select count(*) from session_items").fetchone()[0])
