"""Redis outages (docs/protocol.md "Telemetry"): while Redis is unreachable the hub answers
`unavailable` with the seq and retry_after_ms and never acks; it reconnects by
itself when Redis is back on the same port, and resent frames are stored
exactly once."""

import asyncio
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (HubTestCase, Redis, Resp, free_port, http_get, main, metric_value, parse_metrics,  # noqa: E402
                     reading, rkeys, uniq)

# Keeps Redis busy for ARGV[1] ms (it answers nobody meanwhile).
BUSY = ("local t0 = redis.call('TIME') local us = tonumber(ARGV[1]) * 1000 "
        "repeat local t = redis.call('TIME') until (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) >= us "
        "return 1")


class RedisOutage(HubTestCase):
    def readyz(self, hub):
        try:
            return http_get(hub, "/readyz", timeout=2)[0]
        except OSError:
            return None

    async def wait_ready(self, hub, want=200, timeout=15):
        deadline = time.monotonic() + timeout
        while True:
            st = self.readyz(hub)
            if st == want:
                return
            if time.monotonic() > deadline:
                raise AssertionError("/readyz still %s after %ss (want %s); %s" % (st, timeout, want, hub.describe()))
            await asyncio.sleep(0.05)


    async def test_kill_mid_stream_and_restart(self):
        redis = self.start_redis()
        hub = self.start_hub(redis)
        gw, d = await self.gw_dev(hub)
        frames = {seq: [reading(d, float(seq))] for seq in range(1, 61)}
        replies = {}
        sent_at = {}
        killed_at = []

        async def sender():
            for seq in range(1, 61):
                sent_at[seq] = time.monotonic()
                await gw.send({"type": "telemetry", "seq": seq, "readings": frames[seq]})
                await asyncio.sleep(0.01)

        async def receiver():
            while len(replies) < 60:
                m = await gw.wait_for(lambda m: m.get("type") in ("ack", "error"), 10, "ack/error")
                self.assertNotIn(m.get("seq"), replies, "two replies for seq %s: %r then %r"
                                 % (m.get("seq"), replies.get(m.get("seq")), m))
                replies[m["seq"]] = m
                if m["seq"] == 10 and m["type"] == "ack":
                    redis.kill()
                    killed_at.append(time.monotonic())

        await asyncio.wait_for(asyncio.gather(sender(), receiver()), 40)
        acked = sorted(s for s, m in replies.items() if m["type"] == "ack")
        unavailable = sorted(s for s, m in replies.items() if m["type"] != "ack")
        self.assertIn(10, acked)
        self.assertGreater(len(unavailable), 0, "no unavailable after Redis was killed: %r" % replies)
        for s in unavailable:
            self.assert_unavailable(replies[s], s)
        self.assertTrue(killed_at, "seq 10 was not acked: %r" % replies.get(10))
        late = [s for s in acked if sent_at[s] > killed_at[0]]
        self.assertEqual(late, [], "acks for frames sent after Redis was killed (they cannot be durable)")
        self.assertEqual(self.readyz(hub), 503, "/readyz while Redis is down")

        redis.restart()  # same port, empty
        await self.wait_ready(hub, 200, 15)
        self.assertIsNone(gw.close_code, "the gateway connection should survive the outage")
        for s in unavailable:
            rep = await self.resend_until_acked(gw, s, frames[s])
            self.assertEqual(rep.get("accepted"), 1, rep)
        for s in unavailable[:5]:  # and once more: acked, not stored again
            rep = await gw.telemetry(s, frames[s])
            self.assertEqual(rep.get("type"), "ack", rep)
        stored = sorted(int(f["seq"]) for _, f in redis.xrange(rkeys.tm(d)))
        self.assertEqual(stored, unavailable, "resent frames should be stored exactly once")
        hub.stop()

    async def test_frames_are_not_queued_behind_a_backlog(self):
        """Redis answers, but only between scripts of 400 ms that another
        client keeps running: each command waits up to 400 ms. With
        redis-shed-ms 150 a frame that arrives while the hub's oldest
        command has waited longer is answered `unavailable` (counted as
        shed), not queued behind it, and told to come back once that
        backlog may be gone (retry_after_ms at least the wait, here more
        than the 1 ms configured); every frame, resent, is stored exactly
        once."""
        redis = self.start_redis()
        hub = self.start_hub(redis, extra=["--redis-shed-ms", "150", "--retry-after-ms", "1"])
        gw, d = await self.gw_dev(hub)
        stop = threading.Event()

        def busy():
            c = Resp(redis.port)
            try:
                while not stop.is_set():
                    c.cmd("EVAL", BUSY, "0", "400")
            finally:
                c.close()
        t = threading.Thread(target=busy)
        t.start()
        try:
            await asyncio.sleep(0.2)
            frames = {seq: [reading(d, float(seq))] for seq in range(1, 31)}
            for seq, r in frames.items():
                await gw.send({"type": "telemetry", "seq": seq, "readings": r})
                await asyncio.sleep(0.05)
            replies = {seq: await gw.reply_for(seq, 10) for seq in frames}
        finally:
            stop.set()
            t.join(10)
        refused = [seq for seq, m in replies.items() if m.get("type") == "error"]
        for seq in refused:
            self.assert_unavailable(replies[seq], seq)
        # On a loaded machine a script and the wait for the CPU may add up
        # to the 750 ms after which Redis counts as down: those frames are
        # answered "store unavailable", the others behind it "behind".
        shed = [seq for seq in refused if "behind" in replies[seq].get("message", "")]
        for seq in shed:
            self.assertGreater(replies[seq]["retry_after_ms"], 150, replies[seq])
        self.assertGreater(len(shed), 0, "no frame was shed: %s" % replies)
        m = parse_metrics(http_get(hub, "/metrics")[2])
        self.assertEqual(metric_value(m, "iot_hub_frames_total", result="shed"), len(shed))
        for seq in refused:
            await self.resend_until_acked(gw, seq, frames[seq])
        self.assertEqual(sorted(int(f["seq"]) for _, f in redis.xrange(rkeys.tm(d))), list(frames),
                         "each frame stored exactly once")
        hub.stop()

    async def test_stall_timeout_then_resend_stored_once(self):
        # Redis stalls (SIGSTOP) longer than redis-timeout-ms: the hub answers
        # unavailable; on SIGCONT Redis may still run the stalled write, so the
        # resend must not store the frame a second time.
        redis = self.start_redis()
        hub = self.start_hub(redis, extra=["--redis-timeout-ms", "300", "--redis-backoff-max-ms", "200",
                                           "--retry-after-ms", "1234"])
        gw, d = await self.gw_dev(hub)
        rep = await gw.telemetry(1, [reading(d, 1.0)])
        self.assertEqual(rep.get("type"), "ack", rep)
        feed0 = redis.xlen(rkeys.FEED)
        r2 = [reading(d, 2.0)]
        redis.pause()
        try:
            t0 = time.monotonic()
            rep = await gw.telemetry(2, r2, timeout=5)
            took = time.monotonic() - t0
            self.assert_unavailable(rep, 2)
            self.assertEqual(rep.get("retry_after_ms"), 1234, "--retry-after-ms 1234: %r" % rep)
        finally:
            redis.resume()
        self.assertLess(took, 3, "unavailable took %.1fs with redis-timeout-ms 300" % took)
        await self.wait_ready(hub, 200, 15)
        rep = await self.resend_until_acked(gw, 2, r2)
        stored = [int(f["seq"]) for _, f in redis.xrange(rkeys.tm(d))]
        self.assertEqual(stored, [1, 2], "frame stored %d times after a stall + resend" % stored.count(2))
        self.assertEqual(redis.xlen(rkeys.FEED), feed0 + 1)
        hub.stop()

    async def test_stalled_redis_is_not_ready_within_2s(self):
        # Up means answering, not a connected socket: with a redis-timeout-ms
        # far away the connection is kept through the stall, yet /readyz,
        # iot_hub_redis_up and the telemetry path say "down" within about 2 s
        # of SIGSTOP, idle or not, and "up" again as soon as Redis answers.
        redis = self.start_redis()
        hub = self.start_hub(redis, extra=["--redis-timeout-ms", "30000"])
        gw, d = await self.gw_dev(hub)
        rep = await gw.telemetry(1, [reading(d, 1.0)])
        self.assertEqual(rep.get("type"), "ack", rep)
        for busy in (False, True):
            await self.wait_ready(hub, 200, 5)
            await asyncio.sleep(1.2)  # idle: only the hub's PINGs talk to Redis
            redis.pause()
            try:
                t0 = time.monotonic()
                if busy:  # a frame in flight when Redis stops: held, neither acked nor refused
                    await gw.send({"type": "telemetry", "seq": 10, "readings": [reading(d, 10.0)]})
                await self.wait_ready(hub, 503, 5)
                took = time.monotonic() - t0
                up = metric_value(parse_metrics(http_get(hub, "/metrics")[2]), "iot_hub_redis_up")
                if not busy:  # (busy, it would queue behind seq 10's answer: replies keep their order)
                    t1 = time.monotonic()
                    rep = await gw.telemetry(2, [reading(d, 2.0)], timeout=5)
                    answered = time.monotonic() - t1
                held = await gw.collect(0.1)
            finally:
                redis.resume()
            self.assertLess(took, 2.0, "/readyz said ready for %.2f s of a stalled Redis (busy=%s)" % (took, busy))
            self.assertEqual(up, 0, "iot_hub_redis_up while /readyz is 503")
            if not busy:
                self.assert_unavailable(rep, 2)
                self.assertLess(answered, 0.5, "telemetry not refused at once while Redis is stalled")
            self.assertEqual([m for m in held if m.get("seq") == 10], [], "seq 10 answered during the stall")
            t2 = time.monotonic()
            await self.wait_ready(hub, 200, 5)
            self.assertLess(time.monotonic() - t2, 1.5, "ready again only %.2f s after SIGCONT" % (time.monotonic() - t2))
            if busy:
                rep = await gw.reply_for(10, 5)
                self.assertEqual(rep.get("type"), "ack", "the held frame after SIGCONT: %r" % rep)
        self.assertNotIn("dropping connection", hub.stderr_text(), "the stall is not an outage here")
        self.assertEqual(metric_value(parse_metrics(http_get(hub, "/metrics")[2]), "iot_hub_redis_connects_total"), 1)
        hub.stop()

    async def test_hub_starts_without_redis(self):
        port = free_port()
        hub = self.start_hub(None, extra=["--redis", "redis://127.0.0.1:%d" % port])
        self.assertEqual(http_get(hub, "/healthz")[0], 200)
        self.assertEqual(self.readyz(hub), 503)
        gw = await self.gateway(hub)
        d = uniq("t")
        await gw.send({"type": "announce", "devices": [{"device": d, "device_type": "thermostat"}]})
        ann = await gw.wait_for(lambda m: m.get("type") in ("announced", "error"), 10, "reply to announce")
        await gw.send({"type": "telemetry", "seq": 1, "readings": [reading(d)]})
        m = await gw.wait_for(lambda m: m.get("seq") == 1, 10, "reply for seq 1")
        if d in (ann.get("accepted") or []):
            self.assert_unavailable(m, 1)
        else:  # the hub may refuse announces while Redis is down; it still must not store
            self.assertFalse(m.get("type") == "ack" and m.get("accepted"), "ack without Redis: %r" % m)
        redis = Redis(port=port)
        self.addCleanup(redis.stop)
        await self.wait_ready(hub, 200, 15)
        rep = await gw.announce([(d, "thermostat")])
        self.assertEqual(rep.get("accepted"), [d], rep)
        rep = await self.resend_until_acked(gw, 1, [reading(d, 3.0)])
        self.assertEqual(redis.xlen(rkeys.tm(d)), 1)
        hub.stop()


if __name__ == "__main__":
    main()
