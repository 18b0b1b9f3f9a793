'use strict';
// Benchmark peer: Node 20 + npm `ws` (one process, one event loop), the hub's
// gateway ingest rules from ./gateway.js (ajv per device type, ioredis
// pipelined XADD, ack after store). See ../README.md.
const http = require('http');
const { WebSocketServer } = require('ws');
const Ajv = require('ajv');
const Redis = require('ioredis');
const { parseArgs, loadValidators, gatewayId, createGateway } = require('./gateway');

const opt = parseArgs(process.argv);
const types = loadValidators(Ajv, opt.schemas);
const redis = new Redis({ host: opt.redisHost, port: opt.redisPort, lazyConnect: false });
redis.on('error', (e) => process.stderr.write(`redis: ${e.message}\n`));
const gw = createGateway({ types, redis });

const server = http.createServer((req, res) => {
  res.writeHead(404, { 'content-type': 'application/json' });
  res.end('{"error":{"code":"not_found"}}');
});
const wss = new WebSocketServer({
  noServer: true,
  maxPayload: 65536,
  perMessageDeflate: false,
  handleProtocols: (protocols) => (protocols.has('iot-gateway.v1') ? 'iot-gateway.v1' : false),
});

function refuse(socket, status, body) {
  socket.end(`HTTP/1.1 ${status}\r\nContent-Type: application/json\r\n` +
    `Content-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`);
}

server.on('upgrade', (req, socket, head) => {
  if (req.url.split('?')[0] !== '/v1/gateway') return refuse(socket, '404 Not Found', '{"error":{"code":"not_found"}}');
  const id = gatewayId(req.headers.authorization);
  if (!id) return refuse(socket, '401 Unauthorized', '{"error":{"code":"unauthorized"}}');
  const protos = (req.headers['sec-websocket-protocol'] || '').split(',').map((s) => s.trim());
  if (!protos.includes('iot-gateway.v1')) return refuse(socket, '400 Bad Request', '{"error":{"code":"bad_subprotocol"}}');
  wss.handleUpgrade(req, socket, head, (ws) => {
    const st = gw.newConn(id);
    const send = (s) => ws.send(s);
    ws.on('message', (data, isBinary) => {
      if (!isBinary) gw.message(st, data.toString(), send);
    });
    ws.on('close', () => { st.closed = true; });
    ws.on('error', () => { st.closed = true; });
  });
});

redis.once('ready', () => {
  server.listen(opt.port, opt.host, () => {
    process.stderr.write(`listening on ${opt.host}:${server.address().port}\n`);
  });
});
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => { server.close(); for (const c of wss.clients) c.close(1001); redis.quit(); setTimeout(() => process.exit(0), 500).unref(); });
}
