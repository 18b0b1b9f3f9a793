'use strict';
// Benchmark peer: Node 20 + uWebSockets.js (npm @trufflesuite/uws-js-unofficial,
// one process, one event loop), the same gateway ingest rules as the `ws` peer
// (../node-ws/gateway.js: ajv per device type, ioredis pipelined XADD, ack
// after store). See ../README.md.
const uWS = require('@trufflesuite/uws-js-unofficial');
const Ajv = require('ajv');
const Redis = require('ioredis');
const { parseArgs, loadValidators, gatewayId, createGateway } = require('../node-ws/gateway');

const opt = parseArgs(process.argv);
const types = loadValidators(Ajv, opt.schemas);
const redis = new Redis({ host: opt.redisHost, port: opt.redisPort });
redis.on('error', (e) => process.stderr.write(`redis: ${e.message}\n`));
const gw = createGateway({ types, redis });
const td = new TextDecoder();
let listenSocket = null;

const app = uWS.App().ws('/v1/gateway', {
  compression: uWS.DISABLED,
  maxPayloadLength: 65536,
  maxBackpressure: 1 << 20,
  idleTimeout: 120,
  upgrade: (res, req, context) => {
    const id = gatewayId(req.getHeader('authorization'));
    const protos = req.getHeader('sec-websocket-protocol').split(',').map((s) => s.trim());
    if (!id) return res.writeStatus('401 Unauthorized').end('{"error":{"code":"unauthorized"}}');
    if (!protos.includes('iot-gateway.v1'))
      return res.writeStatus('400 Bad Request').end('{"error":{"code":"bad_subprotocol"}}');
    res.upgrade({ st: gw.newConn(id) }, req.getHeader('sec-websocket-key'), 'iot-gateway.v1',
      req.getHeader('sec-websocket-extensions'), context);
  },
  open: (ws) => {
    const st = ws.getUserData().st;
    st.send = (s) => ws.send(s, false);
  },
  message: (ws, msg, isBinary) => {
    // the ArrayBuffer is only valid during this call: decoded at once
    const st = ws.getUserData().st;
    if (!isBinary) gw.message(st, td.decode(msg), st.send);
  },
  close: (ws) => { ws.getUserData().st.closed = true; },
}).any('/*', (res) => {
  res.writeStatus('404 Not Found').end('{"error":{"code":"not_found"}}');
});

redis.once('ready', () => {
  app.listen(opt.host, opt.port, (ls) => {
    if (!ls) { process.stderr.write(`cannot listen on ${opt.host}:${opt.port}\n`); process.exit(1); }
    listenSocket = ls;
    process.stderr.write(`listening on ${opt.host}:${uWS.us_socket_local_port(ls)}\n`);
  });
});
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    if (listenSocket) uWS.us_listen_socket_close(listenSocket);
    app.close?.();
    redis.quit();
    setTimeout(() => process.exit(0), 500).unref();
  });
}
