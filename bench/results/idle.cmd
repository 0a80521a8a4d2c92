branchgate-loadgen idle --connections 9750 --concurrency 32 --hold 2s --settle 1s \
    --target pgbouncer=postgres://bench:$PASSWORD@localhost:56065/bench?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt \
    --target branchgate=postgres://bench.main:$PASSWORD@localhost:39179/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt&sslnegotiation=direct \
    --pid branchgate=22441 \
    --pid pgbouncer=22504
