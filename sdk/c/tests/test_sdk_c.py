"""libiothub-gw against the real hub and redis-server (docs/sdk.md).

sdk_gw (sdk/c/tests/sdk_gw.c) streams readings numbered i, reading i with
ts = ts_base + i, and logs each i that iothub_gw_send() accepted. A test then
reads every device's stream (iot:tm:{<device>}) and counts each i by (gw, ts):
every accepted reading must be there exactly once, whatever was killed in
between (the SDK process with kill -9, the hub, Redis frozen).
Commands: run once per id against the real hub, and across a reconnect and a
duplicate delivery against a scripted hub (a websockets server) that sends
the same id twice.

Run: ctest --test-dir build -L sdk, or by hand
  SDK_GW_BIN=build/sdk/sdk_gw /usr/bin/python3 sdk/c/tests/test_sdk_c.py
"""

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.environ.get("HUB_SOURCE_DIR") or os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.join(SOURCE, "tests", "integration"))

import harness as H  # noqa: E402
from harness import HubTestCase, rkeys, uniq, wait_until  # noqa: E402

SDK_GW = os.environ.get("SDK_GW_BIN") or os.path.join(H.BUILD_DIR, "sdk", "sdk_gw")
NOLIMIT = ["--device-rate", "0", "--gateway-rate", "0", "--gateway-connect-rate", "0"]
KEY = "sdk-test-key-0123456789abcdef"


class SdkGw:
    """One sdk_gw process; stdout and stderr go to files in the log dir."""
    _n = 0

    def __init__(self, cmd, args, env=None):
        SdkGw._n += 1
        base = os.path.join(H.log_root(), "sdk_gw-%d" % SdkGw._n)
        self.out_path, self.err_path = base + ".out", base + ".err"
        self.out = open(self.out_path, "w")
        self.err = open(self.err_path, "w")
        self.args = list(cmd) + [str(a) for a in args]
        self.err.write("# %s\n" % " ".join(self.args))
        self.err.flush()
        self.proc = subprocess.Popen(self.args, stdout=self.out, stderr=self.err,
                                     stdin=subprocess.DEVNULL, env=H.clean_env(env))

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError("sdk_gw still running after %ss; %s" % (timeout, self.describe()))

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stdout(self):
        self.out.flush()
        with open(self.out_path) as f:
            return f.read()

    def describe(self):
        with open(self.err_path) as f:
            err = f.read()[-3000:]
        return "sdk_gw stderr (%s):\n%s\nstdout:\n%s" % (self.err_path, err, self.stdout()[-2000:])

    def check_sanitizers(self):
        with open(self.err_path) as f:
            text = f.read()
        for m in H.SANITIZER_MARKERS:
            if m in text:
                raise AssertionError("sanitizer report in sdk_gw: %s" % self.describe())

    def cleanup(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.out.close()
        self.err.close()


def read_text(path):
    with open(path) as f:
        return f.read()


def read_ints(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [int(l) for l in f.read().split("\n")[:-1] if l]


class SdkC(HubTestCase):
    """The scenarios, run on the C library's sdk_gw; test_sdk_python.py runs
    them on the Python package's py_gw.py by overriding GW_CMD."""
    GW_CMD = [SDK_GW]
    SPOOL_FILES_MAX = 2   # after compaction: the current segment (+ one)

    def setUp(self):
        if self.GW_CMD == [SDK_GW]:
            H.require_bin(SDK_GW, "sdk_gw")
        self.dir = H.mkdtemp("iot-hub-sdk-")
        self.addCleanup(H.rmtree, self.dir)
        self.ts_base = int(time.time() * 1000) - 3_600_000

    def fixed_hub(self, redis, port, extra=()):
        args = H.hub_args(redis, self.secret_file, extra=list(NOLIMIT) + list(extra))
        args[args.index("127.0.0.1:0")] = "127.0.0.1:%d" % port
        return self.start_hub(redis, args=args)

    def gw(self, url, sub, devs, spool, extra=(), **kw):
        args = ["--url", url, "--token", self.token(sub, devices=("t-*",)),
                "--spool", spool, "--devices", ",".join(devs), "--ts-base", self.ts_base]
        p = SdkGw(self.GW_CMD, args + list(extra), **kw)
        self.addCleanup(p.cleanup)
        self.addCleanup(p.check_sanitizers)
        return p

    def stored(self, redis, sub, devs):
        """{i: times stored} over the devices' streams, for gateway sub."""
        c = collections.Counter()
        seqs = collections.Counter()
        for d in devs:
            for _, f in redis.xrange(rkeys.tm(d)):
                if f.get("gw") != sub:
                    continue
                i = int(f["ts"]) - self.ts_base
                c[i] += 1
                seqs[(int(f["seq"]), i)] += 1
        self.assertEqual([k for k, n in seqs.items() if n > 1], [], "a (seq, reading) stored twice")
        return c

    def assert_once(self, counts, accepted, allowed_extra=()):
        dup = sorted(i for i, n in counts.items() if n > 1)
        missing = sorted(i for i in accepted if counts.get(i, 0) != 1)
        self.assertEqual(dup[:20], [], "readings stored more than once")
        self.assertEqual(missing[:20], [], "%d accepted readings not stored exactly once" % len(missing))
        extra = set(counts) - set(accepted) - set(allowed_extra)
        self.assertEqual(sorted(extra)[:20], [], "stored readings that were never accepted")

    def check_spool_size(self, spool, bound, n_accepted):
        """The segments on disk stay within the bound, and fill most of it."""
        size = sum(os.path.getsize(os.path.join(spool, f)) for f in os.listdir(spool))
        self.assertLessEqual(size, bound)
        self.assertGreater(size, bound * 3 // 4)

    # ------------------------------------------------------------------
    def test_kill9_sdk_restart_same_spool(self):
        """kill -9 of the gateway mid-stream; a new process on the same spool
        resends what was unacked by seq: every accepted reading stored once."""
        redis = self.start_redis()
        port = H.free_port()
        hub = self.fixed_hub(redis, port)
        sub, devs = uniq("gw"), [uniq("t") for _ in range(4)]
        spool, acc = os.path.join(self.dir, "spool"), os.path.join(self.dir, "acc")
        n = 20000
        url = "ws://127.0.0.1:%d/v1/gateway" % port
        p1 = self.gw(url, sub, devs, spool, ["--count", n, "--rate", 5000, "--accepted", acc])
        wait_until(lambda: len(read_ints(acc)) >= 7000, 30, what="7000 readings accepted")
        p1.kill9()
        first = read_ints(acc)
        self.assertEqual(first, list(range(len(first))))
        # reading len(first) may have been accepted and not yet logged when the
        # kill came: it is not sent again, and may be stored (once) or not
        gap = len(first)
        p2 = self.gw(url, sub, devs, spool, ["--count", n, "--start", gap + 1, "--accepted", acc])
        rc = p2.wait(120)
        self.assertEqual(rc, 0, p2.describe())
        self.assertIn("replayed", read_text(p2.err_path))
        accepted = read_ints(acc)
        self.assertEqual(sorted(accepted), [i for i in range(n) if i != gap])
        self.assert_once(self.stored(redis, sub, devs), accepted, allowed_extra={gap})
        hub.check_alive()

    def test_hub_killed_and_restarted(self):
        """The hub killed (-9) mid-stream and started again on its port, then
        Redis frozen for 3 s: the SDK reconnects, resends, stores once."""
        redis = self.start_redis()
        port = H.free_port()
        hub = self.fixed_hub(redis, port)
        sub, devs = uniq("gw"), [uniq("t") for _ in range(3)]
        spool, acc = os.path.join(self.dir, "spool"), os.path.join(self.dir, "acc")
        n = 15000
        url = "ws://127.0.0.1:%d/v1/gateway" % port
        p = self.gw(url, sub, devs, spool, ["--count", n, "--rate", 2500, "--accepted", acc,
                                             "--fsync", "batch"])
        wait_until(lambda: len(read_ints(acc)) >= 3000, 30, what="3000 accepted")
        hub.kill()
        time.sleep(0.5)
        hub2 = self.fixed_hub(redis, port)
        wait_until(lambda: len(read_ints(acc)) >= 9000, 30, what="9000 accepted")
        redis.pause()
        time.sleep(3)
        redis.resume()
        rc = p.wait(120)
        self.assertEqual(rc, 0, p.describe())
        out = p.stdout()
        self.assertIn("stats", out)
        self.assert_once(self.stored(redis, sub, devs), read_ints(acc))
        stats = dict(kv.split("=") for kv in out.split("stats ")[1].split())
        self.assertGreaterEqual(int(stats["reconnects"]), 1, out)
        hub2.check_alive()

    def stats_of(self, p):
        out = p.stdout()
        self.assertIn("stats ", out, p.describe())
        return dict(kv.split("=") for kv in out.split("stats ")[1].split("\n")[0].split())

    def test_ack_timeout_hub_stopped(self):
        """The hub process frozen (SIGSTOP) mid-stream: no ack comes within
        --ack-timeout, the SDK gives the connection up and connects again
        (the new upgrade waits in the frozen hub's backlog); after SIGCONT
        the unacked frames go again with their seq and every accepted
        reading is stored once (the hub acks what it stored from the old
        socket's buffer as a duplicate)."""
        redis = self.start_redis()
        port = H.free_port()
        hub = self.fixed_hub(redis, port)
        sub, devs = uniq("gw"), [uniq("t") for _ in range(3)]
        spool, acc = os.path.join(self.dir, "spool"), os.path.join(self.dir, "acc")
        p = self.gw("ws://127.0.0.1:%d/v1/gateway" % port, sub, devs, spool,
                    ["--count", 6000, "--rate", 2000, "--accepted", acc, "--ack-timeout", 1000])
        wait_until(lambda: len(read_ints(acc)) >= 1500, 30, what="1500 accepted")
        hub.proc.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: "connection given up" in read_text(p.err_path), 10,
                       what="the connection given up for a missing ack")
            time.sleep(0.5)
        finally:
            hub.proc.send_signal(signal.SIGCONT)
        self.assertEqual(p.wait(60), 0, p.describe())
        stats = self.stats_of(p)
        self.assertGreaterEqual(int(stats["ack_timeouts"]), 1, stats)
        self.assertGreaterEqual(int(stats["reconnects"]), 1, stats)
        self.assertRegex(read_text(p.err_path), r"no ack for seq \d+ within 1000 ms")
        self.assert_once(self.stored(redis, sub, devs), read_ints(acc))
        hub.check_alive()

    def test_kill9_repeatedly_with_unacked_frames(self):
        """The gateway killed with -9 three times: mid-stream, while the hub
        is frozen (frames sent and unacked, only in the spool), and mid-replay
        right after the hub thawed. Each restart on the same spool resends by
        seq; at the end every accepted reading is stored exactly once, and no
        (gateway, seq) holds a reading twice."""
        redis = self.start_redis()
        port = H.free_port()
        hub = self.fixed_hub(redis, port)
        sub, devs = uniq("gw"), [uniq("t") for _ in range(3)]
        spool, acc = os.path.join(self.dir, "spool"), os.path.join(self.dir, "acc")
        url = "ws://127.0.0.1:%d/v1/gateway" % port
        n, start, gaps = 9000, 0, set()

        def run(more, before_kill=None):
            nonlocal start
            until = len(read_ints(acc)) + more
            p = self.gw(url, sub, devs, spool, ["--count", n, "--start", start, "--rate", 3000,
                                                 "--accepted", acc, "--ack-timeout", 2000])
            wait_until(lambda: len(read_ints(acc)) >= until, 30, what="%d accepted" % until)
            if before_kill:
                before_kill(p)
            p.kill9()
            got = read_ints(acc)
            self.assertEqual(got, sorted(got))
            gaps.add(got[-1] + 1)   # may have been accepted, not logged: not sent again
            start = got[-1] + 2
            return p

        run(2000)

        def frozen(p):
            hub.proc.send_signal(signal.SIGSTOP)
            time.sleep(1.0)   # frames go out and wait for acks that do not come
        try:
            run(1500, frozen)
        finally:
            hub.proc.send_signal(signal.SIGCONT)
        p = run(600)
        self.assertRegex(read_text(p.err_path), r"replayed [1-9]\d* pending")
        last = self.gw(url, sub, devs, spool, ["--count", n, "--start", start, "--accepted", acc])
        self.assertEqual(last.wait(90), 0, last.describe())
        accepted = read_ints(acc)
        self.assertEqual(sorted(set(accepted) | gaps), list(range(n)))
        self.assert_once(self.stored(redis, sub, devs), accepted, allowed_extra=gaps)
        hub.check_alive()

    def test_foreign_poll_loop(self):
        """sdk_gw --poll drives the library from a plain poll() loop on
        iothub_gw_fd() and iothub_gw_next_timeout(), no thread of the
        library's own: readings sent from another thread wake it, the hub
        killed and started again is reconnected to on the loop's timeouts,
        every accepted reading is stored once, and the loop does not spin
        (its turns are counted)."""
        if self.GW_CMD != [SDK_GW]:
            self.skipTest("C API")
        redis = self.start_redis()
        port = H.free_port()
        hub = self.fixed_hub(redis, port)
        sub, devs = uniq("gw"), [uniq("t") for _ in range(2)]
        acc = os.path.join(self.dir, "acc")
        p = self.gw("ws://127.0.0.1:%d/v1/gateway" % port, sub, devs, os.path.join(self.dir, "spool"),
                    ["--count", 4000, "--rate", 2000, "--accepted", acc, "--poll"])
        wait_until(lambda: len(read_ints(acc)) >= 1000, 30, what="1000 accepted")
        hub.kill()
        time.sleep(0.5)
        hub2 = self.fixed_hub(redis, port)
        self.assertEqual(p.wait(60), 0, p.describe())
        stats = self.stats_of(p)
        self.assertGreaterEqual(int(stats["reconnects"]), 1, stats)
        self.assert_once(self.stored(redis, sub, devs), read_ints(acc))
        turns = int(p.stdout().split("poll turns=")[1].split()[0])
        # ~3 s of sending and reconnecting: tens of turns a second, not a spin
        self.assertLess(turns, 5000, p.stdout())
        self.assertGreater(turns, 10, p.stdout())
        hub2.check_alive()

    def test_redis_killed_and_restarted(self):
        """Redis (append-only, fsync always; the hub acks with
        --ack-durability fsync) killed with -9 mid-stream and started again
        on its port and data: the SDK waits out `unavailable`, resends, and
        every accepted reading is stored once."""
        redis = self.start_redis(extra=["--appendonly", "yes", "--appendfsync", "always"])
        port = H.free_port()
        hub = self.fixed_hub(redis, port, extra=["--ack-durability", "fsync"])
        sub, devs = uniq("gw"), [uniq("t") for _ in range(3)]
        spool, acc = os.path.join(self.dir, "spool"), os.path.join(self.dir, "acc")
        p = self.gw("ws://127.0.0.1:%d/v1/gateway" % port, sub, devs, spool,
                    ["--count", 8000, "--rate", 2000, "--accepted", acc])
        wait_until(lambda: len(read_ints(acc)) >= 2500, 30, what="2500 accepted")
        redis.kill()
        time.sleep(1.5)
        redis.restart()
        rc = p.wait(120)
        self.assertEqual(rc, 0, p.describe())
        out = p.stdout()
        self.assert_once(self.stored(redis, sub, devs), read_ints(acc))
        stats = dict(kv.split("=") for kv in out.split("stats ")[1].split())
        self.assertGreater(int(stats["unavailable"]), 0, out)
        hub.check_alive()

    def test_rate_limits_and_rejects(self):
        """Per-device rate limits: rate_limited readings go again after
        retry_after_ms and end stored once; invalid ones reach on_reject."""
        redis = self.start_redis()
        port = H.free_port()
        self.fixed_hub(redis, port, extra=["--device-rate", "200", "--device-burst", "100"])
        sub, devs = uniq("gw"), [uniq("t")]
        spool, acc = os.path.join(self.dir, "spool"), os.path.join(self.dir, "acc")
        url = "ws://127.0.0.1:%d/v1/gateway" % port
        p = self.gw(url, sub, devs, spool, ["--count", 1000, "--bad-every", 100, "--accepted", acc])
        rc = p.wait(120)
        self.assertEqual(rc, 0, p.describe())
        out = p.stdout()
        rejects = [l for l in out.splitlines() if l.startswith("reject ")]
        self.assertEqual(len(rejects), 10, out[-2000:])
        self.assertTrue(all(l.startswith("reject invalid ") for l in rejects), rejects)
        stats = dict(kv.split("=") for kv in out.split("stats ")[1].split())
        self.assertGreater(int(stats["rate_limited"]), 0, out)
        bad = {i for i in range(1000) if i % 100 == 99}
        self.assert_once(self.stored(redis, sub, devs), [i for i in read_ints(acc) if i not in bad])

    def test_announce_rate_limited(self):
        """Five devices against an announce bucket of two (refilling at 2/s):
        the refused entries are announced again after retry_after_ms and no
        reading goes before, so none is rejected and all are stored once."""
        redis = self.start_redis()
        port = H.free_port()
        self.fixed_hub(redis, port, extra=["--announce-rate", "2", "--announce-burst", "2"])
        sub, devs = uniq("gw"), [uniq("t") for _ in range(5)]
        acc = os.path.join(self.dir, "acc")
        p = self.gw("ws://127.0.0.1:%d/v1/gateway" % port, sub, devs, os.path.join(self.dir, "spool"),
                    ["--count", 500, "--accepted", acc])
        self.assertEqual(p.wait(60), 0, p.describe())
        self.assertNotIn("reject ", p.stdout())
        self.assert_once(self.stored(redis, sub, devs), read_ints(acc))

    def test_spool_bound(self):
        """No hub: send() fills the spool to its bound and then refuses with
        "spool full" (ESPOOL_FULL); the spool stays within the bound; later,
        with a hub, every accepted reading is delivered once and the spool
        compacts to one segment."""
        port = H.free_port()   # nobody listens
        sub, devs = uniq("gw"), [uniq("t") for _ in range(2)]
        spool, acc = os.path.join(self.dir, "spool"), os.path.join(self.dir, "acc")
        url = "ws://127.0.0.1:%d/v1/gateway" % port
        bound = 256 * 1024
        p = self.gw(url, sub, devs, spool, ["--count", 100000, "--max-spool", bound,
                                             "--segment", 32768, "--until-full", "--accepted", acc])
        rc = p.wait(60)
        self.assertEqual(rc, 3, p.describe())
        self.assertRegex(p.stdout(), r"full at \d+: spool full")
        accepted = read_ints(acc)
        self.check_spool_size(spool, bound, len(accepted))
        self.assertGreater(len(accepted), 1000)
        redis = self.start_redis()
        self.fixed_hub(redis, port)
        p2 = self.gw(url, sub, devs, spool, ["--count", 0, "--max-spool", bound,
                                              "--segment", 32768])
        self.assertEqual(p2.wait(60), 0, p2.describe())
        self.assert_once(self.stored(redis, sub, devs), accepted)
        self.assertLessEqual(len(os.listdir(spool)), self.SPOOL_FILES_MAX, os.listdir(spool))

    def test_tls_verified_and_mtls(self):
        """wss:// with the hub's certificate verified against the CA and a
        client certificate whose CN is the sub: delivered once. Against a CA
        that did not sign the hub's certificate: nothing is sent."""
        certs = H.dev_certs()
        redis = self.start_redis()
        port = H.free_port()
        args = H.hub_args(redis, self.secret_file, extra=list(NOLIMIT) + [
            "--tls-cert", os.path.join(certs, "server.pem"), "--tls-key", os.path.join(certs, "server.key"),
            "--tls-client-ca", os.path.join(certs, "ca.pem")])
        args[args.index("127.0.0.1:0")] = "127.0.0.1:%d" % port
        self.start_hub(redis, args=args, tls=True)
        url = "wss://127.0.0.1:%d/v1/gateway" % port
        sub, devs = uniq("gw"), [uniq("t")]
        cert, key = H.client_cert(certs, sub)
        acc = os.path.join(self.dir, "acc")
        bad = self.gw(url, sub, devs, os.path.join(self.dir, "spool-bad"),
                      ["--count", 10, "--ca", os.path.join(certs, "foreign-ca.pem"),
                       "--cert", cert, "--key", key, "--serve-ms", 3000])
        p = self.gw(url, sub, devs, os.path.join(self.dir, "spool"),
                    ["--count", 500, "--ca", os.path.join(certs, "ca.pem"), "--cert", cert, "--key", key,
                     "--accepted", acc])
        self.assertEqual(p.wait(60), 0, p.describe())
        self.assert_once(self.stored(redis, sub, devs), read_ints(acc))
        self.assertEqual(bad.wait(30), 0, bad.describe())
        self.assertIn("pending=10", bad.stdout(), bad.describe())   # never delivered
        if self.GW_CMD == [SDK_GW]:
            self.assertIn("certificate does not verify", read_text(bad.err_path))

    def test_token_refresh(self):
        """An expired token is refused (401, reported to on_state); the token
        callback is asked again before every connect and the fresh token
        gets everything delivered."""
        redis = self.start_redis()
        port = H.free_port()
        self.fixed_hub(redis, port)
        sub, devs = uniq("gw"), [uniq("t")]
        tok = H.write_file(os.path.join(self.dir, "token"), self.token(sub, ttl=-600))
        acc = os.path.join(self.dir, "acc")
        p = self.gw("ws://127.0.0.1:%d/v1/gateway" % port, sub, devs, os.path.join(self.dir, "spool"),
                    ["--count", 300, "--token-file", tok, "--accepted", acc])
        wait_until(lambda: " 401 " in read_text(p.err_path), 20, what="a 401 reported")
        H.write_file(tok, self.token(sub))
        self.assertEqual(p.wait(60), 0, p.describe())
        self.assert_once(self.stored(redis, sub, devs), read_ints(acc))

    def test_commands_real_hub(self):
        """Commands created through the API run once each and end in the
        status the handler reported, with its progress and result."""
        redis = self.start_redis()
        port = H.free_port()
        hub = self.fixed_hub(redis, port, extra=["--api-keys", H.api_keys_file(
            {"ops": (KEY, ["commands:write", "telemetry:read"])})])
        sub, devs = uniq("gw"), [uniq("t") for _ in range(2)]
        cmdlog = os.path.join(self.dir, "cmds")
        url = "ws://127.0.0.1:%d/v1/gateway" % port
        p = self.gw(url, sub, devs, os.path.join(self.dir, "spool"),
                    ["--count", 0, "--serve-ms", 60000, "--commands", cmdlog])
        wait_until(lambda: H.http_json(hub, "GET", "/v1/devices/%s" % devs[1], key=KEY)[1]
                   .get("online"), 20, what="devices online")
        ids = []
        for d, name, params in ((devs[0], "reboot", {"delay_s": 1}), (devs[1], "config", {"setpoint": 20}),
                                (devs[0], "firmware_update", {"url": "https://x/y", "version": "2",
                                                              "sha256": "0" * 64})):
            st, body = H.http_json(hub, "POST", "/v1/devices/%s/commands" % d,
                                   {"name": name, "params": params}, key=KEY)
            self.assertIn(st, (200, 201, 202), body)
            ids.append(body["id"])
        want = {ids[0]: "succeeded", ids[1]: "succeeded", ids[2]: "failed"}

        def done():
            got = {i: H.http_json(hub, "GET", "/v1/commands/%s" % i, key=KEY)[1].get("status")
                   for i in ids}
            return got == want and got
        wait_until(done, 20, what="commands finished %r" % want)
        st, c = H.http_json(hub, "GET", "/v1/commands/%s" % ids[0], key=KEY)
        self.assertEqual(c.get("result"), {"done": True}, c)
        runs = [l.split() for l in read_text(cmdlog).splitlines() if l.startswith("run ")]
        self.assertEqual(sorted(r[1] for r in runs), sorted(ids))
        p.proc.send_signal(signal.SIGTERM)
        self.assertEqual(p.wait(20), 0, p.describe())

    async def test_commands_once_across_reconnect_and_redelivery(self):
        """A scripted hub sends command c1, takes the acks, drops the
        connection, then sends c1 again (attempt 2) and c2: c1's handler ran
        once and its final status is sent again; c2 runs once."""
        import websockets
        conns = []
        got = asyncio.Queue()

        async def handler(ws, path=None):
            conns.append(ws)
            n = len(conns)
            ann = json.loads(await ws.recv())
            self.assertEqual(ann["type"], "announce")
            await ws.send(json.dumps({"type": "announced", "accepted": [d["device"] for d in ann["devices"]],
                                      "rejected": []}))
            cmd = {"type": "command", "id": "c1", "device": ann["devices"][0]["device"], "name": "reboot",
                   "params": {"delay_s": 1}, "attempt": n, "expires_at": 0}
            await ws.send(json.dumps(cmd))
            if n == 1:
                await ws.send(json.dumps(cmd))   # the same delivery twice on one connection
            else:
                await ws.send(json.dumps(dict(cmd, id="c2", name="config", params={"setpoint": 21})))
            try:
                async for m in ws:
                    msg = json.loads(m)
                    await got.put((n, msg))
                    if n == 1 and msg.get("status") == "succeeded":
                        await ws.close(1001, "going away")
            except websockets.exceptions.ConnectionClosed:
                pass

        server = await websockets.serve(handler, "127.0.0.1", 0, subprotocols=["iot-gateway.v1"])
        self.addAsyncCleanup(server.wait_closed)
        self.addCleanup(server.close)
        port = server.sockets[0].getsockname()[1]
        cmdlog = os.path.join(self.dir, "cmds")
        url, sub, dev = "ws://127.0.0.1:%d/v1/gateway" % port, uniq("gw"), uniq("t")
        spool = os.path.join(self.dir, "spool")
        acks = []

        async def session(want):
            p = self.gw(url, sub, [dev], spool, ["--count", 0, "--serve-ms", 30000, "--commands", cmdlog])
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not want():
                try:
                    acks.append(await asyncio.wait_for(got.get(), 0.5))
                except asyncio.TimeoutError:
                    pass
            p.proc.send_signal(signal.SIGTERM)
            rc = await asyncio.get_running_loop().run_in_executor(None, p.wait, 20)
            self.assertEqual(rc, 0, p.describe())

        def on(conn, cid):
            return [a["status"] for n, a in acks if n == conn and a.get("id") == cid]
        await session(lambda: "succeeded" in on(2, "c2") and on(2, "c1"))
        # a new process on the same spool, and the scripted hub sends c1 and c2 again
        await session(lambda: on(3, "c1") and on(3, "c2"))
        self.assertEqual(on(3, "c1"), ["succeeded"], acks)
        self.assertEqual(on(3, "c2"), ["succeeded"], acks)
        runs = [l.split()[1] for l in read_text(cmdlog).splitlines() if l.startswith("run ")]
        self.assertEqual(sorted(runs), ["c1", "c2"], acks)
        first = [a["status"] for n, a in acks if n == 1 and a.get("id") == "c1"]
        # the duplicate is answered with the status of the moment (received or
        # succeeded, depending on whether the handler ran yet), never run again
        steps = [st for i, st in enumerate(first) if i == 0 or st != first[i - 1]]
        self.assertEqual(steps, ["received", "in_progress", "succeeded"], acks)
        # on the new connection c1 is answered with its last status (a duplicate's
        # answer queued while it was still "received" may go out there too)
        c1_2 = set(a["status"] for n, a in acks if n == 2 and a.get("id") == "c1")
        self.assertIn("succeeded", c1_2, acks)
        self.assertLessEqual(c1_2, {"received", "succeeded"}, acks)
        self.assertEqual([a["status"] for n, a in acks if n == 2 and a.get("id") == "c2"],
                         ["received", "in_progress", "succeeded"], acks)


if __name__ == "__main__":
    H.main()
