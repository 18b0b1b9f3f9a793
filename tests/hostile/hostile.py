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
import os
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "integration"))
from harness import (HubTestCase, connect_gateway, http_get, main, now_ms,  # noqa: E402,F401
                     reading, uniq, wait_until)

ACK_BOUND_S = 2.0
HEALTH_BOUND_S = 2.0
# The ASan build roughly triples the hub's resident memory: bounds given in
# MiB for the normal build are scaled by this factor there.
SAN_FACTOR = 3.0 if os.environ.get("HUB_SANITIZE") == "1" else 1.0


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


def raw_connect(port, host="127.0.0.1", timeout=5.0):
    s = socket.create_connection((host, port), timeout=timeout)
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


class HostileCase(HubTestCase):
    """A HubTestCase with the after-attack checks. Subclasses start their
    hub(s) with start_hub()/class_hub() and call
    `await self.assert_unharmed(hub, redis, rss_mib=…, redis_mib=…)`."""

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
        ack_s = await self.normal_gateway_ack(hub, ack_bound, ssl_ctx)
        rss = rss_kib(hub.pid)
        bound = rss_mib * 1024 * SAN_FACTOR
        self.assertLess(rss, bound, "hub RSS %.1f MiB over the bound %.1f MiB"
                        % (rss / 1024, bound / 1024))
        grown = None
        if redis is not None and base is not None:
            grown = redis_used_memory(redis) - base["redis"]
            self.assertLess(grown, redis_mib * 1024 * 1024,
                            "Redis used_memory grew by %.1f MiB (bound %d MiB)"
                            % (grown / 1048576, redis_mib))
        # The measured numbers, for the record (ctest -V shows them).
        print("  [%s] unharmed: canary ack %.1f ms (bound %.0f), /healthz %.1f ms, RSS %.1f MiB "
              "(bound %.0f)%s" % (self._testMethodName, ack_s * 1000, ack_bound * 1000, took * 1000,
                                  rss / 1024, bound / 1024,
                                  "" if grown is None else ", Redis %+.1f KiB (bound %d MiB)"
                                  % (grown / 1024, redis_mib)))
        hub.check_alive()
        hub.check_sanitizers()

    def assert_not_spinning(self, hub, seconds=1.0, max_share=0.5):
        """The hub used less than max_share of one core over `seconds`."""
        a = cpu_seconds(hub.pid)
        time.sleep(seconds)
        used = cpu_seconds(hub.pid) - a
        self.assertLess(used / seconds, max_share,
                        "hub used %.0f %% of a core while idle (spinning?)" % (100 * used / seconds))
