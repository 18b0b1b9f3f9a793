"""The Redis scripts of hub/lua/, each alone against a real redis-server:
every script is read from the source tree (its `--#include` libraries
expanded as cmake/embed.cmake does), called with EVAL and the KEYS the hub
builds (spelled here from docs/streams.md, independently of hub/keys.h),
and checked against the contract at the top of its file: what it writes,
what it publishes, its reply, and the errors it returns for a call whose
KEYS and ARGV do not match. Plus the rules every script keeps: a contract
header, no key name built inside, registered by the hub."""

import functools
import glob
import os
import re
import socket
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import SOURCE_DIR, Redis, RedisError, Resp, crc16, key_slot, rkeys  # noqa: E402

LUA_DIR = os.path.join(SOURCE_DIR, "hub", "lua")
CH_PRESENCE = "iot:live:presence"
CH_DEVTAKE = "iot:ctl:devtake:"
CH_COMMANDS = "iot:live:commands"
LEASES = rkeys.LEASES
EPOCH = rkeys.EPOCH
LAYOUT = rkeys.LAYOUT
ACTIVE = rkeys.ACTIVE
RUN = "hub-a:0123456789ab"          # a run id: <instance>:<12 hex digits>
OTHER_RUN = "hub-b:ba9876543210"

# Key layout 3 promises that these scripts touch keys of one hash slot only
# in every call (a Redis Cluster can run them): run_script checks each call.
# The others still cross slots in some calls (docs/streams.md, "The
# scripts", column "slots"): a cluster refuses layout 3 until none does.
CROSS_SLOT = {
    "store",          # ingest: the feed beside gateway and device keys
    "announce",       # several devices (the hub calls it per slot on a cluster)
    "detach",         # several devices (per slot on a cluster: announce's reply)
    "offline",        # several devices (per slot on a cluster)
    "seen",           # several devices (the hub calls it per slot on a cluster)
    "lease_release",  # on one Redis the run's sets beside iot:{hub}:leases (none on a cluster)
    "reap",           # several devices (a batch is of one slot on a cluster)
    "layout",         # iot:{hub}:layout beside the layout-2 names it looks for
    "cmd_owed",       # several devices (the hub calls it per device on a cluster)
    "cmd_devices",    # commands of several devices (a rollout's)
    "cmd_due",        # several slots' timers: the sweep on one Redis only
    "rollout_create", "rollout_step", "rollout_get",  # every device of a rollout
}


def k_limits(gw):
    return "iot:gw:{%s}:limits" % gw


def k_cmd(cid):
    return rkeys.cmd(cid)


def k_cmd_log(cid):
    return rkeys.cmd_log(cid)


def k_rollout(rid):
    return rkeys.rollout(rid)


def k_rollout_cmds(rid):
    return rkeys.rollout_cmds(rid)


def k_run(run, device):
    """run's slot-local set of device's slot."""
    return rkeys.run_set(run, device)


def k_reaper(run):
    return "iot:{hub}:reaper:%s" % run


_CRC_TABLE = []
for _i in range(256):
    _c = _i << 8
    for _ in range(8):
        _c = ((_c << 1) ^ 0x1021) & 0xffff if _c & 0x8000 else (_c << 1) & 0xffff
    _CRC_TABLE.append(_c)


def _crc_more(c, data):
    for x in data:
        c = ((c << 8) & 0xffff) ^ _CRC_TABLE[((c >> 8) ^ x) & 0xff]
    return c


def fit_id(prefix28, device):
    """A command id c_<28 hex><4 hex> in device's slot, as hub_slot_fit_id
    draws it (the last 4 hex digits chosen): its keys iot:cmd:{<id>} share
    the device's slot. None when no 4 digits do (about 2% of prefixes)."""
    want = crc16(device.encode()) % 16384
    head = ("c_" + prefix28).encode()
    assert len(head) == 30, head
    c0 = _crc_more(0, head)
    for n in range(65536):
        tail = b"%04x" % n
        if _crc_more(c0, tail) % 16384 == want:
            return (head + tail).decode()
    return None


@functools.lru_cache(maxsize=None)
def cid(device, n, salt="0"):
    """The n-th test command id of device (in its slot)."""
    for i in range(16):
        c = fit_id("%06d" % n + salt * 21 + "%x" % i, device)
        if c:
            return c
    raise AssertionError("no id in %s's slot" % device)


def group(cid, dev):
    """A command's KEYS group (hub/lua/_command.lua): the command, its
    history, its slot's timers, then its device's hash and queue."""
    return [k_cmd(cid), k_cmd_log(cid), rkeys.timers(cid)] + ([rkeys.dev(dev), rkeys.cmds(dev)] if dev else [])


def members(keyfn, devices):
    """The union of the slot-local index sets keyfn(device) of devices."""
    out = set()
    for k in {keyfn(d) for d in devices}:
        out |= set(Lua.redis.cmd("SMEMBERS", k))
    return sorted(out)


def script_text(name):
    """hub/lua/<name>.lua with its libraries in place (cmake/embed.cmake)."""
    with open(os.path.join(LUA_DIR, name + ".lua")) as f:
        text = f.read()
    for lib in re.findall(r"^--#include (\S+)\n", text, re.M):
        with open(os.path.join(LUA_DIR, lib)) as f:
            text = text.replace("--#include %s\n" % lib, f.read())
    return text


def code_of(text):
    """A script without its comments (what runs)."""
    return re.sub(r"--[^\n]*", "", text)


class Sub:
    """A subscriber on its own connection: the messages published while it
    listens, read until the line is quiet for `wait` seconds."""

    def __init__(self, port, *channels):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=2)
        self.buf = b""
        self.sock.sendall(Resp.encode(("SUBSCRIBE",) + channels))
        while len(self._parse()) < len(channels):
            self.buf += self.sock.recv(65536)
        self.buf = b""

    def _parse(self):
        """Complete pushes in buf: [[kind, channel, payload]] (bulk strings)."""
        out, pos = [], 0
        while True:
            m = re.match(rb"\*(\d+)\r\n", self.buf[pos:])
            if not m:
                return out
            p, items = pos + m.end(), []
            for _ in range(int(m.group(1))):
                h = re.match(rb"([$:])(-?\d+)\r\n", self.buf[p:])
                if not h:
                    return out
                p += h.end()
                if h.group(1) == b":":
                    items.append(int(h.group(2)))
                    continue
                n = int(h.group(2))
                if len(self.buf) < p + n + 2:
                    return out
                items.append(self.buf[p:p + n].decode())
                p += n + 2
            out.append(items)
            pos = p

    def messages(self, wait=0.3):
        self.sock.settimeout(wait)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                self.buf += data
        except socket.timeout:
            pass
        out = [(m[1], m[2]) for m in self._parse() if m[0] == "message"]
        self.buf = b""
        return out

    def close(self):
        self.sock.close()


class Lua(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.redis = Redis()

    @classmethod
    def tearDownClass(cls):
        cls.redis.stop()

    def setUp(self):
        self.r = self.redis
        self.r.cmd("FLUSHALL")

    def run_script(self, name, keys, argv):
        slots = {key_slot(k) for k in keys}
        if name not in CROSS_SLOT:
            self.assertLessEqual(len(slots), 1, "%s crosses slots: %s" % (name, keys))
        return self.r.cmd("EVAL", script_text(name), len(keys), *keys, *argv)

    def assert_refused(self, name, keys, argv, message):
        """The script answers an error naming message, and writes nothing."""
        before = self.r.cmd("DBSIZE")
        with self.assertRaises(RedisError) as e:
            self.run_script(name, keys, argv)
        self.assertIn(message, str(e.exception))
        self.assertEqual(self.r.cmd("DBSIZE"), before)

    def subscribe(self, *channels):
        s = Sub(self.r.port, *channels)
        self.addCleanup(s.close)
        return s

    # ---- the rules ---------------------------------------------------------

    def test_every_script_has_a_contract_and_builds_no_key(self):
        names = sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(LUA_DIR, "*.lua")))
        scripts = [n for n in names if not n.startswith("_")]
        self.assertGreaterEqual(len(scripts), 24, names)
        for n in scripts:
            with open(os.path.join(LUA_DIR, n + ".lua")) as f:
                raw = f.read()
            head = re.match(r"((?:--[^\n]*\n)+)", raw)
            self.assertIsNotNone(head, "%s.lua does not open with its contract" % n)
            head = head.group(1)
            self.assertTrue(head.startswith("-- %s: " % n), "%s.lua: contract names the script" % n)
            for word in ("KEYS", "ARGV", "Reply", "Errors"):
                self.assertIn(word, head, "%s.lua: the contract says nothing of %s" % (n, word))
            code = code_of(script_text(n))
            self.assertNotRegex(code, r"['\"]iot:", "%s.lua builds a key or channel name" % n)
            self.assertNotRegex(code.replace(" ", ""), r"['\"]\{['\"]\.\.", "%s.lua builds a braced name" % n)

    def test_every_script_is_registered_by_the_hub(self):
        src = ""
        for pat in ("hub/*.c", "commands/*.c", "protocols/*.c"):
            for p in glob.glob(os.path.join(SOURCE_DIR, pat)):
                with open(p) as f:
                    src += f.read()
        for p in glob.glob(os.path.join(LUA_DIR, "[a-z]*.lua")):
            n = os.path.basename(p)[:-4]
            self.assertRegex(src, r"\bhub_lua_%s\b" % n, "%s.lua is not used by the hub" % n)

    # ---- the store -----------------------------------------------------------

    def store_call(self, frames, window=4096, dmax=1000, fmax=1000, anomalies=None):
        """frames: [(gateway, seq, [(device, ts, data)], [(type, from, to)], lines)];
        anomalies: per frame, {reading index (1-based): flags JSON}."""
        keys, argv = [rkeys.FEED], [window, dmax, fmax, len(frames), "PUBLISH", ""]
        for f, (gw, seq, readings, groups, lines) in enumerate(frames):
            keys.append(rkeys.gw_seqs(gw))
            keys += [rkeys.tm(d) for d, _, _ in readings]
            argv += [seq, gw, lines, len(readings)]
            for _, ts, data in readings:
                argv += [ts, data]
            argv.append(len(groups))
            for t, a, b in groups:
                argv += ["iot:live:raw:" + t, a, b]
            flags = (anomalies or {}).get(f, {})
            argv.append(len(flags))
            for i, v in sorted(flags.items()):
                argv += [i, v]
        return keys, argv

    def test_store(self):
        sub = self.subscribe("iot:live:raw:thermostat")
        lines = "d1\tthermostat\t{}\tX\nd2\tthermostat\t{}\tY\n"
        f1 = ("g1", 7, [("d1", "1000", '{"t":1}'), ("d2", "1001", '{"t":2}')],
              [("thermostat", 1, len(lines))], lines)
        f2 = ("g2", 64, [("d1", "1002", '{"t":3}')], [], "d1\tthermostat\t{}\tZ\n")
        resend = ("g1", 7, [("d1", "1000", '{"t":1}')], [], "again")
        keys, argv = self.store_call([f1, f2, resend])
        out = self.run_script("store", keys, argv)
        self.assertEqual([o[0] for o in out], [1, 1, 0])
        self.assertEqual(len(out[2]), 1)
        self.assertRegex(out[0][1], r"^\d+-\d+$")
        self.assertEqual([e[1]["data"] for e in self.r.xrange(rkeys.tm("d1"))],
                         ['{"t":1}', '{"t":3}'])
        tm2 = self.r.xrange(rkeys.tm("d2"))
        self.assertEqual(tm2[0][1], {"ts": "1001", "data": '{"t":2}', "gw": "g1", "seq": "7"})
        feed = self.r.xrange(rkeys.FEED)
        self.assertEqual([(e[0], e[1]["gw"], e[1]["seq"]) for e in feed],
                         [(out[0][1], "g1", "7"), (out[1][1], "g2", "64")])
        self.assertEqual(feed[0][1]["readings"], lines)
        self.assertEqual(self.r.cmd("ZRANGE", rkeys.gw_seqs("g1"), 0, -1), ["7"])
        self.assertGreater(self.r.cmd("TTL", rkeys.gw_seqs("g2")), 0)
        self.assertEqual(sub.messages(), [("iot:live:raw:thermostat", out[0][1] + "\n" + lines)])
        # A resend of a stored seq in a later batch: {0}, nothing stored.
        keys, argv = self.store_call([f1])
        self.assertEqual(self.run_script("store", keys, argv), [[0]])
        self.assertEqual(self.r.xlen(rkeys.tm("d2")), 1)
        # No feed: '0-0', the readings stored all the same.
        keys, argv = self.store_call([("g3", 1, [("d3", "5", "{}")], [], "l")], fmax=0)
        self.assertEqual(self.run_script("store", keys, argv), [[1, "0-0"]])
        self.assertEqual(self.r.xlen(rkeys.tm("d3")), 1)
        self.assertEqual(self.r.xlen(rkeys.FEED), 2)

    def test_store_keeps_anomaly_flags(self):
        # The second reading of the frame carries flags: stored as 'anom'
        # on its device stream entry; the first has none.
        flags = '[{"field":"t","kind":"spike","score":7}]'
        f1 = ("g9", 1, [("d9", "1000", '{"t":1}'), ("d9", "1001", '{"t":99}')], [], "l\n")
        keys, argv = self.store_call([f1], anomalies={0: {2: flags}})
        self.assertEqual(self.run_script("store", keys, argv)[0][0], 1)
        entries = [e[1] for e in self.r.xrange(rkeys.tm("d9"))]
        self.assertNotIn("anom", entries[0])
        self.assertEqual(entries[1]["anom"], flags)
        self.assertEqual(entries[1]["data"], '{"t":99}')
        # An anomaly section that does not add up is refused, nothing written.
        bad = argv[:-1]
        self.assert_refused("store", keys, bad, "store: KEYS and ARGV do not match")

    def test_store_trims_the_window(self):
        for seq in range(1, 65):
            keys, argv = self.store_call([("g", seq, [], [], "")], window=10)
            self.run_script("store", keys, argv)
        self.assertEqual(self.r.cmd("ZCARD", rkeys.gw_seqs("g")), 10)

    def test_store_refuses_a_malformed_call(self):
        keys, argv = self.store_call([("g1", 1, [("d1", "1", "{}"), ("d2", "1", "{}")], [], "")])
        msg = "store: KEYS and ARGV do not match"
        self.assert_refused("store", keys[:-1], argv, msg)       # a reading's key missing
        self.assert_refused("store", keys + ["x"], argv, msg)    # one key too many
        self.assert_refused("store", keys, argv[:-1], msg)       # ARGV cut short
        bad = list(argv)
        bad[3] = 2                                               # two frames announced
        self.assert_refused("store", keys, bad, msg)
        bad[3] = "x"
        self.assert_refused("store", keys, bad, msg)
        bad = list(argv)
        bad[4] = "EVAL"                                          # not a publish command
        self.assert_refused("store", keys, bad, msg)

    # ---- gateways: connect, limits, epoch ------------------------------------

    def test_connect(self):
        keys = [rkeys.gw_epoch("g"), k_limits("g")]
        now = int(time.time() * 1000)
        self.r.cmd("HSET", k_limits("g"), "telemetry", now + 50, "ack", now + 70)
        first = self.run_script("connect", keys, [now, 1, 1])
        self.assertEqual(first, [1, 1, 0, str(now + 50), "0", str(now + 70)])
        second = self.run_script("connect", keys, [now, 1, 1])
        self.assertEqual(second[:2], [2, 0])
        self.assertGreater(second[2], 0)
        self.assertEqual(self.run_script("connect", keys, [now, 0, 0])[:3], [3, 1, 0])
        self.assertGreater(self.r.cmd("PTTL", k_limits("g")), 0)
        self.assert_refused("connect", keys, [now, "x", 1], "connect: bad arguments")

    def test_limits_keep_the_later_tat(self):
        now = int(time.time() * 1000)
        lk = [k_limits("g")]
        self.assertEqual(self.run_script("limits", lk, [now, now + 500, 0, now + 100]), 1)
        self.run_script("limits", lk, [now, now + 200, now + 300, 0])
        self.assertEqual(self.r.hgetall(k_limits("g")),
                         {"telemetry": str(now + 500), "announce": str(now + 300),
                          "ack": str(now + 100)})
        self.assertGreater(self.r.cmd("PTTL", k_limits("g")), 60000)
        self.assert_refused("limits", lk, ["soon", 1, 1, 1], "limits: bad arguments")

    def test_epoch_floor_only_raises(self):
        k = [rkeys.gw_epoch("g")]
        self.assertEqual(self.run_script("epoch_floor", k, [5]), 1)
        self.assertEqual(self.run_script("epoch_floor", k, [3]), 0)
        self.assertEqual(self.r.cmd("GET", rkeys.gw_epoch("g")), "5")
        self.assert_refused("epoch_floor", k, ["x"], "epoch_floor: bad arguments")

    # ---- the registry ----------------------------------------------------------

    def announce(self, conn, devices, mode="", run=None, gw="g1", inst="hub-a"):
        run = run or conn.rsplit(":", 1)[0]
        keys = []
        argv = [gw, conn, run, inst, 1000, mode, CH_PRESENCE, CH_DEVTAKE]
        for d, t, labels in devices:
            keys += [rkeys.dev(d), rkeys.type_of(t, d), rkeys.devices(d), k_run(run, d)]
            argv += [d, t, labels]
        return self.run_script("announce", keys, argv)

    def test_announce(self):
        sub = self.subscribe(CH_PRESENCE, CH_DEVTAKE)
        c1 = RUN + ":1"
        self.r.cmd("HSET", rkeys.dev("d2"), "rl", "777")
        out = self.announce(c1, [("d1", "thermostat", "{}"), ("d2", "thermostat", '{"a":1}')])
        self.assertEqual(out, [["0", "777"], []])
        h = self.r.hgetall(rkeys.dev("d1"))
        self.assertEqual((h["conn"], h["online"], h["gateway"], h["instance"], h["type"]),
                         (c1, "1", "g1", "hub-a", "thermostat"))
        # each device in its own slot's indexes and its slot's run set
        for d in ("d1", "d2"):
            self.assertEqual(self.r.cmd("SMEMBERS", k_run(RUN, d)), [d], d)
            self.assertEqual(self.r.cmd("SISMEMBER", rkeys.devices(d), d), 1, d)
            self.assertEqual(self.r.cmd("SISMEMBER", rkeys.type_of("thermostat", d), d), 1, d)
        self.assertEqual(members(rkeys.devices, ["d1", "d2"]), ["d1", "d2"])
        msgs = sub.messages()
        self.assertEqual(len(msgs), 1)
        self.assertEqual(msgs[0][0], CH_PRESENCE)
        self.assertIn('"device":"d1","online":true,"at":1000,"gateway":"g1"', msgs[0][1])
        # The same again: nothing changed, no presence.
        self.announce(c1, [("d1", "thermostat", "{}")])
        self.assertEqual(sub.messages(), [])
        # Another run's connection takes d1 with another type: it is named
        # on the takeover channel and in `moved` (old type, old connection).
        c2 = OTHER_RUN + ":5"
        out = self.announce(c2, [("d1", "power-meter", "{}")], inst="hub-b")
        self.assertEqual(out, [["0"], ["d1", "thermostat", c1]])
        self.assertEqual(self.r.cmd("SISMEMBER", rkeys.type_of("power-meter", "d1"), "d1"), 1)
        msgs = dict(sub.messages())
        self.assertEqual(msgs.get(CH_DEVTAKE), "d1 %s\n" % c2)
        self.assertIn("power-meter", msgs.get(CH_PRESENCE, ""))
        # Mode rebuild leaves alone a device another connection holds online.
        out = self.announce(c1, [("d1", "thermostat", "{}"), ("d3", "thermostat", "{}")],
                            mode="rebuild")
        self.assertEqual(out[0], ["-1", "0"])
        self.assertEqual(self.r.cmd("HGET", rkeys.dev("d1"), "conn"), c2)

    def test_announce_refuses_a_malformed_call(self):
        msg = "announce: KEYS and ARGV do not match"
        keys = [rkeys.dev("d1"), rkeys.type_of("thermostat", "d1"), rkeys.devices("d1")]
        argv = ["g1", RUN + ":1", RUN, "hub-a", 1000, "", CH_PRESENCE, CH_DEVTAKE,
                "d1", "thermostat", "{}"]
        self.assert_refused("announce", keys, argv, msg)
        self.assert_refused("announce", keys + [k_run(RUN, "d1")], argv[:-1], msg)

    def test_detach(self):
        self.r.cmd("HSET", rkeys.dev("d1"), "type", "power-meter", "conn", RUN + ":2")
        self.r.cmd("SADD", rkeys.type_of("thermostat", "d1"), "d1")
        self.r.cmd("SADD", rkeys.type_of("power-meter", "d1"), "d1")
        self.r.cmd("SADD", k_run(RUN, "d1"), "d1")
        self.r.cmd("SADD", k_run(OTHER_RUN, "d1"), "d1")
        keys = [rkeys.dev("d1"), rkeys.type_of("thermostat", "d1"),
                rkeys.dev("d1"), rkeys.type_of("power-meter", "d1"),
                rkeys.dev("d1"), k_run(OTHER_RUN, "d1"), rkeys.dev("d1"), k_run(RUN, "d1")]
        argv = ["d1", "type", "thermostat", "d1", "type", "power-meter",
                "d1", "run", OTHER_RUN, "d1", "run", RUN]
        self.assertEqual(self.run_script("detach", keys, argv), 2)
        self.assertEqual(self.r.cmd("SISMEMBER", rkeys.type_of("thermostat", "d1"), "d1"), 0)
        self.assertEqual(self.r.cmd("SISMEMBER", rkeys.type_of("power-meter", "d1"), "d1"), 1)
        self.assertEqual(self.r.cmd("SISMEMBER", k_run(OTHER_RUN, "d1"), "d1"), 0)
        self.assertEqual(self.r.cmd("SISMEMBER", k_run(RUN, "d1"), "d1"), 1)
        self.assert_refused("detach", keys[:2], argv[:3] + ["x"], "detach: KEYS and ARGV do not match")
        self.assert_refused("detach", keys[:2], ["d1", "owner", "x"], "detach: how is 'type' or 'run'")

    def test_offline(self):
        sub = self.subscribe(CH_PRESENCE)
        c1, c2 = RUN + ":1", RUN + ":2"
        self.announce(c1, [("d1", "thermostat", "{}"), ("d2", "thermostat", "{}")])
        self.announce(c2, [("d2", "thermostat", "{}")])
        sub.messages()
        out = self.run_script("offline", [rkeys.dev("d1"), k_run(RUN, "d1"),
                                          rkeys.dev("d2"), k_run(RUN, "d2")],
                              [c1, 2000, CH_PRESENCE, "d1", 5000, "d2", 6000])
        self.assertEqual(out, 1)
        self.assertEqual(self.r.cmd("HMGET", rkeys.dev("d1"), "online", "last_seen", "rl"),
                         ["0", "2000", "5000"])
        self.assertEqual(self.r.cmd("HMGET", rkeys.dev("d2"), "online", "conn", "rl"),
                         ["1", c2, "6000"])
        self.assertEqual(self.r.cmd("EXISTS", k_run(RUN, "d1")), 0)
        self.assertEqual(self.r.cmd("SMEMBERS", k_run(RUN, "d2")), ["d2"])
        msgs = sub.messages()
        self.assertEqual(len(msgs), 1)
        self.assertIn('"device":"d1","online":false,"at":2000', msgs[0][1])
        self.assertNotIn('"device":"d2"', msgs[0][1])
        self.assert_refused("offline", [rkeys.dev("d1")], [c1, 1, CH_PRESENCE, "d1", 1],
                            "offline: KEYS and ARGV do not match")

    def test_seen(self):
        self.r.cmd("HSET", rkeys.dev("d1"), "conn", "c1", "rl", "10")
        self.r.cmd("HSET", rkeys.dev("d2"), "conn", "c9")
        keys = [rkeys.dev("d1"), rkeys.dev("d2"), rkeys.dev("gone")]
        out = self.run_script("seen", keys, [3000, "c1", 20, "c1", 30, "c1", 40])
        self.assertEqual(out, [1])
        self.assertEqual(self.r.cmd("HMGET", rkeys.dev("d1"), "last_seen", "rl"), ["3000", "20"])
        self.assertEqual(self.r.cmd("HGET", rkeys.dev("d2"), "last_seen"), None)
        self.assertEqual(self.r.cmd("EXISTS", rkeys.dev("gone")), 0)
        self.assert_refused("seen", keys, [3000, "c1", 20], "seen: KEYS and ARGV do not match")

    # ---- leases ------------------------------------------------------------------

    def renew(self, run, first="0", ttl=10000):
        return self.run_script("lease_renew", [LEASES, EPOCH, LAYOUT, k_reaper(run)],
                               [run.rsplit(":", 1)[0], run, ttl, first, "cafe", rkeys.VERSION])

    def test_lease_renew(self):
        self.r.cmd("ZADD", LEASES, 5, "hub-a:00000000000a", 5, "hub-c:00000000000c")
        out = self.renew(RUN, first="1")
        self.assertEqual(out[:4], ["cafe", 0, 0, 2])
        self.assertEqual(out[4], ["hub-a:00000000000a", "hub-c:00000000000c"])
        self.assertEqual(out[5], 0)
        self.assertEqual(self.r.cmd("GET", LAYOUT), rkeys.VERSION)
        # The restarted instance's earlier run ended now (score 0).
        self.assertEqual(self.r.cmd("ZSCORE", LEASES, "hub-a:00000000000a"), "0")
        self.assertGreater(float(self.r.cmd("ZSCORE", LEASES, RUN)), time.time() * 1000)
        self.r.cmd("SET", EPOCH, "beef")
        self.assertEqual(self.renew(RUN)[:3], ["beef", 1, 0])
        # Another run reaping this one: said, so that it waits to re-announce.
        self.r.cmd("SET", k_reaper(RUN), OTHER_RUN)
        self.assertEqual(self.renew(RUN)[5], 1)
        self.assert_refused("lease_renew", [LEASES, EPOCH, LAYOUT, k_reaper(RUN)],
                            ["hub-a", RUN, "x", "0", "c", rkeys.VERSION], "lease_renew: bad arguments")

    def test_slots_mark(self):
        keys = [rkeys.SLOTS, rkeys.runslots(RUN)]
        self.assertEqual(self.run_script("slots_mark", keys, [0, 9, 16383]), 3)
        self.assertEqual(rkeys.run_slots(self.r, RUN), [0, 9, 16383])
        self.assertEqual([self.r.cmd("GETBIT", rkeys.SLOTS, s) for s in (0, 1, 9, 16383)], [1, 0, 1, 1])
        self.assert_refused("slots_mark", keys, [3, 16384], "slots_mark: bad arguments")

    def release(self, devices=(), held=0):
        slots = sorted({key_slot(rkeys.dev(d)) for d in devices})
        keys = [LEASES, rkeys.runslots(RUN)] + [rkeys.run_set_of_slot(RUN, s) for s in slots]
        return self.run_script("lease_release", keys, [RUN, held])

    def test_lease_release(self):
        self.renew(RUN)
        self.r.cmd("SETBIT", rkeys.runslots(RUN), key_slot(rkeys.dev("d1")), 1)
        self.assertEqual(self.release(["d1"]), 1)
        self.assertIsNone(self.r.cmd("ZSCORE", LEASES, RUN))
        self.assertEqual(self.r.cmd("EXISTS", rkeys.runslots(RUN)), 0)
        # a set that holds a device: the lease stays, expired, for a reaper
        self.renew(RUN)
        self.r.cmd("SETBIT", rkeys.runslots(RUN), key_slot(rkeys.dev("d1")), 1)
        self.r.cmd("SADD", k_run(RUN, "d1"), "d1")
        self.assertEqual(self.release(["d1"]), 0)
        self.assertEqual(self.r.cmd("ZSCORE", LEASES, RUN), "0")
        self.assertEqual(self.r.cmd("EXISTS", rkeys.runslots(RUN)), 1)
        # on a cluster the caller counted the sets that hold devices
        self.r.cmd("SREM", k_run(RUN, "d1"), "d1")
        self.renew(RUN)
        self.assertEqual(self.release([], held=1), 0)
        self.assertEqual(self.r.cmd("ZSCORE", LEASES, RUN), "0")
        self.assertEqual(self.release([], held=0), 1)

    def claim(self, me=OTHER_RUN, dead=RUN, bits="1"):
        return self.run_script("reap_claim", [LEASES, k_reaper(dead), rkeys.runslots(dead)],
                               [me, dead, 5000, bits])

    def reap(self, devices, dead=RUN):
        keys = []
        for d in devices:
            keys += [rkeys.dev(d), k_run(dead, d)]
        return self.run_script("reap", keys, [dead, CH_PRESENCE] + list(devices))

    def test_reap(self):
        sub = self.subscribe(CH_PRESENCE)
        self.announce(RUN + ":1", [("d1", "thermostat", "{}"), ("d2", "thermostat", "{}"),
                                   ("d3", "thermostat", "{}")])
        self.announce(OTHER_RUN + ":1", [("d2", "thermostat", "{}")])
        for d in ("d1", "d2", "d3"):
            self.r.cmd("SETBIT", rkeys.runslots(RUN), key_slot(rkeys.dev(d)), 1)
        sub.messages()
        # the claim: only for an expired lease, one reaper, never oneself
        self.renew(RUN)
        self.assertEqual(self.claim(), [0, "live"])
        self.r.cmd("ZADD", LEASES, 0, RUN)
        self.r.cmd("SET", k_reaper(RUN), "hub-z:000000000000")
        self.assertEqual(self.claim(), [0, "claimed"])
        self.r.cmd("DEL", k_reaper(RUN))
        self.assertEqual(self.claim(me=RUN), [0, "self"])
        out = self.claim()
        self.assertEqual(out[0], 1)
        self.assertEqual(self.r.cmd("GET", k_reaper(RUN)), OTHER_RUN)
        self.assertGreater(self.r.cmd("PTTL", k_reaper(RUN)), 0)
        self.assertEqual(self.claim(bits="0"), [1, ""])
        self.assertEqual(rkeys.run_members(self.r, RUN), ["d1", "d2", "d3"])
        # a batch of a slot's devices: d1 offline, d2 (taken) only leaves the set
        self.assertEqual(self.reap(["d1"]), 1)
        self.assertEqual(self.reap(["d2"]), 0)
        self.assertEqual(self.r.cmd("HGET", rkeys.dev("d1"), "online"), "0")
        self.assertEqual(self.r.cmd("HMGET", rkeys.dev("d2"), "online", "conn"),
                         ["1", OTHER_RUN + ":1"])
        msgs = sub.messages()
        self.assertEqual(len(msgs), 1)
        self.assertIn('"device":"d1","online":false', msgs[0][1])
        self.assertEqual(rkeys.run_members(self.r, RUN), ["d3"])
        self.assertEqual(self.reap(["d3"]), 1)
        self.assertEqual(rkeys.run_members(self.r, RUN), [])
        # the end: the lease, the claim and the bitmap go
        done = lambda me=OTHER_RUN: self.run_script(  # noqa: E731
            "reap_done", [LEASES, k_reaper(RUN), rkeys.runslots(RUN)], [me, RUN])
        self.assertEqual(done(me="hub-z:000000000000"), 0)  # not its claim
        self.assertEqual(done(), 1)
        self.assertIsNone(self.r.cmd("ZSCORE", LEASES, RUN))
        self.assertEqual(self.r.cmd("EXISTS", k_reaper(RUN), rkeys.runslots(RUN)), 0)
        # a run that renewed meanwhile keeps its lease and bitmap; the claim goes
        self.renew(RUN)
        self.r.cmd("SET", k_reaper(RUN), OTHER_RUN)
        self.r.cmd("SETBIT", rkeys.runslots(RUN), 5, 1)
        self.assertEqual(done(), 0)
        self.assertIsNotNone(self.r.cmd("ZSCORE", LEASES, RUN))
        self.assertEqual(self.r.cmd("EXISTS", k_reaper(RUN)), 0)
        self.assertEqual(self.r.cmd("EXISTS", rkeys.runslots(RUN)), 1)
        self.assert_refused("reap", [rkeys.dev("d1")], [RUN, CH_PRESENCE, "d1"],
                            "reap: KEYS and ARGV do not match")
        self.assert_refused("reap_claim", [LEASES, k_reaper(RUN)], [OTHER_RUN, RUN, 1, "1"],
                            "reap_claim: KEYS and ARGV do not match")
        self.assert_refused("reap_done", [LEASES, k_reaper(RUN)], [OTHER_RUN, RUN],
                            "reap_done: KEYS and ARGV do not match")

    # ---- aggregates, layout ---------------------------------------------------------

    def test_agg_publish(self):
        sub = self.subscribe("iot:live:agg")
        sid = self.run_script("agg_publish", ["iot:agg:partials"], ["iot:live:agg", 0, '{"p":1}'])
        self.assertEqual(self.r.xrange("iot:agg:partials"), [(sid, {"p": '{"p":1}'})])
        self.assertEqual(sub.messages(), [("iot:live:agg", sid + '\n{"p":1}')])
        with self.assertRaises(RedisError):
            self.run_script("agg_publish", ["iot:agg:partials"], ["iot:live:agg", "x-y-z", "{}"])

    def test_layout(self):
        keys = [LAYOUT, "iot:layout", "iot:devices", "iot:cmd:seq"]
        # An empty Redis: ours, with the layout-2 key as a tombstone.
        self.assertEqual(self.run_script("layout", keys, ["3"]), [1, "3"])
        self.assertEqual((self.r.cmd("GET", LAYOUT), self.r.cmd("GET", "iot:layout")), ("3", "3"))
        self.assertEqual(self.run_script("layout", keys, ["4"]), [0, "3"])
        # Layout 1 (hub data, no layout key): refused, nothing written.
        self.r.cmd("FLUSHALL")
        self.r.cmd("SET", "iot:cmd:seq", 1)
        self.assertEqual(self.run_script("layout", keys, ["3"]), [0, ""])
        self.assertIsNone(self.r.cmd("GET", LAYOUT))
        # Layout 2 (the hub migrates it at start, before the gate): refused.
        self.r.cmd("FLUSHALL")
        self.r.cmd("SET", "iot:layout", "2")
        self.r.cmd("SADD", "iot:devices", "d1")
        self.assertEqual(self.run_script("layout", keys, ["3"]), [0, "2"])
        self.assertIsNone(self.r.cmd("GET", LAYOUT))
        # Migrated: both keys say 3.
        self.r.cmd("SET", LAYOUT, "3")
        self.r.cmd("SET", "iot:layout", "3")
        self.assertEqual(self.run_script("layout", keys, ["3"]), [1, "3"])

    # ---- commands ----------------------------------------------------------------------

    def now(self):
        return int(time.time() * 1000)

    def create(self, cid, dev, idem=None, owner="ops", ttl=60, attempts=3, now=None):
        keys = group(cid, dev) + [rkeys.cmdlog(dev)]
        if idem:
            keys.append(rkeys.idem(dev, owner, idem))
        argv = [now or self.now(), CH_COMMANDS, cid, dev, "thermostat", "reboot", "{}",
                10, 60, ttl, attempts, owner, ""]
        return self.run_script("cmd_create", keys, argv)

    def register(self, dev, conn="c1", inst="hub-a", online="1"):
        self.r.cmd("HSET", rkeys.dev(dev), "type", "thermostat", "labels", "{}",
                   "conn", conn, "instance", inst, "online", online)

    def send(self, cid, dev, conn="c1"):
        return self.run_script("cmd_send", group(cid, dev),
                               [self.now(), CH_COMMANDS, cid, conn, dev])

    def ack(self, cid, dev, status, conn="c1", err=""):
        return self.run_script("cmd_ack", group(cid, dev),
                               [self.now(), CH_COMMANDS, cid, conn, status, "", "", "", err, dev or ""])

    def test_ids_are_in_their_device_slot(self):
        for d in ("d1", "kc-1:cmds", "x" * 128):
            c = cid(d, 7)
            self.assertRegex(c, r"^c_[0-9a-f]{32}$")
            slots = {key_slot(k) for k in group(c, d) + [rkeys.cmdlog(d), rkeys.cancels(d),
                                                           rkeys.idem(d, "ops", "k")]}
            self.assertEqual(slots, {crc16(d.encode()) % 16384}, d)

    def test_cmd_create(self):
        self.assertEqual(self.create(cid("nobody", 1), "nobody"), [-1])
        self.register("d1")
        self.register("d2")
        c1, c2 = cid("d1", 1), cid("d1", 2)
        sub = self.subscribe(CH_COMMANDS)
        out = self.create(c1, "d1", idem="k1")
        self.assertEqual((out[0], out[1], out[3], out[4]), (1, c1, "hub-a", "1"))
        self.assertEqual(self.r.cmd("HMGET", k_cmd(c1), "status", "device", "owner"),
                         ["queued", "d1", "ops"])
        self.assertEqual(self.r.cmd("ZRANGE", rkeys.cmds("d1"), 0, -1), [c1])
        self.assertEqual(self.r.cmd("ZRANGE", rkeys.cmdlog("d1"), 0, -1), [c1])
        self.assertEqual(self.r.cmd("ZSCORE", rkeys.timers(c1), c1), str(out[2]))
        self.assertEqual(self.r.cmd("HGET", rkeys.dev("d1"), "cmd_seq"), "1")
        self.assertEqual(len(self.r.cmd("LRANGE", k_cmd_log(c1), 0, -1)), 1)
        self.assertIn('"status":"queued"', sub.messages()[0][1])
        # The same Idempotency-Key: the first command, nothing new.
        self.assertEqual(self.create(c2, "d1", idem="k1"), [0, c1])
        self.assertEqual(self.r.cmd("EXISTS", k_cmd(c2)), 0)
        # The same key for another device: scoped per device, a new command.
        o = cid("d2", 1)
        self.assertEqual(self.create(o, "d2", idem="k1")[:2], [1, o])
        self.assertEqual(self.r.cmd("GET", rkeys.idem("d2", "ops", "k1")), o)
        # The device's seq numbers its queue, from its log's top when absent
        # (a device of layout 2, whose seqs came from one global counter).
        self.r.cmd("HDEL", rkeys.dev("d1"), "cmd_seq")
        self.r.cmd("ZADD", rkeys.cmdlog("d1"), 41, "c_old")
        self.create(c2, "d1")
        self.assertEqual(self.r.cmd("ZSCORE", rkeys.cmds("d1"), c2), "42")
        self.assert_refused("cmd_create", group(cid("d1", 3), "d1"),
                            [1, CH_COMMANDS, cid("d1", 3)], "cmd_create: bad arguments")

    def test_cmd_send_and_ack(self):
        self.register("d1")
        c1 = cid("d1", 1)
        self.create(c1, "d1")
        self.assertEqual(self.send(c1, "d1", conn="c2"), [0, "not_owner"])
        self.r.cmd("HSET", rkeys.dev("other"), "conn", "c1", "online", "1")
        self.assertEqual(self.run_script("cmd_send", [k_cmd(c1), k_cmd_log(c1), rkeys.timers(c1),
                                                      rkeys.dev("d1"), rkeys.cmds("d1")],
                                         [self.now(), CH_COMMANDS, c1, "c1", "other"]), [0, "unknown"])
        out = self.send(c1, "d1")
        self.assertEqual(out[:5], [1, "d1", "reboot", "{}", 1])
        self.assertEqual(self.send(c1, "d1"), [0, "not_due"])
        self.assertEqual(self.r.cmd("HMGET", k_cmd(c1), "status", "sent_conn"), ["sent", "c1"])
        self.assertEqual(self.ack(c1, "d1", "received", conn="c2"), [-1])
        self.assertEqual(self.ack(c1, None, "received"), [-1])
        self.assertEqual(self.ack(c1, "d1", "received"), [1, "received"])
        self.assertEqual(self.ack(c1, "d1", "received"), [0, "received"])
        self.assertEqual(self.r.cmd("HGET", k_cmd(c1), "ignored_acks"), "1")
        self.assertEqual(self.ack(c1, "d1", "failed", err="boom"), [1, "failed"])
        self.assertEqual(self.r.cmd("HMGET", k_cmd(c1), "status", "error"), ["failed", "boom"])
        self.assertIsNone(self.r.cmd("ZSCORE", rkeys.timers(c1), c1))
        self.assertEqual(self.r.cmd("ZCARD", rkeys.cmds("d1")), 0)
        self.assertGreater(self.r.cmd("TTL", k_cmd(c1)), 0)
        self.assert_refused("cmd_ack", group(c1, "d1"), [1, CH_COMMANDS, c1],
                            "cmd_ack: bad arguments")
        self.assert_refused("cmd_send", [rkeys.timers(c1)], [1, CH_COMMANDS, c1, "c1", "d1"],
                            "cmd_send: bad arguments")

    def cancel(self, cid, dev):
        keys = group(cid, dev) + ([rkeys.cancels(dev)] if dev else [])
        return self.run_script("cmd_cancel", keys, [self.now(), CH_COMMANDS, cid, dev or ""])

    def test_cmd_cancel(self):
        self.register("d1")
        c1, c2 = cid("d1", 1), cid("d1", 2)
        self.create(c1, "d1")
        self.create(c2, "d1")
        self.send(c2, "d1")
        self.assertEqual(self.cancel(c1, "d1"), [1, "queued", "d1"])
        self.assertEqual(self.cancel(c2, "d1"), [1, "sent", "d1"])
        self.assertEqual(self.r.cmd("SMEMBERS", rkeys.cancels("d1")), [c2])
        self.assertEqual(self.cancel(c1, "d1"), [0, "canceled"])
        self.assertEqual(self.cancel(cid("d9", 9), None), [-1])
        self.assert_refused("cmd_cancel", group(c1, "d1"),
                            [1, CH_COMMANDS, c1, "d1"], "cmd_cancel: bad arguments")

    def test_cmd_tick(self):
        self.register("d1")
        t0 = self.now()
        c1, gone = cid("d1", 1), cid("d1", 99)
        self.create(c1, "d1", ttl=1, now=t0 - 5000)
        self.r.cmd("ZADD", rkeys.timers(gone), 1, gone)
        out = self.run_script("cmd_tick", group(gone, None), [t0, CH_COMMANDS, gone, ""])
        self.assertEqual(out, [0, 0])
        self.assertIsNone(self.r.cmd("ZSCORE", rkeys.timers(gone), gone))
        with self.assertRaises(RedisError):  # another device's keys (crosses slots: EVAL as is)
            wrong = [k_cmd(c1), k_cmd_log(c1), rkeys.timers(c1), rkeys.dev("d2"), rkeys.cmds("d2")]
            self.r.cmd("EVAL", script_text("cmd_tick"), 5, *wrong, t0, CH_COMMANDS, c1, "d2")
        out = self.run_script("cmd_tick", group(c1, "d1"), [t0, CH_COMMANDS, c1, "d1"])
        self.assertEqual(out, [1, "expired"])
        self.assertEqual(self.r.cmd("HGET", k_cmd(c1), "status"), "expired")
        self.assert_refused("cmd_tick", [rkeys.timers(c1)], [t0, CH_COMMANDS, c1, "d1"],
                            "cmd_tick: bad arguments")

    def test_cmd_reads(self):
        self.register("d1")
        c1, c2, c3, gone = (cid("d1", n) for n in (1, 2, 3, 99))
        for c in (c1, c2, c3):
            self.create(c, "d1")
        self.cancel(c2, "d1")
        h, log = self.run_script("cmd_get", [k_cmd(c2), k_cmd_log(c2)], [])
        self.assertEqual(dict(zip(h[0::2], h[1::2]))["status"], "canceled")
        self.assertEqual(len(log), 2)
        keys = [k_cmd(c) for c in (c3, c2, c1, gone)]
        out = self.run_script("cmd_list", keys, ["", 10])
        self.assertEqual([dict(zip(x[0::2], x[1::2]))["id"] for x in out], [c3, c2, c1])
        out = self.run_script("cmd_list", keys, ["queued", 1])
        self.assertEqual([dict(zip(x[0::2], x[1::2]))["id"] for x in out], [c3])
        self.assert_refused("cmd_list", keys, ["", "many"], "cmd_list: bad arguments")
        self.r.cmd("SADD", rkeys.cancels("d1"), "c_0")
        out = self.run_script("cmd_owed", [rkeys.cancels("d1"), rkeys.cmds("d1"),
                                           rkeys.cancels("d9"), rkeys.cmds("d9")], ["d1", "d9"])
        self.assertEqual(out, ["d1", ["c_0"], [c1, c3]])
        self.assert_refused("cmd_owed", [rkeys.cancels("d1")], ["d1"], "cmd_owed: KEYS and ARGV do not match")
        self.assertEqual(self.run_script("cmd_devices", [k_cmd(c1), k_cmd(gone)], []), ["d1", None])

    def test_cmd_due(self):
        t0 = self.now()
        self.r.cmd("ZADD", rkeys.timers(cid("d1", 1)), t0 - 10, cid("d1", 1), t0 + 60000, cid("d1", 2))
        self.r.cmd("ZADD", rkeys.timers(cid("d2", 1)), t0 - 20, cid("d2", 1), t0 - 5, cid("d2", 2))
        keys = [rkeys.timers(cid("d1", 1)), rkeys.timers(cid("d2", 1)), "iot:idx:{0}:timers"]
        # one Redis only: the sweep reads many slots' timers in one call
        out = self.r.cmd("EVAL", script_text("cmd_due"), len(keys), *keys, t0, 256)
        self.assertEqual(out, [cid("d1", 1), cid("d2", 1), cid("d2", 2)])
        out = self.r.cmd("EVAL", script_text("cmd_due"), len(keys), *keys, t0, 1)
        self.assertEqual(out, [cid("d1", 1), cid("d2", 1)])
        self.assertEqual(self.r.cmd("ZCARD", rkeys.timers(cid("d2", 1))), 2, "read only")
        self.assert_refused("cmd_due", keys, [t0, "many"], "cmd_due: bad arguments")

    # ---- rollouts ------------------------------------------------------------------------

    RID = "r_" + "ab" * 16

    def rollout_ids(self, devices):
        return [cid(d, i, salt="a") for i, d in enumerate(devices)]

    def rollout_create(self, devices, patterns="", labels="", mpm=60, ratio=0.5, min_finished=1,
                       online_only="0"):
        rid = self.RID
        keys = [k_rollout(rid), k_rollout_cmds(rid), ACTIVE]
        argv = [self.now(), CH_COMMANDS, rid, "thermostat", labels, patterns, "reboot", "{}",
                10, 60, 60, 1, mpm, ratio, "ops", min_finished, online_only]
        for d, c in zip(devices, self.rollout_ids(devices)):
            keys += [rkeys.dev(d), rkeys.cmdlog(d), k_cmd(c), k_cmd_log(c)]
            argv += [d, c]
        return self.run_script("rollout_create", keys, argv)

    def rollout_step(self):
        rid = self.RID
        ids = self.r.cmd("LRANGE", k_rollout_cmds(rid), 0, -1)
        devs = self.run_script("cmd_devices", [k_cmd(i) for i in ids], [])
        keys = [k_rollout(rid), k_rollout_cmds(rid), ACTIVE]
        for i, d in zip(ids, devs):
            keys += group(i, d)
        return self.run_script("rollout_step", keys, [self.now(), CH_COMMANDS, rid] +
                               [d or "" for d in devs])

    def test_rollout(self):
        devices = ["a1", "a2", "a3", "b1"]
        ids = self.rollout_ids(devices)  # drawn before the clock starts
        for d, labels in zip(devices, ('{"site":"x"}', '{"site":"y"}', '{"site":"x"}', '{"site":"x"}')):
            self.register(d)
            self.r.cmd("HSET", rkeys.dev(d), "labels", labels)
        n = self.rollout_create(devices, patterns='["a*"]', labels='{"site":"x"}')
        self.assertEqual(n, 2)
        c1, c2 = ids[0], ids[2]
        self.assertEqual(self.r.cmd("LRANGE", k_rollout_cmds(self.RID), 0, -1), [c1, c2])
        self.assertEqual(self.r.cmd("HMGET", k_cmd(c2), "device", "held", "rollout"), ["a3", "1", self.RID])
        self.assertEqual(self.r.cmd("EXISTS", k_cmd(ids[1]), k_cmd(ids[3])), 0)
        self.assertEqual(self.r.cmd("ZRANGE", rkeys.cmdlog("a3"), 0, -1), [c2])
        self.assertEqual(self.r.cmd("ZRANGE", ACTIVE, 0, -1), [self.RID])
        # 60 a minute from its creation: the first at once.
        out = self.rollout_step()
        self.assertEqual(out[:5], [1, c1, "a1", "hub-a", "1"])
        self.assertEqual(len(out), 6)
        self.assertEqual(self.r.cmd("ZRANGE", rkeys.cmds("a1"), 0, -1), [c1])
        self.assertEqual(self.r.cmd("HGET", k_cmd(c1), "held"), "0")
        self.assertIsNotNone(self.r.cmd("ZSCORE", rkeys.timers(c1), c1))
        h, counts = self.run_script("rollout_get", [k_rollout(self.RID), k_cmd(c1), k_cmd(c2)], [])
        self.assertEqual(dict(zip(h[0::2], h[1::2]))["released"], "1")
        self.assertEqual(dict(zip(counts[0::2], counts[1::2])), {"queued": 2})
        # Its only released command fails: ratio 1 > 0.5, the rest is canceled.
        self.send(c1, "a1")
        self.ack(c1, "a1", "failed")
        self.assertEqual(self.rollout_step(), [2])
        self.assertEqual(self.r.cmd("HGET", k_cmd(c2), "status"), "canceled")
        self.assertEqual(self.r.cmd("HGET", k_rollout(self.RID), "status"), "aborted")
        self.assertEqual(self.r.cmd("ZCARD", ACTIVE), 0)
        self.assertEqual(self.rollout_step(), [0])
        self.assertEqual(self.run_script("rollout_get", [k_rollout("r_none")], []), [[], []])

    def test_rollout_ctl(self):
        """pause/resume/cancel: the transitions allowed, the ones refused,
        and the step's answer to each state."""
        self.register("a1")
        self.register("a2")
        self.assertEqual(self.rollout_create(["a1", "a2"], mpm=1), 2)
        ctl = lambda act: self.run_script("rollout_ctl", [k_rollout(self.RID)], [act, self.now()])
        self.assertEqual(self.rollout_step()[0], 1)                 # a1 released
        self.assertEqual(ctl("resume"), [0, "running"])
        self.assertEqual(ctl("pause"), [1, "paused"])
        self.assertEqual(ctl("pause"), [0, "paused"])
        self.assertEqual(self.rollout_step(), [4])                  # paused: stays active
        self.assertEqual(self.r.cmd("ZCARD", ACTIVE), 1)
        self.assertEqual(ctl("resume"), [1, "running"])
        self.assertEqual(ctl("cancel"), [1, "canceling"])
        self.assertEqual(self.rollout_step(), [3])
        ids = self.r.cmd("LRANGE", k_rollout_cmds(self.RID), 0, -1)
        self.assertEqual(self.r.cmd("HGET", k_cmd(ids[1]), "status"), "canceled")
        self.assertEqual(self.r.cmd("HGET", k_rollout(self.RID), "status"), "canceled")
        self.assertEqual(self.r.cmd("ZCARD", ACTIVE), 0)
        self.assertEqual(ctl("cancel"), [0, "canceled"])
        self.assertEqual(self.run_script("rollout_ctl", [k_rollout("r_none")], ["pause", 1]), [-1])
        self.assert_refused("rollout_ctl", [k_rollout(self.RID)], ["stop", 1], "rollout_ctl: bad arguments")

    def test_rollout_refuses_a_malformed_call(self):
        self.register("a1")
        self.assert_refused("rollout_create", [k_rollout(self.RID), k_rollout_cmds(self.RID)],
                            [1, CH_COMMANDS, self.RID] + [""] * 14 + ["a1"],
                            "rollout_create: KEYS and ARGV do not match")
        self.rollout_create(["a1"])
        keys = [k_rollout(self.RID), k_rollout_cmds(self.RID), ACTIVE]
        self.assert_refused("rollout_step", keys + group(cid("a1", 5), "a1"), [1, CH_COMMANDS, self.RID],
                            "rollout_step: KEYS and ARGV do not match")
        self.assert_refused("rollout_step", keys, [1, CH_COMMANDS, self.RID],
                            "rollout_step: not the rollout's commands")


if __name__ == "__main__":
    unittest.main(verbosity=2)
