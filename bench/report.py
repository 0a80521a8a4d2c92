#!/usr/bin/env python3
"""BENCHMARKS.md from the JSON documents branchgate-loadgen wrote during one scripts/bench run.

    report.py --summary RESULT.json            # a few lines per target, for the terminal
    report.py --mode M --results DIR --out FILE --commit C --command CMD --versions V \
              --sections latency,connect,...,pooled [--partial]
    report.py --criterion CRITERION_HOME [--criterion-command CMD]...   # JSON on stdout

Every figure is computed from one run's JSON (the workloads' targets were interleaved in
slices of one clock), so ratios between targets are what to read; absolute numbers move with
the machine's noise. Each generated section sits between `<!-- bench:NAME -->` markers: a run
that measured only some workloads (`--partial`: `--only`, `--compare`) replaces or inserts
just those sections, each saying which run it comes from, and keeps the rest of the file; a
full run rewrites the header and its sections and keeps the sections it did not measure
(`compare`). The section after ANALYSIS_MARKER in an existing report is hand-written and kept
as it is.
"""

import argparse
import datetime
import json
import os
import platform
import re
import sys

ANALYSIS_MARKER = "<!-- analysis: everything below is written by hand and kept by scripts/bench -->"

# The targets every workload may have; the baseline first.
PG, PGB, BG, BG_REQ = "pg", "pgbouncer", "branchgate", "branchgate-sslrequest"
# The router's pooled port (the pooled workload).
BG_POOLED = "branchgate-pooled"

# Aims from the benchmark issue (benchmarks, not tests).
AIM_ADDED_P50_VS_PGBOUNCER = 0.5
AIM_CONNECT_RATE_VS_PGBOUNCER = 10.0
AIM_IDLE_BYTES = 4096
# Aims of the pooled port (issue 8), against PgBouncer in transaction mode with the same pool size.
AIM_POOLED_THROUGHPUT_VS_PGBOUNCER = 1.5
AIM_POOLED_CPU_PER_TXN_VS_PGBOUNCER = 0.5
AIM_POOLED_ADDED_P50_VS_PGBOUNCER = 0.5
AIM_POOLED_CONNECT_RATE_VS_PGBOUNCER = 10.0
AIM_POOLED_CPU_PER_CONNECTION_VS_PGBOUNCER = 0.25
AIM_POOLED_IDLE_BYTES = 2560
POOLED_PROTOCOLS = ["simple", "extended", "prepared"]


def load(path):
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    return doc, {r["target"]: r for r in doc["results"]}


def us(value):
    """Microseconds, readable."""
    if value is None:
        return "-"
    if value >= 10_000:
        return f"{value / 1000:.1f} ms"
    if value >= 1000:
        return f"{value / 1000:.2f} ms"
    return f"{value:.0f} µs"


def signed_us(value):
    return ("+" if value >= 0 else "−") + us(abs(value))


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def num(value, digits=0):
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def size(value):
    if value is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def cpu_per_op(r):
    return r.get("cpu_us_per_op")


def errors_note(results):
    bad = [f"{t}: {r['errors']} errors (first: {r.get('first_error')})" for t, r in results.items() if r["errors"]]
    return ("\nErrors during this workload: " + "; ".join(bad) + "\n") if bad else ""


def summary(path):
    doc, results = load(path)
    for target, r in results.items():
        lat = r["latency_us"]
        line = f"    {target:<22} {num(r['count']):>9} ok {r['errors']:>4} err  {num(r['rate_per_s'], 1):>10}/s  p50 {us(lat['p50']):>9}  p99 {us(lat['p99']):>9}"
        if r.get("cpu_us_per_op") is not None:
            line += f"  cpu {r['cpu_us_per_op']:.1f} µs/op"
        if r.get("tls_established_us"):
            line += f"  to TLS {us(r['tls_established_us']['p50'])}"
            rtt = (r.get("phases") or {}).get("ssl_request")
            line += f" (SSLRequest {us(rtt['p50'])})" if rtt else " (direct)"
        if r.get("stage"):
            line += f"  at {r['stage']}"
        if r.get("bytes_per_connection") is not None:
            line += f"  {size(r['bytes_per_connection'])}/conn"
        tree = r.get("process_tree")
        if tree and tree.get("pss_bytes_per_connection") is not None:
            line += (f" (process tree: Pss {size(tree['pss_bytes_per_connection'])}/conn, "
                     f"{tree['processes_before']}->{tree['processes_after']} processes)")
        if r.get("closed_by_server"):
            line += f"  CLOSED BY SERVER: {r['closed_by_server']}"
        print(line)
        if r["errors"]:
            print(f"    {'':<22} first error: {r.get('first_error')}")


def workload(results_dir, name):
    path = os.path.join(results_dir, name + ".json")
    if not os.path.exists(path):
        return None
    doc, results = load(path)
    with open(os.path.join(results_dir, name + ".cmd"), encoding="utf-8") as f:
        command = f.read().strip()
    return doc, results, command


def plot_link(results_dir, out_dir, name):
    rel = os.path.relpath(os.path.join(results_dir, name + ".svg"), out_dir)
    return f"![{name} latency by percentile]({rel})"


def cmd_block(command):
    return f"\n```\n{command}\n```\n"


def section_latency(w):
    doc, res, command = w
    base = res.get(PG)
    rows = ["| target | p50 | p90 | p99 | p99.9 | added p50 | added p99 |", "|---|---|---|---|---|---|---|"]
    for t, r in res.items():
        lat = r["latency_us"]
        added50 = added99 = "-"
        if base and t != PG:
            added50 = signed_us(lat["p50"] - base["latency_us"]["p50"])
            added99 = signed_us(lat["p99"] - base["latency_us"]["p99"])
        rows.append(f"| {t} | {us(lat['p50'])} | {us(lat['p90'])} | {us(lat['p99'])} | {us(lat['p999'])} | {added50} | {added99} |")
    text = "\n".join(rows) + "\n"
    if base and BG in res and PGB in res:
        def added(target, p):
            return res[target]["latency_us"][p] - base["latency_us"][p]
        bg, pgb = added(BG, "p50"), added(PGB, "p50")
        if pgb > 0:
            verdict = "met" if bg <= AIM_ADDED_P50_VS_PGBOUNCER * pgb else "missed"
            text += (f"\nbranchgate adds {signed_us(bg)} at p50, PgBouncer {signed_us(pgb)}: "
                     f"{bg / pgb:.2f} of PgBouncer's added latency (aim: at most "
                     f"{AIM_ADDED_P50_VS_PGBOUNCER}; **{verdict}**).")
        bg99, pgb99 = added(BG, "p99"), added(PGB, "p99")
        text += (f" At p99 branchgate adds {signed_us(bg99)}, PgBouncer {signed_us(pgb99)}"
                 + (f": {bg99 / pgb99:.2f} of PgBouncer's.\n" if pgb99 > 0 else ".\n"))
    rate = doc["settings"].get("rate")
    head = (f"## 1. Added latency per query\n\nOne connection per target, `SELECT 1` (simple protocol), "
            f"open loop at {num(rate)} queries/s (latency from the scheduled send time, "
            "coordinated omission corrected). *Added* = target minus PostgreSQL direct, same run.\n")
    return head + cmd_block(command) + "\n" + text + errors_note(res)


def phase(r, name, p="p50"):
    """A connection phase; `ssl_request` is absent for direct SSL and without TLS."""
    summary = (r.get("phases") or {}).get(name)
    return summary[p] if summary else None


def to_tls(r, p="p50"):
    """connect() until TLS established; absent without TLS (and in results before it existed)."""
    summary = r.get("tls_established_us")
    return summary[p] if summary else None


def direct_vs_sslrequest(res):
    """The sentence comparing connect() to TLS established, direct SSL vs SSLRequest."""
    if BG not in res or BG_REQ not in res:
        return None
    direct, req = to_tls(res[BG]), to_tls(res[BG_REQ])
    if direct is None or req is None:
        return None
    saved = req - direct
    rtt = phase(res[BG_REQ], "ssl_request")
    how = (f"{us(saved)} ({saved / req:.0%}) sooner" if saved >= 0
           else f"{us(-saved)} later (noise hides the round trip in this run)")
    return (f"connect() to TLS established, p50: direct SSL {us(direct)}, SSLRequest {us(req)}: "
            f"direct SSL has TLS up {how}; the SSLRequest round trip it skips takes {us(rtt)} at p50.")


def section_connect(w, serial):
    doc, res, command = w
    rows = ["| target | connections/s | p50 | p99 | TCP p50 | SSLRequest p50 | TLS p50 | auth p50 | ready p50 "
            "| to TLS p50 | router CPU / connection |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t, r in res.items():
        lat = r["latency_us"]
        cpu = cpu_per_op(r)
        rows.append(f"| {t} | {num(r['rate_per_s'])} | {us(lat['p50'])} | {us(lat['p99'])} | "
                    f"{us(phase(r, 'tcp'))} | {us(phase(r, 'ssl_request'))} | {us(phase(r, 'tls'))} | "
                    f"{us(phase(r, 'auth'))} | {us(phase(r, 'ready'))} | {us(to_tls(r))} | "
                    f"{us(cpu) if cpu is not None else '-'} |")
    text = "\n".join(rows) + "\n"
    notes = []
    compare = direct_vs_sslrequest(res)
    if compare:
        notes.append(f"With {doc['settings'].get('concurrency')} setups in flight: {compare}")
    if BG in res and PGB in res:
        r = res[BG]["rate_per_s"] / res[PGB]["rate_per_s"] if res[PGB]["rate_per_s"] else 0
        verdict = "met" if r >= AIM_CONNECT_RATE_VS_PGBOUNCER else "missed"
        notes.append(f"branchgate's connection rate is {r:.2f}x PgBouncer's (aim: at least "
                     f"{AIM_CONNECT_RATE_VS_PGBOUNCER:g}x; **{verdict}**).")
        a, b = cpu_per_op(res[BG]), cpu_per_op(res[PGB])
        if a is not None and b is not None:
            notes.append(f"Router CPU per connection: branchgate {us(a)}, PgBouncer {us(b)} ({ratio(a, b)}).")
    conc = doc["settings"].get("concurrency")
    head = (f"## 2. Connection setup (TLS + SCRAM-SHA-256)\n\nAs fast as possible with {conc} setups in "
            "flight per target: connect() to ReadyForQuery, then Terminate. Phases are each measured from "
            "the end of the previous one: `SSLRequest` is the SSLRequest → `S` round trip (none for direct "
            "SSL, which sends the TLS ClientHello at once), `TLS` the handshake after it. `to TLS` is not a "
            "phase but connect() until TLS is established (TCP, SSLRequest round trip if any, handshake): "
            "direct SSL should be one round trip shorter. "
            "The load generator caches the salted password, so client-side PBKDF2 is not measured. "
            "CPU is the router process's (branchgate or PgBouncer) during the target's own slices, "
            "from the kernel's per-process CPU clock.\n")
    body = head + cmd_block(command) + "\n" + text + "\n" + "\n".join(notes) + "\n" + errors_note(res)
    if serial:
        body += section_connect_serial(serial)
    return body


def section_connect_serial(w):
    doc, res, command = w
    rows = ["| target | connections | TCP p50 | SSLRequest p50 / p99 | TLS p50 / p99 | to TLS p50 / p99 | p50 to ReadyForQuery |",
            "|---|---|---|---|---|---|---|"]
    for t, r in res.items():
        def pair(p50, p99):
            return "-" if p50 is None else f"{us(p50)} / {us(p99)}"
        rows.append(f"| {t} | {num(r['count'])} | {us(phase(r, 'tcp'))} | "
                    f"{pair(phase(r, 'ssl_request'), phase(r, 'ssl_request', 'p99'))} | "
                    f"{pair(phase(r, 'tls'), phase(r, 'tls', 'p99'))} | "
                    f"{pair(to_tls(r), to_tls(r, 'p99'))} | {us(r['latency_us']['p50'])} |")
    compare = direct_vs_sslrequest(res)
    head = ("\n### The round trip direct SSL saves\n\nbranchgate alone, one setup at a time, the two TLS "
            "modes interleaved: no queue and no other connection's PostgreSQL backend fork competing for "
            "the cores while a handshake runs, so the SSLRequest round trip is not lost in the noise.\n")
    return (head + cmd_block(command) + "\n" + "\n".join(rows) + "\n"
            + (f"\n{compare}\n" if compare else "") + errors_note(res))


def section_throughput(ws):
    rows = ["| connections | target | queries/s | vs PgBouncer | p50 | p99 | router CPU / query |",
            "|---|---|---|---|---|---|---|"]
    cmds = []
    errs = ""
    for n, (doc, res, command) in ws:
        cmds.append(command)
        pgb = res.get(PGB, {}).get("rate_per_s")
        for t, r in res.items():
            cpu = cpu_per_op(r)
            rows.append(f"| {n} | {t} | {num(r['rate_per_s'])} | {ratio(r['rate_per_s'], pgb)} | "
                        f"{us(r['latency_us']['p50'])} | {us(r['latency_us']['p99'])} | "
                        f"{us(cpu) if cpu is not None else '-'} |")
        errs += errors_note(res)
    head = ("## 3. Throughput\n\nClosed loop, point selects on a 100k-row table (1000 random keys, round "
            "robin, simple protocol). branchgate here is the direct (session) port: one backend per "
            "client; PgBouncer pools them onto its server connections in transaction mode.\n")
    return head + "".join(cmd_block(c) for c in cmds) + "\n" + "\n".join(rows) + "\n" + errs


def section_idle(w, open_files):
    doc, res, command = w
    rows = ["| target | connections open | RSS before | RSS after | per connection |", "|---|---|---|---|---|"]
    for t, r in res.items():
        rows.append(f"| {t} | {num(r['count'])} of {num(r.get('connections_requested'))} | "
                    f"{size(r.get('rss_bytes_before'))} | {size(r.get('rss_bytes_after'))} | "
                    f"{size(r.get('bytes_per_connection'))} |")
    text = "\n".join(rows) + "\n"
    if BG in res and res[BG].get("bytes_per_connection") is not None:
        b = res[BG]["bytes_per_connection"]
        verdict = "met" if b <= AIM_IDLE_BYTES else "missed"
        text += (f"\nbranchgate holds {size(b)} per idle TLS session (aim: at most "
                 f"{size(AIM_IDLE_BYTES)}; **{verdict}**)")
        if PGB in res and res[PGB].get("bytes_per_connection"):
            text += f"; PgBouncer {size(res[PGB]['bytes_per_connection'])} ({ratio(b, res[PGB]['bytes_per_connection'])})"
        text += ".\n"
    if BG in res:
        reached = res[BG]["count"]
        text += (f"\nLargest count reached here: {num(reached)} sessions at once through branchgate's direct "
                 "port, each with its own PostgreSQL backend.")
        if open_files:
            text += (f" The ceiling on this machine is the open-file limit: {num(open_files)} descriptors "
                     f"per process, two per session (client and backend), so about {num((open_files - 500) // 2)} "
                     "sessions; the hard limit cannot be raised here (no CAP_SYS_RESOURCE). PostgreSQL's "
                     "memory, about 1.5 MiB per backend, would stop the direct port near 14,000 sessions "
                     "on this 24 GiB machine anyway; counts of 100k need the pooled port.")
        text += "\n"
    head = ("## 4. Idle connections\n\nTLS sessions opened (handshake, SCRAM, ReadyForQuery) and held idle; "
            "the router process's VmRSS before and with all of them open, measured first in the run, on "
            "fresh processes (memory a finished workload left behind would otherwise be reused and hide "
            "part of the cost).\n")
    return head + cmd_block(command) + "\n" + text + errors_note(res)


def section_cpu(ws):
    rows = ["| connections | target | router CPU | queries | CPU / query | vs PgBouncer |", "|---|---|---|---|---|---|"]
    for n, (doc, res, command) in ws:
        pgb = cpu_per_op(res[PGB]) if PGB in res else None
        for t, r in res.items():
            if r.get("cpu_s") is None:
                continue
            rows.append(f"| {n} | {t} | {r['cpu_s']:.2f} s | {num(r['count'])} | {us(cpu_per_op(r))} | "
                        f"{ratio(cpu_per_op(r), pgb)} |")
    head = ("## 5. CPU per query\n\nThe router process's CPU time (user + system, all threads) during its "
            "target's slices of the throughput runs above, divided by the queries it served. PostgreSQL "
            "and the load generator share the two cores, so this is the fair figure where throughput is "
            "bounded by the machine.\n")
    return head + "\n" + "\n".join(rows) + "\n"


PREAUTH_STAGES = ["tcp", "hello", "tls", "startup", "ready"]
STAGE_WHAT = {
    "tcp": "TCP connected, nothing sent",
    "hello": "TLS ClientHello sent (after the SSLRequest round trip, except direct SSL), nothing more",
    "tls": "TLS handshake done, nothing sent over it",
    "startup": "StartupMessage sent, AuthenticationSASL received, no answer",
    "ready": "logged in (SCRAM), ReadyForQuery received: an idle session",
}


def tree(r, key):
    return (r.get("process_tree") or {}).get(key)


def closed_note(r):
    n = r.get("closed_by_server") or 0
    return f" ({n} closed by the server)" if n else ""


def preauth_workloads(results_dir, prefix):
    found = {}
    for stage in PREAUTH_STAGES:
        w = workload(results_dir, f"{prefix}-{stage}")
        if w:
            found[stage] = w
    return found


def stage_commands(ws):
    """The stages' commands: one block with `--stage $STAGE` when they differ only there."""
    template = {command.replace(f"--stage {stage} ", "--stage $STAGE ") for stage, (_, _, command) in ws.items()}
    if len(template) == 1:
        return (f"\nFor each STAGE in {', '.join(ws)}, on fresh processes:\n" + cmd_block(template.pop()))
    return "".join(cmd_block(command) for _, (_, _, command) in ws.items())


def section_preauth(ws):
    rows = ["| stage | held at | branchgate | PgBouncer | PostgreSQL: Pss of its processes | "
            "PostgreSQL: page tables |", "|---|---|---|---|---|---|"]
    details = ["| stage | target | held | closed by server | setup p50 | VmRSS before → after | VmRSS / conn "
               "| processes before → after | Pss / conn (process tree) |", "|---|---|---|---|---|---|---|---|---|"]
    errs = ""
    n = None
    for stage, (doc, res, _) in ws.items():
        n = doc["settings"].get("connections")
        bg, pgb, pg = res.get(BG, {}), res.get(PGB, {}), res.get(PG, {})
        rows.append(f"| {stage} | {STAGE_WHAT[stage]} | {size(bg.get('bytes_per_connection'))}{closed_note(bg)} | "
                    f"{size(pgb.get('bytes_per_connection'))}{closed_note(pgb)} | "
                    f"{size(tree(pg, 'pss_bytes_per_connection'))}{closed_note(pg)} | "
                    f"{size(tree(pg, 'page_table_bytes_per_connection'))} |")
        for t, r in res.items():
            details.append(
                f"| {stage} | {t} | {num(r['count'])} of {num(r.get('connections_requested'))} | "
                f"{num(r.get('closed_by_server') or 0)} | {us(r['latency_us']['p50'])} | "
                f"{size(r.get('rss_bytes_before'))} → {size(r.get('rss_bytes_after'))} | "
                f"{size(r.get('bytes_per_connection'))} | "
                f"{num(tree(r, 'processes_before'))} → {num(tree(r, 'processes_after'))} | "
                f"{size(tree(r, 'pss_bytes_per_connection'))} |")
        errs += errors_note(res)
    head = (f"## 6. Memory before authentication\n\n{num(n)} connections per target held at each stage of "
            "the setup, then the server's memory read, as in section 4 (VmRSS of the process before and "
            "with all of them held, over the connections still open). Each stage is one `idle --stage` "
            "run on freshly started branchgate and PgBouncer processes (and with the previous stage's "
            "PostgreSQL backends gone), so memory a finished workload left allocated cannot hide the cost. "
            "Every server is configured not to cut the hold short (branchgate `timeouts.startup` and "
            "`timeouts.handshake`, `limits.max_startup_connections`; PgBouncer `client_login_timeout`, "
            "`max_client_conn`; PostgreSQL `authentication_timeout` at its maximum, `max_connections`); a "
            "connection the server closes anyway is counted and left out of the figure. branchgate by "
            "direct SSL, PgBouncer and PostgreSQL by SSLRequest (they have no direct SSL).\n")
    note = ("\nPostgreSQL forks a backend process for every connection at accept, so its postmaster's "
            "VmRSS does not move (see `VmRSS / conn` of `pg` below): its column sums the proportional set "
            "size (Pss in /proc/PID/smaps_rollup: each resident page divided among the processes that map "
            "it) over the postmaster and all its descendants, before and with the connections held "
            "(`--process-tree`). That counts each backend's own memory once and the pages it still shares "
            "with the postmaster after fork once in all, not once per backend as a sum of VmRSS would; "
            "shared memory (shared_buffers) that was resident before is not counted again. Not counted, "
            "for any server: kernel memory, such as socket buffers and (for PostgreSQL) each process's "
            "kernel stack and task; PostgreSQL's page tables (VmPTE) are shown on their own. branchgate "
            "and PgBouncer are one process each; their Pss change per connection (details below) is the "
            "same measure for them, as a check of the two.\n")
    text = head + stage_commands(ws) + "\n" + "\n".join(rows) + "\n" + note
    text += "\nDetails:\n\n" + "\n".join(details) + "\n" + errs
    return text


def templated(commands, subs):
    """The distinct commands once each value that varies between runs is named ($N, ...)."""
    seen = []
    for command in commands:
        for pattern, name in subs:
            command = re.sub(pattern, name, command)
        if command not in seen:
            seen.append(command)
    return "".join(cmd_block(c) for c in seen)


def verdict(ok):
    """met / missed, or `None` (nothing to compare) as not measured."""
    return "not measured" if ok is None else ("met" if ok else "missed")


def tails_ok(res, target=BG_POOLED, base=PGB):
    """p99 and p99.9 at or below the base's; None when either is missing."""
    if target not in res or base not in res:
        return None
    a, b = res[target]["latency_us"], res[base]["latency_us"]
    return a["p99"] <= b["p99"] and a["p999"] <= b["p999"]


def pooled_throughput_runs(results_dir):
    """{protocol: [(clients, workload)]} of the pooled throughput runs, by client count."""
    runs = {}
    for name in os.listdir(results_dir):
        m = re.fullmatch(r"pooled-(simple|extended|prepared)-(\d+)\.json", name)
        if m:
            w = workload(results_dir, name[:-len(".json")])
            servers_path = os.path.join(results_dir, name[:-len(".json")] + ".servers")
            servers = {}
            if os.path.exists(servers_path):
                with open(servers_path, encoding="utf-8") as f:
                    servers = json.load(f)
            runs.setdefault(m.group(1), []).append((int(m.group(2)), w, servers))
    for protocol in runs:
        runs[protocol].sort(key=lambda r: r[0])
    return {p: runs[p] for p in POOLED_PROTOCOLS if p in runs}


def section_pooled(results_dir):
    path = os.path.join(results_dir, "pooled.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    pool = meta.get("pool_size")
    pgb_version = meta.get("pgbouncer_version")
    parts = []
    head = (f"## 8. Pooled port (transaction pooling)\n\n`{BG_POOLED}` is the router's pooled port "
            f"(`[listen] pooled`, direct SSL, `[pool] pool_size = {pool}` per worker), `pgbouncer` is "
            f"PgBouncer {pgb_version} in transaction mode (`default_pool_size = {meta.get('pgbouncer_pool', 20)}`), "
            "`pg` is PostgreSQL direct (a backend per client). TLS and SCRAM-SHA-256 on every path. The "
            "bench runs the router with `steering = \"off\"`, where each worker keeps its own pools "
            "(with steering on, a branch's clients meet on its owning worker: see the analysis), so its "
            f"`pool_size` is PgBouncer's divided among the workers ({meta.get('cores')} here): both "
            "hold the same number of server connections, so PostgreSQL runs as many backends for "
            "each; the `server connections` column counts what each pooler held right after each "
            "throughput run. Each query is a transaction of "
            "its own (no BEGIN), so queries/s is transactions/s and CPU per query is CPU per "
            "transaction.\n")
    if not meta.get("branchgate_pooled"):
        head += (f"\n**This run had no pooled port in branchgate** (its `check-config`: "
                 f"{meta.get('branchgate_pooled_note') or 'rejected'}): PgBouncer and PostgreSQL only, so "
                 "none of the aims below is measured.\n")
    if not meta.get("pgbouncer_prepared"):
        head += (f"\nPgBouncer {pgb_version} has no protocol-level prepared statements in transaction "
                 "mode (`max_prepared_statements` came in 1.21): a client's Bind would reach a server "
                 "connection that never saw its Parse, so the prepared runs have no PgBouncer figure.\n")
    parts.append(head)

    aims = ["| figure | aim | this run | verdict |", "|---|---|---|---|"]
    tails = []  # (figure, ok)

    # Throughput and CPU per transaction, per protocol.
    runs = pooled_throughput_runs(results_dir)
    rows = ["| protocol | clients | target | queries/s | vs PgBouncer | p50 | p99 | p99.9 | router CPU / query "
            "| CPU vs PgBouncer | server connections |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    cmds = []
    errs = ""
    for protocol, ws in runs.items():
        thr, cpu = [], []
        for n, (doc, res, command), servers in ws:
            cmds.append(command)
            pgb = res.get(PGB, {})
            for t, r in res.items():
                lat = r["latency_us"]
                c = cpu_per_op(r)
                rows.append(f"| {protocol} | {num(n)} | {t} | {num(r['rate_per_s'])} | "
                            f"{ratio(r['rate_per_s'], pgb.get('rate_per_s'))} | {us(lat['p50'])} | "
                            f"{us(lat['p99'])} | {us(lat['p999'])} | {us(c)} | "
                            f"{ratio(c, cpu_per_op(pgb)) if pgb else '-'} | "
                            f"{servers.get(t, '-') if t != PG else '-'} |")
            errs += errors_note(res)
            bg = res.get(BG_POOLED)
            if bg and pgb:
                thr.append((n, bg["rate_per_s"] / pgb["rate_per_s"] if pgb["rate_per_s"] else 0.0))
                a, b = cpu_per_op(bg), cpu_per_op(pgb)
                if a is not None and b:
                    cpu.append((n, a / b))
                tails.append((f"throughput, {protocol}, {n} clients", tails_ok(res)))
        if thr:
            ok = all(x >= AIM_POOLED_THROUGHPUT_VS_PGBOUNCER for _, x in thr)
            aims.append(f"| throughput, {protocol} ({', '.join(str(n) for n, _ in thr)} clients) | at least "
                        f"{AIM_POOLED_THROUGHPUT_VS_PGBOUNCER:g}x PgBouncer | "
                        f"{' / '.join(f'{x:.2f}x' for _, x in thr)} | {verdict(ok)} |")
        else:
            alone = any(BG_POOLED in w[1] and PGB not in w[1] for _, w, _ in ws)
            aims.append(f"| throughput, {protocol} | at least {AIM_POOLED_THROUGHPUT_VS_PGBOUNCER:g}x PgBouncer "
                        f"| {'no PgBouncer figure' if alone else '-'} | not measured |")
        if cpu:
            ok = all(x <= AIM_POOLED_CPU_PER_TXN_VS_PGBOUNCER for _, x in cpu)
            aims.append(f"| router CPU per transaction, {protocol} | at most "
                        f"{AIM_POOLED_CPU_PER_TXN_VS_PGBOUNCER:g}x PgBouncer's | "
                        f"{' / '.join(f'{x:.2f}x' for _, x in cpu)} | {verdict(ok)} |")
        else:
            aims.append(f"| router CPU per transaction, {protocol} | at most "
                        f"{AIM_POOLED_CPU_PER_TXN_VS_PGBOUNCER:g}x PgBouncer's | - | not measured |")
    if runs:
        parts.append("### Throughput\n\nClosed loop, point selects on the 100k-row table of section 3, on "
                     f"a pool of {meta.get('pgbouncer_pool', 20)} server connections: `simple` sends the 1000 statements with their keys in the text "
                     "(`points.sql`), `extended` parses `SELECT abalance FROM accounts WHERE aid = $1` "
                     "(the unnamed statement) with each key bound, every query, `prepared` prepares it "
                     "once per connection and then binds each key (`points-params.sql`, the same keys): "
                     "pgbench's `-M` modes.\n"
                     + templated(cmds, [(r"--connections \d+ ", "--connections $N "),
                                        (r"--protocol \w+ ", "--protocol $PROTOCOL "),
                                        (r"\$DIR/points(-params)?\.sql", "$QUERY_FILE")])
                     + "\nFor each PROTOCOL (QUERY_FILE) and N above.\n\n"
                     + "\n".join(rows) + "\n" + errs)

    # Added latency.
    lat = workload(results_dir, "pooled-latency")
    if lat:
        doc, res, command = lat
        base = res.get(PG)
        rows = ["| target | p50 | p90 | p99 | p99.9 | added p50 | added p99 | added p99.9 |",
                "|---|---|---|---|---|---|---|---|"]
        for t, r in res.items():
            l = r["latency_us"]
            added = ["-"] * 3
            if base and t != PG:
                added = [signed_us(l[p] - base["latency_us"][p]) for p in ("p50", "p99", "p999")]
            rows.append(f"| {t} | {us(l['p50'])} | {us(l['p90'])} | {us(l['p99'])} | {us(l['p999'])} | "
                        f"{' | '.join(added)} |")
        text = ("### Added latency\n\nOne client per target, `SELECT 1` (simple protocol), open loop at "
                f"{num(doc['settings'].get('rate'))} queries/s, as section 1. *Added* = target minus "
                "PostgreSQL direct, same run.\n" + cmd_block(command) + "\n" + "\n".join(rows) + "\n")
        this, ok = "-", None
        if base and BG_POOLED in res and PGB in res:
            a = res[BG_POOLED]["latency_us"]["p50"] - base["latency_us"]["p50"]
            b = res[PGB]["latency_us"]["p50"] - base["latency_us"]["p50"]
            if b > 0:
                this, ok = f"{a / b:.2f} ({signed_us(a)} vs {signed_us(b)})", a <= AIM_POOLED_ADDED_P50_VS_PGBOUNCER * b
            tails.append(("added latency, 1 client", tails_ok(res)))
        aims.append(f"| added latency p50, 1 client | at most {AIM_POOLED_ADDED_P50_VS_PGBOUNCER:g} of "
                    f"PgBouncer's | {this} | {verdict(ok)} |")
        parts.append(text + errors_note(res))

    # Connection setup.
    con = workload(results_dir, "pooled-connect")
    if con:
        doc, res, command = con
        pgb = res.get(PGB, {})
        rows = ["| target | connections/s | vs PgBouncer | p50 | p99 | p99.9 | TLS p50 | auth p50 | "
                "router CPU / connection | CPU vs PgBouncer |", "|---|---|---|---|---|---|---|---|---|---|"]
        for t, r in res.items():
            l = r["latency_us"]
            c = cpu_per_op(r)
            rows.append(f"| {t} | {num(r['rate_per_s'])} | {ratio(r['rate_per_s'], pgb.get('rate_per_s'))} | "
                        f"{us(l['p50'])} | {us(l['p99'])} | {us(l['p999'])} | {us(phase(r, 'tls'))} | "
                        f"{us(phase(r, 'auth'))} | {us(c)} | {ratio(c, cpu_per_op(pgb)) if pgb else '-'} |")
        text = (f"### Connection setup (TLS + SCRAM-SHA-256)\n\nAs section 2: as fast as possible with "
                f"{doc['settings'].get('concurrency')} setups in flight per target, connect() to "
                "ReadyForQuery, then Terminate; no backend is started for a pooled client.\n"
                + cmd_block(command) + "\n" + "\n".join(rows) + "\n")
        rate_this = rate_ok = cpu_this = cpu_ok = None
        bg = res.get(BG_POOLED)
        if bg and pgb and pgb.get("rate_per_s"):
            x = bg["rate_per_s"] / pgb["rate_per_s"]
            rate_this, rate_ok = f"{x:.2f}x ({num(bg['rate_per_s'])}/s vs {num(pgb['rate_per_s'])}/s)", \
                x >= AIM_POOLED_CONNECT_RATE_VS_PGBOUNCER
            a, b = cpu_per_op(bg), cpu_per_op(pgb)
            if a is not None and b:
                cpu_this, cpu_ok = f"{a / b:.2f}x ({us(a)} vs {us(b)})", a / b <= AIM_POOLED_CPU_PER_CONNECTION_VS_PGBOUNCER
            tails.append(("connection setup", tails_ok(res)))
        aims.append(f"| TLS + SCRAM connection rate | at least {AIM_POOLED_CONNECT_RATE_VS_PGBOUNCER:g}x "
                    f"PgBouncer's | {rate_this or '-'} | {verdict(rate_ok)} |")
        aims.append(f"| router CPU per new connection | at most "
                    f"{AIM_POOLED_CPU_PER_CONNECTION_VS_PGBOUNCER:g}x PgBouncer's | {cpu_this or '-'} | "
                    f"{verdict(cpu_ok)} |")
        parts.append(text + errors_note(res))

    # Idle pooled clients.
    idle = workload(results_dir, "pooled-idle")
    if idle:
        doc, res, command = idle
        rows = ["| target | clients open | RSS before | RSS after | per client |", "|---|---|---|---|---|"]
        for t, r in res.items():
            rows.append(f"| {t} | {num(r['count'])} of {num(r.get('connections_requested'))} | "
                        f"{size(r.get('rss_bytes_before'))} | {size(r.get('rss_bytes_after'))} | "
                        f"{size(r.get('bytes_per_connection'))} |")
        open_files = meta.get("open_files")
        text = ("### Idle pooled clients\n\nTLS clients logged in (SCRAM, ReadyForQuery) and held idle, "
                "as section 4, on fresh processes; a pooled client holds no server connection, so the "
                f"count is bounded by the open-file limit ({num(open_files)} descriptors per process here, "
                "one per client in the router, in PgBouncer and in the load generator; the run asks for "
                "the limit less 1,000).\n" + cmd_block(command) + "\n" + "\n".join(rows) + "\n")
        this, ok = "-", None
        bg = res.get(BG_POOLED)
        if bg and bg.get("bytes_per_connection") is not None:
            b = bg["bytes_per_connection"]
            this = f"{size(b)} at {num(bg['count'])} clients"
            if PGB in res and res[PGB].get("bytes_per_connection"):
                this += f" (PgBouncer {size(res[PGB]['bytes_per_connection'])})"
            ok = b <= AIM_POOLED_IDLE_BYTES and bg["count"] == bg.get("connections_requested")
        aims.append(f"| idle pooled TLS clients | as many as the open-file limit allows, at most "
                    f"{size(AIM_POOLED_IDLE_BYTES)} each | {this} | {verdict(ok)} |")
        parts.append(text + errors_note(res))

    measured = [(f, ok) for f, ok in tails if ok is not None]
    if measured:
        missed = [f for f, ok in measured if not ok]
        aims.append(f"| tails: p99 and p99.9 | at or below PgBouncer's in each figure | "
                    f"{len(measured) - len(missed)} of {len(measured)} figures"
                    + (f" (above in: {'; '.join(missed)})" if missed else "") + f" | {verdict(not missed)} |")
    else:
        aims.append("| tails: p99 and p99.9 | at or below PgBouncer's in each figure | - | not measured |")
    parts.insert(1, "### Aims\n\n" + "\n".join(aims) + "\n")
    return "\n".join(parts)


def criterion_summary(home, commands):
    """router_records from CRITERION_HOME after `--save-baseline before` and `--baseline before`."""
    benches = []
    for root, dirs, files in os.walk(home):
        if os.path.basename(root) != "before" or "benchmark.json" not in files:
            continue
        bench_dir = os.path.dirname(root)

        def read(kind, name):
            path = os.path.join(bench_dir, kind, name)
            if not os.path.exists(path):
                return None
            with open(path, encoding="utf-8") as f:
                return json.load(f)

        meta = read("before", "benchmark.json")
        before, after, change = read("before", "estimates.json"), read("new", "estimates.json"), read("change", "estimates.json")

        def est(e, key="mean"):
            if not e:
                return None
            return {"point": e[key]["point_estimate"], "lower": e[key]["confidence_interval"]["lower_bound"],
                    "upper": e[key]["confidence_interval"]["upper_bound"]}

        benches.append({"id": meta.get("full_id") or meta.get("title"), "throughput": meta.get("throughput"),
                        "before_ns": est(before), "after_ns": est(after),
                        "before_median_ns": est(before, "median"), "after_median_ns": est(after, "median"),
                        "change": est(change)})
    benches.sort(key=lambda b: b["id"] or "")
    return {"benchmarks": benches, "commands": [" ".join(c.split()) for c in commands]}


def ns(value):
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value / 1000:.2f} µs"
    return f"{value:.1f} ns"


def pct(value):
    return f"{value * 100:+.1f}%"


# Criterion's own noise threshold: a change within ±1% is not called a change.
NOISE = 0.01


def change_verdict(change):
    if change is None:
        return "-"
    if change["lower"] > NOISE:
        return "slower"
    if change["upper"] < -NOISE:
        return "faster"
    return "no change"


def section_compare(results_dir, out_dir):
    path = os.path.join(results_dir, "compare.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    before, after = "before", "after"
    rev = meta.get("rev_commit")
    parts = []
    named = meta.get("rev")
    named = f"`{named}` (`{rev}`)" if named != rev else f"`{rev}`"
    head = (f"## 7. Before/after: `{rev}` and `{meta.get('commit')}`\n\n"
            f"`before` is the router at {named}, built in a temporary git worktree with its own target "
            f"directory; `after` is the tree being measured (`{meta.get('commit')}`). "
            "Both run side by side against the same PostgreSQL, each on its own port with a configuration "
            "its own `check-config` accepts")
    dropped = meta.get("before_config_without") or []
    head += (f" (before's lacks {', '.join(f'`{k}`' for k in dropped)}, which that version does not know)"
             if dropped else "") + ". The load generator drives both in one invocation per workload, in "
    head += "interleaved slices; read the after/before ratios.\n"
    if meta.get("build_before"):
        head += cmd_block(meta["build_before"])
    parts.append(head)

    # Throughput: the figure section 3 reports.
    rows = ["| connections | before queries/s | after queries/s | after/before | queries in the same slices "
            "(after/before) | p50 before / after | p99 before / after | router CPU / query before / after "
            "| after/before |", "|---|---|---|---|---|---|---|---|---|"]
    cmds = []
    thr = []
    for name in sorted(os.listdir(results_dir)):
        m = re.fullmatch(r"compare-throughput-(\d+)\.json", name)
        if m:
            thr.append((int(m.group(1)), workload(results_dir, name[:-len(".json")])))
    thr.sort()
    for n, (doc, res, command) in thr:
        cmds.append(command)
        b, a = res.get(before, {}), res.get(after, {})
        lb, la = b.get("latency_us", {}), a.get("latency_us", {})
        rows.append(f"| {n} | {num(b.get('rate_per_s'))} | {num(a.get('rate_per_s'))} | "
                    f"{ratio(a.get('rate_per_s'), b.get('rate_per_s'))} | "
                    f"{num(b.get('count'))} / {num(a.get('count'))} ({ratio(a.get('count'), b.get('count'))}) | "
                    f"{us(lb.get('p50'))} / {us(la.get('p50'))} | {us(lb.get('p99'))} / {us(la.get('p99'))} | "
                    f"{us(cpu_per_op(b))} / {us(cpu_per_op(a))} | {ratio(cpu_per_op(a), cpu_per_op(b))} |")
    if thr:
        parts.append("### Throughput\n\nClosed loop, the point selects of section 3 (queries/s as section 3 "
                     "reports it: queries over the target's busy time, each slice counted until the last query "
                     "started in it came back; both targets also had the same slices, so their query counts "
                     "compare directly).\n"
                     + "".join(cmd_block(c) for c in cmds) + "\n" + "\n".join(rows) + "\n"
                     + "".join(errors_note(w[1]) for _, w in thr))

    lat = workload(results_dir, "compare-latency")
    if lat:
        doc, res, command = lat
        base = res.get(PG)
        rows = ["| target | p50 | p99 | added p50 | added p99 |", "|---|---|---|---|---|"]
        added = {}
        for t, r in res.items():
            l = r["latency_us"]
            a50 = a99 = "-"
            if base and t != PG:
                added[t] = (l["p50"] - base["latency_us"]["p50"], l["p99"] - base["latency_us"]["p99"])
                a50, a99 = signed_us(added[t][0]), signed_us(added[t][1])
            rows.append(f"| {t} | {us(l['p50'])} | {us(l['p99'])} | {a50} | {a99} |")
        text = ("### Added latency\n\nOne connection per target, `SELECT 1`, open loop at "
                f"{num(doc['settings'].get('rate'))} queries/s, as section 1.\n" + cmd_block(command) + "\n"
                + "\n".join(rows) + "\n")
        if before in added and after in added:
            b50, a50 = added[before][0], added[after][0]
            text += (f"\nAdded at p50: before {signed_us(b50)}, after {signed_us(a50)} "
                     f"(after {signed_us(a50 - b50)} against before).\n")
        parts.append(text + errors_note(res))

    rec_path = os.path.join(results_dir, "compare-records.json")
    if os.path.exists(rec_path):
        with open(rec_path, encoding="utf-8") as f:
            rec = json.load(f)
        rows = ["| benchmark | before, median | after, median | after/before | change of the mean, 95% CI "
                "| criterion's verdict |", "|---|---|---|---|---|---|"]
        medians = []
        for b in rec["benchmarks"]:
            c = b.get("change")
            ci = f"{pct(c['point'])} ({pct(c['lower'])} to {pct(c['upper'])})" if c else "-"
            mb = (b.get("before_median_ns") or {}).get("point")
            ma = (b.get("after_median_ns") or {}).get("point")
            if mb and ma:
                medians.append(ma / mb)
            rows.append(f"| {b['id']} | {ns(mb)} | {ns(ma)} | {ratio(ma, mb)} | {ci} | {change_verdict(c)} |")
        verdicts = [change_verdict(b.get("change")) for b in rec["benchmarks"]]
        counts = ", ".join(f"{verdicts.count(v)} {v}" for v in ("faster", "no change", "slower") if v in verdicts)
        text = ("### router_records (criterion)\n\nIn-place seal and open of one TLS record, each suite, 64 B and "
                "16 KiB: before's own bench code built and run in its worktree with `--save-baseline before`, "
                "then the current tree's with `--baseline before`, one after the other (not interleaved: drift "
                "of the shared machine between the two runs is in the figures; the medians resist its outliers "
                "better than the means). Criterion's verdict: the whole 95% confidence interval of the change "
                f"of the mean beyond ±{NOISE:.0%}, its noise threshold.\n"
                + "".join(cmd_block(c) for c in rec.get("commands", [])) + "\n" + "\n".join(rows) + "\n")
        if medians:
            text += (f"\n{len(verdicts)} benchmarks: median after/before from {min(medians):.2f}x to "
                     f"{max(medians):.2f}x; criterion: {counts}.\n")
        parts.append(text)

    ws = preauth_workloads(results_dir, "compare-preauth")
    if ws:
        rows = ["| stage | held at | before | after | after − before | closed by server (before / after) |",
                "|---|---|---|---|---|---|"]
        errs = ""
        n = None
        for stage, (doc, res, _) in ws.items():
            n = doc["settings"].get("connections")
            b, a = res.get(before, {}), res.get(after, {})
            bb, ab = b.get("bytes_per_connection"), a.get("bytes_per_connection")
            diff = ("+" if ab - bb >= 0 else "−") + size(abs(ab - bb)) if bb is not None and ab is not None else "-"
            rows.append(f"| {stage} | {STAGE_WHAT[stage]} | {size(bb)} | {size(ab)} | {diff} | "
                        f"{b.get('closed_by_server', '-')} / {a.get('closed_by_server', '-')} |")
            errs += errors_note(res)
        parts.append(f"### Memory per held connection\n\n{num(n)} connections per router held at each stage, "
                     "VmRSS of each router, both freshly started for every stage (as section 6).\n"
                     + stage_commands(ws) + "\n" + "\n".join(rows) + "\n" + errs)
    return "\n".join(parts)


def criterion_new(home, commands):
    """Every benchmark's latest estimates in CRITERION_HOME (no baseline), as JSON."""
    benches = []
    for root, dirs, files in os.walk(home):
        if os.path.basename(root) != "new" or "estimates.json" not in files:
            continue
        with open(os.path.join(root, "benchmark.json"), encoding="utf-8") as f:
            meta = json.load(f)
        with open(os.path.join(root, "estimates.json"), encoding="utf-8") as f:
            estimates = json.load(f)

        def est(key):
            e = estimates[key]
            return {"point": e["point_estimate"], "lower": e["confidence_interval"]["lower_bound"],
                    "upper": e["confidence_interval"]["upper_bound"]}

        benches.append({"id": meta.get("full_id") or meta.get("title"), "throughput": meta.get("throughput"),
                        "mean_ns": est("mean"), "median_ns": est("median")})
    benches.sort(key=lambda b: b["id"] or "")
    return {"benchmarks": benches, "commands": [" ".join(c.split()) for c in commands]}


def steering_metrics(path):
    """{mode: {key: after - before}} from a .metrics file of the steering workload."""
    seen = {}
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            mode, phase, doc = line.split(" ", 2)
            seen.setdefault(mode, {})[phase] = json.loads(doc)
    return {mode: {k: v["after"][k] - v["before"][k] for k in v["after"]}
            for mode, v in seen.items() if "before" in v and "after" in v}


def handoff_us(m):
    return m["handoff_seconds_sum"] / m["handoff_seconds_count"] * 1e6 if m.get("handoff_seconds_count") else None


def share(part, whole):
    return f"{part / whole * 100:.1f}%" if whole else "-"


def section_steering(results_dir):
    path = os.path.join(results_dir, "steering.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    modes = meta["modes"]
    name = lambda mode: f"steer-{mode}"
    parts = [f"""## 9. Steering: a branch's clients on its owning worker

Three routers on the same PostgreSQL, one per `steering` mode ({", ".join(f"`{m}`" for m in modes)};
`ebpf` only as root), each with {meta["branches"]} branches of `pool_size = {meta["pool_size"]}` on
its pooled port and {meta["workers"]} workers. The client mix comes from
{meta["app_servers"] + meta["shared_clients"]} loopback source addresses: {meta["app_servers"]}
application servers that each talk to one branch (two per branch), and {meta["shared_clients"]}
shared clients that pick any branch per connection (`branchgate-loadgen --branch-by-source`). The
eBPF program steers a client by the branch its address last logged in to, else by load; the
front door hands an authenticated client to its branch's owner when it landed elsewhere
(`userspace` and `ebpf`); `off` serves each client where the kernel's hash put it, with a pool per
worker. Hits and misses are the program's own counters, hand-offs and their time (from leaving
the accepting worker to registered on the owner, queue and wake-up included) the routers'
`/metrics`, read before and after each run.
"""]
    w = workload(results_dir, "steering-connect")
    if w:
        doc, res, command = w
        metrics = steering_metrics(os.path.join(results_dir, "steering-connect.metrics"))
        off = res.get(name("off"), {})
        rows = ["| mode | connections/s | vs off | login p50 | p99 | router CPU / connection | program hits | "
                "misses | hit rate | handed off | mean hand-off |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for mode in modes:
            r = res.get(name(mode))
            if not r:
                continue
            m = metrics.get(mode, {})
            lat = r["latency_us"]
            choices = m.get("hit", 0) + m.get("miss", 0)
            rows.append(f"| {mode} | {num(r['rate_per_s'])} | {ratio(r['rate_per_s'], off.get('rate_per_s'))} | "
                        f"{us(lat['p50'])} | {us(lat['p99'])} | {us(cpu_per_op(r))} | "
                        f"{num(m.get('hit')) if mode == 'ebpf' else '-'} | "
                        f"{num(m.get('miss')) if mode == 'ebpf' else '-'} | "
                        f"{share(m.get('hit', 0), choices) if mode == 'ebpf' else '-'} | "
                        f"{num(m.get('handoffs_out'))} of {num(m.get('logins'))} "
                        f"({share(m.get('handoffs_out', 0), m.get('logins', 0))}) | {us(handoff_us(m))} |")
        parts.append("### Connection storms\n\n" + "\n".join(rows) + "\n" + errors_note(res) + cmd_block(command))
    w = workload(results_dir, "steering-pooled")
    if w:
        doc, res, command = w
        metrics = steering_metrics(os.path.join(results_dir, "steering-pooled.metrics"))
        servers = {}
        servers_path = os.path.join(results_dir, "steering-pooled.servers")
        if os.path.exists(servers_path):
            with open(servers_path, encoding="utf-8") as f:
                servers = json.load(f)
        off = res.get(name("off"), {})
        rows = [f"| mode | queries/s | vs off | p50 | p99 | router CPU / query | server connections per branch "
                f"(min-max, pool_size {meta['pool_size']}) | in all | handed off |",
                "|---|---|---|---|---|---|---|---|---|"]
        for mode in modes:
            r = res.get(name(mode))
            if not r:
                continue
            lat = r["latency_us"]
            per_branch = list(servers.get(mode, {}).values())
            spread = f"{min(per_branch)}-{max(per_branch)}" if per_branch else "-"
            m = metrics.get(mode, {})
            rows.append(f"| {mode} | {num(r['rate_per_s'])} | {ratio(r['rate_per_s'], off.get('rate_per_s'))} | "
                        f"{us(lat['p50'])} | {us(lat['p99'])} | {us(cpu_per_op(r))} | {spread} | "
                        f"{sum(per_branch) if per_branch else '-'} | "
                        f"{num(m.get('handoffs_out'))} of {num(m.get('logins'))} |")
        parts.append(f"### Pooled point selects ({meta['pooled_clients']} clients, extended protocol)\n\n"
                     "Server connections are counted in `pg_stat_activity` right after the run (the pools "
                     "keep them).\n\n" + "\n".join(rows) + "\n" + errors_note(res) + cmd_block(command))
    path = os.path.join(results_dir, "steering-handoff.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            crit = json.load(f)
        rows = ["| benchmark | mean | 95% interval | median |", "|---|---|---|---|"]
        for b in crit["benchmarks"]:
            mean, median = b["mean_ns"], b["median_ns"]
            rows.append(f"| `{b['id']}` | {ns(mean['point'])} | {ns(mean['lower'])} – {ns(mean['upper'])} | "
                        f"{ns(median['point'])} |")
        parts.append("### The hand-off alone (criterion)\n\nTwo threads with a monoio runtime each, as two "
                     "workers: a round trip moves a real TLS connection (the router's `into_moving`, "
                     "`Inbox`, `from_moving`) to the other worker and back, so it is two hand-offs; "
                     "`inbox_wake` sends a bare value through the two inboxes (the cross-thread wake-up "
                     "alone).\n\n" + "\n".join(rows) + "\n" +
                     cmd_block("\n".join(crit["commands"])))
    return "\n".join(parts)


def machine():
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled", encoding="utf-8") as f:
            autogroup = ", scheduler autogroups " + ("on" if f.read().strip() == "1" else "off")
    except OSError:
        autogroup = ""
    return f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}{autogroup}"


SECTION_ORDER = ["latency", "connect", "throughput", "idle", "cpu", "preauth", "compare", "pooled", "steering"]


def block(name, text):
    return f"<!-- bench:{name} -->\n{text.rstrip()}\n<!-- /bench:{name} -->\n"


def block_re(name):
    return re.compile(rf"<!-- bench:{re.escape(name)} -->\n.*?<!-- /bench:{re.escape(name)} -->\n?", re.S)


def provenance(args, now):
    return (f"*From `{args.command}` ({args.mode} run) on {now}, commit `{args.commit}`; {args.versions}; "
            f"{machine()}: not the run the header describes.*\n\n")


def generate(args, wanted, now):
    """The sections this run measured, by name, each with its markers."""
    thr = []
    for name in sorted(os.listdir(args.results)):
        m = re.fullmatch(r"throughput-(\d+)\.json", name)
        if m:
            thr.append((int(m.group(1)), workload(args.results, name[:-len(".json")])))
    thr.sort()
    texts = {}
    if "latency" in wanted and (w := workload(args.results, "latency")):
        texts["latency"] = section_latency(w)
    if "connect" in wanted and (w := workload(args.results, "connect")):
        texts["connect"] = section_connect(w, workload(args.results, "connect-serial"))
    if "throughput" in wanted and thr:
        texts["throughput"] = section_throughput(thr)
    if "idle" in wanted and (w := workload(args.results, "idle")):
        texts["idle"] = section_idle(w, args.open_files)
    if "cpu" in wanted and thr:
        texts["cpu"] = section_cpu(thr)
    if "preauth" in wanted and (ws := preauth_workloads(args.results, "preauth")):
        texts["preauth"] = section_preauth(ws)
    if "pooled" in wanted and (text := section_pooled(args.results)):
        texts["pooled"] = text
    if "steering" in wanted and (text := section_steering(args.results)):
        texts["steering"] = text
    if "compare" in wanted:
        text = section_compare(args.results, os.path.dirname(os.path.abspath(args.out)))
        if text:
            texts["compare"] = text
    out = {}
    for name, text in texts.items():
        # A section from another run than the header's says so; a comparison always names its run.
        if args.partial or name == "compare":
            heading, _, rest = text.partition("\n\n")
            text = heading + "\n\n" + provenance(args, now) + rest
        out[name] = block(name, text)
    return out


def report(args):
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    wanted = set(filter(None, (args.sections or ",".join(SECTION_ORDER)).split(",")))
    new = generate(args, wanted, now)
    old = None
    if os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as f:
            old = f.read()
    if args.partial and old:
        body = old
        for name in SECTION_ORDER:
            if name not in new:
                continue
            pattern = block_re(name)
            if pattern.search(body):
                body = pattern.sub(lambda _: new[name], body, count=1)
                continue
            # Before the first later section already there, else before the plots or the analysis.
            later = [m.start() for n in SECTION_ORDER[SECTION_ORDER.index(name) + 1:]
                     if (m := re.search(rf"<!-- bench:{re.escape(n)} -->", body))]
            anchors = later or [i for i in (body.find("\n## Plots"), body.find(ANALYSIS_MARKER)) if i >= 0]
            at = min(anchors) if anchors else len(body)
            if at and body[at] == "\n":
                at += 1
            body = body[:at] + new[name] + "\n" + body[at:]
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(body)
        return
    # A new header and this run's sections; measured sections of other runs are kept.
    kept = {}
    if old:
        for name in SECTION_ORDER:
            if name not in new and (m := block_re(name).search(old)):
                kept[name] = m.group(0)
    parts = [new.get(name) or kept.get(name) for name in SECTION_ORDER]
    out_dir = os.path.dirname(os.path.abspath(args.out))
    thr = sorted(int(m.group(1)) for name in os.listdir(args.results)
                 if (m := re.fullmatch(r"throughput-(\d+)\.json", name)))
    pooled = pooled_throughput_runs(args.results) if "pooled" in wanted else {}
    pooled_plots = ["pooled-latency", "pooled-connect"] + [f"pooled-{p}-{ws[-1][0]}" for p, ws in pooled.items()]
    plots = [plot_link(args.results, out_dir, n) for n in
             ["latency", "connect", "connect-serial"] + [f"throughput-{n}" for n in thr] + pooled_plots
             if os.path.exists(os.path.join(args.results, n + ".svg")) and
             ("throughput" if n.startswith("throughput") else n.split("-")[0]) in wanted]
    head = f"""# Benchmarks

Written by `{args.command}` ({args.mode} run) on {now}, commit `{args.commit}`; {args.versions};
{machine()}. Regenerate with the same command; only the analysis at the end is written by hand.
A section measured by another run (`scripts/bench --only ...`, `scripts/bench --compare REV`) says
so at its top.

Every path is TLS (`sslmode=verify-full`, ECDSA P-256 certificate, TLS 1.3) with SCRAM-SHA-256:
`pg` is PostgreSQL itself, `pgbouncer` is PgBouncer in transaction mode in front of it, `branchgate`
is the router's direct port (direct SSL; `branchgate-sslrequest` the same port by SSLRequest),
`branchgate-pooled` its pooled port (section 8). In
each workload the targets take turns in short slices of one clock, so noise on this shared
machine hits them alike: read the ratios, not the absolute numbers, and never compare numbers
across runs. The load generator (`branchgate-loadgen`), PostgreSQL and the router share the
same cores.

"""
    analysis = f"{ANALYSIS_MARKER}\n\n## Analysis\n\n(none yet)\n"
    if old and ANALYSIS_MARKER in old:
        analysis = old[old.index(ANALYSIS_MARKER):]
    plots_text = "\n## Plots\n\n" + "\n".join(plots) + "\n" if plots else ""
    body = head + "\n".join(p for p in parts if p) + plots_text + "\n" + analysis
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(body)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--summary", metavar="RESULT.json")
    p.add_argument("--mode")
    p.add_argument("--results")
    p.add_argument("--out")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--command", default="scripts/bench")
    p.add_argument("--versions", default="")
    p.add_argument("--open-files", type=int, default=None, help="the router's open-file limit")
    p.add_argument("--sections", help="the sections this run measured, comma-separated")
    p.add_argument("--partial", action="store_true",
                   help="replace or insert only these sections in an existing report")
    p.add_argument("--criterion", metavar="CRITERION_HOME", help="print router_records before/after as JSON")
    p.add_argument("--criterion-command", action="append", default=[],
                   help="recorded with --criterion or --criterion-new")
    p.add_argument("--criterion-new", metavar="CRITERION_HOME",
                   help="print every benchmark's latest estimates as JSON")
    args = p.parse_args()
    if args.criterion:
        print(json.dumps(criterion_summary(args.criterion, args.criterion_command), indent=2))
    elif args.criterion_new:
        print(json.dumps(criterion_new(args.criterion_new, args.criterion_command), indent=2))
    elif args.summary:
        summary(args.summary)
    elif args.results and args.out:
        report(args)
    else:
        p.error("give --summary FILE, or --results DIR and --out FILE")


if __name__ == "__main__":
    sys.exit(main())
