branchgate-loadgen query --rate 1000 --connections 1 --duration 15s --warmup 2s --slice 1s \
    --target pg=postgres://bench:$PASSWORD@localhost:59437/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt \
    --target before=postgres://bench.main:$PASSWORD@localhost:35035/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt&sslnegotiation=direct \
    --target after=postgres://bench.main:$PASSWORD@localhost:44175/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt&sslnegotiation=direct \
    --pid before=25866 \
    --pid after=25877
