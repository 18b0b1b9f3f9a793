"""A reconnect storm against a hub with a small registry-inflight: thousands
of gateways connect and announce at once; the hub keeps at most that many
connect/announce calls at Redis (the rest wait in the hub), every gateway
still gets its `announced`, every device is online in Redis, and all go
offline when the fleet drops (those calls are paced too). The hostile
half: connections that close while their calls wait must not crash the hub,
leave entries in its queue, or come back online in Redis."""

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (GATEWAY_PATH, SIM_BIN, SUBPROTOCOL, HubTestCase, http_get, main,  # noqa: E402
                     metric_value, parse_metrics, require_bin, rkeys, uniq, wait_until)

BOUND = 8
STORM = int(os.environ.get("HUB_STORM_GATEWAYS", "2500"))


class Storm(HubTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        require_bin(SIM_BIN, "HUB_SIM_BIN")

    def metrics(self, hub):
        status, _, body = http_get(hub, "/metrics")
        self.assertEqual(status, 200, body[:300])
        return parse_metrics(body)

    def online(self, redis, devices):
        """How many of devices Redis holds online."""
        n = 0
        for d in devices:
            if redis.hgetall(rkeys.dev(d)).get("online") == "1":
                n += 1
        return n

    def assert_no_lease_trouble(self, hub):
        log = hub.stderr_text()
        for bad in ("lease had expired", "counted as down", "marking its devices offline"):
            self.assertNotIn(bad, log, "hub log: %s" % bad)

    async def test_storm_all_announced_bound_held(self):
        redis = self.start_redis()
        hub = self.start_hub(redis, extra=("--registry-inflight", str(BOUND), "--log-level", "warn"))
        prefix = uniq("st")
        cmd = [SIM_BIN, "--url", hub.url(), "--jwt-secret", self.secret_file,
               "--jwt-devices", "{sub}-*", "--gateway-prefix", prefix, "--gateways", str(STORM),
               "--devices", "1", "--idle", "--connect-rate", "1000000", "--max-connecting", "0",
               "--stats-interval", "1", "-q"]
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: p.poll() is None and p.kill())
        ready, lines = 0, []
        try:
            deadline = t0 + 60
            while time.monotonic() < deadline:
                line = p.stderr.readline()
                if not line:
                    break
                lines.append(line)
                m = re.search(r"\bready (\d+)", line)
                if m:
                    ready = int(m.group(1))
                    if ready >= STORM:
                        break
            storm_s = time.monotonic() - t0
            # Nothing lost: every device online in Redis while connected.
            devices = ["%s-%04d-d0" % (prefix, i) for i in range(STORM)]
            online = self.online(redis, devices) if ready >= STORM else -1
        finally:
            p.send_signal(signal.SIGTERM)
            out, err = p.communicate(timeout=30)
        self.assertEqual(ready, STORM, "gateways announced %d of %d in %.1f s; gw-sim: %s"
                         % (ready, STORM, storm_s, "".join(lines[-5:]) + err[-1000:]))
        self.assertEqual(online, STORM, "%d of %d devices online in Redis" % (online, STORM))
        for bad in ("err", "unavail", "cfail", "disc"):
            m = re.search(r"\b%s (\d+)" % bad, lines[-1])
            self.assertTrue(m and m.group(1) == "0", "gw-sim counted %s: %s" % (bad, lines[-1]))

        m = self.metrics(hub)
        peak = metric_value(m, "iot_hub_registry_inflight_max")
        self.assertIsNotNone(peak, "no iot_hub_registry_inflight_max in /metrics")
        self.assertLessEqual(peak, BOUND, "registry calls in flight peaked at %s > %d" % (peak, BOUND))
        self.assertEqual(peak, BOUND, "the storm never filled the bound: %s" % peak)
        waited = metric_value(m, "iot_hub_registry_queued_total")
        self.assertGreater(waited, STORM // 2, "only %s of %d connects+announces waited" % (waited, 2 * STORM))
        self.assertEqual(metric_value(m, "iot_hub_announces_total"), STORM)
        self.assertEqual(metric_value(m, "iot_hub_announce_rejected_total"), 0)
        self.assert_no_lease_trouble(hub)
        wait_until(lambda: metric_value(self.metrics(hub), "iot_hub_registry_queued") == 0, 10,
                   what="the registry queue empty after the storm")
        wait_until(lambda: metric_value(self.metrics(hub), "iot_hub_registry_inflight") == 0, 10,
                   what="no registry call in flight after the storm")
        # gw-sim is gone: the closes' offline calls (paced the same way) all went.
        wait_until(lambda: self.online(redis, devices) == 0, 20, interval=0.5,
                   what="every device offline once gw-sim has gone")
        self.assertLessEqual(metric_value(self.metrics(hub), "iot_hub_registry_inflight_max"), BOUND)
        print("storm of %d gateways (bound %d): all announced in %.1f s" % (STORM, BOUND, storm_s))

    async def test_closed_while_queued(self):
        """300 gateways against a bound of 2, Redis stopped for a moment
        (SIGSTOP) so that their connects wait in the hub; half hang up
        (RST) meanwhile. The hub lives, its queue empties, the other half
        get `announced`, and no device of a closed connection stays
        online."""
        redis = self.start_redis()
        hub = self.start_hub(redis, extra=("--registry-inflight", "2", "--log-level", "warn"))
        prefix = uniq("cq")
        n = 300
        subs = ["%s-%03d" % (prefix, i) for i in range(n)]
        reqs = [("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                 "Sec-WebSocket-Protocol: %s\r\nAuthorization: Bearer %s\r\n\r\n"
                 % (GATEWAY_PATH, SUBPROTOCOL, self.token(sub, devices=("%s-*" % sub,)))).encode()
                for sub in subs]
        frames = [ws_frame('{"type":"announce","devices":[{"device":"%s-d","device_type":"thermostat"}]}'
                           % sub) for sub in subs]
        socks = [socket.create_connection(("127.0.0.1", hub.port), timeout=10) for _ in range(n)]
        self.addCleanup(lambda: [s.close() for s in socks])

        def rst(s):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()

        def quiet():
            m = self.metrics(hub)
            return (metric_value(m, "iot_hub_registry_queued") == 0 and
                    metric_value(m, "iot_hub_registry_inflight") == 0)

        # Every connect waits (Redis stopped); half hang up (RST) meanwhile.
        # lws does not poll a socket that is not being read, so the hub
        # learns of most of these closes only once the connect answered:
        # their calls go, and the devices must still end offline.
        redis.pause()
        try:
            for s, req in zip(socks, reqs):
                s.sendall(req)
            for i, s in enumerate(socks):
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = s.recv(4096)
                    self.assertTrue(chunk, "connection %d closed during the upgrade" % i)
                    head += chunk
                self.assertIn(b" 101 ", head.split(b"\r\n")[0], head[:200])
                s.sendall(frames[i])
            queued = metric_value(self.metrics(hub), "iot_hub_registry_queued")
            for i in range(0, n, 2):
                rst(socks[i])
        finally:
            redis.resume()
        self.assertGreater(queued, n // 2, "connects waiting while Redis was stopped")
        kept = [(subs[i], socks[i]) for i in range(1, n, 2)]
        got = await asyncio.get_running_loop().run_in_executor(None, read_announced, kept, 60)
        self.assertEqual(got, len(kept), "%d of %d kept gateways got `announced`" % (got, len(kept)))
        hub.check_alive()
        wait_until(quiet, 15, what="the registry queue empty, nothing in flight")
        m = self.metrics(hub)
        self.assertLessEqual(metric_value(m, "iot_hub_registry_inflight_max"), 2)
        self.assertEqual(metric_value(m, "iot_hub_connections", kind="gateway"), len(kept))
        self.assertEqual(self.online(redis, ["%s-d" % sub for sub, _ in kept]), len(kept))
        closed = [subs[i] for i in range(0, n, 2)]

        def left():
            return [sub for sub in closed if redis.hgetall(rkeys.dev("%s-d" % sub)).get("online") == "1"]
        wait_until(lambda: not left(), 10, what="no device of a closed connection online")
        for _, s in kept:
            s.close()
        wait_until(lambda: metric_value(self.metrics(hub), "iot_hub_connections", kind="gateway") == 0, 15,
                   what="every gateway connection gone")
        hub.stop()


    async def test_drain_while_queued(self):
        """SIGTERM while 300 connects wait (Redis stopped): the draining hub
        closes those connections, which drops their waiting calls unsent;
        it exits 0, clean under the sanitizers (no reference of a connection
        left in the queue)."""
        redis = self.start_redis()
        hub = self.start_hub(redis, extra=("--registry-inflight", "2"))
        prefix = uniq("dq")
        n = 300
        reqs = [("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                 "Sec-WebSocket-Protocol: %s\r\nAuthorization: Bearer %s\r\n\r\n"
                 % (GATEWAY_PATH, SUBPROTOCOL, self.token("%s-%03d" % (prefix, i), devices=("*",)))).encode()
                for i in range(n)]
        socks = [socket.create_connection(("127.0.0.1", hub.port), timeout=10) for _ in range(n)]
        self.addCleanup(lambda: [s.close() for s in socks])
        redis.pause()
        try:
            for s, req in zip(socks, reqs):
                s.sendall(req)
            for s in socks:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = s.recv(4096)
                    self.assertTrue(chunk, "closed during the upgrade")
                    head += chunk
            queued = metric_value(self.metrics(hub), "iot_hub_registry_queued")
            hub.proc.send_signal(signal.SIGTERM)
            hub.wait_line(r"registry: \d+ connect/announce calls dropped unsent", timeout=10)
        finally:
            redis.resume()
        self.assertGreater(queued, n // 2, "connects waiting while Redis was stopped")
        hub.stop()


def ws_frame(text):
    """One masked text frame (mask 0: the payload as is)."""
    data = text.encode()
    n = len(data)
    head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126, n >> 8, n & 255]))
    return head + b"\0\0\0\0" + data


def read_announced(conns, timeout):
    """How many of conns received an `announced` message within timeout."""
    deadline = time.monotonic() + timeout
    got = 0
    for _, s in conns:
        s.settimeout(max(0.1, deadline - time.monotonic()))
        buf = b""
        try:
            while b'"announced"' not in buf:
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
        except OSError:
            pass
        got += b'"announced"' in buf
    return got


if __name__ == "__main__":
    main()
