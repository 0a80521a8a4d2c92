branchgate-loadgen query --closed --connections 128 --protocol extended --query-file $DIR/points-params.sql --duration 15s --warmup 2s --slice 1s --branches s1,s2,s3,s4,s5,s6,s7,s8 --source-ips 127.0.0.2-127.0.0.19 --branch-by-source 16 \
    --target steer-ebpf=postgres://st_ebpf_{branch}.{branch}:$PASSWORD@localhost:42675/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt&sslnegotiation=direct \
    --target steer-userspace=postgres://st_userspace_{branch}.{branch}:$PASSWORD@localhost:49563/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt&sslnegotiation=direct \
    --target steer-off=postgres://st_off_{branch}.{branch}:$PASSWORD@localhost:43205/postgres?sslmode=verify-full&sslrootcert=$DIR/tls/ca.crt&sslnegotiation=direct \
    --pid steer-ebpf=16729 \
    --pid steer-userspace=16901 \
    --pid steer-off=17073
