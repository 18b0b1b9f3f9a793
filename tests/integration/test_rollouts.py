"""Fleet commands (docs/commands.md "Fleet commands (rollouts)"): POST
/v1/commands creates one held command per matching device (device type,
labels, the API key's device patterns) and answers 202 with the rollout;
422 naming the field, 401/403/404/405; GET /v1/commands/r_... with counts per
state; releases at max_per_minute (delivery times from real gateways, and
each command's sent_at against the rollout's created_at); completed once all
are final; aborted past abort_failure_ratio (the unreleased ones canceled,
the released ones run on) and min_finished delaying that decision; the
rollout's commands read and canceled one by one; a key limited to device
patterns sees only its own rollouts; a rollout survives a SIGKILLed hub; two
hubs stepping the same rollout deliver each command once. Loopback only;
every wait has a deadline."""

import asyncio
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import (CommandResponder, HubTestCase, api_keys_file, http_json, main, now_ms, rkeys,  # noqa: E402
                     uniq)

# name: (key, scopes, devices patterns or None)
KEYS = {"writer": ("iotk_ro_writer_000001", ["commands:write"], None),
        "reader": ("iotk_ro_reader_000002", ["telemetry:read"], None),
        "lim_a": ("iotk_ro_lim_a_0000003", ["commands:write", "telemetry:read"], ["t-la*"]),
        "lim_b": ("iotk_ro_lim_b_0000004", ["commands:write", "telemetry:read"], ["t-lb*"])}

FINAL = ("succeeded", "failed", "rejected", "timed_out", "expired", "canceled")
ROLLOUT_FIELDS = ("id", "status", "device_type", "labels", "name", "params", "max_per_minute",
                  "abort_failure_ratio", "min_finished", "total", "released", "created_at",
                  "updated_at", "online_only", "counts")
RID = re.compile(r"^r_[0-9a-f]{32}$")


def http(hub, method, path, body=None, key="writer", raw=None, timeout=10):
    """harness.http_json; key: a KEYS name or None (no header)."""
    return http_json(hub, method, path, body, KEYS[key][0] if key is not None else None, raw=raw, timeout=timeout)


class Fleet(CommandResponder):
    """A gateway connection that announced devices and answers their
    commands by mode: 'succeed' (received, succeeded at once), 'fail'
    (received, failed), 'hold' (received; the test finishes it with
    ack()). Records every command with its arrival time (monotonic)."""

    def __init__(self, gw, devices, modes=None, default="succeed"):
        self.devices = list(devices)
        self.modes = dict(modes or {})
        self.default = default
        self.got = []
        self.cancels = []
        self.others = []
        super().__init__(gw)

    async def on_message(self, m):
        if m.get("type") == "cancel":
            self.cancels.append(m)
            return
        if m.get("type") != "command":
            self.others.append(m)
            return
        m["t"] = time.monotonic()
        self.got.append(m)
        mode = self.modes.get(m["device"], self.default)
        await self.ack(m["id"], "received")
        if mode == "succeed":
            await self.ack(m["id"], "succeeded", result={"ok": True})
        elif mode == "fail":
            await self.ack(m["id"], "failed", error="flash write failed")

    def ids(self):
        return [m["id"] for m in self.got]

    def by_device(self, device):
        return [m for m in self.got if m["device"] == device]

    async def wait_count(self, n, timeout, what="commands"):
        deadline = time.monotonic() + timeout
        while len(self.got) < n:
            if time.monotonic() > deadline:
                raise AssertionError("%d of %d %s within %.1fs: %s" % (
                    len(self.got), n, what, timeout, [(m["device"], m["attempt"]) for m in self.got]))
            await asyncio.sleep(0.01)
        return self.got[:n]


class RolloutCase(HubTestCase):
    hub = None

    async def call(self, method, path, body=None, key="writer", hub=None, **kw):
        return await asyncio.to_thread(http, hub or self.hub, method, path, body, key, **kw)

    async def fleet_create(self, body, key="writer", hub=None, status=202):
        st, doc = await self.call("POST", "/v1/commands", body, key, hub)
        self.assertEqual(st, status, "POST /v1/commands %s: %s" % (json.dumps(body), doc))
        return doc

    async def rollout(self, rid, key="writer", hub=None):
        st, doc = await self.call("GET", "/v1/commands/" + rid, key=key, hub=hub)
        self.assertEqual(st, 200, "GET %s: %s" % (rid, doc))
        self.assert_counts(doc)
        return doc

    async def command(self, cid, key="writer", hub=None):
        st, doc = await self.call("GET", "/v1/commands/" + cid, key=key, hub=hub)
        self.assertEqual(st, 200, "GET %s: %s" % (cid, doc))
        return doc

    def assert_arrival_order(self, got, want, msg):
        """Commands reach the gateways in release order. On a Redis Cluster
        the commands of one release step are released in order but
        delivered through their devices' primaries, so two released a few
        ms apart may arrive swapped: there, each once (the release times are
        checked against the rate separately)."""
        if harness.CLUSTER_MODE:
            self.assertEqual(sorted(got), sorted(want), msg)
        else:
            self.assertEqual(got, want, msg)

    def assert_counts(self, doc):
        counts = doc.get("counts")
        self.assertIsInstance(counts, dict, doc)
        self.assertTrue(all(isinstance(v, int) and v > 0 for v in counts.values()), doc)
        self.assertTrue(set(counts) <= {"queued", "sent", "received", "in_progress"} | set(FINAL), doc)
        self.assertEqual(sum(counts.values()), doc["total"], "counts add up to total: %s" % doc)
        self.assertLessEqual(doc["released"], doc["total"], doc)

    async def wait_rollout(self, rid, pred, timeout, what, hub=None):
        deadline = time.monotonic() + timeout
        while True:
            doc = await self.rollout(rid, hub=hub)
            if pred(doc):
                return doc
            if time.monotonic() > deadline:
                self.fail("%s: not %s within %.1fs: %s" % (rid, what, timeout, doc))
            await asyncio.sleep(0.1)

    async def wait_cmd_status(self, cid, status, timeout=5, hub=None):
        deadline = time.monotonic() + timeout
        while True:
            doc = await self.command(cid, hub=hub)
            if doc["status"] == status:
                return doc
            if time.monotonic() > deadline:
                self.fail("%s: %s, expected %s" % (cid, doc["status"], status))
            await asyncio.sleep(0.03)

    async def fleet(self, hub, n, labels, prefix=None, modes=None, default="succeed", devtype="thermostat"):
        """A gateway on hub announcing n devices (prefix-00 .. prefix-NN, so
        id order is release order) with labels; answers commands."""
        prefix = prefix or uniq("t")
        devices = ["%s-%02d" % (prefix, i) for i in range(n)]
        gw = await self.gateway(hub, devices=(prefix + "*",))
        rep = await gw.announce([(d, devtype, labels) for d in devices])
        self.assertEqual(sorted(rep.get("accepted", [])), devices, rep)
        f = Fleet(gw, devices, {devices[i]: m for i, m in (modes or {}).items()}, default)
        self.addAsyncCleanup(f.stop)
        return f

    async def offline(self, hub, redis, devices, labels, devtype="thermostat"):
        """Announces devices once, then disconnects: registered, offline."""
        gw = await self.gateway(hub, devices=("t-*",))
        rep = await gw.announce([(d, devtype, labels) for d in devices])
        self.assertEqual(sorted(rep.get("accepted", [])), sorted(devices), rep)
        await gw.close()
        deadline = time.monotonic() + 5
        while any(redis.hgetall(rkeys.dev(d)).get("online") != "0" for d in devices):
            if time.monotonic() > deadline:
                self.fail("devices not offline in the registry")
            await asyncio.sleep(0.03)

    def body(self, batch, mpm=60, name="reboot", params=None, **rollout):
        ro = dict(max_per_minute=mpm, **rollout)
        b = {"target": {"device_type": "thermostat", "labels": {"batch": batch}}, "name": name,
             "rollout": ro}
        if params is not None:
            b["params"] = params
        return b

    def assert_error(self, st, doc, status, field=None, what=""):
        self.assertEqual(st, status, "%s: %s" % (what, doc))
        self.assertIsInstance(doc, dict, "%s: %r" % (what, doc))
        self.assertIsInstance(doc.get("error"), dict, "%s: %s" % (what, doc))
        if field is not None:
            self.assertEqual(doc["error"].get("field"), field, "%s: %s" % (what, doc))


def cmd_ids(redis, rid, n):
    """The ids of a rollout's commands, in release order (device-id order):
    the rollout's command list, iot:rollout:{<rid>}:cmds. Since layout 3 a
    rollout's command ids are c_<32 hex> drawn in each device's slot, not
    c_<rid>_<n>: they can only be read."""
    ids = redis.cmd("LRANGE", rkeys.rollout_cmds(rid), 0, -1)
    assert len(ids) >= n, "rollout %s has %d commands, expected %d: %s" % (rid, len(ids), n, ids)
    for i in ids:
        assert re.match(r"^c_[0-9a-f]{32}$", i), "rollout command id %r" % i
    return ids[:n]


class SharedHub(RolloutCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis, extra=["--api-keys", api_keys_file(KEYS), "--instance-id", "ro-1"])


# --------------------------------------------------------------------------
# the HTTP side

class RolloutHTTP(SharedHub):
    async def test_202_targets_type_and_labels(self):
        batch, other = uniq("b"), uniq("b")
        p = uniq("t")
        match = ["%s-m%d" % (p, i) for i in range(4)]
        site2 = "%s-s2" % p
        await self.offline(self.hub, self.redis, match, {"batch": batch, "site": "s1"})
        await self.offline(self.hub, self.redis, [site2], {"batch": batch, "site": "s2"})
        await self.offline(self.hub, self.redis, ["%s-o" % p], {"batch": other})
        await self.offline(self.hub, self.redis, ["%s-n" % p], {})
        await self.offline(self.hub, self.redis, ["%s-door" % p], {"batch": batch}, devtype="door-sensor")

        t0 = now_ms()
        doc = await self.fleet_create(dict(self.body(batch, mpm=1, params={"delay_s": 3}),
                                           ack_timeout_s=7, max_attempts=2))
        t1 = now_ms()
        for f in ROLLOUT_FIELDS:
            self.assertIn(f, doc, "202 body lacks %s: %s" % (f, doc))
        self.assertRegex(doc["id"], RID)
        self.assertEqual((doc["status"], doc["device_type"], doc["labels"], doc["name"], doc["params"]),
                         ("running", "thermostat", {"batch": batch}, "reboot", {"delay_s": 3}), doc)
        self.assertEqual((doc["total"], doc["max_per_minute"], doc["min_finished"]), (5, 1, 1), doc)
        self.assertEqual(doc["abort_failure_ratio"], 1, "default: never abort: %s" % doc)
        self.assertTrue(t0 <= doc["created_at"] <= t1, (t0, doc, t1))
        self.assert_counts(doc)
        self.assertEqual(doc["counts"], {"queued": 5}, doc)
        rid = doc["id"]

        # two labels: both must match
        doc2 = await self.fleet_create({"target": {"device_type": "thermostat",
                                                   "labels": {"batch": batch, "site": "s2"}},
                                        "name": "reboot", "rollout": {"max_per_minute": 1}})
        self.assertEqual(doc2["total"], 1, doc2)
        c = await self.command(cmd_ids(self.redis, doc2["id"], 1)[0])
        self.assertEqual((c["device"], c["rollout"]), (site2, doc2["id"]), c)

        # the first command is released at once, the rest held (1 a minute)
        doc = await self.wait_rollout(rid, lambda d: d["released"] >= 1, 3, "first released")
        self.assertEqual(doc["released"], 1, doc)
        ids = cmd_ids(self.redis, rid, 5)
        cmds = [await self.command(i) for i in ids]
        self.assertEqual([c["device"] for c in cmds], sorted(match + [site2]), "device-id order")
        for c in cmds:
            self.assertEqual((c["rollout"], c["name"], c["params"], c["ack_timeout_s"], c["max_attempts"],
                              c["device_type"], c["status"]),
                             (rid, "reboot", {"delay_s": 3}, 7, 2, "thermostat", "queued"), c)
            self.assertEqual([h["status"] for h in c["history"]], ["queued"], c)
        # ttl counts from the release: only the released one has expires_at
        self.assertIsNotNone(cmds[0]["expires_at"], cmds[0])
        self.assertGreaterEqual(cmds[0]["expires_at"], doc["created_at"] + 3600 * 1000, cmds[0])

        # listed with the device's commands, and canceled one by one
        st, lst = await self.call("GET", "/v1/devices/%s/commands" % cmds[1]["device"])
        self.assertEqual(st, 200, lst)
        self.assertEqual([(c["id"], c["rollout"]) for c in lst["commands"]], [(ids[1], rid)], lst)
        st, c = await self.call("POST", "/v1/commands/%s/cancel" % ids[1])
        self.assertEqual((st, c.get("status"), c.get("rollout")), (200, "canceled", rid), c)
        st, c = await self.call("POST", "/v1/commands/%s/cancel" % ids[0])
        self.assertEqual((st, c.get("status")), (200, "canceled"), c)
        st, c = await self.call("POST", "/v1/commands/%s/cancel" % ids[0])
        self.assertEqual(st, 409, c)
        doc = await self.rollout(rid)
        self.assertEqual(doc["counts"], {"queued": 3, "canceled": 2}, doc)
        self.assertEqual(doc["status"], "running", doc)

        # GET only on /v1/commands (a rollout's cancel: class Control)
        st, e = await self.call("GET", "/v1/commands")
        self.assert_error(st, e, 405, what="GET /v1/commands")
        st, e = await self.call("GET", "/v1/commands/r_" + "0" * 32)
        self.assert_error(st, e, 404, what="unknown rollout")

    async def test_no_match_total_0(self):
        doc = await self.fleet_create(self.body(uniq("nobody")))
        self.assertEqual((doc["total"], doc["released"], doc["counts"]), (0, 0, {}), doc)
        self.assertEqual(doc["status"], "completed", doc)
        self.assertEqual(self.redis.cmd("ZSCORE", rkeys.ACTIVE, doc["id"]), None)

    async def test_401_403(self):
        body = self.body(uniq("b"))
        st, e = await self.call("POST", "/v1/commands", body, key="reader")
        self.assert_error(st, e, 403, what="telemetry:read only")
        self.assertEqual(e["error"].get("code"), "forbidden", e)
        st, e = await self.call("POST", "/v1/commands", body, key=None)
        self.assert_error(st, e, 401, what="no key")
        # a reader may GET a rollout
        rid = (await self.fleet_create(body))["id"]
        self.assertEqual((await self.rollout(rid, key="reader"))["id"], rid)

    async def test_422_naming_the_field(self):
        batch = uniq("b")
        good = self.body(batch)
        fw = {"url": "https://fw.example/x.bin", "version": "2.4.1", "sha256": "ab" * 32}

        def with_(**kw):
            b = json.loads(json.dumps(good))
            for k, v in kw.items():
                if k.startswith("rollout_"):
                    b["rollout"][k[8:]] = v
                elif v is None:
                    b.pop(k, None)
                else:
                    b[k] = v
            return b

        cases = [
            (b"[1]", "body"), (b"{nope", "body"),
            (with_(target=None), "target"), (with_(target="thermostat"), "target"),
            (with_(target={}), "target.device_type"),
            (with_(target={"device_type": "toaster"}), "target.device_type"),
            (with_(target={"device_type": 5}), "target.device_type"),
            (with_(target={"device_type": "thermostat", "labels": "x"}), "target.labels"),
            (with_(target={"device_type": "thermostat", "labels": ["batch"]}), "target.labels"),
            (with_(target={"device_type": "thermostat", "labels": {"batch": 1}}), "target.labels"),
            (with_(name=None), "name"), (with_(name="bogus"), "name"), (with_(name=7), "name"),
            (with_(params={"delay_s": -1}), "params.delay_s"),
            (with_(params={"delay_s": "soon"}), "params.delay_s"),
            (with_(name="config", params={"setpoint": 21, "color": "red"}), None),
            (with_(name="firmware_update", params=dict(fw, sha256="XYZ")), "params.sha256"),
            (with_(ack_timeout_s=0), "ack_timeout_s"), (with_(timeout_s=604801), "timeout_s"),
            (with_(ttl_s="1h"), "ttl_s"), (with_(max_attempts=101), "max_attempts"),
            (with_(rollout="fast"), "rollout"), (with_(rollout=[1]), "rollout"),
            (with_(rollout_max_per_minute=0), "rollout.max_per_minute"),
            (with_(rollout_max_per_minute=1.5), "rollout.max_per_minute"),
            (with_(rollout_max_per_minute="60"), "rollout.max_per_minute"),
            (with_(rollout_abort_failure_ratio=-0.1), "rollout.abort_failure_ratio"),
            (with_(rollout_abort_failure_ratio=1.5), "rollout.abort_failure_ratio"),
            (with_(rollout_abort_failure_ratio="0.2"), "rollout.abort_failure_ratio"),
            (with_(rollout_min_finished=0), "rollout.min_finished"),
            (with_(rollout_min_finished=True), "rollout.min_finished"),
        ]
        before = len(self.redis.cmd("KEYS", "iot:rollout:*"))
        for body, field in cases:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            st, e = await self.call("POST", "/v1/commands", raw=raw)
            self.assert_error(st, e, 422, what=raw.decode(errors="replace"))
            self.assertEqual(e["error"].get("code"), "invalid", e)
            if field is not None:
                self.assertEqual(e["error"].get("field"), field, "%s: %s" % (raw, e))
            else:
                self.assertTrue(str(e["error"].get("field", "")).startswith("params"), "%s: %s" % (raw, e))
        self.assertEqual(len(self.redis.cmd("KEYS", "iot:rollout:*")), before, "a 422 created a rollout")
        # the limits themselves are accepted
        for ro in ({"max_per_minute": 1, "abort_failure_ratio": 0, "min_finished": 1},
                   {"max_per_minute": 1000000, "abort_failure_ratio": 1}, None):
            b = with_(rollout=ro)  # None: no rollout object (the defaults)
            doc = await self.fleet_create(b)
            self.assertRegex(doc["id"], RID)
        doc = await self.fleet_create(with_(name="firmware_update", params=fw, ack_timeout_s=3600,
                                            timeout_s=604800, ttl_s=2592000, max_attempts=100))
        self.assertEqual(doc["params"], fw, doc)

    async def test_key_patterns_narrow_and_hide(self):
        batch = uniq("b")
        p = uniq("")
        la = ["t-la%s-%d" % (p, i) for i in range(3)]
        lb = ["t-lb%s-%d" % (p, i) for i in range(2)]
        await self.offline(self.hub, self.redis, la + lb, {"batch": batch})
        body = self.body(batch, mpm=1)

        ra = await self.fleet_create(body, key="lim_a")
        self.assertEqual(ra["total"], 3, "narrowed to t-la*: %s" % ra)
        rb = await self.fleet_create(body, key="lim_b")
        self.assertEqual(rb["total"], 2, "narrowed to t-lb*: %s" % rb)
        rw = await self.fleet_create(body, key="writer")
        self.assertEqual(rw["total"], 5, "unrestricted: %s" % rw)
        a_cmds = [await self.command(c) for c in cmd_ids(self.redis, ra["id"], 3)]
        self.assertEqual(sorted(c["device"] for c in a_cmds), la)

        self.assertEqual((await self.rollout(ra["id"], key="lim_a"))["total"], 3)
        for rid, key in ((rb["id"], "lim_a"), (rw["id"], "lim_a"), (ra["id"], "lim_b")):
            st, e = await self.call("GET", "/v1/commands/" + rid, key=key)
            self.assert_error(st, e, 404, what="%s's rollout seen with %s" % (rid, key))
        # an unrestricted key sees every rollout
        for rid in (ra["id"], rb["id"]):
            self.assertEqual((await self.rollout(rid, key="writer"))["id"], rid)
        # commands of devices outside the key's patterns are 404 for it
        st, e = await self.call("GET", "/v1/commands/" + cmd_ids(self.redis, rb["id"], 1)[0], key="lim_a")
        self.assert_error(st, e, 404, what="t-lb command with the t-la key")
        st, e = await self.call("POST", "/v1/commands/%s/cancel" % cmd_ids(self.redis, rb["id"], 1)[0], key="lim_a")
        self.assert_error(st, e, 404, what="cancel a t-lb command with the t-la key")
        st, c = await self.call("POST", "/v1/commands/%s/cancel" % cmd_ids(self.redis, ra["id"], 2)[1], key="lim_a")
        self.assertEqual((st, c.get("status")), (200, "canceled"), c)


# --------------------------------------------------------------------------
# pause, resume, cancel; online_only; completion as soon as all are final

class Control(SharedHub):
    async def test_pause_resume_cancel(self):
        batch = uniq("b")
        f = await self.fleet(self.hub, 6, {"batch": batch})
        doc = await self.fleet_create(self.body(batch, mpm=60))
        rid = doc["id"]
        await f.wait_count(1, 3, "the first release")
        st, doc = await self.call("POST", "/v1/commands/%s/pause" % rid)
        self.assertEqual((st, doc.get("status")), (200, "paused"), doc)
        st, doc = await self.call("POST", "/v1/commands/%s/pause" % rid)
        self.assertEqual(st, 409, doc)
        await asyncio.sleep(2.5)                  # at 60/min, 2 more would have gone
        self.assertEqual(len(f.got), 1, "released while paused: %s" % f.ids())
        self.assertEqual((await self.rollout(rid))["released"], 1)
        st, doc = await self.call("POST", "/v1/commands/%s/resume" % rid)
        self.assertEqual((st, doc.get("status")), (200, "running"), doc)
        await f.wait_count(2, 3, "a release after resume")
        st, doc = await self.call("POST", "/v1/commands/%s/cancel" % rid)
        self.assertEqual(st, 200, doc)
        self.assertIn(doc["status"], ("canceling", "canceled"), doc)
        doc = await self.wait_rollout(rid, lambda d: d["status"] == "canceled", 3, "canceled")
        self.assertEqual(doc["counts"].get("canceled"), 6 - len(f.got), doc)
        await asyncio.sleep(1.5)
        self.assertEqual(len(f.got), len(set(f.ids())), "a command twice")
        self.assertLessEqual(len(f.got), 3, "released after the cancel: %s" % f.ids())
        self.assertEqual(self.redis.cmd("ZSCORE", rkeys.ACTIVE, rid), None)
        st, doc = await self.call("POST", "/v1/commands/%s/resume" % rid)
        self.assertEqual(st, 409, doc)
        for path in ("pause", "resume"):
            st, _ = await self.call("POST", "/v1/commands/%s/%s" % (f.ids()[0], path))
            self.assertEqual(st, 404, "a command cannot be %sd" % path)
        st, _ = await self.call("POST", "/v1/commands/r_%s/pause" % ("0" * 32))
        self.assertEqual(st, 404)
        st, _ = await self.call("POST", "/v1/commands/%s/pause" % rid, key=None)
        self.assertEqual(st, 401)

    async def test_online_only_skips_offline_devices(self):
        batch = uniq("b")
        f = await self.fleet(self.hub, 2, {"batch": batch})
        gone = ["t-%s-off%d" % (uniq("x"), i) for i in range(2)]
        await self.offline(self.hub, self.redis, gone, {"batch": batch})
        doc = await self.fleet_create(self.body(batch, mpm=6000, online_only=True))
        rid = doc["id"]
        self.assertEqual((doc["total"], doc["online_only"]), (4, True), doc)
        doc = await self.wait_rollout(rid, lambda d: d["status"] != "running", 5, "finished")
        self.assertEqual((doc["status"], doc["counts"]), ("completed", {"succeeded": 2, "canceled": 2}), doc)
        self.assertEqual(sorted(m["device"] for m in f.got), sorted(f.devices))
        st, body = await self.call("POST", "/v1/commands", self.body(batch, online_only="yes"))
        self.assert_error(st, body, 422, "rollout.online_only")

    async def test_completed_once_every_command_is_final(self):
        """Held commands canceled one by one: the rollout is completed at
        once, not when its release clock reaches them."""
        batch = uniq("b")
        f = await self.fleet(self.hub, 4, {"batch": batch})
        doc = await self.fleet_create(self.body(batch, mpm=1))   # one a minute
        rid = doc["id"]
        await f.wait_count(1, 3, "the first release")
        for cid in cmd_ids(self.redis, rid, 4)[1:]:
            st, _ = await self.call("POST", "/v1/commands/%s/cancel" % cid)
            self.assertEqual(st, 200)
        doc = await self.wait_rollout(rid, lambda d: d["status"] != "running", 3, "completed")
        self.assertEqual((doc["status"], doc["counts"]), ("completed", {"succeeded": 1, "canceled": 3}), doc)


# --------------------------------------------------------------------------
# release rate, completion

class Release(SharedHub):
    async def test_rate_then_completed(self):
        batch = uniq("b")
        f = await self.fleet(self.hub, 8, {"batch": batch})
        t0 = time.monotonic()
        doc = await self.fleet_create(self.body(batch, mpm=120))
        rid, created = doc["id"], doc["created_at"]
        self.assertEqual(doc["total"], 8, doc)
        ids = cmd_ids(self.redis, rid, 8)

        # released never runs ahead of the rate
        polls = []
        deadline = time.monotonic() + 8
        while len(f.got) < 8:
            r = await self.rollout(rid)
            limit = (now_ms() - created) * 120 // 60000 + 1
            polls.append((r["released"], limit))
            self.assertLessEqual(r["released"], limit, "released ahead of 120/min: %s" % polls)
            if time.monotonic() > deadline:
                self.fail("8 deliveries not within 8 s at 120/min: %s" % [m["device"] for m in f.got])
            await asyncio.sleep(0.15)
        got = f.got[:8]
        self.assert_arrival_order([m["id"] for m in got], ids, "release order = device-id order, once each")
        self.assert_arrival_order([m["device"] for m in got], f.devices, "devices")
        self.assertEqual({m["attempt"] for m in got}, {1})
        times = [m["t"] - t0 for m in got]
        self.assertLess(times[0], 1.0, "the first goes out at once: %s" % times)
        span = times[-1] - times[0]
        # 7 gaps of 0.5 s, released by a step about once a second
        self.assertGreater(span, 2.9, "8 at 120/min in under 3 s: %s" % times)
        self.assertLess(span, 5.5, "8 at 120/min took too long: %s" % times)
        self.assertTrue(0.4 <= span / 7 <= 0.8, "mean gap %.2f s: %s" % (span / 7, times))
        self.assertGreater(len({round(t, 1) for t in times}), 2, "all in one burst: %s" % times)
        # the hub's own clock: the i-th command is not sent before created + i * 500 ms,
        # nor much after (a step a second)
        for i, cid in enumerate(ids):
            c = await self.command(cid)
            self.assertGreaterEqual(c["sent_at"], created + i * 500, "command %d too early: %s" % (i, c))
            self.assertLessEqual(c["sent_at"], created + i * 500 + 2000, "command %d too late: %s" % (i, c))
            self.assertEqual(c["expires_at"] - c["ttl_s"] * 1000 >= created + i * 500, True, c)
        await self.no_more(f, 8, 0.5)

        doc = await self.wait_rollout(rid, lambda d: d["status"] != "running", 3, "finished")
        self.assertEqual((doc["status"], doc["released"], doc["counts"]),
                         ("completed", 8, {"succeeded": 8}), doc)
        self.assertEqual(self.redis.cmd("ZSCORE", rkeys.ACTIVE, rid), None)

    async def test_completed_with_failures_under_the_ratio(self):
        batch = uniq("b")
        f = await self.fleet(self.hub, 4, {"batch": batch}, modes={1: "fail"})
        rid = (await self.fleet_create(self.body(batch, mpm=6000, abort_failure_ratio=0.5)))["id"]
        await f.wait_count(4, 4)
        doc = await self.wait_rollout(rid, lambda d: d["status"] != "running", 4, "finished")
        self.assertEqual((doc["status"], doc["counts"]), ("completed", {"succeeded": 3, "failed": 1}), doc)

    async def no_more(self, f, n, seconds):
        await asyncio.sleep(seconds)
        self.assertEqual(len(f.got), n, "more deliveries than commands: %s" % [m["id"] for m in f.got])


# --------------------------------------------------------------------------
# abort

class Abort(SharedHub):
    async def test_failure_ratio_aborts(self):
        batch = uniq("b")
        f = await self.fleet(self.hub, 6, {"batch": batch}, default="hold")
        rid = (await self.fleet_create(self.body(batch, mpm=120, abort_failure_ratio=0.2)))["id"]
        ids = cmd_ids(self.redis, rid, 6)
        await f.wait_count(2, 4, "first two releases")
        await self.wait_cmd_status(ids[1], "received")
        await f.ack(ids[0], "failed", error="bricked")
        await self.wait_cmd_status(ids[0], "failed")
        doc = await self.wait_rollout(rid, lambda d: d["status"] != "running", 3, "aborted")
        self.assertEqual(doc["status"], "aborted", doc)
        await asyncio.sleep(1.3)  # steps keep running: nothing more goes out
        delivered = f.ids()
        self.assert_arrival_order(delivered, ids[:len(delivered)], "release order, once each")
        n = len(delivered)
        self.assertTrue(2 <= n < 6, "released before the abort: %d" % n)
        doc = await self.rollout(rid)
        want = {"failed": 1, "received": n - 1, "canceled": 6 - n}
        self.assertEqual(doc["counts"], {k: v for k, v in want.items() if v}, doc)
        self.assertEqual(doc["status"], "aborted", doc)
        for cid in ids[n:]:
            c = await self.command(cid)
            self.assertEqual([h["status"] for h in c["history"]], ["queued", "canceled"], c)
            self.assertIn("abort", c["error"] or "", c)
        self.assertEqual(f.cancels, [], "held commands were never sent: no cancel")
        # released ones still finish
        for cid in delivered[1:]:
            await f.ack(cid, "succeeded")
        for cid in delivered[1:]:
            await self.wait_cmd_status(cid, "succeeded")
        doc = await self.rollout(rid)
        self.assertEqual(doc["status"], "aborted", doc)
        self.assertEqual(doc["counts"], {k: v for k, v in
                                         {"failed": 1, "succeeded": n - 1, "canceled": 6 - n}.items() if v}, doc)
        self.assertEqual(len(f.got), n, "a canceled command was delivered")

    async def test_expired_counts_as_a_failure(self):
        # offline devices, ttl_s 1 from the release: the first expires, ratio 0 aborts
        batch = uniq("b")
        p = uniq("t")
        devs = ["%s-%d" % (p, i) for i in range(4)]
        await self.offline(self.hub, self.redis, devs, {"batch": batch})
        doc = await self.fleet_create(dict(self.body(batch, mpm=30, abort_failure_ratio=0), ttl_s=1))
        rid, ids = doc["id"], cmd_ids(self.redis, doc["id"], 4)
        doc = await self.wait_rollout(rid, lambda d: d["status"] != "running", 6, "aborted")
        self.assertEqual(doc["status"], "aborted", doc)
        c = await self.command(ids[0])
        self.assertEqual(c["status"], "expired", c)
        # ttl from the release, not from the creation
        self.assertGreaterEqual(c["updated_at"], c["created_at"] + 1000, c)
        self.assertEqual(doc["counts"].get("expired"), 1, doc)
        self.assertEqual(doc["counts"].get("canceled", 0) + doc["counts"].get("expired", 0) +
                         doc["counts"].get("queued", 0), 4, doc)
        self.assertGreaterEqual(doc["counts"].get("canceled", 0), 2, doc)

    async def test_min_finished_delays_the_abort(self):
        batch = uniq("b")
        f = await self.fleet(self.hub, 10, {"batch": batch}, default="hold")
        rid = (await self.fleet_create(self.body(batch, mpm=120, abort_failure_ratio=0.2, min_finished=3)))["id"]
        ids = cmd_ids(self.redis, rid, 10)
        await f.wait_count(3, 4, "first three releases")
        await f.ack(ids[0], "failed", error="bricked")
        await self.wait_cmd_status(ids[0], "failed")
        r0 = (await self.rollout(rid))["released"]
        # 1 finished (a failure) < min_finished: the rollout runs on
        doc = await self.wait_rollout(rid, lambda d: d["released"] > r0 or d["status"] != "running", 3,
                                      "released after one failure")
        self.assertEqual(doc["status"], "running", doc)
        await f.ack(ids[1], "failed", error="bricked")
        await self.wait_cmd_status(ids[1], "failed")
        r1 = (await self.rollout(rid))["released"]
        if r1 < 10:
            doc = await self.wait_rollout(rid, lambda d: d["released"] > r1 or d["status"] != "running", 3,
                                          "released after two failures")
            self.assertEqual(doc["status"], "running", doc)
        # the third finished one: 2/3 failed > 0.2
        await f.ack(ids[2], "succeeded")
        doc = await self.wait_rollout(rid, lambda d: d["status"] != "running", 3, "aborted")
        self.assertEqual(doc["status"], "aborted", doc)
        await asyncio.sleep(0.3)
        n = len(f.got)
        self.assertEqual(doc["counts"].get("canceled", 0), 10 - n, (doc, f.ids()))
        self.assert_arrival_order(f.ids(), ids[:n], "release order, once each")


# --------------------------------------------------------------------------
# restarts and two hubs

class Restart(RolloutCase):
    async def test_survives_sigkill(self):
        redis = self.start_redis()
        keys = api_keys_file(KEYS)
        hub1 = self.start_hub(redis, extra=["--api-keys", keys, "--instance-id", "ro-k1"])
        self.hub = hub1
        batch, prefix = uniq("b"), uniq("t")
        f = await self.fleet(hub1, 6, {"batch": batch}, prefix=prefix)
        sub = f.gw.sub
        rid = (await self.fleet_create(self.body(batch, mpm=60)))["id"]
        ids = cmd_ids(redis, rid, 6)
        await f.wait_count(2, 4, "two releases on hub 1")
        await self.wait_cmd_status(ids[1], "succeeded")
        hub1.kill()
        await f.gw.wait_closed(5)
        await f.stop()
        before = f.ids()
        rel = int(redis.hgetall(rkeys.rollout(rid))["released"])
        self.assertLess(rel, 6, "all released before the kill; the test proves nothing")

        hub2 = self.start_hub(redis, extra=["--api-keys", keys, "--instance-id", "ro-k2"])
        self.hub = hub2
        gw = await self.gateway(hub2, sub=sub, devices=(prefix + "*",))
        rep = await gw.announce([(d, "thermostat", {"batch": batch}) for d in f.devices])
        self.assertEqual(len(rep["accepted"]), 6, rep)
        f2 = Fleet(gw, f.devices)
        self.addAsyncCleanup(f2.stop)
        await f2.wait_count(6 - len(before), 8, "the rest from hub 2")
        doc = await self.wait_rollout(rid, lambda d: d["status"] != "running", 4, "completed")
        self.assertEqual((doc["status"], doc["counts"]), ("completed", {"succeeded": 6}), doc)
        await asyncio.sleep(0.5)
        self.assert_arrival_order(before + f2.ids(), ids, "each command delivered once, in order")
        hub2.stop()


class TwoHubs(RolloutCase):
    async def test_releases_not_duplicated(self):
        redis = self.start_redis()
        keys = api_keys_file(KEYS)
        a = self.start_hub(redis, extra=["--api-keys", keys, "--instance-id", "ro-a"])
        b = self.start_hub(redis, extra=["--api-keys", keys, "--instance-id", "ro-b"])
        self.hub = a
        batch, p = uniq("b"), uniq("t")
        fa = await self.fleet(a, 6, {"batch": batch}, prefix=p + "a")
        fb = await self.fleet(b, 6, {"batch": batch}, prefix=p + "b")
        rid = (await self.fleet_create(self.body(batch, mpm=360)))["id"]
        ids = cmd_ids(redis, rid, 12)
        deadline = time.monotonic() + 8
        while len(fa.got) + len(fb.got) < 12:
            if time.monotonic() > deadline:
                self.fail("%d of 12 delivered: %s %s" % (len(fa.got) + len(fb.got), fa.ids(), fb.ids()))
            await asyncio.sleep(0.05)
        doc = await self.wait_rollout(rid, lambda d: d["status"] != "running", 4, "completed", hub=b)
        self.assertEqual((doc["status"], doc["counts"]), ("completed", {"succeeded": 12}), doc)
        await asyncio.sleep(1.2)  # a few more steps on both hubs
        self.assert_arrival_order(fa.ids(), ids[:6], "A's devices, once each")
        self.assert_arrival_order(fb.ids(), ids[6:], "B's devices, once each")
        for cid in ids:
            c = await self.command(cid, hub=b)
            self.assertEqual([h["status"] for h in c["history"]], ["queued", "sent", "received", "succeeded"], c)
        a.stop()
        b.stop()


if __name__ == "__main__":
    main()
