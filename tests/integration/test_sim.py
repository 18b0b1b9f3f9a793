"""The gateway simulator against a real hub: several gateways stream for a
few seconds; its JSON summary shows acks and no errors, and what Redis holds
matches what was acknowledged."""

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import SIM_BIN, HubTestCase, main, require_bin  # noqa: E402


def find_int(summary, *names):
    """First integer value under one of names (searching nested objects)."""
    stack = [summary]
    while stack:
        o = stack.pop(0)
        if isinstance(o, dict):
            for n in names:
                if isinstance(o.get(n), int):
                    return o[n]
            stack.extend(v for v in o.values() if isinstance(v, (dict, list)))
        elif isinstance(o, list):
            stack.extend(o)
    return None


class Sim(HubTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        require_bin(SIM_BIN, "HUB_SIM_BIN")
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis)

    def run_sim(self, token, *extra, timeout=60):
        cmd = [SIM_BIN, "--url", self.hub.url(), "--token", token, *map(str, extra), "--json-summary"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        summary = None
        for line in reversed(p.stdout.strip().splitlines()):
            try:
                summary = json.loads(line)
                break
            except ValueError:
                continue
        if summary is None:
            try:
                summary = json.loads(p.stdout)
            except ValueError:
                pass
        self.assertEqual(p.returncode, 0, "gw-sim exit %d; stderr %s" % (p.returncode, p.stderr[-1500:]))
        self.assertIsInstance(summary, dict, "no JSON summary on stdout: %r" % p.stdout[-1500:])
        return summary

    def stored_readings(self):
        total, cursor = 0, "0"
        while True:
            cursor, keys = self.redis.cmd("SCAN", cursor, "MATCH", "iot:tm:*", "COUNT", 1000)
            for k in keys:
                total += self.redis.xlen(k)
            if cursor == "0":
                return total

    async def test_sim_streams_and_everything_acked_is_stored(self):
        token = self.token("sim", devices=["*"])
        s = self.run_sim(token, "--gateways", 5, "--devices", 3, "--rate", 50, "--duration", 3)
        acks = find_int(s, "acks", "acked", "acks_received")
        errors = find_int(s, "errors", "error_count")
        self.assertIsNotNone(acks, "no ack count in summary %r" % s)
        self.assertGreater(acks, 0, s)
        self.assertEqual(errors, 0, "summary reports errors: %r" % s)
        acked_readings = find_int(s, "readings_acked", "acked_readings", "readings_accepted", "accepted")
        self.assertIsNotNone(acked_readings, "no acked-readings count in summary %r" % s)
        self.assertEqual(self.stored_readings(), acked_readings,
                         "readings in iot:tm:* differ from the readings gw-sim saw acked: %r" % s)
        self.hub.check_alive()


if __name__ == "__main__":
    main()
