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
const T_GET_ID = 8;

function bench(plan, d) {
  const args = ['--socket', `/run/${d.key}.sock`, '--queues', '2', '--qd', '16', '--bs', '4096', '--rw', 'randrw', '--verify', '--runtime', '20', '--disk-size', String(16 << 20), '--timeout-ms', '20000', '--seed', String(d.nsid + 10), '--json', `/run/${d.key}-bench.json`, '--quiet'];
  const t = Date.now();
  const child = cp.spawn(plan.bench, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (x) => (out += x));
  child.stderr.on('data', (x) => (out += x));
  const done = new Promise((resolve) => child.on('exit', (code, signal) => {
    d.exitAt = Date.now();
    resolve({ status: code, signal });
  }));
  return Promise.race([done, deadline(240000).then(() => ({ status: 'hung' }))]).then((r) => {
    if (r.status === 'hung') child.kill('SIGKILL');
    val(`${d.key}_bench_status`, r.status);
    val(`${d.key}_bench_ms`, Date.now() - t);
    if (r.status !== 0) process.stdout.write(`vhost-bench ${d.key}: ${r.signal ?? ''}\n${out}\n`);
    try {
      const j = JSON.parse(fs.readFileSync(`/run/${d.key}-bench.json`, 'utf8'));
      val(`${d.key}_bench_iops`, Math.round(j.iops));
      val(`${d.key}_bench_ios`, j.ios);
      val(`${d.key}_bench_errors`, j.errors.total);
      val(`${d.key}_bench_verified`, j.verify.checked);
      val(`${d.key}_bench_mismatches`, j.verify.mismatches);
    } catch {
      val(`${d.key}_bench_json`, 'missing');
    }
  });
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
    for (const [i, w] of d.writes.entries()) {
      const data = patterned(w.seed, w.bytes);
      const s = await fe.blk(0, T_OUT, w.sector, { data });
      const r = await fe.blk(0, T_IN, w.sector, { readLen: w.bytes });
      val(`${k}_w${i}`, s.status === 0 && r.status === 0 && r.data.equals(data) ? 'same' : `status ${s.status}/${r.status} ${r.data.equals(data) ? 'same' : 'differs'}`);
    }
  } finally {
    fe.close();
  }
}

async function main() {
  const plan = JSON.parse(process.argv[2]);
  const config = {
    disks: plan.disks.map((d) => ({ name: d.key, driver: 'nvme', pci: plan.bdf, nsid: d.nsid, socket: `/run/${d.key}.sock`, num_queues: 2, io_timeout: 20000 })),
  };
  fs.writeFileSync('/run/ns.json', JSON.stringify(config));
  const logFile = '/run/ns.log';
  const out = fs.openSync(logFile, 'w');
  const t0 = Date.now();
  const child = cp.spawn(process.execPath, [path.join(dist, 'daemon/main.js'), '--config', '/run/ns.json', '--management-socket', '/run/ns.mgmt'], { stdio: ['ignore', out, out] });
  fs.closeSync(out);
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  try {
    await waitFor(() => plan.disks.every((d) => fs.existsSync(`/run/${d.key}.sock`)), 30000, 'the daemon\'s sockets');
    val('start_ms', Date.now() - t0);
    // Both disks at once: two verify runs, then two front-ends with the same guest-physical addresses.
    const t1 = Date.now();
    const benches = Promise.all(plan.disks.map((d) => bench(plan, d)));
    // A controller reset (through the first disk) while both disks' verify runs are going.
    await sleep(1000); // starting `rnull ctl` takes seconds more in the TCG guest
    const r = await new Promise((resolve) => cp.execFile(process.execPath, [path.join(dist, 'daemon/main.js'), 'ctl', '-m', '/run/ns.mgmt', 'reset', plan.disks[0].key], { timeout: 60000 }, (err, stdout, stderr) => resolve({ code: err ? err.code ?? 1 : 0, out: stdout + stderr })));
    val('reset_status', r.code);
    if (r.code !== 0) process.stdout.write(`ctl reset: ${r.out}\n`);
    await benches;
    val('benches_ms', Date.now() - t1);
    {
      // Landed while both ran: after both benches' memory tables were mapped, before either exited.
      const lines = fs.readFileSync(logFile, 'utf8').split('\n');
      const at = (re) => lines.filter((l) => re.test(l)).map((l) => JSON.parse(l).time);
      const done = at(/controller reset done/);
      const mapped = at(/guest memory mapped for DMA/);
      const firstExit = Math.min(...plan.disks.map((d) => d.exitAt ?? Infinity));
      val('reset_mid_run', done.length === 1 && mapped.length >= 2 && mapped[1] < done[0] && done[0] < firstExit ? 1 : 0);
    }
    const t2 = Date.now();
    await Promise.all(plan.disks.map((d) => frontend(d)));
    val('frontends_ms', Date.now() - t2);
    for (const d of plan.disks) {
      const ctl = cp.spawnSync(process.execPath, [path.join(dist, 'daemon/main.js'), 'ctl', '-m', '/run/ns.mgmt', 'stats', d.key], { encoding: 'utf8', timeout: 30000 });
      val(`${d.key}_ctl_status`, ctl.status);
      try {
        const queues = JSON.parse(ctl.stdout).queues;
        const sum = (f) => queues.reduce((n, q) => n + Number((q.nvme || {})[f] || 0), 0);
        val(`${d.key}_ctl_qids`, queues.map((q) => (q.nvme || {}).qid).join(','));
        for (const f of ['commands', 'resets', 'retries', 'errors', 'late', 'stale', 'in_flight']) val(`${d.key}_ctl_${f}`, sum(f));
      } catch {
        process.stdout.write(`ctl stats: ${ctl.stdout} ${ctl.stderr}\n`);
      }
    }
  } finally {
    child.kill('SIGTERM');
    const r = await Promise.race([exited, deadline(30000).then(() => ({ code: 'hung' }))]);
    if (r.code === 'hung') child.kill('SIGKILL');
    val('exit', r.code);
    const log = fs.readFileSync(logFile, 'utf8');
    val('bringups_logged', (log.match(/I\/O queue pairs granted/g) || []).length);
    val('shutdowns_logged', (log.match(/NVMe controller shut down/g) || []).length);
    val('namespaces_logged', (log.match(/NVMe namespace opened/g) || []).length);
    val('dma_mapped_logged', (log.match(/guest memory mapped for DMA/g) || []).length);
    val('errors_logged', (log.match(/"level":50/g) || []).length);
    val('warnings_logged', (log.match(/"level":40/g) || []).length);
    val('reset_warning_logged', (log.match(/resetting the controller: requested by rnull ctl/g) || []).length);
    const lines = log.split('\n');
    process.stdout.write(`--- daemon log: warnings and errors ---\n${lines.filter((l) => /"level":[4-6]0/.test(l)).slice(0, 20).join('\n')}\n--- daemon log (head) ---\n${lines.slice(0, 12).join('\n')}\n`);
  }
  val('done', 1);
}

main().catch((err) => {
  process.stdout.write(`nvme-ns-check failed: ${err.stack}\n`);
  process.exitCode = 1;
});
