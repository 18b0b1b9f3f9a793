"""Shared pieces of the chaos suite (tests/chaos/).

The suite breaks things under load and then counts exactly what the hub
promised against what Redis holds: every reading a gateway sends has a key
(gateway, seq, index), found again in Redis from the stream entry's `gw`
and `seq` fields and the reading's `ts` (base + seq * 16 + index, unique per
gateway); a reading counts as **acked** once its
frame's ack arrived, as **stored** once it is in its device's stream. After
the scenario (and every resend a real gateway would make) each test asserts
lost = acked but not stored = 0 and duplicated = stored more than once = 0,
and records a row (scenario, acked, stored, lost, duplicated, recovery time)
that the file prints as a table at its end and writes to
$HUB_BUILD_DIR/chaos-<test file>.md (rewritten by each run).
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "integration"))
from harness import (BUILD_DIR, HubTestCase, Redis, Resp, connect_gateway,  # noqa: E402,F401
                     main, now_ms, rkeys, uniq, wait_until)
import websockets  # noqa: E402


class PersistentRedis(Redis):
    """A redis-server of our own with an append-only file in its dir:
    appendfsync `fsync` ("always", "everysec"), or no persistence at all
    (fsync=None). restart() starts it again on the same dir and port, so it
    loads what it kept."""

    def __init__(self, fsync="always", port=None):
        self.fsync = fsync
        super().__init__(port)

    def _start(self, timeout=10):
        self.log_path = os.path.join(self.dir, "redis-%d.log" % self.port)
        persist = (["--appendonly", "yes", "--appendfsync", self.fsync] if self.fsync
                   else ["--appendonly", "no"])
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--daemonize", "no", "--dir", self.dir, "--protected-mode", "no"] + persist,
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
                    # LOADING is an error reply: not ready yet.
                    if c.cmd("PING") == "PONG":
                        return True
                finally:
                    c.close()
            except Exception:
                pass
            time.sleep(0.02)
        return False


class RedisAt:
    """A Redis the test did not start (the hub's embedded one), read
    through its port: enough for stored_counts."""

    def __init__(self, port):
        self.port = port

    def xrange(self, key):
        c = Resp(self.port)
        try:
            return [(eid, dict(zip(f[0::2], f[1::2])))
                    for eid, f in c.cmd("XRANGE", key, "-", "+") or []]
        finally:
            c.close()


class Ledger:
    """What one gateway sent, what was acked, what is stored."""

    def __init__(self, gw, devices):
        self.gw = gw
        self.devices = devices
        self.t_base = now_ms() - 3600 * 1000   # within the hub's clock-skew window
        self.rejected = 0
        self.sent = {}       # seq -> [reading, ...]
        self.acked = set()   # seqs
        self.unavailable = 0

    def key(self, seq, i):
        return "%s:%d:%d" % (self.gw, seq, i)

    def acked_keys(self):
        return {self.key(s, i) for s in self.acked for i in range(len(self.sent[s]))}

    def sent_keys(self):
        return {self.key(s, i) for s, rs in self.sent.items() for i in range(len(rs))}


def stored_counts(redis, ledgers):
    """key -> how many times a reading with that key is stored."""
    counts = {}
    base = {l.gw: l.t_base for l in ledgers}
    for d in sorted({d for l in ledgers for d in l.devices}):
        for _, f in redis.xrange(rkeys.tm(d)):
            seq = int(f["seq"])
            i = int(f["ts"]) - base.get(f["gw"], 0) - seq * 16
            k = "%s:%d:%d" % (f["gw"], seq, i)
            counts[k] = counts.get(k, 0) + 1
    return counts


class ChaosGateway:
    """A gateway as a real one behaves: announces, streams frames with seqs,
    keeps every frame not acked, and after a disconnect reconnects (to
    whatever hub answers on the port) and resends them with the same seq,
    until all are acked or the test stops it."""

    def __init__(self, case, port_fn, ledger, batch=1, rate=200, ssl_ctx=None):
        self.case = case
        self.port_fn = port_fn      # -> the hub to connect to (ports may change)
        self.l = ledger
        self.batch = batch
        self.rate = rate            # frames/s while streaming
        self.next_seq = 1
        self.streaming = False
        self.ws = None
        self.reconnects = 0
        self.task = None
        self.done = asyncio.Event()
        self.sending = True

    async def _connect(self):
        hub = self.port_fn()
        tok = self.case.token(self.l.gw, ("t-*", "c-*"))
        gw = await connect_gateway(hub, tok, timeout=3)
        await gw.send({"type": "announce", "devices": [
            {"device": d, "device_type": "thermostat"} for d in self.l.devices]})
        rep = await gw.wait_for(lambda m: m.get("type") in ("announced", "error"), 5, "announced")
        if rep.get("type") != "announced":
            raise ConnectionError("announce: %r" % rep)
        return gw

    def _frame(self, seq):
        if seq not in self.l.sent:
            self.l.sent[seq] = [
                {"device": self.l.devices[(seq + i) % len(self.l.devices)],
                 "ts": self.l.t_base + seq * 16 + i,
                 "data": {"temperature": 20.0 + (seq % 10)}}
                for i in range(self.batch)]
        return {"type": "telemetry", "seq": seq, "readings": self.l.sent[seq]}

    async def run(self, until_seq):
        """Streams frames 1..until_seq, surviving disconnects; returns when
        every frame is acked (or stop() is called)."""
        while not self.done.is_set():
            try:
                gw = await self._connect()
            except (OSError, ConnectionError, AssertionError, asyncio.TimeoutError,
                    websockets.exceptions.WebSocketException):
                await asyncio.sleep(0.2)
                continue
            self.ws = gw
            try:
                await self._session(gw, until_seq)
                if len(self.l.acked) >= until_seq:
                    self.done.set()
            except (websockets.exceptions.ConnectionClosed, ConnectionError, OSError,
                    AssertionError, asyncio.TimeoutError):
                self.reconnects += 1
            finally:
                try:
                    await asyncio.wait_for(gw.ws.close(), 1)
                except Exception:
                    pass
        return self.l

    async def _session(self, gw, until_seq):
        # Everything sent before and not acked goes again first.
        pending = sorted(s for s in self.l.sent if s not in self.l.acked)
        inflight = set()
        window = 16

        async def reader():
            while True:
                m = json.loads(await gw.ws.recv())
                s = m.get("seq")
                if m.get("type") == "ack" and s is not None:
                    self.l.acked.add(s)
                    self.l.rejected += len(m.get("rejected", []))
                    inflight.discard(s)
                elif m.get("type") == "error" and m.get("code") == "unavailable" and s is not None:
                    self.l.unavailable += 1
                    inflight.discard(s)
                    pending.append(s)   # resend later

        rt = asyncio.get_running_loop().create_task(reader())
        try:
            gap = 1.0 / self.rate
            while len(self.l.acked) < until_seq:
                if rt.done():
                    rt.result()  # raises the connection's end
                if len(inflight) >= window:
                    await asyncio.sleep(0.002)
                    continue
                if pending:
                    s = pending.pop(0)
                    if s in self.l.acked:
                        continue
                elif self.sending and self.next_seq <= until_seq:
                    s = self.next_seq
                    self.next_seq += 1
                else:
                    # all sent: wait for acks; resend what has waited too long
                    await asyncio.sleep(0.05)
                    if not inflight and len(self.l.acked) < until_seq:
                        pending.extend(sorted(x for x in self.l.sent if x not in self.l.acked))
                    continue
                inflight.add(s)
                await gw.ws.send(json.dumps(self._frame(s)))
                await asyncio.sleep(gap)
        finally:
            rt.cancel()
            try:
                await rt
            except BaseException:
                pass


class ChaosCase(HubTestCase):
    """Collects the rows of the file's table."""

    rows = []

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.rows = []

    @classmethod
    def tearDownClass(cls):
        if cls.rows:
            head = ("| scenario | acked | stored | lost | duplicated | recovery s |\n"
                    "|---|---|---|---|---|---|\n")
            body = "".join("| %s | %d | %d | %d | %d | %s |\n" % r for r in cls.rows)
            sys.stderr.write("\n" + head + body)
            try:
                san = "asan" if os.environ.get("HUB_SANITIZE") == "1" else "normal"
                stem = os.path.splitext(os.path.basename(sys.argv[0] or "chaos"))[0]
                with open(os.path.join(BUILD_DIR, "chaos-%s.md" % stem), "w") as f:
                    f.write(head + "".join("| %s (%s) | %d | %d | %d | %d | %s |\n"
                                           % ((r[0], san) + r[1:]) for r in cls.rows))
            except OSError:
                pass
        super().tearDownClass()

    def start_hub(self, redis, extra=(), **kw):
        """A hub without rate limits (the chaos gateways stream faster than
        the defaults allow a device) and with gateway reconnects allowed at
        the pace the scenarios need."""
        return super().start_hub(redis, extra=["--device-rate", "0", "--gateway-rate", "0",
                                               "--gateway-connect-rate", "0"] + list(extra), **kw)

    def account(self, scenario, redis, ledgers, recovery_s):
        """Counts acked vs stored over the ledgers, records the row, and
        asserts nothing acked was lost and nothing was stored twice."""
        counts = stored_counts(redis, ledgers)
        rejected = sum(l.rejected for l in ledgers)
        self.assertEqual(rejected, 0, "%s: %d readings were rejected (a test bug)" % (scenario, rejected))
        acked = set().union(*(l.acked_keys() for l in ledgers))
        sent = set().union(*(l.sent_keys() for l in ledgers))
        lost = sorted(k for k in acked if counts.get(k, 0) == 0)
        dup = sorted(k for k, n in counts.items() if n > 1)
        foreign = sorted(k for k in counts if k not in sent)
        stored = sum(1 for k in counts if k in sent)
        rec = "%.1f" % recovery_s if recovery_s is not None else "-"
        self.rows.append((scenario, len(acked), stored, len(lost), len(dup), rec))
        self.assertEqual(lost, [], "%s: %d acked readings are not stored, e.g. %s"
                         % (scenario, len(lost), lost[:5]))
        self.assertEqual(dup, [], "%s: %d readings stored twice, e.g. %s" % (scenario, len(dup), dup[:5]))
        self.assertEqual(foreign, [], "%s: stored readings nobody sent" % scenario)
        return len(acked), stored


def sigkill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
