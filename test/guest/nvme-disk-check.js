#!/usr/bin/env node
// Runs INSIDE the NVMe test guest (nvme-guest.ts): the rnull daemon with --driver nvme serves
// a namespace of a controller bound to vfio-pci, and front-ends drive it over vhost-user:
//  - vhost-bench (bench/client, built on the host) with --verify: random writes and reads on
//    2 queues, every read checked against what was written;
//  - the project's test front-end (test/helpers, transpiled to dist/test/helpers by the host
//    test): GET_ID, patterned writes the host test then finds in the backing file, chains with
//    unaligned inner segments (split into several commands), blocks straddling an unaligned
//    junction (bounce buffer) and chains larger than the transfer limit, read back byte for
//    byte, FLUSH, DISCARD and WRITE_ZEROES.
// Then the daemon is stopped with SIGTERM (clean controller shutdown). Start-up refusals (a
// missing namespace, a device not on vfio-pci) are checked for exit status 2.
//
//   node test/guest/nvme-disk-check.js '<json plan>'
// plan: { bench, cases: [{ key, bdf, nsid, blockSize, poll, writes: [{ sector, bytes, seed }] }],
//         missingNsid: { bdf, nsid }, unbound: bdf }
// Output: "@@VAL name value" lines.
'use strict';
const cp = require('child_process');
const fs = require('fs');
const { val, patterned, sleep, waitFor } = require('./check-util');
const { MAIN, T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES, frontendHelpers, runCheck, startDaemon, stopDaemon, ctl, ctlStats, verifyArgs, runBench, reportBench, resetMidRun, writeReadBack, logCount, printLog } = require('./check-daemon');

const { TestFrontend, GuestRam, blkHeader } = frontendHelpers();

/** One request as an explicit chain: header, data pieces [gpa, len] (device-readable for OUT), status. */
async function chain(fe, type, sector, pieces, write) {
  const ram = fe.ram;
  const ring = fe.rings[0];
  const hdr = ram.alloc(16);
  ram.bytes(hdr, 16).set(blkHeader(type, sector));
  const st = ram.alloc(1, 1);
  ram.bytes(st, 1)[0] = 0xff;
  const bufs = [{ addr: hdr, len: 16 }, ...pieces.map(([addr, len]) => ({ addr, len, write: !write })), { addr: st, len: 1, write: true }];
  const target = (ring.usedIdx() + 1) & 0xffff;
  ring.takeUsed();
  ring.addChain(bufs);
  fe.kick(0);
  await fe.waitUsedIdx(0, target, 20000);
  ring.takeUsed();
  return ram.bytes(st, 1)[0];
}

/** Pieces of `total` bytes laid out by `lens`, each at `misalign` bytes past a page start. */
function layout(ram, lens, misalign) {
  return lens.map((len, i) => {
    const a = ram.alloc(len + 8192, 4096) + (i === 0 ? 0 : misalign[i] ?? 0);
    return [a, len];
  });
}

function gather(ram, pieces) {
  return Buffer.concat(pieces.map(([a, l]) => Buffer.from(ram.bytes(a, l))));
}
function scatter(ram, pieces, data) {
  let off = 0;
  for (const [a, l] of pieces) {
    ram.bytes(a, l).set(data.subarray(off, off + l));
    off += l;
  }
}

async function frontendChecks(c, sock) {
  const k = c.key;
  const bs = c.blockSize;
  const ram = new GuestRam([
    { gpa: 0, size: 24 << 20, uaddr: 0x7f0000000000 },
    { gpa: 0x100000000, size: 4 << 20, uaddr: 0x7f1000000000 },
  ]);
  const fe = new TestFrontend(sock, ram);
  try {
    await fe.setup({ queues: 1, queueSize: 256 });
    const cfg = (await fe.getConfig(0, 60)).subarray(12); // after the offset, size, flags words
    val(`${k}_capacity_sectors`, Number(cfg.readBigUInt64LE(0)));
    val(`${k}_size_max`, cfg.readUInt32LE(8));
    val(`${k}_seg_max`, cfg.readUInt32LE(12));
    val(`${k}_blk_size`, cfg.readUInt32LE(20));
    val(`${k}_features`, `0x${fe.features.toString(16)}`);
    const id = await fe.blk(0, T_GET_ID, 0, { readLen: 20 });
    val(`${k}_get_id_status`, id.status);
    val(`${k}_serial`, id.data.toString('latin1').replace(/\0+$/, ''));

    // Patterned writes (the host finds them in the backing file), read back.
    await writeReadBack(fe, `${k}_`, c.writes);

    // Chains PRPs cannot describe as one command: unaligned inner segments, split at block
    // boundaries; written and read through such chains and through plain ones, byte for byte.
    const cases =
      bs === 512
        ? [
            { name: 'unaligned_inner', lens: [1024, 1536, 2560, 512], mis: [0, 512, 1024, 3584] },
            { name: 'odd_first', lens: [3072, 4096, 1024], mis: [0, 0, 512] },
          ]
        : [
            { name: 'unaligned_inner', lens: [4096, 8192, 4096], mis: [0, 256, 2048] },
            { name: 'odd_first', lens: [8192, 4096], mis: [0, 1024] },
          ];
    let sector = 8192;
    for (const x of cases) {
      const total = x.lens.reduce((a, b) => a + b, 0);
      const data = patterned(sector & 0xff, total);
      const wp = layout(ram, x.lens, x.mis);
      if (x.name === 'odd_first') wp[0][0] += 0x200; // first segment not page aligned either
      scatter(ram, wp, data);
      const ws = await chain(fe, T_OUT, sector, wp, true);
      const plain = await fe.blk(0, T_IN, sector, { readLen: total });
      const rp = layout(ram, x.lens.slice().reverse(), x.mis);
      for (const [a, l] of rp) ram.bytes(a, l).fill(0xee);
      const rs = await chain(fe, T_IN, sector, rp, false);
      const back = gather(ram, rp);
      val(`${k}_${x.name}`, ws === 0 && rs === 0 && plain.status === 0 && plain.data.equals(data) && back.equals(data) ? 'same' : `status ${ws}/${plain.status}/${rs}`);
      sector += total / 512 + 64;
    }
    // A block straddling an unaligned junction: no PRP split can express it, so the command goes
    // through a bounce buffer; written and read through such chains, byte for byte.
    {
      const data = patterned(99, bs);
      const wp = layout(ram, [bs / 2, bs / 2], [0, 100 * 4]);
      scatter(ram, wp, data);
      const ws = await chain(fe, T_OUT, 16384, wp, true);
      const plain = await fe.blk(0, T_IN, 16384, { readLen: bs });
      const rp = layout(ram, [bs / 4, (3 * bs) / 4], [0, 36]);
      for (const [a, l] of rp) ram.bytes(a, l).fill(0xee);
      const rs = await chain(fe, T_IN, 16384, rp, false);
      val(`${k}_straddle`, ws === 0 && rs === 0 && plain.status === 0 && plain.data.equals(data) && gather(ram, rp).equals(data) ? 'same' : `status ${ws}/${plain.status}/${rs}`);
    }
    // Larger than the transfer limit: 4 x 256 KiB segments (1 MiB) in one request.
    {
      const big = patterned(77, 1 << 20);
      const pieces = layout(ram, [262144, 262144, 262144, 262144], [0, 0, 0, 0]);
      scatter(ram, pieces, big);
      const ws = await chain(fe, T_OUT, 20480, pieces, true);
      const r = await fe.blk(0, T_IN, 20480, { readLen: 1 << 20 });
      val(`${k}_big`, ws === 0 && r.status === 0 && r.data.equals(big) ? 'same' : `status ${ws}/${r.status}`);
    }
    // FLUSH, DISCARD (reads zeroes afterwards on QEMU's controller), WRITE_ZEROES (+ UNMAP).
    val(`${k}_flush_status`, (await fe.blk(0, T_FLUSH, 0)).status);
    const dz = async (type, sector, sectors, flags) => {
      const seg = Buffer.alloc(16);
      seg.writeBigUInt64LE(BigInt(sector), 0);
      seg.writeUInt32LE(sectors, 8);
      seg.writeUInt32LE(flags, 12);
      return (await fe.blk(0, type, 0, { data: seg })).status;
    };
    for (const [name, type, flags] of [['discard', T_DISCARD, 0], ['write_zeroes', T_WRITE_ZEROES, 0], ['write_zeroes_unmap', T_WRITE_ZEROES, 1]]) {
      const at = name === 'discard' ? 30000 : name === 'write_zeroes' ? 31000 : 32000;
      await fe.blk(0, T_OUT, at, { data: patterned(5, 65536) });
      const st = await dz(type, at + 16, 64, flags); // 32 KiB from 8 KiB in
      const r = await fe.blk(0, T_IN, at, { readLen: 65536 });
      const zero = r.data.subarray(8192, 8192 + 32768).every((b) => b === 0);
      const kept = r.data.subarray(0, 8192).equals(patterned(5, 65536).subarray(0, 8192)) && r.data.subarray(40960).equals(patterned(5, 65536).subarray(40960));
      val(`${k}_${name}`, `${st}:${zero ? 'zero' : 'data'}:${kept ? 'kept' : 'lost'}`);
    }
  } finally {
    fe.close();
  }
}

async function runCase(plan, c) {
  const k = c.key;
  const sock = `/run/${k}.sock`;
  const logFile = `/run/${k}.log`;
  const mgmt = `/run/${k}.mgmt`;
  const args = ['--driver', 'nvme', '--pci', c.bdf, '--nsid', String(c.nsid), '--socket', sock, '--num-queues', '2', '--nvme-poll', String(c.poll), '--io-timeout', '20000', '--management-socket', mgmt, '--shadow-doorbells', 'true'];
  const d = startDaemon(args, logFile);
  try {
    await waitFor(() => fs.existsSync(sock), 30000, `${k}: the daemon's socket`);
    val(`${k}_start_ms`, Date.now() - d.startedAt);
    // vhost-bench --verify; with c.resetDuringBench, `rnull ctl reset` in the middle of it.
    const json = `/run/${k}-bench.json`;
    const bench = runBench(plan.bench, verifyArgs({ socket: sock, json, seed: 7, bs: Math.max(4096, c.blockSize), ...(c.resetDuringBench ? { runtime: 30 } : { ios: 3000 }) }), 180000);
    if (c.resetDuringBench) {
      await sleep(1000); // starting `rnull ctl` takes seconds more in the TCG guest
      const r = await ctl(mgmt, ['reset', k]);
      val(`${k}_reset_status`, r.code);
      if (r.code !== 0) process.stdout.write(`ctl reset: ${r.out}${r.err}\n`);
    }
    const b = await bench;
    if (c.resetDuringBench) {
      // Landed mid-run: the daemon logged the reset done before the bench exited (starting
      // `rnull ctl` in a loaded TCG guest takes seconds, so its own return time says little),
      // after the bench's memory table was mapped.
      const m = resetMidRun(logFile, 1, b.exitAt);
      val(`${k}_reset_bench_running`, m.midRun);
      if (m.doneAt !== undefined) val(`${k}_reset_ms_before_bench_exit`, b.exitAt - m.doneAt);
    }
    reportBench(`${k}_`, b, json);
    // The back-end keeps serving after the bench disconnects (a new front-end, a new table).
    const t2 = Date.now();
    await frontendChecks(c, sock);
    val(`${k}_frontend_ms`, Date.now() - t2);
    // Per-queue NVMe counters through `rnull ctl stats`.
    const st = await ctlStats(mgmt, k);
    val(`${k}_ctl_status`, st.code);
    if (st.queues !== null) {
      const sum = (f) => st.queues.reduce((n, q) => n + Number((q.nvme || {})[f] || 0), 0);
      val(`${k}_ctl_qids`, st.queues.map((q) => (q.nvme || {}).qid).join(','));
      for (const f of ['commands', 'splits', 'bounces', 'aborts', 'resets', 'retries', 'timeouts', 'waits', 'errors', 'late', 'stale', 'interrupts', 'sq_doorbells', 'cq_doorbells', 'in_flight', 'sq_doorbells_skipped', 'cq_doorbells_skipped', 'shadow_doorbells']) val(`${k}_ctl_${f}`, sum(f));
    }
  } finally {
    val(`${k}_exit`, await stopDaemon(d, 20000));
    const log = fs.readFileSync(logFile, 'utf8');
    val(`${k}_shutdown_logged`, /NVMe controller shut down/.test(log) ? 1 : 0);
    val(`${k}_dma_mapped_logged`, logCount(log, /guest memory mapped for DMA/g));
    val(`${k}_errors_logged`, logCount(log, /"level":50/g));
    val(`${k}_warnings_logged`, logCount(log, /"level":40/g));
    val(`${k}_dbbc_logged`, logCount(log, /Doorbell Buffer Config accepted/g));
    printLog(`${k} daemon`, log);
  }
}

/** The daemon refuses to start (exit 2) with a message. */
function refusal(name, args) {
  const r = cp.spawnSync(process.execPath, [MAIN, ...args, '--socket', `/run/${name}.sock`], { encoding: 'utf8', timeout: 60000 });
  val(`${name}_exit`, r.status);
  val(`${name}_message`, JSON.stringify((r.stderr.split('\n').find((l) => l.startsWith('rnull:')) || '').slice(0, 400)));
}

runCheck('nvme-disk-check', async (plan) => {
  refusal('missing_ns', ['--driver', 'nvme', '--pci', plan.missingNsid.bdf, '--nsid', String(plan.missingNsid.nsid)]);
  refusal('unbound', ['--driver', 'nvme', '--pci', plan.unbound]);
  for (const c of plan.cases) await runCase(plan, c);
});
