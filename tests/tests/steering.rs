//! eBPF steering (`steering = "ebpf"`): the `sk_reuseport` program loads and attaches, and new
//! connections land on the worker its maps say. Needs root (or CAP_BPF and CAP_NET_ADMIN), as
//! CI has; the accept counts per worker (`Steering::accepted`) show where each connection went.
//!
//! Plain TCP connections are enough to see the choice (it is made at the SYN); one test logs in
//! through the front door to see a startup packet's branch remembered.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use branchgate::steering::{
    branch_slot, default_owner, ebpf::pin_name, ebpf::PIN_ROOT, Counters, SteeringMode,
    REBALANCE_MIN_GAP,
};
use branchgate_e2e::metrics;
use branchgate_e2e::raw;
use branchgate_e2e::raw as session;
use branchgate_e2e::{BranchSpec, Certs, PgServer, TestRouter};
use socket2::{Domain, Socket, Type};

/// How long a connection may take to be accepted.
const ACCEPT_WAIT: Duration = Duration::from_secs(5);

const ROLE: &str = "app";
const PASSWORD: &str = "pscale_pw_steering";

/// A router with `steering = "ebpf"` written out (start-up fails if the program does not load)
/// and two workers, listening on `ip`.
fn ebpf_router(certs: &Certs, branches: &[BranchSpec], ip: &str) -> TestRouter {
    let router = TestRouter::start_with_config(certs, branches, |text| {
        format!(
            "steering = \"ebpf\"\n{}",
            text.replace("127.0.0.1:0", &format!("{ip}:0"))
        )
    });
    assert_eq!(router.router().steering().mode(), SteeringMode::Ebpf);
    router
}

/// A branch whose primary nobody listens on: steering happens before any backend is asked.
fn branch(id: &str) -> BranchSpec {
    BranchSpec::new(id, "127.0.0.1:1".parse().expect("address"))
}

/// A TCP connection to `to` from `from` (any port).
fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::new(from, 0).into())
        .unwrap_or_else(|e| panic!("bind {from}: {e}"));
    socket
        .connect(&to.into())
        .unwrap_or_else(|e| panic!("connect {from} -> {to}: {e}"));
    socket.into()
}

/// Accepts per worker.
fn accepted(router: &TestRouter) -> [u64; 2] {
    let steering = router.router().steering();
    [steering.accepted(0), steering.accepted(1)]
}

fn counters(router: &TestRouter) -> Counters {
    router
        .router()
        .steering()
        .counters()
        .expect("the program is loaded")
        .expect("counters readable")
}

/// Connects from `from` to `to` and returns the worker that accepted the connection (kept
/// open, so that it counts in that worker's load).
fn landing(router: &TestRouter, from: IpAddr, to: SocketAddr) -> (usize, TcpStream) {
    let before = accepted(router);
    let stream = connect_from(from, to);
    let deadline = Instant::now() + ACCEPT_WAIT;
    loop {
        let now = accepted(router);
        let moved: Vec<usize> = (0..2).filter(|&w| now[w] != before[w]).collect();
        match moved[..] {
            [worker] if now[worker] == before[worker] + 1 => return (worker, stream),
            [] if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => panic!("connection from {from} to {to}: accepts went {before:?} -> {now:?}"),
        }
    }
}

fn set_owner(router: &TestRouter, branch: &str, worker: u32) {
    router
        .router()
        .steering()
        .set_owner(branch_slot(branch), worker)
        .expect("set owner");
}

fn pin_dir(router: &TestRouter) -> PathBuf {
    Path::new(PIN_ROOT).join(pin_name(router.direct_addr()))
}

#[test]
fn remembered_client_lands_on_its_branch_owner_on_both_ports() {
    let certs = Certs::generate();
    let router = ebpf_router(&certs, &[branch("b1")], "127.0.0.1");
    let steering = router.router().steering();
    let client = IpAddr::V4(Ipv4Addr::LOCALHOST);
    steering
        .remember(client, branch_slot("b1"))
        .expect("remember");
    let before = counters(&router);
    let mut open = Vec::new();
    for owner in [1, 0, 1] {
        set_owner(&router, "b1", owner);
        for port in [router.direct_addr(), router.pooled_addr()] {
            for _ in 0..3 {
                let (worker, stream) = landing(&router, client, port);
                assert_eq!(worker, owner as usize, "owner {owner}, port {port}");
                open.push(stream);
            }
        }
    }
    let after = counters(&router);
    assert_eq!(after.hit - before.hit, 18, "{before:?} -> {after:?}");
    assert_eq!(after.miss, before.miss, "{before:?} -> {after:?}");
    assert_eq!(after.empty_slot + after.select_error, 0, "{after:?}");
}

#[test]
fn unknown_clients_go_to_the_least_loaded_worker() {
    let certs = Certs::generate();
    let router = ebpf_router(&certs, &[branch("b1")], "127.0.0.1");
    let before = counters(&router);
    // Each connection held open adds to its worker's load, so the next unknown client goes to
    // the other worker: they alternate.
    let mut open = Vec::new();
    let mut landed = Vec::new();
    for last_octet in 3..9 {
        let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, last_octet));
        let (worker, stream) = landing(&router, from, router.direct_addr());
        landed.push(worker);
        open.push(stream);
    }
    for pair in landed.chunks(2) {
        assert_ne!(
            pair[0], pair[1],
            "loads were equal, then one was lower: {landed:?}"
        );
    }
    // A load set by hand stands until that worker's own load changes: worker 0 looks busy, so
    // every unknown client goes to worker 1 (whose load grows, still below).
    router
        .router()
        .steering()
        .set_load(0, 1_000)
        .expect("set load");
    for last_octet in 9..13 {
        let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, last_octet));
        let (worker, stream) = landing(&router, from, router.direct_addr());
        assert_eq!(worker, 1, "worker 0 has load 1000");
        open.push(stream);
    }
    let after = counters(&router);
    assert_eq!(after.miss - before.miss, 10, "{before:?} -> {after:?}");
    assert_eq!(after.hit, before.hit, "{before:?} -> {after:?}");
}

#[test]
fn ipv6_client_lands_on_its_branch_owner() {
    let certs = Certs::generate();
    let router = ebpf_router(&certs, &[branch("b6")], "[::1]");
    let client = IpAddr::V6(Ipv6Addr::LOCALHOST);
    router
        .router()
        .steering()
        .remember(client, branch_slot("b6"))
        .expect("remember");
    let before = counters(&router);
    let mut open = Vec::new();
    for owner in [1, 0] {
        set_owner(&router, "b6", owner);
        for _ in 0..3 {
            let (worker, stream) = landing(&router, client, router.direct_addr());
            assert_eq!(worker, owner as usize, "owner {owner}");
            open.push(stream);
        }
    }
    let after = counters(&router);
    assert_eq!(after.hit - before.hit, 6, "{before:?} -> {after:?}");
}

/// Logs in as `ROLE.b1` from `from` to `to` through the front door and runs a query; returns
/// the worker that accepted the connection and the address the client connected from (the
/// router's `getpeername` of it).
fn login_from(
    router: &TestRouter,
    certs: &Certs,
    from: IpAddr,
    to: SocketAddr,
) -> (usize, SocketAddr) {
    let (worker, mut stream) = landing(router, from, to);
    let peer = stream.local_addr().expect("local address");
    stream
        .set_read_timeout(Some(raw::IO_TIMEOUT))
        .expect("timeout");
    raw::ssl_request_on(&mut stream);
    let mut tls = raw::tls_handshake(certs.client_config(), stream).expect("TLS");
    session::start_sasl(&mut tls, &format!("{ROLE}.b1"));
    session::login(&mut tls, PASSWORD).expect("login");
    assert_eq!(session::query_one(&mut tls, "SELECT 41 + 1"), "42");
    (worker, peer)
}

#[test]
fn login_remembers_the_branch_and_the_next_connection_follows_it() {
    let pg = PgServer::start_primary();
    pg.create_role(ROLE, PASSWORD);
    let certs = Certs::generate();
    let branches = [BranchSpec::new("b1", pg.addr()).role(ROLE, &pg.role_verifier(ROLE))];
    let router = ebpf_router(&certs, &branches, "127.0.0.1");
    // 127.0.0.2 is unknown: the first login lands by load, and remembers b1 for it.
    let client = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let login = |router: &TestRouter| login_from(router, &certs, client, router.direct_addr()).0;
    let first = login(&router);
    let before = counters(&router);
    assert_eq!(before.hit, 0, "{before:?}");
    // b1's slot got a default owner when it was remembered (the owner the hand-off uses too);
    // move it to the other worker.
    let steering = router.router().steering();
    assert_eq!(
        steering.owner(branch_slot("b1")),
        default_owner(branch_slot("b1"), 2)
    );
    let other = 1 - first as u32;
    set_owner(&router, "b1", other);
    assert_eq!(steering.owner(branch_slot("b1")), other);
    for _ in 0..3 {
        assert_eq!(login(&router), other as usize);
    }
    let after = counters(&router);
    assert_eq!(after.hit - before.hit, 3, "{before:?} -> {after:?}");
}

/// The key user space files a client under is the address `accept` (`getpeername`) gave for
/// its socket; the program looks up the address it reads from the SYN's IP header. A hit for
/// the next connection from the same address, and a miss for another address, show the two
/// agree: IPv4, IPv6, and IPv4 clients of a dual-stack `[::]` listener (which `accept` reports
/// as `::ffff:a.b.c.d`, and whose SYNs carry an IPv4 header).
#[test]
fn the_address_the_program_reads_is_the_one_getpeername_gives() {
    let pg = PgServer::start_primary();
    pg.create_role(ROLE, PASSWORD);
    let certs = Certs::generate();
    let branches = [BranchSpec::new("b1", pg.addr()).role(ROLE, &pg.role_verifier(ROLE))];
    let v4 = |last| IpAddr::V4(Ipv4Addr::new(127, 0, 0, last));
    // (listen on, where clients connect, the client, an address never filed: IPv6 loopback
    // has only ::1)
    let cases: [(&str, Option<IpAddr>, IpAddr, Option<IpAddr>); 3] = [
        ("127.0.0.1", None, v4(2), Some(v4(3))),
        ("[::1]", None, IpAddr::V6(Ipv6Addr::LOCALHOST), None),
        ("[::]", Some(v4(1)), v4(5), Some(v4(6))),
    ];
    for (listen, connect_to, client, other) in cases {
        let router = ebpf_router(&certs, &branches, listen);
        let to = |addr: SocketAddr| connect_to.map_or(addr, |ip| SocketAddr::new(ip, addr.port()));
        let (first, peer) = login_from(&router, &certs, client, to(router.direct_addr()));
        assert_eq!(peer.ip(), client, "{listen}");
        let owner = 1 - first as u32;
        set_owner(&router, "b1", owner);
        let before = counters(&router);
        let (worker, _open) = landing(&router, client, to(router.pooled_addr()));
        let after = counters(&router);
        assert_eq!(
            (after.hit - before.hit, after.miss - before.miss),
            (1, 0),
            "{listen}: the program did not find the address login filed for {peer}"
        );
        assert_eq!(worker, owner as usize, "{listen}");
        if let Some(other) = other {
            let before = counters(&router);
            let (_, _other) = landing(&router, other, to(router.direct_addr()));
            let after = counters(&router);
            assert_eq!(
                (after.hit - before.hit, after.miss - before.miss),
                (0, 1),
                "{listen}: {other} was never filed"
            );
        }
    }
}

#[test]
fn maps_are_pinned_for_bpftool_and_removed_at_shutdown() {
    let certs = Certs::generate();
    let mut router = ebpf_router(&certs, &[branch("b1")], "127.0.0.1");
    let dir = pin_dir(&router);
    let steering = router.router().steering();
    assert_eq!(
        steering.ebpf().and_then(|e| e.pinned()),
        Some(dir.as_path())
    );
    steering
        .remember(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), branch_slot("b1"))
        .expect("remember");
    let (_, _open) = landing(
        &router,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        router.direct_addr(),
    );

    // clients: the key is 127.0.0.1 as an IPv4-mapped address, the value b1's slot.
    let clients = bpftool_dump(&dir.join("clients"));
    let slot = branch_slot("b1").to_le_bytes();
    let key = "\"0x00\",\"0x00\",\"0xff\",\"0xff\",\"0x7f\",\"0x00\",\"0x00\",\"0x01\"";
    let value = format!("\"{:#04x}\",\"{:#04x}\"", slot[0], slot[1]);
    assert!(
        clients.contains(key) && clients.contains(&value),
        "{clients}"
    );
    // counters: per-CPU, one entry per counter.
    let counts = bpftool_dump(&dir.join("counters"));
    assert!(counts.contains("\"values\""), "{counts}");
    for map in ["owners", "load", "sockets_direct", "sockets_pooled"] {
        assert!(dir.join(map).exists(), "{map} pinned");
    }

    router.shutdown_in_background().join().expect("shutdown");
    assert!(!dir.exists(), "{} removed at shutdown", dir.display());
}

/// `bpftool -j map dump pinned PATH`, compact JSON.
fn bpftool_dump(path: &Path) -> String {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(path)
        .output()
        .expect("bpftool (installed by scripts/setup)");
    assert!(
        out.status.success(),
        "bpftool map dump pinned {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn an_owner_without_a_listener_falls_back_to_the_kernel_hash() {
    let certs = Certs::generate();
    let router = ebpf_router(&certs, &[branch("b1")], "127.0.0.1");
    let slot = branch_slot("b1");
    router
        .router()
        .steering()
        .remember(IpAddr::V4(Ipv4Addr::LOCALHOST), slot)
        .expect("remember");
    // Worker 5 of 2: its socket-array slot is empty. The router's API refuses such an owner,
    // so it is written straight into the pinned map, as an operator with bpftool could.
    let owners = pin_dir(&router).join("owners");
    let mut update = Command::new("bpftool");
    update
        .args(["map", "update", "pinned"])
        .arg(&owners)
        .arg("key");
    update.args(slot.to_le_bytes().map(|b| b.to_string()));
    update.args(["value", "5", "0", "0", "0", "1", "0", "0", "0"]);
    let out = update.output().expect("bpftool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = counters(&router);
    let mut open = Vec::new();
    for _ in 0..4 {
        // Accepted all the same, by one of the two workers.
        let (_, stream) = landing(
            &router,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            router.direct_addr(),
        );
        open.push(stream);
    }
    let after = counters(&router);
    assert_eq!(after.hit - before.hit, 4, "{before:?} -> {after:?}");
    assert_eq!(
        after.empty_slot - before.empty_slot,
        4,
        "{before:?} -> {after:?}"
    );
}

/// Starts a router from a thread whose effective capabilities lack what loading BPF needs
/// (CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_PERFMON): capabilities are per thread, and the
/// program is loaded on the thread that starts the router.
fn start_unprivileged(certs: &Certs, steering: &str) -> Result<TestRouter, String> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                drop_bpf_capabilities();
                std::panic::catch_unwind(|| {
                    TestRouter::start_with_config(certs, &[branch("b1")], |text| {
                        format!("{steering}\n{text}")
                    })
                })
                .map_err(|panic| {
                    panic
                        .downcast_ref::<String>()
                        .cloned()
                        .unwrap_or_else(|| "start panicked".to_owned())
                })
            })
            .join()
            .expect("start thread")
    })
}

fn drop_bpf_capabilities() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    const DROPPED: [u32; 4] = [12, 21, 38, 39]; // NET_ADMIN, SYS_ADMIN, PERFMON, BPF
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget/capset on this thread with a version-3 header and two data words.
    unsafe {
        assert_eq!(
            libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()),
            0
        );
        for cap in DROPPED {
            data[(cap / 32) as usize].effective &= !(1 << (cap % 32));
        }
        assert_eq!(
            libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()),
            0,
            "capset: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[test]
fn without_privileges_the_default_falls_back_and_ebpf_written_out_fails() {
    let certs = Certs::generate();
    let router = start_unprivileged(&certs, "").expect("the default starts anyway");
    assert_eq!(router.router().steering().mode(), SteeringMode::Userspace);
    assert!(router.router().steering().counters().is_none());
    let error = match start_unprivileged(&certs, "steering = \"ebpf\"") {
        Ok(_) => panic!("steering = \"ebpf\" started without the program"),
        Err(error) => error,
    };
    assert!(error.contains("steering = \"ebpf\""), "{error}");
    let off = start_unprivileged(&certs, "steering = \"off\"").expect("off starts");
    assert_eq!(off.router().steering().mode(), SteeringMode::Off);
}

/// `rebalance`: the sessions of branches a worker owns outweigh the other worker's by enough,
/// so one branch slot moves to the other worker; new sessions of that branch follow it, the
/// open ones stay, and the counts per slot follow sessions through the hand-off and their end.
/// Userspace steering (no program needed): ownership is the router's own table.
///
/// The sessions open in an order that keeps the gap between the workers under
/// [`REBALANCE_MIN_GAP`] until the last one, so the rebalancer (every 100 ms) has exactly one
/// move to make, whenever it looks: c's 10 on worker 1, then a's 12 and b's 14 on worker 0
/// (26 against 10); a's 12 is the closest to half the gap and moves (14 against 22).
#[test]
fn rebalancing_moves_a_branch_to_the_lighter_worker() {
    assert_eq!(
        REBALANCE_MIN_GAP, 16,
        "the session counts below are made for it"
    );
    let pg = PgServer::start_primary();
    let roles = ["ra", "rb", "rc"];
    for role in roles {
        pg.create_role(role, PASSWORD);
    }
    let certs = Certs::generate();
    // a and b owned by worker 0 by default, c by worker 1.
    let on = |owner: u32| {
        (0..)
            .map(|n| format!("r{n}"))
            .filter(move |id| default_owner(branch_slot(id), 2) == owner)
    };
    let mut zero = on(0);
    let ids = [
        zero.next().expect("a"),
        zero.next().expect("b"),
        on(1).next().expect("c"),
    ];
    let branches: Vec<BranchSpec> = ids
        .iter()
        .zip(roles)
        .map(|(id, role)| BranchSpec::new(id, pg.addr()).role(role, &pg.role_verifier(role)))
        .collect();
    let router = TestRouter::start_with_config(&certs, &branches, |text| {
        format!(
            "steering = \"userspace\"\nrebalance = \"100ms\"\n{}",
            text.replace(
                "pooled = \"127.0.0.1:0\"\n",
                "pooled = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n"
            )
        )
    });
    let steering = router.router().steering();
    let admin = router.router().admin_addr().expect("admin endpoint");
    let on_worker = |worker: usize| {
        let text = metrics::scrape(admin);
        let labels = [format!("worker=\"{worker}\""), "port=\"pooled\"".to_owned()];
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        metrics::sample(&text, "branchgate_client_connections", &labels) as usize
    };
    let login = |branch: usize| {
        let mut tls = raw::connect_tls(
            router.pooled_addr(),
            certs.client_config(),
            raw::Mode::Direct,
        );
        session::start_sasl(&mut tls, &format!("{}.{}", roles[branch], ids[branch]));
        session::login(&mut tls, PASSWORD).expect("login");
        assert_eq!(session::query_one(&mut tls, "SELECT 1"), "1");
        tls
    };
    let (a, b, c) = (0, 1, 2);
    let mut open: Vec<_> = (0..10).map(|_| login(c)).collect();
    open.extend((0..12).map(|_| login(a)));
    open.extend((0..14).map(|_| login(b)));
    let slots = ids.each_ref().map(|id| branch_slot(id));
    assert_eq!(slots.map(|slot| steering.sessions(slot)), [12, 14, 10]);
    branchgate_e2e::binary::wait_for("a rebalance", Duration::from_secs(10), || {
        (steering.moves() > 0).then_some(())
    });
    assert_eq!(slots.map(|slot| steering.owner(slot)), [1, 0, 1]);
    assert_eq!(steering.moves(), 1);
    // The open sessions stayed where they were: a's and b's on worker 0, c's on worker 1.
    assert_eq!((on_worker(0), on_worker(1)), (26, 10));
    // New sessions of a go to its new owner, and work.
    open.push(login(a));
    assert_eq!((on_worker(0), on_worker(1)), (26, 11));
    assert_eq!(steering.sessions(slots[a]), 13);
    // Sessions that end are counted out, wherever they ran.
    drop(open);
    branchgate_e2e::binary::wait_for("sessions counted out", Duration::from_secs(10), || {
        (slots
            .iter()
            .map(|&slot| steering.sessions(slot))
            .sum::<u32>()
            == 0)
            .then_some(())
    });
    assert_eq!(steering.moves(), 1, "nothing to move once idle");
}
