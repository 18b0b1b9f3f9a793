// Validates docs/openapi.json (the bytes the hub serves at GET /v1/openapi.json)
// with a real OpenAPI validator, @apidevtools/swagger-parser (the OpenAPI 3.0
// JSON Schema, every $ref resolved), then checks the rules issue 15 found
// broken, which the 3.0 schema itself does not catch:
//   - `nullable` only beside a `type` (Ajv and redocly refuse it alone);
//   - info.license present;
//   - every operation lists at least one 4XX response.
// ctest web.openapi; NODE_PATH points at <build>/web-npm/node_modules.
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';
import path from 'node:path';

const require = createRequire(path.resolve(process.env.HUB_WEB_NPM || '.', 'node_modules', 'x.js'));
let SwaggerParser;
try {
  SwaggerParser = require('@apidevtools/swagger-parser');
} catch {
  console.log('SKIP: @apidevtools/swagger-parser is not installed (web/build.sh runs npm ci; is npm there?)');
  process.exit(77);
}
const file = path.join(process.env.HUB_SOURCE_DIR || '.', 'docs', 'openapi.json');
const doc = JSON.parse(readFileSync(file, 'utf8'));
const problems = [];

try {
  await SwaggerParser.validate(structuredClone(doc));
} catch (e) {
  problems.push(`swagger-parser: ${e.message}`);
}

(function walk(v, where) {
  if (Array.isArray(v)) return v.forEach((x, i) => walk(x, `${where}/${i}`));
  if (!v || typeof v !== 'object') return;
  if ('nullable' in v && !('type' in v)) problems.push(`${where}: nullable without type`);
  for (const [k, x] of Object.entries(v)) walk(x, `${where}/${k}`);
})(doc, '#');

if (!doc.info?.license?.name) problems.push('info.license.name is missing');
for (const [p, item] of Object.entries(doc.paths || {})) {
  for (const [m, op] of Object.entries(item)) {
    if (!['get', 'put', 'post', 'delete', 'patch'].includes(m)) continue;
    if (!Object.keys(op.responses || {}).some((c) => /^4(\d\d|XX)$/.test(c))) {
      problems.push(`${m.toUpperCase()} ${p}: no 4XX response`);
    }
  }
}

if (problems.length) {
  console.error(`docs/openapi.json: ${problems.length} problem(s):\n  ${problems.join('\n  ')}`);
  process.exit(1);
}
console.log(`docs/openapi.json: valid OpenAPI ${doc.openapi} (${Object.keys(doc.paths).length} paths)`);
