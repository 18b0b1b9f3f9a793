"""Telemetry ingest (docs/protocol.md "Telemetry"): valid readings stored in iot:tm:{<device>}
and iot:feed, each per-reading rejection with its exact fields and index,
hub-stamped ts, bad_json / bad_message errors that keep the connection."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import HubTestCase, main, now_ms, reading, rkeys, uniq  # noqa: E402

DAY_MS = 86400 * 1000


class Telemetry(HubTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis)

    async def gw_with(self, n=1, types=("thermostat",)):
        """A gateway with n announced thermostats (or the given types)."""
        gw = await self.gateway(self.hub)
        devs = [uniq("t") for _ in range(n)]
        tys = [types[i % len(types)] for i in range(n)]
        rep = await gw.announce(list(zip(devs, tys)))
        self.assertEqual(sorted(rep.get("accepted", [])), sorted(devs), rep)
        return gw, devs

    def stream(self, device):
        return self.redis.xrange(rkeys.tm(device))

    def xlen(self, device):
        return self.redis.xlen(rkeys.tm(device))

    def assert_ack(self, rep, seq, accepted, nrejected=0):
        self.assertEqual(rep.get("type"), "ack", "expected an ack for seq %s, got %r" % (seq, rep))
        self.assertEqual(rep.get("seq"), seq, rep)
        self.assertEqual(rep.get("accepted"), accepted, rep)
        self.assertIsInstance(rep.get("rejected"), list, rep)
        self.assertEqual(len(rep["rejected"]), nrejected, rep)

    def rej(self, rep):
        return [(r.get("index"), r.get("code")) for r in rep.get("rejected", [])]

    async def test_valid_reading_is_stored_before_ack(self):
        gw, (d,) = await self.gw_with()
        feed0 = self.redis.xlen(rkeys.FEED)
        ts = now_ms() - 1000
        rep = await gw.telemetry(1, [{"device": d, "ts": ts, "data": {"temperature": 21.5, "humidity": 40}}])
        self.assert_ack(rep, 1, 1)
        # The ack is only sent once the reading is durable: no polling here.
        entries = self.stream(d)
        self.assertEqual(len(entries), 1, entries)
        f = entries[0][1]
        self.assertEqual(f.get("ts"), str(ts), f)
        self.assertEqual(json.loads(f.get("data", "null")), {"temperature": 21.5, "humidity": 40}, f)
        self.assertEqual(f.get("gw"), gw.sub, f)
        self.assertEqual(f.get("seq"), "1", f)
        self.assertEqual(self.redis.xlen(rkeys.FEED), feed0 + 1, "iot:feed should get one entry per stored frame")
        seqs = self.redis.cmd("ZRANGE", rkeys.gw_seqs(gw.sub), 0, -1, "WITHSCORES")
        self.assertTrue("1" in seqs, "seq 1 not in %s: %r" % (rkeys.gw_seqs(gw.sub), seqs))

    async def test_data_stored_as_written(self):
        # data is stored as the gateway wrote it, compacted: 21.50 keeps its
        # digits, 0.1 is not 0.10000000000000001, escapes stay escapes.
        gw, (d,) = await self.gw_with()
        ts = now_ms()
        await gw.send('{ "type" : "telemetry", "seq" : 7, "readings" : [ { "data" : '
                      '{ "temperature" : 21.50 , "humidity" : 0.1 } , "device" : "%s", "ts" : %d } ] }'
                      % (d, ts))
        rep = await gw.reply_for(7)
        self.assert_ack(rep, 7, 1)
        (eid, f), = self.stream(d)
        self.assertEqual(f.get("data"), '{"temperature":21.50,"humidity":0.1}', f)
        # A key the hub cannot map from the text (escaped) falls back to the
        # parsed object, serialized: the same value.
        await gw.send(json.dumps({"type": "telemetry", "seq": 8, "readings": [
            {"device": d, "ts": ts, "data": {"temperature": 22.25}}]}).replace('"data"', '"d\\u0061ta"'))
        rep = await gw.reply_for(8)
        self.assert_ack(rep, 8, 1)
        entries = self.stream(d)
        self.assertEqual(json.loads(entries[-1][1]["data"]), {"temperature": 22.25}, entries)

    async def test_ts_optional_hub_stamps_arrival(self):
        gw, (d,) = await self.gw_with()
        t0 = now_ms()
        rep = await gw.telemetry(1, [reading(d, 20.0, ts=None)])
        t1 = now_ms()
        self.assert_ack(rep, 1, 1)
        (eid, f), = self.stream(d)
        ts = int(f["ts"])
        self.assertTrue(t0 - 50 <= ts <= t1 + 50, "hub-stamped ts %d not in [%d, %d]" % (ts, t0, t1))

    async def test_invalid_maximum_exact_fields(self):
        gw, (d,) = await self.gw_with()
        rep = await gw.telemetry(1, [reading(d, 130)])
        self.assert_ack(rep, 1, 0, 1)
        r = rep["rejected"][0]
        self.assertEqual({k: r.get(k) for k in ("index", "device", "code", "errors")},
                         {"index": 0, "device": d, "code": "invalid",
                          "errors": [{"path": "data.temperature", "code": "maximum",
                                      "message": "must be <= 125"}]}, rep)
        self.assertEqual(self.xlen(d), 0, "a rejected reading was stored")

    async def test_schema_error_codes(self):
        gw, (d,) = await self.gw_with()
        cases = [
            ({"temperature": 20, "humidity": -1}, "data.humidity", "minimum", "must be >= 0"),
            ({"temperature": -41}, "data.temperature", "minimum", "must be >= -40"),
            ({"temperature": "hot"}, "data.temperature", "type", None),
            ({"temperature": True}, "data.temperature", "type", None),
            ({"humidity": 10}, "data", "required", None),
            ({"temperature": 20, "pressure": 1}, "data", "additionalProperties", None),
            (5, "data", "type", None),
            ([{"temperature": 20}], "data", "type", None),
        ]
        readings = [{"device": d, "ts": now_ms(), "data": data} for data, *_ in cases]
        rep = await gw.telemetry(1, readings)
        self.assert_ack(rep, 1, 0, len(cases))
        by_index = {r.get("index"): r for r in rep["rejected"]}
        for i, (data, path, code, message) in enumerate(cases):
            r = by_index.get(i)
            self.assertIsNotNone(r, "reading %d (%r) not rejected: %r" % (i, data, rep))
            self.assertEqual((r.get("device"), r.get("code")), (d, "invalid"), r)
            errs = r.get("errors")
            self.assertTrue(isinstance(errs, list) and errs, "no errors for %r: %r" % (data, r))
            e = errs[0]
            self.assertEqual(e.get("code"), code, "data %r: %r" % (data, r))
            self.assertTrue(str(e.get("path", "")).startswith(path),
                            "data %r: path %r should start with %r" % (data, e.get("path"), path))
            self.assertIsInstance(e.get("message"), str, r)
            if message:
                self.assertEqual(e.get("message"), message, r)
        self.assertEqual(self.xlen(d), 0)

    async def test_mixed_frame_indexes(self):
        gw, (d1, d2) = await self.gw_with(2)
        stranger = uniq("t")  # authorized by the token's pattern, never announced
        now = now_ms()
        readings = [
            reading(d1, 20.0, ts=now - 5),
            reading(d1, 200.0, ts=now - 4),
            reading(stranger, 20.0, ts=now - 3),
            reading(d2, 22.0, ts=now - 2),
            reading(d1, 21.0, ts=now + 3600 * 1000),
            reading(d1, 23.0, ts=now - 1),
        ]
        rep = await gw.telemetry(7, readings)
        self.assert_ack(rep, 7, 3, 3)
        self.assertEqual(self.rej(rep), [(1, "invalid"), (2, "unknown_device"), (4, "clock_skew")], rep)
        self.assertEqual([r.get("device") for r in rep["rejected"]], [d1, stranger, d1], rep)
        self.assertEqual([json.loads(f["data"])["temperature"] for _, f in self.stream(d1)], [20.0, 23.0])
        self.assertEqual([json.loads(f["data"])["temperature"] for _, f in self.stream(d2)], [22.0])
        self.assertEqual(self.xlen(stranger), 0)

    async def test_unknown_device(self):
        gw, (d,) = await self.gw_with()
        other, (od,) = await self.gw_with()  # announced on another connection
        fresh = uniq("t")
        rep = await gw.telemetry(1, [reading(fresh), reading(od), reading(d)])
        self.assert_ack(rep, 1, 1, 2)
        self.assertEqual(self.rej(rep), [(0, "unknown_device"), (1, "unknown_device")], rep)
        self.assertEqual(self.xlen(od), 0, "a reading for another connection's device was stored")

    async def test_device_outside_token_patterns(self):
        gw, (d,) = await self.gw_with()
        rep = await gw.telemetry(1, [reading("x-%s" % d), reading(d)])
        self.assert_ack(rep, 1, 1, 1)
        self.assertEqual(rep["rejected"][0].get("index"), 0, rep)
        self.assertIn(rep["rejected"][0].get("code"), ("unknown_device", "unauthorized_device"), rep)

    async def test_clock_skew(self):
        gw, (d,) = await self.gw_with()
        now = now_ms()
        readings = [
            reading(d, 1.0, ts=now + 600 * 1000),       # 10 min ahead (limit 300 s)
            reading(d, 2.0, ts=now - 8 * DAY_MS),       # 8 days old (limit 7 days)
            reading(d, 3.0, ts=now + 200 * 1000),       # within
            reading(d, 4.0, ts=now - 6 * DAY_MS),       # within
            reading(d, 5.0, ts=0),                      # 1970
            reading(d, 6.0, ts=now * 1000),             # microseconds by mistake
        ]
        rep = await gw.telemetry(1, readings)
        self.assert_ack(rep, 1, 2, 4)
        self.assertEqual(self.rej(rep), [(0, "clock_skew"), (1, "clock_skew"), (4, "clock_skew"),
                                         (5, "clock_skew")], rep)
        self.assertEqual(sorted(json.loads(f["data"])["temperature"] for _, f in self.stream(d)), [3.0, 4.0])

    async def test_reading_shape_errors(self):
        gw, (d,) = await self.gw_with()
        readings = [
            {"ts": now_ms(), "data": {"temperature": 1}},          # no device
            {"device": 17, "data": {"temperature": 1}},            # device not a string
            "t-1",                                                  # not an object
            {"device": d},                                          # no data
            {"device": d, "ts": "1732345678123", "data": {"temperature": 1}},  # ts a string
            {"device": d, "ts": now_ms() + 0.5, "data": {"temperature": 1}},  # ts not an integer
            {"device": d, "data": {"temperature": 2}},             # fine
        ]
        rep = await gw.telemetry(3, readings)
        self.assert_ack(rep, 3, 1, 6)
        self.assertEqual(self.rej(rep), [(i, "invalid") for i in range(6)], rep)
        self.assertEqual(self.xlen(d), 1)

    async def test_many_readings_many_devices(self):
        gw, devs = await self.gw_with(5, types=("thermostat",))
        readings = [reading(devs[i % 5], float(i % 100), ts=now_ms() - 1000 + i) for i in range(500)]
        rep = await gw.telemetry(1, readings, timeout=10)
        self.assert_ack(rep, 1, 500)
        for i, d in enumerate(devs):
            temps = [json.loads(f["data"])["temperature"] for _, f in self.stream(d)]
            self.assertEqual(temps, [float(j % 100) for j in range(i, 500, 5)], "stream of %s" % d)

    async def test_frames_in_flight(self):
        gw, (d,) = await self.gw_with()
        for seq in range(1, 21):
            await gw.send({"type": "telemetry", "seq": seq, "readings": [reading(d, float(seq))]})
        reps = [await gw.reply_for(seq, 10) for seq in range(1, 21)]
        for seq, rep in zip(range(1, 21), reps):
            self.assert_ack(rep, seq, 1)
        self.assertEqual(self.xlen(d), 20)
        self.assertEqual(sorted(int(f["seq"]) for _, f in self.stream(d)), list(range(1, 21)))

    async def test_bad_json_keeps_connection(self):
        gw, (d,) = await self.gw_with()
        for bad in ('{"type":"telemetry","seq":1,', "not json", "[1,2]", "42", '"telemetry"', ""):
            await gw.send(bad)
            m = await gw.wait_for(lambda m: m.get("type") == "error", 5, "error for %r" % bad)
            self.assertEqual(m.get("code"), "bad_json", "frame %r: %r" % (bad, m))
            self.assertIsInstance(m.get("message"), str, m)
        rep = await gw.telemetry(2, [reading(d)])
        self.assert_ack(rep, 2, 1)

    async def test_bad_message(self):
        gw, (d,) = await self.gw_with()
        cases = [
            ({"type": "bogus"}, None),
            ({"seq": 1, "readings": []}, None),
            ({"type": 5}, None),
            ({"type": "telemetry", "seq": 7}, 7),
            ({"type": "telemetry", "seq": 8, "readings": "x"}, 8),
            ({"type": "telemetry", "seq": 9, "readings": {"device": d}}, 9),
            ({"type": "telemetry", "readings": [reading(d)]}, None),
            ({"type": "telemetry", "seq": "10", "readings": [reading(d)]}, None),
            ({"type": "telemetry", "seq": 1.5, "readings": [reading(d)]}, None),
            ({"type": "telemetry", "seq": -1, "readings": [reading(d)]}, None),
        ]
        for msg, seq in cases:
            await gw.send(msg)
            m = await gw.wait_for(lambda m: m.get("type") in ("error", "ack"), 5, "reply to %r" % msg)
            self.assertEqual((m.get("type"), m.get("code")), ("error", "bad_message"), "%r -> %r" % (msg, m))
            if seq is not None:
                self.assertEqual(m.get("seq"), seq, "error for %r should name seq %s: %r" % (msg, seq, m))
        self.assertEqual(self.xlen(d), 0, "something was stored from a bad message")
        rep = await gw.telemetry(11, [reading(d)])
        self.assert_ack(rep, 11, 1)

    async def test_empty_readings(self):
        gw, (d,) = await self.gw_with()
        await gw.send({"type": "telemetry", "seq": 4, "readings": []})
        m = await gw.reply_for(4)
        # An empty frame is harmless: an ack of 0 or a bad_message naming the seq.
        if m["type"] == "ack":
            self.assert_ack(m, 4, 0)
        else:
            self.assertEqual(m.get("code"), "bad_message", m)

    async def test_unknown_fields_ignored(self):
        gw, (d,) = await self.gw_with()
        rep = await gw.telemetry(1, [dict(reading(d), extra={"a": 1})], timeout=5)
        self.assert_ack(rep, 1, 1)
        await gw.send({"type": "telemetry", "seq": 2, "readings": [reading(d)], "note": "x", "v": [1, 2]})
        self.assert_ack(await gw.reply_for(2), 2, 1)


if __name__ == "__main__":
    main()
