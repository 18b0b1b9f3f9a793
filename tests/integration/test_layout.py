"""The key layout version (docs/streams.md, "Key names"): a hub sets
iot:layout to 2 on a Redis without hub data, starts on a Redis of layout 2,
and refuses, with one error naming tools/migrate-layout and exit status 1,
a Redis that holds layout-1 data (iot:layout absent while iot:devices or
iot:cmd:seq exists) or another layout version, whether Redis answers at
start-up or only later."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Hub, HubTestCase, hub_args, main, reading, rkeys, uniq  # noqa: E402

REFUSED = r"holds iot-hub data in the old key layout .*tools/migrate-layout --redis redis://127\.0\.0\.1:%d/0"


class Layout(HubTestCase):
    def refused(self, redis, pattern, **kw):
        """Starts a hub on redis and asserts it exits 1 with pattern in its
        log and never listened."""
        h = Hub(hub_args(redis, self.secret_file), wait=False, **kw)
        self.addCleanup(h.cleanup)
        rc = h.wait_exit(15)
        self.assertEqual(rc, 1, "hub exit status %s; %s" % (rc, h.describe()))
        h.check_sanitizers()
        text = h.stderr_text()
        self.assertRegex(text, pattern)
        self.assertNotIn("listening on", text)
        return h

    async def test_fresh_redis_gets_layout_2(self):
        redis = self.start_redis()
        hub = self.start_hub(redis)
        self.assertEqual(redis.cmd("GET", rkeys.LAYOUT), rkeys.VERSION)
        gw = await self.gateway(hub)
        d = uniq("t")
        await gw.announce([(d, "thermostat")])
        rep = await gw.telemetry(1, [reading(d)])
        self.assertEqual(rep.get("accepted"), 1, rep)
        self.assertEqual(redis.xlen(rkeys.tm(d)), 1)
        await gw.close()
        hub.stop()
        # and a hub starts again on what it wrote
        hub = self.start_hub(redis)
        self.assertEqual(redis.cmd("SISMEMBER", rkeys.devices(d), d), 1)
        hub.stop()

    def test_layout_1_data_refused(self):
        for marker in (("SADD", "iot:devices", "t-1"), ("SET", "iot:cmd:seq", "7")):
            with self.subTest(marker=marker[1]):
                redis = self.start_redis()
                redis.cmd(*marker)
                redis.cmd("HSET", "iot:dev:t-1", "type", "thermostat")
                before = sorted(redis.cmd("KEYS", "*"))
                h = self.refused(redis, REFUSED % redis.port)
                self.assertEqual(len([l for l in h.lines if " E " in l]), 1, h.stderr_text())
                self.assertEqual(sorted(redis.cmd("KEYS", "*")), before, "the refusing hub wrote to Redis")

    def test_other_version_refused(self):
        redis = self.start_redis()
        redis.cmd("SET", rkeys.LAYOUT, "4")
        self.refused(redis, r"holds key layout 4 \(iot:\{hub\}:layout\), this hub writes layout 3")
        self.assertEqual(redis.cmd("GET", rkeys.LAYOUT), "4")

    async def test_refused_when_redis_comes_later(self):
        """Redis down at start-up: the hub serves (telemetry answers
        unavailable), and when Redis comes up holding layout-1 data it logs
        the error and exits 1 without writing."""
        redis = self.start_redis()
        redis.cmd("SADD", "iot:devices", "t-1")
        redis.cmd("SAVE")
        redis.kill()
        hub = self.start_hub(redis, extra=["--redis-timeout-ms", "300", "--redis-backoff-max-ms", "200"])
        redis.restart()   # loads the dump saved above
        rc = hub.wait_exit(15)
        self.assertEqual(rc, 1, hub.describe())
        self.assertRegex(hub.stderr_text(), REFUSED % redis.port)
        self.assertEqual(redis.cmd("KEYS", "*"), ["iot:devices"])


if __name__ == "__main__":
    main()
