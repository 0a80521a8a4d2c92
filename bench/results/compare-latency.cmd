branchgate-loadgen query --rate 1000 --connections 1 --duration 15s --warmup 2s --slice 1s \
    --target pg=postgres://bench:$PASSWORD@localhost:50369/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt \
    --target before=postgres://bench.main:$PASSWORD@localhost:56871/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt&sslnegotiation=direct \
    --target after=postgres://bench.main:$PASSWORD@localhost:49707/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt&sslnegotiation=direct \
    --pid before=6915 \
    --pid after=6924
