"""tools/migrate-layout (docs/streams.md, "Key names"): layout-1 data
written by hand with RESP, as a layout-1 hub left it, is refused by the hub
(exit 1, the error names the tool); --dry-run changes nothing; the tool
renames every layout-1 key (types and suffixes told apart, TTLs kept,
idempotency keys split at their command's owner), resumes after an
interruption, is a no-op when run again, sets iot:layout to 2; the hub then
starts, migrates layout 2 to 3 itself and serves the data: registry,
history, type sets, queued commands and owed cancels delivered at the next
announce, seq windows, idempotency. A conflict (both names present) is
reported and left, iot:layout unset.

Layout 2 -> 3 (hub/migrate.c, at start): layout-2 data written by hand with
layout 2's names (devices, types, commands with timers, owed cancels,
idempotency keys, a running rollout, a dead run's lease and online set) is
migrated by the hub before it serves: every layout-2 key is gone,
iot:{hub}:layout is 3, and everything is reachable through the API and the
gateway protocol (the dead run reaped, the expired command swept, the
rollout stepped to completion, the idempotency key answering for its
device); a restart migrates nothing again."""

import asyncio
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (SOURCE_DIR, Hub, HubTestCase, api_keys_file, hub_args, http_json, main, now_ms,  # noqa: E402
                     reading, rkeys, rkeys2)

TOOL = os.path.join(SOURCE_DIR, "tools", "migrate-layout")
KEYS = {"admin": ("iotk_migrate_admin_01", ["admin"], None),
        "a:b": ("iotk_migrate_ab_00002", ["commands:write"], None)}
DB = 2
C_QUEUED = "c_" + "1" * 32     # kc-1's command, queued while it was offline
C_CANCELED = "c_" + "2" * 32   # kc-1's command canceled after delivery: owed
C_IDEM = "c_" + "3" * 32       # created by key a:b with Idempotency-Key c
C_GONE = "c_" + "4" * 32       # named by an idempotency key, hash expired


def migrate(redis, *args, db=DB):
    p = subprocess.run([sys.executable, TOOL, "--redis", "redis://127.0.0.1:%d/%d" % (redis.port, db)] + list(args),
                       capture_output=True, text=True, timeout=60)
    return p.returncode, p.stdout + p.stderr


def cmd_hash(cid, device, status, owner, now, **extra):
    f = {"id": cid, "device": device, "type": "thermostat", "name": "reboot", "params": '{"delay_s":1}',
         "status": status, "attempt": 0, "max_attempts": 3, "ack_timeout_s": 10, "timeout_s": 300,
         "ttl_s": 3600, "created_at": now, "updated_at": now, "expires_at": now + 3600000,
         "owner": owner, "rollout": ""}
    f.update(extra)
    return [x for kv in f.items() for x in kv]


def layout1(r):
    """Writes what a layout-1 hub left: the names of hub/keys.h before the
    braces. Returns {old key: new key} of every key the tool must rename."""
    now = now_ms()
    out = {}

    def put(old, new, *cmd):
        r.cmd(cmd[0], old, *cmd[1:])
        out[old] = new

    for d, gw in (("kc-1", "gw-old"), ("m:x", "gw:seqs"), ("z:cmds", "gw-old")):
        put("iot:dev:" + d, rkeys.dev(d), "HSET", "type", "thermostat", "labels", "{}", "gateway", gw,
            "conn", "old:1", "instance", "old", "online", "0", "last_seen", now, "announced_at", now)
        r.cmd("SADD", "iot:devices", d)
    put("iot:type:thermostat", rkeys2.type("thermostat"), "SADD", "kc-1", "m:x", "z:cmds")
    for d, seq0 in (("kc-1", 1), ("m:x", 1)):
        for i in range(2):
            put("iot:tm:" + d, rkeys.tm2(d), "XADD", "%d-0" % (now - 5000 + i), "ts", now - 5000 + i,
                "data", '{"temperature":%d}' % (20 + i), "gw", "gw-old", "seq", seq0 + i)
    put("iot:gw:gw-old:seqs", rkeys.gw_seqs2("gw-old"), "ZADD", 1, 1, 2, 2)
    r.cmd("EXPIRE", "iot:gw:gw-old:seqs", 2592000)
    put("iot:gw:gw-old:epoch", rkeys.gw_epoch("gw-old"), "SET", 3)
    # gateway `gw:seqs`: its seqs key ends in :seqs:seqs, its epoch in :seqs:epoch
    put("iot:gw:gw:seqs:seqs", rkeys.gw_seqs2("gw:seqs"), "ZADD", 1, 1)
    put("iot:gw:gw:seqs:epoch", rkeys.gw_epoch("gw:seqs"), "SET", 1)
    # commands of kc-1 (hub-generated names stay)
    r.cmd("HSET", "iot:cmd:" + C_QUEUED, *cmd_hash(C_QUEUED, "kc-1", "queued", "admin", now))
    r.cmd("HSET", "iot:cmd:" + C_CANCELED, *cmd_hash(C_CANCELED, "kc-1", "canceled", "admin", now))
    r.cmd("HSET", "iot:cmd:" + C_IDEM, *cmd_hash(C_IDEM, "kc-1", "succeeded", "a:b", now))
    for cid in (C_QUEUED, C_CANCELED, C_IDEM):
        r.cmd("RPUSH", "iot:cmd:%s:log" % cid, '{"status":"queued","at":%d}' % now)
    r.cmd("SET", "iot:cmd:seq", 3)
    r.cmd("ZADD", "iot:cmd:timers", now + 3600000, C_QUEUED)
    put("iot:dev:kc-1:cmds", rkeys.cmds("kc-1"), "ZADD", 1, C_QUEUED)
    put("iot:dev:kc-1:cmdlog", rkeys.cmdlog("kc-1"), "ZADD", 1, C_QUEUED, 2, C_CANCELED, 3, C_IDEM)
    put("iot:dev:kc-1:cancels", rkeys.cancels("kc-1"), "SADD", C_CANCELED)
    # idempotency keys: split at the command's owner; without a command only
    # a name with one ':' splits one way
    put("iot:idem:a:b:c", rkeys2.idem("a:b", "c"), "SET", C_IDEM)
    r.cmd("EXPIRE", "iot:idem:a:b:c", 86400)
    put("iot:idem:x:y", rkeys2.idem("x", "y"), "SET", C_GONE)
    r.cmd("SET", "iot:idem:p:q:r", C_GONE)   # ambiguous: left, reported
    # hub-generated and fixed names a layout-1 hub wrote too (not renamed)
    r.cmd("XADD", "iot:feed", "*", "gw", "gw-old", "seq", 1, "readings", "")
    return out


class Migrate(HubTestCase):
    def select(self, redis, db=DB):
        redis.cmd("SELECT", db)   # the cached connection stays on db
        return redis

    def refused(self, redis):
        h = Hub(hub_args("redis://127.0.0.1:%d/%d" % (redis.port, DB), self.secret_file), wait=False)
        self.addCleanup(h.cleanup)
        self.assertEqual(h.wait_exit(15), 1, h.describe())
        self.assertIn("run tools/migrate-layout --redis redis://127.0.0.1:%d/%d" % (redis.port, DB),
                      h.stderr_text())
        self.assertNotIn("listening on", h.stderr_text())

    async def api(self, hub, method, path, body=None, key="admin", headers=None):
        return await asyncio.to_thread(http_json, hub, method, path, body, KEYS[key][0], headers)

    async def test_migrate_then_serve(self):
        redis = self.select(self.start_redis())
        renames = layout1(redis)
        snapshot = {k: redis.cmd("TYPE", k) for k in redis.cmd("KEYS", "*")}

        self.refused(redis)

        rc, out = migrate(redis, "--dry-run")
        self.assertEqual(rc, 0, out)
        self.assertIn("would rename %d keys" % len(renames), out)
        self.assertIn("left iot:idem:p:q:r", out)
        self.assertEqual({k: redis.cmd("TYPE", k) for k in redis.cmd("KEYS", "*")}, snapshot,
                         "--dry-run changed something")

        # interrupted earlier: one key already has its new name
        redis.cmd("RENAME", "iot:tm:kc-1", rkeys.tm2("kc-1"))
        ttl0 = redis.cmd("TTL", "iot:gw:gw-old:seqs")
        rc, out = migrate(redis, "--verbose")
        self.assertEqual(rc, 0, out)
        self.assertIn("renamed %d keys" % (len(renames) - 1), out)
        self.assertIn("iot:layout = 2", out)
        for old, new in renames.items():
            self.assertEqual((redis.cmd("EXISTS", old), redis.cmd("EXISTS", new)), (0, 1), "%s -> %s" % (old, new))
        self.assertEqual(redis.cmd("GET", "iot:layout"), "2")
        self.assertGreater(redis.cmd("TTL", rkeys.gw_seqs2("gw-old")), ttl0 - 60, "the TTL moved with the key")
        self.assertGreater(redis.cmd("TTL", rkeys2.idem("a:b", "c")), 0)
        self.assertEqual(redis.cmd("GET", "iot:idem:p:q:r"), C_GONE, "the ambiguous key is left")
        self.assertEqual(redis.xlen("iot:feed"), 1)

        rc, out = migrate(redis)
        self.assertEqual(rc, 0, out)
        self.assertIn("renamed 0 keys", out)

        hub = self.start_hub("redis://127.0.0.1:%d/%d" % (redis.port, DB),
                             extra=["--api-keys", api_keys_file(KEYS)])
        st, doc = await self.api(hub, "GET", "/v1/devices")
        self.assertEqual([d["device"] for d in doc["devices"]], ["kc-1", "m:x", "z:cmds"], doc)
        st, doc = await self.api(hub, "GET", "/v1/devices?device_type=thermostat")
        self.assertEqual(len(doc["devices"]), 3, doc)
        t = now_ms()
        for d in ("kc-1", "m:x"):
            st, doc = await self.api(hub, "GET", "/v1/devices/%s/telemetry?from=%d&to=%d" % (d, t - 60000, t))
            self.assertEqual([r["data"]["temperature"] for r in doc["readings"]], [20, 21], doc)
        st, doc = await self.api(hub, "GET", "/v1/devices/kc-1/commands")
        self.assertEqual([c["id"] for c in doc["commands"]], [C_IDEM, C_CANCELED, C_QUEUED], doc)
        # the idempotency key of key a:b still answers its command
        st, doc = await self.api(hub, "POST", "/v1/devices/kc-1/commands", {"name": "reboot"}, key="a:b",
                                 headers={"Idempotency-Key": "c"})
        self.assertEqual((st, doc.get("id")), (200, C_IDEM), doc)

        # kc-1's gateway comes back: owed cancel, then the queued command
        gw = await self.gateway(hub, sub="gw-old", devices=("*",))
        await gw.announce([("kc-1", "thermostat")])
        m = await gw.wait_for(lambda m: m.get("type") == "cancel", 5, "the owed cancel")
        self.assertEqual(m.get("id"), C_CANCELED, m)
        m = await gw.wait_for(lambda m: m.get("type") == "command", 5, "the queued command")
        self.assertEqual(m.get("id"), C_QUEUED, m)
        await gw.send({"type": "command_ack", "id": C_QUEUED, "status": "succeeded"})
        deadline = time.monotonic() + 5
        while (await self.api(hub, "GET", "/v1/commands/" + C_QUEUED))[1]["status"] != "succeeded":
            self.assertLess(time.monotonic(), deadline, "the queued command did not succeed")
            await asyncio.sleep(0.05)
        # gw-old's seq window came along: seq 2 is a duplicate, 3 is stored
        rep = await gw.telemetry(2, [reading("kc-1", 30.0)])
        self.assertEqual((rep.get("type"), rep.get("duplicate")), ("ack", True), rep)
        rep = await gw.telemetry(3, [reading("kc-1", 31.0)])
        self.assertEqual((rep.get("type"), rep.get("accepted"), rep.get("duplicate")), ("ack", 1, None), rep)
        self.assertEqual(redis.xlen(rkeys.tm("kc-1")), 3)
        # the hub moved layout 2's ingest keys to layout 3 (ingest_migrate_2to3)
        self.assertEqual(redis.cmd("HGET", "iot:ingest", "migrated"), "1")
        self.assertEqual(redis.cmd("KEYS", "iot:tm:{*}"), [])
        self.assertEqual(redis.cmd("EXISTS", "iot:feed", rkeys.gw_seqs2("gw-old")), 0)
        self.assertEqual(redis.xlen(rkeys.FEED), 2, "layout 2's feed entry, then seq 3's")
        self.assertEqual(redis.cmd("ZRANGE", rkeys.gw_seqs("gw:seqs"), 0, -1), ["1"])
        self.assertEqual(redis.cmd("GET", rkeys.gw_epoch("gw-old")), "4", "the epoch counter went on")
        await gw.close()
        hub.stop()

    def test_conflict_left_and_reported(self):
        redis = self.select(self.start_redis())
        redis.cmd("SADD", "iot:devices", "c-1")
        redis.cmd("XADD", "iot:tm:c-1", "*", "ts", 1, "data", "{}")
        redis.cmd("XADD", rkeys.tm2("c-1"), "*", "ts", 2, "data", "{}")
        redis.cmd("HSET", "iot:dev:c-2", "type", "thermostat")
        rc, out = migrate(redis)
        self.assertEqual(rc, 1, out)
        self.assertIn("conflict: %s exists already; iot:tm:c-1 left" % rkeys.tm2("c-1"), out)
        self.assertEqual((redis.xlen("iot:tm:c-1"), redis.xlen(rkeys.tm2("c-1"))), (1, 1))
        self.assertEqual(redis.cmd("GET", "iot:layout"), None)
        self.assertEqual(redis.cmd("EXISTS", rkeys.dev("c-2")), 1, "the rest is renamed")
        self.refused(redis)
        # resolved by hand: the next run finishes
        redis.cmd("DEL", rkeys.tm2("c-1"))
        rc, out = migrate(redis)
        self.assertEqual(rc, 0, out)
        self.assertEqual(redis.cmd("GET", "iot:layout"), "2")

    def test_unknown_layout_and_bad_url(self):
        redis = self.select(self.start_redis())
        redis.cmd("SET", "iot:layout", "3")
        redis.cmd("HSET", "iot:dev:d-1", "type", "thermostat")
        rc, out = migrate(redis)
        self.assertEqual(rc, 2, out)
        self.assertIn("'3'", out)
        self.assertEqual(redis.cmd("EXISTS", "iot:dev:d-1"), 1)
        p = subprocess.run([sys.executable, TOOL, "--redis", "http://x"], capture_output=True, text=True,
                           timeout=30)
        self.assertEqual(p.returncode, 2, p.stderr)


# --------------------------------------------------------------------------
# layout 2 -> 3, done by the hub itself at start (hub/migrate.c)

RID2 = "r_" + "5" * 32
RC1 = "c_%s_1" % ("5" * 32)      # the rollout's command of m:x: released, succeeded
RC2 = "c_%s_2" % ("5" * 32)      # of z:cmds: held
C_EXP = "c_" + "6" * 32          # kc-1's command whose ttl passed while no hub ran
OLD_RUN = "hub-old:0123456789ab"  # a run that died under layout 2, its lease expired


def layout2(r):
    """What a layout-2 hub left, with layout 2's key names (main's
    hub/keys.h before layout 3: no hash tags on the global keys, one
    global device set, type sets, timers and command counter, unbraced
    command and rollout ids, idempotency keys per API key name)."""
    now = now_ms()
    r.cmd("SET", "iot:layout", "2")
    r.cmd("SET", "iot:epoch", "e0" * 8)
    devs = {"kc-1": ("thermostat", "gw-old", "0"), "m:x": ("thermostat", "gw-old", "0"),
            "z:cmds": ("thermostat", "gw-old", "0"), "d-on": ("power-meter", "gw-dead", "1")}
    for d, (t, gw, online) in devs.items():
        conn = OLD_RUN + ":1" if online == "1" else "old:1"
        r.cmd("HSET", "iot:dev:{%s}" % d, "type", t, "labels", '{"site":"m"}', "gateway", gw,
              "conn", conn, "instance", "hub-old", "online", online, "last_seen", now - 60000,
              "announced_at", now - 60000)
        r.cmd("SADD", "iot:devices", d)
        r.cmd("SADD", "iot:type:{%s}" % t, d)
    # the dead run: its lease expired, its online set, a stale reaper claim
    r.cmd("ZADD", "iot:leases", 0, OLD_RUN)
    r.cmd("SADD", "iot:inst:{hub-old}:0123456789ab", "d-on")
    r.cmd("SET", "iot:inst:{hub-old}:0123456789ab:reaper", "hub-z:000000000000", "PX", 600000)
    # kc-1's commands: queued (timer at its expiry), canceled after delivery
    # (owed), succeeded (named by an idempotency key), queued past its ttl
    cmds = ((C_QUEUED, "queued", now + 3600000, 1), (C_CANCELED, "canceled", None, 2),
            (C_IDEM, "succeeded", None, 3), (C_EXP, "queued", now - 1000, 4))
    for cid, status, timer, seq in cmds:
        extra = {"expires_at": timer} if timer else {}
        r.cmd("HSET", "iot:cmd:" + cid, *cmd_hash(cid, "kc-1", status, "a:b" if cid == C_IDEM else "admin",
                                                 now - 10000, **extra))
        r.cmd("RPUSH", "iot:cmd:%s:log" % cid, '{"status":"queued","at":%d}' % (now - 10000))
        r.cmd("ZADD", "iot:dev:{kc-1}:cmdlog", seq, cid)
        if timer:
            r.cmd("ZADD", "iot:cmd:timers", timer, cid)
            r.cmd("ZADD", "iot:dev:{kc-1}:cmds", seq, cid)
    r.cmd("SADD", "iot:dev:{kc-1}:cancels", C_CANCELED)
    r.cmd("SET", "iot:idem:{a:b}:c", C_IDEM, "EX", 86400)
    r.cmd("SET", "iot:idem:{a:b}:gone", C_GONE, "EX", 86400)   # its command expired
    # a running rollout over m:x (released, succeeded) and z:cmds (held)
    r.cmd("HSET", "iot:cmd:" + RC1, *cmd_hash(RC1, "m:x", "succeeded", "admin", now - 10000,
                                             rollout=RID2, held=0, released_at=now - 9000))
    r.cmd("HSET", "iot:cmd:" + RC2, *cmd_hash(RC2, "z:cmds", "queued", "admin", now - 10000,
                                             rollout=RID2, held=1))
    for cid, d, seq in ((RC1, "m:x", 5), (RC2, "z:cmds", 6)):
        r.cmd("RPUSH", "iot:cmd:%s:log" % cid, '{"status":"queued","at":%d}' % (now - 10000))
        r.cmd("RPUSH", "iot:rollout:%s:cmds" % RID2, cid)
        r.cmd("ZADD", "iot:dev:{%s}:cmdlog" % d, seq, cid)
    r.cmd("HSET", "iot:rollout:" + RID2, "id", RID2, "device_type", "thermostat", "labels", "",
          "name", "reboot", "params", "{}", "max_per_minute", 60, "abort_failure_ratio", 1,
          "min_finished", 1, "total", 2, "released", 1, "status", "running", "created_at", now - 10000,
          "updated_at", now - 9000, "owner", "admin", "release_clock", now - 9000)
    r.cmd("ZADD", "iot:rollouts:active", now - 10000, RID2)
    r.cmd("SET", "iot:cmd:seq", 6)


LAYOUT2_LEFT = ["iot:devices", "iot:type:*", "iot:cmd:timers", "iot:cmd:seq", "iot:leases", "iot:epoch",
                "iot:rollouts:active", "iot:cmd:c_*", "iot:rollout:r_*", "iot:idem:{a:b}:*",
                "iot:inst:*"]


class Migrate2to3(HubTestCase):
    async def api(self, hub, method, path, body=None, key="admin", headers=None):
        return await asyncio.to_thread(http_json, hub, method, path, body, KEYS[key][0], headers)

    async def until(self, what, fn, timeout=8):
        deadline = time.monotonic() + timeout
        while True:
            got = await fn()
            if got:
                return got
            self.assertLess(time.monotonic(), deadline, what)
            await asyncio.sleep(0.1)

    async def test_hub_migrates_layout2_at_start(self):
        redis = self.start_redis()
        layout2(redis)
        hub = self.start_hub(redis, extra=["--api-keys", api_keys_file(KEYS), "--instance-id", "hub-new",
                                           "--lease-ttl-ms", "1000", "--lease-renew-ms", "300"])
        self.assertIn("key layout migrated to 3", hub.stderr_text())
        self.assertEqual((redis.cmd("GET", rkeys.LAYOUT), redis.cmd("GET", "iot:layout")), ("3", "3"))
        for pat in LAYOUT2_LEFT:
            self.assertEqual(redis.cmd("KEYS", pat), [], "layout-2 keys left: %s" % pat)
        self.assertEqual(redis.cmd("GET", rkeys.EPOCH), "e0" * 8, "the data generation is kept")
        # the dead run's online set, slot-local now, its slot marked for a reaper
        # (unless the reaper already walked it)
        if redis.cmd("ZSCORE", rkeys.LEASES, OLD_RUN) is not None:
            self.assertIn(rkeys.run_members(redis, OLD_RUN), (["d-on"], []))
        self.assertIsNone(redis.cmd("EXISTS", "iot:{hub}:migrating") or None, "the migration lock is gone")

        # the registry, through the slot-local indexes
        st, doc = await self.api(hub, "GET", "/v1/devices")
        self.assertEqual(st, 200, doc)
        self.assertEqual(sorted(d["device"] for d in doc["devices"]), ["d-on", "kc-1", "m:x", "z:cmds"], doc)
        st, doc = await self.api(hub, "GET", "/v1/devices?device_type=thermostat")
        self.assertEqual(sorted(d["device"] for d in doc["devices"]), ["kc-1", "m:x", "z:cmds"], doc)
        st, doc = await self.api(hub, "GET", "/v1/devices?device_type=power-meter")
        self.assertEqual([d["device"] for d in doc["devices"]], ["d-on"], doc)

        # the dead run's lease (layout 2's iot:leases) is reaped: d-on offline
        async def d_on_offline():
            st, doc = await self.api(hub, "GET", "/v1/devices/d-on")
            return st == 200 and doc.get("online") is False
        await self.until("d-on (the dead layout-2 run's device) reaped offline", d_on_offline)
        self.assertIsNone(redis.cmd("ZSCORE", rkeys.LEASES, OLD_RUN))

        # commands: listed, read; the one past its ttl expires (its timer moved to a swept slot)
        st, doc = await self.api(hub, "GET", "/v1/devices/kc-1/commands")
        self.assertEqual([c["id"] for c in doc["commands"]], [C_EXP, C_IDEM, C_CANCELED, C_QUEUED], doc)

        async def expired():
            return (await self.api(hub, "GET", "/v1/commands/" + C_EXP))[1].get("status") == "expired"
        await self.until("the command past its ttl expired by the sweep", expired)
        st, doc = await self.api(hub, "GET", "/v1/commands/" + C_QUEUED)
        self.assertEqual((st, doc["status"], len(doc["history"])), (200, "queued", 1), doc)

        # idempotency keys moved to their command's device
        st, doc = await self.api(hub, "POST", "/v1/devices/kc-1/commands", {"name": "reboot"}, key="a:b",
                                 headers={"Idempotency-Key": "c"})
        self.assertEqual((st, doc.get("id")), (200, C_IDEM), doc)
        st, doc = await self.api(hub, "POST", "/v1/devices/m:x/commands", {"name": "reboot"}, key="a:b",
                                 headers={"Idempotency-Key": "c"})
        self.assertEqual(st, 201, doc)
        self.assertNotEqual(doc["id"], C_IDEM)
        # a new command of kc-1 numbers after its layout-2 ones
        st, new = await self.api(hub, "POST", "/v1/devices/kc-1/commands", {"name": "reboot"})
        self.assertEqual(st, 201, new)
        st, doc = await self.api(hub, "GET", "/v1/devices/kc-1/commands")
        self.assertEqual([c["id"] for c in doc["commands"]][:2], [new["id"], C_EXP], doc)

        # the rollout: read, stepped on (its held command released)
        async def released():
            st, doc = await self.api(hub, "GET", "/v1/commands/" + RID2)
            self.assertEqual(st, 200, doc)
            return doc if doc["released"] == 2 else None
        doc = await self.until("the layout-2 rollout's held command released", released)
        self.assertEqual((doc["total"], doc["status"]), (2, "running"), doc)

        # the gateway comes back: kc-1's owed cancel and its queued commands, z:cmds's rollout command
        gw = await self.gateway(hub, sub="gw-old", devices=("*",))
        await gw.announce([("kc-1", "thermostat"), ("z:cmds", "thermostat")])
        m = await gw.wait_for(lambda m: m.get("type") == "cancel", 5, "the owed cancel")
        self.assertEqual(m.get("id"), C_CANCELED, m)
        for cid in (C_QUEUED, new["id"], RC2):
            m = await gw.wait_for(lambda m, c=cid: m.get("type") == "command" and m.get("id") == c, 5,
                                  "command %s" % cid)
            await gw.send({"type": "command_ack", "id": cid, "status": "succeeded"})

        async def completed():
            st, doc = await self.api(hub, "GET", "/v1/commands/" + RID2)
            return doc if doc["status"] == "completed" else None
        doc = await self.until("the rollout completed", completed)
        self.assertEqual(doc["counts"], {"succeeded": 2}, doc)
        for cid in (C_QUEUED, new["id"]):
            st, doc = await self.api(hub, "GET", "/v1/commands/" + cid)
            self.assertEqual(doc["status"], "succeeded", doc)
        await gw.close()

        # a restart finds layout 3: nothing migrated again
        hub.stop()
        hub2 = self.start_hub(redis, extra=["--api-keys", api_keys_file(KEYS), "--instance-id", "hub-new"])
        self.assertNotIn("migrat", hub2.stderr_text())
        st, doc = await self.api(hub2, "GET", "/v1/devices")
        self.assertEqual(len(doc["devices"]), 4, doc)
        hub2.stop()

    def test_a_layout1_redis_is_not_migrated(self):
        redis = self.start_redis()
        redis.cmd("SADD", "iot:devices", "d-1")
        redis.cmd("HSET", "iot:dev:d-1", "type", "thermostat")
        h = Hub(hub_args("redis://127.0.0.1:%d" % redis.port, self.secret_file), wait=False)
        self.addCleanup(h.cleanup)
        self.assertEqual(h.wait_exit(15), 1, h.describe())
        self.assertIn("tools/migrate-layout", h.stderr_text())
        self.assertEqual(redis.cmd("SMEMBERS", "iot:devices"), ["d-1"], "layout-1 data left as it was")
        self.assertIsNone(redis.cmd("GET", rkeys.LAYOUT))


if __name__ == "__main__":
    main()
