"""Ack only after durable, and idempotent resends (docs/protocol.md
"Telemetry"): a stalled
Redis (SIGSTOP) holds the ack back; a resent seq is acked again and never
stored twice, on the same connection, after a reconnect and across a hub
restart."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import HubTestCase, main, reading, rkeys, uniq  # noqa: E402


class Durability(HubTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        # A 1 s stall must not count as an outage here.
        cls.hub = cls.class_hub(cls.redis, extra=["--redis-timeout-ms", "10000"])

    async def gw_dev(self, sub=None, hub=None, device=None):
        gw = await self.gateway(hub or self.hub, sub=sub)
        d = device or uniq("t")
        rep = await gw.announce([(d, "thermostat")])
        self.assertEqual(rep.get("accepted"), [d], rep)
        return gw, d

    def xlen(self, d):
        return self.redis.xlen(rkeys.tm(d))

    async def test_no_ack_while_redis_stalled(self):
        gw, d = await self.gw_dev()
        self.redis.pause()
        try:
            await gw.send({"type": "telemetry", "seq": 1, "readings": [reading(d, 21.0)]})
            got = await gw.collect(1.0)
        finally:
            self.redis.resume()
        self.assertEqual([m for m in got if m.get("seq") == 1], [],
                         "hub answered seq 1 while Redis was stopped: %r" % got)
        rep = await gw.reply_for(1, 10)
        self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", 1),
                         "after SIGCONT expected the ack: %r" % rep)
        self.assertEqual(self.xlen(d), 1)

    async def test_resend_of_acked_seq(self):
        gw, d = await self.gw_dev()
        feed0 = self.redis.xlen(rkeys.FEED)
        r = [reading(d, 21.0)]
        rep = await gw.telemetry(5, r)
        self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", 1), rep)
        for again in (r, r, [reading(d, 99.0)]):  # a resend may even differ: the seq decides
            rep = await gw.telemetry(5, again)
            self.assertEqual((rep.get("type"), rep.get("seq")), ("ack", 5), "resend of seq 5: %r" % rep)
        self.assertEqual(self.xlen(d), 1, "resent frame stored twice")
        self.assertEqual([json.loads(f["data"])["temperature"] for _, f in self.redis.xrange(rkeys.tm(d))],
                         [21.0])
        self.assertEqual(self.redis.xlen(rkeys.FEED), feed0 + 1, "resent frame added to iot:feed again")

    async def test_resend_of_partly_rejected_frame(self):
        gw, d = await self.gw_dev()
        frame = [reading(d, 21.0), reading(d, 500.0)]
        rep = await gw.telemetry(1, frame)
        self.assertEqual((rep.get("type"), rep.get("accepted"), len(rep.get("rejected", []))), ("ack", 1, 1), rep)
        rep = await gw.telemetry(1, frame)
        self.assertEqual(rep.get("type"), "ack", rep)
        self.assertEqual(self.xlen(d), 1)

    async def test_resend_across_reconnect(self):
        sub = uniq("gw")
        gw, d = await self.gw_dev(sub)
        for seq in (1, 2, 3):
            rep = await gw.telemetry(seq, [reading(d, float(seq))])
            self.assertEqual(rep.get("type"), "ack", rep)
        await gw.close()
        gw2, _ = await self.gw_dev(sub, device=d)
        for seq in (2, 3):
            rep = await gw2.telemetry(seq, [reading(d, float(seq))])
            self.assertEqual((rep.get("type"), rep.get("seq")), ("ack", seq), "resend after reconnect: %r" % rep)
        self.assertEqual(self.xlen(d), 3, "frames resent after a reconnect were stored again")
        rep = await gw2.telemetry(4, [reading(d, 4.0)])
        self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", 1), rep)
        self.assertEqual([int(f["seq"]) for _, f in self.redis.xrange(rkeys.tm(d))], [1, 2, 3, 4])

    async def test_resend_across_hub_restart(self):
        # The seq window lives in Redis: a new hub process on the same Redis
        # still recognises a seq the old one made durable.
        h1 = self.start_hub(self.redis)
        sub = uniq("gw")
        gw, d = await self.gw_dev(sub, hub=h1)
        rep = await gw.telemetry(10, [reading(d, 10.0)])
        self.assertEqual(rep.get("type"), "ack", rep)
        await gw.close()
        h1.stop()
        h2 = self.start_hub(self.redis)
        gw2, _ = await self.gw_dev(sub, hub=h2, device=d)
        rep = await gw2.telemetry(10, [reading(d, 10.0)])
        self.assertEqual((rep.get("type"), rep.get("seq")), ("ack", 10), rep)
        self.assertEqual(self.xlen(d), 1, "resend to a restarted hub stored the frame twice")
        h2.stop()

    async def test_duplicate_while_first_in_flight(self):
        gw, d = await self.gw_dev()
        self.redis.pause()
        try:
            await gw.send({"type": "telemetry", "seq": 1, "readings": [reading(d, 1.0)]})
            await gw.send({"type": "telemetry", "seq": 1, "readings": [reading(d, 1.0)]})
            await gw.send({"type": "telemetry", "seq": 2, "readings": [reading(d, 2.0)]})
            got = await gw.collect(0.3)
        finally:
            self.redis.resume()
        self.assertFalse([m for m in got if m.get("type") == "ack"], "ack while Redis stopped: %r" % got)
        rep = await gw.reply_for(1, 10)
        self.assertEqual(rep.get("type"), "ack", rep)
        rep = await gw.reply_for(2, 10)
        self.assertEqual(rep.get("type"), "ack", rep)
        self.assertEqual(sorted(int(f["seq"]) for _, f in self.redis.xrange(rkeys.tm(d))), [1, 2],
                         "a duplicate sent while the first copy was in flight was stored twice")



async def send_frames(tc, n):
    """A new gateway with one device sends frames seq 1..n of one reading,
    each acked as stored. Returns (gateway, device, its seqs key, the key's
    ZCARD)."""
    gw = await tc.gateway(tc.hub)
    d = uniq("t")
    rep = await gw.announce([(d, "thermostat")])
    tc.assertEqual(rep.get("accepted"), [d], rep)
    for seq in range(1, n + 1):
        rep = await gw.telemetry(seq, [reading(d, 20.0)])
        tc.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", 1), rep)
    key = rkeys.gw_seqs(gw.sub)
    return gw, d, key, int(tc.redis.cmd("ZCARD", key))


class SeqWindow(HubTestCase):
    """The seq window holds seq-window..seq-window+32 seqs (trimmed when a seq
    is a multiple of 32): resends inside it are duplicates, a seq older than
    the whole window is stored again (at least once)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis, extra=["--seq-window", "16"])

    async def test_window_bounds_and_old_resend(self):
        gw, d, key, card = await send_frames(self, 200)
        self.assertTrue(16 <= card <= 16 + 32, "window of %d seqs" % card)
        self.assertEqual(self.redis.xlen(rkeys.tm(d)), 200)
        for seq in (200, 190, 185):  # inside the last 16: acked again, not stored
            rep = await gw.telemetry(seq, [reading(d, 20.0)])
            self.assertTrue(rep.get("duplicate"), "seq %d: %r" % (seq, rep))
        self.assertEqual(self.redis.xlen(rkeys.tm(d)), 200)
        rep = await gw.telemetry(3, [reading(d, 20.0)])  # far below the window
        self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", 1), rep)
        self.assertFalse(rep.get("duplicate"), rep)
        self.assertEqual(self.redis.xlen(rkeys.tm(d)), 201)



class SeqWindowDefault(HubTestCase):
    """The default window (96, trimmed every 32 seqs) stays in Redis's
    listpack encoding: a gateway that streamed for hours keeps about 0.7 KB
    of seqs, where the old default (4,096) kept a 470 KB skiplist (47 GB for
    100,000 busy gateways)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis, extra=["--device-rate", "0", "--gateway-rate", "0"])

    async def test_window_is_small_and_compact(self):
        gw, d, key, card = await send_frames(self, 300)
        self.assertTrue(96 <= card <= 128, "window of %d seqs" % card)
        self.assertEqual(self.redis.cmd("OBJECT", "ENCODING", key), "listpack")
        self.assertLess(int(self.redis.cmd("MEMORY", "USAGE", key)), 2048)
        for seq in (300, 250, 210):  # the last 90: acked again, not stored
            rep = await gw.telemetry(seq, [reading(d, 20.0)])
            self.assertTrue(rep.get("duplicate"), "seq %d: %r" % (seq, rep))
        self.assertEqual(self.redis.xlen(rkeys.tm(d)), 300)


if __name__ == "__main__":
    main()
