"""Hostile names (issue "Hostile clients"): ids chosen so that joining them
into Redis key names with ':' would make two names one key.

In key layout 1 the device `kc-1:cmds` had its registry hash at
iot:dev:kc-1:cmds, which is device kc-1's command queue: kc-1's commands then
failed with 503 and left an orphan `queued` command. Idempotency keys were
joined the same way (iot:idem:<key name>:<Idempotency-Key>), so key `a:b`
with Idempotency-Key `c` and key `a` with `b:c` shared one entry. Layout 2
wraps every user-chosen name in braces (docs/streams.md, "Key names").

Each part drives the hub only through its gateway protocol and HTTP API, as a
client would (no Redis key is read), then runs the after-attack checks of
tests/hostile/hostile.py:

  a) devices kc-1 and kc-1:cmds: commands for both complete, nothing queued,
     history and telemetry separate;
  b) the same for a / a:tm and x / x:cmdlog (b1), and y / y:cancels with a
     cancel after delivery and a command owed at the next announce (b2);
  c) API keys `a:b` (Idempotency-Key `c`) and `a` (Idempotency-Key `b:c`)
     create two commands, each repeat returns its own;
  d) 128-character ids of every allowed character (gateway, device, device
     type) end to end;
  e) gateways g, g:seqs, g:epoch keep separate seq windows (these never shared
     a key in layout 1, whose two gateway suffixes differ: a guard, not a
     regression).
"""

import asyncio
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hostile import HostileCase, main, now_ms, reading, uniq  # noqa: E402
from harness import SCHEMAS_DIR, api_keys_file, http_json, write_file  # noqa: E402

KEYS = {"admin": ("iotk_hostile_keys_adm1", ["admin"], None),
        "a:b": ("iotk_hostile_keys_ab02", ["commands:write"], None),
        "a": ("iotk_hostile_keys_a003", ["commands:write"], None)}
FINAL = ("succeeded", "failed", "rejected", "timed_out", "expired", "canceled")


def max_id(head):
    """A 128-character id starting with head, of every allowed kind of
    character: letters, digits, '.', '_', ':' and '-'."""
    s = head
    while len(s) < 128:
        s += ":a.b_c-9"
    return s[:128]


MAX_TYPE = max_id("T")


class HostileKeys(HostileCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.types = os.path.join(cls.tmp, "device-types")
        shutil.copytree(SCHEMAS_DIR, cls.types)
        with open(os.path.join(SCHEMAS_DIR, "thermostat.json")) as f:
            doc = json.load(f)
        doc["device_type"] = MAX_TYPE
        write_file(os.path.join(cls.types, "max-type.json"), json.dumps(doc))
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis, schemas=cls.types,
                                extra=["--api-keys", api_keys_file(KEYS)])

    # -- helpers

    async def api(self, method, path, body=None, key="admin", headers=None):
        return await asyncio.to_thread(http_json, self.hub, method, path, body, KEYS[key][0], headers)

    async def gateway_with(self, sub, devices, device_type="thermostat"):
        gw = await self.gateway(self.hub, sub=sub, devices=("*",))
        rep = await gw.announce([(d, device_type) for d in devices])
        self.assertEqual(rep.get("accepted"), list(devices), "announce: %s" % rep)
        return gw

    async def create(self, device, key="admin", headers=None, status=201):
        st, doc = await self.api("POST", "/v1/devices/%s/commands" % device,
                                 {"name": "reboot", "params": {"delay_s": 1}}, key, headers)
        self.assertEqual(st, status, "create for %s (key %s, %s): %s %s" % (device, key, headers, st, doc))
        return doc["id"]

    async def status(self, cid):
        st, doc = await self.api("GET", "/v1/commands/%s" % cid)
        self.assertEqual(st, 200, "GET %s: %s" % (cid, doc))
        return doc

    async def wait_status(self, cid, want, timeout=5):
        deadline = time.monotonic() + timeout
        while True:
            doc = await self.status(cid)
            if doc["status"] == want:
                return doc
            if doc["status"] in FINAL or time.monotonic() > deadline:
                self.fail("%s: status %s, expected %s; history %s"
                          % (cid, doc["status"], want, json.dumps(doc.get("history"))))
            await asyncio.sleep(0.05)

    async def delivered(self, gw, cid, device):
        m = await gw.wait_for(lambda m: m.get("type") == "command" and m.get("id") == cid, 5,
                              "command %s for %s" % (cid, device))
        self.assertEqual(m.get("device"), device, m)

    async def succeed(self, gw, cid, device):
        await self.delivered(gw, cid, device)
        await gw.send({"type": "command_ack", "id": cid, "status": "succeeded"})
        await self.wait_status(cid, "succeeded")

    async def roundtrip(self, gw, device, **kw):
        """Creates a command for device, which the gateway receives and acks
        succeeded. Returns its id."""
        cid = await self.create(device, **kw)
        await self.succeed(gw, cid, device)
        return cid

    async def assert_history(self, device, ids):
        """The device's command list holds exactly ids, none of them queued."""
        st, doc = await self.api("GET", "/v1/devices/%s/commands" % device)
        self.assertEqual(st, 200, doc)
        self.assertEqual(sorted(c["id"] for c in doc["commands"]), sorted(ids),
                         "commands listed for %s: %s" % (device, doc))
        self.assertTrue(all(c["device"] == device for c in doc["commands"]), doc)
        st, doc = await self.api("GET", "/v1/devices/%s/commands?status=queued" % device)
        self.assertEqual((st, doc.get("commands")), (200, []), "queued for %s: %s" % (device, doc))

    async def assert_telemetry(self, gw, devices, seq):
        """One frame with a reading per device (temperature = its index):
        each device's history holds exactly its own reading."""
        t0 = now_ms()
        rep = await gw.telemetry(seq, [reading(d, float(i)) for i, d in enumerate(devices)])
        self.assertEqual((rep.get("type"), rep.get("accepted"), rep.get("duplicate")),
                         ("ack", len(devices), None), rep)
        for i, d in enumerate(devices):
            st, doc = await self.api("GET", "/v1/devices/%s/telemetry?from=%d&to=%d" % (d, t0 - 1000, now_ms() + 1000))
            self.assertEqual(st, 200, doc)
            self.assertEqual([r["data"] for r in doc["readings"]], [{"temperature": float(i)}],
                             "history of %s: %s" % (d, doc))

    async def device_doc(self, device):
        st, doc = await self.api("GET", "/v1/devices/%s" % device)
        self.assertEqual(st, 200, "GET device %s: %s" % (device, doc))
        return doc

    async def pairs(self, devices, seq=1):
        """Every device of one gateway gets a command through to succeeded,
        each with its own history, none queued, telemetry apart."""
        gw = await self.gateway_with(uniq("gw"), devices)
        ids = {d: [await self.roundtrip(gw, d)] for d in devices}
        for d in devices:
            await self.assert_history(d, ids[d])
        await self.assert_telemetry(gw, devices, seq)
        return gw, ids

    # -- the parts

    async def test_a_device_named_like_a_queue(self):
        base = self.baseline(self.hub, self.redis)
        await self.pairs(["kc-1", "kc-1:cmds"])
        await self.assert_unharmed(self.hub, self.redis, base)

    async def test_b1_devices_named_like_other_keys(self):
        base = self.baseline(self.hub, self.redis)
        await self.pairs(["a", "a:tm", "x", "x:cmdlog"])
        await self.assert_unharmed(self.hub, self.redis, base)

    async def test_b2_device_named_like_a_cancel_set(self):
        base = self.baseline(self.hub, self.redis)
        devices = ["y", "y:cancels"]
        gw, ids = await self.pairs(devices)
        # y's cancel set, which layout 1 put at device y:cancels's hash: a
        # cancel after delivery reaches the gateway.
        cid = await self.create("y")
        await self.delivered(gw, cid, "y")
        st, doc = await self.api("POST", "/v1/commands/%s/cancel" % cid)
        self.assertEqual(st, 200, "cancel after delivery: %s" % doc)
        m = await gw.wait_for(lambda m: m.get("type") == "cancel" and m.get("id") == cid, 5, "the cancel")
        self.assertEqual(m.get("device"), "y", m)
        await self.wait_status(cid, "canceled")
        ids["y"].append(cid)
        # Owed at the next announce (the cancel set and the queue of every
        # device are read then): a command queued while y was offline.
        await gw.close()
        deadline = time.monotonic() + 5
        while (await self.device_doc("y"))["online"]:
            self.assertLess(time.monotonic(), deadline, "y still online after its gateway left")
            await asyncio.sleep(0.05)
        cid = await self.create("y")
        self.assertEqual((await self.status(cid))["status"], "queued")
        gw = await self.gateway_with(uniq("gw"), devices)
        await self.succeed(gw, cid, "y")
        ids["y"].append(cid)
        for d in devices:
            await self.assert_history(d, ids[d])
        await self.assert_unharmed(self.hub, self.redis, base)

    async def test_c_idempotency_keys_of_colliding_key_names(self):
        base = self.baseline(self.hub, self.redis)
        d = uniq("kc-c")
        gw = await self.gateway_with(uniq("gw"), [d])
        first = await self.create(d, key="a:b", headers={"Idempotency-Key": "c"})
        second = await self.create(d, key="a", headers={"Idempotency-Key": "b:c"})
        self.assertNotEqual(first, second, "key a with b:c was taken for key a:b's repeat of c")
        # each key's repeat still answers its own command
        self.assertEqual(await self.create(d, key="a:b", headers={"Idempotency-Key": "c"}, status=200), first)
        self.assertEqual(await self.create(d, key="a", headers={"Idempotency-Key": "b:c"}, status=200), second)
        for cid in (first, second):
            await self.succeed(gw, cid, d)
        await self.assert_history(d, [first, second])
        await self.assert_unharmed(self.hub, self.redis, base)

    async def test_d_maximal_ids(self):
        base = self.baseline(self.hub, self.redis)
        sub, dev = max_id("G"), max_id("D")
        self.assertEqual((len(sub), len(dev), len(MAX_TYPE)), (128, 128, 128))
        gw = await self.gateway_with(sub, [dev], device_type=MAX_TYPE)
        await self.assert_telemetry(gw, [dev], 1)
        doc = await self.device_doc(dev)
        self.assertEqual((doc["device"], doc["device_type"], doc["gateway"], doc["online"]),
                         (dev, MAX_TYPE, sub, True), doc)
        self.assertEqual(doc["last_reading"]["data"], {"temperature": 0.0}, doc)
        st, doc = await self.api("GET", "/v1/devices?device_type=%s" % MAX_TYPE)
        self.assertEqual((st, [x["device"] for x in doc.get("devices", [])]), (200, [dev]), doc)
        cid = await self.roundtrip(gw, dev)
        await self.assert_history(dev, [cid])
        # a resent frame of the maximal gateway is a duplicate, not stored twice
        rep = await gw.telemetry(1, [reading(dev, 0.0)])
        self.assertEqual((rep.get("type"), rep.get("duplicate")), ("ack", True), rep)
        await self.assert_unharmed(self.hub, self.redis, base)

    async def test_e_gateways_named_like_their_keys(self):
        base = self.baseline(self.hub, self.redis)
        g = uniq("g")
        subs = [g, g + ":seqs", g + ":epoch", g + ":seqs:epoch"]
        gws = []
        for i, sub in enumerate(subs):
            gws.append(await self.gateway_with(sub, ["%s-d%d" % (g, i)]))
        t0 = now_ms()
        for i, gw in enumerate(gws):   # the same seq from each: stored by each
            rep = await gw.telemetry(1, [reading("%s-d%d" % (g, i), float(i))])
            self.assertEqual((rep.get("type"), rep.get("accepted"), rep.get("duplicate")), ("ack", 1, None),
                             "gateway %s seq 1: %s" % (subs[i], rep))
        for i, gw in enumerate(gws):   # and a duplicate for each only now
            rep = await gw.telemetry(1, [reading("%s-d%d" % (g, i), 99.0)])
            self.assertEqual((rep.get("type"), rep.get("duplicate")), ("ack", True),
                             "gateway %s seq 1 again: %s" % (subs[i], rep))
        for i in range(len(subs)):
            d = "%s-d%d" % (g, i)
            st, doc = await self.api("GET", "/v1/devices/%s/telemetry?from=%d&to=%d" % (d, t0 - 1000, now_ms() + 1000))
            self.assertEqual([r["data"] for r in doc.get("readings", [])], [{"temperature": float(i)}],
                             "history of %s: %s" % (d, doc))
            self.assertEqual((await self.device_doc(d))["gateway"], subs[i])
        # no connection took another over (each gateway has its own epoch)
        for i, gw in enumerate(gws):
            rep = await gw.telemetry(2, [reading("%s-d%d" % (g, i), 1.0)])
            self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", 1), rep)
        await self.assert_unharmed(self.hub, self.redis, base)


if __name__ == "__main__":
    main()
