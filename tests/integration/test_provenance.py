"""Provenance (docs/provenance.md) against a real hub and Redis: every stored
reading is chained; `hubctl verify` (tools/hubctl.c) passes an intact
history and names the first altered, removed, inserted and reordered
reading (position and time) after the stream was edited directly in Redis;
a forged checkpoint signature and a consistently re-chained history are
caught by the signed checkpoints; a device type that requires signatures
refuses a bad one (`bad_signature`, nothing stored) and stores and verifies
a good one; chains stay valid across a gateway takeover between two hub
instances on one Redis, a resent (duplicate) frame, MAXLEN trimming, and
a device moving between ingest shards on a real Redis Cluster; the SDKs'
signing hooks (Python signer, C sign_cb through sdk_gw) end to end."""

import asyncio
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (BUILD_DIR, SCHEMAS_DIR, HubTestCase, api_keys_file, clean_env, http_json, main,  # noqa: E402
                     mkdtemp, now_ms, reading, require_bin, uniq, wait_until, write_file)

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

CTL_BIN = os.environ.get("HUB_CTL_BIN") or os.path.join(BUILD_DIR, "tools", "hubctl")
ADMIN = "iotk_prov_admin_00001"
READER = "iotk_prov_reader_0002"
KEYS = {"admin": (ADMIN, ["admin"]), "reader": (READER, ["telemetry:read"])}

SIGNED_TYPE = {
    "device_type": "signed-meter",
    "signed_readings": True,
    "telemetry": {"type": "object",
                  "properties": {"kwh": {"type": "number"}, "temperature": {"type": "number"}}},
}
SDK_GW = os.environ.get("SDK_GW_BIN") or os.path.join(BUILD_DIR, "sdk", "sdk_gw")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "sdk", "python"))


def tm_key(device, shard=0):
    return "iot:tm:{i%d}:%s" % (shard, device)


def field_map(entry):
    f = entry[1]
    return {f[i]: f[i + 1] for i in range(0, len(f), 2)}


def lp(b):
    return struct.pack(">I", len(b)) + b


def chain_hash(prev, f, device):
    """The hub's chain hash, written again here from the documented
    encoding (docs/provenance.md "The chain")."""
    m = b"iot-hub.prov.v1\0" + lp(prev)
    for v in (f["n"], device, f["ts"], f["data"], f["gw"], f["seq"], f["at"], f.get("sig", "")):
        m += lp(v.encode())
    return hashlib.sha256(m).digest()


def reading_message(device, ts, data):
    return (b"iot-hub.reading.v1\0" + lp(device.encode()) + lp(str(ts).encode())
            + lp(data.encode()))


async def send_n(gw, device, n, seq0=1, value0=20.0):
    for i in range(n):
        rep = await gw.telemetry(seq0 + i, [reading(device, value0 + i)])
        assert (rep.get("type"), rep.get("accepted")) == ("ack", 1), rep


class ProvenanceTests(HubTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        require_bin(CTL_BIN, "HUB_CTL_BIN")
        cls.schemas = mkdtemp("iot-hub-prov-types-")
        shutil.copy(os.path.join(SCHEMAS_DIR, "thermostat.json"), cls.schemas)
        write_file(os.path.join(cls.schemas, "signed-meter.json"), json.dumps(SIGNED_TYPE))
        cls.keys = api_keys_file(KEYS)
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis, schemas=cls.schemas,
                                extra=["--api-keys", cls.keys, "--provenance", "1", "--provenance-checkpoint-s", "1"])

    def verify(self, device, hub=None, frm=0, to=None, extra=()):
        hub = hub or self.hub
        to = to if to is not None else now_ms() + 60000
        p = subprocess.run([CTL_BIN, "--url", "http://127.0.0.1:%d" % hub.port, "--key", READER,
                            "--json", "verify", device, "--from", str(frm), "--to", str(to)]
                           + list(extra), capture_output=True, text=True, timeout=30)
        out = p.stdout.strip().splitlines()
        doc = json.loads(out[-1]) if out else None
        return p.returncode, doc, p.stderr

    def entries(self, device, redis=None):
        return (redis or self.redis).cmd("XRANGE", tm_key(device), "-", "+")

    def rewrite(self, device, entries):
        """Replaces the device's stream with entries (id, fields) as given,
        keeping their ids: what someone with write access to Redis can do."""
        k = tm_key(device)
        self.redis.cmd("DEL", k)
        for eid, f in entries:
            self.redis.cmd("XADD", k, eid, *f)

    # ---- the chain ---------------------------------------------------------

    async def test_stored_readings_are_chained_and_verify(self):
        gw, d = await self.gw_dev(self.hub)
        await send_n(gw, d, 3)
        # a frame of several readings of one device chains them in order
        rep = await gw.telemetry(4, [reading(d, 30.0), reading(d, 31.0)])
        self.assertEqual(rep.get("accepted"), 2, rep)
        ents = self.entries(d)
        self.assertEqual(len(ents), 5)
        prev = bytes(32)
        for i, e in enumerate(ents):
            f = field_map(e)
            self.assertEqual(f["n"], str(i + 1), f)
            self.assertEqual(f["ph"], prev.hex(), "entry %d does not store its predecessor" % i)
            prev = chain_hash(prev, f, d)
        head = self.redis.cmd("HGET", "iot:ph:{i0}", tm_key(d))
        self.assertEqual(head, "5 " + prev.hex())
        rc, doc, err = self.verify(d)
        self.assertEqual(rc, 0, (doc, err))
        self.assertEqual((doc["intact"], doc["readings"]), (True, 5), doc)

    async def test_resent_frame_is_not_chained_twice(self):
        gw, d = await self.gw_dev(self.hub)
        await send_n(gw, d, 2)
        rep = await gw.telemetry(2, [reading(d, 99.0)])  # a resend of seq 2
        self.assertEqual(rep.get("type"), "ack", rep)
        await send_n(gw, d, 1, seq0=3)
        ents = self.entries(d)
        self.assertEqual([field_map(e)["n"] for e in ents], ["1", "2", "3"])
        rc, doc, err = self.verify(d)
        self.assertEqual((rc, doc and doc.get("readings")), (0, 3), (doc, err))

    # ---- tampering, named by the verifier ----------------------------------

    async def tampered(self, change):
        gw, d = await self.gw_dev(self.hub)
        await send_n(gw, d, 6)
        ents = [(e[0], list(e[1])) for e in self.entries(d)]
        self.assertEqual(self.verify(d)[0], 0)
        change(d, ents)
        rc, doc, err = self.verify(d)
        self.assertEqual(rc, 1, (doc, err))
        self.assertFalse(doc["intact"], doc)
        return doc, ents

    async def test_changed_value_is_named(self):
        def change(d, ents):
            f = ents[2][1]
            f[f.index("data") + 1] = '{"temperature":-5}'
            self.rewrite(d, ents)
        doc, ents = await self.tampered(change)
        self.assertEqual((doc["fault"], doc["position"], doc["id"]), ("altered", 2, ents[2][0]), doc)
        self.assertEqual(doc["ts"], int(field_map(ents[2])["ts"]), doc)

    async def test_deleted_entry_is_named(self):
        def change(d, ents):
            self.redis.cmd("XDEL", tm_key(d), ents[3][0])
        doc, ents = await self.tampered(change)
        # the reading after the gap is named: position 3 now holds ents[4]
        self.assertEqual((doc["fault"], doc["position"], doc["id"]), ("removed", 3, ents[4][0]), doc)

    async def test_inserted_entry_is_named(self):
        def change(d, ents):
            # ids are not hashed: respace them to make room for the forgery
            forged = list(ents[3][1])
            forged[forged.index("data") + 1] = '{"temperature":1}'
            fields = [f for _, f in ents[:4]] + [forged] + [f for _, f in ents[4:]]
            ms0 = int(ents[0][0].split("-")[0])
            self.rewrite(d, [("%d-0" % (ms0 + 10 * i), f) for i, f in enumerate(fields)])
        doc, ents = await self.tampered(change)
        self.assertEqual((doc["fault"], doc["position"]), ("inserted", 4), doc)

    async def test_swapped_entries_are_named(self):
        def change(d, ents):
            new = list(ents)
            new[2], new[3] = (ents[2][0], ents[3][1]), (ents[3][0], ents[2][1])
            self.rewrite(d, new)
        doc, ents = await self.tampered(change)
        self.assertEqual((doc["fault"], doc["position"], doc["id"]), ("reordered", 2, ents[2][0]), doc)

    # ---- checkpoints ---------------------------------------------------------

    async def wait_checkpoint(self, device, n=None):
        """The checkpoints naming device (with n: whose leaf for it has
        reached n readings; a checkpoint may fall between two frames)."""
        def got():
            st, doc = http_json(self.hub, "GET", "/v1/provenance/checkpoints?device=%s" % device,
                                key=READER)
            self.assertEqual(st, 200, doc)
            return [c for c in doc["checkpoints"]
                    if c["leaves"] and (n is None or c["leaves"][0]["n"] == n)]
        await asyncio.to_thread(wait_until, got, 10, 0.2, "a checkpoint naming %s" % device)
        return got()

    async def test_checkpoints_signed_and_forgery_caught(self):
        gw, d = await self.gw_dev(self.hub)
        await send_n(gw, d, 4)
        cks = await self.wait_checkpoint(d, n=4)
        leaf = cks[0]["leaves"][0]
        self.assertEqual((leaf["shard"], leaf["n"]), (0, 4), leaf)
        st, kd = http_json(self.hub, "GET", "/v1/provenance/key", key=READER)
        self.assertEqual(st, 200, kd)
        self.assertIn(cks[0]["key"], kd["keys"])
        rc, doc, err = self.verify(d)
        self.assertEqual(rc, 0, (doc, err))
        self.assertGreaterEqual(doc["checkpoints"], 1, doc)

        # an auditor pinning another key refuses the checkpoint
        other = Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
        rc, doc, _ = self.verify(d, extra=["--pubkey", other])
        self.assertEqual((rc, doc["fault"]), (1, "checkpoint_signature"), doc)

        # a history re-chained consistently after a change (every hash and
        # the head recomputed) passes the chain but not the checkpoint
        ents = [(e[0], list(e[1])) for e in self.entries(d)]
        prev = bytes(32)
        for i, (eid, f) in enumerate(ents):
            if i == 1:
                f[f.index("data") + 1] = '{"temperature":-40}'
            f[f.index("ph") + 1] = prev.hex()
            prev = chain_hash(prev, {f[j]: f[j + 1] for j in range(0, len(f), 2)}, d)
        self.rewrite(d, ents)
        self.redis.cmd("HSET", "iot:ph:{i0}", tm_key(d), "%d %s" % (len(ents), prev.hex()))
        rc, doc, err = self.verify(d)
        self.assertEqual((rc, doc["fault"], doc["position"]), (1, "altered", 3), (doc, err))

    async def test_forged_checkpoint_signature_caught(self):
        gw, d = await self.gw_dev(self.hub)
        await send_n(gw, d, 2)
        cks = await self.wait_checkpoint(d)
        ck = cks[0]
        raw = self.redis.cmd("XRANGE", "iot:{hub}:prov:ckpts", ck["id"], ck["id"])
        f = list(raw[0][1])
        sig = f[f.index("sig") + 1]
        f[f.index("sig") + 1] = ("0" if sig[0] != "0" else "1") + sig[1:]
        self.redis.cmd("XDEL", "iot:{hub}:prov:ckpts", ck["id"])
        # put it back under a fresh id just after the original
        ms = int(ck["id"].split("-")[0])
        self.redis.cmd("XADD", "iot:{hub}:prov:ckpts", "%d-%d" % (ms, 999999), *f)
        rc, doc, err = self.verify(d)
        self.assertEqual((rc, doc["fault"]), (1, "checkpoint_signature"), (doc, err))

    # ---- device signatures -----------------------------------------------------

    async def test_device_signatures(self):
        gw = await self.gateway(self.hub, devices=("m-*",))
        d = uniq("m")
        rep = await gw.announce([(d, "signed-meter")])
        self.assertEqual(rep.get("accepted"), [d], rep)
        sk = Ed25519PrivateKey.generate()
        pub = sk.public_key().public_bytes(serialization.Encoding.Raw,
                                           serialization.PublicFormat.Raw).hex()
        st, body = http_json(self.hub, "PUT", "/v1/devices/%s/key" % d, {"key": pub}, key=READER)
        self.assertEqual(st, 403, body)
        st, body = http_json(self.hub, "PUT", "/v1/devices/%s/key" % d, {"key": "zz"}, key=ADMIN)
        self.assertEqual(st, 422, body)
        st, body = http_json(self.hub, "PUT", "/v1/devices/%s/key" % d, {"key": pub}, key=ADMIN)
        self.assertEqual(st, 204, body)

        def signed(kwh, key=sk, ts=None):
            ts = ts or now_ms()
            data = '{"kwh":%s}' % kwh
            return {"device": d, "ts": ts, "data": json.loads(data),
                    "sig": key.sign(reading_message(d, ts, data)).hex()}

        async def send(seq, r):
            while True:
                rep = await gw.telemetry(seq, [r])
                if rep.get("type") == "ack":
                    return rep
                self.assert_unavailable(rep, seq)  # the key is being read
                await asyncio.sleep(0.1)

        bad = signed(1.5, key=Ed25519PrivateKey.generate())
        rep = await send(1, bad)
        self.assertEqual(rep["accepted"], 0, rep)
        self.assertEqual(rep["rejected"][0]["code"], "bad_signature", rep)
        nosig = signed(1.5)
        del nosig["sig"]
        rep = await send(2, nosig)
        self.assertEqual(rep["rejected"][0]["code"], "bad_signature", rep)
        changed = signed(1.5)
        changed["data"]["kwh"] = 2.5  # signed 1.5, says 2.5
        rep = await send(3, changed)
        self.assertEqual(rep["rejected"][0]["code"], "bad_signature", rep)
        self.assertEqual(self.redis.cmd("EXISTS", tm_key(d)), 0, "a refused reading was stored")

        good = signed(3.25)
        rep = await send(4, good)
        self.assertEqual((rep["accepted"], rep.get("rejected", [])), (1, []), rep)
        ents = self.entries(d)
        self.assertEqual(len(ents), 1)
        self.assertEqual(field_map(ents[0])["sig"], good["sig"])
        rc, doc, err = self.verify(d)
        self.assertEqual(rc, 0, (doc, err))
        # the stored signature is checked end to end: an edited value whose
        # chain is recomputed still fails the device's signature
        f = list(ents[0][1])
        f[f.index("data") + 1] = '{"kwh":9}'
        fm = {f[j]: f[j + 1] for j in range(0, len(f), 2)}
        h = chain_hash(bytes(32), fm, d)
        self.rewrite(d, [(ents[0][0], f)])
        self.redis.cmd("HSET", "iot:ph:{i0}", tm_key(d), "1 " + h.hex())
        rc, doc, err = self.verify(d)
        self.assertEqual((rc, doc["fault"], doc["position"]), (1, "bad_signature", 0), (doc, err))


    # ---- the SDKs' signing hooks -------------------------------------------------

    async def signed_device(self):
        """A signed-meter device announced once (so that it exists) with a
        registered key. -> (device, private key)"""
        gw = await self.gateway(self.hub, devices=("m-*",))
        d = uniq("m")
        rep = await gw.announce([(d, "signed-meter")])
        self.assertEqual(rep.get("accepted"), [d], rep)
        await gw.close()
        sk = Ed25519PrivateKey.generate()
        pub = sk.public_key().public_bytes(serialization.Encoding.Raw,
                                           serialization.PublicFormat.Raw).hex()
        st, body = http_json(self.hub, "PUT", "/v1/devices/%s/key" % d, {"key": pub}, key=ADMIN)
        self.assertEqual(st, 204, body)
        return d, sk

    async def test_python_sdk_signer(self):
        from iothub_gw import Gateway
        d, sk = await self.signed_device()
        spool = os.path.join(mkdtemp("iot-hub-prov-spool-"), "spool.db")
        gw = Gateway(self.hub.url(), spool=spool, token=self.token(uniq("gw"), ("m-*",)),
                     signer=lambda device, msg: sk.sign(msg), backoff_min=0.1)
        gw.announce(d, "signed-meter")
        task = asyncio.ensure_future(gw.run())
        try:
            gw.send(d, now_ms(), {"kwh": 1.5})
            gw.send(d, None, '{ "kwh" : 2.5 }')   # compacted and stamped before signing
            await asyncio.to_thread(wait_until, lambda: self.redis.cmd("XLEN", tm_key(d)) == 2,
                                    10, 0.05, "two signed readings stored")
        finally:
            gw.stop()
            await asyncio.wait_for(task, 10)
        self.assertEqual(gw.stats["rejected"], 0, gw.stats)
        ents = self.entries(d)
        self.assertEqual([field_map(e)["data"] for e in ents], ['{"kwh":1.5}', '{"kwh":2.5}'])
        self.assertTrue(all(len(field_map(e)["sig"]) == 128 for e in ents))
        rc, doc, err = self.verify(d)
        self.assertEqual((rc, doc["readings"]), (0, 2), (doc, err))

    async def test_c_sdk_sign_cb(self):
        require_bin(SDK_GW, "SDK_GW_BIN")
        d, sk = await self.signed_device()
        seed = sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption()).hex()
        tmp = mkdtemp("iot-hub-prov-sdkgw-")
        p = await asyncio.to_thread(
            subprocess.run, [SDK_GW, "--url", self.hub.url(), "--token", self.token(uniq("gw"), ("m-*",)),
                             "--spool", os.path.join(tmp, "spool"), "--type", "signed-meter",
                             "--devices", d, "--count", "5", "--sign-seed", seed],
            capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, (p.stdout, p.stderr[-2000:]))
        self.assertIn("rejected=0", p.stdout)
        ents = self.entries(d)
        self.assertEqual(len(ents), 5)
        rc, doc, err = self.verify(d)
        self.assertEqual((rc, doc["readings"]), (0, 5), (doc, err))
        # a wrong key: every reading refused bad_signature, none stored
        d2, _ = await self.signed_device()
        p = await asyncio.to_thread(
            subprocess.run, [SDK_GW, "--url", self.hub.url(), "--token", self.token(uniq("gw"), ("m-*",)),
                             "--spool", os.path.join(tmp, "spool2"), "--type", "signed-meter",
                             "--devices", d2, "--count", "3", "--sign-seed", seed],
            capture_output=True, text=True, timeout=60)
        self.assertIn("rejected=3", p.stdout, p.stderr[-2000:])
        self.assertEqual(self.redis.cmd("EXISTS", tm_key(d2)), 0)


class ProvenanceInstancesTests(HubTestCase):
    """Two hub instances on one Redis, a gateway moving between them."""

    async def test_takeover_resend_two_instances(self):
        keys = api_keys_file(KEYS)
        redis = self.start_redis()
        a = self.start_hub(redis, extra=["--api-keys", keys, "--provenance", "1", "--instance-id", "prov-a"])
        b = self.start_hub(redis, extra=["--api-keys", keys, "--provenance", "1", "--instance-id", "prov-b"])
        sub, d = uniq("gw"), uniq("t")
        seq = 0
        for hub in (a, b, a, b):
            gw = await self.gateway(hub, sub=sub)
            rep = await gw.announce([(d, "thermostat")])
            self.assertEqual(rep.get("accepted"), [d], rep)
            if seq:  # the last frame again: a duplicate on another instance
                rep = await gw.telemetry(seq, [reading(d, 1.0)])
                self.assertEqual(rep.get("type"), "ack", rep)
            for _ in range(3):
                seq += 1
                # frames in flight together: stamped against one cached head
                await gw.send({"type": "telemetry", "seq": seq, "readings": [reading(d, seq)]})
            for s in range(seq - 2, seq + 1):
                rep = await gw.reply_for(s)
                self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", 1), rep)
            await gw.close()
        ents = redis.cmd("XRANGE", tm_key(d), "-", "+")
        self.assertEqual([field_map(e)["n"] for e in ents], [str(i) for i in range(1, 13)])
        # every frame once; frames in flight together right after a takeover
        # may be stored out of seq order when a re-stamp sends one again
        # (docs/provenance.md): the chain's order is the stored order
        self.assertEqual(sorted(int(field_map(e)["seq"]) for e in ents), list(range(1, 13)))
        for hub in (a, b):
            p = subprocess.run([CTL_BIN, "--url", "http://127.0.0.1:%d" % hub.port, "--key", READER,
                                "--json", "verify", d, "--from", "0", "--to", str(now_ms() + 1000)],
                               capture_output=True, text=True, timeout=30)
            self.assertEqual(p.returncode, 0, (p.stdout, p.stderr))
            self.assertEqual(json.loads(p.stdout)["readings"], 12)

    async def test_trimmed_stream_still_verifies(self):
        keys = api_keys_file(KEYS)
        redis = self.start_redis(extra=["--stream-node-max-entries", "4"])
        hub = self.start_hub(redis, extra=["--api-keys", keys, "--provenance", "1", "--device-stream-maxlen", "8"])
        gw, d = await self.gw_dev(hub)
        rep = await gw.telemetry(1, [reading(d, float(i)) for i in range(40)])
        self.assertEqual(rep.get("accepted"), 40, rep)
        await send_n(gw, d, 5, seq0=2)
        ents = redis.cmd("XRANGE", tm_key(d), "-", "+")
        self.assertLess(len(ents), 20, "MAXLEN did not trim")
        self.assertGreater(int(field_map(ents[0])["n"]), 1)
        p = subprocess.run([CTL_BIN, "--url", "http://127.0.0.1:%d" % hub.port, "--key", READER,
                            "--json", "verify", d, "--from", "0", "--to", str(now_ms() + 1000)],
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(p.returncode, 0, (p.stdout, p.stderr))
        self.assertEqual(json.loads(p.stdout)["readings"], len(ents))

    async def test_off_by_default(self):
        """The default (docs/provenance.md "Cost"): no chain fields, no heads."""
        redis = self.start_redis()
        hub = self.start_hub(redis)
        gw, d = await self.gw_dev(hub)
        await send_n(gw, d, 2)
        ents = redis.cmd("XRANGE", tm_key(d), "-", "+")
        self.assertEqual(sorted(field_map(ents[0])), ["data", "gw", "seq", "ts"])
        self.assertEqual(redis.cmd("EXISTS", "iot:ph:{i0}"), 0)

    async def test_verify_usage_errors_exit_2(self):
        for args in (["verify"], ["verify", "x", "--from", "5", "--to", "1"],
                     ["verify", "x", "--from", "1"]):
            p = subprocess.run([CTL_BIN, "--url", "http://127.0.0.1:1"] + args,
                               capture_output=True, text=True, timeout=30)
            self.assertEqual(p.returncode, 2, (args, p.stdout, p.stderr))
        # the hub unreachable: 2 as well (not "tampered")
        p = subprocess.run([CTL_BIN, "--url", "http://127.0.0.1:1", "verify", "x", "--from", "0",
                            "--to", "1"], capture_output=True, text=True, timeout=30)
        self.assertEqual(p.returncode, 2, (p.stdout, p.stderr))


class ProvenanceClusterTests(HubTestCase):
    """A Redis Cluster (3 primaries, 16 ingest shards): a device that moves to
    a gateway of another shard continues in that shard's stream, with its
    own chain; both verify, and a checkpoint names both heads."""

    async def test_cluster_device_moves_shard(self):
        keys = api_keys_file(KEYS)
        cluster = self.start_cluster(primaries=3)
        # the hub refuses a cluster until every flow keeps to one slot
        # (docs/streams.md "Redis Cluster"); the ingest path does
        hub = self.start_hub(cluster.seeds, extra=["--api-keys", keys, "--provenance", "1",
                                                    "--provenance-checkpoint-s", "1"],
                             env=clean_env({"IOT_HUB_ALLOW_CLUSTER_PARTIAL": "1"}))
        hub.wait_line(r"16 ingest shards", 15)
        d = uniq("t")
        # two gateways in two shards (FNV-1a of the id mod 16, hub/keys.h)
        def shard(g):
            h = 2166136261
            for c in g.encode():
                h = ((h ^ c) * 16777619) & 0xffffffff
            return h % 16
        g1 = uniq("gw")
        g2 = next(g for g in (uniq("gw") for _ in range(100)) if shard(g) != shard(g1))
        seq = 0
        for g in (g1, g2):
            gw = await self.gateway(hub, sub=g)
            rep = await gw.announce([(d, "thermostat")])
            self.assertEqual(rep.get("accepted"), [d], rep)
            for _ in range(3):
                seq += 1
                rep = await gw.telemetry(seq, [reading(d, float(seq))])
                self.assertEqual((rep.get("type"), rep.get("accepted")), ("ack", 1), rep)
            await gw.close()

        def ckpt_shards():
            st, doc = http_json(hub, "GET", "/v1/provenance/checkpoints?device=%s" % d, key=READER)
            return {lf["shard"] for c in doc.get("checkpoints", []) for lf in c.get("leaves", [])}
        await asyncio.to_thread(wait_until, lambda: ckpt_shards() == {shard(g1), shard(g2)}, 15, 0.2,
                                "checkpoints naming both streams")
        p = await asyncio.to_thread(
            subprocess.run, [CTL_BIN, "--url", "http://127.0.0.1:%d" % hub.port, "--key", READER, "--json",
                             "verify", d, "--from", "0", "--to", str(now_ms() + 1000)],
            capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, (p.stdout, p.stderr))
        doc = json.loads(p.stdout)
        self.assertEqual((doc["readings"], doc["shards"]), (6, 16), doc)
        self.assertGreaterEqual(doc["checkpoints"], 1, doc)


if __name__ == "__main__":
    main()
