"""The embedded Redis keeps what was acked (`--redis embedded`, the default):
its data directory (--data-dir, default ./iot-hub-data) outlives the hub and
is reused, with an append-only file, so SIGTERM + start, SIGKILL of the hub +
start, and (with --ack-durability fsync) SIGKILL of the hub and its
redis-server + start all keep every acked reading (counted per gateway seq)
and every created command. (With the default `accepted` a SIGKILLed
redis-server can lose up to 2 s: with appendfsync everysec Redis postpones
its append-only write while a background fsync runs and replies anyway.) One data
directory serves one hub (a second refuses in one line); a redis-server left
running in it is stopped before a new one starts, and only that one."""

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (SCHEMAS_DIR, Hub, HubTestCase, Resp, api_keys_file, free_port, http_json, main,  # noqa: E402
                     mkdtemp, pid_alive, reading, rkeys, rmtree, uniq, wait_until)

KEY = "iotk_embedded_" + os.urandom(8).hex()
REDIS_LINE = r"redis-server pid (\d+) on 127\.0\.0\.1:(\d+)"


class Embedded(HubTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.keys = api_keys_file({"ops": (KEY, ["commands:write", "telemetry:read"])})

    def setUp(self):
        self.cwd = mkdtemp("iot-hub-embedded-")
        self.addCleanup(rmtree, self.cwd)
        self.data = os.path.join(self.cwd, "iot-hub-data")
        self.gw_sub = uniq("gw")
        self.devs = [uniq("t"), uniq("t")]
        self.offline = uniq("t")
        self.sent = {}       # seq -> {device: readings in the frame}
        self.acked = {}      # the same, for the frames acked
        self.commands = []   # ids created (201)

    # ---- hubs and their redis-server

    def args(self, extra=()):
        return ["--listen", "127.0.0.1:0", "--schemas", SCHEMAS_DIR, "--jwt-alg", "HS256",
                "--jwt-key", self.secret_file, "--api-keys", self.keys] + list(extra)

    def hub(self, extra=(), cwd=None):
        """A hub on the embedded default (no --redis), run in the test's
        directory; returns (hub, redis pid, redis port)."""
        h = self.start_hub(None, args=self.args(extra), cwd=cwd or self.cwd, timeout=40)
        m = h.wait_line(REDIS_LINE, 5)
        return h, int(m.group(1)), int(m.group(2))

    def resp(self, port):
        c = Resp(port)
        self.addCleanup(c.close)
        return c

    # ---- the workload: acked readings and queued commands

    async def store(self, hub, seqs, gw=None):
        """Frames seqs (1-3 readings over two devices each), all acked."""
        gw = gw or await self.gateway(hub, sub=self.gw_sub)
        rep = await gw.announce([(d, "thermostat") for d in self.devs])
        self.assertEqual(rep.get("accepted"), self.devs, rep)
        for seq in seqs:
            await gw.send(self.frame(seq))
        for seq in seqs:
            rep = await gw.reply_for(seq, 10)
            self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", sum(self.sent[seq].values())), rep)
            self.acked[seq] = self.sent[seq]
        return gw

    def frame(self, seq):
        counts = {d: 0 for d in self.devs}
        readings = []
        for i in range(1 + seq % 3):
            d = self.devs[(seq + i) % 2]
            counts[d] += 1
            readings.append(reading(d, float(seq % 50)))
        self.sent[seq] = counts
        return {"type": "telemetry", "seq": seq, "readings": readings}

    async def make_commands(self, hub, n=3):
        gw = await self.gateway(hub)
        rep = await gw.announce([(self.offline, "thermostat")])
        self.assertEqual(rep.get("accepted"), [self.offline], rep)
        await gw.close()
        for i in range(n):
            st, doc = http_json(hub, "POST", "/v1/devices/%s/commands" % self.offline,
                                {"name": "reboot", "params": {"delay_s": i}}, key=KEY)
            self.assertEqual(st, 201, doc)
            self.commands.append(doc["id"])

    def assert_all_there(self, hub, port):
        """Every acked frame's readings exactly once (per device and seq), and
        every created command, in the Redis the hub now runs."""
        r = self.resp(port)
        for d in self.devs:
            got = {}
            for _, fields in r.cmd("XRANGE", rkeys.tm(d), "-", "+") or []:
                f = dict(zip(fields[0::2], fields[1::2]))
                self.assertEqual(f["gw"], self.gw_sub)
                got[int(f["seq"])] = got.get(int(f["seq"]), 0) + 1
            want = {s: c[d] for s, c in self.acked.items() if c[d]}
            for s, n in want.items():
                self.assertEqual(got.get(s), n, "device %s seq %d: %s stored, %d acked" % (d, s, got.get(s), n))
            for s, n in got.items():  # unacked frames (in flight at a kill): at most once
                sent = self.sent[s][d]
                self.assertEqual(n, sent, "device %s seq %d stored %d times its %d readings" % (d, s, n, sent))
        window = set(int(x) for x in r.cmd("ZRANGE", rkeys.gw_seqs(self.gw_sub), 0, -1))
        self.assertTrue(set(self.acked) <= window, "acked seqs missing from the window: %s"
                        % sorted(set(self.acked) - window))
        for cid in self.commands:
            st, doc = http_json(hub, "GET", "/v1/commands/%s" % cid, key=KEY)
            self.assertEqual((st, doc.get("status") if isinstance(doc, dict) else doc), (200, "queued"), cid)
        st, doc = http_json(hub, "GET", "/v1/devices/%s/commands" % self.offline, key=KEY)
        self.assertEqual(st, 200, doc)
        self.assertEqual(sorted(c["id"] for c in doc["commands"]), sorted(self.commands), doc)

    async def resend_is_duplicate(self, hub, seq):
        gw = await self.gateway(hub, sub=self.gw_sub)
        rep = await gw.announce([(d, "thermostat") for d in self.devs])
        self.assertEqual(rep.get("accepted"), self.devs, rep)
        rep = await gw.telemetry(seq, self.frame(seq)["readings"], 10)
        self.assertEqual((rep.get("type"), rep.get("duplicate")), ("ack", True),
                         "seq %d resent after the restart: %r" % (seq, rep))
        await gw.close()

    # ---- the tests

    async def test_default_data_dir_and_aof(self):
        hub, rpid, rport = self.hub()
        hub.wait_line(r"data dir %s \(append-only file, appendfsync everysec\)" % re.escape(self.data), 5)
        self.assertEqual(os.readlink("/proc/%d/cwd" % rpid), self.data, "redis-server works in ./iot-hub-data")
        r = self.resp(rport)
        self.assertEqual(r.cmd("CONFIG", "GET", "appendonly"), ["appendonly", "yes"])
        self.assertEqual(r.cmd("CONFIG", "GET", "appendfsync"), ["appendfsync", "everysec"])
        self.assertEqual(r.cmd("CONFIG", "GET", "dir"), ["dir", self.data])
        with open(os.path.join(self.data, "redis.pid")) as f:
            self.assertEqual(int(f.read()), rpid)
        with open(os.path.join(self.data, "iot-hub.lock")) as f:
            self.assertEqual(int(f.read()), hub.pid)
        hub.stop(15)
        self.assertFalse(pid_alive(rpid), "redis-server outlived a clean stop")
        self.assertFalse(os.path.exists(os.path.join(self.data, "redis.pid")))
        self.assertTrue(os.path.isdir(os.path.join(self.data, "appendonlydir")), os.listdir(self.data))

    async def test_data_dir_flag(self):
        other = os.path.join(mkdtemp("iot-hub-datadir-"), "a", "b")
        self.addCleanup(rmtree, os.path.dirname(os.path.dirname(other)))
        hub, rpid, _ = self.hub(["--data-dir", other])
        self.assertEqual(os.readlink("/proc/%d/cwd" % rpid), other)
        self.assertEqual(os.stat(other).st_mode & 0o777, 0o700)
        self.assertFalse(os.path.exists(self.data), "the default dir was created too")
        hub.stop(15)

    async def test_sigterm_restart_keeps_everything(self):
        hub, _, _ = self.hub()
        gw = await self.store(hub, range(1, 41))
        await gw.close()
        await self.make_commands(hub)
        hub.stop(15)
        hub2, _, port2 = self.hub()
        self.assert_all_there(hub2, port2)
        await self.resend_is_duplicate(hub2, 7)
        hub2.stop(15)

    async def kill_mid_stream(self, hub, rpid, kill_redis):
        """Frames 1..40 acked and commands created; then frames streamed
        from 41 on and the hub (and its redis-server) SIGKILLed once 20 more
        are acked."""
        gw = await self.store(hub, range(1, 41))
        await self.make_commands(hub)
        seq = 41
        stop_at = None
        while stop_at is None or len(self.acked) < stop_at:
            for _ in range(4):
                await gw.send(self.frame(seq))
                seq += 1
            for m in await gw.collect(0.002):
                if m.get("type") == "ack":
                    self.acked[m["seq"]] = self.sent[m["seq"]]
                else:
                    self.fail("not an ack: %r" % m)
            if stop_at is None and len(self.acked) >= 45:
                stop_at = len(self.acked) + 15
        if kill_redis:
            os.kill(rpid, signal.SIGKILL)
        hub.kill()

    async def test_kill9_hub_restart_keeps_everything(self):
        hub, rpid, _ = self.hub()
        await self.kill_mid_stream(hub, rpid, kill_redis=False)
        # PR_SET_PDEATHSIG: the child is told (SIGTERM) and goes by itself.
        wait_until(lambda: not pid_alive(rpid), 15, what="redis-server to exit after its hub was SIGKILLed")
        hub2, rpid2, port2 = self.hub()
        self.assertNotEqual(rpid2, rpid)
        self.assert_all_there(hub2, port2)
        await self.resend_is_duplicate(hub2, 3)
        hub2.stop(15)

    async def test_kill9_hub_and_redis_restart_keeps_everything(self):
        hub, rpid, rport = self.hub(["--ack-durability", "fsync"])
        self.assertEqual(self.resp(rport).cmd("CONFIG", "GET", "appendfsync"), ["appendfsync", "always"])
        await self.kill_mid_stream(hub, rpid, kill_redis=True)
        hub2, _, port2 = self.hub(["--ack-durability", "fsync"])
        self.assert_all_there(hub2, port2)
        hub2.stop(15)

    async def test_second_hub_on_the_data_dir_refuses(self):
        hub, rpid, rport = self.hub()
        second = Hub(self.args(), wait=False, cwd=self.cwd)
        self.addCleanup(second.cleanup)
        rc = second.wait_exit(20)
        self.assertEqual(rc, 1, second.describe())
        lines = [l for l in second.stderr_text().splitlines() if l.strip()]
        self.assertEqual(len(lines), 1, "one line expected: %r" % lines)
        self.assertIn("data-dir %s is in use by another iot-hub (pid %d)" % (self.data, hub.pid), lines[0])
        # The first one and its Redis are untouched.
        self.assertTrue(pid_alive(rpid))
        self.assertEqual(self.resp(rport).cmd("PING"), "PONG")
        await self.store(hub, [1])
        hub.stop(15)

    async def test_stopped_redis_left_by_a_killed_hub(self):
        # Its child stopped (SIGSTOP), the hub SIGKILLed: the PDEATHSIG
        # SIGTERM stays pending and the old redis-server stays, holding the
        # data directory. The next hub finds it (redis.pid, /proc), stops it,
        # and serves what it had acked.
        hub, rpid, _ = self.hub()
        await self.store(hub, range(1, 11))
        await self.make_commands(hub, 2)
        os.kill(rpid, signal.SIGSTOP)
        hub.kill()
        time.sleep(0.3)
        self.assertTrue(pid_alive(rpid), "the stopped redis-server should still be there")
        try:
            hub2, rpid2, port2 = self.hub()
        finally:
            if pid_alive(rpid):
                os.kill(rpid, signal.SIGKILL)
        hub2.wait_line(r"a redis-server \(pid %d\) from an earlier run is still using %s: stopping it"
                       % (rpid, re.escape(self.data)), 1)
        self.assertFalse(pid_alive(rpid), "the stale redis-server was not stopped")
        self.assertNotEqual(rpid2, rpid)
        self.assert_all_there(hub2, port2)
        hub2.stop(15)

    async def test_foreign_redis_in_the_data_dir(self):
        # A redis-server started by hand on the data directory, named in
        # redis.pid: stopped (gracefully: it had data) before the hub starts
        # its own.
        hub, _, _ = self.hub()
        await self.store(hub, range(1, 6))
        hub.stop(15)
        port = free_port()
        stale = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", self.data,
                                  "--appendonly", "yes", "--save", ""],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: stale.poll() is None and (stale.kill(), stale.wait()))
        def pong():
            c = Resp(port, timeout=1)
            try:
                return c.cmd("PING") == "PONG"
            finally:
                c.close()
        wait_until(pong, 10, what="the hand-started redis-server")
        with open(os.path.join(self.data, "redis.pid"), "w") as f:
            f.write("%d\n" % stale.pid)
        hub2, rpid2, port2 = self.hub()
        self.assertEqual(stale.wait(10), 0, "the hand-started redis-server should have exited on SIGTERM")
        self.assertNotEqual(rpid2, stale.pid)
        self.assert_all_there(hub2, port2)
        hub2.stop(15)

    async def test_pid_file_naming_another_process(self):
        # redis.pid naming a process that is not a redis-server in this data
        # directory (pid reuse, a copied directory): left alone.
        hub, _, _ = self.hub()
        hub.stop(15)
        other = self.start_redis()  # a redis-server, but in its own directory
        sleeper = subprocess.Popen(["sleep", "60"], cwd=self.data)  # in the directory, not a redis-server
        self.addCleanup(lambda: (sleeper.kill(), sleeper.wait()))
        for victim in (other.proc.pid, sleeper.pid):
            with open(os.path.join(self.data, "redis.pid"), "w") as f:
                f.write("%d\n" % victim)
            hub2, _, _ = self.hub()
            hub2.stop(15)
        self.assertIsNone(sleeper.poll(), "the hub signalled a process that is not its redis-server")
        self.assertTrue(other.ping(), "the hub signalled a redis-server of another directory")


if __name__ == "__main__":
    main()
