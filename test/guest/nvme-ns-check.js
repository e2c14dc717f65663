#!/usr/bin/env node
// Runs INSIDE the NVMe test guest (nvme-guest.ts): one rnull daemon serves two namespaces of
// ONE controller as two disks (a config file with two disks naming the same pci), each on its own
// vhost-user socket, sharing the controller's I/O queue pairs and tag set:
//  - two vhost-bench --verify runs at once, one per disk (every read checked against what was
//    written through that disk);
//  - two test front-ends at once, one per disk, whose guest memory has the SAME guest-physical
//    addresses (so only distinct IOVAs keep them apart): patterned writes the host test then
//    finds in each namespace's backing file, read back byte for byte;
//    with `rnull ctl reset` of the first disk while both run (the shared controller is reset:
//    both disks' requests in flight are resubmitted);
//  - `rnull ctl stats` of both disks (the same queue pairs);
//  - SIGTERM: one clean controller shutdown.
//
//   node test/guest/nvme-ns-check.js '<json plan>'
// plan: { bench, bdf, disks: [{ key, nsid, blockSize, writes: [{ sector, bytes, seed }] }] }
// Output: "@@VAL name value" lines.
'use strict';
const fs = require('fs');
const { val, sleep, waitFor } = require('./check-util');
const { T_GET_ID, frontendHelpers, runCheck, startDaemon, stopDaemon, ctl, ctlStats, verifyArgs, runBench, reportBench, resetMidRun, writeReadBack, logCount, printLog } = require('./check-daemon');

const { TestFrontend, GuestRam } = frontendHelpers();
const MGMT = '/run/ns.mgmt';

async function bench(plan, d) {
  const r = await runBench(plan.bench, verifyArgs({ socket: `/run/${d.key}.sock`, json: `/run/${d.key}-bench.json`, seed: d.nsid + 10, runtime: 20 }), 240000);
  d.exitAt = r.exitAt;
  reportBench(`${d.key}_`, r, `/run/${d.key}-bench.json`);
}

async function frontend(d) {
  const k = d.key;
  // The same guest-physical layout for both disks' front-ends.
  const ram = new GuestRam([{ gpa: 0, size: 8 << 20, uaddr: 0x7f0000000000 }]);
  const fe = new TestFrontend(`/run/${k}.sock`, ram);
  try {
    await fe.setup({ queues: 1, queueSize: 128 });
    const cfg = (await fe.getConfig(0, 60)).subarray(12);
    val(`${k}_capacity_sectors`, Number(cfg.readBigUInt64LE(0)));
    val(`${k}_blk_size`, cfg.readUInt32LE(20));
    const id = await fe.blk(0, T_GET_ID, 0, { readLen: 20 });
    val(`${k}_serial`, id.data.toString('latin1').replace(/\0+$/, ''));
    await writeReadBack(fe, `${k}_`, d.writes);
  } finally {
    fe.close();
  }
}

runCheck('nvme-ns-check', async (plan) => {
  const config = {
    disks: plan.disks.map((d) => ({ name: d.key, driver: 'nvme', pci: plan.bdf, nsid: d.nsid, socket: `/run/${d.key}.sock`, num_queues: 2, io_timeout: 20000 })),
  };
  fs.writeFileSync('/run/ns.json', JSON.stringify(config));
  const logFile = '/run/ns.log';
  const daemon = startDaemon(['--config', '/run/ns.json', '--management-socket', MGMT], logFile);
  try {
    await waitFor(() => plan.disks.every((d) => fs.existsSync(`/run/${d.key}.sock`)), 30000, 'the daemon\'s sockets');
    val('start_ms', Date.now() - daemon.startedAt);
    // Both disks at once: two verify runs, then two front-ends with the same guest-physical addresses.
    const t1 = Date.now();
    const benches = Promise.all(plan.disks.map((d) => bench(plan, d)));
    // A controller reset (through the first disk) while both disks' verify runs are going.
    await sleep(1000); // starting `rnull ctl` takes seconds more in the TCG guest
    const r = await ctl(MGMT, ['reset', plan.disks[0].key]);
    val('reset_status', r.code);
    if (r.code !== 0) process.stdout.write(`ctl reset: ${r.out}${r.err}\n`);
    await benches;
    val('benches_ms', Date.now() - t1);
    // Landed while both ran: after both benches' memory tables were mapped, before either exited.
    val('reset_mid_run', resetMidRun(logFile, 2, Math.min(...plan.disks.map((d) => d.exitAt ?? Infinity))).midRun);
    const t2 = Date.now();
    await Promise.all(plan.disks.map((d) => frontend(d)));
    val('frontends_ms', Date.now() - t2);
    for (const d of plan.disks) {
      const st = await ctlStats(MGMT, d.key);
      val(`${d.key}_ctl_status`, st.code);
      if (st.queues === null) continue;
      const sum = (f) => st.queues.reduce((n, q) => n + Number((q.nvme || {})[f] || 0), 0);
      val(`${d.key}_ctl_qids`, st.queues.map((q) => (q.nvme || {}).qid).join(','));
      for (const f of ['commands', 'resets', 'retries', 'errors', 'late', 'stale', 'in_flight']) val(`${d.key}_ctl_${f}`, sum(f));
    }
  } finally {
    val('exit', await stopDaemon(daemon, 30000));
    const log = fs.readFileSync(logFile, 'utf8');
    val('bringups_logged', logCount(log, /I\/O queue pairs granted/g));
    val('shutdowns_logged', logCount(log, /NVMe controller shut down/g));
    val('namespaces_logged', logCount(log, /NVMe namespace opened/g));
    val('dma_mapped_logged', logCount(log, /guest memory mapped for DMA/g));
    val('errors_logged', logCount(log, /"level":50/g));
    val('warnings_logged', logCount(log, /"level":40/g));
    val('reset_warning_logged', logCount(log, /resetting the controller: requested by rnull ctl/g));
    printLog('daemon', log, { head: 12 });
  }
});
