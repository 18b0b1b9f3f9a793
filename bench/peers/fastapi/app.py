#!/usr/bin/python3
"""Benchmark peer: FastAPI + uvicorn (uvloop, httptools when present), the
hub's gateway ingest rules (docs/protocol.md) as a Python developer would
write them: one pydantic (v1, Debian's) model per device type generated from
its telemetry schema, redis.asyncio XADD of a frame's accepted readings in one
pipeline, the ack once Redis has answered. One process, one event loop.

    /usr/bin/python3 bench/peers/fastapi/app.py --port 0 --redis-port 6379

Prints `listening on HOST:PORT` on stderr when ready. See ../README.md.
"""
import argparse
import json
import os
import pathlib
import re
import socket
import sys
import time
from typing import List, Literal, Optional, Union

import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from pydantic import (BaseModel, Extra, StrictBool, StrictFloat, StrictInt,
                      StrictStr, ValidationError, conint, conlist, create_model)
from pydantic import confloat, constr

ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MAX_READINGS = 1000
MAX_ERRORS = 8
MAXLEN = 100_000
RETRY_AFTER_MS = 1000
SUBPROTOCOL = "iot-gateway.v1"


# ---- device-type schema -> pydantic model --------------------------------

class Strict(BaseModel):
    class Config:
        extra = Extra.forbid


def field_type(name: str, s: dict):
    t = s.get("type")
    if "enum" in s:
        return Literal[tuple(s["enum"])]
    if t == "number":
        c = {k2: s[k1] for k1, k2 in (("minimum", "ge"), ("maximum", "le")) if k1 in s}
        # a JSON number may be written 21 or 21.5; booleans and strings are not numbers
        return Union[confloat(strict=True, **c), conint(strict=True, **c)]
    if t == "integer":
        c = {k2: s[k1] for k1, k2 in (("minimum", "ge"), ("maximum", "le")) if k1 in s}
        return conint(strict=True, **c)
    if t == "boolean":
        return StrictBool
    if t == "string":
        c = {k2: s[k1] for k1, k2 in (("minLength", "min_length"), ("maxLength", "max_length"),
                                      ("pattern", "regex")) if k1 in s}
        return constr(strict=True, **c) if c else StrictStr
    if t == "array":
        item = field_type(name + "_item", s.get("items", {}))
        return conlist(item, max_items=s.get("maxItems"), min_items=s.get("minItems"))
    if t == "object":
        return model_for(name, s)
    raise ValueError(f"{name}: unsupported schema {s}")


def model_for(name: str, s: dict):
    required = set(s.get("required", []))
    fields = {}
    for prop, ps in s.get("properties", {}).items():
        fields[prop] = (field_type(f"{name}_{prop}", ps), ... if prop in required else None)
    base = Strict if s.get("additionalProperties") is False else BaseModel
    return create_model(name, __base__=base, **fields)


def load_models(directory: str) -> dict:
    models = {}
    for f in sorted(pathlib.Path(directory).glob("*.json")):
        doc = json.loads(f.read_text())
        if isinstance(doc.get("device_type"), str) and "telemetry" in doc:
            models[doc["device_type"]] = model_for(
                re.sub(r"\W", "_", doc["device_type"]), doc["telemetry"])
    if not models:
        sys.exit(f"no device types in {directory}")
    return models


def errors_of(e: ValidationError) -> list:
    return [{"path": ".".join(str(p) for p in er["loc"]), "code": er["type"], "message": er["msg"]}
            for er in e.errors()]


# ---- the app --------------------------------------------------------------

app = FastAPI()
MODELS: dict = {}
REDIS: Optional[aioredis.Redis] = None


def gateway_id(authorization: Optional[str]) -> Optional[str]:
    """The token's `sub` for the XADD `gw` field, read without verifying
    anything: any bearer token is accepted (auth is not what is compared)."""
    if not authorization or not authorization.lower().startswith("bearer "):
        return None
    try:
        part = authorization.split()[1].split(".")[1]
        sub = json.loads(__import__("base64").urlsafe_b64decode(part + "=" * (-len(part) % 4)))["sub"]
        if isinstance(sub, str) and ID_RE.match(sub):
            return sub
    except Exception:
        pass
    return "gateway"


def check_reading(r) -> Optional[dict]:
    if not isinstance(r, dict):
        return {"path": "", "code": "type", "message": "a reading must be an object"}
    d = r.get("device")
    if not isinstance(d, str):
        return {"path": "device", "code": "required" if d is None else "type", "message": "must be a string"}
    if not ID_RE.match(d):
        return {"path": "device", "code": "pattern", "message": "must match [A-Za-z0-9._:-]{1,128}"}
    ts = r.get("ts")
    if ts is not None and (type(ts) is not int or ts < 0):
        return {"path": "ts", "code": "type", "message": "must be a non-negative integer (ms since the epoch)"}
    data = r.get("data")
    if not isinstance(data, dict):
        return {"path": "data", "code": "required" if data is None else "type", "message": "must be an object"}
    return None


def announce(devices: dict, m: dict) -> dict:
    accepted, rejected = [], []
    for d in m.get("devices") or []:
        dev = d.get("device") if isinstance(d, dict) else None
        labels = d.get("labels", {}) if isinstance(d, dict) else None
        if not isinstance(dev, str) or not ID_RE.match(dev) or not isinstance(labels, dict) \
                or not all(isinstance(v, str) for v in labels.values()):
            rejected.append({"device": dev if isinstance(dev, str) else None, "code": "invalid"})
            continue
        model = MODELS.get(d.get("device_type"))
        if model is None:
            rejected.append({"device": dev, "code": "unknown_device_type"})
            continue
        devices[dev] = model
        accepted.append(dev)
    return {"type": "announced", "accepted": accepted, "rejected": rejected}


async def telemetry(gw: str, devices: dict, m: dict) -> dict:
    seq = m.get("seq")
    if type(seq) is not int or seq < 0:
        return {"type": "error", "code": "bad_message"}
    readings = m.get("readings")
    if not isinstance(readings, list) or len(readings) > MAX_READINGS:
        return {"type": "error", "code": "bad_message", "seq": seq}
    now = int(time.time() * 1000)
    rejected, ok = [], []
    for i, r in enumerate(readings):
        bad = check_reading(r)
        if bad:
            e = {"index": i, "code": "invalid", "errors": [bad]}
            if isinstance(r, dict) and isinstance(r.get("device"), str):
                e["device"] = r["device"]
            rejected.append(e)
            continue
        model = devices.get(r["device"])
        if model is None:
            rejected.append({"index": i, "device": r["device"], "code": "unknown_device"})
            continue
        try:
            model.parse_obj(r["data"])
        except ValidationError as ve:
            errs = errors_of(ve)
            e = {"index": i, "device": r["device"], "code": "invalid", "errors": errs[:MAX_ERRORS]}
            if len(errs) > MAX_ERRORS:
                e["more_errors"] = len(errs) - MAX_ERRORS
            rejected.append(e)
            continue
        ok.append(r)
    if ok:
        try:
            async with REDIS.pipeline(transaction=False) as pipe:
                for r in ok:
                    pipe.xadd(f"iot:tm:{{{r['device']}}}",
                              {"ts": r.get("ts") if r.get("ts") is not None else now,
                               "data": json.dumps(r["data"], separators=(",", ":")),
                               "gw": gw, "seq": seq},
                              maxlen=MAXLEN, approximate=True)
                await pipe.execute()
        except aioredis.RedisError:
            return {"type": "error", "code": "unavailable", "seq": seq, "retry_after_ms": RETRY_AFTER_MS}
    return {"type": "ack", "seq": seq, "accepted": len(ok), "rejected": rejected}


@app.websocket("/v1/gateway")
async def gateway(ws: WebSocket):
    gw = gateway_id(ws.headers.get("authorization"))
    protos = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",")]
    if gw is None or SUBPROTOCOL not in protos:
        await ws.close(code=1008)   # refused before the handshake completes: HTTP 403
        return
    await ws.accept(subprotocol=SUBPROTOCOL)
    devices: dict = {}
    try:
        # one frame at a time per connection: the idiomatic receive loop
        while True:
            text = await ws.receive_text()
            try:
                m = json.loads(text)
            except ValueError:
                m = None
            if not isinstance(m, dict):
                await ws.send_text('{"type":"error","code":"bad_json"}')
                continue
            t = m.get("type")
            if t == "telemetry":
                out = await telemetry(gw, devices, m)
            elif t == "announce":
                out = announce(devices, m)
            elif t == "command_ack":
                continue
            else:
                out = {"type": "error", "code": "bad_message"}
            await ws.send_text(json.dumps(out, separators=(",", ":")))
    except WebSocketDisconnect:
        pass


def main():
    here = pathlib.Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    ap.add_argument("--redis-host", default=os.environ.get("REDIS_HOST", "127.0.0.1"))
    ap.add_argument("--redis-port", type=int, default=int(os.environ.get("REDIS_PORT", "6379")))
    ap.add_argument("--redis-pool", type=int, default=64, help="Redis connections at most")
    ap.add_argument("--schemas", default=os.environ.get("SCHEMAS", str(here.parents[2] / "deploy" / "device-types")))
    a = ap.parse_args()

    global REDIS
    MODELS.update(load_models(a.schemas))
    REDIS = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool(
        host=a.redis_host, port=a.redis_port, max_connections=a.redis_pool))

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((a.host, a.port))
    sock.listen(4096)   # connections queue from here on, before uvicorn serves
    port = sock.getsockname()[1]

    @app.on_event("startup")
    async def ready():
        await REDIS.ping()
        print(f"listening on {a.host}:{port}", file=sys.stderr, flush=True)

    config = uvicorn.Config(app, loop="uvloop", http="auto", ws="websockets", lifespan="on",
                            log_level="warning", access_log=False, ws_max_size=65536,
                            backlog=4096)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
