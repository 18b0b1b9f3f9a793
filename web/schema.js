// The hub's schema subset (docs/device-types.md) in the browser: validate()
// gives the same paths, codes and messages as protocols/schema.c, so a field
// is refused in the form with the text the API would answer ("params.delay_s
// must be <= 3600"); paramsForm() builds inputs from a command's params schema.
// Device-provided strings only ever reach the page as text or attributes.

const KIND_MSG = {
  object: 'must be an object', number: 'must be a number', integer: 'must be an integer',
  string: 'must be a string', boolean: 'must be a boolean', array: 'must be an array',
};

function kindOk(type, v) {
  switch (type) {
    case 'object': return v !== null && typeof v === 'object' && !Array.isArray(v);
    case 'array': return Array.isArray(v);
    case 'string': return typeof v === 'string';
    case 'boolean': return typeof v === 'boolean';
    case 'number': return typeof v === 'number' && Number.isFinite(v);
    case 'integer': return typeof v === 'number' && Number.isInteger(v);
    default: return true;
  }
}

const codePoints = (s) => [...s].length;

function jsonEqual(a, b) {
  if (a === b) return true;
  if (typeof a !== typeof b || a === null || b === null || typeof a !== 'object') return false;
  if (Array.isArray(a) !== Array.isArray(b)) return false;
  const ka = Object.keys(a), kb = Object.keys(b);
  return ka.length === kb.length && ka.every((k) => k in b && jsonEqual(a[k], b[k]));
}

// A POSIX ERE as a JS RegExp when the two read it alike (else null: the hub decides).
function regexOf(p) {
  if (/\\[dwsDWSbB]|\(\?|\\[1-9]/.test(p)) return null;
  try { return new RegExp(p.replace(/\[\[:(alnum|alpha|digit|space|upper|lower|xdigit):\]\]/g, (m, c) => ({
    alnum: '[A-Za-z0-9]', alpha: '[A-Za-z]', digit: '[0-9]', space: '\\s', upper: '[A-Z]', lower: '[a-z]', xdigit: '[0-9A-Fa-f]',
  })[c]), 'u'); } catch { return null; }
}

// Every error of value against schema: [{path, code, message}] (the hub's
// create answers the first one; the form shows each beside its field).
export function validate(schema, value, path = 'params', out = []) {
  if (!schema || typeof schema !== 'object' || out.length >= 64) return out;
  const err = (code, message, at = path) => out.push({ path: at, code, message });
  if (schema.type && !kindOk(schema.type, value)) {
    err('type', KIND_MSG[schema.type] || 'has the wrong type');
    return out;
  }
  if (Array.isArray(schema.enum) && !schema.enum.some((e) => jsonEqual(e, value))) {
    err('enum', 'must be one of the allowed values');
  }
  if (typeof value === 'number') {
    if (typeof schema.minimum === 'number' && value < schema.minimum) err('minimum', `must be >= ${schema.minimum}`);
    if (typeof schema.maximum === 'number' && value > schema.maximum) err('maximum', `must be <= ${schema.maximum}`);
  } else if (typeof value === 'string') {
    const n = codePoints(value);
    if (Number.isInteger(schema.minLength) && n < schema.minLength) err('minLength', `must be at least ${schema.minLength} characters`);
    if (Number.isInteger(schema.maxLength) && n > schema.maxLength) err('maxLength', `must be at most ${schema.maxLength} characters`);
    else if (typeof schema.pattern === 'string') {
      const re = regexOf(schema.pattern);
      if (re && !re.test(value)) err('pattern', `must match pattern ${schema.pattern}`.slice(0, 127));
    }
  } else if (Array.isArray(value)) {
    if (Number.isInteger(schema.maxItems) && value.length > schema.maxItems) err('maxItems', `must have at most ${schema.maxItems} items`);
    if (schema.items) value.forEach((x, i) => validate(schema.items, x, `${path}[${i}]`, out));
  } else if (value && typeof value === 'object') {
    const props = schema.properties || {};
    for (const [k, v] of Object.entries(value)) {
      if (props[k]) validate(props[k], v, `${path}.${k}`, out);
      else if (schema.additionalProperties === false) err('additionalProperties', 'is not allowed', `${path}.${k}`);
    }
    for (const k of schema.required || []) if (!(k in value)) err('required', 'is required', `${path}.${k}`);
  }
  return out;
}

// The API's text for an error: "<path> <message>".
export const apiMessage = (e) => `${e.path} ${e.message}`;

// Unit of a telemetry field: the schema's "unit" (or "x-unit"), else read from
// the name's suffix (voltage_v, power_w, battery_pct …); "" when unknown.
const SUFFIX_UNITS = { v: 'V', a: 'A', w: 'W', wh: 'Wh', kwh: 'kWh', hz: 'Hz', pct: '%', dbm: 'dBm', s: 's', ms: 'ms', c: '°C' };
const NAME_UNITS = { temperature: '°C', humidity: '%' };
export function unitOf(fieldSchema, name) {
  if (fieldSchema && typeof fieldSchema.unit === 'string') return fieldSchema.unit;
  if (fieldSchema && typeof fieldSchema['x-unit'] === 'string') return fieldSchema['x-unit'];
  const m = /_([a-z]+)$/.exec(name);
  if (m && SUFFIX_UNITS[m[1]]) return SUFFIX_UNITS[m[1]];
  return NAME_UNITS[name] || '';
}

// ---- params form -------------------------------------------------------------

function h(tag, attrs = {}, ...kids) {
  const n = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === 'class') n.className = v;
    else n.setAttribute(k, v === true ? '' : String(v));
  }
  n.append(...kids.filter((k) => k != null).map((k) => (typeof k === 'object' ? k : String(k))));
  return n;
}

function describe(s) {
  const bits = [];
  if (s.type) bits.push(s.type);
  if (typeof s.minimum === 'number' || typeof s.maximum === 'number') bits.push(`${s.minimum ?? '−∞'} … ${s.maximum ?? '∞'}`);
  if (Number.isInteger(s.minLength) || Number.isInteger(s.maxLength)) bits.push(`${s.minLength ?? 0}–${s.maxLength ?? '∞'} chars`);
  if (typeof s.pattern === 'string') bits.push(`pattern ${s.pattern}`);
  return bits.join(', ');
}

// Builds the inputs for a params schema into container; returns
// {read(): {params, errors}} where errors are [{path, message, input}].
export function paramsForm(container, schema, idPrefix) {
  const fields = [];
  const props = (schema && schema.properties) || {};
  const required = new Set((schema && schema.required) || []);
  container.replaceChildren();
  Object.entries(props).forEach(([name, s], i) => {
    const id = `${idPrefix}-${i}`, path = `params.${name}`;
    const hint = describe(s), req = required.has(name);
    let input;
    if (Array.isArray(s.enum)) {
      input = h('select', { id, name });
      if (!req) input.append(h('option', { value: '' }, '(not set)'));
      s.enum.forEach((v, j) => input.append(h('option', { value: String(j) }, JSON.stringify(v))));
      if ('default' in s) { const j = s.enum.findIndex((v) => jsonEqual(v, s.default)); if (j >= 0) input.value = String(j); }
    } else if (s.type === 'boolean') {
      input = h('select', { id, name });
      if (!req) input.append(h('option', { value: '' }, '(not set)'));
      input.append(h('option', { value: 'true' }, 'true'), h('option', { value: 'false' }, 'false'));
      if (typeof s.default === 'boolean') input.value = String(s.default);
    } else if (s.type === 'number' || s.type === 'integer') {
      input = h('input', { id, name, type: 'text', inputmode: s.type === 'integer' ? 'numeric' : 'decimal', placeholder: s.default != null ? String(s.default) : '', spellcheck: 'false', autocomplete: 'off' });
      if (s.default != null) input.value = String(s.default);
    } else if (s.type === 'string') {
      input = h('input', { id, name, type: 'text', spellcheck: 'false', autocomplete: 'off', placeholder: s.default != null ? String(s.default) : '' });
      if (typeof s.default === 'string') input.value = s.default;
    } else {
      input = h('input', { id, name, type: 'text', spellcheck: 'false', autocomplete: 'off', placeholder: 'JSON' });
      if (s.default !== undefined) input.value = JSON.stringify(s.default);
    }
    const msg = h('span', { class: 'field-error', id: `${id}-err`, 'aria-live': 'polite' });
    input.setAttribute('aria-describedby', `${id}-err`);
    if (req) input.setAttribute('aria-required', 'true');
    container.append(h('div', { class: 'field' },
      h('label', { for: id }, name, req ? h('span', { class: 'req', title: 'required' }, ' *') : null),
      input, h('span', { class: 'hint' }, hint), msg));
    fields.push({ name, s, input, msg, path, req });
  });
  if (!fields.length) container.append(h('p', { class: 'hint' }, 'This command takes no parameters.'));

  return {
    read() {
      const params = {}, errors = [];
      for (const f of fields) {
        const raw = f.input.value.trim();
        f.msg.textContent = '';
        f.input.removeAttribute('aria-invalid');
        if (raw === '') continue;
        let v;
        if (Array.isArray(f.s.enum)) v = f.s.enum[Number(raw)];
        else if (f.s.type === 'boolean') v = raw === 'true';
        else if (f.s.type === 'integer') v = Number(raw);
        else if (f.s.type === 'number') v = Number.isFinite(Number(raw)) ? Number(raw) : raw;
        else if (f.s.type === 'string') v = f.input.value;
        else { try { v = JSON.parse(raw); } catch { errors.push({ path: f.path, message: 'is not JSON', input: f.input }); continue; } }
        if (f.s.type === 'integer' && typeof v === 'number' && !/^-?(0|[1-9][0-9]*)$/.test(raw)) {
          errors.push({ path: f.path, message: KIND_MSG.integer, input: f.input });
          continue;
        }
        params[f.name] = v;
      }
      for (const e of validate(schema || {}, params)) {
        const f = fields.find((x) => e.path === x.path || e.path.startsWith(`${x.path}[`) || e.path.startsWith(`${x.path}.`));
        errors.push({ path: e.path, message: e.message, input: f?.input });
      }
      for (const e of errors) {
        const f = fields.find((x) => x.input === e.input);
        if (f) { f.msg.textContent = `${e.path} ${e.message}`; f.input.setAttribute('aria-invalid', 'true'); }
      }
      return { params, errors };
    },
  };
}
