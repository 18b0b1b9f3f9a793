#!/usr/bin/python3
"""100 dashboards opening the same chart at once (docs/analytics.md "Cache and
single-flight"): GET /v1/aggregates, 1m buckets over 6 hours, 50 devices
grouped by site, sent by N clients at the same instant, against a hub with
the cache and single-flight on (aggregates-cache-ttl-ms 5000) and off (0).
Reports per round the Redis commands the round caused (INFO
total_commands_processed before/after, minus the INFO calls), the hub's
computations and the clients' p50/p99/max latency; median over the rounds.

The rollups are written straight into Redis in the layout hub/rollup.c
writes (one shard): this measures the query side only. Each round asks a
new `to` (a cold query, as when a dashboard opens). About 30 s.

    bench/aggregates.py [--clients 100] [--rounds 5] [--devices 50] [--hours 6] [--out FILE]
"""

import argparse
import hashlib
import http.client
import json
import os
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))
import harness  # noqa: E402

MIN, DAY = 60000, 86400000
KEY = "bench-dash-key-0000000000000001"

FILL = """
local ndev, base = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 0, ndev - 1 do
  redis.call('HSET', 'iot:ru:{i0}:devs', 'bd-' .. i,
             'thermostat\\t{"site":"s' .. (i % 10) .. '"}')
end
for b = 0, tonumber(ARGV[3]) * 60 - 1 do
  local key = 'iot:ru:{i0}:1m:' .. (base + b * 60000)
  local args = {}
  for i = 0, ndev - 1 do
    local v = (b + i) % 40
    args[#args + 1] = 'bd-' .. i .. '|temperature'
    args[#args + 1] = string.format('%d %d %d %d %d %d %d %d %d', 6, 6 * v, 6 * v * v, v, v,
                                    base + b * 60000, v, base + b * 60000 + 50000, v)
  end
  redis.call('HSET', key, unpack(args))
end
return 1
"""


def keys_file(tmp):
    path = os.path.join(tmp, "keys.json")
    with open(path, "w") as f:
        json.dump([{"name": "dash", "sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                    "scopes": ["telemetry:read"], "tier": "internal"}], f)
    return path


def commands(r):
    info = r.cmd("INFO", "stats")
    for line in info.splitlines():
        if line.startswith("total_commands_processed:"):
            return int(line.split(":")[1])
    raise RuntimeError("no total_commands_processed")


def metric(hub, name):
    st, _, body = harness.http_get(hub, "/metrics")
    return harness.metric_value(harness.parse_metrics(body), name) or 0


def round_trip(hub, path, n):
    """n clients, connected first, send the same GET at once -> latencies (s)."""
    conns = [http.client.HTTPConnection("127.0.0.1", hub.port, timeout=30) for _ in range(n)]
    for c in conns:
        c.connect()
    lat = [None] * n
    bad = []
    go = threading.Barrier(n)

    def one(i):
        go.wait()
        t0 = time.perf_counter()
        conns[i].request("GET", path, headers={"Authorization": "Bearer " + KEY})
        resp = conns[i].getresponse()
        body = resp.read()
        lat[i] = time.perf_counter() - t0
        if resp.status != 200:
            bad.append((resp.status, body[:200]))
    ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for c in conns:
        c.close()
    return lat, bad


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def run(mode, ttl, a, tmp, base):
    r = harness.Redis()
    try:
        r.cmd("EVAL", FILL, "0", str(a.devices), str(base), str(a.hours))
        args = harness.hub_args(r, os.path.join(tmp, "secret"), extra=[
            "--api-keys", keys_file(tmp), "--aggregates-cache-ttl-ms", str(ttl),
            "--log-level", "warn", "--instance-id", "bench-agg"])
        hub = harness.Hub(args)
        try:
            harness.wait_until(lambda: harness.http_get(hub, "/readyz")[0] == 200, 10)
            rows = []
            for k in range(a.rounds):
                path = ("/v1/aggregates?field=temperature&granularity=1m&group_by=site"
                        "&from=%d&to=%d" % (base, base + a.hours * 3600000 - 1 - k))
                c0, m0 = commands(r), metric(hub, "iot_hub_aggregate_computations_total")
                lat, bad = round_trip(hub, path, a.clients)
                c1, m1 = commands(r), metric(hub, "iot_hub_aggregate_computations_total")
                rows.append({"commands": c1 - c0 - 1, "computations": m1 - m0, "failed": len(bad),
                             "p50": pct(lat, 50) * 1e3, "p99": pct(lat, 99) * 1e3,
                             "max": max(lat) * 1e3})
                time.sleep(0.2)
            return rows
        finally:
            hub.stop()
            hub.cleanup()
    finally:
        r.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--hours", type=int, default=6, help="range of the query (1m buckets), at most 24")
    ap.add_argument("--out")
    a = ap.parse_args()
    harness.require_hub()
    tmp = harness.mkdtemp("iot-hub-bench-agg-")
    harness.write_file(os.path.join(tmp, "secret"), b"x" * 32)
    base = (int(time.time() * 1000) - 2 * DAY) // DAY * DAY
    out = ["# GET /v1/aggregates: %d dashboards open the same query at once" % a.clients, "",
           "1m buckets over %d hours (%d keys), %d devices in 10 groups, %d rounds, each a new "
           "(cold) query; Redis commands per round from INFO total_commands_processed; medians "
           "over the rounds. Commit %s." % (a.hours, a.hours * 60, a.devices, a.rounds, os.popen("git -C %s rev-parse --short HEAD" % HERE).read().strip()),
           "", "| mode | Redis commands / round | computations / round | not 200 | p50 ms | p99 ms | max ms |",
           "|---|---|---|---|---|---|---|"]
    try:
        for mode, ttl in (("no cache (aggregates-cache-ttl-ms 0)", 0),
                          ("cache + single-flight (5000)", 5000)):
            rows = run(mode, ttl, a, tmp, base)
            med = {k: statistics.median(x[k] for x in rows) for k in rows[0]}
            out.append("| %s | %d | %d | %d | %.1f | %.1f | %.1f |" % (
                mode, med["commands"], med["computations"], med["failed"], med["p50"], med["p99"],
                med["max"]))
            print(mode, json.dumps(rows), file=sys.stderr)
    finally:
        harness.rmtree(tmp)
    text = "\n".join(out) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
