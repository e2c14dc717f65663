/**
 * test/fuzz: the libFuzzer targets (ASan + UBSan) built and run for a few seconds each, as CI's
 * short pass (`npm run fuzz` runs them for minutes). A crash, leak, timeout or sanitizer report
 * fails the test with the target's output. The fast-check properties (test/fuzz/*.fuzz.test.ts)
 * run as ordinary jest files with RNULL_FUZZ_RUNS cases (default 2000).
 */
import * as fs from 'fs';
import * as path from 'path';

// eslint-disable-next-line @typescript-eslint/no-var-requires
const { runNative } = require('../fuzz/run.js') as {
  runNative(o: { seconds: number; runs: number }): { name: string; runs: number; seconds: number }[];
};

const seconds = Number(process.env.RNULL_FUZZ_SECONDS ?? 10);

test('every libFuzzer target builds and runs with no finding', () => {
  const sources = fs
    .readdirSync(path.join(__dirname, '..', 'fuzz'))
    .filter((f) => f.endsWith('_fuzz.cc'))
    .map((f) => f.replace(/_fuzz\.cc$/, ''))
    .sort();
  expect(sources).toEqual(expect.arrayContaining(['chain_walk', 'message']));
  const results = runNative({ seconds, runs: 0 });
  expect(results.map((r) => r.name)).toEqual(sources);
  for (const r of results) {
    process.stdout.write(`fuzz ${r.name}: ${r.runs} inputs in ${r.seconds.toFixed(1)} s\n`);
    expect(r.runs).toBeGreaterThan(1000);
  }
}, 600000);
