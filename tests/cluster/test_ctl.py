"""The control plane's scripts (hub/lua/) against a real 3-primary Redis
Cluster (key layout 3, docs/streams.md "The scripts", column "slots"): the
slot math the layout relies on agrees with CLUSTER KEYSLOT (slot tags,
command ids drawn in their device's slot); every script the layout calls
"one" slot runs on the cluster with the keys the hub passes, the way the
hub calls it there (a device's command scripts, the lease, a gateway's
scripts, seen per slot, cmd_owed per device; the registry and lease
flows: the run's slots marked, announce, detach and offline per slot, a
dead run reaped slot by slot, a run's release), sent to the primary of
KEYS[1]: Redis accepts the call and the script touches no key outside
its KEYS; and the calls that still cross slots are refused with CROSSSLOT
(the rollout scripts), which is why the hub still refuses a cluster.
Ports 41500-41999. Label `cluster`."""

import os
import random
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
from harness import RedisCluster, RedisError, key_slot, rkeys, slot_tag  # noqa: E402
from test_lua import (ACTIVE, CH_COMMANDS, CH_DEVTAKE, CH_PRESENCE, EPOCH, LAYOUT, LEASES, OTHER_RUN, RUN,  # noqa: E402
                      cid, group, k_limits, k_reaper, k_rollout, k_rollout_cmds, k_run, script_text)

DEVICES = ["d1", "kc-1:cmds", "m:x", "t-17", "z" * 128, "a.b_c-9"]


class CtlScripts(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cluster = RedisCluster(primaries=3, ports=(41500, 41999))

    @classmethod
    def tearDownClass(cls):
        cls.cluster.stop()

    def setUp(self):
        for n in self.cluster.nodes:
            n.cmd("FLUSHALL")

    def call(self, name, keys, argv):
        """EVAL on the primary of KEYS[1]'s slot, as the Redis bus routes it."""
        node = self.cluster.owner_of(keys[0])
        return node.cmd("EVAL", script_text(name), len(keys), *keys, *argv)

    def on(self, key, *args):
        """A plain command on the primary of key's slot."""
        return self.cluster.owner_of(key).cmd(*args)

    def now(self):
        return int(time.time() * 1000)

    def register(self, dev, conn="c1", inst="hub-a", online="1"):
        self.on(rkeys.dev(dev), "HSET", rkeys.dev(dev), "type", "thermostat", "labels", "{}",
                "conn", conn, "instance", inst, "online", online)

    # ---- the slot math ------------------------------------------------------

    def test_slot_math_agrees_with_redis(self):
        node = self.cluster.any_node()
        for s in [0, 1, 16383] + random.sample(range(16384), 61):
            for key in ("iot:idx:{%s}:devices" % slot_tag(s), "iot:idx:{%s}:timers" % slot_tag(s)):
                self.assertEqual(node.cmd("CLUSTER", "KEYSLOT", key), s, key)
        for d in DEVICES:
            want = node.cmd("CLUSTER", "KEYSLOT", rkeys.dev(d))
            self.assertEqual(want, key_slot(rkeys.dev(d)), d)
            c = cid(d, 3)
            for key in group(c, d) + [rkeys.cmdlog(d), rkeys.cancels(d), rkeys.devices(d),
                                      rkeys.type_of("thermostat", d), rkeys.idem(d, "ops", "k")]:
                self.assertEqual(node.cmd("CLUSTER", "KEYSLOT", key), want, key)
        self.assertGreater(len({self.cluster.owner(key_slot(rkeys.dev(d))) for d in DEVICES}), 1,
                           "the devices span several primaries")

    # ---- single-slot calls ---------------------------------------------------

    def test_a_device_commands_run_on_the_cluster(self):
        for d in DEVICES:
            self.register(d)
            c1, c2, c3 = cid(d, 1), cid(d, 2), cid(d, 3)
            create = lambda c, idem=None, ttl=60, now=None: self.call(  # noqa: E731
                "cmd_create", group(c, d) + [rkeys.cmdlog(d)] + ([rkeys.idem(d, "ops", idem)] if idem else []),
                [now or self.now(), CH_COMMANDS, c, d, "thermostat", "reboot", "{}", 10, 60, ttl, 3, "ops", ""])
            out = create(c1, idem="k")
            self.assertEqual(out[:2], [1, c1], d)
            self.assertEqual(create(c2, idem="k"), [0, c1], d)
            # send, ack received, ack succeeded
            out = self.call("cmd_send", group(c1, d), [self.now(), CH_COMMANDS, c1, "c1", d])
            self.assertEqual(out[:5], [1, d, "reboot", "{}", 1], d)
            ack = lambda c, st: self.call("cmd_ack", group(c, d),  # noqa: E731
                                          [self.now(), CH_COMMANDS, c, "c1", st, "", "", "", "", d])
            self.assertEqual(ack(c1, "received"), [1, "received"])
            self.assertEqual(ack(c1, "succeeded"), [1, "succeeded"])
            # a second command, canceled after it was sent: owed
            create(c2)
            self.call("cmd_send", group(c2, d), [self.now(), CH_COMMANDS, c2, "c1", d])
            out = self.call("cmd_cancel", group(c2, d) + [rkeys.cancels(d)], [self.now(), CH_COMMANDS, c2, d])
            self.assertEqual(out, [1, "sent", d])
            # a third past its ttl: the tick expires it
            create(c3, ttl=1, now=self.now() - 5000)
            self.assertEqual(self.call("cmd_tick", group(c3, d), [self.now(), CH_COMMANDS, c3, d]), [1, "expired"])
            # reads
            h, log = self.call("cmd_get", [rkeys.cmd(c1), rkeys.cmd_log(c1)], [])
            self.assertEqual(dict(zip(h[0::2], h[1::2]))["status"], "succeeded")
            self.assertEqual(len(log), 4)
            out = self.call("cmd_list", [rkeys.cmd(c) for c in (c3, c2, c1)], ["", 10])
            self.assertEqual([dict(zip(x[0::2], x[1::2]))["status"] for x in out],
                             ["expired", "canceled", "succeeded"])
            # what the gateway is owed at its next announce: per device on a cluster
            out = self.call("cmd_owed", [rkeys.cancels(d), rkeys.cmds(d)], [d])
            self.assertEqual(out, [d, [c2], []])
            self.assertEqual(self.on(rkeys.dev(d), "HGET", rkeys.dev(d), "cmd_seq"), "3")
            self.assertEqual(self.on(rkeys.timers(c1), "ZCARD", rkeys.timers(c1)), 0)

    def test_gateway_lease_and_seen_scripts(self):
        now = self.now()
        gw = "gw:1"
        out = self.call("connect", [rkeys.gw_epoch(gw), k_limits(gw)], [now, 1, 1])
        self.assertEqual(out[:2], [1, 1])
        self.assertEqual(self.call("limits", [k_limits(gw)], [now, now + 500, 0, 0]), 1)
        self.assertEqual(self.call("epoch_floor", [rkeys.gw_epoch(gw)], [5]), 1)
        out = self.call("lease_renew", [LEASES, EPOCH, LAYOUT, k_reaper(RUN)],
                        [RUN.rsplit(":", 1)[0], RUN, 10000, "1", "cafe", rkeys.VERSION])
        self.assertEqual(out[:4], ["cafe", 0, 0, 0])
        self.assertEqual(out[5], 0)
        self.assertEqual(self.on(LAYOUT, "GET", LAYOUT), rkeys.VERSION)
        # seen, one call per slot, as the hub sends it on a cluster
        for d in DEVICES:
            self.register(d, conn="c1" if d != "m:x" else "c9")
        by_slot = {}
        for d in DEVICES:
            by_slot.setdefault(key_slot(rkeys.dev(d)), []).append(d)
        lost = []
        for devs in by_slot.values():
            argv = [now]
            for _ in devs:
                argv += ["c1", 7]
            out = self.call("seen", [rkeys.dev(d) for d in devs], argv)
            lost += [devs[i] for i in out]
        self.assertEqual(lost, ["m:x"])
        self.assertEqual(self.on(rkeys.dev("d1"), "HGET", rkeys.dev("d1"), "last_seen"), str(now))

    # ---- the registry and the leases, per slot ------------------------------

    def by_slot(self, devices):
        out = {}
        for d in devices:
            out.setdefault(key_slot(rkeys.dev(d)), []).append(d)
        return out

    def mark(self, run, devices):
        """slots_mark before a run's first announce into the slots (the hub
        waits for the reply on a cluster)."""
        slots = sorted(self.by_slot(devices))
        self.assertEqual(self.call("slots_mark", [rkeys.SLOTS, rkeys.runslots(run)], slots), len(slots))

    def announce(self, conn, devices, typ="thermostat", mode=""):
        """announce as the hub sends it on a cluster: one call per slot;
        then detach what each call's reply names, per call. Returns the tats
        by device and the moved triples."""
        run = conn.rsplit(":", 1)[0]
        self.mark(run, devices)
        tats, moved = {}, []
        for devs in self.by_slot(devices).values():
            keys, argv = [], ["g1", conn, run, run.rsplit(":", 1)[0], self.now(), mode, CH_PRESENCE, CH_DEVTAKE]
            for d in devs:
                keys += [rkeys.dev(d), rkeys.type_of(typ, d), rkeys.devices(d), k_run(run, d)]
                argv += [d, typ, "{}"]
            t, mv = self.call("announce", keys, argv)
            tats.update(zip(devs, t))
            moved += [mv[i:i + 3] for i in range(0, len(mv), 3)]
            if mv:
                dkeys, dargv = [], []
                for d, otype, oconn in (mv[i:i + 3] for i in range(0, len(mv), 3)):
                    if otype:
                        dkeys += [rkeys.dev(d), rkeys.type_of(otype, d)]
                        dargv += [d, "type", otype]
                    if oconn:
                        orun = oconn.rsplit(":", 1)[0]
                        dkeys += [rkeys.dev(d), k_run(orun, d)]
                        dargv += [d, "run", orun]
                self.call("detach", dkeys, dargv)
        return tats, moved

    def members(self, run):
        return rkeys.run_members(None, run, node_of=self.cluster.owner_of)

    def reap(self, me, dead):
        """A reaper's walk, as hub/lease.c does it on a cluster: the claim
        with the bitmap, per marked slot the set read and a claimed reap
        batch, then reap_done. Returns the devices marked offline."""
        ck = [LEASES, k_reaper(dead), rkeys.runslots(dead)]
        ok, bits = self.call("reap_claim", ck, [me, dead, 5000, "1"])
        self.assertEqual(ok, 1)
        slots = rkeys.run_slots(self.cluster.owner_of(rkeys.runslots(dead)), dead)
        n = 0
        for s in slots:
            k = rkeys.run_set_of_slot(dead, s)
            devs = self.on(k, "SUNION", k)
            if not devs:
                continue
            self.assertEqual(self.call("reap_claim", ck, [me, dead, 5000, "0"]), [1, ""])
            keys = []
            for d in devs:
                keys += [rkeys.dev(d), k_run(dead, d)]
            n += self.call("reap", keys, [dead, CH_PRESENCE] + devs)
        self.assertEqual(self.call("reap_done", ck, [me, dead]), 1)
        return n

    def test_registry_and_leases_run_per_slot(self):
        devs = DEVICES
        self.assertGreater(len(self.by_slot(devs)), 3)
        c1 = RUN + ":1"
        renew = lambda run: self.call("lease_renew", [LEASES, EPOCH, LAYOUT, k_reaper(run)],  # noqa: E731
                                      [run.rsplit(":", 1)[0], run, 10000, "0", "cafe", rkeys.VERSION])
        renew(RUN)
        renew(OTHER_RUN)
        tats, moved = self.announce(c1, devs)
        self.assertEqual(tats, {d: "0" for d in devs})
        self.assertEqual(moved, [])
        self.assertEqual(self.members(RUN), sorted(devs))
        for d in devs:
            self.assertEqual(self.on(rkeys.dev(d), "HMGET", rkeys.dev(d), "online", "conn"), ["1", c1])
            self.assertEqual(self.on(rkeys.devices(d), "SISMEMBER", rkeys.devices(d), d), 1)
        self.assertEqual(sorted(rkeys.run_slots(self.cluster.owner_of(rkeys.SLOTS), RUN)),
                         sorted(self.by_slot(devs)))
        # another run takes two devices with another type: detached per slot
        taken = [DEVICES[0], DEVICES[3]]
        _, moved = self.announce(OTHER_RUN + ":7", taken, typ="power-meter")
        self.assertEqual(sorted(m[0] for m in moved), sorted(taken))
        self.assertEqual(self.members(RUN), sorted(set(devs) - set(taken)))
        self.assertEqual(self.members(OTHER_RUN), sorted(taken))
        for d in taken:
            self.assertEqual(self.on(rkeys.dev(d), "SISMEMBER", rkeys.type_of("thermostat", d), d), 0)
        # offline per slot: the connection's devices (a taken one stays online)
        closing = [DEVICES[1], DEVICES[3]]
        off = 0
        for ds in self.by_slot(closing).values():
            keys, argv = [], [c1, self.now(), CH_PRESENCE]
            for d in ds:
                keys += [rkeys.dev(d), k_run(RUN, d)]
                argv += [d, 0]
            off += self.call("offline", keys, argv)
        self.assertEqual(off, 1)
        self.assertEqual(self.on(rkeys.dev(DEVICES[1]), "HGET", rkeys.dev(DEVICES[1]), "online"), "0")
        self.assertEqual(self.on(rkeys.dev(DEVICES[3]), "HGET", rkeys.dev(DEVICES[3]), "online"), "1")
        # RUN dies: its lease expires, OTHER_RUN reaps it slot by slot
        left = sorted(set(devs) - set(taken) - {DEVICES[1]})
        self.assertEqual(self.members(RUN), left)
        self.on(LEASES, "ZADD", LEASES, 0, RUN)
        self.assertEqual(self.reap(OTHER_RUN, RUN), len(left))
        for d in left:
            self.assertEqual(self.on(rkeys.dev(d), "HGET", rkeys.dev(d), "online"), "0", d)
        for d in taken:
            self.assertEqual(self.on(rkeys.dev(d), "HGET", rkeys.dev(d), "online"), "1", d)
        self.assertEqual(self.members(RUN), [])
        self.assertIsNone(self.on(LEASES, "ZSCORE", LEASES, RUN))
        self.assertEqual(self.on(LEASES, "EXISTS", rkeys.runslots(RUN)), 0)
        # OTHER_RUN stops: its sets checked slot by slot, then the release
        held = sum(self.on(rkeys.run_set_of_slot(OTHER_RUN, s), "EXISTS", rkeys.run_set_of_slot(OTHER_RUN, s))
                   for s in rkeys.run_slots(self.cluster.owner_of(LEASES), OTHER_RUN))
        self.assertEqual(held, 2)
        self.assertEqual(self.call("lease_release", [LEASES, rkeys.runslots(OTHER_RUN)], [OTHER_RUN, held]), 0)
        self.assertEqual(self.on(LEASES, "ZSCORE", LEASES, OTHER_RUN), "0")

    # ---- what still crosses slots ------------------------------------------------

    def assert_crossslot(self, name, keys, argv):
        with self.assertRaises(RedisError) as e:
            self.call(name, keys, argv)
        self.assertIn("CROSSSLOT", str(e.exception), name)

    def test_what_still_crosses_is_refused(self):
        d, d2 = DEVICES[0], DEVICES[1]
        self.assertNotEqual(key_slot(rkeys.dev(d)), key_slot(rkeys.dev(d2)))
        # announce of devices of two slots in one call: what the hub sends
        # only on one Redis
        self.assert_crossslot("announce", [rkeys.dev(d), rkeys.type_of("thermostat", d), rkeys.devices(d),
                                           k_run(RUN, d), rkeys.dev(d2), rkeys.type_of("thermostat", d2),
                                           rkeys.devices(d2), k_run(RUN, d2)],
                              ["g1", RUN + ":1", RUN, "hub-a", 1000, "", CH_PRESENCE, CH_DEVTAKE,
                               d, "thermostat", "{}", d2, "thermostat", "{}"])
        # a rollout: its {rid} keys and {hub}:rollouts beside every device's
        rid = "r_" + "ab" * 16
        c = cid(d, 1)
        self.assert_crossslot("rollout_create",
                              [k_rollout(rid), k_rollout_cmds(rid), ACTIVE, rkeys.dev(d), rkeys.cmdlog(d),
                               rkeys.cmd(c), rkeys.cmd_log(c)],
                              [self.now(), CH_COMMANDS, rid, "thermostat", "", "", "reboot", "{}", 10, 60, 60, 1,
                               60, 1, "ops", 1, d, c])


if __name__ == "__main__":
    unittest.main(verbosity=2)
