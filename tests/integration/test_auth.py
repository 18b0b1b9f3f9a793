"""Gateway auth on the WebSocket upgrade (docs/protocol.md "Connecting"): every 401 case for
HS256, RS256 and ES256, iss/aud checks, wrong path and subprotocol.

401s are checked with raw HTTP upgrades, which show the status line, headers
and body exactly (python-websockets 10.4 turns a refused upgrade into an
exception and drops the body)."""

import hashlib
import hmac
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (HubTestCase, b64url, dev_certs, gw_claims, hs256, jwt_encode,  # noqa: E402
                     jwt_parts, main, mint_tool, try_upgrade, uniq)


def pyjwt():
    import jwt  # Debian python3-jwt (PyJWT 2.6)
    return jwt


def new_private_pem(kind):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    if kind == "rsa":
        k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        k = ec.generate_private_key(ec.SECP256R1())
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())


class AuthCase(HubTestCase):
    def upgrade_status(self, token=None, **kw):
        st, hdrs, body = try_upgrade(self.hub, token, **kw)
        return st, body

    def assert_status(self, expect, token=None, what="", **kw):
        st, body = self.upgrade_status(token, **kw)
        self.assertEqual(st, expect, "%s: expected HTTP %s, got %s (body %r)"
                         % (what or "upgrade", expect,
                            "no response (connection closed)" if st is None else st, body[:200]))

    def assert_401(self, token=None, what="", **kw):
        self.assert_status(401, token, what, **kw)

    def assert_101(self, token, what=""):
        self.assert_status(101, token, what)

    async def assert_works(self, token, sub, device="t-1"):
        """Full round trip with python-websockets: the subprotocol is bound and
        an announce is answered."""
        gw = await self.gateway(self.hub, sub=sub, token=token)
        self.assertEqual(gw.subprotocol, "iot-gateway.v1")
        rep = await gw.announce([(device, "thermostat")])
        self.assertEqual(rep.get("accepted"), [device], rep)
        await gw.close()


class HS256Auth(AuthCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis)

    def claims(self, **over):
        c = gw_claims(uniq("gw"))
        c.update(over)
        return c

    async def test_valid_token_upgrades_and_works(self):
        # Separate subs: a quick reconnect with the same sub is a takeover
        # matter, tested in test_limits.
        self.assert_101(self.token(uniq("gw")), "valid HS256 token")
        sub = uniq("gw")
        await self.assert_works(self.token(sub), sub)

    async def test_no_authorization_header(self):
        self.assert_401(None, "no Authorization header")

    async def test_not_bearer(self):
        tok = self.token(uniq("gw"))
        self.assert_401(auth_header="Basic " + b64url("gw:pw"), what="Basic auth")
        self.assert_401(auth_header=tok, what="token without the Bearer scheme")
        self.assert_401(auth_header="Bearer", what="Bearer without token")
        self.assert_401(auth_header="Bearer ", what="Bearer with an empty token")

    async def test_garbage_tokens(self):
        for t in ("abc", "a.b.c", "..", "a.b", "x" * 1500,
                  b64url("{}") + "." + b64url("{}") + ".", "%%%.%%%.%%%"):
            self.assert_401(t, "garbage token %r" % t[:40])

    async def test_large_valid_token(self):
        # 80 device patterns: a ~2 KB Authorization header, as a real gateway may send.
        pats = ["t-*"] + ["site%02d-dev-%03d" % (i % 7, i) for i in range(90)]
        tok = hs256(gw_claims(uniq("gw"), devices=pats), self.secret)
        self.assertGreater(len(tok), 2000)
        self.assert_101(tok, "valid token of %d bytes" % len(tok))
        sub = uniq("gw")
        await self.assert_works(hs256(gw_claims(sub, devices=pats), self.secret), sub)

    async def test_wrong_secret(self):
        tok = hs256(self.claims(), b"not-the-secret")
        self.assert_401(tok, "HS256 signed with another secret")

    async def test_tampered_claims(self):
        good = self.token(uniq("gw"))
        h, c, s = good.split(".")
        _, claims, _ = jwt_parts(good)
        claims["devices"] = ["*"]
        forged = h + "." + b64url(__import__("json").dumps(claims)) + "." + s
        self.assert_401(forged, "claims changed after signing")
        self.assert_401(h + "." + c + "." + s[:-4] + ("AAAA" if s[-4:] != "AAAA" else "BBBB"),
                        "signature altered")
        self.assert_401(h + "." + c + ".", "signature stripped")

    async def test_expired(self):
        self.assert_401(hs256(self.claims(exp=int(time.time()) - 3600), self.secret),
                        "exp one hour ago")

    async def test_missing_exp(self):
        c = self.claims()
        del c["exp"]
        self.assert_401(hs256(c, self.secret), "no exp claim")

    async def test_non_integer_exp(self):
        # auth.h: exp must be an integer (libjwt reads a real as 0).
        self.assert_401(hs256(self.claims(exp=time.time() + 600.5), self.secret),
                        "real-valued exp")
        self.assert_401(hs256(self.claims(exp=str(int(time.time()) + 600)), self.secret),
                        "string exp")
        self.assert_401(hs256(self.claims(exp=None), self.secret), "null exp")

    async def test_nbf_in_future(self):
        self.assert_401(hs256(self.claims(nbf=int(time.time()) + 3600), self.secret),
                        "nbf one hour ahead")

    async def test_alg_none(self):
        c = self.claims()
        self.assert_401(jwt_encode({"alg": "none", "typ": "JWT"}, c, None), "alg none, empty signature")
        self.assert_401(jwt_encode({"alg": "none", "typ": "JWT"}, c, self.secret),
                        "alg none with an HMAC signature")
        for alg in ("None", "NONE", "nOnE", ""):
            self.assert_401(jwt_encode({"alg": alg, "typ": "JWT"}, c, None), "alg %r" % alg)
        self.assert_401(jwt_encode({"typ": "JWT"}, c, self.secret), "no alg in header")

    async def test_other_hmac_alg_refused(self):
        c = self.claims()
        for alg, h in (("HS384", hashlib.sha384), ("HS512", hashlib.sha512)):
            si = b64url('{"alg":"%s","typ":"JWT"}' % alg) + "." + b64url(__import__("json").dumps(c))
            sig = hmac.new(self.secret, si.encode(), h).digest()
            self.assert_401(si + "." + b64url(sig), "%s signed with the right secret (alg pinned)" % alg)

    async def test_bad_sub(self):
        c = self.claims()
        del c["sub"]
        self.assert_401(hs256(c, self.secret), "no sub")
        self.assert_401(hs256(self.claims(sub=""), self.secret), "empty sub")
        self.assert_401(hs256(self.claims(sub="gw 1"), self.secret), "sub with a space")
        self.assert_401(hs256(self.claims(sub="g" * 129), self.secret), "sub of 129 chars")
        self.assert_401(hs256(self.claims(sub=42), self.secret), "numeric sub")

    async def test_devices_claim_wrong_type(self):
        self.assert_401(hs256(self.claims(devices="t-*"), self.secret), "devices as a string")
        self.assert_401(hs256(self.claims(devices=[1, 2]), self.secret), "devices of numbers")

    async def test_devices_absent_means_no_device(self):
        self.assert_101(hs256(gw_claims(uniq("gw"), devices=None), self.secret), "token without devices claim")
        sub = uniq("gw")
        gw = await self.gateway(self.hub, sub=sub, token=hs256(gw_claims(sub, devices=None), self.secret))
        rep = await gw.announce([("t-1", "thermostat")])
        self.assertEqual(rep.get("accepted"), [], rep)
        self.assertEqual([(r.get("device"), r.get("code")) for r in rep.get("rejected", [])],
                         [("t-1", "unauthorized_device")], rep)

    async def test_wrong_path(self):
        tok = self.token(uniq("gw"))
        for path in ("/v1/gatewayx", "/v2/gateway", "/v1/gateway/x", "/gateway"):
            st, body = self.upgrade_status(tok, path=path)
            self.assertTrue(st is not None and 400 <= st < 500,
                            "upgrade at %s: expected 4xx, got %s %r" % (path, st, body[:200]))

    async def test_missing_or_wrong_subprotocol(self):
        tok = self.token(uniq("gw"))
        for sp in (None, "iot-gateway.v2", "chat"):
            st, body = self.upgrade_status(tok, subprotocol=sp)
            self.assertTrue(st is not None and 400 <= st < 500,
                            "subprotocol %r: expected 4xx, got %s %r" % (sp, st, body[:200]))

    async def test_401_for_bad_token_even_with_good_subprotocol_list(self):
        st, body = self.upgrade_status(hs256(self.claims(), b"wrong"),
                                       subprotocol="chat, iot-gateway.v1")
        self.assertEqual(st, 401, "bad token, subprotocol list: got %s" % st)

    async def test_hub_survives_bad_tokens(self):
        # After all the refusals above (in any order) a good token still works.
        sub = uniq("gw")
        for _ in range(20):
            self.assert_401(hs256(self.claims(), b"wrong"))
        await self.assert_works(self.token(sub), sub)


class IssuerAudience(AuthCase):
    ISS = "https://issuer.test"
    AUD = "iot-hub-test"

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis, extra=["--jwt-issuer", cls.ISS, "--jwt-audience", cls.AUD])

    def tok(self, sub=None, **over):
        c = gw_claims(sub or uniq("gw"), iss=self.ISS, aud=self.AUD)
        for k, v in over.items():
            if v is None:
                c.pop(k, None)
            else:
                c[k] = v
        return hs256(c, self.secret)

    async def test_matching_iss_aud(self):
        self.assert_101(self.tok(), "matching iss and aud")
        sub = uniq("gw")
        await self.assert_works(self.tok(sub), sub)

    async def test_aud_array(self):
        self.assert_101(self.tok(aud=["other", self.AUD]), "aud array containing ours")
        self.assert_401(self.tok(aud=["other", "more"]), "aud array without ours")

    async def test_wrong_or_missing_iss(self):
        self.assert_401(self.tok(iss="https://evil.test"), "wrong iss")
        self.assert_401(self.tok(iss=None), "missing iss")
        self.assert_401(self.tok(iss=self.ISS + "/"), "iss with a trailing slash")

    async def test_wrong_or_missing_aud(self):
        self.assert_401(self.tok(aud="other"), "wrong aud")
        self.assert_401(self.tok(aud=None), "missing aud")
        self.assert_401(self.tok(aud=self.AUD[:-1]), "aud prefix of ours")


class RS256Auth(AuthCase):
    """RS256 hub with iss/aud configured; tokens from iot-token and PyJWT."""
    ISS = "iss-rs"
    AUD = "aud-rs"

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.certs = dev_certs()
        cls.priv = os.path.join(cls.certs, "jwt-rs256.key")
        cls.pub = os.path.join(cls.certs, "jwt-rs256.pub.pem")
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis, alg="RS256", jwt_key_file=cls.pub,
                                extra=["--jwt-issuer", cls.ISS, "--jwt-audience", cls.AUD])

    def pyjwt_token(self, key_pem, alg="RS256", **over):
        c = gw_claims(over.pop("sub", None) or uniq("gw"), iss=self.ISS, aud=self.AUD)
        c.update(over)
        return pyjwt().encode(c, key_pem, algorithm=alg)

    async def test_tool_token(self):
        t = mint_tool("RS256", self.priv, uniq("gw"), "t-*", iss=self.ISS, aud=self.AUD)
        self.assertEqual(jwt_parts(t)[0].get("alg"), "RS256")
        self.assert_101(t, "iot-token RS256 with iss/aud")
        sub = uniq("gw")
        await self.assert_works(mint_tool("RS256", self.priv, sub, "t-*", iss=self.ISS, aud=self.AUD), sub)

    async def test_tool_token_without_iss_aud(self):
        self.assert_401(mint_tool("RS256", self.priv, uniq("gw")), "RS256 without iss/aud")

    async def test_pyjwt_token(self):
        with open(self.priv, "rb") as f:
            key = f.read()
        self.assert_101(self.pyjwt_token(key), "PyJWT RS256")
        sub = uniq("gw")
        await self.assert_works(self.pyjwt_token(key, sub=sub), sub)
        self.assert_401(self.pyjwt_token(key, exp=int(time.time()) - 3600), "expired RS256")

    async def test_other_rsa_key(self):
        self.assert_401(self.pyjwt_token(new_private_pem("rsa")), "RS256 signed by another key")

    async def test_algorithm_confusion(self):
        with open(self.pub, "rb") as f:
            pem = f.read()
        for key in (pem, pem.strip(), pem.rstrip(b"\n")):
            c = gw_claims(uniq("gw"), iss=self.ISS, aud=self.AUD)
            self.assert_401(jwt_encode({"alg": "HS256", "typ": "JWT"}, c, key),
                            "HS256 signed with the RSA public PEM")

    async def test_alg_none_and_other_algs(self):
        c = gw_claims(uniq("gw"), iss=self.ISS, aud=self.AUD)
        self.assert_401(jwt_encode({"alg": "none"}, c, None), "alg none")
        self.assert_401(hs256(c, self.secret), "HS256 token on an RS256 hub")
        es = os.path.join(self.certs, "jwt-es256.key")
        self.assert_401(mint_tool("ES256", es, uniq("gw"), iss=self.ISS, aud=self.AUD),
                        "ES256 token on an RS256 hub")
        with open(self.priv, "rb") as f:
            key = f.read()
        self.assert_401(self.pyjwt_token(key, alg="RS384"), "RS384 with the right key (alg pinned)")


class ES256Auth(AuthCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.certs = dev_certs()
        cls.priv = os.path.join(cls.certs, "jwt-es256.key")
        cls.pub = os.path.join(cls.certs, "jwt-es256.pub.pem")
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis, alg="ES256", jwt_key_file=cls.pub)

    async def test_tool_token(self):
        t = mint_tool("ES256", self.priv, uniq("gw"), "t-*")
        self.assertEqual(jwt_parts(t)[0].get("alg"), "ES256")
        self.assert_101(t, "iot-token ES256")
        sub = uniq("gw")
        await self.assert_works(mint_tool("ES256", self.priv, sub, "t-*"), sub)

    async def test_pyjwt_token(self):
        # Interop: a standard (r||s) ES256 signature from another library.
        with open(self.priv, "rb") as f:
            key = f.read()
        self.assert_101(pyjwt().encode(gw_claims(uniq("gw")), key, algorithm="ES256"), "PyJWT ES256")
        sub = uniq("gw")
        await self.assert_works(pyjwt().encode(gw_claims(sub), key, algorithm="ES256"), sub)
        self.assert_401(pyjwt().encode(gw_claims(uniq("gw"), exp=int(time.time()) - 3600), key,
                                       algorithm="ES256"), "expired ES256")

    async def test_other_ec_key(self):
        t = pyjwt().encode(gw_claims(uniq("gw")), new_private_pem("ec"), algorithm="ES256")
        self.assert_401(t, "ES256 signed by another key")

    async def test_wrong_algs(self):
        with open(self.pub, "rb") as f:
            pem = f.read()
        c = gw_claims(uniq("gw"))
        self.assert_401(jwt_encode({"alg": "HS256", "typ": "JWT"}, c, pem),
                        "HS256 signed with the EC public PEM")
        self.assert_401(jwt_encode({"alg": "none"}, c, None), "alg none")
        rs = os.path.join(self.certs, "jwt-rs256.key")
        self.assert_401(mint_tool("RS256", rs, uniq("gw")), "RS256 token on an ES256 hub")


if __name__ == "__main__":
    main()
