branchgate-loadgen idle --stage ready --connections 500 --concurrency 32 --hold 1s --settle 1s --process-tree \
    --target pg=postgres://bench:$PASSWORD@localhost:44367/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt \
    --target pgbouncer=postgres://bench:$PASSWORD@localhost:54125/bench?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt \
    --target branchgate=postgres://bench.main:$PASSWORD@localhost:37003/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt&sslnegotiation=direct \
    --pid-file branchgate=$DIR/branchgate.pid \
    --pid-file pgbouncer=$DIR/pgbouncer/pgbouncer.pid \
    --pid-file pg=$DIR/pg/postmaster.pid
