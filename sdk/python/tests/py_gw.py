"""py_gw.py - the Python twin of sdk/c/tests/sdk_gw.c, on iothub_gw: the same
options, logs, output and exit codes, so that sdk/c/tests/test_sdk_c.py's
scenarios run against the Python SDK too (sdk/python/tests/test_sdk_python.py).
The spool is DIR/spool.db."""

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from iothub_gw import Gateway, SpoolFull  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    for k in ("url", "token", "spool", "devices", "accepted", "commands", "ca", "cert", "key",
              "token-file"):
        ap.add_argument("--" + k)
    ap.add_argument("--type", default="thermostat")
    for k in ("count", "start", "ts-base", "rate", "bad-every", "serve-ms", "max-spool", "segment",
              "ack-timeout"):
        ap.add_argument("--" + k, type=int, default=0)
    ap.add_argument("--fsync", default="none")
    ap.add_argument("--until-full", action="store_true")
    ap.add_argument("--bench", action="store_true")
    a = ap.parse_args()
    if a.count == 0 and "--count" not in sys.argv:
        a.count = 1000
    devs = a.devices.split(",")
    ts_base = a.ts_base or int(time.time() * 1000) - 3600_000
    os.makedirs(a.spool, exist_ok=True)
    acc = open(a.accepted, "a", buffering=1) if a.accepted else None
    cmdlog = open(a.commands, "a", buffering=1) if a.commands else None

    def on_reject(seq, e, reading):
        print("reject %s %s" % (e.get("code"), reading or json.dumps(e)), flush=True)

    def on_state(state, code, reason):
        sys.stderr.write("py_gw: %s %s %s\n" % (state, code, reason))

    def token_cb():
        with open(a.token_file) as f:
            return f.read().strip() or None

    gw = Gateway(a.url, os.path.join(a.spool, "spool.db"), token=a.token,
                 token_cb=token_cb if a.token_file else None, fsync=a.fsync,
                 ca_file=a.ca, cert_file=a.cert, key_file=a.key,
                 max_spool_bytes=a.max_spool or (64 << 20), backoff_min=0.1, backoff_max=2.0,
                 ack_timeout=a.ack_timeout / 1000 if a.ack_timeout else 10.0,
                 on_reject=on_reject, on_state=on_state)

    @gw.command(None)
    async def handler(cmd):
        if cmdlog:
            cmdlog.write("run %s %s %d %s\n" % (cmd.id, cmd.name, cmd.attempt, json.dumps(cmd.params)))
        await cmd.in_progress(50, "halfway")
        if cmd.name == "firmware_update":
            await cmd.failed("no firmware here")
        else:
            await cmd.succeeded({"done": True})

    @gw.cancel_handler
    def cancel(cid, device):
        if cmdlog:
            cmdlog.write("cancel %s %s\n" % (cid, device))

    for d in devs:
        gw.announce(d, a.type, {"suite": "sdk"})
    sys.stderr.write("py_gw: replayed %d pending readings, next seq %d\n"
                     % (gw.spool.pending(), gw.spool.next_seq))
    state = {"done": False, "full": False}

    def sender():
        t0 = time.monotonic()
        for i in range(a.start, a.count):
            temp = 500 if a.bad_every and i % a.bad_every == a.bad_every - 1 else "%d.5" % (i % 100)
            data = '{"temperature":%s}' % temp
            while True:
                try:
                    gw.send(devs[i % len(devs)], ts_base + i, data)
                    break
                except SpoolFull as e:
                    if a.until_full:
                        print("full at %d: %s" % (i, e), flush=True)
                        state["full"] = True
                        state["done"] = True
                        return
                    time.sleep(0.02)
            if acc:
                acc.write("%d\n" % i)
            if a.rate:
                due = t0 + (i - a.start + 1) / a.rate
                while time.monotonic() < due:
                    time.sleep(0.001)
        if a.bench:
            dt = time.monotonic() - t0
            print("spooled %d readings in %d ms: %.0f readings/s" % (a.count - a.start, dt * 1000,
                  (a.count - a.start) / max(dt, 1e-3)), flush=True)
        state["done"] = True

    rc = {"v": 0}

    async def monitor():
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, gw.stop)
        end = time.monotonic() + a.serve_ms / 1000 if a.serve_ms else None
        drain_end = None
        while not gw._stopped:
            await asyncio.sleep(0.05)
            if end is not None:
                if time.monotonic() >= end:
                    break
                continue
            if not state["done"]:
                continue
            if state["full"]:
                rc["v"] = 3
                break
            if not gw.spool.pending():
                break
            drain_end = drain_end or time.monotonic() + 120
            if time.monotonic() > drain_end:
                rc["v"] = 2
                break
        s = dict(gw.stats, pending=gw.spool.pending(), spool_bytes=gw.spool.bytes)
        print("stats " + " ".join("%s=%s" % kv for kv in s.items()), flush=True)
        gw.stop()

    async def amain():
        threading.Thread(target=sender, daemon=True).start()
        await asyncio.gather(gw.run(), monitor())
        gw.close()

    asyncio.run(amain())
    return rc["v"]


if __name__ == "__main__":
    sys.exit(main())
