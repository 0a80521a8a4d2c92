branchgate-loadgen query --rate 1000 --connections 1 --duration 15s --warmup 2s --slice 1s \
    --target pg=postgres://bench:$PASSWORD@localhost:59863/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt \
    --target pgbouncer=postgres://bench:$PASSWORD@localhost:56065/bench?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt \
    --target branchgate=postgres://bench.main:$PASSWORD@localhost:39179/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt&sslnegotiation=direct \
    --pid branchgate=22441 \
    --pid pgbouncer=22504
