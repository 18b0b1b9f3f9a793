"""Operating the fleet: revoking one gateway's credentials (by sub or by
token jti) on every instance at once, and the audit log of operator actions
(docs/operations.md). Two hubs share one Redis; a revocation made through
one closes the gateway's live connection on the other with 4401 and refuses
its next upgrade on both, and lifting it lets the gateway back in."""

import asyncio
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (HubTestCase, api_keys_file, connect_gateway, http_json, main, reading,  # noqa: E402
                     rkeys, uniq, wait_until)

KEYS = {"ops-admin": ("iotk_ops_admin_00000001", ["admin"]),
        "writer": ("iotk_ops_writer_0000002", ["commands:write", "telemetry:read"])}
ADMIN = KEYS["ops-admin"][0]
WRITER = KEYS["writer"][0]


class Operations(HubTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        keys = api_keys_file(KEYS)
        cls.a = cls.class_hub(cls.redis, extra=["--api-keys", keys, "--instance-id", "ops-a"])
        cls.b = cls.class_hub(cls.redis, extra=["--api-keys", keys, "--instance-id", "ops-b"])

    async def refused(self, hub, token):
        """The upgrade is refused with 401 (websockets raises)."""
        with self.assertRaises(Exception) as cm:
            gw = await connect_gateway(hub, token)
            await gw.close()
        self.assertIn("401", str(cm.exception))

    async def test_revoke_sub_closes_everywhere_and_lift_lets_it_back(self):
        sub, d = uniq("gw"), uniq("t")
        tok = self.token(sub)
        gw = await self.gateway(self.b, sub=sub, token=tok)
        rep = await gw.announce([(d, "thermostat")])
        self.assertEqual(rep.get("accepted"), [d], rep)
        other = await self.gateway(self.b)   # another gateway: untouched

        st, body = http_json(self.a, "POST", "/v1/revocations", {"sub": sub, "reason": "stolen"}, key=ADMIN)
        self.assertEqual(st, 201, body)
        self.assertEqual((body["kind"], body["value"], body["reason"], body["by"]),
                         ("sub", sub, "stolen", "ops-admin"))
        # Closed on the other instance, with the documented code.
        self.assertEqual(await gw.wait_closed(5), 4401)
        for hub in (self.a, self.b):
            await self.refused(hub, tok)
        # A new token of the same sub is refused too; other gateways are not.
        await self.refused(self.a, self.token(sub))
        self.assertIsNone(other.close_code)
        rep = await other.telemetry(1, [reading(uniq("t"))])
        self.assertEqual(rep.get("type"), "ack", rep)

        st, body = http_json(self.b, "GET", "/v1/revocations", key=ADMIN)
        self.assertEqual(st, 200, body)
        self.assertIn(sub, [r["value"] for r in body["revocations"]])

        st, _ = http_json(self.b, "DELETE", "/v1/revocations/sub/%s" % sub, key=ADMIN)
        self.assertEqual(st, 204)
        st, _ = http_json(self.b, "DELETE", "/v1/revocations/sub/%s" % sub, key=ADMIN)
        self.assertEqual(st, 404)
        for hub in (self.a, self.b):
            deadline = time.monotonic() + 5
            while True:
                try:
                    g = await connect_gateway(hub, tok)
                    await g.close()
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)

    async def test_revoke_one_token_by_jti(self):
        sub = uniq("gw")
        t1, t2 = self.token(sub, jti="tok-1-" + sub), self.token(sub, jti="tok-2-" + sub)
        g1 = await self.gateway(self.a, sub=sub, token=t1)
        st, body = http_json(self.b, "POST", "/v1/revocations",
                             {"jti": "tok-1-" + sub, "expires_at": int(time.time() * 1000) + 600000},
                             key=ADMIN)
        self.assertEqual(st, 201, body)
        self.assertEqual(await g1.wait_closed(5), 4401)
        await self.refused(self.b, t1)
        g2 = await self.gateway(self.b, sub=sub, token=t2)   # the other token still works
        self.assertIsNone(g2.close_code)
        st, _ = http_json(self.a, "DELETE", "/v1/revocations/jti/tok-1-" + sub, key=ADMIN)
        self.assertEqual(st, 204)

    async def test_revocations_need_admin_and_valid_input(self):
        self.assertEqual(http_json(self.a, "POST", "/v1/revocations", {"sub": "x"}, key=WRITER)[0], 403)
        self.assertEqual(http_json(self.a, "GET", "/v1/revocations", key=WRITER)[0], 403)
        self.assertEqual(http_json(self.a, "GET", "/v1/revocations")[0], 401)
        for bad in ({}, {"sub": "a", "jti": "b"}, {"sub": "bad id"}, {"sub": 5},
                    {"jti": "x" * 65}, {"sub": "ok", "expires_at": 5}, {"sub": "ok", "reason": 7}):
            st, body = http_json(self.a, "POST", "/v1/revocations", bad, key=ADMIN)
            self.assertEqual(st, 422, (bad, body))
        st, _ = http_json(self.a, "POST", "/v1/revocations", raw=b"not json", key=ADMIN)
        self.assertEqual(st, 400)
        stored = self.redis.cmd("HKEYS", "iot:{ops}:revoked") or []
        self.assertFalse([f for f in stored if f in ("sub:ok", "sub:a", "sub:x", "sub:bad id")], stored)

    async def test_revocation_survives_a_restart(self):
        """Persisted in Redis: a hub started later refuses the token too."""
        sub = uniq("gw")
        st, _ = http_json(self.a, "POST", "/v1/revocations", {"sub": sub}, key=ADMIN)
        self.assertEqual(st, 201)
        h = self.start_hub(self.redis)
        await self.refused(h, self.token(sub))
        http_json(self.a, "DELETE", "/v1/revocations/sub/%s" % sub, key=ADMIN)

    async def test_audit_log(self):
        d = uniq("t")
        gw = await self.gateway(self.a)
        await gw.announce([(d, "thermostat")])
        st, cmd = http_json(self.a, "POST", "/v1/devices/%s/commands" % d,
                            {"name": "reboot", "params": {}}, key=WRITER)
        self.assertEqual(st, 201, cmd)
        st, _ = http_json(self.b, "POST", "/v1/commands/%s/cancel" % cmd["id"], key=WRITER)
        self.assertEqual(st, 200)
        sub = uniq("gw")
        http_json(self.a, "POST", "/v1/revocations", {"sub": sub}, key=ADMIN)
        http_json(self.a, "DELETE", "/v1/revocations/sub/%s" % sub, key=ADMIN)
        self.b.proc.send_signal(signal.SIGHUP)

        def entries():
            st, body = http_json(self.a, "GET", "/v1/audit?limit=1000", key=ADMIN)
            self.assertEqual(st, 200, body)
            return body["entries"]
        wait_until(lambda: any(e["action"] == "reload" for e in entries()), 5, what="the reload's entry")
        got = {(e["action"], e["target"]): e for e in entries()}
        create = got[("command.create", cmd["id"])]
        self.assertEqual((create["who"], create["detail"]["device"], create["detail"]["name"]),
                         ("writer", d, "reboot"))
        self.assertEqual(create["from"], "127.0.0.1")
        self.assertIsInstance(create["at"], int)
        self.assertIn(("command.cancel", cmd["id"]), got)
        self.assertEqual(got[("revocation.add", "sub:" + sub)]["who"], "ops-admin")
        self.assertIn(("revocation.lift", "sub:" + sub), got)
        self.assertTrue(any(e["action"] == "reload" and e["who"] == "signal" for e in entries()))
        # Newest first, paged with next.
        st, p1 = http_json(self.a, "GET", "/v1/audit?limit=2", key=ADMIN)
        self.assertEqual((st, len(p1["entries"])), (200, 2))
        st, p2 = http_json(self.a, "GET", "/v1/audit?limit=2&before=" + p1["next"], key=ADMIN)
        self.assertEqual(st, 200)
        self.assertTrue(p2["entries"])
        ids = [e["id"] for e in p1["entries"] + p2["entries"]]
        self.assertEqual(len(ids), len(set(ids)), "pages overlap")
        self.assertEqual(ids, sorted(ids, key=lambda i: tuple(map(int, i.split("-"))), reverse=True))
        self.assertEqual(http_json(self.a, "GET", "/v1/audit", key=WRITER)[0], 403)
        self.assertEqual(http_json(self.a, "GET", "/v1/audit?limit=0", key=ADMIN)[0], 422)
        self.assertEqual(http_json(self.a, "GET", "/v1/audit?before=x", key=ADMIN)[0], 422)


class Decommission(HubTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis, extra=["--api-keys", api_keys_file(KEYS)])

    async def device_with_history(self):
        gw = await self.gateway(self.hub)
        d = uniq("t")
        rep = await gw.announce([(d, "thermostat")])
        self.assertEqual(rep.get("accepted"), [d], rep)
        for seq in (1, 2, 3):
            rep = await gw.telemetry(seq, [reading(d, 20.0 + seq)])
            self.assertEqual(rep.get("accepted"), 1, rep)
        return gw, d

    async def test_delete_cancels_commands_and_purges(self):
        gw, d = await self.device_with_history()
        ids = []
        for name in ("reboot", "reboot"):
            st, cmd = http_json(self.hub, "POST", "/v1/devices/%s/commands" % d, {"name": name}, key=WRITER)
            self.assertEqual(st, 201, cmd)
            ids.append(cmd["id"])
        await gw.wait_for(lambda m: m.get("type") == "command" and m.get("id") == ids[-1], 5, "the command")
        self.assertEqual(http_json(self.hub, "DELETE", "/v1/devices/%s" % d, key=WRITER)[0], 403)
        st, body = http_json(self.hub, "DELETE", "/v1/devices/%s?purge=true" % d, key=ADMIN)
        self.assertEqual(st, 204, body)
        # The gateway that had them is told; the commands are canceled.
        for cid in ids:
            await gw.wait_for(lambda m, cid=cid: m.get("type") == "cancel" and m.get("id") == cid, 5,
                              "the cancel of %s" % cid)
        for cid in ids:
            st, cmd = http_json(self.hub, "GET", "/v1/commands/%s" % cid, key=WRITER)
            self.assertEqual((st, cmd.get("status")), (200, "canceled"), cmd)
        self.assertEqual(http_json(self.hub, "GET", "/v1/devices/%s" % d, key=ADMIN)[0], 404)
        self.assertEqual(self.redis.cmd("EXISTS", rkeys.tm(d)), 0, "history purged")
        # Its gateway no longer stores its readings.
        rep = await gw.telemetry(4, [reading(d, 30.0)])
        self.assertEqual(rep.get("accepted"), 0, rep)
        self.assertEqual(self.redis.cmd("EXISTS", rkeys.tm(d)), 0)
        st, audit = http_json(self.hub, "GET", "/v1/audit", key=ADMIN)
        self.assertIn(("device.delete", d, True),
                      [(e["action"], e["target"], e["detail"].get("purge")) for e in audit["entries"]])
        self.assertEqual(http_json(self.hub, "DELETE", "/v1/devices/%s" % d, key=ADMIN)[0], 404)

    async def test_delete_keeps_history_without_purge(self):
        _, d = await self.device_with_history()
        st, _ = http_json(self.hub, "DELETE", "/v1/devices/%s" % d, key=ADMIN)
        self.assertEqual(st, 204)
        self.assertEqual(self.redis.xlen(rkeys.tm(d)), 3, "history kept")
        self.assertEqual(http_json(self.hub, "DELETE", "/v1/devices/%s?purge=maybe" % uniq("t"), key=ADMIN)[0], 422)
        self.assertEqual(http_json(self.hub, "DELETE", "/v1/devices/%s" % uniq("t"), key=ADMIN)[0], 404)


if __name__ == "__main__":
    main()
