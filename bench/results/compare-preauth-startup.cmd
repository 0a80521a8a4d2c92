branchgate-loadgen idle --stage startup --connections 2000 --concurrency 32 --hold 2s --settle 1s --process-tree \
    --target before=postgres://bench.main:$PASSWORD@localhost:35035/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt&sslnegotiation=direct \
    --target after=postgres://bench.main:$PASSWORD@localhost:44175/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt&sslnegotiation=direct \
    --pid-file before=$DIR/before.pid \
    --pid-file after=$DIR/after.pid
