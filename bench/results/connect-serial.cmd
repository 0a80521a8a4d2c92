branchgate-loadgen connect --max --concurrency 1 --duration 10s --slice 1s \
    --target branchgate-sslrequest=postgres://bench.main:$PASSWORD@localhost:39179/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt \
    --target branchgate=postgres://bench.main:$PASSWORD@localhost:39179/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt&sslnegotiation=direct \
    --pid branchgate-sslrequest=22441 \
    --pid branchgate=22441
