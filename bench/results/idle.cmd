branchgate-loadgen idle --connections 9750 --concurrency 32 --hold 2s --settle 1s \
    --target pgbouncer=postgres://bench:$PASSWORD@localhost:34979/bench?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt \
    --target branchgate=postgres://bench.main:$PASSWORD@localhost:47801/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt&sslnegotiation=direct \
    --pid branchgate=18094 \
    --pid pgbouncer=18154
