"""iot-sink on a Redis Cluster (docs/sink.md): the hub, on 3 primaries,
spreads the feed over 16 ingest shards, each feed key on the primary owning
its slot; real gateways over WebSocket in every shard; the sink reads every
shard from its node (routing by slot, MOVED followed when a shard's slot
moves mid-run) and writes every reading once."""

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration"))
sys.path.insert(0, HERE)
from harness import HubTestCase, main, reading, rkeys, uniq, wait_until  # noqa: E402
from pg import Postgres, Sink  # noqa: E402

SHARDS = 16


class SinkCluster(HubTestCase):
    async def test_every_shard_read(self):
        pg = Postgres()
        self.addCleanup(pg.cleanup)
        cluster = self.start_cluster(primaries=3, ports=(42000, 42499))
        hub = self.start_hub(cluster.seeds, extra=["--device-rate", "0"])
        t = "r_cluster"
        sink = Sink(cluster.seeds, pg.conninfo, extra=["--table", t, "--group", t])
        self.addCleanup(sink.cleanup)
        sink.wait_line("16 feed shards .*Redis Cluster", 1)
        # a gateway in every shard, 5 frames of 2 readings each
        seen, i, prefix, n, gws = set(), 0, uniq("gc"), 0, {}
        while len(seen) < SHARDS:
            sub = "%s-%d" % (prefix, i)
            i += 1
            k = rkeys.shard_of(sub, SHARDS)
            if k in seen:
                continue
            seen.add(k)
            g = await self.gateway(hub, sub=sub)
            g.dev, g.seq = uniq("t-c"), 0
            rep = await g.announce([(g.dev, "thermostat")])
            self.assertEqual(rep.get("accepted"), [g.dev], rep)
            gws[k] = g
            for _ in range(5):
                g.seq += 1
                rep = await g.telemetry(g.seq, [reading(g.dev, 20.0 + g.seq), reading(g.dev, 21.5)])
                self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", 2), rep)
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
        g = gws[0]
        for _ in range(5):
            g.seq += 1
            rep = await self.resend_until_acked(g, g.seq, [reading(g.dev, 30.0 + g.seq)])
            self.assertEqual(rep.get("accepted"), 1, rep)
            n += 1
        wait_until(lambda: count()[0] >= n, 30, interval=0.2, what="%d rows after the move (have %s)" % (n, count()))
        time.sleep(0.5)
        self.assertEqual(count(), (n, n, SHARDS))
        self.assertEqual(int(dst.cmd("XPENDING", rkeys.feed(0), t)[0]), 0)
        self.assertEqual(sink.stop(), 0)


if __name__ == "__main__":
    main()
