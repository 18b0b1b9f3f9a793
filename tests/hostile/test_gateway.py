"""Hostile gateways (with valid credentials): command_ack floods with large
results, acks that change nothing, rate limits that a reconnect or another
instance must not reset (readings, announces, command acks), announce and
presence floods, reconnect storms, and readings for a device that another
gateway has taken over. Each attack is followed by the after-attack checks
(tests/hostile/hostile.py) with the bounds stated next to it."""

import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hostile import HostileCase, main, now_ms, reading, redis_used_memory, uniq, wait_until  # noqa: E402
from harness import (api_keys_file, connect_dashboard, connect_gateway, http_json,  # noqa: E402
                     metric_value, parse_metrics, http_get)

KEY = "hostile-gw-admin-key-0123456789"


def api(hub, method, path, body=None):
    return http_json(hub, method, path, body, KEY)


class HostileGateway(HostileCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = cls.class_redis()
        cls.keys = api_keys_file({"ops": (KEY, ["admin"])})

    def hub_with(self, *extra):
        return self.start_hub(self.redis, extra=["--api-keys", self.keys] + list(extra))

    async def announced(self, hub, devs, sub=None, devices=("t-*",)):
        gw = await self.gateway(hub, sub=sub, devices=devices)
        rep = await gw.announce([(d, "thermostat") for d in devs])
        self.assertEqual(sorted(rep.get("accepted", [])), sorted(devs), rep)
        return gw

    async def command_to(self, hub, gw, dev):
        st, doc = await asyncio.to_thread(api, hub, "POST", "/v1/devices/%s/commands" % dev,
                                          {"name": "reboot"})
        self.assertEqual(st, 201, doc)
        cid = doc["id"]
        await gw.wait_for(lambda m: m.get("type") == "command" and m.get("id") == cid, 5, "the command")
        return cid

    async def ack(self, gw, cid, status, **kw):
        await gw.ws.send(json.dumps(dict(type="command_ack", id=cid, status=status, **kw)))

    async def command_doc(self, hub, cid):
        st, doc = await asyncio.to_thread(api, hub, "GET", "/v1/commands/%s" % cid)
        self.assertEqual(st, 200, doc)
        return doc

    # ---- command acks ---------------------------------------------------

    async def test_command_ack_flood_grows_nothing(self):
        """A gateway that owns a finished command sends thousands of acks
        with large results: nothing of them is stored (Redis grows < 4 MiB,
        the command's answer stays under 64 KiB), oversized results are
        refused, and acks beyond command-ack-rate are answered rate_limited."""
        hub = self.hub_with()
        dev = uniq("t")
        gw = await self.announced(hub, [dev])
        cid = await self.command_to(hub, gw, dev)
        await self.ack(gw, cid, "succeeded", result={"ok": True})
        await asyncio.sleep(0.3)
        base = self.baseline(hub, self.redis)
        big = {"blob": "x" * 30000}
        small = {"blob": "y" * 8000}
        errors = {}

        async def reader():  # drains the hub's answers while the flood runs
            try:
                async for raw in gw.ws:
                    m = json.loads(raw)
                    if m.get("type") == "error":
                        errors[m.get("code")] = errors.get(m.get("code"), 0) + 1
            except Exception:
                pass
        task = asyncio.get_running_loop().create_task(reader())
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < 2.5:
            await self.ack(gw, cid, "succeeded", result=big if n % 2 else small)
            n += 1
        await asyncio.sleep(0.5)
        task.cancel()
        self.assertGreater(n, 300, "the flood itself was too slow to mean anything")
        self.assertGreater(errors.get("bad_message", 0), 0, "30 KB results must be refused: %s" % errors)
        self.assertGreater(errors.get("rate_limited", 0), 0, "acks beyond the rate: %s" % errors)
        doc = await self.command_doc(hub, cid)
        self.assertEqual((doc["status"], doc["result"]), ("succeeded", {"ok": True}), doc)
        self.assertLess(len(json.dumps(doc)), 64 * 1024, "the command's answer grew to %d bytes"
                        % len(json.dumps(doc)))
        self.assertLess(len(doc["history"]), 10, doc["history"][-3:])
        await self.assert_unharmed(hub, self.redis, base, rss_mib=64, redis_mib=4)

    async def test_in_progress_spam_is_bounded(self):
        """in_progress after in_progress is a real transition, but the
        history keeps at most cmd-history-max entries and the message text is
        capped: 3,000 progress reports leave a bounded command."""
        hub = self.hub_with("--command-ack-rate", "100000", "--command-ack-burst", "100000")
        dev = uniq("t")
        gw = await self.announced(hub, [dev])
        cid = await self.command_to(hub, gw, dev)
        await self.ack(gw, cid, "received")
        base = self.baseline(hub, self.redis)
        for i in range(3000):
            await self.ack(gw, cid, "in_progress", progress=i % 100, message="m" * 900)
        await self.ack(gw, cid, "in_progress", progress=99, message="last")

        async def last_seen():
            return (await self.command_doc(hub, cid)).get("message") == "last"
        deadline = time.monotonic() + 10
        while not await last_seen():
            self.assertLess(time.monotonic(), deadline, "the last progress report never landed")
            await asyncio.sleep(0.1)
        doc = await self.command_doc(hub, cid)
        self.assertLessEqual(len(doc["history"]), 100, "history has %d entries" % len(doc["history"]))
        self.assertEqual(doc["history"][0]["status"], "queued", doc["history"][:2])
        await self.ack(gw, cid, "succeeded")
        await asyncio.sleep(0.3)
        doc = await self.command_doc(hub, cid)
        self.assertEqual((doc["status"], doc["history"][-1]["status"]), ("succeeded", "succeeded"))
        self.assertLessEqual(len(doc["history"]), 100)
        await self.assert_unharmed(hub, self.redis, base, redis_mib=2)

    # ---- rate limits across reconnects and instances ---------------------

    async def test_device_and_gateway_limits_survive_reconnects(self):
        """device-rate 2/s burst 10: ten readings, a reconnect (to this hub
        and then to another instance on the same Redis), and the next
        readings are still rate_limited. The same for gateway-rate."""
        args = ["--device-rate", "2", "--device-burst", "10", "--gateway-rate", "5",
                "--gateway-burst", "30"]
        a = self.hub_with(*args)
        b = self.hub_with(*args)
        sub, dev = uniq("gw"), uniq("t")

        async def send(hub, seq, readings):
            gw = await self.announced(hub, [r["device"] for r in readings][:1], sub=sub)
            rep = await gw.telemetry(seq, readings)
            await gw.close()
            return rep
        rep = await send(a, 1, [reading(dev) for _ in range(10)])
        self.assertEqual(rep.get("accepted"), 10, rep)
        for seq, hub in ((2, a), (3, b), (4, a)):
            rep = await send(hub, seq, [reading(dev) for _ in range(5)])
            codes = {r.get("code") for r in rep.get("rejected", [])}
            self.assertLessEqual(rep.get("accepted", 0), 1, "reconnect #%d reset the device "
                                 "limit: %s" % (seq, rep))
            self.assertEqual(codes, {"rate_limited"}, rep)
        # The gateway bucket: 30 readings over 30 devices, then reconnects.
        devs = [uniq("t") for _ in range(40)]
        gsub = uniq("gw")
        gw = await self.announced(a, devs, sub=gsub)
        rep = await gw.telemetry(1, [reading(d) for d in devs[:30]])
        self.assertEqual(rep.get("accepted"), 30, rep)
        await gw.close()
        gw = await self.announced(b, devs, sub=gsub)
        rep = await gw.telemetry(2, [reading(d) for d in devs[30:]])
        self.assertLessEqual(rep.get("accepted", 0), 2, "the gateway limit was reset by moving "
                             "to another instance: %s" % rep)
        await gw.close()
        await self.assert_unharmed(a, self.redis)
        await self.assert_unharmed(b, self.redis)

    async def test_command_ack_limit_survives_reconnects(self):
        hub = self.hub_with("--command-ack-rate", "1", "--command-ack-burst", "5")
        sub, dev = uniq("gw"), uniq("t")
        gw = await self.announced(hub, [dev], sub=sub)
        cid = await self.command_to(hub, gw, dev)
        for _ in range(5):
            await self.ack(gw, cid, "in_progress", progress=1)
        await asyncio.sleep(0.2)
        await gw.close()
        gw = await self.announced(hub, [dev], sub=sub)
        await self.ack(gw, cid, "in_progress", progress=2)
        m = await gw.wait_for(lambda m: m.get("type") == "error", 3, "rate_limited")
        self.assertEqual((m.get("code"), m.get("id")), ("rate_limited", cid), m)
        self.assertGreater(m.get("retry_after_ms", 0), 0, m)

    # ---- telemetry floods -------------------------------------------------

    async def test_telemetry_flood_does_not_slow_others(self):
        """One gateway sends 500-reading frames as fast as the hub reads
        them for 3 s. Readings past its gateway-rate are rate_limited (nothing
        stored for them); a canary gateway connecting during the flood gets
        its ack within the bound; Redis grows only by what the rate allows."""
        hub = self.hub_with("--gateway-rate", "2000", "--gateway-burst", "2000")
        devs = [uniq("t") for _ in range(50)]
        gw = await self.announced(hub, devs)
        base = self.baseline(hub, self.redis)
        counts = {"accepted": 0, "limited": 0, "acks": 0}
        stop = asyncio.Event()

        async def reader():
            try:
                async for raw in gw.ws:
                    m = json.loads(raw)
                    if m.get("type") == "ack":
                        counts["acks"] += 1
                        counts["accepted"] += m.get("accepted", 0)
                        counts["limited"] += sum(1 for r in m.get("rejected", [])
                                                 if r.get("code") == "rate_limited")
            except Exception:
                pass

        async def flood():
            seq = 1
            while not stop.is_set():
                frame = {"type": "telemetry", "seq": seq,
                         "readings": [reading(devs[i % 50], float(i)) for i in range(500)]}
                await gw.ws.send(json.dumps(frame))
                seq += 1
        rt = asyncio.get_running_loop().create_task(reader())
        ft = asyncio.get_running_loop().create_task(flood())
        await asyncio.sleep(1.0)
        took = await self.normal_gateway_ack(hub, 2.0)  # during the flood
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.wait_for(ft, 10)
        await asyncio.sleep(0.5)
        rt.cancel()
        self.assertGreater(counts["acks"], 5, counts)
        self.assertGreater(counts["limited"], 0, counts)
        self.assertLessEqual(counts["accepted"], 2000 + 2000 * 5, counts)
        sys.stderr.write("telemetry flood: %s; canary ack during it %.0f ms\n" % (counts, took * 1000))
        await self.assert_unharmed(hub, self.redis, base, redis_mib=16)

    # ---- announce and presence floods ------------------------------------

    async def test_announce_flood_is_bounded(self):
        """A gateway re-announcing 1,000 devices in a loop: entries beyond
        announce-rate are rate_limited, re-announcing what did not change
        publishes no presence, and a presence dashboard sees a bounded
        number of events (<= the devices' first announce + the rate)."""
        hub = self.hub_with("--announce-rate", "100", "--announce-burst", "1000")
        dash = await connect_dashboard(hub, KEY)
        self.addAsyncCleanup(dash.close)
        await dash.subscribe("p", stream="presence")
        base = self.baseline(hub, self.redis)
        devs = [uniq("t") for _ in range(1000)]
        gw = await self.gateway(hub)
        limited = 0
        t0 = time.monotonic()
        rounds = 0
        while time.monotonic() - t0 < 3:
            rep = await gw.announce([(d, "thermostat") for d in devs], timeout=10)
            limited += sum(1 for r in rep.get("rejected", []) if r.get("code") == "rate_limited")
            rounds += 1
        self.assertGreater(rounds, 3)
        self.assertGreater(limited, 0, "no announce entry was rate limited")
        events = await dash.gather(lambda got: False, timeout=1.0, fail=False)
        presence = [m for m in events if m.get("type") == "presence"]
        # 1,000 first announces + at most rate * seconds more (none, since
        # nothing changed) -- the old hub sent 1,000 per round.
        self.assertLessEqual(len(presence), 1000 + 100 * 5, "%d presence events" % len(presence))
        await self.assert_unharmed(hub, self.redis, base, redis_mib=8)

    async def test_reconnect_storm_is_bounded(self):
        """One gateway reconnecting 100 times as fast as it can: the hub
        refuses connects beyond gateway-connect-burst with close 4029 and a
        retry hint; takeovers stay bounded; others are unharmed."""
        hub = self.hub_with("--gateway-connect-rate", "2", "--gateway-connect-burst", "10")
        base = self.baseline(hub, self.redis)
        sub = uniq("gw")
        tok = self.token(sub)
        codes = []
        for _ in range(100):
            gw = await connect_gateway(hub, tok)
            try:
                await gw.send({"type": "announce", "devices": []})
                await gw.wait_for(lambda m: m.get("type") == "announced", 2, "announced")
                codes.append(None)
            except AssertionError:
                await gw.wait_closed(2)
                codes.append(gw.close_code)
            await gw.close()
        refused = [c for c in codes if c == 4029]
        self.assertGreater(len(refused), 50, "connects beyond the burst: %s" % codes[-20:])
        self.assertLessEqual(codes.count(None), 10 + 2 * 10, codes)
        st, _, text = http_get(hub, "/metrics")
        m = parse_metrics(text)
        self.assertLessEqual(metric_value(m, "iot_hub_takeovers_total"), 40)
        await self.assert_unharmed(hub, self.redis, base)

    # ---- device ownership -------------------------------------------------

    async def test_taken_over_device_cannot_be_written(self):
        """Gateway A announces d; gateway B announces d (on another
        instance): A's next readings for d are refused (unknown_device), only
        B's are stored."""
        a_hub = self.hub_with()
        b_hub = self.hub_with()
        dev = uniq("t")
        a = await self.announced(a_hub, [dev])
        rep = await a.telemetry(1, [reading(dev, 1.0)])
        self.assertEqual(rep.get("accepted"), 1, rep)
        b = await self.announced(b_hub, [dev])
        deadline = time.monotonic() + 2
        seq = 2
        while True:
            rep = await a.telemetry(seq, [reading(dev, 99.0)])
            seq += 1
            if rep.get("accepted") == 0:
                break
            self.assertLess(time.monotonic(), deadline, "A still stores readings for a device B "
                            "announced: %s" % rep)
            await asyncio.sleep(0.05)
        self.assertEqual([r.get("code") for r in rep["rejected"]], ["unknown_device"], rep)
        rep = await b.telemetry(1, [reading(dev, 2.0)])
        self.assertEqual(rep.get("accepted"), 1, rep)
        await self.assert_unharmed(a_hub, self.redis)


if __name__ == "__main__":
    main()
