#!/usr/bin/env node
/**
 * `npm run bench`: rnull against qemu-storage-daemon (QSD) with the vhost-bench front-end.
 *
 * For every round, every case (disk kind x workload) and every back-end, in that nesting (so
 * the back-ends alternate A B A B and each case's rounds are spread over the whole session),
 * it starts a fresh back-end process on a fresh socket, pinned to one core, preconditions a
 * memory-backed disk by writing it once, runs the client pinned to the other core, stops the
 * back-end, and keeps the client's JSON. Then it prints medians and rnull/QSD ratios as a
 * markdown table, checks the issue's targets, and writes results.md, results.json and
 * results.svg to the output folder (bench/out by default).
 *
 * Plain Node.js 20, no dependencies. See bench/README.md.
 */
'use strict';

const { spawn, spawnSync } = require('child_process');
const fs = require('fs');
const os = require('os');
const path = require('path');

const ROOT = path.resolve(__dirname, '..');
const CLIENT_DIR = path.join(__dirname, 'client');
const CLIENT = path.join(CLIENT_DIR, 'build', 'vhost-bench');
const RNULL_MAIN = path.join(ROOT, 'dist', 'daemon', 'main.js');

// ---------------------------------------------------------------------------------------------
// What is measured.

/** Workloads, each run on both disk kinds. */
const WORKLOADS = [
  { id: '4k-randread-qd1', label: '4k randread QD1', rw: 'randread', bs: 4096, qd: 1, queues: 1 },
  { id: '4k-randread-qd32', label: '4k randread QD32', rw: 'randread', bs: 4096, qd: 32, queues: 1 },
  // 128 requests x 3 descriptors need a 512-entry ring (direct descriptors, like every other case).
  { id: '4k-randread-qd128', label: '4k randread QD128', rw: 'randread', bs: 4096, qd: 128, queues: 1, ringSize: 512 },
  { id: '4k-randwrite-qd32', label: '4k randwrite QD32', rw: 'randwrite', bs: 4096, qd: 32, queues: 1 },
  { id: '128k-seqread-qd8', label: '128k seqread QD8', rw: 'read', bs: 131072, qd: 8, queues: 1 },
  { id: '4k-randread-qd32-2q', label: '4k randread QD32 x2 queues', rw: 'randread', bs: 4096, qd: 32, queues: 2 },
  // The client busy-polls the used ring (no call eventfd, no sleep): the back-end alone sets the pace.
  { id: '4k-randread-qd32-poll', label: '4k randread QD32, client polls', rw: 'randread', bs: 4096, qd: 32, queues: 1, wait: 'poll', disks: ['null'] },
  // Timer mode against direct completion, both seen by a polling client (so its own wake-up
  // is not part of the figure): every request ends 50 us after it starts: rnull --irqmode 2
  // --completion-nsec 50000, QSD null-co latency-ns=50000 (the ceiling has no such mode).
  { id: '4k-randread-qd1-poll', label: '4k randread QD1, client polls', rw: 'randread', bs: 4096, qd: 1, queues: 1, wait: 'poll', disks: ['null'] },
  { id: '4k-randread-qd1-timer', label: '4k randread QD1, 50 us completion, client polls', rw: 'randread', bs: 4096, qd: 1, queues: 1, wait: 'poll', completionNs: 50000, disks: ['null'], noCeiling: true },
  // Timer mode under load: 32 requests each ending 50 us after it starts, a sleeping client
  // (at most 32 / 50 us = 640 k IOPS; how close each back-end gets and how late its timers are).
  { id: '4k-randread-qd32-timer', label: '4k randread QD32, 50 us completion', rw: 'randread', bs: 4096, qd: 32, queues: 1, completionNs: 50000, disks: ['null'], noCeiling: true },
];

/** Every case: each workload on each disk kind it applies to, as {id, disk, workload}. */
function allCases() {
  const cases = [];
  for (const disk of Object.keys(DISKS)) for (const w of WORKLOADS) if (!w.disks || w.disks.includes(disk)) cases.push({ id: `${disk}/${w.id}`, disk, workload: w });
  return cases;
}

/** Disk kinds: equivalent rnull and QSD configurations. */
const DISKS = {
  null: { label: 'null', rnull: 'null disk (--memory-backed false)', qsd: 'null-co, read-zeroes=on' },
  mem: { label: 'memory', rnull: 'memory-backed null disk (--memory-backed true)', qsd: 'raw file in /dev/shm' },
};

const BACKEND_NAMES = { rnull: 'rnull', base: 'rnull before', qsd: 'QSD', ceiling: 'ceiling' };
/** The do-nothing back-end (bench/ceiling): completes every request without touching data. */
const CEILING_DIR = path.join(__dirname, 'ceiling');
const CEILING = path.join(CEILING_DIR, 'build', 'vhost-ceiling');

const QUICK_CASES = ['null/4k-randread-qd32', 'mem/4k-randwrite-qd32'];

// ---------------------------------------------------------------------------------------------
// Options.

const HELP = `usage: node bench/run.js [options]        (npm run bench -- [options])

  --rounds N          interleaved rounds per case and back-end (default 3)
  --runtime SEC       measured seconds per run (default 5)
  --ramp SEC          warm-up seconds per run, not measured (default 1)
  --backends LIST     rnull,qsd (default: both, or rnull alone if qemu-storage-daemon is missing);
                      add ceiling for the do-nothing back-end (bench/ceiling), e.g. rnull,qsd,ceiling
  --baseline DIR      another rnull checkout, built (DIR/dist/daemon/main.js), run as back-end
                      "rnull before" in the same interleaved rounds: a before/after table of two
                      builds (e.g. git worktree add /tmp/before <rev> && (cd /tmp/before && npm ci
                      && npm run build))
  --baseline-node-flags FLAGS  node flags for the --baseline back-end only (space-separated): with
                      --baseline set to this checkout, an A/B of V8 flags on one build
  --workloads LIST    comma-separated filters on case ids "<disk>/<workload>" (see --list): a full id
                      selects that case, anything else every id containing it, e.g.
                      "null/4k-randread-qd32,mem/" or "qd32" (default: all ${allCases().length} cases)
  --size MIB          disk size (default 1024)
  --backend-cpu N     core for the back-ends (default 0)
  --client-cpu N      core for the client (default 1)
  --no-pin            pin nothing
  --rnull-threads N   rnull's --threads: 1, or 2 to serve queue 1 on a worker thread (default 1).
                      Pinned (the default), each rnull thread gets its own core through rnull's
                      own --cpus (thread i on the i-th CPU of --rnull-cpus) instead of taskset
                      putting every thread on --backend-cpu
  --rnull-cpus LIST   CPUs of rnull's threads when pinned, one per thread, e.g. 0,2 (default:
                      --backend-cpu, then --client-cpu: on 2 cores thread 1 shares the client's)
  --qsd-aio MODE      I/O mode of QSD's file disk: native (aio=native,cache.direct=on: O_DIRECT on
                      tmpfs needs Linux 6.6+), io_uring, threads, or auto (default: the first of
                      these that passes a verified write/read probe, in that order)
  --timeout-ms N      client stall timeout (default 5000)
  --out DIR           output folder (default bench/out)
  --quick             one short round of ${QUICK_CASES.join(' and ')} on a 64 MiB disk (for tests)
  --no-build          do not build rnull (dist/) first; the client is always made (make is incremental)
  --list              print the case ids and exit
  --verbose           print each run's command lines and results
`;

function parseArgs(argv) {
  const o = {
    rounds: 3,
    runtime: 5,
    ramp: 1,
    backends: null,
    workloads: null,
    size: 1024,
    backendCpu: 0,
    clientCpu: 1,
    rnullThreads: 1,
    rnullCpus: null,
    pin: true,
    qsdAio: 'auto',
    timeoutMs: 5000,
    out: path.join(__dirname, 'out'),
    baseline: null,
    baselineNodeFlags: [],
    quick: false,
    build: true,
    list: false,
    verbose: false,
  };
  const given = new Set();
  const num = (flag, v, min, max, integer) => {
    const x = Number(v);
    if (v === undefined || v === '' || !Number.isFinite(x) || x < min || x > max || (integer && !Number.isInteger(x))) {
      throw new Error(`${flag} expects ${integer ? 'a whole number' : 'a number'} from ${min} to ${max}, got "${v}"`);
    }
    return x;
  };
  for (let i = 0; i < argv.length; i++) {
    let a = argv[i];
    let v;
    const eq = a.indexOf('=');
    if (a.startsWith('--') && eq > 0) {
      v = a.slice(eq + 1);
      a = a.slice(0, eq);
    }
    const val = () => (v !== undefined ? v : argv[++i]);
    given.add(a);
    switch (a) {
      case '--help':
      case '-h':
        process.stdout.write(HELP);
        process.exit(0);
        break;
      case '--rounds': o.rounds = num(a, val(), 1, 100, true); break;
      case '--runtime': o.runtime = num(a, val(), 0.1, 3600, false); break;
      case '--ramp': o.ramp = num(a, val(), 0, 600, false); break;
      case '--backends': o.backends = String(val() ?? '').split(',').filter((s) => s !== ''); break;
      case '--workloads': o.workloads = String(val() ?? '').split(',').filter((s) => s !== ''); break;
      case '--size': o.size = num(a, val(), 16, 65536, true); break;
      case '--rnull-threads': o.rnullThreads = num(a, val(), 1, 2, true); break;
      case '--rnull-cpus': o.rnullCpus = String(val() ?? '').split(',').filter((s) => s !== '').map((c) => num(a, c, 0, 1023, true)); break;
      case '--backend-cpu': o.backendCpu = num(a, val(), 0, 4095, true); break;
      case '--client-cpu': o.clientCpu = num(a, val(), 0, 4095, true); break;
      case '--no-pin': o.pin = false; break;
      case '--qsd-aio': o.qsdAio = String(val()); break;
      case '--timeout-ms': o.timeoutMs = num(a, val(), 100, 600000, true); break;
      case '--out': o.out = path.resolve(String(val())); break;
      case '--baseline': o.baseline = path.resolve(String(val())); break;
      case '--baseline-node-flags': o.baselineNodeFlags = String(val()).split(' ').filter(Boolean); break;
      case '--quick': o.quick = true; break;
      case '--no-build': o.build = false; break;
      case '--list': o.list = true; break;
      case '--verbose': o.verbose = true; break;
      default:
        throw new Error(`unknown option ${a} (see --help)`);
    }
  }
  o.cpusGiven = given.has('--backend-cpu') || given.has('--client-cpu');
  if (o.rnullCpus !== null && o.rnullCpus.length !== o.rnullThreads) {
    throw new Error(`--rnull-cpus gives ${o.rnullCpus.length} CPU(s) for --rnull-threads ${o.rnullThreads}: give one per thread`);
  }
  if (!['auto', ...Object.keys(QSD_FILE_MODES)].includes(o.qsdAio)) {
    throw new Error(`--qsd-aio expects auto, ${Object.keys(QSD_FILE_MODES).join(', ')}, got "${o.qsdAio}"`);
  }
  if (o.backends !== null) {
    for (const b of o.backends) if (!(b in BACKEND_NAMES) || b === 'base') throw new Error(`--backends: unknown back-end "${b}" (rnull, qsd, ceiling)`);
    if (o.backends.length === 0) throw new Error('--backends is empty');
  }
  if (o.baseline !== null && !fs.existsSync(path.join(o.baseline, 'dist', 'daemon', 'main.js'))) {
    throw new Error(`--baseline ${o.baseline}: no dist/daemon/main.js there (build that checkout first)`);
  }
  if (o.quick) {
    if (!given.has('--rounds')) o.rounds = 1;
    if (!given.has('--runtime')) o.runtime = 1;
    if (!given.has('--ramp')) o.ramp = 0.2;
    if (!given.has('--size')) o.size = 64;
    if (!given.has('--workloads')) o.workloads = QUICK_CASES.slice();
  }
  return o;
}

// ---------------------------------------------------------------------------------------------
// Child processes: every one is tracked and killed on exit; every wait is bounded.

const children = new Set();
const cleanups = [];

function killAll() {
  for (const c of children) {
    try {
      c.kill('SIGKILL');
    } catch {
      /* already gone */
    }
  }
  children.clear();
  for (const f of cleanups.splice(0)) {
    try {
      f();
    } catch {
      /* best effort */
    }
  }
}
function installExitHandlers() {
  process.on('exit', killAll);
  // Output piped into a closed reader (e.g. `| head`): stop quietly.
  process.stdout.on('error', (e) => {
    if (e.code === 'EPIPE') process.exit(0);
  });
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
    process.on(sig, () => {
      process.stderr.write(`\nbench: ${sig}, stopping\n`);
      killAll();
      process.exit(130);
    });
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Starts a tracked child; `exited` resolves with {code, signal}; stderr/stdout tails kept. */
function startChild(cmd, args, opts = {}) {
  const proc = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], ...opts });
  children.add(proc);
  const out = { stdout: '', stderr: '' };
  const keep = (k) => (d) => {
    out[k] += d.toString();
    if (out[k].length > 65536) out[k] = out[k].slice(-32768);
  };
  proc.stdout.on('data', keep('stdout'));
  proc.stderr.on('data', keep('stderr'));
  const exited = new Promise((resolve) => {
    proc.on('error', (err) => {
      children.delete(proc);
      resolve({ code: null, signal: null, error: err });
    });
    proc.on('exit', (code, signal) => {
      children.delete(proc);
      resolve({ code, signal });
    });
  });
  return { proc, out, exited, what: [path.basename(cmd), ...args.slice(0, 4)].join(' ') };
}

/** Waits for `exited` at most `ms`; on timeout SIGKILLs and reports it. */
async function waitExit(child, ms) {
  let timer;
  const timeout = new Promise((r) => {
    timer = setTimeout(() => r('timeout'), ms);
  });
  const r = await Promise.race([child.exited, timeout]);
  clearTimeout(timer);
  if (r !== 'timeout') return { ...r, timedOut: false };
  child.proc.kill('SIGKILL');
  const r2 = await Promise.race([child.exited, sleep(5000).then(() => ({ code: null, signal: 'SIGKILL' }))]);
  return { ...r2, timedOut: true };
}

async function stopChild(child) {
  if (child.proc.exitCode !== null || child.proc.signalCode !== null) return;
  child.proc.kill('SIGTERM');
  const r = await waitExit(child, 5000);
  if (r.timedOut) process.stderr.write(`bench: pid ${child.proc.pid} (${child.what} ...) ignored SIGTERM for 5 s: killed\n`);
}

// ---------------------------------------------------------------------------------------------
// Back-ends.

function pinned(o, cpu, cmd, args) {
  return o.pin ? ['taskset', ['-c', String(cpu), cmd, ...args]] : [cmd, args];
}

/**
 * The CPUs rnull's threads pin themselves to (thread i on the i-th), or null when rnull is
 * pinned as a whole by taskset (one thread) or not at all (--no-pin).
 */
function rnullCpus(o) {
  if (!o.pin) return null;
  if (o.rnullCpus !== null) return o.rnullCpus;
  return o.rnullThreads > 1 ? [o.backendCpu, o.clientCpu] : null;
}

function haveCommand(cmd, args = ['--version']) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 10000 });
  return r.status === 0 ? (r.stdout || '').split('\n')[0].trim() : null;
}

/**
 * QSD's ways of serving a file in /dev/shm, best first (measured on a 2-vCPU VM: native AIO
 * with O_DIRECT completes tmpfs I/O inline at submission, ~1.6x the IOPS of io_uring at 4k, which
 * in turn beats the thread pool ~1.7x).
 */
const QSD_FILE_MODES = {
  native: 'aio=native,cache.direct=on',
  io_uring: 'aio=io_uring',
  threads: 'aio=threads',
};

function qsdArgs(disk, socket, sizeBytes, image, mode, completionNs = 0) {
  const exp = (node) =>
    `type=vhost-user-blk,id=e0,node-name=${node},addr.type=unix,addr.path=${socket},writable=on,num-queues=2,iothread=io0`;
  const args = ['--object', 'iothread,id=io0'];
  if (disk === 'null') {
    const latency = completionNs > 0 ? `,latency-ns=${completionNs}` : '';
    args.push('--blockdev', `driver=null-co,node-name=n0,size=${sizeBytes},read-zeroes=on${latency}`, '--export', exp('n0'));
  } else {
    args.push('--blockdev', `driver=file,node-name=f0,filename=${image},${QSD_FILE_MODES[mode]}`, '--export', exp('f0'));
  }
  return args;
}

function rnullArgs(main, disk, socket, sizeMiB, threads, store, completionNs = 0) {
  // A memory-backed disk's store is a fresh file in /dev/shm, as QSD's image (removed after).
  const storeArgs = store !== null ? ['--store', store, '--store-fresh', 'true'] : [];
  const timerArgs = completionNs > 0 ? ['--irqmode', '2', '--completion-nsec', String(completionNs)] : [];
  return [main, '--socket', socket, '--size', String(sizeMiB), '--blocksize', '512', '--memory-backed', disk === 'mem' ? 'true' : 'false',
    ...storeArgs, ...timerArgs, '--num-queues', '2', '--threads', String(threads), '--log-level', 'warn'];
}

/** Whether the rnull at `main` knows `option` (a --baseline build may predate it). */
const knownOptions = new Map();
function rnullKnows(main, option) {
  if (!knownOptions.has(main)) {
    const r = spawnSync(process.execPath, [main, '--help'], { encoding: 'utf8', timeout: 30000 });
    knownOptions.set(main, `${r.stdout}${r.stderr}`);
  }
  return knownOptions.get(main).includes(option);
}

/** Waits until `socket` exists (the back-end listens), the child dies, or `ms` passes. */
async function waitSocket(child, socket, ms, what) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (fs.existsSync(socket)) return;
    if (child.proc.exitCode !== null || child.proc.signalCode !== null) {
      throw new Error(`${what} exited (${child.proc.exitCode ?? child.proc.signalCode}) before listening: ${tail(child.out.stderr || child.out.stdout)}`);
    }
    await sleep(20);
  }
  throw new Error(`${what} did not create ${socket} within ${ms} ms: ${tail(child.out.stderr || child.out.stdout)}`);
}

function tail(s, n = 600) {
  s = String(s || '').trim();
  return s.length > n ? '...' + s.slice(-n) : s || '(no output)';
}

let runSeq = 0;

/** Starts one back-end for `disk`; returns {child, socket, pid, stop()}. */
async function startBackend(ctx, backend, disk, completionNs = 0) {
  const o = ctx.o;
  const n = ++runSeq;
  const socket = path.join(ctx.tmp, `${backend}-${disk}-${n}.sock`);
  const bytes = o.size * 1024 * 1024;
  let image = null;
  let cmd;
  let args;
  if (backend === 'rnull' || backend === 'base') {
    const main = backend === 'base' ? path.join(o.baseline, 'dist', 'daemon', 'main.js') : RNULL_MAIN;
    // An older build without store files keeps a memory-backed disk in its heap.
    if (disk === 'mem' && rnullKnows(main, '--store ')) image = path.join(ctx.shm, `rnull-bench-${process.pid}-${n}.store`);
    const cpus = rnullCpus(o);
    const flags = backend === 'base' ? o.baselineNodeFlags : [];
    const base = [...flags, ...rnullArgs(main, disk, socket, o.size, o.rnullThreads, image, completionNs)];
    if (cpus === null) [cmd, args] = pinned(o, o.backendCpu, process.execPath, base);
    // Each thread pins itself (rnull --cpus); taskset keeps Node's other threads on those CPUs.
    else [cmd, args] = pinned(o, [...new Set(cpus)].join(','), process.execPath, [...base, '--cpus', cpus.join(',')]);
  } else if (backend === 'ceiling') {
    [cmd, args] = pinned(o, o.backendCpu, CEILING, ['--socket', socket, '--queues', '2', '--size', String(o.size), '--blocksize', '512', '--quiet']);
  } else {
    if (disk === 'mem') {
      image = path.join(ctx.shm, `rnull-bench-${process.pid}-${n}.img`);
      fs.writeFileSync(image, '');
      fs.truncateSync(image, bytes);
    }
    [cmd, args] = pinned(o, o.backendCpu, 'qemu-storage-daemon', qsdArgs(disk, socket, bytes, image, ctx.qsdAio, completionNs));
  }
  if (o.verbose) process.stdout.write(`  $ ${cmd} ${args.join(' ')}\n`);
  const child = startChild(cmd, args, { cwd: ctx.tmp });
  const removeImage = () => {
    if (image !== null) fs.rmSync(image, { force: true });
  };
  cleanups.push(removeImage);
  try {
    await waitSocket(child, socket, 15000, `${BACKEND_NAMES[backend]} (${disk} disk)`);
  } catch (e) {
    await stopChild(child);
    removeImage();
    throw e;
  }
  return {
    child,
    socket,
    pid: child.proc.pid,
    stop: async () => {
      await stopChild(child);
      removeImage();
      fs.rmSync(socket, { force: true });
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Client runs.

async function runClient(ctx, socket, pid, spec, jsonPath) {
  const o = ctx.o;
  const args = ['--socket', socket, '--queues', String(spec.queues), '--qd', String(spec.qd), '--bs', String(spec.bs), '--rw', spec.rw,
    '--timeout-ms', String(o.timeoutMs), '--json', jsonPath, '--quiet'];
  if (spec.ios !== undefined) args.push('--ios', String(spec.ios));
  else args.push('--runtime', String(spec.runtime), '--ramp', String(spec.ramp));
  if (spec.ringSize) args.push('--ring-size', String(spec.ringSize));
  if (spec.verify) args.push('--verify');
  if (spec.wait) args.push('--wait', spec.wait);
  if (o.pin) args.push('--pin', String(o.clientCpu));
  if (pid) args.push('--backend-pid', String(pid));
  if (o.verbose) process.stdout.write(`  $ ${CLIENT} ${args.join(' ')}\n`);
  fs.rmSync(jsonPath, { force: true });
  const child = startChild(CLIENT, args);
  const budget = spec.ios !== undefined ? 120000 : (spec.runtime + spec.ramp) * 1000 + o.timeoutMs + 30000;
  const r = await waitExit(child, budget);
  let json = null;
  try {
    json = JSON.parse(fs.readFileSync(jsonPath, 'utf8'));
  } catch {
    /* no or bad output: reported below */
  }
  return { code: r.code, signal: r.signal, timedOut: r.timedOut, stderr: child.out.stderr.trim(), json };
}

/** Writes the whole memory-backed disk once (128k sequential writes), so reads find data. */
async function precondition(ctx, socket, pid) {
  const bytes = ctx.o.size * 1024 * 1024;
  const spec = { rw: 'write', bs: 131072, qd: 8, queues: 1, ios: Math.floor(bytes / 131072) };
  const r = await runClient(ctx, socket, pid, spec, path.join(ctx.tmp, 'fill.json'));
  if (r.code !== 0) throw new Error(`preconditioning write failed (exit ${r.code ?? r.signal}${r.timedOut ? ', timed out' : ''}): ${tail(r.stderr)}`);
}

function summarize(json) {
  const cpu = json.backend_cpu_us_per_io || {};
  return {
    iops: json.iops,
    mbps: json.mbps,
    p50: json.lat_us.p50,
    p99: json.lat_us.p99,
    p999: json.lat_us.p999,
    max: json.lat_us.max,
    min: json.lat_us.min,
    mean: json.lat_us.mean,
    cpu_us_per_io: typeof cpu.schedstat === 'number' ? cpu.schedstat : typeof cpu.stat === 'number' ? cpu.stat : null,
    cpu_stat_us_per_io: typeof cpu.stat === 'number' ? cpu.stat : null,
    cpu_schedstat_us_per_io: typeof cpu.schedstat === 'number' ? cpu.schedstat : null,
    client_cpu_us_per_io: json.client_cpu_us_per_io,
    errors: json.errors.total,
    ios: json.ios,
    kicks_per_io: json.notifications.kicks_per_io,
    wakeups_per_io: json.notifications.wakeups_per_io,
  };
}

// ---------------------------------------------------------------------------------------------
// Statistics and formatting.

function median(xs) {
  const v = xs.filter((x) => typeof x === 'number' && Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0) return null;
  const m = Math.floor(v.length / 2);
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}

function ratio(a, b) {
  return typeof a === 'number' && typeof b === 'number' && b > 0 ? a / b : null;
}

function fmtIops(x) {
  if (x === null || x === undefined) return '–';
  if (x >= 1e6) return `${(x / 1e6).toFixed(2)} M`;
  if (x >= 1e3) return `${(x / 1e3).toFixed(1)} k`;
  return x.toFixed(0);
}
function fmtUs(x) {
  if (x === null || x === undefined) return '–';
  return x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2);
}
function fmtRatio(x) {
  return x === null || x === undefined ? '–' : `${x.toFixed(2)}x`;
}
function fmtCpu(x) {
  return x === null || x === undefined ? '–' : x.toFixed(2);
}

function caseMedians(runs) {
  const ok = runs.filter((r) => r.summary !== null);
  const pick = (k) => median(ok.map((r) => r.summary[k]));
  return {
    rounds_ok: ok.length,
    rounds_failed: runs.length - ok.length,
    iops: pick('iops'),
    mbps: pick('mbps'),
    p50: pick('p50'),
    p99: pick('p99'),
    p999: pick('p999'),
    // The lowest latency any round saw (not a median): timer mode must never end a request early.
    min: ok.length ? Math.min(...ok.map((r) => r.summary.min)) : null,
    cpu_us_per_io: pick('cpu_us_per_io'),
    client_cpu_us_per_io: pick('client_cpu_us_per_io'),
    errors: ok.reduce((s, r) => s + r.summary.errors, 0),
  };
}

function markdownTable(cases, backends) {
  const both = backends.includes('rnull') && backends.includes('qsd');
  const lines = [];
  lines.push('| workload | disk | rnull IOPS | QSD IOPS | ratio | rnull p50 / p99.9 us | QSD p50 / p99.9 us | rnull CPU us/IO | QSD CPU us/IO | CPU ratio |');
  lines.push('|---|---|---:|---:|---:|---:|---:|---:|---:|---:|');
  for (const c of cases) {
    const r = c.median.rnull;
    const q = c.median.qsd;
    const lat = (m) => (m ? `${fmtUs(m.p50)} / ${fmtUs(m.p999)}` : '–');
    const fail = (m) => (m && m.rounds_failed ? ` (${m.rounds_failed} failed)` : '');
    lines.push(
      `| ${c.workload.label} | ${DISKS[c.disk].label} | ${r ? fmtIops(r.iops) + fail(r) : '–'} | ${q ? fmtIops(q.iops) + fail(q) : '–'} | ` +
        `${both ? fmtRatio(c.ratio.iops) : '–'} | ${lat(r)} | ${lat(q)} | ${r ? fmtCpu(r.cpu_us_per_io) : '–'} | ${q ? fmtCpu(q.cpu_us_per_io) : '–'} | ` +
        `${both ? fmtRatio(c.ratio.cpu) : '–'} |`,
    );
  }
  return lines.join('\n');
}

/** rnull/QSD and rnull/ceiling side by side, with the ceiling's own figures. */
function ceilingTable(cases, backends) {
  const lines = ['| workload | disk | rnull IOPS | QSD IOPS | ceiling IOPS | rnull/QSD | rnull/ceiling | QSD/ceiling | ceiling p50 / p99.9 us | ceiling CPU us/IO |', '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|'];
  for (const c of cases) {
    const [r, q, z] = [c.median.rnull, backends.includes('qsd') ? c.median.qsd : null, c.median.ceiling];
    const qz = q && z ? ratio(q.iops, z.iops) : null;
    lines.push(
      `| ${c.workload.label} | ${DISKS[c.disk].label} | ${r ? fmtIops(r.iops) : '–'} | ${q ? fmtIops(q.iops) : '–'} | ${z ? fmtIops(z.iops) : '–'} | ` +
        `${fmtRatio(c.ratio.iops)} | ${fmtRatio(c.ratio.ceiling)} | ${fmtRatio(qz)} | ${z ? `${fmtUs(z.p50)} / ${fmtUs(z.p999)}` : '–'} | ${z ? fmtCpu(z.cpu_us_per_io) : '–'} |`,
    );
  }
  return lines.join('\n');
}

/** rnull against the --baseline build, case by case. */
function beforeAfterTable(cases) {
  const lines = ['| workload | disk | before IOPS | after IOPS | after/before | before p50 / p99.9 us | after p50 / p99.9 us | before CPU us/IO | after CPU us/IO | CPU after/before |',
    '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|'];
  for (const c of cases) {
    const [a, b] = [c.median.rnull, c.median.base];
    const lat = (m) => (m ? `${fmtUs(m.p50)} / ${fmtUs(m.p999)}` : '–');
    lines.push(
      `| ${c.workload.label} | ${DISKS[c.disk].label} | ${b ? fmtIops(b.iops) : '–'} | ${a ? fmtIops(a.iops) : '–'} | ${fmtRatio(c.ratio.before)} | ${lat(b)} | ${lat(a)} | ` +
        `${b ? fmtCpu(b.cpu_us_per_io) : '–'} | ${a ? fmtCpu(a.cpu_us_per_io) : '–'} | ${fmtRatio(c.ratio.cpuBefore)} |`,
    );
  }
  return lines.join('\n');
}

/**
 * The data path's targets (issue 12), checked against the medians; `unit` is 'x' for ratios,
 * 'us' for microseconds. A target whose cases or back-ends were not run is "not measured".
 */
function checkTargets(byId) {
  const get = (id) => byId.get(id);
  const out = [];
  const add = (name, value, ok, want, unit = 'x') => out.push({ target: name, value, met: value === null ? null : ok, want, unit });
  {
    const c = get('null/4k-randread-qd32');
    const ri = c ? c.ratio.iops : null;
    const rc = c ? c.ratio.cpu : null;
    add('4k randread QD32, null disk, sleeping client: IOPS rnull/QSD', ri, ri !== null && ri >= 2.0, '>= 2x');
    add('4k randread QD32, null disk, sleeping client: CPU per I/O rnull/QSD', rc, rc !== null && rc <= 0.67, '<= 0.67x');
    const v = c && c.median.rnull ? ratio(c.median.rnull.p999, c.median.rnull.p50) : null;
    add('4k randread QD32, null disk: rnull p99.9 / rnull p50', v, v !== null && v <= 3.0, '<= 3x');
  }
  {
    const c = get('null/4k-randread-qd128');
    const v = c ? c.ratio.ceiling : null;
    add('4k randread QD128, null disk: IOPS rnull/ceiling', v, v !== null && v >= 0.85, '>= 0.85x');
    const q = c ? c.ratio.iops : null;
    add('4k randread QD128, null disk: IOPS rnull/QSD', q, q !== null && q >= 1.5, '>= 1.5x');
  }
  {
    const c = get('null/4k-randread-qd1');
    const v = c && c.median.rnull && c.median.qsd ? ratio(c.median.rnull.p50, c.median.qsd.p50) : null;
    add('4k randread QD1, null disk: p50 latency rnull/QSD', v, v !== null && v <= 1.0, '<= 1.0x');
  }
  {
    const c = get('null/4k-randread-qd32-2q');
    const v = c ? c.ratio.iops : null;
    add('4k randread QD32 on 2 queues, null disk: IOPS rnull/QSD', v, v !== null && v >= 1.5, '>= 1.5x');
  }
  {
    // Timer mode: the delay over direct completion a polling QD1 client sees, against completion_nsec.
    const t = get('null/4k-randread-qd1-timer');
    const d = get('null/4k-randread-qd1-poll');
    const tr = t && t.median.rnull;
    const dr = d && d.median.rnull;
    const ns = t ? t.workload.completionNs : 50000;
    const extra = tr && dr ? tr.p50 - dr.p50 : null;
    add(`timer mode (completion_nsec ${ns}), QD1: rnull p50 over direct mode`, extra, extra !== null && extra <= ns / 1000 + 5, `<= ${ns / 1000 + 5} us`, 'us');
    const min = tr ? tr.min : null;
    add(`timer mode (completion_nsec ${ns}), QD1: rnull's shortest latency`, min, min !== null && min >= ns / 1000, `>= ${ns / 1000} us`, 'us');
  }
  for (const [id, label] of [
    ['mem/4k-randread-qd32', '4k randread QD32'],
    ['mem/4k-randread-qd128', '4k randread QD128'],
    ['mem/4k-randwrite-qd32', '4k randwrite QD32'],
    ['mem/128k-seqread-qd8', '128k seqread QD8'],
    ['mem/4k-randread-qd32-2q', '4k randread QD32 on 2 queues'],
  ]) {
    const c = get(id);
    const v = c ? c.ratio.iops : null;
    add(`${label}, memory-backed: IOPS rnull/QSD`, v, v !== null && v >= 1.5, '>= 1.5x');
  }
  return out;
}

function targetsMarkdown(targets) {
  const lines = ['| target | wanted | measured | |', '|---|---|---:|---|'];
  for (const t of targets) {
    const status = t.met === null ? 'not measured' : t.met ? 'met' : 'missed';
    const value = t.value === null ? '–' : t.unit === 'us' ? `${t.value.toFixed(1)} us` : `${t.value.toFixed(2)}x`;
    lines.push(`| ${t.target} | ${t.want} | ${value} | ${status} |`);
  }
  return lines.join('\n');
}

// ---------------------------------------------------------------------------------------------
// SVG (hand-written): IOPS against queue depth, and grouped latency bars.

function esc(s) {
  return String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function svgPlot(cases, backends) {
  const W = 1000;
  const colors = { rnull: ['#9ecae1', '#4292c6', '#08519c'], qsd: ['#fdae6b', '#f16913', '#a63603'], ceiling: ['#d9d9d9', '#969696', '#525252'], base: ['#c7e9c0', '#74c476', '#238b45'] };
  const parts = [];
  const text = (x, y, s, attrs = '') => parts.push(`<text x="${x.toFixed(1)}" y="${y.toFixed(1)}" ${attrs}>${esc(s)}</text>`);
  const line = (x1, y1, x2, y2, attrs) =>
    parts.push(`<line x1="${x1.toFixed(1)}" y1="${y1.toFixed(1)}" x2="${x2.toFixed(1)}" y2="${y2.toFixed(1)}" ${attrs}/>`);

  // Panel 1: 4k randread IOPS vs QD (log2 x axis).
  const P1 = { x: 90, y: 60, w: 560, h: 280 };
  text(W / 2, 30, '4k random read: IOPS against queue depth (medians)', 'text-anchor="middle" font-size="18" font-weight="bold"');
  const qds = [1, 32, 128];
  const series = [];
  for (const disk of ['null', 'mem']) {
    for (const b of backends) {
      const pts = [];
      for (const qd of qds) {
        const c = cases.find((k) => k.id === `${disk}/4k-randread-qd${qd}`);
        const m = c && c.median[b];
        if (m && typeof m.iops === 'number') pts.push({ qd, iops: m.iops });
      }
      if (pts.length) series.push({ disk, b, pts });
    }
  }
  const maxIops = niceMax(Math.max(1, ...series.flatMap((s) => s.pts.map((p) => p.iops))));
  const xOf = (qd) => P1.x + (Math.log2(qd) / Math.log2(128)) * P1.w;
  const yOf = (v) => P1.y + P1.h - (v / maxIops) * P1.h;
  parts.push(`<rect x="${P1.x}" y="${P1.y}" width="${P1.w}" height="${P1.h}" fill="none" stroke="#999"/>`);
  for (let i = 0; i <= 5; i++) {
    const v = (maxIops * i) / 5;
    const y = yOf(v);
    line(P1.x, y, P1.x + P1.w, y, 'stroke="#e5e5e5"');
    text(P1.x - 8, y + 4, fmtIops(v), 'text-anchor="end" font-size="12"');
  }
  for (const qd of [1, 2, 4, 8, 16, 32, 64, 128]) {
    const x = xOf(qd);
    line(x, P1.y + P1.h, x, P1.y + P1.h + 5, 'stroke="#999"');
    text(x, P1.y + P1.h + 20, String(qd), `text-anchor="middle" font-size="12"${qds.includes(qd) ? ' font-weight="bold"' : ''}`);
  }
  text(P1.x + P1.w / 2, P1.y + P1.h + 40, 'queue depth (log scale)', 'text-anchor="middle" font-size="13"');
  text(24, P1.y + P1.h / 2, 'IOPS', `text-anchor="middle" font-size="13" transform="rotate(-90 24 ${P1.y + P1.h / 2})"`);
  let ly = P1.y + 10;
  const labelled = new Map(); // x -> label y positions taken, so labels at one depth do not overlap
  for (const s of series) {
    const col = colors[s.b][1];
    const dash = s.disk === 'mem' ? ' stroke-dasharray="7 4"' : '';
    const d = s.pts.map((p, i) => `${i ? 'L' : 'M'}${xOf(p.qd).toFixed(1)},${yOf(p.iops).toFixed(1)}`).join(' ');
    parts.push(`<path d="${d}" fill="none" stroke="${col}" stroke-width="2.5"${dash}/>`);
    for (const p of s.pts) {
      parts.push(`<circle cx="${xOf(p.qd).toFixed(1)}" cy="${yOf(p.iops).toFixed(1)}" r="4" fill="${col}"/>`);
      const taken = labelled.get(p.qd) || [];
      let y = yOf(p.iops) - 6;
      while (taken.some((t) => Math.abs(t - y) < 12)) y -= 12;
      taken.push(y);
      labelled.set(p.qd, taken);
      text(xOf(p.qd) + 6, y, fmtIops(p.iops), `font-size="11" fill="${col}"`);
    }
    line(P1.x + P1.w + 80, ly, P1.x + P1.w + 115, ly, `stroke="${col}" stroke-width="2.5"${dash}`);
    text(P1.x + P1.w + 121, ly + 4, `${BACKEND_NAMES[s.b]}, ${DISKS[s.disk].label} disk`, 'font-size="13"');
    ly += 22;
  }

  // Panel 2: p50 / p99 / p99.9 per case, log y axis.
  const P2 = { x: 90, y: 440, w: 860, h: 300 };
  text(W / 2, P2.y - 30, 'Latency per workload: p50, p99, p99.9 (medians, microseconds, log scale)', 'text-anchor="middle" font-size="18" font-weight="bold"');
  const shown = cases.filter((c) => backends.some((b) => c.median[b]));
  const vals = shown.flatMap((c) => backends.flatMap((b) => (c.median[b] ? [c.median[b].p50, c.median[b].p99, c.median[b].p999] : []))).filter((v) => v > 0);
  const lo = Math.pow(10, Math.floor(Math.log10(Math.min(...vals, 10))));
  const hi = Math.pow(10, Math.ceil(Math.log10(Math.max(...vals, 100))));
  const yL = (v) => P2.y + P2.h - ((Math.log10(Math.max(v, lo)) - Math.log10(lo)) / (Math.log10(hi) - Math.log10(lo))) * P2.h;
  parts.push(`<rect x="${P2.x}" y="${P2.y}" width="${P2.w}" height="${P2.h}" fill="none" stroke="#999"/>`);
  for (let e = Math.log10(lo); e <= Math.log10(hi) + 1e-9; e++) {
    const y = yL(Math.pow(10, e));
    line(P2.x, y, P2.x + P2.w, y, 'stroke="#e5e5e5"');
    const v = Math.pow(10, e);
    text(P2.x - 8, y + 4, v >= 1000 ? `${v / 1000} ms` : `${v} us`, 'text-anchor="end" font-size="12"');
  }
  const groupW = P2.w / Math.max(1, shown.length);
  const nBars = backends.length * 3;
  const barW = Math.min(14, (groupW * 0.8) / nBars);
  shown.forEach((c, gi) => {
    const gx = P2.x + gi * groupW + (groupW - barW * nBars) / 2;
    backends.forEach((b, bi) => {
      const m = c.median[b];
      if (!m) return;
      [m.p50, m.p99, m.p999].forEach((v, qi) => {
        if (!(v > 0)) return;
        const x = gx + (bi * 3 + qi) * barW;
        const y = yL(v);
        parts.push(
          `<rect x="${x.toFixed(1)}" y="${y.toFixed(1)}" width="${(barW - 1).toFixed(1)}" height="${(P2.y + P2.h - y).toFixed(1)}" fill="${colors[b][qi]}"><title>${esc(
            `${BACKEND_NAMES[b]} ${c.id} ${['p50', 'p99', 'p99.9'][qi]}: ${fmtUs(v)} us`,
          )}</title></rect>`,
        );
      });
    });
    const lx = P2.x + gi * groupW + groupW / 2;
    const ty = P2.y + P2.h + 14;
    text(lx, ty, c.workload.label.replace(' x2 queues', ' 2q'), `text-anchor="end" font-size="11" transform="rotate(-35 ${lx.toFixed(1)} ${ty.toFixed(1)})"`);
    if (gi > 0) line(P2.x + gi * groupW, P2.y, P2.x + gi * groupW, P2.y + P2.h, 'stroke="#f0f0f0"');
    text(lx, P2.y + 14, DISKS[c.disk].label, 'text-anchor="middle" font-size="10" fill="#666"');
  });
  let lx = P2.x;
  const legY = P2.y + P2.h + 115;
  for (const b of backends) {
    ['p50', 'p99', 'p99.9'].forEach((q, qi) => {
      parts.push(`<rect x="${lx}" y="${legY - 10}" width="14" height="12" fill="${colors[b][qi]}"/>`);
      text(lx + 18, legY, `${BACKEND_NAMES[b]} ${q}`, 'font-size="12"');
      lx += 110;
    });
    lx += 20;
  }
  const H = legY + 25;
  return (
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif">\n` +
    `<rect width="100%" height="100%" fill="white"/>\n${parts.join('\n')}\n</svg>\n`
  );
}

// ---------------------------------------------------------------------------------------------
// Main.

function gitDescribe(dir = ROOT) {
  const r = spawnSync('git', ['-C', dir, 'describe', '--always', '--dirty'], { encoding: 'utf8', timeout: 10000 });
  return r.status === 0 ? r.stdout.trim() : null;
}

/** The best QSD file mode that works here: each candidate must pass a verified write/read run. */
async function probeQsdAio(ctx) {
  if (ctx.o.qsdAio !== 'auto') return ctx.o.qsdAio;
  const image = path.join(ctx.shm, `rnull-bench-${process.pid}-probe.img`);
  const socket = path.join(ctx.tmp, 'probe.sock');
  try {
    for (const mode of Object.keys(QSD_FILE_MODES)) {
      fs.writeFileSync(image, '');
      fs.truncateSync(image, 16 * 1024 * 1024);
      fs.rmSync(socket, { force: true });
      const child = startChild('qemu-storage-daemon', qsdArgs('mem', socket, 0, image, mode), { cwd: ctx.tmp });
      let ok = false;
      try {
        await waitSocket(child, socket, 10000, `QSD ${QSD_FILE_MODES[mode]} probe`);
        const r = await runClient(ctx, socket, 0, { rw: 'randrw', bs: 4096, qd: 4, queues: 1, ios: 256, verify: true }, path.join(ctx.tmp, 'probe.json'));
        ok = r.code === 0;
      } catch {
        ok = false;
      }
      await stopChild(child);
      if (ok) return mode;
      if (ctx.o.verbose) process.stdout.write(`bench: QSD ${QSD_FILE_MODES[mode]} does not work here: ${tail(child.out.stderr)}\n`);
    }
    return 'threads';
  } finally {
    fs.rmSync(image, { force: true });
    fs.rmSync(socket, { force: true });
  }
}

async function main() {
  installExitHandlers();
  const o = parseArgs(process.argv.slice(2));
  const cases0 = allCases();
  if (o.list) {
    for (const c of cases0) process.stdout.write(`${c.id}\n`);
    return 0;
  }
  const matches = (id, f) => (cases0.some((c) => c.id === f) ? id === f : id.includes(f));
  const selected = o.workloads === null ? cases0 : cases0.filter((c) => o.workloads.some((f) => matches(c.id, f)));
  if (selected.length === 0) throw new Error(`--workloads ${o.workloads.join(',')} matches no case (see --list)`);

  const qsdVersion = haveCommand('qemu-storage-daemon');
  let backends = o.backends;
  if (backends === null) {
    backends = qsdVersion ? ['rnull', 'qsd'] : ['rnull'];
    if (!qsdVersion) process.stdout.write('bench: qemu-storage-daemon not found: measuring rnull alone\n');
  } else if (backends.includes('qsd') && !qsdVersion) {
    throw new Error('--backends includes qsd but qemu-storage-daemon is not installed');
  }
  const ncpu = os.cpus().length;
  if (o.pin && (o.backendCpu >= ncpu || o.clientCpu >= ncpu)) {
    if (o.cpusGiven) throw new Error(`--backend-cpu ${o.backendCpu} / --client-cpu ${o.clientCpu}: this machine has ${ncpu} cpu(s)`);
    process.stdout.write(`bench: warning: ${ncpu} cpu(s): cannot give the back-end and the client a core each; running unpinned\n`);
    o.pin = false;
  }
  if (o.pin && !haveCommand('taskset', ['--version'])) throw new Error('taskset not found (util-linux); use --no-pin to run unpinned');
  // The baseline build runs right after rnull in every round, so each pair is taken side by side.
  if (o.baseline !== null) backends = [...backends.slice(0, backends.indexOf('rnull') + 1), 'base', ...backends.slice(backends.indexOf('rnull') + 1)];

  // Build.
  const mk = spawnSync('make', ['-s', '-C', CLIENT_DIR], { encoding: 'utf8', timeout: 300000 });
  if (mk.status !== 0) throw new Error(`make -C bench/client failed:\n${mk.stdout}${mk.stderr}`);
  if (o.build && backends.includes('rnull')) {
    const b = spawnSync(process.execPath, [path.join(ROOT, 'scripts', 'build-if-needed.js')], { stdio: 'inherit', timeout: 600000 });
    if (b.status !== 0) throw new Error('building rnull failed');
  }
  if (backends.includes('rnull') && !fs.existsSync(RNULL_MAIN)) throw new Error(`${RNULL_MAIN} is missing: run npm run build`);
  if (backends.includes('ceiling')) {
    const mc = spawnSync('make', ['-s', '-C', CEILING_DIR], { encoding: 'utf8', timeout: 300000 });
    if (mc.status !== 0) throw new Error(`make -C bench/ceiling failed:\n${mc.stdout}${mc.stderr}`);
  }

  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-bench-'));
  cleanups.push(() => fs.rmSync(tmp, { recursive: true, force: true }));
  const shm = fs.existsSync('/dev/shm') ? '/dev/shm' : tmp;
  const ctx = { o, tmp, shm, qsdAio: 'threads' };
  if (backends.includes('qsd') && selected.some((c) => c.disk === 'mem')) ctx.qsdAio = await probeQsdAio(ctx);

  const runs = new Map(selected.map((c) => [c.id, Object.fromEntries(backends.map((b) => [b, []]))]));
  const startedAt = new Date().toISOString();
  const loadStart = os.loadavg();
  const t0 = Date.now();
  const runsOf = (c) => backends.filter((b) => !(b === 'ceiling' && c.workload.noCeiling));
  const total = o.rounds * selected.reduce((n, c) => n + runsOf(c).length, 0);
  let done = 0;
  process.stdout.write(
    `bench: ${selected.length} case(s) x ${backends.length} back-end(s) x ${o.rounds} round(s), ${o.ramp}+${o.runtime} s each; ` +
      `back-ends ${o.pin ? `on cpu ${o.backendCpu}, client on cpu ${o.clientCpu}` : 'unpinned'}; load average ${loadStart.map((x) => x.toFixed(2)).join(' ')}\n`,
  );
  if (loadStart[0] > 0.5) process.stdout.write('bench: warning: the machine is not idle (load average above 0.5): expect noisy results\n');

  for (let round = 1; round <= o.rounds; round++) {
    for (const c of selected) {
      for (const b of runsOf(c)) {
        done++;
        const label = `[${done}/${total}] round ${round} ${c.id} ${BACKEND_NAMES[b]}`;
        const rec = { round, backend: b, summary: null, error: null, exit_code: null };
        let be = null;
        try {
          be = await startBackend(ctx, b, c.disk, c.workload.completionNs ?? 0);
          if (c.disk === 'mem') await precondition(ctx, be.socket, be.pid);
          const spec = { ...c.workload, runtime: o.runtime, ramp: o.ramp };
          const r = await runClient(ctx, be.socket, be.pid, spec, path.join(tmp, 'run.json'));
          rec.exit_code = r.code;
          if (r.json) {
            rec.client = r.json;
            if (r.code === 0) rec.summary = summarize(r.json);
          }
          if (r.code !== 0) {
            rec.error = `client exit ${r.code ?? r.signal}${r.timedOut ? ' (timed out)' : ''}: ${tail(r.stderr)}`;
          }
        } catch (e) {
          rec.error = e.message;
        } finally {
          if (be) await be.stop();
        }
        runs.get(c.id)[b].push(rec);
        if (rec.summary) {
          const s = rec.summary;
          process.stdout.write(
            `${label}: ${fmtIops(s.iops)} IOPS, p50 ${fmtUs(s.p50)} us, p99.9 ${fmtUs(s.p999)} us, CPU ${fmtCpu(s.cpu_us_per_io)} us/IO\n`,
          );
        } else {
          process.stdout.write(`${label}: FAILED: ${rec.error}\n`);
        }
      }
    }
  }

  // Aggregate.
  const cases = selected.map((c) => {
    const median = {};
    for (const b of backends) median[b] = caseMedians(runs.get(c.id)[b]);
    for (const b of backends) if (median[b].rounds_ok === 0) median[b] = null;
    const r = median.rnull;
    const q = median.qsd;
    return {
      id: c.id,
      disk: c.disk,
      workload: c.workload,
      median,
      ratio: { iops: r && q ? ratio(r.iops, q.iops) : null, cpu: r && q ? ratio(r.cpu_us_per_io, q.cpu_us_per_io) : null,
        ceiling: r && median.ceiling ? ratio(r.iops, median.ceiling.iops) : null,
        before: r && median.base ? ratio(r.iops, median.base.iops) : null, cpuBefore: r && median.base ? ratio(r.cpu_us_per_io, median.base.cpu_us_per_io) : null },
      runs: runs.get(c.id),
    };
  });
  const byId = new Map(cases.map((c) => [c.id, c]));
  const targets = backends.includes('rnull') && backends.includes('qsd') ? checkTargets(byId) : [];
  const loadEnd = os.loadavg();

  const table = markdownTable(cases, backends);
  const meta = {
    date: startedAt,
    duration_s: Math.round((Date.now() - t0) / 1000),
    host: os.hostname(),
    cpus: ncpu,
    cpu_model: os.cpus()[0] ? os.cpus()[0].model : null,
    kernel: os.release(),
    node: process.version,
    rnull_version: gitDescribe(),
    qsd_version: qsdVersion,
    qsd_file_mode: backends.includes('qsd') && selected.some((c) => c.disk === 'mem') ? QSD_FILE_MODES[ctx.qsdAio] : null,
    load_average_start: loadStart,
    load_average_end: loadEnd,
    options: { rnull_threads: o.rnullThreads, rnull_cpus: rnullCpus(o), rounds: o.rounds, runtime_s: o.runtime, ramp_s: o.ramp, size_mib: o.size, pin: o.pin, backend_cpu: o.backendCpu, client_cpu: o.clientCpu,
      timeout_ms: o.timeoutMs, backends, baseline: o.baseline, baseline_version: o.baseline === null ? null : gitDescribe(o.baseline), quick: o.quick },
    lifecycle: 'a fresh back-end process per run (round x case x back-end), on a fresh socket; memory-backed disks written once before the measured run',
    client: 'vhost-bench defaults: --wait call, --event-idx on, --ring-size 256 (512 for QD128), direct descriptors',
    cpu_metric: 'back-end CPU us/IO = sum over its threads of /proc/PID/task/*/schedstat run time over the measured window, divided by I/Os (utime+stime ticks as a fallback)',
  };

  const md = [];
  md.push('# rnull vs qemu-storage-daemon');
  md.push('');
  md.push(`${meta.date}, ${ncpu} cpus (${meta.cpu_model}), Linux ${meta.kernel}, Node ${meta.node}, rnull ${meta.rnull_version ?? '?'}, ${qsdVersion ?? 'no QSD'}.`);
  md.push(
    `Medians of ${o.rounds} interleaved round(s) of ${o.runtime} s (after ${o.ramp} s of warm-up); back-end ${o.pin ? `pinned to cpu ${o.backendCpu}, client to cpu ${o.clientCpu}` : 'and client unpinned'}; ` +
      `${o.size} MiB disks; QSD with an iothread${backends.includes('qsd') && selected.some((c) => c.disk === 'mem') ? `, file disk ${QSD_FILE_MODES[ctx.qsdAio]}` : ''}. ` +
      `Load average at start ${loadStart.map((x) => x.toFixed(2)).join(' ')}, at end ${loadEnd.map((x) => x.toFixed(2)).join(' ')}.`,
  );
  md.push('');
  md.push(table);
  md.push('');
  md.push('Ratios are rnull / QSD: above 1 is better for rnull for IOPS, below 1 is better for rnull for CPU per I/O.');
  if (backends.includes('ceiling')) md.push('', ceilingTable(cases, backends), '', 'rnull / ceiling: the share of the do-nothing back-end (bench/ceiling) rnull reaches.');
  if (backends.includes('base')) md.push('', `## Before and after: rnull ${meta.rnull_version ?? '?'} against ${o.baseline} (${meta.options.baseline_version ?? '?'})`, '', beforeAfterTable(cases));
  if (targets.length) {
    md.push('');
    md.push('## Targets');
    md.push('');
    md.push(targetsMarkdown(targets));
  }
  const failed = cases.flatMap((c) => backends.flatMap((b) => c.runs[b].filter((r) => r.error).map((r) => `- round ${r.round} ${c.id} ${BACKEND_NAMES[b]}: ${r.error}`)));
  if (failed.length) {
    md.push('');
    md.push('## Failed runs');
    md.push('');
    md.push(...failed);
  }
  const mdText = md.join('\n') + '\n';

  fs.mkdirSync(o.out, { recursive: true });
  fs.writeFileSync(path.join(o.out, 'results.md'), mdText);
  fs.writeFileSync(path.join(o.out, 'results.json'), JSON.stringify({ meta, cases, targets }, null, 2) + '\n');
  fs.writeFileSync(path.join(o.out, 'results.svg'), svgPlot(cases, backends));
  process.stdout.write('\n' + mdText);
  process.stdout.write(`\nbench: wrote ${path.join(o.out, 'results.md')}, results.json, results.svg\n`);
  return failed.length ? 1 : 0;
}

// For re-plotting a results.json: require('./bench/run.js').svgPlot(r.cases, r.meta.options.backends).
module.exports = { WORKLOADS, DISKS, median, checkTargets, markdownTable, svgPlot };

if (require.main === module) main().then(
  (code) => {
    killAll();
    process.exit(code);
  },
  (e) => {
    process.stderr.write(`bench: ${e && e.message ? e.message : String(e)}\n`);
    killAll();
    process.exit(2);
  },
);
