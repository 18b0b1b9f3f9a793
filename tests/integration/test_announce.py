"""Device announce (docs/protocol.md "Announce"): accepted devices, each rejection code, the
registry in Redis (iot:dev:{<device>}, iot:devices) and presence after a
disconnect."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import HubTestCase, main, now_ms, rkeys, uniq, wait_until  # noqa: E402


class Announce(HubTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis)

    def dev(self, prefix="t"):
        return uniq(prefix)

    def rejected_codes(self, rep):
        return {r.get("device"): r.get("code") for r in rep.get("rejected", [])}

    def assert_announced_shape(self, rep):
        self.assertEqual(rep.get("type"), "announced", rep)
        self.assertIsInstance(rep.get("accepted"), list, rep)
        self.assertIsInstance(rep.get("rejected"), list, rep)
        for r in rep["rejected"]:
            self.assertIsInstance(r.get("code"), str, r)
            self.assertIsInstance(r.get("message"), str, "rejection without a message: %r" % r)

    def wait_online(self, device, want, timeout=5):
        return wait_until(lambda: self.redis.hgetall(rkeys.dev(device)).get("online") == want,
                          timeout, what="%s online == %r (now %r)" % (
                              rkeys.dev(device), want, self.redis.hgetall(rkeys.dev(device))))

    async def test_accepted_and_registry(self):
        d = self.dev()
        labels = {"site": "b1", "region": "eu"}
        t0 = now_ms()
        gw = await self.gateway(self.hub)
        rep = await gw.announce([(d, "thermostat", labels)])
        t1 = now_ms()
        self.assert_announced_shape(rep)
        self.assertEqual(rep["accepted"], [d], rep)
        self.assertEqual(rep["rejected"], [], rep)
        h = self.redis.hgetall(rkeys.dev(d))
        self.assertEqual(h.get("type"), "thermostat", h)
        self.assertEqual(json.loads(h.get("labels", "null")), labels, h)
        self.assertEqual(h.get("gateway"), gw.sub, h)
        self.assertEqual(h.get("online"), "1", h)
        self.assertIn("last_seen", h, h)
        ls = int(h["last_seen"])
        self.assertTrue(t0 - 1000 <= ls <= t1 + 1000, "last_seen %d not in [%d, %d]" % (ls, t0, t1))
        self.assertEqual(self.redis.cmd("SISMEMBER", rkeys.devices(d), d), 1, "device not in its index")

    async def test_several_types_and_no_labels(self):
        ds = [(self.dev(), "thermostat"), (self.dev(), "power-meter"), (self.dev(), "door-sensor")]
        gw = await self.gateway(self.hub)
        rep = await gw.announce(ds)
        self.assert_announced_shape(rep)
        self.assertEqual(sorted(rep["accepted"]), sorted(d for d, _ in ds), rep)
        for d, t in ds:
            h = self.redis.hgetall(rkeys.dev(d))
            self.assertEqual(h.get("type"), t, h)
            self.assertEqual(h.get("online"), "1", h)
            self.assertIn(json.loads(h.get("labels", "{}")), ({}, None), h)

    async def test_id_charset_and_length(self):
        ok = ["t-A.b_c:9-Z", "t-" + "x" * 126]  # 128 chars
        bad = ["t-a b", "t-" + "x" * 127, "t-a/b", "t-\u00fc", "t-a\nb", "t-a*"]
        gw = await self.gateway(self.hub, devices=["t-*"])
        rep = await gw.announce([(d, "thermostat") for d in ok + bad])
        self.assert_announced_shape(rep)
        self.assertEqual(sorted(rep["accepted"]), sorted(ok), rep)
        codes = self.rejected_codes(rep)
        self.assertEqual(len(rep["rejected"]), len(bad), rep)
        for d in bad:
            self.assertEqual(codes.get(d), "invalid", "id %r: %r" % (d, rep))
        for d in bad:
            self.assertEqual(self.redis.cmd("EXISTS", rkeys.dev(d)), 0, "registry entry for bad id %r" % d)

    async def test_unauthorized_device(self):
        gw = await self.gateway(self.hub, devices=["t-*", "e-1"])
        x = self.dev("x")
        rep = await gw.announce([(x, "thermostat"), ("xt-1", "thermostat"), ("e-10", "thermostat"),
                                 ("e-1", "thermostat"), ("T-1", "thermostat")])
        self.assert_announced_shape(rep)
        self.assertEqual(rep["accepted"], ["e-1"], rep)
        self.assertEqual(self.rejected_codes(rep), {
            x: "unauthorized_device", "xt-1": "unauthorized_device",
            "e-10": "unauthorized_device", "T-1": "unauthorized_device"}, rep)
        self.assertEqual(self.redis.cmd("EXISTS", rkeys.dev(x)), 0)
        self.assertEqual(self.redis.cmd("SISMEMBER", rkeys.devices(x), x), 0)

    async def test_star_pattern_allows_all(self):
        gw = await self.gateway(self.hub, devices=["*"])
        a, b = self.dev("any"), self.dev("zz")
        rep = await gw.announce([(a, "thermostat"), (b, "door-sensor")])
        self.assertEqual(sorted(rep.get("accepted", [])), sorted([a, b]), rep)

    async def test_unknown_device_type(self):
        gw = await self.gateway(self.hub)
        d = self.dev()
        rep = await gw.announce([(d, "toaster")])
        self.assert_announced_shape(rep)
        self.assertEqual(rep["accepted"], [], rep)
        self.assertEqual(self.rejected_codes(rep), {d: "unknown_device_type"}, rep)
        self.assertEqual(self.redis.cmd("EXISTS", rkeys.dev(d)), 0)

    async def test_invalid_labels_and_fields(self):
        gw = await self.gateway(self.hub)
        cases = {
            self.dev(): {"device_type": "thermostat", "labels": [1]},
            self.dev(): {"device_type": "thermostat", "labels": {"site": 1}},
            self.dev(): {"device_type": "thermostat", "labels": "site=b1"},
            self.dev(): {"device_type": "thermostat", "labels": {"site": {"x": "y"}}},
            self.dev(): {},                              # no device_type
            self.dev(): {"device_type": 7},
        }
        entries = [dict(device=d, **e) for d, e in cases.items()]
        rep = await gw.announce(entries)
        self.assert_announced_shape(rep)
        self.assertEqual(rep["accepted"], [], rep)
        self.assertEqual(self.rejected_codes(rep), {d: "invalid" for d in cases}, rep)

    async def test_entries_without_a_device(self):
        gw = await self.gateway(self.hub)
        good = self.dev()
        rep = await gw.announce([{"device_type": "thermostat"}, "t-1", 42,
                                 {"device": 5, "device_type": "thermostat"},
                                 {"device": good, "device_type": "thermostat"}])
        self.assert_announced_shape(rep)
        self.assertEqual(rep["accepted"], [good], rep)
        self.assertEqual(len(rep["rejected"]), 4, rep)
        self.assertTrue(all(r.get("code") == "invalid" for r in rep["rejected"]), rep)

    async def test_mixed_announce(self):
        gw = await self.gateway(self.hub, devices=["t-*"])
        ok1, ok2, unk, inv = self.dev(), self.dev(), self.dev(), self.dev()
        x = self.dev("x")
        rep = await gw.announce([
            {"device": ok1, "device_type": "thermostat", "labels": {"site": "b1"}},
            {"device": x, "device_type": "thermostat"},
            {"device": unk, "device_type": "nope"},
            {"device": inv, "device_type": "thermostat", "labels": [1]},
            {"device": ok2, "device_type": "door-sensor"},
        ])
        self.assert_announced_shape(rep)
        self.assertEqual(sorted(rep["accepted"]), sorted([ok1, ok2]), rep)
        self.assertEqual(self.rejected_codes(rep), {x: "unauthorized_device", unk: "unknown_device_type",
                                                    inv: "invalid"}, rep)

    async def test_bad_announce_messages_keep_connection(self):
        gw = await self.gateway(self.hub)
        for msg in ({"type": "announce"}, {"type": "announce", "devices": "t-1"},
                    {"type": "announce", "devices": {"device": "t-1"}}):
            await gw.send(msg)
            m = await gw.wait_for(lambda m: m.get("type") in ("error", "announced"), 5, "reply to %r" % msg)
            self.assertEqual(m.get("type"), "error", "reply to %r: %r" % (msg, m))
            self.assertEqual(m.get("code"), "bad_message", "reply to %r: %r" % (msg, m))
        d = self.dev()
        rep = await gw.announce([(d, "thermostat")])
        self.assertEqual(rep.get("accepted"), [d], rep)

    async def test_empty_announce(self):
        gw = await self.gateway(self.hub)
        await gw.send({"type": "announce", "devices": []})
        m = await gw.wait_for(lambda m: m.get("type") in ("error", "announced"), 5, "reply to empty announce")
        # Either an empty announced or a bad_message error is sensible; never silence or a crash.
        if m["type"] == "announced":
            self.assertEqual((m.get("accepted"), m.get("rejected")), ([], []), m)
        else:
            self.assertEqual(m.get("code"), "bad_message", m)

    async def test_reannounce_updates_labels(self):
        d = self.dev()
        gw = await self.gateway(self.hub)
        await gw.announce([(d, "thermostat", {"site": "b1"})])
        rep = await gw.announce([(d, "thermostat", {"site": "b2", "floor": "3"})])
        self.assertEqual(rep.get("accepted"), [d], rep)
        h = self.redis.hgetall(rkeys.dev(d))
        self.assertEqual(json.loads(h["labels"]), {"site": "b2", "floor": "3"}, h)
        self.assertEqual(h.get("online"), "1", h)

    async def test_offline_after_disconnect(self):
        d1, d2 = self.dev(), self.dev()
        gw = await self.gateway(self.hub)
        rep = await gw.announce([(d1, "thermostat"), (d2, "door-sensor")])
        self.assertEqual(sorted(rep.get("accepted", [])), sorted([d1, d2]), rep)
        self.assertEqual(self.redis.hgetall(rkeys.dev(d1)).get("online"), "1")
        t0 = now_ms()
        await gw.close()
        self.wait_online(d1, "0")
        self.wait_online(d2, "0")
        h = self.redis.hgetall(rkeys.dev(d1))
        self.assertEqual(h.get("type"), "thermostat", "registry entry kept after disconnect: %r" % h)
        self.assertEqual(self.redis.cmd("SISMEMBER", rkeys.devices(d1), d1), 1)
        self.assertGreaterEqual(int(h.get("last_seen", 0)), t0 - 5000, h)

    async def test_online_again_after_reconnect(self):
        d = self.dev()
        sub = uniq("gw")
        gw = await self.gateway(self.hub, sub=sub)
        await gw.announce([(d, "thermostat")])
        await gw.close()
        self.wait_online(d, "0")
        gw2 = await self.gateway(self.hub, sub=sub)
        rep = await gw2.announce([(d, "thermostat")])
        self.assertEqual(rep.get("accepted"), [d], rep)
        self.assertEqual(self.redis.hgetall(rkeys.dev(d)).get("online"), "1")

    async def test_device_moved_to_other_gateway_stays_online(self):
        d, marker = self.dev(), self.dev()
        g1 = await self.gateway(self.hub)
        g2 = await self.gateway(self.hub)
        self.assertEqual(sorted((await g1.announce([(d, "thermostat"), (marker, "thermostat")]))["accepted"]),
                         sorted([d, marker]))
        self.assertEqual((await g2.announce([(d, "thermostat")]))["accepted"], [d])
        h = self.redis.hgetall(rkeys.dev(d))
        self.assertEqual((h.get("gateway"), h.get("online")), (g2.sub, "1"), h)
        await g1.close()
        # marker lived only on g1: once it is offline the hub has handled g1's close.
        self.wait_online(marker, "0")
        h = self.redis.hgetall(rkeys.dev(d))
        self.assertEqual((h.get("gateway"), h.get("online")), (g2.sub, "1"),
                         "device taken over by another gateway went offline with the old one: %r" % h)


if __name__ == "__main__":
    main()
