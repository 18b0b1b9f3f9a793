'use strict';
// The gateway ingest rules of iot-hub (docs/protocol.md), as a Node developer
// would write them: JSON.parse, one ajv validator compiled per device type,
// one ioredis pipeline of XADDs per telemetry frame, the ack once Redis has
// answered. Shared by the two Node peers (node-ws/server.js, uws/server.js);
// each passes its own Ajv class and ioredis client, so this file requires
// nothing from npm itself.
const fs = require('fs');
const path = require('path');

const ID_RE = /^[A-Za-z0-9._:-]{1,128}$/;
const MAX_READINGS = 1000;
const MAX_ERRORS = 8;
const MAXLEN = '100000';
const RETRY_AFTER_MS = 1000;

function parseArgs(argv) {
  const o = {
    host: '127.0.0.1',
    port: Number(process.env.PORT || 8080),
    redisHost: process.env.REDIS_HOST || '127.0.0.1',
    redisPort: Number(process.env.REDIS_PORT || 6379),
    schemas: process.env.SCHEMAS ||
      path.join(__dirname, '..', '..', '..', 'deploy', 'device-types'),
  };
  for (let i = 2; i < argv.length; i++) {
    const a = argv[i], v = argv[i + 1];
    if (a === '--port') { o.port = Number(v); i++; }
    else if (a === '--host') { o.host = v; i++; }
    else if (a === '--redis-port') { o.redisPort = Number(v); i++; }
    else if (a === '--redis-host') { o.redisHost = v; i++; }
    else if (a === '--schemas') { o.schemas = v; i++; }
    else {
      process.stderr.write(`usage: ${path.basename(argv[1])} [--host H] [--port P] ` +
        '[--redis-host H] [--redis-port P] [--schemas DIR]\n');
      process.exit(2);
    }
  }
  return o;
}

// device_type -> ajv validate function for its telemetry schema
function loadValidators(Ajv, dir) {
  const ajv = new Ajv({ allErrors: true, strict: false });
  const types = new Map();
  for (const f of fs.readdirSync(dir).filter((n) => n.endsWith('.json')).sort()) {
    const doc = JSON.parse(fs.readFileSync(path.join(dir, f), 'utf8'));
    if (typeof doc.device_type === 'string' && doc.telemetry)
      types.set(doc.device_type, ajv.compile(doc.telemetry));
  }
  if (types.size === 0) throw new Error(`no device types in ${dir}`);
  return types;
}

function ajvErrors(errs) {
  const out = [];
  for (const e of errs.slice(0, MAX_ERRORS)) {
    let p = e.instancePath.slice(1).replace(/\//g, '.');
    if (e.keyword === 'additionalProperties')
      p = p ? `${p}.${e.params.additionalProperty}` : e.params.additionalProperty;
    else if (e.keyword === 'required')
      p = p ? `${p}.${e.params.missingProperty}` : e.params.missingProperty;
    out.push({ path: p, code: e.keyword, message: e.message });
  }
  return out;
}

// The gateway id for the XADD `gw` field: the token's `sub`, read without
// verifying anything (auth is not what the benchmark compares).
function gatewayId(authorization) {
  const m = /^Bearer\s+(\S+)$/i.exec(authorization || '');
  if (!m) return null;
  try {
    const sub = JSON.parse(Buffer.from(m[1].split('.')[1], 'base64url')).sub;
    if (typeof sub === 'string' && ID_RE.test(sub)) return sub;
  } catch { /* an opaque token: any bearer is accepted */ }
  return 'gateway';
}

function createGateway({ types, redis }) {
  const err = (code, extra) => JSON.stringify({ type: 'error', code, ...extra });

  function newConn(gw) {
    // devices: id -> validate fn; pending: frames waiting for Redis; tail:
    // the last of them (a frame with nothing to store waits for it, so acks
    // leave in arrival order)
    return { gw, devices: new Map(), pending: 0, tail: null, closed: false };
  }

  function announce(st, m, send) {
    if (!Array.isArray(m.devices)) return send(err('bad_message'));
    const accepted = [], rejected = [];
    for (const d of m.devices) {
      const id = d && d.device;
      if (typeof id !== 'string' || !ID_RE.test(id) ||
          (d.labels !== undefined && (typeof d.labels !== 'object' || d.labels === null ||
            Array.isArray(d.labels) || !Object.values(d.labels).every((v) => typeof v === 'string')))) {
        rejected.push({ device: typeof id === 'string' ? id : null, code: 'invalid' });
        continue;
      }
      const v = types.get(d.device_type);
      if (!v) { rejected.push({ device: id, code: 'unknown_device_type' }); continue; }
      st.devices.set(id, v);
      accepted.push(id);
    }
    send(JSON.stringify({ type: 'announced', accepted, rejected }));
  }

  function telemetry(st, m, send) {
    const seq = m.seq;
    if (!Number.isSafeInteger(seq) || seq < 0) return send(err('bad_message'));
    const rs = m.readings;
    if (!Array.isArray(rs) || rs.length > MAX_READINGS)
      return send(err('bad_message', { seq }));
    const rejected = [];
    const now = Date.now();
    const sseq = String(seq);
    let pipe = null, accepted = 0;
    for (let i = 0; i < rs.length; i++) {
      const r = rs[i];
      let bad = null;
      if (r === null || typeof r !== 'object' || Array.isArray(r))
        bad = { path: '', code: 'type', message: 'a reading must be an object' };
      else if (typeof r.device !== 'string')
        bad = { path: 'device', code: r.device === undefined ? 'required' : 'type', message: 'must be a string' };
      else if (!ID_RE.test(r.device))
        bad = { path: 'device', code: 'pattern', message: 'must match [A-Za-z0-9._:-]{1,128}' };
      else if (r.ts != null && !(Number.isSafeInteger(r.ts) && r.ts >= 0))
        bad = { path: 'ts', code: 'type', message: 'must be a non-negative integer (ms since the epoch)' };
      else if (r.data === null || typeof r.data !== 'object' || Array.isArray(r.data))
        bad = { path: 'data', code: r.data === undefined ? 'required' : 'type', message: 'must be an object' };
      if (bad) {
        const e = { index: i, code: 'invalid', errors: [bad] };
        if (r && typeof r.device === 'string') e.device = r.device;
        rejected.push(e);
        continue;
      }
      const validate = st.devices.get(r.device);
      if (!validate) { rejected.push({ index: i, device: r.device, code: 'unknown_device' }); continue; }
      if (!validate(r.data)) {
        const e = { index: i, device: r.device, code: 'invalid', errors: ajvErrors(validate.errors) };
        if (validate.errors.length > MAX_ERRORS) e.more_errors = validate.errors.length - MAX_ERRORS;
        rejected.push(e);
        continue;
      }
      if (!pipe) pipe = redis.pipeline();
      pipe.xadd(`iot:tm:{${r.device}}`, 'MAXLEN', '~', MAXLEN, '*',
        'ts', String(r.ts != null ? r.ts : now), 'data', JSON.stringify(r.data),
        'gw', st.gw, 'seq', sseq);
      accepted++;
    }
    const ack = JSON.stringify({ type: 'ack', seq, accepted, rejected });
    if (!pipe) {
      if (st.pending === 0) return send(ack);
      st.pending++;
      st.tail = st.tail.then(() => { st.pending--; if (!st.closed) send(ack); });
      return;
    }
    st.pending++;
    st.tail = pipe.exec().then((res) => {
      st.pending--;
      if (st.closed) return;
      if (res.some(([e]) => e)) send(err('unavailable', { seq, retry_after_ms: RETRY_AFTER_MS }));
      else send(ack);
    }, () => {
      st.pending--;
      if (!st.closed) send(err('unavailable', { seq, retry_after_ms: RETRY_AFTER_MS }));
    });
  }

  function message(st, text, send) {
    let m;
    try { m = JSON.parse(text); } catch { return send(err('bad_json')); }
    if (m === null || typeof m !== 'object' || Array.isArray(m)) return send(err('bad_json'));
    if (m.type === 'telemetry') return telemetry(st, m, send);
    if (m.type === 'announce') return announce(st, m, send);
    if (m.type === 'command_ack') return undefined;   // no commands in this peer
    return send(err('bad_message'));
  }

  return { newConn, message };
}

module.exports = { parseArgs, loadValidators, gatewayId, createGateway };
