"""Dead gateways are found: a peer that vanishes without closing (power loss,
NAT expiry) answers no WebSocket PING, so the hub hangs up after
ping-timeout-s and its devices go offline; a live client that answers PINGs
stays connected. The same for dashboards (/v1/stream). The hub's own
keepalive (hub/keepalive.h), not lws's validity timer."""

import asyncio
import json
import os
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (STREAM_PATH, STREAM_PROTO, HubTestCase, api_keys_file, connect_dashboard,  # noqa: E402
                     http_get, main, metric_value, parse_metrics, reading, rkeys, upgrade_request, uniq,
                     wait_until)

ARGS = ["--ping-interval-s", "1", "--ping-timeout-s", "3"]
KEY = "iotk_liveness_reader_0001"


def open_raw(port, req):
    """A raw socket after a 101 to req."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(req)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            raise AssertionError("hub closed during the upgrade")
        head += chunk
    if b" 101 " not in head.split(b"\r\n")[0]:
        raise AssertionError("upgrade refused: %r" % head[:80])
    return s


def silent_until_closed(s, limit):
    """Reads (never answers) until the hub hangs up or limit s pass.
    Returns (seconds, pings seen)."""
    t0 = time.monotonic()
    pings = 0
    s.settimeout(0.5)
    while time.monotonic() - t0 < limit:
        try:
            chunk = s.recv(4096)
        except socket.timeout:
            continue
        if not chunk:
            break
        pings += chunk.count(b"\x89")
    return time.monotonic() - t0, pings


def masked_text(payload):
    """One client->server text frame (clients must mask)."""
    data = payload.encode()
    mask = os.urandom(4)
    head = bytes([0x81])
    n = len(data)
    head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


class Liveness(HubTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis, extra=ARGS + ["--api-keys", api_keys_file(
            {"reader": (KEY, ["telemetry:read"])})])

    async def test_silent_peer_is_dropped_and_its_devices_go_offline(self):
        sub, d = uniq("gw"), uniq("t")
        req, _ = upgrade_request(self.hub.port, self.token(sub))
        s = socket.create_connection(("127.0.0.1", self.hub.port), timeout=10)
        self.addCleanup(s.close)
        s.sendall(req)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            self.assertTrue(chunk, "hub closed during the upgrade")
            head += chunk
        self.assertIn(b" 101 ", head.split(b"\r\n")[0])
        s.sendall(masked_text(json.dumps({"type": "announce", "devices": [
            {"device": d, "device_type": "thermostat"}]})))
        wait_until(lambda: self.redis.hgetall(rkeys.dev(d)).get("online") == "1", 5,
                   what="device online after the raw announce")
        # From now on the peer reads frames (PINGs arrive) but never answers.
        t0 = time.monotonic()
        got_ping = False
        s.settimeout(0.5)
        while time.monotonic() - t0 < 8:
            try:
                chunk = s.recv(4096)
            except socket.timeout:
                continue
            if not chunk:
                break  # the hub hung up
            got_ping = got_ping or b"\x89" in chunk
        elapsed = time.monotonic() - t0
        self.assertTrue(got_ping, "the hub sent no PING to an idle gateway")
        self.assertLess(elapsed, 7.5, "a peer answering no PING was still connected after %.1f s" % elapsed)
        wait_until(lambda: self.redis.hgetall(rkeys.dev(d)).get("online") == "0", 5,
                   what="device offline after its silent gateway was dropped")
        m = parse_metrics(http_get(self.hub, "/metrics")[2])
        self.assertGreaterEqual(metric_value(m, "iot_hub_gateway_disconnects_total", reason="ping_timeout"), 1,
                                "the hang-up was not counted as a ping timeout")

    async def test_live_client_stays(self):
        gw = await self.gateway(self.hub)
        await asyncio.sleep(4.5)  # longer than ping-timeout-s: websockets answers PINGs
        self.assertIsNone(gw.close_code, "a client answering PINGs was disconnected")
        d = uniq("t")
        rep = await gw.announce([(d, "thermostat")])
        self.assertEqual(rep.get("accepted"), [d], rep)


    async def test_connection_the_hub_does_not_read_is_kept(self):
        """A connection the hub has stopped reading (flow control: its
        connect waits in the registry, or max-inflight-frames wait on Redis)
        may hold the gateway's PONG unread: the hub must not hang it up for
        a PONG it did not read. Redis is stopped for twice ping-timeout-s
        while one gateway's connect and another's frames wait; both stay
        connected and both are answered once Redis is back. (A reconnect
        storm queues connects for longer than ping-timeout-s: the hub used
        to drop every gateway still queued, which then reconnected into the
        same queue.)"""
        redis = self.start_redis()
        hub = self.start_hub(redis, extra=ARGS + ["--redis-timeout-ms", "30000",
                                                  "--max-inflight-frames", "2"])
        busy = await self.gateway(hub)
        d = uniq("t")
        rep = await busy.announce([(d, "thermostat")])
        self.assertEqual(rep.get("accepted"), [d], rep)
        redis.pause()
        try:
            # within the hub's stall detection (750 ms): these wait on Redis
            # instead of being answered `unavailable`
            await busy.send({"type": "telemetry", "seq": 1, "readings": [reading(d)]})
            await busy.send({"type": "telemetry", "seq": 2, "readings": [reading(d)]})
            held = await self.gateway(hub)
            await asyncio.sleep(6.5)  # PINGs every 1 s, ping-timeout-s 3
            self.assertIsNone(busy.ws.close_code, "a gateway whose frames wait on Redis was hung up")
            self.assertIsNone(held.ws.close_code, "a gateway whose connect waits on Redis was hung up")
        finally:
            redis.resume()
        for seq in (1, 2):
            rep = await busy.reply_for(seq, timeout=10)
            self.assertEqual(rep.get("type"), "ack", rep)
        d2 = uniq("t")
        rep = await held.announce([(d2, "thermostat")], timeout=10)
        self.assertEqual(rep.get("accepted"), [d2], rep)
        # read again, the keepalive runs again: a peer gone silent now is
        # still found (its PINGs are answered by websockets here, so: stays)
        await asyncio.sleep(4)
        self.assertIsNone(held.ws.close_code)
        m = parse_metrics(http_get(hub, "/metrics")[2])
        self.assertEqual(metric_value(m, "iot_hub_gateway_disconnects_total", reason="ping_timeout"), 0)

    async def test_silent_dashboard_is_dropped(self):
        req, _ = upgrade_request(self.hub.port, KEY, path=STREAM_PATH, subprotocol=STREAM_PROTO)
        s = open_raw(self.hub.port, req)
        self.addCleanup(s.close)
        elapsed, pings = silent_until_closed(s, 8)
        self.assertGreaterEqual(pings, 1, "the hub sent no PING to an idle dashboard")
        self.assertLess(elapsed, 7.5, "a dashboard answering no PING was still connected after %.1f s" % elapsed)

    async def test_live_dashboard_stays(self):
        d = await connect_dashboard(self.hub, KEY)
        self.addAsyncCleanup(d.close)
        await asyncio.sleep(4.5)  # longer than ping-timeout-s: websockets answers PINGs
        self.assertIsNone(d.close_code, "a dashboard answering PINGs was disconnected")


if __name__ == "__main__":
    main()
