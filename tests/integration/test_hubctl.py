"""hubctl (tools/hubctl.c, docs/hubctl.md) against a real hub: a Python
gateway announces devices and answers commands (received, then succeeded or
failed, or nothing), and the built hubctl binary is run for send --wait
(stream and polling), --json, show, cancel, list-commands, devices, tail,
send-fleet (--wait: plain progress lines, in place on a terminal, --json
lines) and show-rollout, and every documented exit code (0 ok, 1 command
failed or rollout aborted, 2 usage, 3 HTTP 4xx, 4 unreachable, 5 wait timed
out). Loopback only; every run has a deadline."""

import asyncio
import json
import os
import pty
import re
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (BUILD_DIR, CommandResponder, HubTestCase, api_keys_file, free_port, main, now_ms,  # noqa: E402
                     mkdtemp, require_bin, uniq, write_file)

CTL_BIN = os.environ.get("HUB_CTL_BIN") or os.path.join(BUILD_DIR, "tools", "hubctl")

KEYS = {"admin": ("iotk_ctl_admin_000001", ["admin"]),
        "writer": ("iotk_ctl_writer_00002", ["commands:write"]),
        "reader": ("iotk_ctl_reader_00003", ["telemetry:read"])}

RUN_TIMEOUT = 30


class Device(CommandResponder):
    """A gateway connection that answers commands per device: 'succeed'
    (received, in_progress 50, succeeded), 'fail' (received, failed) or
    'ignore' (nothing). Records commands and cancels it gets."""

    def __init__(self, gw, behavior):
        self.behavior = behavior
        self.commands = []
        self.cancels = []
        super().__init__(gw)

    async def on_message(self, m):
        if m.get("type") == "cancel":
            self.cancels.append(m)
        if m.get("type") != "command":
            return
        self.commands.append(m)
        mode = self.behavior.get(m["device"], "succeed")
        if mode == "ignore":
            return
        await self.ack(m["id"], "received")
        await asyncio.sleep(0.1)
        if mode == "fail":
            await self.ack(m["id"], "failed", error="disk full")
            return
        await self.ack(m["id"], "in_progress", progress=50, message="working")
        await asyncio.sleep(0.1)
        await self.ack(m["id"], "succeeded", result={"ok": True})


class HubctlTests(HubTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        require_bin(CTL_BIN, "HUB_CTL_BIN")
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis, extra=["--api-keys", api_keys_file(KEYS)])
        cls.url = "http://127.0.0.1:%d" % cls.hub.port

    async def asyncSetUp(self):
        await super().asyncSetUp()
        self.site = uniq("site")
        p = uniq("t")
        self.dev_ok, self.dev_fail, self.dev_ign = p + "-ok", p + "-fail", p + "-ign"
        gw = await self.gateway(self.hub)
        ann = await gw.announce([(d, "thermostat", {"site": self.site})
                                 for d in (self.dev_ok, self.dev_fail, self.dev_ign)])
        self.assertEqual(sorted(ann["accepted"]), sorted([self.dev_ok, self.dev_fail, self.dev_ign]), ann)
        self.dev = Device(gw, {self.dev_fail: "fail", self.dev_ign: "ignore"})
        self.addAsyncCleanup(self.dev.stop)

    # -- running hubctl ------------------------------------------------------

    def env(self, key="admin"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("HUBCTL_")}
        env["HUBCTL_URL"] = self.url
        if key:
            env["HUBCTL_KEY"] = KEYS[key][0]
        return env

    async def start(self, *args, key="admin"):
        return await asyncio.create_subprocess_exec(
            CTL_BIN, *[str(a) for a in args], env=self.env(key),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)

    async def finish(self, p, timeout=RUN_TIMEOUT):
        """Waits for hubctl p; returns (exit code, stdout, stderr), stdout ''
        when it was not a pipe."""
        try:
            out, err = await asyncio.wait_for(p.communicate(), timeout)
        except asyncio.TimeoutError:
            p.kill()
            await p.wait()
            raise AssertionError("hubctl did not finish within %ss" % timeout) from None
        return p.returncode, (out or b"").decode(), err.decode()

    async def ctl(self, *args, key="admin", timeout=RUN_TIMEOUT):
        """Runs hubctl; returns (exit code, stdout, stderr)."""
        return await self.finish(await self.start(*args, key=key), timeout)

    async def ctl_json(self, *args, key="admin", want=0):
        rc, out, err = await self.ctl("--json", *args, key=key)
        self.assertEqual(rc, want, "hubctl %s: rc %s\nstdout: %s\nstderr: %s" % (args, rc, out, err))
        lines = [l for l in out.splitlines() if l.strip()]
        self.assertTrue(lines, "hubctl --json %s printed nothing; stderr: %s" % (args, err))
        return [json.loads(l) for l in lines]

    async def wait_subscribed(self, p, timeout=10):
        """Waits for tail -v's 'subscribed to' line on stderr."""
        async def read():
            while True:
                line = await p.stderr.readline()
                if not line:
                    raise AssertionError("hubctl tail exited before subscribing (rc %s)" % await p.wait())
                if b"subscribed to" in line:
                    return
        await asyncio.wait_for(read(), timeout)

    def assert_order(self, seq, wanted, what):
        """wanted appears in seq in this order (other items may be between)."""
        it = iter(seq)
        for w in wanted:
            self.assertTrue(any(x == w for x in it), "%s: %r not in order %r" % (what, wanted, seq))

    # -- send ------------------------------------------------------------------

    async def test_send_wait_success(self):
        rc, out, err = await self.ctl("send", self.dev_ok, "reboot", "--params", '{"delay_s":1}', "--wait")
        self.assertEqual(rc, 0, "stdout: %s\nstderr: %s" % (out, err))
        lines = out.splitlines()
        states = [l.split()[1] for l in lines[1:-1]]
        self.assertEqual(states, ["queued", "sent", "received", "in_progress", "succeeded"], out)
        self.assertIn("(attempt 1)", lines[2])
        self.assertIn("50%", lines[4])
        self.assertRegex(lines[-1], r"^c_\S+ succeeded result \{\"ok\":\s?true\}$")
        self.assertNotIn("polling", err)
        self.assertEqual(self.dev.commands[-1]["params"], {"delay_s": 1})

    async def test_send_wait_failed(self):
        rc, out, err = await self.ctl("send", self.dev_fail, "reboot", "--wait")
        self.assertEqual(rc, 1, "stdout: %s\nstderr: %s" % (out, err))
        self.assert_order([l.split()[1] if len(l.split()) > 1 else "" for l in out.splitlines()],
                          ["queued", "sent", "received", "failed:"], out)
        self.assertIn("failed: disk full", out.splitlines()[-1])

    async def test_send_wait_json(self):
        docs = await self.ctl_json("send", self.dev_ok, "config", "--params", '{"setpoint":21}',
                                   "--max-attempts", "2", "--wait")
        first, events, last = docs[0], docs[1:-1], docs[-1]
        cid = first["id"]
        self.assertEqual((first["device"], first["name"], first["max_attempts"]),
                         (self.dev_ok, "config", 2), first)
        self.assertTrue(all(e["type"] == "command_status" and e["id"] == cid for e in events), events)
        self.assertNotIn("sub", events[0])
        self.assertEqual([e["status"] for e in events],
                         ["queued", "sent", "received", "in_progress", "succeeded"], events)
        self.assertEqual(events[3]["progress"], 50)
        self.assertEqual((last["id"], last["status"], last["result"]), (cid, "succeeded", {"ok": True}))
        self.assertEqual([h["status"] for h in last["history"]][-1], "succeeded")

    async def test_send_wait_polls_without_stream_scope(self):
        # commands:write only: the stream upgrade is 403, hubctl polls instead
        rc, out, err = await self.ctl("--json", "send", self.dev_ok, "reboot", "--wait", key="writer")
        self.assertEqual(rc, 0, "stdout: %s\nstderr: %s" % (out, err))
        self.assertIn("polling", err)
        docs = [json.loads(l) for l in out.splitlines()]
        statuses = [d["status"] for d in docs if d.get("type") == "command_status"]
        self.assertEqual(statuses[0], "queued", statuses)
        self.assertEqual(statuses[-1], "succeeded", statuses)
        self.assertEqual(len(statuses), len(set(statuses)), "a transition printed twice: %r" % statuses)
        self.assertEqual(docs[-1]["status"], "succeeded")

    async def test_send_wait_times_out(self):
        rc, out, err = await self.ctl("--timeout", "1.5", "send", self.dev_ign, "reboot", "--wait")
        self.assertEqual(rc, 5, "stdout: %s\nstderr: %s" % (out, err))
        self.assertIn("gave up waiting", err)
        self.assertIn("is sent", err)

    async def test_send_wait_ignored_until_timed_out(self):
        rc, out, err = await self.ctl("send", self.dev_ign, "reboot", "--ack-timeout", "1",
                                      "--max-attempts", "2", "--wait")
        self.assertEqual(rc, 1, "stdout: %s\nstderr: %s" % (out, err))
        self.assertIn("sent (attempt 1)", out)
        self.assertIn("sent (attempt 2)", out)
        self.assertIn("timed_out", out.splitlines()[-1])
        self.assertEqual(len(self.dev.commands), 2)

    async def test_send_idempotency_key(self):
        k = uniq("idem")
        a = (await self.ctl_json("send", self.dev_ok, "reboot", "--idempotency-key", k))[0]
        b = (await self.ctl_json("send", self.dev_ok, "reboot", "--idempotency-key", k))[0]
        self.assertEqual(a["id"], b["id"])

    # -- usage and errors ----------------------------------------------------

    async def test_usage_errors_exit_2(self):
        cases = [(), ("frobnicate",), ("send", self.dev_ok), ("send", self.dev_ok, "reboot", "--params", "{nope"),
                 ("send", self.dev_ok, "reboot", "--max-attempts", "x"), ("send", "a", "b", "c"),
                 ("show",), ("devices", "--online", "maybe"), ("list-commands", "d", "--status", "done"),
                 ("tail", "--stream", "5m"), ("tail", "--since", "1-0", "--stream", "presence"),
                 ("--url", "ftp://x", "devices"), ("--url", "http://127.0.0.1:99999", "devices"),
                 ("devices", "--label", "nokv"), ("--bogus",), ("--timeout", "-1", "devices"),
                 ("send-fleet", "reboot"), ("send-fleet", "--type", "thermostat"),
                 ("send-fleet", "--type", "thermostat", "reboot", "extra"),
                 ("send-fleet", "--type", "thermostat", "reboot", "--abort-failure-ratio", "x"),
                 ("send-fleet", "--type", "thermostat", "reboot", "--max-per-minute", "1.5"),
                 ("send-fleet", "--type", "thermostat", "--label", "nokv", "reboot"),
                 ("send-fleet", "--type", "thermostat", "reboot", "--params", "{nope"),
                 ("send-fleet", "--type", "thermostat", "reboot", "--bogus"),
                 ("show-rollout",), ("show-rollout", "c_" + "0" * 32), ("show-rollout", "r_1", "r_2")]
        for args in cases:
            rc, out, err = await self.ctl(*args)
            self.assertEqual(rc, 2, "hubctl %s: rc %s, stderr %r" % (args, rc, err))
            self.assertEqual(out, "", args)
            self.assertEqual(len(err.strip().splitlines()), 1, "%s: %r" % (args, err))
            self.assertTrue(err.startswith("hubctl: "), err)

    async def test_http_4xx_exit_3(self):
        rc, out, err = await self.ctl("send", uniq("t-none"), "reboot")
        self.assertEqual(rc, 3, err)
        self.assertIn("404 unknown_device", err)

        rc, out, err = await self.ctl("send", self.dev_ok, "bogus")
        self.assertEqual(rc, 3, err)
        self.assertIn("422 invalid", err)
        self.assertIn("(field: name)", err)

        rc, out, err = await self.ctl("send", self.dev_ok, "reboot", "--params", '{"delay_s":-1}')
        self.assertEqual(rc, 3, err)
        self.assertIn("(field: params.delay_s)", err)

        doc = (await self.ctl_json("send", self.dev_ok, "reboot", "--ack-timeout", "0", want=3))[0]
        self.assertEqual((doc["status"], doc["error"]["code"], doc["error"]["field"]),
                         (422, "invalid", "ack_timeout_s"), doc)

        rc, out, err = await self.ctl("show", "c_" + "0" * 32)
        self.assertEqual(rc, 3, err)
        self.assertIn("404 not_found", err)

        rc, out, err = await self.ctl("devices", key=None)
        self.assertEqual(rc, 3, err)
        self.assertIn("401", err)

        rc, out, err = await self.ctl("send", self.dev_ok, "reboot", key="reader")
        self.assertEqual(rc, 3, err)
        self.assertIn("403 forbidden", err)

    async def test_unreachable_exit_4(self):
        url = "http://127.0.0.1:%d" % free_port()
        rc, out, err = await self.ctl("--url", url, "devices")
        self.assertEqual(rc, 4, err)
        self.assertIn("cannot connect", err)
        doc = (await self.ctl_json("--url", url, "show", "c_x", want=4))[0]
        self.assertEqual(doc["error"]["code"], "unreachable", doc)
        rc, out, err = await self.ctl("--url", url, "tail", "--count", "1")
        self.assertEqual(rc, 4, err)

    # -- show, cancel, list-commands, devices --------------------------------

    async def test_show_cancel_list(self):
        cid = (await self.ctl_json("send", self.dev_ign, "reboot"))[0]["id"]
        rc, out, err = await self.ctl("show", cid)
        self.assertEqual(rc, 0, err)
        self.assertTrue(out.startswith(cid + "  reboot on " + self.dev_ign), out)
        self.assertIn("history", out)

        doc = (await self.ctl_json("cancel", cid))[0]
        self.assertEqual((doc["id"], doc["status"]), (cid, "canceled"))
        await self.wait_cancel(cid)

        rc, out, err = await self.ctl("cancel", cid)
        self.assertEqual(rc, 3, err)
        self.assertIn("409 conflict", err)

        shown = (await self.ctl_json("show", cid))[0]
        self.assertEqual([h["status"] for h in shown["history"]][-1], "canceled")

        listed = (await self.ctl_json("list-commands", self.dev_ign, "--status", "canceled"))[0]
        self.assertEqual([c["id"] for c in listed["commands"]], [cid])
        listed = (await self.ctl_json("list-commands", self.dev_ign, "--status", "succeeded"))[0]
        self.assertEqual(listed["commands"], [])
        rc, out, err = await self.ctl("list-commands", self.dev_ign, "--limit", "5")
        self.assertEqual(rc, 0, err)
        self.assertEqual(out.splitlines()[0].split(), ["ID", "STATUS", "NAME", "ATTEMPT", "CREATED"])
        self.assertIn(cid, out)
        self.assertIn("canceled", out)

    async def wait_cancel(self, cid, timeout=5):
        deadline = asyncio.get_running_loop().time() + timeout
        while not any(c["id"] == cid for c in self.dev.cancels):
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError("the gateway got no cancel for %s" % cid)
            await asyncio.sleep(0.02)

    async def test_devices(self):
        doc = (await self.ctl_json("devices", "--type", "thermostat", "--label", "site=" + self.site))[0]
        self.assertEqual(sorted(d["device"] for d in doc["devices"]),
                         sorted([self.dev_ok, self.dev_fail, self.dev_ign]))
        self.assertTrue(all(d["online"] for d in doc["devices"]), doc)
        doc = (await self.ctl_json("devices", "--online", "false", "--label", "site=" + self.site))[0]
        self.assertEqual(doc["devices"], [])
        doc = (await self.ctl_json("devices", "--type", "door-sensor", "--label", "site=" + self.site))[0]
        self.assertEqual(doc["devices"], [])
        rc, out, err = await self.ctl("devices", "--label", "site=" + self.site)
        self.assertEqual(rc, 0, err)
        self.assertEqual(len(out.splitlines()), 4, out)
        self.assertIn(self.dev_ok, out)

    # -- tail ----------------------------------------------------------------

    async def test_tail_presence(self):
        prefix = uniq("t-pres")
        p = await self.start("-v", "--json", "tail", "--stream", "presence", "--device", prefix + "*",
                             "--count", "2")
        await self.wait_subscribed(p)
        gw = await self.gateway(self.hub)
        await gw.announce([(prefix + "-a", "thermostat"), (prefix + "-b", "thermostat")])
        rc, out, err = await self.finish(p)
        self.assertEqual(rc, 0, err)
        docs = [json.loads(l) for l in out.splitlines()]
        self.assertEqual(sorted(d["device"] for d in docs), [prefix + "-a", prefix + "-b"], docs)
        self.assertTrue(all(d["type"] == "presence" and d["online"] is True for d in docs), docs)

    async def test_tail_commands(self):
        p = await self.start("-v", "tail", "--stream", "commands", "--device", self.dev_ok, "--count", "5")
        await self.wait_subscribed(p)
        cid = (await self.ctl_json("send", self.dev_ok, "reboot"))[0]["id"]
        rc, out, err = await self.finish(p)
        self.assertEqual(rc, 0, err)
        lines = out.splitlines()
        self.assertEqual(len(lines), 5, out)
        self.assertTrue(all(cid in l and self.dev_ok in l for l in lines), out)
        self.assertEqual([l.split()[4] for l in lines],
                         ["queued", "sent", "received", "in_progress", "succeeded"], out)

    async def test_tail_count_not_reached_exit_5(self):
        rc, out, err = await self.ctl("tail", "--stream", "presence", "--device", uniq("t-quiet"),
                                      "--count", "1", "--timeout", "1")
        self.assertEqual(rc, 5, err)
        self.assertEqual(out, "")
        # --timeout with no message at all: exit 5 and say so (was 0, silently)
        rc, out, err = await self.ctl("tail", "--stream", "presence", "--device", uniq("t-quiet"),
                                      "--timeout", "0.5")
        self.assertEqual(rc, 5, err)
        self.assertEqual(out, "")
        self.assertIn("no messages within the timeout", err)

    async def test_tail_numbers_as_sent(self):
        """tail prints numbers exactly as the hub sent them (jansson would
        print 21.55 back as 21.550000000000001), with and without --json."""
        dev = uniq("t-num")
        gw = await self.gateway(self.hub)
        await gw.announce([(dev, "thermostat")])
        outs = []
        for json_flag in (["--json"], []):
            p = await self.start("-v", *json_flag, "tail", "--device", dev, "--count", "1")
            await self.wait_subscribed(p)
            seq = len(outs) + 1
            reply = await gw.telemetry(seq, [{"device": dev, "ts": now_ms(),
                                              "data": {"temperature": 21.55, "humidity": 0.1}}])
            self.assertEqual((reply.get("type"), reply.get("rejected") or []), ("ack", []), reply)
            rc, out, err = await self.finish(p)
            self.assertEqual(rc, 0, err)
            outs.append(out)
        doc = outs[0].strip()
        self.assertIn('"data":{"temperature":21.55,"humidity":0.1}', doc)
        self.assertNotIn('"sub"', doc)
        self.assertEqual(json.loads(doc)["type"], "reading")
        self.assertIn('{"temperature":21.55,"humidity":0.1}', outs[1])
        self.assertNotIn("21.550000", outs[0] + outs[1])

    async def test_tail_stream_errors(self):
        rc, out, err = await self.ctl("tail", "--since", "garbage")
        self.assertEqual(rc, 3, err)
        self.assertIn("bad_since", err)
        rc, out, err = await self.ctl("tail", key="writer")
        self.assertEqual(rc, 3, err)
        self.assertIn("403", err)

    # -- send-fleet, show-rollout ------------------------------------------------

    async def fleet(self, behaviors):
        """A gateway announcing one thermostat per behavior ('succeed', 'fail',
        'ignore'), in that id order, labelled fleet=<fresh>. Returns the label
        value, the device ids and the Device."""
        label, p = uniq("fleet"), uniq("t")
        devices = ["%s-%02d" % (p, i) for i in range(len(behaviors))]
        gw = await self.gateway(self.hub)
        ann = await gw.announce([(d, "thermostat", {"fleet": label}) for d in devices])
        self.assertEqual(sorted(ann["accepted"]), devices, ann)
        dev = Device(gw, dict(zip(devices, behaviors)))
        self.addAsyncCleanup(dev.stop)
        return label, devices, dev

    def assert_counts(self, doc):
        self.assertEqual(sum(doc["counts"].values()), doc["total"], doc)

    async def test_send_fleet_wait_completed(self):
        label, devices, dev = await self.fleet(["succeed"] * 3)
        pf = write_file(os.path.join(mkdtemp("iot-hub-ctl-params-"), "p.json"), '{"delay_s":2}')
        rc, out, err = await self.ctl("send-fleet", "--type", "thermostat", "--label", "fleet=" + label,
                                      "reboot", "--params", "@" + pf, "--max-per-minute", "6000",
                                      "--ack-timeout", "5", "--wait")
        self.assertEqual(rc, 0, "stdout: %s\nstderr: %s" % (out, err))
        lines = out.splitlines()
        self.assertRegex(lines[0], r"^r_[0-9a-f]{32}  reboot on 3 thermostat device\(s\) \(labels fleet=%s\) "
                         r"at 6000/min$" % re.escape(label))
        rid = lines[0].split()[0]
        self.assertNotIn("\r", out, "no in-place updates when stdout is not a terminal")
        progress = lines[1:-1]
        self.assertTrue(progress, out)
        for l in progress:
            self.assertRegex(l, r"^\d\d:\d\d:\d\d\.\d{3}  (running|completed) +released [0-3]/3  ", out)
        self.assertEqual(len(progress), len(set(progress)), "unchanged lines repeated: %s" % out)
        self.assertIn("completed", progress[-1])
        self.assertIn("succeeded 3", progress[-1])
        self.assertEqual(lines[-1], "%s completed: succeeded 3" % rid, out)
        self.assertEqual(sorted(c["device"] for c in dev.commands), devices)
        self.assertTrue(all(c["params"] == {"delay_s": 2} for c in dev.commands), dev.commands)

        # show-rollout (and show) of the finished rollout
        rc, out, err = await self.ctl("show-rollout", rid)
        self.assertEqual(rc, 0, err)
        self.assertTrue(out.startswith("%s  reboot on thermostat devices (labels fleet=%s)" % (rid, label)), out)
        self.assertRegex(out, r"\n  status    completed\n")
        self.assertIn("released  3/3 at 6000/min", out)
        self.assertIn("counts    succeeded 3", out)
        self.assertIn('params    {"delay_s":2}', out)
        rc, out2, err = await self.ctl("show", rid)
        self.assertEqual((rc, out2), (0, out), err)
        doc = (await self.ctl_json("show-rollout", rid))[0]
        self.assertEqual((doc["id"], doc["status"], doc["total"], doc["counts"]),
                         (rid, "completed", 3, {"succeeded": 3}), doc)

    async def test_send_fleet_wait_json(self):
        label, devices, dev = await self.fleet(["succeed"] * 4)
        docs = await self.ctl_json("send-fleet", "--type", "thermostat", "--label", "fleet=" + label,
                                   "config", "--params", '{"setpoint":20}', "--max-per-minute", "120",
                                   "--min-finished", "2", "--abort-failure-ratio", "0.5", "--wait")
        first, rest = docs[0], docs[1:]
        rid = first["id"]
        self.assertEqual((first["total"], first["name"], first["params"], first["max_per_minute"],
                          first["min_finished"], first["abort_failure_ratio"], first["labels"]),
                         (4, "config", {"setpoint": 20}, 120, 2, 0.5, {"fleet": label}), first)
        self.assertTrue(rest, docs)
        self.assertTrue(all(d["id"] == rid for d in rest), docs)
        for d in docs:
            self.assert_counts(d)
        released = [d["released"] for d in rest]
        self.assertEqual(released, sorted(released), "released only grows: %s" % released)
        self.assertGreater(len(set(released)), 1, "4 at 120/min are not released at once: %s" % released)
        self.assertTrue(all(d["status"] == "running" for d in rest[:-1]), docs)
        self.assertEqual((rest[-1]["status"], rest[-1]["counts"]), ("completed", {"succeeded": 4}), rest[-1])
        self.assertEqual(len(dev.commands), 4)

    async def test_send_fleet_failures_exit_1(self):
        # completed, but one command failed
        label, devices, dev = await self.fleet(["succeed", "fail"])
        rc, out, err = await self.ctl("send-fleet", "--type", "thermostat", "--label", "fleet=" + label,
                                      "reboot", "--max-per-minute", "6000", "--wait")
        self.assertEqual(rc, 1, "stdout: %s\nstderr: %s" % (out, err))
        self.assertRegex(out.splitlines()[-1], r"^r_\S+ completed: succeeded 1, failed 1$")

    async def test_send_fleet_aborted_exit_1(self):
        label, devices, dev = await self.fleet(["fail", "succeed", "succeed", "succeed"])
        rc, out, err = await self.ctl("send-fleet", "--type", "thermostat", "--label", "fleet=" + label,
                                      "reboot", "--max-per-minute", "60", "--abort-failure-ratio", "0",
                                      "--wait")
        self.assertEqual(rc, 1, "stdout: %s\nstderr: %s" % (out, err))
        last = out.splitlines()[-1]
        self.assertRegex(last, r"^r_\S+ aborted: .*failed 1")
        self.assertIn("canceled", last)
        self.assertLess(len(dev.commands), 4, "aborted, yet every command was delivered")

    async def test_send_fleet_wait_timeout_exit_5(self):
        label, devices, dev = await self.fleet(["ignore"])
        rc, out, err = await self.ctl("--timeout", "2", "send-fleet", "--type", "thermostat",
                                      "--label", "fleet=" + label, "reboot", "--wait")
        self.assertEqual(rc, 5, "stdout: %s\nstderr: %s" % (out, err))
        self.assertIn("gave up waiting", err)
        self.assertIn("is running (released 1/1)", err)
        docs = await self.ctl_json("--timeout", "1.5", "send-fleet", "--type", "thermostat",
                                   "--label", "fleet=" + label, "reboot", "--wait", want=5)
        self.assertEqual(docs[-1]["error"]["code"], "wait_timeout", docs)
        self.assertEqual((docs[-1]["id"], docs[-1]["status"]), (docs[0]["id"], "running"), docs)

    async def test_send_fleet_no_wait_and_errors(self):
        label, devices, dev = await self.fleet(["ignore", "ignore"])
        rc, out, err = await self.ctl("send-fleet", "--type", "thermostat", "--label", "fleet=" + label,
                                      "reboot", "--max-per-minute", "1")
        self.assertEqual(rc, 0, err)
        self.assertRegex(out, r"^r_[0-9a-f]{32} running 2 device\(s\)\n$")
        rid = out.split()[0]
        doc = (await self.ctl_json("show-rollout", rid))[0]
        self.assert_counts(doc)
        self.assertEqual((doc["total"], doc["max_per_minute"], doc["status"]), (2, 1, "running"), doc)
        rc, out, err = await self.ctl("show-rollout", rid)
        self.assertEqual(rc, 0, err)
        self.assertIn("  status    running\n", out)
        self.assertRegex(out, r"released  [12]/2 at 1/min")
        self.assertIn("abort     never", out)

        base = ("send-fleet", "--type", "thermostat", "--label", "fleet=" + label, "reboot")
        for extra, field in (((), None), (("--max-per-minute", "0"), "rollout.max_per_minute"),
                             (("--abort-failure-ratio", "2"), "rollout.abort_failure_ratio"),
                             (("--min-finished", "0"), "rollout.min_finished"),
                             (("--max-attempts", "0"), "max_attempts"),
                             (("--params", '{"delay_s":-1}'), "params.delay_s")):
            if field is None:
                continue
            rc, out, err = await self.ctl(*(base + extra))
            self.assertEqual(rc, 3, "%s: %s" % (extra, err))
            self.assertIn("422 invalid", err)
            self.assertIn("(field: %s)" % field, err)
        rc, out, err = await self.ctl("send-fleet", "--type", "toaster", "reboot")
        self.assertEqual(rc, 3, err)
        self.assertIn("(field: target.device_type)", err)
        doc = (await self.ctl_json("send-fleet", "--type", "thermostat", "bogus", want=3))[0]
        self.assertEqual((doc["status"], doc["error"]["field"]), (422, "name"), doc)
        rc, out, err = await self.ctl(*base, key="reader")
        self.assertEqual(rc, 3, err)
        self.assertIn("403 forbidden", err)
        rc, out, err = await self.ctl("show-rollout", "r_" + "0" * 32)
        self.assertEqual(rc, 3, err)
        self.assertIn("404 not_found", err)
        # pause, resume, cancel of the rollout
        rc, out, err = await self.ctl("pause", rid)
        self.assertEqual((rc, out), (0, "%s paused\n" % rid), err)
        rc, out, err = await self.ctl("pause", rid)
        self.assertEqual(rc, 3, err)
        self.assertIn("409 conflict", err)
        rc, out, err = await self.ctl("resume", rid)
        self.assertEqual((rc, out), (0, "%s running\n" % rid), err)
        rc, out, err = await self.ctl("cancel", rid)
        self.assertEqual(rc, 0, err)
        self.assertRegex(out, r"^%s cancel(ing|ed)\n$" % rid)

    async def test_send_fleet_progress_in_place_on_a_terminal(self):
        label, devices, dev = await self.fleet(["succeed"] * 3)
        master, slave = pty.openpty()
        p = await asyncio.create_subprocess_exec(
            CTL_BIN, "send-fleet", "--type", "thermostat", "--label", "fleet=" + label, "reboot",
            "--max-per-minute", "120", "--wait", env=self.env(),
            stdin=asyncio.subprocess.DEVNULL, stdout=slave, stderr=asyncio.subprocess.PIPE)
        os.close(slave)
        chunks = []

        def drain():
            while True:
                try:
                    b = os.read(master, 4096)
                except OSError:
                    return
                if not b:
                    return
                chunks.append(b)
        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        try:
            rc, _, err = await self.finish(p)
            await asyncio.to_thread(reader.join, 5)
        finally:
            os.close(master)
        out = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
        self.assertEqual(rc, 0, "output: %r\nstderr: %s" % (out, err))
        updates = out.count("\r\x1b[K")
        self.assertGreaterEqual(updates, 2, "progress not rewritten in place: %r" % out)
        lines = out.split("\n")
        self.assertEqual(len([l for l in lines if l]), 3, "header, one progress line, the result: %r" % out)
        self.assertIn("completed", lines[1].split("\r\x1b[K")[-1], out)
        self.assertRegex(lines[2], r"^r_\S+ completed: succeeded 3$")


if __name__ == "__main__":
    main()
