branchgate-loadgen query --closed --connections 32 --protocol prepared --query-file $DIR/points-params.sql --duration 15s --warmup 2s --slice 1s \
    --target pg=postgres://bench:$PASSWORD@localhost:46759/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt \
    --target branchgate-pooled=postgres://bench.main:$PASSWORD@localhost:55719/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt&sslnegotiation=direct \
    --pid-file branchgate-pooled=$DIR/branchgate.pid
