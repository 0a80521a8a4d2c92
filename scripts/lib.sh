# Shell pieces shared by scripts/demo and scripts/bench: PostgreSQL servers run as the `postgres`
# user, free ports, a local CA, and the project's binaries. Source it after setting `prefix`
# (the name printed before every message).
#
#   prefix=demo; . "$repo/scripts/lib.sh"

pg_bin=/usr/lib/postgresql/15/bin
# Data directories of the servers started by pg_start, stopped by pg_stop_all.
pg_servers=()

say() { printf '%s: %s\n' "$prefix" "$*"; }
die() { printf '%s: FAILED: %s\n' "$prefix" "$*" >&2; exit 1; }

# PostgreSQL and PgBouncer refuse to run as root.
as_postgres() {
    if [[ $EUID -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

port_free() { # port
    python3 -c "import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1',$1))" 2>/dev/null
}

# A directory the postgres user can use: world-traversable, owned by postgres when we are root.
postgres_dir() { # dir
    mkdir -p "$1"
    [[ $EUID -eq 0 ]] && chown postgres "$1"
    chmod 755 "$1"
}

# initdb with a superuser `postgres` whose password is in pwfile; local trust, TCP SCRAM.
pg_init() { # data_dir pwfile
    as_postgres "$pg_bin/initdb" -D "$1" -U postgres --pwfile="$2" \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null || die "initdb $1"
}

# Start a server on 127.0.0.1:port with its unix socket in socket_dir; extra args go to -o.
pg_start() { # data_dir port socket_dir [postgres options...]
    local data=$1 port=$2 sockets=$3
    shift 3
    as_postgres "$pg_bin/pg_ctl" -D "$data" -w -t 60 -l "$data.log" \
        -o "-p $port -k $sockets -c listen_addresses=127.0.0.1 $*" start >/dev/null ||
        die "PostgreSQL in $data did not start (see $data.log)"
    pg_servers+=("$data")
}

pg_stop_all() {
    local data
    for data in "${pg_servers[@]}"; do
        as_postgres "$pg_bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null 2>&1 || true
    done
    pg_servers=()
}

# A local CA and an ECDSA P-256 server certificate for localhost and 127.0.0.1 (ECDSA: an
# RSA-2048 signature would cost about 1 ms per handshake), and for any further subjectAltName
# entries given (`IP:10.0.0.5`, `DNS:db.example`). Writes ca.crt, server.crt, server.key.
make_certs() { # dir [subjectAltName entry...]
    local tls=$1
    shift
    local san="DNS:localhost,IP:127.0.0.1" entry
    for entry in "$@"; do san="$san,$entry"; done
    mkdir -p "$tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
        -subj "/CN=branchgate local CA" -keyout "$tls/ca.key" -out "$tls/ca.crt" 2>/dev/null ||
        die "openssl: CA"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -subj "/CN=localhost" -keyout "$tls/server.key" -out "$tls/server.csr" 2>/dev/null ||
        die "openssl: server key"
    printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\n' "$san" > "$tls/ext"
    openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" \
        -CAcreateserial -days 30 -extfile "$tls/ext" -out "$tls/server.crt" 2>/dev/null ||
        die "openssl: server certificate"
}

# Build packages in `profile` (release or debug) and set `bin_dir` to where their binaries are.
build_bins() { # profile package...
    local profile=$1
    shift
    local args=()
    for p in "$@"; do args+=(-p "$p"); done
    say "building ${*} ($profile)"
    if [[ $profile == release ]]; then
        cargo build --quiet --release "${args[@]}" || die "cargo build"
    else
        cargo build --quiet "${args[@]}" || die "cargo build"
    fi
    local target_dir
    target_dir="$(cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
    bin_dir="$target_dir/$profile"
}

# Wait until `log` has a line matching `pattern`, or die if process `pid` exits first.
wait_for_log() { # pid log pattern what
    local pid=$1 log=$2 pattern=$3 what=$4
    for _ in $(seq 1 200); do
        if ! kill -0 "$pid" 2>/dev/null; then cat "$log" >&2; die "$what exited"; fi
        grep -q "$pattern" "$log" 2>/dev/null && return 0
        sleep 0.05
    done
    cat "$log" >&2
    die "$what did not start"
}
