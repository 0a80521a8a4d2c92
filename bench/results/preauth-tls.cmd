branchgate-loadgen idle --stage tls --connections 2000 --concurrency 32 --hold 2s --settle 1s --process-tree \
    --target pg=postgres://bench:$PASSWORD@localhost:56381/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt \
    --target pgbouncer=postgres://bench:$PASSWORD@localhost:60931/bench?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt \
    --target branchgate=postgres://bench.main:$PASSWORD@localhost:33385/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt&sslnegotiation=direct \
    --pid-file branchgate=$DIR/branchgate.pid \
    --pid-file pgbouncer=$DIR/pgbouncer/pgbouncer.pid \
    --pid-file pg=$DIR/pg/postmaster.pid
