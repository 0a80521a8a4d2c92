branchgate-loadgen idle --connections 9750 --concurrency 32 --hold 2s --settle 1s \
    --target pgbouncer=postgres://bench:$PASSWORD@localhost:60931/bench?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt \
    --target branchgate=postgres://bench.main:$PASSWORD@localhost:33385/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt&sslnegotiation=direct \
    --pid branchgate=2799 \
    --pid pgbouncer=2860
