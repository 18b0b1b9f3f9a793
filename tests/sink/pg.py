"""A real PostgreSQL 15 for the sink tests: Debian's initdb and pg_ctl in a
temp directory owned by the postgres user (initdb refuses root), on a free
loopback port, run through `runuser -u postgres --` when the tests run as
root. Queries go through psql (no Python driver needed)."""

import os
import pwd
import shutil
import subprocess
import tempfile

from harness import free_port, wait_until

PG_BIN = os.environ.get("HUB_PG_BIN") or "/usr/lib/postgresql/15/bin"


def _as_postgres():
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


class Postgres:
    """initdb + pg_ctl start; .conninfo for the sink; .sql(text) runs psql
    and returns its rows (tab-separated fields); stop() and restart()."""

    def __init__(self):
        if not os.path.exists(os.path.join(PG_BIN, "initdb")):
            raise AssertionError("PostgreSQL 15 is missing (%s): deploy/install-deps.sh installs "
                                 "postgresql-15" % PG_BIN)
        self.dir = tempfile.mkdtemp(prefix="iot-sink-pg-")
        os.chmod(self.dir, 0o755)
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        out = subprocess.run(_as_postgres() + [os.path.join(PG_BIN, "initdb"), "-D", self.data,
                                               "-A", "trust", "-U", self.user, "-E", "UTF8",
                                               "--no-sync"],
                             capture_output=True, text=True, timeout=120)
        if out.returncode:
            raise AssertionError("initdb failed: %s%s" % (out.stdout[-1500:], out.stderr[-1500:]))
        self.start()

    @property
    def conninfo(self):
        return "host=127.0.0.1 port=%d user=%s dbname=postgres connect_timeout=3" % (self.port, self.user)

    def _ctl(self, *args, timeout=60):
        return subprocess.run(_as_postgres() + [os.path.join(PG_BIN, "pg_ctl"), "-D", self.data] + list(args),
                              capture_output=True, text=True, timeout=timeout)

    def start(self):
        opts = ("-c listen_addresses=127.0.0.1 -c port=%d -c unix_socket_directories=%s "
                "-c fsync=off -c full_page_writes=off -c max_connections=50" % (self.port, self.dir))
        out = self._ctl("-w", "-t", "60", "-l", os.path.join(self.dir, "log"), "-o", opts, "start")
        if out.returncode:
            raise AssertionError("pg_ctl start failed: %s%s\n%s" % (out.stdout, out.stderr, self.log_tail()))
        wait_until(lambda: self.ready(), 30, interval=0.1, what="PostgreSQL accepting connections")

    def ready(self):
        try:
            return self.sql("SELECT 1") == [["1"]]
        except AssertionError:
            return False

    def stop(self, mode="fast"):
        self._ctl("-w", "-m", mode, "stop")

    def restart(self):
        self.stop()
        self.start()

    def log_tail(self, n=30):
        try:
            with open(os.path.join(self.dir, "log"), errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def sql(self, text, timeout=30):
        out = subprocess.run(["psql", "-X", "-q", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1",
                              "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", "postgres",
                              "-c", text], capture_output=True, text=True, timeout=timeout)
        if out.returncode:
            raise AssertionError("psql: %s" % out.stderr.strip())
        return [line.split("\t") for line in out.stdout.splitlines() if line != ""]

    def cleanup(self):
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------
# iot-sink processes

import re  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

from harness import BUILD_DIR, SANITIZER_MARKERS, log_root, parse_metrics  # noqa: E402

SINK_BIN = os.environ.get("HUB_SINK_BIN") or os.path.join(BUILD_DIR, "sink", "iot-sink")
_sinks = iter(range(1, 1 << 30))


class Sink:
    """Runs iot-sink with flags; its stderr is collected (and kept in the
    test's log dir); waits for its `metrics listening on` line."""

    METRICS_RE = re.compile(r"metrics listening on (\S+):(\d+)")

    def __init__(self, redis_url, conninfo, consumer="c1", extra=(), env=None, wait=True):
        self.args = [SINK_BIN, "--redis", redis_url, "--pg", conninfo, "--consumer", consumer,
                     "--metrics-listen", "127.0.0.1:0", "--batch-interval-ms", "300",
                     "--claim-idle-ms", "1500"] + [str(a) for a in extra]
        self.lines = []
        self.cond = threading.Condition()
        self.log = open(os.path.join(log_root(), "sink-%d.stderr" % next(_sinks)), "w")
        self.log.write("# %s\n" % " ".join(self.args))
        e = dict(os.environ)
        e.update(env or {})
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=e)
        self.pid = self.proc.pid
        threading.Thread(target=self._reader, daemon=True).start()
        self.port = None
        if wait:
            m = self.wait_line(self.METRICS_RE, 15)
            self.port = int(m.group(2))
            self.wait_line("reading \\d+ feed shard", 20)

    def _reader(self):
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            self.log.write(line + "\n")
            self.log.flush()
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()

    def wait_line(self, pattern, timeout=10, start=0):
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines[start:]:
                    m = rx.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self.cond.wait(0.2)):
                    raise AssertionError("iot-sink: no line matching %r within %ss (exit %s); last lines:\n%s"
                                         % (rx.pattern, timeout, self.proc.poll(), "\n".join(self.lines[-20:])))
                self.cond.wait(min(left, 0.2))

    def text(self):
        with self.cond:
            return "\n".join(self.lines)

    def metrics(self):
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.port, timeout=5) as r:
            return parse_metrics(r.read().decode())

    def metric(self, name, **labels):
        for (n, ls), v in self.metrics().items():
            if n == name and all(dict(ls).get(k) == str(x) for k, x in labels.items()):
                return v
        return None

    def wait_exit(self, timeout=20):
        return self.proc.wait(timeout)

    def stop(self, timeout=20):
        """SIGTERM; returns the exit code (after checking that no sanitizer
        reported anything: an ASan build reports leaks at exit)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.wait_exit(timeout)
        time.sleep(0.1)  # the reader thread takes the last lines
        self.check_sanitizers()
        return rc

    def check_sanitizers(self):
        text = self.text()
        for m in SANITIZER_MARKERS:
            if m in text:
                raise AssertionError("iot-sink: sanitizer report:\n%s" % text[-4000:])

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def cleanup(self):
        self.kill()
        self.check_sanitizers()
        self.proc.stderr.close()
        self.log.close()
