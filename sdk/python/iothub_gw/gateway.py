"""iothub_gw.Gateway: the client side of the iot-hub gateway protocol
(docs/protocol.md) on asyncio and `websockets`, with the semantics of the C
library libiothub-gw (docs/sdk.md): an outbox in an SQLite spool, frames
resent by seq after reconnects, back-off with jitter, retry_after_ms
honoured, rejects reported, command handlers run once per id.

    gw = Gateway("ws://127.0.0.1:8080/v1/gateway", token=jwt, spool="/var/lib/gw/spool.db")
    gw.announce("t-1", "thermostat", {"site": "b1"})

    @gw.command("reboot")
    async def reboot(cmd):
        await cmd.in_progress(50, "rebooting")
        await cmd.succeeded({"ok": True})

    gw.send("t-1", ts_ms, {"temperature": 21.5})   # any thread; raises SpoolFull
    await gw.run()                                  # until gw.stop()

Threads: send(), announce() and stop() may be called from any thread; the
rest from the event loop that runs run().
"""

import asyncio
import json
import random
import re
import ssl as _ssl
import struct
import threading
import time

import websockets
import websockets.exceptions

from .spool import Spool, SpoolFull

SUBPROTOCOL = "iot-gateway.v1"
ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
STATUSES = ("received", "in_progress", "succeeded", "failed", "rejected")


def reading_message(device, ts, data):
    """The bytes a device signs for one reading (docs/provenance.md "Device
    signatures"): b"iot-hub.reading.v1\\0", then device, ts (decimal) and data
    (compact JSON text), each as a 4-byte big-endian length and its bytes."""
    out = b"iot-hub.reading.v1\0"
    for part in (device, str(int(ts)), data):
        b = part.encode()
        out += struct.pack(">I", len(b)) + b
    return out


def compact_json(text):
    """text without whitespace between tokens (what the hub stores)."""
    out, in_str, esc = [], False, False
    for ch in text:
        if in_str:
            out.append(ch)
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch not in " \t\r\n":
            out.append(ch)
            in_str = ch == '"'
    return "".join(out)


class Command:
    """One command delivery; report with the coroutines below."""

    def __init__(self, gw, m):
        self._gw = gw
        self.id = m["id"]
        self.device = m.get("device")
        self.name = m.get("name")
        self.params = m.get("params")
        self.attempt = m.get("attempt", 1)
        self.expires_at = m.get("expires_at")

    async def in_progress(self, progress=None, message=None):
        self._gw.report(self.id, "in_progress", progress=progress, message=message)

    async def succeeded(self, result=None):
        self._gw.report(self.id, "succeeded", result=result)

    async def failed(self, error=None):
        self._gw.report(self.id, "failed", error=error)

    async def rejected(self, error=None):
        self._gw.report(self.id, "rejected", error=error)


class Gateway:
    def __init__(self, url, spool, token=None, token_cb=None, ssl=None, ca_file=None,
                 cert_file=None, key_file=None, max_spool_bytes=64 << 20, fsync="none",
                 max_readings=500, max_delay=0.05, max_frame_bytes=60000, max_inflight=16,
                 ack_timeout=10.0, backoff_min=0.5, backoff_max=30.0, on_reject=None,
                 on_state=None, signer=None):
        if not token and not token_cb:
            raise ValueError("a token or a token_cb is required")
        self.url = url
        self.token = token
        self.token_cb = token_cb
        if ssl is None and url.startswith("wss://"):
            ssl = _ssl.create_default_context(cafile=ca_file)   # verification on
            if cert_file:
                ssl.load_cert_chain(cert_file, key_file)
        self.ssl = ssl
        self.spool = Spool(spool, max_spool_bytes, fsync)
        self.max_readings = min(max_readings, 1000)
        self.max_delay = max_delay
        self.max_frame_bytes = max_frame_bytes
        self.max_inflight = max_inflight
        # a frame or announce unanswered this long (s) gives the connection
        # up, as the C library's ack_timeout_ms (None or <= 0: never)
        self.ack_timeout = ack_timeout if ack_timeout and ack_timeout > 0 else None
        self.backoff_min, self.backoff_max = backoff_min, backoff_max
        self.on_reject, self.on_state = on_reject, on_state
        # signer(device, message bytes) -> the device's 64-byte Ed25519
        # signature of them (or its hex); None: readings go unsigned
        self.signer = signer
        self.devices = {}            # id -> (type, labels)
        self.handlers = {}           # name or None -> coroutine function
        self.on_cancel = None
        self.stats = dict(accepted=0, acked=0, duplicates=0, rejected=0, rate_limited=0,
                          unavailable=0, frames=0, reconnects=0, ack_timeouts=0)
        self._lock = threading.Lock()
        self._loop = None
        self._wake = None
        self._stopped = False
        self._ws = None
        self._out = []               # command acks to send
        self._out_not_before = 0.0
        self._batch_since = None
        self._tasks = set()
        self._unannounced = set()
        self._close = None

    # ------------------------------------------------------------------
    # API, any thread
    def announce(self, device, device_type, labels=None):
        if not ID_RE.match(device or "") or not ID_RE.match(device_type or ""):
            raise ValueError("device and device_type must match [A-Za-z0-9._:-]{1,128}")
        if labels is not None and not (isinstance(labels, dict) and
                                       all(isinstance(v, str) for v in labels.values())):
            raise ValueError("labels: an object of strings")
        with self._lock:
            self.devices[device] = (device_type, labels)
            self._unannounced.add(device)   # announced now when online, after reconnects anyway
        self._kick()

    def send(self, device, ts, data):
        """Accepts one reading (data: a dict or a JSON object text; ts: ms, or
        None for the hub's clock). Written to the spool before it returns;
        raises SpoolFull at the bound, ValueError for a bad reading."""
        if self._stopped:
            raise RuntimeError("stopped")
        if not ID_RE.match(device or ""):
            raise ValueError("device must match [A-Za-z0-9._:-]{1,128}")
        if isinstance(data, str):
            obj = json.loads(data, object_pairs_hook=_no_dups)
            if not isinstance(obj, dict):
                raise ValueError("data: not a JSON object")
            text = data.replace("\n", " ").replace("\r", " ")
        elif isinstance(data, dict):
            text = json.dumps(data, separators=(",", ":"))
        else:
            raise ValueError("data: a dict or a JSON object text")
        sig = ""
        if self.signer is not None:
            # the signature covers ts and the compact data the hub stores
            if ts is None:
                ts = int(time.time() * 1000)
            text = compact_json(text)
            s = self.signer(device, reading_message(device, ts, text))
            s = s.hex() if isinstance(s, (bytes, bytearray)) else str(s)
            if not re.match(r"^[0-9a-fA-F]{128}$", s):
                raise ValueError("signer: not a 64-byte signature")
            sig = ',"sig":"%s"' % s
        r = '{"device":"%s",%s"data":%s%s}' % (device, '"ts":%d,' % ts if ts is not None else "",
                                              text, sig)
        if len(r.encode()) + 64 > self.max_frame_bytes:
            raise ValueError("reading larger than a frame")
        self.spool.append(r)
        with self._lock:
            self.stats["accepted"] += 1
        self._kick()

    def stop(self):
        self._stopped = True
        self._kick()

    # ------------------------------------------------------------------
    # configuration
    def command(self, name=None):
        """Decorator: the handler (a coroutine function taking a Command) for
        commands named name (None: every name without its own)."""
        def deco(fn):
            self.handlers[name] = fn
            return fn
        return deco

    def cancel_handler(self, fn):
        self.on_cancel = fn
        return fn

    def report(self, cid, status, progress=None, message=None, result=None, error=None):
        """Queues a command_ack (loop thread). Raises KeyError for an id the
        gateway was never given."""
        if status not in STATUSES:
            raise ValueError("bad status %r" % status)
        if self.spool.command_ack(cid) is None:
            raise KeyError(cid)
        m = {"type": "command_ack", "id": cid, "status": status}
        if status == "in_progress" and progress is not None:
            m["progress"] = max(0, min(100, int(progress)))
        if message and status == "in_progress":
            m["message"] = message
        if status in ("failed", "rejected") and (error or message):
            m["error"] = error or message
        if status == "succeeded" and result is not None:
            m["result"] = result
        text = json.dumps(m, separators=(",", ":"))
        self.spool.set_command_ack(cid, text)
        self._out.append(text)
        self._kick()

    # ------------------------------------------------------------------
    def _kick(self):
        loop, ev = self._loop, self._wake
        if loop is None or ev is None:
            return
        try:
            if threading.get_ident() == self._loop_thread:
                ev.set()
            else:
                loop.call_soon_threadsafe(ev.set)
        except RuntimeError:
            pass   # the loop is closed

    def _state(self, state, code=0, reason=""):
        if self.on_state:
            self.on_state(state, code, reason)

    async def flush(self, timeout):
        end = time.monotonic() + timeout
        while self.spool.pending():
            if time.monotonic() > end:
                return False
            await asyncio.sleep(0.02)
        return True

    async def run(self):
        """Connects, reconnects and services until stop()."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        attempt = 0
        while not self._stopped:
            code, reason = 0, ""
            if self.token_cb:
                t = self.token_cb()
                if t:
                    self.token = t
            self._state("connecting")
            try:
                async with websockets.connect(
                        self.url, subprotocols=[SUBPROTOCOL], ssl=self.ssl, max_size=1 << 20,
                        extra_headers={"Authorization": "Bearer " + self.token},
                        open_timeout=10, ping_interval=20, ping_timeout=40) as ws:
                    self._ws = ws
                    went_online = await self._session(ws)
                    if went_online:
                        attempt = 0
            except websockets.exceptions.InvalidStatusCode as e:
                code, reason = e.status_code, "the upgrade was refused with HTTP %d" % e.status_code
            except websockets.exceptions.ConnectionClosed as e:
                code, reason = (e.rcvd.code, e.rcvd.reason) if e.rcvd else (0, "connection lost")
            except (OSError, asyncio.TimeoutError, websockets.exceptions.WebSocketException) as e:
                reason = str(e) or type(e).__name__
            finally:
                self._ws = None
            if self._close:
                code, reason = self._close
                self._close = None
            if self._stopped:
                break
            self.stats["reconnects"] += 1
            delay = min(self.backoff_max, self.backoff_min * (2 ** min(attempt, 20)))
            delay = delay / 2 + random.random() * delay
            attempt += 1
            m = re.search(r"retry after (\d+) ms", reason or "")
            if code == 4029 and m:
                delay = max(delay, int(m.group(1)) / 1000 + random.random() * 0.25)
            self._state("disconnected", code, reason)
            try:
                await asyncio.wait_for(self._stop_wait(), delay)
            except asyncio.TimeoutError:
                pass

    def close(self):
        """Closes the spool (after run() returned). What is unacked stays in
        it for the next Gateway on the same file."""
        self.spool.close()

    async def _stop_wait(self):
        while not self._stopped:
            self._wake.clear()
            await self._wake.wait()

    async def _session(self, ws):
        """One connection: announce, then frames and acks. Returns True once
        it was online."""
        with self._lock:
            self._unannounced = set(self.devices)
        self._announce_wait = 0
        self._announce_sent = 0.0     # when the oldest unanswered announce went
        self._announce_retry = 0.0
        self._pause_until = 0.0
        self._inflight = {}           # seq -> sent readings
        self._sent_at = {}            # seq -> monotonic time it went
        self._online = False
        self._close = None
        given_up = None
        reader = asyncio.ensure_future(self._reader(ws))
        try:
            while not self._stopped and not reader.done():
                await self._pump(ws)
                self._wake.clear()
                waits = [0.5]
                now = time.monotonic()
                due, late = self._answer_due()
                if due is not None and now >= due:
                    given_up = self._give_up(ws, late)
                    break
                if due is not None:
                    waits.append(due - now)
                if self._batch_since is not None:
                    waits.append(self._batch_since + self.max_delay - now)
                for t in (self._pause_until, self._announce_retry, self._out_not_before):
                    if t > now:
                        waits.append(t - now)
                try:
                    await asyncio.wait_for(self._wake.wait(), max(0.001, min(waits)))
                except asyncio.TimeoutError:
                    pass
            if reader.done() and reader.exception():
                raise reader.exception()
            if self._stopped:
                await ws.close(1000, "stopping")
        finally:
            reader.cancel()
            try:
                await reader
            except (asyncio.CancelledError, Exception):
                pass
        if given_up:
            self._close = (0, given_up)
        elif ws.close_code:
            self._close = (ws.close_code, ws.close_reason)
        return self._online

    def _answer_due(self):
        """(monotonic time the oldest awaited answer is overdue, its seq or
        None for an announce), or (None, None) when nothing is awaited."""
        if self.ack_timeout is None:
            return None, None
        due, late = None, None
        if self._announce_wait:
            due = self._announce_sent + self.ack_timeout
        for seq, t in self._sent_at.items():
            if due is None or t + self.ack_timeout < due:
                due, late = t + self.ack_timeout, seq
        return due, late

    def _give_up(self, ws, seq):
        """No answer in time: a frozen hub, a black-holed path, a half-open
        socket. The protocol's remedy is the one for a lost connection (a
        resend on this socket would queue behind what the hub has not read):
        drop it at once, without a closing handshake the hub would not
        answer either; the unacked frames go again with their seq on the
        next connection. Returns the reason."""
        ms = int(self.ack_timeout * 1000)
        self.stats["ack_timeouts"] += 1
        if ws.transport is not None:
            ws.transport.abort()
        if seq is None:
            return "no answer to the announce within %d ms: connection given up" % ms
        return "no ack for seq %d within %d ms: connection given up" % (seq, ms)

    async def _pump(self, ws):
        now = time.monotonic()
        # frames
        while True:
            n = self.spool.unframed()
            if not n:
                self._batch_since = None
                break
            if self._batch_since is None:
                self._batch_since = now
            if n < self.max_readings and now < self._batch_since + self.max_delay:
                break
            self.spool.make_frame(self.max_readings, self.max_frame_bytes)
            self._batch_since = now if self.spool.unframed() else None
        # announce
        entries = []
        with self._lock:   # announce() may add devices from another thread
            if self._unannounced and now >= self._announce_retry:
                devs = sorted(self._unannounced)[:1000]
                self._unannounced.difference_update(devs)
                for d in devs:
                    t, labels = self.devices[d]
                    e = {"device": d, "device_type": t}
                    if labels:
                        e["labels"] = labels
                    entries.append(e)
        if entries:
            if not self._announce_wait:
                self._announce_sent = now
            self._announce_wait += 1
            await ws.send(json.dumps({"type": "announce", "devices": entries}, separators=(",", ":")))
        if not entries and not self._unannounced and not self._announce_wait and not self._online:
            self._online = True
            self._state("online")
        # command acks
        while self._out and now >= self._out_not_before:
            await ws.send(self._out.pop(0))
        # telemetry
        # no frame before every device is announced (or refused for good): a
        # reading of a device still waiting would be rejected unknown_device
        if self._announce_wait or self._unannounced or now < self._pause_until:
            return
        for seq in self.spool.frames():
            if len(self._inflight) >= self.max_inflight:
                break
            if seq in self._inflight:
                continue
            readings = self.spool.frame(seq)
            if not readings:
                continue
            self._inflight[seq] = readings
            self._sent_at[seq] = time.monotonic()
            self.stats["frames"] += 1
            await ws.send('{"type":"telemetry","seq":%d,"readings":[%s]}' % (seq, ",".join(readings)))

    async def _reader(self, ws):
        async for raw in ws:
            if isinstance(raw, bytes):
                continue
            try:
                m = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(m, dict):
                continue
            await self._on_message(m)
            self._wake.set()

    async def _on_message(self, m):
        t = m.get("type")
        now = time.monotonic()
        ra = m.get("retry_after_ms")
        wait = (ra if isinstance(ra, int) and ra >= 0 else 1000) / 1000
        if t == "ack" and isinstance(m.get("seq"), int):
            seq = m["seq"]
            readings = self._inflight.pop(seq, None)
            self._sent_at.pop(seq, None)
            if readings is None:
                return
            again = []
            for e in m.get("rejected") or []:
                i = e.get("index")
                r = readings[i] if isinstance(i, int) and 0 <= i < len(readings) else None
                if e.get("code") == "rate_limited" and r is not None:
                    again.append(r)
                    self.stats["rate_limited"] += 1
                    w = e.get("retry_after_ms", 1000) / 1000
                    self._pause_until = max(self._pause_until, now + w)
                    continue
                self.stats["rejected"] += 1
                if self.on_reject:
                    self.on_reject(seq, e, r)
            self.spool.acked(seq, again)
            self.stats["acked"] += m.get("accepted", 0) if isinstance(m.get("accepted"), int) else 0
            if m.get("duplicate"):
                self.stats["duplicates"] += 1
        elif t == "announced":
            self._announce_wait = max(0, self._announce_wait - 1)
            self._announce_sent = now   # the next one's clock
            for e in m.get("rejected") or []:
                if e.get("code") == "rate_limited" and e.get("device") in self.devices:
                    with self._lock:
                        self._unannounced.add(e["device"])
                    self._announce_retry = now + e.get("retry_after_ms", 1000) / 1000
                elif self.on_reject:
                    self.on_reject(0, e, None)
        elif t == "error":
            code = m.get("code")
            if isinstance(m.get("seq"), int):
                seq = m["seq"]
                readings = self._inflight.pop(seq, None)
                self._sent_at.pop(seq, None)
                if readings is None:
                    return
                if code in ("unavailable", "rate_limited"):
                    self.stats["unavailable"] += 1
                    self._pause_until = max(self._pause_until, now + wait)
                    # later frames in flight get the same answer and go again
                    return
                for i, r in enumerate(readings):
                    self.stats["rejected"] += 1
                    if self.on_reject:
                        self.on_reject(seq, {"index": i, "code": code, "message": m.get("message")}, r)
                self.spool.acked(seq)
            elif isinstance(m.get("id"), str):
                last = self.spool.command_ack(m["id"])
                if code == "rate_limited" and last:
                    self._out.append(last)
                    self._out_not_before = now + wait
            elif code == "unavailable" and self._announce_wait:
                self._announce_wait -= 1
                self._announce_sent = now
                with self._lock:
                    self._unannounced = set(self.devices)
                self._announce_retry = now + wait
        elif t == "command" and isinstance(m.get("id"), str):
            last = self.spool.command_ack(m["id"])
            if last is not None:
                self._out.append(last)     # the same id again: its status, not a second run
                return
            received = json.dumps({"type": "command_ack", "id": m["id"], "status": "received"},
                                  separators=(",", ":"))
            self.spool.set_command_ack(m["id"], received)
            self._out.append(received)
            cmd = Command(self, m)
            h = self.handlers.get(cmd.name) or self.handlers.get(None)
            if h is None:
                self.report(cmd.id, "rejected", error="unsupported command")
            else:
                task = asyncio.ensure_future(self._run_handler(h, cmd))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        elif t == "cancel" and isinstance(m.get("id"), str):
            if self.on_cancel:
                r = self.on_cancel(m["id"], m.get("device"))
                if asyncio.iscoroutine(r):
                    await r

    async def _run_handler(self, h, cmd):
        try:
            await h(cmd)
        except Exception as e:   # a handler that raised: the command failed
            try:
                self.report(cmd.id, "failed", error="%s: %s" % (type(e).__name__, e))
            except KeyError:
                pass


def _no_dups(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError("data: key %r twice" % k)
        d[k] = v
    return d
