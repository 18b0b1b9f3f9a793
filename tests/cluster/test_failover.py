"""A primary of a Redis Cluster killed (kill -9) under a hub serving real
gateways, with --ack-durability replicated (3 primaries, one replica
each). Every frame the hub acked is stored exactly once after the replica
took over; frames the hub could not get replicated were answered
`unavailable` (never acked) and stored once when resent; only the gateways
whose ingest shard the dead primary served get `unavailable`, and they are
acked again within a bound (the replica promoted, and, with replicated
acks, the old primary back as its replica); and a dashboard subscribed
throughout gets every stored reading (a `gap` or a replay, never silent
loss). Label `cluster`."""

import asyncio
import json
import os
import sys
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import harness  # noqa: E402
from harness import (Hub, RedisCluster, api_keys_file, clean_env, connect_dashboard,  # noqa: E402
                     connect_gateway, gw_claims, hs256, hub_args, key_slot, now_ms, rkeys, uniq)

SHARDS = 16
PORTS = (43000, 43499)       # this suite's share of the cluster ports
KEY = "iotk_failover_reader_0001"
FOLLOW_BOUND_S = 20          # the hub acks the failed-over shards again within this


def token(secret, sub, devices):
    return hs256(gw_claims(sub, devices, 600), secret)


class HubFailover(unittest.IsolatedAsyncioTestCase):
    @classmethod
    def setUpClass(cls):
        harness.require_hub()
        cls.cluster = RedisCluster(primaries=3, replicas=1, ports=PORTS)
        cls.secret = os.urandom(24).hex().encode()
        cls.secret_file = harness.write_file(os.path.join(harness.mkdtemp("iot-hub-secret-"), "s"),
                                             cls.secret)
        keys = api_keys_file({"reader": (KEY, ["telemetry:read"])})
        cls.hub = Hub(hub_args(cls.cluster.seeds, cls.secret_file, extra=[
            "--api-keys", keys, "--ack-durability", "replicated", "--ack-replicas", "1",
            "--ack-wait-ms", "500", "--redis-timeout-ms", "1000"]), env=clean_env())
        cls.hub.wait_line(r"%d ingest shards \(sharded pub/sub\)" % SHARDS, 20)

    @classmethod
    def tearDownClass(cls):
        try:
            cls.hub.kill()
        finally:
            cls.hub.cleanup()
            cls.cluster.stop()

    async def test_primary_killed_under_gateways(self):
        # one gateway per shard, so every primary carries some
        gws, seen, i = [], set(), 0
        while len(gws) < 8:
            g = uniq("gk%d" % i)
            i += 1
            if rkeys.shard_of(g, SHARDS) not in seen:
                seen.add(rkeys.shard_of(g, SHARDS))
                gws.append(g)
        devs = {g: "t-" + g for g in gws}
        victim_port = self.cluster.owner(key_slot(rkeys.feed(rkeys.shard_of(gws[0], SHARDS))))
        victim = self.cluster.node(victim_port)
        on_victim = [g for g in gws
                     if self.cluster.owner(key_slot(rkeys.feed(rkeys.shard_of(g, SHARDS)))) == victim_port]

        d = await connect_dashboard(self.hub, KEY)
        self.addAsyncCleanup(d.close)
        await d.subscribe("r", filter={"devices": list(devs.values())})

        conns = {}
        for g in gws:
            gw = await connect_gateway(self.hub, token(self.secret, g, [devs[g]]))
            self.addAsyncCleanup(gw.close)
            rep = await gw.announce([(devs[g], "thermostat")], timeout=10)
            self.assertEqual(rep.get("accepted"), [devs[g]], rep)
            conns[g] = gw

        n = 60
        acked = {g: set() for g in gws}
        unavailable = {g: 0 for g in gws}
        back_after = {}    # s from the kill to the first ack after an `unavailable`
        killed_at = None

        async def stream(g):
            gw = conns[g]
            for seq in range(1, n + 1):
                reading = {"device": devs[g], "ts": now_ms(), "data": {"temperature": float(seq)}}
                give_up = time.monotonic() + 60
                while True:
                    self.assertLess(time.monotonic(), give_up, "%s seq %d never acked" % (g, seq))
                    rep = await gw.telemetry(seq, [reading], timeout=15)
                    if rep.get("type") == "ack":
                        acked[g].add(seq)
                        if unavailable[g] and g not in back_after:
                            back_after[g] = time.monotonic() - killed_at
                        break
                    self.assertEqual(rep.get("code"), "unavailable", rep)
                    unavailable[g] += 1
                    await asyncio.sleep(0.2)  # a gateway's resend
                await asyncio.sleep(0.02)

        tasks = [asyncio.ensure_future(stream(g)) for g in gws]
        await asyncio.sleep(0.5)
        self.cluster.kill(victim)
        killed_at = time.monotonic()
        await asyncio.to_thread(self.cluster.wait_failover, victim, 30)
        # the promoted replica has no replica of its own: replicated acks
        # wait (unavailable) until the old primary is back as its replica
        await asyncio.to_thread(self.cluster.restart, victim)
        await asyncio.to_thread(self.cluster.wait_ok, 30)
        await asyncio.gather(*tasks)

        for g in gws:
            self.assertEqual(acked[g], set(range(1, n + 1)), g)
        # only the dead primary's shards were unavailable, and not for long
        for g in gws:
            if g not in on_victim:
                self.assertEqual(unavailable[g], 0, "%s is not on the killed primary" % g)
            elif unavailable[g]:
                self.assertLess(back_after[g], FOLLOW_BOUND_S,
                                "%s acked again only %.1f s after the kill" % (g, back_after[g]))
        print("on the killed primary: %s; acked again after (s): %s; unavailable answers: %s"
              % (on_victim, json.dumps({g: round(v, 2) for g, v in back_after.items()}),
                 json.dumps(unavailable)), file=sys.stderr)

        # every acked frame stored exactly once (seq counted per device stream)
        client = harness.ClusterRedis.__new__(harness.ClusterRedis)
        client.cluster = self.cluster
        for g in gws:
            k = rkeys.shard_of(g, SHARDS)
            entries = client.cmd("XRANGE", rkeys.tm(devs[g], k), "-", "+") or []
            seqs = [int(dict(zip(f[0::2], f[1::2]))["seq"]) for _, f in entries]
            self.assertEqual(sorted(seqs), list(range(1, n + 1)),
                             "%s: every acked frame once (resent unavailable ones included)" % g)

        # the dashboard: every stored reading, or a gap notice
        want = {(devs[g], float(s)) for g in gws for s in range(1, n + 1)}
        got, gaps = set(), []
        deadline = time.monotonic() + 30
        while not want <= got and time.monotonic() < deadline:
            for m in await d.collect(0.5):
                if m.get("type") == "reading":
                    got.add((m["device"], m["data"]["temperature"]))
                elif m.get("type") == "gap":
                    gaps.append(m)
        self.assertTrue(want <= got or gaps, "the dashboard missed %d readings and got no gap notice"
                        % len(want - got))
        self.assertEqual(want - got, set(), "missed readings (gaps: %s)" % gaps)
        self.hub.check_sanitizers()


if __name__ == "__main__":
    harness.main()
