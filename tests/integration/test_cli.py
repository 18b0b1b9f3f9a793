"""Command line and config (docs/configuration.md): a bad flag, value or file exits
non-zero with one line on stderr; SIGTERM exits 0; embedded Redis; the config
file is read, flags override it and IOT_HUB_* variables override both."""

import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (HUB_BIN, SCHEMAS_DIR, HubTestCase, Resp, child_pids, clean_env, dev_certs,  # noqa: E402
                     hs256, gw_claims, http_get, main, pid_alive, proc_cmdline, reading, rkeys, try_upgrade, uniq,
                     wait_until, write_file)


class CLI(HubTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        cls.secret_b = b"second-secret-" + os.urandom(8).hex().encode()
        cls.secret_b_file = write_file(os.path.join(cls.tmp, "b.secret"), cls.secret_b)

    def base(self):
        return ["--listen", "127.0.0.1:0", "--redis", self.redis.url, "--schemas", SCHEMAS_DIR,
                "--jwt-alg", "HS256", "--jwt-key", self.secret_file]

    def run_bad(self, args, env=None, what=None):
        """Runs the hub expecting a quick non-zero exit with one stderr line."""
        what = what or " ".join(args)
        try:
            p = subprocess.run([HUB_BIN] + args, capture_output=True, text=True, timeout=10,
                               env=clean_env(env), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            self.fail("%s: hub still running after 10 s (expected a refusal); stderr %r"
                      % (what, (e.stderr or b"")[-500:]))
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        self.assertNotEqual(p.returncode, 0, "%s: exit code 0; stderr %r" % (what, p.stderr))
        self.assertFalse(p.returncode < 0, "%s: killed by signal %d" % (what, -p.returncode))
        self.assertEqual(len(lines), 1, "%s: expected one stderr line, got %r" % (what, p.stderr))
        self.assertNotIn("listening on", p.stderr, what)
        return lines[0]

    def status(self, hub, secret, sub=None):
        return try_upgrade(hub, hs256(gw_claims(sub or uniq("gw")), secret))[0]

    async def test_bad_flags(self):
        line = self.run_bad(self.base() + ["--no-such-flag", "1"])
        self.assertIn("no-such-flag", line)
        self.run_bad(self.base() + ["stray-argument"])
        self.run_bad(self.base() + ["--jwt-key"], what="flag without a value")

    async def test_bad_values(self):
        for extra in (["--max-frame-bytes", "abc"], ["--max-frame-bytes", "10"],
                      ["--device-rate", "-1"], ["--listen", "nonsense"], ["--listen", "127.0.0.1:99999"],
                      ["--jwt-alg", "HS999"], ["--jwt-alg", "none"], ["--log-level", "chatty"],
                      ["--redis", "http://127.0.0.1:6379"]):
            self.run_bad(self.base() + extra)

    async def test_bad_files(self):
        self.run_bad(self.base() + ["--config", "/nonexistent/iot-hub.conf"])
        self.run_bad(self.base() + ["--schemas", "/nonexistent/schemas"])
        self.run_bad(self.base() + ["--jwt-key", "/nonexistent/key"])
        bad_schema = os.path.join(self.tmp, "bad-schemas")
        os.makedirs(bad_schema, exist_ok=True)
        write_file(os.path.join(bad_schema, "x.json"), '{"device_type": "x", ')
        self.run_bad(self.base() + ["--schemas", bad_schema], what="broken schema file")
        # RS256 with a key file that is not a PEM public key
        self.run_bad(self.base() + ["--jwt-alg", "RS256"], what="RS256 with an HS secret as key")
        short = write_file(os.path.join(self.tmp, "short.secret"), "tooshort")
        self.run_bad(self.base() + ["--jwt-key", short], what="HS256 secret under 16 bytes")
        certs = dev_certs()
        self.run_bad(self.base() + ["--jwt-alg", "RS256", "--jwt-key", os.path.join(certs, "jwt-rs256.key")],
                     what="RS256 with the private key as --jwt-key")
        self.run_bad(self.base() + ["--jwt-alg", "RS256", "--jwt-key", os.path.join(certs, "jwt-es256.pub.pem")],
                     what="RS256 with an EC public key")
        self.run_bad(self.base() + ["--tls-cert", os.path.join(certs, "server.pem"),
                                    "--tls-key", os.path.join(certs, "client.key")],
                     what="TLS key that does not match the cert")
        self.run_bad(self.base() + ["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key"],
                     what="missing TLS files")
        conf = write_file(os.path.join(self.tmp, "bad.conf"), "listen 127.0.0.1:0\nno-such-key 1\n")
        self.run_bad(["--config", conf], what="config file with an unknown key")

    async def test_sigterm_exits_0_with_gateway_connected(self):
        hub = self.start_hub(self.redis)
        gw = await self.gateway(hub)
        d = uniq("t")
        await gw.announce([(d, "thermostat")])
        rep = await gw.telemetry(1, [reading(d)])
        self.assertEqual(rep.get("type"), "ack", rep)
        t0 = time.monotonic()
        hub.stop(10)  # asserts exit code 0
        code = await gw.wait_closed(5)
        self.assertIsNotNone(code)
        self.assertLess(time.monotonic() - t0, 10)

    async def test_embedded_redis(self):
        hub = self.start_hub(None, args=["--listen", "127.0.0.1:0", "--schemas", SCHEMAS_DIR,
                                         "--jwt-alg", "HS256", "--jwt-key", self.secret_file], timeout=20,
                             cwd=self.tmp)  # its data: ./iot-hub-data
        gw = await self.gateway(hub)
        d = uniq("t")
        rep = await gw.announce([(d, "thermostat")])
        self.assertEqual(rep.get("accepted"), [d], rep)
        rep = await gw.telemetry(1, [reading(d, 20.0), reading(d, 21.0)])
        self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", 2), rep)
        kids = [p for p in child_pids(hub.pid) if any("redis-server" in a for a in proc_cmdline(p)[:1])]
        self.assertTrue(kids, "no redis-server child of the hub (embedded mode)")
        m = re.search(r"--port\s+(\d+)|:(\d+)\s*$", " ".join(proc_cmdline(kids[0])))
        if m:  # we can see the port: the readings are really there
            port = int(m.group(1) or m.group(2))
            c = Resp(port)
            try:
                self.assertEqual(c.cmd("XLEN", rkeys.tm(d)), 2)
            finally:
                c.close()
        await gw.close()
        hub.stop(15)
        wait_until(lambda: not any(pid_alive(k) for k in kids), 5,
                   what="embedded redis-server to exit with the hub")

    async def test_embedded_redis_explicit(self):
        hub = self.start_hub(None, extra=["--redis", "embedded", "--data-dir",
                                          os.path.join(self.tmp, "explicit-data")], timeout=20)
        gw = await self.gateway(hub)
        d = uniq("t")
        await gw.announce([(d, "thermostat")])
        rep = await gw.telemetry(1, [reading(d)])
        self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", 1), rep)
        await gw.close()
        hub.stop(15)

    async def test_config_file(self):
        conf = write_file(os.path.join(self.tmp, "hub.conf"), "\n".join([
            "# iot-hub test config",
            "",
            "listen 127.0.0.1:0",
            "redis %s" % self.redis.url,
            "   # indented comment",
            "schemas %s" % SCHEMAS_DIR,
            "jwt-alg HS256",
            "jwt-key %s" % self.secret_file,
            "max-readings-per-frame 3",
            "",
        ]))
        hub = self.start_hub(None, args=["--config", conf])
        self.assertEqual(self.status(hub, self.secret), 101)
        gw = await self.gateway(hub)
        d = uniq("t")
        await gw.announce([(d, "thermostat")])
        rep = await gw.telemetry(1, [reading(d) for _ in range(3)])
        self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", 3), rep)
        rep = await gw.telemetry(2, [reading(d) for _ in range(4)])
        self.assertFalse(rep.get("type") == "ack" and rep.get("accepted") == 4,
                         "max-readings-per-frame 3 from the config file ignored: %r" % rep)
        self.assertEqual(self.redis.xlen(rkeys.tm(d)), 3 + (rep.get("accepted") or 0))
        hub.stop()

    async def test_flag_overrides_file_and_env_overrides_both(self):
        conf = write_file(os.path.join(self.tmp, "prec.conf"), "\n".join([
            "listen 127.0.0.1:0", "redis %s" % self.redis.url, "schemas %s" % SCHEMAS_DIR,
            "jwt-alg HS256", "jwt-key %s" % self.secret_file, "max-readings-per-frame 3", ""]))
        # flag beats file: jwt-key B from the flag
        hub = self.start_hub(None, args=["--config", conf, "--jwt-key", self.secret_b_file])
        self.assertEqual(self.status(hub, self.secret_b), 101, "flag --jwt-key should override the file")
        self.assertEqual(self.status(hub, self.secret), 401, "file's jwt-key should be overridden")
        hub.stop()
        # env beats flag and file: IOT_HUB_JWT_KEY = A again, IOT_HUB_MAX_READINGS_PER_FRAME = 2
        hub = self.start_hub(None, args=["--config", conf, "--jwt-key", self.secret_b_file,
                                         "--max-readings-per-frame", "5"],
                             env={"IOT_HUB_JWT_KEY": self.secret_file, "IOT_HUB_MAX_READINGS_PER_FRAME": "2"})
        self.assertEqual(self.status(hub, self.secret), 101, "IOT_HUB_JWT_KEY should override --jwt-key")
        self.assertEqual(self.status(hub, self.secret_b), 401)
        gw = await self.gateway(hub)
        d = uniq("t")
        await gw.announce([(d, "thermostat")])
        rep = await gw.telemetry(1, [reading(d) for _ in range(2)])
        self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", 2), rep)
        rep = await gw.telemetry(2, [reading(d) for _ in range(3)])
        self.assertFalse(rep.get("type") == "ack" and rep.get("accepted") == 3,
                         "IOT_HUB_MAX_READINGS_PER_FRAME=2 should beat the flag (5) and the file (3): %r" % rep)
        await gw.close()
        hub.stop()

    async def test_env_only(self):
        env = {"IOT_HUB_LISTEN": "127.0.0.1:0", "IOT_HUB_REDIS": self.redis.url,
               "IOT_HUB_SCHEMAS": SCHEMAS_DIR, "IOT_HUB_JWT_ALG": "HS256", "IOT_HUB_JWT_KEY": self.secret_file}
        hub = self.start_hub(None, args=[], env=env)
        self.assertEqual(self.status(hub, self.secret), 101)
        hub.stop()

    async def test_no_jwt_key_refused_without_dev(self):
        args = ["--listen", "127.0.0.1:0", "--redis", self.redis.url, "--schemas", SCHEMAS_DIR]
        p = subprocess.run([HUB_BIN] + args, capture_output=True, text=True, timeout=10,
                           env=clean_env(), stdin=subprocess.DEVNULL)
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertIn("ephemeral JWT secret", p.stderr)
        self.assertIn("--dev", p.stderr)
        self.assertNotIn("listening on", p.stderr)
        # --dev: the ephemeral secret and the printed dev token, as before
        hub = self.start_hub(None, args=args + ["--dev"])
        wait_until(lambda: any("Dev gateway token" in l for l in hub.out_lines), 5,
                   what="the dev token on stdout")
        hub.stop()

    async def test_mistyped_env_variable_is_reported(self):
        hub = self.start_hub(self.redis, env={"IOT_HUB_JWT_KYE": "/x", "IOT_HUB_MAX_FRAME_BYTE": "1"})
        text = hub.stderr_text()
        self.assertRegex(text, r"IOT_HUB_JWT_KYE .*not a configuration key.*closest key: IOT_HUB_JWT_KEY")
        self.assertRegex(text, r"IOT_HUB_MAX_FRAME_BYTE .*closest key: IOT_HUB_MAX_FRAME_BYTES")
        self.assertNotIn("IOT_HUB_CONFIG", text)
        hub.stop()

    async def test_redis_without_persistence_is_reported(self):
        # the harness's Redis keeps nothing (no AOF, no save points)
        hub = self.start_hub(self.redis)
        hub.wait_line(r"has no persistence \(appendonly no, no save points\)", timeout=5)
        wait_until(lambda: 'iot_hub_redis_persistence{mode="none"} 1' in http_get(hub, "/metrics")[2], 5,
                   what="iot_hub_redis_persistence none")
        hub.stop()

    async def test_bad_env_value(self):
        self.run_bad(self.base(), env={"IOT_HUB_MAX_FRAME_BYTES": "lots"}, what="IOT_HUB_MAX_FRAME_BYTES=lots")


if __name__ == "__main__":
    main()
