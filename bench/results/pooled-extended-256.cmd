branchgate-loadgen query --closed --connections 256 --protocol extended --query-file $DIR/points-params.sql --duration 15s --warmup 2s --slice 1s \
    --target pg=postgres://bench:$PASSWORD@localhost:42899/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt \
    --target pgbouncer=postgres://bench:$PASSWORD@localhost:52419/bench?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt \
    --target branchgate-pooled=postgres://bench.main:$PASSWORD@localhost:54355/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt&sslnegotiation=direct \
    --pid-file pgbouncer=$DIR/pgbouncer/pgbouncer.pid \
    --pid-file branchgate-pooled=$DIR/branchgate.pid
