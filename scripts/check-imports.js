#!/usr/bin/env node
// Fails when an import runs upward through the layers, or when files of different folders
// import each other in a circle (files of one folder may name each other's types: a Request
// knows its HwQueue and the HwQueue its Requests, as in blk-mq). The layers, top to bottom (a folder may import its own files and any folder below it):
//
//   daemon -> config -> vhost -> virtqueue -> drivers -> block -> native
//
// Every relative `import ... from '...'`, `export ... from '...'` and `require('...')` of the
// TypeScript under those folders counts, `import type` too (a type is a dependency as well).
//
//   node scripts/check-imports.js [ROOT]     exit 0: clean; 1: each violation on stderr
'use strict';
const fs = require('fs');
const path = require('path');

const LAYERS = ['daemon', 'config', 'vhost', 'virtqueue', 'drivers', 'block', 'native'];
const IMPORT = /(?:\bfrom\s+|\brequire\(\s*|\bimport\s*\(\s*|^\s*import\s+)['"](\.{1,2}\/[^'"]*)['"]/gm;

function tsFiles(root, dir) {
  const out = [];
  const abs = path.join(root, dir);
  if (!fs.existsSync(abs)) return out;
  for (const e of fs.readdirSync(abs, { withFileTypes: true })) {
    const rel = path.join(dir, e.name);
    if (e.isDirectory()) out.push(...tsFiles(root, rel));
    else if (e.name.endsWith('.ts') && !e.name.endsWith('.d.ts')) out.push(rel);
  }
  return out;
}

/** The file a relative specifier names (`x` -> x.ts or x/index.ts), or null outside the tree. */
function resolve(root, from, spec) {
  const base = path.normalize(path.join(path.dirname(from), spec));
  for (const cand of [base + '.ts', path.join(base, 'index.ts'), base]) {
    if (cand.endsWith('.ts') && fs.existsSync(path.join(root, cand))) return cand;
  }
  return null;
}

function check(root) {
  const problems = [];
  const edges = new Map();
  for (const layer of LAYERS) {
    for (const file of tsFiles(root, layer)) {
      const text = fs.readFileSync(path.join(root, file), 'utf8');
      const targets = [];
      for (const m of text.matchAll(IMPORT)) {
        const target = resolve(root, file, m[1]);
        if (target === null) {
          problems.push(`${file}: '${m[1]}' names no TypeScript file of the tree`);
          continue;
        }
        targets.push(target);
        const to = target.split(path.sep)[0];
        const rank = LAYERS.indexOf(to);
        if (rank < 0) problems.push(`${file}: imports ${target}, outside the layers (${LAYERS.join(', ')})`);
        else if (rank < LAYERS.indexOf(layer)) problems.push(`${file}: imports ${target} upward (${layer} -> ${to}; order: ${LAYERS.join(' -> ')})`);
      }
      edges.set(file, targets);
    }
  }
  // Circles through more than one folder: depth-first search, each back edge's cycle once.
  const state = new Map();
  const stack = [];
  const seen = new Set();
  const visit = (f) => {
    state.set(f, 1);
    stack.push(f);
    for (const t of edges.get(f) || []) {
      if (state.get(t) === 1) {
        const cycle = stack.slice(stack.indexOf(t)).concat(t);
        const key = [...cycle.slice(0, -1)].sort().join('|');
        const folders = new Set(cycle.map((c) => path.dirname(c)));
        if (folders.size > 1 && !seen.has(key)) {
          seen.add(key);
          problems.push(`import circle: ${cycle.join(' -> ')}`);
        }
      } else if (!state.has(t)) visit(t);
    }
    stack.pop();
    state.set(f, 2);
  };
  for (const f of edges.keys()) if (!state.has(f)) visit(f);
  return { files: edges.size, problems };
}

if (require.main === module) {
  const root = path.resolve(process.argv[2] || path.join(__dirname, '..'));
  const { files, problems } = check(root);
  if (problems.length > 0) {
    for (const p of problems) process.stderr.write(`check-imports: ${p}\n`);
    process.exit(1);
  }
  process.stdout.write(`check-imports: ${files} files, every import runs ${LAYERS.join(' -> ')}, no circle across folders\n`);
}

module.exports = { check, LAYERS };
