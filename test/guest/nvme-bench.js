#!/usr/bin/env node
// Runs INSIDE the NVMe test guest (test/guest/nvme-guest.ts), started by bench/nvme.js: the same
// front-end (vhost-bench, bench/client) against several back-ends of one emulated NVMe controller
// bound to vfio-pci, interleaved: for every round, every workload, every back-end (A B C A B C):
//  - rnull:      `rnull --driver nvme` (MSI-X completions), rnull-poll: the same with --nvme-poll;
//                -db / -nodb suffixes (rnull-db, rnull-poll-nodb, ...): the same with --shadow-doorbells
//                true / false (the plain names take the daemon's default);
//  - qsd:        qemu-storage-daemon's `nvme` block driver on the same controller, exported as
//                vhost-user-blk from an iothread (its event loop polls adaptively);
//  - ceiling:    bench/ceiling's do-nothing back-end (touches no data: the ceiling).
// Each run: a fresh back-end pinned to cpu 0 (taskset), vhost-bench pinned to cpu 1 with
// --backend-pid, then SIGTERM (SIGKILL after 15 s). Every wait is bounded.
//
//   node test/guest/nvme-bench.js '<json plan>'
// plan: { bench, ceiling, bdf, nsid, sizeMiB, backends: [name], workloads: [{ id, args: [..] }],
//         rounds, runtime, ramp, qsdStartMs, qsdAttempts, cpuProf, nodeFlags: [rnull's node flags], rnullArgs: [more daemon arguments] }
// Output: one "@@RUN <json>" line per run, "@@VAL name value" lines, and with cpuProf a
// "@@BEGIN profile_<workload>" block per rnull run of round 1 (top functions by self time).
'use strict';
const cp = require('child_process');
const fs = require('fs');
const path = require('path');
const { val, sleep, deadline } = require('./check-util');

const ROOT = path.join(__dirname, '..', '..');
const MGMT = '/run/nb-mgmt.sock';

/** The back-end's command line (run under `taskset -c 0`). */
function backendCommand(plan, name, sock, profDir) {
  switch (name) {
    case 'rnull':
    case 'rnull-poll':
    case 'rnull-db':
    case 'rnull-poll-db':
    case 'rnull-nodb':
    case 'rnull-poll-nodb':
      return [
        process.execPath,
        ...(plan.nodeFlags ?? []),
        ...(profDir ? ['--cpu-prof', '--cpu-prof-interval', '2000', '--cpu-prof-dir', profDir] : []),
        path.join(ROOT, 'dist', 'daemon', 'main.js'),
        '--driver', 'nvme', '--pci', plan.bdf, '--nsid', String(plan.nsid), '--socket', sock,
        '--num-queues', '2', '--nvme-poll', name.startsWith('rnull-poll') ? 'true' : 'false', '--log-level', 'warn',
        ...(name.endsWith('-nodb') ? ['--shadow-doorbells', 'false'] : name.endsWith('-db') ? ['--shadow-doorbells', 'true'] : []),
        '--management-socket', MGMT, ...(plan.rnullArgs ?? []),
      ];
    case 'qsd':
      return [
        'qemu-storage-daemon',
        '--blockdev', `nvme,node-name=n0,device=${plan.bdf},namespace=${plan.nsid}`,
        '--object', 'iothread,id=io0',
        '--export', `type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=${sock},writable=on,num-queues=2,iothread=io0`,
      ];
    case 'ceiling':
      return [plan.ceiling, '--socket', sock, '--queues', '2', '--size', String(plan.sizeMiB), '--quiet'];
    default:
      throw new Error(`unknown back-end ${name}`);
  }
}

/** Starts a back-end and waits for its socket; null when it did not appear in time (killed). */
async function startBackend(plan, name, sock, log, profDir) {
  fs.rmSync(sock, { force: true });
  const out = fs.openSync(log, 'a');
  const child = cp.spawn('taskset', ['-c', '0', ...backendCommand(plan, name, sock, profDir)], { stdio: ['ignore', out, out] });
  fs.closeSync(out);
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  let gone = null;
  exited.then((r) => (gone = r));
  const limit = name === 'qsd' ? plan.qsdStartMs : profDir ? 240000 : 90000;
  const t0 = Date.now();
  while (!fs.existsSync(sock)) {
    if (gone !== null || Date.now() - t0 > limit) {
      const why = gone === null ? `no socket after ${limit} ms` : `exited ${JSON.stringify(gone)}`;
      if (gone === null) {
        child.kill('SIGKILL');
        await Promise.race([exited, deadline(10000)]);
      }
      return { ok: false, why, ms: Date.now() - t0 };
    }
    await sleep(20);
  }
  return { ok: true, child, exited, ms: Date.now() - t0 };
}

async function stopBackend(b) {
  b.child.kill('SIGTERM');
  let r = await Promise.race([b.exited, deadline(15000).then(() => null)]);
  if (r === null) {
    b.child.kill('SIGKILL');
    r = await Promise.race([b.exited, deadline(10000).then(() => ({ code: 'hung' }))]);
    r.killed = true;
  }
  return r;
}

function runBench(plan, w, sock, pid, json) {
  const args = ['--socket', sock, '--pin', '1', '--backend-pid', String(pid), '--runtime', String(plan.runtime), '--ramp', String(plan.ramp), '--timeout-ms', '15000', '--json', json, '--quiet', ...w.args];
  return new Promise((resolve) => {
    const child = cp.spawn(plan.bench, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (out += d));
    const limit = (plan.runtime + plan.ramp + 60) * 1000;
    const t = setTimeout(() => child.kill('SIGKILL'), limit);
    child.on('exit', (code, signal) => {
      clearTimeout(t);
      resolve({ code, signal, out });
    });
  });
}

/** rnull's per-queue NVMe counters (rnull ctl stats), summed over the queues; null if unavailable. */
function nvmeStats(disk) {
  const r = cp.spawnSync('taskset', ['-c', '1', process.execPath, path.join(ROOT, 'dist', 'daemon', 'main.js'), 'ctl', '-m', MGMT, 'stats', disk], { encoding: 'utf8', timeout: 60000 });
  try {
    const j = JSON.parse(r.stdout);
    const sum = {};
    for (const q of j.queues ?? [])
      for (const [k, v] of Object.entries(q.nvme ?? {})) if (typeof v === 'number' && k !== 'qid') sum[k] = (sum[k] ?? 0) + v;
    return sum;
  } catch {
    return { error: `${r.status} ${(r.stdout + r.stderr).slice(0, 300)}` };
  }
}

/** Top functions by self time from a V8 .cpuprofile. */
function summarizeProfile(file, fromUs, toUs, top = 30) {
  const p = JSON.parse(fs.readFileSync(file, 'utf8'));
  const byId = new Map(p.nodes.map((n) => [n.id, n]));
  const self = new Map();
  const dt = p.timeDeltas;
  let total = 0;
  let ts = p.startTime;
  for (let i = 0; i < p.samples.length; i++) {
    const d = dt[i] ?? 0;
    ts += d;
    if (ts < fromUs || ts > toUs) continue; // only the measured window
    const n = byId.get(p.samples[i]);
    total += d;
    const f = n.callFrame;
    const key = `${f.functionName || '(anonymous)'} ${f.url ? path.relative(ROOT, f.url.replace(/^file:\/\//, '')) : ''}:${f.lineNumber + 1}`;
    self.set(key, (self.get(key) ?? 0) + d);
  }
  const rows = [...self.entries()].sort((a, b) => b[1] - a[1]).slice(0, top);
  return [`${(total / 1000).toFixed(0)} ms sampled in the measured window`, ...rows.map(([k, us]) => `${((100 * us) / total).toFixed(1).padStart(5)} %  ${(us / 1000).toFixed(0).padStart(6)} ms  ${k}`)].join('\n');
}

async function oneRun(plan, round, w, name) {
  const sock = `/run/nb-${name}.sock`;
  const log = `/run/nb-${name}.log`;
  const json = `/run/nb-${name}-${w.id}-${round}.json`;
  const profDir = plan.cpuProf && name.startsWith('rnull') && round === 1 ? `/run/prof-${name}-${w.id}` : null;
  const rec = { round, workload: w.id, backend: name, ok: false };
  let attempts = 0;
  let b;
  for (;;) {
    attempts++;
    b = await startBackend(plan, name, sock, log, profDir);
    if (b.ok || name !== 'qsd' || attempts >= plan.qsdAttempts) break;
    process.stdout.write(`qsd start attempt ${attempts}: ${b.why}; retrying\n`);
  }
  rec.start_ms = b.ms;
  rec.attempts = attempts;
  if (!b.ok) {
    rec.failure = `start: ${b.why}`;
    rec.log_tail = fs.existsSync(log) ? fs.readFileSync(log, 'utf8').split('\n').slice(-8).join('\n') : '';
    return rec;
  }
  try {
    const nowUs = () => Number(process.hrtime.bigint() / 1000n); // CLOCK_MONOTONIC, as V8's profile timestamps
    const benchFrom = nowUs() + plan.ramp * 1e6;
    const r = await runBench(plan, w, sock, b.child.pid, json);
    rec.window_us = [benchFrom, nowUs()];
    rec.bench_status = r.code ?? r.signal;
    if (name.startsWith('rnull') && round === 1) rec.nvme = nvmeStats(path.basename(sock, '.sock'));
    if (r.code !== 0) rec.bench_out = r.out.slice(-1500);
    if (fs.existsSync(json)) {
      const j = JSON.parse(fs.readFileSync(json, 'utf8'));
      rec.ok = r.code === 0 && j.errors.total === 0;
      rec.iops = j.iops;
      rec.ios = j.ios;
      rec.lat_us = j.lat_us;
      rec.cpu_us_per_io = j.backend_cpu_us_per_io ? j.backend_cpu_us_per_io.schedstat : null;
      rec.backend_util = j.backend_cpu ? j.backend_cpu.utilization : null;
      if (j.backend_cpu) rec.backend_cpu = j.backend_cpu; // window, ticks (user+system), main thread
      rec.errors = j.errors.total;
      rec.notifications = j.notifications;
      rec.warnings = j.warnings;
    } else rec.failure = 'no JSON from vhost-bench';
  } finally {
    const s = await stopBackend(b);
    rec.exit = s.code ?? s.signal;
    if (s.killed) rec.killed = true;
  }
  if (profDir && fs.existsSync(profDir)) {
    const f = fs.readdirSync(profDir).find((x) => x.endsWith('.cpuprofile'));
    if (f) process.stdout.write(`\n@@BEGIN profile_${name}_${w.id}\n${summarizeProfile(path.join(profDir, f), rec.window_us[0], rec.window_us[1])}\n@@END profile_${name}_${w.id}\n`);
  }
  return rec;
}

async function main() {
  const plan = JSON.parse(process.argv[2]);
  const t0 = Date.now();
  val('cpus', require('os').cpus().length);
  val('clocksource', fs.readFileSync('/sys/devices/system/clocksource/clocksource0/current_clocksource', 'utf8').trim());
  for (let round = 1; round <= plan.rounds; round++) {
    for (const w of plan.workloads) {
      for (const name of plan.backends) {
        const rec = await oneRun(plan, round, w, name);
        process.stdout.write(`\n@@RUN ${JSON.stringify(rec)}\n`);
        process.stdout.write(`# round ${round} ${w.id} ${name}: ${rec.ok ? `${Math.round(rec.iops)} IOPS p50 ${rec.lat_us.p50.toFixed(1)} us cpu ${rec.cpu_us_per_io?.toFixed(2)} us/IO` : `FAILED ${rec.failure ?? rec.bench_status}`} (start ${rec.start_ms} ms)\n`);
      }
    }
  }
  for (const name of plan.backends) {
    const log = `/run/nb-${name}.log`;
    if (fs.existsSync(log)) {
      const lines = fs.readFileSync(log, 'utf8').split('\n').filter((l) => l.trim() !== '');
      process.stdout.write(`--- ${name} log (last lines of ${lines.length}) ---\n${lines.slice(-6).join('\n')}\n`);
    }
  }
  val('bench_seconds', ((Date.now() - t0) / 1000).toFixed(1));
  val('done', 1);
}

main().catch((err) => {
  process.stdout.write(`nvme-bench failed: ${err.stack}\n`);
  process.exitCode = 1;
});
