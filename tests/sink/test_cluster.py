"""iot-sink on a Redis Cluster (docs/sink.md): the feed is spread over 16
ingest shards, each feed key on the primary owning its slot; the sink reads
every shard from its node (routing by slot, MOVED followed) and writes every
reading once.

The gateway-facing half of the hub does not run on a cluster yet (see
tests/cluster/test_ingest.py), so the frames are stored the way that suite
stores them: hub/lua/store.lua called exactly as the hub calls it, by a
slot-routing client; a hub runs beside it (IOT_HUB_ALLOW_CLUSTER_PARTIAL=1)
and records the shard count and keeps the feed for the sink's group."""

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration"))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "cluster"))
from harness import HubTestCase, clean_env, main, now_ms, rkeys, uniq, wait_until  # noqa: E402
from pg import Postgres, Sink  # noqa: E402
from test_ingest import Client, store  # noqa: E402

SHARDS = 16


class SinkCluster(HubTestCase):
    async def test_every_shard_read(self):
        pg = Postgres()
        self.addCleanup(pg.cleanup)
        cluster = self.start_cluster(primaries=3, ports=(42000, 42499))
        hub = self.start_hub(cluster.seeds, extra=["--device-rate", "0"],
                             env=clean_env({"IOT_HUB_ALLOW_CLUSTER_PARTIAL": "1"}))
        client = Client(cluster)
        self.addCleanup(client.close)
        wait_until(lambda: client.call("iot:ingest", "HGET", "iot:ingest", "shards") == str(SHARDS), 10,
                   what="the hub recorded 16 ingest shards")
        t = "r_cluster"
        sink = Sink(cluster.seeds, pg.conninfo, extra=["--table", t, "--group", t])
        self.addCleanup(sink.cleanup)
        sink.wait_line("16 feed shards .*Redis Cluster", 1)
        # frames of gateways in every shard
        seen, i, prefix, n, t0, gws = set(), 0, uniq("gc"), 0, now_ms(), {}
        while len(seen) < SHARDS:
            gw = "%s-%d" % (prefix, i)
            i += 1
            k = rkeys.shard_of(gw, SHARDS)
            if k in seen:
                continue
            seen.add(k)
            dev = uniq("t-c")
            gws[k] = (gw, dev)
            for seq in range(1, 6):
                rep = store(client, gw, seq, [(dev, t0 + seq, 20.0 + seq), (dev, t0 + seq, 21.5)])
                self.assertEqual(rep[0][0], 1, rep)
                n += 2
        # the feed keys live on every primary
        owners = {cluster.owner_of(rkeys.feed(k)).port for k in range(SHARDS)}
        self.assertEqual(len(owners), 3, owners)

        def count():
            r = pg.sql("SELECT count(*), count(DISTINCT (gateway, seq, idx)), count(DISTINCT gateway) FROM %s" % t)
            return tuple(int(x) for x in r[0])
        wait_until(lambda: count()[0] >= n, 30, interval=0.2, what="%d rows (have %s)" % (n, count()))
        time.sleep(0.5)
        self.assertEqual(count(), (n, n, SHARDS))
        for k in range(SHARDS):
            node = cluster.owner_of(rkeys.feed(k))
            self.assertEqual(int(node.cmd("XPENDING", rkeys.feed(k), t)[0]), 0)
            self.assertEqual(sink.metric("iot_sink_lag_frames", shard=k) in (0, -1), True)
        # shard 0's slot moves to another primary (its feed and group with it):
        # the sink follows MOVED and goes on reading it
        slot = cluster.slot_of(rkeys.feed(0))
        src = cluster.owner_of(rkeys.feed(0))
        dst = next(nd for nd in cluster.nodes if nd.port != src.port)
        cluster.reshard([slot], src, dst)
        gw, dev = gws[0]
        for seq in range(6, 11):
            rep = store(client, gw, seq, [(dev, t0 + seq, 20.0 + seq)])
            self.assertEqual(rep[0][0], 1, rep)
            n += 1
        wait_until(lambda: count()[0] >= n, 30, interval=0.2, what="%d rows after the move (have %s)" % (n, count()))
        time.sleep(0.5)
        self.assertEqual(count(), (n, n, SHARDS))
        self.assertEqual(int(dst.cmd("XPENDING", rkeys.feed(0), t)[0]), 0)
        self.assertEqual(sink.stop(), 0)


if __name__ == "__main__":
    main()
