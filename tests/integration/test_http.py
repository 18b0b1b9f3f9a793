"""HTTP on the gateway port (docs/protocol.md "HTTP on the same port"): /healthz, /readyz (503 with a JSON
body while Redis is down), /metrics in Prometheus text with the ingest
counters moving as traffic flows."""

import asyncio
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (SOURCE_DIR, HubTestCase, api_keys_file, http_get, main, metric_value, mkdtemp,  # noqa: E402
                     parse_metrics, raw_http, reading, uniq, write_file)

METRICS = ("iot_hub_connections", "iot_hub_frames_total", "iot_hub_readings_accepted_total",
           "iot_hub_readings_rejected_total", "iot_hub_acks_total", "iot_hub_redis_rtt_seconds_bucket",
           "iot_hub_loop_lag_seconds_bucket")


class HTTP(HubTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis)

    def metrics(self, hub=None):
        st, hdrs, body = http_get(hub or self.hub, "/metrics")
        self.assertEqual(st, 200, body[:300])
        return parse_metrics(body)

    @staticmethod
    def gateway_connections(m):
        """iot_hub_connections; when it is split by kind, the gateway sample
        (an HTTP scrape is a connection too)."""
        v = metric_value(m, "iot_hub_connections", kind="gateway")
        return v if v is not None else metric_value(m, "iot_hub_connections")

    async def poll_connections(self, want, timeout=5):
        deadline = time.monotonic() + timeout
        while True:
            v = self.gateway_connections(self.metrics())
            if v == want:
                return
            if time.monotonic() > deadline:
                raise AssertionError("iot_hub_connections (gateways) is %r, expected %r" % (v, want))
            await asyncio.sleep(0.05)

    async def test_healthz(self):
        st, _, body = http_get(self.hub, "/healthz")
        self.assertEqual(st, 200, body)

    async def test_readyz_ok(self):
        st, _, body = http_get(self.hub, "/readyz")
        self.assertEqual(st, 200, body)

    async def test_metrics_format(self):
        st, hdrs, body = http_get(self.hub, "/metrics")
        self.assertEqual(st, 200)
        self.assertTrue(hdrs.get("content-type", "").startswith("text/plain"),
                        "metrics content-type %r" % hdrs.get("content-type"))
        m = parse_metrics(body)  # every line parses
        names = {n for n, _ in m}
        for want in METRICS:
            if want == "iot_hub_readings_rejected_total":
                self.assertIn("# TYPE iot_hub_readings_rejected_total counter", body)
                continue
            self.assertIn(want, names, "metric %s missing from /metrics" % want)
        for want in ("# TYPE iot_hub_frames_total counter", "# TYPE iot_hub_connections gauge",
                     "# TYPE iot_hub_redis_rtt_seconds histogram"):
            self.assertIn(want, body)
        self.assertIsNotNone(metric_value(m, "iot_hub_redis_rtt_seconds_bucket", le="+Inf"),
                             "histogram without an le=\"+Inf\" bucket")

    async def test_metrics_follow_traffic(self):
        m0 = self.metrics()
        c0 = self.gateway_connections(m0) or 0
        gw = await self.gateway(self.hub)
        d = uniq("t")
        await gw.announce([(d, "thermostat")])
        await self.poll_connections(c0 + 1)
        m1 = self.metrics()
        rep = await gw.telemetry(1, [reading(d, 20.0), reading(d, 500.0), reading(uniq("t")), reading(d, 21.0)])
        self.assertEqual((rep.get("accepted"), len(rep.get("rejected", []))), (2, 2), rep)
        m2 = self.metrics()

        def delta(name, **labels):
            return (metric_value(m2, name, **labels) or 0) - (metric_value(m1, name, **labels) or 0)
        self.assertEqual(delta("iot_hub_readings_accepted_total"), 2)
        self.assertEqual(delta("iot_hub_readings_rejected_total", code="invalid"), 1)
        self.assertEqual(delta("iot_hub_readings_rejected_total", code="unknown_device"), 1)
        self.assertEqual(delta("iot_hub_readings_rejected_total"), 2)
        self.assertGreaterEqual(delta("iot_hub_frames_total"), 1)
        self.assertEqual(delta("iot_hub_acks_total"), 1)
        self.assertGreater(metric_value(m2, "iot_hub_redis_rtt_seconds_bucket", le="+Inf") or 0, 0,
                           "no Redis round trip observed after a stored frame")
        await gw.close()
        await self.poll_connections(c0)

    async def test_operator_metrics(self):
        """Requests by route and status with their latency, bytes by
        protocol, online devices, disconnects by reason and the process_*
        metrics."""
        m0 = self.metrics()
        for _ in range(3):
            self.assertEqual(http_get(self.hub, "/healthz")[0], 200)
        self.assertEqual(http_get(self.hub, "/v1/no-such-route")[0], 404)
        gw = await self.gateway(self.hub)
        d = uniq("t")
        await gw.announce([(d, "thermostat")])
        rep = await gw.telemetry(1, [reading(d, 20.0)])
        self.assertEqual(rep.get("accepted"), 1, rep)
        m1 = self.metrics()

        def delta(name, **labels):
            return (metric_value(m1, name, **labels) or 0) - (metric_value(m0, name, **labels) or 0)
        self.assertEqual(delta("iot_hub_http_requests_total", method="GET", route="/healthz", code="200"), 3)
        self.assertEqual(delta("iot_hub_http_requests_total", route="(none)", code="404"), 1)
        self.assertGreaterEqual(delta("iot_hub_http_request_duration_seconds_count", method="GET",
                                      route="/healthz"), 3)
        self.assertIsNotNone(metric_value(m1, "iot_hub_http_request_duration_seconds_bucket",
                                          route="/healthz", le="+Inf"))
        self.assertGreater(delta("iot_hub_received_bytes_total", protocol="gateway"), 50)
        self.assertGreater(delta("iot_hub_sent_bytes_total", protocol="gateway"), 30)
        self.assertGreater(delta("iot_hub_sent_bytes_total", protocol="http"), 100)
        self.assertGreaterEqual(delta("iot_hub_devices_online"), 1)
        for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                     "process_open_fds", "process_max_fds", "process_start_time_seconds",
                     "process_virtual_memory_bytes"):
            self.assertGreater(metric_value(m1, name) or 0, 0, name)
        self.assertLess(abs(metric_value(m1, "process_start_time_seconds") - time.time()), 3600 * 24 * 30)
        await gw.close()
        deadline = time.monotonic() + 5
        while True:
            m2 = self.metrics()
            closed = (metric_value(m2, "iot_hub_gateway_disconnects_total", reason="peer_close") or 0) - \
                (metric_value(m1, "iot_hub_gateway_disconnects_total", reason="peer_close") or 0)
            if closed >= 1 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        self.assertGreaterEqual(closed, 1, "a gateway's close frame was not counted as peer_close")
        self.assertLessEqual((metric_value(m2, "iot_hub_devices_online") or 0) -
                             (metric_value(m1, "iot_hub_devices_online") or 0), -1)

    async def test_metrics_documented(self):
        """docs/metrics.md has a row for every metric family /metrics
        exports, and no row for one it does not."""
        body = http_get(self.hub, "/metrics")[2]
        live = set(re.findall(r"^# HELP (\S+) ", body, re.M))
        with open(os.path.join(SOURCE_DIR, "docs", "metrics.md")) as f:
            documented = set(re.findall(r"^\| `([a-z_]+)` \|", f.read(), re.M))
        self.assertEqual(sorted(live - documented), [], "exported but not in docs/metrics.md")
        self.assertEqual(sorted(documented - live), [], "in docs/metrics.md but not exported")

    async def test_unknown_path_404(self):
        for path in ("/nope", "/v1/nothing-here", "/healthz/x"):
            st, _, _ = http_get(self.hub, path)
            self.assertEqual(st, 404, path)

    async def test_gateway_path_without_upgrade(self):
        st, _, _ = http_get(self.hub, "/v1/gateway")
        self.assertTrue(400 <= st < 500, "plain GET /v1/gateway: %s" % st)

    async def test_many_requests_and_malformed_http(self):
        for _ in range(50):
            self.assertEqual(http_get(self.hub, "/healthz")[0], 200)
        for junk in (b"GARBAGE\r\n\r\n", b"GET /healthz HTTP/9.9\r\n\r\n", b"\x16\x03\x01\x00\x05hello",
                     b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"):
            try:
                raw_http(self.hub.port, junk, timeout=3)
            except (AssertionError, OSError):
                pass  # any refusal is fine; the hub must survive it
        self.hub.check_alive()
        self.assertEqual(http_get(self.hub, "/healthz")[0], 200)

    async def test_readyz_503_when_redis_down(self):
        redis = self.start_redis()
        hub = self.start_hub(redis)
        self.assertEqual(http_get(hub, "/readyz")[0], 200)
        redis.kill()
        deadline = time.monotonic() + 10
        while True:
            st, hdrs, body = http_get(hub, "/readyz")
            if st == 503:
                break
            self.assertLess(time.monotonic(), deadline, "/readyz still %s 10 s after Redis died" % st)
            await asyncio.sleep(0.05)
        try:
            doc = json.loads(body)
        except ValueError:
            self.fail("/readyz 503 body is not JSON: %r" % body[:200])
        self.assertIsInstance(doc, dict, body)
        self.assertEqual(http_get(hub, "/healthz")[0], 200, "/healthz must not depend on Redis")
        redis.restart()
        deadline = time.monotonic() + 15
        while http_get(hub, "/readyz")[0] != 200:
            self.assertLess(time.monotonic(), deadline, "/readyz not 200 again 15 s after Redis came back")
            await asyncio.sleep(0.05)
        hub.stop()



class OperatorAPIAuth(HubTestCase):
    """API keys (docs/configuration.md "The API keys file"): stored as SHA-256 hashes with scopes; missing or
    unknown key 401, key without the scope 403, JSON errors."""

    KEYS = {"reader": ("iotk_reader_key_0001", ["telemetry:read"]),
            "writer": ("iotk_writer_key_0002", ["commands:write"]),
            "admin": ("iotk_admin_key_00003", ["admin"])}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis, extra=["--api-keys", api_keys_file(cls.KEYS)])

    def get(self, key):
        headers = {"Authorization": "Bearer " + key} if key else None
        st, hdrs, body = http_get(self.hub, "/v1/device-types", headers=headers)
        return st, hdrs, body

    async def test_missing_key_401(self):
        st, hdrs, body = self.get(None)
        self.assertEqual(st, 401, body)
        self.assertEqual(json.loads(body)["error"]["code"], "unauthorized")

    async def test_unknown_key_401(self):
        st, _, body = self.get("iotk_not_a_key_at_all")
        self.assertEqual(st, 401, body)

    async def test_key_without_scope_403(self):
        st, _, body = self.get(self.KEYS["writer"][0])
        self.assertEqual(st, 403, body)
        self.assertEqual(json.loads(body)["error"]["code"], "forbidden")

    async def test_reader_and_admin_get_device_types(self):
        for who in ("reader", "admin"):
            st, _, body = self.get(self.KEYS[who][0])
            self.assertEqual(st, 200, "%s: %s" % (who, body))
            types = {t["device_type"] for t in json.loads(body)["device_types"]}
            self.assertEqual(types, {"thermostat", "power-meter", "door-sensor"}, who)

    async def test_health_routes_need_no_key(self):
        for path in ("/healthz", "/readyz", "/metrics"):
            st, _, body = http_get(self.hub, path)
            self.assertEqual(st, 200, "%s: %s" % (path, body[:200]))


class WebRoot(HubTestCase):
    """--web-root serves the browser dashboard (web/) at /, flat files only."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        cls.web = mkdtemp("iot-hub-web-")
        write_file(os.path.join(cls.web, "index.html"), "<!doctype html><title>hub</title>")
        write_file(os.path.join(cls.web, "app.js"), "export const x = 1;\n")
        write_file(os.path.join(cls.web, "notes.txt"), "not served")
        cls.hub = cls.class_hub(cls.redis, extra=["--web-root", cls.web])

    async def test_index_and_assets(self):
        status, headers, body = http_get(self.hub, "/")
        self.assertEqual((status, body), (200, "<!doctype html><title>hub</title>"))
        self.assertTrue(headers["content-type"].startswith("text/html"), headers)
        self.assertEqual(headers.get("x-content-type-options"), "nosniff")
        self.assertIn("default-src 'self'", headers.get("content-security-policy", ""))
        status, headers, body = http_get(self.hub, "/app.js")
        self.assertEqual((status, body), (200, "export const x = 1;\n"))
        self.assertTrue(headers["content-type"].startswith("text/javascript"), headers)

    async def test_nothing_outside_or_unlisted(self):
        for path in ("/notes.txt", "/missing.js", "/../etc/passwd", "/%2e%2e/etc/passwd",
                     "/sub/app.js", "/.hidden.js"):
            status, _, body = http_get(self.hub, path)
            self.assertEqual(status, 404, path)
            self.assertIn('"code"', body, path)

    async def test_api_routes_still_win(self):
        status, _, body = http_get(self.hub, "/healthz")
        self.assertEqual((status, json.loads(body)), (200, {"status": "ok"}))

    async def test_repo_dashboard_files_exist(self):
        for name in ("index.html", "app.js", "style.css"):
            self.assertTrue(os.path.isfile(os.path.join(SOURCE_DIR, "web", name)), name)


if __name__ == "__main__":
    main()
