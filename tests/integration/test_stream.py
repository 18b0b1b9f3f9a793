"""Dashboard stream /v1/stream, subprotocol iot-dashboard.v1 (docs/dashboard.md): auth on the upgrade (API key or JWT: 101/401/403) and by
first message (authenticated, 4401, 4403, 4408 auth_timeout); subscribe and
unsubscribe errors; raw filters and token device patterns; reading fields and
pos = the frame's iot:feed id; fan-out and presence across instances;
1s / 10s aggregates (per device and group_by) merged from partials of several
instances, checked against values computed here; since-replay while live
traffic flows (no loss, no duplicate at the seam) and reconnect with the last
pos; a Redis pub/sub reconnect loses nothing; a stalled subscriber gets `gap`
(or 4008 with stream-slow-policy close) while ingestion and other subscribers
keep their pace."""

import asyncio
import json
import os
import re
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import (STREAM_PATH, STREAM_PROTO, HubTestCase, api_keys_file, connect_dashboard,  # noqa: E402
                     hs256, http_get, main, metric_value, now_ms, parse_metrics, reading, rkeys, try_upgrade,
                     uniq, upgrade_request, wait_until, websockets)

# name: (key, scopes, devices patterns or None)
KEYS = {"reader": ("iotk_stream_reader_0001", ["telemetry:read"], None),
        "admin": ("iotk_stream_admin_00002", ["admin"], None),
        "writer": ("iotk_stream_writer_0003", ["commands:write"], None),
        "limited": ("iotk_stream_limited_004", ["telemetry:read"], ["t-1*"])}

POS_RE = re.compile(r"^\d+-\d+$")


def key(name):
    return KEYS[name][0]


def pkey(pos):
    """'<ms>-<n>' -> (ms, n) for ordering."""
    a, _, b = pos.partition("-")
    return int(a), int(b)


def xrange_from(redis, key_, start="-"):
    """[(id, {field: value})] of a stream from start ('-', an id, or '(' id)."""
    out = []
    for eid, fields in redis.cmd("XRANGE", key_, start, "+") or []:
        out.append((eid, dict(zip(fields[0::2], fields[1::2]))))
    return out


def parse_feed_readings(text):
    """An iot:feed entry's `readings`: docs/streams.md says a JSON array of
    {"device","ts","data"}; the store script writes the live-channel lines
    (`device\ttype\tlabels-json\tbody\n`, docs/dashboard.md). Both are read."""
    if text.startswith("["):
        return json.loads(text)
    out = []
    for line in text.split("\n"):
        if line:
            body = line.split("\t", 3)[3]
            out.append(json.loads("{" + body + "}"))
    return out


def feed_entries(redis, start="-"):
    """iot:feed entries, oldest first: [(id, gw, seq, [reading dicts])]."""
    out = []
    for eid, f in xrange_from(redis, rkeys.FEED, start):
        out.append((eid, f.get("gw"), int(f.get("seq", -1)), parse_feed_readings(f.get("readings", ""))))
    return out


class RawDashboard:
    """A dashboard over a plain socket with a tiny receive buffer, so that it
    can stop reading (the hub's writes then back up). Blocking; use from a
    thread when the event loop must keep running."""

    def __init__(self, port, token, rcvbuf=4096, timeout=5):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        req, _ = upgrade_request(port, token, path=STREAM_PATH, subprotocol=STREAM_PROTO)
        self.sock.sendall(req)
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in buf:
            if time.monotonic() > deadline:
                raise AssertionError("no upgrade answer: %r" % buf[:200])
            chunk = self.sock.recv(4096)
            if not chunk:
                raise AssertionError("hub closed during the upgrade: %r" % buf[:200])
            buf += chunk
        head, _, self.buf = buf.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            raise AssertionError("raw dashboard upgrade answered %r" % head[:300])
        self.closed = None

    def _frame(self, opcode, payload):
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            hdr = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            hdr = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            hdr = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        return hdr + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

    def send_json(self, obj):
        self.sock.sendall(self._frame(0x1, json.dumps(obj).encode()))

    def _need(self, n, deadline):
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout()
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise EOFError()
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self, timeout=5):
        """Next message: ('text', obj), ('close', code, reason), ('eof',) or
        ('timeout',). Answers PINGs."""
        deadline = time.monotonic() + timeout
        parts, first_op = [], None
        try:
            while True:
                b0, b1 = self._need(2, deadline)
                fin, op, n = b0 & 0x80, b0 & 0x0F, b1 & 0x7F
                if n == 126:
                    n = struct.unpack("!H", self._need(2, deadline))[0]
                elif n == 127:
                    n = struct.unpack("!Q", self._need(8, deadline))[0]
                if b1 & 0x80:
                    m = self._need(4, deadline)
                    payload = bytes(b ^ m[i % 4] for i, b in enumerate(self._need(n, deadline)))
                else:
                    payload = self._need(n, deadline)
                if op == 0x9:
                    try:
                        self.sock.sendall(self._frame(0xA, payload))
                    except OSError:
                        pass
                    continue
                if op == 0xA:
                    continue
                if op == 0x8:
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                    self.closed = code
                    return ("close", code, payload[2:].decode(errors="replace"))
                if op != 0x0:
                    first_op = op
                parts.append(payload)
                if fin:
                    data = b"".join(parts)
                    if first_op != 0x1:
                        raise AssertionError("hub sent a non-text message (opcode %s)" % first_op)
                    return ("text", json.loads(data))
        except socket.timeout:
            return ("timeout",)
        except EOFError:
            return ("eof",)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------
# gateway side

class Pump:
    """Sends n telemetry frames on a gateway at `rate` frames/s without waiting
    for acks (seq from first_seq), readings from make(i, ts); records the send
    time of every frame and the arrival of every ack."""

    def __init__(self, gw, n, rate, make, first_seq=1):
        self.gw, self.n, self.rate, self.make = gw, n, rate, make
        self.first_seq = first_seq
        self.sent = {}       # seq -> (monotonic send time, readings)
        self.acks = {}       # seq -> (monotonic ack time, msg)
        self.errors = []

    async def _send(self):
        t0 = time.monotonic()
        for i in range(self.n):
            due = t0 + i / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            seq = self.first_seq + i
            rs = self.make(i, now_ms())
            self.sent[seq] = (time.monotonic(), rs)
            await self.gw.send({"type": "telemetry", "seq": seq, "readings": rs})

    async def _recv(self, deadline):
        while len(self.acks) < self.n and time.monotonic() < deadline:
            try:
                raw = await asyncio.wait_for(self.gw.ws.recv(), max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
            except websockets.exceptions.ConnectionClosed:
                self.errors.append("gateway closed: %s" % self.gw.ws.close_code)
                break
            m = json.loads(raw)
            if m.get("type") == "ack":
                self.acks[m["seq"]] = (time.monotonic(), m)
            else:
                self.errors.append(m)

    async def run(self, timeout):
        deadline = time.monotonic() + timeout
        await asyncio.gather(self._send(), self._recv(deadline))
        return self

    def check(self, tc):
        tc.assertEqual(self.errors, [], "gateway got non-ack messages")
        tc.assertEqual(len(self.acks), self.n, "acks received for %d of %d frames" % (len(self.acks), self.n))
        for seq, (_, m) in self.acks.items():
            tc.assertEqual(m.get("accepted"), len(self.sent[seq][1]), m)
            tc.assertFalse(m.get("rejected"), m)

    def ack_latencies(self):
        return [self.acks[s][0] - self.sent[s][0] for s in self.acks]


def thermo(device, temperature, ts="now", humidity=None):
    r = reading(device, temperature, ts=ts)
    if humidity is not None:
        r["data"]["humidity"] = humidity
    return r


def is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def expected_metrics(rows):
    """rows: [(ts, store_order, data)] -> {field: {count,min,max,avg,last}}
    over top-level numeric fields."""
    fields = {}
    for ts, order, data in rows:
        for f, v in data.items():
            if is_num(v):
                fields.setdefault(f, []).append((ts, order, v))
    out = {}
    for f, vs in fields.items():
        vals = [v for _, _, v in vs]
        out[f] = {"count": len(vals), "min": min(vals), "max": max(vals),
                  "avg": sum(vals) / len(vals), "last": max(vs, key=lambda x: (x[0], x[1]))[2]}
    return out


# --------------------------------------------------------------------------
# test bases

class StreamCase(HubTestCase):
    async def dashboard(self, hub, token=None, name="reader", **kw):
        """A header-authenticated dashboard (API key `name` unless token is
        given; token=False connects without Authorization). Closed at cleanup."""
        if token is None:
            token = key(name)
        d = await connect_dashboard(hub, token if token is not False else None, **kw)
        self.addAsyncCleanup(d.close)
        return d

    def jwt(self, sub="dash-1", scope="telemetry:read", devices=("t-*",), ttl=600, **extra):
        c = {"sub": sub, "iat": int(time.time())}
        if ttl is not None:
            c["exp"] = int(time.time()) + ttl
        if scope is not None:
            c["scope"] = scope
        if devices is not None:
            c["devices"] = list(devices)
        c.update(extra)
        return hs256(c, self.secret)

    def upgrade(self, hub, token=None):
        st, _, body = try_upgrade(hub, token, path=STREAM_PATH, subprotocol=STREAM_PROTO)
        return st, body

    async def gw_with(self, hub, devices, **kw):
        """A gateway that announced devices ((id, type[, labels]) tuples)."""
        gw = await self.gateway(hub, **kw)
        gw.seq = 0
        rep = await gw.announce(devices)
        self.assertEqual(rep.get("accepted"), [d[0] for d in devices], rep)
        return gw

    async def frame(self, gw, readings):
        gw.seq = getattr(gw, "seq", 0) + 1
        rep = await gw.telemetry(gw.seq, readings)
        self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", len(readings)), rep)
        return gw.seq

    def feed_pos(self, redis, gw_sub, seq):
        for eid, f in xrange_from(redis, rkeys.FEED):
            if f.get("gw") == gw_sub and f.get("seq") == str(seq):
                return eid
        raise AssertionError("no iot:feed entry for gw %s seq %s" % (gw_sub, seq))

    def assert_pos_after(self, pos, after, what=""):
        self.assertRegex(pos, POS_RE, what)
        self.assertGreater(pkey(pos), pkey(after), "%s: pos %s not after %s" % (what, pos, after))


def tuple_of(m):
    """A reading message as a hashable (device, ts, data json, pos)."""
    return (m.get("device"), m.get("ts"), json.dumps(m.get("data"), sort_keys=True), m.get("pos"))


def diff_readings(have, want):
    """Why two lists of readings differ, in a few words."""
    seen = {}
    for h in have:
        seen[h] = seen.get(h, 0) + 1
    wanted = set(want)
    dups = [h for h, c in seen.items() if c > 1]
    missing = [i for i, w in enumerate(want) if w not in seen]
    extra = [h for h in seen if h not in wanted]
    runs = []
    for i in missing:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ("received %d, stored %d; %d duplicated (first %s); %d missing, as index runs of the stored "
            "list %s (first missing %s); %d not stored (first %s); in order: %s" % (
                len(have), len(want), len(dups), dups[:2], len(missing), runs[:10],
                [want[i] for i in missing[:2]], len(extra), extra[:2],
                [h for h in have if h in wanted] == [w for w in want if w in seen]))


def by_sub(msgs, type_="reading"):
    out = {}
    for m in msgs:
        if m.get("type") == type_:
            out.setdefault(m.get("sub"), []).append(m)
    return out


# --------------------------------------------------------------------------
# auth

class StreamAuth(StreamCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis, extra=["--api-keys", api_keys_file(KEYS)])

    async def test_header_api_key_subscribes(self):
        for name in ("reader", "admin"):
            st, body = self.upgrade(self.hub, key(name))
            self.assertEqual(st, 101, "%s: %r" % (name, body[:200]))
        d = await self.dashboard(self.hub, name="reader")
        self.assertEqual(d.subprotocol, STREAM_PROTO)
        dev = uniq("t-h")
        rep = await d.subscribe("s1", filter={"devices": [dev]})
        self.assertRegex(rep.get("position", ""), POS_RE, rep)
        # header-authenticated: no `authenticated` message came before `subscribed`
        self.assertEqual([m for m in d.pending if m.get("type") == "authenticated"], [])
        gw = await self.gw_with(self.hub, [(dev, "thermostat")])
        await self.frame(gw, [thermo(dev, 22.5)])
        m = await d.wait_for(lambda m: m.get("type") == "reading", 5, "the reading")
        self.assertEqual((m.get("sub"), m.get("device"), m.get("data")), ("s1", dev, {"temperature": 22.5}), m)

    async def test_header_key_without_scope_403(self):
        st, body = self.upgrade(self.hub, key("writer"))
        self.assertEqual(st, 403, body[:200])

    async def test_header_unknown_or_bad_token_401(self):
        for tok in ("iotk_no_such_key_at_all", "x.y.z", self.jwt(ttl=-120),
                    hs256({"sub": "d", "exp": int(time.time()) + 600, "scope": "telemetry:read"}, b"wrong-secret")):
            st, body = self.upgrade(self.hub, tok)
            self.assertEqual(st, 401, "%s: %r" % (tok[:40], body[:200]))

    async def test_header_jwt(self):
        st, body = self.upgrade(self.hub, self.jwt(scope="telemetry:read"))
        self.assertEqual(st, 101, body[:200])
        st, body = self.upgrade(self.hub, self.jwt(scope=["commands:write", "telemetry:read"]))
        self.assertEqual(st, 101, "scope as an array: %r" % body[:200])
        st, body = self.upgrade(self.hub, self.jwt(scope="openid telemetry:read profile"))
        self.assertEqual(st, 101, "space-separated scope: %r" % body[:200])
        st, body = self.upgrade(self.hub, self.jwt(scope="commands:write"))
        self.assertEqual(st, 403, "JWT without telemetry:read: %r" % body[:200])
        st, body = self.upgrade(self.hub, self.jwt(scope=None))
        self.assertEqual(st, 403, "JWT without scope claim: %r" % body[:200])

    async def test_no_header_opens_unauthenticated(self):
        st, body = self.upgrade(self.hub, None)
        self.assertEqual(st, 101, body[:200])

    async def test_first_message_api_key(self):
        d = await self.dashboard(self.hub, token=False)
        rep = await d.auth(key("reader"))
        self.assertEqual(rep, {"type": "authenticated", "name": "reader"})
        await d.subscribe("s1", filter={"devices": [uniq("t-fm")]})

    async def test_first_message_jwt_with_devices_claim(self):
        p = uniq("t-j")
        a, b = p + "a1", p + "b1"
        d = await self.dashboard(self.hub, token=False)
        rep = await d.auth(self.jwt(sub="dash-jwt", devices=[p + "a*"]))
        self.assertEqual(rep, {"type": "authenticated", "name": "dash-jwt"})
        # an exact device outside the claim is forbidden; a prefix is narrowed
        rep = await d.subscribe("x", filter={"devices": [b]}, expect="forbidden")
        await d.subscribe("s1", filter={"devices": [p + "*"]})
        gw = await self.gw_with(self.hub, [(a, "thermostat"), (b, "thermostat")])
        await self.frame(gw, [thermo(b, 20.0)])
        await self.frame(gw, [thermo(a, 21.0)])
        got = await d.until(lambda m: m.get("type") == "reading" and m.get("device") == a, 5, "reading of " + a)
        self.assertEqual([m["device"] for m in got if m.get("type") == "reading"], [a],
                         "a JWT limited to %s* saw: %s" % (p + "a", got))

    async def test_jwt_without_devices_claim_sees_every_device(self):
        # docs/dashboard.md: the claim is an optional limit for dashboards,
        # unlike gateway tokens where absent means none
        dev = uniq("t-n")
        d = await self.dashboard(self.hub, token=self.jwt(devices=None))
        await d.subscribe("s1", filter={"devices": [dev]})
        await d.subscribe("all", filter={})
        gw = await self.gw_with(self.hub, [(dev, "thermostat")])
        await self.frame(gw, [thermo(dev, 20.0)])
        got = await d.gather(lambda g: {m.get("sub") for m in g if m.get("type") == "reading"
                                        and m.get("device") == dev} >= {"s1", "all"},
                             5, "the reading on s1 and all")
        self.assertEqual(sorted(m["sub"] for m in got if m.get("device") == dev), ["all", "s1"], got)

    async def test_first_message_bad_token_4401(self):
        for tok in ("iotk_no_such_key", self.jwt(ttl=-120), "garbage"):
            d = await self.dashboard(self.hub, token=False)
            await d.send({"type": "auth", "token": tok})
            m = await d.wait_for(lambda m: m.get("type") == "error", 5, "error")
            self.assertEqual(m.get("code"), "unauthorized", m)
            self.assertEqual(await d.wait_closed(5), 4401, tok[:30])

    async def test_first_message_without_scope_4403(self):
        for tok in (key("writer"), self.jwt(scope="commands:write")):
            d = await self.dashboard(self.hub, token=False)
            await d.send({"type": "auth", "token": tok})
            m = await d.wait_for(lambda m: m.get("type") == "error", 5, "error")
            self.assertEqual(m.get("code"), "forbidden", m)
            self.assertEqual(await d.wait_closed(5), 4403, tok[:30])

    async def test_subscribe_before_auth_4401(self):
        d = await self.dashboard(self.hub, token=False)
        await d.send({"type": "subscribe", "id": "s1", "stream": "raw"})
        m = await d.wait_for(lambda m: m.get("type") == "error", 5, "error")
        self.assertEqual(m.get("code"), "unauthorized", m)
        self.assertEqual(await d.wait_closed(5), 4401)
        # not even JSON: closed the same way (the error code may say bad_json)
        d = await self.dashboard(self.hub, token=False)
        await d.send("hello")
        m = await d.wait_for(lambda m: m.get("type") == "error", 5, "error")
        self.assertIn(m.get("code"), ("unauthorized", "bad_json"), m)
        self.assertEqual(await d.wait_closed(5), 4401)

    async def test_default_auth_timeout_not_early(self):
        d = await self.dashboard(self.hub, token=False)
        got = await d.collect(1.2)
        self.assertEqual(got, [], "messages before auth")
        self.assertIsNone(d.close_code, "closed within 1.2 s of a 5 s auth deadline")
        rep = await d.auth(key("reader"))
        self.assertEqual(rep.get("type"), "authenticated", rep)


class StreamAuthTimeout(StreamCase):
    async def check_timeout(self, hub):
        d = await self.dashboard(hub, token=False)
        t0 = time.monotonic()
        m = await d.wait_for(lambda m: m.get("type") == "error", 4, "auth_timeout error")
        self.assertEqual(m.get("code"), "auth_timeout", m)
        self.assertEqual(await d.wait_closed(3), 4408)
        el = time.monotonic() - t0
        self.assertGreater(el, 0.35, "closed after %.2fs with a 500 ms deadline" % el)
        self.assertLess(el, 2.5, "closed after %.2fs with a 500 ms deadline" % el)

    async def test_flag(self):
        redis = self.start_redis()
        hub = self.start_hub(redis, extra=["--api-keys", api_keys_file(KEYS), "--stream-auth-timeout-ms", "500"])
        await self.check_timeout(hub)
        # auth in time is not timed out later
        d = await self.dashboard(hub, token=False)
        rep = await d.auth(key("reader"))
        self.assertEqual(rep.get("type"), "authenticated", rep)
        got = await d.collect(0.8)
        self.assertEqual(got, [])
        self.assertIsNone(d.close_code)
        hub.stop()

    async def test_env(self):
        redis = self.start_redis()
        hub = self.start_hub(redis, extra=["--api-keys", api_keys_file(KEYS)],
                             env={"IOT_HUB_STREAM_AUTH_TIMEOUT_MS": "500"})
        await self.check_timeout(hub)
        hub.stop()


# --------------------------------------------------------------------------
# subscribe / unsubscribe

class StreamSubscribe(StreamCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis, extra=["--api-keys", api_keys_file(KEYS)])

    async def test_every_stream_name(self):
        d = await self.dashboard(self.hub)
        for st in ("raw", "1s", "10s", "1m", "presence", "commands"):
            rep = await d.subscribe("s-" + st, stream=st, filter={"devices": ["t-none"]})
            self.assertEqual(set(rep) - {"position"}, {"type", "id"}, rep)
            if st == "raw":
                self.assertRegex(rep.get("position", ""), POS_RE, rep)
        for st in ("raw", "1s", "10s", "1m", "presence", "commands"):
            self.assertEqual(await d.unsubscribe("s-" + st), {"type": "unsubscribed", "id": "s-" + st})

    async def test_unknown_stream(self):
        d = await self.dashboard(self.hub)
        for s in ("5s", "RAW", "", "telemetry"):
            rep = await d.subscribe("s-" + s, stream=s, expect="unknown_stream")
            self.assertIsInstance(rep.get("message"), str, rep)

    async def test_duplicate_id(self):
        dev = uniq("t-dup")
        d = await self.dashboard(self.hub)
        await d.subscribe("s1", filter={"devices": [dev]})
        await d.subscribe("s1", stream="presence", expect="duplicate_id")
        # the first one is still live
        gw = await self.gw_with(self.hub, [(dev, "thermostat")])
        await self.frame(gw, [thermo(dev, 20.0)])
        m = await d.wait_for(lambda m: m.get("type") == "reading", 5, "reading on s1")
        self.assertEqual(m.get("sub"), "s1")
        # after unsubscribe the id can be used again
        rep = await d.unsubscribe("s1")
        self.assertEqual(rep, {"type": "unsubscribed", "id": "s1"})
        await d.subscribe("s1", stream="presence")

    async def test_bad_filter(self):
        d = await self.dashboard(self.hub)
        cases = [({"devices": "t-1"}, "devices"),
                 ({"devices": [1, 2]}, "devices"),
                 ({"labels": {"site": 1}}, "labels"),
                 ({"labels": ["site"]}, "labels"),
                 ({"device_type": 5}, "device_type"),
                 ({"device_type": ["thermostat"]}, "device_type")]
        for i, (flt, field) in enumerate(cases):
            rep = await d.subscribe("b%d" % i, filter=flt, expect="bad_filter")
            self.assertIn(field, rep.get("message", ""), "%s: %s" % (flt, rep))
        # unknown filter keys are ignored
        await d.subscribe("ok", filter={"devices": ["t-x"], "colour": "red"})

    async def test_bad_since(self):
        d = await self.dashboard(self.hub)
        for i, s in enumerate(("yesterday", "12-ab", "-5", "1-2-3")):
            await d.subscribe("b%d" % i, since=s, expect="bad_since")
        # since is for raw only
        rep = await d.subscribe("agg", stream="1s", since="1-0", expect=None)
        self.assertEqual(rep.get("type"), "error", rep)
        self.assertIn(rep.get("code"), ("bad_since", "bad_message"), rep)

    async def test_unknown_id(self):
        d = await self.dashboard(self.hub)
        rep = await d.unsubscribe("nope")
        self.assertEqual((rep.get("type"), rep.get("code")), ("error", "unknown_id"), rep)

    async def test_group_by_on_raw_is_an_error(self):
        d = await self.dashboard(self.hub)
        rep = await d.subscribe("g", stream="raw", group_by="site", expect=None)
        self.assertEqual(rep.get("type"), "error", rep)
        self.assertIn(rep.get("code"), ("bad_message", "bad_filter"), rep)

    async def test_bad_messages(self):
        d = await self.dashboard(self.hub)
        await d.send("not json {")
        m = await d.wait_for(lambda m: m.get("type") == "error", 5, "error for bad JSON")
        self.assertEqual(m.get("code"), "bad_json", m)
        await d.send([1, 2])
        m = await d.wait_for(lambda m: m.get("type") == "error", 5, "error for a non-object")
        self.assertEqual(m.get("code"), "bad_message", m)
        await d.send({"id": "x"})
        m = await d.wait_for(lambda m: m.get("type") == "error", 5, "error for no type")
        self.assertEqual(m.get("code"), "bad_message", m)
        await d.send({"type": "frobnicate", "id": "x"})
        m = await d.wait_for(lambda m: m.get("type") == "error", 5, "error for an unknown type")
        self.assertEqual(m.get("code"), "unknown_type", m)
        await d.send({"type": "subscribe", "id": 7, "stream": "raw"})
        m = await d.wait_for(lambda m: m.get("type") in ("error", "subscribed"), 5, "answer to a numeric id")
        self.assertEqual((m.get("type"), m.get("code")), ("error", "bad_message"), m)
        for bad_id in ("", "x" * 65):
            await d.send({"type": "subscribe", "id": bad_id, "stream": "raw"})
            m = await d.wait_for(lambda m: m.get("type") in ("error", "subscribed"), 5, "answer to id %r" % bad_id)
            self.assertEqual(m.get("type"), "error", "id of %d characters: %s" % (len(bad_id), m))
        await d.subscribe("x" * 64, filter={"devices": ["t-none"]})
        # the connection survived all of it
        self.assertIsNone(d.close_code)

    async def test_too_many_subscriptions_default_64(self):
        d = await self.dashboard(self.hub)
        for i in range(64):
            await d.send({"type": "subscribe", "id": "s%d" % i, "stream": "raw", "filter": {"devices": ["t-none"]}})
        for i in range(64):
            await d.wait_for(lambda m, i=i: m.get("type") == "subscribed" and m.get("id") == "s%d" % i, 5,
                             "subscribed s%d" % i)
        await d.subscribe("s64", filter={"devices": ["t-none"]}, expect="too_many_subscriptions")
        await d.unsubscribe("s3")
        await d.subscribe("s64", filter={"devices": ["t-none"]})

    async def test_max_subscriptions_flag(self):
        redis = self.start_redis()
        hub = self.start_hub(redis, extra=["--api-keys", api_keys_file(KEYS), "--stream-max-subscriptions", "3"])
        d = await self.dashboard(hub)
        for i in range(3):
            await d.subscribe("s%d" % i, stream="presence")
        await d.subscribe("s3", stream="presence", expect="too_many_subscriptions")
        hub.stop()

    async def test_forbidden_exact_device_outside_key(self):
        t2 = "t-2" + uniq("x")
        d = await self.dashboard(self.hub, name="limited")
        await d.subscribe("f", filter={"devices": [t2]}, expect="forbidden")
        await d.subscribe("f2", filter={"devices": ["t-1" + uniq("x"), t2]}, expect="forbidden")
        # a prefix outside the patterns is narrowed (to nothing), not refused
        await d.subscribe("p", filter={"devices": ["t-2*"]})

    async def test_unsubscribe_stops_messages(self):
        dev = uniq("t-u")
        d = await self.dashboard(self.hub)
        await d.subscribe("a", filter={"devices": [dev]})
        await d.subscribe("b", filter={"devices": [dev]})
        gw = await self.gw_with(self.hub, [(dev, "thermostat")])
        await self.frame(gw, [thermo(dev, 20.0)])
        await d.gather(lambda g: {m.get("sub") for m in g if m.get("type") == "reading"} >= {"a", "b"}, 5,
                       "the reading on a and b")
        rep = await d.unsubscribe("a")
        self.assertEqual(rep, {"type": "unsubscribed", "id": "a"})
        for i in range(3):
            await self.frame(gw, [thermo(dev, 21.0 + i)])
        got = await d.until(lambda m: m.get("type") == "reading" and m.get("data") == {"temperature": 23.0},
                            5, "last reading on b")
        got += await d.collect(0.3)
        self.assertEqual([m for m in got if m.get("sub") == "a"], [], "messages for an unsubscribed id")
        self.assertEqual([m["data"]["temperature"] for m in got if m.get("type") == "reading"], [21.0, 22.0, 23.0])


class StreamRedisDown(StreamCase):
    async def test_unavailable_while_redis_down(self):
        redis = self.start_redis()
        hub = self.start_hub(redis, extra=["--api-keys", api_keys_file(KEYS)])
        d = await self.dashboard(hub)
        await d.subscribe("before", stream="presence")
        redis.kill()
        await asyncio.get_running_loop().run_in_executor(None, lambda: wait_until(
            lambda: http_get(hub, "/readyz")[0] == 503, 10, what="/readyz 503 after Redis died"))
        # Redis is down (and the hub knows it): subscribe is answered at once
        t0 = time.monotonic()
        rep = await d.subscribe("s", filter={"devices": ["t-none"]}, expect=None, timeout=3)
        self.assertEqual(rep.get("code"), "unavailable", rep)
        self.assertLess(time.monotonic() - t0, 3)
        self.assertIsNone(d.close_code, "dashboard closed because Redis went away")
        redis.restart()
        dev = uniq("t-rd")
        deadline = time.monotonic() + 15
        while True:
            rep = await d.subscribe("s", filter={"devices": [dev]}, expect=None)
            if rep.get("type") == "subscribed":
                break
            self.assertEqual(rep.get("code"), "unavailable", rep)
            self.assertLess(time.monotonic(), deadline, "subscribe not accepted 15 s after Redis came back")
            await asyncio.sleep(0.1)
        gw = await self.gw_with(hub, [(dev, "thermostat")])
        await self.frame(gw, [thermo(dev, 20.0)])
        m = await d.wait_for(lambda m: m.get("type") == "reading", 5, "a reading after Redis came back")
        self.assertEqual((m.get("sub"), m.get("device")), ("s", dev), m)
        hub.stop()


class StreamRetention(StreamCase):
    async def test_since_older_than_retention_replays_what_is_left(self):
        redis = self.start_redis()
        hub = self.start_hub(redis, extra=["--api-keys", api_keys_file(KEYS), "--feed-stream-maxlen", "100",
                                           "--device-rate", "0", "--stream-replay-page", "32"])
        dev = uniq("t-rt")
        gw = await self.gw_with(hub, [(dev, "thermostat")])
        pump = Pump(gw, 400, 1000.0, lambda i, ts: [thermo(dev, 20.0, ts=ts, humidity=i / 10.0)])
        await pump.run(20)
        pump.check(self)
        left = feed_entries(redis)
        self.assertLess(len(left), 400, "the feed was not trimmed (feed-stream-maxlen 100)")
        want = [(r["device"], r["ts"], json.dumps(r["data"], sort_keys=True), eid) for eid, _, _, rs in left for r in rs]
        d = await self.dashboard(hub)
        await d.subscribe("r", filter={"devices": [dev]}, since="1-0")
        got = await d.gather(lambda g: sum(m.get("type") == "reading" for m in g) >= len(want), 5, fail=False)
        got += await d.collect(0.3)
        have = [tuple_of(m) for m in got if m.get("type") == "reading"]
        self.assertTrue(have == want, "since before the retained feed: %s" % diff_readings(have, want))
        self.assertEqual([m for m in got if m.get("type") != "reading"], [])
        hub.stop()


class StreamNoFeed(StreamCase):
    async def test_feed_maxlen_0_positions(self):
        redis = self.start_redis()
        hub = self.start_hub(redis, extra=["--api-keys", api_keys_file(KEYS), "--feed-stream-maxlen", "0"])
        dev = uniq("t-nf")
        gw = await self.gw_with(hub, [(dev, "thermostat")])
        await self.frame(gw, [thermo(dev, 1.0)])
        d = await self.dashboard(hub)
        rep = await d.subscribe("live", filter={"devices": [dev]})
        self.assertEqual(rep.get("position"), "0-0", rep)
        rep = await d.subscribe("since", filter={"devices": [dev]}, since="0-0")
        await self.frame(gw, [thermo(dev, 2.0)])
        got = await d.gather(lambda g: {m.get("sub") for m in g if m.get("type") == "reading"} >= {"live", "since"},
                             5, "the live reading on both subscriptions")
        got += await d.collect(0.3)
        self.assertEqual(sorted((m["sub"], m["data"]["temperature"], m["pos"]) for m in got if m.get("type") == "reading"),
                         [("live", 2.0, "0-0"), ("since", 2.0, "0-0")], "without a feed `since` replays nothing")
        self.assertEqual(redis.cmd("EXISTS", rkeys.FEED), 0)
        hub.stop()


# --------------------------------------------------------------------------
# raw delivery: filters, content, positions

class StreamRaw(StreamCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis, extra=["--api-keys", api_keys_file(KEYS)])

    async def test_filters(self):
        p = uniq("t-f")
        devs = {p + "a1": ("thermostat", {"site": "b1", "floor": "1"}),
                p + "a2": ("thermostat", {"site": "b2"}),
                p + "b1": ("power-meter", {"site": "b1"}),
                p + "c1": ("thermostat", {}),
                p + "c2": ("door-sensor", {"site": "b1", "floor": "2"})}
        marker = p + "zz"
        subs = {"exact": {"devices": [p + "a1"]},
                "prefix": {"devices": [p + "a*"]},
                "multi": {"devices": [p + "a2", p + "c*"]},
                "type": {"devices": [p + "*"], "device_type": "power-meter"},
                "labels": {"devices": [p + "*"], "labels": {"site": "b1"}},
                "labels2": {"devices": [p + "*"], "labels": {"site": "b1", "floor": "1"}},
                "typelab": {"devices": [p + "*"], "device_type": "thermostat", "labels": {"site": "b1"}},
                "nolabel": {"devices": [p + "*"], "labels": {"floor": "3"}},
                "all": {"devices": [p + "*"], "other_key": 1}}

        def matches(dev, flt):
            typ, labels = devs.get(dev, ("thermostat", {}))
            if not any(dev == x or (x.endswith("*") and dev.startswith(x[:-1])) for x in flt["devices"]):
                return False
            if "device_type" in flt and typ != flt["device_type"]:
                return False
            return all(labels.get(k) == v for k, v in flt.get("labels", {}).items())

        d = await self.dashboard(self.hub)
        for sid, flt in subs.items():
            await d.subscribe(sid, filter=flt)
        gw = await self.gw_with(self.hub, [(dv, t, l) for dv, (t, l) in devs.items()] + [(marker, "thermostat")])

        def r(dv, i):
            typ = devs[dv][0]
            if typ == "thermostat":
                return thermo(dv, 20.0 + i)
            if typ == "power-meter":
                return {"device": dv, "ts": now_ms(), "data": {"voltage_v": 230.0, "current_a": 1.5,
                                                              "power_w": 345.0 + i, "energy_wh": 10 + i}}
            return {"device": dv, "ts": now_ms(), "data": {"open": bool(i % 2)}}

        sent = []  # (frame index, reading)
        order = list(devs)
        for i, group in enumerate([order, order[::-1], order[1:3]]):
            rs = [r(dv, i) for dv in group]
            await self.frame(gw, rs)
            sent += [(i, x) for x in rs]
        await self.frame(gw, [thermo(marker, 30.0)])
        sent.append((3, thermo(marker, 30.0)))
        pos = [self.feed_pos(self.redis, gw.sub, seq) for seq in range(1, 5)]
        got = await d.until(lambda m: m.get("type") == "reading" and m.get("device") == marker, 5,
                            "the marker reading on 'all'")
        got += await d.collect(0.3)
        subs_got = by_sub(got)
        def key_(dv, data):
            return (dv, json.dumps(data, sort_keys=True))

        for sid, flt in subs.items():
            # frames in order; within a frame, readings of several device types
            # come as one Redis message per type: compare each frame as a set
            want = [(pos[i], key_(x["device"], x["data"])) for i, x in sent
                    if matches(x["device"], flt) or (sid == "all" and x["device"] == marker)]
            have = [(m["pos"], key_(m["device"], m["data"])) for m in subs_got.get(sid, [])]
            self.assertEqual([p_ for p_, _ in have], sorted((p_ for p_, _ in have), key=pkey),
                             "subscription %s: positions out of order" % sid)
            self.assertEqual(sorted(have), sorted(want), "subscription %s %s" % (sid, json.dumps(flt)))

    async def test_key_patterns_limit_empty_filter(self):
        t1, t2 = "t-1" + uniq("k"), "t-2" + uniq("k")
        d = await self.dashboard(self.hub, name="limited")
        await d.subscribe("all", filter={})
        await d.subscribe("wide", filter={"devices": ["t-*"]})
        await d.subscribe("typ", filter={"device_type": "thermostat"})
        gw = await self.gw_with(self.hub, [(t1, "thermostat"), (t2, "thermostat")])
        await self.frame(gw, [thermo(t2, 20.0)])
        await self.frame(gw, [thermo(t2, 20.5), thermo(t1, 21.0)])
        await self.frame(gw, [thermo(t1, 22.0)])
        got = await d.gather(lambda g: {m.get("sub") for m in g if m.get("type") == "reading"
                                        and m.get("data") == {"temperature": 22.0}} >= {"all", "wide", "typ"},
                             5, "the last t-1 reading on all, wide and typ")
        got += await d.collect(0.3)
        for sid, ms in by_sub(got).items():
            self.assertEqual([m["device"] for m in ms if m["device"] in (t1, t2)], [t1, t1],
                             "key limited to t-1*, subscription %s" % sid)
            self.assertEqual([m["device"] for m in ms if not m["device"].startswith("t-1")], [],
                             "key limited to t-1* saw other devices on %s" % sid)

    async def test_key_patterns_limit_presence(self):
        t1, t2 = "t-1" + uniq("kp"), "t-2" + uniq("kp")
        d = await self.dashboard(self.hub, name="limited")
        await d.subscribe("p", stream="presence", filter={})
        gw = await self.gateway(self.hub)
        for dv in (t2, t1):  # two announces: t2's event is published first
            rep = await gw.announce([(dv, "thermostat")])
            self.assertEqual(rep.get("accepted"), [dv], rep)
        got = await d.until(lambda m: m.get("type") == "presence" and m.get("device") == t1, 5, "presence of t-1")
        got += await d.collect(0.3)
        self.assertEqual([m["device"] for m in got if m.get("type") == "presence" and not m["device"].startswith("t-1")],
                         [], "key limited to t-1* saw presence of other devices")

    async def test_reading_fields_and_pos(self):
        a, b = uniq("t-c"), uniq("t-c")
        d = await self.dashboard(self.hub)
        sub = await d.subscribe("r", filter={"devices": [a, b]})
        start = sub["position"]
        gw = await self.gw_with(self.hub, [(a, "thermostat", {"site": "x"}), (b, "thermostat")])
        t = now_ms()
        frames = [[thermo(a, 21.25, ts=t - 1000, humidity=40.5), thermo(b, -3.75, ts=t - 500),
                   thermo(a, 22.0, ts=t - 2000)],
                  [thermo(b, 100.0, ts=None, humidity=0)],
                  [thermo(a, 0.1, ts=t, humidity=99.9)]]
        seqs = [await self.frame(gw, rs) for rs in frames]
        n = sum(len(rs) for rs in frames)
        got = []
        while len(got) < n:
            got.append(await d.wait_for(lambda m: m.get("type") == "reading", 5,
                                        "reading %d of %d" % (len(got) + 1, n)))
        extra = [m for m in await d.collect(0.3) if m.get("type") == "reading"]
        self.assertEqual(extra, [], "more readings than sent")
        i = 0
        for seq, rs in zip(seqs, frames):
            pos = self.feed_pos(self.redis, gw.sub, seq)
            stored = None
            for r in rs:
                m = got[i]
                i += 1
                self.assertEqual(set(m), {"type", "sub", "device", "ts", "data", "pos"}, m)
                self.assertEqual((m["sub"], m["device"], m["data"]), ("r", r["device"], r["data"]), m)
                if "ts" in r:
                    self.assertEqual(m["ts"], r["ts"], m)
                else:  # hub-stamped: the stored ts
                    stored = stored or xrange_from(self.redis, rkeys.tm(r["device"]))
                    self.assertEqual(m["ts"], int(stored[-1][1]["ts"]), (m, stored[-1]))
                    self.assertLess(abs(m["ts"] - now_ms()), 60000, m)
                self.assertEqual(m["pos"], pos, "reading of frame %d: pos %s, iot:feed id %s" % (seq, m["pos"], pos))
                self.assert_pos_after(m["pos"], start, "reading after subscribed.position")


# --------------------------------------------------------------------------
# several instances: fan-out, presence, aggregates

class StreamMulti(StreamCase):
    def setUp(self):
        super().setUp()
        self.redis = self.start_redis()

    def hubs(self, n, extra=()):
        out = []
        for i in range(n):
            out.append(self.start_hub(self.redis, extra=["--api-keys", api_keys_file(KEYS),
                                                         "--instance-id", "hub-%s" % "abc"[i]] + list(extra)))
        return out

    async def test_fan_out_and_presence_across_instances(self):
        a, b = self.hubs(2)
        p = uniq("t-x")
        d1, d2 = p + "1", p + "2"
        dash = await self.dashboard(b)
        rsub = await dash.subscribe("r", filter={"devices": [p + "*"]})
        await dash.subscribe("p", stream="presence", filter={"devices": [d1]})
        await dash.subscribe("pall", stream="presence", filter={"devices": [p + "*"], "labels": {"site": "b7"}})
        gw = await self.gateway(a)
        rep = await gw.announce([(d2, "thermostat", {"site": "b8"})])
        self.assertEqual(rep.get("accepted"), [d2], rep)
        t_ann = now_ms()
        rep = await gw.announce([(d1, "thermostat", {"site": "b7"})])
        self.assertEqual(rep.get("accepted"), [d1], rep)
        got = await dash.gather(lambda g: {m.get("sub") for m in g if m.get("type") == "presence"} >= {"p", "pall"},
                                5, "presence online on instance b (p and pall)")
        pres = [m for m in got if m.get("type") == "presence"]
        self.assertEqual(sorted((m["sub"], m["device"], m["online"]) for m in pres),
                         [("p", d1, True), ("pall", d1, True)], pres)
        m = pres[0]
        self.assertEqual((m.get("gateway"), m.get("device_type")), (gw.sub, "thermostat"), m)
        self.assertLessEqual(abs(m.get("at", 0) - t_ann), 5000, m)
        seq = 0
        sent = []
        for i in range(5):
            seq += 1
            rs = [thermo(d1, 20.0 + i), thermo(d2, 30.0 + i)]
            rep = await gw.telemetry(seq, rs)
            self.assertEqual(rep.get("accepted"), 2, rep)
            sent += rs
        got = []
        while len([m for m in got if m.get("type") == "reading"]) < len(sent):
            got.append(await dash.wait_for(lambda m: m.get("type") == "reading", 5, "reading on instance b"))
        self.assertEqual([(m["device"], m["ts"], m["data"]) for m in got],
                         [(r["device"], r["ts"], r["data"]) for r in sent])
        for m in got:
            self.assert_pos_after(m["pos"], rsub["position"])
        await gw.close()
        got = await dash.gather(lambda g: {m.get("sub") for m in g if m.get("type") == "presence"} >= {"p", "pall"},
                                5, "presence offline on instance b (p and pall)")
        pres = [m for m in got if m.get("type") == "presence"]
        self.assertEqual(sorted((m["sub"], m["device"], m["online"]) for m in pres),
                         [("p", d1, False), ("pall", d1, False)], pres)
        got = await dash.collect(0.3)
        self.assertEqual([m for m in got if m.get("type") == "presence"], [], "presence of a filtered-out device")

    async def test_presence_offline_only_from_the_owner(self):
        a, b = self.hubs(2)
        dev = uniq("t-to")
        dash = await self.dashboard(a)
        await dash.subscribe("p", stream="presence", filter={"devices": [dev]})
        first = await self.gateway(a)
        rep = await first.announce([(dev, "thermostat")])
        self.assertEqual(rep.get("accepted"), [dev], rep)
        second = await self.gateway(b)  # another gateway takes the device over
        rep = await second.announce([(dev, "thermostat")])
        self.assertEqual(rep.get("accepted"), [dev], rep)
        got = await dash.gather(lambda g: sum(m.get("type") == "presence" for m in g) >= 2, 5,
                                "online from both gateways")
        # the first gateway no longer owns the device: its close is not an offline
        await first.close()
        wait_until(lambda: self.redis.cmd("HGET", rkeys.dev(dev), "gateway") == second.sub, 2,
                   what="device owned by the second gateway")
        got += await dash.collect(0.5)
        await second.close()
        got += await dash.until(lambda m: m.get("type") == "presence" and m.get("online") is False, 5,
                                "offline after the owner closed")
        got += await dash.collect(0.3)
        self.assertEqual([(m["device"], m["online"], m.get("gateway")) for m in got if m.get("type") == "presence"],
                         [(dev, True, first.sub), (dev, True, second.sub), (dev, False, second.sub)])

    async def test_aggregates_merged_across_instances(self):
        grace = 600  # small to keep the test short; partials travel within ~100 ms
        a, b, c = self.hubs(3, extra=["--aggregate-grace-ms", str(grace)])
        p = uniq("t-g")
        devs = {p + "1": (a, "thermostat", {"site": "b1"}),
                p + "2": (b, "thermostat", {"site": "b1"}),
                p + "3": (b, "power-meter", {"site": "b2", "floor": "1"}),
                p + "4": (a, "thermostat", {})}
        dash = await self.dashboard(c)
        await dash.subscribe("dev1s", stream="1s", filter={"devices": [p + "*"]})
        await dash.subscribe("site10s", stream="10s", filter={"devices": [p + "*"]}, group_by="site")
        await dash.subscribe("b1only", stream="1s", filter={"devices": [p + "*"], "labels": {"site": "b1"}},
                             group_by="site")
        gws = {}
        for h in (a, b):
            mine = [(dv, typ, lab) for dv, (hh, typ, lab) in devs.items() if hh is h]
            gws[h] = await self.gw_with(h, mine)
        # a future second S (and S+1) that has not begun: every reading is stored
        # before its 1 s window ends, whatever the scheduling
        now = time.time()
        S = int(now) + 1
        base = {0: S * 1000, 1: (S + 1) * 1000}
        plan = []  # (device, ts, data) in send order per device
        for k, dv in enumerate(devs):
            typ = devs[dv][1]
            for sec in (0, 1):
                offs = [700 + k * 11, 150 + k * 13, 420 + k * 17]  # out of ts order on purpose
                for j, off in enumerate(offs):
                    ts = base[sec] + off
                    v = 10.0 + k * 3 + sec * 1.5 + j * 0.25
                    if typ == "thermostat":
                        data = {"temperature": v, "humidity": 40 + j + k}
                    else:
                        data = {"voltage_v": 230.0 + j, "current_a": v, "power_w": v * 100,
                                "energy_wh": 1000 + 10 * sec + j, "phase": "L1", "relay_closed": True,
                                "harmonics_pct": [1.0, 2.0]}
                    plan.append((dv, ts, data))
        # a tie on the latest ts of p1 in second S: the later stored one is `last`
        tie_ts = base[0] + 990
        plan.append((p + "1", tie_ts, {"temperature": 55.0, "humidity": 10}))
        plan.append((p + "1", tie_ts, {"temperature": 56.0, "humidity": 11}))
        order = {}
        for i, (dv, ts, data) in enumerate(plan):
            gw = gws[devs[dv][0]]
            await self.frame(gw, [{"device": dv, "ts": ts, "data": data}])
            order[(dv, ts, json.dumps(data))] = i
        # a reading of second S must be stored before S's partial is published
        # (about 100 ms after S ends), or it only counts in a late partial
        self.assertLess(time.time(), S + 0.8, "test too slow: readings sent %.2fs after second S began"
                        % (time.time() - S))

        def rows(pred):
            return [(ts, order[(dv, ts, json.dumps(data))], data) for dv, ts, data in plan if pred(dv, ts)]

        want_1s = {}
        for dv in devs:
            for sec in (0, 1):
                st = base[sec]
                want_1s[(dv, st)] = expected_metrics(rows(lambda x, ts: x == dv and st <= ts < st + 1000))
        want_10s = {}
        for dv, ts, _ in plan:
            w = ts // 10000 * 10000
            site = devs[dv][2].get("site")
            want_10s[(site, w)] = None
        for (site, w) in want_10s:
            want_10s[(site, w)] = expected_metrics(rows(
                lambda x, ts: devs[x][2].get("site") == site and w <= ts < w + 10000))
        want_b1 = {}
        for sec in (0, 1):
            st = base[sec]
            want_b1[("b1", st)] = expected_metrics(rows(
                lambda x, ts: devs[x][2].get("site") == "b1" and st <= ts < st + 1000))

        last_end = max(w for _, w in want_10s) + 10000
        timeout = (last_end + grace) / 1000.0 - time.time() + 4
        got = []
        seen_10s = set()

        def is_10s(m):
            if m.get("type") == "aggregate" and m.get("sub") == "site10s":
                seen_10s.add((m.get("group", {}).get("site"), m.get("start")))
            return len(seen_10s & set(want_10s)) == len(want_10s)

        got = await dash.until(is_10s, timeout, "every 10 s group aggregate")
        got += await dash.collect(0.5)
        self.assertEqual([m for m in got if m.get("type") not in ("aggregate",)], [], "non-aggregate messages")
        aggs = by_sub(got, "aggregate")

        def check(sid, window, want, keyf, what):
            have = {}
            for m in aggs.get(sid, []):
                self.assertEqual(m.get("window"), window, m)
                self.assertEqual(m["start"] % (1000 if window == "1s" else 10000), 0, m)
                k = keyf(m)
                self.assertNotIn(k, have, "two aggregates for %s %s: %s / %s" % (what, k, have.get(k), m))
                have[k] = m["metrics"]
            self.assertEqual(sorted(have, key=repr), sorted(want, key=repr), "%s windows" % what)
            for k, metrics in want.items():
                h = have[k]
                self.assertEqual(sorted(h), sorted(metrics), "%s %s fields: %s" % (what, k, h))
                for f, exp in metrics.items():
                    for stat in ("count", "min", "max", "last"):
                        self.assertEqual(h[f][stat], exp[stat], "%s %s %s.%s: %s" % (what, k, f, stat, h[f]))
                    self.assertAlmostEqual(h[f]["avg"], exp["avg"], 6, "%s %s %s.avg" % (what, k, f))

        def dev_key(m):
            self.assertNotIn("group", m, m)
            return (m.get("device"), m.get("start"))

        def group_key(m):
            self.assertNotIn("device", m, m)
            self.assertEqual(set(m.get("group", {})), {"site"}, m)
            return (m["group"]["site"], m.get("start"))

        check("dev1s", "1s", want_1s, dev_key, "1s per device")
        check("site10s", "10s", want_10s, group_key, "10s by site")
        check("b1only", "1s", want_b1, group_key, "1s by site, labels site=b1")
        self.assertEqual(want_1s[(p + "1", base[0])]["temperature"]["last"], 56.0)  # the test's own premise

        # a reading for second S now is late everywhere: its partial is
        # dropped and counted by the merging instance, nothing is re-emitted
        def late():
            return metric_value(parse_metrics(http_get(c, "/metrics")[2]), "iot_hub_aggregate_late_partials_total") or 0
        late0 = late()
        await self.frame(gws[a], [{"device": p + "1", "ts": base[0] + 5, "data": {"temperature": 99.0}}])
        await asyncio.get_running_loop().run_in_executor(None, lambda: wait_until(
            lambda: late() > late0, 5, what="iot_hub_aggregate_late_partials_total to grow on the merging instance"))
        got = await dash.collect(0.5)
        self.assertEqual([m for m in got if m.get("start") in (base[0], max(want_10s)[1])], [],
                         "an aggregate re-emitted for a window already sent")
        for h in (a, b, c):
            h.stop()


# --------------------------------------------------------------------------
# since: replay + live, reconnect

class StreamRecovery(StreamCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis, extra=["--api-keys", api_keys_file(KEYS), "--stream-replay-page", "16",
                                                         "--device-rate", "0"])

    def stored_after(self, gw_sub, after, devices):
        out = []
        for eid, g, seq, rs in feed_entries(self.redis, "(" + after):
            if g != gw_sub:
                continue
            for r in rs:
                if r["device"] in devices:
                    out.append((r["device"], r["ts"], json.dumps(r["data"], sort_keys=True), eid))
        return out

    async def test_since_replay_then_live_while_frames_flow(self):
        dev, other = uniq("t-rp"), uniq("t-rq")
        gw = await self.gw_with(self.hub, [(dev, "thermostat"), (other, "thermostat")])
        n, rate = 700, 200.0

        def make(i, ts):
            rs = [thermo(dev, 20.0 + (i % 500) / 100.0, ts=ts, humidity=i / 10.0)]
            if i % 3 == 0:
                rs.append(thermo(other, 5.0, ts=ts))
            return rs

        pump = Pump(gw, n, rate, make)
        task = asyncio.ensure_future(pump.run(n / rate + 15))
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: wait_until(lambda: len(pump.acks) >= 200, 10, what="200 acks"))
            since = self.feed_pos(self.redis, gw.sub, 20)
            d = await self.dashboard(self.hub)
            await d.subscribe("r", filter={"devices": [dev]}, since=since)
        finally:
            await task
        pump.check(self)
        want = self.stored_after(gw.sub, since, {dev})
        self.assertEqual(len(want), n - 20)
        got = await d.gather(lambda g: sum(m.get("type") == "reading" for m in g) >= len(want), 10, fail=False)
        got += await d.collect(0.3)
        self.assertEqual([m for m in got if m.get("type") != "reading"], [], "other messages (gap?) in a replay")
        have = [tuple_of(m) for m in got]
        self.assertTrue(have == want, "since-replay + live != stored after %s (replay pages of 16): %s"
                        % (since, diff_readings(have, want)))

    async def test_since_replay_over_two_shards_keeps_live_of_the_short_one(self):
        """Two ingest shards: a `since` replay pages through many entries of
        shard 0 (pages of 16: many rounds) while frames keep arriving in
        shard 1, read to its end in the first round. Its live readings held
        meanwhile must survive the later rounds (they were dropped at every
        round's start, and shard 1 was not read again: lost)."""
        if harness.CLUSTER_MODE:
            self.skipTest("its own Redis with two feed shards")
        redis = self.start_redis()
        hub = self.start_hub(redis, extra=["--api-keys", api_keys_file(KEYS), "--stream-replay-page", "16",
                                           "--device-rate", "0", "--feed-shards", "2"])
        subs = {}
        i = 0
        while len(subs) < 2:
            g = uniq("gsh%d" % i)
            i += 1
            subs.setdefault(rkeys.shard_of(g, 2), g)
        a, b = uniq("t-sa"), uniq("t-sb")
        ga = await self.gw_with(hub, [(a, "thermostat")], sub=subs[0])
        gb = await self.gw_with(hub, [(b, "thermostat")], sub=subs[1])
        # shard 1: 5 old entries (read to the end in the first round);
        # shard 0: many more after them (pages for many rounds)
        for i in range(5):
            await self.frame(gb, [thermo(b, 20.0, humidity=i / 10.0)])
        na = 3000
        pa = Pump(ga, na, 4000.0, lambda i, ts: [thermo(a, 20.0, ts=ts, humidity=(i % 1000) / 10.0)])
        await pa.run(30)
        pa.check(self)
        # the replay of ~190 rounds starts; shard 1's new frames arrive live
        # meanwhile (held), after its 5 old entries went out in round 1
        d = await self.dashboard(hub)
        await d.send({"type": "subscribe", "id": "r", "stream": "raw",
                      "filter": {"devices": [a, b]}, "since": "0-0"})
        nb, rate = 200, 400.0
        pb = Pump(gb, nb, rate, lambda i, ts: [thermo(b, 20.0, ts=ts, humidity=(100 + i) / 10.0)],
                  first_seq=6)
        await pb.run(nb / rate + 15)
        pb.check(self)
        total = na + 5 + nb
        got = await d.gather(lambda g: sum(m.get("type") == "reading" for m in g) >= total, 10, fail=False)
        got += await d.collect(0.3)
        self.assertEqual([m for m in got if m.get("type") not in ("reading", "subscribed")], [],
                         "a gap in a replay")
        per = {}
        for m in got:
            if m.get("type") == "reading":
                per.setdefault(m["device"], []).append(round(m["data"]["humidity"] * 10))
        self.assertEqual(per.get(a), [i % 1000 for i in range(na)], "shard 0: all, once, in order")
        self.assertEqual(sorted(per.get(b, [])), list(range(5)) + list(range(100, 100 + nb)),
                         "shard 1: every reading once (live ones held during the replay included)")

    async def test_reconnect_with_last_pos_loses_nothing(self):
        dev = uniq("t-rc")
        gw = await self.gw_with(self.hub, [(dev, "thermostat")])
        before = await self.frame(gw, [thermo(dev, 1.0)])
        d1 = await self.dashboard(self.hub)
        rep = await d1.subscribe("r", filter={"devices": [dev]})
        self.assert_pos_after(rep["position"], "0-0")
        self.assertGreaterEqual(pkey(rep["position"]), pkey(self.feed_pos(self.redis, gw.sub, before)),
                                "position %s is before a frame stored before subscribe" % rep["position"])
        for i in range(10):
            await self.frame(gw, [thermo(dev, 10.0 + i)])
        got1 = []
        while len(got1) < 6:
            got1.append(await d1.wait_for(lambda m: m.get("type") == "reading", 5, "reading"))
        self.assertEqual([m["data"]["temperature"] for m in got1], [10.0, 11.0, 12.0, 13.0, 14.0, 15.0],
                         "readings at or before `position` must not be sent; then all in order")
        last = got1[-1]["pos"]
        await d1.close()
        for i in range(10, 15):
            await self.frame(gw, [thermo(dev, 10.0 + i)])
        d2 = await self.dashboard(self.hub)
        await d2.subscribe("r", filter={"devices": [dev]}, since=last)
        for i in range(15, 18):
            await self.frame(gw, [thermo(dev, 10.0 + i)])
        got2 = await d2.until(lambda m: m.get("type") == "reading" and m["data"]["temperature"] == 27.0, 5,
                              "last reading after reconnect")
        got2 += await d2.collect(0.3)
        self.assertEqual([m["data"]["temperature"] for m in got2 if m.get("type") == "reading"],
                         [10.0 + i for i in range(6, 18)])
        # since 0-0: everything still stored
        d3 = await self.dashboard(self.hub)
        await d3.subscribe("all", filter={"devices": [dev]}, since="0-0")
        got3 = await d3.until(lambda m: m.get("type") == "reading" and m["data"]["temperature"] == 27.0, 5,
                              "replay from 0-0")
        self.assertEqual([m["data"]["temperature"] for m in got3 if m.get("type") == "reading"],
                         [1.0] + [10.0 + i for i in range(18)])

    async def test_redis_pubsub_reconnect_loses_nothing(self):
        dev = uniq("t-ps")
        gw = await self.gw_with(self.hub, [(dev, "thermostat")])
        d = await self.dashboard(self.hub)
        rep = await d.subscribe("r", filter={"devices": [dev]})
        start = rep["position"]
        await d.subscribe("p", stream="presence", filter={"devices": [dev]})
        n, rate = 400, 200.0
        pump = Pump(gw, n, rate, lambda i, ts: [thermo(dev, 20.0, ts=ts, humidity=i / 10.0)])
        task = asyncio.ensure_future(pump.run(n / rate + 15))
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: wait_until(lambda: len(pump.acks) >= 100, 10, what="100 acks"))
            killed = self.redis.cmd("CLIENT", "KILL", "TYPE", "pubsub")
            self.assertGreaterEqual(killed, 1, "no pub/sub connection to kill")
        finally:
            await task
        pump.check(self)
        want = self.stored_after(gw.sub, start, {dev})
        self.assertEqual(len(want), n)
        got = await d.gather(lambda g: sum(m.get("type") == "reading" for m in g) >= n
                             and any(m.get("type") == "gap" for m in g), 10, fail=False)
        got += await d.collect(0.3)
        have = [tuple_of(m) for m in got if m.get("type") == "reading"]
        self.assertTrue(have == want, "readings across a pub/sub reconnect: %s" % diff_readings(have, want))
        gaps = [m for m in got if m.get("type") == "gap"]
        self.assertEqual([(m.get("sub"), m.get("dropped"), m.get("reason")) for m in gaps],
                         [("p", 0, "redis")], "gaps after a Redis pub/sub reconnect")


# --------------------------------------------------------------------------
# slow subscribers

def big_reading(device, i, ts):
    """A power-meter reading whose stream message is about 800 bytes."""
    return {"device": device, "ts": ts,
            "data": {"voltage_v": 230.123456789012, "current_a": 1.5 + (i % 100) / 100.0,
                     "power_w": 345.678901234567, "energy_wh": i, "phase": "L1",
                     "harmonics_pct": [round(1.0 + k * 1.23456789012345, 12) for k in range(40)]}}


class StreamSlow(StreamCase):
    NDEV = 20

    async def run_slow(self, policy, limit):
        redis = self.start_redis()
        extra = ["--api-keys", api_keys_file(KEYS), "--device-rate", "0"] + list(limit)
        if policy:
            extra += ["--stream-slow-policy", policy]
        hub = self.start_hub(redis, extra=extra)
        p = uniq("t-s")
        devs = ["%s-%02d" % (p, i) for i in range(self.NDEV)]
        marker = p + "-zz"
        # no permessage-deflate: the test measures the stall, not compression CPU
        gw = await self.gw_with(hub, [(dv, "power-meter") for dv in devs] + [(marker, "thermostat")],
                                compression=None)
        stalled = await asyncio.to_thread(RawDashboard, hub.port, key("reader"))
        self.addCleanup(stalled.close)
        stalled.send_json({"type": "subscribe", "id": "slow", "stream": "raw", "filter": {"devices": [p + "*"]}})
        rep = await asyncio.to_thread(stalled.recv, 5)
        self.assertEqual(rep[0], "text", rep)
        self.assertEqual((rep[1].get("type"), rep[1].get("id")), ("subscribed", "slow"), rep)
        good = await self.dashboard(hub, compression=None)
        await good.subscribe("fast", filter={"devices": [p + "*"]})

        # ~800-byte messages: a few MB in all, more than the kernel buffers of
        # a loopback connection hold (the hub's send buffer grows to MBs)
        frames, rate = (300, 100.0)
        total = frames * self.NDEV
        recv = []   # (latency ms or None, message)

        async def reader():
            while True:
                try:
                    raw = await good.ws.recv()
                except websockets.exceptions.ConnectionClosed:
                    return
                m = json.loads(raw)
                recv.append((now_ms() - m["ts"] if m.get("type") == "reading" else None, m))

        rtask = asyncio.ensure_future(reader())
        pump = Pump(gw, frames, rate, lambda i, ts: [big_reading(dv, i, ts) for dv in devs])
        try:
            await pump.run(frames / rate + 10)
            last = pump.sent[frames][1][-1]
            deadline = time.monotonic() + 5
            while not any(m.get("device") == last["device"] and m.get("ts") == last["ts"] for _, m in recv[-50:]):
                if time.monotonic() > deadline or rtask.done():
                    break
                await asyncio.sleep(0.02)
        finally:
            rtask.cancel()
            try:
                await rtask
            except asyncio.CancelledError:
                pass
        pump.check(self)
        lat = sorted(pump.ack_latencies())
        self.assertLess(lat[-1], 1.0, "ack latency up to %.3fs (median %.3fs) while a dashboard stalls"
                        % (lat[-1], lat[len(lat) // 2]))
        others = [m for l_, m in recv if l_ is None]
        self.assertEqual(others, [], "the normal dashboard got non-readings")
        want = [(r["device"], r["ts"], json.dumps(r["data"], sort_keys=True), None)
                for seq in sorted(pump.sent) for r in pump.sent[seq][1]]
        have = [(m["device"], m["ts"], json.dumps(m["data"], sort_keys=True), None) for _, m in recv]
        self.assertTrue(have == want, "normal dashboard next to a stalled one: %s" % diff_readings(have, want))
        rl = sorted(l_ for l_, _ in recv)
        self.assertLess(rl[-1], 1000, "reading latency on the normal dashboard: max %d ms, p99 %d, median %d"
                        % (rl[-1], rl[len(rl) * 99 // 100], rl[len(rl) // 2]))
        return hub, gw, stalled, good, pump, total, marker

    async def test_stalled_subscriber_gets_gap(self):
        hub, gw, stalled, good, pump, total, marker = await self.run_slow(None, ["--stream-queue-max", "256"])
        rep = await gw.telemetry(pump.first_seq + pump.n, [thermo(marker, 30.0)])
        self.assertEqual(rep.get("accepted"), 1, rep)
        await good.wait_for(lambda m: m.get("device") == marker, 5, "marker on the normal dashboard")

        def drain():
            out = []
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                r = stalled.recv(deadline - time.monotonic())
                if r[0] != "text":
                    return out, r
                out.append(r[1])
                if r[1].get("device") == marker:
                    return out, None
            return out, ("timeout",)

        msgs, end = await asyncio.to_thread(drain)
        self.assertIsNone(end, "stalled dashboard: stream ended with %r after %d messages" % (end, len(msgs)))
        gaps = [m for m in msgs if m.get("type") == "gap"]
        readings = [m for m in msgs if m.get("type") == "reading"]
        self.assertTrue(gaps, "no gap after %d readings of %d" % (len(readings), total + 1))
        for g in gaps:
            self.assertEqual(g.get("sub"), "slow", g)
            self.assertGreater(g.get("dropped", 0), 0, g)
        dropped = sum(g["dropped"] for g in gaps)
        self.assertEqual(len(readings) + dropped, total + 1,
                         "received %d + dropped %d != sent %d" % (len(readings), dropped, total + 1))
        # each gap is followed by a reading of its subscription
        for i, m in enumerate(msgs):
            if m.get("type") == "gap":
                self.assertEqual([x.get("type") for x in msgs[i + 1:i + 2]], ["reading"], msgs[i:i + 2])
        # what arrived is in order (oldest dropped, never reordered)
        # (device, ts) -> the send positions of the readings with it, in
        # order (two readings of a device may share a ms); the marker sorts last.
        order = {}
        for k, r in enumerate(r for seq in sorted(pump.sent) for r in pump.sent[seq][1]):
            order.setdefault((r["device"], r["ts"]), []).append(k)
        idx, last = [], -1
        for m in readings:  # the first position after the previous one that fits
            ks = [k for k in order.get((m["device"], m["ts"]), []) if k > last]
            last = ks[0] if ks else (1 << 62 if (m["device"], m["ts"]) not in order else -1)
            idx.append(last)
        self.assertEqual(idx, sorted(idx), "stalled dashboard's readings out of order")
        hub.stop()

    async def test_stalled_subscriber_closed_4008(self):
        hub, gw, stalled, good, pump, total, marker = await self.run_slow("close", ["--stream-queue-max-bytes", "262144"])

        def drain():
            n = 0
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                r = stalled.recv(deadline - time.monotonic())
                if r[0] != "text":
                    return n, r
                n += 1
            return n, ("timeout",)

        n, end = await asyncio.to_thread(drain)
        self.assertEqual(end[:2], ("close", 4008), "stalled dashboard under policy close: %r after %d messages"
                         % (end, n))
        self.assertLess(n, total, "the stalled dashboard got everything: it was never slow")
        # the normal one is still open and served
        self.assertIsNone(good.close_code)
        rep = await gw.telemetry(pump.first_seq + pump.n, [thermo(marker, 30.0)])
        self.assertEqual(rep.get("accepted"), 1, rep)
        await good.wait_for(lambda m: m.get("device") == marker, 5, "marker on the normal dashboard")
        hub.stop()


if __name__ == "__main__":
    main()
