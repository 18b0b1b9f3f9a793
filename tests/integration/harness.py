"""Shared helpers for the iot-hub black-box integration tests.

Every test file starts its own servers: a redis-server on a free loopback port
(Redis), the hub binary on port 0 (Hub, which parses the `listening on
HOST:PORT` line), and talks to them with python-websockets 10.4 (Debian's, so
run the tests with /usr/bin/python3), raw sockets and a tiny RESP client.

Environment (set by tests/CMakeLists.txt; defaults point into ./build):
  HUB_BIN, HUB_TOKEN_BIN, HUB_SIM_BIN, HUB_SOURCE_DIR, HUB_BUILD_DIR
  HUB_TEST_KEEP=1   keep temp dirs and print where hub logs are.

No fixed ports, no sleeps as readiness: every wait polls a condition or waits
for a line, and every wait has a deadline.
"""

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.request

try:
    import websockets
    import websockets.exceptions
except ImportError:  # pragma: no cover - reported clearly below
    websockets = None

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_DIR = os.environ.get("HUB_SOURCE_DIR") or os.path.dirname(os.path.dirname(HERE))
BUILD_DIR = os.environ.get("HUB_BUILD_DIR") or os.path.join(SOURCE_DIR, "build")
HUB_BIN = os.environ.get("HUB_BIN") or os.path.join(BUILD_DIR, "iot-hub")
TOKEN_BIN = os.environ.get("HUB_TOKEN_BIN") or os.path.join(BUILD_DIR, "tools", "iot-token")
SIM_BIN = os.environ.get("HUB_SIM_BIN") or os.path.join(BUILD_DIR, "tools", "gw-sim")
SCHEMAS_DIR = os.path.join(SOURCE_DIR, "deploy", "device-types")
CERT_SCRIPT = os.path.join(SOURCE_DIR, "certs", "gen-dev-certs.sh")
SUBPROTOCOL = "iot-gateway.v1"
GATEWAY_PATH = "/v1/gateway"
KEEP = os.environ.get("HUB_TEST_KEEP") == "1"

SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "runtime error:", "LeakSanitizer")

# Hub logs are kept for post-mortems: $HUB_BUILD_DIR/itest-logs/<test file>/
# (emptied when that test file starts), or a temp dir if the build dir is absent.
_LOG_ROOT = None
_hub_count = itertools.count(1)


def log_root():
    global _LOG_ROOT
    if _LOG_ROOT is None:
        stem = os.path.splitext(os.path.basename(sys.argv[0] or "itest"))[0] or "itest"
        if os.path.isdir(BUILD_DIR) and os.access(BUILD_DIR, os.W_OK):
            _LOG_ROOT = os.path.join(BUILD_DIR, "itest-logs", stem)
            shutil.rmtree(_LOG_ROOT, ignore_errors=True)
            os.makedirs(_LOG_ROOT, exist_ok=True)
        else:
            _LOG_ROOT = tempfile.mkdtemp(prefix="iot-hub-itest-logs-")
    return _LOG_ROOT


# --------------------------------------------------------------------------
# small utilities

def now_ms():
    return int(time.time() * 1000)


_uniq = itertools.count(1)


def uniq(prefix):
    """A fresh id matching [A-Za-z0-9._:-]{1,128}, unique within this run."""
    return "%s-%d-%d" % (prefix, os.getpid(), next(_uniq))


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout, interval=0.02, what="condition"):
    """Polls pred() until it returns a truthy value; returns it. Fails the
    test with `what` when the deadline passes."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # keep polling; report the last error
            last_exc = e
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.1fs waiting for %s%s" % (
                timeout, what, (" (last error: %r)" % last_exc) if last_exc else ""))
        time.sleep(interval)


def mkdtemp(prefix="iot-hub-it-"):
    return tempfile.mkdtemp(prefix=prefix)


def rmtree(path):
    if path and not KEEP:
        shutil.rmtree(path, ignore_errors=True)


def write_file(path, data, mode=0o600):
    if isinstance(data, str):
        data = data.encode()
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    return path


def require_bin(path, name):
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise AssertionError("%s not built: %s does not exist (cmake -S . -B build && "
                             "cmake --build build)" % (name, path))


def require_hub():
    if websockets is None:
        raise AssertionError("python3-websockets missing: run the tests with /usr/bin/python3")
    require_bin(HUB_BIN, "HUB_BIN")


def child_pids(pid):
    """Direct children of pid (from /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                st = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...
        rest = st[st.rfind(")") + 2:].split()
        if len(rest) > 1 and int(rest[1]) == pid:
            out.append(int(d))
    return out


def proc_cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def pid_alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            st = f.read()
    except OSError:
        return False
    state = st[st.rfind(")") + 2:].split()[0]
    return state != "Z"


# --------------------------------------------------------------------------
# Redis key names (docs/streams.md, "Key names"), spelled here independently
# of hub/keys.h so that a test catches a change of the layout: every
# user-chosen name in a key is wrapped in braces.

def crc16(data):
    """CRC16/XMODEM, as Redis Cluster hashes keys."""
    c = 0
    for x in data:
        c ^= x << 8
        for _ in range(8):
            c = ((c << 1) ^ 0x1021) & 0xffff if c & 0x8000 else (c << 1) & 0xffff
    return c


def key_slot(key):
    """The Redis Cluster slot of key (hash tags included)."""
    b = key.encode()
    o = b.find(b"{")
    if o >= 0:
        e = b.find(b"}", o + 1)
        if e > o + 1:
            b = b[o + 1:e]
    return crc16(b) % 16384


_slot_tags = {}


def slot_tag(slot):
    """Key layout 3: the smallest decimal number whose digits hash to slot."""
    if not _slot_tags:
        n = 0
        while len(_slot_tags) < 16384:
            _slot_tags.setdefault(crc16(str(n).encode()) % 16384, str(n))
            n += 1
    return _slot_tags[slot]


def index_device(r, device, device_type=None):
    """Puts device in the layout-3 indexes by hand (a test that seeds the
    registry without a hub): its slot's device index, its type's, and the
    slot directory."""
    slot = crc16(device.encode()) % 16384
    r.cmd("SADD", rkeys.devices(device), device)
    if device_type:
        r.cmd("SADD", rkeys.type_of(device_type, device), device)
    r.cmd("SETBIT", rkeys.SLOTS, slot, 1)


class rkeys2:
    """Layout-2 names (tools/migrate-layout's target; the hub migrates them)."""
    LAYOUT = "iot:layout"
    VERSION = "2"

    @staticmethod
    def type(device_type):
        return "iot:type:{%s}" % device_type

    @staticmethod
    def idem(owner, idempotency_key):
        return "iot:idem:{%s}:%s" % (owner, idempotency_key)


class rkeys:
    LAYOUT = "iot:{hub}:layout"
    VERSION = "3"
    LEASES = "iot:{hub}:leases"
    EPOCH = "iot:{hub}:epoch"
    ACTIVE = "iot:{hub}:rollouts"
    SLOTS = "iot:{hub}:slots"

    @staticmethod
    def devices(device):
        """The slot-local index that holds device."""
        return "iot:idx:{%s}:devices" % slot_tag(crc16(device.encode()) % 16384)

    @staticmethod
    def type_of(device_type, device):
        """The slot-local type index that holds device."""
        return "iot:idx:{%s}:type:%s" % (slot_tag(crc16(device.encode()) % 16384), device_type)

    @staticmethod
    def timers(cid):
        return "iot:idx:{%s}:timers" % slot_tag(crc16(cid.encode()) % 16384)

    @staticmethod
    def run_set(run, device):
        """The slot-local set of the devices of device's slot that hub run
        <instance>:<token> holds online."""
        return "iot:idx:{%s}:run:%s" % (slot_tag(crc16(device.encode()) % 16384), run)

    @staticmethod
    def run_set_of_slot(run, slot):
        return "iot:idx:{%s}:run:%s" % (slot_tag(slot), run)

    @staticmethod
    def runslots(run):
        """The bitmap of the slots whose run sets hub run may have written."""
        return "iot:{hub}:runslots:%s" % run

    _BITS_LUA = ("local b = redis.call('GET', KEYS[1]) or '' local out = {} "
                 "for i = 1, #b do local c = string.byte(b, i) for j = 0, 7 do "
                 "if bit.band(c, bit.rshift(128, j)) ~= 0 then out[#out + 1] = (i - 1) * 8 + j end "
                 "end end return out")

    @staticmethod
    def run_slots(r, run):
        """The slots marked in run's bitmap (r: a Redis, or the cluster
        node of {hub}, with cmd)."""
        return r.cmd("EVAL", rkeys._BITS_LUA, 1, rkeys.runslots(run))

    @staticmethod
    def run_members(r, run, node_of=None):
        """Every device of run's sets, found by its bitmap. node_of(key)
        gives the node of a key on a cluster (default: r)."""
        out = set()
        for s in rkeys.run_slots(node_of(rkeys.runslots(run)) if node_of else r, run):
            k = rkeys.run_set_of_slot(run, s)
            out |= set((node_of(k) if node_of else r).cmd("SMEMBERS", k))
        return sorted(out)

    @staticmethod
    def cmd(cid):
        return "iot:cmd:{%s}" % cid

    @staticmethod
    def cmd_log(cid):
        return "iot:cmd:{%s}:log" % cid

    @staticmethod
    def rollout(rid):
        return "iot:rollout:{%s}" % rid

    @staticmethod
    def rollout_cmds(rid):
        return "iot:rollout:{%s}:cmds" % rid

    @staticmethod
    def dev(device):
        return "iot:dev:{%s}" % device

    @staticmethod
    def cmds(device):
        return "iot:dev:{%s}:cmds" % device

    @staticmethod
    def cmdlog(device):
        return "iot:dev:{%s}:cmdlog" % device

    @staticmethod
    def cancels(device):
        return "iot:dev:{%s}:cancels" % device

    # Ingest keys (layout 3): one shard (one Redis, feed-shards 0 or 1)
    # unless shards is given; a gateway's shard is FNV-1a(id) % shards.
    FEED = "iot:feed:{i0}"

    @staticmethod
    def shard_of(gateway, shards=1):
        h = 2166136261
        for b in gateway.encode():
            h = ((h ^ b) * 16777619) & 0xFFFFFFFF
        return h % shards if shards > 1 else 0

    @staticmethod
    def tm(device, shard=0):
        return "iot:tm:{i%d}:%s" % (shard, device)

    @staticmethod
    def gw_seqs(gateway, shards=1):
        return "iot:seqs:{i%d}:%s" % (rkeys.shard_of(gateway, shards), gateway)

    @staticmethod
    def feed(shard=0):
        return "iot:feed:{i%d}" % shard

    # Layout 2's names of the same keys (the 2 -> 3 migration renames them).
    @staticmethod
    def tm2(device):
        return "iot:tm:{%s}" % device

    @staticmethod
    def gw_seqs2(gateway):
        return "iot:gw:{%s}:seqs" % gateway

    @staticmethod
    def gw_epoch(gateway):
        return "iot:gw:{%s}:epoch" % gateway

    @staticmethod
    def idem(device, owner, idempotency_key):
        return "iot:idem:{%s}:{%s}:%s" % (device, owner, idempotency_key)


# --------------------------------------------------------------------------
# Redis: a private redis-server and a tiny RESP2 client

class RedisError(Exception):
    pass


class Resp:
    """Minimal synchronous RESP2 client. cmd() returns str / int / list /
    None; a Redis error reply raises RedisError."""

    def __init__(self, port, host="127.0.0.1", timeout=5.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.f = self.sock.makefile("rb")

    def close(self):
        try:
            self.f.close()
            self.sock.close()
        except OSError:
            pass

    @staticmethod
    def encode(args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            if isinstance(a, bytes):
                b = a
            else:
                b = str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        return b"".join(out)

    def _line(self):
        line = self.f.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("redis connection closed")
        return line[:-2]

    def _read(self):
        line = self._line()
        t, rest = line[:1], line[1:]
        if t == b"+":
            return rest.decode(errors="replace")
        if t == b"-":
            return RedisError(rest.decode(errors="replace"))
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.f.read(n + 2)
            if len(data) != n + 2:
                raise ConnectionError("redis connection closed")
            return data[:-2].decode(errors="replace")
        if t == b"*":
            n = int(rest)
            if n < 0:
                return None
            return [self._read() for _ in range(n)]
        raise ConnectionError("bad RESP type %r" % t)

    def cmd(self, *args):
        self.sock.sendall(self.encode(args))
        r = self._read()
        if isinstance(r, RedisError):
            raise r
        return r


class Redis:
    """A redis-server of our own on a free loopback port, no persistence
    unless extra (more redis-server arguments, e.g. ["--appendonly", "yes"]
    or ["--replicaof", "127.0.0.1", port]) says otherwise."""

    def __init__(self, port=None, extra=()):
        self.dir = mkdtemp("iot-hub-redis-")
        self.extra = [str(a) for a in extra]
        self.proc = None
        self._client = None
        self.paused = False
        fixed = port is not None
        for attempt in range(5):
            self.port = port if fixed else free_port()
            if self._start():
                return
            if fixed:
                break
        raise AssertionError("redis-server did not start: %s" % self.log_tail())

    @property
    def url(self):
        return "redis://127.0.0.1:%d" % self.port

    def _start(self, timeout=10):
        self.log_path = os.path.join(self.dir, "redis-%d.log" % self.port)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--daemonize", "no",
             "--dir", self.dir, "--protected-mode", "no"] + self.extra,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.paused = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                c = Resp(self.port, timeout=1)
                try:
                    if c.cmd("PING") == "PONG":
                        return True
                finally:
                    c.close()
            except (OSError, ConnectionError, RedisError):
                pass
            time.sleep(0.02)
        return False

    def log_tail(self, n=20):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return "(no log)"

    def _drop_client(self):
        if self._client:
            self._client.close()
            self._client = None

    def cmd(self, *args):
        """Runs one command on a cached connection (reconnecting once if the
        server was restarted)."""
        if self.paused:
            raise AssertionError("test bug: Redis.cmd while redis is paused")
        for attempt in (0, 1):
            try:
                if self._client is None:
                    self._client = Resp(self.port)
                return self._client.cmd(*args)
            except (OSError, ConnectionError):
                self._drop_client()
                if attempt:
                    raise

    def ping(self):
        try:
            return self.cmd("PING") == "PONG"
        except (OSError, ConnectionError):
            return False

    # convenience
    def xlen(self, key):
        return self.cmd("XLEN", key)

    def xrange(self, key):
        """[(id, {field: value})] oldest first."""
        out = []
        for eid, fields in self.cmd("XRANGE", key, "-", "+") or []:
            out.append((eid, dict(zip(fields[0::2], fields[1::2]))))
        return out

    def hgetall(self, key):
        r = self.cmd("HGETALL", key) or []
        return dict(zip(r[0::2], r[1::2]))

    def cli(self, *args):
        """redis-cli --raw, for the odd command the RESP client is not handy for."""
        return subprocess.run(["redis-cli", "-p", str(self.port), "--raw", *map(str, args)],
                              capture_output=True, text=True, timeout=10).stdout

    # process control
    def pause(self):
        self._drop_client()
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def kill(self):
        self._drop_client()
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.paused = False

    def restart(self):
        """Kills (if running) and starts a fresh, empty server on the same port."""
        self.kill()
        deadline = time.monotonic() + 10
        while True:
            if self._start():
                return
            if time.monotonic() > deadline:
                raise AssertionError("redis-server did not restart on port %d: %s"
                                     % (self.port, self.log_tail()))
            time.sleep(0.1)

    def stop(self):
        self._drop_client()
        if self.proc and self.proc.poll() is None:
            if self.paused:
                self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        rmtree(self.dir)


def free_cluster_port(avoid=(), lo=41000, hi=41999):
    """A loopback port in [lo, hi] whose cluster bus port (port + 10000) is
    free too."""
    import random
    for _ in range(500):
        p = random.randint(lo, hi)
        if p in avoid:
            continue
        try:
            for q in (p, p + 10000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(("127.0.0.1", q))
        except OSError:
            continue
        return p
    raise AssertionError("no free port pair in %d-%d" % (lo, hi))


class RedisCluster:
    """A Redis Cluster of our own on loopback: `primaries` primaries with
    `replicas` replicas each (redis-server --cluster-enabled yes, no
    persistence; redis-cli --cluster create), on ports of 41000-41999 (bus
    port = port + 10000). .seeds is the hub's --redis value, .nodes the
    Redis objects (each with its own cached client: .cmd), in creation order
    (the first `primaries` are the primaries at creation). Every server is
    stopped by its PID in stop()."""

    def __init__(self, primaries=3, replicas=0, node_timeout=2000, extra=(), ports=(41000, 41999)):
        """ports: the (lo, hi) range the nodes' ports are drawn from."""
        self.nodes = []
        lo, hi = ports
        ports = []
        try:
            for _ in range(primaries * (1 + replicas)):
                for attempt in range(5):
                    port = free_cluster_port(avoid=ports, lo=lo, hi=hi)
                    try:
                        r = Redis(port=port, extra=[
                            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                            "--cluster-node-timeout", str(node_timeout)] + list(extra))
                    except AssertionError:
                        continue
                    break
                else:
                    raise AssertionError("a cluster node did not start")
                ports.append(port)
                self.nodes.append(r)
            out = subprocess.run(
                ["redis-cli", "--cluster", "create"] +
                ["127.0.0.1:%d" % p for p in ports] +
                ["--cluster-replicas", str(replicas), "--cluster-yes"],
                capture_output=True, text=True, timeout=60)
            if out.returncode:
                raise AssertionError("redis-cli --cluster create failed: %s%s"
                                     % (out.stdout[-2000:], out.stderr[-2000:]))
            wait_until(lambda: sum("role:slave" in n.cmd("INFO", "replication")
                                   for n in self.nodes) == primaries * replicas,
                       30, interval=0.1, what="every replica attached")
            self.wait_ok()
        except BaseException:
            self.stop()
            raise

    @property
    def seeds(self):
        return ",".join(n.url for n in self.nodes)

    def node(self, port):
        for n in self.nodes:
            if n.port == port:
                return n
        raise KeyError(port)

    def myid(self, node):
        return node.cmd("CLUSTER", "MYID")

    def slot_of(self, key):
        return self.any_node().cmd("CLUSTER", "KEYSLOT", key)

    def any_node(self):
        for n in self.nodes:
            if n.proc.poll() is None and not n.paused and n.ping():
                return n
        raise AssertionError("no cluster node answers")

    def slots_map(self, node=None):
        """{slot range (lo, hi): primary port} as node sees it."""
        node = node or self.any_node()
        return {(int(e[0]), int(e[1])): int(e[2][1]) for e in node.cmd("CLUSTER", "SLOTS")}

    def owner(self, slot, node=None):
        """The port of the primary serving slot (as node sees it)."""
        for (lo, hi), port in self.slots_map(node).items():
            if lo <= slot <= hi:
                return port
        return None

    def owner_of(self, key):
        return self.node(self.owner(self.slot_of(key)))

    def primaries(self):
        """Ports of the primaries that serve slots."""
        return sorted(set(self.slots_map().values()))

    def _ok(self, live):
        maps = []
        for n in live:
            info = n.cmd("CLUSTER", "INFO")
            if "cluster_state:ok" not in info:
                return False
            # A replica that never synced with its primary would not take
            # over (its data counts as too old): wait for the link.
            repl = n.cmd("INFO", "replication")
            if "role:slave" in repl and "master_link_status:up" not in repl:
                return False
            m = self.slots_map(n)
            if sum(hi - lo + 1 for lo, hi in m) != 16384:
                return False
            maps.append(m)
        return all(m == maps[0] for m in maps)

    def wait_ok(self, timeout=30):
        """Until every live node says cluster_state:ok and all agree on the
        slot map."""
        wait_until(lambda: self._ok([n for n in self.nodes
                                     if n.proc.poll() is None and not n.paused]),
                   timeout, interval=0.1, what="cluster_state:ok on every node")

    def kill(self, node):
        node.kill()

    def wait_failover(self, dead, timeout=30):
        """Until every live node maps no slot to dead (killed) and the
        cluster is ok again: a replica took its slots."""
        def done():
            live = [n for n in self.nodes if n.proc.poll() is None and not n.paused]
            return (all(dead.port not in self.slots_map(n).values() for n in live)
                    and self._ok(live))
        wait_until(done, timeout, interval=0.1, what="a replica promoted for %d" % dead.port)

    def restart(self, node):
        """Starts a killed node again on its port, with its nodes.conf (it
        rejoins; no data, no persistence)."""
        deadline = time.monotonic() + 10
        while not node._start():
            if time.monotonic() > deadline:
                raise AssertionError("cluster node %d did not restart: %s"
                                     % (node.port, node.log_tail()))
            time.sleep(0.1)

    # ---- moving slots: CLUSTER SETSLOT + MIGRATE, step by step -------------
    def begin_migration(self, slot, src, dst):
        """slot goes from src to dst (Redis objects): dst IMPORTING, src
        MIGRATING. From now on src answers ASK for keys it no longer has."""
        dst.cmd("CLUSTER", "SETSLOT", slot, "IMPORTING", self.myid(src))
        src.cmd("CLUSTER", "SETSLOT", slot, "MIGRATING", self.myid(dst))

    def migrate_keys(self, slot, src, dst, batch=100):
        """Moves every key of slot from src to dst (MIGRATE ... KEYS)."""
        while True:
            keys = src.cmd("CLUSTER", "GETKEYSINSLOT", slot, batch)
            if not keys:
                return
            src.cmd("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", *keys)

    def end_migration(self, slot, dst):
        """Assigns slot to dst on every live node (MOVED from now on)."""
        dst_id = self.myid(dst)
        dst.cmd("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        for n in self.nodes:
            if n is not dst and n.proc.poll() is None and not n.paused:
                try:
                    n.cmd("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
                except RedisError:
                    pass  # a replica: it learns from its primary

    def reshard(self, slots, src, dst):
        """Moves each slot of slots (with its keys) from src to dst."""
        for slot in slots:
            self.begin_migration(slot, src, dst)
            self.migrate_keys(slot, src, dst)
            self.end_migration(slot, dst)
        self.wait_ok()

    def reshard_cli(self, count, src, dst):
        """redis-cli --cluster reshard: count slots from src to dst."""
        out = subprocess.run(
            ["redis-cli", "--cluster", "reshard", "127.0.0.1:%d" % src.port,
             "--cluster-from", self.myid(src), "--cluster-to", self.myid(dst),
             "--cluster-slots", str(count), "--cluster-yes"],
            capture_output=True, text=True, timeout=120)
        if out.returncode:
            raise AssertionError("redis-cli --cluster reshard failed: %s%s"
                                 % (out.stdout[-2000:], out.stderr[-2000:]))
        self.wait_ok()

    def stop(self):
        for n in self.nodes:
            n.stop()


CLUSTER_MODE = os.environ.get("HUB_TEST_CLUSTER") == "1"
CLUSTER_PORTS = (42500, 42999)   # the parametrised suites' share of the cluster ports


class ClusterRedis(Redis):
    """The suites' Redis as a 3-primary Redis Cluster (HUB_TEST_CLUSTER=1,
    ctest label `cluster`: the same tests, every flow on a cluster). .url
    is the seed list; cmd() sends a command to the primary of its key (the
    argument after the command name; KEYS goes to every primary), following
    MOVED. Killing or restarting "the" Redis has no meaning here: those
    tests are skipped."""

    def __init__(self, port=None, extra=()):
        if port is not None or extra:
            raise unittest.SkipTest("a Redis with its own port or arguments: not on a cluster")
        self.cluster = RedisCluster(primaries=3, ports=CLUSTER_PORTS)
        self.port = self.cluster.nodes[0].port
        self.paused = False
        self._client = None

    @property
    def url(self):
        return self.cluster.seeds

    def cmd(self, *args):
        name = str(args[0]).upper()
        if name == "KEYS":
            out = []
            for p in self.cluster.primaries():
                out += self.cluster.node(p).cmd(*args)
            return out
        if len(args) < 2 or name in ("INFO", "PING", "CONFIG", "CLIENT", "DBSIZE"):
            return self.cluster.nodes[0].cmd(*args)
        node = self.cluster.node(self.cluster.owner(key_slot(str(args[1]))))
        for _ in range(5):
            try:
                return node.cmd(*args)
            except RedisError as e:
                if not str(e).startswith("MOVED"):
                    raise
                node = self.cluster.node(int(str(e).split()[2].rsplit(":", 1)[1]))
        raise AssertionError("MOVED five times: %r" % (args,))

    def cli(self, *args):
        raise unittest.SkipTest("redis-cli on one node: not on a cluster")

    def pause(self):
        raise unittest.SkipTest("pausing the Redis: not on a cluster")

    resume = kill = restart = pause

    def stop(self):
        self.cluster.stop()


def new_redis(extra=()):
    """The Redis of an integration test: one redis-server, or with
    HUB_TEST_CLUSTER=1 a 3-primary cluster (ClusterRedis)."""
    return ClusterRedis(extra=extra) if CLUSTER_MODE else Redis(extra=extra)


# --------------------------------------------------------------------------
# the hub process

def clean_env(extra=None):
    """The test's environment without any IOT_HUB_* variable, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOT_HUB_")}
    env.setdefault("ASAN_OPTIONS", "abort_on_error=0:detect_leaks=1")
    if os.environ.get("HUB_TEST_PER_SLOT") == "1":
        # the hub takes its per-slot paths (those of a Redis Cluster) on one Redis
        env["IOT_HUB_TEST_PER_SLOT"] = "1"
    if extra:
        env.update(extra)
    return env


class Hub:
    """Runs HUB_BIN with args. Collects stderr (and stdout) in background
    threads so the pipes never fill, and waits for `listening on HOST:PORT`."""

    LISTEN_RE = re.compile(r"listening on (\S+):(\d+)")

    def __init__(self, args, env=None, wait=True, timeout=15, tls=False, binary=None, cwd=None):
        self.args = [binary or HUB_BIN] + [str(a) for a in args]
        self.tls = tls
        self.lines = []       # stderr lines
        self.out_lines = []   # stdout lines
        self.cond = threading.Condition()
        self.port = None
        self.host = None
        self.log_path = os.path.join(log_root(), "hub-%d.stderr" % next(_hub_count))
        self._log = open(self.log_path, "w")
        self._log.write("# %s\n" % " ".join(self.args))
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=clean_env(env), cwd=cwd)
        self.pid = self.proc.pid
        self._threads = [
            threading.Thread(target=self._reader, args=(self.proc.stderr, self.lines), daemon=True),
            threading.Thread(target=self._reader, args=(self.proc.stdout, self.out_lines), daemon=True),
        ]
        for t in self._threads:
            t.start()
        if wait:
            m = self.wait_line(self.LISTEN_RE, timeout)
            self.host, self.port = m.group(1), int(m.group(2))
            if self.port == 0:
                raise AssertionError("hub printed port 0 in %r" % m.group(0))

    def _reader(self, pipe, sink):
        for raw in iter(pipe.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            with self.cond:
                sink.append(line)
                if sink is self.lines:
                    self._log.write(line + "\n")
                    self._log.flush()
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    # output
    def stderr_text(self):
        with self.cond:
            return "\n".join(self.lines)

    def tail(self, n=30):
        with self.cond:
            return "\n".join(self.lines[-n:])

    def describe(self):
        return "hub stderr (%s), last lines:\n%s" % (self.log_path, self.tail())

    def wait_line(self, pattern, timeout=10, start=0):
        """Waits for a stderr line (index >= start) matching regex pattern.
        Returns the match. Fails if the deadline passes or the hub exits."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        i = start
        with self.cond:
            while True:
                while i < len(self.lines):
                    m = rx.search(self.lines[i])
                    i += 1
                    if m:
                        return m
                left = deadline - time.monotonic()
                exited = self.proc.poll() is not None and not any(t.is_alive() for t in self._threads[:1])
                if exited:
                    raise AssertionError("hub exited (rc=%s) before printing /%s/; %s" % (
                        self.proc.returncode, rx.pattern, self._describe_locked()))
                if left <= 0:
                    raise AssertionError("no hub stderr line /%s/ within %.1fs; %s" % (
                        rx.pattern, timeout, self._describe_locked()))
                self.cond.wait(min(left, 0.1))

    def _describe_locked(self):
        return "hub stderr (%s), last lines:\n%s" % (self.log_path, "\n".join(self.lines[-30:]))

    def line_count(self):
        with self.cond:
            return len(self.lines)

    def sanitizer_report(self):
        text = self.stderr_text()
        for m in SANITIZER_MARKERS:
            if m in text:
                return m
        return None

    def check_sanitizers(self):
        m = self.sanitizer_report()
        if m:
            with self.cond:
                i = next(i for i, l in enumerate(self.lines) if m in l)
                excerpt = "\n".join(self.lines[max(0, i - 3):i + 40])
            raise AssertionError("sanitizer report in hub stderr (full log %s):\n%s" % (self.log_path, excerpt))

    def alive(self):
        return self.proc.poll() is None

    def check_alive(self):
        if not self.alive():
            raise AssertionError("hub died (rc=%s); %s" % (self.proc.returncode, self.describe()))
        self.check_sanitizers()

    # urls
    def url(self, path=GATEWAY_PATH, scheme=None):
        scheme = scheme or ("wss" if self.tls else "ws")
        return "%s://127.0.0.1:%d%s" % (scheme, self.port, path)

    def http_url(self, path):
        return self.url(path, scheme="https" if self.tls else "http")

    # signals
    def sighup(self):
        self.proc.send_signal(signal.SIGHUP)

    def wait_exit(self, timeout=10):
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        for t in self._threads:
            t.join(5)
        for p in (self.proc.stdout, self.proc.stderr):
            try:
                p.close()
            except Exception:
                pass
        return rc

    def stop(self, timeout=10):
        """SIGTERM; asserts exit code 0 within timeout and no sanitizer
        report. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.wait_exit(timeout)
        if rc is None:
            self.proc.kill()
            self.wait_exit(5)
            self._close_log()
            raise AssertionError("hub did not exit within %ss of SIGTERM; %s" % (timeout, self.describe()))
        self._close_log()
        self.check_sanitizers()
        if rc != 0:
            raise AssertionError("hub exit code %s after SIGTERM (expected 0); %s" % (rc, self.describe()))
        return rc

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.wait_exit(5)
        self._close_log()

    def _close_log(self):
        try:
            self._log.close()
        except Exception:
            pass

    def cleanup(self):
        self.kill()


def hub_args(redis, jwt_key_file, schemas=SCHEMAS_DIR, alg="HS256", extra=()):
    r = redis.url if isinstance(redis, Redis) else redis
    args = ["--listen", "127.0.0.1:0", "--schemas", schemas,
            "--jwt-alg", alg, "--jwt-key", jwt_key_file]
    if r is not None:
        args += ["--redis", r]
    if isinstance(redis, ClusterRedis) and "--feed-shards" not in extra:
        # the suites read each device's stream by its one-shard name; the
        # 16 shards of a cluster's default: tests/cluster/test_ingest.py
        args += ["--feed-shards", "1"]
    return args + [str(a) for a in extra]


# --------------------------------------------------------------------------
# JWTs

def b64url(b):
    if isinstance(b, str):
        b = b.encode()
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def jwt_encode(header, claims, key=None, signature=None):
    """Compact JWT. header/claims are dicts (or raw bytes for malformed
    ones). With key (bytes) the signature is HMAC-SHA256 over the signing
    input, whatever alg the header names; `signature` (bytes) overrides."""
    h = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    c = claims if isinstance(claims, bytes) else json.dumps(claims, separators=(",", ":")).encode()
    signing_input = b64url(h) + "." + b64url(c)
    if signature is None:
        signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest() if key is not None else b""
    return signing_input + "." + b64url(signature)


def gw_claims(sub, devices=("t-*",), ttl=600, **extra):
    """Gateway claims: sub, devices (None = no devices claim), exp = now+ttl
    (ttl None = no exp)."""
    c = {"sub": sub, "iat": int(time.time())}
    if ttl is not None:
        c["exp"] = int(time.time()) + ttl
    if devices is not None:
        c["devices"] = list(devices)
    c.update(extra)
    return c


def hs256(claims, secret, header=None):
    return jwt_encode(header or {"alg": "HS256", "typ": "JWT"}, claims, secret)


def mint_tool(alg, key_file, sub, devices="t-*", ttl=600, iss=None, aud=None, extra=()):
    """Mints a token with the project's iot-token tool."""
    require_bin(TOKEN_BIN, "HUB_TOKEN_BIN")
    cmd = [TOKEN_BIN, "jwt", "--alg", alg, "--key", key_file, "--sub", sub,
           "--devices", devices, "--ttl", str(ttl)]
    if iss is not None:
        cmd += ["--iss", iss]
    if aud is not None:
        cmd += ["--aud", aud]
    cmd += list(extra)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if p.returncode != 0:
        raise AssertionError("%s failed (rc=%d): %s" % (" ".join(cmd), p.returncode, p.stderr.strip()))
    tok = p.stdout.strip().splitlines()[-1].strip() if p.stdout.strip() else ""
    if tok.count(".") != 2:
        raise AssertionError("%s printed no JWT: %r" % (" ".join(cmd), p.stdout))
    return tok


def jwt_parts(token):
    h, c, s = token.split(".")
    pad = lambda x: x + "=" * (-len(x) % 4)
    return (json.loads(base64.urlsafe_b64decode(pad(h))),
            json.loads(base64.urlsafe_b64decode(pad(c))),
            base64.urlsafe_b64decode(pad(s)))


_certs_cache = {}


def dev_certs(client_cn=None):
    """Runs certs/gen-dev-certs.sh into a temp dir (once per process and CN)
    and returns the dir."""
    if client_cn in _certs_cache:
        return _certs_cache[client_cn]
    if not os.path.isfile(CERT_SCRIPT):
        raise AssertionError("certs/gen-dev-certs.sh missing: %s" % CERT_SCRIPT)
    out = mkdtemp("iot-hub-certs-")
    cmd = ["bash", CERT_SCRIPT, out]
    if client_cn:
        cmd += ["--client-cn", client_cn]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise AssertionError("%s failed (rc=%d): %s" % (" ".join(cmd), p.returncode,
                                                         (p.stderr or p.stdout).strip()[-2000:]))
    for f in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key",
              "foreign-ca.pem", "foreign-client.pem", "foreign-client.key",
              "jwt-rs256.key", "jwt-rs256.pub.pem", "jwt-es256.key", "jwt-es256.pub.pem",
              "jwt-hs256.secret"):
        if not os.path.isfile(os.path.join(out, f)):
            raise AssertionError("gen-dev-certs.sh did not make %s in %s" % (f, out))
    _certs_cache[client_cn] = out
    return out


def client_cert(certs_dir, cn, ca="ca"):
    """An extra client certificate with CN=cn signed by certs_dir/<ca>.pem
    (as gen-dev-certs.sh makes them), so that tests can use a fresh gateway
    id per connection. Returns (cert path, key path)."""
    out = os.path.join(certs_dir, "extra")
    os.makedirs(out, exist_ok=True)
    key, csr, pem, ext = (os.path.join(out, "%s-%s.%s" % (ca, cn, x)) for x in ("key", "csr", "pem", "ext"))
    write_file(ext, "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                    "extendedKeyUsage=clientAuth\n")
    for cmd in (["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key],
                ["openssl", "req", "-new", "-key", key, "-subj", "/O=iot-hub test/CN=%s" % cn, "-out", csr],
                ["openssl", "x509", "-req", "-in", csr, "-CA", os.path.join(certs_dir, ca + ".pem"),
                 "-CAkey", os.path.join(certs_dir, ca + ".key"), "-set_serial", "0x" + os.urandom(16).hex(),
                 "-days", "30", "-sha256", "-extfile", ext, "-out", pem]):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            raise AssertionError("%s failed: %s" % (" ".join(cmd), p.stderr.strip()))
    return pem, key


# --------------------------------------------------------------------------
# raw HTTP (for 401s: lws answers them as HTTP/1.0, which websockets 10.4
# reports as an invalid response)

def raw_http(port, request, ssl_ctx=None, server_hostname="127.0.0.1", timeout=5.0, host="127.0.0.1"):
    """Sends request bytes, reads the response head (and body up to
    Content-Length or close, unless 101). Returns (status, headers, body);
    status is None when the server closed without answering. TLS handshake
    errors propagate as ssl.SSLError / OSError."""
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        if ssl_ctx is not None:
            sock = ssl_ctx.wrap_socket(sock, server_hostname=server_hostname)
        sock.settimeout(timeout)
        sock.sendall(request)
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in buf:
            if time.monotonic() > deadline:
                raise AssertionError("no complete HTTP response head within %.1fs: %r" % (timeout, buf[:200]))
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            if not chunk:
                if not buf:
                    return None, {}, b""
                break
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode(errors="replace").split("\r\n")
        m = re.match(r"HTTP/\d\.\d (\d{3})", lines[0])
        if not m:
            raise AssertionError("not an HTTP response: %r" % lines[0])
        status = int(m.group(1))
        headers = {}
        for l in lines[1:]:
            k, _, v = l.partition(":")
            headers[k.strip().lower()] = v.strip()
        if status == 101:
            return status, headers, body
        want = int(headers["content-length"]) if "content-length" in headers else None
        while want is None or len(body) < want:
            if time.monotonic() > deadline:
                break
            try:
                chunk = sock.recv(65536)
            except (socket.timeout, ConnectionResetError, ssl.SSLError, OSError):
                break
            if not chunk:
                break
            body += chunk
        return status, headers, body
    finally:
        sock.close()


def upgrade_request(port, token=None, path=GATEWAY_PATH, subprotocol=SUBPROTOCOL,
                    auth_header=None, extra_headers=()):
    key = base64.b64encode(os.urandom(16)).decode()
    lines = ["GET %s HTTP/1.1" % path,
             "Host: 127.0.0.1:%d" % port,
             "Upgrade: websocket",
             "Connection: Upgrade",
             "Sec-WebSocket-Key: %s" % key,
             "Sec-WebSocket-Version: 13"]
    if subprotocol is not None:
        lines.append("Sec-WebSocket-Protocol: %s" % subprotocol)
    if auth_header is not None:
        lines.append("Authorization: %s" % auth_header)
    elif token is not None:
        lines.append("Authorization: Bearer %s" % token)
    lines.extend(extra_headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), key


def try_upgrade(hub, token=None, ssl_ctx=None, **kw):
    """Raw WebSocket upgrade. Returns (status, headers, body); for a 101 it
    also checks Sec-WebSocket-Accept and the subprotocol."""
    req, key = upgrade_request(hub.port, token, **kw)
    st, hdrs, body = raw_http(hub.port, req, ssl_ctx=ssl_ctx)
    if st == 101:
        want = base64.b64encode(hashlib.sha1(
            (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        if hdrs.get("sec-websocket-accept") != want:
            raise AssertionError("101 with a wrong Sec-WebSocket-Accept: %r" % hdrs)
    return st, hdrs, body


def http_request(hub, method, path, body=None, key=None, headers=None, raw=None, timeout=10,
                 ssl_ctx=None):
    """One request over urllib. body: sent JSON-encoded; raw: bytes sent as
    they are; a POST with neither sends an empty body (Content-Length: 0, as
    urllib and curl -d '' do). Any body goes with Content-Type:
    application/json unless headers name one. key: an API key or token for
    `Authorization: Bearer`, or None (no header). Returns (status, headers
    with lower-case names, body bytes); 4xx/5xx answers are returned too."""
    hdrs = dict(headers or {})
    if key is not None:
        hdrs["Authorization"] = "Bearer " + key
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if method == "POST" and data is None:
        data = b""
    if data is not None:
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(hub.http_url(path), data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ssl_ctx) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def http_json(hub, method, path, body=None, key=None, headers=None, raw=None, timeout=10):
    """http_request(); returns (status, parsed JSON body, or the body text
    when it is not JSON)."""
    st, _, data = http_request(hub, method, path, body, key, headers, raw, timeout)
    text = data.decode(errors="replace")
    try:
        return st, json.loads(text)
    except ValueError:
        return st, text


def http_get(hub, path, ssl_ctx=None, timeout=5, headers=None):
    """GET over urllib. Returns (status, headers, body text)."""
    st, hdrs, data = http_request(hub, "GET", path, headers=headers, timeout=timeout, ssl_ctx=ssl_ctx)
    return st, hdrs, data.decode(errors="replace")


def api_keys_file(keys, prefix="iot-hub-keys-"):
    """Writes an --api-keys file into a fresh temp dir and returns its path.
    keys: {name: (key, scopes[, device patterns or None])}; the file holds
    each key's SHA-256, never the key."""
    entries = []
    for name, (key, scopes, *devices) in keys.items():
        e = {"name": name, "sha256": hashlib.sha256(key.encode()).hexdigest(), "scopes": scopes}
        if devices and devices[0] is not None:
            e["devices"] = devices[0]
        entries.append(e)
    return write_file(os.path.join(mkdtemp(prefix), "api-keys.json"), json.dumps(entries))


def parse_metrics(text):
    """Prometheus text -> {(name, ((label, value), ...)): float}."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)', line)
        if not m:
            raise AssertionError("unparsable metrics line: %r" % line)
        labels = tuple(sorted(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(3) or "")))
        out[(m.group(1), labels)] = float(m.group(4))
    return out


def metric_value(metrics, name, **labels):
    """Sum of the samples of `name` whose labels include `labels`; None if
    there is no such sample."""
    total, found = 0.0, False
    for (n, ls), v in metrics.items():
        if n != name:
            continue
        d = dict(ls)
        if all(d.get(k) == v2 for k, v2 in labels.items()):
            total += v
            found = True
    return total if found else None


# --------------------------------------------------------------------------
# WebSocket gateway client (python-websockets 10.4, asyncio)

def client_ssl_ctx(ca=None, cert=None, key=None):
    ctx = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


async def connect_gateway(hub, token, subprotocols=(SUBPROTOCOL,), path=GATEWAY_PATH,
                          ssl_ctx=None, headers=None, timeout=5, compression="deflate"):
    """Opens a gateway WebSocket. Returns a Gateway."""
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = "Bearer %s" % token
    kw = {}
    if ssl_ctx is not None:
        kw["ssl"] = ssl_ctx
    ws = await asyncio.wait_for(websockets.connect(
        hub.url(path), subprotocols=list(subprotocols) if subprotocols else None,
        extra_headers=hdrs, open_timeout=timeout, close_timeout=2, max_size=None,
        ping_interval=None, compression=compression, **kw), timeout + 1)
    return Gateway(ws)


async def recv_json(ws, timeout=5):
    """Next message as JSON; fails on timeout or close."""
    try:
        raw = await asyncio.wait_for(ws.recv(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError("no message from the hub within %.1fs" % timeout) from None
    except websockets.exceptions.ConnectionClosed:
        raise AssertionError("connection closed while waiting for a message: code=%s reason=%r"
                             % (ws.close_code, ws.close_reason)) from None
    if not isinstance(raw, str):
        raise AssertionError("hub sent a binary frame: %r" % raw[:100])
    try:
        return json.loads(raw)
    except ValueError:
        raise AssertionError("hub sent invalid JSON: %r" % raw[:300]) from None


class Gateway:
    """A connected gateway: sends messages and matches replies. Messages
    that arrive while waiting for something else are kept in self.pending."""

    def __init__(self, ws):
        self.ws = ws
        self.pending = []

    @property
    def subprotocol(self):
        return self.ws.subprotocol

    async def send(self, obj):
        try:
            await asyncio.wait_for(self.ws.send(obj if isinstance(obj, str) else json.dumps(obj)), 10)
        except websockets.exceptions.ConnectionClosed:
            raise AssertionError("connection closed by the hub before a send: code=%s reason=%r; "
                                 "messages received: %s" % (self.ws.close_code, self.ws.close_reason,
                                                            json.dumps(self.pending)[:1000])) from None
        except asyncio.TimeoutError:
            raise AssertionError("send blocked for 10 s (hub not reading?)") from None

    async def wait_for(self, pred, timeout=5, what="a matching message"):
        for i, m in enumerate(self.pending):
            if pred(m):
                return self.pending.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no %s within %.1fs; other messages: %s" % (
                    what, timeout, json.dumps(self.pending)[:1500]))
            try:
                m = await recv_json(self.ws, left)
            except AssertionError as e:
                if "no message" in str(e):
                    raise AssertionError("no %s within %.1fs; other messages: %s" % (
                        what, timeout, json.dumps(self.pending)[:1500])) from None
                raise AssertionError("%s (while waiting for %s; other messages: %s)" % (
                    e, what, json.dumps(self.pending)[:1500])) from None
            if pred(m):
                return m
            self.pending.append(m)

    async def collect(self, timeout):
        """Everything received within timeout (for 'nothing must arrive')."""
        got = list(self.pending)
        self.pending.clear()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return got
            try:
                raw = await asyncio.wait_for(self.ws.recv(), left)
            except asyncio.TimeoutError:
                return got
            except websockets.exceptions.ConnectionClosed:
                return got
            got.append(json.loads(raw) if isinstance(raw, str) else raw)

    async def announce(self, devices, timeout=5):
        """devices: (device, device_type[, labels]) tuples, or entries sent as
        they are (dicts, or anything else for malformed ones)."""
        ds = []
        for d in devices:
            if isinstance(d, tuple):
                e = {"device": d[0], "device_type": d[1]}
                if len(d) > 2:
                    e["labels"] = d[2]
                ds.append(e)
            else:  # a dict, or anything else for malformed entries
                ds.append(d)
        await self.send({"type": "announce", "devices": ds})
        return await self.wait_for(lambda m: m.get("type") == "announced", timeout, "announced reply")

    async def reply_for(self, seq, timeout=5):
        """The ack or error that names seq."""
        return await self.wait_for(
            lambda m: m.get("type") in ("ack", "error") and m.get("seq") == seq,
            timeout, "ack/error for seq %s" % seq)

    async def telemetry(self, seq, readings, timeout=5):
        """Sends one telemetry frame and returns the reply that names seq."""
        await self.send({"type": "telemetry", "seq": seq, "readings": readings})
        return await self.reply_for(seq, timeout)

    async def wait_closed(self, timeout=5):
        try:
            await asyncio.wait_for(self.ws.wait_closed(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError("connection not closed within %.1fs" % timeout) from None
        return self.ws.close_code

    async def close(self):
        try:
            await asyncio.wait_for(self.ws.close(), 5)
        except Exception:
            pass

    @property
    def close_code(self):
        return self.ws.close_code


class CommandResponder:
    """Serves a gateway's connection in a task: each message from the hub
    goes to on_message() (subclasses answer commands there with ack()).
    stop() ends the task; a closed connection ends it quietly."""

    def __init__(self, gw):
        self.gw = gw
        self.task = asyncio.get_running_loop().create_task(self._serve())

    async def ack(self, cid, status, **kw):
        await self.gw.ws.send(json.dumps(dict(type="command_ack", id=cid, status=status, **kw)))

    async def on_message(self, m):
        pass

    async def _serve(self):
        try:
            async for raw in self.gw.ws:
                await self.on_message(json.loads(raw))
        except websockets.exceptions.ConnectionClosed:
            pass

    async def stop(self):
        self.task.cancel()
        try:
            await self.task
        except (asyncio.CancelledError, Exception):
            pass


# --------------------------------------------------------------------------
# dashboard stream client (/v1/stream, docs/dashboard.md)

STREAM_PATH = "/v1/stream"
STREAM_PROTO = "iot-dashboard.v1"


class Dashboard(Gateway):
    """A dashboard WebSocket (python-websockets). Messages not asked for stay
    in self.pending (see Gateway)."""

    async def subscribe(self, sid, stream="raw", filter=None, since=None, group_by=None,
                        expect="subscribed", timeout=5, extra=None):
        msg = {"type": "subscribe", "id": sid, "stream": stream}
        if filter is not None:
            msg["filter"] = filter
        if since is not None:
            msg["since"] = since
        if group_by is not None:
            msg["group_by"] = group_by
        if extra:
            msg.update(extra)
        await self.send(msg)
        rep = await self.wait_for(lambda m: m.get("type") in ("subscribed", "error") and m.get("id") == sid,
                                  timeout, "subscribed/error for %r" % sid)
        if expect == "subscribed":
            if rep.get("type") != "subscribed":
                raise AssertionError("subscribe %s answered %s" % (json.dumps(msg), json.dumps(rep)))
        elif expect is not None:
            if (rep.get("type"), rep.get("code")) != ("error", expect):
                raise AssertionError("subscribe %s: expected error %s, got %s"
                                     % (json.dumps(msg), expect, json.dumps(rep)))
        return rep

    async def unsubscribe(self, sid, timeout=5):
        await self.send({"type": "unsubscribe", "id": sid})
        return await self.wait_for(lambda m: m.get("type") in ("unsubscribed", "error") and m.get("id") == sid,
                                   timeout, "unsubscribed/error for %r" % sid)

    async def auth(self, token, timeout=5):
        await self.send({"type": "auth", "token": token})
        return await self.wait_for(lambda m: m.get("type") in ("authenticated", "error"), timeout,
                                   "authenticated/error")

    async def _next(self, got, deadline, timeout, what, fail=True):
        """The next message received before deadline; past it, None when
        fail is false, else an AssertionError listing got."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                if not fail:
                    return None
                raise AssertionError("no %s within %.1fs; received meanwhile (%d): %s" % (
                    what, timeout, len(got), json.dumps(got[-20:])[:2000]))
            try:
                raw = await asyncio.wait_for(self.ws.recv(), left)
            except asyncio.TimeoutError:
                continue
            except websockets.exceptions.ConnectionClosed:
                raise AssertionError("connection closed (code=%s reason=%r) while waiting for %s; received: %s" % (
                    self.ws.close_code, self.ws.close_reason, what, json.dumps(got[-20:])[:2000])) from None
            return json.loads(raw)

    async def gather(self, done, timeout=5, what="the expected messages", fail=True):
        """Every message (pending first) until done(list so far) is true;
        all of them are consumed. fail=False returns what came by the deadline."""
        got = list(self.pending)
        self.pending.clear()
        deadline = time.monotonic() + timeout
        while not done(got):
            m = await self._next(got, deadline, timeout, what, fail)
            if m is None:
                return got
            got.append(m)
        return got

    async def until(self, pred, timeout=5, what="a matching message"):
        """Every message (pending first) up to and including the first one
        matching pred; all of them are consumed."""
        got = []
        while self.pending:
            m = self.pending.pop(0)
            got.append(m)
            if pred(m):
                return got
        deadline = time.monotonic() + timeout
        while True:
            m = await self._next(got, deadline, timeout, what)
            got.append(m)
            if pred(m):
                return got


async def connect_dashboard(hub, token=None, timeout=5, compression="deflate"):
    """Opens a dashboard stream WebSocket (token: API key or JWT for the
    upgrade's Authorization header, or None). Returns a Dashboard."""
    hdrs = {}
    if token is not None:
        hdrs["Authorization"] = "Bearer %s" % token
    ws = await asyncio.wait_for(websockets.connect(
        hub.url(STREAM_PATH), subprotocols=[STREAM_PROTO], extra_headers=hdrs,
        open_timeout=timeout, close_timeout=2, max_size=None, ping_interval=None,
        compression=compression), timeout + 1)
    return Dashboard(ws)


def reading(device, temperature=21.5, ts="now", **data):
    """A thermostat reading; ts="now" stamps now_ms(), ts=None omits it."""
    r = {"device": device, "data": dict(temperature=temperature, **data)}
    if temperature is None:
        del r["data"]["temperature"]
    if ts == "now":
        r["ts"] = now_ms()
    elif ts is not None:
        r["ts"] = ts
    return r


# --------------------------------------------------------------------------
# test case base

class HubTestCase(unittest.IsolatedAsyncioTestCase):
    """Base class: checks the binaries, makes a temp dir with an HS256 secret
    (cls.secret / cls.secret_file), and gives start_redis / start_hub that
    clean up after themselves. Hubs started with start_hub(shared=True) in
    setUpClass are checked (alive, no sanitizer report) after every test."""

    _shared_hubs = ()

    @classmethod
    def setUpClass(cls):
        require_hub()
        cls.tmp = mkdtemp()
        cls.secret = hashlib.sha256(os.urandom(32)).hexdigest().encode()
        cls.secret_file = write_file(os.path.join(cls.tmp, "hs256.secret"), cls.secret)
        cls._class_cleanups_list = []
        cls._shared_hubs = []

    @classmethod
    def tearDownClass(cls):
        errors = []
        for fn in reversed(cls._class_cleanups_list):
            try:
                fn()
            except Exception as e:
                errors.append(e)
        rmtree(cls.tmp)
        if errors:
            raise errors[0]

    @classmethod
    def class_redis(cls):
        r = new_redis()
        cls._class_cleanups_list.append(r.stop)
        return r

    @classmethod
    def class_hub(cls, redis, extra=(), **kw):
        """A hub shared by the class's tests; stopped (exit 0 asserted) in
        tearDownClass."""
        key = kw.pop("jwt_key_file", cls.secret_file)
        schemas = kw.pop("schemas", SCHEMAS_DIR)
        alg = kw.pop("alg", "HS256")
        h = Hub(hub_args(redis, key, schemas=schemas, alg=alg, extra=extra), **kw)

        def stop():
            try:
                h.stop()
            finally:
                h.cleanup()
        cls._class_cleanups_list.append(stop)
        cls._shared_hubs.append(h)
        return h

    @classmethod
    def class_cluster(cls, **kw):
        c = RedisCluster(**kw)
        cls._class_cleanups_list.append(c.stop)
        return c

    def start_cluster(self, **kw):
        c = RedisCluster(**kw)
        self.addCleanup(c.stop)
        return c

    def start_redis(self, extra=()):
        r = new_redis(extra=extra)
        self.addCleanup(r.stop)
        return r

    def start_hub(self, redis, extra=(), args=None, **kw):
        """A hub for this test only; killed at cleanup (call .stop() in the
        test to assert a clean exit)."""
        key = kw.pop("jwt_key_file", self.secret_file)
        schemas = kw.pop("schemas", SCHEMAS_DIR)
        alg = kw.pop("alg", "HS256")
        if args is None:
            args = hub_args(redis, key, schemas=schemas, alg=alg, extra=extra)
        h = Hub(args, **kw)
        self.addCleanup(h.cleanup)
        self.addCleanup(h.check_sanitizers)
        return h

    async def gw_dev(self, hub):
        """A fresh gateway with one thermostat announced. -> (gw, device)"""
        gw = await self.gateway(hub)
        d = uniq("t")
        rep = await gw.announce([(d, "thermostat")])
        self.assertEqual(rep.get("accepted"), [d], rep)
        return gw, d

    def assert_unavailable(self, m, seq):
        """m is the `unavailable` answer to frame seq, with a retry hint."""
        self.assertEqual((m.get("type"), m.get("code"), m.get("seq")), ("error", "unavailable", seq), m)
        ra = m.get("retry_after_ms")
        self.assertTrue(isinstance(ra, int) and ra > 0, "unavailable without retry_after_ms: %r" % m)

    async def resend_until_acked(self, gw, seq, readings, timeout=15):
        """Sends frame seq again, as a gateway does, until it is acked;
        every other answer must be `unavailable`. -> the ack."""
        deadline = time.monotonic() + timeout
        while True:
            rep = await gw.telemetry(seq, readings, timeout=min(5, max(1, deadline - time.monotonic())))
            if rep.get("type") == "ack":
                return rep
            self.assert_unavailable(rep, seq)
            if time.monotonic() > deadline:
                raise AssertionError("seq %d still unavailable after %ss" % (seq, timeout))
            await asyncio.sleep(0.05)

    def token(self, sub, devices=("t-*",), ttl=600, secret=None, **extra):
        return hs256(gw_claims(sub, devices, ttl, **extra), secret or self.secret)

    async def gateway(self, hub, sub=None, devices=("t-*",), token=None, **kw):
        """Connects a gateway (fresh sub unless given). Closed at cleanup."""
        sub = sub or uniq("gw")
        gw = await connect_gateway(hub, token or self.token(sub, devices), **kw)
        gw.sub = sub
        self.addAsyncCleanup(gw.close)
        return gw

    async def asyncSetUp(self):
        # IsolatedAsyncioTestCase runs the loop in debug mode: do not log
        # every blocking helper call (Redis, subprocess) as a slow callback.
        asyncio.get_running_loop().slow_callback_duration = 10

    async def asyncTearDown(self):
        for h in self._shared_hubs:
            h.check_alive()


def main():
    if websockets is None:
        sys.stderr.write("python3-websockets missing: run with /usr/bin/python3\n")
        sys.exit(2)
    unittest.main(verbosity=2)
