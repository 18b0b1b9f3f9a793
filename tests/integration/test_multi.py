"""Several hub processes, one Redis (issue 2: multi-core by processes, each
with its own SO_REUSEPORT listener, coordinated only through Redis):
two processes serve one port, and a gateway that reconnects to another
instance takes its devices over there, closing the old connection with 4001
and storing a resent frame once."""

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import HubTestCase, main, reading, rkeys, uniq, wait_until  # noqa: E402


class MultiInstance(HubTestCase):
    def setUp(self):
        super().setUp()
        self.redis = self.start_redis()

    async def test_two_processes_share_one_port(self):
        a = self.start_hub(self.redis, extra=["--instance-id", "hub-a"])
        b = self.start_hub(self.redis, extra=["--instance-id", "hub-b",
                                              "--listen", "127.0.0.1:%d" % a.port])
        self.assertEqual(b.port, a.port, "second process did not bind the same port")
        devices = []
        for i in range(40):
            gw = await self.gateway(a)
            d = uniq("t")
            rep = await gw.announce([(d, "thermostat")])
            self.assertEqual(rep.get("accepted"), [d], rep)
            rep = await gw.telemetry(1, [reading(d)])
            self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", 1), rep)
            devices.append(d)
        owners = {self.redis.hgetall(rkeys.dev(d)).get("instance") for d in devices}
        # The kernel spreads connections by address hash: with 40 of them both
        # processes serve some (all on one has probability 2^-39).
        self.assertEqual(owners, {"hub-a", "hub-b"}, "instances that served gateways: %r" % owners)
        for d in devices:
            self.assertEqual(self.redis.xlen(rkeys.tm(d)), 1, d)

    async def test_takeover_across_instances(self):
        a = self.start_hub(self.redis, extra=["--instance-id", "hub-a"])
        b = self.start_hub(self.redis, extra=["--instance-id", "hub-b"])
        sub, d = uniq("gw"), uniq("t")
        old = await self.gateway(a, sub=sub)
        rep = await old.announce([(d, "thermostat")])
        self.assertEqual(rep.get("accepted"), [d], rep)
        first = reading(d, 20.0)
        rep = await old.telemetry(1, [first])
        self.assertEqual(rep.get("type"), "ack", rep)

        new = await self.gateway(b, sub=sub)
        code = await old.wait_closed(5)
        self.assertEqual(code, 4001, "old connection on the other instance closed with %r" % code)
        rep = await new.announce([(d, "thermostat")])
        self.assertEqual(rep.get("accepted"), [d], rep)
        # The frame acked on instance A, resent on B, is acked again, not stored twice.
        rep = await new.telemetry(1, [first])
        self.assertEqual((rep.get("type"), rep.get("duplicate")), ("ack", True), rep)
        rep = await new.telemetry(2, [reading(d, 21.0)])
        self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", 1), rep)
        self.assertEqual(self.redis.xlen(rkeys.tm(d)), 2)
        # A's disconnect must not mark the device offline: B owns it now.
        await asyncio.sleep(0.3)
        h = self.redis.hgetall(rkeys.dev(d))
        self.assertEqual((h.get("instance"), h.get("online")), ("hub-b", "1"), h)
        # And B's disconnect does.
        await new.close()
        wait_until(lambda: self.redis.hgetall(rkeys.dev(d)).get("online") == "0", 5,
                   what="device offline after its gateway left instance B")


if __name__ == "__main__":
    main()
