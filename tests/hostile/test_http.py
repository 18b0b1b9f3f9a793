"""Hostile HTTP on the hub's port: pipelined requests in every shape (with
and without bodies, chunked, split across writes, over TLS), slowloris
headers, slow bodies (also after a 401), connections that never send a
request or never upgrade, oversized headers and URLs (431/414), subprotocol
lists that would bind an internal protocol, and the exact shape of refused
upgrades (HTTP/1.1, a well-formed WWW-Authenticate)."""

import asyncio
import os
import socket
import ssl
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hostile import (HostileCase, http_exchange, main, open_fds, raw_connect,  # noqa: E402
                     recv_until_closed, split_responses, uniq, wait_until)
from harness import (api_keys_file, client_ssl_ctx, dev_certs, http_get, metric_value,  # noqa: E402
                     parse_metrics, upgrade_request)

KEY = "hostile-http-key-0123456789abcdef"
HEADER_TIMEOUT_S = 3      # --http-header-timeout-s used below
BODY_TIMEOUT_S = 3        # --http-body-timeout-s used below


def req(method, path, body=b"", headers=(), key=None, host="x"):
    lines = ["%s %s HTTP/1.1" % (method, path), "Host: %s" % host]
    if key:
        lines.append("Authorization: Bearer %s" % key)
    if body is not None and (body or method in ("POST", "PUT")):
        lines.append("Content-Length: %d" % len(body))
    lines.extend(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


class HostileHTTP(HostileCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        cls.keys = api_keys_file({"ops": (KEY, ["admin"])})
        cls.hub = cls.class_hub(cls.redis, extra=["--api-keys", cls.keys,
                                                  "--http-body-timeout-s", str(BODY_TIMEOUT_S),
                                                  "--http-header-timeout-s", str(HEADER_TIMEOUT_S)])

    def exchange(self, data, writes=1, timeout=5, pause=0.05, expect=None, hub=None):
        """Sends data (in `writes` pieces) on one connection; returns
        (responses, closed). Stops reading at the close, at `expect`
        complete responses, or after timeout."""
        got, closed, _ = http_exchange((hub or self.hub).port, data, writes=writes, pause=pause,
                                       timeout=timeout, expect=expect)
        return got, closed

    # ---- pipelining -------------------------------------------------------

    async def test_pipelined_bodies_do_not_spin(self):
        base = self.baseline(self.hub, self.redis)
        # shape -> (bytes, the answers until the connection ends). A
        # request with a body is the last one a connection serves (its
        # answer says Connection: close); a body on anything but a POST is
        # 400; a request with a body that arrives pipelined behind another
        # one closes the connection unanswered (lws 4.1.6 would misread
        # it). So what comes back is a prefix of these answers, then the
        # close.
        shapes = {
            "two GETs with bodies (the reproduction)": (req("GET", "/healthz", b"a") * 2, [400]),
            "GET then POST with body": (req("GET", "/healthz") + req(
                "POST", "/v1/devices/x/commands", b'{"name":"reboot"}', key=KEY), [200, 404]),
            "POST then GET": (req("POST", "/v1/devices/nope/commands", b'{"name":"reboot"}', key=KEY) +
                              req("GET", "/healthz"), [404]),
            "three POSTs with bad keys": (req("POST", "/v1/commands", b"{}", key="wrong") * 3, [401]),
            "async API route then body": (req("GET", "/v1/devices", key=KEY) +
                                          req("GET", "/v1/devices", b"xyz", key=KEY), [200, 400]),
            "chunked body then GET": (req("POST", "/v1/commands", None, key=KEY,
                                          headers=["Transfer-Encoding: chunked"]) +
                                      b"5\r\nhello\r\n0\r\n\r\n" + req("GET", "/healthz"), [411]),
            "body that looks like a request": (req("GET", "/healthz") + req(
                "POST", "/v1/commands", req("GET", "/healthz"), key=KEY), [200, 422]),
            "POST, POST split across writes": (req("POST", "/v1/devices/nope/commands", b'{"name":"x"}',
                                                   key=KEY) * 2, [404]),
        }
        for name, (data, full) in shapes.items():
            for writes in (1, 3):
                with self.subTest(shape=name, writes=writes):
                    t0 = time.monotonic()
                    resps, closed = self.exchange(data, writes=writes, timeout=5, expect=len(full))
                    got = [r[0] for r in resps]
                    self.assertTrue(got, "%s: no answer at all" % name)
                    self.assertEqual(got, full[:len(got)], "%s: answers out of order" % name)
                    if len(got) < len(full):
                        self.assertTrue(closed, "%s: %s answered, the rest neither answered "
                                        "nor closed" % (name, got))
                    for st, hdrs, _ in resps:
                        if hdrs.get("connection") == "close":
                            self.assertTrue(closed, "%s: Connection: close but left open" % name)
                    self.assertLess(time.monotonic() - t0, 5.5)
                    self.assert_not_spinning(self.hub, 0.3)
        await self.assert_unharmed(self.hub, self.redis, base)

    async def test_bytes_during_a_slow_answer_do_not_spin(self):
        """A client that sends anything while its request is still being
        answered (a pipelined request, or bytes sent later) made lws 4.1.6
        spin at 100 % CPU for as long as the answer took. Here the answer is
        a 100,000-reading export (7 MB, more than the kernel buffers hold) to
        a client that does not read for 4 s, longer than the hub's header
        timeout (3 s), which lws would otherwise apply to the whole answer:
        the hub stays idle, then the export completes and the pipelined
        request is answered after it, in order."""
        from harness import rkeys
        dev = uniq("t")
        now = int(time.time() * 1000)
        self.redis.cmd("HSET", rkeys.dev(dev), "type", "thermostat", "labels", "{}",
                       "gateway", "g", "conn", "x", "online", "0")
        self.redis.cmd("EVAL", "for i = 1, 100000 do redis.call('XADD', KEYS[1], '*', 'ts', ARGV[1], "
                       "'data', '{\"temperature\":21.5}', 'gw', 'g', 'seq', i) end", 1,
                       rkeys.tm(dev), str(now))
        export = req("GET", "/v1/devices/%s/telemetry?from=%d&to=%d&format=ndjson"
                     % (dev, now - 60000, now + 60000), None, key=KEY)
        for late in (False, True):
            with self.subTest(late=late):
                s = raw_connect(self.hub.port, rcvbuf=4096)
                try:
                    if late:
                        s.sendall(export)
                        time.sleep(0.3)
                        s.sendall(req("GET", "/healthz"))
                    else:
                        s.sendall(export + req("GET", "/healthz"))
                    self.assert_not_spinning(self.hub, 4.0, 0.3)
                    parts, closed = [], False
                    deadline = time.monotonic() + 20
                    s.settimeout(0.5)
                    while time.monotonic() < deadline:
                        try:
                            d = s.recv(1 << 20)
                        except socket.timeout:
                            continue
                        if not d:
                            break
                        parts.append(d)
                        if d.endswith(b'{"status":"ok"}'):
                            break
                    got = b"".join(parts)
                finally:
                    s.close()
                resps = split_responses(got)
                self.assertEqual([r[0] for r in resps], [200, 200], got[-300:])
                self.assertEqual(resps[0][2].count(b"\n"), 100000, "the export was cut short")
                self.assertEqual(resps[1][2], b'{"status":"ok"}')

    async def test_pipelined_gets_answered_in_order(self):
        paths = ["/healthz", "/readyz", "/v1/openapi.json", "/nope", "/healthz"]
        data = b"".join(req("GET", p) for p in paths)
        for writes in (1, 4):
            resps, _ = self.exchange(data, writes=writes, timeout=5, expect=5)
            self.assertEqual([r[0] for r in resps], [200, 200, 200, 404, 200],
                             "pipelined GETs must be answered in order (writes=%d)" % writes)

    async def test_pipelined_over_tls(self):
        certs = dev_certs()
        hub = self.start_hub(self.redis, extra=[
            "--api-keys", self.keys, "--tls-cert", os.path.join(certs, "server.pem"),
            "--tls-key", os.path.join(certs, "server.key")], tls=True)
        ctx = client_ssl_ctx(ca=os.path.join(certs, "ca.pem"))
        s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", hub.port), timeout=5),
                            server_hostname="localhost")
        try:
            s.sendall(req("GET", "/healthz") * 2 + req("POST", "/v1/commands", b"{}", key="x") * 2)
            got, closed = b"", False
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                try:
                    s.settimeout(deadline - time.monotonic())
                    c = s.recv(65536)
                except (socket.timeout, ssl.SSLError, OSError):
                    break
                if not c:
                    closed = True
                    break
                got += c
        finally:
            s.close()
        # The POST arrives pipelined behind the GETs: closed unanswered.
        self.assertEqual([r[0] for r in split_responses(got)], [200, 200], got[:300])
        self.assertTrue(closed, "a pipelined request with a body ends the connection")
        self.assert_not_spinning(hub, 0.5)
        await self.assert_unharmed(hub, ssl_ctx=ctx)

    # ---- slow clients -----------------------------------------------------

    async def test_slowloris_headers_are_cut(self):
        s = raw_connect(self.hub.port)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        closed = False
        try:
            while time.monotonic() - t0 < HEADER_TIMEOUT_S + 5:
                try:
                    s.sendall(b"X-a: b\r\n")
                except OSError:
                    closed = True
                    break
                _, c = recv_until_closed(s, 1.0)
                if c:
                    closed = True
                    break
        finally:
            s.close()
        took = time.monotonic() - t0
        self.assertTrue(closed, "a header that never ends must be cut")
        self.assertLess(took, HEADER_TIMEOUT_S + 3, "cut after %.1f s" % took)

    async def test_idle_connections_are_cut(self):
        base = self.baseline(self.hub, self.redis)
        socks = [raw_connect(self.hub.port) for _ in range(200)]
        half = [s for i, s in enumerate(socks) if i % 2]
        for s in half:
            s.sendall(b"GET /v1/gateway HTTP/1.1\r\n")  # an upgrade that never completes
        t0 = time.monotonic()
        await self.assert_unharmed(self.hub, self.redis, base)

        def all_closed():
            for s in socks:
                _, c = recv_until_closed(s, 0.01)
                if not c:
                    return False
            return True
        wait_until(all_closed, HEADER_TIMEOUT_S + 5, 0.2, "idle connections to be closed")
        self.assertLess(time.monotonic() - t0, HEADER_TIMEOUT_S + 5)
        for s in socks:
            s.close()

    async def test_slow_body_is_cut(self):
        for key in (KEY, "wrong-key"):
            s = raw_connect(self.hub.port)
            head = req("POST", "/v1/devices/x/commands", b"", key=key)
            head = head.replace(b"Content-Length: 0", b"Content-Length: 1000")
            s.sendall(head + b"{")
            t0 = time.monotonic()
            closed = False
            got = b""
            while time.monotonic() - t0 < BODY_TIMEOUT_S + 5:
                try:
                    s.sendall(b" ")
                except OSError:
                    closed = True
                    break
                d, c = recv_until_closed(s, 0.5)
                got += d
                if c:
                    closed = True
                    break
            s.close()
            took = time.monotonic() - t0
            self.assertTrue(closed, "a body that never ends must be cut (key %s)" % key)
            self.assertLess(took, BODY_TIMEOUT_S + 2.5, "cut after %.1f s" % took)
            if key != KEY:
                self.assertTrue(got.startswith(b"HTTP/1.1 401"), got[:80])

    async def test_huge_content_length_answered_413_and_closed(self):
        data = req("POST", "/v1/devices/x/commands", b"", key=KEY).replace(
            b"Content-Length: 0", b"Content-Length: 99999999999")
        resps, closed = self.exchange(data + b"{" * 1000, timeout=4)
        self.assertEqual([r[0] for r in resps], [413])
        self.assertTrue(closed)

    # ---- header sizes -----------------------------------------------------

    async def test_oversized_headers_get_431(self):
        for name, extra in (("one large header", ["X-Big: " + "a" * 40000]),
                            ("many headers", ["X-H%d: %s" % (i, "b" * 100) for i in range(400)])):
            with self.subTest(name):
                resps, closed = self.exchange(req("GET", "/healthz", None, headers=extra), timeout=4)
                self.assertEqual([r[0] for r in resps], [431], name)
                self.assertTrue(closed, name)
        resps, closed = self.exchange(req("GET", "/healthz?x=" + "y" * 40000, None), timeout=4)
        self.assertEqual([r[0] for r in resps], [414])
        # Within the documented limits: an 8 KiB token is read, not refused.
        tok = "a" * 8100
        resps, _ = self.exchange(req("GET", "/v1/devices", None, key=tok,
                                     headers=["X-Other: " + "c" * 3000]), timeout=4)
        self.assertEqual([r[0] for r in resps], [401])
        await self.assert_unharmed(self.hub)

    # ---- upgrades ---------------------------------------------------------

    async def test_token_size_edges(self):
        """A gateway JWT of exactly 8192 bytes (the documented maximum) is
        verified and upgraded; one byte more is refused with a 401 that
        says why; API keys and dashboard tokens the same."""
        from harness import gw_claims, hs256, try_upgrade

        sub = uniq("gw")

        def token_of(n):
            lo, hi = 0, n  # the smallest pad giving a token of >= n bytes
            while lo < hi:
                mid = (lo + hi) // 2
                if len(hs256(gw_claims(sub, ("t-*",), 600, pad="p" * mid), self.secret)) >= n:
                    hi = mid
                else:
                    lo = mid + 1
            t = hs256(gw_claims(sub, ("t-*",), 600, pad="p" * lo), self.secret)
            return t if len(t) == n else None
        edge = next(t for t in (token_of(8192), token_of(8191)) if t)
        over = next(t for t in (token_of(8193), token_of(8194), token_of(8195)) if t)
        self.assertLessEqual(len(edge), 8192)
        self.assertGreater(len(over), 8192)
        st, _, body = try_upgrade(self.hub, edge)
        self.assertEqual(st, 101, "an 8 KiB token must fit: %s %r" % (st, body[:200]))
        st, hdrs, body = try_upgrade(self.hub, over)
        self.assertEqual(st, 401, body[:200])
        self.assertIn(b"longer than 8192", body)
        for path, proto in (("/v1/stream", "iot-dashboard.v1"),):
            data, _ = upgrade_request(self.hub.port, over, path=path, subprotocol=proto)
            resps, _ = self.exchange(data, timeout=3)
            self.assertEqual([r[0] for r in resps], [401], resps)
            self.assertIn(b"longer than 8192", resps[0][2])
        resps, _ = self.exchange(req("GET", "/v1/devices", None, key="k" * 9000), timeout=3, expect=1)
        self.assertEqual([r[0] for r in resps], [401])
        self.assertIn(b"longer than 8192", resps[0][2])

    async def test_refused_upgrade_is_http11_with_quoted_realm(self):
        for path, proto in (("/v1/gateway", "iot-gateway.v1"), ("/v1/stream", "iot-dashboard.v1")):
            data, _ = upgrade_request(self.hub.port, None, path=path, subprotocol=proto,
                                      auth_header="Bearer nonsense")
            resps, _ = self.exchange(data, timeout=3)
            self.assertEqual(len(resps), 1, resps)
            st, hdrs, body = resps[0]
            self.assertEqual(st, 401)
            self.assertEqual(hdrs.get("www-authenticate"), 'Bearer realm="iot-hub"')
        s = raw_connect(self.hub.port)
        s.sendall(upgrade_request(self.hub.port, None, auth_header="Bearer x")[0])
        got, _ = recv_until_closed(s, 3)
        s.close()
        self.assertTrue(got.startswith(b"HTTP/1.1 401 "), got[:40])
        st, hdrs, _ = http_get(self.hub, "/v1/devices")
        self.assertEqual((st, hdrs.get("www-authenticate")), (401, 'Bearer realm="iot-hub"'))

    async def test_refused_upgrade_readable_by_python_websockets(self):
        import websockets
        try:
            async with websockets.connect(self.hub.url("/v1/gateway"),
                                          subprotocols=["iot-gateway.v1"],
                                          extra_headers={"Authorization": "Bearer x"}):
                self.fail("upgrade with a bad token accepted")
        except websockets.exceptions.InvalidStatusCode as e:
            self.assertEqual(e.status_code, 401)

    async def test_subprotocol_lists_bind_only_contract_protocols(self):
        base = self.baseline(self.hub, self.redis)
        cases = [
            ("/v1/stream", "http, iot-dashboard.v1"),
            ("/v1/stream", "iot-hub-redis, iot-dashboard.v1"),
            ("/v1/gateway", "http, iot-gateway.v1"),
            ("/v1/stream", "iot-gateway.v1, iot-dashboard.v1"),
            ("/v1/gateway", "iot-dashboard.v1, iot-gateway.v1"),
            ("/v1/stream", "http"),
            ("/v1/gateway", "http"),
        ]
        for path, protos in cases:
            with self.subTest(path=path, protos=protos):
                data, _ = upgrade_request(self.hub.port, None, path=path, subprotocol=protos)
                s = raw_connect(self.hub.port)
                s.sendall(data)
                got, closed = recv_until_closed(s, 2)
                s.close()
                st = int(got.split()[1]) if got.startswith(b"HTTP/") else None
                if st == 101:
                    # Only a contract protocol that fits the path may bind.
                    chosen = [l for l in got.decode(errors="replace").split("\r\n")
                              if l.lower().startswith("sec-websocket-protocol:")]
                    self.assertEqual(len(chosen), 1, got[:300])
                    self.assertEqual(chosen[0].split(":", 1)[1].strip(),
                                     "iot-dashboard.v1" if path == "/v1/stream" else "iot-gateway.v1")
                else:
                    self.assertEqual(st, 400, got[:200])
        # Any order of a list that names the right protocol works; unknown
        # names are skipped.
        for protos in ("foo, iot-dashboard.v1", "iot-dashboard.v1, foo"):
            data, _ = upgrade_request(self.hub.port, None, path="/v1/stream", subprotocol=protos)
            s = raw_connect(self.hub.port)
            s.sendall(data)
            got, _ = recv_until_closed(s, 0.5)
            s.close()
            self.assertTrue(got.startswith(b"HTTP/1.1 101"), (protos, got[:100]))
        await self.assert_unharmed(self.hub, self.redis, base)

    async def test_unauthenticated_upgrades_have_a_deadline(self):
        """1,000 connections that upgrade with no credentials (dashboard
        first-message auth never sent, or the subprotocol trick) are all
        closed by the auth deadline; fds come back."""
        hub = self.start_hub(self.redis, extra=["--api-keys", self.keys,
                                                "--stream-auth-timeout-ms", "1500"])
        base = self.baseline(hub, self.redis)
        socks = []
        for i in range(1000):
            protos = "http, iot-dashboard.v1" if i % 2 else "iot-dashboard.v1"
            data, _ = upgrade_request(hub.port, None, path="/v1/stream", subprotocol=protos)
            s = raw_connect(hub.port)
            s.sendall(data)
            socks.append(s)
        t0 = time.monotonic()

        def drained():
            for s in socks:
                if s.fileno() < 0:
                    continue
                _, c = recv_until_closed(s, 0.001)
                if not c:
                    return False
                s.close()
            return True
        wait_until(drained, 10, 0.2, "unauthenticated connections to be closed")
        took = time.monotonic() - t0
        self.assertLess(took, 6, "closed after %.1f s" % took)
        wait_until(lambda: open_fds_ok(hub, base), 5, 0.1, "the hub's fds to come back")
        await self.assert_unharmed(hub, self.redis, base)

    async def test_auth_failure_metrics_are_separate(self):
        hub = self.start_hub(self.redis, extra=["--api-keys", self.keys])
        http_get(hub, "/v1/devices", headers={"Authorization": "Bearer bad"})
        data, _ = upgrade_request(hub.port, None, auth_header="Bearer bad")
        self.exchange_on(hub, data)
        st, _, text = http_get(hub, "/metrics")
        m = parse_metrics(text)
        self.assertEqual(metric_value(m, "iot_hub_auth_failures_total"), 1, "upgrades refused")
        self.assertEqual(metric_value(m, "iot_hub_api_auth_failures_total"), 1, "API 401s")

    def exchange_on(self, hub, data):
        s = raw_connect(hub.port)
        s.sendall(data)
        got, _ = recv_until_closed(s, 2)
        s.close()
        return got


def open_fds_ok(hub, base):
    return open_fds(hub.pid) <= base["fds"] + 5


if __name__ == "__main__":
    main()
