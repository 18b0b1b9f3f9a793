"""Hostile clients of the newer API routes: GET /v1/whoami, GET
/v1/commands/stats, GET /v1/aggregates, GET /v1/provenance/{key,
checkpoints, chain/{device}} and PUT /v1/devices/{device}/key, driven over
raw sockets against the real hub and Redis.

  - auth: no key, a wrong key, a key without the route's scope, a read-only
    key on the PUT: the documented 401/403 JSON error, and nothing written
    to Redis (the device's stored key is unchanged after a refused PUT);
  - malformed input: bad, missing, duplicated and overlong query parameters,
    ranges past the documented bounds, too many label selectors, overlong
    or undecodable path segments (percent junk, NUL, non-UTF-8), bodies of
    the PUT that are not the documented JSON, too large, chunked or without
    a Content-Length, wrong methods: a 4xx JSON error naming the problem
    (never a 5xx), nothing written to Redis, and the hub keeps answering;
  - slow and partial clients: a request head sent byte by byte, a body that
    never completes, a client that stops reading (then closes) in the
    middle of a multi-megabyte aggregates answer or provenance chain: other
    clients are answered within CONCURRENT_BOUND_S meanwhile, and the hub
    frees the connection.

What the hub cannot answer with JSON (libwebsockets 4.1.6 refuses these in
its own parser, before the hub sees the request: a NUL byte or %00 in the
URL, a malformed %-escape, an unknown method) is pinned too: the connection
is answered with lws's 403 or closed at once, never a 5xx, never a hang."""

import json
import os
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hostile import (SAN_FACTOR, HostileCase, cpu_seconds, http_exchange, main, now_ms, open_fds,  # noqa: E402
                     raw_connect, recv_until_closed, rss_kib, split_responses, uniq, wait_until)
from harness import api_keys_file, connect_gateway, http_request, rkeys  # noqa: E402

ADMIN = "hr-admin-" + "a" * 24
READER = "hr-reader-" + "r" * 24
WRITER = "hr-writer-" + "w" * 24
SREADER = "hr-sreader-" + "s" * 24     # telemetry:read, devices t-*
SADMIN = "hr-sadmin-" + "d" * 24       # admin, devices t-*
KEYS = {
    "hr-admin": (ADMIN, ["admin"]),
    "hr-reader": (READER, ["telemetry:read"]),
    "hr-writer": (WRITER, ["commands:write"]),
    "hr-sreader": (SREADER, ["telemetry:read"], ["t-*"]),
    "hr-sadmin": (SADMIN, ["admin"], ["t-*"]),
}
HEADER_TIMEOUT_S = 3
BODY_TIMEOUT_S = 3
# A normal request answered while another client misbehaves (the hub is one
# event loop: a blocked loop shows here). Generous for the ASan build on a
# shared 2-core machine; an unblocked hub answers in a few ms.
CONCURRENT_BOUND_S = 1.0
# Clients that ask for a large chain page and read nothing, and the RSS each
# may cost (the page is 12 MB; normal build, scaled under ASan).
STALLED = 10
STALLED_MIB = 3
KEY_A = "11" * 32
KEY_B = "22" * 32
# Keys the hub writes on its own while idle (leases, checkpoint claims, the
# rollup flush, the command timer sweep token): not evidence of a refused
# request having written anything. A new idle writer belongs here.
BACKGROUND = ("iot:{hub}:leases", "iot:{hub}:prov:claim:", "iot:{hub}:prov:ckpts",
              "iot:agg:partials", "iot:{hub}:runslots:", "iot:pd:", "iot:{hub}:prov:keys",
              "iot:ru:", "iot:{hub}:sweep")


def req(method, path, body=None, key=None, headers=(), length=True):
    """A request as bytes. body: bytes sent after the head, with a
    Content-Length unless length is False."""
    if isinstance(path, str):
        path = path.encode()
    lines = [b"%s %s HTTP/1.1" % (method.encode(), path), b"Host: x"]
    if key:
        lines.append(b"Authorization: Bearer " + (key.encode() if isinstance(key, str) else key))
    if body is not None and length:
        lines.append(b"Content-Length: %d" % len(body))
    lines.extend(h.encode() if isinstance(h, str) else h for h in headers)
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def agg(**q):
    base = {"field": "temperature", "granularity": "1m", "from": "0", "to": "60000"}
    base.update(q)
    return "/v1/aggregates?" + "&".join("%s=%s" % (k.replace("_dot_", "."), v)
                                        for k, v in base.items() if v is not None)


def redis_state(redis):
    """Every key's (DUMP, has a TTL), except the keys the hub rewrites
    while idle."""
    out, cur = {}, "0"
    while True:
        cur, keys = redis.cmd("SCAN", cur, "COUNT", "1000")
        for k in keys:
            if not k.startswith(BACKGROUND):
                out[k] = (redis.cmd("DUMP", k), int(redis.cmd("PTTL", k)) > 0)
        if str(cur) == "0":
            return out


class HostileRoutes(HostileCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        cls.keys = api_keys_file(KEYS)
        cls.hub = cls.class_hub(cls.redis, extra=[
            "--api-keys", cls.keys, "--provenance", "1", "--provenance-checkpoint-s", "1",
            "--rollup-flush-ms", "100", "--device-rate", "0", "--gateway-rate", "0",
            "--http-header-timeout-s", str(HEADER_TIMEOUT_S),
            "--http-body-timeout-s", str(BODY_TIMEOUT_S)])

    # ---- helpers ------------------------------------------------------------

    def exchange(self, data, timeout=5, expect=1, hub=None):
        """Sends data on a fresh connection; returns (responses, closed,
        seconds until the answer or the close)."""
        return http_exchange((hub or self.hub).port, data, timeout=timeout, expect=expect, poll=0.05)

    def ask(self, data, what=None):
        """One request; returns (status, headers, parsed JSON body or None
        for an empty body). Fails on no answer, a 5xx, or a body that is not
        JSON."""
        resps, _, _ = self.exchange(data)
        what = what or data[:120]
        self.assertEqual(len(resps), 1, "%r: no (single) answer: %r" % (what, resps))
        st, hdrs, body = resps[0]
        self.assertLess(st, 500, "%r: %d %r" % (what, st, body[:300]))
        doc = None
        if body:
            self.assertIn("application/json", hdrs.get("content-type", ""), (what, hdrs))
            try:
                doc = json.loads(body)
            except ValueError:
                self.fail("%r: the answer is not JSON: %r" % (what, body[:300]))
        return st, hdrs, doc

    def assert_error(self, data, status, code=None, field=None, what=None):
        """A request refused with `status` and the documented error body."""
        what = what or data[:120]
        st, hdrs, doc = self.ask(data, what)
        self.assertEqual(st, status, "%r: %d %r" % (what, st, doc))
        self.assertIsInstance(doc, dict, what)
        err = doc.get("error")
        self.assertIsInstance(err, dict, "%r: %r" % (what, doc))
        self.assertTrue(err.get("message"), "%r: an error without a message: %r" % (what, doc))
        if code:
            self.assertEqual(err.get("code"), code, "%r: %r" % (what, doc))
        if field:
            self.assertEqual(err.get("field"), field, "%r: %r" % (what, doc))
        if status == 401:
            self.assertEqual(hdrs.get("www-authenticate"), 'Bearer realm="iot-hub"', what)
        return doc

    def quick_normal(self, bound=CONCURRENT_BOUND_S):
        """A normal authenticated GET on a fresh connection; returns its
        seconds (fails over bound)."""
        t0 = time.monotonic()
        st, _, body = http_request(self.hub, "GET", "/v1/whoami", key=READER, timeout=bound + 5)
        took = time.monotonic() - t0
        self.assertEqual(st, 200, body[:200])
        self.assertLess(took, bound, "a normal request took %.3f s" % took)
        return took

    def assert_no_writes(self, before, what):
        after = redis_state(self.redis)
        # new or changed keys; a key that expired meanwhile (a cached
        # answer of an earlier test) is not a write
        changed = sorted(k for k in set(before) | set(after)
                         if k in after and before.get(k, (None,))[0] != after[k][0]
                         or k not in after and not before[k][1])
        self.assertEqual(changed, [], "%s wrote to Redis: %s" % (what, changed[:10]))

    def device(self, prefix="t"):
        """A registered device (the hash the PUT refuses to touch) with key
        KEY_A stored."""
        dev = uniq(prefix)
        self.redis.cmd("HSET", rkeys.dev(dev), "type", "thermostat", "labels", "{}",
                       "gateway", "g", "conn", "x", "online", "0")
        st, _, body = http_request(self.hub, "PUT", "/v1/devices/%s/key" % dev,
                                   body={"key": KEY_A}, key=ADMIN)
        self.assertEqual(st, 204, body)
        self.assertEqual(self.sigkey(dev), KEY_A)
        return dev

    def sigkey(self, dev):
        return self.redis.cmd("HGET", rkeys.dev(dev), "sigkey")

    # ---- auth -----------------------------------------------------------------

    async def test_auth_refusals(self):
        base = self.baseline(self.hub, self.redis)
        dev = self.device()
        gets = ["/v1/whoami", "/v1/commands/stats", agg(), "/v1/provenance/key",
                "/v1/provenance/checkpoints", "/v1/provenance/chain/%s" % dev]
        before = redis_state(self.redis)
        for path in gets:
            for key, why in ((None, "missing credentials"), ("not-a-key-" + "x" * 20, "unknown API key"),
                             ("", "missing credentials")):
                with self.subTest(path=path, key=key):
                    data = req("GET", path, key=key)
                    if key == "":
                        data = data.replace(b"Host: x", b"Host: x\r\nAuthorization: Bearer")
                    self.assert_error(data, 401, "unauthorized")
        # scopes: whoami takes any key; stats needs telemetry:read or
        # commands:write; the rest telemetry:read.
        self.assertEqual(self.ask(req("GET", "/v1/whoami", key=WRITER))[0], 200)
        self.assertEqual(self.ask(req("GET", "/v1/commands/stats", key=WRITER))[0], 200)
        for path in gets[2:]:
            with self.subTest(path=path, key="commands:write"):
                self.assert_error(req("GET", path, key=WRITER), 403, "forbidden")
        # stats are fleet-wide: a key with device patterns is refused.
        doc = self.assert_error(req("GET", "/v1/commands/stats", key=SREADER), 403, "forbidden")
        self.assertIn("device patterns", doc["error"]["message"])
        # the PUT: only admin. The stored key stays KEY_A.
        body = json.dumps({"key": KEY_B}).encode()
        for key, st in ((None, 401), ("nope-" + "n" * 30, 401), (READER, 403), (WRITER, 403),
                        (SREADER, 403)):
            with self.subTest(put=key):
                self.assert_error(req("PUT", "/v1/devices/%s/key" % dev, body, key=key), st)
                self.assertEqual(self.sigkey(dev), KEY_A, "a refused PUT changed the key")
        self.assert_no_writes(before, "refused requests")
        await self.assert_unharmed(self.hub, self.redis, base)

    async def test_whoami_never_echoes_the_key(self):
        for key in (ADMIN, READER, WRITER, SREADER):
            st, _, doc = self.ask(req("GET", "/v1/whoami", key=key))
            self.assertEqual(st, 200)
            self.assertNotIn(key, json.dumps(doc))
            self.assertNotIn(key[-20:], json.dumps(doc))
        self.assertEqual(self.ask(req("GET", "/v1/whoami", key=SREADER))[2]["devices"], ["t-*"])

    async def test_device_patterns_bind_provenance_routes(self):
        """A key limited to t-* learns nothing of another device through the
        provenance routes: its chain (the readings as stored) is 404 as for
        a device that does not exist, its checkpoint leaves are empty, and an
        admin key limited to t-* cannot set its signing key (404, the stored
        key unchanged). Before the fix the chain answered 200 with every
        reading, and the PUT replaced the key."""
        gw = await connect_gateway(self.hub, self.token(uniq("gw"), ("x-*", "t-*")))
        try:
            xdev, tdev = uniq("x"), uniq("t")
            rep = await gw.announce([(xdev, "thermostat"), (tdev, "thermostat")])
            self.assertEqual(sorted(rep.get("accepted", [])), sorted([xdev, tdev]), rep)
            for seq in (1, 2):
                rep = await gw.telemetry(seq, [{"device": d, "ts": now_ms(), "data": {"temperature": 20}}
                                               for d in (xdev, tdev)])
                self.assertEqual(rep.get("accepted"), 2, rep)
        finally:
            await gw.close()
        ck = "/v1/provenance/checkpoints?device=%s" % xdev

        def leaves(key):
            st, _, doc = self.ask(req("GET", ck, key=key))
            self.assertEqual(st, 200, doc)
            return [lf for c in doc["checkpoints"] for lf in c.get("leaves", [])]
        wait_until(lambda: leaves(READER), 10, 0.2, "a checkpoint holding the device's leaf")
        self.assertEqual(leaves(SREADER), [], "a key limited to t-* sees another device's leaves")
        st, _, doc = self.ask(req("GET", "/v1/provenance/chain/%s" % xdev, key=READER))
        self.assertEqual((st, len(doc["entries"])), (200, 2))
        nobody = self.ask(req("GET", "/v1/provenance/chain/%s" % uniq("x"), key=SREADER))
        hidden = self.ask(req("GET", "/v1/provenance/chain/%s" % xdev, key=SREADER))
        self.assertEqual(hidden[0], 404, hidden)
        self.assertEqual(hidden[2], nobody[2], "a hidden device must answer like a missing one")
        st, _, doc = self.ask(req("GET", "/v1/provenance/chain/%s" % tdev, key=SREADER))
        self.assertEqual((st, len(doc["entries"])), (200, 2))
        # the PUT
        self.redis.cmd("HSET", rkeys.dev(xdev), "sigkey", KEY_A)
        body = json.dumps({"key": KEY_B}).encode()
        self.assert_error(req("PUT", "/v1/devices/%s/key" % xdev, body, key=SADMIN), 404, "not_found")
        self.assertEqual(self.sigkey(xdev), KEY_A, "a key limited to t-* replaced x's key")
        self.assert_error(req("PUT", "/v1/devices/%s/key" % xdev, b'{"key":null}', key=SADMIN), 404)
        self.assertEqual(self.sigkey(xdev), KEY_A)
        self.assertEqual(self.ask(req("PUT", "/v1/devices/%s/key" % tdev, body, key=SADMIN))[0], 204)
        self.assertEqual(self.sigkey(tdev), KEY_B)

    # ---- malformed queries --------------------------------------------------------

    async def test_malformed_queries(self):
        base = self.baseline(self.hub, self.redis)
        big = "9" * 40
        cases = [
            # aggregates: every parameter, missing, non-numeric, negative,
            # huge, reversed, past the granularity's range, unknown values
            (agg(field=None), "field"),
            (agg(field=""), "field"),
            (agg(field="f" * 256), "field"),
            (agg(granularity=None), "granularity"),
            (agg(granularity="1w"), "granularity"),
            (agg(granularity="1M"), "granularity"),
            (agg(**{"from": None}), "from"),
            (agg(**{"from": "abc"}), "from"),
            (agg(**{"from": "-1"}), "from"),
            (agg(**{"from": "+5"}), "from"),
            (agg(**{"from": "1e3"}), "from"),
            (agg(**{"from": "0x10"}), "from"),
            (agg(**{"from": " 5"}), "from"),
            (agg(**{"from": big}), "from"),
            (agg(**{"from": "9223372036854775807"}), "from"),
            (agg(to=None), "to"),
            (agg(to=""), "to"),
            (agg(to="12.5"), "to"),
            (agg(to=big), "to"),
            (agg(**{"from": "60001", "to": "60000"}), "to"),
            (agg(to=str(86400000 + 1)), "to"),
            (agg(granularity="1h", to=str(92 * 86400000 + 1)), "to"),
            (agg(granularity="1d", to=str(1098 * 86400000 + 1)), "to"),
            (agg(granularity="1d", to="2305843009213693951"), "to"),
            (agg(format="xml"), "format"),
            (agg(format=""), "format"),
            (agg(device="a%2Fb"), "device"),
            (agg(device="d" * 129), "device"),
            (agg(device=""), "device"),
            (agg(device="%FF%FE"), "device"),
            (agg(device_type="x%20y"), "device_type"),
            (agg(group_by=""), "group_by"),
            (agg(group_by="g" * 129), "group_by"),
            (agg(label_dot_=""), "label."),
            (agg(**{"label_dot_" + "n" * 129: "v"}), "label." + "n" * 129),
            (agg() + "".join("&label.l%d=v" % i for i in range(17)), "label.l16"),
            (agg() + "".join("&x%d=1" % i for i in range(40)), "query"),
            # commands/stats: window is 1h or 1m..60m
            ("/v1/commands/stats?window=0m", "window"),
            ("/v1/commands/stats?window=61m", "window"),
            ("/v1/commands/stats?window=-5m", "window"),
            ("/v1/commands/stats?window=%2B5m", "window"),
            ("/v1/commands/stats?window=", "window"),
            ("/v1/commands/stats?window=m", "window"),
            ("/v1/commands/stats?window=1d", "window"),
            ("/v1/commands/stats?window=2h", "window"),
            ("/v1/commands/stats?window=%s" % ("9" * 30 + "m"), "window"),
            ("/v1/commands/stats?window=5%20m", "window"),
            # provenance: from/to/limit/shard/after/device
            ("/v1/provenance/checkpoints?from=x", "from"),
            ("/v1/provenance/checkpoints?from=-1", "from"),
            ("/v1/provenance/checkpoints?to=%s" % big, "to"),
            ("/v1/provenance/checkpoints?from=5&to=4", "to"),
            ("/v1/provenance/checkpoints?limit=0", "limit"),
            ("/v1/provenance/checkpoints?limit=1001", "limit"),
            ("/v1/provenance/checkpoints?limit=", "limit"),
            ("/v1/provenance/checkpoints?device=%FF", "device"),
            ("/v1/provenance/checkpoints?device=" + "d" * 129, "device"),
            ("/v1/provenance/chain/t-1?shard=1", "shard"),
            ("/v1/provenance/chain/t-1?shard=-1", "shard"),
            ("/v1/provenance/chain/t-1?from=%s" % big, "from"),
            ("/v1/provenance/chain/t-1?from=9&to=8", "to"),
            ("/v1/provenance/chain/t-1?limit=10001", "limit"),
            ("/v1/provenance/chain/t-1?limit=0", "limit"),
            ("/v1/provenance/chain/t-1?after=zz", "after"),
            ("/v1/provenance/chain/t-1?after=5", "after"),
            ("/v1/provenance/chain/t-1?after=-5-1", "after"),
            ("/v1/provenance/chain/t-1?after=%s-1" % big, "after"),
        ]
        before = redis_state(self.redis)
        for path, field in cases:
            with self.subTest(path=path[:100]):
                self.assert_error(req("GET", path, key=ADMIN), 422, "invalid", field,
                                  what=path[:100])
        # a 4 KiB value is still read (the query limit), not a 5xx
        self.assert_error(req("GET", agg(field="f" * 4000), key=ADMIN), 422, "invalid", "field")
        self.assert_no_writes(before, "refused queries")
        # duplicated parameters: answered (one of them is taken), never a 5xx
        for path in (agg() + "&from=0&to=1", agg() + "&granularity=1h",
                     "/v1/commands/stats?window=5m&window=7m",
                     "/v1/provenance/checkpoints?limit=1&limit=2"):
            with self.subTest(dup=path):
                st, _, _ = self.ask(req("GET", path, key=ADMIN))
                self.assertIn(st, (200, 422), path)
        # every route takes the first of repeated parameters
        st, _, doc = self.ask(req("GET", "/v1/commands/stats?window=5m&window=bogus", key=ADMIN))
        self.assertEqual((st, doc.get("window")), (200, "5m"), doc)
        self.quick_normal()
        await self.assert_unharmed(self.hub, self.redis, base)

    async def test_window_with_leading_zero_is_refused(self):
        """The window pattern is ^(1h|[1-9]m|[1-5][0-9]m|60m)$: "05m" and
        "060m" are not windows (the hub took them and echoed them back)."""
        for w in ("05m", "060m", "00001m", "01h"):
            with self.subTest(window=w):
                self.assert_error(req("GET", "/v1/commands/stats?window=" + w, key=ADMIN), 422,
                                  "invalid", "window")
        for w in ("1m", "9m", "10m", "60m", "1h"):
            st, _, doc = self.ask(req("GET", "/v1/commands/stats?window=" + w, key=ADMIN))
            self.assertEqual((st, doc["window"]), (200, w))

    # ---- malformed paths ----------------------------------------------------------

    async def test_malformed_paths(self):
        base = self.baseline(self.hub, self.redis)
        before = redis_state(self.redis)
        for seg, what in (("d" * 129, "an id over 128 bytes"),
                          ("d" * 240, "a path over the route buffer"),
                          ("%FF%FE%FD", "percent-encoded non-UTF-8"),
                          ("\xff\xfe", "raw non-UTF-8"),
                          ("%C0%AE%C0%AE", "overlong UTF-8 dots"),
                          ("..", "dot-dot"),
                          ("a%20b", "a space"),
                          ("%7B%7D", "braces")):
            seg = seg.encode("latin-1")
            for path in (b"/v1/provenance/chain/" + seg, b"/v1/provenance/chain/" + seg + b"?limit=1"):
                with self.subTest(what=what, path=path[:60]):
                    self.assert_error(req("GET", path, key=READER), 404, "not_found")
            with self.subTest(what=what, put=True):
                self.assert_error(req("PUT", b"/v1/devices/" + seg + b"/key", b'{"key":null}',
                                      key=ADMIN), 404, "not_found")
        # lws cuts a decoded path at an encoded CR or LF: the route sees
        # the part before it (never a header of its own)
        for path in ("/v1/provenance/chain/a%0d%0aX-Injected:%201",
                     "/v1/devices/a%0d%0aX-Injected:%201/key"):
            with self.subTest(crlf=path):
                m = "PUT" if path.endswith("/key") else "GET"
                st, hdrs, doc = self.ask(req(m, path, b'{"key":null}' if m == "PUT" else None,
                                             key=ADMIN))
                self.assertNotIn("x-injected", hdrs)
                self.assertIn(st, (200, 404, 405), doc)
        # a slash inside the segment (encoded or not) is another route (lws
        # merges "//" into one: not tested)
        for path in ("/v1/provenance/chain/a%2Fb", "/v1/provenance/chain/a/b",
                     "/v1/provenance/chain/",
                     "/v1/provenance/key/x", "/v1/whoami/", "/v1/aggregates/x"):
            with self.subTest(path=path):
                self.assert_error(req("GET", path, key=READER), 404, "not_found")
        # the URL limit: 414, then close
        resps, closed, _ = self.exchange(req("GET", "/v1/provenance/chain/" + "d" * 5000, key=READER))
        self.assertEqual([r[0] for r in resps], [414])
        self.assertTrue(closed)
        self.assert_no_writes(before, "refused paths")
        self.quick_normal()
        await self.assert_unharmed(self.hub, self.redis, base)

    async def test_lws_refusals(self):
        """What lws 4.1.6 refuses in its parser (the hub never sees it): an
        answer, if any, is a 4xx and the connection closes at once."""
        base = self.baseline(self.hub, self.redis)
        before = redis_state(self.redis)
        for data in (req("GET", "/v1/whoami?x=%00", key=READER),
                     req("GET", "/v1/commands/stats?window=5%00m", key=READER),
                     req("GET", agg(field="%00"), key=READER),
                     req("GET", "/v1/provenance/chain/a%00b", key=READER),
                     req("GET", b"/v1/provenance/chain/a\x00b", key=READER),
                     req("GET", "/v1/provenance/chain/%zz", key=READER),
                     req("GET", "/v1/whoami?x=%f", key=READER),
                     req("PUT", "/v1/devices/%GG/key", b'{"key":null}', key=ADMIN),
                     req("BREW", "/v1/whoami", key=READER),
                     req("GET", b"/v1/whoami\x00", key=READER)):
            with self.subTest(data=data[:60]):
                resps, closed, took = self.exchange(data, timeout=3)
                self.assertTrue(closed, "%r: left open" % data[:60])
                self.assertLess(took, 1.0, "%r: closed after %.1f s" % (data[:60], took))
                for st, _, body in resps:
                    self.assertTrue(400 <= st < 500, "%r: %d %r" % (data[:60], st, body[:100]))
        self.assert_no_writes(before, "requests lws refused")
        self.quick_normal()
        await self.assert_unharmed(self.hub, self.redis, base)

    # ---- the PUT's body ---------------------------------------------------------------

    async def test_put_bodies(self):
        base = self.baseline(self.hub, self.redis)
        dev = self.device()
        path = "/v1/devices/%s/key" % dev
        before = redis_state(self.redis)
        invalid = [b"", b"nope", b"{", b"[]", b"null", b'"' + KEY_B.encode() + b'"', b"{}",
                   b'{"key":5}', b'{"key":true}', b'{"key":["%s"]}' % KEY_B.encode(),
                   b'{"key":{"k":"%s"}}' % KEY_B.encode(), b'{"Key":"%s"}' % KEY_B.encode(),
                   b'{"key":"%s"}' % KEY_B[:-1].encode(), b'{"key":"%s0"}' % KEY_B.encode(),
                   b'{"key":"%s"}' % (b"zz" * 32), b'{"key":"%s"}' % (b"\xc3\xa9" * 32),
                   b'{"key":"%s\\u0000"}' % KEY_B[:-2].encode(),
                   b'{"key":"%s","key":"%s"}' % (KEY_B.encode(), KEY_B.encode()),
                   b'{"key":null,"key":null}', b'\xff\xfe{"key":null}',
                   b'{"key":"%s"' % KEY_B.encode(), b'{"key":"' + b"a" * 60000 + b'"}',
                   b"[" * 20000 + b"]" * 20000]
        for body in invalid:
            with self.subTest(body=body[:60]):
                self.assert_error(req("PUT", path, body, key=ADMIN), 422, "invalid", "key")
                self.assertEqual(self.sigkey(dev), KEY_A)
        # past the 64 KiB body limit, announced or sent: 413 and close
        huge = b'{"key":"' + b"a" * 70000 + b'"}'
        for data in (req("PUT", path, huge, key=ADMIN),
                     req("PUT", path, None, key=ADMIN, headers=["Content-Length: 99999999999"]),
                     req("PUT", path, None, key=ADMIN, headers=["Content-Length: 65537"])):
            with self.subTest(big=data[-40:]):
                resps, closed, _ = self.exchange(data, timeout=4)
                self.assertEqual([r[0] for r in resps], [413], resps)
                self.assertEqual(json.loads(resps[0][2])["error"]["code"], "too_large")
                self.assertTrue(closed)
        # chunked: 411; a malformed or doubled Content-Length: 400; closed
        good = json.dumps({"key": KEY_B}).encode()
        for data, st in ((req("PUT", path, b"%x\r\n%s\r\n0\r\n\r\n" % (len(good), good), key=ADMIN,
                              length=False, headers=["Transfer-Encoding: chunked"]), 411),
                         (req("PUT", path, good, key=ADMIN, length=False,
                              headers=["Content-Length: 1e2"]), 400),
                         (req("PUT", path, good, key=ADMIN, length=False,
                              headers=["Content-Length: -12"]), 400),
                         (req("PUT", path, good, key=ADMIN, headers=["Content-Length: 3"]), 400)):
            with self.subTest(status=st, data=data[:80]):
                resps, closed, _ = self.exchange(data, timeout=4)
                self.assertEqual([r[0] for r in resps], [st], resps)
                self.assertTrue(closed)
        # no Content-Length: an empty body (RFC 9112), so 422 at once; the
        # bytes that follow are not taken as the body
        resps, _, took = self.exchange(req("PUT", path, good, key=ADMIN, length=False), timeout=4)
        self.assertEqual(resps[0][0], 422, resps)
        self.assertLess(took, 1.0)
        # a Content-Length shorter than the JSON: the JSON is cut, 422
        resps, _, _ = self.exchange(req("PUT", path, good, key=ADMIN, length=False,
                                        headers=["Content-Length: %d" % (len(good) - 5)]), timeout=4)
        self.assertEqual(resps[0][0], 422, resps)
        self.assertEqual(self.sigkey(dev), KEY_A)
        self.assert_no_writes(before, "refused PUTs")
        # and the route still works
        st, _, _ = self.ask(req("PUT", path, good, key=ADMIN))
        self.assertEqual(st, 204)
        self.assertEqual(self.sigkey(dev), KEY_B)
        st, _, _ = self.ask(req("PUT", path, b'{"key":null}', key=ADMIN))
        self.assertEqual(st, 204)
        self.assertIsNone(self.sigkey(dev))
        await self.assert_unharmed(self.hub, self.redis, base)

    def assert_405(self, data, allow):
        st, hdrs, doc = self.ask(data)
        self.assertEqual((st, (doc or {}).get("error", {}).get("code"), hdrs.get("allow")),
                         (405, "method_not_allowed", allow), (data[:120], hdrs, doc))

    async def test_wrong_methods(self):
        """Every other method on these paths: 405 JSON with an Allow header
        naming the path's methods, nothing written."""
        dev = self.device()
        before = redis_state(self.redis)
        gets = ["/v1/whoami", "/v1/commands/stats", "/v1/aggregates", "/v1/provenance/key",
                "/v1/provenance/checkpoints", "/v1/provenance/chain/%s" % dev]
        for path in gets:
            for m in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"):
                with self.subTest(path=path, method=m):
                    body = b'{"key":null}' if m in ("POST", "PUT") else None
                    self.assert_405(req(m, path, body, key=ADMIN), "GET")
        for m in ("GET", "POST", "DELETE", "PATCH", "OPTIONS", "HEAD"):
            with self.subTest(path="key", method=m):
                body = b'{"key":null}' if m == "POST" else None
                self.assert_405(req(m, "/v1/devices/%s/key" % dev, body, key=ADMIN), "PUT")
        # a 405 needs no key, and a body on a GET is refused before routing
        self.assert_error(req("DELETE", "/v1/whoami"), 405)
        resps, closed, _ = self.exchange(req("GET", "/v1/whoami", b"{}", key=ADMIN), timeout=3)
        self.assertEqual([r[0] for r in resps], [400])
        self.assertTrue(closed)
        self.assertEqual(self.sigkey(dev), KEY_A)
        self.assert_no_writes(before, "wrong methods")
        self.quick_normal()

    # ---- slow and partial clients -------------------------------------------------------

    def concurrently(self, fn, seconds, bound=CONCURRENT_BOUND_S):
        """Runs fn() in a thread while normal requests are measured every
        0.1 s for `seconds`; returns (fn's result, the slowest normal)."""
        out = {}

        def run():
            try:
                out["r"] = fn()
            except BaseException as e:  # noqa: B902 - re-raised below
                out["e"] = e
        t = threading.Thread(target=run)
        t.start()
        worst = 0.0
        end = time.monotonic() + seconds
        while time.monotonic() < end or t.is_alive():
            worst = max(worst, self.quick_normal(bound))
            time.sleep(0.1)
            if time.monotonic() > end + 30:
                break
        t.join(30)
        self.assertFalse(t.is_alive(), "the misbehaving client never finished")
        if "e" in out:
            raise out["e"]
        return out.get("r"), worst

    async def test_head_byte_by_byte(self):
        base = self.baseline(self.hub, self.redis)
        # complete within the header timeout: answered normally
        data = req("GET", agg(granularity="1h", to="3600000", format="csv"), key=READER)
        pause = min(0.01, (HEADER_TIMEOUT_S * 0.5) / len(data))

        def dribble():
            s = raw_connect(self.hub.port)
            try:
                for i in range(len(data)):
                    s.sendall(data[i:i + 1])
                    time.sleep(pause)
                got, _ = recv_until_closed(s, 2)
            finally:
                s.close()
            return got
        got, worst = self.concurrently(dribble, 0)
        resps = split_responses(got)
        self.assertEqual([r[0] for r in resps], [200], got[:300])
        self.assertTrue(resps[0][2].startswith(b"bucket,group,count"), resps[0][2][:100])
        sys.stderr.write("head byte by byte (%d bytes): slowest concurrent request %.0f ms\n"
                         % (len(data), worst * 1000))

        # never complete: cut at the header timeout, on a fresh connection
        # and on a kept-alive one after an answered request
        def never(after_one):
            s = raw_connect(self.hub.port)
            try:
                if after_one:
                    s.sendall(req("GET", "/v1/whoami", key=READER))
                    d = b""
                    while b'"tier_default"' not in d:
                        c = s.recv(65536)
                        self.assertTrue(c, "closed before the first answer")
                        d += c
                t0 = time.monotonic()
                head = req("GET", "/v1/provenance/key", key=READER)[:-2]
                for i in range(len(head)):
                    s.sendall(head[i:i + 1])
                    _, closed = recv_until_closed(s, 0.05)
                    if closed:
                        return time.monotonic() - t0
                while time.monotonic() - t0 < HEADER_TIMEOUT_S + 8:
                    try:
                        s.sendall(b"X-Slow: 1\r\n")
                    except OSError:
                        return time.monotonic() - t0
                    _, closed = recv_until_closed(s, 0.3)
                    if closed:
                        return time.monotonic() - t0
                return None
            finally:
                s.close()
        for after_one in (False, True):
            with self.subTest(after_one=after_one):
                cut, worst = self.concurrently(lambda: never(after_one), 0)
                self.assertIsNotNone(cut, "a head that never ends was never cut")
                self.assertLess(cut, HEADER_TIMEOUT_S + 2.5, "cut after %.1f s" % cut)
                sys.stderr.write("endless head (after_one=%s): cut after %.1f s; slowest "
                                 "concurrent request %.0f ms\n" % (after_one, cut, worst * 1000))
        await self.assert_unharmed(self.hub, self.redis, base)

    async def test_put_body_never_completes(self):
        base = self.baseline(self.hub, self.redis)
        dev = self.device()
        path = "/v1/devices/%s/key" % dev
        fds0 = open_fds(self.hub.pid)

        def stall(key):
            s = raw_connect(self.hub.port)
            body = json.dumps({"key": KEY_B}).encode()
            try:
                s.sendall(req("PUT", path, None, key=key, headers=["Content-Length: 500"]) + body)
                t0 = time.monotonic()
                got = b""
                while time.monotonic() - t0 < BODY_TIMEOUT_S + 8:
                    try:
                        s.sendall(b" ")
                    except OSError:
                        return time.monotonic() - t0, got
                    d, closed = recv_until_closed(s, 0.25)
                    got += d
                    if closed:
                        return time.monotonic() - t0, got
                return None, got
            finally:
                s.close()
        for key in (ADMIN, READER):
            with self.subTest(key=key[:9]):
                (cut, got), worst = self.concurrently(lambda: stall(key), 0)
                self.assertIsNotNone(cut, "a body that never completes was never cut")
                self.assertLess(cut, BODY_TIMEOUT_S + 2.5, "cut after %.1f s" % cut)
                if key == READER:
                    self.assertTrue(got.startswith(b"HTTP/1.1 403"), got[:60])
                else:
                    self.assertEqual(got, b"", "answered a body that never completed")
                self.assertEqual(self.sigkey(dev), KEY_A, "an incomplete PUT changed the key")
                sys.stderr.write("endless PUT body (%s): cut after %.1f s; slowest concurrent "
                                 "request %.0f ms\n" % (key[:9], cut, worst * 1000))
        wait_until(lambda: open_fds(self.hub.pid) <= fds0 + 2, 5, 0.1, "the hub's fds to come back")
        await self.assert_unharmed(self.hub, self.redis, base)

    # ---- large answers, clients that stop reading then go ---------------------------------

    async def fill_aggregates(self, devices=20, minutes=1440):
        """devices x minutes readings (one a minute over the last day, each
        device its own `site`): a group_by=site answer of devices x minutes
        rows (about 250 bytes each as JSON)."""
        gw = await connect_gateway(self.hub, self.token(uniq("gw"), ("t-*",)))
        try:
            devs = [uniq("t") for _ in range(devices)]
            rep = await gw.announce([(d, "thermostat", {"site": "s-%s" % d}) for d in devs])
            self.assertEqual(sorted(rep.get("accepted", [])), sorted(devs), rep)
            t1 = now_ms() - now_ms() % 60000 - 60000
            t0 = t1 - (minutes - 1) * 60000
            rs = [{"device": d, "ts": t0 + m * 60000 + 7, "data": {"temperature": (m % 50) / 2}}
                  for m in range(minutes) for d in devs]
            for seq, i in enumerate(range(0, len(rs), 300), 1):
                part = rs[i:i + 300]
                rep = await gw.telemetry(seq, part, timeout=20)
                self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", len(part)), rep)
        finally:
            await gw.close()
        path = agg(granularity="1m", to=str(t1 + 59999), group_by="site", format="ndjson",
                   **{"from": str(t0)})
        want = devices * minutes

        def rolled():
            st, _, body = http_request(self.hub, "GET", path.replace("ndjson", "csv") + "&device=" + devs[-1],
                                       key=READER, timeout=20)
            return st == 200 and body.count(b"\r\n") == minutes + 1
        wait_until(rolled, 20, 0.3, "the last device's readings to be rolled up")
        return path, want

    def fill_chain(self, n=10000, pad=150):
        dev = uniq("t")
        now = now_ms()
        self.redis.cmd("HSET", rkeys.dev(dev), "type", "thermostat", "labels", "{}",
                       "gateway", "g", "conn", "x", "online", "0")
        self.redis.cmd("EVAL", "for i = 1, tonumber(ARGV[2]) do redis.call('XADD', KEYS[1], '*', "
                       "'ts', ARGV[1], 'data', '{\"temperature\":21.5,\"pad\":\"" + "p" * pad + "\"}', "
                       "'gw', 'g', 'seq', i, 'at', ARGV[1], 'n', i, 'ph', '" + "0" * 64 + "', 'sig', '') end",
                       1, rkeys.tm(dev), str(now), str(n))
        return "/v1/provenance/chain/%s?limit=%d" % (dev, n), n

    def stall_then_close(self, path, read_first=16384, stall_s=2.0, rst=False):
        """A client with a tiny receive buffer that reads read_first bytes of
        the answer, stops reading for stall_s while normal requests are
        measured (the hub must not spin meanwhile), then closes (RST with
        rst). Returns (slowest normal, bytes read)."""
        s = raw_connect(self.hub.port, rcvbuf=4096)
        try:
            s.sendall(req("GET", path, key=READER))
            got = b""
            s.settimeout(10)
            while len(got) < read_first:
                c = s.recv(4096)
                self.assertTrue(c, "closed after %d bytes" % len(got))
                got += c
            self.assertTrue(got.startswith(b"HTTP/1.1 200"), got[:200])
            _, worst = self.concurrently(lambda: time.sleep(stall_s), 0)
            self.assert_not_spinning(self.hub, 0.5, 0.3)
        finally:
            if rst:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        return worst, len(got)

    async def test_client_leaves_mid_answer(self):
        base = self.baseline(self.hub, self.redis)
        chain_path, n = self.fill_chain()
        agg_path, rows = await self.fill_aggregates()
        # the full answers, read normally: large enough to be cut
        t0 = time.monotonic()
        st, _, body = http_request(self.hub, "GET", chain_path, key=READER, timeout=30)
        self.assertEqual(st, 200)
        self.assertEqual(len(json.loads(body)["entries"]), n)
        sys.stderr.write("chain of %d entries: %.1f MB in %.2f s\n"
                         % (n, len(body) / 1e6, time.monotonic() - t0))
        t0 = time.monotonic()
        st, hdrs, body = http_request(self.hub, "GET", agg_path, key=READER, timeout=60)
        self.assertEqual(st, 200, body[:200])
        self.assertEqual(body.count(b"\n"), rows)
        sys.stderr.write("aggregates of %d rows: %.1f MB in %.2f s (X-Cache %s)\n"
                         % (rows, len(body) / 1e6, time.monotonic() - t0, hdrs.get("x-cache")))
        self.assertGreater(len(body), 3e6)
        fds0 = open_fds(self.hub.pid)
        for path in (chain_path, agg_path, agg_path.replace("ndjson", "json"),
                     agg_path.replace("ndjson", "csv")):
            for rst in (False, True):
                with self.subTest(path=path[:50], rst=rst):
                    worst, read = self.stall_then_close(path, rst=rst)
                    sys.stderr.write("%s: client stalled after %d bytes then %s: slowest "
                                     "concurrent request %.0f ms\n"
                                     % (path[:40], read, "reset" if rst else "closed", worst * 1000))
        # the connections are freed (no answer kept for a client that left)
        wait_until(lambda: open_fds(self.hub.pid) <= fds0 + 2, 10, 0.1,
                   "the hub's fds to come back after the clients left")
        self.assert_not_spinning(self.hub, 1.0, 0.3)
        await self.assert_unharmed(self.hub, self.redis, base, rss_mib=160, redis_mib=64)


    async def test_stalled_chain_readers_hold_bounded_memory(self):
        """Clients ask for a 10,000-entry chain page (12 MB, three times
        what the kernel buffers for a socket) and read nothing: each costs
        the hub one batch of 256 entries (the page is read from Redis batch
        by batch as the client takes it), not the whole page: before the
        fix the hub held a deep copy of the Redis reply and a second copy of
        the answer for each reader, 32 MiB each (RSS +323 MiB for 10), and
        a normal request is still answered at once."""
        path, n = self.fill_chain(pad=1000)
        st, _, body = http_request(self.hub, "GET", path, key=READER, timeout=30)
        self.assertEqual((st, len(json.loads(body)["entries"])), (200, n))
        fds0 = open_fds(self.hub.pid)
        rss0 = rss_kib(self.hub.pid)
        socks = []
        try:
            for _ in range(STALLED):
                sk = raw_connect(self.hub.port, rcvbuf=4096)
                sk.sendall(req("GET", path, key=READER))
                socks.append(sk)
                self.quick_normal()
            # every reader has its answer started, then the hub idles
            # while they read nothing
            for sk in socks:
                sk.settimeout(20)
                got = sk.recv(16, socket.MSG_PEEK)
                self.assertTrue(got.startswith(b"HTTP/1.1 200"), "a stalled reader got %r" % got)
            wait_until(lambda: idle(self.hub), 15, 0, "the hub to idle with %d stalled readers"
                       % STALLED)
            worst = max(self.quick_normal() for _ in range(5))
            grown = (rss_kib(self.hub.pid) - rss0) / 1024
            sys.stderr.write("%d stalled chain readers of %.1f MB: RSS +%.0f MiB, slowest "
                             "concurrent request %.0f ms\n"
                             % (STALLED, len(body) / 1e6, grown, worst * 1000))
            self.assertLess(grown, STALLED * STALLED_MIB * SAN_FACTOR,
                            "RSS grew %.0f MiB for %d stalled readers" % (grown, STALLED))
        finally:
            for sk in socks:
                sk.close()
        wait_until(lambda: open_fds(self.hub.pid) <= fds0 + 2, 10, 0.1,
                   "the hub's fds to come back after the readers left")
        await self.assert_unharmed(self.hub, self.redis, None, rss_mib=200)

def idle(hub, seconds=0.5, share=0.2):
    """True if hub used under `share` of a core over the next `seconds`."""
    a = cpu_seconds(hub.pid)
    time.sleep(seconds)
    return (cpu_seconds(hub.pid) - a) / seconds < share


if __name__ == "__main__":
    main()
