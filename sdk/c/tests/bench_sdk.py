"""Measures libiothub-gw's send throughput on one core (docs/sdk.md,
"Throughput"): sdk_gw pinned to one CPU sends N readings as fast as send()
takes them, from one thread, with the hub (rate limits off) and redis-server
on the other CPU. Prints readings/s into the spool (send() returning) and to
the hub (until the last ack), per fsync policy.

  /usr/bin/python3 sdk/c/tests/bench_sdk.py [N]     (after building build/)
"""

import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "tests", "integration"))
import harness as H  # noqa: E402

SDK_GW = os.environ.get("SDK_GW_BIN") or os.path.join(H.BUILD_DIR, "sdk", "sdk_gw")


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200000
    tmp = H.mkdtemp("iot-hub-sdk-bench-")
    secret = os.urandom(16).hex().encode()
    key = H.write_file(os.path.join(tmp, "secret"), secret)
    redis = H.Redis()
    cpus = sorted(os.sched_getaffinity(0))
    hub = H.Hub(H.hub_args(redis, key, extra=["--device-rate", "0", "--gateway-rate", "0"]))
    try:
        if len(cpus) > 1:
            for pid in (hub.pid, redis.proc.pid):
                os.sched_setaffinity(pid, {cpus[0]})
        for policy in ("none", "batch", "always"):
            count = n if policy != "always" else max(n // 20, 1000)
            sub = H.uniq("bench")
            token = H.hs256(H.gw_claims(sub, ["t-*"]), secret)
            devs = ",".join("t-%s-%d" % (sub, i) for i in range(10))
            cmd = [SDK_GW, "--url", hub.url(), "--token", token, "--spool",
                   os.path.join(tmp, "spool-" + policy), "--devices", devs, "--count", str(count),
                   "--fsync", policy, "--bench"]
            if len(cpus) > 1:
                cmd = ["taskset", "-c", str(cpus[-1])] + cmd
            t0 = time.monotonic()
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            dt = time.monotonic() - t0
            if out.returncode:
                raise SystemExit("sdk_gw failed: %s %s" % (out.stdout, out.stderr[-2000:]))
            spooled = [l for l in out.stdout.splitlines() if l.startswith("spooled")][0]
            print("fsync=%-6s %d readings: %s; all acked by the hub in %.2f s: %.0f readings/s"
                  % (policy, count, spooled.split(": ", 1)[1], dt, count / dt))
    finally:
        hub.stop()
        redis.stop()
        H.rmtree(tmp)


if __name__ == "__main__":
    main()
