branchgate-loadgen query --closed --connections 256 --query-file $DIR/points.sql --duration 15s --warmup 2s --slice 1s \
    --target before=postgres://bench.main:$PASSWORD@localhost:56871/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt&sslnegotiation=direct \
    --target after=postgres://bench.main:$PASSWORD@localhost:49707/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt&sslnegotiation=direct \
    --pid before=6915 \
    --pid after=6924
