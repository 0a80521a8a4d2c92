#!/usr/bin/env python3
"""BENCHMARKS.md from the JSON documents branchgate-loadgen wrote during one scripts/bench run.

    report.py --summary RESULT.json            # a few lines per target, for the terminal
    report.py --mode M --results DIR --out FILE --commit C --command CMD --versions V

Every figure is computed from one run's JSON (the workloads' targets were interleaved in
slices of one clock), so ratios between targets are what to read; absolute numbers move with
the machine's noise. The section after ANALYSIS_MARKER in an existing report is hand-written
and kept as it is.
"""

import argparse
import datetime
import json
import os
import platform
import sys

ANALYSIS_MARKER = "<!-- analysis: everything below is written by hand and kept by scripts/bench -->"

# The targets every workload may have; the baseline first.
PG, PGB, BG, BG_REQ = "pg", "pgbouncer", "branchgate", "branchgate-sslrequest"

# Aims from the benchmark issue (benchmarks, not tests).
AIM_ADDED_P50_VS_PGBOUNCER = 0.5
AIM_CONNECT_RATE_VS_PGBOUNCER = 10.0
AIM_IDLE_BYTES = 4096


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
        if r.get("bytes_per_connection") is not None:
            line += f"  {size(r['bytes_per_connection'])}/conn"
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
    return f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}"


def report(args):
    parts = []
    lat = workload(args.results, "latency")
    con = workload(args.results, "connect")
    serial = workload(args.results, "connect-serial")
    thr = []
    for name in sorted(os.listdir(args.results)):
        if name.startswith("throughput-") and name.endswith(".json"):
            n = int(name[len("throughput-"):-len(".json")])
            thr.append((n, workload(args.results, name[:-len(".json")])))
    thr.sort()
    idle = workload(args.results, "idle")
    if lat:
        parts.append(section_latency(lat))
    if con:
        parts.append(section_connect(con, serial))
    if thr:
        parts.append(section_throughput(thr))
    if idle:
        parts.append(section_idle(idle, args.open_files))
    if thr:
        parts.append(section_cpu(thr))
    out_dir = os.path.dirname(os.path.abspath(args.out))
    plots = [plot_link(args.results, out_dir, n) for n in
             ["latency", "connect", "connect-serial"] + [f"throughput-{n}" for n, _ in thr]
             if os.path.exists(os.path.join(args.results, n + ".svg"))]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = f"""# Benchmarks

Written by `{args.command}` ({args.mode} run) on {now}, commit `{args.commit}`; {args.versions};
{machine()}. Regenerate with the same command; only the analysis at the end is written by hand.

Every path is TLS (`sslmode=verify-full`, ECDSA P-256 certificate, TLS 1.3) with SCRAM-SHA-256:
`pg` is PostgreSQL itself, `pgbouncer` is PgBouncer in transaction mode in front of it, `branchgate`
is the router's direct port (direct SSL; `branchgate-sslrequest` the same port by SSLRequest). In
each workload the targets take turns in short slices of one clock, so noise on this shared
machine hits them alike: read the ratios, not the absolute numbers, and never compare numbers
across runs. The load generator (`branchgate-loadgen`), PostgreSQL and the router share the
same cores.

"""
    analysis = f"{ANALYSIS_MARKER}\n\n## Analysis\n\n(none yet)\n"
    if os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as f:
            old = f.read()
        if ANALYSIS_MARKER in old:
            analysis = old[old.index(ANALYSIS_MARKER):]
    body = head + "\n".join(parts) + "\n## Plots\n\n" + "\n".join(plots) + "\n\n" + analysis
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
    args = p.parse_args()
    if args.summary:
        summary(args.summary)
    elif args.results and args.out:
        report(args)
    else:
        p.error("give --summary FILE, or --results DIR and --out FILE")


if __name__ == "__main__":
    sys.exit(main())
