// The browser console (web/, built into <build>/web by web/build.sh) driven
// in headless Chromium by playwright-core, against a real redis-server, the
// real hub (--web-root <build>/web) and gw-sim, all on free loopback ports:
//   1. log in with a read-write key; live data arrives (devices, overview, a chart);
//   2. the device page: last reading, history chart with units; the command form
//      refuses an out-of-range value with the API's message, sends config and
//      reboot (confirmed) and their timelines reach succeeded; a command the
//      simulator ignores is canceled from the timeline;
//   3. a rollout: created from the form, its progress reaches completed with
//      every command succeeded; pause/resume/cancel are hidden on a hub without
//      those routes;
//   4. 10,000 devices and 100 readings/s: the list renders in under 1 s, the
//      page stays responsive (frame times reported);
//   5. layout: no blank scroll below the content, ids on one line at 375 px;
//   6. a read-only key sees no command or rollout controls (GET /v1/whoami);
//   7. no console errors, no page errors (CSP violations included);
//   8. commands by state from GET /v1/commands/stats; anomaly marks: a
//      simulator device of a type whose temperature is marked x-anomaly, with
//      injected spikes, gets marks on its page's chart and a count in the
//      device table; the device list is read in pages (cursor paging).
// Screenshots: <build>/test-artifacts/web/*.png. ctest web.console (label web).
// Exit 77 (skipped) when chromium or the npm packages are missing.
import { createRequire } from 'node:module';
import { spawn, execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, writeFileSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import net from 'node:net';
import path from 'node:path';

const env = process.env;
const BUILD = path.resolve(env.HUB_BUILD_DIR || 'build');
const SRC = path.resolve(env.HUB_SOURCE_DIR || '.');
const HUB = env.HUB_BIN || path.join(BUILD, 'iot-hub');
const TOKEN = env.HUB_TOKEN_BIN || path.join(BUILD, 'tools', 'iot-token');
const SIM = env.HUB_SIM_BIN || path.join(BUILD, 'tools', 'gw-sim');
const WEB_ROOT = env.HUB_WEB_ROOT || path.join(BUILD, 'web');
const NPM = path.resolve(env.HUB_WEB_NPM || path.join(BUILD, 'web-npm'));
const CHROMIUM = env.CHROMIUM || '/usr/bin/chromium';
const ART = path.join(BUILD, 'test-artifacts', 'web');

function skip(why) {
  console.log(`SKIP: ${why}`);
  process.exit(77);
}
if (!existsSync(CHROMIUM)) skip(`${CHROMIUM} not found (apt-get install chromium; deploy/install-deps.sh installs it)`);
let chromium;
try {
  ({ chromium } = createRequire(path.join(NPM, 'node_modules', 'x.js'))('playwright-core'));
} catch {
  skip(`playwright-core not installed in ${NPM} (the build's web target runs npm ci: is npm there?)`);
}
if (!existsSync(path.join(WEB_ROOT, 'uplot.min.js'))) skip(`${WEB_ROOT}/uplot.min.js missing (the build's web target copies it from npm)`);

const t0 = Date.now();
const log = (...a) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1)}s]`, ...a);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const results = {};
const children = [];
const dir = mkdtempSync(path.join(tmpdir(), 'iot-hub-web-'));
mkdirSync(ART, { recursive: true });

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
  });
}

function start(name, bin, args) {
  const out = [];
  const p = spawn(bin, args, { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
  p.stdout.on('data', (d) => out.push(d));
  p.stderr.on('data', (d) => out.push(d));
  p.name = name;
  p.output = () => Buffer.concat(out).toString();
  children.push(p);
  return p;
}

async function waitFor(pred, ms, what) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await pred();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(100);
  }
}

function keyPair(name, scopes) {
  const r = spawnSyncBoth(TOKEN, ['new-key', '--name', name, '--scopes', scopes]);
  return { key: r.stdout.trim(), entry: JSON.parse(r.stderr.trim()) };
}

function spawnSyncBoth(bin, args) {
  const keyFile = path.join(dir, `k-${Math.random().toString(16).slice(2)}`);
  const stdout = execFileSync('sh', ['-c', `"$0" "$@" 2>"${keyFile}"`, bin, ...args]).toString();
  return { stdout, stderr: readFileSync(keyFile, 'utf8') };
}

// Polls fn in the page (page.waitForFunction evaluates a string, which the
// console's CSP forbids: no unsafe-eval).
const until = (page, fn, ms) => waitFor(() => page.evaluate(fn), ms, fn.toString().slice(0, 120));

const PROBE = '/v1/commands/c_00000000000000000000000000000000/cancel';
let browser;
async function main() {
  // ---- servers -------------------------------------------------------------
  const admin = keyPair('web-admin', 'telemetry:read,commands:write');
  const ro = keyPair('web-ro', 'telemetry:read');
  writeFileSync(path.join(dir, 'keys.json'), JSON.stringify([admin.entry, ro.entry]));
  writeFileSync(path.join(dir, 'jwt.secret'), `${'ab'.repeat(32)}\n`);
  // the example device types, plus `probe`: a thermostat whose temperature
  // is marked for anomaly flags (docs/anomalies.md)
  const types = path.join(dir, 'types');
  mkdirSync(types);
  for (const f of readdirSync(path.join(SRC, 'deploy', 'device-types'))) {
    writeFileSync(path.join(types, f), readFileSync(path.join(SRC, 'deploy', 'device-types', f)));
  }
  const probe = JSON.parse(readFileSync(path.join(types, 'thermostat.json'), 'utf8'));
  probe.device_type = 'probe';
  probe.telemetry.properties.temperature['x-anomaly'] = { zscore: 5, warmup: 10 };
  writeFileSync(path.join(types, 'probe.json'), JSON.stringify(probe));
  const rport = await freePort();
  const redis = start('redis', 'redis-server', ['--port', String(rport), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no']);
  await waitFor(() => /Ready to accept connections/.test(redis.output()), 10000, 'redis-server');
  const hub = start('hub', HUB, ['--listen', '127.0.0.1:0', '--redis', `redis://127.0.0.1:${rport}`,
    '--schemas', types, '--api-keys', 'keys.json', '--jwt-key', 'jwt.secret',
    '--web-root', WEB_ROOT]);
  const addr = (await waitFor(() => /listening on (\S+)/.exec(hub.output()), 15000, 'the hub'))[1];
  const base = `http://${addr}`;
  log(`hub at ${base}, redis ${rport}`);
  start('sim', SIM, ['--url', `ws://${addr}/v1/gateway`, '--jwt-secret', 'jwt.secret', '--gateways', '2', '--devices', '5',
    '--rate', '50', '--batch', '5', '--labels', 'site=b1', '--cmd-ignore', 'firmware_update', '--cmd-delay-ms', '150']);

  // ---- browser ---------------------------------------------------------------
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox', '--disable-dev-shm-usage'], headless: true });
  const problems = [];
  async function newPage(viewport = { width: 1400, height: 1000 }) {
    const ctx = await browser.newContext({ viewport });
    const page = await ctx.newPage();
    page.on('console', (m) => {
      if (m.type() !== 'error') return;
      // the console's role probe: a cancel of a command id that cannot exist
      // answers 403 (no commands:write) or 404 (the scope, no such command);
      // Chromium logs every 4xx fetch as an error
      if (m.location()?.url?.endsWith(PROBE) && /status of 40[34]/.test(m.text())) return;
      problems.push(`console: ${m.text()} (${m.location()?.url})`);
    });
    page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
    page.on('dialog', (d) => d.accept());
    return page;
  }
  const shot = async (page, name) => { const f = path.join(ART, `${name}.png`); await page.screenshot({ path: f, fullPage: false }); return f; };

  const page = await newPage();
  await page.goto(base);
  await page.fill('#key', admin.key);
  await page.click('#login-form button[type=submit]');
  await page.waitForSelector('#role:has-text("read-write")', { timeout: 10000 });
  await until(page, () => Number(document.getElementById('ov-online').textContent) >= 10, 15000);
  await page.waitForSelector('#devices tbody button[data-open="gw-0000-d0"]');
  log('logged in: 10 devices online, role read-write');

  // live data: chart one device
  await page.check('#devices input[data-id="gw-0000-d0"]');
  await page.waitForSelector('.chart .uplot', { timeout: 10000 });
  await until(page, () => /gw-0000-d0: -?\d/.test(document.querySelector('.chart figcaption')?.textContent || ''), 10000);
  const chartTitle = await page.textContent('.chart h3');
  if (!/\(°C\)|\(%\)/.test(chartTitle)) throw new Error(`chart title without unit: ${chartTitle}`);
  await until(page, () => Number(document.getElementById('ov-ingest').textContent) > 0, 15000);
  log(`live readings charted (${chartTitle}); ingest rate shown`);

  // ---- device page and commands ------------------------------------------------
  await page.click('#devices button[data-open="gw-0000-d1"]');
  await page.waitForSelector('#dev-last th:has-text("temperature")', { timeout: 10000 });
  await page.waitForSelector('#dev-chart .uplot', { timeout: 10000 });
  await page.selectOption('#cmd-name', 'config');
  await page.fill('#cmd-params input[name="setpoint"]', '99');
  await page.click('#cmd-send');
  await page.waitForSelector('#cmd-error:has-text("params.setpoint must be <= 35")');
  const fieldErr = await page.textContent('#cmd-params .field-error:not(:empty)');
  if (!fieldErr.includes('params.setpoint must be <= 35')) throw new Error(`field error: ${fieldErr}`);
  await page.fill('#cmd-params input[name="setpoint"]', '21.5');
  const tSend = Date.now();
  await page.click('#cmd-send');
  await page.waitForSelector('#tl-summary [data-status="succeeded"]', { timeout: 15000 });
  results.command_to_succeeded_ms = Date.now() - tSend;
  const tl = await page.$$eval('#tl-list li .status', (l) => l.map((x) => x.textContent));
  for (const s of ['queued', 'sent', 'received', 'succeeded']) if (!tl.includes(s)) throw new Error(`timeline lacks ${s}: ${tl}`);
  await shot(page, '1-command-succeeded');
  log(`config command: timeline ${tl.join(' → ')} in ${results.command_to_succeeded_ms} ms`);

  // destructive: reboot asks for confirmation (accepted by the dialog handler)
  let asked = 0;
  page.once('dialog', () => { asked++; });
  await page.selectOption('#cmd-name', 'reboot');
  await page.fill('#cmd-params input[name="delay_s"]', '1');
  await page.click('#cmd-send');
  await until(page, () => document.getElementById('tl-title').textContent.startsWith('reboot'), 10000);
  await page.waitForSelector('#tl-summary [data-status="succeeded"]', { timeout: 15000 });
  if (!asked) throw new Error('reboot did not ask for confirmation');
  log('reboot: confirmed, succeeded');

  // cancel from the timeline: the simulator ignores firmware_update
  await page.selectOption('#cmd-name', 'firmware_update');
  await page.fill('#cmd-params input[name="url"]', 'https://fw.example/t.bin');
  await page.fill('#cmd-params input[name="version"]', '2.0.0');
  await page.fill('#cmd-params input[name="sha256"]', 'a'.repeat(64));
  await page.click('#cmd-send');
  await page.waitForSelector('#tl-summary [data-status="sent"]', { timeout: 10000 });
  await page.click('#tl-cancel');
  await page.waitForSelector('#tl-summary [data-status="canceled"]', { timeout: 10000 });
  await page.waitForSelector('#tl-cancel', { state: 'hidden' });
  log('firmware_update: canceled from the timeline');

  // commands by state in the last hour, from the hub (GET /v1/commands/stats)
  await until(page, () => document.getElementById('ov-cmd-src').textContent.includes('from the hub'), 5000);
  await until(page, () => Number(document.querySelector('#ov-cmd-states [data-state="succeeded"]')?.dataset.count) >= 2
    && Number(document.querySelector('#ov-cmd-states [data-state="canceled"]')?.dataset.count) >= 1, 15000);
  const statesShown = await page.$$eval('#ov-cmd-states [data-state]', (l) => l.map((e) => e.textContent));
  log(`commands by state (hub): ${statesShown.join(', ')}`);

  // a refusal shows the API's own message: an Idempotency-Key reused with the
  // same body returns the first command; a bad key is refused client-side
  await page.click('#cmd-form .timing summary');
  await page.fill('#cmd-ttl', '0');
  await page.click('#cmd-send');
  await page.waitForSelector('#cmd-ttl-err:has-text("ttl_s must be an integer from 1 to 2592000")');
  await page.fill('#cmd-ttl', '');
  await page.fill('#cmd-idem', 'has space');
  await page.click('#cmd-send');
  await page.waitForSelector('#cmd-idem-err:has-text("Idempotency-Key must be printable ASCII without spaces")');
  await page.fill('#cmd-idem', '');

  // ---- rollout ----------------------------------------------------------------
  await page.selectOption('#ro-type', 'thermostat');
  await page.selectOption('#ro-name', 'config');
  await page.fill('#ro-labels', 'site=b1');
  await page.fill('#ro-rate', '600');
  await page.fill('#ro-ratio', '0.5');
  await page.fill('#ro-params input[name="setpoint"]', '22');
  const tRo = Date.now();
  await page.click('#ro-start');
  await page.waitForSelector('#ro-summary [data-status]', { timeout: 10000 });
  await shot(page, '2-rollout-running');
  await page.waitForSelector('#ro-summary [data-status="completed"]', { timeout: 30000 });
  results.rollout_10_devices_ms = Date.now() - tRo;
  const done = await page.$eval('#ro-counts', (e) => Object.fromEntries([...e.querySelectorAll('dd')].map((d) => [d.dataset.count, Number(d.textContent)])));
  if (done.succeeded !== 10 || done.released !== 10 || done.pending !== 0) throw new Error(`rollout counts ${JSON.stringify(done)}`);
  const ctlVisible = await page.$$eval('#ro-pause, #ro-resume, #ro-cancel', (l) => l.filter((b) => !b.hidden).length);
  const hasCtl = await page.evaluate(async () => Object.keys((await (await fetch('/v1/openapi.json')).json()).paths).some((p) => p.endsWith('/pause')));
  if (!hasCtl && ctlVisible) throw new Error('rollout controls shown on a hub without them');
  await page.locator('#rollouts').scrollIntoViewIfNeeded();
  await shot(page, '3-rollout-completed');
  log(`rollout of 10: completed in ${results.rollout_10_devices_ms} ms; counts ${JSON.stringify(done)}; controls ${hasCtl ? 'offered' : 'hidden (hub has no pause/resume/cancel)'}`);
  if (hasCtl) {
    // a slow rollout, online devices only: paused, resumed, then canceled from the console
    await page.fill('#ro-rate', '1');
    await page.check('#ro-online');
    await page.click('#ro-start');
    await page.waitForSelector('#ro-summary [data-status="running"]', { timeout: 10000 });
    const rid = await page.$eval('#ro-view-title', (e) => e.textContent.split(' ').pop());
    await page.click('#ro-pause');
    await page.waitForSelector('#ro-summary [data-status="paused"]', { timeout: 10000 });
    await page.click('#ro-resume');
    await page.waitForSelector('#ro-summary [data-status="running"]', { timeout: 10000 });
    await page.click('#ro-cancel');   // confirmed by the dialog handler
    await page.waitForSelector('#ro-summary [data-status="canceled"]', { timeout: 10000 });
    const c = await page.$eval('#ro-counts', (e) => Object.fromEntries([...e.querySelectorAll('dd')].map((d) => [d.dataset.count, Number(d.textContent)])));
    if (c.canceled < 1 || c.canceled + (c.released || 0) < 10) throw new Error(`canceled rollout counts ${JSON.stringify(c)}`);
    if (!(await page.$$eval('#ro-pause, #ro-resume, #ro-cancel', (l) => l.every((b) => b.hidden)))) throw new Error('controls shown on a canceled rollout');
    await shot(page, '3b-rollout-canceled');
    log(`rollout ${rid}: paused, resumed and canceled from the console; counts ${JSON.stringify(c)}`);
  }

  // ---- anomaly marks ---------------------------------------------------------------
  // one probe device, 20 readings/s, spikes of 20 sigmas, 1 in 20 readings,
  // none in the first 20 (the model's warm-up is 10: a spike learnt there
  // widens the model so far that later spikes score near 5 and are often
  // missed, which once left no mark for 15 s) (ts from a minute ago, 20 ms
  // apart: on the live chart)
  const anSim = start('sim-anomaly', SIM, ['--url', `ws://${addr}/v1/gateway`, '--jwt-secret', 'jwt.secret', '--gateway-prefix', 'an',
    '--gateways', '1', '--devices', '1', '--device-type', 'probe', '--rate', '20', '--truth', path.join(dir, 'truth.tsv'),
    '--spikes', '0.05', '--spike-sigma', '20', '--clean-first', '20', '--truth-ago-ms', '60000', '--ts-step-ms', '20', '--labels', 'site=an']);
  await page.waitForSelector('#devices button[data-open="an-0000-d0"]', { timeout: 10000 });
  await page.click('#devices button[data-open="an-0000-d0"]');
  await page.waitForSelector('#dev-chart .uplot', { timeout: 10000 });
  await until(page, () => window.iotConsole.pageMarks() >= 3, 15000);   // ~1 spike/s, each flagged
  await page.waitForSelector('#dev-anoms:not([hidden])', { timeout: 5000 });
  await page.waitForSelector('#devices [data-anom="an-0000-d0"]:not([hidden])', { timeout: 5000 });
  results.anomaly_marks = await page.evaluate(() => window.iotConsole.pageMarks());
  const anomRow = await page.textContent('#devices [data-anom="an-0000-d0"]');
  const anomText = await page.textContent('#dev-anoms');
  if (!/spike of temperature/.test(anomText)) throw new Error(`anomaly summary: ${anomText}`);
  await page.locator('#device-panel').scrollIntoViewIfNeeded();
  await shot(page, '3c-anomaly-marks');
  anSim.kill('SIGTERM');
  log(`anomalies: ${results.anomaly_marks} marks on the chart; row ${anomRow}; ${anomText}`);

  // ---- 10,000 devices, 100 readings/s --------------------------------------------
  start('sim-fleet', SIM, ['--url', `ws://${addr}/v1/gateway`, '--jwt-secret', 'jwt.secret', '--gateway-prefix', 'fl',
    '--gateways', '20', '--devices', '500', '--rate', '5', '--connect-rate', '4', '--labels', 'site=b2']);
  await until(page, () => Number(document.getElementById('ov-online').textContent) >= 10010, 60000);
  // devices known from presence only get their labels once in view
  await until(page, () => [...document.querySelectorAll('#devices tbody tr:not(.spacer)')].some((r) =>
    r.querySelector('[data-open^="fl-"]') && r.textContent.includes('site=b2')), 10000);
  log('10,010 devices online in the console; rows in view completed with their labels');
  // a full re-render: filter, sort and draw the rows of 10k devices
  const render = await page.evaluate(async () => {
    const f = document.getElementById('filter');
    const times = [], own = [];
    for (const q of ['fl-', '', 'site=b2', '']) {
      performance.clearMeasures('devices-render');
      const t = performance.now();
      f.value = q;
      f.dispatchEvent(new Event('input'));
      await new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)));
      times.push(performance.now() - t);
      own.push(Math.max(0, ...performance.getEntriesByName('devices-render').map((e) => e.duration)));
    }
    const rows = document.querySelectorAll('#devices tbody tr:not(.spacer)').length;
    return { times, own, rows, info: document.getElementById('devices-info').textContent };
  });
  // render_10k_ms: filter + sort + rows of 10,010 devices (renderDevices'
  // own time); render_10k_wall_ms: input event to the next frame, including
  // whatever else the page did meanwhile (stream messages, charts)
  results.render_10k_ms = Math.max(...render.own);
  results.render_10k_wall_ms = Math.max(...render.times);
  if (results.render_10k_ms >= 1000) throw new Error(`rendering 10k rows took ${results.render_10k_ms} ms`);
  // scroll to the end: the last device is rendered at once
  const scroll = await page.evaluate(async () => {
    const box = document.getElementById('dev-scroll');
    const t = performance.now();
    box.scrollTop = box.scrollHeight;
    await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
    const ids = [...document.querySelectorAll('#devices tbody button[data-open]')].map((b) => b.dataset.open);
    return { ms: performance.now() - t, last: ids[ids.length - 1], rows: ids.length };
  });
  results.scroll_to_end_ms = scroll.ms;
  // frame times with 10k devices known, the 10 devices of the first simulator
  // charted (100 readings/s reach the page: 2 charts of 10 lines), the rows in
  // view followed live, aggregates of the whole fleet
  await page.fill('#filter', 'site=b1');
  for (let i = 0; i < 10; i++) {
    const id = `gw-000${i < 5 ? 0 : 1}-d${i % 5}`;
    if (!(await page.isChecked(`#devices input[data-id="${id}"]`))) await page.click(`#devices input[data-id="${id}"]`);
  }
  await page.fill('#filter', '');
  await sleep(1500);
  const cost0 = await page.evaluate(() => structuredClone(window.iotConsole.msgCost()));
  const frames = await page.evaluate(() => new Promise((resolve) => {
    const d = [];
    let last = performance.now();
    const end = last + 5000;
    for (const m of ['tick', 'tick-charts', 'tick-page', 'tick-aggs', 'devices-render']) performance.clearMeasures(m);
    function f(t) { d.push(t - last); last = t; if (t < end) requestAnimationFrame(f); else done(); }
    function done() {
      d.sort((a, b) => a - b);
      const ticks = performance.getEntriesByName('tick').map((e) => e.duration).sort((a, b) => a - b);
      const part = (n) => Math.max(0, ...performance.getEntriesByName(n).map((e) => e.duration));
      const renders = performance.getEntriesByName('devices-render').map((e) => e.duration);
      resolve({ n: d.length, p50: d[d.length >> 1], p95: d[Math.floor(d.length * 0.95)], max: d[d.length - 1],
        charts_max: part('tick-charts'), page_max: part('tick-page'), aggs_max: part('tick-aggs'), list_max: Math.max(0, ...renders),
        tick_p95: ticks[Math.floor(ticks.length * 0.95)] || 0, tick_max: ticks[ticks.length - 1] || 0 });
    }
    requestAnimationFrame(f);
  }));
  const cost1 = await page.evaluate(() => window.iotConsole.msgCost());
  frames.stream = Object.fromEntries(Object.entries(cost1).map(([k, [n, ms]]) =>
    [k, { per_s: +((n - (cost0[k]?.[0] || 0)) / 5).toFixed(1), ms_per_s: +((ms - (cost0[k]?.[1] || 0)) / 5).toFixed(2) }]));
  results.frames_10k = frames;
  results.dom_rows = render.rows;
  await shot(page, '4-fleet-10k');
  log(JSON.stringify(frames));
  log(`10k devices: render ${render.own.map((t) => t.toFixed(1)).join('/')} ms (wall ${render.times.map((t) => t.toFixed(1)).join('/')}) (${render.rows} rows in the DOM), scroll to end ${scroll.ms.toFixed(1)} ms (last ${scroll.last}), frames p50 ${frames.p50.toFixed(1)} p95 ${frames.p95.toFixed(1)} max ${frames.max.toFixed(1)} ms, tick p95 ${frames.tick_p95.toFixed(1)} ms`);
  if (scroll.last !== 'gw-0001-d4') throw new Error(`scrolled to the end but the last row is ${scroll.last}`);

  // ---- layout --------------------------------------------------------------------
  const blank = await page.evaluate(() => {
    const main = document.getElementById('app').getBoundingClientRect();
    return document.documentElement.scrollHeight - (main.bottom + window.scrollY);
  });
  results.blank_below_px = blank;
  if (blank > 40) throw new Error(`${blank} px of blank scroll below the content`);
  const narrow = await newPage({ width: 375, height: 800 });
  await narrow.goto(base);
  await narrow.fill('#key', admin.key);
  await narrow.click('#login-form button[type=submit]');
  await narrow.waitForSelector('#devices tbody button[data-open]');
  // the list is read in pages of 1000 (cursor paging): 10,011 devices, 11 pages
  await until(narrow, () => window.iotConsole.devicePages() >= 11, 15000);
  const wrapped = await narrow.$$eval('#devices tbody tr:not(.spacer)', (rows) => rows.filter((r) => r.getBoundingClientRect().height > 36).length);
  if (wrapped) throw new Error(`${wrapped} device rows wrap at 375 px`);
  const hscroll = await narrow.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  if (hscroll > 2) throw new Error(`the page scrolls sideways by ${hscroll} px at 375 px`);
  await shot(narrow, '5-narrow-375px');
  await narrow.context().close();
  log(`layout: ${blank} px below the content, no wrapped rows at 375 px`);

  // ---- read-only key ------------------------------------------------------------------
  const rop = await newPage();
  await rop.goto(base);
  await rop.fill('#key', ro.key);
  await rop.click('#login-form button[type=submit]');
  await rop.waitForSelector('#role:has-text("read-only")', { timeout: 10000 });
  const roleTitle = await rop.getAttribute('#role', 'title');
  if (!/key web-ro: scopes telemetry:read/.test(roleTitle || '')) throw new Error(`role title: ${roleTitle}`);
  await rop.fill('#filter', 'gw-0000-d1');
  await rop.click('#devices button[data-open="gw-0000-d1"]');
  await rop.waitForSelector('#dev-cmds li');
  await rop.click('#dev-cmds button[data-cmd]');
  await rop.waitForSelector('#tl-summary [data-status]');
  const visible = await rop.evaluate(() => ['cmd-form', 'rollouts', 'tl-cancel', 'ro-pause', 'ro-cancel']
    .filter((id) => { const e = document.getElementById(id); return e && e.offsetParent !== null; }));
  if (visible.length) throw new Error(`read-only key sees ${visible.join(', ')}`);
  await shot(rop, '6-read-only');
  log('read-only key: no command or rollout controls');

  if (problems.length) throw new Error(`browser errors:\n  ${problems.join('\n  ')}`);
  results.seconds = (Date.now() - t0) / 1000;
  writeFileSync(path.join(ART, 'results.json'), `${JSON.stringify(results, null, 2)}\n`);
  log(`OK ${JSON.stringify(results)}; screenshots in ${ART}`);
}

let rc = 0;
try {
  await main();
} catch (e) {
  rc = 1;
  console.error(`FAIL: ${e.stack || e}`);
  for (const c of children) console.error(`--- ${c.name} (last output):\n${c.output().slice(-2000)}`);
  try {
    const pages = browser?.contexts().flatMap((c) => c.pages()) || [];
    for (const [i, p] of pages.entries()) await p.screenshot({ path: path.join(ART, `fail-${i}.png`) });
  } catch { /* best effort */ }
} finally {
  await browser?.close().catch(() => {});
  for (const c of children.reverse()) c.kill('SIGTERM');
  await sleep(300);
  for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
  rmSync(dir, { recursive: true, force: true });
}
process.exit(rc);
