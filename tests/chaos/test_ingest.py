"""Chaos under ingest: gateways stream (batch 1 and batch 10) while the hub
is killed with SIGKILL and restarted, Redis is killed and restarted in each
persistence mode, Redis is frozen past the hub's timeout, and the hub is
stopped with SIGTERM while Redis is frozen. Each scenario ends with the
gateways' resends done and counts, per gateway seq, acked against stored
(tests/chaos/chaos.py): 0 lost and 0 duplicated wherever the mode is
durable."""

import asyncio
import os
import shutil
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chaos import (ChaosCase, ChaosGateway, Ledger, PersistentRedis, RedisAt, main, sigkill,  # noqa: E402
                   uniq, wait_until)  # noqa: E402

FRAMES = 300


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Ingest(ChaosCase):
    async def gateways(self, hub_ref, n=4, frames=FRAMES):
        """n gateways (half batch 1, half batch 10), 3 devices each."""
        gws = []
        for i in range(n):
            led = Ledger(uniq("gw"), [uniq("t") for _ in range(3)])
            gws.append(ChaosGateway(self, lambda: hub_ref[0], led, batch=1 if i % 2 else 10,
                                    rate=150))
        tasks = [asyncio.get_running_loop().create_task(g.run(frames)) for g in gws]
        return gws, tasks

    async def finish(self, gws, tasks, timeout=60):
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:
            t.cancel()
        self.assertFalse(pending, "gateways still had unacked frames after %d s: %s" % (
            timeout, [len(g.l.sent) - len(g.l.acked) for g in gws]))
        for t in done:
            t.result()

    def unacked(self, gws):
        """At the fault: each gateway's unacked frames and its ack count."""
        return {g.l.gw: ({s for s in g.l.sent if s not in g.l.acked}, len(g.l.acked))
                for g in gws}

    async def until_acked(self, gws, before, timeout=30):
        """Waits until every frame unacked at the fault (before) is acked and
        every gateway has had a frame acked since: the recovery."""
        t0 = time.monotonic()
        while any(s not in g.l.acked for g in gws for s in before[g.l.gw][0]) or \
                any(len(g.l.acked) <= before[g.l.gw][1] and not g.done.is_set()
                    for g in gws):
            if time.monotonic() - t0 > timeout:
                self.fail("frames unacked at the fault still unacked after %d s" % timeout)
            await asyncio.sleep(0.02)
        return time.monotonic() - t0

    async def test_hub_sigkill_mid_ingest(self):
        redis = PersistentRedis("everysec")
        self.addCleanup(redis.stop)
        hub = [self.start_hub(redis)]
        gws, tasks = await self.gateways(hub)
        await asyncio.sleep(0.8)
        before = self.unacked(gws)
        t0 = time.monotonic()
        sigkill(hub[0].pid)
        hub[0].wait_exit(5)
        hub[0] = self.start_hub(redis)
        await self.until_acked(gws, before)
        rec = time.monotonic() - t0
        await self.finish(gws, tasks)
        self.assertTrue(any(g.reconnects for g in gws), "nobody noticed the kill")
        self.account("hub SIGKILL mid-ingest, restart, resend", redis, [g.l for g in gws], rec)
        hub[0].stop()

    def embedded_hub(self, cwd):
        """A hub on the default: no --redis, its redis-server in
        <cwd>/iot-hub-data. -> (hub, redis pid, redis port)."""
        h = self.start_hub(None, cwd=cwd, timeout=40)
        m = h.wait_line(r"redis-server pid (\d+) on 127\.0\.0\.1:(\d+)", 10)
        return h, int(m.group(1)), int(m.group(2))

    async def test_embedded_default_sigkill_hub_and_redis(self):
        """The default a new user runs: the hub with its embedded Redis,
        both SIGKILLed mid-ingest, the hub started again in the same
        directory: it finds its data dir and the gateways' resends complete."""
        cwd = tempfile.mkdtemp(prefix="iot-hub-chaos-embedded-")
        self.addCleanup(shutil.rmtree, cwd, True)
        h, rpid, _ = self.embedded_hub(cwd)
        hub = [h]
        gws, tasks = await self.gateways(hub)
        await asyncio.sleep(0.8)
        before = self.unacked(gws)
        t0 = time.monotonic()
        sigkill(rpid)
        sigkill(hub[0].pid)
        hub[0].wait_exit(5)
        wait_until(lambda: not pid_alive(rpid), 10, what="the embedded redis-server to be gone")
        hub[0], _, rport = self.embedded_hub(cwd)
        await self.until_acked(gws, before)
        rec = time.monotonic() - t0
        await self.finish(gws, tasks)
        self.assertTrue(any(g.reconnects for g in gws), "nobody noticed the kill")
        self.account("embedded default: hub + its Redis SIGKILL, restart", RedisAt(rport),
                     [g.l for g in gws], rec)
        hub[0].stop(15)

    async def test_replicated_primary_sigkill_failover(self):
        """--ack-durability replicated on a primary without persistence and
        one replica: the primary is SIGKILLed mid-ingest, the replica
        promoted (REPLICAOF NO ONE) and a hub started on it, as an operator
        or a failover manager would. Everything acked was on the replica."""
        primary = PersistentRedis(None)
        self.addCleanup(primary.stop)
        replica = self.start_redis(["--replicaof", "127.0.0.1", primary.port])
        wait_until(lambda: "master_link_status:up" in replica.cmd("INFO", "replication"), 15,
                   what="the replica to be online")
        durable = ["--ack-durability", "replicated", "--ack-replicas", "1", "--ack-wait-ms", "1500",
                   "--redis-timeout-ms", "4000"]
        hub = [self.start_hub(primary, extra=durable)]
        gws, tasks = await self.gateways(hub)
        await asyncio.sleep(0.8)
        before = self.unacked(gws)
        t0 = time.monotonic()
        primary.kill()
        sigkill(hub[0].pid)   # its Redis is gone for good: it is replaced
        hub[0].wait_exit(5)
        self.assertEqual(replica.cmd("REPLICAOF", "NO", "ONE"), "OK")
        hub[0] = self.start_hub(replica, extra=["--ack-durability", "accepted"])
        await self.until_acked(gws, before)
        rec = time.monotonic() - t0
        await self.finish(gws, tasks)
        self.account("replicated (1 replica): primary SIGKILL, replica promoted", replica,
                     [g.l for g in gws], rec)
        hub[0].stop()

    async def redis_kill(self, fsync):
        redis = PersistentRedis(fsync)
        self.addCleanup(redis.stop)
        hub = [self.start_hub(redis, extra=["--redis-backoff-max-ms", "200"])]
        gws, tasks = await self.gateways(hub)
        await asyncio.sleep(0.8)
        before = self.unacked(gws)
        t0 = time.monotonic()
        redis.kill()
        await asyncio.sleep(0.5)
        await asyncio.get_running_loop().run_in_executor(None, redis.restart)
        await self.until_acked(gws, before)
        rec = time.monotonic() - t0
        await self.finish(gws, tasks)
        return redis, hub, gws, rec

    async def test_redis_sigkill_appendfsync_always(self):
        redis, hub, gws, rec = await self.redis_kill("always")
        self.account("Redis SIGKILL, AOF appendfsync always", redis, [g.l for g in gws], rec)
        hub[0].stop()

    async def test_redis_sigkill_appendfsync_everysec(self):
        # A process crash, not a power cut: the page cache keeps what Redis
        # wrote before it answered, so everysec loses nothing here either.
        redis, hub, gws, rec = await self.redis_kill("everysec")
        self.account("Redis SIGKILL, AOF appendfsync everysec", redis, [g.l for g in gws], rec)
        hub[0].stop()

    async def test_redis_sigkill_without_persistence_loses(self):
        """Not a durable mode: Redis comes back empty. Recorded, not hidden:
        the acked readings stored before the kill are gone."""
        redis, hub, gws, rec = await self.redis_kill(None)
        with self.assertRaises(AssertionError):
            self.account("Redis SIGKILL, no persistence (not durable)", redis,
                         [g.l for g in gws], rec)
        hub[0].stop()

    async def test_redis_frozen_past_the_timeout(self):
        redis = PersistentRedis("everysec")
        self.addCleanup(redis.stop)
        hub = [self.start_hub(redis, extra=["--redis-timeout-ms", "1000",
                                            "--redis-backoff-max-ms", "200"])]
        gws, tasks = await self.gateways(hub)
        await asyncio.sleep(0.8)
        before = self.unacked(gws)
        t0 = time.monotonic()
        redis.pause()
        await asyncio.sleep(2.5)
        redis.resume()
        await self.until_acked(gws, before)
        rec = time.monotonic() - t0
        await self.finish(gws, tasks)
        self.assertGreater(sum(g.l.unavailable for g in gws), 0,
                           "no frame was answered unavailable while Redis was frozen")
        self.account("Redis SIGSTOP 2.5 s (timeout 1 s), SIGCONT", redis, [g.l for g in gws], rec)
        hub[0].stop()

    async def test_sigterm_drain_with_redis_frozen(self):
        """SIGTERM while Redis is frozen with frames in flight: every
        in-flight frame is acked or answered unavailable, the hub exits 0
        within its drain bound, and a new hub takes the resends."""
        redis = PersistentRedis("everysec")
        self.addCleanup(redis.stop)
        hub = [self.start_hub(redis, extra=["--redis-timeout-ms", "1000"])]
        gws, tasks = await self.gateways(hub)
        await asyncio.sleep(0.8)
        redis.pause()
        await asyncio.sleep(0.2)
        t_term = time.monotonic()
        hub[0].proc.send_signal(signal.SIGTERM)
        rc = await asyncio.get_running_loop().run_in_executor(None, hub[0].wait_exit, 10)
        drain_s = time.monotonic() - t_term
        self.assertEqual(rc, 0, "exit code after SIGTERM with Redis frozen")
        self.assertLess(drain_s, 8, "drain took %.1f s" % drain_s)
        before = self.unacked(gws)
        redis.resume()
        hub[0] = self.start_hub(redis)
        await self.until_acked(gws, before)
        rec = time.monotonic() - t_term
        await self.finish(gws, tasks)
        self.account("SIGTERM with Redis frozen (drain %.1f s), new hub" % drain_s, redis,
                     [g.l for g in gws], rec)
        hub[0].stop()


if __name__ == "__main__":
    main()
