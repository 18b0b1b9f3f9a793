"""Commands through a hub SIGKILL and a Redis SIGKILL/restart (AOF
appendfsync always): 300 commands queued for 20 offline devices, 50 of them
canceled, 60 with a 2 s TTL. When the devices come back on a new hub, each
gets exactly its live commands, in creation order, once each; nothing
canceled or expired is delivered; every command ends where its story says;
no state goes backwards."""

import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chaos import ChaosCase, PersistentRedis, main, sigkill, uniq  # noqa: E402
from harness import api_keys_file, connect_gateway, http_json  # noqa: E402

KEY = "chaos-commands-key-0123456789"
ORDER = {"queued": 0, "sent": 1, "received": 2, "in_progress": 3, "succeeded": 4, "failed": 4,
         "rejected": 4, "timed_out": 4, "expired": 4, "canceled": 4}


class Commands(ChaosCase):
    async def api(self, hub, method, path, body=None):
        return await asyncio.to_thread(http_json, hub, method, path, body, KEY)

    async def test_commands_survive_hub_and_redis_kill(self):
        redis = PersistentRedis("always")
        self.addCleanup(redis.stop)
        keys = api_keys_file({"ops": (KEY, ["admin"])})
        hub = self.start_hub(redis, extra=["--api-keys", keys])
        sub = uniq("gw")
        devs = [uniq("c") for _ in range(20)]
        gw = await connect_gateway(hub, self.token(sub, ("c-*",)))
        rep = await gw.announce([(d, "thermostat") for d in devs])
        self.assertEqual(sorted(rep.get("accepted", [])), sorted(devs), rep)
        await gw.close()

        created = {d: [] for d in devs}   # creation order per device
        story = {}                         # id -> "live" | "canceled" | "expires"
        for i in range(300):
            d = devs[i % 20]
            short = i % 5 == 0
            st, doc = await self.api(hub, "POST", "/v1/devices/%s/commands" % d,
                                     {"name": "reboot", "ttl_s": 2 if short else 3600,
                                      "params": {"delay_s": i % 60}})
            self.assertEqual(st, 201, doc)
            created[d].append(doc["id"])
            story[doc["id"]] = "expires" if short else "live"
        canceled = [cid for i, cid in enumerate(sorted(story)) if story[cid] == "live" and i % 5 == 1][:50]
        for cid in canceled:
            st, doc = await self.api(hub, "POST", "/v1/commands/%s/cancel" % cid)
            self.assertEqual((st, doc.get("status")), (200, "canceled"), doc)
            story[cid] = "canceled"

        t0 = time.monotonic()
        sigkill(hub.pid)
        hub.wait_exit(5)
        redis.kill()
        await asyncio.get_running_loop().run_in_executor(None, redis.restart)
        hub = self.start_hub(redis, extra=["--api-keys", keys])
        await asyncio.sleep(max(0.0, 3.0 - (time.monotonic() - t0)))  # the 2 s TTLs pass

        gw = await connect_gateway(hub, self.token(sub, ("c-*",)))
        rep = await gw.announce([(d, "thermostat") for d in devs])
        self.assertEqual(sorted(rep.get("accepted", [])), sorted(devs), rep)
        got = {d: [] for d in devs}
        want = sum(1 for s in story.values() if s == "live")
        deadline = time.monotonic() + 20
        n = 0
        acked, retry = set(), []
        # As a gateway should: ack each command; an ack refused as
        # rate_limited (command-ack-rate) goes again after retry_after_ms.
        quiet_since = time.monotonic()
        while time.monotonic() < deadline and (
                len(acked) < want or retry or time.monotonic() - quiet_since < 1.0):
            for m in await gw.collect(0.2):
                quiet_since = time.monotonic()
                if m.get("type") == "command":
                    got[m["device"]].append(m["id"])
                    await gw.send({"type": "command_ack", "id": m["id"], "status": "succeeded"})
                    acked.add(m["id"])
                elif m.get("type") == "error" and m.get("code") == "rate_limited":
                    retry.append((time.monotonic() + m["retry_after_ms"] / 1000, m["id"]))
            now = time.monotonic()
            for at, cid in [r for r in retry if r[0] <= now]:
                retry.remove((at, cid))
                await gw.send({"type": "command_ack", "id": cid, "status": "succeeded"})
        recovery = time.monotonic() - t0
        for m in await gw.collect(1.0):
            if m.get("type") == "command":
                got[m["device"]].append(m["id"])
        for d in devs:
            live = [c for c in created[d] if story[c] == "live"]
            self.assertEqual(got[d], live, "device %s: delivered %s, want its live commands in "
                             "creation order %s" % (d, got[d], live))
        lost, states_back = [], []
        for cid, s in story.items():
            st, doc = await self.api(hub, "GET", "/v1/commands/%s" % cid)
            if st != 200:
                lost.append(cid)
                continue
            want_state = {"live": "succeeded", "canceled": "canceled", "expires": "expired"}[s]
            if s == "live" and doc["status"] != "succeeded":
                await asyncio.sleep(0.5)
                st, doc = await self.api(hub, "GET", "/v1/commands/%s" % cid)
            self.assertEqual(doc["status"], want_state, "%s (%s): %s" % (cid, s, json.dumps(doc)[:400]))
            ranks = [ORDER[h["status"]] for h in doc["history"]]
            if ranks != sorted(ranks):
                states_back.append(cid)
        self.assertEqual(lost, [], "commands lost")
        self.assertEqual(states_back, [], "a state went backwards")
        delivered = sum(len(v) for v in got.values())
        dups = delivered - len({c for v in got.values() for c in v})
        self.rows.append(("commands: hub SIGKILL + Redis SIGKILL/restart (300; 50 canceled, 60 expired)",
                          300, 300 - len(lost), len(lost), dups, "%.1f" % recovery))
        await gw.close()
        hub.stop()


if __name__ == "__main__":
    main()
