"""TLS (docs/configuration.md, docs/protocol.md "Connecting"): wss/https on the same port with the dev CA; mTLS with
--tls-client-ca: no client cert, a cert from a foreign CA, or a cert whose CN
is not the JWT sub are refused; the right cert is accepted."""

import os
import ssl
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import websockets  # noqa: E402
from harness import (HubTestCase, client_cert, client_ssl_ctx, connect_gateway, dev_certs,  # noqa: E402
                     http_get, main, raw_http, reading, rkeys, try_upgrade, uniq, upgrade_request)

CLIENT_CN = "dev-gw"  # gen-dev-certs.sh's default client CN


class TLSBase(HubTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.certs = dev_certs()
        cls.redis = cls.class_redis()

    @classmethod
    def c(cls, name):
        return os.path.join(cls.certs, name)

    def ctx(self, cert=None):
        if cert == "client":
            return client_ssl_ctx(self.c("ca.pem"), self.c("client.pem"), self.c("client.key"))
        if cert == "foreign":
            return client_ssl_ctx(self.c("ca.pem"), self.c("foreign-client.pem"), self.c("foreign-client.key"))
        return client_ssl_ctx(self.c("ca.pem"))

    def outcome(self, hub, token, ctx):
        """HTTP status of a raw upgrade over TLS, or 'tls:<error>' when the
        handshake or the first read fails."""
        try:
            st, _, _ = try_upgrade(hub, token, ssl_ctx=ctx)
            return st
        except (ssl.SSLError, ConnectionError, OSError) as e:
            return "tls:%s" % e.__class__.__name__

    async def roundtrip(self, hub, sub, ctx):
        gw = await connect_gateway(hub, self.token(sub), ssl_ctx=ctx)
        self.addAsyncCleanup(gw.close)
        self.assertEqual(gw.subprotocol, "iot-gateway.v1")
        d = uniq("t")
        rep = await gw.announce([(d, "thermostat")])
        self.assertEqual(rep.get("accepted"), [d], rep)
        rep = await gw.telemetry(1, [reading(d)])
        self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", 1), rep)
        self.assertEqual(self.redis.xlen(rkeys.tm(d)), 1)
        return gw


class TLS(TLSBase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.hub = cls.class_hub(cls.redis, tls=True,
                                extra=["--tls-cert", cls.c("server.pem"), "--tls-key", cls.c("server.key")])

    async def test_wss_with_dev_ca(self):
        await self.roundtrip(self.hub, uniq("gw"), self.ctx())

    async def test_wss_hostname_localhost(self):
        # Connect by IP, verify the certificate for the name "localhost".
        ws = await websockets.connect(self.hub.url(), subprotocols=["iot-gateway.v1"], ssl=self.ctx(),
                                      server_hostname="localhost", open_timeout=5, ping_interval=None,
                                      extra_headers={"Authorization": "Bearer " + self.token(uniq("gw"))})
        self.assertEqual(ws.subprotocol, "iot-gateway.v1")
        await ws.close()

    async def test_bad_token_over_tls_is_401(self):
        self.assertEqual(self.outcome(self.hub, None, self.ctx()), 401)
        self.assertEqual(self.outcome(self.hub, "a.b.c", self.ctx()), 401)

    async def test_https_endpoints(self):
        st, _, body = http_get(self.hub, "/healthz", ssl_ctx=self.ctx())
        self.assertEqual(st, 200, body)
        st, _, body = http_get(self.hub, "/metrics", ssl_ctx=self.ctx())
        self.assertEqual(st, 200)
        self.assertIn("iot_hub_connections", body)

    async def test_plaintext_on_tls_port_refused(self):
        req, _ = upgrade_request(self.hub.port, self.token(uniq("gw")))
        try:
            st, _, _ = raw_http(self.hub.port, req, timeout=3)
        except (ConnectionError, OSError):
            st = None
        except AssertionError:  # garbage instead of an HTTP response
            st = "garbage"
        self.assertNotEqual(st, 101, "plain-text upgrade accepted on the TLS port")
        # and TLS still works afterwards
        await self.roundtrip(self.hub, uniq("gw"), self.ctx())

    async def test_untrusted_server_cert_detected(self):
        # Sanity of the setup: without the dev CA the client refuses the server.
        ctx = ssl.create_default_context()
        with self.assertRaises(ssl.SSLError):
            try_upgrade(self.hub, self.token(uniq("gw")), ssl_ctx=ctx)


class MutualTLS(TLSBase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.hub = cls.class_hub(cls.redis, tls=True,
                                extra=["--tls-cert", cls.c("server.pem"), "--tls-key", cls.c("server.key"),
                                       "--tls-client-ca", cls.c("ca.pem")])

    def fresh(self, ca="ca"):
        """A new gateway id and a client cert with that CN signed by `ca`."""
        cn = uniq("gw")
        pem, key = client_cert(self.certs, cn, ca=ca)
        return cn, client_ssl_ctx(self.c("ca.pem"), pem, key)

    async def test_script_client_cert_accepted(self):
        await self.roundtrip(self.hub, CLIENT_CN, self.ctx("client"))

    async def test_right_cert_upgrades(self):
        cn, ctx = self.fresh()
        self.assertEqual(self.outcome(self.hub, self.token(cn), ctx), 101)

    async def test_right_cert_roundtrip(self):
        cn, ctx = self.fresh()
        await self.roundtrip(self.hub, cn, ctx)

    async def test_no_client_cert_refused(self):
        cn = uniq("gw")
        o = self.outcome(self.hub, self.token(cn), self.ctx())
        self.assertTrue(o == 401 or str(o).startswith("tls:"),
                        "upgrade without a client cert: expected 401 or a TLS failure, got %r" % o)

    async def test_foreign_cert_refused(self):
        o = self.outcome(self.hub, self.token(CLIENT_CN), self.ctx("foreign"))
        self.assertTrue(o == 401 or str(o).startswith("tls:"),
                        "cert from a foreign CA (CN %s = sub): expected 401 or a TLS failure, got %r"
                        % (CLIENT_CN, o))
        cn, ctx = self.fresh(ca="foreign-ca")
        o = self.outcome(self.hub, self.token(cn), ctx)
        self.assertTrue(o == 401 or str(o).startswith("tls:"),
                        "cert from a foreign CA (fresh CN = sub): expected 401 or a TLS failure, got %r" % o)

    async def test_cn_must_equal_sub(self):
        cn, ctx = self.fresh()
        o = self.outcome(self.hub, self.token(cn + "-other"), ctx)
        self.assertTrue(o == 401 or str(o).startswith("tls:"),
                        "client CN %s with token sub %s-other: expected 401, got %r" % (cn, cn, o))
        o = self.outcome(self.hub, self.token(cn[:-1]), ctx)
        self.assertTrue(o == 401 or str(o).startswith("tls:"), "sub a prefix of the CN: got %r" % o)

    async def test_bad_token_with_right_cert(self):
        cn, ctx = self.fresh()
        self.assertEqual(self.outcome(self.hub, None, ctx), 401)
        self.assertEqual(self.outcome(self.hub, "a.b.c", ctx), 401)
        self.assertEqual(self.outcome(self.hub, self.token(cn, secret=b"wrong-secret-0123456789"), ctx), 401)

    async def test_refusals_do_not_break_the_hub(self):
        for _ in range(5):
            self.outcome(self.hub, self.token(CLIENT_CN), self.ctx("foreign"))
            self.outcome(self.hub, self.token(CLIENT_CN), self.ctx())
        cn, ctx = self.fresh()
        await self.roundtrip(self.hub, cn, ctx)

if __name__ == "__main__":
    main()
