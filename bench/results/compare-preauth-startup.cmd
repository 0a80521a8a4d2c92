branchgate-loadgen idle --stage startup --connections 2000 --concurrency 32 --hold 2s --settle 1s --process-tree \
    --target before=postgres://bench.main:$PASSWORD@localhost:56871/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt&sslnegotiation=direct \
    --target after=postgres://bench.main:$PASSWORD@localhost:49707/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt&sslnegotiation=direct \
    --pid-file before=$DIR/before.pid \
    --pid-file after=$DIR/after.pid
