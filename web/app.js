// iot-hub dashboard: device list (GET /v1/devices), live stream (/v1/stream,
// docs/dashboard.md), hand-drawn charts, aggregates, command log.
// Device-provided strings only ever reach the page as text nodes or attributes.

const KEY_STORE = 'iot-hub.api-key'; // sessionStorage only
const HOUR = 3600e3;
const MAX_POINTS = 20000;            // per device and field
const LOG_MAX = 200;
const PALETTE = 8;                   // --c0 … --c7 in style.css

const $ = (id) => document.getElementById(id);

const state = {
  key: null,
  devices: new Map(),   // id -> {device, device_type, labels, gateway, online, last_seen}
  rows: new Map(),      // id -> {tr, dot, seen}
  selected: new Set(),
  colors: new Map(),    // device -> palette index
  charts: new Map(),    // field -> {fig, canvas, legend, series: Map(device -> [[ts, v]…])}
  spanMs: 120e3,
  aggs: new Map(),      // "key\0field" -> row data
  aggsDirty: false,
  ws: null, ready: false, upSince: 0, attempt: 0, retryTimer: 0, authTimer: 0,
  seq: 0, subs: new Map(), subIds: {}, // id -> kind, kind -> id
  rawSince: null,       // the since sent with the current raw subscription
  lastPos: null,        // newest pos received on raw (resume point)
  dropped: 0,
};

// ---- small helpers ---------------------------------------------------------

function el(tag, attrs = {}, ...kids) {
  const n = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === 'class') n.className = v;
    else if (k.startsWith('on')) n.addEventListener(k.slice(2), v);
    else n.setAttribute(k, v === true ? '' : String(v));
  }
  n.append(...kids.filter((k) => k != null).map((k) => (typeof k === 'object' ? k : String(k))));
  return n;
}

const str = (v) => (v == null ? '' : String(v));
const timeOf = (ms) => new Date(ms).toLocaleTimeString([], { hour12: false });

function fmtNum(v) {
  if (typeof v !== 'number' || !Number.isFinite(v)) return str(v);
  return Math.abs(v) >= 1e6 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(3) : String(+v.toPrecision(6));
}

function ago(ms) {
  if (!ms) return 'never';
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(ms).toLocaleDateString();
}

// "<ms>-<n>" positions compare numerically, part by part.
function posAfter(a, b) {
  if (!b) return true;
  const [am, an] = a.split('-').map(Number), [bm, bn] = b.split('-').map(Number);
  return am > bm || (am === bm && an > bn);
}

function logTo(list, cls, ...parts) {
  list.prepend(el('li', { class: cls }, el('time', {}, timeOf(Date.now())), ' ', ...parts));
  while (list.children.length > LOG_MAX) list.lastChild.remove();
}
const note = (cls, ...parts) => logTo($('events'), cls, ...parts);

function setConn(cls, text) {
  $('conn').className = `badge ${cls}`;
  $('conn').textContent = text;
}

// ---- login -----------------------------------------------------------------

function showLogin(message = '') {
  $('app').hidden = true;
  $('logout').hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = message;
  $('key').focus();
}

function logout(message = '') {
  sessionStorage.removeItem(KEY_STORE);
  state.key = null;
  disconnect();
  state.devices.clear();
  state.selected.clear();
  state.lastPos = null;
  state.aggs.clear();
  state.dropped = 0;
  $('dropped').hidden = true;
  renderDevices();
  renderAggs();
  selectionChanged();
  setConn('', 'not connected');
  showLogin(message);
}

function start(key) {
  state.key = key;
  $('login').hidden = true;
  $('app').hidden = false;
  $('logout').hidden = false;
  loadDevices();
  connect();
}

// ---- HTTP API --------------------------------------------------------------

async function api(path) {
  const r = await fetch(path, { headers: { Authorization: `Bearer ${state.key}` }, cache: 'no-store' });
  const body = await r.json().catch(() => null);
  if (r.status === 401) {
    logout('The hub rejected this API key.');
    throw new Error('unauthorized');
  }
  if (!r.ok) throw new Error(`${r.status} ${str(body?.error?.code)}: ${str(body?.error?.message)}`);
  return body;
}

async function loadDevices() {
  $('devices-info').textContent = 'Loading…';
  try {
    const body = await api('/v1/devices?limit=1000');
    state.devices = new Map(body.devices.map((d) => [str(d.device), d]));
    renderDevices();
    if (body.truncated) $('devices-info').textContent += ' (list truncated by the hub)';
  } catch (e) {
    if (state.key) $('devices-info').textContent = `Could not load devices: ${e.message}`;
  }
}

// ---- device list -----------------------------------------------------------

const labelText = (labels) => Object.entries(labels || {}).map(([k, v]) => `${k}=${str(v)}`);

function renderDevices() {
  state.rows.clear();
  const ids = [...state.devices.keys()].sort();
  $('devices').tBodies[0].replaceChildren(...ids.map((id, i) => {
    const d = state.devices.get(id);
    const cb = el('input', { type: 'checkbox', id: `dev-${i}`, onchange: (e) => toggle(id, e.target.checked) });
    cb.checked = state.selected.has(id);
    const dot = el('span', { class: 'dot' });
    const seen = el('td', { class: 'seen' });
    const tr = el('tr', {},
      el('td', {}, cb),
      el('td', {}, el('label', { for: `dev-${i}` }, dot, ' ', id)),
      el('td', {}, str(d.device_type)),
      el('td', {}, ...labelText(d.labels).map((t) => el('span', { class: 'chip' }, t))),
      seen);
    state.rows.set(id, { tr, dot, seen });
    updateRow(id);
    return tr;
  }));
  applyFilter();
}

function updateRow(id) {
  const row = state.rows.get(id), d = state.devices.get(id);
  if (!row) return;
  row.dot.className = `dot ${d.online ? 'on' : 'off'}`;
  row.dot.setAttribute('title', d.online ? 'online' : 'offline');
  row.dot.replaceChildren(el('span', { class: 'sr-only' }, d.online ? 'online' : 'offline'));
  row.seen.textContent = ago(d.last_seen);
  if (d.last_seen) row.seen.setAttribute('title', new Date(d.last_seen).toISOString());
}

function applyFilter() {
  const terms = $('filter').value.toLowerCase().split(/\s+/).filter(Boolean);
  const onlineOnly = $('online-only').checked;
  let shown = 0;
  for (const [id, row] of state.rows) {
    const d = state.devices.get(id);
    const hay = [id, str(d.device_type), ...labelText(d.labels)].join(' ').toLowerCase();
    row.tr.hidden = (onlineOnly && !d.online) || !terms.every((t) => hay.includes(t));
    if (!row.tr.hidden) shown++;
  }
  $('devices-info').textContent = `${shown} of ${state.devices.size} devices shown, ${state.selected.size} charted`;
}

function toggle(id, on) {
  if (on) state.selected.add(id); else state.selected.delete(id);
  selectionChanged();
}

let resubTimer = 0;
function selectionChanged() {
  for (const [field, ch] of state.charts) {
    for (const dev of ch.series.keys()) if (!state.selected.has(dev)) ch.series.delete(dev);
    if (!ch.series.size) { ch.fig.remove(); state.charts.delete(field); }
  }
  let i = 0;
  state.colors = new Map([...state.selected].map((d) => [d, i++ % PALETTE]));
  if (!state.selected.size) state.lastPos = null; // nothing to resume
  $('history').disabled = $('clear-sel').disabled = !state.selected.size;
  $('charts-info').textContent = state.selected.size
    ? `Charting ${state.selected.size} device(s); numeric fields appear as readings arrive.`
    : 'Tick devices in the list to chart their numeric fields.';
  if (state.rows.size) applyFilter();
  clearTimeout(resubTimer);
  resubTimer = setTimeout(() => {
    subscribe('raw');
    if ($('agg-selected').checked) subscribe('agg');
  }, 300);
}

// ---- WebSocket stream ------------------------------------------------------

function send(msg) {
  if (state.ws?.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(msg));
}

function connect() {
  clearTimeout(state.retryTimer);
  const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/v1/stream`;
  setConn('wait', state.attempt ? 'reconnecting…' : 'connecting…');
  const ws = new WebSocket(url, 'iot-dashboard.v1');
  Object.assign(state, { ws, ready: false, subIds: {} });
  state.subs.clear();
  ws.onopen = () => {
    ws.send(JSON.stringify({ type: 'auth', token: state.key }));
    // The hub answers "authenticated"; a hub that does not is used after 1 s.
    state.authTimer = setTimeout(() => ready(''), 1000);
  };
  ws.onmessage = (e) => {
    let m;
    try { m = JSON.parse(e.data); } catch { return note('error', 'unparsable message from the hub'); }
    if (m && typeof m === 'object') handle(m);
  };
  ws.onclose = (e) => {
    clearTimeout(state.authTimer);
    if (state.ws !== ws) return; // replaced or logged out
    state.ws = null;
    state.ready = false;
    if (state.upSince && Date.now() - state.upSince > 10e3) state.attempt = 0; // was stable
    state.upSince = 0;
    if (e.code === 4401 || e.code === 4403) {
      logout(e.code === 4401 ? 'The hub rejected this API key.' : 'This API key lacks the telemetry:read scope.');
      return;
    }
    const delay = Math.round(Math.min(30e3, 500 * 2 ** state.attempt++) * (0.5 + Math.random() / 2));
    setConn('off', `disconnected, retry in ${Math.ceil(delay / 1000)} s`);
    note('warn', `stream closed (code ${e.code}${e.reason ? `, ${e.reason}` : ''}); reconnecting in ${(delay / 1000).toFixed(1)} s`);
    state.retryTimer = setTimeout(connect, delay);
  };
}

function disconnect() {
  clearTimeout(state.retryTimer);
  clearTimeout(state.authTimer);
  const ws = state.ws;
  state.ws = null;
  ws?.close(1000);
}

function ready(name) {
  clearTimeout(state.authTimer);
  if (state.ready) { if (name) setConn('on', `live as ${name}`); return; }
  state.ready = true;
  state.upSince = Date.now();
  setConn('on', name ? `live as ${name}` : 'live');
  for (const kind of ['presence', 'raw', 'agg', 'commands']) subscribe(kind);
}

function subscription(kind) {
  switch (kind) {
    case 'presence': case 'commands':
      return { stream: kind, filter: {} };
    case 'raw': {
      if (!state.selected.size) return null;
      const m = { stream: 'raw', filter: { devices: [...state.selected] } };
      if (state.lastPos) m.since = state.lastPos;
      return m;
    }
    case 'agg': {
      const m = { stream: $('agg-window').value, filter: {} };
      if ($('agg-selected').checked) {
        if (!state.selected.size) return null;
        m.filter.devices = [...state.selected];
      }
      const g = $('agg-group').value.trim();
      if (g) m.group_by = g;
      return m;
    }
  }
  return null;
}

function subscribe(kind) {
  if (!state.ready) return; // everything is subscribed once the stream is ready
  const old = state.subIds[kind];
  if (old) {
    send({ type: 'unsubscribe', id: old });
    state.subs.delete(old);
    delete state.subIds[kind];
  }
  const m = subscription(kind);
  if (!m) return;
  const id = `${kind}-${++state.seq}`;
  state.subs.set(id, kind);
  state.subIds[kind] = id;
  if (kind === 'raw') state.rawSince = m.since ?? null;
  send({ type: 'subscribe', id, ...m });
}

function handle(m) {
  switch (m.type) {
    case 'authenticated': return ready(str(m.name));
    case 'subscribed':
      // Without since, position is where the live stream starts: resume there.
      // With since, a replay is under way: only received readings advance.
      if (m.id === state.subIds.raw && !state.rawSince && typeof m.position === 'string' &&
          posAfter(m.position, state.lastPos)) state.lastPos = m.position;
      return;
    case 'unsubscribed': return;
    case 'reading': return onReading(m);
    case 'presence': return onPresence(m);
    case 'aggregate': return onAggregate(m);
    case 'command_status': return onCommand(m);
    case 'gap': return onGap(m);
    case 'error': return onError(m);
  }
  note('warn', `unknown message type ${str(m.type)}`);
}

function onReading(m) {
  const dev = str(m.device), ts = Number(m.ts);
  if (typeof m.pos === 'string' && posAfter(m.pos, state.lastPos)) state.lastPos = m.pos;
  const d = state.devices.get(dev);
  if (d && ts > (d.last_seen || 0)) d.last_seen = ts;
  if (!state.selected.has(dev) || !Number.isFinite(ts) || !m.data || typeof m.data !== 'object') return;
  addReading(dev, ts, m.data);
}

function onPresence(m) {
  const id = str(m.device);
  let d = state.devices.get(id);
  const isNew = !d;
  if (isNew) state.devices.set(id, (d = { device: id, device_type: m.device_type, labels: {} }));
  d.online = !!m.online;
  if (m.gateway != null) d.gateway = m.gateway;
  if (Number.isFinite(m.at)) d.last_seen = Math.max(d.last_seen || 0, m.at);
  if (isNew) renderDevices(); else { updateRow(id); applyFilter(); }
}

function onAggregate(m) {
  const who = m.device != null ? str(m.device)
    : Object.entries(m.group || {}).map(([k, v]) => `${k}=${v == null ? '(none)' : str(v)}`).join(' ');
  for (const [field, s] of Object.entries(m.metrics || {})) {
    const k = `${who}\0${field}`, old = state.aggs.get(k);
    if (old && old.start > m.start) continue;
    state.aggs.set(k, { who, field, start: m.start, window: m.window, ...s });
  }
  state.aggsDirty = true;
}

function renderAggs() {
  state.aggsDirty = false;
  const rows = [...state.aggs.values()].sort((a, b) => a.who.localeCompare(b.who) || a.field.localeCompare(b.field));
  $('aggs').tBodies[0].replaceChildren(...rows.map((r) => el('tr', {},
    el('th', { scope: 'row' }, r.who), el('td', {}, r.field),
    el('td', {}, `${timeOf(r.start)} (${str(r.window)})`),
    ...[r.count, r.min, r.max, r.avg, r.last].map((v) => el('td', { class: 'num' }, fmtNum(v))))));
}

function onCommand(m) {
  const st = str(m.status);
  logTo($('commands'), `cmd ${/^[a-z_]+$/.test(st) ? `st-${st}` : ''}`,
    el('strong', {}, str(m.device)), ' ', el('code', {}, str(m.name)), ' ',
    el('span', { class: 'status' }, st), ' ', el('span', { class: 'hint' }, str(m.id)),
    m.at ? el('span', { class: 'hint' }, ` at ${timeOf(m.at)}`) : null);
}

function onGap(m) {
  const kind = state.subs.get(m.sub) || str(m.sub);
  const n = Number(m.dropped) || 0;
  state.dropped += n;
  if (state.dropped) {
    $('dropped').hidden = false;
    $('dropped').textContent = `${state.dropped} messages dropped`;
  }
  note('warn', `gap on ${kind}: ${n} dropped${m.reason ? ` (${str(m.reason)})` : ''}`);
}

function onError(m) {
  const kind = m.id != null ? state.subs.get(m.id) : null;
  note('error', `${kind ? `${kind} subscription: ` : ''}${str(m.code)}${m.message ? ` — ${str(m.message)}` : ''}`);
  if (!kind) return;
  state.subs.delete(m.id);
  if (state.subIds[kind] === m.id) delete state.subIds[kind];
  if (m.code === 'unavailable') setTimeout(() => { if (!state.subIds[kind]) subscribe(kind); }, 3000);
}

// ---- charts ----------------------------------------------------------------

function chartFor(field) {
  let ch = state.charts.get(field);
  if (ch) return ch;
  const canvas = el('canvas', { role: 'img', 'aria-label': `${field} over time` });
  const legend = el('figcaption', {});
  const fig = el('figure', { class: 'chart' }, el('h3', {}, field), canvas, legend);
  ch = { fig, canvas, legend, series: new Map() };
  state.charts.set(field, ch);
  const list = $('chart-list'), after = [...state.charts.keys()].sort().find((f) => f > field);
  list.insertBefore(fig, after ? state.charts.get(after).fig : null);
  return ch;
}

function addReading(dev, ts, data) {
  for (const [field, v] of Object.entries(data)) {
    if (typeof v !== 'number' || !Number.isFinite(v)) continue;
    const series = chartFor(field).series;
    let pts = series.get(dev);
    if (!pts) series.set(dev, (pts = []));
    const n = pts.length;
    if (!n || pts[n - 1][0] < ts) { pts.push([ts, v]); continue; }
    let lo = 0, hi = n; // first index with t >= ts
    while (lo < hi) { const mid = (lo + hi) >> 1; if (pts[mid][0] < ts) lo = mid + 1; else hi = mid; }
    if (pts[lo]?.[0] === ts) pts[lo][1] = v; else pts.splice(lo, 0, [ts, v]);
  }
}

// 1/2/5 × 10^k steps covering [lo, hi] with about n intervals.
function niceTicks(lo, hi, n) {
  const raw = (hi - lo) / n, mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((f) => f * mag).find((s) => s >= raw);
  const ticks = [];
  for (let v = Math.floor(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(v);
  if (ticks[ticks.length - 1] < hi) ticks.push(ticks[ticks.length - 1] + step);
  const digits = Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
  return { ticks, label: (v) => (Math.abs(v) >= 1e6 ? v.toExponential(1) : v.toFixed(digits)) };
}

const TIME_STEPS = [5, 10, 15, 30, 60, 120, 300, 600, 900, 1800].map((s) => s * 1000);

function drawChart(ch, css, now) {
  const { canvas, series } = ch;
  const dpr = window.devicePixelRatio || 1, w = canvas.clientWidth, h = canvas.clientHeight;
  if (!w || !h) return;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = '12px system-ui, sans-serif';
  const t1 = now, t0 = now - state.spanMs;
  let lo = Infinity, hi = -Infinity;
  for (const pts of series.values()) {
    const keep = now - Math.max(state.spanMs, HOUR);
    let cut = Math.max(0, pts.length - MAX_POINTS);
    while (cut < pts.length && pts[cut][0] < keep) cut++;
    if (cut) pts.splice(0, cut);
    for (const [t, v] of pts) if (t >= t0) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  }
  ctx.fillStyle = css.muted;
  if (lo > hi) { ctx.fillText('waiting for readings…', 12, h / 2); return; }
  if (lo === hi) { const d = Math.abs(lo) * 0.05 || 1; lo -= d; hi += d; }
  const y = niceTicks(lo, hi, Math.max(2, Math.floor(h / 40)));
  lo = y.ticks[0]; hi = y.ticks[y.ticks.length - 1];
  const left = 8 + Math.max(...y.ticks.map((v) => ctx.measureText(y.label(v)).width)), right = w - 10, top = 8, bottom = h - 22;
  const X = (t) => left + ((t - t0) / (t1 - t0)) * (right - left);
  const Y = (v) => bottom - ((v - lo) / (hi - lo)) * (bottom - top);
  // grid and axes
  ctx.strokeStyle = css.grid; ctx.lineWidth = 1;
  ctx.textAlign = 'right'; ctx.textBaseline = 'middle';
  for (const v of y.ticks) {
    const py = Math.round(Y(v)) + 0.5;
    ctx.beginPath(); ctx.moveTo(left, py); ctx.lineTo(right, py); ctx.stroke();
    ctx.fillText(y.label(v), left - 6, py);
  }
  const step = TIME_STEPS.find((s) => (right - left) / (state.spanMs / s) >= 80) || HOUR;
  ctx.textAlign = 'center'; ctx.textBaseline = 'top';
  for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) {
    const px = Math.round(X(t)) + 0.5;
    ctx.beginPath(); ctx.moveTo(px, top); ctx.lineTo(px, bottom); ctx.stroke();
    const d = new Date(t);
    const label = step >= 60e3 ? d.toLocaleTimeString([], { hour12: false, hour: '2-digit', minute: '2-digit' }) : timeOf(t);
    const half = ctx.measureText(label).width / 2;
    if (px + half <= w && px - half >= left - 4) ctx.fillText(label, px, bottom + 5);
  }
  // series; a silence longer than max(10 s, span/30) breaks the line
  const breakMs = Math.max(10e3, state.spanMs / 30);
  const legend = [], spoken = [];
  ctx.save();
  ctx.beginPath(); ctx.rect(left, top - 2, right - left, bottom - top + 4); ctx.clip();
  for (const [dev, pts] of [...series].sort((a, b) => (a[0] < b[0] ? -1 : 1))) {
    const c = state.colors.get(dev) ?? 0;
    ctx.strokeStyle = css.colors[c]; ctx.lineWidth = 1.75; ctx.beginPath();
    let prev = -Infinity;
    for (const [t, v] of pts) {
      if (t < t0 - breakMs) continue;
      if (t - prev > breakMs) ctx.moveTo(X(t), Y(v)); else ctx.lineTo(X(t), Y(v));
      prev = t;
    }
    ctx.stroke();
    const last = pts[pts.length - 1];
    const text = `${dev}: ${last ? fmtNum(last[1]) : '–'}`;
    spoken.push(text);
    legend.push(el('span', { class: 'key' }, el('span', { class: `swatch c${c}` }), text));
  }
  ctx.restore();
  ch.legend.replaceChildren(...legend);
  ch.canvas.setAttribute('aria-label', `${ch.fig.firstChild.textContent}, latest: ${spoken.join(', ')}`);
}

function cssColors() {
  const cs = getComputedStyle(document.documentElement), v = (n) => cs.getPropertyValue(n).trim();
  return { muted: v('--muted'), grid: v('--grid'), colors: Array.from({ length: PALETTE }, (_, i) => v(`--c${i}`)) };
}

function tick() {
  if (document.hidden || $('app').hidden) return;
  const css = cssColors(), now = Date.now();
  for (const ch of state.charts.values()) drawChart(ch, css, now);
  if (state.aggsDirty) renderAggs();
}

// ---- history ---------------------------------------------------------------

async function loadHistory() {
  const btn = $('history'), to = Date.now(), from = to - HOUR;
  btn.disabled = true;
  $('span').value = String(HOUR);
  state.spanMs = HOUR;
  let total = 0;
  try {
    for (const dev of [...state.selected]) {
      let after = null;
      for (let page = 0; page < 20; page++) {
        const q = new URLSearchParams({ from, to, limit: 10000, format: 'json' });
        if (after) q.set('after', after);
        const body = await api(`/v1/devices/${encodeURIComponent(dev)}/telemetry?${q}`);
        if (!state.selected.has(dev)) break;
        for (const r of body.readings || []) {
          if (Number.isFinite(r.ts) && r.data && typeof r.data === 'object') addReading(dev, r.ts, r.data);
        }
        total += (body.readings || []).length;
        if (!(after = body.next)) break;
      }
    }
    $('charts-info').textContent = `Loaded ${total} stored readings from the last hour.`;
  } catch (e) {
    if (state.key) $('charts-info').textContent = `History failed: ${e.message}`;
  } finally {
    btn.disabled = !state.selected.size;
    tick();
  }
}

// ---- wiring ----------------------------------------------------------------

$('login-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const key = $('key').value.trim();
  if (!key) return;
  $('key').value = '';
  sessionStorage.setItem(KEY_STORE, key);
  start(key);
});
$('logout').addEventListener('click', () => logout());
$('refresh').addEventListener('click', loadDevices);
$('filter').addEventListener('input', applyFilter);
$('online-only').addEventListener('change', applyFilter);
$('span').addEventListener('change', (e) => { state.spanMs = Number(e.target.value); tick(); });
$('history').addEventListener('click', loadHistory);
$('clear-sel').addEventListener('click', () => {
  state.selected.clear();
  for (const row of state.rows.values()) row.tr.querySelector('input').checked = false;
  selectionChanged();
});
$('agg-form').addEventListener('submit', (e) => {
  e.preventDefault();
  state.aggs.clear();
  renderAggs();
  subscribe('agg');
});
document.addEventListener('visibilitychange', tick);
setInterval(tick, 500);
setInterval(() => { for (const id of state.rows.keys()) updateRow(id); }, 5000);

const saved = sessionStorage.getItem(KEY_STORE);
if (saved) start(saved); else showLogin();
