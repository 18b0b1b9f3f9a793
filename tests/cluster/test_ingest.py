"""Telemetry ingest, history, export and the dashboard stream on a real
3-primary Redis Cluster (docs/streams.md "Ingest shards"). Label `cluster`.

The frames are stored by hub/lua/store.lua exactly as the hub calls it (one
call per ingest shard, every key tagged {i<k>}, SPUBLISH on the shard's
channels), sent by a small slot-routing client that follows MOVED / ASK and
retries TRYAGAIN like a gateway resending (so that the test controls the
timing around slot migrations and kills; gateways through the hub on a
cluster: the cluster.flows.* suites). A hub runs beside it and serves what
it reads: the recorded
shard count, history and export merged over shard streams held by several
primaries, and dashboards on the sharded channels with `since` tokens, also
while slots migrate under ingest: 0 lost, 0 duplicated."""

import asyncio
import json
import os
import socket
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import harness  # noqa: E402
from harness import (Hub, RedisCluster, RedisError, Resp, api_keys_file, clean_env, connect_dashboard,  # noqa: E402
                     hub_args, http_get, now_ms, rkeys, uniq, wait_until)

SHARDS = 16
PORTS = (41000, 41499)        # this suite's half of the cluster port range
KEYS = {"reader": ("iotk_cluster_reader_0001", ["telemetry:read"], None)}
KEY = KEYS["reader"][0]
with open(os.path.join(harness.SOURCE_DIR, "hub", "lua", "store.lua")) as f:
    STORE = f.read()


def crc16(data):
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def keyslot(key):
    k = key.encode()
    s = k.find(b"{")
    if s >= 0:
        e = k.find(b"}", s + 1)
        if e > s + 1:
            k = k[s + 1:e]
    return crc16(k) % 16384


class Unreplicated(Exception):
    """Stored on the primary, not confirmed by a replica: not acked."""


class Client:
    """Commands routed by slot, following MOVED and ASK; TRYAGAIN (a
    multi-key call while its slot migrates) and CLUSTERDOWN are retried.
    One connection per node, for one thread."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.conns = {}
        self.map = {}
        self.resends = 0       # commands sent again after a connection died
        self.refresh()

    def conn(self, port):
        if port not in self.conns:
            self.conns[port] = Resp(port)
        return self.conns[port]

    def refresh(self):
        for port in list(self.conns) + [n.port for n in self.cluster.nodes]:
            try:
                slots = self.conn(port).cmd("CLUSTER", "SLOTS")
            except (OSError, ConnectionError, RedisError):
                dead = self.conns.pop(port, None)
                if dead:
                    dead.close()
                continue
            self.map = {}
            for e in slots:
                for s in range(int(e[0]), int(e[1]) + 1):
                    self.map[s] = int(e[2][1])
            return

    def call(self, key, *args, deadline=30.0, wait_replicas=0):
        """wait_replicas: WAIT for that many replicas after the reply, on
        the same connection; fewer raises Unreplicated."""
        port = self.map[keyslot(key)]
        asking = False
        end = time.monotonic() + deadline
        while True:
            try:
                c = self.conn(port)
                if asking:
                    c.cmd("ASKING")
                out = c.cmd(*args)
                if wait_replicas and c.cmd("WAIT", wait_replicas, 1000) < wait_replicas:
                    raise Unreplicated(out)
                return out
            except (OSError, ConnectionError):
                # the node died: ask the others for the map (a replica
                # takes over) and send it again
                dead = self.conns.pop(port, None)
                if dead:
                    dead.close()
                self.resends += 1
                if time.monotonic() > end:
                    raise
                time.sleep(0.1)
                self.refresh()
                port = self.map[keyslot(key)]
                asking = False
                continue
            except RedisError as e:
                msg = str(e)
                asking = False
                if msg.startswith("MOVED"):
                    port = int(msg.split()[2].rsplit(":", 1)[1])
                    self.refresh()
                elif msg.startswith("ASK"):
                    port = int(msg.split()[2].rsplit(":", 1)[1])
                    asking = True
                elif msg.startswith(("TRYAGAIN", "CLUSTERDOWN")):
                    time.sleep(0.02)
                    port = self.map[keyslot(key)]
                else:
                    raise
            if time.monotonic() > end:
                raise AssertionError("no answer for %s within %ss" % (key, deadline))

    def close(self):
        for c in self.conns.values():
            c.close()


def line(dev, ts, temp):
    return '%s\tthermostat\t{}\t"device":"%s","ts":%d,"data":{"temperature":%s}\n' % (dev, dev, ts, temp)


def store(client, gateway, seq, readings, wait_replicas=0):
    """One frame of gateway through store.lua, as the hub sends it (one frame
    per call here). readings: [(device, ts, temperature)]. {1, id} or {0}."""
    k = rkeys.shard_of(gateway, SHARDS)
    lines = "".join(line(d, ts, t) for d, ts, t in readings)
    keys = [rkeys.feed(k), rkeys.gw_seqs(gateway, SHARDS)] + [rkeys.tm(d, k) for d, _, _ in readings]
    argv = [4096, 1000, 100000, 1, "SPUBLISH", "%d/" % k, seq, gateway, lines, len(readings)]
    for d, ts, t in readings:
        argv += [ts, '{"temperature":%s}' % t]
    argv += [1, "iot:live:{i%d}:raw:thermostat" % k, 1, len(lines.encode())]
    argv += [0]  # no anomaly flags
    return client.call(keys[0], "EVAL", STORE, len(keys), *(keys + argv), wait_replicas=wait_replicas)


def gateways_in_distinct_shards(n, prefix):
    out, seen, i = [], set(), 0
    while len(out) < n:
        g = "%s-%d" % (prefix, i)
        if rkeys.shard_of(g, SHARDS) not in seen:
            seen.add(rkeys.shard_of(g, SHARDS))
            out.append(g)
        i += 1
    return out


class ClusterIngest(unittest.IsolatedAsyncioTestCase):
    @classmethod
    def setUpClass(cls):
        cls.cluster = RedisCluster(primaries=3, ports=PORTS)
        cls.secret_file = os.path.join(harness.mkdtemp("iot-hub-secret-"), "secret")
        with open(cls.secret_file, "w") as f:
            f.write("x" * 48)
        cls.hub = Hub(hub_args(cls.cluster.seeds, cls.secret_file,
                               extra=["--api-keys", api_keys_file(KEYS), "--stream-replay-page", "4",
                                      "--redis-timeout-ms", "1000"]),
                      env=clean_env())
        cls.hub.wait_line(r"%d ingest shards \(sharded pub/sub\)" % SHARDS, 15)
        cls.client = Client(cls.cluster)

    @classmethod
    def tearDownClass(cls):
        if os.environ.get("HUB_TEST_KEEP") == "1":
            print("".join(l + "\n" for l in cls.hub.lines[-60:]), file=sys.stderr)
        cls.client.close()
        cls.hub.kill()
        cls.cluster.stop()

    def api(self, path):
        st, _, body = http_get(self.hub, path, headers={"Authorization": "Bearer " + KEY})
        return st, body

    async def dashboard(self):
        d = await connect_dashboard(self.hub, KEY)
        self.addAsyncCleanup(d.close)
        return d

    def test_shard_count_recorded_and_spread(self):
        self.assertEqual(self.client.call("iot:ingest", "HGET", "iot:ingest", "shards"), str(SHARDS))
        owners = {self.cluster.owner(keyslot(rkeys.feed(k))) for k in range(SHARDS)}
        self.assertEqual(len(owners), 3, "the 16 feed shards live on every primary")

    async def test_ingest_history_export_and_since(self):
        for _ in range(20):   # gateways whose shards span more than one primary
            gws = gateways_in_distinct_shards(6, uniq("gc"))
            nodes = {self.cluster.owner(keyslot(rkeys.feed(rkeys.shard_of(g, SHARDS)))) for g in gws}
            if len(nodes) > 1:
                break
        self.assertGreater(len(nodes), 1)
        devs = [uniq("t-c") for _ in gws]
        d = await self.dashboard()
        rep = await d.subscribe("r", filter={"devices": devs})
        start = rep["position"]
        self.assertEqual(len(start.split(",")), SHARDS)
        t0 = now_ms()
        sent, seqs = [], {g: 0 for g in gws}
        for i in range(8):
            for g, dev in zip(gws, devs):
                seqs[g] += 1
                out = store(self.client, g, seqs[g], [(dev, t0 + i, float(i))])
                self.assertEqual(out[0][0], 1, out)
                sent.append((dev, float(i)))
        # a resend is a duplicate on the cluster too
        self.assertEqual(store(self.client, gws[0], 1, [(devs[0], t0, 0.0)]), [[0]])
        live = []
        while len(live) < len(sent):
            live.append(await d.wait_for(lambda m: m.get("type") == "reading", 10, "live reading"))
        self.assertEqual(sorted((m["device"], m["data"]["temperature"]) for m in live), sorted(sent))
        mid = live[len(live) // 2 - 1]["pos"]
        await d.close()
        d2 = await self.dashboard()
        await d2.subscribe("r", filter={"devices": devs}, since=mid)
        got = []
        want = len(live) - len(live) // 2
        while len(got) < want:
            got.append(await d2.wait_for(lambda m: m.get("type") == "reading", 10, "replayed reading"))
        got += [m for m in await d2.collect(0.3) if m.get("type") == "reading"]
        self.assertEqual(sorted((m["device"], m["data"]["temperature"]) for m in got),
                         sorted((m["device"], m["data"]["temperature"]) for m in live[len(live) // 2:]),
                         "since a token over feeds on several primaries: no gap, no duplicate")

        # a device that moved between gateways of shards on different primaries
        dev = uniq("t-mv")
        ga, gb = gateways_in_distinct_shards(2, uniq("gmv"))
        while (self.cluster.owner(keyslot(rkeys.feed(rkeys.shard_of(ga, SHARDS)))) ==
               self.cluster.owner(keyslot(rkeys.feed(rkeys.shard_of(gb, SHARDS))))):
            gb = uniq("gmv")
        self.client.call(rkeys.dev(dev), "HSET", rkeys.dev(dev), "type", "thermostat")
        for i in range(6):
            g = ga if i < 3 else gb
            if i == 3:
                # a move is a reconnect and an announce: later than the
                # last id on the old shard's primary (ids of two primaries
                # order by their clocks: docs/streams.md)
                time.sleep(0.01)
            store(self.client, g, i + 1, [(dev, t0 + i, float(i))])
        rng = "from=%d&to=%d" % (t0 - 1000, t0 + 1000)
        st, body = self.api("/v1/devices/%s/telemetry?%s" % (dev, rng))
        self.assertEqual(st, 200, body)
        self.assertEqual([r["data"]["temperature"] for r in json.loads(body)["readings"]],
                         [float(i) for i in range(6)])
        st, body = self.api("/v1/devices/%s/telemetry?%s&format=csv" % (dev, rng))
        self.assertEqual(len(body.strip().splitlines()), 1 + 6, body)
        st, body = self.api("/v1/devices/%s" % dev)
        self.assertEqual(json.loads(body)["last_reading"]["data"]["temperature"], 5.0, body)

    async def test_slot_migration_during_ingest(self):
        """Frames of 8 gateways (8 shards) flow while the slots of two shards
        move to another primary: every frame stored exactly once, and a
        dashboard subscribed throughout gets every reading exactly once
        (its sharded channels follow the slots; what they missed is read
        from the feed)."""
        gws = gateways_in_distinct_shards(8, uniq("gr"))
        devs = {g: uniq("t-r") for g in gws}
        d = await self.dashboard()
        await d.subscribe("r", filter={"devices": list(devs.values())})
        n = 150
        errors = []

        def ingest():
            c = Client(self.cluster)
            try:
                for i in range(1, n + 1):
                    for g in gws:
                        out = store(c, g, i, [(devs[g], now_ms(), float(i))])
                        if out[0][0] != 1:
                            errors.append((g, i, out))
                    time.sleep(0.005)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))
            finally:
                c.close()

        t = threading.Thread(target=ingest)
        t.start()
        try:
            moved = 0
            for g in gws[:2]:
                slot = keyslot(rkeys.feed(rkeys.shard_of(g, SHARDS)))
                src = self.cluster.node(self.cluster.owner(slot))
                dst = next(self.cluster.node(p) for p in self.cluster.primaries() if p != src.port)
                await asyncio.to_thread(self.cluster.reshard, [slot], src, dst)
                self.assertEqual(self.cluster.owner(slot), dst.port)
                moved += 1
        finally:
            await asyncio.to_thread(t.join, 120)
        self.assertEqual(errors, [])
        self.assertEqual(moved, 2)
        c = Client(self.cluster)
        try:
            for g in gws:
                k = rkeys.shard_of(g, SHARDS)
                entries = c.call(rkeys.tm(devs[g], k), "XRANGE", rkeys.tm(devs[g], k), "-", "+")
                self.assertEqual([int(e[1][e[1].index("seq") + 1]) for e in entries], list(range(1, n + 1)),
                                 "gateway %s: every frame once, in order" % g)
        finally:
            c.close()
        got = []
        while len(got) < n * len(gws):
            got.append(await d.wait_for(lambda m: m.get("type") == "reading", 20, "reading %d" % len(got)))
        got += [m for m in await d.collect(0.5) if m.get("type") == "reading"]
        per = {}
        for m in got:
            per.setdefault(m["device"], []).append(m["data"]["temperature"])
        for g in gws:
            self.assertEqual(per.get(devs[g]), [float(i) for i in range(1, n + 1)],
                             "dashboard, device of %s: 0 lost, 0 duplicated, in order" % g)


class ClusterFailover(unittest.IsolatedAsyncioTestCase):
    """A primary killed (kill -9) during ingest, 3 primaries with a replica
    each: frames acked only once a replica has them (as with
    ack-durability replicated) are all there after the failover, and a
    dashboard subscribed throughout receives every one of them (its sharded
    channels follow the promoted replica, what it missed is replayed from
    the feed): nothing is lost silently; a reading may come twice only for a
    frame that was resent because its first copy was never acked."""

    @classmethod
    def setUpClass(cls):
        cls.cluster = RedisCluster(primaries=3, replicas=1, ports=PORTS)
        cls.secret_file = os.path.join(harness.mkdtemp("iot-hub-secret-"), "secret")
        with open(cls.secret_file, "w") as f:
            f.write("x" * 48)
        cls.hub = Hub(hub_args(cls.cluster.seeds, cls.secret_file,
                               extra=["--api-keys", api_keys_file(KEYS), "--stream-replay-page", "16",
                                      "--redis-timeout-ms", "1000"]),
                      env=clean_env())
        cls.hub.wait_line(r"%d ingest shards \(sharded pub/sub\)" % SHARDS, 15)

    @classmethod
    def tearDownClass(cls):
        cls.hub.kill()
        cls.cluster.stop()

    async def test_primary_killed_during_ingest(self):
        gws = gateways_in_distinct_shards(6, uniq("gf"))
        devs = {g: uniq("t-f") for g in gws}
        victim = self.cluster.node(self.cluster.owner(keyslot(rkeys.feed(rkeys.shard_of(gws[0], SHARDS)))))
        d = await connect_dashboard(self.hub, KEY)
        self.addAsyncCleanup(d.close)
        await d.subscribe("r", filter={"devices": list(devs.values())})
        n = 120
        errors, resent, acked = [], set(), {g: [] for g in gws}
        started = threading.Event()

        def ingest():
            c = Client(self.cluster)
            try:
                for i in range(1, n + 1):
                    if i == n // 3:
                        started.set()
                    for g in gws:
                        give_up = time.monotonic() + 60
                        while time.monotonic() < give_up:
                            r0 = c.resends
                            try:
                                store(c, g, i, [(devs[g], now_ms(), float(i))], wait_replicas=1)
                                break
                            except Unreplicated:
                                resent.add((devs[g], float(i)))
                                time.sleep(0.1)
                            finally:
                                if c.resends != r0:
                                    resent.add((devs[g], float(i)))
                        else:
                            raise AssertionError("frame %s/%d never replicated" % (g, i))
                        acked[g].append(i)
                    time.sleep(0.005)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))
            finally:
                started.set()
                c.close()

        t = threading.Thread(target=ingest)
        t.start()
        try:
            await asyncio.to_thread(started.wait, 60)
            self.cluster.kill(victim)
            await asyncio.to_thread(self.cluster.wait_failover, victim, 30)
            # the promoted replica has no replica of its own: acks wait
            # (as the hub answers `unavailable` with ack-durability
            # replicated) until the old primary is back as its replica
            await asyncio.to_thread(self.cluster.restart, victim)
            await asyncio.to_thread(self.cluster.wait_ok, 30)
        finally:
            await asyncio.to_thread(t.join, 120)
        self.assertEqual(errors, [])
        c = Client(self.cluster)
        try:
            for g in gws:
                k = rkeys.shard_of(g, SHARDS)
                entries = c.call(rkeys.tm(devs[g], k), "XRANGE", rkeys.tm(devs[g], k), "-", "+")
                seqs = [int(e[1][e[1].index("seq") + 1]) for e in entries]
                self.assertEqual(sorted(set(seqs)), list(range(1, n + 1)),
                                 "gateway %s: an acked frame was lost in the failover" % g)
                self.assertEqual(len(seqs), n, "gateway %s: a frame stored twice" % g)
        finally:
            c.close()
        got, gaps = [], []
        deadline = time.monotonic() + 30
        want = {(devs[g], float(i)) for g in gws for i in range(1, n + 1)}
        while not want <= {(m["device"], m["data"]["temperature"]) for m in got}:
            self.assertLess(time.monotonic(), deadline, "the dashboard did not get every stored reading")
            m = await d.wait_for(lambda m: m.get("type") in ("reading", "gap"), 30, "reading")
            (got if m["type"] == "reading" else gaps).append(m)
        got += [m for m in await d.collect(0.5) if m.get("type") == "reading"]
        self.assertEqual(gaps, [], "raw subscriptions recover from the feed")
        seen = {}
        for m in got:
            key_ = (m["device"], m["data"]["temperature"])
            seen[key_] = seen.get(key_, 0) + 1
        twice = {k for k, v in seen.items() if v > 1}
        self.assertLessEqual(twice, resent, "a reading delivered twice whose frame was never resent")


if __name__ == "__main__":
    unittest.main(verbosity=2)
