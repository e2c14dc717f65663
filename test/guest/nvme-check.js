#!/usr/bin/env node
// Runs INSIDE the NVMe test guest (nvme-guest.ts), chrooted into the host root, on the
// controllers bound to vfio-pci: brings each one up through native/vfio + drivers/nvme (from this
// worktree's dist/ and build/), reports what it found as "@@VAL name value" lines, writes a
// pattern through an I/O queue completed by MSI-X and reads it back through a polled one (and
// the other way round), then shuts the controller down cleanly.
//
//   node test/guest/nvme-check.js '<json plan>'
// plan: { controllers: [{ bdf, key, namespaces: [{ nsid, writes: [{ slba, bytes, seed }] }] }] }
// Data written for a write is pattern(seed, i) for byte i (the host test checks the backing file).
'use strict';
const path = require('path');
const { val, pattern } = require('./check-util');

const dist = path.join(__dirname, '..', '..', 'dist');
const { NvmeController } = require(path.join(dist, 'drivers/nvme/controller.js'));
const { readWrite, flush } = require(path.join(dist, 'drivers/nvme/command.js'));
// NvmOpcode is a const enum (no runtime object): NVM Command Set opcodes.
const NvmOpcode = { Write: 0x01, Read: 0x02 };

const hex = (n) => `0x${n.toString(16)}`;

/** Offset of the MSI-X capability in PCI config space, or 0. */
function msixCapability(dev) {
  let at = dev.configRead(0x34, 1) & 0xfc;
  for (let guard = 0; at !== 0 && guard < 48; guard++) {
    if (dev.configRead(at, 1) === 0x11) return at;
    at = dev.configRead(at + 1, 1) & 0xfc;
  }
  return 0;
}

/** Fills a PRP pair for a transfer of `bytes` (≤ 2 pages) at the start of a DMA region. */
function prps(region, bytes) {
  if (bytes > 8192) throw new Error('this check uses at most two pages per command');
  return { prp1: region.iova, prp2: bytes > 4096 ? region.iova + 4096 : 0 };
}

/** How a call was refused: "SyscallError:<call>:<errno>", "<ErrorName>", or "accepted". */
function refusal(f) {
  try {
    f();
    return 'accepted';
  } catch (err) {
    return err.name === 'SyscallError' ? `SyscallError:${err.syscall}:${err.errno}` : err.name;
  }
}

async function io(queue, op, nsid, slba, blocks, region, bytes, what) {
  const { prp1, prp2 } = prps(region, bytes);
  const t = performance.now();
  await queue.execute(readWrite(op, nsid, slba, blocks, prp1, prp2), what, 10000);
  return performance.now() - t;
}

async function checkController(plan, log) {
  const k = plan.key;
  if (plan.reopen) {
    // Bring the controller up and drop it without a shutdown (as a crashed daemon would): the
    // next open must cope with whatever state VFIO's release left it in.
    const first = await NvmeController.open({ bdf: plan.bdf, ioQueues: 2, interrupts: true, log });
    await first.createIoQueue(1, 16, 'interrupt');
    first.close();
  }
  const t0 = performance.now();
  const ctrl = await NvmeController.open({ bdf: plan.bdf, ioQueues: 2, interrupts: true, adminEntries: 32, log });
  val(`${k}_open_ms`, (performance.now() - t0).toFixed(1));
  for (const [step, ms] of Object.entries(ctrl.timings)) val(`${k}_t_${step}_ms`, ms.toFixed(1));
  const dev = ctrl.dev;
  val(`${k}_iommu_type`, dev.info().iommuType);
  val(`${k}_iova_ranges`, ctrl.iommu.ranges.map((r) => `${hex(r.start)}-${hex(r.end)}`).join(','));
  val(`${k}_version`, ctrl.version);
  val(`${k}_mqes`, ctrl.cap.maxQueueEntries);
  val(`${k}_dstrd`, ctrl.cap.doorbellStride);
  val(`${k}_cap_to_ms`, ctrl.cap.readyTimeoutMs);
  val(`${k}_found_enabled`, ctrl.foundEnabled ? 1 : 0);
  const cap = msixCapability(dev);
  const msgCtl = cap ? dev.configRead(cap + 2, 2) : 0;
  val(`${k}_msix_enabled`, (msgCtl >>> 15) & 1);
  val(`${k}_msix_table_size`, cap ? (msgCtl & 0x7ff) + 1 : 0);
  val(`${k}_vectors`, ctrl.vectors);
  val(`${k}_bus_master`, (dev.configRead(4, 2) >>> 2) & 1);
  const id = ctrl.identity;
  val(`${k}_serial`, id.serial);
  val(`${k}_model`, JSON.stringify(id.model));
  val(`${k}_mdts`, id.mdts);
  val(`${k}_max_transfer`, ctrl.maxTransferBytes);
  val(`${k}_vwc`, id.volatileWriteCache ? 1 : 0);
  val(`${k}_oncs`, hex(id.oncs));
  val(`${k}_sgls`, hex(id.sgls));
  val(`${k}_nn`, id.nn);
  val(`${k}_granted_queues`, ctrl.grantedIoQueues);
  val(`${k}_admin_interrupts`, ctrl.admin.interrupts);
  // The native layer's checks against the real device: refused before or by the kernel.
  const barSize = dev.mapBar(0);
  val(`${k}_bar0_size`, barSize);
  val(`${k}_oob_read`, refusal(() => dev.read32(0, barSize)));
  val(`${k}_unaligned_read`, refusal(() => dev.read32(0, 2)));
  val(`${k}_odd_dma_size`, refusal(() => dev.dmaAlloc(100)));
  val(`${k}_config_oob`, refusal(() => dev.configRead(dev.info().configSize, 4)));
  const probe = dev.dmaAlloc(4096);
  val(`${k}_msi_window_map`, refusal(() => dev.dmaMap(probe.id, 0xfee00000)));
  dev.dmaFree(probe.id);
  val(`${k}_freed_buffer_bytes`, probe.buffer.byteLength);
  const active = await ctrl.activeNamespaces();
  val(`${k}_active_ns`, active.join(','));

  const t1 = performance.now();
  const qIrq = await ctrl.createIoQueue(1, 64, 'interrupt');
  const qPoll = await ctrl.createIoQueue(2, 64, 'poll');
  val(`${k}_create_queues_ms`, (performance.now() - t1).toFixed(1));
  // Shadow doorbells (Doorbell Buffer Config, offered by OACS bit 8) for both queues: every I/O
  // below publishes its SQ tail and CQ head through the shadow page.
  val(`${k}_oacs`, ctrl.identity.oacs);
  val(`${k}_dbbc`, (await ctrl.enableShadowDoorbells()) ? 1 : 0);
  val(`${k}_shadow_queues`, [qIrq, qPoll].filter((q) => q.qp.shadowed).length);

  const wbuf = ctrl.dma.alloc(8192);
  const rbuf = ctrl.dma.alloc(8192);
  const iovas = [wbuf.iova, rbuf.iova, qIrq.ring.sq.iova, qIrq.ring.cq.iova, qPoll.ring.sq.iova, qPoll.ring.cq.iova, ctrl.admin.ring.sq.iova];
  val(`${k}_dma_iovas`, iovas.map(hex).join(','));
  const lat = [];
  for (const ns of plan.namespaces) {
    const n = `${k}_ns${ns.nsid}`;
    const idns = await ctrl.identifyNamespace(ns.nsid);
    val(`${n}_nsze`, idns.nsze);
    val(`${n}_block_size`, idns.blockSize);
    val(`${n}_metadata`, idns.format.metadataSize);
    val(`${n}_dlfeat`, idns.dlfeat);
    ns.writes.forEach((w, wi) => (w.index = wi));
    for (const w of ns.writes) {
      const blocks = w.bytes / idns.blockSize;
      if (!Number.isInteger(blocks)) throw new Error(`write of ${w.bytes} bytes is not whole ${idns.blockSize}-byte blocks`);
      for (let i = 0; i < w.bytes; i++) wbuf.bytes[i] = pattern(w.seed, i);
      rbuf.bytes.fill(0xee);
      // Even writes: write completed by interrupt, read back polled; odd ones the other way round.
      const [wq, rq] = w.index % 2 === 0 ? [qIrq, qPoll] : [qPoll, qIrq];
      const irqsBefore = qIrq.interrupts;
      const wt = await io(wq, NvmOpcode.Write, ns.nsid, w.slba, blocks, wbuf, w.bytes, `Write ${n} @${w.slba}`);
      const rt = await io(rq, NvmOpcode.Read, ns.nsid, w.slba, blocks, rbuf, w.bytes, `Read ${n} @${w.slba}`);
      lat.push(wt, rt);
      let bad = -1;
      for (let i = 0; i < w.bytes; i++) {
        if (rbuf.bytes[i] !== wbuf.bytes[i]) {
          bad = i;
          break;
        }
      }
      val(`${n}_w${w.index}_roundtrip`, bad < 0 ? 'same' : `differs at byte ${bad}`);
      val(`${n}_w${w.index}_modes`, `write:${wq.mode},read:${rq.mode}`);
      val(`${n}_w${w.index}_irqs`, qIrq.interrupts - irqsBefore);
      val(`${n}_w${w.index}_us`, `${(wt * 1000).toFixed(0)},${(rt * 1000).toFixed(0)}`);
    }
    if (ctrl.identity.volatileWriteCache) await qPoll.execute(flush(ns.nsid), `Flush ${n}`, 10000);
  }
  val(`${k}_io_ms_max`, Math.max(...lat).toFixed(2));
  val(`${k}_irq_queue_interrupts`, qIrq.interrupts);
  val(`${k}_poll_queue_completions`, qPoll.polledCompletions);
  val(`${k}_stale`, qIrq.qp.stats.stale + qPoll.qp.stats.stale + ctrl.admin.qp.stats.stale);
  val(`${k}_sq_doorbells`, qIrq.qp.stats.sqDoorbells + qPoll.qp.stats.sqDoorbells);
  // Bursts of 8 reads submitted one after the other in one go (each execute() publishes its tail
  // at once): the first is an MMIO write; the next ones usually find the controller not run yet
  // (its EventIdx is still the tail it read last), so they go to the shadow page only, and the
  // controller, kicked by the first, reads the shadow tail and runs them all.
  const before = { mmio: qPoll.qp.stats.sqDoorbells, skipped: qPoll.qp.stats.sqDoorbellsSkipped };
  let burstDone = 0;
  for (let b = 0; b < 16; b++) {
    const reads = Array.from({ length: 8 }, (_, i) => qPoll.execute(readWrite(NvmOpcode.Read, plan.namespaces[0].nsid, i, 1, rbuf.iova, 0), `burst read ${b}.${i}`, 10000));
    burstDone += (await Promise.all(reads)).length;
  }
  val(`${k}_burst_done`, burstDone);
  val(`${k}_burst_sq_mmio`, qPoll.qp.stats.sqDoorbells - before.mmio);
  val(`${k}_burst_sq_skipped`, qPoll.qp.stats.sqDoorbellsSkipped - before.skipped);
  // CQ heads: two reads on the interrupt queue, both completions posted before either is
  // reaped (a bounded spin on the phase tags, the event loop held), then reaped one at a time.
  // Posting each, QEMU 7.2.22 writes the CQ EventIdx = the head it knows (h) and reads the shadow
  // head; the first head h+1 passes h (MMIO write), the second, h+2, does not: left out. The
  // controller has no completion left to post, so it needs no write for it.
  const cqBefore = { mmio: qIrq.qp.stats.cqDoorbells, skipped: qIrq.qp.stats.cqDoorbellsSkipped };
  let pairsDone = 0;
  const settle = (ctx, c) => {
    clearTimeout(ctx.timer);
    if (c.status !== 0) ctx.reject(new Error(`${ctx.what}: status 0x${c.status.toString(16)}`));
    else ctx.resolve(c);
  };
  for (let p = 0; p < 8; p++) {
    const reads = [0, 1].map((i) => qIrq.execute(readWrite(NvmOpcode.Read, plan.namespaces[0].nsid, 16 + i, 1, rbuf.iova, 0), `pair read ${p}.${i}`, 10000));
    const until = performance.now() + 5000;
    while (qIrq.qp.peek(2) < 2 && performance.now() < until);
    qIrq.qp.poll(settle, 1);
    qIrq.qp.poll(settle, 1);
    pairsDone += (await Promise.all(reads)).length;
  }
  val(`${k}_pairs_done`, pairsDone);
  val(`${k}_pairs_cq_mmio`, qIrq.qp.stats.cqDoorbells - cqBefore.mmio);
  val(`${k}_pairs_cq_skipped`, qIrq.qp.stats.cqDoorbellsSkipped - cqBefore.skipped);
  const shn = await ctrl.shutdown();
  val(`${k}_shutdown_ms`, shn.toFixed(1));
  val(`${k}_done`, 1);
}

async function main() {
  const plan = JSON.parse(process.argv[2] ?? '{}');
  const warnings = [];
  const log = (level, msg) => {
    process.stdout.write(`[${level}] ${msg}\n`);
    if (level !== 'info') warnings.push(msg);
  };
  for (const c of plan.controllers) await checkController(c, log);
  val('warnings', warnings.length);
}

main().then(
  () => process.exit(0),
  (err) => {
    process.stdout.write(`nvme-check failed: ${err && err.stack ? err.stack : err}\n`);
    process.exit(1);
  },
);
