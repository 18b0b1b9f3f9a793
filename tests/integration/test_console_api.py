"""The console's API (docs/dashboard.md "The console's routes"): GET
/v1/whoami (name, scopes, device patterns, tier; never the key), cursor
paging of GET /v1/devices (2,500 devices paged 1,000 at a time: every device
exactly once, stable while devices are added, bad cursors refused), and GET
/v1/commands/stats (command transitions per state and device type over a
window, counted by every hub from the commands channel and kept in Redis:
two hubs on one Redis do not count twice, and a hub started later answers
from what Redis holds)."""

import asyncio
import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (CommandResponder, HubTestCase, http_json, index_device, main, mkdtemp,  # noqa: E402
                     rkeys, uniq, write_file)

KEYS = {"admin": ("iotk_con_admin_000001", ["telemetry:read", "commands:write"], None, None),
        "reader": ("iotk_con_reader_00002", ["telemetry:read"], None, "free"),
        "limited": ("iotk_con_limited_0003", ["telemetry:read", "commands:write"], ["t-lim*", "t-x"], None),
        "boss": ("iotk_con_boss_0000004", ["admin"], None, None)}


def keys_file():
    entries = []
    for name, (key, scopes, devices, tier) in KEYS.items():
        e = {"name": name, "sha256": hashlib.sha256(key.encode()).hexdigest(), "scopes": scopes}
        if devices is not None:
            e["devices"] = devices
        if tier is not None:
            e["tier"] = tier
        entries.append(e)
    return write_file(os.path.join(mkdtemp("iot-hub-keys-"), "api-keys.json"), json.dumps(entries))


def http(hub, path, key="admin", method="GET", body=None):
    return http_json(hub, method, path, body, KEYS[key][0] if key in KEYS else key)


class Acker(CommandResponder):
    """Answers every command: received, then succeeded (or failed for `fail`)."""

    async def on_message(self, m):
        if m.get("type") == "command":
            await self.ack(m["id"], "received")
            await self.ack(m["id"], "failed" if m.get("name") == "config" else "succeeded",
                           **({"error": "no"} if m.get("name") == "config" else {}))


class ConsoleAPI(HubTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        cls.keys = keys_file()
        cls.hub = cls.class_hub(cls.redis, extra=["--api-keys", cls.keys, "--instance-id", "con-1"])

    # ---- GET /v1/whoami ---------------------------------------------------------

    def test_whoami(self):
        st, doc = http(self.hub, "/v1/whoami", "admin")
        self.assertEqual(st, 200, doc)
        self.assertEqual(doc, {"name": "admin", "kind": "api_key", "scopes": ["telemetry:read", "commands:write"],
                               "can": {"read": True, "commands": True, "admin": False},
                               "devices": ["*"], "tier": "standard", "tier_default": True})
        st, doc = http(self.hub, "/v1/whoami", "reader")
        self.assertEqual((st, doc["scopes"], doc["can"]["commands"], doc["tier"], doc["tier_default"]),
                         (200, ["telemetry:read"], False, "free", False), doc)
        st, doc = http(self.hub, "/v1/whoami", "limited")
        self.assertEqual((st, doc["devices"]), (200, ["t-lim*", "t-x"]), doc)
        st, doc = http(self.hub, "/v1/whoami", "boss")
        self.assertEqual((st, doc["scopes"], doc["can"]), (200, ["admin"], {"read": True, "commands": True, "admin": True}), doc)
        for key, text in KEYS.items():
            _, doc = http(self.hub, "/v1/whoami", key)
            self.assertNotIn(text[0], json.dumps(doc))
        st, doc = http(self.hub, "/v1/whoami", "iotk_not_a_key_00000")
        self.assertEqual(st, 401, doc)
        st, doc = http(self.hub, "/v1/whoami", None)
        self.assertEqual(st, 401, doc)

    # ---- cursor paging --------------------------------------------------------------

    def seed(self, prefix, n, device_type="thermostat"):
        ids = ["%s-%04d" % (prefix, i) for i in range(n)]
        for d in ids:
            self.redis.cmd("HSET", rkeys.dev(d), "type", device_type, "labels", '{"batch":"%s"}' % prefix,
                           "online", "0", "last_seen", "1")
            index_device(self.redis, d, device_type)
        return ids

    def walk(self, query, key="admin", limit=1000):
        seen, cursor, pages = [], "", 0
        while True:
            st, doc = http(self.hub, "/v1/devices?limit=%d&cursor=%s%s" % (limit, cursor, query), key)
            self.assertEqual(st, 200, doc)
            pages += 1
            seen += [d["device"] for d in doc["devices"]]
            self.assertLessEqual(len(doc["devices"]), limit)
            if doc["next_cursor"] is None:
                self.assertFalse(doc["truncated"])
                return seen, pages
            self.assertTrue(doc["truncated"])
            cursor = doc["next_cursor"]
            self.assertLess(pages, 50, "paging does not end")

    def test_paging_every_device_once(self):
        p = uniq("t-pg")
        ids = self.seed(p, 2500)
        t = time.monotonic()
        seen, pages = self.walk("&label.batch=%s" % p)
        took = time.monotonic() - t
        self.assertEqual(len(seen), len(set(seen)), "a device listed twice")
        self.assertEqual(sorted(seen), ids)
        self.assertEqual(pages, 3)
        print("\n2,500 devices in %d pages of 1,000: %.2f s" % (pages, took), file=sys.stderr)
        # small pages too, and with a type filter (the type's indexes)
        seen, pages = self.walk("&label.batch=%s&device_type=thermostat" % p, limit=300)
        self.assertEqual(sorted(seen), ids)
        self.assertEqual(pages, 9)
        # the key's patterns apply: a limited key pages through none of them
        seen, _ = self.walk("&label.batch=%s" % p, key="limited")
        self.assertEqual(seen, [])

    def test_paging_is_stable_while_devices_are_added(self):
        p = uniq("t-st")
        ids = self.seed(p, 600)
        st, doc = http(self.hub, "/v1/devices?limit=250&cursor=&label.batch=%s" % p)
        self.assertEqual(st, 200, doc)
        first = [d["device"] for d in doc["devices"]]
        # devices added between two calls: nothing already listed comes back
        more = self.seed(p + "-late", 200)
        for d in more:
            self.redis.cmd("HSET", rkeys.dev(d), "labels", '{"batch":"%s"}' % p)
        seen, cursor = list(first), doc["next_cursor"]
        while cursor:
            st, doc = http(self.hub, "/v1/devices?limit=250&cursor=%s&label.batch=%s" % (cursor, p))
            self.assertEqual(st, 200, doc)
            seen += [d["device"] for d in doc["devices"]]
            cursor = doc["next_cursor"]
        self.assertEqual(len(seen), len(set(seen)), "a device listed twice")
        self.assertTrue(set(ids) <= set(seen), "a device present throughout was skipped")

    def test_paging_refusals_and_the_old_form(self):
        for bad in ("zz", "abc", "7b7d", "6A", "00" * 200):
            st, doc = http(self.hub, "/v1/devices?cursor=%s" % bad)
            self.assertEqual((st, doc["error"]["field"]), (422, "cursor"), (bad, doc))
        # without cursor=: no next_cursor, sorted by id as before
        p = uniq("t-old")
        ids = self.seed(p, 30)
        st, doc = http(self.hub, "/v1/devices?limit=10&label.batch=%s" % p)
        self.assertEqual(st, 200, doc)
        self.assertNotIn("next_cursor", doc)
        self.assertEqual([d["device"] for d in doc["devices"]], ids[:10])
        self.assertTrue(doc["truncated"])

    # ---- GET /v1/commands/stats ---------------------------------------------------

    async def stats(self, hub, window="1h", key="admin"):
        return await asyncio.to_thread(http, hub, "/v1/commands/stats?window=%s" % window, key)

    async def test_command_stats(self):
        hub2 = self.start_hub(self.redis, extra=["--api-keys", self.keys, "--instance-id", "con-2"])
        st, base = await self.stats(self.hub)
        self.assertEqual(st, 200, base)
        gw = await self.gateway(self.hub)
        devs = [uniq("t-cs") for _ in range(3)]
        rep = await gw.announce([(d, "thermostat") for d in devs])
        self.assertEqual(rep.get("accepted"), devs, rep)
        acker = Acker(gw)
        self.addAsyncCleanup(acker.stop)
        ids = []
        for i, d in enumerate(devs):
            body = {"name": "config", "params": {"setpoint": 21}} if i == 2 else {"name": "reboot", "params": {"delay_s": 1}}
            # created on either hub: every hub hears every transition
            st, doc = await asyncio.to_thread(http, self.hub if i % 2 else hub2,
                                              "/v1/devices/%s/commands" % d, "admin", "POST", body)
            self.assertEqual(st, 201, doc)
            ids.append(doc["id"])
        want = {"queued": 3, "sent": 3, "received": 3, "succeeded": 2, "failed": 1}
        deadline = time.monotonic() + 10
        while True:
            st, doc = await self.stats(self.hub)
            self.assertEqual(st, 200, doc)
            got = {s: doc["states"].get(s, 0) - base["states"].get(s, 0) for s in want}
            if got == want or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        self.assertEqual(got, want, doc)
        self.assertEqual(doc["final"] - base["final"], 3, doc)
        self.assertEqual(doc["non_final"] - base["non_final"], 9, doc)
        self.assertGreaterEqual(doc["by_type"]["thermostat"]["succeeded"], 2, doc)
        self.assertEqual(doc["window"], "1h")
        self.assertEqual(doc["to"] - doc["from"] < 3600e3, True)
        self.assertTrue(doc["per_minute"] and all(m["t"] % 60000 == 0 for m in doc["per_minute"]), doc)
        # the other hub, and one started now, read the same counts from Redis
        # (both hubs counted every event: kept once, not twice)
        await asyncio.sleep(2.5)   # every hub has flushed
        st, doc2 = await self.stats(hub2)
        self.assertEqual((st, doc2["states"]), (200, doc["states"]), doc2)
        hub3 = self.start_hub(self.redis, extra=["--api-keys", self.keys, "--instance-id", "con-3"])
        st, doc3 = await self.stats(hub3, "5m")
        self.assertEqual(st, 200, doc3)
        self.assertGreaterEqual(doc3["states"].get("succeeded", 0), 2, doc3)
        self.assertEqual(doc3["window"], "5m")
        keys = self.redis.cmd("KEYS", "iot:{cstats}:*")
        self.assertTrue(keys)
        for k in keys:
            ttl = self.redis.cmd("TTL", k)
            self.assertTrue(0 < ttl <= 3900, (k, ttl))
        hub2.stop()
        hub3.stop()

    async def test_command_stats_refusals(self):
        for w in ("2h", "0m", "61m", "m", "10s", "1H"):
            st, doc = await self.stats(self.hub, w)
            self.assertEqual((st, doc["error"]["field"]), (422, "window"), (w, doc))
        st, doc = await self.stats(self.hub, key="reader")
        self.assertEqual(st, 200, doc)
        st, doc = await self.stats(self.hub, key="limited")
        self.assertEqual(st, 403, doc)
        st, doc = await self.stats(self.hub, key=None)
        self.assertEqual(st, 401, doc)


if __name__ == "__main__":
    main()
