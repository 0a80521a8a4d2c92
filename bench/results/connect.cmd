branchgate-loadgen connect --max --concurrency 8 --duration 15s --slice 1s \
    --target pg=postgres://bench:$PASSWORD@localhost:42323/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt \
    --target pgbouncer=postgres://bench:$PASSWORD@localhost:37419/bench?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt \
    --target branchgate-sslrequest=postgres://bench.main:$PASSWORD@localhost:47183/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt \
    --target branchgate=postgres://bench.main:$PASSWORD@localhost:47183/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt&sslnegotiation=direct \
    --pid branchgate=18782 \
    --pid pgbouncer=18841 \
    --pid branchgate-sslrequest=18782
