"""Key rotation by SIGHUP, as docs/operations.md "Key rotation" describes it:
a new jwt-key file applies to new connections at once while connected
gateways keep working (no gateway is dropped); the old key's tokens are
refused from then on (the hub holds one key). A new api-keys file applies to
the next request: added keys work, removed keys get 401."""

import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (HubTestCase, gw_claims, hs256, http_request, main, reading, try_upgrade,  # noqa: E402
                     uniq, wait_until, write_file)


def keys_json(*names):
    return json.dumps([{"name": n, "sha256": hashlib.sha256(("key-" + n).encode()).hexdigest(),
                        "scopes": ["telemetry:read"]} for n in names])


class Rotation(HubTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()

    async def test_jwt_key_rotation_keeps_connected_gateways(self):
        old = os.urandom(16).hex().encode()
        new = os.urandom(16).hex().encode()
        key_file = write_file(os.path.join(self.tmp, "rot.secret"), old)
        keys = write_file(os.path.join(self.tmp, "rot-keys.json"), keys_json("ops-a"))
        hub = self.start_hub(self.redis, jwt_key_file=key_file, extra=["--api-keys", keys])
        sub = uniq("gw")
        gw = await self.gateway(hub, sub=sub, token=hs256(gw_claims(sub), old))
        d = uniq("t")
        await gw.announce([(d, "thermostat")])
        self.assertEqual((await gw.telemetry(1, [reading(d)])).get("type"), "ack")

        # rotate: new secret in place, SIGHUP
        write_file(key_file, new)
        n = hub.line_count()
        hub.sighup()
        hub.wait_line(r"SIGHUP", timeout=5, start=n)
        wait_until(lambda: try_upgrade(hub, hs256(gw_claims(uniq("gw")), new))[0] == 101, 5,
                   what="a new-key token accepted after SIGHUP")
        self.assertEqual(try_upgrade(hub, hs256(gw_claims(uniq("gw")), old))[0], 401)
        # the gateway connected with the old key was not dropped and still streams
        rep = await gw.telemetry(2, [reading(d)])
        self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", 1), rep)

        # API keys: ops-b added, ops-a removed, applies to the next request
        self.assertEqual(http_request(hub, "GET", "/v1/devices", key="key-ops-a")[0], 200)
        write_file(keys, keys_json("ops-b"))
        hub.sighup()
        wait_until(lambda: http_request(hub, "GET", "/v1/devices", key="key-ops-b")[0] == 200, 5,
                   what="the added API key accepted after SIGHUP")
        self.assertEqual(http_request(hub, "GET", "/v1/devices", key="key-ops-a")[0], 401)
        self.assertEqual((await gw.telemetry(3, [reading(d)])).get("type"), "ack")
        await gw.close()
        hub.stop()


if __name__ == "__main__":
    main()
