"""Ingest shards on one Redis (docs/streams.md "Ingest shards"): a hub with
--feed-shards 4 spreads gateways over four feeds; the shard count is recorded
in iot:ingest and wins over a later hub's flag; a device that moves to a
gateway of another shard keeps one history (history, export and its last
reading merged by entry id); dashboard positions are tokens of one id per
shard: live, `since` replay merged across shards with no gap and no
duplicate, a single id still accepted, malformed tokens refused."""

import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import HubTestCase, api_keys_file, connect_dashboard, http_get, main, now_ms, reading, rkeys, uniq  # noqa: E402

SHARDS = 4
KEYS = {"reader": ("iotk_shards_reader_0001", ["telemetry:read"], None)}
KEY = KEYS["reader"][0]


def gateways_in_distinct_shards(n, prefix):
    """n gateway ids with n distinct ingest shards."""
    out, seen, i = [], set(), 0
    while len(out) < n:
        g = "%s-%d" % (prefix, i)
        k = rkeys.shard_of(g, SHARDS)
        if k not in seen:
            seen.add(k)
            out.append(g)
        i += 1
    return out


class Shards(HubTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis, extra=["--api-keys", api_keys_file(KEYS), "--feed-shards", SHARDS,
                                                  "--stream-replay-page", "4", "--device-rate", "0"])

    async def gw(self, sub, devices):
        g = await self.gateway(self.hub, sub=sub)
        g.seq = 0
        rep = await g.announce([(d, "thermostat") for d in devices])
        self.assertEqual(rep.get("accepted"), list(devices), rep)
        return g

    async def frame(self, g, readings):
        g.seq += 1
        rep = await g.telemetry(g.seq, readings)
        self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", len(readings)), rep)

    def api(self, path):
        st, _, body = http_get(self.hub, path, headers={"Authorization": "Bearer " + KEY})
        return st, body

    async def test_recorded_count_and_keys(self):
        self.assertEqual(self.redis.cmd("HGET", "iot:ingest", "shards"), str(SHARDS))
        ga, gb = gateways_in_distinct_shards(2, uniq("gk"))
        d = uniq("t-k")
        a = await self.gw(ga, [d])
        await self.frame(a, [reading(d, 1.0)])
        ka = rkeys.shard_of(ga, SHARDS)
        self.assertEqual(self.redis.xlen(rkeys.tm(d, ka)), 1)
        self.assertEqual(self.redis.cmd("ZRANGE", rkeys.gw_seqs(ga, SHARDS), 0, -1), ["1"])
        self.assertEqual(self.redis.xrange(rkeys.feed(ka))[-1][1]["gw"], ga)
        # a later hub asking for another count uses the recorded one
        h2 = self.start_hub(self.redis, extra=["--feed-shards", 2])
        h2.wait_line("using %d" % SHARDS, 10)
        h2.wait_line("%d ingest shards" % SHARDS, 10)
        h2.stop()

    async def test_moved_device_keeps_one_history(self):
        ga, gb = gateways_in_distinct_shards(2, uniq("gm"))
        d = uniq("t-m")
        t0 = now_ms()
        a = await self.gw(ga, [d])
        for i in range(5):
            await self.frame(a, [reading(d, float(i), ts=t0 + i)])
        await a.close()
        b = await self.gw(gb, [d])
        for i in range(5, 12):
            await self.frame(b, [reading(d, float(i), ts=t0 + i)])
        self.assertEqual(self.redis.xlen(rkeys.tm(d, rkeys.shard_of(ga, SHARDS))), 5)
        self.assertEqual(self.redis.xlen(rkeys.tm(d, rkeys.shard_of(gb, SHARDS))), 7)
        rng = "from=%d&to=%d" % (t0 - 1000, t0 + 1000)
        st, body = self.api("/v1/devices/%s/telemetry?%s" % (d, rng))
        self.assertEqual(st, 200, body)
        doc = json.loads(body)
        self.assertEqual([r["data"]["temperature"] for r in doc["readings"]], [float(i) for i in range(12)])
        # pages of 5 (limit + after) across the shard boundary: no gap, no repeat
        got, after = [], None
        while True:
            st, body = self.api("/v1/devices/%s/telemetry?%s&limit=5%s" % (d, rng, "&after=" + after if after else ""))
            doc = json.loads(body)
            got += [r["data"]["temperature"] for r in doc["readings"]]
            after = doc["next"]
            if not after:
                break
        self.assertEqual(got, [float(i) for i in range(12)])
        st, body = self.api("/v1/devices/%s/telemetry?%s&format=ndjson" % (d, rng))
        self.assertEqual([json.loads(x)["data"]["temperature"] for x in body.splitlines()],
                         [float(i) for i in range(12)])
        st, body = self.api("/v1/devices/%s" % d)
        self.assertEqual(json.loads(body)["last_reading"]["data"]["temperature"], 11.0, body)

    async def test_positions_are_tokens_and_since_merges_shards(self):
        gws = gateways_in_distinct_shards(3, uniq("gp"))
        devs = [uniq("t-p") for _ in gws]
        gs = [await self.gw(g, [d]) for g, d in zip(gws, devs)]
        dash = await connect_dashboard(self.hub, KEY)
        self.addAsyncCleanup(dash.close)
        rep = await dash.subscribe("r", filter={"devices": devs})
        start = rep["position"]
        self.assertEqual(len(start.split(",")), SHARDS, start)
        sent = []
        for i in range(10):
            for g, d in zip(gs, devs):
                await self.frame(g, [reading(d, float(i))])
                sent.append((d, float(i)))
        live = []
        while len(live) < len(sent):
            live.append(await dash.wait_for(lambda m: m.get("type") == "reading", 5, "reading"))
        self.assertEqual(sorted((m["device"], m["data"]["temperature"]) for m in live), sorted(sent))
        for m in live:
            self.assertEqual(len(m["pos"].split(",")), SHARDS, m)
        # reconnect from a reading in the middle: exactly the readings after it
        mid = live[len(live) // 2 - 1]
        await dash.close()
        for i in range(10, 13):
            for g, d in zip(gs, devs):
                await self.frame(g, [reading(d, float(i))])
                sent.append((d, float(i)))
        d2 = await connect_dashboard(self.hub, KEY)
        self.addAsyncCleanup(d2.close)
        await d2.subscribe("r", filter={"devices": devs}, since=mid["pos"])
        for g, d in zip(gs, devs):
            await self.frame(g, [reading(d, 99.0)])
            sent.append((d, 99.0))
        want = [(m["device"], m["data"]["temperature"]) for m in live[len(live) // 2:]] + sent[len(live):]
        got = []
        while len(got) < len(want):
            got.append(await d2.wait_for(lambda m: m.get("type") == "reading", 5, "reading"))
        got += [m for m in await d2.collect(0.3) if m.get("type") == "reading"]
        self.assertEqual(sorted((m["device"], m["data"]["temperature"]) for m in got), sorted(want),
                         "since a token: gapless and duplicate-free across the shards")
        # each device's readings in order
        for d in devs:
            seq = [m["data"]["temperature"] for m in got if m["device"] == d]
            self.assertEqual(seq, sorted(seq))
        # the replayed part came in id order within each shard token component
        # since the subscription's start: everything
        d3 = await connect_dashboard(self.hub, KEY)
        self.addAsyncCleanup(d3.close)
        await d3.subscribe("r", filter={"devices": devs}, since=start)
        got3 = []
        while len(got3) < len(sent):
            got3.append(await d3.wait_for(lambda m: m.get("type") == "reading", 5, "reading"))
        self.assertEqual(sorted((m["device"], m["data"]["temperature"]) for m in got3), sorted(sent))
        # a single id: every shard from it; malformed tokens are refused
        d4 = await connect_dashboard(self.hub, KEY)
        self.addAsyncCleanup(d4.close)
        await d4.subscribe("a", filter={"devices": devs}, since="0-0")
        for bad in ("1-0,2-0", ",".join(["1-0"] * (SHARDS + 1)), "1-0,,2-0,3-0", "x"):
            await d4.send({"type": "subscribe", "id": "b", "stream": "raw", "since": bad})
            m = await d4.wait_for(lambda m: m.get("type") == "error" and m.get("id") == "b", 5, "bad_since")
            self.assertEqual(m["code"], "bad_since", (bad, m))


if __name__ == "__main__":
    main()
