#!/usr/bin/env node
// Runs INSIDE the NVMe test guest (nvme-guest.ts): the timeout ladder against QEMU's emulated
// controller whose backing drive is throttled (-drive throttling.iops-total=R, set by the host
// test). The daemon serves the namespace with a short io_timeout T on one queue; the project's
// test front-end then
//  1. writes a few blocks one at a time (light load: each waits ~1/R s, well under T);
//  2. offers a burst of B writes at once (B/R s for the last, well over T): the oldest requests
//     time out -> CSTS read, CQ reaped, Abort (QEMU 7.2 answers "not aborted") -> controller
//     reset (CC.EN=0, RDY=0; QEMU finishes the throttled commands first) -> every outstanding
//     request resubmitted with a fresh timeout; the rest fits under T;
//  3. checks the used ring: every head of the burst exactly once, status OK, and nothing more
//     after a quiet period (none completed twice);
//  4. the same burst as reads, each block's data checked; then every block read back one at a
//     time (the verify run);
//  5. `rnull ctl stats`: timeouts, aborts, resets, retries; SIGTERM, clean shutdown.
//
//   node test/guest/nvme-timeout-check.js '<json plan>'
// plan: { bdf, nsid, ioTimeoutMs, burst, light, baseSector }
// Output: "@@VAL name value" lines.
'use strict';
const fs = require('fs');
const { val, patterned, sleep, waitFor } = require('./check-util');
const { T_IN, T_OUT, frontendHelpers, runCheck, startDaemon, stopDaemon, ctlStats, logCount, printLog } = require('./check-daemon');

const { TestFrontend, GuestRam, blkHeader } = frontendHelpers();
const BLOCK = 4096;

/**
 * Offers `n` requests at once (one kick): block i at sector base + 8i, written with pattern
 * seed i (write) or read into its own buffer (read). Waits for n used entries, then a quiet
 * period; returns what the used ring held, statuses and read data.
 */
async function burst(fe, k, write, n, base) {
  const ram = fe.ram;
  const ring = fe.rings[0];
  ring.takeUsed();
  const start = ring.usedIdx();
  const reqs = [];
  for (let i = 0; i < n; i++) {
    const hdr = ram.alloc(16);
    ram.bytes(hdr, 16).set(blkHeader(write ? T_OUT : T_IN, base + i * 8));
    const data = ram.alloc(BLOCK, 4096);
    if (write) ram.bytes(data, BLOCK).set(patterned(i, BLOCK));
    else ram.bytes(data, BLOCK).fill(0xee);
    const st = ram.alloc(1, 1);
    ram.bytes(st, 1)[0] = 0xff;
    const head = ring.addChain([{ addr: hdr, len: 16 }, { addr: data, len: BLOCK, write: !write }, { addr: st, len: 1, write: true }]);
    reqs.push({ head, data, st });
  }
  const t = Date.now();
  fe.kick(0);
  await fe.waitUsedIdx(0, (start + n) & 0xffff, 120000);
  val(`${k}_ms`, Date.now() - t);
  await sleep(3000); // anything completed twice would show up as more used entries
  const used = ring.takeUsed();
  val(`${k}_used`, used.length);
  const heads = new Map(reqs.map((r) => [r.head, 0]));
  let unknown = 0;
  for (const u of used) {
    if (heads.has(u.id)) heads.set(u.id, heads.get(u.id) + 1);
    else unknown++;
  }
  val(`${k}_heads_once`, [...heads.values()].filter((c) => c === 1).length);
  val(`${k}_heads_twice`, [...heads.values()].filter((c) => c > 1).length + unknown);
  val(`${k}_status_ok`, reqs.filter((r) => ram.bytes(r.st, 1)[0] === 0).length);
  if (!write) val(`${k}_data_ok`, reqs.filter((r, i) => Buffer.from(ram.bytes(r.data, BLOCK)).equals(patterned(i, BLOCK))).length);
}

async function stats(k) {
  const { queues } = await ctlStats('/run/t.mgmt', 't');
  if (queues === null) return;
  const q = queues[0].nvme;
  for (const f of ['commands', 'timeouts', 'aborts', 'resets', 'retries', 'errors', 'late', 'stale', 'in_flight']) val(`${k}_${f}`, q[f]);
}

runCheck('nvme-timeout-check', async (plan) => {
  const logFile = '/run/t.log';
  const args = ['--driver', 'nvme', '--pci', plan.bdf, '--nsid', String(plan.nsid), '--socket', '/run/t.sock', '--num-queues', '1', '--io-timeout', String(plan.ioTimeoutMs), '--management-socket', '/run/t.mgmt', '--shadow-doorbells', 'true'];
  const daemon = startDaemon(args, logFile);
  const ram = new GuestRam([{ gpa: 0, size: 32 << 20, uaddr: 0x7f0000000000 }]);
  let fe = null;
  try {
    await waitFor(() => fs.existsSync('/run/t.sock'), 30000, 'the daemon\'s socket');
    fe = new TestFrontend('/run/t.sock', ram);
    await fe.setup({ queues: 1, queueSize: 512 }); // a burst of B chains of 3 descriptors
    // 1. Light load: one at a time, each well under the timeout.
    let lightMax = 0;
    const lightBase = plan.baseSector + plan.burst * 8 + 64;
    for (let i = 0; i < plan.light; i++) {
      const t = Date.now();
      const s = await fe.blk(0, T_OUT, lightBase + i * 8, { data: patterned(100 + i, BLOCK) });
      if (i === 0) val('light_first_ms', Date.now() - t); // includes the front-end's warm-up
      else lightMax = Math.max(lightMax, Date.now() - t);
      if (s.status !== 0) val(`light_status_${i}`, s.status);
    }
    val('light_max_ms', lightMax);
    await stats('after_light');
    // 2./3. A burst of writes over the timeout.
    await burst(fe, 'wburst', true, plan.burst, plan.baseSector);
    await stats('after_wburst');
    // 4. The same burst as reads; then the verify run, one block at a time.
    await burst(fe, 'rburst', false, plan.burst, plan.baseSector);
    await stats('after_rburst');
    let same = 0;
    for (let i = 0; i < plan.burst; i++) {
      const r = await fe.blk(0, T_IN, plan.baseSector + i * 8, { readLen: BLOCK });
      if (r.status === 0 && r.data.equals(patterned(i, BLOCK))) same++;
    }
    for (let i = 0; i < plan.light; i++) {
      const r = await fe.blk(0, T_IN, lightBase + i * 8, { readLen: BLOCK });
      if (r.status === 0 && r.data.equals(patterned(100 + i, BLOCK))) same++;
    }
    val('verified_same', same);
    await stats('final');
  } finally {
    if (fe !== null) fe.close();
    val('exit', await stopDaemon(daemon, 30000));
    const log = fs.readFileSync(logFile, 'utf8');
    val('abort_logged', logCount(log, /sending Abort/g));
    val('not_aborted_logged', logCount(log, /answered \\"not aborted\\"/g));
    val('reset_logged', logCount(log, /resetting the controller/g));
    val('reset_done_logged', logCount(log, /controller reset done/g));
    val('failed_logged', logCount(log, /failed after \d+ controller resets/g));
    val('shutdown_logged', /NVMe controller shut down/.test(log) ? 1 : 0);
    val('errors_logged', logCount(log, /"level":50/g));
    val('dbbc_logged', logCount(log, /Doorbell Buffer Config accepted/g));
    printLog('daemon', log, { max: 30, tail: 0 });
  }
});
