branchgate-loadgen query --closed --connections 256 --query-file $DIR/points.sql --duration 15s --warmup 2s --slice 1s \
    --target before=postgres://bench.main:$PASSWORD@localhost:35035/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt&sslnegotiation=direct \
    --target after=postgres://bench.main:$PASSWORD@localhost:44175/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt&sslnegotiation=direct \
    --pid before=25866 \
    --pid after=25877
