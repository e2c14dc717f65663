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
const fs = require('fs');
const { val, sleep, waitFor } = require('./check-util');
const { frontendHelpers, runCheck, startDaemon, stopDaemon, ctl, ctlStats, verifyArgs, runBench, reportBench, resetMidRun, writeReadBack, logCount, printLog } = require('./check-daemon');

const { TestFrontend, GuestRam } = frontendHelpers();
const MGMT = '/run/t.mgmt';

runCheck('nvme-threads-check', async (plan) => {
  const sock = '/run/t.sock';
  const logFile = '/run/t.log';
  const args = ['--driver', 'nvme', '--pci', plan.bdf, '--nsid', String(plan.nsid), '--socket', sock, '--num-queues', '2', '--threads', '2', '--io-timeout', '20000', '--management-socket', MGMT, '--shadow-doorbells', 'true'];
  const d = startDaemon(args, logFile);
  try {
    await waitFor(() => fs.existsSync(sock), 30000, 'the daemon\'s socket');
    val('start_ms', Date.now() - d.startedAt);
    // vhost-bench --verify on 2 queues; `rnull ctl reset` 1 s in.
    const bench = runBench(plan.bench, verifyArgs({ socket: sock, json: '/run/t-bench.json', seed: 11, runtime: plan.runtime }), 180000);
    await sleep(1000);
    const r = await ctl(MGMT, ['reset', 't']);
    val('reset_status', r.code);
    if (r.code !== 0) process.stdout.write(`ctl reset: ${r.out} ${r.err}\n`);
    const b = await bench;
    reportBench('', b, '/run/t-bench.json');
    // Mid-run: the daemon logged the reset done after the bench's memory table was mapped and
    // before the bench exited.
    val('reset_bench_running', resetMidRun(logFile, 1, b.exitAt).midRun);
    // The test front-end on 2 queues: written through one queue, read back through the other.
    const ram = new GuestRam([{ gpa: 0, size: 16 << 20, uaddr: 0x7f0000000000 }]);
    const fe = new TestFrontend(sock, ram);
    try {
      await fe.setup({ queues: 2, queueSize: 64 });
      await writeReadBack(fe, '', plan.writes, (w) => 1 - w.queue);
    } finally {
      fe.close();
    }
    const st = await ctlStats(MGMT, 't');
    val('stats_status', st.code);
    (st.queues ?? []).forEach((q, i) => {
      val(`q${i}_thread`, q.thread);
      const n = q.nvme || {};
      val(`q${i}_qid`, n.qid);
      for (const f of ['commands', 'resets', 'interrupts', 'errors', 'late', 'stale', 'in_flight', 'shadow_doorbells']) val(`q${i}_${f}`, Number(n[f] || 0));
    });
  } finally {
    val('exit', await stopDaemon(d, 20000));
    const log = fs.readFileSync(logFile, 'utf8');
    val('shutdown_logged', /NVMe controller shut down/.test(log) ? 1 : 0);
    val('dma_mapped_logged', logCount(log, /guest memory mapped for DMA/g));
    val('errors_logged', logCount(log, /"level":50/g));
    val('dbbc_logged', logCount(log, /Doorbell Buffer Config accepted/g));
    printLog('daemon', log);
  }
});
