"""iot-sink against real servers (docs/sink.md): redis-server, the hub with
real gateways over WebSocket, and PostgreSQL 15 (tests/sink/pg.py).
Readings stored through the hub appear in SQL exactly once: normally,
across a kill -9 of the sink mid-batch and between its commit and its
XACK, across a PostgreSQL restart, with two sinks sharing the work (one of
them killed with entries pending); the feed is not trimmed past what a sink
has not read, and past the hub's feed-sink-max-lag the hub alerts and the
sink reports the gap."""

import asyncio
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration"))
sys.path.insert(0, HERE)
from harness import HubTestCase, http_get, main, metric_value, parse_metrics, reading, rkeys, uniq, wait_until  # noqa: E402
from pg import Postgres, Sink  # noqa: E402

SHARDS = 2


class SinkTest(HubTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.pg = Postgres()
        cls._class_cleanups_list.append(cls.pg.cleanup)

    def sink(self, redis_url, table, consumer="c1", extra=(), env=None, wait=True, group=None):
        s = Sink(redis_url, self.pg.conninfo, consumer=consumer,
                 extra=["--table", table, "--group", group or table] + list(extra), env=env, wait=wait)
        self.addCleanup(s.cleanup)
        return s

    def hub(self, redis, extra=()):
        return self.start_hub(redis, extra=["--feed-shards", SHARDS, "--device-rate", "0"] + list(extra))

    async def gateways(self, hub, n=2):
        """n gateways with one device each, in distinct shards when n <= SHARDS."""
        out, seen, i = [], set(), 0
        prefix = uniq("gs")
        while len(out) < n:
            sub = "%s-%d" % (prefix, i)
            i += 1
            k = rkeys.shard_of(sub, SHARDS)
            if k in seen and len(seen) < SHARDS:
                continue
            seen.add(k)
            g = await self.gateway(hub, sub=sub)
            g.seq = 0
            g.dev = uniq("t-s")
            rep = await g.announce([(g.dev, "thermostat", {"site": "s1"})])
            self.assertEqual(rep.get("accepted"), [g.dev], rep)
            out.append(g)
        return out

    async def send(self, gws, frames, per_frame=2):
        """frames frames on each gateway, per_frame readings each. -> readings acked."""
        n = 0
        for _ in range(frames):
            for g in gws:
                g.seq += 1
                rs = [reading(g.dev, (g.seq % 100) + i * 0.25) for i in range(per_frame)]
                rep = await g.telemetry(g.seq, rs)
                self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", per_frame), rep)
                n += per_frame
        return n

    def wait_hub_sees_groups(self, hub):
        """The hub noticed the group on every shard (within a second)."""
        wait_until(lambda: len([k for k in parse_metrics(http_get(hub, "/metrics")[2])
                                if k[0] == "iot_hub_feed_sink_lag_frames"]) == SHARDS, 5,
                   what="the hub's iot_hub_feed_sink_lag_frames for every shard")

    def counts(self, table):
        rows = self.pg.sql("SELECT count(*), count(DISTINCT (gateway, seq, idx)) FROM %s" % table)
        return int(rows[0][0]), int(rows[0][1])

    def wait_rows(self, table, n, timeout=20):
        wait_until(lambda: self.counts(table)[0] >= n, timeout, interval=0.1,
                   what="%d rows in %s (have %s)" % (n, table, self.counts(table)))
        time.sleep(0.4)  # a duplicate would land within a batch interval
        total, distinct = self.counts(table)
        self.assertEqual((total, distinct), (n, n), "rows, distinct keys in %s" % table)

    async def test_exactly_once_and_table(self):
        redis = self.start_redis()
        hub = self.hub(redis)
        t = "r_basic"
        s = self.sink(redis.url, t)
        gws = await self.gateways(hub, 2)
        n = await self.send(gws, 20, per_frame=3)
        self.wait_rows(t, n)
        # the values and the columns as stored
        rows = self.pg.sql("SELECT device, type, labels->>'site', seq, idx, (data->>'temperature')::float * 100, "
                           "gateway FROM %s WHERE gateway = '%s' AND seq = 5 ORDER BY idx" % (t, gws[0].sub))
        self.assertEqual(rows, [[gws[0].dev, "thermostat", "s1", "5", str(i), str(500 + i * 25), gws[0].sub]
                                for i in range(3)])
        # daily range partitions: a default one, today's and the days ahead
        parts = [r[0] for r in self.pg.sql("SELECT c.relname FROM pg_inherits i JOIN pg_class c "
                                           "ON c.oid = i.inhrelid WHERE i.inhparent = '%s'::regclass" % t)]
        self.assertIn(t + "_default", parts)
        self.assertGreaterEqual(len([p for p in parts if p.startswith(t + "_p")]), 3, parts)
        self.assertEqual(self.pg.sql("SELECT count(*) FROM ONLY %s_default" % t), [["0"]])
        # the metrics, and a clean SIGTERM
        m = s.metrics()
        self.assertEqual(metric_value(m, "iot_sink_rows_written_total"), n)
        self.assertEqual(metric_value(m, "iot_sink_rows_duplicate_total"), 0)
        self.assertEqual(metric_value(m, "iot_sink_frames_total"), n / 3)
        self.assertGreater(metric_value(m, "iot_sink_last_commit_timestamp_seconds"), time.time() - 60)
        self.assertGreaterEqual(metric_value(m, "iot_sink_batch_rows_count"), 1)
        wait_until(lambda: all(s.metric("iot_sink_lag_frames", shard=k) == 0 for k in range(SHARDS)), 5,
                   what="lag 0 on every shard")
        # the hub sees the group on both feeds
        hm = parse_metrics(http_get(hub, "/metrics")[2])
        wait_until(lambda: len([k for k in parse_metrics(http_get(hub, "/metrics")[2])
                                if k[0] == "iot_hub_feed_sink_lag_frames"]) == SHARDS, 5,
                   what="the hub's iot_hub_feed_sink_lag_frames for both shards")
        self.assertEqual(metric_value(hm, "iot_hub_feed_sink_over_bound"), 0)
        # SIGTERM with a batch read and not yet written: it is written, exit 0
        self.assertEqual(s.stop(), 0)
        s = self.sink(redis.url, t, extra=["--batch-interval-ms", "60000"])
        more = await self.send(gws, 3, per_frame=1)
        wait_until(lambda: s.metric("iot_sink_pending_rows") == more, 5, what="the batch read")
        self.assertEqual(self.counts(t), (n, n))
        self.assertEqual(s.stop(), 0)
        self.assertEqual(self.counts(t), (n + more, n + more))

    async def test_kill_mid_batch_and_between_commit_and_ack(self):
        redis = self.start_redis()
        hub = self.hub(redis)
        t = "r_crash"
        gws = await self.gateways(hub, 2)
        n = await self.send(gws, 10)
        # killed after its COPY, before the commit: nothing of the batch in SQL
        s = self.sink(redis.url, t, env={"IOT_SINK_TEST_CRASH": "after-copy"}, wait=False)
        self.assertEqual(s.wait_exit(20), -9, s.text())
        self.assertEqual(self.counts(t), (0, 0))
        # killed after the commit, before the XACK: all in SQL, all still pending
        s = self.sink(redis.url, t, env={"IOT_SINK_TEST_CRASH": "after-commit"}, wait=False)
        self.assertEqual(s.wait_exit(20), -9, s.text())
        self.assertEqual(self.counts(t), (n, n))
        pending = sum(int(redis.cmd("XPENDING", rkeys.feed(k), t)[0]) for k in range(SHARDS))
        self.assertEqual(pending, n // 2)  # frames of 2 readings
        # restarted (same consumer): reads its pending entries again, adds nothing twice
        n += await self.send(gws, 5)
        s = self.sink(redis.url, t)
        self.wait_rows(t, n)
        wait_until(lambda: s.metric("iot_sink_rows_duplicate_total") == n - 20, 5,
                   what="the first batch's readings counted as duplicates")
        wait_until(lambda: sum(int(redis.cmd("XPENDING", rkeys.feed(k), t)[0]) for k in range(SHARDS)) == 0,
                   5, what="nothing pending")

    async def test_postgres_restart_mid_stream(self):
        redis = self.start_redis()
        hub = self.hub(redis)
        t = "r_pgrestart"
        s = self.sink(redis.url, t)
        gws = await self.gateways(hub, 2)
        n = await self.send(gws, 10)
        self.wait_rows(t, n)
        done = threading.Event()

        def restart():
            self.pg.stop("immediate")
            time.sleep(1.0)
            self.pg.start()
            done.set()
        th = threading.Thread(target=restart)
        th.start()
        while not done.is_set():  # readings keep coming while PostgreSQL is down and back
            n += await self.send(gws, 2)
            await asyncio.sleep(0.05)
        th.join()
        n += await self.send(gws, 5)
        self.wait_rows(t, n, timeout=30)
        self.assertGreater(s.metric("iot_sink_errors_total", kind="postgres"), 0)
        self.assertEqual(s.metric("iot_sink_up", target="postgres"), 1)
        s.wait_line("postgres: connected", 1)

    async def test_two_sinks_share_the_work(self):
        redis = self.start_redis()
        hub = self.hub(redis)
        t = "r_two"
        a = self.sink(redis.url, t, consumer="a", extra=["--read-count", "5"])
        b = self.sink(redis.url, t, consumer="b", extra=["--read-count", "5"])
        gws = await self.gateways(hub, 2)
        n = 0
        for _ in range(10):
            n += await self.send(gws, 4)
            await asyncio.sleep(0.1)
        self.wait_rows(t, n)
        fa, fb = a.metric("iot_sink_frames_total"), b.metric("iot_sink_frames_total")
        self.assertEqual(fa + fb, n / 2)
        self.assertGreater(fa, 0, "sink a wrote nothing")
        self.assertGreater(fb, 0, "sink b wrote nothing")
        # b dies between commit and XACK: a takes its pending entries over
        b.cleanup()
        b = self.sink(redis.url, t, consumer="b", env={"IOT_SINK_TEST_CRASH": "after-commit"},
                      extra=["--read-count", "5"])
        a_claimed = a.metric("iot_sink_claimed_total")
        while b.proc.poll() is None:
            n += await self.send(gws, 2)
            await asyncio.sleep(0.05)
        self.assertEqual(b.proc.returncode, -9)
        n += await self.send(gws, 2)
        self.wait_rows(t, n, timeout=20)
        wait_until(lambda: a.metric("iot_sink_claimed_total") > a_claimed, 10,
                   what="sink a took b's pending entries over")
        wait_until(lambda: a.metric("iot_sink_rows_duplicate_total") > 0, 5,
                   what="b's committed readings found in the table by a")

    async def test_feed_kept_for_a_stopped_sink_then_gap_past_the_bound(self):
        # feed-stream-maxlen 50: without the sink the feed would hold ~50-150 frames
        redis = self.start_redis()
        hub = self.hub(redis, extra=["--feed-stream-maxlen", "50", "--feed-sink-max-lag", "100000"])
        t = "r_keep"
        s = self.sink(redis.url, t)
        gws = await self.gateways(hub, 2)
        self.assertEqual(s.stop(), 0)  # registered, then stopped
        self.wait_hub_sees_groups(hub)
        n = await self.send(gws, 200, per_frame=1)
        self.assertEqual(sum(redis.xlen(rkeys.feed(k)) for k in range(SHARDS)), 400)
        wait_until(lambda: metric_value(parse_metrics(http_get(hub, "/metrics")[2]),
                                        "iot_hub_feed_sink_lag_frames") == 400, 5,
                   what="the hub's sink lag at 400 frames")
        s = self.sink(redis.url, t)
        self.wait_rows(t, n)
        # once read, the feed is trimmed again (down towards feed-stream-maxlen)
        for _ in range(30):
            n += await self.send(gws, 10, per_frame=1)
            if sum(redis.xlen(rkeys.feed(k)) for k in range(SHARDS)) < 400:
                break
            await asyncio.sleep(0.1)
        self.assertLess(sum(redis.xlen(rkeys.feed(k)) for k in range(SHARDS)), 400)
        self.wait_rows(t, n)
        self.assertEqual(s.metric("iot_sink_gap_frames_total"), 0)
        s.stop()

        # past feed-sink-max-lag: the hub alerts and trims, the sink reports the gap
        redis2 = self.start_redis()
        hub2 = self.hub(redis2, extra=["--feed-stream-maxlen", "50", "--feed-sink-max-lag", "100"])
        t2 = "r_gap"
        s2 = self.sink(redis2.url, t2)
        gws = await self.gateways(hub2, 2)
        self.assertEqual(s2.stop(), 0)
        self.wait_hub_sees_groups(hub2)
        await self.send(gws, 500, per_frame=1)
        hub2.wait_line("beyond feed-sink-max-lag 100", 5)
        self.assertEqual(metric_value(parse_metrics(http_get(hub2, "/metrics")[2]),
                                      "iot_hub_feed_sink_over_bound"), SHARDS)
        kept = sum(redis2.xlen(rkeys.feed(k)) for k in range(SHARDS))
        self.assertLess(kept, 1000)
        s2 = self.sink(redis2.url, t2)
        wait_until(lambda: self.counts(t2)[0] == kept, 20, what="the frames kept written")
        wait_until(lambda: s2.metric("iot_sink_gap_frames_total") == 1000 - kept, 5,
                   what="the gap reported: %d frames" % (1000 - kept))
        s2.wait_line("a gap", 1)
        hub2.wait_line("within feed-sink-max-lag again", 5)
        self.assertEqual(s2.stop(), 0)
        # --unregister: the groups go, and the hub trims at feed-stream-maxlen again
        u = Sink(redis2.url, self.pg.conninfo, extra=["--table", t2, "--group", t2, "--unregister"], wait=False)
        self.addCleanup(u.cleanup)
        self.assertEqual(u.wait_exit(20), 0, u.text())
        self.assertEqual([redis2.cmd("XINFO", "GROUPS", rkeys.feed(k)) for k in range(SHARDS)], [[]] * SHARDS)
        wait_until(lambda: metric_value(parse_metrics(http_get(hub2, "/metrics")[2]),
                                        "iot_hub_feed_sink_lag_frames") is None, 5,
                   what="the hub no longer reporting sink groups")
        await self.send(gws, 100, per_frame=1)
        self.assertLess(sum(redis2.xlen(rkeys.feed(k)) for k in range(SHARDS)), 400)


if __name__ == "__main__":
    main()
