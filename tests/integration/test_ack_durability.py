"""What an ack promises (--ack-durability, docs/streams.md "Durability").

fsync: the hub serves only a Redis that runs appendonly yes + appendfsync
always (CONFIG GET on every connect and every second): it refuses to start
against one that does not, and stops serving (not ready, `unavailable`) when
one changes at run time, until it is back. replicated: every store batch is
followed by WAIT ack-replicas ack-wait-ms; a frame is acked only when enough
replicas confirmed it, else answered `unavailable` (it may already be stored
on the primary: the resend is a duplicate, which must pass its own WAIT)."""

import asyncio
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (HUB_BIN, SCHEMAS_DIR, Hub, HubTestCase, Resp, clean_env, http_get, hub_args,  # noqa: E402
                     main, metric_value, mkdtemp, parse_metrics, reading, rkeys, rmtree, uniq, wait_until)


class AckCase(HubTestCase):
    def readyz(self, hub):
        try:
            return http_get(hub, "/readyz", timeout=2)[0]
        except OSError:
            return None

    async def wait_ready(self, hub, want, timeout):
        deadline = time.monotonic() + timeout
        while self.readyz(hub) != want:
            if time.monotonic() > deadline:
                raise AssertionError("/readyz not %s within %ss; %s" % (want, timeout, hub.describe()))
            await asyncio.sleep(0.05)

    def metric(self, hub, name):
        return metric_value(parse_metrics(http_get(hub, "/metrics")[2]), name)

    def refused(self, args, timeout=20):
        """Runs the hub expecting exit status 1 before it listens; returns
        its error lines."""
        h = Hub(args, wait=False)
        self.addCleanup(h.cleanup)
        rc = h.wait_exit(timeout)
        self.assertEqual(rc, 1, "expected exit status 1; %s" % h.describe())
        text = h.stderr_text()
        self.assertNotIn("listening on", text)
        return [l for l in text.splitlines() if re.match(r"\S+Z E ", l)]


class Options(AckCase):
    def run_bad(self, extra):
        p = subprocess.run([HUB_BIN, "--listen", "127.0.0.1:0", "--schemas", SCHEMAS_DIR] + extra,
                           capture_output=True, text=True, timeout=10, env=clean_env(), stdin=subprocess.DEVNULL)
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertEqual(len(lines), 1, p.stderr)
        return lines[0]

    async def test_option_errors(self):
        self.assertIn('ack-durability: expected accepted, fsync or replicated, got "strong"',
                      self.run_bad(["--ack-durability", "strong"]))
        self.assertIn("ack-durability replicated needs a Redis with replicas",
                      self.run_bad(["--ack-durability", "replicated"]))
        self.assertIn("ack-wait-ms 1500 must be at most half of redis-timeout-ms 2000",
                      self.run_bad(["--redis", "redis://127.0.0.1:1", "--ack-durability", "replicated",
                                    "--ack-wait-ms", "1500"]))
        self.assertIn("ack-replicas must be an integer in [1, 64]",
                      self.run_bad(["--ack-replicas", "0"]))

    async def test_help_and_defaults(self):
        out = subprocess.run([HUB_BIN, "--print-config"], capture_output=True, text=True, timeout=10,
                             env=clean_env()).stdout
        for line in ("data-dir ./iot-hub-data", "ack-durability accepted", "ack-replicas 1", "ack-wait-ms 1000"):
            self.assertIn(line + "\n", out)
        with open(os.path.join(os.path.dirname(SCHEMAS_DIR), "iot-hub.conf")) as f:
            conf = f.read()
        for line in ("ack-durability accepted", "ack-replicas 1", "ack-wait-ms 1000"):
            self.assertIn("\n" + line + "\n", conf, "deploy/iot-hub.conf lacks %r" % line)
        # the shipped config is the package's: data-dir absolute, the default noted
        self.assertIn("# (default: ./iot-hub-data)\ndata-dir /var/lib/iot-hub\n", conf)


class Fsync(AckCase):
    async def test_refuses_a_redis_without_appendfsync_always(self):
        for extra, why in (([], "runs appendonly no and appendfsync everysec"),
                           (["--appendonly", "yes"], "runs appendonly yes and appendfsync everysec"),
                           (["--appendonly", "yes", "--appendfsync", "no"], "runs appendonly yes and appendfsync no"),
                           (["--appendfsync", "always"], "runs appendonly no and appendfsync always")):
            redis = self.start_redis(extra)
            errs = self.refused(hub_args(redis, self.secret_file, extra=["--ack-durability", "fsync"]))
            self.assertEqual(len(errs), 1, "one error line expected: %r" % errs)
            self.assertIn("ack-durability fsync: Redis 127.0.0.1:%d %s; fsync needs appendonly yes and "
                          "appendfsync always" % (redis.port, why), errs[0])
            self.assertIn("refusing to start", errs[0])
            self.assertIsNone(redis.cmd("GET", rkeys.LAYOUT), "wrote to a Redis it refused")

    async def test_serves_appendfsync_always_and_follows_config_changes(self):
        redis = self.start_redis(["--appendonly", "yes", "--appendfsync", "always"])
        hub = self.start_hub(redis, extra=["--ack-durability", "fsync", "--redis-backoff-max-ms", "200"])
        gw, d = await self.gw_dev(hub)
        rep = await gw.telemetry(1, [reading(d, 1.0)])
        self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", 1), rep)

        # Changed at run time: noticed within about a second; the hub keeps
        # running but neither is ready nor acks until it is changed back.
        redis.cmd("CONFIG", "SET", "appendfsync", "everysec")
        t0 = time.monotonic()
        await self.wait_ready(hub, 503, 5)
        self.assertLess(time.monotonic() - t0, 3)
        hub.wait_line(r"E .*ack-durability fsync: Redis 127\.0\.0\.1:%d runs appendonly yes and appendfsync "
                      r"everysec; .*not serving \(not ready, telemetry answered unavailable\)" % redis.port, 5)
        rep = await gw.telemetry(2, [reading(d, 2.0)])
        self.assert_unavailable(rep, 2)
        self.assertEqual(self.metric(hub, "iot_hub_redis_up"), 0)

        redis.cmd("CONFIG", "SET", "appendfsync", "always")
        await self.wait_ready(hub, 200, 10)
        rep = await self.resend_until_acked(gw, 2, [reading(d, 2.0)])
        self.assertEqual(rep.get("accepted"), 1, rep)
        self.assertEqual([int(f["seq"]) for _, f in redis.xrange(rkeys.tm(d))], [1, 2])
        hub.stop()

    async def test_embedded_runs_appendfsync_always(self):
        tmp = mkdtemp("iot-hub-fsync-")
        self.addCleanup(rmtree, tmp)
        hub = self.start_hub(None, extra=["--ack-durability", "fsync", "--data-dir", os.path.join(tmp, "d")],
                             timeout=30)
        m = hub.wait_line(r"appendfsync always\); redis-server pid \d+ on 127\.0\.0\.1:(\d+)", 5)
        c = Resp(int(m.group(1)))
        self.addCleanup(c.close)
        self.assertEqual(c.cmd("CONFIG", "GET", "appendfsync"), ["appendfsync", "always"])
        gw, d = await self.gw_dev(hub)
        rep = await gw.telemetry(1, [reading(d)])
        self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", 1), rep)
        hub.stop(15)


class Replicated(AckCase):
    def primary_and_replica(self):
        primary = self.start_redis()
        replica = self.start_redis(["--replicaof", "127.0.0.1", primary.port])
        wait_until(lambda: "state=online" in primary.cmd("INFO", "replication") and
                   "master_link_status:up" in replica.cmd("INFO", "replication"), 15,
                   what="the replica to be online")
        return primary, replica

    def hub(self, primary, replicas=1, wait_ms=300):
        # A short wait where shortfalls are the point, a long one where acks
        # are (a loaded machine must not turn a slow replica into a failure).
        return self.start_hub(primary, extra=["--ack-durability", "replicated", "--ack-replicas", replicas,
                                              "--ack-wait-ms", wait_ms, "--redis-timeout-ms", max(2000, 3 * wait_ms)])

    async def test_acked_once_the_replica_has_it(self):
        primary, replica = self.primary_and_replica()
        hub = self.hub(primary, wait_ms=3000)
        hub.wait_line(r"ack-durability replicated: a frame is acked once WAIT saw 1 replica confirm it "
                      r"within 3000 ms", 1)
        gw, d = await self.gw_dev(hub)
        for seq in range(1, 21):
            rep = await gw.telemetry(seq, [reading(d, float(seq))])
            self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", 1), rep)
            # WAIT counted the replica: it has applied the frame already.
            self.assertEqual(replica.xlen(rkeys.tm(d)), seq, "acked seq %d not on the replica yet" % seq)
        # Pipelined frames (batched): acked too, and replicated.
        for seq in range(21, 61):
            await gw.send({"type": "telemetry", "seq": seq, "readings": [reading(d, 1.0), reading(d, 2.0)]})
        for seq in range(21, 61):
            rep = await gw.reply_for(seq, 10)
            self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", 2), rep)
        self.assertEqual(replica.xlen(rkeys.tm(d)), 20 + 80)
        self.assertGreater(self.metric(hub, "iot_hub_redis_waits_total"), 0)
        self.assertEqual(self.metric(hub, "iot_hub_redis_waits_short_total"), 0)
        hub.stop()

    async def test_replica_stopped_no_ack_then_resend_acked_once(self):
        primary, replica = self.primary_and_replica()
        hub = self.hub(primary)
        gw, d = await self.gw_dev(hub)
        rep = await self.resend_until_acked(gw, 1, [reading(d, 1.0)])
        frames = {seq: [reading(d, float(seq))] for seq in range(2, 7)}
        replica.pause()
        try:
            for seq, r in frames.items():
                await gw.send({"type": "telemetry", "seq": seq, "readings": r})
            for seq in frames:
                self.assert_unavailable(await gw.reply_for(seq, 5), seq)
            # The primary has them (stored, not acked); a resend while the
            # replica is still away is a duplicate and is not acked either.
            self.assertEqual(primary.xlen(rkeys.tm(d)), 6)
            self.assert_unavailable(await gw.telemetry(4, frames[4]), 4)
            self.assertEqual(self.readyz(hub), 200, "Redis answers: the hub stays ready")
        finally:
            replica.resume()
        m = parse_metrics(http_get(hub, "/metrics")[2])
        self.assertGreaterEqual(metric_value(m, "iot_hub_frames_total", result="unavailable"), 6)
        self.assertEqual(metric_value(m, "iot_hub_frames_total", result="acked") +
                         metric_value(m, "iot_hub_frames_total", result="duplicate"), 1, "only seq 1 acked")
        self.assertGreater(metric_value(m, "iot_hub_redis_waits_short_total"), 0)
        hub.wait_line(r"W .*redis: WAIT 1 300: 0 replicas confirmed; what it covered is answered unavailable", 1)
        for seq, r in frames.items():
            rep = await self.resend_until_acked(gw, seq, r)
            self.assertEqual((rep.get("seq"), rep.get("duplicate")), (seq, True), rep)
        self.assertEqual(sorted(int(f["seq"]) for _, f in primary.xrange(rkeys.tm(d))), list(range(1, 7)),
                         "each frame stored exactly once")
        self.assertEqual(replica.xlen(rkeys.tm(d)), 6)
        self.assertIsNone(gw.close_code)
        hub.stop()

    async def test_waits_that_hold_the_connection_do_not_expire_the_lease(self):
        """A WAIT holds the command connection for up to ack-wait-ms, and
        everything queued behind it waits as long. The lease renewal must
        not be among them (it goes on the priority connection): here every
        WAIT waits its full 1500 ms (2 replicas asked for, 1 there) while
        frames keep coming, on a lease of 1000 ms renewed every 250 ms."""
        primary, _ = self.primary_and_replica()
        hub = self.start_hub(primary, extra=["--ack-durability", "replicated", "--ack-replicas", 2,
                                             "--ack-wait-ms", 1500, "--redis-timeout-ms", 4000,
                                             "--lease-ttl-ms", 1000, "--lease-renew-ms", 250,
                                             "--instance-id", "hub-wait"])
        gw, d = await self.gw_dev(hub)
        t_end = time.monotonic() + 6
        seq = 0
        while time.monotonic() < t_end:
            seq += 1
            await gw.send({"type": "telemetry", "seq": seq, "readings": [reading(d, float(seq))]})
            await asyncio.sleep(0.1)
        for s in range(1, seq + 1):
            self.assert_unavailable(await gw.reply_for(s, 10), s)
        self.assertGreaterEqual(self.metric(hub, "iot_hub_redis_waits_short_total"), 3,
                                "the WAITs held the connection")
        log = hub.stderr_text()
        self.assertNotIn("had expired", log, "the lease expired behind the WAITs")
        self.assertNotIn("lease: a renewal took", log)
        self.assertIsNone(gw.close_code)
        hub.stop()

    async def test_more_replicas_than_there_are_never_acks(self):
        primary, _ = self.primary_and_replica()
        hub = self.hub(primary, replicas=2)
        gw, d = await self.gw_dev(hub)
        for seq in range(1, 6):
            rep = await gw.telemetry(seq, [reading(d, float(seq))])
            self.assert_unavailable(rep, seq)
        rep = await gw.telemetry(1, [reading(d, 1.0)])
        self.assert_unavailable(rep, 1)
        self.assertEqual(primary.xlen(rkeys.tm(d)), 5, "stored once on the primary, never acked")
        self.assertEqual(self.readyz(hub), 200)
        hub.stop()


if __name__ == "__main__":
    main()
