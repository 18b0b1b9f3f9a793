"""Anomaly flags (docs/anomalies.md) against the real hub and Redis: a test
set from the simulator with injected spikes, drifts and stuck runs, scored
for precision and recall per kind; Gaussian noise alone flags nothing;
flat-line and rate rules; the flags stored with the reading (device stream,
history API) and counted in /metrics; `since` recovery of anomaly events;
the models surviving a move of the gateway to a second hub on the same
Redis."""

import asyncio
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (SIM_BIN, HubTestCase, api_keys_file, connect_dashboard, http_json,  # noqa: E402
                     http_get, main, metric_value, parse_metrics, require_bin, rkeys, uniq,
                     now_ms, wait_until, write_file)

KEY = "iotk_anomaly_reader_0001"
KEYS = {"reader": (KEY, ["telemetry:read"], None)}

PROBE = {
    "device_type": "probe",
    "telemetry": {
        "type": "object",
        "properties": {
            "temperature": {"type": "number", "x-anomaly": {
                "zscore": 4, "flatline": {"n": 20}, "drift": {"sigma": 3, "window": 20}}},
            "humidity": {"type": "number"},
            "level": {"type": "number", "x-anomaly": {"max_rate": 10, "warmup": 5}},
        },
    },
}
PLAIN = {"device_type": "plain", "telemetry": {"type": "object"}}

DRIFT_GRACE = 60   # readings after a drift's end in which its flags still count
STUCK_GRACE = 2


def score_set(truth_lines, events):
    """Precision and recall per kind. Spikes: per reading (device, ts).
    Drifts and stuck runs: per injected run (found when a flag of its kind
    falls in it or within the grace after it); a flag is right when it falls
    in a run of its kind (plus grace). Returns {kind: (precision, recall,
    flags, injected)}."""
    spikes, runs = set(), {"drift": [], "stuck": []}
    last = {}
    for line in truth_lines:
        dev, ts, kind = line.split("\t")
        ts = int(ts)
        if kind == "spike":
            spikes.add((dev, ts))
            continue
        prev = last.get((dev, kind))
        if prev and ts - prev[2] == 1000:   # the next reading of the same run
            prev[2] = ts
        else:
            prev = [dev, ts, ts]
            runs[kind].append(prev)
        last[(dev, kind)] = prev
    flags = {"spike": [], "drift": [], "flatline": []}
    for e in events:
        for a in e["anomalies"]:
            if a["field"] == "temperature" and a["kind"] in flags:
                flags[a["kind"]].append((e["device"], e["ts"]))
    out = {}
    tp = sum(1 for f in flags["spike"] if f in spikes)
    found = len(spikes & set(flags["spike"]))
    out["spike"] = (tp / max(1, len(flags["spike"])), found / max(1, len(spikes)),
                    len(flags["spike"]), len(spikes))
    for kind, flag_kind, grace in (("drift", "drift", DRIFT_GRACE), ("stuck", "flatline", STUCK_GRACE)):
        rs = runs[kind]

        def within(f, r, grace=grace):
            return f[0] == r[0] and r[1] <= f[1] <= r[2] + grace * 1000
        right = sum(1 for f in flags[flag_kind] if any(within(f, r) for r in rs))
        hit = sum(1 for r in rs if any(within(f, r) for f in flags[flag_kind]))
        out[kind] = (right / max(1, len(flags[flag_kind])), hit / max(1, len(rs)),
                     len(flags[flag_kind]), len(rs))
    return out


class Anomalies(HubTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        require_bin(SIM_BIN, "HUB_SIM_BIN")
        cls.schemas = os.path.join(cls.tmp, "types")
        os.makedirs(cls.schemas)
        write_file(os.path.join(cls.schemas, "probe.json"), json.dumps(PROBE))
        write_file(os.path.join(cls.schemas, "plain.json"), json.dumps(PLAIN))
        cls.keys = api_keys_file(KEYS)
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis, schemas=cls.schemas,
                                extra=["--api-keys", cls.keys, "--anomaly-flush-ms", "100",
                                       "--device-rate", "0"])

    def sim(self, hub, prefix, *args, timeout=60):
        cmd = [SIM_BIN, "--url", hub.url(), "--jwt-secret", self.secret_file,
               "--gateway-prefix", prefix, "--device-type", "probe", "--json-summary", *map(str, args)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        self.assertEqual(p.returncode, 0, "gw-sim exit %d: %s" % (p.returncode, p.stderr[-1500:]))
        s = json.loads(p.stdout)
        self.assertEqual(s.get("hub_errors", 0), 0, s)
        return s

    async def collect(self, d, until_quiet=1.0, timeout=30):
        """Every anomaly message until none came for until_quiet seconds."""
        got, loop = [], asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            ms = await d.gather(lambda g: len(g) >= 1, timeout=until_quiet, fail=False)
            if not ms:
                return got
            got += [m for m in ms if m.get("type") == "anomaly"]
        return got

    async def run_set(self, *inject, frames=1000, seed=17):
        """A simulated set (4 devices, 8 readings per frame) and the anomaly
        events it gave on the stream, scored against its truth file."""
        prefix = uniq("q")
        truth = os.path.join(self.tmp, "truth-%s.tsv" % prefix)
        d = await connect_dashboard(self.hub, KEY)
        self.addAsyncCleanup(d.close)
        await d.subscribe("a", stream="anomalies", filter={"devices": [prefix + "-*"]})
        self.sim(self.hub, prefix, "--devices", 4, "--batch", 8, "--frames", frames, "--inflight", 4,
                 "--truth", truth, "--seed", seed, *inject)
        events = await self.collect(d)
        with open(truth) as f:
            lines = [ln.rstrip("\n") for ln in f if ln.strip()]
        q = score_set(lines, events)
        report = {k: {"precision": round(p, 3), "recall": round(r, 3), "flags": nf, "injected": ni}
                  for k, (p, r, nf, ni) in q.items()}
        return q, report, events

    async def test_quality_spikes_at_5_sigma(self):
        """8,000 readings of N(21, 0.5) with 1 % spikes at 5 sigma (zscore
        threshold 4): precision and recall >= 0.9."""
        q, report, _ = await self.run_set("--spikes", 0.01)
        print("anomaly quality, spikes only: %s" % json.dumps(report), file=sys.stderr)
        self.assertGreater(q["spike"][3], 40, report)
        self.assertGreaterEqual(q["spike"][0], 0.9, report)
        self.assertGreaterEqual(q["spike"][1], 0.9, report)

    async def test_quality_of_a_mixed_set(self):
        """8,000 readings with spikes, drifts and stuck runs together:
        precision and recall per kind, from the stream."""
        q, report, events = await self.run_set("--spikes", 0.01, "--drifts", 0.002, "--stuck", 0.002)
        print("anomaly quality, mixed set: %s" % json.dumps(report), file=sys.stderr)
        self.assertGreater(q["drift"][3], 0, report)
        self.assertGreaterEqual(q["drift"][1], 0.9, report)
        self.assertGreaterEqual(q["drift"][0], 0.8, report)
        self.assertGreater(q["stuck"][3], 0, report)
        self.assertGreaterEqual(q["stuck"][1], 0.9, report)
        self.assertGreaterEqual(q["stuck"][0], 0.9, report)
        # spikes next to drifts are harder (see docs/anomalies.md): a lower bound
        self.assertGreaterEqual(q["spike"][0], 0.5, report)
        self.assertGreaterEqual(q["spike"][1], 0.5, report)
        # Every event on the stream is counted in /metrics (this hub only).
        body = http_get(self.hub, "/metrics")[-1]
        m = parse_metrics(body)
        n_spike = sum(1 for e in events for a in e["anomalies"] if a["kind"] == "spike")
        self.assertGreaterEqual(metric_value(m, "iot_hub_anomalies_total", kind="spike"), n_spike)
        self.assertGreater(metric_value(m, "iot_hub_anomalies_total", kind="flatline"), 0)
        # The flag is stored with the reading: the device stream's `anom`
        # and the history API's `anomalies`.
        e = next(e for e in events if any(a["kind"] == "spike" for a in e["anomalies"]))
        entries = [x[1] for x in self.redis.xrange(rkeys.tm(e["device"])) if x[1]["ts"] == str(e["ts"])]
        self.assertEqual(len(entries), 1)
        self.assertEqual(json.loads(entries[0]["anom"]), e["anomalies"])
        # (the history's range is of stream ids: arrival times, these ts are a day old)
        st, hist = http_json(self.hub, "GET", "/v1/devices/%s/telemetry?from=%d&to=%d"
                             % (e["device"], e["ts"], now_ms() + 1000), key=KEY)
        self.assertEqual(st, 200, hist)
        got = [r for r in hist["readings"] if r["ts"] == e["ts"]]
        self.assertEqual([r.get("anomalies") for r in got], [e["anomalies"]], got)
        first = min(x["ts"] for x in events if x["device"] == e["device"])
        self.assertTrue(all("anomalies" not in r for r in hist["readings"] if r["ts"] < first))

    async def test_gaussian_noise_is_not_flagged(self):
        """4 x 1,000 readings of Gaussian noise (fixed seed): no event."""
        prefix = uniq("n")
        truth = os.path.join(self.tmp, "truth-%s.tsv" % prefix)
        d = await connect_dashboard(self.hub, KEY)
        self.addAsyncCleanup(d.close)
        await d.subscribe("a", stream="anomalies", filter={"devices": [prefix + "-*"]})
        s = self.sim(self.hub, prefix, "--devices", 4, "--batch", 8, "--frames", 500, "--inflight", 4,
                     "--truth", truth, "--seed", 5)
        self.assertEqual(s["readings_acked"], 4000, s)
        self.assertEqual(os.path.getsize(truth), 0)
        self.assertEqual(sum(self.redis.xlen(rkeys.tm("%s-0000-d%d" % (prefix, i))) for i in range(4)), 4000)
        got = await d.gather(lambda g: False, timeout=1.5, fail=False)
        self.assertEqual([m for m in got if m.get("type") == "anomaly"], [])

    async def gw_probe(self, hub, dev, sub=None):
        gw = await self.gateway(hub, sub=sub, devices=[dev])
        rep = await gw.announce([{"device": dev, "device_type": "probe"}])
        self.assertEqual(rep.get("accepted"), [dev], rep)
        return gw

    async def send(self, gw, seq, dev, ts, **data):
        rep = await gw.telemetry(seq, [{"device": dev, "ts": ts, "data": data}])
        self.assertEqual(rep.get("accepted"), 1, rep)

    async def test_flatline_and_rate_rules_fire(self):
        dev = uniq("t-fr")
        d = await connect_dashboard(self.hub, KEY)
        self.addAsyncCleanup(d.close)
        await d.subscribe("a", stream="anomalies", filter={"devices": [dev]})
        gw = await self.gw_probe(self.hub, dev)
        t0, seq = now_ms() - 3_600_000, 1
        import random
        rnd = random.Random(3)
        for i in range(40):
            await self.send(gw, seq, dev, t0 + i * 1000, temperature=21 + rnd.gauss(0, 0.5),
                            level=5 + i * 0.1)
            seq += 1
        # level jumps by 30 in one second: rate (max_rate 10 per s)
        await self.send(gw, seq, dev, t0 + 40_000, temperature=21.1, level=35)
        seq += 1
        m = await d.wait_for(lambda m: m.get("type") == "anomaly", 5, "the rate event")
        self.assertEqual(m["ts"], t0 + 40_000)
        self.assertEqual([(a["field"], a["kind"]) for a in m["anomalies"]], [("level", "rate")], m)
        self.assertAlmostEqual(m["anomalies"][0]["score"], 30 - 0.1 * 39 + 0.0, delta=3)
        # temperature stuck at 22.0: flagged from its 20th identical value on
        for i in range(25):
            await self.send(gw, seq, dev, t0 + 41_000 + i * 1000, temperature=22.0, level=35)
            seq += 1
        got = await d.gather(lambda g: len(g) >= 6, 5, "the flat-line events")
        self.assertEqual([m["ts"] for m in got], [t0 + 41_000 + i * 1000 for i in range(19, 25)], got)
        self.assertTrue(all(m["anomalies"] == [{"field": "temperature", "kind": "flatline",
                                                "score": n}] for m, n in zip(got, range(20, 26))), got)

    async def test_since_recovers_missed_anomaly_events(self):
        dev = uniq("t-since")
        d = await connect_dashboard(self.hub, KEY)
        rep = await d.subscribe("a", stream="anomalies", filter={"devices": [dev]})
        pos = rep["position"]
        await d.close()
        gw = await self.gw_probe(self.hub, dev)
        t0, import_rnd = now_ms() - 3_600_000, __import__("random").Random(9)
        spikes = []
        for i in range(80):
            v = 21 + import_rnd.gauss(0, 0.5)
            if i in (50, 65):
                v = 21 + 8 * 0.5
                spikes.append(t0 + i * 1000)
            await self.send(gw, i + 1, dev, t0 + i * 1000, temperature=v)
        d2 = await connect_dashboard(self.hub, KEY)
        self.addAsyncCleanup(d2.close)
        await d2.subscribe("b", stream="anomalies", filter={"devices": [dev]}, since=pos)
        got = await d2.gather(lambda g: len([m for m in g if m.get("type") == "anomaly"]) >= 2, 5)
        ev = [m for m in got if m.get("type") == "anomaly"]
        self.assertEqual([m["ts"] for m in ev], spikes, got)
        self.assertTrue(all(m["sub"] == "b" and m["anomalies"][0]["kind"] == "spike" for m in ev), ev)
        # no reading without a flag came with them
        self.assertEqual([m for m in got if m.get("type") == "reading"], [])
        # since on a stream without positions is still refused
        await d2.subscribe("c", stream="presence", since=pos, expect="bad_since")

    async def test_models_survive_a_move_to_another_hub(self):
        """Two hubs on one Redis: the gateway moves from the first to the
        second; the model learnt on the first flags a spike on the second at
        once (a fresh model would still be warming up)."""
        hub2 = self.start_hub(self.redis, schemas=self.schemas,
                              extra=["--api-keys", self.keys, "--anomaly-flush-ms", "100",
                                     "--device-rate", "0"])
        dev, sub = uniq("t-move"), uniq("gw-move")
        gw = await self.gw_probe(self.hub, dev, sub=sub)
        t0, rnd = now_ms() - 3_600_000, __import__("random").Random(11)
        for i in range(40):
            await self.send(gw, i + 1, dev, t0 + i * 1000, temperature=21 + rnd.gauss(0, 0.5))
        key = "iot:dev:{%s}:anom" % dev

        def learnt():
            v = self.redis.hgetall(key).get("temperature", "")
            return v.startswith("1 40 ")
        wait_until(learnt, 5, what="the model written to Redis")
        ttl = int(self.redis.cmd("TTL", key))
        self.assertGreater(ttl, 600_000)
        await gw.close()
        d = await connect_dashboard(hub2, KEY)
        self.addAsyncCleanup(d.close)
        await d.subscribe("a", stream="anomalies", filter={"devices": [dev]})
        gw2 = await self.gw_probe(hub2, dev, sub=sub)
        await self.send(gw2, 41, dev, t0 + 40_000, temperature=21 + 6 * 0.5)
        m = await d.wait_for(lambda m: m.get("type") == "anomaly", 5, "the spike on the second hub")
        self.assertEqual(m["anomalies"][0]["kind"], "spike", m)
        self.assertEqual(m["ts"], t0 + 40_000)
        body = http_get(hub2, "/metrics")[-1]
        self.assertEqual(metric_value(parse_metrics(body), "iot_hub_anomalies_total", kind="spike"), 1)

    async def test_unmarked_types_carry_no_flags(self):
        dev = uniq("t-plain")
        gw = await self.gateway(self.hub, devices=[dev])
        rep = await gw.announce([{"device": dev, "device_type": "plain"}])
        self.assertEqual(rep.get("accepted"), [dev], rep)
        for i in range(40):
            rep = await gw.telemetry(i + 1, [{"device": dev, "data": {"temperature": 1000 if i == 39 else 1}}])
            self.assertEqual(rep.get("accepted"), 1, rep)
        self.assertTrue(all("anom" not in e[1] for e in self.redis.xrange(rkeys.tm(dev))))
        self.assertEqual(self.redis.hgetall("iot:dev:{%s}:anom" % dev), {})

    def test_bad_x_anomaly_refuses_to_start(self):
        bad = os.path.join(self.tmp, "bad-types")
        os.makedirs(bad, exist_ok=True)
        doc = json.loads(json.dumps(PROBE))
        doc["telemetry"]["properties"]["humidity"]["x-anomaly"] = {"zscore": "high"}
        write_file(os.path.join(bad, "probe.json"), json.dumps(doc))
        from harness import HUB_BIN, hub_args
        p = subprocess.run([HUB_BIN, *hub_args(self.redis, self.secret_file, schemas=bad)],
                           capture_output=True, text=True, timeout=20)
        self.assertEqual(p.returncode, 1)
        self.assertIn("probe.json: telemetry.properties.humidity.x-anomaly: zscore must be a number > 0",
                      p.stderr)


if __name__ == "__main__":
    main()
