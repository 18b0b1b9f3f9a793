"""Redis coming back empty (docs/streams.md "When Redis comes back empty"):
the hubs notice (iot:epoch is not the one they saw) and re-announce the
devices of their live connections with their type and labels, so the
registry, the type sets, presence and the instance leases come back without
the gateways doing anything, and commands can be created again at once.
Two instances reconnect at the same time, each rebuilding its own devices.
A FLUSHALL under running hubs is noticed at the next lease renewal."""

import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (HubTestCase, api_keys_file, connect_dashboard, http_json, main, reading,  # noqa: E402
                     rkeys, uniq)

KEYS = {"admin": ("iotk_rlost_admin_00001", ["admin"], None)}
BOUND_S = 10.0   # docs/streams.md: redis-backoff-max-ms + lease-renew-ms and change


def api(hub, method, path, body=None):
    return http_json(hub, method, path, body, KEYS["admin"][0], timeout=5)


class RedisLost(HubTestCase):
    def setUp(self):
        super().setUp()
        self.redis = self.start_redis()
        self.keys = api_keys_file(KEYS)

    def hub(self, instance, extra=()):
        return self.start_hub(self.redis, extra=["--api-keys", self.keys, "--instance-id", instance]
                              + list(extra))

    async def call(self, hub, method, path, body=None):
        try:
            return await asyncio.to_thread(api, hub, method, path, body)
        except OSError as e:
            return None, str(e)

    async def gw_with(self, hub, devices):
        gw = await self.gateway(hub)
        rep = await gw.announce(devices)
        self.assertEqual(rep.get("accepted"), [d[0] for d in devices], rep)
        return gw

    async def wait_devices(self, hub, want, t0, what):
        """Polls GET /v1/devices until it lists want (device -> (type,
        labels)) online; returns the seconds since t0."""
        deadline = t0 + BOUND_S
        last = None
        while True:
            st, doc = await self.call(hub, "GET", "/v1/devices?limit=1000")
            if st == 200:
                got = {d["device"]: (d["device_type"], d["labels"], d["online"]) for d in doc["devices"]}
                last = got
                if all(got.get(d) == (t, l, True) for d, (t, l) in want.items()):
                    return time.monotonic() - t0
            if time.monotonic() > deadline:
                self.fail("%s: devices not back within %.0fs: want %r, last answer %r" % (what, BOUND_S, want, last))
            await asyncio.sleep(0.1)

    async def command_delivered(self, api_hub, gw, device):
        st, doc = await self.call(api_hub, "POST", "/v1/devices/%s/commands" % device,
                                  {"name": "reboot", "params": {"delay_s": 1}})
        self.assertEqual(st, 201, doc)
        cid = doc["id"]
        m = await gw.wait_for(lambda m: m.get("type") == "command" and m.get("id") == cid, 5, "command " + cid)
        self.assertEqual((m["device"], m["attempt"]), (device, 1), m)
        await gw.send({"type": "command_ack", "id": cid, "status": "succeeded", "result": {}})
        deadline = time.monotonic() + 5
        while True:
            st, doc = await self.call(api_hub, "GET", "/v1/commands/%s" % cid)
            if (st == 200 and doc["status"] == "succeeded") or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        self.assertEqual(doc.get("status"), "succeeded", doc)

    def check_registry(self, device, instance, typ, labels_json):
        h = self.redis.hgetall(rkeys.dev(device))
        self.assertEqual((h.get("type"), h.get("labels"), h.get("online"), h.get("instance")),
                         (typ, labels_json, "1", instance), h)
        conn = h["conn"]
        run = conn.rsplit(":", 1)[0]
        self.assertIn(device, self.redis.cmd("SMEMBERS", rkeys.run_set(run, device)))
        self.assertIn(device, rkeys.run_members(self.redis, run))
        self.assertIsNotNone(self.redis.cmd("ZSCORE", rkeys.LEASES, run), run)
        self.assertEqual(self.redis.cmd("SISMEMBER", rkeys.type_of(typ, device), device), 1)
        self.assertEqual(self.redis.cmd("SISMEMBER", rkeys.devices(device), device), 1)

    async def test_redis_restarted_empty_under_two_instances(self):
        a, b = self.hub("hub-a"), self.hub("hub-b")
        p = uniq("t-rl")
        d1, d2, d3 = p + "1", p + "2", p + "3"
        ga = await self.gw_with(a, [(d1, "thermostat", {"site": "x1"}), (d2, "thermostat")])
        gb = await self.gw_with(b, [(d3, "thermostat", {"floor": "2"})])
        rep = await ga.telemetry(1, [reading(d1, 20.0)])
        self.assertEqual(rep.get("type"), "ack", rep)

        t0 = time.monotonic()
        self.redis.restart()  # empty, same port
        want = {d1: ("thermostat", {"site": "x1"}), d2: ("thermostat", {}), d3: ("thermostat", {"floor": "2"})}
        took = await self.wait_devices(b, want, t0, "after an empty restart")
        print("registry rebuilt %.2fs after Redis restarted empty" % took, file=sys.stderr)
        await self.wait_devices(a, want, t0, "after an empty restart (instance a)")
        self.check_registry(d1, "hub-a", "thermostat", '{"site":"x1"}')
        self.check_registry(d2, "hub-a", "thermostat", "{}")
        self.check_registry(d3, "hub-b", "thermostat", '{"floor":"2"}')
        self.assertEqual(self.redis.cmd("GET", rkeys.gw_epoch(ga.sub)), "1",
                         "the live connection's gateway epoch is put back")
        self.assertIsNone(ga.close_code)
        self.assertIsNone(gb.close_code)
        # a command for a device of either instance, created on the other
        await self.command_delivered(b, ga, d1)
        await self.command_delivered(a, gb, d3)
        rep = await ga.telemetry(2, [reading(d1, 21.0)])
        self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", 1), rep)
        a.stop()
        b.stop()

    async def test_flushall_noticed_at_the_next_renewal(self):
        a = self.hub("hub-f")
        p = uniq("t-rf")
        d1 = p + "1"
        dash = await connect_dashboard(a, KEYS["admin"][0])
        self.addAsyncCleanup(dash.close)
        await dash.subscribe("p", stream="presence", filter={"devices": [p + "*"]})
        ga = await self.gw_with(a, [(d1, "thermostat", {"site": "f"})])
        await dash.until(lambda m: m.get("type") == "presence" and m["online"], 5, "online presence")
        t0 = time.monotonic()
        self.redis.cmd("FLUSHALL")
        await self.wait_devices(a, {d1: ("thermostat", {"site": "f"})}, t0, "after FLUSHALL")
        got = await dash.until(lambda m: m.get("type") == "presence", 5, "presence after the rebuild")
        self.assertEqual((got[-1]["device"], got[-1]["online"]), (d1, True), got)
        self.assertEqual(self.redis.cmd("GET", rkeys.LAYOUT), rkeys.VERSION, "the layout version is put back")
        deadline = time.monotonic() + 5
        while self.redis.cmd("GET", "iot:layout") != rkeys.VERSION:
            self.assertLess(time.monotonic(), deadline,
                            "the layout-2 tombstone is put back (a layout-2 hub refuses this Redis)")
            await asyncio.sleep(0.05)
        await self.command_delivered(a, ga, d1)
        a.stop()


if __name__ == "__main__":
    main()
