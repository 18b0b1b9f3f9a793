"""Operator read API (docs/protocol.md "Devices and telemetry"): GET /v1/devices
with filters, GET /v1/devices/{device} with its last reading, and
GET /v1/devices/{device}/telemetry as json (limit/next), ndjson and csv
(chunked, paged from Redis as the client reads). API keys with scopes and
device patterns, JSON errors, 422 naming the field, 503 while Redis is down,
and bounded hub memory for a 100,000-row export and a client that stalls."""

import asyncio
import csv
import http.client
import io
import json
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (HubTestCase, Resp, api_keys_file, http_get, main, now_ms, reading, rkeys,  # noqa: E402
                     uniq, index_device)

KEYS = {"reader": ("iotk_api_reader_0001", ["telemetry:read"], None),
        "writer": ("iotk_api_writer_0002", ["commands:write"], None),
        "admin": ("iotk_api_admin_00003", ["admin"], None),
        "limited": ("iotk_api_limited_004", ["telemetry:read"], ["a-*", "c-1"])}

DAY = 24 * 3600 * 1000


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for pid %d" % pid)


def uses_asan(pid):
    with open("/proc/%d/maps" % pid) as f:
        return "libasan" in f.read()


class APIBase(HubTestCase):
    def get(self, path, key="reader", hub=None, timeout=10):
        headers = {"Authorization": "Bearer " + KEYS[key][0]} if key else None
        return http_get(hub or self.hub, path, headers=headers, timeout=timeout)

    def get_json(self, path, key="reader", status=200):
        st, hdrs, body = self.get(path, key)
        self.assertEqual(st, status, "%s: %s" % (path, body[:500]))
        self.assertTrue(hdrs.get("content-type", "").startswith("application/json"), hdrs)
        return json.loads(body)

    def assert_error(self, path, status, code, field=None, key="reader"):
        st, hdrs, body = self.get(path, key)
        self.assertEqual(st, status, "%s: %s" % (path, body[:300]))
        doc = json.loads(body)
        self.assertEqual(doc["error"]["code"], code, body)
        self.assertIsInstance(doc["error"]["message"], str, body)
        if field is not None:
            self.assertEqual(doc["error"].get("field"), field, "%s: %s" % (path, body))
            self.assertIn(field, doc["error"]["message"], body)
        return doc


class DevicesAndHistory(APIBase):
    """Registry rows and streams written straight into Redis, as docs/streams.md
    lays them out."""

    DEVICES = {  # id: (type, labels, gateway, online, last_seen)
        "a-1": ("thermostat", {"site": "b1", "region": "eu"}, "gw-1", True, 1000),
        "a-2": ("power-meter", {"site": "b2", "region": "eu"}, "gw-1", False, 2000),
        "b-1": ("thermostat", {"site": "b1", "region": "us"}, "gw-2", True, 3000),
        "c-1": ("door-sensor", {}, "gw-3", False, 4000),
    }

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis, extra=["--api-keys", api_keys_file(KEYS)])
        r = cls.redis
        for d, (typ, labels, gw, online, seen) in cls.DEVICES.items():
            r.cmd("HSET", rkeys.dev(d), "type", typ, "labels", json.dumps(labels, sort_keys=True),
                  "gateway", gw, "conn", "x:1", "instance", "x", "online", "1" if online else "0",
                  "last_seen", seen, "announced_at", seen)
            index_device(r, d, typ)
        # a member without a hash (e.g. deleted by hand) is not listed
        index_device(r, "ghost-1")
        # history of a-1: 30 readings 1 s apart (stream id = arrival = ts + 50 ms)
        cls.t0 = now_ms() - 60000
        cls.history = []
        for i in range(30):
            ts = cls.t0 + 1000 * i
            data = {"temperature": 20 + i / 10, "note": 'q"u,o\nte' if i == 3 else "n%d" % i}
            pos = r.cmd("XADD", rkeys.tm("a-1"), "%d-0" % (ts + 50), "ts", ts,
                        "data", json.dumps(data, separators=(",", ":")), "gw", "gw-1", "seq", i)
            cls.history.append({"ts": ts, "data": data, "pos": pos})
        # a-2: 1,200 entries inside the scanned id window but with a ts outside
        # [from, to] (pages that yield nothing), then 2 that match
        c = Resp(r.port, timeout=30)
        try:
            cmds = [Resp.encode(["XADD", rkeys.tm("a-2"), "%d-0" % (cls.t0 + i), "ts", 5, "data", "{}"])
                    for i in range(1200)]
            c.sock.sendall(b"".join(cmds))
            for _ in cmds:
                c._read()
        finally:
            c.close()
        for i in (0, 1):
            r.cmd("XADD", rkeys.tm("a-2"), "%d-0" % (cls.t0 + 2000 + i), "ts", cls.t0 + i, "data", '{"w":%d}' % i)
        # a reading buffered for a long time: far outside the scanned window
        r.cmd("XADD", rkeys.tm("a-1"), "%d-0" % (cls.t0 + 40000), "ts", cls.t0 - 3 * DAY,
              "data", "{}", "gw", "gw-1", "seq", 99)

    def tm(self, device="a-1", **q):
        return "/v1/devices/%s/telemetry?%s" % (device, "&".join("%s=%s" % kv for kv in q.items()))

    # auth

    async def test_auth(self):
        for path in ("/v1/devices", "/v1/devices/a-1", self.tm(**{"from": 0, "to": 1})):
            self.assert_error(path, 401, "unauthorized", key=None)
            st, _, body = http_get(self.hub, path, headers={"Authorization": "Bearer nope"})
            self.assertEqual(st, 401, body)
            self.assert_error(path, 403, "forbidden", key="writer")
            self.assertEqual(self.get(path, "admin")[0], 200, path)
        conn = http.client.HTTPConnection("127.0.0.1", self.hub.port, timeout=5)
        conn.request("POST", "/v1/devices", body=b"{}",
                     headers={"Authorization": "Bearer " + KEYS["reader"][0]})
        self.assertEqual(conn.getresponse().status, 405)
        conn.close()

    # the registry

    async def test_list_all_sorted(self):
        doc = self.get_json("/v1/devices")
        self.assertFalse(doc["truncated"])
        self.assertEqual([d["device"] for d in doc["devices"]], sorted(self.DEVICES))
        a1 = doc["devices"][0]
        self.assertEqual(a1, {"device": "a-1", "device_type": "thermostat",
                              "labels": {"region": "eu", "site": "b1"}, "gateway": "gw-1",
                              "online": True, "last_seen": 1000})

    async def test_list_filters(self):
        def ids(q):
            return [d["device"] for d in self.get_json("/v1/devices?" + q)["devices"]]
        self.assertEqual(ids("device_type=thermostat"), ["a-1", "b-1"])
        self.assertEqual(ids("online=true"), ["a-1", "b-1"])
        self.assertEqual(ids("online=false"), ["a-2", "c-1"])
        self.assertEqual(ids("label.site=b1"), ["a-1", "b-1"])
        self.assertEqual(ids("label.site=b1&label.region=us"), ["b-1"])
        self.assertEqual(ids("device_type=thermostat&label.region=eu&online=true"), ["a-1"])
        self.assertEqual(ids("device_type=no-such-type"), [])
        self.assertEqual(ids("label.nope=x"), [])
        doc = self.get_json("/v1/devices?limit=2")
        self.assertEqual([d["device"] for d in doc["devices"]], ["a-1", "a-2"])
        self.assertTrue(doc["truncated"])
        doc = self.get_json("/v1/devices?limit=4")
        self.assertEqual(len(doc["devices"]), 4)
        self.assertFalse(doc["truncated"])

    async def test_pattern_limited_key(self):
        doc = self.get_json("/v1/devices", key="limited")
        self.assertEqual([d["device"] for d in doc["devices"]], ["a-1", "a-2", "c-1"])
        self.assertEqual(self.get_json("/v1/devices?label.site=b1", key="limited")["devices"][0]["device"], "a-1")
        # outside the patterns: answered like a device that does not exist
        self.assert_error("/v1/devices/b-1", 404, "not_found", key="limited")
        self.assert_error(self.tm("b-1", **{"from": self.t0, "to": self.t0 + 1}), 404, "not_found",
                          key="limited")
        self.assertEqual(self.get_json("/v1/devices/a-1", key="limited")["device"], "a-1")

    async def test_one_device(self):
        doc = self.get_json("/v1/devices/a-1")
        last = self.history[-1]
        self.assertEqual(doc["device"], "a-1")
        self.assertEqual(doc["device_type"], "thermostat")
        self.assertEqual(doc["labels"], {"region": "eu", "site": "b1"})
        self.assertEqual((doc["gateway"], doc["online"], doc["last_seen"]), ("gw-1", True, 1000))
        # the last stored entry (by position) is the long-buffered one
        self.assertEqual(doc["last_reading"]["pos"], "%d-0" % (self.t0 + 40000))
        self.assertEqual(doc["last_reading"]["ts"], self.t0 - 3 * DAY)
        self.assertIsInstance(last, dict)
        doc = self.get_json("/v1/devices/b-1")
        self.assertIsNone(doc["last_reading"])
        self.assertFalse("truncated" in doc)

    async def test_not_found(self):
        for path in ("/v1/devices/nope-1", "/v1/devices/ghost-1",
                     self.tm("nope-1", **{"from": 0, "to": 1}), "/v1/devices/a-1/nothing",
                     "/v1/devices/bad%20id", "/v1/devices/a-1/telemetry/x"):
            self.assert_error(path, 404, "not_found")

    async def test_validation_names_the_field(self):
        f, t = self.t0, self.t0 + 1000
        cases = [
            ("/v1/devices?limit=0", "limit"), ("/v1/devices?limit=1001", "limit"),
            ("/v1/devices?limit=ten", "limit"), ("/v1/devices?online=yes", "online"),
            ("/v1/devices?device_type=bad%20type", "device_type"),
            ("/v1/devices?label.=x", "label."),
            (self.tm(to=t), "from"), (self.tm(**{"from": f}), "to"),
            (self.tm(**{"from": "abc", "to": t}), "from"), (self.tm(**{"from": f, "to": "1.5"}), "to"),
            (self.tm(**{"from": -5, "to": t}), "from"),
            (self.tm(**{"from": f, "to": f - 1}), "to"),
            (self.tm(**{"from": f, "to": f + 31 * DAY + 1}), "to"),
            (self.tm(**{"from": f, "to": t, "format": "xml"}), "format"),
            (self.tm(**{"from": f, "to": t, "limit": 0}), "limit"),
            (self.tm(**{"from": f, "to": t, "limit": 100001}), "limit"),
            (self.tm(**{"from": f, "to": t, "after": "nope"}), "after"),
        ]
        for path, field in cases:
            self.assert_error(path, 422, "invalid", field)
        # exactly 31 days is allowed, and a big limit for a stream
        self.get_json(self.tm(**{"from": f, "to": f + 31 * DAY}))
        st, _, _ = self.get(self.tm(**{"from": f, "to": t, "format": "ndjson", "limit": 1000000}))
        self.assertEqual(st, 200)

    async def test_numbers_and_positions_422(self):
        """Every numeric or position parameter refuses overflow, negatives,
        junk and empty values with 422 naming it (never a 500 from Redis)."""
        f, t = self.t0, self.t0 + 1000
        big = "99999999999999999999"
        junk = [big, "-" + big, "%205", "5%20", "+5", "0x10", "1e3", "5.0", "5-", "", "-"]
        cases = [("/v1/devices?limit=%s" % v, "limit") for v in junk + ["-1"]]
        for name in ("from", "to"):
            for v in junk + ["-1", "9223372036854775807"]:
                q = {"from": f, "to": t}
                q[name] = v
                cases.append((self.tm(**q), name))
        for fmt in ("json", "ndjson", "csv"):
            cases += [(self.tm(**{"from": f, "to": t, "format": fmt, "limit": v}), "limit")
                      for v in junk + ["-1"]]
        for v in [big + "-" + big, big + "-0", "0-" + big, "18446744073709551616-0",
                  "0-18446744073709551616", "-1-0", "1--1", "1-2-3", "1-", "-1", "12", "",
                  "%201-0", "1-0%20", "+1-0", "1-+0", "0x1-0", "1.0-0", "a-b"]:
            cases.append((self.tm(**{"from": f, "to": t, "after": v}), "after"))
        cases += [("/v1/devices?limit", "limit"), (self.tm(**{"to": t}) + "&from", "from"),
                  (self.tm(**{"from": f, "to": t}) + "&after", "after")]
        for path, field in cases:
            self.assert_error(path, 422, "invalid", field)
        # The largest positions are valid: nothing comes after them.
        h = self.history
        for after in ("18446744073709551615-18446744073709551615", "18446744073709551615-0",
                      "%d-18446744073709551615" % (h[24]["ts"] + 50)):
            doc = self.get_json(self.tm(**{"from": h[5]["ts"], "to": h[24]["ts"], "after": after}))
            self.assertEqual((doc["readings"], doc["next"]), ([], None), after)
        # Leading zeros are still the number.
        doc = self.get_json(self.tm(**{"from": "000%d" % h[5]["ts"], "to": h[6]["ts"],
                                       "after": "0" + h[5]["pos"]}))
        self.assertEqual(doc["readings"], h[6:7])

    # history

    async def test_json_limit_and_next(self):
        h = self.history
        frm, to = h[5]["ts"], h[24]["ts"]
        got, after, pages = [], None, 0
        while True:
            q = {"from": frm, "to": to, "limit": 7}
            if after:
                q["after"] = after
            doc = self.get_json(self.tm(**q))
            self.assertEqual(doc["device"], "a-1")
            self.assertLessEqual(len(doc["readings"]), 7)
            got.extend(doc["readings"])
            pages += 1
            after = doc["next"]
            if after is None:
                break
            self.assertEqual(after, doc["readings"][-1]["pos"])
            self.assertLess(pages, 10)
        self.assertEqual(got, h[5:25])
        self.assertEqual(pages, 3)
        doc = self.get_json(self.tm(**{"from": frm, "to": to}))
        self.assertEqual(doc["readings"], h[5:25])
        self.assertIsNone(doc["next"])
        # a range with nothing in it
        doc = self.get_json(self.tm(**{"from": self.t0 - 10 * DAY, "to": self.t0 - 9 * DAY}))
        self.assertEqual((doc["readings"], doc["next"]), ([], None))

    async def test_ndjson(self):
        h = self.history
        st, hdrs, body = self.get(self.tm(**{"from": h[0]["ts"], "to": h[-1]["ts"], "format": "ndjson"}))
        self.assertEqual(st, 200, body)
        self.assertEqual(hdrs.get("content-type"), "application/x-ndjson")
        self.assertEqual(hdrs.get("transfer-encoding"), "chunked")
        self.assertTrue(body.endswith("\n"))
        self.assertEqual([json.loads(l) for l in body.splitlines()], h)
        st, _, body = self.get(self.tm(**{"from": h[0]["ts"], "to": h[-1]["ts"], "format": "ndjson",
                                          "limit": 4}))
        self.assertEqual([json.loads(l) for l in body.splitlines()], h[:4])

    async def test_csv(self):
        h = self.history
        st, hdrs, body = self.get(self.tm(**{"from": h[0]["ts"], "to": h[9]["ts"], "format": "csv"}))
        self.assertEqual(st, 200, body)
        self.assertTrue(hdrs.get("content-type", "").startswith("text/csv"), hdrs)
        rows = list(csv.reader(io.StringIO(body, newline="")))
        self.assertEqual(rows[0], ["ts", "pos", "data"])
        self.assertEqual([(int(r[0]), r[1], json.loads(r[2])) for r in rows[1:]],
                         [(x["ts"], x["pos"], x["data"]) for x in h[:10]])
        self.assertIn('"{""temperature"":20.3,""note"":""q\\""u,o\\nte""}"', body)
        self.assertTrue(body.endswith("\r\n"))
        # nothing in range: the header row only
        st, _, body = self.get(self.tm(**{"from": 1, "to": 2, "format": "csv"}))
        self.assertEqual((st, body), (200, "ts,pos,data\r\n"))

    async def test_pages_without_matches(self):
        """Whole XRANGE pages outside [from, to] neither stall a stream nor end it early."""
        q = {"from": self.t0, "to": self.t0 + 1}
        self.assertEqual(self.get_json(self.tm("a-2", **q))["readings"],
                         [{"ts": self.t0 + i, "data": {"w": i}, "pos": "%d-0" % (self.t0 + 2000 + i)}
                          for i in (0, 1)])
        st, _, body = self.get(self.tm("a-2", format="ndjson", **q))
        self.assertEqual((st, [json.loads(l)["data"]["w"] for l in body.splitlines()]), (200, [0, 1]))
        st, _, body = self.get(self.tm("a-2", format="csv", **q))
        self.assertEqual((st, len(body.splitlines())), (200, 3))

    async def test_keep_alive_reuse(self):
        """Several API answers (sized and chunked) on one connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.hub.port, timeout=5)
        hdr = {"Authorization": "Bearer " + KEYS["reader"][0]}
        h = self.history
        for path in ("/v1/devices", self.tm(**{"from": h[0]["ts"], "to": h[-1]["ts"], "format": "ndjson"}),
                     "/v1/devices/a-1", self.tm(**{"from": h[0]["ts"], "to": h[-1]["ts"], "format": "csv"}),
                     "/v1/devices/nope-2", "/healthz"):
            conn.request("GET", path, headers=hdr)
            r = conn.getresponse()
            body = r.read()
            self.assertIn(r.status, (200, 404), path)
            self.assertTrue(body, path)
        conn.close()


class RealGateway(APIBase):
    """What the hub itself writes (announce, telemetry) reads back through the API."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis, extra=["--api-keys", api_keys_file(KEYS)])

    async def test_announce_then_read(self):
        gw = await self.gateway(self.hub)
        d = uniq("t")
        rep = await gw.announce([(d, "thermostat", {"site": "s9"})])
        self.assertEqual(rep["accepted"], [d])
        t = now_ms()
        rs = [reading(d, 20.0 + i, ts=t + i) for i in range(5)]
        rep = await gw.telemetry(1, rs)
        self.assertEqual(rep.get("accepted"), 5, rep)
        doc = self.get_json("/v1/devices/" + d)
        self.assertEqual((doc["device_type"], doc["labels"], doc["gateway"], doc["online"]),
                         ("thermostat", {"site": "s9"}, gw.sub, True))
        self.assertEqual((doc["last_reading"]["ts"], doc["last_reading"]["data"]), (t + 4, {"temperature": 24.0}))
        doc = self.get_json("/v1/devices/%s/telemetry?from=%d&to=%d" % (d, t, t + 4))
        self.assertEqual([(r["ts"], r["data"]["temperature"]) for r in doc["readings"]],
                         [(t + i, 20.0 + i) for i in range(5)])
        lst = self.get_json("/v1/devices?label.site=s9")["devices"]
        self.assertEqual([x["device"] for x in lst], [d])
        await gw.close()

        def offline():
            return self.get_json("/v1/devices/" + d)["online"] is False
        deadline = time.monotonic() + 5
        while not offline():
            self.assertLess(time.monotonic(), deadline, "device still online after its gateway left")
            await asyncio.sleep(0.05)


class RedisDown(APIBase):
    async def test_503_while_redis_down(self):
        redis = self.start_redis()
        hub = self.start_hub(redis, extra=["--api-keys", api_keys_file(KEYS)])
        self.hub = hub
        self.assertEqual(self.get("/v1/devices")[0], 200)
        redis.kill()
        deadline = time.monotonic() + 10
        while http_get(hub, "/readyz")[0] != 503:
            self.assertLess(time.monotonic(), deadline, "/readyz still 200 10 s after Redis died")
            await asyncio.sleep(0.05)
        t = now_ms()
        for path in ("/v1/devices", "/v1/devices/a-1",
                     "/v1/devices/a-1/telemetry?from=%d&to=%d" % (t - 1000, t),
                     "/v1/devices/a-1/telemetry?from=%d&to=%d&format=ndjson" % (t - 1000, t)):
            self.assert_error(path, 503, "unavailable")
        redis.restart()
        deadline = time.monotonic() + 15
        while self.get("/v1/devices")[0] != 200:
            self.assertLess(time.monotonic(), deadline, "API not back 15 s after Redis returned")
            await asyncio.sleep(0.1)
        hub.stop()


class RedisDiesMidExport(APIBase):
    async def test_truncated_not_short(self):
        """Redis lost during a streamed export: the client sees an incomplete
        chunked transfer (no terminating chunk), never a clean short answer."""
        redis = self.start_redis()
        hub = self.start_hub(redis, extra=["--api-keys", api_keys_file(KEYS)])
        self.hub = hub
        redis.cmd("HSET", rkeys.dev("m-1"), "type", "thermostat")
        t0 = now_ms() - 100000
        c = Resp(redis.port, timeout=30)
        try:
            cmds = [Resp.encode(["XADD", rkeys.tm("m-1"), "%d-0" % (t0 + i), "ts", t0 + i,
                                 "data", '{"pad":"%s"}' % ("y" * 400)]) for i in range(30000)]
            c.sock.sendall(b"".join(cmds))
            for _ in cmds:
                c._read()
        finally:
            c.close()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(20)
        sock.connect(("127.0.0.1", hub.port))
        conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=20)
        conn.sock = sock
        conn.request("GET", "/v1/devices/m-1/telemetry?from=%d&to=%d&format=ndjson" % (t0, t0 + 30000),
                     headers={"Authorization": "Bearer " + KEYS["reader"][0]})
        r = conn.getresponse()
        self.assertEqual(r.status, 200)
        first = r.read(100)
        self.assertTrue(first.startswith(b'{"ts":'), first)
        redis.kill()
        with self.assertRaises(http.client.IncompleteRead):
            r.read()
        conn.close()
        hub.check_alive()
        hub.stop()


class BigExport(APIBase):
    """100,000 readings of ~350 bytes (~35 MB of ndjson) stream out while the
    hub's RSS stays within a bound well under the export's size."""

    ROWS = 100000
    PAD = "x" * 300
    GROWTH_KB = 20 * 1024

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        # A small ASan quarantine, or freed pages count as growth.
        cls.hub = cls.class_hub(cls.redis, extra=["--api-keys", api_keys_file(KEYS),
                                                  "--device-stream-maxlen", 200000],
                                env={"ASAN_OPTIONS": "abort_on_error=0:detect_leaks=1:"
                                                     "quarantine_size_mb=4:malloc_context_size=5"})
        cls.device = "big-1"
        r = cls.redis
        r.cmd("HSET", rkeys.dev("big-1"), "type", "thermostat", "labels", "{}", "online", "0")
        index_device(r, "big-1")
        cls.t0 = now_ms() - 2 * cls.ROWS
        c = Resp(r.port, timeout=60)
        try:
            step = 10000
            for b in range(0, cls.ROWS, step):
                buf = []
                for i in range(b, b + step):
                    ts = cls.t0 + i
                    buf.append(Resp.encode(["XADD", rkeys.tm("big-1"), "%d-0" % ts, "ts", ts, "data",
                                            '{"temperature":%d,"i":%d,"pad":"%s"}' % (i % 100, i, cls.PAD),
                                            "gw", "gw-big", "seq", i]))
                c.sock.sendall(b"".join(buf))
                for _ in range(step):
                    rep = c._read()
                    if not isinstance(rep, str):
                        raise AssertionError("XADD failed: %r" % rep)
        finally:
            c.close()
        assert r.xlen(rkeys.tm("big-1")) == cls.ROWS

    def path(self, fmt="ndjson"):
        return "/v1/devices/%s/telemetry?from=%d&to=%d&format=%s" % (
            self.device, self.t0, self.t0 + self.ROWS, fmt)

    def open_export(self, rcvbuf=None):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(60)
        sock.connect(("127.0.0.1", self.hub.port))
        conn = http.client.HTTPConnection("127.0.0.1", self.hub.port, timeout=60)
        conn.sock = sock
        conn.request("GET", self.path(), headers={"Authorization": "Bearer " + KEYS["reader"][0]})
        return conn

    def read_all_checked(self, conn, sample=None):
        r = conn.getresponse()
        self.assertEqual(r.status, 200)
        self.assertEqual(r.getheader("transfer-encoding"), "chunked")
        n, tail, nbytes = 0, b"", 0
        while True:
            chunk = r.read(256 * 1024)
            if not chunk:
                break
            nbytes += len(chunk)
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            for line in lines:
                doc = json.loads(line)
                if doc["ts"] != self.t0 + n or doc["data"]["i"] != n or doc["pos"] != "%d-0" % (self.t0 + n):
                    raise AssertionError("row %d out of order or wrong: %r" % (n, line[:120]))
                n += 1
            if sample:
                sample()
        self.assertEqual(tail, b"", "export does not end with a newline")
        self.assertEqual(n, self.ROWS)
        return nbytes

    def warm_up(self):
        # one export first, so that allocator arenas and lws buffers exist
        conn = self.open_export()
        self.read_all_checked(conn)
        conn.close()
        return rss_kb(self.hub.pid)

    async def test_100k_ndjson_export_bounded_memory(self):
        base = self.warm_up()
        peak = [base]

        def sample():
            peak[0] = max(peak[0], rss_kb(self.hub.pid))
        t = time.monotonic()
        conn = self.open_export()
        nbytes = self.read_all_checked(conn, sample)
        conn.close()
        took = time.monotonic() - t
        self.assertGreater(nbytes, 30 * 1024 * 1024)
        growth = peak[0] - base
        sys.stderr.write("\n100k-row export: %.1f MB in %.2f s; hub RSS %d kB, peak growth %d kB%s\n" % (
            nbytes / 1e6, took, base, growth, " (ASan)" if uses_asan(self.hub.pid) else ""))
        self.assertLess(growth, self.GROWTH_KB, "hub RSS grew by %d kB during a %d-byte export"
                        % (growth, nbytes))

    async def test_stalled_client_bounded(self):
        base = self.warm_up()
        conn = self.open_export(rcvbuf=4096)
        peak = base
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:  # the client reads nothing for 2 s
            peak = max(peak, rss_kb(self.hub.pid))
            await asyncio.sleep(0.05)
        # meanwhile the hub serves others
        self.assertEqual(http_get(self.hub, "/healthz")[0], 200)
        self.assertEqual(self.get("/v1/devices/big-1")[0], 200)
        growth = peak - base
        sys.stderr.write("\nstalled export: hub RSS %d kB, growth in 2 s %d kB\n" % (base, growth))
        self.assertLess(growth, 8 * 1024, "hub RSS grew by %d kB for a client that reads nothing" % growth)
        # then the client reads: the export resumes and completes correctly
        self.read_all_checked(conn)
        conn.close()

    async def test_concurrent_exports_and_hangups(self):
        """Exports in parallel, half of the clients hanging up midway: the
        others complete, and nothing leaks (ASan) or crashes."""
        errors = []

        def worker(i):
            try:
                path = self.path() + "&limit=20000"
                conn = http.client.HTTPConnection("127.0.0.1", self.hub.port, timeout=30)
                conn.request("GET", path, headers={"Authorization": "Bearer " + KEYS["reader"][0]})
                r = conn.getresponse()
                if r.status != 200:
                    raise AssertionError("status %d" % r.status)
                if i % 2:
                    r.read(1000 * i)
                    conn.close()
                    return
                lines = r.read().splitlines()
                if len(lines) != 20000 or json.loads(lines[-1])["data"]["i"] != 19999:
                    raise AssertionError("worker %d: %d lines" % (i, len(lines)))
                conn.close()
            except Exception as e:  # reported below
                errors.append(e)
        ts = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        self.assertEqual(errors, [])
        self.assertEqual(self.get("/v1/devices/big-1")[0], 200)

    async def test_client_leaves_mid_export(self):
        conn = self.open_export(rcvbuf=4096)
        r = conn.getresponse()
        self.assertEqual(r.status, 200)
        r.read(1000)
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()
        # the hub notices, frees the request and keeps serving
        for _ in range(3):
            self.assertEqual(self.get("/v1/devices/big-1")[0], 200)
        self.hub.check_alive()


if __name__ == "__main__":
    main()
