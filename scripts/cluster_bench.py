#!/usr/bin/env python3
"""Catalog propagation across a fleet (scripts/cluster bench): write to applied on every node.

Each change adds one role to a branch in etcd (one key, `<prefix>/catalog/roles/<branch>/<role>`,
its value an existing role's verifier), through etcd's JSON gateway on a member's client port;
the write's revision comes back with the answer. Every node writes the revision it has applied
to `<prefix>/acks/<node>` once its reload is done (branchgate's acknowledgements), and this
script reads those keys until every live node (`<prefix>/nodes/`) has acknowledged that revision
or a later one: the time from sending the write to seeing the last acknowledgement is the
change's propagation time. The roles are deleted at the end (changes too, not timed).

Reading the acknowledgements is a poll of one range request after another (each a loopback
HTTP round trip, well under a millisecond), so the figures have that much resolution.
"""

import argparse
import base64
import json
import statistics
import sys
import time
import urllib.request


def b64(text):
    return base64.b64encode(text.encode()).decode()


def unb64(text):
    return base64.b64decode(text).decode()


def call(endpoint, path, body):
    request = urllib.request.Request(
        f"http://{endpoint}{path}", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def prefix_range(endpoint, prefix):
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    answer = call(endpoint, "/v3/kv/range", {"key": b64(prefix), "range_end": b64(end)})
    return {unb64(kv["key"]): unb64(kv.get("value", "")) for kv in answer.get("kvs", [])}


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", required=True, help="one etcd member's host:port")
    p.add_argument("--prefix", required=True, help="the catalog's etcd prefix, e.g. /branchgate")
    p.add_argument("--branch", required=True)
    p.add_argument("--changes", type=int, default=100)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for one change")
    args = p.parse_args()
    roles = f"{args.prefix}/catalog/roles/{args.branch}/"
    existing = prefix_range(args.endpoint, roles)
    if not existing:
        sys.exit(f"no roles under {roles}")
    verifier = next(iter(existing.values()))
    nodes = sorted(k.rsplit("/", 1)[1] for k in prefix_range(args.endpoint, f"{args.prefix}/nodes/"))
    if not nodes:
        sys.exit("no nodes registered")
    acks_prefix = f"{args.prefix}/acks/"
    times_ms = []
    added = []
    for i in range(args.changes):
        key = f"{roles}propagation_{i}"
        started = time.perf_counter()
        revision = int(call(args.endpoint, "/v3/kv/put", {"key": b64(key), "value": b64(verifier)})["header"]["revision"])
        added.append(key)
        deadline = started + args.timeout
        while True:
            acks = prefix_range(args.endpoint, acks_prefix)
            behind = [n for n in nodes
                      if json.loads(acks.get(acks_prefix + n, '{"revision": 0}')).get("revision", 0) < revision]
            if not behind:
                times_ms.append((time.perf_counter() - started) * 1000)
                break
            if time.perf_counter() > deadline:
                sys.exit(f"change {i} (revision {revision}): not acknowledged by {behind} in {args.timeout} s")
    for key in added:
        call(args.endpoint, "/v3/kv/deleterange", {"key": b64(key)})
    print(json.dumps({
        "nodes": nodes, "changes": len(times_ms),
        "p50_ms": round(percentile(times_ms, 50), 2), "p99_ms": round(percentile(times_ms, 99), 2),
        "mean_ms": round(statistics.mean(times_ms), 2), "max_ms": round(max(times_ms), 2),
    }))


if __name__ == "__main__":
    main()
