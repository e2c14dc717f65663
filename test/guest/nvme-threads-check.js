#!/usr/bin/env node
// Runs INSIDE the NVMe test guest (nvme-guest.ts): the rnull daemon with --driver nvme
// --num-queues 2 --threads 2 (hardware queue 1 and its I/O queue pair, qid 2, on a worker
// thread) serves a namespace of a controller bound to vfio-pci:
//  - vhost-bench (bench/client) --verify on 2 queues, with `rnull ctl reset` in the middle of
//    the run (the reset stops both threads' queues, requeues and resubmits);
//  - the project's test front-end (test/helpers, built into dist/ by the host test) on 2 queues:
//    patterned writes through queue 0 (main thread) and queue 1 (worker thread), read back
//    through the other queue; the host test then finds them in the backing file;
//  - `rnull ctl stats`: which thread serves each queue, each queue pair's counters;
// then SIGTERM (clean controller shutdown).
//
//   node test/guest/nvme-threads-check.js '<json plan>'
// plan: { bench, bdf, nsid, writes: [{ sector, bytes, seed, queue }] }
// Output: "@@VAL name value" lines.
'use strict';
const cp = require('child_process');
const fs = require('fs');
const path = require('path');
const { val, patterned, sleep, deadline, waitFor } = require('./check-util');

const ROOT = path.join(__dirname, '..', '..');
const dist = path.join(ROOT, 'dist');
const { TestFrontend } = require(path.join(dist, 'test/helpers/frontend.js'));
const { GuestRam } = require(path.join(dist, 'test/helpers/guest-ram.js'));

const T_IN = 0;
const T_OUT = 1;

function ctl(args) {
  return new Promise((resolve) =>
    cp.execFile(process.execPath, [path.join(dist, 'daemon/main.js'), 'ctl', '-m', '/run/t.mgmt', ...args], { timeout: 60000 }, (err, stdout, stderr) =>
      resolve({ code: err ? err.code ?? 1 : 0, out: stdout, err: stderr }),
    ),
  );
}

async function main() {
  const plan = JSON.parse(process.argv[2]);
  const sock = '/run/t.sock';
  const logFile = '/run/t.log';
  const args = ['--driver', 'nvme', '--pci', plan.bdf, '--nsid', String(plan.nsid), '--socket', sock, '--num-queues', '2', '--threads', '2', '--io-timeout', '20000', '--management-socket', '/run/t.mgmt'];
  const out = fs.openSync(logFile, 'w');
  const t0 = Date.now();
  const d = cp.spawn(process.execPath, [path.join(dist, 'daemon/main.js'), ...args], { stdio: ['ignore', out, out] });
  fs.closeSync(out);
  const exited = new Promise((resolve) => d.on('exit', (code, signal) => resolve({ code, signal })));
  try {
    await waitFor(() => fs.existsSync(sock), 30000, 'the daemon\'s socket');
    val('start_ms', Date.now() - t0);
    // vhost-bench --verify on 2 queues; `rnull ctl reset` 1 s in.
    const t1 = Date.now();
    const benchArgs = ['--socket', sock, '--queues', '2', '--qd', '16', '--bs', '4096', '--rw', 'randrw', '--verify', '--runtime', String(plan.runtime), '--disk-size', String(16 << 20), '--timeout-ms', '20000', '--seed', '11', '--json', '/run/t-bench.json', '--quiet'];
    const child = cp.spawn(plan.bench, benchArgs, { stdio: ['ignore', 'pipe', 'pipe'] });
    let benchOut = '';
    child.stdout.on('data', (x) => (benchOut += x));
    child.stderr.on('data', (x) => (benchOut += x));
    let benchExitAt = Infinity;
    const benchDone = new Promise((resolve) =>
      child.on('exit', (code, signal) => {
        benchExitAt = Date.now();
        resolve({ status: code, signal });
      }),
    );
    await sleep(1000);
    const r = await ctl(['reset', 't']);
    val('reset_status', r.code);
    if (r.code !== 0) process.stdout.write(`ctl reset: ${r.out} ${r.err}\n`);
    const bench = await Promise.race([benchDone, deadline(180000).then(() => ({ status: 'hung' }))]);
    if (bench.status === 'hung') child.kill('SIGKILL');
    val('bench_status', bench.status);
    val('bench_ms', Date.now() - t1);
    if (bench.status !== 0) process.stdout.write(`vhost-bench: ${bench.signal ?? ''}\n${benchOut}\n`);
    // Mid-run: the daemon logged the reset done after the bench's memory table was mapped and
    // before the bench exited.
    const lines = fs.readFileSync(logFile, 'utf8').split('\n').filter((l) => l.startsWith('{'));
    const at = (re) => lines.filter((l) => re.test(l)).map((l) => JSON.parse(l).time);
    const done = at(/controller reset done/);
    const mapped = at(/guest memory mapped for DMA/);
    val('reset_bench_running', done.length === 1 && mapped.length >= 1 && mapped[0] < done[0] && done[0] < benchExitAt ? 1 : 0);
    try {
      const j = JSON.parse(fs.readFileSync('/run/t-bench.json', 'utf8'));
      val('bench_iops', Math.round(j.iops));
      val('bench_ios', j.ios);
      val('bench_errors', j.errors.total);
      val('bench_verified', j.verify.checked);
      val('bench_mismatches', j.verify.mismatches);
    } catch (err) {
      val('bench_json', 'missing');
    }
    // The test front-end on 2 queues: written through one queue, read back through the other.
    const ram = new GuestRam([{ gpa: 0, size: 16 << 20, uaddr: 0x7f0000000000 }]);
    const fe = new TestFrontend(sock, ram);
    try {
      await fe.setup({ queues: 2, queueSize: 64 });
      for (const [i, w] of plan.writes.entries()) {
        const data = patterned(w.seed, w.bytes);
        const s = await fe.blk(w.queue, T_OUT, w.sector, { data });
        const back = await fe.blk(1 - w.queue, T_IN, w.sector, { readLen: w.bytes });
        val(`w${i}`, s.status === 0 && back.status === 0 && back.data.equals(data) ? 'same' : `status ${s.status}/${back.status}`);
      }
    } finally {
      fe.close();
    }
    const st = await ctl(['stats', 't']);
    val('stats_status', st.code);
    try {
      const queues = JSON.parse(st.out).queues;
      queues.forEach((q, i) => {
        val(`q${i}_thread`, q.thread);
        const n = q.nvme || {};
        val(`q${i}_qid`, n.qid);
        for (const f of ['commands', 'resets', 'interrupts', 'errors', 'late', 'stale', 'in_flight']) val(`q${i}_${f}`, Number(n[f] || 0));
      });
    } catch (err) {
      process.stdout.write(`ctl stats: ${st.out} ${st.err}\n`);
    }
  } finally {
    d.kill('SIGTERM');
    const r = await Promise.race([exited, deadline(20000).then(() => ({ code: 'hung' }))]);
    if (r.code === 'hung') d.kill('SIGKILL');
    val('exit', r.code);
    const log = fs.readFileSync(logFile, 'utf8');
    val('shutdown_logged', /NVMe controller shut down/.test(log) ? 1 : 0);
    val('dma_mapped_logged', (log.match(/guest memory mapped for DMA/g) || []).length);
    val('errors_logged', (log.match(/"level":50/g) || []).length);
    const all = log.split('\n');
    process.stdout.write(`--- daemon log: warnings and errors ---\n${all.filter((l) => /"level":[4-6]0/.test(l)).slice(0, 20).join('\n')}\n--- daemon log (tail) ---\n${all.slice(-15).join('\n')}\n`);
  }
  val('done', 1);
}

main().catch((err) => {
  process.stdout.write(`nvme-threads-check failed: ${err.stack}\n`);
  process.exitCode = 1;
});
