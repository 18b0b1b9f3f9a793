"""The Redis bus (hub/redis.c) against a real Redis Cluster on loopback:
routing by slot, MOVED and ASK while slots migrate under load, a primary
killed and its replica promoted, sharded pub/sub following its slot, one
Redis as a cluster of one shard, and the hub starting on a cluster (and
refusing a database number there). The bus runs in bus_probe
(tests/cluster/bus_probe.c), driven over stdin. Label `cluster`."""

import os
import re
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import harness  # noqa: E402
from harness import Redis, RedisCluster, wait_until  # noqa: E402

PROBE_BIN = os.environ.get("HUB_PROBE_BIN") or os.path.join(harness.BUILD_DIR, "tests",
                                                            "bus_probe")


class Probe:
    """bus_probe on its own process; lines it printed are kept in .lines."""

    def __init__(self, redis_url, extra=()):
        self.lines = []
        self.cond = threading.Condition()
        self.err_path = os.path.join(harness.log_root(), "probe-%d.stderr" % id(self))
        self.err = open(self.err_path, "w")
        self.proc = subprocess.Popen([PROBE_BIN, "--redis", redis_url,
                                      "--redis-timeout-ms", "1000",
                                      "--redis-backoff-max-ms", "200"] + list(extra),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True, bufsize=1,
                                     env=harness.clean_env())
        threading.Thread(target=self._read, daemon=True).start()
        self.wait(r"^ready$")
        self.n = 0

    def _read(self):
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()

    def send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait(self, pattern, timeout=10, start=0):
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines[start:]:
                    m = rx.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("probe printed no /%s/ in %.1fs; last lines: %s; "
                                         "stderr: %s" % (pattern, timeout, self.lines[-10:],
                                                         self.stderr_tail()))
                self.cond.wait(left)

    def stderr_tail(self, n=15):
        with open(self.err_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def call(self, *args, timeout=10):
        """cmd ID ARGS...: (kind, rest) of its answer."""
        self.n += 1
        tag = "c%d" % self.n
        mark = len(self.lines)
        self.send(" ".join(["cmd", tag] + [str(a) for a in args]))
        m = self.wait(r"^%s (ok|err|null|refused) ?(.*)$" % tag, timeout, mark)
        return m.group(1), m.group(2)

    def status(self):
        mark = len(self.lines)
        self.send("status")
        m = self.wait(r"^status (.*)$", 5, mark)
        return {k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())}

    def start_load(self, n, prefix):
        mark = len(self.lines)
        self.send("load %d %s" % (n, prefix))
        self.wait(r"^loading$", 5, mark)

    def stop_load(self):
        """{key: {ok, err, null, refused, inflight}}"""
        mark = len(self.lines)
        self.send("stop")
        self.wait(r"^stopped$", 10, mark)
        out = {}
        for line in self.lines[mark:]:
            m = re.match(r"^key (\S+) (.*)$", line)
            if m:
                out[m.group(1)] = {k: int(v) for k, v in
                                   (kv.split("=") for kv in m.group(2).split())}
        return out

    def close(self):
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)
        self.err.close()
        text = open(self.err_path, errors="replace").read()
        for marker in harness.SANITIZER_MARKERS:
            if marker in text:
                raise AssertionError("sanitizer report in %s" % self.err_path)


def settle_load(probe):
    """Lets every in-flight command answer (a stopped load sends nothing more)."""
    probe.stop_load()
    wait_until(lambda: probe.status()["pending"] == 0, 10, what="no command pending")
    stats = probe.stop_load()  # again, now that every reply came
    assert not any(s["inflight"] for s in stats.values()), stats
    return stats


class ClusterBus(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        harness.require_bin(PROBE_BIN, "bus_probe")
        cls.cluster = RedisCluster(primaries=3)

    @classmethod
    def tearDownClass(cls):
        cls.cluster.stop()

    def probe(self, url=None):
        p = Probe(url or self.cluster.seeds)
        self.addCleanup(p.close)
        wait_until(lambda: p.status()["up"] == 1, 10, what="the bus up")
        return p

    def other_primary(self, node):
        return self.cluster.node([port for port in self.cluster.primaries()
                                  if port != node.port][0])

    def test_routes_by_slot(self):
        p = self.probe()
        st = p.status()
        self.assertEqual((st["cluster"], st["shards"]), (1, 3))
        keys = ["rt:{%d}" % i for i in range(30)]
        self.assertGreater(len({self.cluster.owner_of(k).port for k in keys}), 2)
        for k in keys:
            self.assertEqual(p.call("SET", k, "v-" + k), ("ok", "OK"))
        for k in keys:
            # Stored on the primary that serves the key's slot, read back
            # through the bus; the script goes by KEYS[1].
            self.assertEqual(self.cluster.owner_of(k).cmd("GET", k), "v-" + k)
            self.assertEqual(p.call("GET", k), ("ok", "v-" + k))
            mark = len(p.lines)
            p.send("incr i-%s n:%s 3" % (k, k))
            p.wait(r"^i-%s ok 3$" % re.escape(k), 5, mark)
        # Keys of two slots in one call: Redis refuses, the bus passes it on.
        kind, rest = p.call("MSET", "rt:{1}", "a", "rt:{2}", "b")
        self.assertEqual(kind, "err")
        self.assertTrue(rest.startswith("CROSSSLOT"), rest)
        self.assertEqual(p.status()["moved"], 0)

    def test_migration_under_load_moved_and_ask(self):
        """Slots move while one INCR per key is always in flight: every
        command answered once, none lost, no error reaches the caller."""
        p = self.probe()
        prefix = "mig%d" % os.getpid()
        n = 12
        keys = ["%s:{%d}" % (prefix, i) for i in range(n)]
        p.start_load(n, prefix)
        wait_until(lambda: all(self.cluster.owner_of(k).cmd("GET", k) for k in keys), 10,
                   what="every key written")
        # Step by step for three keys' slots: while MIGRATING with the keys
        # already moved, the source answers ASK; after the move, MOVED.
        for k in keys[:3]:
            slot = self.cluster.slot_of(k)
            src = self.cluster.owner_of(k)
            dst = self.other_primary(src)
            self.cluster.begin_migration(slot, src, dst)
            self.cluster.migrate_keys(slot, src, dst)
            time.sleep(0.3)  # the load runs against the half-moved slot: ASK
            self.cluster.end_migration(slot, dst)
        # And redis-cli --cluster reshard of a range that holds load keys.
        src = self.cluster.owner_of(keys[3])
        self.cluster.reshard_cli(200, src, self.other_primary(src))
        time.sleep(0.5)
        stats = settle_load(p)
        st = p.status()
        self.assertGreater(st["ask"], 0, st)
        self.assertGreater(st["moved"], 0, st)
        for k in keys:
            s = stats[k]
            self.assertEqual((s["err"], s["null"]), (0, 0), (k, s))
            self.assertGreater(s["ok"], 10, (k, s))
            # Exactly the acknowledged increments are in Redis, on the
            # primary that serves the key now.
            self.assertEqual(int(self.cluster.owner_of(k).cmd("GET", k)), s["ok"], (k, s))

    def test_sharded_channel_follows_its_slot(self):
        p = self.probe()
        ch = "sch:%d" % os.getpid()
        mark = len(p.lines)
        p.send("sub " + ch)
        p.wait(r"^active %s 1$" % re.escape(ch), 5, mark)
        self.assertEqual(p.call("SPUBLISH", ch, "one"), ("ok", "1"))
        p.wait(r"^msg %s one$" % re.escape(ch), 5, mark)
        slot = self.cluster.slot_of(ch)
        src = self.cluster.node(self.cluster.owner(slot))
        mark = len(p.lines)
        self.cluster.reshard([slot], src, self.other_primary(src))
        # Redis dropped the subscription with the slot; the bus subscribes
        # again on the new primary.
        p.wait(r"^active %s 0$" % re.escape(ch), 10, mark)
        p.wait(r"^active %s 1$" % re.escape(ch), 10, mark)
        mark = len(p.lines)
        self.assertEqual(p.call("SPUBLISH", ch, "two"), ("ok", "1"))
        p.wait(r"^msg %s two$" % re.escape(ch), 5, mark)

    def test_one_redis_is_one_shard(self):
        r = Redis()
        self.addCleanup(r.stop)
        p = self.probe(r.url)
        st = p.status()
        self.assertEqual((st["cluster"], st["shards"]), (0, 1))
        self.assertEqual(p.call("SET", "k1", "x"), ("ok", "OK"))
        self.assertEqual(r.cmd("GET", "k1"), "x")
        mark = len(p.lines)
        p.send("sub solo")
        p.wait(r"^active solo 1$", 5, mark)
        self.assertEqual(p.call("SPUBLISH", "solo", "hi"), ("ok", "1"))
        p.wait(r"^msg solo hi$", 5, mark)

    def test_hub_runs_on_cluster_refuses_a_database(self):
        key = os.path.join(harness.mkdtemp(), "k")
        harness.write_file(key, b"x" * 32)
        # Key layout 3 keeps every call in one slot: the hub serves.
        hub = harness.Hub(harness.hub_args(None, key, extra=()) + ["--redis", self.cluster.seeds])
        self.addCleanup(hub.cleanup)
        hub.wait_line(r"telemetry: 16 ingest shards \(sharded pub/sub\)", 10)
        self.assertNotIn("CROSSSLOT", hub.stderr_text())
        hub.stop()
        # A database number on a cluster node: refused.
        hub = harness.Hub(harness.hub_args(None, key) + [
            "--redis", self.cluster.nodes[0].url + "/2"], wait=False)
        self.addCleanup(hub.cleanup)
        self.assertEqual(hub.wait_exit(20), 1, hub.tail())
        self.assertIn("is a Redis Cluster node: database 2 (/2 in the URL) is refused",
                      hub.stderr_text())


class ClusterFailover(unittest.TestCase):
    def test_primary_killed_replica_promoted(self):
        harness.require_bin(PROBE_BIN, "bus_probe")
        cluster = RedisCluster(primaries=3, replicas=1)
        self.addCleanup(cluster.stop)
        p = Probe(cluster.seeds)
        self.addCleanup(p.close)
        wait_until(lambda: p.status()["up"] == 1, 10, what="the bus up")
        prefix = "fo%d" % os.getpid()
        n = 12
        keys = ["%s:{%d}" % (prefix, i) for i in range(n)]
        p.start_load(n, prefix)
        wait_until(lambda: all(cluster.owner_of(k).cmd("GET", k) for k in keys), 10,
                   what="every key written")
        victim = cluster.owner_of(keys[0])
        cluster.kill(victim)
        wait_until(lambda: p.status()["up"] == 0, 5, what="the bus counting Redis down")
        cluster.wait_failover(victim)
        t0 = time.monotonic()
        # The bus follows: the map read again, the new primary connected.
        wait_until(lambda: p.status()["up"] == 1, 5, what="the bus up after the failover")
        followed = time.monotonic() - t0
        before = settle_load(p)
        p.start_load(n, prefix)
        time.sleep(1)
        after = settle_load(p)
        for k in keys:
            # Counters restart with each load: every key written again
            # after the failover, with no error.
            self.assertGreater(after[k]["ok"], 5, (k, after[k]))
            self.assertEqual(after[k]["err"] + after[k]["null"], 0, (k, after[k]))
        self.assertLess(followed, 5)
        st = p.status()
        self.assertEqual(st["shards"], 3)
        self.assertGreater(sum(s["null"] + s["refused"] + s["err"] for s in before.values()), 0)


if __name__ == "__main__":
    unittest.main(verbosity=2)
