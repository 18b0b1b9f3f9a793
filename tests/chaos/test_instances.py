"""Two hub instances on one port and one Redis, one of them killed with
SIGKILL under ingest. The gateways it held reconnect (the kernel gives them
to the survivor) and resend; a dashboard on the survivor sees every acked
reading exactly once (no gap from the death, no duplicate from the
resends); the dead instance's devices whose gateways do not come back go
offline within the stated bound, with presence events."""

import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chaos import ChaosCase, ChaosGateway, Ledger, PersistentRedis, main, sigkill, uniq  # noqa: E402
from harness import api_keys_file, connect_dashboard, connect_gateway, rkeys  # noqa: E402

KEY = "chaos-instances-key-0123456789"
OFFLINE_BOUND_S = 15   # docs/streams.md: a dead instance's devices go offline within this
FRAMES = 300


class Instances(ChaosCase):
    async def test_instance_killed_under_ingest(self):
        redis = PersistentRedis("everysec")
        self.addCleanup(redis.stop)
        keys = api_keys_file({"ops": (KEY, ["admin"])})
        # B alone first, so the dashboard is served by the survivor.
        b = self.start_hub(redis, extra=["--instance-id", "hub-b", "--api-keys", keys])
        dash = await connect_dashboard(b, KEY)
        self.addAsyncCleanup(dash.close)
        await dash.subscribe("raw", stream="raw")
        await dash.subscribe("pres", stream="presence")
        # Read all along, as a browser does: a dashboard that stops reading
        # is a slow consumer (gap notices), which is not what this tests.
        dash_msgs, reading = [], [True]

        async def read_dashboard():
            while reading[0]:
                dash_msgs.extend(await dash.gather(lambda got: len(got) >= 200, timeout=0.2, fail=False))
        reader = asyncio.get_running_loop().create_task(read_dashboard())
        a = self.start_hub(redis, extra=["--instance-id", "hub-a", "--api-keys", keys,
                                         "--listen", "127.0.0.1:%d" % b.port])
        self.assertEqual(a.port, b.port)

        # Gateways that will not come back once their instance dies: kept on
        # hub-a (connect until enough land there).
        stranded, stranded_devs = [], []
        while len(stranded) < 2:
            d = uniq("t")
            gw = await connect_gateway(a, self.token(uniq("gw"), ("t-*",)))
            rep = await gw.announce([(d, "thermostat")])
            self.assertEqual(rep.get("accepted"), [d], rep)
            if redis.hgetall(rkeys.dev(d)).get("instance") == "hub-a":
                stranded.append(gw)
                stranded_devs.append(d)
            else:
                await gw.close()

        gws = [ChaosGateway(self, lambda: b, Ledger(uniq("gw"), [uniq("t") for _ in range(2)]),
                            batch=1 if i % 2 else 5, rate=100) for i in range(8)]
        tasks = [asyncio.get_running_loop().create_task(g.run(FRAMES)) for g in gws]
        await asyncio.sleep(1.0)
        on_a = [g for g in gws for d in g.l.devices[:1]
                if redis.hgetall(rkeys.dev(d)).get("instance") == "hub-a"]
        self.assertTrue(on_a, "no streaming gateway landed on hub-a (the kernel put all 8 on b)")
        t_kill = time.monotonic()
        sigkill(a.pid)
        a.wait_exit(5)
        done, pending = await asyncio.wait(tasks, timeout=60)
        self.assertFalse(pending, "gateways still unacked 60 s after the kill")
        for t in done:
            t.result()
        moved_s = time.monotonic() - t_kill

        # The dashboard on the survivor: every acked reading once.
        seen = {}
        ts_to_key = {(d, g.l.t_base + s * 16 + i): g.l.key(s, i)
                     for g in gws for s, rs in g.l.sent.items() for i, r in enumerate(rs)
                     for d in [r["device"]]}
        acked = set().union(*(g.l.acked_keys() for g in gws))
        offline, t_offline, gaps = set(), None, []
        deadline = time.monotonic() + OFFLINE_BOUND_S + 5
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            msgs, dash_msgs[:] = list(dash_msgs), []
            gaps += [m for m in msgs if m.get("type") == "gap"]
            for m in msgs:
                if m.get("type") == "reading":
                    k = ts_to_key.get((m.get("device"), m.get("ts")))
                    if k:
                        seen[k] = seen.get(k, 0) + 1
                elif m.get("type") == "presence" and m.get("online") is False and \
                        m.get("device") in stranded_devs:
                    offline.add(m["device"])
                    if offline == set(stranded_devs) and t_offline is None:
                        t_offline = time.monotonic() - t_kill
            if acked <= set(seen) and t_offline is not None:
                break
        reading[0] = False
        await reader
        missing = sorted(acked - set(seen))
        self.assertEqual(gaps, [], "the survivor's dashboard got gap notices")
        twice = sorted(k for k, n in seen.items() if n > 1)
        self.assertEqual(missing, [], "the survivor's dashboard missed %d acked readings" % len(missing))
        self.assertEqual(twice, [], "the survivor's dashboard got %d readings twice" % len(twice))
        self.assertIsNotNone(t_offline, "the dead instance's devices %s never went offline (presence)"
                             % sorted(set(stranded_devs) - offline))
        self.assertLess(t_offline, OFFLINE_BOUND_S)
        for d in stranded_devs:
            self.assertEqual(redis.hgetall(rkeys.dev(d)).get("online"), "0", d)
        # Devices that moved to the survivor are registered there (their
        # gateways have since finished and closed: offline by the survivor).
        for g in on_a:
            h = redis.hgetall(rkeys.dev(g.l.devices[0]))
            self.assertEqual(h.get("instance"), "hub-b", h)
            self.assertTrue(h.get("conn", "").startswith("hub-b:"), h)
        self.account("instance SIGKILL (2 on one port), gateways move", redis, [g.l for g in gws],
                     moved_s)
        self.rows.append(("dead instance's devices offline (presence on the survivor)",
                          0, 0, 0, 0, "%.1f" % t_offline))
        for gw in stranded:
            await gw.close()
        b.stop()


if __name__ == "__main__":
    main()
