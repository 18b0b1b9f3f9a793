"""Limits (docs/protocol.md "Limits"), each on its own hub: frame size (close 1009),
per-device and per-gateway token buckets (rate_limited + retry_after_ms),
readings per frame, frames in flight, and takeover by a second connection
with the same sub (old one closed with 4001)."""

import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import websockets  # noqa: E402
from harness import (HubTestCase, connect_gateway, main, now_ms, reading, rkeys, try_upgrade,  # noqa: E402
                     uniq, wait_until)


class Limits(HubTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()

    async def gw_devs(self, hub, n=1, sub=None):
        gw = await self.gateway(hub, sub=sub)
        devs = [uniq("t") for _ in range(n)]
        rep = await gw.announce([(d, "thermostat") for d in devs])
        self.assertEqual(sorted(rep.get("accepted", [])), sorted(devs), rep)
        return gw, devs

    def xlen(self, d):
        return self.redis.xlen(rkeys.tm(d))

    async def send_expect_close(self, gw, payload, code, what):
        try:
            await gw.ws.send(payload)
        except websockets.exceptions.ConnectionClosed:
            pass
        got = await gw.collect(0)  # anything already queued
        cc = await gw.wait_closed(5)
        self.assertEqual(cc, code, "%s: expected close code %s, got %s (reason %r, messages %r)"
                         % (what, code, cc, gw.ws.close_reason, got))

    def frame_of_size(self, devs, size, seq=1):
        """A valid telemetry frame of about `size` bytes (never more)."""
        readings, i = [], 0
        base = {"type": "telemetry", "seq": seq, "readings": readings}
        while True:
            r = reading(devs[i % len(devs)], float(i % 100), ts=now_ms() - 1000)
            readings.append(r)
            if len(json.dumps(base)) > size:
                readings.pop()
                return base
            i += 1

    async def test_frame_size_default(self):
        hub = self.start_hub(self.redis)
        gw, devs = await self.gw_devs(hub, 6)
        # Just under 64 KiB: reassembled across many lws rx buffers, accepted.
        frame = self.frame_of_size(devs, 65000)
        n = len(frame["readings"])
        rep = await gw.telemetry(1, frame["readings"], timeout=10)
        self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", n),
                         "a %d-byte frame (under the 65536 default) should be accepted: %r"
                         % (len(json.dumps(frame)), {k: rep.get(k) for k in ("type", "accepted", "code")}))
        # Just over 64 KiB: closed with 1009.
        big = json.dumps({"type": "telemetry", "seq": 2, "readings": [reading(devs[0])],
                          "pad": "x" * 70000})
        self.assertGreater(len(big), 65536)
        await self.send_expect_close(gw, big, 1009, "a %d-byte frame" % len(big))
        self.assertEqual(sum(self.xlen(d) for d in devs), n, "the oversized frame must not be stored")
        hub.check_alive()

    async def test_frame_size_configured_and_fragmented(self):
        hub = self.start_hub(self.redis, extra=["--max-frame-bytes", "4096"])
        gw, devs = await self.gw_devs(hub, 1)
        ok = self.frame_of_size(devs, 4000)
        text = json.dumps(ok)
        # Sent as 8 fragments: the hub must reassemble them.
        parts = [text[i:i + 512] for i in range(0, len(text), 512)]
        await gw.ws.send(parts)
        rep = await gw.reply_for(1)
        self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", len(ok["readings"])), rep)
        big = json.dumps({"type": "telemetry", "seq": 2, "readings": [reading(devs[0])], "pad": "x" * 5000})
        await self.send_expect_close(gw, [big[i:i + 1000] for i in range(0, len(big), 1000)], 1009,
                                     "a fragmented %d-byte message over --max-frame-bytes 4096" % len(big))
        # A fresh connection works after that.
        gw2, devs2 = await self.gw_devs(hub, 1)
        rep = await gw2.telemetry(1, [reading(devs2[0])])
        self.assertEqual(rep.get("type"), "ack", rep)

    async def test_device_rate_limit(self):
        hub = self.start_hub(self.redis, extra=["--device-rate", "5", "--device-burst", "10"])
        gw, (d, d2) = await self.gw_devs(hub, 2)
        readings = [reading(d, float(i)) for i in range(15)] + [reading(d2, 50.0) for _ in range(5)]
        rep = await gw.telemetry(1, readings)
        self.assertEqual(rep.get("type"), "ack", rep)
        acc = rep.get("accepted")
        self.assertTrue(15 <= acc <= 16, "device burst 10 (+5 for another device): accepted %r" % acc)
        rejected = rep.get("rejected", [])
        self.assertEqual(len(rejected), 20 - acc, rep)
        for r in rejected:
            self.assertEqual((r.get("code"), r.get("device")), ("rate_limited", d), r)
            self.assertGreaterEqual(r.get("index"), 10, r)
            ra = r.get("retry_after_ms")
            self.assertTrue(isinstance(ra, int) and 0 < ra <= 5000,
                            "rate_limited without a sane retry_after_ms: %r" % r)
        self.assertEqual(self.xlen(d), acc - 5)
        self.assertEqual(self.xlen(d2), 5)
        # The bucket refills at 5/s: a reading is accepted again within about 200 ms.
        t0 = time.monotonic()
        seq = 2
        while True:
            rep = await gw.telemetry(seq, [reading(d, 1.0)])
            seq += 1
            if rep.get("accepted") == 1:
                break
            self.assertEqual(rep["rejected"][0].get("code"), "rate_limited", rep)
            self.assertLess(time.monotonic() - t0, 3, "bucket did not refill within 3 s at 5/s")
            await asyncio.sleep(min(0.1, rep["rejected"][0].get("retry_after_ms", 100) / 1000))

    async def test_gateway_rate_limit(self):
        hub = self.start_hub(self.redis, extra=["--gateway-rate", "10", "--gateway-burst", "20"])
        gw, devs = await self.gw_devs(hub, 5)
        readings = [reading(devs[i % 5], float(i)) for i in range(30)]
        rep = await gw.telemetry(1, readings)
        self.assertEqual(rep.get("type"), "ack", rep)
        acc = rep.get("accepted")
        self.assertTrue(20 <= acc <= 21, "gateway burst 20: accepted %r" % acc)
        self.assertEqual(len(rep.get("rejected", [])), 30 - acc, rep)
        for r in rep["rejected"]:
            self.assertEqual(r.get("code"), "rate_limited", r)
            self.assertIsInstance(r.get("retry_after_ms"), int, r)
        self.assertEqual(sorted(r["index"] for r in rep["rejected"]), list(range(acc, 30)), rep)
        self.assertEqual(sum(self.xlen(d) for d in devs), acc)

    async def test_clock_skew_configured(self):
        hub = self.start_hub(self.redis, extra=["--clock-skew-future-s", "10", "--clock-skew-past-s", "60"])
        gw, (d,) = await self.gw_devs(hub, 1)
        now = now_ms()
        rep = await gw.telemetry(1, [reading(d, 1.0, ts=now + 30000), reading(d, 2.0, ts=now + 5000),
                                     reading(d, 3.0, ts=now - 120000), reading(d, 4.0, ts=now - 30000)])
        self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", 2), rep)
        self.assertEqual([(r.get("index"), r.get("code")) for r in rep.get("rejected", [])],
                         [(0, "clock_skew"), (2, "clock_skew")], rep)

    async def test_max_readings_per_frame(self):
        hub = self.start_hub(self.redis, extra=["--max-readings-per-frame", "10"])
        gw, (d,) = await self.gw_devs(hub, 1)
        rep = await gw.telemetry(1, [reading(d, float(i)) for i in range(10)])
        self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", 10), rep)
        rep = await gw.telemetry(2, [reading(d, float(i)) for i in range(11)])
        if rep.get("type") == "error":
            self.assertEqual(rep.get("code"), "bad_message", rep)
        else:
            self.assertEqual(rep.get("type"), "ack", rep)
            self.assertLessEqual(rep.get("accepted"), 10, rep)
            self.assertEqual(rep.get("accepted") + len(rep.get("rejected", [])), 11, rep)
        self.assertLessEqual(self.xlen(d) - 10, 10, "more than 10 readings of one frame stored")
        if rep.get("type") == "error":
            self.assertEqual(self.xlen(d), 10, "a refused frame stored readings")
        rep = await gw.telemetry(3, [reading(d)])
        self.assertEqual(rep.get("type"), "ack", "connection unusable after an over-long frame: %r" % rep)

    async def test_inflight_limit_loses_nothing(self):
        hub = self.start_hub(self.redis, extra=["--max-inflight-frames", "2", "--redis-timeout-ms", "10000"])
        gw, (d,) = await self.gw_devs(hub, 1)
        self.redis.pause()
        try:
            for seq in range(1, 21):
                await gw.send({"type": "telemetry", "seq": seq, "readings": [reading(d, float(seq))]})
            early = await gw.collect(0.5)
        finally:
            self.redis.resume()
        self.assertFalse([m for m in early if m.get("type") == "ack"], "acks while Redis stopped: %r" % early)
        for seq in range(1, 21):
            rep = await gw.reply_for(seq, 10)
            self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", 1), "seq %d: %r" % (seq, rep))
        self.assertEqual(sorted(int(f["seq"]) for _, f in self.redis.xrange(rkeys.tm(d))), list(range(1, 21)))

    async def test_takeover(self):
        hub = self.start_hub(self.redis)
        sub = uniq("gw")
        old, (d, marker) = await self.gw_devs(hub, 2, sub=sub)
        rep = await old.telemetry(1, [reading(d, 1.0)])
        self.assertEqual(rep.get("type"), "ack", rep)
        new = await self.gateway(hub, sub=sub)
        code = await old.wait_closed(5)
        self.assertEqual(code, 4001, "old connection closed with %s (reason %r), expected 4001"
                         % (code, old.ws.close_reason))
        rep = await new.announce([(d, "thermostat")])
        self.assertEqual(rep.get("accepted"), [d], rep)
        rep = await new.telemetry(2, [reading(d, 2.0)])
        self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", 1), rep)
        self.assertEqual(self.xlen(d), 2)
        # marker was only on the old connection: it goes offline; d, taken over, stays online.
        wait_until(lambda: self.redis.hgetall(rkeys.dev(marker)).get("online") == "0", 5,
                   what="device of the closed connection going offline")
        h = self.redis.hgetall(rkeys.dev(d))
        self.assertEqual((h.get("online"), h.get("gateway")), ("1", sub),
                         "device re-announced on the new connection: %r" % h)
        # A third connection takes over from the second one in turn.
        third = await self.gateway(hub, sub=sub)
        self.assertEqual(await new.wait_closed(5), 4001)
        rep = await third.announce([(d, "thermostat")])
        self.assertEqual(rep.get("accepted"), [d], rep)

    async def test_quick_reconnect_keeps_the_new_connection(self):
        # A gateway whose connection dropped reconnects at once: the new
        # connection must win, never be "taken over" by the dead one.
        hub = self.start_hub(self.redis)
        for i in range(40):  # the race this catches does not show every time
            sub = uniq("gw")
            tok = self.token(sub)
            st = try_upgrade(hub, tok)[0]  # upgraded, then the socket closes
            self.assertEqual(st, 101)
            for attempt in ("after a raw upgrade", "after a clean close"):
                gw = await connect_gateway(hub, tok)
                try:
                    d = uniq("t")
                    rep = await gw.announce([(d, "thermostat")])
                    self.assertEqual(rep.get("accepted"), [d], rep)
                    rep = await gw.telemetry(1 if attempt.endswith("upgrade") else 2, [reading(d)])
                    self.assertEqual(rep.get("type"), "ack", rep)
                except AssertionError as e:
                    raise AssertionError("round %d, reconnect %s: %s (close code %s, reason %r)"
                                         % (i, attempt, e, gw.close_code, gw.ws.close_reason)) from None
                finally:
                    await gw.close()

    async def test_takeover_does_not_touch_other_gateways(self):
        hub = self.start_hub(self.redis)
        a, (da,) = await self.gw_devs(hub, 1)
        b, (db,) = await self.gw_devs(hub, 1)
        a2 = await self.gateway(hub, sub=a.sub)
        self.assertEqual(await a.wait_closed(5), 4001)
        rep = await b.telemetry(1, [reading(db)])
        self.assertEqual(rep.get("type"), "ack", "another gateway was disturbed by a takeover: %r" % rep)
        self.assertIsNone(b.close_code)
        await a2.close()


if __name__ == "__main__":
    main()
