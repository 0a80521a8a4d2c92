branchgate-loadgen idle --stage tcp --connections 2000 --concurrency 32 --hold 2s --settle 1s --process-tree \
    --target pg=postgres://bench:$PASSWORD@localhost:59863/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt \
    --target pgbouncer=postgres://bench:$PASSWORD@localhost:56065/bench?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt \
    --target branchgate=postgres://bench.main:$PASSWORD@localhost:39179/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt&sslnegotiation=direct \
    --pid-file branchgate=$DIR/branchgate.pid \
    --pid-file pgbouncer=$DIR/pgbouncer/pgbouncer.pid \
    --pid-file pg=$DIR/pg/postmaster.pid
