"""The Debian package, as an operator gets it (docs/operations.md "Install"):
tools/make-deb builds it from this tree, `dpkg -i` installs it on this
machine, the INSTALLED binary runs with the INSTALLED config (as the iot-hub
user, overriding only listen and redis) against a real redis-server on a free
loopback port and answers /readyz 200; the installed units pass
`systemd-analyze verify` and score at most MAX_EXPOSURE in `systemd-analyze
security --offline=true`; an edited config survives a reinstall; `dpkg -r`
keeps config, data and user, `dpkg --purge` removes them. systemd is not PID 1
here: the hub is started directly, never with systemctl.

Needs root and dpkg (skipped, exit 77, otherwise) and a machine where no
iot-hub package or user exists yet (skipped too: the test would remove
them). Whatever happens, the package is purged and the processes it started
are stopped at the end. Label `package`."""

import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.environ.get("HUB_SOURCE_DIR") or os.path.join(HERE, "..", "..")
BUILD = os.environ.get("HUB_BUILD_DIR") or os.path.join(SRC, "build")
sys.path.insert(0, os.path.join(SRC, "tests", "integration"))
from harness import Redis, free_port, wait_until  # noqa: E402

SKIP = 77
MAX_EXPOSURE = 2.0
PKG = "iot-hub"
UNITS = ("iot-hub.service", "iot-hub@.service", "iot-sink.service")


def skip(why):
    print("SKIPPED: %s" % why, flush=True)
    sys.exit(SKIP)


def run(*cmd, check=True, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError("%s: exit %d\n%s%s" % (" ".join(cmd), p.returncode, p.stdout, p.stderr))
    return p


def pkg_status():
    p = run("dpkg-query", "-W", "-f=${Status}", PKG, check=False)
    return p.stdout.strip() if p.returncode == 0 else ""


def user_exists(name):
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def syscall_group(name, seen=None):
    """The system calls of a systemd-analyze syscall-filter group, nested
    groups expanded."""
    seen = seen if seen is not None else set()
    if name in seen:
        return set()
    seen.add(name)
    out = run("systemd-analyze", "syscall-filter", name).stdout.splitlines()[1:]
    calls = set()
    for line in out:
        w = line.strip()
        if not w or w.startswith("#"):
            continue
        calls |= syscall_group(w.split()[0], seen) if w.startswith("@") else {w.split()[0]}
    return calls


def unit_filter(path):
    """(allowed system calls, allowed address families) of a unit file."""
    allowed, families = None, None
    with open(path) as f:
        for line in f:
            k, _, v = line.strip().partition("=")
            if k == "SystemCallFilter":
                deny = v.startswith("~")
                names = set()
                for w in v.lstrip("~").split():
                    names |= syscall_group(w) if w.startswith("@") else {w}
                allowed = (allowed - names) if deny else ((allowed or set()) | names)
            elif k == "RestrictAddressFamilies":
                families = set(v.split())
    return allowed, families


def http_status(port, path):
    p = run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3",
            "http://127.0.0.1:%d%s" % (port, path), check=False)
    return int(p.stdout or 0)


class Package(unittest.TestCase):
    deb = None

    @classmethod
    def setUpClass(cls):
        out = os.path.join(BUILD, "deb")
        p = run(os.path.join(SRC, "tools", "make-deb"), out, check=False)
        if p.returncode != 0:
            raise AssertionError("tools/make-deb failed:\n%s%s" % (p.stdout, p.stderr[-4000:]))
        debs = sorted(glob.glob(os.path.join(out, "iot-hub_*.deb")))
        assert debs, "tools/make-deb made no .deb in %s" % out
        cls.deb = debs[-1]

    def setUp(self):
        self.procs = []
        self.addCleanup(self.cleanup)

    def cleanup(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if pkg_status():
            run("dpkg", "--purge", PKG, check=False)

    def check_trace(self, trace):
        """Every system call (after setpriv's exec of the hub) and socket
        family in the strace is one the installed unit allows."""
        allowed, families = unit_filter("/lib/systemd/system/iot-hub.service")
        self.assertTrue(allowed and families)
        used, fams, started = set(), set(), False
        with open(trace) as f:
            for line in f:
                if not started:
                    started = 'execve("/usr/bin/iot-hub"' in line
                    continue
                m = re.match(r"^\d+ +([a-z0-9_]+)\(", line)
                if m:
                    used.add(m.group(1))
                fams.update(re.findall(r"socket\((AF_[A-Z0-9]+)", line))
        self.assertTrue(started, "no exec of /usr/bin/iot-hub in the trace")
        self.assertGreater(len(used), 20)
        print("system calls of the installed hub: %d, all allowed: %s" % (len(used), used <= allowed),
              flush=True)
        self.assertEqual(sorted(used - allowed), [], "calls the unit's SystemCallFilter denies")
        self.assertEqual(sorted(fams - families), [], "families RestrictAddressFamilies denies")

    def test_install_run_purge(self):
        # the control data: Depends from shlibdeps, the conffile, scripts
        info = run("dpkg-deb", "-f", self.deb, "Depends").stdout
        for lib in ("libwebsockets17", "libhiredis0.14", "libjansson4", "libjwt0", "libssl3", "adduser",
                    "libwebsockets-evlib-ev", "libpq5"):
            self.assertIn(lib, info, "Depends")
        ctl = os.path.join(BUILD, "deb", "control")
        shutil.rmtree(ctl, ignore_errors=True)
        run("dpkg-deb", "-e", self.deb, ctl)
        with open(os.path.join(ctl, "conffiles")) as f:
            self.assertEqual(f.read().split(), ["/etc/iot-hub/iot-hub.conf", "/etc/iot-hub/iot-sink.env"])

        run("dpkg", "-i", self.deb)
        self.assertEqual(pkg_status(), "install ok installed")
        for f in ("/usr/bin/iot-hub", "/usr/bin/iot-token", "/usr/bin/hubctl", "/usr/bin/gw-sim",
                  "/usr/bin/iot-hub-migrate-layout", "/etc/iot-hub/iot-hub.conf",
                  "/etc/iot-hub/jwt.secret", "/etc/iot-hub/api-keys.json",
                  "/usr/share/iot-hub/device-types/thermostat.json",
                  "/usr/share/iot-hub/web/index.html",
                  "/lib/systemd/system/iot-hub.service", "/lib/systemd/system/iot-hub@.service",
                  "/usr/bin/iot-sink", "/lib/systemd/system/iot-sink.service", "/etc/iot-hub/iot-sink.env"):
            self.assertTrue(os.path.exists(f), f)
        self.assertTrue(user_exists("iot-hub"))
        st = os.stat("/var/lib/iot-hub")
        self.assertEqual((st.st_mode & 0o777, pwd.getpwuid(st.st_uid).pw_name), (0o750, "iot-hub"))
        st = os.stat("/etc/iot-hub/jwt.secret")
        self.assertEqual(st.st_mode & 0o777, 0o640)
        with open("/etc/iot-hub/jwt.secret") as f:
            secret = f.read()
        self.assertRegex(secret, r"^[0-9a-f]{64}$")

        # the units, as installed
        for u in UNITS:
            path = "/lib/systemd/system/" + u
            p = run("systemd-analyze", "verify", path, check=False)
            self.assertEqual((p.returncode, p.stdout + p.stderr), (0, ""), "systemd-analyze verify " + u)
            p = run("systemd-analyze", "security", "--offline=true", path, check=False)
            m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", p.stdout + p.stderr)
            self.assertTrue(m, p.stdout + p.stderr)
            print("systemd-analyze security --offline=true %s: %s" % (u, m.group(1)), flush=True)
            self.assertLessEqual(float(m.group(1)), MAX_EXPOSURE, u)

        # the installed hub with the installed config, as its user
        redis = Redis(extra=["--appendonly", "yes"])
        self.addCleanup(redis.stop)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("IOT_HUB_")}
        # under strace when there is one: the calls the installed hub makes
        # must pass the unit's SystemCallFilter and RestrictAddressFamilies
        trace = os.path.join(BUILD, "deb", "hub.strace")
        tracer = ["strace", "-f", "-qq", "-o", trace] if shutil.which("strace") else []
        hub = subprocess.Popen(
            tracer + ["setpriv", "--reuid=iot-hub", "--regid=iot-hub", "--init-groups", "--",
             "/usr/bin/iot-hub", "--config", "/etc/iot-hub/iot-hub.conf",
             "--listen", "127.0.0.1:%d" % port, "--redis", redis.url],
            cwd="/var/lib/iot-hub", env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.procs.append(hub)
        wait_until(lambda: hub.poll() is not None or http_status(port, "/readyz") == 200, 15,
                   what="/readyz 200 from the installed hub")
        self.assertIsNone(hub.poll(), "the installed hub exited")
        self.assertEqual(http_status(port, "/healthz"), 200)
        self.assertEqual(http_status(port, "/"), 200, "web-root /usr/share/iot-hub/web")
        metrics = run("curl", "-s", "http://127.0.0.1:%d/metrics" % port).stdout
        self.assertIn('iot_hub_device_types 3', metrics)
        wait_until(lambda: 'iot_hub_redis_persistence{mode="aof"} 1' in
                   run("curl", "-s", "http://127.0.0.1:%d/metrics" % port).stdout, 5,
                   what="iot_hub_redis_persistence aof")
        # a token minted with the installed tool and the installed secret
        tok = run("/usr/bin/iot-token", "jwt", "--alg", "HS256", "--key", "/etc/iot-hub/jwt.secret",
                  "--sub", "gw-pkg", "--devices", "t-*").stdout.strip()
        code = run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3",
                   "-H", "Connection: Upgrade", "-H", "Upgrade: websocket",
                   "-H", "Sec-WebSocket-Version: 13", "-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                   "-H", "Sec-WebSocket-Protocol: iot-gateway.v1", "-H", "Authorization: Bearer " + tok,
                   "http://127.0.0.1:%d/v1/gateway" % port, check=False).stdout
        self.assertEqual(code, "101", "gateway upgrade with a token of the installed secret")
        pid = int(run("pgrep", "-x", "-P", str(hub.pid), "iot-hub", check=False).stdout.split()[0]) \
            if tracer else hub.pid
        os.kill(pid, signal.SIGHUP)
        time.sleep(0.5)
        os.kill(pid, signal.SIGTERM)
        out, _ = hub.communicate(timeout=20)
        self.assertEqual(hub.returncode, 0, out[-3000:])
        if tracer:
            self.check_trace(trace)

        # an edited config survives a reinstall (a conffile); the secret too
        with open("/etc/iot-hub/iot-hub.conf", "a") as f:
            f.write("\n# edited by the operator\n")
        run("dpkg", "-i", "--force-confold", self.deb)
        with open("/etc/iot-hub/iot-hub.conf") as f:
            self.assertIn("# edited by the operator", f.read())
        with open("/etc/iot-hub/jwt.secret") as f:
            self.assertEqual(f.read(), secret)

        # remove keeps config, data and user; purge removes them
        run("dpkg", "-r", PKG)
        self.assertFalse(os.path.exists("/usr/bin/iot-hub"))
        self.assertTrue(os.path.exists("/etc/iot-hub/iot-hub.conf"))
        self.assertTrue(os.path.isdir("/var/lib/iot-hub"))
        self.assertTrue(user_exists("iot-hub"))
        run("dpkg", "--purge", PKG)
        self.assertEqual(pkg_status(), "")
        for f in ("/usr/bin/iot-hub", "/etc/iot-hub", "/var/lib/iot-hub", "/usr/share/iot-hub",
                  "/lib/systemd/system/iot-hub.service"):
            self.assertFalse(os.path.exists(f), f + " left after purge")
        self.assertFalse(user_exists("iot-hub"), "user iot-hub left after purge")


if __name__ == "__main__":
    if os.geteuid() != 0:
        skip("needs root (dpkg -i, a system user)")
    for tool in ("dpkg", "dpkg-deb", "dpkg-shlibdeps", "cpack", "setpriv", "curl", "systemd-analyze"):
        if not shutil.which(tool):
            skip("%s is not installed" % tool)
    if pkg_status() or user_exists("iot-hub") or os.path.exists("/etc/iot-hub"):
        skip("an iot-hub package, user or /etc/iot-hub exists on this machine; this test "
             "installs and purges its own and will not touch those")
    unittest.main(verbosity=2)
