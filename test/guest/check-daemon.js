// What the in-guest NVMe scripts that run an rnull daemon (nvme-disk-check.js, nvme-ns-check.js,
// nvme-threads-check.js, nvme-timeout-check.js) share: the start-up wrapper (plan from argv,
// "@@VAL done 1", "<name> failed" on a throw), the project's test front-end from dist/, the daemon
// started with its log in a file and stopped with SIGTERM under a bound, `rnull ctl`, vhost-bench
// --verify runs and their figures, and reading the daemon's log back. Every wait is bounded; a
// child that outlives its bound is SIGKILLed and reported as "hung".
'use strict';
const cp = require('child_process');
const fs = require('fs');
const path = require('path');
const { val, patterned, deadline } = require('./check-util');

/** This worktree's build output: the host root is shared over 9p, so guest paths = host paths. */
const dist = path.join(__dirname, '..', '..', 'dist');
/** The daemon's entry point in `dist`. */
const MAIN = path.join(dist, 'daemon/main.js');

/** virtio-blk request types (virtio 1.2, 5.2.6 "Device Operation"). */
const T_IN = 0;
const T_OUT = 1;
const T_FLUSH = 4;
const T_GET_ID = 8;
const T_DISCARD = 11;
const T_WRITE_ZEROES = 13;

/**
 * The project's test front-end (test/helpers, compiled into dist/test/helpers by the host test
 * before the guest boots): { TestFrontend, GuestRam, blkHeader }.
 */
function frontendHelpers() {
  return {
    TestFrontend: require(path.join(dist, 'test/helpers/frontend.js')).TestFrontend,
    GuestRam: require(path.join(dist, 'test/helpers/guest-ram.js')).GuestRam,
    blkHeader: require(path.join(dist, 'test/helpers/driver-ring.js')).blkHeader,
  };
}

/**
 * Runs `main(plan)` with the JSON plan of argv[2]; prints "@@VAL done 1" when it resolves, or
 * "<name> failed: <stack>" (the host tests look for it) and exit status 1 when it throws.
 */
function runCheck(name, main) {
  Promise.resolve()
    .then(() => main(JSON.parse(process.argv[2])))
    .then(
      () => val('done', 1),
      (err) => {
        process.stdout.write(`${name} failed: ${err.stack}\n`);
        process.exitCode = 1;
      },
    );
}

/**
 * Starts `node dist/daemon/main.js ...args`, stdout and stderr into `logFile`.
 * Returns { child, exited: Promise<{ code, signal }>, startedAt (Date.now() ms) }.
 */
function startDaemon(args, logFile) {
  const out = fs.openSync(logFile, 'w');
  const startedAt = Date.now();
  const child = cp.spawn(process.execPath, [MAIN, ...args], { stdio: ['ignore', out, out] });
  fs.closeSync(out);
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  return { child, exited, startedAt };
}

/** SIGTERM, then SIGKILL when the daemon is not gone within `ms`; resolves its exit code or 'hung'. */
async function stopDaemon(d, ms) {
  d.child.kill('SIGTERM');
  const r = await Promise.race([d.exited, deadline(ms).then(() => ({ code: 'hung' }))]);
  if (r.code === 'hung') d.child.kill('SIGKILL');
  return r.code;
}

/** `rnull ctl -m <mgmt> ...args`, killed after `timeoutMs`; resolves { code, out, err } (code 0 = success). */
function ctl(mgmt, args, timeoutMs = 60000) {
  return new Promise((resolve) =>
    cp.execFile(process.execPath, [MAIN, 'ctl', '-m', mgmt, ...args], { timeout: timeoutMs }, (err, stdout, stderr) =>
      resolve({ code: err ? err.code ?? 1 : 0, out: stdout, err: stderr }),
    ),
  );
}

/**
 * `rnull ctl stats <disk>`: resolves { code, queues } with the per-queue list of the answer, or
 * queues null (the answer printed) when it is not that JSON.
 */
async function ctlStats(mgmt, disk) {
  const r = await ctl(mgmt, ['stats', disk], 30000);
  try {
    return { code: r.code, queues: JSON.parse(r.out).queues };
  } catch {
    process.stdout.write(`ctl stats: ${r.code} ${r.out} ${r.err}\n`);
    return { code: r.code, queues: null };
  }
}

/**
 * vhost-bench arguments for a --verify run of random 4 KiB (or `bs`-byte) reads and writes at
 * QD 16 on 2 queues over the first 16 MiB: for `runtime` seconds, or `ios` I/Os.
 */
function verifyArgs({ socket, json, seed, bs = 4096, runtime, ios }) {
  const amount = ios !== undefined ? ['--ios', String(ios)] : ['--runtime', String(runtime)];
  return ['--socket', socket, '--queues', '2', '--qd', '16', '--bs', String(bs), '--rw', 'randrw', '--verify', ...amount, '--disk-size', String(16 << 20), '--timeout-ms', '20000', '--seed', String(seed), '--json', json, '--quiet'];
}

/**
 * Starts vhost-bench (`bin`) with `args`. Resolves { status, signal, exitAt, ms, out } when it
 * exits, or after `limitMs` with status 'hung' and exitAt Infinity (it is SIGKILLed then).
 */
function runBench(bin, args, limitMs) {
  const t = Date.now();
  const child = cp.spawn(bin, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (x) => (out += x));
  child.stderr.on('data', (x) => (out += x));
  const done = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ status: code, signal, exitAt: Date.now() })));
  return Promise.race([done, deadline(limitMs).then(() => ({ status: 'hung', signal: null, exitAt: Infinity }))]).then((r) => {
    if (r.status === 'hung') child.kill('SIGKILL');
    return { ...r, ms: Date.now() - t, out };
  });
}

/**
 * Reports a vhost-bench run as <p>bench_status and <p>bench_ms, and from its --json file
 * <p>bench_iops, _ios, _errors, _verified, _mismatches (<p>bench_json missing without one).
 */
function reportBench(p, r, jsonFile) {
  val(`${p}bench_status`, r.status);
  val(`${p}bench_ms`, r.ms);
  if (r.status !== 0) process.stdout.write(`vhost-bench ${p}: ${r.signal ?? ''}\n${r.out}\n`);
  try {
    const j = JSON.parse(fs.readFileSync(jsonFile, 'utf8'));
    val(`${p}bench_iops`, Math.round(j.iops));
    val(`${p}bench_ios`, j.ios);
    val(`${p}bench_errors`, j.errors.total);
    val(`${p}bench_verified`, j.verify.checked);
    val(`${p}bench_mismatches`, j.verify.mismatches);
  } catch {
    val(`${p}bench_json`, 'missing');
  }
}

/**
 * Whether a `rnull ctl reset` landed while front-ends ran, from the daemon's JSON log lines
 * (their `time` is Date.now() ms): exactly one "controller reset done", after the `mapped`-th
 * "guest memory mapped for DMA" and before `endAt`. Returns { midRun: 1 or 0, doneAt }.
 */
function resetMidRun(logFile, mapped, endAt) {
  const lines = fs.readFileSync(logFile, 'utf8').split('\n').filter((l) => l.startsWith('{'));
  const at = (re) => lines.filter((l) => re.test(l)).map((l) => JSON.parse(l).time);
  const done = at(/controller reset done/);
  const maps = at(/guest memory mapped for DMA/);
  const midRun = done.length === 1 && maps.length >= mapped && maps[mapped - 1] < done[0] && done[0] < endAt ? 1 : 0;
  return { midRun, doneAt: done.length === 1 ? done[0] : undefined };
}

/**
 * Writes each of `writes` ({ sector, bytes, seed, queue? }: the pattern for seed, `bytes` bytes
 * at 512-byte `sector`) through the test front-end `fe` on ring `queue` (default 0), reads it
 * back on ring `readQueue(w)` (default the same) and reports <p>w<i> "same" or the statuses.
 */
async function writeReadBack(fe, p, writes, readQueue = (w) => w.queue ?? 0) {
  for (const [i, w] of writes.entries()) {
    const data = patterned(w.seed, w.bytes);
    const s = await fe.blk(w.queue ?? 0, T_OUT, w.sector, { data });
    const r = await fe.blk(readQueue(w), T_IN, w.sector, { readLen: w.bytes });
    val(`${p}w${i}`, s.status === 0 && r.status === 0 && r.data.equals(data) ? 'same' : `status ${s.status}/${r.status} ${r.data.equals(data) ? 'same' : 'differs'}`);
  }
}

/** How many times the global regular expression `re` matches in `log`. */
function logCount(log, re) {
  return (log.match(re) || []).length;
}

/**
 * Prints the log's first `max` warning and error lines, then its first `head` lines or (head 0)
 * its last `tail` lines (none with tail 0).
 */
function printLog(label, log, { max = 20, head = 0, tail = 15 } = {}) {
  const lines = log.split('\n');
  const bad = lines.filter((l) => /"level":[4-6]0/.test(l)).slice(0, max);
  process.stdout.write(`--- ${label} log: warnings and errors ---\n${bad.join('\n')}\n`);
  if (head > 0) process.stdout.write(`--- ${label} log (head) ---\n${lines.slice(0, head).join('\n')}\n`);
  else if (tail > 0) process.stdout.write(`--- ${label} log (tail) ---\n${lines.slice(-tail).join('\n')}\n`);
}

module.exports = {
  dist,
  MAIN,
  T_IN,
  T_OUT,
  T_FLUSH,
  T_GET_ID,
  T_DISCARD,
  T_WRITE_ZEROES,
  frontendHelpers,
  runCheck,
  startDaemon,
  stopDaemon,
  ctl,
  ctlStats,
  verifyArgs,
  runBench,
  reportBench,
  resetMidRun,
  writeReadBack,
  logCount,
  printLog,
};
