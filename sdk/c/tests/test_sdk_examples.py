"""The SDKs as a user gets them: `cmake --install` puts libiothub-gw, its
header and iothub-gw.pc under a prefix, the C example builds there with
pkg-config alone; both examples (C and Python) stream a sensor file into the
real hub and run reboot, config and firmware_update to their end."""

import os
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.environ.get("HUB_SOURCE_DIR") or os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.join(SOURCE, "tests", "integration"))

import harness as H  # noqa: E402
from harness import HubTestCase, rkeys, uniq, wait_until  # noqa: E402

KEY = "sdk-example-key-0123456789abcdef"


class Examples(HubTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis, extra=["--api-keys", H.api_keys_file(
            {"ops": (KEY, ["commands:write", "telemetry:read"])})])

    def setUp(self):
        self.dir = H.mkdtemp("iot-hub-sdk-ex-")
        self.addCleanup(H.rmtree, self.dir)
        self.sensor = H.write_file(os.path.join(self.dir, "temp"), "23500\n")

    def installed_example(self, name="sensor_gateway"):
        prefix = os.path.join(self.dir, "prefix")
        r = subprocess.run(["cmake", "--install", os.path.join(H.BUILD_DIR, "sdk"), "--prefix", prefix],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        libdir = [d for d in ("lib", "lib64", "lib/x86_64-linux-gnu") if
                  os.path.exists(os.path.join(prefix, d, "pkgconfig", "iothub-gw.pc"))][0]
        env = dict(os.environ, PKG_CONFIG_PATH=os.path.join(prefix, libdir, "pkgconfig"))
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "iothub-gw"], env=env,
                               capture_output=True, text=True, check=True).stdout.split()
        out = os.path.join(self.dir, name)
        if os.environ.get("HUB_SANITIZE") == "1":   # the library is instrumented
            flags += ["-fsanitize=address,undefined"]
        r = subprocess.run(["cc", "-Wall", "-Werror", os.path.join(SOURCE, "sdk", "c", "examples",
                            name + ".c")] + flags + ["-o", out], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        return [out], {"LD_LIBRARY_PATH": os.path.join(prefix, libdir)}

    def run_example(self, cmd, env, spool):
        sub, dev = uniq("gw"), uniq("t")
        token = self.token(sub, devices=("t-*",))
        log = open(os.path.join(self.dir, "example.log"), "w")
        self.addCleanup(log.close)
        p = subprocess.Popen(cmd + [self.hub.url(), token, spool, dev, self.sensor, "0.2" if
                                    cmd[0].endswith("python3") else "200"],
                             stdout=log, stderr=subprocess.STDOUT, env=H.clean_env(env))
        self.addCleanup(lambda: p.poll() is None and p.kill())
        wait_until(lambda: self.redis.xlen(rkeys.tm(dev)) >= 3, 20, what="3 readings stored")
        _, f = self.redis.xrange(rkeys.tm(dev))[0]
        self.assertEqual(f["gw"], sub)
        self.assertIn('"temperature":23.5', f["data"])
        ids = {}
        for name, params in (("reboot", {"delay_s": 1}), ("config", {"setpoint": 19.5}),
                             ("firmware_update", {"url": "https://fw/x", "version": "2.4.1",
                                                  "sha256": "a" * 64})):
            st, body = H.http_json(self.hub, "POST", "/v1/devices/%s/commands" % dev,
                                   {"name": name, "params": params}, key=KEY)
            self.assertIn(st, (200, 201, 202), body)
            ids[name] = body["id"]

        def finished():
            got = {n: H.http_json(self.hub, "GET", "/v1/commands/%s" % i, key=KEY)[1] for n, i in ids.items()}
            return all(c.get("status") == "succeeded" for c in got.values()) and got
        got = wait_until(finished, 20, what="commands succeeded")
        self.assertEqual(got["config"].get("result"), {"setpoint": 19.5})
        self.assertEqual(got["firmware_update"].get("result"), {"version": "2.4.1"})
        p.send_signal(signal.SIGTERM)
        self.assertEqual(p.wait(15), 0)

    def test_c_example_installed(self):
        if not shutil.which("cc") or not shutil.which("pkg-config"):
            self.fail("cc and pkg-config are needed")
        cmd, env = self.installed_example()
        self.run_example(cmd, env, os.path.join(self.dir, "spool"))

    def test_c_poll_example_installed(self):
        """poll_gateway: the application's own poll() loop on stdin and the
        gateway's descriptor, no library thread; 300 lines in, each stored
        once, and at the end of input it exits once everything is acked."""
        if not shutil.which("cc") or not shutil.which("pkg-config"):
            self.fail("cc and pkg-config are needed")
        cmd, env = self.installed_example("poll_gateway")
        sub, devs = uniq("gw"), [uniq("t"), uniq("t")]
        lines = "".join("%s %d.5\n" % (devs[i % 2], i % 40) for i in range(300))
        p = subprocess.Popen(cmd + [self.hub.url(), self.token(sub, devices=("t-*",)),
                                    os.path.join(self.dir, "spool")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=H.clean_env(env))
        self.addCleanup(lambda: p.poll() is None and p.kill())
        # in two parts, the second after a pause: the loop waits on stdin too
        p.stdin.write(lines[:len(lines) // 2])
        p.stdin.flush()
        wait_until(lambda: self.redis.xlen(rkeys.tm(devs[0])) >= 50, 20, what="first half stored")
        out, err = p.communicate(lines[len(lines) // 2:], timeout=40)
        self.assertEqual(p.returncode, 0, out + err)
        self.assertIn("accepted 300 acked 300 pending 0", out, err)
        for d in devs:
            entries = self.redis.xrange(rkeys.tm(d))
            self.assertEqual(len(entries), 150)
            self.assertEqual({f["gw"] for _, f in entries}, {sub})

    def test_python_example(self):
        env = {"PYTHONPATH": os.path.join(SOURCE, "sdk", "python")}
        self.run_example(["/usr/bin/python3", os.path.join(SOURCE, "sdk", "python", "examples",
                          "sensor_gateway.py")], env, os.path.join(self.dir, "spool.db"))


if __name__ == "__main__":
    H.main()
