"""Shared pieces of the adversarial suite (tests/hostile/).

Every hostile test drives the real iot-hub binary over real sockets, as an
attacker would, and then asserts that nobody else noticed: HostileCase's
assert_unharmed() checks, after each attack, that

  - a normal gateway (fresh connection, announce, one telemetry frame) gets
    its ack within ACK_BOUND_S;
  - GET /healthz answers 200 within HEALTH_BOUND_S;
  - the hub's resident memory stays under the test's RSS bound;
  - Redis's used_memory grew by less than the test's bound since the
    baseline taken before the attack (hostile input must not bloat Redis);
  - the hub is alive and its stderr carries no sanitizer report.

The bounds are stated in each test (and in the closing notes of the issue
that added them), so a regression shows as a number, not as a hang.
"""

import asyncio
import json
import os
import select
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "integration"))
from harness import (GATEWAY_PATH, STREAM_PATH, STREAM_PROTO, SUBPROTOCOL,  # noqa: E402,F401
                     HubTestCase, connect_gateway, http_get, main, now_ms, reading,
                     upgrade_request, uniq, wait_until)

ACK_BOUND_S = 2.0
HEALTH_BOUND_S = 2.0
# The ASan build roughly triples the hub's resident memory: bounds given in
# MiB for the normal build are scaled by this factor there. ASan also keeps
# freed memory in a quarantine (256 MiB by default), which would make the
# RSS bounds meaningless: hostile hubs run with SAN_QUARANTINE_MIB, and the
# bounds allow for it (san_kib).
SAN = os.environ.get("HUB_SANITIZE") == "1"
SAN_FACTOR = 3.0 if SAN else 1.0
SAN_QUARANTINE_MIB = 8


def san_kib(kib):
    """A memory bound in KiB for the normal build, as it applies to this
    build (scaled, plus the quarantine, under ASan)."""
    return kib * SAN_FACTOR + (SAN_QUARANTINE_MIB * 1024 if SAN else 0)


def san_env():
    """Environment for a hub of the hostile suite (the quarantine cap under
    ASan); None for the normal build."""
    if not SAN:
        return None
    opts = os.environ.get("ASAN_OPTIONS", "abort_on_error=0:detect_leaks=1")
    return {"ASAN_OPTIONS": opts + ":quarantine_size_mb=%d" % SAN_QUARANTINE_MIB}


def rss_kib(pid):
    """Resident set size of pid in KiB (VmRSS), or 0 when it is gone."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def open_fds(pid):
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return 0


def cpu_seconds(pid):
    """utime + stime of pid, in seconds (from /proc/PID/stat)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick


def redis_used_memory(redis):
    info = redis.cmd("INFO", "memory")
    if isinstance(info, bytes):
        info = info.decode()
    for line in info.splitlines():
        if line.startswith("used_memory:"):
            return int(line.split(":")[1])
    raise AssertionError("no used_memory in INFO memory")


def metric(hub, line_prefix):
    """The value of the /metrics sample whose line starts with line_prefix
    (a name, or a name with its labels)."""
    _, _, text = http_get(hub, "/metrics")
    for line in text.splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.split()[-1])
    raise AssertionError("no %s in /metrics" % line_prefix)


def raw_connect(port, host="127.0.0.1", timeout=5.0, rcvbuf=None):
    """A TCP connection; rcvbuf sets SO_RCVBUF before connecting (a small
    one makes the hub's writes back up as soon as the client stops reading)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout)
    s.connect((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_until_closed(sock, timeout):
    """Reads until the peer closes or timeout passes. Returns (data, closed)."""
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return data, False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return data, False
        except (ConnectionResetError, BrokenPipeError):
            return data, True
        if not chunk:
            return data, True
        data += chunk


def split_responses(data):
    """Splits bytes holding several HTTP/1.1 responses (Content-Length or
    chunked bodies) into a list of (status, headers, body)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            raise AssertionError("truncated response head: %r" % data[:200])
        lines = head.decode(errors="replace").split("\r\n")
        status = int(lines[0].split()[1])
        hdrs = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        if "content-length" in hdrs:
            n = int(hdrs["content-length"])
            if len(rest) < n:
                raise AssertionError("truncated body (%d of %d bytes)" % (len(rest), n))
            body, data = rest[:n], rest[n:]
        elif hdrs.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    _, _, rest = rest.partition(b"\r\n")
                    break
                body += rest[:size]
                rest = rest[size + 2:]
            data = rest
        else:
            body, data = rest, b""
        out.append((status, hdrs, body))
    return out


OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


def http_exchange(port, data, writes=1, pause=0.05, timeout=5, expect=None, poll=0.1):
    """Sends data on a fresh connection to port, in `writes` pieces `pause`
    apart; reads until the close, `expect` complete responses or timeout.
    Returns (responses, closed, seconds from the first byte sent)."""
    s = raw_connect(port)
    got, closed = b"", False
    t0 = time.monotonic()
    try:
        step = max(1, len(data) // writes)
        for i in range(0, len(data), step):
            try:
                s.sendall(data[i:i + step])
            except (BrokenPipeError, ConnectionResetError):
                break  # the hub closed: read what it answered
            if writes > 1:
                time.sleep(pause)
        deadline = time.monotonic() + timeout
        while not closed and time.monotonic() < deadline:
            d, closed = recv_until_closed(s, min(poll, deadline - time.monotonic()))
            got += d
            if expect is not None and not closed:
                try:
                    if len(split_responses(got)) >= expect:
                        break
                except (AssertionError, ValueError, IndexError):
                    pass
    finally:
        s.close()
    return split_responses(got), closed, time.monotonic() - t0


def ws_frame(opcode, payload=b"", fin=True, mask=True):
    """One WebSocket frame as bytes. mask=False sends it unmasked, which RFC
    6455 forbids a client to do."""
    if isinstance(payload, str):
        payload = payload.encode()
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    mbit = 0x80 if mask else 0
    if n < 126:
        head += bytes([mbit | n])
    elif n < 65536:
        head += bytes([mbit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + ws_mask(payload, key)


def ws_mask(payload, key):
    if not payload:
        return b""
    k = (key * (len(payload) // 4 + 1))[:len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(k, "big")).to_bytes(len(payload), "big")


class RawWs:
    """A WebSocket client on a plain socket that sends frames exactly as told
    (binary, unmasked, fragments of a message that never ends, floods as fast
    as the socket takes them), which python-websockets will not do. Frames
    from the hub are parsed by recv_frame(); a PING is answered."""

    def __init__(self, hub, token=None, path=GATEWAY_PATH, subprotocol=SUBPROTOCOL, timeout=5.0,
                 rcvbuf=None):
        self.sock = raw_connect(hub.port, timeout=timeout, rcvbuf=rcvbuf)
        req, _ = upgrade_request(hub.port, token, path=path, subprotocol=subprotocol)
        self.sock.sendall(req)
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in buf:
            if time.monotonic() > deadline:
                raise AssertionError("no upgrade answer within %.1f s: %r" % (timeout, buf[:200]))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError("closed during the upgrade: %r" % buf[:200])
            buf += chunk
        head, _, self.buf = buf.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            raise AssertionError("upgrade refused: %r" % head[:300])
        self.close_code = None
        self.close_reason = None
        self.eof = False

    @classmethod
    def gateway(cls, hub, token, **kw):
        return cls(hub, token, GATEWAY_PATH, SUBPROTOCOL, **kw)

    @classmethod
    def dashboard(cls, hub, token=None, **kw):
        return cls(hub, token, STREAM_PATH, STREAM_PROTO, **kw)

    def send(self, opcode, payload=b"", fin=True, mask=True):
        self.sock.sendall(ws_frame(opcode, payload, fin, mask))

    def send_text(self, text, mask=True):
        self.send(OP_TEXT, text, True, mask)

    def _fill(self, deadline):
        """Reads more bytes into self.buf; False at EOF or the deadline."""
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(262144)
        except socket.timeout:
            return False
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def _parse(self):
        """One complete frame from self.buf as (fin, opcode, payload), or None."""
        b = self.buf
        if len(b) < 2:
            return None
        n, off = b[1] & 0x7f, 2
        if n == 126:
            if len(b) < 4:
                return None
            n, off = struct.unpack("!H", b[2:4])[0], 4
        elif n == 127:
            if len(b) < 10:
                return None
            n, off = struct.unpack("!Q", b[2:10])[0], 10
        if b[1] & 0x80:
            raise AssertionError("the hub sent a masked frame")
        if len(b) < off + n:
            return None
        self.buf = b[off + n:]
        return bool(b[0] & 0x80), b[0] & 0x0f, b[off:off + n]

    def recv_frame(self, timeout=5.0):
        """The next data frame (opcode, payload); None once the hub closed
        (close_code / close_reason set; close_code stays None for a close
        without a close frame, which a client reports as 1006) or when
        nothing came within timeout."""
        deadline = time.monotonic() + timeout
        while True:
            f = self._parse()
            if f is None:
                if self.eof or not self._fill(deadline):
                    return None
                continue
            _, op, payload = f
            if op == OP_PING:
                try:
                    self.send(OP_PONG, payload)
                except OSError:
                    pass
                continue
            if op == OP_CLOSE:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self.close_reason = payload[2:].decode(errors="replace")
                try:
                    self.send(OP_CLOSE, payload[:2])
                except OSError:
                    pass
                self.eof = True
                return None
            return op, payload

    def recv_json(self, timeout=5.0):
        """The next message as JSON, or None (closed / nothing in time)."""
        f = self.recv_frame(timeout)
        if f is None:
            return None
        if f[0] != OP_TEXT:
            raise AssertionError("the hub sent opcode %d: %r" % (f[0], f[1][:100]))
        return json.loads(f[1])

    def wait_close(self, timeout=5.0):
        """Reads (and drops) until the hub closes, frames already buffered
        included; returns (close code or None, reason, frames read
        meanwhile). Fails if still open after timeout."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            f = self.recv_frame(max(0.0, deadline - time.monotonic()))
            if f is None:
                if not self.eof:
                    raise AssertionError("still open %.1f s later; read %d messages: %r"
                                         % (timeout, len(got), got[-5:]))
                return self.close_code, self.close_reason, got
            got.append(f)

    def flood(self, frames, seconds, read=True, on_message=None):
        """Sends the byte strings of `frames` (an iterator) back to back for
        `seconds`, as fast as the socket takes them. With read, what comes
        back meanwhile is read too (on_message(opcode, payload) for each data
        frame); without, nothing is read during the flood (a client that
        never reads its replies). A frame cut by the end of the time is then
        finished while reading (so the stream stays parseable). Returns the
        number of frames sent completely. Stops early if the hub closes."""
        self.sock.setblocking(False)
        sent, pending = 0, b""
        end = time.monotonic() + seconds
        try:
            while not self.eof:
                now = time.monotonic()
                if now >= end and not pending:
                    break
                if not pending and now < end:
                    pending = next(frames)
                reading = read or now >= end
                if now >= end + 10:
                    raise AssertionError("could not finish the last frame within 10 s")
                r, w, _ = select.select([self.sock] if reading else [], [self.sock], [], 0.1)
                if w:
                    try:
                        n = self.sock.send(pending)
                    except BlockingIOError:
                        n = 0
                    except (BrokenPipeError, ConnectionResetError):
                        self.eof = True
                        break
                    pending = pending[n:]
                    if not pending:
                        sent += 1
                if r:
                    self._read_nonblocking(on_message)
        finally:
            self.sock.setblocking(True)
        return sent

    def _read_nonblocking(self, on_message):
        try:
            chunk = self.sock.recv(262144)
        except BlockingIOError:
            return
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return
        self.buf += chunk
        while on_message and not self.eof:  # else recv_frame() reads them later
            f = self._parse()
            if f is None:
                break
            op, p = f[1], f[2]
            if op == OP_CLOSE:
                self.close_code = struct.unpack("!H", p[:2])[0] if len(p) >= 2 else 1005
                self.close_reason = p[2:].decode(errors="replace")
                self.eof = True
            elif op in (OP_TEXT, OP_BINARY):
                on_message(op, p)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class HostileCase(HubTestCase):
    """A HubTestCase with the after-attack checks. Subclasses start their
    hub(s) with start_hub()/class_hub() and call
    `await self.assert_unharmed(hub, redis, rss_mib=…, redis_mib=…)`."""

    @classmethod
    def class_hub(cls, redis, extra=(), **kw):
        if SAN:
            kw.setdefault("env", san_env())
        return super().class_hub(redis, extra, **kw)

    def start_hub(self, redis, extra=(), args=None, **kw):
        if SAN:
            kw.setdefault("env", san_env())
        return super().start_hub(redis, extra, args, **kw)

    def baseline(self, hub, redis):
        """Takes the numbers assert_unharmed compares against."""
        return {"rss": rss_kib(hub.pid), "redis": redis_used_memory(redis) if redis else 0,
                "fds": open_fds(hub.pid)}

    async def normal_gateway_ack(self, hub, bound=ACK_BOUND_S, ssl_ctx=None):
        """A fresh gateway announces a device and stores one reading; returns
        the seconds from the frame to its ack (fails over bound)."""
        sub = uniq("canary")
        dev = uniq("t")
        gw = await connect_gateway(hub, self.token(sub, ("t-*",)), ssl_ctx=ssl_ctx)
        try:
            rep = await gw.announce([(dev, "thermostat")], timeout=bound + 3)
            self.assertEqual(rep.get("accepted"), [dev], "canary announce: %r" % rep)
            t0 = time.monotonic()
            rep = await gw.telemetry(1, [reading(dev, 20.0)], timeout=bound + 3)
            took = time.monotonic() - t0
            self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", 1),
                             "canary telemetry: %r" % rep)
            self.assertLess(took, bound, "canary ack took %.3f s (bound %.1f s)" % (took, bound))
            return took
        finally:
            await gw.close()

    async def assert_unharmed(self, hub, redis=None, base=None, rss_mib=64, redis_mib=8,
                              ack_bound=ACK_BOUND_S, ssl_ctx=None):
        """The after-attack checks (module docstring). rss_mib: absolute
        bound on the hub's RSS; redis_mib: bound on Redis's growth since
        base (a baseline() taken before the attack); ssl_ctx: a client
        context for a TLS hub."""
        hub.check_alive()
        t0 = time.monotonic()
        st, _, body = await asyncio.get_running_loop().run_in_executor(
            None, lambda: http_get(hub, "/healthz", timeout=HEALTH_BOUND_S + 3, ssl_ctx=ssl_ctx))
        took = time.monotonic() - t0
        self.assertEqual(st, 200, "/healthz after the attack: %s %r" % (st, body))
        self.assertLess(took, HEALTH_BOUND_S, "/healthz took %.3f s" % took)
        ack = await self.normal_gateway_ack(hub, ack_bound, ssl_ctx)
        rss = rss_kib(hub.pid)
        bound = san_kib(rss_mib * 1024)
        grown = redis_used_memory(redis) - base["redis"] if redis is not None and base else 0
        # The measured numbers, for the record (ctest --output-on-failure / -V).
        sys.stderr.write("%s: after the attack: RSS %.1f MiB (bound %.0f), Redis %+.2f MiB "
                         "(bound %d), canary ack %.0f ms, /healthz %.0f ms\n"
                         % (self.id().rsplit(".", 1)[-1], rss / 1024, bound / 1024,
                            grown / 1048576, redis_mib, ack * 1000, took * 1000))
        self.assertLess(rss, bound, "hub RSS %.1f MiB over the bound %.1f MiB"
                        % (rss / 1024, bound / 1024))
        if redis is not None and base is not None:
            self.assertLess(grown, redis_mib * 1024 * 1024,
                            "Redis used_memory grew by %.1f MiB (bound %d MiB)"
                            % (grown / 1048576, redis_mib))
        hub.check_alive()
        hub.check_sanitizers()

    def assert_not_spinning(self, hub, seconds=1.0, max_share=0.5):
        """The hub used less than max_share of one core over `seconds`."""
        a = cpu_seconds(hub.pid)
        time.sleep(seconds)
        used = cpu_seconds(hub.pid) - a
        self.assertLess(used / seconds, max_share,
                        "hub used %.0f %% of a core while idle (spinning?)" % (100 * used / seconds))
