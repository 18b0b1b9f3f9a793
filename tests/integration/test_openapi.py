"""The OpenAPI document of the operator HTTP API (docs/openapi.json):
the file is OpenAPI 3.0.x, describes every route with its scopes and error
answers, and its examples match its schemas; GET /v1/openapi.json (no key)
serves exactly the file's bytes; and live answers of a real hub match what the
document declares: status codes (401 without a key and 403 without the scope
for every secured operation, 404/409/422/503 where declared), content types,
and bodies validated against the declared schemas."""

import asyncio
import hashlib
import json
import os
import re
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (SOURCE_DIR, HubTestCase, api_keys_file, http_get, http_request, main, now_ms,  # noqa: E402
                     index_device, rkeys)

DOC_PATH = os.path.join(SOURCE_DIR, "docs", "openapi.json")

# (method, path) every operation the document must describe
OPERATIONS = [
    ("get", "/healthz"), ("get", "/readyz"), ("get", "/metrics"),
    ("get", "/v1/openapi.json"), ("get", "/v1/device-types"),
    ("get", "/v1/devices"), ("get", "/v1/devices/{device}"),
    ("get", "/v1/devices/{device}/telemetry"),
    ("post", "/v1/devices/{device}/commands"), ("get", "/v1/devices/{device}/commands"),
    ("post", "/v1/commands"), ("get", "/v1/commands/{id}"),
    ("post", "/v1/commands/{id}/cancel"),
    ("post", "/v1/revocations"), ("get", "/v1/revocations"),
    ("delete", "/v1/revocations/sub/{sub}"), ("delete", "/v1/revocations/jti/{jti}"),
    ("get", "/v1/audit"),
    ("delete", "/v1/devices/{device}"),
    ("post", "/v1/commands/{id}/pause"), ("post", "/v1/commands/{id}/resume"),
    ("get", "/v1/aggregates"),
]
PUBLIC = {"/healthz", "/readyz", "/metrics", "/v1/openapi.json"}
STATES = ["queued", "sent", "received", "in_progress", "succeeded", "failed", "rejected",
          "timed_out", "expired", "canceled"]

# name: (key, scopes, device patterns or None)
KEYS = {"reader": ("iotk_oa_reader_000001", ["telemetry:read"], None),
        "writer": ("iotk_oa_writer_000002", ["commands:write"], None),
        "admin": ("iotk_oa_admin_0000003", ["admin"], None),
        "none": ("iotk_oa_noscope_00004", [], None),
        "limited": ("iotk_oa_limited_00005", ["telemetry:read", "commands:write"], ["t-1"])}

# seeded registry: id -> (type, labels, online, last_seen)
DEVICES = {"t-1": ("thermostat", {"site": "b1"}, False, 1000),
           "t-2": ("thermostat", {"site": "b2"}, False, 2000),
           "p-1": ("power-meter", {}, True, 3000)}


def load_doc():
    with open(DOC_PATH, "rb") as f:
        raw = f.read()
    return raw, json.loads(raw)


# ------------------------------------------------------------------ schemas
# A validator for the OpenAPI 3.0 schema subset the document uses (no
# jsonschema package in Debian's python3 by default).

class SchemaError(AssertionError):
    pass


def resolve(doc, node):
    seen = 0
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        if not ref.startswith("#/"):
            raise SchemaError("external $ref %s" % ref)
        node = doc
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        seen += 1
        if seen > 20:
            raise SchemaError("$ref loop at %s" % ref)
    return node


def _type_ok(t, v):
    if t == "object":
        return isinstance(v, dict)
    if t == "array":
        return isinstance(v, list)
    if t == "string":
        return isinstance(v, str)
    if t == "boolean":
        return isinstance(v, bool)
    if t == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    raise SchemaError("unknown type %r" % t)


def validate(doc, schema, v, at="$"):
    """Raises SchemaError naming the first place v does not match schema."""
    s = resolve(doc, schema)
    if v is None:
        if s.get("nullable") or ("type" not in s and not any(k in s for k in ("allOf", "oneOf", "anyOf"))):
            return
        raise SchemaError("%s: null where the schema is not nullable" % at)
    if "type" in s and not _type_ok(s["type"], v):
        raise SchemaError("%s: %r is not of type %s" % (at, v, s["type"]))
    if "enum" in s and v not in s["enum"]:
        raise SchemaError("%s: %r not in %r" % (at, v, s["enum"]))
    if isinstance(v, str):
        if "pattern" in s and not re.search(s["pattern"], v):
            raise SchemaError("%s: %r does not match %s" % (at, v, s["pattern"]))
        if len(v) < s.get("minLength", 0) or len(v) > s.get("maxLength", len(v)):
            raise SchemaError("%s: length of %r out of range" % (at, v))
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if "minimum" in s and v < s["minimum"]:
            raise SchemaError("%s: %r below %r" % (at, v, s["minimum"]))
        if "maximum" in s and v > s["maximum"]:
            raise SchemaError("%s: %r above %r" % (at, v, s["maximum"]))
    if isinstance(v, list):
        if len(v) > s.get("maxItems", len(v)):
            raise SchemaError("%s: too many items" % at)
        if "items" in s:
            for i, x in enumerate(v):
                validate(doc, s["items"], x, "%s[%d]" % (at, i))
    if isinstance(v, dict):
        props = s.get("properties", {})
        for r in s.get("required", []):
            if r not in v:
                raise SchemaError("%s: required property %r missing" % (at, r))
        if len(v) > s.get("maxProperties", len(v)):
            raise SchemaError("%s: too many properties" % at)
        extra = s.get("additionalProperties", True)
        for k, x in v.items():
            if k in props:
                validate(doc, props[k], x, "%s.%s" % (at, k))
            elif extra is False:
                raise SchemaError("%s: unexpected property %r" % (at, k))
            elif isinstance(extra, dict):
                validate(doc, extra, x, "%s.%s" % (at, k))
    for sub in s.get("allOf", []):
        validate(doc, sub, v, at)
    if "oneOf" in s:
        ok = 0
        errs = []
        for sub in s["oneOf"]:
            try:
                validate(doc, sub, v, at)
                ok += 1
            except SchemaError as e:
                errs.append(str(e))
        if ok != 1:
            raise SchemaError("%s: matches %d of oneOf (want 1): %s" % (at, ok, "; ".join(errs)))


def refs(node):
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for v in node.values():
            yield from refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from refs(v)


def operations(doc):
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in ("get", "post", "put", "patch", "delete", "head", "options"):
                yield path, method, op


# ------------------------------------------------------------------ the file

class Document(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.raw, cls.doc = load_doc()

    def test_openapi_3_0(self):
        self.assertRegex(self.doc.get("openapi", ""), r"^3\.0\.\d+$")
        for k in ("title", "version", "description"):
            self.assertTrue(self.doc["info"].get(k), "info.%s missing" % k)
        self.assertTrue(self.raw.endswith(b"\n"))
        self.raw.decode("utf-8")  # UTF-8

    def test_every_route(self):
        for method, path in OPERATIONS:
            self.assertIn(path, self.doc["paths"], path)
            self.assertIn(method, self.doc["paths"][path], "%s %s" % (method.upper(), path))
        ids = [op.get("operationId") for _, _, op in operations(self.doc)]
        self.assertEqual(len(ids), len(set(ids)), "operationIds must be unique: %r" % ids)
        self.assertEqual(len(ids), len(OPERATIONS), "operations not listed here: %r" % ids)

    def test_refs_resolve(self):
        for r in set(refs(self.doc)):
            self.assertTrue(r.startswith("#/components/"), r)
            resolve(self.doc, {"$ref": r})

    def test_path_parameters_declared(self):
        for path, method, op in operations(self.doc):
            names = set(re.findall(r"\{([^}]+)\}", path))
            params = [resolve(self.doc, p) for p in
                      self.doc["paths"][path].get("parameters", []) + op.get("parameters", [])]
            declared = {p["name"] for p in params if p["in"] == "path"}
            self.assertEqual(names, declared, "%s %s" % (method, path))
            for p in params:
                if p["in"] == "path":
                    self.assertTrue(p.get("required"), "%s: path parameter %s" % (path, p["name"]))

    def test_components(self):
        sch = self.doc["components"]["schemas"]
        for name in ("Command", "Rollout", "Device", "Reading", "Error", "HistoryEntry",
                     "CommandState"):
            self.assertIn(name, sch)
        self.assertEqual(resolve(self.doc, sch["CommandState"])["enum"], STATES)
        cmd = sch["Command"]
        self.assertEqual(resolve(self.doc, cmd["properties"]["status"])["enum"], STATES)
        hist = resolve(self.doc, cmd["properties"]["history"])
        self.assertEqual(hist["type"], "array")
        self.assertEqual(resolve(self.doc, hist["items"])["properties"]["status"],
                         {"$ref": "#/components/schemas/CommandState"})
        err = sch["Error"]["properties"]["error"]
        self.assertEqual(sorted(err["required"]), ["code", "message"])
        self.assertIn("field", err["properties"])
        for name in ("Command", "Rollout"):
            self.assertIn("id", sch[name]["properties"])

    def test_security(self):
        schemes = self.doc["components"]["securitySchemes"]
        self.assertEqual(len(schemes), 1)
        (name, scheme), = schemes.items()
        self.assertEqual((scheme["type"], scheme["scheme"]), ("http", "bearer"))
        self.assertEqual(self.doc["security"], [{name: []}])
        for path, method, op in operations(self.doc):
            where = "%s %s" % (method.upper(), path)
            if path in PUBLIC:
                self.assertEqual(op.get("security"), [], where)
                continue
            self.assertNotEqual(op.get("security"), [], where)
            scopes = op.get("x-required-scopes")
            self.assertTrue(scopes and set(scopes) <= {"telemetry:read", "commands:write", "admin"}, where)
            for s in scopes:
                self.assertIn(s, op["description"], where)
            for code in ("401", "403"):
                self.assertIn(code, op["responses"], where)

    def test_scopes_per_route(self):
        def scopes(method, path):
            return sorted(self.doc["paths"][path][method]["x-required-scopes"])
        read, write = ["telemetry:read"], ["commands:write"]
        either = ["commands:write", "telemetry:read"]
        self.assertEqual(scopes("get", "/v1/device-types"), read)
        self.assertEqual(scopes("get", "/v1/devices"), read)
        self.assertEqual(scopes("get", "/v1/devices/{device}"), read)
        self.assertEqual(scopes("get", "/v1/devices/{device}/telemetry"), read)
        self.assertEqual(scopes("post", "/v1/devices/{device}/commands"), write)
        self.assertEqual(scopes("get", "/v1/devices/{device}/commands"), either)
        self.assertEqual(scopes("post", "/v1/commands"), write)
        self.assertEqual(scopes("get", "/v1/commands/{id}"), either)
        self.assertEqual(scopes("post", "/v1/commands/{id}/cancel"), write)

    def test_declared_statuses(self):
        def codes(method, path):
            return set(self.doc["paths"][path][method]["responses"])
        self.assertEqual(codes("get", "/readyz") - {"405", "422"}, {"200", "503"})
        self.assertLessEqual({"200", "404", "422", "503"}, codes("get", "/v1/devices/{device}/telemetry"))
        self.assertLessEqual({"200", "201", "404", "422", "503"},
                             codes("post", "/v1/devices/{device}/commands"))
        self.assertLessEqual({"202", "422", "503"}, codes("post", "/v1/commands"))
        self.assertLessEqual({"200", "404", "409", "503"}, codes("post", "/v1/commands/{id}/cancel"))
        for path, method, op in operations(self.doc):
            for code, r in op["responses"].items():
                self.assertRegex(code, r"^[1-5]\d\d$")
                r = resolve(self.doc, r)
                self.assertTrue(r.get("description"), "%s %s %s" % (method, path, code))
                if code[0] in "45" and not (path == "/readyz" and code == "503"):
                    c = r["content"]["application/json"]["schema"]
                    self.assertEqual(c, {"$ref": "#/components/schemas/Error"},
                                     "%s %s %s" % (method, path, code))

    def test_parameters(self):
        def params(method, path):
            return {p["name"]: p for p in map(lambda p: resolve(self.doc, p),
                                              self.doc["paths"][path][method].get("parameters", []))}
        tm = params("get", "/v1/devices/{device}/telemetry")
        self.assertTrue(tm["from"]["required"] and tm["to"]["required"])
        self.assertEqual(tm["format"]["schema"]["enum"], ["json", "ndjson", "csv"])
        self.assertIn("limit", tm)
        self.assertIn("after", tm)
        dv = params("get", "/v1/devices")
        for name in ("device_type", "online", "limit"):
            self.assertIn(name, dv)
        labels = [p for p in dv.values() if "label." in p.get("description", "")]
        self.assertTrue(labels, "no label.<name> filter")
        self.assertEqual((labels[0]["style"], labels[0]["explode"]), ("form", True))
        cl = params("get", "/v1/devices/{device}/commands")
        self.assertEqual(resolve(self.doc, cl["status"]["schema"])["enum"], STATES)
        post = params("post", "/v1/devices/{device}/commands")
        self.assertEqual(post["Idempotency-Key"]["in"], "header")
        get = self.doc["paths"]["/v1/commands/{id}"]["get"]
        schema = get["responses"]["200"]["content"]["application/json"]["schema"]
        self.assertEqual(schema["oneOf"], [{"$ref": "#/components/schemas/Command"},
                                           {"$ref": "#/components/schemas/Rollout"}])

    def test_websockets_mentioned(self):
        d = self.doc["info"]["description"]
        for s in ("/v1/gateway", "/v1/stream", "protocol.md", "dashboard.md"):
            self.assertIn(s, d)

    def test_examples_match_schemas(self):
        n = 0
        for name, s in self.doc["components"]["schemas"].items():
            if "example" in s:
                validate(self.doc, s, s["example"], "#/components/schemas/%s example" % name)
                n += 1
        for path, method, op in operations(self.doc):
            for code, r in op["responses"].items():
                for mt, c in resolve(self.doc, r).get("content", {}).items():
                    if "schema" not in c or not mt.startswith("application/json"):
                        continue
                    exs = [c["example"]] if "example" in c else []
                    exs += [e["value"] for e in c.get("examples", {}).values()]
                    for ex in exs:
                        validate(self.doc, c["schema"], ex, "%s %s %s example" % (method, path, code))
                        n += 1
        self.assertGreater(n, 20)

    def test_validator_rejects(self):
        """The little validator above really validates."""
        bad = [("Device", {"device": "t-1"}),
               ("Reading", {"ts": "1", "data": {}, "pos": "1-0"}),
               ("Error", {"error": {"code": "x"}}),
               ("HistoryEntry", {"status": "done", "at": 1})]
        for name, v in bad:
            with self.assertRaises(SchemaError, msg=name):
                validate(self.doc, {"$ref": "#/components/schemas/" + name}, v)


# ------------------------------------------------------------------ live

def request(hub, method, path, key=None, body=None, headers=None, timeout=10):
    """Returns (status, headers, body bytes). key: a KEYS name or None."""
    return http_request(hub, method, path, body, KEYS[key][0] if key is not None else None, headers,
                        timeout=timeout)


class Checks:
    """Requests checked against the document (self.doc) on self.hub."""


    def template(self, path):
        """The document's path template matching a concrete path."""
        path = path.split("?")[0]
        for t in self.doc["paths"]:
            if re.fullmatch(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(t)), path):
                return t
        raise AssertionError("no path in the document matches %s" % path)

    def call(self, method, path, status, key="admin", body=None, headers=None, code=None,
             field=None):
        """Makes the request, asserts the status, that the document declares
        it for the operation with the answer's content type, and that a JSON
        answer validates against the declared schema. Returns (headers, body:
        parsed JSON or bytes)."""
        st, hdrs, raw = request(self.hub, method, path, key, body, headers)
        where = "%s %s" % (method, path)
        self.assertEqual(st, status, "%s: %s" % (where, raw[:400]))
        op = self.doc["paths"][self.template(path)].get(method.lower())
        self.assertIsNotNone(op, "%s: operation not in the document" % where)
        self.assertIn(str(st), op["responses"], "%s: %d not declared" % (where, st))
        resp = resolve(self.doc, op["responses"][str(st)])
        ctype = hdrs.get("content-type", "")
        content = resp.get("content", {})
        self.assertIn(ctype, content, "%s: content type %r not declared (%r)" % (where, ctype, list(content)))
        if not ctype.startswith("application/json"):
            return hdrs, raw
        doc = json.loads(raw)
        try:
            validate(self.doc, content[ctype]["schema"], doc)
        except SchemaError as e:
            raise AssertionError("%s: answer does not match the document: %s\n%s" % (where, e, raw[:600]))
        if code is not None:
            self.assertEqual(doc["error"]["code"], code, where)
        if field is not None:
            self.assertEqual(doc["error"].get("field"), field, where)
        return hdrs, doc

    def sample_path(self, path, method="get"):
        # A DELETE must not remove the seeded device the later tests read.
        return path.replace("{device}", "t-gone" if method.lower() == "delete" else "t-1").replace("{id}", "c_00000000000000000000000000000000") \
            .replace("{sub}", "gw-1").replace("{jti}", "tok-1")

    async def wait_redis(self, hub, up):
        deadline = time.monotonic() + 15
        want = 200 if up else 503
        while http_get(hub, "/readyz")[0] != want:
            self.assertLess(time.monotonic(), deadline, "/readyz never became %d" % want)
            await asyncio.sleep(0.05)


class Live(Checks, HubTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.raw, cls.doc = load_doc()
        cls.redis = cls.class_redis()
        cls.hub = cls.class_hub(cls.redis, extra=["--api-keys", api_keys_file(KEYS)])
        r = cls.redis
        for d, (typ, labels, online, seen) in DEVICES.items():
            r.cmd("HSET", rkeys.dev(d), "type", typ, "labels", json.dumps(labels), "gateway", "gw-1",
                  "conn", "x:1", "instance", "x", "online", "1" if online else "0",
                  "last_seen", seen, "announced_at", seen)
            index_device(r, d, typ)
        cls.t0 = now_ms() - 10000
        for i in range(3):
            r.cmd("XADD", rkeys.tm("t-1"), "%d-0" % (cls.t0 + 1000 * i), "ts", cls.t0 + 1000 * i,
                  "data", json.dumps({"temperature": 20 + i}), "gw", "gw-1", "seq", i)

    # -- the document itself

    async def test_served_document(self):
        st, hdrs, raw = await asyncio.to_thread(request, self.hub, "GET", "/v1/openapi.json")
        self.assertEqual(st, 200, raw[:300])
        self.assertTrue(hdrs.get("content-type", "").startswith("application/json"), hdrs)
        self.assertEqual((len(raw), hashlib.sha256(raw).hexdigest()),
                         (len(self.raw), hashlib.sha256(self.raw).hexdigest()),
                         "GET /v1/openapi.json is not the bytes of docs/openapi.json "
                         "(rebuild the hub after editing the file)")
        # a key is not needed, and does not hurt
        st, _, raw2 = await asyncio.to_thread(request, self.hub, "GET", "/v1/openapi.json", "none")
        self.assertEqual(st, 200)
        self.assertTrue(raw2 == self.raw, "with a key: not the bytes of docs/openapi.json")
        self.call("GET", "/v1/openapi.json", 200, key=None)

    # -- auth, for every secured operation

    async def test_401_without_key(self):
        for path, method, op in operations(self.doc):
            if path in PUBLIC:
                continue
            body = {"name": "reboot"} if method == "post" else None
            self.call(method.upper(), self.sample_path(path, method), 401, key=None, body=body,
                      code="unauthorized")

    async def test_401_unknown_key(self):
        st, _, raw = request(self.hub, "GET", "/v1/devices",
                             headers={"Authorization": "Bearer iotk_not_a_key_at_all"})
        self.assertEqual(st, 401, raw)

    async def test_403_without_scope(self):
        for path, method, op in operations(self.doc):
            if path in PUBLIC:
                continue
            scopes = op["x-required-scopes"]
            keys = ["none"]
            if scopes == ["commands:write"]:
                keys.append("reader")
            if scopes == ["telemetry:read"]:
                keys.append("writer")
            if scopes == ["admin"]:
                keys += ["reader", "writer"]
            body = {"name": "reboot"} if method == "post" else None
            for key in keys:
                self.call(method.upper(), self.sample_path(path, method), 403, key=key, body=body,
                          code="forbidden")
            # any one of the listed scopes is enough (not 401/403)
            for scope in scopes:
                key = {"telemetry:read": "reader", "commands:write": "writer", "admin": "admin"}[scope]
                st, _, raw = request(self.hub, method.upper(), self.sample_path(path, method), key, body)
                self.assertNotIn(st, (401, 403), "%s %s with %s: %s" % (method, path, key, raw[:200]))

    async def test_public_routes(self):
        self.call("GET", "/healthz", 200, key=None)
        self.call("GET", "/readyz", 200, key=None)
        _, text = self.call("GET", "/metrics", 200, key=None)
        self.assertIn(b"# TYPE", text)

    # -- devices and telemetry

    async def test_devices(self):
        self.call("GET", "/v1/device-types", 200, key="reader")
        _, doc = self.call("GET", "/v1/devices?device_type=thermostat&label.site=b1&online=false&limit=5", 200,
                           key="reader")
        self.assertEqual([d["device"] for d in doc["devices"]], ["t-1"])
        _, doc = self.call("GET", "/v1/devices?limit=1", 200, key="reader")
        self.assertTrue(doc["truncated"])
        _, doc = self.call("GET", "/v1/devices/t-1", 200, key="reader")
        self.assertEqual(doc["last_reading"]["data"], {"temperature": 22})
        _, doc = self.call("GET", "/v1/devices/p-1", 200, key="reader")
        self.assertIsNone(doc["last_reading"])
        self.call("GET", "/v1/devices/nope-1", 404, key="reader", code="not_found")
        self.call("GET", "/v1/devices/t-2", 404, key="limited", code="not_found")  # outside patterns
        self.call("GET", "/v1/devices?limit=0", 422, key="reader", code="invalid", field="limit")
        self.call("GET", "/v1/devices?online=yes", 422, key="reader", field="online")
        self.call("GET", "/v1/devices?label.=x", 422, key="reader", field="label.")

    async def test_telemetry(self):
        t0, t1 = self.t0, self.t0 + 5000
        base = "/v1/devices/t-1/telemetry?from=%d&to=%d" % (t0, t1)
        _, doc = self.call("GET", base + "&limit=2", 200, key="reader")
        self.assertEqual(len(doc["readings"]), 2)
        self.assertIsNotNone(doc["next"])
        _, doc = self.call("GET", base + "&after=" + doc["next"], 200, key="reader")
        self.assertEqual((len(doc["readings"]), doc["next"]), (1, None))
        _, text = self.call("GET", base + "&format=ndjson", 200, key="reader")
        self.assertEqual(len(text.splitlines()), 3)
        _, text = self.call("GET", base + "&format=csv", 200, key="reader")
        self.assertTrue(text.startswith(b"ts,pos,data\r\n"))
        self.call("GET", "/v1/devices/nope-1/telemetry?from=0&to=1", 404, key="reader")
        self.call("GET", "/v1/devices/t-1/telemetry?to=1", 422, key="reader", field="from")
        self.call("GET", "/v1/devices/t-1/telemetry?from=5&to=1", 422, key="reader", field="to")
        self.call("GET", base + "&format=xml", 422, key="reader", field="format")
        self.call("GET", base + "&after=zz", 422, key="reader", field="after")
        self.call("GET", "/v1/devices/t-1/telemetry?from=0&to=%d" % now_ms(), 422, key="reader",
                  field="to")  # beyond history-max-range-s

    # -- commands

    async def test_commands(self):
        path = "/v1/devices/t-1/commands"
        _, cmd = self.call("POST", path, 201, key="writer", body={"name": "reboot", "params": {"delay_s": 1}})
        self.assertEqual((cmd["status"], [h["status"] for h in cmd["history"]]), ("queued", ["queued"]))
        idem = {"Idempotency-Key": "oa-%d" % now_ms()}
        _, first = self.call("POST", path, 201, key="writer", body={"name": "reboot"}, headers=idem)
        _, again = self.call("POST", path, 200, key="writer", body={"name": "reboot"}, headers=idem)
        self.assertEqual(first["id"], again["id"])
        self.call("POST", path, 422, key="writer", body={"name": "reboot"},
                  headers={"Idempotency-Key": "has space"}, field="Idempotency-Key")
        self.call("POST", path, 422, key="writer", body={"name": "nope"}, field="name")
        self.call("POST", path, 422, key="writer", body={"name": "reboot", "params": {"delay_s": -1}},
                  field="params.delay_s")
        self.call("POST", path, 422, key="writer", body={"name": "reboot", "ttl_s": 0}, field="ttl_s")
        self.call("POST", "/v1/devices/nope-1/commands", 404, key="writer", body={"name": "reboot"},
                  code="unknown_device")
        self.call("POST", "/v1/devices/t-2/commands", 404, key="limited", body={"name": "reboot"})

        _, got = self.call("GET", "/v1/commands/" + cmd["id"], 200, key="reader")
        self.assertEqual(got["id"], cmd["id"])
        self.assertIn("history", got)
        _, lst = self.call("GET", path + "?status=queued&limit=10", 200, key="reader")
        self.assertIn(cmd["id"], [c["id"] for c in lst["commands"]])
        self.assertTrue(all("history" not in c for c in lst["commands"]))
        self.call("GET", path + "?status=done", 422, key="reader", field="status")
        self.call("GET", "/v1/devices/t-2/commands", 404, key="limited")
        self.call("GET", "/v1/commands/c_00000000000000000000000000000000", 404, key="reader",
                  code="not_found")

        _, canceled = self.call("POST", "/v1/commands/%s/cancel" % cmd["id"], 200, key="writer")
        self.assertEqual(canceled["status"], "canceled")
        self.call("POST", "/v1/commands/%s/cancel" % cmd["id"], 409, key="writer", code="conflict")
        self.call("POST", "/v1/commands/c_00000000000000000000000000000000/cancel", 404, key="writer")

    async def test_rollout(self):
        body = {"target": {"device_type": "thermostat"}, "name": "reboot", "params": {"delay_s": 0},
                "rollout": {"max_per_minute": 1, "abort_failure_ratio": 0.5}}
        _, ro = self.call("POST", "/v1/commands", 202, key="writer", body=body)
        self.assertTrue(ro["id"].startswith("r_"))
        self.assertEqual(ro["total"], 2)
        _, got = self.call("GET", "/v1/commands/" + ro["id"], 200, key="reader")
        self.assertEqual((got["id"], got["device_type"]), (ro["id"], "thermostat"))
        self.assertIn("counts", got)
        _, p = self.call("POST", "/v1/commands/%s/pause" % ro["id"], 200, key="writer")
        self.assertEqual(p["status"], "paused")
        _, p = self.call("POST", "/v1/commands/%s/resume" % ro["id"], 200, key="writer")
        self.assertEqual(p["status"], "running")
        _, c = self.call("POST", "/v1/commands/%s/cancel" % ro["id"], 200, key="writer")
        self.assertIn(c["status"], ("canceling", "canceled"))
        self.call("POST", "/v1/commands/%s/resume" % ro["id"], 409, key="writer")
        self.call("GET", "/v1/commands/r_00000000000000000000000000000000", 404, key="reader")
        self.call("POST", "/v1/commands", 422, key="writer", body=dict(body, target={"device_type": "x"}),
                  field="target.device_type")
        self.call("POST", "/v1/commands", 422, key="writer",
                  body=dict(body, rollout={"abort_failure_ratio": 2}), field="rollout.abort_failure_ratio")
        # a rollout's commands are ordinary commands
        _, lst = self.call("GET", "/v1/devices/t-1/commands", 200, key="reader")
        self.assertIn(ro["id"], [c["rollout"] for c in lst["commands"]])


class RedisDown(Checks, HubTestCase):
    async def test_503_where_declared(self):
        raw, self.doc = load_doc()
        redis = self.start_redis()
        hub = self.hub = self.start_hub(redis, extra=["--api-keys", api_keys_file(KEYS)])
        await self.wait_redis(hub, up=True)
        redis.kill()
        await self.wait_redis(hub, up=False)
        self.call("GET", "/readyz", 503, key=None)
        t = now_ms()
        for method, path in (("GET", "/v1/devices"), ("GET", "/v1/devices/t-1"),
                             ("GET", "/v1/devices/t-1/telemetry?from=%d&to=%d" % (t - 1000, t)),
                             ("GET", "/v1/devices/t-1/commands"), ("GET", "/v1/commands/c_1"),
                             ("POST", "/v1/commands/c_1/cancel"), ("POST", "/v1/commands"),
                             ("POST", "/v1/devices/t-1/commands")):
            body = {"name": "reboot"} if method == "POST" else None
            self.call(method, path, 503, key="admin", body=body, code="unavailable")
        # the document is served while Redis is down
        st, _, got = request(hub, "GET", "/v1/openapi.json")
        self.assertEqual(st, 200)
        self.assertTrue(got == raw, "GET /v1/openapi.json is not the bytes of docs/openapi.json")
        hub.stop()


if __name__ == "__main__":
    main()
