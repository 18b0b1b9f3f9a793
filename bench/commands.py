#!/usr/bin/python3
"""Command channel benchmark (issue 4).

  /usr/bin/python3 bench/commands.py [--n 2000] [--pending 10000] [--out FILE]

Starts its own redis-server and two hubs (pinned to CPU 0 with taskset when
available; the client runs on CPU 1) and measures:

  1. round trip HTTP create -> the gateway receives the command, p50/p99/max,
     same instance (gateway and HTTP on hub A) and across instances (HTTP on
     hub A, gateway on hub B: routed through iot:ctl:cmd:<instance>);
     baseline in the same run: GET /healthz round trip on the same keep-alive
     connection (the HTTP floor of this client);
  2. 10,000 pending commands (queued for an offline device): hub RSS and
     idle CPU over 10 s, against the same hub with none pending.

The client is Python (asyncio websockets + http.client keep-alive), so the
figures include its own overhead; the healthz baseline shows how much.
Loopback only, bounded in count and time.
"""

import argparse
import asyncio
import hashlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))

import websockets  # noqa: E402

HUB = os.environ.get("HUB_BIN", os.path.join(ROOT, "build", "iot-hub"))
SECRET = "bench-secret-bench-secret-0123456789"
KEY = "iotk_bench_commands_key_000001"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin(cpu):
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") else []


def start_redis(tmp):
    port = free_port()
    p = subprocess.Popen(pin(0) + ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no", "--dir", tmp],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return p, port
        except OSError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def start_hub(tmp, rport, name):
    args = pin(0) + [HUB, "--listen", "127.0.0.1:0", "--redis", "redis://127.0.0.1:%d" % rport,
                     "--schemas", os.path.join(ROOT, "deploy", "device-types"),
                     "--jwt-key", os.path.join(tmp, "secret"), "--api-keys",
                     os.path.join(tmp, "keys.json"), "--instance-id", name, "--log-level", "warn"]
    p = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if line.startswith("listening on "):
            port = int(line.rsplit(":", 1)[1])
            return p, port
    raise SystemExit("hub %s did not start" % name)


def b64(b):
    import base64
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def jwt(sub):
    import hmac
    h = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    c = b64(json.dumps({"sub": sub, "exp": int(time.time()) + 3600, "devices": ["*"]}).encode())
    sig = hmac.new(SECRET.encode(), ("%s.%s" % (h, c)).encode(), hashlib.sha256).digest()
    return "%s.%s.%s" % (h, c, b64(sig))


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(len(v) * p))] if v else float("nan")


def cpu_s(pid):
    with open("/proc/%d/stat" % pid) as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def gateway(port, device):
    ws = await websockets.connect("ws://127.0.0.1:%d/v1/gateway" % port, subprotocols=["iot-gateway.v1"],
                                  extra_headers={"Authorization": "Bearer " + jwt("gw-" + device)},
                                  compression=None)
    await ws.send(json.dumps({"type": "announce", "devices": [{"device": device, "device_type": "thermostat"}]}))
    while json.loads(await ws.recv()).get("type") != "announced":
        pass
    return ws


async def round_trips(http_port, gw_port, n, label):
    dev = "bench-%s-%d" % (label, os.getpid())
    ws = await gateway(gw_port, dev)
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=5)
    hdr = {"Authorization": "Bearer " + KEY, "Content-Type": "application/json"}
    body = json.dumps({"name": "reboot", "params": {"delay_s": 1}})
    lat, base = [], []
    loop = asyncio.get_running_loop()
    for i in range(n):
        t0 = time.perf_counter()
        conn.request("GET", "/healthz")
        conn.getresponse().read()
        base.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        conn.request("POST", "/v1/devices/%s/commands" % dev, body, hdr)
        r = conn.getresponse()
        r.read()
        if r.status != 201:
            raise SystemExit("create: HTTP %d" % r.status)
        m = json.loads(await asyncio.wait_for(ws.recv(), 5))
        lat.append((time.perf_counter() - t0) * 1000)
        await ws.send(json.dumps({"type": "command_ack", "id": m["id"], "status": "succeeded"}))
    await ws.close()
    conn.close()
    del loop
    return lat, base


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--pending", type=int, default=10000)
    ap.add_argument("--idle-s", type=float, default=10)
    ap.add_argument("--out")
    a = ap.parse_args()
    if shutil.which("taskset"):
        os.sched_setaffinity(0, {1})
    tmp = tempfile.mkdtemp(prefix="iot-bench-cmd-")
    with open(os.path.join(tmp, "secret"), "w") as f:
        f.write(SECRET)
    with open(os.path.join(tmp, "keys.json"), "w") as f:
        json.dump([{"name": "bench", "sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                    "scopes": ["admin"]}], f)
    procs = []
    try:
        redis, rport = start_redis(tmp)
        procs.append(redis)
        hub_a, port_a = start_hub(tmp, rport, "bench-a")
        hub_b, port_b = start_hub(tmp, rport, "bench-b")
        procs += [hub_a, hub_b]
        out = ["# Command benchmark, %s, commit %s" % (
            time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
            subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True).stdout.strip()), "",
            "hubs + redis on CPU 0, Python client on CPU 1; %d sequential commands per case." % a.n, "",
            "| case | p50 ms | p99 ms | max ms | healthz baseline p50 / p99 ms |", "|---|---|---|---|---|"]
        for label, hp, gp in (("same instance", port_a, port_a), ("across instances", port_a, port_b)):
            lat, base = await round_trips(hp, gp, a.n, label.split()[0])
            out.append("| %s | %.2f | %.2f | %.2f | %.2f / %.2f |" % (
                label, pct(lat, .5), pct(lat, .99), max(lat), pct(base, .5), pct(base, .99)))
            print(out[-1], flush=True)

        # pending commands: idle cost
        def idle(pid):
            c0, t0 = cpu_s(pid), time.time()
            time.sleep(a.idle_s)
            return (cpu_s(pid) - c0) / (time.time() - t0) * 100

        base_rss, base_cpu = rss_kb(hub_a.pid), idle(hub_a.pid)
        off = "bench-offline-%d" % os.getpid()
        ws = await gateway(port_a, off)
        await ws.close()
        conn = http.client.HTTPConnection("127.0.0.1", port_a, timeout=10)
        hdr = {"Authorization": "Bearer " + KEY}
        t0 = time.time()
        for i in range(a.pending):
            conn.request("POST", "/v1/devices/%s/commands" % off,
                         json.dumps({"name": "reboot", "ttl_s": 86400}), hdr)
            r = conn.getresponse()
            r.read()
            if r.status != 201:
                raise SystemExit("pending create: HTTP %d" % r.status)
        create_s = time.time() - t0
        time.sleep(1)
        rss, cpu = rss_kb(hub_a.pid), idle(hub_a.pid)
        out += ["", "| hub A | RSS KiB | idle CPU %% over %.0f s |" % a.idle_s, "|---|---|---|",
                "| no pending commands | %d | %.2f |" % (base_rss, base_cpu),
                "| %d pending (device offline) | %d | %.2f |" % (a.pending, rss, cpu),
                "", "Creating the %d took %.1f s (%.0f creates/s over one keep-alive connection)." % (
                    a.pending, create_s, a.pending / create_s)]
        print("\n".join(out[-7:]))
        if a.out:
            with open(a.out, "w") as f:
                f.write("\n".join(out) + "\n\nCommand: `/usr/bin/python3 bench/commands.py --n %d --pending %d`\n"
                        % (a.n, a.pending))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
