branchgate-loadgen connect --max --concurrency 8 --duration 15s --slice 1s \
    --target pg=postgres://bench:$PASSWORD@localhost:42899/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt \
    --target pgbouncer=postgres://bench:$PASSWORD@localhost:52419/bench?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt \
    --target branchgate-pooled=postgres://bench.main:$PASSWORD@localhost:54355/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt&sslnegotiation=direct \
    --pid-file pgbouncer=$DIR/pgbouncer/pgbouncer.pid \
    --pid-file branchgate-pooled=$DIR/branchgate.pid
