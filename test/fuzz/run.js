#!/usr/bin/env node
// Runs every fuzz target: the libFuzzer targets built from test/fuzz/*_fuzz.cc (ASan + UBSan),
// then the fast-check properties (test/fuzz/*.fuzz.test.ts, through jest).
//
//   node test/fuzz/run.js [--seconds S] [--runs N] [--prop-runs N] [--json FILE]
//
// --seconds: time per libFuzzer target (default 60); --runs: stop a target after N inputs
// instead (whichever comes first); --prop-runs: cases per fast-check property (default
// 100000). Each libFuzzer target starts from its corpus folder test/fuzz/corpus/<name>/ when
// one is there (new inputs go to a scratch copy, not into the repository). Exits non-zero on
// any crash, leak, timeout or sanitizer report, printing the target's output; prints the
// count of inputs each target ran.
'use strict';
const fs = require('fs');
const os = require('os');
const path = require('path');
const { execFileSync, spawnSync } = require('child_process');

const here = __dirname;
const root = path.join(here, '..', '..');

function parseArgs(argv) {
  const o = { seconds: 60, runs: 0, propRuns: 100000, json: '' };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const v = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    if (a === '--seconds') o.seconds = Number(v());
    else if (a === '--runs') o.runs = Number(v());
    else if (a === '--prop-runs') o.propRuns = Number(v());
    else if (a === '--json') o.json = v();
    else throw new Error(`unknown option ${a}`);
  }
  for (const k of ['seconds', 'runs', 'propRuns']) {
    if (!Number.isInteger(o[k]) || o[k] < 0) throw new Error(`--${k} must be a whole number >= 0`);
  }
  return o;
}

/** Builds and runs each libFuzzer target; returns [{ name, runs, seconds }]. Throws on a finding. */
function runNative(o) {
  execFileSync('make', ['-s', '-C', here], { stdio: 'inherit' });
  const results = [];
  const targets = fs
    .readdirSync(path.join(here, 'build'))
    .filter((f) => f.endsWith('_fuzz'))
    .sort();
  for (const bin of targets) {
    const name = bin.replace(/_fuzz$/, '');
    const scratch = fs.mkdtempSync(path.join(os.tmpdir(), `rnull-fuzz-${name}-`));
    const corpus = path.join(here, 'corpus', name);
    if (fs.existsSync(corpus)) for (const f of fs.readdirSync(corpus)) fs.copyFileSync(path.join(corpus, f), path.join(scratch, f));
    const args = [`-max_total_time=${o.seconds}`, '-timeout=10', '-rss_limit_mb=2048', '-print_final_stats=1', `-artifact_prefix=${scratch}/`];
    if (o.runs > 0) args.push(`-runs=${o.runs}`);
    args.push(scratch);
    const t0 = Date.now();
    const r = spawnSync(path.join(here, 'build', bin), args, { encoding: 'utf8', maxBuffer: 64 << 20, env: { ...process.env, UBSAN_OPTIONS: 'halt_on_error=1:print_stacktrace=1', ASAN_OPTIONS: 'detect_leaks=1' } });
    const out = `${r.stdout}${r.stderr}`;
    const m = /stat::number_of_executed_units:\s*(\d+)/.exec(out);
    const runs = m ? Number(m[1]) : 0;
    fs.rmSync(scratch, { recursive: true, force: true });
    if (r.status !== 0 || /ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error:/.test(out)) {
      process.stderr.write(out.slice(-20000));
      throw new Error(`fuzz target ${name} failed (exit ${r.status}) after ${runs} inputs`);
    }
    const seconds = (Date.now() - t0) / 1000;
    // A target may print what its inputs held at exit (chains walked, messages delivered).
    const summary = out.split('\n').find((l) => /^\w+: \d+ (chains|messages)\b/.test(l)) || '';
    process.stdout.write(`fuzz: ${name}: ${runs} inputs in ${seconds.toFixed(1)} s, no finding${summary ? ` (${summary.trim()})` : ''}\n`);
    results.push({ name, runs, seconds, summary: summary.trim() });
  }
  return results;
}

/** Runs the fast-check properties through jest with RNULL_FUZZ_RUNS cases each. */
function runProperties(o) {
  const files = fs.readdirSync(here).filter((f) => f.endsWith('.fuzz.test.ts'));
  if (files.length === 0) return;
  const r = spawnSync('npx', ['jest', '--runInBand', '--testTimeout=3600000', ...files.map((f) => path.join('test', 'fuzz', f))], {
    cwd: root,
    stdio: 'inherit',
    env: { ...process.env, RNULL_FUZZ_RUNS: String(o.propRuns) },
  });
  if (r.status !== 0) throw new Error('fast-check properties failed');
}

if (require.main === module) {
  try {
    const o = parseArgs(process.argv.slice(2));
    const results = runNative(o);
    runProperties(o);
    if (o.json !== '') fs.writeFileSync(o.json, JSON.stringify(results, null, 2));
  } catch (e) {
    process.stderr.write(`fuzz: ${e.message}\n`);
    process.exit(1);
  }
}

module.exports = { runNative };
