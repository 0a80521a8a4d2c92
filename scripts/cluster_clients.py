"""Real clients for the cluster's end-to-end tests (`scripts/cluster test`), with psycopg.

Run with the project's venv (its psycopg bundles a libpq >= 17, for `sslnegotiation=direct`),
inside the client namespace for the balancer or from the host for the nodes themselves:

  spread  connections through one address, on each port and TLS mode, each telling which router
          node serves it (the backend sees the node's address: `inet_client_addr()`); fails
          unless every expected node served every (port, mode), or, with --expect-auth-failure,
          unless every login is refused with 28P01
  reset   holds a session on every node and port, runs a role reset command, and polls until
          every node takes the new password, refuses the old one and has closed the sessions
  load    sessions looping `select 1` through the balancer until told which node was killed;
          then checks that only that node's sessions saw errors and that they reconnected
  cancel-latency
          (scripts/cluster bench) the time from a cancel sent through the balancer to the
          query's 57014, when the cancel reaches the session's own node and when it reaches
          the next node (forwarded): three sessions a round, queries seen running in
          pg_stat_activity first
  cancel  sessions through the balancer each run `pg_sleep`, and libpq cancels each through the
          balancer too (a new connection, which the balancer gives to any node): every query
          must end with 57014, whichever node took the CancelRequest (cancels across nodes)

Every check polls with a deadline; nothing waits a fixed time to synchronise.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time

import psycopg
from psycopg import conninfo as pgconninfo

WHICH_NODE = "select host(inet_client_addr())"
MODES = ("postgres", "direct")
CONNECT_TIMEOUT_S = 5


def fail(message):
    print(f"cluster test: FAILED: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def conninfo(args, host, port, password, mode="postgres"):
    return pgconninfo.make_conninfo(
        host=host,
        port=port,
        user=args.user,
        password=password,
        dbname="postgres",
        sslmode="verify-full",
        sslrootcert=args.ca,
        sslnegotiation=mode,
        connect_timeout=CONNECT_TIMEOUT_S,
    )


def connect(args, host, port, password, mode="postgres"):
    # autocommit: on the pooled port a transaction left open would pin the backend.
    return psycopg.connect(conninfo(args, host, port, password, mode), autocommit=True)


def sqlstate(error):
    return getattr(error, "sqlstate", None) or ""


def auth_refused(error):
    # A refused login fails the connection attempt, where psycopg has no SQLSTATE to give; the
    # router's FATAL 28P01 then shows as libpq's text of it.
    return sqlstate(error) == "28P01" or "password authentication failed" in str(error)


def spread(args):
    expected = set(args.nodes.split(","))
    for port in args.ports.split(","):
        for mode in args.modes.split(","):
            seen = {}
            for _ in range(args.count):
                try:
                    with connect(args, args.host, port, args.password, mode) as conn:
                        node = conn.execute(WHICH_NODE).fetchone()[0]
                        conn.execute("select 1").fetchone()
                except psycopg.Error as e:
                    if args.expect_auth_failure and auth_refused(e):
                        continue
                    fail(f"port {port}, sslnegotiation={mode}: {sqlstate(e)} {e}")
                if args.expect_auth_failure:
                    fail(f"port {port}, sslnegotiation={mode}: the old password still works "
                         f"on node {node}")
                seen[node] = seen.get(node, 0) + 1
            if args.expect_auth_failure:
                print(f"port {port} sslnegotiation={mode}: {args.count} logins refused (28P01)")
                continue
            if set(seen) != expected:
                fail(f"port {port}, sslnegotiation={mode}: served by {sorted(seen)}, "
                     f"expected every node of {sorted(expected)}")
            counts = " ".join(f"{n}={c}" for n, c in sorted(seen.items()))
            print(f"port {port} sslnegotiation={mode}: {args.count} sessions, {counts}")


def reset(args):
    nodes = args.nodes.split(",")
    ports = args.ports.split(",")
    held = {}
    for node in nodes:
        for port in ports:
            conn = connect(args, node, port, args.password)
            conn.execute("select 1").fetchone()
            held[(node, port)] = conn
    print(f"reset: {len(held)} sessions open with the old password, one per node and port")

    started = time.monotonic()
    out = subprocess.run(args.command, check=False, capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"{' '.join(args.command)} exited {out.returncode}: {out.stdout}{out.stderr}")
    match = re.search(r"^password: (\S+)$", out.stdout, re.M)
    if not match:
        fail(f"the reset printed no password: {out.stdout}")
    new_password = match.group(1)
    returned = time.monotonic() - started
    print(f"reset: the command returned after {returned:.2f}s")

    # The command returns once every live node has acknowledged applying the change: from
    # then on every node takes the new password and refuses the old one, at the first try.
    for node in nodes:
        for port in ports:
            try:
                with connect(args, node, port, new_password) as conn:
                    conn.execute("select 1").fetchone()
            except psycopg.Error as e:
                fail(f"right after the reset returned, {node}:{port} refused the new password: "
                     f"{sqlstate(e)} {e}")
            try:
                with connect(args, node, port, args.password):
                    pass
                fail(f"right after the reset returned, {node}:{port} still took the old password")
            except psycopg.Error as e:
                if not auth_refused(e):
                    fail(f"{node}:{port}: the old password failed otherwise: {sqlstate(e)} {e}")
    print(f"reset: at once on every node and port: the new password works, the old is refused")

    # The sessions are closed as each node applies the change; each polled until it is (or
    # the deadline), as are the checks above once more.
    pending = {}
    for node in nodes:
        for port in ports:
            pending[("new password works", node, port)] = None
            pending[("old password refused", node, port)] = None
            pending[("old session closed", node, port)] = None
    deadline = started + args.deadline
    while pending and time.monotonic() < deadline:
        for key in list(pending):
            what, node, port = key
            if what == "old session closed":
                try:
                    held[(node, port)].execute("select 1").fetchone()
                    continue
                except psycopg.Error:
                    pass
            else:
                password = new_password if what == "new password works" else args.password
                try:
                    with connect(args, node, port, password) as conn:
                        got = conn.execute(WHICH_NODE).fetchone()[0]
                    if what == "old password refused":
                        continue
                    if got != node:
                        fail(f"a session to {node}:{port} was served by {got}")
                except psycopg.Error as e:
                    pending[key] = f"{sqlstate(e)} {e}".strip()
                    if what == "new password works" or not auth_refused(e):
                        continue
            del pending[key]
            print(f"reset: {what} on {node}:{port} after {time.monotonic() - started:.2f}s")
        if pending:
            time.sleep(0.05)
    for conn in held.values():
        conn.close()
    if pending:
        fail("after the reset, not within {}s: {}".format(
            args.deadline,
            "; ".join(f"{w} on {n}:{p} (last: {e})" for (w, n, p), e in pending.items())))
    print(f"password: {new_password}")


class LoadWorker(threading.Thread):
    """One client: a session through the balancer looping `select 1`; a new one after an error."""

    def __init__(self, args, port, stop):
        super().__init__(daemon=True)
        self.args = args
        self.port = port
        self.stop = stop
        self.lock = threading.Lock()
        self.events = []  # (time, event, node, detail)
        self.conn = None
        self.node = None
        self.first_node = None

    def event(self, what, detail=""):
        with self.lock:
            self.events.append((time.monotonic(), what, self.node, detail))

    def open(self):
        self.conn = connect(self.args, self.args.host, self.port, self.args.password)
        self.node = self.conn.execute(WHICH_NODE).fetchone()[0]
        self.first_node = self.first_node or self.node
        self.event("connected")

    def run(self):
        while not self.stop.is_set():
            if self.conn is None:
                try:
                    self.open()
                except psycopg.Error as e:
                    self.event("connect error", str(e).strip())
                    self.stop.wait(0.1)
                    continue
            try:
                self.conn.execute("select 1").fetchone()
                self.event("ok")
            except psycopg.Error as e:
                self.event("error", str(e).strip())
                self.conn.close()
                self.conn = None
                self.node = None
                continue
            self.stop.wait(self.args.pace)
        if self.conn is not None:
            self.conn.close()

    def snapshot(self):
        with self.lock:
            return list(self.events)



def load(args):
    ports = args.ports.split(",")
    stop = threading.Event()
    workers = [LoadWorker(args, ports[i % len(ports)], stop) for i in range(args.workers)]
    # Opened one after another, so the balancer's round robin gives each node its share.
    for w in workers:
        try:
            w.open()
        except psycopg.Error as e:
            fail(f"load: first connection through the balancer: {e}")
    on = {}
    for w in workers:
        on.setdefault(w.first_node, []).append(w.port)
    expected = set(args.nodes.split(","))
    if set(on) != expected:
        fail(f"load: sessions on {sorted(on)}, expected some on every node of {sorted(expected)}")
    for w in workers:
        w.start()
    print("ready: " + ", ".join(f"{n} ports {','.join(p)}" for n, p in sorted(on.items())),
          flush=True)
    # Queries flowing on every session before scripts/cluster kills a node.
    deadline = time.monotonic() + args.deadline
    while time.monotonic() < deadline and any(
            sum(1 for e in w.snapshot() if e[1] == "ok") < 10 for w in workers):
        time.sleep(0.05)
    print("running", flush=True)

    # The killed node's address, written by scripts/cluster into the control file once the
    # balancer has marked it down.
    killed = None
    while time.monotonic() < deadline:
        if os.path.exists(args.control):
            with open(args.control) as f:
                killed = f.read().strip()
            if killed:
                break
        time.sleep(0.05)
    if not killed:
        fail("load: never told which node was killed")

    def recovered(w):
        # Its session on the killed node failed, then a new one ran queries on another node.
        events = w.snapshot()
        failed_at = next((i for i, e in enumerate(events) if e[1] == "error"), None)
        if failed_at is None:
            return False
        return any(e[1] == "ok" and e[2] not in (None, killed) for e in events[failed_at:])

    victims = [w for w in workers if w.first_node == killed]
    while time.monotonic() < deadline and not all(recovered(w) for w in victims):
        time.sleep(0.05)
    # A little more traffic on the survivors after the recoveries, then stop.
    marks = {id(w): len(w.snapshot()) for w in workers}
    while time.monotonic() < deadline and any(
            len(w.snapshot()) < marks[id(w)] + 5 for w in workers):
        time.sleep(0.05)
    stop.set()
    for w in workers:
        w.join(10)

    problems = []
    for i, w in enumerate(workers):
        events = w.snapshot()
        oks = sum(1 for e in events if e[1] == "ok")
        errors = [e for e in events if e[1] in ("error", "connect error")]
        if w.first_node != killed:
            if errors:
                problems.append(f"worker {i} (port {w.port}, on surviving node {w.first_node}) "
                                f"saw errors: {errors[:3]}")
            print(f"load: worker {i} port {w.port} on {w.first_node}: {oks} queries, no error")
            continue
        if not recovered(w):
            problems.append(f"worker {i} (port {w.port}, on killed node {killed}) did not "
                            f"reconnect and run queries: {events[-3:]}")
            continue
        connect_errors = sum(1 for e in errors if e[1] == "connect error")
        nodes = [e[2] for e in events if e[1] == "connected"]
        print(f"load: worker {i} port {w.port} on killed {killed}: {oks} queries, lost its "
              f"session, reconnected to {nodes[-1]} ({connect_errors} failed connect attempts)")
    print(json.dumps({"workers": len(workers), "victims": len(victims)}))
    if problems:
        fail("load: " + "; ".join(problems))


def cancel(args):
    # Sessions until every node serves at least one on each port: a cancel through the balancer
    # then often reaches another node than its session's, which must forward it.
    expected = set(args.nodes.split(","))
    for port in args.ports.split(","):
        sessions = []
        deadline = time.monotonic() + args.deadline
        while {node for node, _ in sessions} != expected or len(sessions) < args.count:
            if time.monotonic() > deadline:
                fail(f"cancel: port {port}: sessions only on {sorted({n for n, _ in sessions})}")
            conn = connect(args, args.host, port, args.password)
            sessions.append((conn.execute(WHICH_NODE).fetchone()[0], conn))
        outcomes = {}

        def sleeper(i, conn):
            try:
                conn.execute("select pg_sleep(60)")
                outcomes[i] = "finished"
            except psycopg.errors.QueryCanceled:
                outcomes[i] = "57014"
            except psycopg.Error as e:
                outcomes[i] = f"{sqlstate(e)} {e}"

        threads = [threading.Thread(target=sleeper, args=(i, conn), daemon=True)
                   for i, (_, conn) in enumerate(sessions)]
        for t in threads:
            t.start()
        # The balancer hands out connections in turn: the sessions took one each, so one more
        # connection now puts every session's CancelRequest on the node after its own (with
        # round robin), and each cancel has to be forwarded.
        with connect(args, args.host, port, args.password) as extra:
            extra.execute("select 1").fetchone()
        # Each query must be running before its cancel is sent (pg_stat_activity on the node
        # is out of reach from here: the balancer's next connection could be anywhere), so the
        # cancel is repeated until the query ends, at most once per 200 ms, bounded by the
        # deadline: a cancel that lands before the query starts cancels nothing, as in
        # PostgreSQL.
        sent = [0] * len(sessions)
        for i, (node, conn) in enumerate(sessions):
            while threads[i].is_alive() and time.monotonic() < deadline:
                conn.cancel_safe(timeout=CONNECT_TIMEOUT_S)
                sent[i] += 1
                threads[i].join(0.2)
            threads[i].join(max(0.0, deadline - time.monotonic()))
        for i, (node, conn) in enumerate(sessions):
            outcome = outcomes.get(i, "still running at the deadline")
            if outcome != "57014":
                fail(f"cancel: port {port}: the query of a session on {node}: {outcome}")
            conn.close()
        nodes = " ".join(sorted({n for n, _ in sessions}))
        print(f"cancel: port {port}: {len(sessions)} queries on {nodes} canceled through the "
              f"balancer ({sum(sent)} CancelRequests)")


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def cancel_latency(args):
    admin = psycopg.connect(host=args.pg_host, port=args.pg_port, user="postgres",
                            password=args.admin_password, dbname="postgres", autocommit=True)
    sql = "select pg_sleep(60)"
    running = ("select count(*) from pg_stat_activity where state = 'active' and query = %s")
    samples = {"local": [], "forwarded": []}
    for round_ in range(args.rounds):
        # A forwarded cancel is an unknown key on the node that takes it, which costs this
        # source one of its guesses there (2 come back a second): a pause between rounds keeps
        # this measurement under the limit it would otherwise trip.
        if round_:
            time.sleep(1.5)
        for kind in ("local", "forwarded"):
            # Round robin: three sessions, one per node, in the balancer's turn order.
            sessions = [connect(args, args.host, args.port, args.password) for _ in range(3)]
            ended = {}

            def sleeper(i, conn):
                try:
                    conn.execute(sql)
                except psycopg.errors.QueryCanceled:
                    ended[i] = time.perf_counter()
                except psycopg.Error as e:
                    ended[i] = e

            threads = [threading.Thread(target=sleeper, args=(i, c), daemon=True)
                       for i, c in enumerate(sessions)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + args.deadline
            while admin.execute(running, (sql,)).fetchone()[0] < 3:
                if time.monotonic() > deadline:
                    fail("cancel-latency: the queries did not start")
                time.sleep(0.01)
            if kind == "forwarded":
                # One more connection: each CancelRequest then lands on the next node.
                with connect(args, args.host, args.port, args.password) as extra:
                    extra.execute("select 1").fetchone()
            for i, conn in enumerate(sessions):
                sent = time.perf_counter()
                conn.cancel_safe(timeout=CONNECT_TIMEOUT_S)
                threads[i].join(args.deadline)
                result = ended.get(i)
                if not isinstance(result, float):
                    fail(f"cancel-latency: {kind}: the query did not end with 57014: {result}")
                samples[kind].append((result - sent) * 1000)
            for conn in sessions:
                conn.close()
    out = {kind: {"count": len(v), "p50_ms": round(percentile(v, 50), 2),
                  "p99_ms": round(percentile(v, 99), 2), "mean_ms": round(sum(v) / len(v), 2)}
           for kind, v in samples.items()}
    print(json.dumps(out))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("spread", "reset", "load", "cancel", "cancel-latency"):
        p = sub.add_parser(name)
        p.add_argument("--user", required=True)
        p.add_argument("--password", required=True)
        p.add_argument("--ca", required=True)
        p.add_argument("--nodes", required=True, help="the nodes' addresses, comma-separated")
        p.add_argument("--ports", default="5432,6432")
        p.add_argument("--deadline", type=float, default=30.0)
        if name == "spread":
            p.add_argument("--host", required=True)
            p.add_argument("--modes", default=",".join(MODES))
            p.add_argument("--count", type=int, default=6)
            p.add_argument("--expect-auth-failure", action="store_true")
        if name == "reset":
            p.add_argument("command", nargs=argparse.REMAINDER)
        if name == "cancel":
            p.add_argument("--host", required=True)
            p.add_argument("--count", type=int, default=6)
        if name == "cancel-latency":
            p.add_argument("--host", required=True)
            p.add_argument("--port", default="5432")
            p.add_argument("--rounds", type=int, default=20)
            p.add_argument("--pg-host", required=True)
            p.add_argument("--pg-port", required=True)
            p.add_argument("--admin-password", required=True)
        if name == "load":
            p.add_argument("--host", required=True)
            p.add_argument("--workers", type=int, default=6)
            p.add_argument("--pace", type=float, default=0.02)
            p.add_argument("--control", required=True)
    args = parser.parse_args()
    if args.cmd == "reset":
        if args.command[:1] == ["--"]:
            args.command = args.command[1:]
        reset(args)
    elif args.cmd == "spread":
        spread(args)
    elif args.cmd == "cancel":
        cancel(args)
    elif args.cmd == "cancel-latency":
        cancel_latency(args)
    else:
        load(args)


if __name__ == "__main__":
    main()
