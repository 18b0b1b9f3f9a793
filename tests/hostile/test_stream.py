"""Hostile dashboard clients (/v1/stream, docs/dashboard.md "Limits and
hostile input"): binary messages (1003), unmasked frames (the lws 4.1.6
limitation), oversized and fragmented messages (1009), the filter caps and
the per-connection memory bound they give, subscribe/unsubscribe floods
(made-up device types included), and auth floods before auth. After each
attack: assert_unharmed() (tests/hostile/hostile.py) with the bounds below.

Bounds (normal build; under ASan, hostile.san_kib() scales them and adds
the quarantine):
  RSS_MIB = 32: hub resident memory after an attack. Idle: about 7.8 MiB;
      measured at most 22.9 MiB, after the memory-bound test's 8 maximal
      dashboards (1.8 MiB each); the other attacks leave it under 11 MiB.
  REDIS_MIB = 2: Redis growth during an attack (dashboards write nothing;
      the canary's reading and connection counters): measured at most
      0.32 MiB.
  CONN_FILTER_MIB = 2.5: hub memory per dashboard connection whose 64
      subscriptions hold the whole default filter budget (4,096 entries) in
      the costliest shape (128-byte ids, 128/256-byte labels); measured
      1.8 MiB. Before the caps, 64 subscriptions of 4,000 ids cost
      51 MiB and 64 of ~7,800 short ids (64 KiB messages) 100 MiB.
"""

import asyncio
import itertools
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hostile import (metric, OP_BINARY, OP_CONT, OP_TEXT, HostileCase, RawWs,  # noqa: E402
                     connect_gateway, http_get, main, rss_kib, san_kib, ws_frame)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "integration"))
from harness import SCHEMAS_DIR, api_keys_file, connect_dashboard, mkdtemp, now_ms, write_file  # noqa: E402

RSS_MIB = 32
REDIS_MIB = 2
CONN_FILTER_MIB = 2.5
READER = "iotk_hostile_reader_0001"
KEYS = {"reader": (READER, ["telemetry:read"], None)}
# Defaults of the filter caps (hub/config.c).
MAX_DEVICES, MAX_LABELS, MAX_ENTRIES, MAX_SUBS = 1000, 16, 4096, 64


def compact(obj):
    return json.dumps(obj, separators=(",", ":"))


def sub_msg(sid, stream="raw", **filt):
    return compact({"type": "subscribe", "id": sid, "stream": stream, "filter": filt})


def long_id(n, tag=""):
    """A distinct 128-character device id."""
    s = "%s%d-" % (tag, n)
    return s + "x" * (128 - len(s))



class Stream(HostileCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis, extra=["--api-keys", api_keys_file(KEYS)])

    def raw(self, token=READER):
        ws = RawWs.dashboard(self.hub, token)
        self.addCleanup(ws.close)
        return ws

    def reply(self, ws, timeout=5):
        m = ws.recv_json(timeout)
        self.assertIsNotNone(m, "no reply (closed: %r %r)" % (ws.close_code, ws.close_reason))
        return m

    def assert_closed(self, ws, codes, what, timeout=10):
        cc, reason, got = ws.wait_close(timeout)
        codes = codes if isinstance(codes, tuple) else (codes,)
        self.assertIn(cc, codes, "%s: expected close %s, got %s (reason %r; %d messages)"
                      % (what, codes, cc, reason, len(got)))
        return reason

    async def test_binary_messages_close_1003(self):
        hub, redis = self.hub, self.redis
        base = self.baseline(hub, redis)
        before = metric(hub, 'iot_hub_binary_closed_total{protocol="dashboard"}')
        # After auth (header), a binary message that is a valid ping.
        ws = self.raw()
        ws.send(OP_BINARY, b'{"type":"ping"}')
        reason = self.assert_closed(ws, 1003, "a binary ping")
        self.assertIn("binary", reason)
        # Before auth (no header): a binary auth message.
        ws = self.raw(token=None)
        ws.send(OP_BINARY, compact({"type": "auth", "token": READER}))
        self.assert_closed(ws, 1003, "a binary auth message")
        # Fragmented, and larger than the 64 KiB message limit.
        ws = self.raw()
        ws.send(OP_BINARY, b'{"type":', fin=False)
        ws.send(OP_CONT, b'"ping"}', fin=True)
        self.assert_closed(ws, 1003, "a fragmented binary message")
        ws = self.raw()
        ws.send(OP_BINARY, os.urandom(200 * 1024))
        self.assert_closed(ws, 1003, "a 200 KiB binary message")
        self.assertEqual(metric(hub, 'iot_hub_binary_closed_total{protocol="dashboard"}') - before, 4)
        await self.assert_unharmed(hub, redis, base, rss_mib=RSS_MIB, redis_mib=REDIS_MIB)

    async def test_unmasked_frames_lws_limitation(self):
        """lws 4.1.6 handles an unmasked client frame like a masked one
        (docs/protocol.md): pinned here for the dashboard protocol."""
        hub, redis = self.hub, self.redis
        base = self.baseline(hub, redis)
        ws = self.raw(token=None)
        ws.send_text(compact({"type": "auth", "token": READER}), mask=False)
        self.assertEqual(self.reply(ws).get("type"), "authenticated")
        ws.send_text('{"type":"ping"}', mask=False)
        self.assertEqual(self.reply(ws), {"type": "pong"})
        ws.send(OP_BINARY, b"\x00", mask=False)
        self.assert_closed(ws, 1003, "an unmasked binary frame")
        await self.assert_unharmed(hub, redis, base, rss_mib=RSS_MIB, redis_mib=REDIS_MIB)

    async def test_oversized_and_fragmented_messages(self):
        hub, redis = self.hub, self.redis
        base = self.baseline(hub, redis)
        # Just under 64 KiB in 64 fragments: reassembled and handled.
        ws = self.raw()
        text = sub_msg("frag", devices=[long_id(i) for i in range(480)]).encode()
        self.assertLess(len(text), 65536)
        pieces = [text[i:i + 1024] for i in range(0, len(text), 1024)]
        ws.send(OP_TEXT, pieces[0], fin=False)
        for p in pieces[1:-1]:
            ws.send(OP_CONT, p, fin=False)
        ws.send(OP_CONT, pieces[-1], fin=True)
        m = self.reply(ws)
        self.assertEqual((m.get("type"), m.get("id")), ("subscribed", "frag"), m)
        # Over 64 KiB: one frame, then fragments.
        ws = self.raw()
        ws.send_text(compact({"type": "ping", "pad": "x" * 70000}))
        self.assert_closed(ws, 1009, "a 70 KB message")
        ws = self.raw()
        ws.send(OP_TEXT, b'{"type":"ping","pad":"', fin=False)
        for _ in range(69):
            ws.send(OP_CONT, b"x" * 1024, fin=False)
        ws.send(OP_CONT, b'"}', fin=True)
        self.assert_closed(ws, 1009, "a fragmented 70 KB message")
        # A message that never ends: cut off after at most 1 MiB (16 x 64 KiB).
        ws = self.raw()
        frames = itertools.chain([ws_frame(OP_TEXT, b'{"type":"ping","pad":"', fin=False)],
                                 itertools.repeat(ws_frame(OP_CONT, b"x" * 4096, fin=False)))
        sent = ws.flood(frames, 8, read=True)
        self.assertTrue(ws.eof, "a never-ending message was read for 8 s")
        ws.wait_close(1)
        # A client still sending may get a reset instead of the close frame.
        self.assertIn(ws.close_code, (1009, None), "never-ending message: %r" % ws.close_code)
        self.assertLess(sent * 4096 / 1048576, 16, "%d KiB sent before the hub closed" % (sent * 4))
        await self.assert_unharmed(hub, redis, base, rss_mib=RSS_MIB, redis_mib=REDIS_MIB)

    async def test_filter_caps(self):
        hub, redis = self.hub, self.redis
        base = self.baseline(hub, redis)
        ws = self.raw()

        def subscribe(sid, **filt):
            ws.send_text(sub_msg(sid, **filt))
            m = self.reply(ws)
            self.assertEqual(m.get("id"), sid, m)
            return m

        def refused(m, code, limit):
            self.assertEqual((m.get("type"), m.get("code")), ("error", code), m)
            self.assertIn(limit, m.get("message", ""), m)

        refused(subscribe("d", devices=["t-%d" % i for i in range(MAX_DEVICES + 1)]),
                "filter_too_large", "stream-max-filter-devices")
        refused(subscribe("l", labels={"k%d" % i: "v" for i in range(MAX_LABELS + 1)}),
                "filter_too_large", "stream-max-filter-labels")
        m = subscribe("lv", labels={"site": "x" * 257})
        self.assertEqual((m.get("type"), m.get("code")), ("error", "bad_filter"), m)
        m = subscribe("lk", labels={"k" * 129: "v"})
        self.assertEqual((m.get("type"), m.get("code")), ("error", "bad_filter"), m)
        # At the caps: accepted.
        for k in range(4):
            m = subscribe("full%d" % k, devices=["t-%d-%d" % (k, i) for i in range(MAX_DEVICES)])
            self.assertEqual(m.get("type"), "subscribed", m)
        left = MAX_ENTRIES - 4 * MAX_DEVICES
        refused(subscribe("over", devices=["u-%d" % i for i in range(left - MAX_LABELS + 1)],
                          labels={"k%d" % i: "v" for i in range(MAX_LABELS)}),
                "filter_budget_exceeded", "stream-max-filter-entries")
        m = subscribe("last", devices=["u-%d" % i for i in range(left - MAX_LABELS)],
                      labels={"k%d" % i: "v" for i in range(MAX_LABELS)})
        self.assertEqual(m.get("type"), "subscribed", m)
        refused(subscribe("one-more", devices=["t-1"]), "filter_budget_exceeded",
                "stream-max-filter-entries")
        # An unfiltered subscription costs nothing; unsubscribing gives back.
        self.assertEqual(subscribe("all").get("type"), "subscribed")
        ws.send_text(compact({"type": "unsubscribe", "id": "full0"}))
        self.assertEqual(self.reply(ws).get("type"), "unsubscribed")
        m = subscribe("again", devices=["t-%d" % i for i in range(MAX_DEVICES)])
        self.assertEqual(m.get("type"), "subscribed", m)
        # Refused subscribes allocate nothing: a flood of them leaves RSS flat.
        rss0 = rss_kib(hub.pid)
        big = sub_msg("x", devices=["t-%d" % i for i in range(MAX_DEVICES)])
        got = []
        sent = ws.flood(itertools.repeat(ws_frame(OP_TEXT, big)), 2, read=True,
                        on_message=lambda op, p: got.append(p))
        while len(got) < sent:
            m = ws.recv_frame(5)
            self.assertIsNotNone(m, "%d of %d replies" % (len(got), sent))
            got.append(m[1])
        self.assertTrue(all(b'"filter_budget_exceeded"' in p for p in got), got[:3])
        grown = rss_kib(hub.pid) - rss0
        self.assertLess(grown, san_kib(2048), "%d refused subscribes grew RSS by %d KiB" % (sent, grown))
        await self.assert_unharmed(hub, redis, base, rss_mib=RSS_MIB, redis_mib=REDIS_MIB)

    async def fill_budget(self, d, tag):
        """64 subscriptions holding the whole default budget (4,096 entries)
        in the costliest shape: 128-byte ids and 16 labels with 128-byte
        names and 256-byte values each, over several streams (each its own
        index). Returns the number of entries."""
        streams = ["raw", "presence", "commands", "1s", "10s", "1m"]
        per_sub = MAX_ENTRIES // MAX_SUBS
        total, n = 0, 0
        for k in range(MAX_SUBS):
            labels = {("%s%d-%d-" % (tag, k, i)).ljust(128, "k"): "v" * 256 for i in range(MAX_LABELS)}
            devs = [long_id(n + i, tag) for i in range(per_sub - MAX_LABELS)]
            n += len(devs)
            f = {"devices": devs, "labels": labels}
            if k % 3 == 1:
                f["device_type"] = ["thermostat", "door-sensor", "power-meter"][k % 9 // 3]
            msg = {"type": "subscribe", "id": "m%d" % k, "stream": streams[k % len(streams)],
                   "filter": f}
            await d.send(compact(msg))
            rep = await d.wait_for(lambda m: m.get("id") == "m%d" % k, 10)
            self.assertEqual(rep.get("type"), "subscribed", rep)
            total += len(devs) + len(labels)
        return total

    async def test_maximal_filters_memory_bound(self):
        hub, redis = self.hub, self.redis
        base = self.baseline(hub, redis)
        conns = 8
        dashboards = [await connect_dashboard(hub, READER) for _ in range(conns)]
        rss0 = rss_kib(hub.pid)
        for i, d in enumerate(dashboards):
            self.assertEqual(await self.fill_budget(d, "c%d-" % i), MAX_ENTRIES)
        per_conn = (rss_kib(hub.pid) - rss0) / conns
        bound = san_kib(CONN_FILTER_MIB * 1024 * conns) / conns
        sys.stderr.write("maximal filters: %.2f MiB per dashboard connection (bound %.2f)\n"
                         % (per_conn / 1024, bound / 1024))
        self.assertLess(per_conn, bound, "%.2f MiB per connection" % (per_conn / 1024))
        # And nothing more fits.
        d = dashboards[0]
        await d.send(compact({"type": "subscribe", "id": "more", "stream": "raw",
                              "filter": {"devices": ["t-1"]}}))
        rep = await d.wait_for(lambda m: m.get("id") == "more", 5)
        self.assertEqual(rep.get("code"), "too_many_subscriptions", rep)
        await self.assert_unharmed(hub, redis, base, rss_mib=RSS_MIB, redis_mib=REDIS_MIB)
        for d in dashboards:
            await d.close()

    async def sub_unsub_flood(self, make_filter, seconds=3):
        """Subscribe + unsubscribe pairs back to back for `seconds`, reading
        meanwhile; every unsubscribe is answered, in order. Returns pairs."""
        ws = self.raw()
        unsubscribed = []

        def on_message(op, p):
            m = json.loads(p)
            if m.get("type") == "unsubscribed":
                unsubscribed.append(m["id"])
            elif m.get("type") == "error":
                self.fail("flood: %r" % m)

        def frames():
            for i in itertools.count(1):
                yield ws_frame(OP_TEXT, compact({"type": "subscribe", "id": "s%d" % i,
                                                 "stream": "raw", "filter": make_filter(i)}))
                yield ws_frame(OP_TEXT, compact({"type": "unsubscribe", "id": "s%d" % i}))
        sent = ws.flood(frames(), seconds, read=True, on_message=on_message)
        pairs = sent // 2
        deadline = time.monotonic() + 20
        while len(unsubscribed) < pairs and time.monotonic() < deadline:
            m = ws.recv_json(max(0.1, deadline - time.monotonic()))
            if m is None:
                break
            on_message(OP_TEXT, json.dumps(m).encode())
        self.assertEqual(unsubscribed, ["s%d" % i for i in range(1, pairs + 1)],
                         "unsubscribed replies missing or out of order")
        ws.send_text('{"type":"ping"}')
        while True:
            m = self.reply(ws)
            if m.get("type") == "pong":
                break
        ws.close()
        return pairs

    async def test_subscribe_unsubscribe_floods(self):
        hub, redis = self.hub, self.redis
        base = self.baseline(hub, redis)
        # Device types nobody loaded: each used to create a group and a Redis
        # channel kept for the life of the process (+25 MiB in 5 s).
        rss0 = rss_kib(hub.pid)
        pairs = await self.sub_unsub_flood(lambda i: {"device_type": "made-up-%d" % i})
        grown = rss_kib(hub.pid) - rss0
        self.assertGreater(pairs, 2000, "flood too slow to mean anything")
        self.assertLess(grown, san_kib(4096), "%d subscriptions to made-up device types grew RSS by "
                        "%.1f MiB" % (pairs, grown / 1024))
        # Loaded type, a device filter, and none: a feed position per subscribe.
        for f in (lambda i: {"device_type": "thermostat"},
                  lambda i: {"devices": ["t-%d" % i, "t-%d*" % i]},
                  lambda i: {}):
            await self.sub_unsub_flood(f, 2)
        wait_for = time.monotonic() + 5
        while metric(hub, "iot_hub_stream_subscriptions") and time.monotonic() < wait_for:
            await asyncio.sleep(0.05)
        self.assertEqual(metric(hub, "iot_hub_stream_subscriptions"), 0)
        await self.assert_unharmed(hub, redis, base, rss_mib=RSS_MIB, redis_mib=REDIS_MIB)

    async def test_flood_without_reading_is_cut_off(self):
        """A client that floods and never reads its replies: replies beyond
        256 KiB unread (counted as allocated: a 15-byte reply holds ~50
        bytes; counting only the payload let 256 KiB of pongs hold about
        1 MiB) close the connection with 1008. The hub cannot write that
        close to a client that reads nothing: it cuts the connection off 5 s
        later (before, it stayed open, the hub reading and dropping its
        frames, until the client read or the 75 s ping timeout)."""
        hub, redis = self.hub, self.redis
        base = self.baseline(hub, redis)
        ws = RawWs.dashboard(hub, READER, rcvbuf=4096)
        self.addCleanup(ws.close)
        # 1 byte of junk: a ~100-byte bad_json error each, so the replies
        # outgrow the socket buffers (the hub's send buffer grows to 4 MiB)
        # and then the 256 KiB the hub holds, whatever the machine's speed.
        frame = ws_frame(OP_TEXT, "x")
        peak = [0]

        def frames():
            for i in itertools.count():
                if i % 2000 == 0:
                    peak[0] = max(peak[0], rss_kib(hub.pid))
                yield frame
        t0 = time.monotonic()
        sent = ws.flood(frames(), 30, read=False)  # stops when the hub closes
        took = time.monotonic() - t0
        self.assertTrue(ws.eof, "still open after 30 s of flooding without reading")
        self.assertLess(took, 20, "cut off after %.1f s" % took)
        reason = self.assert_closed(ws, (1008, None), "a junk flood that reads nothing (%d frames)"
                                    % sent, timeout=20)
        sys.stderr.write("flood without reading: %d frames, close %r %r, RSS peak %+d KiB\n"
                         % (sent, ws.close_code, reason, peak[0] - base["rss"]))
        self.assertLess(peak[0] - base["rss"], san_kib(600),
                        "unread replies held %d KiB" % (peak[0] - base["rss"]))
        await self.assert_unharmed(hub, redis, base, rss_mib=RSS_MIB, redis_mib=REDIS_MIB)

    async def test_auth_floods_before_auth(self):
        hub, redis = self.hub, self.redis
        base = self.baseline(hub, redis)
        bad = ws_frame(OP_TEXT, compact({"type": "auth", "token": "iotk_not_a_key_0000000"}))
        good = ws_frame(OP_TEXT, compact({"type": "auth", "token": READER}))
        ping = ws_frame(OP_TEXT, '{"type":"ping"}')
        # Bad tokens: the first one closes the connection (4401).
        for frame in (bad, ping):
            ws = self.raw(token=None)
            ws.flood(itertools.repeat(frame), 2, read=True)
            self.assert_closed(ws, (4401, None), "an auth flood before auth")
        # A good token, then more auth messages: each is an error, in order.
        ws = self.raw(token=None)
        got = []
        sent = ws.flood(itertools.repeat(good), 2, read=True,
                        on_message=lambda op, p: got.append(json.loads(p)))
        while len(got) < sent:
            m = ws.recv_json(5)
            self.assertIsNotNone(m, "%d of %d replies" % (len(got), sent))
            got.append(m)
        self.assertEqual(got[0].get("type"), "authenticated", got[0])
        self.assertTrue(all(m.get("code") == "bad_message" for m in got[1:]), got[1:4])
        # Many connections that never authenticate: closed at the deadline.
        idle = [self.raw(token=None) for _ in range(50)]
        await self.assert_unharmed(hub, redis, base, rss_mib=RSS_MIB, redis_mib=REDIS_MIB)
        for ws in idle:
            ws.close()

    async def test_stalled_replay_holds_bounded_live_traffic(self):
        """A `since` replay that the client does not read stalls (its queue
        is full); live readings arriving meanwhile are held for the seam.
        They now count against the connection's queue limits
        (stream-queue-max, stream-queue-max-bytes: 1 MiB); past them the hub
        drops them and replays them from the feed later. Before, each
        subscription held up to stream-queue-max (1,024) messages of any
        size: 1,024 live readings of 12 KB were 12 MiB for one subscription."""
        schemas = mkdtemp()
        self.addCleanup(shutil.rmtree, schemas, True)
        for f in os.listdir(SCHEMAS_DIR):
            shutil.copy(os.path.join(SCHEMAS_DIR, f), schemas)
        write_file(os.path.join(schemas, "blob.json"), compact({
            "device_type": "blob", "commands": {},
            "telemetry": {"type": "object", "properties": {"pad": {"type": "string"}}}}))
        redis = self.start_redis()
        hub = self.start_hub(redis, schemas=schemas, extra=[
            "--api-keys", api_keys_file(KEYS), "--device-rate", "0", "--gateway-rate", "0"])
        devs = ["b-%d" % i for i in range(16)]
        gw = await connect_gateway(hub, self.token("blob-gw", ("b-*",)))
        self.addAsyncCleanup(gw.close)
        rep = await gw.announce([(d, "blob") for d in devs])
        self.assertEqual(sorted(rep.get("accepted", [])), sorted(devs), rep)
        seq = itertools.count(1)

        async def ingest(n, per_frame, pad):
            for k in range(0, n, per_frame):
                rs = [{"device": devs[(k + j) % 16], "ts": now_ms(), "data": {"pad": pad}}
                      for j in range(per_frame)]
                rep = await gw.telemetry(next(seq), rs, timeout=10)
                self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", per_frame), rep)
        # Readings to replay: 6 MB in 1,500 feed entries, more than the
        # socket buffers take (the hub's send buffer grows to 4 MiB), in
        # full replay pages (256 entries), so the queue stays past half its
        # 1,024 messages and the replay stalls.
        await ingest(6000, 4, "p" * 1000)
        ws = RawWs.dashboard(hub, READER, rcvbuf=4096)
        self.addCleanup(ws.close)
        ws.send_text(compact({"type": "subscribe", "id": "r", "stream": "raw", "since": "0-0",
                              "filter": {"devices": ["b-*"]}}))
        await asyncio.sleep(1)
        rss0 = rss_kib(hub.pid)
        await ingest(1200, 4, "p" * 12000)  # 14 MB live while the replay is stalled
        grown = rss_kib(hub.pid) - rss0
        sys.stderr.write("stalled replay: RSS %+.1f MiB while 14 MB of live readings came\n"
                         % (grown / 1024))
        self.assertLess(grown, san_kib(4096), "a stalled replay held %.1f MiB of live readings"
                        % (grown / 1024))
        # Redis holds the legitimate gateway's 15 MB: not counted here.
        await self.assert_unharmed(hub, None, None, rss_mib=RSS_MIB)
        # Every reading arrives, in feed order, or is counted in a gap.
        got, dropped = [], 0
        while len(got) + dropped < 7200:
            m = ws.recv_json(10)
            self.assertIsNotNone(m, "%d readings and %d dropped of 7200" % (len(got), dropped))
            if m.get("type") == "reading":
                got.append(tuple(int(x) for x in m["pos"].split("-")))
            elif m.get("type") == "gap":
                dropped += m["dropped"]
            else:
                self.assertEqual(m.get("type"), "subscribed", m)
        self.assertEqual(got, sorted(got), "readings out of feed order")
        self.assertEqual(len(got) + dropped, 7200)

if __name__ == "__main__":
    main()
