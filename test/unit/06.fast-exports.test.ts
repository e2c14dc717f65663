/**
 * The data path's modules (native/, block/, virtqueue/, drivers/) keep their exports objects in
 * V8's fast mode. Hot functions read constants such as SEGMENT_WORDS through them
 * (`native_1.SEGMENT_WORDS` in the compiled output); from a dictionary-mode exports object every
 * such load is a generic inline-cache call in optimized code. One getter re-export in
 * native/index.ts did that and cost a fifth of `node bench/micro/dispatch.js`'s time.
 *
 * Checked on the build (dist/, which `npm test` brings up to date first) in a child process,
 * because only there can V8's %HasFastProperties be called.
 */
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';

const root = path.join(__dirname, '..', '..');
const LAYERS = ['native', 'block', 'virtqueue', 'drivers'];

const PROBE = `
const fs = require('fs');
const path = require('path');
const [root, ...layers] = process.argv.slice(1);
const out = {};
const walk = (dir) => {
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) walk(p);
    else if (e.name.endsWith('.js')) out[path.relative(root, p)] = %HasFastProperties(require(p));
  }
};
for (const l of layers) walk(path.join(root, 'dist', l));
// A dictionary-mode object, so the probe itself is known to tell the two apart.
const slow = {};
Object.defineProperty(slow, 'x', { value: 1, writable: true, configurable: true, enumerable: true });
slow.y = 2;
delete slow.x;
out.control = %HasFastProperties(slow);
console.log(JSON.stringify(out));
`;

test('every data-path module keeps a fast-mode exports object', () => {
  expect(fs.existsSync(path.join(root, 'dist', 'native', 'index.js'))).toBe(true);
  const r = spawnSync(process.execPath, ['--allow-natives-syntax', '-e', PROBE, root, ...LAYERS], { encoding: 'utf8', timeout: 60_000 });
  expect(r.stderr).toBe('');
  expect(r.status).toBe(0);
  const fast = JSON.parse(r.stdout) as Record<string, boolean>;
  expect(fast.control).toBe(false);
  delete fast.control;
  const modules = Object.keys(fast);
  expect(modules).toContain(path.join('dist', 'native', 'index.js'));
  expect(modules).toContain(path.join('dist', 'virtqueue', 'blk-queue.js'));
  expect(modules.length).toBeGreaterThan(20);
  expect(modules.filter((m) => !fast[m])).toEqual([]);
});
