// iot-hub console: fleet overview (/metrics and the stream), device list
// (GET /v1/devices + the presence stream; virtual scrolling), a device page
// (labels, last reading, history chart with zoom and units, commands with a
// form generated from the device type's schema and a live timeline), fleet
// rollouts, live charts (uPlot when the build served it, else canvas),
// aggregates, command and stream logs (docs/dashboard.md, docs/commands.md).
// Device-provided strings only ever reach the page as text nodes or attributes.

import { validate, paramsForm, unitOf } from './schema.js';

const KEY_STORE = 'iot-hub.api-key'; // sessionStorage only
const HOUR = 3600e3;
const MAX_POINTS = 20000;            // per device and field
const LOG_MAX = 200;
const PALETTE = 8;                   // --c0 … --c7 in style.css
const ROW_H = 34;                    // device table row height (px; style.css .vtable tr)
const OVERSCAN = 8;                  // rows rendered above and below the viewport
const DESTRUCTIVE = new Set(['reboot', 'firmware_update', 'reset_energy']);
const FINAL = new Set(['succeeded', 'failed', 'rejected', 'timed_out', 'expired', 'canceled']);
const FAILED = new Set(['failed', 'rejected', 'timed_out', 'expired']);
const DEVICE_PAGES_MAX = 50;         // GET /v1/devices pages of 1000 read at login
const STATS_POLL_MS = 10e3;          // GET /v1/commands/stats
const STATES = ['queued', 'sent', 'received', 'in_progress', 'succeeded', 'failed', 'rejected', 'timed_out', 'expired', 'canceled'];

const $ = (id) => document.getElementById(id);

const state = {
  key: null,
  canWrite: false,      // the key has commands:write (GET /v1/whoami at login)
  whoami: null,         // GET /v1/whoami
  cmdStats: null,       // GET /v1/commands/stats?window=1h, or null (local counts shown)
  anoms: new Map(),     // device -> {n, last, what}: anomaly flags seen since login
  rolloutCtl: false,    // the hub has POST /v1/commands/{id}/pause|resume|cancel for rollouts
  types: new Map(),     // device type -> its document (GET /v1/device-types)
  devices: new Map(),   // id -> {device, device_type, labels, gateway, online, last_seen}
  list: [],             // ids shown (filtered, sorted)
  listDirty: true, rowsDirty: true,
  selected: new Set(),
  colors: new Map(),    // device -> palette index
  charts: new Map(),    // field -> {fig, plot|canvas, legend, series: Map(device -> [[ts, v]…])}
  spanMs: 120e3,
  aggs: new Map(),      // "key\0field" -> row data
  aggOrder: [],         // its keys, sorted
  aggsDirty: false,
  ws: null, ready: false, upSince: 0, attempt: 0, retryTimer: 0, authTimer: 0,
  seq: 0, subs: new Map(), subIds: {}, // id -> kind, kind -> id
  rawSince: null,       // the since sent with the current raw subscription
  lastPos: null,        // newest pos received on raw (resume point)
  visibleKey: '',       // the visible devices the "seen" subscription covers
  dropped: 0,
  page: null,           // the device page: {id, points: [[ts, data]…], last, plot}
  cmds: new Map(),      // command id -> {id, device, name, status, at} (last hour, for the overview)
  timeline: null,       // {id, cmd, events: Map(key -> event)}
  rollout: null,        // the rollout shown: its id
  rolloutTimer: 0,
  metrics: null,        // previous /metrics sample
  msgCost: {},          // stream message type -> [count, ms handling them]
};
window.iotConsole = { // read by tests/web
  msgCost: () => state.msgCost,
  pageMarks: () => state.page?.markCount || 0,
  devicePages: () => state.devicePages || 0,
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
  $('role').hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = message;
  $('key').focus();
}

function logout(message = '') {
  sessionStorage.removeItem(KEY_STORE);
  state.key = null;
  disconnect();
  clearTimeout(state.rolloutTimer);
  state.devices.clear();
  state.selected.clear();
  state.lastPos = null;
  state.aggs.clear();
  state.aggOrder = [];
  state.cmds.clear();
  state.dropped = 0;
  state.canWrite = false;
  state.page = null;
  state.timeline = null;
  state.rollout = null;
  $('dropped').hidden = true;
  $('device-panel').hidden = true;
  $('ro-view').hidden = true;
  $('ro-list').replaceChildren();
  markList();
  renderAggs();
  selectionChanged();
  setConn('', 'not connected');
  showLogin(message);
}

async function start(key) {
  state.key = key;
  $('login').hidden = true;
  $('app').hidden = false;
  $('logout').hidden = false;
  applyRole();
  connect();
  await Promise.all([loadTypes(), probeRole(), probeRolloutControls()]);
  applyRole();
  loadDevices();
  pollMetrics();
  loadCommandStats();
}

// The key's scopes from GET /v1/whoami; a hub without that route is probed
// with a cancel of a command id that cannot exist (403 without the scope,
// 404 with it; nothing is changed either way).
async function probeRole() {
  const w = await apiRaw('GET', '/v1/whoami').catch(() => null);
  if (w?.ok && w.body?.can) {
    state.whoami = w.body;
    state.canWrite = !!w.body.can.commands;
    return;
  }
  const r = await apiRaw('POST', '/v1/commands/c_00000000000000000000000000000000/cancel').catch(() => null);
  state.canWrite = r?.status === 404;
}

// Rollout pause/resume/cancel exist once the hub's API document lists them.
async function probeRolloutControls() {
  try {
    const r = await fetch('/v1/openapi.json', { cache: 'no-store' });
    const doc = await r.json();
    const paths = Object.keys(doc.paths || {});
    state.rolloutCtl = ['pause', 'resume'].every((v) => paths.some((p) => p.endsWith(`/${v}`) && p.startsWith('/v1/commands/')));
  } catch { state.rolloutCtl = false; }
}

function applyRole() {
  const w = state.canWrite;
  $('role').hidden = !state.key;
  $('role').textContent = w ? 'commands: read-write' : 'read-only';
  $('role').className = `badge ${w ? 'on' : ''}`;
  const me = state.whoami;
  $('role').title = me ? `key ${str(me.name)}: scopes ${(me.scopes || []).map(str).join(', ') || 'none'}; devices ${(me.devices || []).map(str).join(' ')}`
    + (me.tier ? `; tier ${str(me.tier)}` : '') : '';
  $('rollouts').hidden = !w;
  $('cmd-form').hidden = !w || !state.page;
  if (state.timeline) renderTimeline();
}

// ---- HTTP API --------------------------------------------------------------

async function apiRaw(method, path, body, headers = {}) {
  const init = { method, headers: { Authorization: `Bearer ${state.key}`, ...headers }, cache: 'no-store' };
  if (body !== undefined) init.body = JSON.stringify(body);
  const r = await fetch(path, init);
  const json = await r.json().catch(() => null);
  return { status: r.status, ok: r.ok, body: json };
}

// An API call; a refusal throws an Error whose message is the API's own
// ("422 invalid: params.delay_s must be <= 3600").
async function api(path, method = 'GET', body, headers) {
  const r = await apiRaw(method, path, body, headers);
  if (r.status === 401) {
    logout('The hub rejected this API key.');
    throw new Error('unauthorized');
  }
  if (!r.ok) {
    const e = new Error(`${r.status} ${str(r.body?.error?.code)}: ${str(r.body?.error?.message)}`);
    e.status = r.status;
    e.code = r.body?.error?.code;
    e.field = r.body?.error?.field;
    e.apiMessage = str(r.body?.error?.message);
    throw e;
  }
  return r.body;
}

async function loadTypes() {
  try {
    const body = await api('/v1/device-types');
    state.types = new Map((body.device_types || []).map((t) => [str(t.device_type), t]));
  } catch (e) {
    if (state.key) note('error', `device types: ${e.message}`);
  }
  fillRolloutTypes();
  if (state.page) renderPage();
}

// The device list is read in pages of 1000 (cursor paging, docs/protocol.md
// "Devices and telemetry"), at most DEVICE_PAGES_MAX pages, each shown as it
// arrives. A hub without paging answers one page: when it is truncated, each
// device type is read too, online and offline apart. The presence stream
// adds every device announced later, and a filter naming an exact id looks
// it up.
function mergeDevices(list) {
  for (const d of list) {
    const id = str(d.device), old = state.devices.get(id);
    // a presence event newer than the list wins
    if (old && (old.presenceAt || 0) > (d.last_seen || 0)) { d.online = old.online; d.presenceAt = old.presenceAt; }
    if (old) d.last_seen = Math.max(d.last_seen || 0, old.last_seen || 0);
    state.devices.set(id, d);
  }
  markList();
}

async function loadDevices() {
  $('devices-info').textContent = 'Loading…';
  try {
    let cursor = '', body;
    state.devicePages = 0;
    for (;;) {
      body = await api(`/v1/devices?limit=1000&cursor=${encodeURIComponent(cursor)}`);
      state.devicePages++;
      mergeDevices(body.devices || []);
      if (!('next_cursor' in body) || !body.next_cursor) break;
      if (state.devicePages >= DEVICE_PAGES_MAX || !state.key) break;
      cursor = body.next_cursor;
    }
    if (body.truncated && !('next_cursor' in body)) {
      const more = await Promise.all([...state.types.keys()].flatMap((t) => ['true', 'false'].map((on) =>
        api(`/v1/devices?limit=1000&device_type=${encodeURIComponent(t)}&online=${on}`).catch(() => ({ devices: [] })))));
      for (const m of more) mergeDevices(m.devices || []);
    }
    state.truncated = !!body.truncated;
    markList();
  } catch (e) {
    if (state.key) $('devices-info').textContent = `Could not load devices: ${e.message}`;
  }
}

// ---- device list (virtual scrolling) ----------------------------------------

const labelText = (labels) => Object.entries(labels || {}).map(([k, v]) => `${k}=${str(v)}`);

function markList() { state.listDirty = true; scheduleRender(); }

// A filter term that is an exact id the console does not know: ask the hub.
let lookupTimer = 0;
function filterChanged() {
  markList();
  clearTimeout(lookupTimer);
  lookupTimer = setTimeout(async () => {
    for (const term of $('filter').value.trim().split(/\s+/)) {
      if (!/^[A-Za-z0-9._:-]{1,128}$/.test(term) || state.devices.has(term)) continue;
      try {
        const d = await api(`/v1/devices/${encodeURIComponent(term)}`);
        if (d?.device && !state.devices.has(str(d.device))) { state.devices.set(str(d.device), d); markList(); }
      } catch { /* not a device: the filter just matches nothing */ }
    }
  }, 400);
}
function markRows() { state.rowsDirty = true; scheduleRender(); }

let renderQueued = false;
function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => { renderQueued = false; renderDevices(); });
}

// Filters and sorts the ids (only when the set or the filter changed), then
// renders the rows in view plus OVERSCAN: at most ~60 rows in the DOM whatever
// the fleet size. performance.measure "devices-render" times each render.
function renderDevices() {
  const t0 = performance.now();
  if (state.listDirty) {
    const terms = $('filter').value.toLowerCase().split(/\s+/).filter(Boolean);
    const onlineOnly = $('online-only').checked;
    const ids = [];
    for (const [id, d] of state.devices) {
      if (onlineOnly && !d.online) continue;
      if (terms.length) {
        const hay = (d.hay ||= [id, str(d.device_type), ...labelText(d.labels)].join(' ').toLowerCase());
        if (!terms.every((t) => hay.includes(t))) continue;
      }
      ids.push(id);
    }
    ids.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
    state.list = ids;
    state.listDirty = false;
    state.rowsDirty = true;
    let on = 0;
    for (const d of state.devices.values()) if (d.online) on++;
    $('devices-info').textContent = `${ids.length} of ${state.devices.size} devices shown (${on} online), ${state.selected.size} charted`
      + (state.truncated ? `; more than ${state.devices.size} in the hub: the rest appear as they announce` : '');
    renderOverviewCounts();
  }
  const box = $('dev-scroll'), n = state.list.length;
  const first = Math.max(0, Math.floor(box.scrollTop / ROW_H) - OVERSCAN);
  const last = Math.min(n, Math.ceil((box.scrollTop + (box.clientHeight || 600)) / ROW_H) + OVERSCAN);
  const key = `${first}:${last}:${n}`;
  if (state.rowsDirty || key !== state.windowKey) {
    state.windowKey = key;
    state.rowsDirty = false;
    // rows in view are kept (and updated in place) while they stay in view, so
    // a focused checkbox or link survives the once-a-second refresh
    const rows = [], cache = new Map();
    for (let i = first; i < last; i++) {
      const id = state.list[i];
      const r = state.rowCache?.get(id) || deviceRow(id);
      updateRow(id, r);
      cache.set(id, r);
      rows.push(r.tr);
    }
    state.rowCache = cache;
    const tb = $('devices').tBodies[0];
    state.topSpacer.style.height = `${first * ROW_H}px`;
    state.bottomSpacer.style.height = `${(n - last) * ROW_H}px`;
    const want = [state.topSpacer, ...rows, state.bottomSpacer];
    if (want.length !== tb.children.length || want.some((r, i) => tb.children[i] !== r)) tb.replaceChildren(...want);
    watchVisible(state.list.slice(Math.max(first, Math.floor(box.scrollTop / ROW_H)), Math.min(last, first + 60)));
  }
  performance.measure('devices-render', { start: t0, end: performance.now() });
}

// spacer rows stand for the rows out of view (heights set through the CSSOM:
// the CSP forbids style attributes)
state.topSpacer = el('tr', { class: 'spacer', 'aria-hidden': 'true' }, el('td', { colspan: 5 }));
state.bottomSpacer = el('tr', { class: 'spacer', 'aria-hidden': 'true' }, el('td', { colspan: 5 }));

function deviceRow(id) {
  const cb = el('input', { type: 'checkbox', 'aria-label': `chart ${id}`, 'data-id': id });
  const sr = el('span', { class: 'sr-only' });
  const dot = el('span', { class: 'dot' }, sr);
  const type = el('td', { class: 'c-type' }), labels = el('td', { class: 'c-labels' }), seen = el('td', { class: 'c-seen' });
  const anom = el('span', { class: 'anom', 'data-anom': id });
  anom.hidden = true;
  const tr = el('tr', {}, el('td', { class: 'c-chk' }, cb),
    el('td', { class: 'c-id' }, dot, ' ', el('button', { type: 'button', class: 'linkish', 'data-open': id, title: id }, id), anom),
    type, labels, seen);
  return { tr, cb, dot, sr, type, labels, seen, anom, labelKey: null, anomKey: '' };
}

function updateRow(id, r) {
  const d = state.devices.get(id);
  r.cb.checked = state.selected.has(id);
  r.tr.className = d.online ? '' : 'offline';
  r.dot.className = `dot ${d.online ? 'on' : 'off'}`;
  r.dot.title = d.online ? 'online' : 'offline';
  r.sr.textContent = r.dot.title;
  if (r.type.textContent !== str(d.device_type)) { r.type.textContent = str(d.device_type); r.type.title = r.type.textContent; }
  const lt = labelText(d.labels), lk = lt.join(' ');
  if (r.labelKey !== lk) { r.labelKey = lk; r.labels.title = lk; r.labels.replaceChildren(...lt.map((t) => el('span', { class: 'chip' }, t))); }
  const an = state.anoms.get(id), ak = an ? `${an.n}|${an.last}` : '';
  if (r.anomKey !== ak) {
    r.anomKey = ak;
    r.anom.hidden = !an;
    if (an) {
      r.anom.textContent = `⚠ ${an.n}`;
      r.anom.title = `${an.n} anomal${an.n === 1 ? 'y' : 'ies'} flagged since login; last at ${new Date(an.last).toLocaleTimeString()}: ${an.what}`;
    }
  }
  const a = ago(d.last_seen);
  if (r.seen.textContent !== a) r.seen.textContent = a;
  if (d.last_seen) r.seen.title = new Date(d.last_seen).toISOString();
}

function toggle(id, on) {
  if (on) state.selected.add(id); else state.selected.delete(id);
  selectionChanged();
}

// Liveness for the rows in view: a raw subscription over the visible devices
// (readings move their last seen) beside the presence stream (online state).
let visibleTimer = 0;
function watchVisible(ids) {
  const k = ids.join('\n');
  if (k === state.visibleKey) return;
  state.visibleKey = k;
  clearTimeout(visibleTimer);
  visibleTimer = setTimeout(() => { subscribe('seen'); completeDevices(ids); }, 250);
}

// GET /v1/devices/{id} for devices in view known only from presence (labels,
// last seen), six at a time.
async function completeDevices(ids) {
  const todo = ids.filter((id) => state.devices.get(id)?.partial);
  for (const id of todo) state.devices.get(id).partial = false;
  const worker = async () => {
    for (let id; (id = todo.shift());) {
      try {
        const full = await api(`/v1/devices/${encodeURIComponent(id)}`);
        const d = state.devices.get(id);
        if (!d || !full) continue;
        d.labels = full.labels || {};
        d.gateway = full.gateway ?? d.gateway;
        d.last_seen = Math.max(d.last_seen || 0, full.last_seen || 0);
        d.hay = null;
        markRows();
      } catch { /* left as it is */ }
    }
  };
  await Promise.all(Array.from({ length: 6 }, worker));
}

let resubTimer = 0;
function selectionChanged() {
  for (const [field, ch] of state.charts) {
    for (const dev of ch.series.keys()) if (!state.selected.has(dev)) ch.series.delete(dev);
    if (!ch.series.size) { ch.plot?.destroy(); ch.fig.remove(); state.charts.delete(field); }
    else ch.shape = '';
  }
  let i = 0;
  state.colors = new Map([...state.selected].map((d) => [d, i++ % PALETTE]));
  if (!state.selected.size) state.lastPos = null; // nothing to resume
  $('history').disabled = $('clear-sel').disabled = !state.selected.size;
  $('charts-info').textContent = state.selected.size
    ? `Charting ${state.selected.size} device(s); numeric fields appear as readings arrive.`
    : 'Tick devices in the list to chart their numeric fields.';
  markRows();
  state.listDirty = true;
  clearTimeout(resubTimer);
  resubTimer = setTimeout(() => {
    subscribe('raw');
    if ($('agg-selected').checked) subscribe('agg');
  }, 300);
}

// ---- fleet overview ----------------------------------------------------------

function renderOverviewCounts() {
  let on = 0, off = 0;
  const byType = new Map();
  for (const d of state.devices.values()) {
    const t = str(d.device_type) || '(unknown)';
    const c = byType.get(t) || [0, 0];
    if (d.online) { on++; c[0]++; } else { off++; c[1]++; }
    byType.set(t, c);
  }
  $('ov-online').textContent = String(on);
  $('ov-offline').textContent = String(off);
  $('ov-types').tBodies[0].replaceChildren(...[...byType].sort((a, b) => a[0].localeCompare(b[0])).map(([t, [a, b]]) =>
    el('tr', {}, el('th', { scope: 'row' }, t), el('td', { class: 'num' }, a), el('td', { class: 'num' }, b))));
}

// Commands by state in the last hour: transitions into each state, by
// device type too, from GET /v1/commands/stats (every hub counts them into
// Redis); a hub without the route, or a key limited to some devices (403),
// gets the commands seen live since login, by their latest state.
let statsTimer = 0;
async function loadCommandStats() {
  clearTimeout(statsTimer);
  statsTimer = 0;
  if (!state.key) return;
  try {
    state.cmdStats = await api('/v1/commands/stats?window=1h');
  } catch {
    state.cmdStats = null;
  }
  renderCommandStates();
  if (state.key) statsTimer = setTimeout(loadCommandStats, STATS_POLL_MS);
}

// after command events: the hubs write their counts every 2 s
function scheduleStats() {
  if (!state.cmdStats || state.statsSoon) return;
  state.statsSoon = setTimeout(() => { state.statsSoon = 0; loadCommandStats(); }, 2500);
}

function renderCommandStates() {
  const cut = Date.now() - HOUR, counts = new Map();
  for (const [id, c] of state.cmds) {
    if (c.at < cut) { state.cmds.delete(id); continue; }
    counts.set(c.status, (counts.get(c.status) || 0) + 1);
  }
  const box = $('ov-cmd-states'), s = state.cmdStats;
  $('ov-cmd-src').textContent = s ? '(last hour: transitions into each state, from the hub)' : '(last hour, seen live)';
  if (s) {
    const st = s.states || {};
    const chips = STATES.filter((k) => Number(st[k]) > 0).map((k) =>
      el('span', { class: `chip st-${k}`, 'data-state': k, 'data-count': String(Number(st[k])) }, `${k} ${Number(st[k])}`));
    const types = Object.entries(s.by_type || {}).sort((a, b) => a[0].localeCompare(b[0])).map(([t, c]) =>
      el('span', { class: 'chip hint', 'data-type': str(t) }, `${str(t)}: `
        + STATES.filter((k) => Number(c[k]) > 0).map((k) => `${k} ${Number(c[k])}`).join(', ')));
    if (!chips.length) { box.textContent = 'none in the last hour'; return; }
    box.replaceChildren(...chips, el('span', { class: 'chip' }, `final ${Number(s.final) || 0} / not final ${Number(s.non_final) || 0}`), ...types);
    return;
  }
  if (!counts.size) { box.textContent = 'none yet'; return; }
  box.replaceChildren(...STATES.filter((k) => counts.has(k)).map((k) =>
    el('span', { class: `chip st-${k}` }, `${k} ${counts.get(k)}`)));
}

const fmtRate = (r) => (r >= 100 ? r.toFixed(0) : r.toFixed(1));

// Prometheus text: the ingest and reject rates from two samples of /metrics
// (a public route; a hub that refuses it leaves the tiles at "–").
function parseProm(text) {
  const out = { accepted: 0, rejected: new Map() };
  for (const line of text.split('\n')) {
    if (line.startsWith('iot_hub_readings_accepted_total ')) out.accepted = Number(line.split(' ')[1]);
    else if (line.startsWith('iot_hub_readings_rejected_total{')) {
      const m = /code="([^"]*)"\}\s+(\S+)/.exec(line);
      if (m) out.rejected.set(m[1], Number(m[2]));
    }
  }
  return out;
}

async function pollMetrics() {
  clearTimeout(state.metricsTimer);
  if (!state.key) return;
  try {
    const r = await fetch('/metrics', { cache: 'no-store' });
    if (r.ok) {
      const now = performance.now(), cur = parseProm(await r.text()), prev = state.metrics;
      if (prev) {
        const dt = (now - prev.t) / 1000;
        $('ov-ingest').textContent = fmtRate(Math.max(0, (cur.accepted - prev.accepted) / dt));
        let rej = 0;
        const chips = [];
        for (const [code, v] of cur.rejected) {
          const rate = Math.max(0, (v - (prev.rejected.get(code) || 0)) / dt);
          rej += rate;
          if (v > 0) chips.push(el('span', { class: `chip${rate > 0 ? ' bad' : ''}` }, `${code} ${fmtRate(rate)}/s (${v} total)`));
        }
        $('ov-reject').textContent = fmtRate(rej);
        if (chips.length) $('ov-reject-codes').replaceChildren(...chips); else $('ov-reject-codes').textContent = 'none';
        $('overview-info').textContent = `rates from this hub instance's /metrics over ${dt.toFixed(0)} s`;
      }
      cur.t = now;
      state.metrics = cur;
    } else {
      $('overview-info').textContent = `/metrics: ${r.status}`;
    }
  } catch (e) {
    $('overview-info').textContent = `/metrics: ${e.message}`;
  }
  state.metricsTimer = setTimeout(pollMetrics, 5000);
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
    if (m && typeof m === 'object') {
      const t = performance.now();
      handle(m);
      // cost of stream messages by type (tests/web reports it)
      const k = str(m.type), c = (state.msgCost[k] ||= [0, 0]);
      c[0]++;
      c[1] += performance.now() - t;
    }
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
  for (const kind of ['presence', 'raw', 'seen', 'agg', 'commands', 'anomalies']) subscribe(kind);
  if (state.upSince && state.attempt) catchUpCommands(); // a reconnect: events may have been missed
}

function subscription(kind) {
  switch (kind) {
    case 'presence': case 'commands': case 'anomalies':
      return { stream: kind, filter: {} };
    case 'seen': {
      const ids = state.visibleKey ? state.visibleKey.split('\n') : [];
      if (state.page && !ids.includes(state.page.id)) ids.push(state.page.id);
      return ids.length ? { stream: 'raw', filter: { devices: ids } } : null;
    }
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
    case 'anomaly': return onAnomaly(m);
    case 'presence': return onPresence(m);
    case 'aggregate': return onAggregate(m);
    case 'command_status': return onCommand(m);
    case 'gap': return onGap(m);
    case 'error': return onError(m);
  }
  note('warn', `unknown message type ${str(m.type)}`);
}

function onReading(m) {
  const dev = str(m.device), ts = Number(m.ts), kind = state.subs.get(m.sub);
  const d = state.devices.get(dev);
  if (d && ts > (d.last_seen || 0)) d.last_seen = ts;
  if (!Number.isFinite(ts) || !m.data || typeof m.data !== 'object') return;
  if (kind === 'seen') {
    if (state.page?.id === dev) pageReading(ts, m.data, m.anomalies);
    return;
  }
  if (typeof m.pos === 'string' && posAfter(m.pos, state.lastPos)) state.lastPos = m.pos;
  if (state.selected.has(dev)) addReading(dev, ts, m.data);
}

// A reading with anomaly flags (the `anomalies` stream, docs/anomalies.md):
// counted per device for the device table, marked on the device page.
const anomText = (flags) => flags.map((f) => `${str(f?.kind)} of ${str(f?.field)}`
  + (Number.isFinite(f?.score) ? ` (score ${fmtNum(f.score)})` : '')).join(', ');

function onAnomaly(m) {
  const dev = str(m.device), ts = Number(m.ts);
  if (!Number.isFinite(ts) || !Array.isArray(m.anomalies) || !m.anomalies.length) return;
  const a = state.anoms.get(dev) || { n: 0, last: 0, what: '' };
  a.n++;
  if (ts >= a.last) { a.last = ts; a.what = anomText(m.anomalies); }
  state.anoms.set(dev, a);
  markRows();
  if (state.page?.id === dev && m.data && typeof m.data === 'object') pageReading(ts, m.data, m.anomalies);
}

// Online state and last seen of every device come from the presence stream;
// devices the list did not hold (the hub lists at most 1000) are added.
function onPresence(m) {
  const id = str(m.device);
  let d = state.devices.get(id);
  // presence events carry no labels: such a device is read in full once in view
  if (!d) state.devices.set(id, (d = { device: id, device_type: m.device_type, labels: {}, partial: true }));
  d.online = !!m.online;
  if (m.gateway != null) d.gateway = m.gateway;
  if (Number.isFinite(m.at)) { d.last_seen = Math.max(d.last_seen || 0, m.at); d.presenceAt = m.at; }
  markList();
  if (state.page?.id === id) renderFacts();
}

function onAggregate(m) {
  const who = m.device != null ? str(m.device)
    : Object.entries(m.group || {}).map(([k, v]) => `${k}=${v == null ? '(none)' : str(v)}`).join(' ');
  for (const [field, s] of Object.entries(m.metrics || {})) {
    const k = `${who}\0${field}`, old = state.aggs.get(k);
    if (old && old.start > m.start) continue;
    if (!old) insertSorted(state.aggOrder, k);
    state.aggs.set(k, { who, device: m.device != null ? str(m.device) : null, field, start: m.start, window: m.window, ...s });
  }
  state.aggsDirty = true;
}

const AGG_ROWS = 200;

// keeps the aggregate rows' keys sorted as rows are added (no sort per frame)
function insertSorted(arr, k) {
  let lo = 0, hi = arr.length;
  while (lo < hi) { const mid = (lo + hi) >> 1; if (arr[mid] < k) lo = mid + 1; else hi = mid; }
  arr.splice(lo, 0, k);
}

function renderAggs() {
  state.aggsDirty = false;
  // at most AGG_ROWS rows in the DOM (a fleet of 10,000 devices has 20,000+):
  // the first ones by device / group and field (kept sorted as rows are
  // added), the rest counted. Rows are kept per key and their cells updated
  // in place: a frame touches only the text that changed.
  if (state.aggOrder.length !== state.aggs.size) state.aggOrder = [...state.aggs.keys()].sort();
  const keys = state.aggOrder.slice(0, AGG_ROWS);
  $('aggs-info').textContent = state.aggs.size > AGG_ROWS
    ? `${AGG_ROWS} of ${state.aggs.size} rows shown: group by a label or tick "selected devices only" to see fewer`
    : '';
  const cache = new Map(), trs = [];
  for (const k of keys) {
    const r = state.aggs.get(k);
    let row = state.aggRows?.get(k);
    if (!row) {
      const mark = el('span', { class: 'stale-mark', title: 'the device is offline: this window is its last' }, ' offline');
      const cells = Array.from({ length: 6 }, (_, i) => el('td', { class: i ? 'num' : null }));
      row = { tr: el('tr', {}, el('th', { scope: 'row' }, r.who, mark), el('td', {}, r.field), ...cells), mark, cells, text: [] };
    }
    // a device that went offline keeps its last window, marked stale
    const off = r.device != null && state.devices.get(r.device)?.online === false;
    if (row.off !== off) { row.off = off; row.tr.className = off ? 'stale' : ''; row.mark.hidden = !off; }
    if (row.src !== r) { // a new window for this row
      row.src = r;
      const text = [`${timeOf(r.start)} (${str(r.window)})`, ...[r.count, r.min, r.max, r.avg, r.last].map(fmtNum)];
      text.forEach((t, i) => { if (row.text[i] !== t) { row.text[i] = t; row.cells[i].textContent = t; } });
    }
    cache.set(k, row);
    trs.push(row.tr);
  }
  state.aggRows = cache;
  const tb = $('aggs').tBodies[0];
  if (trs.length !== tb.children.length || trs.some((tr, i) => tb.children[i] !== tr)) tb.replaceChildren(...trs);
}

function onCommand(m) {
  const st = str(m.status), id = str(m.id);
  state.cmds.set(id, { id, device: str(m.device), name: str(m.name), status: st, at: Number(m.at) || Date.now() });
  if (state.timeline?.id === id) { addTimelineEvent(m); renderTimeline(); }
  if (state.page?.id === str(m.device)) schedulePageCommands();
  if (state.rollout && id.startsWith(`c_${state.rollout.slice(2)}_`)) scheduleRollout(300);
  if (!state.cmdStatesTimer) state.cmdStatesTimer = setTimeout(() => { state.cmdStatesTimer = 0; renderCommandStates(); }, 200);
  scheduleStats();
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
  // presence events were lost: the device list is read again (online states)
  if (kind === 'presence') { clearTimeout(state.gapReload); state.gapReload = setTimeout(loadDevices, 1000); }
  // command events were lost: the open timeline and rollout are read again
  if (kind === 'commands') catchUpCommands();
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

// The unit of a field, from the schema of the charted devices' types.
function unitFor(field, devs) {
  for (const dev of devs) {
    const t = state.types.get(str(state.devices.get(dev)?.device_type));
    const u = unitOf(t?.telemetry?.properties?.[field], field);
    if (u) return u;
  }
  return unitOf(null, field);
}
const axisLabel = (field, unit) => (unit ? `${field} (${unit})` : field);

function chartFor(field) {
  let ch = state.charts.get(field);
  if (ch) return ch;
  const canvas = window.uPlot ? null : el('canvas', { role: 'img', 'aria-label': `${field} over time` });
  const box = el('div', { class: 'plot' }, canvas);
  const legend = el('figcaption', {});
  const title = el('h3', {}, field);
  const fig = el('figure', { class: 'chart' }, title, box, legend);
  ch = { fig, canvas, box, title, legend, field, series: new Map(), shape: '' };
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

// uPlot data: one x array (ms) and one y array per series, the union of the
// series' timestamps; a series without a point at some x has undefined there
// (joined over), and null where its own readings paused longer than breakMs
// (a gap in its line).
function joinSeries(list, t0, breakMs) {
  const xs = new Set();
  for (const pts of list) for (const [t] of pts) if (t >= t0 - breakMs) xs.add(t);
  const x = Float64Array.from(xs).sort();
  const idx = new Map();
  x.forEach((t, i) => idx.set(t, i));
  const ys = list.map((pts) => {
    const y = new Array(x.length).fill(undefined);
    let prev = -Infinity;
    for (const [t, v] of pts) {
      if (t < t0 - breakMs) continue;
      const i = idx.get(t);
      if (t - prev > breakMs && i > 0 && y[i - 1] === undefined && prev > -Infinity) y[i - 1] = null;
      y[i] = v;
      prev = t;
    }
    return y;
  });
  return [Array.from(x), ...ys];
}

function uplotOpts(width, unit, label, series, css, extra = {}) {
  return {
    width, height: 200, ms: 1,
    legend: { show: false },
    cursor: { drag: { x: true, y: false } },
    scales: { x: { time: true } },
    axes: [
      { stroke: css.muted, grid: { stroke: css.grid, width: 1 }, ticks: { stroke: css.grid } },
      { stroke: css.muted, grid: { stroke: css.grid, width: 1 }, ticks: { stroke: css.grid }, label,
        size: 60, values: (u, vals) => vals.map((v) => `${fmtNum(v)}${unit && unit.length <= 3 ? ` ${unit}` : ''}`) },
    ],
    series: [{}, ...series.map(([name, c]) => ({ label: name, stroke: css.colors[c], width: 1.75, spanGaps: false, points: { show: false } }))],
    ...extra,
  };
}

function drawUplot(ch, css, now) {
  const devs = [...ch.series.keys()].sort();
  const w = ch.box.clientWidth;
  if (!w) return;
  const unit = unitFor(ch.field, devs), label = axisLabel(ch.field, unit);
  const shape = `${devs.join('\n')}|${label}|${w}|${css.colors.join()}`;
  if (ch.shape !== shape) {
    ch.plot?.destroy();
    ch.title.textContent = label;
    ch.plot = new window.uPlot(uplotOpts(w, unit, label, devs.map((d) => [d, state.colors.get(d) ?? 0]), css), [[]], ch.box);
    ch.shape = shape;
  }
  for (const pts of ch.series.values()) trimPoints(pts, now);
  const breakMs = Math.max(10e3, state.spanMs / 30);
  ch.plot.batch(() => {
    ch.plot.setData(joinSeries(devs.map((d) => ch.series.get(d)), now - state.spanMs, breakMs), false);
    ch.plot.setScale('x', { min: now - state.spanMs, max: now });
  });
  ch.legend.replaceChildren(...devs.map((d) => {
    const pts = ch.series.get(d), last = pts[pts.length - 1], c = state.colors.get(d) ?? 0;
    return el('span', { class: 'key' }, el('span', { class: `swatch c${c}` }), `${d}: ${last ? fmtNum(last[1]) : '–'}${unit ? ` ${unit}` : ''}`);
  }));
  ch.box.setAttribute('aria-label', `${label}, latest: ${ch.legend.textContent}`);
  ch.box.setAttribute('role', 'img');
}

function trimPoints(pts, now) {
  const keep = now - Math.max(state.spanMs, HOUR);
  let cut = Math.max(0, pts.length - MAX_POINTS);
  while (cut < pts.length && pts[cut][0] < keep) cut++;
  if (cut) pts.splice(0, cut);
}

function drawChart(ch, css, now) {
  return window.uPlot ? drawUplot(ch, css, now) : drawChartCanvas(ch, css, now);
}

// The built-in chart, for a console served without uPlot (web/ itself).
function drawChartCanvas(ch, css, now) {
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
    trimPoints(pts, now);
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
  const unit = unitFor(ch.field, [...series.keys()]);
  ch.title.textContent = axisLabel(ch.field, unit);
  ch.canvas.setAttribute('aria-label', `${ch.title.textContent}, latest: ${spoken.join(', ')}`);
}

function cssColors() {
  const cs = getComputedStyle(document.documentElement), v = (n) => cs.getPropertyValue(n).trim();
  return { muted: v('--muted'), grid: v('--grid'), err: v('--err'), colors: Array.from({ length: PALETTE }, (_, i) => v(`--c${i}`)) };
}

// One frame of work: live charts, the device page's chart, aggregates.
// performance.measure "tick" times it (tests/web reports it).
function tick() {
  if (document.hidden || $('app').hidden) return;
  const t0 = performance.now();
  const css = cssColors(), now = Date.now();
  for (const ch of state.charts.values()) drawChart(ch, css, now);
  const t1 = performance.now();
  if (state.page?.dirty) drawPageChart(css);
  const t2 = performance.now();
  if (state.aggsDirty) renderAggs();
  const t3 = performance.now();
  performance.measure('tick', { start: t0, end: t3 });
  performance.measure('tick-charts', { start: t0, end: t1 });
  performance.measure('tick-page', { start: t1, end: t2 });
  performance.measure('tick-aggs', { start: t2, end: t3 });
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

// ---- device page -------------------------------------------------------------

function openDevice(id) {
  state.page?.plot?.destroy();
  state.page = { id, points: [], flags: new Map(), markCount: 0, last: null, lastTs: 0, plot: null, zoomed: false, dirty: true, field: '' };
  $('device-panel').hidden = false;
  $('timeline').hidden = true;
  state.timeline = null;
  renderPage();
  loadPageHistory();
  loadPageCommands();
  subscribe('seen');
  $('device-panel').scrollIntoView({ block: 'nearest' });
  $('dev-title').focus?.();
}

function closeDevice() {
  state.page?.plot?.destroy();
  state.page = null;
  state.timeline = null;
  $('device-panel').hidden = true;
  subscribe('seen');
}

const pageType = () => state.types.get(str(state.devices.get(state.page?.id)?.device_type));

function renderFacts() {
  const id = state.page.id, d = state.devices.get(id) || { device: id };
  const dd = (k, ...v) => [el('dt', {}, k), el('dd', {}, ...v)];
  $('dev-title').textContent = id;
  $('dev-facts').replaceChildren(
    ...dd('Type', str(d.device_type) || '–'),
    ...dd('State', el('span', { class: `dot ${d.online ? 'on' : 'off'}` }), ` ${d.online ? 'online' : 'offline'}`,
      d.gateway ? ` via ${str(d.gateway)}` : ''),
    ...dd('Last seen', d.last_seen ? `${ago(d.last_seen)} (${new Date(d.last_seen).toLocaleString()})` : 'never'),
    ...dd('Labels', ...(labelText(d.labels).length ? labelText(d.labels).map((t) => el('span', { class: 'chip' }, t)) : ['none'])));
}

function renderPage() {
  if (!state.page) return;
  renderFacts();
  const t = pageType();
  const props = t?.telemetry?.properties || {};
  // fields to chart: the schema's numeric ones, then any numeric seen
  const fields = Object.entries(props).filter(([, s]) => s.type === 'number' || s.type === 'integer').map(([k]) => k);
  for (const k of Object.keys(state.page.last || {})) if (typeof state.page.last[k] === 'number' && !fields.includes(k)) fields.push(k);
  const sel = $('dev-field'), cur = sel.value;
  sel.replaceChildren(...fields.map((f) => el('option', { value: f }, axisLabel(f, unitOf(props[f], f)))));
  if (fields.includes(cur)) sel.value = cur;
  state.page.field = sel.value;
  renderLastReading();
  // command form
  const cmds = Object.keys(t?.commands || {});
  const cn = $('cmd-name'), prev = cn.value;
  cn.replaceChildren(...cmds.map((c) => el('option', { value: c }, c)));
  if (cmds.includes(prev)) cn.value = prev;
  $('cmd-idem').value ||= newIdemKey();
  buildCmdParams();
  applyRole();
  state.page.dirty = true;
}

function renderLastReading() {
  const p = state.page, props = pageType()?.telemetry?.properties || {};
  if (!p.last) { $('dev-last').tBodies[0].replaceChildren(el('tr', {}, el('td', { class: 'hint' }, 'no reading in the loaded range'))); return; }
  $('dev-last').tBodies[0].replaceChildren(
    el('tr', {}, el('th', { scope: 'row' }, 'at'), el('td', {}, new Date(p.lastTs).toLocaleString())),
    ...Object.entries(p.last).map(([k, v]) => {
      const u = unitOf(props[k], k);
      return el('tr', {}, el('th', { scope: 'row' }, k),
        el('td', { class: typeof v === 'number' ? 'num' : null }, typeof v === 'number' ? `${fmtNum(v)}${u ? ` ${u}` : ''}` : JSON.stringify(v)));
    }));
}

function pageReading(ts, data, anomalies) {
  const p = state.page;
  const n = p.points.length;
  if (Array.isArray(anomalies) && anomalies.length && !p.flags.has(ts)) {
    p.flags.set(ts, anomalies);
    p.dirty = true;
  }
  if (n && p.points[n - 1][0] >= ts) {
    if (p.points.some(([t]) => t === ts)) return;
    p.points.push([ts, data]);
    p.points.sort((a, b) => a[0] - b[0]);
  } else p.points.push([ts, data]);
  if (ts >= p.lastTs) { p.lastTs = ts; p.last = data; renderLastReading(); }
  if (!p.field) renderPage();
  p.dirty = true;
}

async function loadPageHistory() {
  const p = state.page, id = p.id, to = Date.now(), from = to - Number($('dev-range').value);
  let after = null;
  try {
    for (let page = 0; page < 10; page++) {
      const q = new URLSearchParams({ from, to, limit: 10000, format: 'json' });
      if (after) q.set('after', after);
      const body = await api(`/v1/devices/${encodeURIComponent(id)}/telemetry?${q}`);
      if (state.page !== p) return;
      for (const r of body.readings || []) if (Number.isFinite(r.ts) && r.data && typeof r.data === 'object') pageReading(r.ts, r.data, r.anomalies);
      if (!(after = body.next)) break;
    }
    renderPage();
  } catch (e) {
    if (state.page === p) $('dev-chart').replaceChildren(el('p', { class: 'error' }, `History: ${e.message}`));
  }
}

// The anomalies of the device page's range, under its chart.
function renderPageAnoms(field, range, now) {
  const p = state.page, box = $('dev-anoms');
  let n = 0, last = null;
  for (const [t, flags] of p.flags) {
    if (t < now - range) continue;
    n++;
    if (!last || t > last[0]) last = [t, flags];
  }
  box.hidden = !n;
  const text = n ? `${n} flagged reading${n === 1 ? '' : 's'} in this range (${p.markCount} of ${field} marked on the chart); last at ${new Date(last[0]).toLocaleTimeString()}: ${anomText(last[1])}` : '';
  if (box.textContent !== text) box.textContent = text;
}

function drawPageChart(css) {
  const p = state.page, box = $('dev-chart');
  p.dirty = false;
  const field = p.field, range = Number($('dev-range').value), now = Date.now();
  const props = pageType()?.telemetry?.properties || {};
  const unit = unitOf(props[field], field), label = axisLabel(field, unit);
  const pts = p.points.filter(([t, d]) => t >= now - range && typeof d[field] === 'number').map(([t, d]) => [t, d[field]]);
  if (!field) { box.replaceChildren(el('p', { class: 'hint' }, 'No numeric field to chart.')); return; }
  if (!window.uPlot) {
    if (!p.canvasCh) {
      const canvas = el('canvas', { role: 'img', 'aria-label': label });
      p.canvasCh = { canvas, legend: el('figcaption', {}), title: el('span', {}), field, series: new Map() };
      box.replaceChildren(canvas, p.canvasCh.legend);
    }
    p.canvasCh.field = field;
    p.canvasCh.series = new Map([[p.id, pts]]);
    const span = state.spanMs;
    state.spanMs = range;
    drawChartCanvas(p.canvasCh, css, now);
    state.spanMs = span;
    return;
  }
  const w = box.clientWidth || 600, shape = `${label}|${w}|${css.colors[0]}`;
  if (p.shape !== shape || !p.plot) {
    p.plot?.destroy();
    box.replaceChildren();
    const opts = uplotOpts(w, unit, label, [[p.id, 0]], css, {
      hooks: { setSelect: [(u) => { if (u.select.width > 2) p.zoomed = true; }] },
    });
    // anomaly marks: a series of points only where a reading was flagged
    opts.series.push({ label: 'anomaly', stroke: css.err, width: 0, paths: () => null,
      points: { show: true, size: 10, width: 2, stroke: css.err, fill: css.err } });
    p.plot = new window.uPlot(opts, [[], [], []], box);
    p.plot.over.addEventListener('dblclick', () => { p.zoomed = false; p.dirty = true; });
    p.shape = shape;
  }
  const data = joinSeries([pts], now - range, Math.max(10e3, range / 30));
  const flagged = (t) => p.flags.get(t)?.some((f) => str(f?.field) === field);
  data.push(data[0].map((t, i) => (data[1][i] != null && flagged(t) ? data[1][i] : null)));
  p.markCount = data[2].reduce((n, v) => n + (v != null), 0);
  renderPageAnoms(field, range, now);
  // the range, or less when the readings cover less of it (at least 1 min)
  const from = Math.min(now - 60e3, Math.max(now - range, (pts[0]?.[0] ?? now) - 5e3));
  if (p.zoomed) p.plot.setData(data, false);
  else p.plot.batch(() => { p.plot.setData(data, false); p.plot.setScale('x', { min: from, max: now }); });
  box.setAttribute('aria-label', `${label} history of ${p.id}`);
}

// ---- commands: form, recent list, timeline -------------------------------------

const newIdemKey = () => (crypto.randomUUID ? crypto.randomUUID() : `k-${Date.now()}-${Math.random().toString(16).slice(2)}`);

let cmdParams = null;
function buildCmdParams() {
  const t = pageType(), name = $('cmd-name').value;
  const box = $('cmd-params');
  const legend = el('legend', {}, name ? `Parameters of ${name}` : 'Parameters');
  const inner = el('div', { class: 'params-inner' });
  box.replaceChildren(legend, inner);
  cmdParams = paramsForm(inner, t?.commands?.[name] || {}, 'cmdp');
}

// The timing fields: the API's ranges and message ("ttl_s must be an integer from 1 to 2592000").
const TIMING = [
  ['cmd-ttl', 'ttl_s', 1, 2592000], ['cmd-timeout', 'timeout_s', 1, 604800],
  ['cmd-ack', 'ack_timeout_s', 1, 3600], ['cmd-attempts', 'max_attempts', 1, 100],
];

function readTiming(body) {
  let ok = true;
  for (const [id, field, min, max] of TIMING) {
    const raw = $(id).value.trim();
    $(`${id}-err`).textContent = '';
    $(id).removeAttribute('aria-invalid');
    if (!raw) continue;
    const v = Number(raw);
    if (!/^-?[0-9]+$/.test(raw) || v < min || v > max) {
      $(`${id}-err`).textContent = `${field} must be an integer from ${min} to ${max}`;
      $(id).setAttribute('aria-invalid', 'true');
      ok = false;
    } else body[field] = v;
  }
  return ok;
}

async function sendCommand(e) {
  e.preventDefault();
  const p = state.page, name = $('cmd-name').value;
  $('cmd-error').textContent = '';
  if (!p || !name) return;
  const body = { name };
  const { params, errors } = cmdParams.read();
  const timingOk = readTiming(body);
  const idem = $('cmd-idem').value.trim();
  $('cmd-idem-err').textContent = '';
  if (idem && !/^[\x21-\x7e]{1,128}$/.test(idem)) {
    $('cmd-idem-err').textContent = idem.length > 128 ? 'Idempotency-Key must be 1 to 128 characters' : 'Idempotency-Key must be printable ASCII without spaces';
    return;
  }
  if (errors.length || !timingOk) {
    $('cmd-error').textContent = errors.length ? `${errors[0].path} ${errors[0].message}` : 'Fix the delivery settings.';
    (errors[0]?.input || null)?.focus();
    return;
  }
  body.params = params;
  if (DESTRUCTIVE.has(name) && !confirm(`Send ${name} to ${p.id}?\n\n${JSON.stringify(params)}`)) return;
  $('cmd-send').disabled = true;
  try {
    const cmd = await api(`/v1/devices/${encodeURIComponent(p.id)}/commands`, 'POST', body, idem ? { 'Idempotency-Key': idem } : {});
    $('cmd-idem').value = newIdemKey(); // the next send is a new command
    showTimeline(cmd);
    loadPageCommands();
  } catch (err) {
    $('cmd-error').textContent = err.apiMessage || err.message;
    if (err.field) markServerField(err.field);
  } finally {
    $('cmd-send').disabled = false;
  }
}

// A 422 names the field: show the API's message beside it too.
function markServerField(field) {
  const input = document.querySelector(`#cmd-params [name="${CSS.escape(field.replace(/^params\./, '').split(/[.[]/)[0])}"]`);
  if (input) { input.setAttribute('aria-invalid', 'true'); $(`${input.id}-err`).textContent = $('cmd-error').textContent; }
}

let pageCmdTimer = 0;
function schedulePageCommands() {
  clearTimeout(pageCmdTimer);
  pageCmdTimer = setTimeout(loadPageCommands, 400);
}

async function loadPageCommands() {
  const p = state.page;
  if (!p) return;
  try {
    const body = await api(`/v1/devices/${encodeURIComponent(p.id)}/commands?limit=20`);
    if (state.page !== p) return;
    const list = body.commands || [];
    $('dev-cmds').replaceChildren(...(list.length ? list.map((c) => el('li', { class: `cmd st-${/^[a-z_]+$/.test(c.status) ? c.status : ''}` },
      el('time', {}, timeOf(c.created_at)), ' ',
      el('button', { type: 'button', class: 'linkish', 'data-cmd': str(c.id) }, str(c.name)), ' ',
      el('span', { class: 'status' }, str(c.status)), ' ', el('span', { class: 'hint' }, str(c.id)))) : [el('li', { class: 'hint' }, 'none')]));
  } catch (e) {
    $('dev-cmds').replaceChildren(el('li', { class: 'error' }, e.message));
  }
}

// one entry per transition: the stream event, the history entry and a cancel
// answer of the same transition merge (status, time and progress)
function eventKey(ev) { return `${ev.status}|${ev.at}|${ev.progress ?? ''}`; }

function addTimelineEvent(ev) {
  const t = state.timeline, e = {
    status: str(ev.status), at: Number(ev.at), attempt: ev.attempt, progress: ev.progress,
    message: ev.message, result: ev.result, error: ev.error,
  };
  const k = eventKey(e), had = t.events.get(k);
  if (had) for (const [f, v] of Object.entries(e)) { if (v != null) had[f] = v; } else t.events.set(k, e);
  if (FINAL.has(e.status) || STATES.indexOf(e.status) > STATES.indexOf(t.cmd.status)) t.cmd.status = e.status;
  if (e.attempt != null) t.cmd.attempt = e.attempt;
  if (e.result !== undefined && e.result !== null) t.cmd.result = e.result;
  if (e.error) t.cmd.error = e.error;
}

async function showTimeline(cmdOrId) {
  const id = typeof cmdOrId === 'string' ? cmdOrId : cmdOrId.id;
  state.timeline = { id, cmd: typeof cmdOrId === 'string' ? { id, status: '' } : { ...cmdOrId }, events: new Map() };
  if (typeof cmdOrId !== 'string') for (const h of cmdOrId.history || []) addTimelineEvent(h);
  $('timeline').hidden = false;
  $('tl-error').textContent = '';
  renderTimeline();
  // the GET has the history from before this page saw the command
  try {
    const full = await api(`/v1/commands/${encodeURIComponent(id)}`);
    if (state.timeline?.id !== id) return;
    Object.assign(state.timeline.cmd, full, { status: state.timeline.cmd.status && FINAL.has(state.timeline.cmd.status) ? state.timeline.cmd.status : full.status });
    for (const h of full.history || []) addTimelineEvent(h);
    renderTimeline();
  } catch (e) {
    $('tl-error').textContent = e.apiMessage || e.message;
  }
}

function renderTimeline() {
  const t = state.timeline;
  if (!t) return;
  const c = t.cmd, final = FINAL.has(c.status);
  $('tl-title').textContent = `${str(c.name) || 'command'} ${c.id}`;
  $('tl-summary').replaceChildren(
    el('span', { class: `status st-${/^[a-z_]+$/.test(c.status) ? c.status : ''}`, 'data-status': c.status }, str(c.status)),
    c.attempt != null ? ` attempt ${c.attempt}${c.max_attempts ? ` of ${c.max_attempts}` : ''}` : '',
    c.params ? ` params ${JSON.stringify(c.params)}` : '',
    c.result != null ? ` result ${JSON.stringify(c.result)}` : '',
    c.error ? ` error: ${str(c.error)}` : '');
  const evs = [...t.events.values()].sort((a, b) => a.at - b.at || STATES.indexOf(a.status) - STATES.indexOf(b.status));
  $('tl-list').replaceChildren(...evs.map((e) => el('li', { class: `st-${/^[a-z_]+$/.test(e.status) ? e.status : ''}` },
    el('time', { datetime: new Date(e.at).toISOString() }, `${timeOf(e.at)}.${String(e.at % 1000).padStart(3, '0')}`), ' ',
    el('span', { class: 'status' }, e.status),
    e.attempt != null ? el('span', { class: 'hint' }, ` attempt ${e.attempt}`) : null,
    e.progress != null ? ` ${e.progress}%` : null,
    e.message ? ` ${str(e.message)}` : null,
    e.result != null ? el('code', {}, ` ${JSON.stringify(e.result)}`) : null,
    e.error ? el('span', { class: 'error-text' }, ` ${str(e.error)}`) : null)));
  $('tl-cancel').hidden = final || !state.canWrite || !c.status;
}

async function cancelCommand() {
  const t = state.timeline;
  if (!t) return;
  $('tl-error').textContent = '';
  try {
    const c = await api(`/v1/commands/${encodeURIComponent(t.id)}/cancel`, 'POST');
    Object.assign(t.cmd, c);
    for (const h of c.history || []) addTimelineEvent(h);
    renderTimeline();
  } catch (e) {
    $('tl-error').textContent = e.apiMessage || e.message;
  }
}

// After a gap or a reconnect: the GETs have what the stream lost.
function catchUpCommands() {
  if (state.timeline && !FINAL.has(state.timeline.cmd.status)) showTimeline(state.timeline.cmd.status ? { ...state.timeline.cmd, history: [...state.timeline.events.values()] } : state.timeline.id);
  if (state.page) schedulePageCommands();
  if (state.rollout) scheduleRollout(100);
}

// ---- rollouts ---------------------------------------------------------------------

let roParams = null;
function fillRolloutTypes() {
  const sel = $('ro-type'), cur = sel.value;
  sel.replaceChildren(...[...state.types.keys()].sort().map((t) => el('option', { value: t }, t)));
  if (state.types.has(cur)) sel.value = cur;
  fillRolloutCommands();
}

function fillRolloutCommands() {
  const t = state.types.get($('ro-type').value), sel = $('ro-name'), cur = sel.value;
  const names = Object.keys(t?.commands || {});
  sel.replaceChildren(...names.map((c) => el('option', { value: c }, c)));
  if (names.includes(cur)) sel.value = cur;
  const inner = el('div', { class: 'params-inner' });
  $('ro-params').replaceChildren(el('legend', {}, sel.value ? `Parameters of ${sel.value}` : 'Parameters'), inner);
  roParams = paramsForm(inner, t?.commands?.[sel.value] || {}, 'rop');
}

async function startRollout(e) {
  e.preventDefault();
  $('ro-error').textContent = '';
  for (const id of ['ro-labels-err', 'ro-rate-err', 'ro-ratio-err']) $(id).textContent = '';
  const type = $('ro-type').value, name = $('ro-name').value;
  const labels = {};
  for (const term of $('ro-labels').value.trim().split(/\s+/).filter(Boolean)) {
    const i = term.indexOf('=');
    if (i < 1) { $('ro-labels-err').textContent = `"${term}" is not label=value`; return; }
    labels[term.slice(0, i)] = term.slice(i + 1);
  }
  const rateRaw = $('ro-rate').value.trim(), ratioRaw = $('ro-ratio').value.trim();
  const rate = Number(rateRaw), ratio = Number(ratioRaw);
  if (!/^[0-9]+$/.test(rateRaw) || rate < 1 || rate > 1000000) { $('ro-rate-err').textContent = 'rollout.max_per_minute must be an integer from 1 to 1000000'; return; }
  if (ratioRaw === '' || !Number.isFinite(ratio) || ratio < 0 || ratio > 1) { $('ro-ratio-err').textContent = 'rollout.abort_failure_ratio must be a number from 0 to 1'; return; }
  const { params, errors } = roParams.read();
  if (errors.length) { $('ro-error').textContent = `${errors[0].path} ${errors[0].message}`; return; }
  const body = { target: { device_type: type }, name, params, rollout: { max_per_minute: rate, abort_failure_ratio: ratio, online_only: $('ro-online').checked } };
  if (Object.keys(labels).length) body.target.labels = labels;
  const sel = Object.entries(labels).map(([k, v]) => `${k}=${v}`).join(' ') || 'all labels';
  if (DESTRUCTIVE.has(name) && !confirm(`Start a rollout of ${name} to every ${type} device (${sel}) at ${rate}/min?`)) return;
  $('ro-start').disabled = true;
  try {
    const r = await api('/v1/commands', 'POST', body);
    $('ro-list').prepend(el('li', {}, el('time', {}, timeOf(Date.now())), ' ',
      el('button', { type: 'button', class: 'linkish', 'data-rollout': str(r.id) }, str(r.id)), ` ${name} → ${type} (${sel}), ${r.total} device(s)`));
    showRollout(r);
  } catch (err) {
    $('ro-error').textContent = err.apiMessage || err.message;
  } finally {
    $('ro-start').disabled = false;
  }
}

function scheduleRollout(ms) {
  clearTimeout(state.rolloutTimer);
  state.rolloutTimer = setTimeout(refreshRollout, ms);
}

async function refreshRollout() {
  const id = state.rollout;
  if (!id) return;
  try {
    const r = await api(`/v1/commands/${encodeURIComponent(id)}`);
    if (state.rollout === id) renderRollout(r);
  } catch (e) {
    $('ro-ctl-error').textContent = e.apiMessage || e.message;
    scheduleRollout(3000);
  }
}

function showRollout(r) {
  state.rollout = r.id;
  $('ro-view').hidden = false;
  $('ro-ctl-error').textContent = '';
  renderRollout(r);
}

// released / succeeded / failed / pending from GET /v1/commands/r_…; polled
// once a second while the rollout runs (and sooner on its commands' events).
function renderRollout(r) {
  const c = r.counts || {}, total = Number(r.total) || 0;
  const ok = c.succeeded || 0, failed = [...FAILED].reduce((n, s) => n + (c[s] || 0), 0), canceled = c.canceled || 0;
  const released = Number(r.released) || 0, pending = Math.max(0, total - ok - failed - canceled);
  const pct = (n) => (total ? (100 * n) / total : 0);
  $('ro-view-title').textContent = `${str(r.name)} → ${str(r.device_type)} ${r.id}`;
  $('ro-summary').replaceChildren(el('span', { class: `status st-${/^[a-z_]+$/.test(r.status) ? r.status : ''}`, 'data-status': str(r.status) }, str(r.status)),
    ` · released ${released}/${total} · ${fmtNum(Number(r.max_per_minute))}/min · abort above ${fmtNum(Number(r.abort_failure_ratio))} failed`);
  $('ro-bar-ok').style.width = `${pct(ok)}%`;
  $('ro-bar-fail').style.width = `${pct(failed + canceled)}%`;
  $('ro-bar-run').style.width = `${pct(Math.max(0, released - ok - failed - canceled))}%`;
  $('ro-bar').setAttribute('aria-valuenow', String(Math.round(pct(ok + failed + canceled))));
  const dd = (k, v) => [el('dt', {}, k), el('dd', { 'data-count': k }, String(v))];
  $('ro-counts').replaceChildren(...dd('released', released), ...dd('succeeded', ok), ...dd('failed', failed),
    ...dd('canceled', canceled), ...dd('pending', pending),
    ...Object.entries(c).filter(([s]) => !['succeeded', 'canceled', ...FAILED].includes(s)).flatMap(([s, n]) => dd(s, n)));
  const running = r.status === 'running' || r.status === 'paused';
  $('ro-pause').hidden = !state.rolloutCtl || r.status !== 'running';
  $('ro-resume').hidden = !state.rolloutCtl || r.status !== 'paused';
  $('ro-cancel').hidden = !state.rolloutCtl || !running;
  if (running || r.status === 'canceling') scheduleRollout(1000);
}

async function rolloutControl(verb) {
  const id = state.rollout;
  $('ro-ctl-error').textContent = '';
  if (verb === 'cancel' && !confirm(`Cancel rollout ${id}? Commands not yet released are canceled.`)) return;
  try {
    renderRollout(await api(`/v1/commands/${encodeURIComponent(id)}/${verb}`, 'POST'));
  } catch (e) {
    // a hub without the rollout controls: hide them
    if (e.status === 405 || (e.status === 404 && /no such route/.test(e.apiMessage || ''))) {
      state.rolloutCtl = false;
      for (const b of ['ro-pause', 'ro-resume', 'ro-cancel']) $(b).hidden = true;
    }
    $('ro-ctl-error').textContent = e.apiMessage || e.message;
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
$('filter').addEventListener('input', filterChanged);
$('online-only').addEventListener('change', markList);
$('dev-scroll').addEventListener('scroll', scheduleRender, { passive: true });
window.addEventListener('resize', () => { state.rowsDirty = true; scheduleRender(); });
$('devices').addEventListener('change', (e) => {
  const id = e.target.getAttribute?.('data-id');
  if (id != null) toggle(id, e.target.checked);
});
$('devices').addEventListener('click', (e) => {
  const id = e.target.closest?.('[data-open]')?.getAttribute('data-open');
  if (id != null) openDevice(id);
});
$('span').addEventListener('change', (e) => { state.spanMs = Number(e.target.value); tick(); });
$('history').addEventListener('click', loadHistory);
$('clear-sel').addEventListener('click', () => {
  state.selected.clear();
  selectionChanged();
});
$('agg-form').addEventListener('submit', (e) => {
  e.preventDefault();
  state.aggs.clear();
  state.aggOrder = [];
  renderAggs();
  subscribe('agg');
});
$('dev-close').addEventListener('click', closeDevice);
$('dev-field').addEventListener('change', (e) => { state.page.field = e.target.value; state.page.zoomed = false; state.page.dirty = true; tick(); });
$('dev-range').addEventListener('change', () => { state.page.zoomed = false; state.page.dirty = true; loadPageHistory(); });
$('dev-zoom-reset').addEventListener('click', () => { if (state.page) { state.page.zoomed = false; state.page.dirty = true; tick(); } });
$('cmd-name').addEventListener('change', buildCmdParams);
$('cmd-form').addEventListener('submit', sendCommand);
$('dev-cmds').addEventListener('click', (e) => {
  const id = e.target.closest?.('[data-cmd]')?.getAttribute('data-cmd');
  if (id) showTimeline(id);
});
$('tl-cancel').addEventListener('click', cancelCommand);
$('ro-type').addEventListener('change', fillRolloutCommands);
$('ro-name').addEventListener('change', fillRolloutCommands);
$('ro-form').addEventListener('submit', startRollout);
$('ro-list').addEventListener('click', (e) => {
  const id = e.target.closest?.('[data-rollout]')?.getAttribute('data-rollout');
  if (id) { state.rollout = id; $('ro-view').hidden = false; refreshRollout(); }
});
for (const verb of ['pause', 'resume', 'cancel']) $(`ro-${verb}`).addEventListener('click', () => rolloutControl(verb));
document.addEventListener('visibilitychange', tick);
setInterval(tick, 500);
setInterval(() => {
  markRows();                                   // last-seen times
  if (state.page) renderFacts();
  renderCommandStates();
  if (state.aggs.size) state.aggsDirty = true;  // stale markers follow presence
}, 1000);

const saved = sessionStorage.getItem(KEY_STORE);
if (saved) start(saved); else showLogin();
