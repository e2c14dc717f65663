#!/usr/bin/env node
// Builds the native addon and the TypeScript output when they are missing or older than
// their sources, so `npm start` and `npm test` work on a fresh clone without a separate step.
'use strict';
const fs = require('fs');
const path = require('path');
const { execSync } = require('child_process');

const root = path.join(__dirname, '..');
function newest(dir, exts) {
  let t = 0;
  for (const e of fs.readdirSync(path.join(root, dir), { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) t = Math.max(t, newest(p, exts));
    else if (exts.some((x) => e.name.endsWith(x))) t = Math.max(t, fs.statSync(path.join(root, p)).mtimeMs);
  }
  return t;
}
function mtime(p) {
  try {
    return fs.statSync(path.join(root, p)).mtimeMs;
  } catch {
    return 0;
  }
}
const run = (cmd) => execSync(cmd, { cwd: root, stdio: 'inherit' });
if (mtime('build/Release/rnull_native.node') < Math.max(newest('native', ['.cc', '.h']), mtime('binding.gyp'))) run('npm run build:native');
// The TypeScript folders: tsconfig.json's "include" (each "<folder>/**/*.ts").
const tsDirs = require(path.join(root, 'tsconfig.json')).include.map((g) => g.split('/')[0]);
const newestTs = Math.max(...tsDirs.map((d) => newest(d, ['.ts'])));
if (mtime('dist/daemon/main.js') < Math.max(newestTs, mtime('tsconfig.json'))) run('npm run build:ts');
