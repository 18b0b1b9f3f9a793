"""Schema reload on SIGHUP (docs/device-types.md "Files"): a changed schema applies without a
restart and without dropping gateways; a broken schema dir keeps the old set
and logs "reload failed"."""

import asyncio
import glob
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import SCHEMAS_DIR, HubTestCase, main, mkdtemp, reading, rmtree, uniq  # noqa: E402

HYGROMETER = {
    "device_type": "hygrometer",
    "telemetry": {"type": "object", "required": ["rh"],
                  "properties": {"rh": {"type": "number", "minimum": 0, "maximum": 100}},
                  "additionalProperties": False},
    "commands": {},
}


class Reload(HubTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()

    async def asyncSetUp(self):
        await super().asyncSetUp()
        self.dir = mkdtemp("iot-hub-schemas-")
        for f in glob.glob(os.path.join(SCHEMAS_DIR, "*.json")):
            shutil.copy(f, self.dir)
        self.addCleanup(rmtree, self.dir)
        self.hub = self.start_hub(self.redis, schemas=self.dir)
        self.seq = 0

    def type_file(self, device_type):
        for f in glob.glob(os.path.join(self.dir, "*.json")):
            with open(f) as fh:
                if json.load(fh).get("device_type") == device_type:
                    return f
        raise AssertionError("no schema file for %s in %s" % (device_type, SCHEMAS_DIR))

    def edit_thermostat_max(self, maximum):
        f = self.type_file("thermostat")
        with open(f) as fh:
            doc = json.load(fh)
        doc["telemetry"]["properties"]["temperature"]["maximum"] = maximum
        tmp = f + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(doc, fh)
        os.rename(tmp, f)  # atomic: the hub never reads half a file

    async def send_temp(self, gw, d, t):
        self.seq += 1
        return await gw.telemetry(self.seq, [reading(d, t)])

    async def poll_until(self, fn, what, timeout=5):
        deadline = time.monotonic() + timeout
        while True:
            ok, last = await fn()
            if ok:
                return last
            if time.monotonic() > deadline:
                raise AssertionError("%s not seen within %ss after SIGHUP; last reply %r; %s"
                                     % (what, timeout, last, self.hub.describe()))
            await asyncio.sleep(0.05)

    async def gw_dev(self, device_type="thermostat"):
        gw = await self.gateway(self.hub)
        d = uniq("t")
        rep = await gw.announce([(d, device_type)])
        self.assertEqual(rep.get("accepted"), [d], rep)
        return gw, d

    async def test_changed_schema_applies(self):
        gw, d = await self.gw_dev()
        rep = await self.send_temp(gw, d, 140.0)
        self.assertEqual([r.get("code") for r in rep.get("rejected", [])], ["invalid"], rep)
        self.edit_thermostat_max(150)
        self.hub.sighup()

        async def accepted():
            rep = await self.send_temp(gw, d, 140.0)
            return rep.get("accepted") == 1, rep
        await self.poll_until(accepted, "140 accepted")
        rep = await self.send_temp(gw, d, 160.0)
        self.assertEqual(rep["rejected"][0]["errors"][0].get("message"), "must be <= 150", rep)
        self.assertIsNone(gw.close_code, "gateway dropped by a reload")
        self.hub.check_alive()

    async def test_new_type_after_reload(self):
        gw = await self.gateway(self.hub)
        d = uniq("t")
        rep = await gw.announce([(d, "hygrometer")])
        self.assertEqual([r.get("code") for r in rep.get("rejected", [])], ["unknown_device_type"], rep)
        with open(os.path.join(self.dir, "hygrometer.json"), "w") as fh:
            json.dump(HYGROMETER, fh)
        self.hub.sighup()

        async def announced():
            rep = await gw.announce([(d, "hygrometer")])
            return rep.get("accepted") == [d], rep
        await self.poll_until(announced, "hygrometer announce accepted")
        self.seq += 1
        rep = await gw.telemetry(self.seq, [{"device": d, "data": {"rh": 55.5}}, {"device": d, "data": {"rh": 101}}])
        self.assertEqual((rep.get("accepted"), [r.get("code") for r in rep.get("rejected", [])]), (1, ["invalid"]), rep)

    async def test_removed_type_after_reload(self):
        gw = await self.gateway(self.hub)
        os.unlink(self.type_file("door-sensor"))
        self.hub.sighup()

        async def refused():
            d = uniq("t")
            rep = await gw.announce([(d, "door-sensor")])
            return [r.get("code") for r in rep.get("rejected", [])] == ["unknown_device_type"], rep
        await self.poll_until(refused, "door-sensor refused")

    async def test_broken_file_keeps_old_set(self):
        gw, d = await self.gw_dev()
        n0 = self.hub.line_count()
        # One good change and one broken file in the same reload: nothing applies.
        self.edit_thermostat_max(150)
        with open(os.path.join(self.dir, "zz-broken.json"), "w") as fh:
            fh.write('{"device_type": "broken", "telemetry": {')
        self.hub.sighup()
        self.hub.wait_line("reload failed", 5, start=n0)
        self.hub.check_alive()
        rep = await self.send_temp(gw, d, 140.0)
        self.assertEqual([r.get("code") for r in rep.get("rejected", [])], ["invalid"],
                         "old schema (max 125) should still apply after a failed reload: %r" % rep)
        rep = await self.send_temp(gw, d, 20.0)
        self.assertEqual(rep.get("accepted"), 1, rep)
        gw2 = await self.gateway(self.hub)
        rep = await gw2.announce([(uniq("t"), "door-sensor"), (uniq("t"), "power-meter")])
        self.assertEqual(len(rep.get("accepted", [])), 2, "old types lost after a failed reload: %r" % rep)
        # Fixing the dir and reloading again works.
        os.unlink(os.path.join(self.dir, "zz-broken.json"))
        self.hub.sighup()

        async def accepted():
            rep = await self.send_temp(gw, d, 140.0)
            return rep.get("accepted") == 1, rep
        await self.poll_until(accepted, "140 accepted after the fix")

    async def test_invalid_schemas_rejected_on_reload(self):
        gw, d = await self.gw_dev()
        bad_docs = [
            {"telemetry": {"type": "object"}},                                  # no device_type
            {"device_type": "x1", "telemetry": {"type": "bogus"}},              # unknown type name
            {"device_type": "thermostat", "telemetry": {"type": "object"}},     # duplicate device_type
            {"device_type": "x2", "telemetry": {"type": "object", "properties": {"a": {"type": "string", "pattern": "("}}}},
        ]
        for doc in bad_docs:
            path = os.path.join(self.dir, "zz-bad.json")
            with open(path, "w") as fh:
                json.dump(doc, fh)
            n0 = self.hub.line_count()
            self.hub.sighup()
            try:
                self.hub.wait_line("reload failed", 5, start=n0)
            except AssertionError as e:
                raise AssertionError("schema %r: %s" % (doc, e)) from None
            os.unlink(path)
        self.hub.check_alive()
        rep = await self.send_temp(gw, d, 20.0)
        self.assertEqual(rep.get("accepted"), 1, rep)

    async def test_missing_dir_keeps_old_set(self):
        gw, d = await self.gw_dev()
        n0 = self.hub.line_count()
        moved = self.dir + ".away"
        os.rename(self.dir, moved)
        try:
            self.hub.sighup()
            self.hub.wait_line("reload failed", 5, start=n0)
        finally:
            os.rename(moved, self.dir)
        self.hub.check_alive()
        rep = await self.send_temp(gw, d, 20.0)
        self.assertEqual(rep.get("accepted"), 1, rep)
        rep = await self.send_temp(gw, d, 130.0)
        self.assertEqual([r.get("code") for r in rep.get("rejected", [])], ["invalid"], rep)


if __name__ == "__main__":
    main()
