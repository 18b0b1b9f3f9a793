"""The gateway simulator against a real hub: several gateways stream for a
few seconds; its JSON summary shows acks and no errors, and what Redis holds
matches what was acknowledged."""

import json
import os
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import SIM_BIN, TOKEN_BIN, HubTestCase, main, require_bin, rkeys, uniq, wait_until  # noqa: E402


class Sim(HubTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        require_bin(SIM_BIN, "HUB_SIM_BIN")
        require_bin(TOKEN_BIN, "HUB_TOKEN_BIN")
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis)

    def run_sim(self, *args, timeout=60):
        cmd = [SIM_BIN, "--url", self.hub.url(), *map(str, args), "--json-summary"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        try:
            summary = json.loads(p.stdout)
        except ValueError:
            self.fail("gw-sim printed no JSON summary (exit %d): stdout %r stderr %r"
                      % (p.returncode, p.stdout[-1000:], p.stderr[-1500:]))
        self.assertEqual(p.returncode, 0, "gw-sim exit %d; stderr %s" % (p.returncode, p.stderr[-1500:]))
        return summary

    def token_cmd(self, prefix):
        return "%s jwt --alg HS256 --key %s --sub {sub} --devices '%s-*' --ttl 600" % (
            shlex.quote(TOKEN_BIN), shlex.quote(self.secret_file), prefix)

    def stored(self, prefix):
        """{device: XLEN} of the telemetry stream of every device <prefix>*."""
        out, cursor = {}, "0"
        while True:
            cursor, found = self.redis.cmd("SCAN", cursor, "MATCH", rkeys.tm(prefix + "*"), "COUNT", 1000)
            for k in found:
                out[k[len(rkeys.tm("")):]] = self.redis.xlen(k)
            if cursor == "0":
                return out

    def assert_clean(self, s, expect_rejected=False):
        for k in ("hub_errors", "protocol_errors", "frames_acked", "readings_acked", "readings_rejected"):
            self.assertIn(k, s, "gw-sim summary without %s: %s" % (k, json.dumps(s)))
        # Counters a given gw-sim version may not report count as 0.
        for k in ("hub_errors", "protocol_errors", "auth_failures", "connect_failures", "takeovers",
                  "ack_mismatch", "unexpected_acks", "announce_rejected_devices", "unavailable",
                  "ack_timeouts", "frames_unacked_at_end", "frames_dropped", "disconnects"):
            self.assertEqual(s.get(k, 0), 0, "gw-sim summary %s = %r (want 0): %s" % (k, s.get(k), json.dumps(s)))
        self.assertGreater(s.get("frames_acked", 0), 0, json.dumps(s))
        self.assertGreater(s.get("readings_acked", 0), 0, json.dumps(s))
        if not expect_rejected:
            self.assertEqual(s.get("readings_rejected"), 0, json.dumps(s))

    async def test_five_gateways(self):
        prefix = uniq("simA")
        s = self.run_sim("--token-cmd", self.token_cmd(prefix), "--gateway-prefix", prefix,
                         "--gateways", 5, "--devices", 3, "--rate", 50, "--duration", 3)
        self.assert_clean(s)
        stored = self.stored(prefix)
        self.assertEqual(len(stored), 15, "streams for 5 x 3 devices: %r" % stored)
        self.assertEqual(sum(stored.values()), s["readings_acked"],
                         "readings in the streams of %s-* %r differ from the %d gw-sim saw acked"
                         % (prefix, stored, s["readings_acked"]))
        self.assertGreaterEqual(s["readings_acked"], 5 * 50 * 3 // 2,
                                "far fewer readings than 5 gateways x 50/s x 3 s: %s" % json.dumps(s))
        wait_until(lambda: self.redis.hgetall(rkeys.dev("%s-0004-d2" % prefix)).get("online") == "0", 5,
                   what="devices offline once gw-sim has gone")

    async def test_single_gateway_shared_token(self):
        # The brief's form: --token (one token for every gateway, so one gateway here).
        prefix = uniq("simB")
        tok = self.token("%s-0000" % prefix, devices=["%s-*" % prefix])
        s = self.run_sim("--token", tok, "--gateway-prefix", prefix, "--gateways", 1, "--devices", 3,
                         "--rate", 50, "--duration", 3)
        self.assert_clean(s)
        stored = self.stored(prefix)
        self.assertEqual(sum(stored.values()), s["readings_acked"], stored)
        self.assertEqual(stored.get("%s-0000-d0" % prefix, 0) + stored.get("%s-0000-d1" % prefix, 0)
                         + stored.get("%s-0000-d2" % prefix, 0), s["readings_acked"], stored)

    async def test_batches_with_bad_readings(self):
        prefix = uniq("simC")
        s = self.run_sim("--token-cmd", self.token_cmd(prefix), "--gateway-prefix", prefix,
                         "--gateways", 3, "--devices", 4, "--rate", 200, "--batch", 10, "--inflight", 4,
                         "--bad-ratio", 0.2, "--duration", 3)
        self.assert_clean(s, expect_rejected=True)
        self.assertGreater(s["readings_rejected"], 0, json.dumps(s))
        self.assertEqual(s["rejected_by_code"].get("invalid"), s["readings_rejected"], json.dumps(s))
        self.assertEqual(s["readings_bad_generated"], s["readings_rejected"], json.dumps(s))
        self.assertEqual(sum(self.stored(prefix).values()), s["readings_acked"])

    async def test_sdk_mode(self):
        """--sdk: the gateways are libiothub-gw's, driven from one poll()
        loop; the summary's counters come from the library and match what
        Redis holds, the rejects are the bad readings, and each gateway's
        spool is left with nothing unacked."""
        import shutil
        import tempfile
        prefix = uniq("simS")
        spools = tempfile.mkdtemp(prefix="iot-hub-sim-sdk-")
        self.addCleanup(shutil.rmtree, spools, True)
        s = self.run_sim("--token-cmd", self.token_cmd(prefix), "--gateway-prefix", prefix,
                         "--gateways", 3, "--devices", 3, "--rate", 150, "--batch", 20,
                         "--inflight", 4, "--bad-ratio", 0.1, "--duration", 2,
                         "--sdk", os.path.join(spools, "s"))
        self.assertEqual(s.get("client"), "libiothub-gw", json.dumps(s))
        self.assert_clean(s, expect_rejected=True)
        self.assertEqual(s["rejected_by_code"].get("invalid"), s["readings_rejected"], json.dumps(s))
        self.assertEqual(s["readings_bad_generated"], s["readings_rejected"], json.dumps(s))
        self.assertEqual(s["readings_acked"] + s["readings_rejected"], s["readings_sent"], json.dumps(s))
        self.assertGreaterEqual(s["readings_sent"], 3 * 150 * 2 * 3 // 4, json.dumps(s))
        stored = self.stored(prefix)
        self.assertEqual(len(stored), 9, stored)
        self.assertEqual(sum(stored.values()), s["readings_acked"], stored)
        self.assertEqual(sorted(os.listdir(os.path.join(spools, "s"))),
                         ["%s-%04d" % (prefix, i) for i in range(3)])


if __name__ == "__main__":
    main()
