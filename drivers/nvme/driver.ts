/**
 * NvmeDriver: the Operations of a disk served from one NVMe namespace (issue 10). One I/O queue
 * pair per hardware queue (qid = hardware queue index + 1), created at open; the front-end's
 * guest memory is mapped for DMA once per memory table (memoryMapped), so commands carry PRPs
 * straight into guest memory: no copy, no mapping per request.
 *
 * Data path (no allocation per request): queueRq records the request's progress in typed
 * arrays indexed by its tag and builds as many commands as its data needs (PrpBuilder: a cut
 * at each PRP-incompatible junction and at the transfer limit, on block boundaries); a request
 * finding its queue pair full waits in a FIFO and goes on as completions free command ids. The
 * SQ tail doorbell is rung once per batch (isLast / commitRqs, and once after each completion
 * batch that submitted), the CQ is reaped by phase with one CQ head doorbell per batch. Each
 * queue pair completes by its MSI-X eventfd (default) or by a poll loop (setImmediate) while
 * commands are in flight.
 *
 * Where no cut helps (a block straddling an unaligned junction, or a data address that is not
 * dword aligned) the next command goes through a bounce buffer (counted in `bounces`): one of
 * BOUNCE_SLOTS per queue pair, each one transfer (MDTS) long, allocated at open; the guest data
 * is copied in before a write and out after a read. A request finding no free slot waits like
 * one finding no free command id.
 *
 * virtio-blk requests: IN/OUT -> Read/Write, FLUSH -> Flush (answered at once without a
 * volatile write cache), DISCARD -> Dataset Management (deallocate; its range in the command's
 * PRP list page), WRITE_ZEROES -> Write Zeroes (Deallocate when the guest allows unmapping and
 * DLFEAT says deallocated blocks read as zeroes).
 */
import type { HwQueue } from '../../block/hw-queue';
import { BlkStatus, ReqOp, type Operations } from '../../block/operations';
import type { Request } from '../../block/request';
import { MAX_QUEUE_SIZE, native, type NativeFdWatcher, type NativeGuestMemory } from '../../native/index';
import { vfioConstants } from '../../native/vfio';
import { AdminOpcode, NvmOpcode } from './command';
import type { DmaRegion, IoQueuePair, LogFn, NvmeController } from './controller';
import type { IdentifyNamespace } from './identify';
import { PRP_LIST_ENTRIES, PRP_PAGE, PrpBuilder } from './prp';

const TAG_SPACE = 1 << 16; // block/request.ts TAG_BITS
/** Write Zeroes: at most 65536 blocks per command (NLB is 16 bits). */
const WZ_MAX_BLOCKS = 65536;
/** Dataset Management: one range of at most 2^32 - 1 blocks. */
const DSM_MAX_BLOCKS = 0xffffffff;
const DSM_ATTR_DEALLOCATE = 1 << 2;
const WZ_DEAC = 1 << 25;
/** Bounce buffers per queue pair. */
export const BOUNCE_SLOTS = 4;
/** Controller resets a request goes through before it fails with IOERR. */
export const MAX_RETRIES = 3;

/** Counters of one I/O queue pair (`rnull ctl stats`). */
export interface NvmeQueueStats {
  /** Requests received. */
  requests: number;
  /** NVMe commands submitted. */
  commands: number;
  /** Extra commands because a request was cut (PRP-incompatible junction or transfer limit). */
  splits: number;
  /** Requests failed because their guest memory is not mapped for DMA. */
  unmapped: number;
  /** Requests that waited for a free command id. */
  waits: number;
  /** Commands that completed with an error status. */
  errors: number;
  /** Completions for requests that had ended meanwhile (timed out). */
  late: number;
  /** MSI-X wake-ups. */
  interrupts: number;
  /** Requests timed out. */
  timeouts: number;
  /** Commands sent through a bounce buffer (chains PRPs cannot describe even when cut). */
  bounces: number;
  /** Aborts sent (timeout ladder), controller resets seen, requests resubmitted after a reset. */
  aborts: number;
  resets: number;
  retries: number;
}

/** One hardware queue's NVMe state. */
class IoQueue {
  hctx: HwQueue | null = null;
  readonly prp: PrpBuilder;
  readonly list: Uint32Array;
  readonly listIova: number;
  readonly stats: NvmeQueueStats = { requests: 0, commands: 0, splits: 0, unmapped: 0, waits: 0, errors: 0, late: 0, interrupts: 0, timeouts: 0, bounces: 0, aborts: 0, resets: 0, retries: 0 };
  // Per request tag: its progress.
  readonly ref = new Float64Array(MAX_QUEUE_SIZE);
  readonly lba = new Float64Array(MAX_QUEUE_SIZE);
  readonly left = new Float64Array(MAX_QUEUE_SIZE);
  readonly seg = new Int32Array(MAX_QUEUE_SIZE);
  readonly off = new Float64Array(MAX_QUEUE_SIZE);
  readonly outstanding = new Int32Array(MAX_QUEUE_SIZE);
  readonly failed = new Uint8Array(MAX_QUEUE_SIZE);
  readonly waiting = new Uint8Array(MAX_QUEUE_SIZE);
  /** FIFO of request tags waiting for command ids. */
  readonly waitRing = new Int32Array(MAX_QUEUE_SIZE);
  waitHead = 0;
  waitCount = 0;
  watcher: NativeFdWatcher | null = null;
  polling = false;
  // Bounce buffers: BOUNCE_SLOTS slots of `slotBytes`; per slot the request data range it holds.
  readonly bounce: Buffer;
  readonly bounceIova: number;
  readonly slotBytes: number;
  readonly freeSlots = new Int32Array(BOUNCE_SLOTS);
  freeSlotCount = BOUNCE_SLOTS;
  readonly slotSeg = new Int32Array(BOUNCE_SLOTS);
  readonly slotOff = new Float64Array(BOUNCE_SLOTS);
  readonly slotLen = new Float64Array(BOUNCE_SLOTS);
  readonly slotRead = new Uint8Array(BOUNCE_SLOTS);
  /** Per command tag: its bounce slot, or -1. */
  readonly cmdSlot: Int32Array;
  /** Per command tag: the request (ref) it belongs to. */
  readonly cmdRef: Float64Array;
  /** Per request tag: an Abort was sent for it; resets it went through. */
  readonly aborted = new Uint8Array(MAX_QUEUE_SIZE);
  readonly retries = new Uint8Array(MAX_QUEUE_SIZE);

  constructor(
    readonly pair: IoQueuePair<number>,
    readonly lists: DmaRegion,
    bounce: DmaRegion,
    maxBytes: number,
  ) {
    this.prp = new PrpBuilder(maxBytes);
    this.list = new Uint32Array(lists.bytes.buffer, lists.bytes.byteOffset, lists.bytes.byteLength / 4);
    this.listIova = lists.iova;
    this.bounce = Buffer.from(bounce.bytes.buffer, bounce.bytes.byteOffset, bounce.bytes.byteLength);
    this.bounceIova = bounce.iova;
    this.slotBytes = maxBytes;
    for (let i = 0; i < BOUNCE_SLOTS; i++) this.freeSlots[i] = i;
    this.cmdSlot = new Int32Array(pair.qp.capacity).fill(-1);
    this.cmdRef = new Float64Array(pair.qp.capacity);
  }

  /** Every bounce slot free (after a controller reset). */
  freeAllSlots(): void {
    for (let i = 0; i < BOUNCE_SLOTS; i++) this.freeSlots[i] = i;
    this.freeSlotCount = BOUNCE_SLOTS;
    this.cmdSlot.fill(-1);
  }
}

export interface NvmeDriverOptions {
  controller: NvmeController;
  nsid: number;
  namespace: IdentifyNamespace;
  /** Hardware queues (I/O queue pairs 1..n). */
  queues: number;
  /** Slots per I/O queue pair (commands in flight + 1). */
  entries: number;
  /** Poll the completion queues instead of waiting for MSI-X interrupts. */
  poll: boolean;
  log: LogFn;
}

export class NvmeDriver implements Operations {
  readonly controller: NvmeController;
  readonly nsid: number;
  readonly blockSize: number;
  /** Capacity in logical blocks. */
  readonly blocks: number;
  /** Bytes per command: MDTS, at most one PRP list page of entries. */
  readonly maxTransferBytes: number;
  /** NVMe Flush is needed (a volatile write cache is present). */
  readonly volatileWriteCache: boolean;
  /** Dataset Management and Write Zeroes are both supported (ONCS). */
  readonly discard: boolean;
  /** Write Zeroes may deallocate (DLFEAT: deallocated blocks read as zeroes). */
  readonly deallocateZeroes: boolean;
  readonly poll: boolean;
  readonly queues: IoQueue[] = [];
  /** IOVA of each guest memory chunk's first byte (NaN: none), for the current memory table. */
  private chunkIova = new Float64Array(0);
  /** IOVAs where guest memory regions are mapped. */
  private guestMaps: number[] = [];
  private memory: NativeGuestMemory | null = null;
  private readonly log: LogFn;
  private readonly blockShift: number;
  private readonly lateLogged = { done: false };
  private readonly completeFns: Array<(ref: number, status: number, dw0: number, cmdTag: number) => void> = [];
  private readonly pollFns: Array<() => void> = [];

  private constructor(o: NvmeDriverOptions) {
    this.controller = o.controller;
    this.nsid = o.nsid;
    this.blockSize = o.namespace.blockSize;
    this.blockShift = Math.log2(this.blockSize / 512);
    this.blocks = o.namespace.nsze;
    const mdts = o.controller.maxTransferBytes;
    this.maxTransferBytes = Math.min(mdts, PRP_LIST_ENTRIES * PRP_PAGE);
    const id = o.controller.identity;
    this.volatileWriteCache = id.volatileWriteCache;
    this.discard = (id.oncs & 0x4) !== 0 && (id.oncs & 0x8) !== 0;
    this.deallocateZeroes = o.namespace.dlfeat === 1;
    this.poll = o.poll;
    this.log = o.log;
  }

  /**
   * Creates the driver's I/O queue pairs (CQ then SQ each, with one PRP list page per command
   * id) on an open controller. Throws what the controller's admin commands throw; the queues
   * created so far are deleted then.
   */
  static async open(o: NvmeDriverOptions): Promise<NvmeDriver> {
    const d = new NvmeDriver(o);
    const c = o.controller;
    try {
      for (let i = 0; i < o.queues; i++) {
        const pair = await c.createIoQueuePair<number>(i + 1, o.entries, o.poll ? 'poll' : 'interrupt');
        const lists = c.dma.alloc(pair.qp.capacity * PRP_PAGE);
        const bounce = c.dma.alloc(BOUNCE_SLOTS * d.maxTransferBytes);
        d.queues.push(new IoQueue(pair, lists, bounce, d.maxTransferBytes));
        d.completeFns.push((ref, status, _dw0, cmdTag) => d.completed(i, ref, status, cmdTag));
        d.pollFns.push(() => d.pollTick(i));
      }
    } catch (err) {
      for (let i = 0; i < d.queues.length; i++) await c.deleteIoQueue(i + 1).catch(() => undefined);
      throw err;
    }
    return d;
  }

  // --- memory -------------------------------------------------------------------------------

  /**
   * Maps every region of the front-end's memory table for DMA (VFIO_IOMMU_MAP_DMA) at IOVAs from
   * the controller's allocator, and records each chunk's IOVA. Throws (nothing left mapped) if
   * the IOVA space or the memlock limit is exhausted.
   */
  memoryMapped(memory: NativeGuestMemory): void {
    if (this.memory !== null) this.memoryReleased(this.memory);
    const layout = memory.regionLayout();
    const chunks = layout.reduce((n, r) => Math.max(n, r.firstChunk + Math.ceil(r.size / 2 ** 30)), 0);
    const chunkIova = new Float64Array(chunks).fill(NaN);
    const dev = this.controller.dev;
    const alloc = this.controller.dma.iova;
    const maps: number[] = [];
    try {
      layout.forEach((r, i) => {
        const bytes = Math.ceil((r.hostPageOffset + r.size) / vfioConstants.PAGE_SIZE) * vfioConstants.PAGE_SIZE;
        const iova = alloc.alloc(bytes);
        try {
          dev.dmaMapGuest(memory, i, iova);
        } catch (err) {
          alloc.release(iova);
          throw err;
        }
        maps.push(iova);
        const first = iova + r.hostPageOffset;
        for (let c = 0; c * 2 ** 30 < r.size; c++) chunkIova[r.firstChunk + c] = first + c * 2 ** 30;
      });
    } catch (err) {
      for (const iova of maps) {
        dev.dmaUnmapGuest(iova);
        alloc.release(iova);
      }
      throw new Error(`cannot map guest memory for DMA: ${(err as Error).message}${/ENOMEM|EAGAIN|EPERM/.test((err as Error).message) ? ' (is the memlock limit, ulimit -l, at least the guest memory size?)' : ''}`);
    }
    this.memory = memory;
    this.guestMaps = maps;
    this.chunkIova = chunkIova;
    this.log('info', `guest memory mapped for DMA: ${layout.length} regions, IOVAs ${maps.map((v) => '0x' + v.toString(16)).join(', ')}`);
  }

  /** Unmaps the table's DMA mappings (no request using it is in flight). */
  memoryReleased(memory: NativeGuestMemory): void {
    if (this.memory !== memory) return;
    const dev = this.controller.dev;
    for (const iova of this.guestMaps) {
      try {
        dev.dmaUnmapGuest(iova);
      } catch (err) {
        this.log('warn', `unmapping guest memory at IOVA 0x${iova.toString(16)}: ${(err as Error).message}`);
      }
      this.controller.dma.iova.release(iova);
    }
    this.guestMaps = [];
    this.chunkIova = new Float64Array(0);
    this.memory = null;
  }

  // --- Operations ------------------------------------------------------------------------------

  initHctx(hctx: HwQueue): void {
    const q = this.queues[hctx.index];
    if (q === undefined) throw new RangeError(`hardware queue ${hctx.index} has no NVMe queue pair (${this.queues.length} created)`);
    q.hctx = hctx;
    if (!this.poll && q.watcher === null) {
      const i = hctx.index;
      q.watcher = new native.FdWatcher(q.pair.eventfd as number, () => this.onInterrupt(i), true);
      q.watcher.start();
    }
  }

  exitHctx(hctx: HwQueue): void {
    const q = this.queues[hctx.index];
    if (q === undefined) return;
    q.watcher?.stop();
    q.watcher = null;
    q.hctx = null;
  }

  queueRq(rq: Request, isLast: boolean): BlkStatus {
    const q = this.queues[rq.hctx.index] as IoQueue;
    const tag = rq.tag;
    q.stats.requests++;
    if (this.broken) {
      rq.end(BlkStatus.IoErr);
      return BlkStatus.Ok;
    }
    q.ref[tag] = rq.leak();
    q.aborted[tag] = 0;
    q.retries[tag] = 0;
    switch (rq.op) {
      case ReqOp.Read:
      case ReqOp.Write:
      case ReqOp.Discard:
      case ReqOp.WriteZeroes:
        break;
      case ReqOp.Flush:
        if (!this.volatileWriteCache) {
          rq.end(BlkStatus.Ok);
          return BlkStatus.Ok;
        }
        break;
      default:
        rq.end(BlkStatus.Unsupp);
        return BlkStatus.Ok;
    }
    this.restart(q, rq);
    if (q.waitCount > 0 || this.resetting) this.enqueue(q, tag);
    else this.pump(q, rq);
    if (isLast) this.commit(q);
    return BlkStatus.Ok;
  }

  commitRqs(hctx: HwQueue): void {
    this.commit(this.queues[hctx.index] as IoQueue);
  }

  /**
   * A request timed out (nvme-facts.md section 10.7): CSTS fatal or all ones -> controller reset
   * now; else the CQ is reaped once (a missed interrupt); else one Abort is sent for one of its
   * commands and the request gets another full timeout. An Abort that fails or answers "not
   * aborted" (CDW0 bit 0; QEMU 7.2 always does), or a second expiry, resets the controller,
   * which resubmits every outstanding request (resetController). Never ends a request whose
   * commands the controller may still be working on.
   */
  timeout(rq: Request): 'done' | 'reset' {
    const q = this.queues[rq.hctx.index] as IoQueue;
    const tag = rq.tag;
    q.stats.timeouts++;
    if (this.resetting) return 'reset';
    const s = this.controller.status();
    if (s.allOnes || s.fatal) {
      void this.resetController(s.allOnes ? 'CSTS reads all ones' : 'controller fatal status (CSTS.CFS)');
      return 'reset';
    }
    this.reap(q);
    if (rq.refcount === 0 || q.ref[tag] !== rq.ref) return 'done';
    if (q.aborted[tag] === 0) {
      q.aborted[tag] = 1;
      const qp = q.pair.qp;
      const cmd = qp.busyTags().find((t) => q.cmdRef[t] === rq.ref);
      if (cmd === undefined) return 'reset'; // waiting for a command id: nothing to abort yet
      const cid = qp.cidOf(cmd);
      q.stats.aborts++;
      this.log('warn', `${this.controller.bdf}: queue ${qp.qid}: request tag ${tag} timed out; sending Abort for command 0x${cid.toString(16)}`);
      this.controller.adminCommand({ opcode: AdminOpcode.Abort, cdw10: (qp.qid | (cid << 16)) >>> 0 }, `Abort of queue ${qp.qid} command 0x${cid.toString(16)}`).then(
        (c) => {
          if ((c.dw0 & 1) !== 0) void this.resetController(`Abort of command 0x${cid.toString(16)} answered "not aborted"`);
        },
        (err: Error) => void this.resetController(`Abort failed: ${err.message}`),
      );
      return 'reset';
    }
    void this.resetController(`request tag ${tag} on queue ${q.pair.qp.qid} timed out again after its Abort`);
    return 'reset';
  }

  /** A controller reset is under way: nothing is submitted or reaped. */
  resetting = false;
  /** The controller did not come back from a reset: every request fails with IOERR. */
  broken = false;

  /**
   * Resets the controller (NvmeController.reset) with nothing lost: submission and reaping stop;
   * once the controller is disabled (no more DMA), every request the driver owns is set back to
   * its start, its timeout re-armed, and queued again (up to MAX_RETRIES resets each; then IOERR); after the queues
   * are created again the requests are resubmitted. If the controller does not come back the
   * disk is broken: every request fails with IOERR from then on. Resolves when done.
   */
  async resetController(why: string): Promise<void> {
    if (this.resetting || this.broken) return;
    this.resetting = true;
    this.log('warn', `${this.controller.bdf}: resetting the controller: ${why}`);
    try {
      await this.controller.reset(() => this.requeueAll());
      this.resetting = false;
      for (const q of this.queues) {
        q.stats.resets++;
        this.reap(q);
      }
    } catch (err) {
      this.broken = true;
      this.resetting = false;
      this.log('error', `${this.controller.bdf}: the controller did not come back from a reset (${(err as Error).message}); every request of this disk now fails with IOERR`);
      for (const q of this.queues) {
        q.waitCount = 0;
        const hctx = q.hctx;
        if (hctx === null) continue;
        for (let tag = 0; tag < MAX_QUEUE_SIZE; tag++) {
          q.waiting[tag] = 0;
          const rq = hctx.reclaim(q.ref[tag] as number);
          if (rq !== null) rq.end(BlkStatus.IoErr);
        }
      }
    }
  }

  /** During a reset, with the controller disabled: every owned request back to its start and queued. */
  private requeueAll(): void {
    const now = native.monotonicNs();
    for (const q of this.queues) {
      q.freeAllSlots();
      q.waitCount = 0;
      q.waitHead = 0;
      q.waiting.fill(0);
      const hctx = q.hctx;
      if (hctx === null) continue;
      for (let tag = 0; tag < MAX_QUEUE_SIZE; tag++) {
        const rq = hctx.reclaim(q.ref[tag] as number);
        if (rq === null) continue;
        if (++q.retries[tag]! > MAX_RETRIES) {
          this.log('warn', `${this.controller.bdf}: queue ${q.pair.qp.qid}: request tag ${tag} failed after ${MAX_RETRIES} controller resets`);
          rq.end(BlkStatus.IoErr);
          continue;
        }
        q.stats.retries++;
        q.aborted[tag] = 0;
        rq.startNs = now; // a resubmitted request gets a full io_timeout again
        this.restart(q, rq);
        this.enqueue(q, tag);
      }
    }
  }

  /** Sets a request's progress to its start: no command sent, all its data still to go. */
  private restart(q: IoQueue, rq: Request): void {
    const tag = rq.tag;
    q.lba[tag] = rq.sector / (1 << this.blockShift);
    q.outstanding[tag] = 0;
    q.failed[tag] = 0;
    q.seg[tag] = 0;
    q.off[tag] = 0;
    q.left[tag] = rq.op === ReqOp.Flush ? 1 : rq.bytes;
  }

  /** Per-queue counters with the queue pair's own. */
  stats(): Array<NvmeQueueStats & { qid: number; submitted: number; completed: number; stale: number; sqDoorbells: number; cqDoorbells: number; inFlight: number }> {
    return this.queues.map((q) => ({ qid: q.pair.qp.qid, ...q.stats, ...q.pair.qp.stats, inFlight: q.pair.qp.inFlight }));
  }

  /** Stops the completion sources (the controller's shutdown deletes the queues). */
  close(): void {
    for (const q of this.queues) {
      q.watcher?.stop();
      q.watcher = null;
    }
  }

  // --- internals -----------------------------------------------------------------------------

  private commit(q: IoQueue): void {
    if (q.pair.qp.commit() && this.poll && !q.polling) {
      q.polling = true;
      setImmediate(this.pollFns[q.pair.qp.qid - 1] as () => void);
    }
  }

  private enqueue(q: IoQueue, tag: number): void {
    if (q.waiting[tag] === 1) return;
    q.waiting[tag] = 1;
    q.stats.waits++;
    q.waitRing[(q.waitHead + q.waitCount) % MAX_QUEUE_SIZE] = tag;
    q.waitCount++;
  }

  /**
   * Submits the commands of `rq` from where it stopped until its data is covered or the queue
   * pair is full (then it waits in the FIFO). Returns false if it had to wait.
   */
  private pump(q: IoQueue, rq: Request): boolean {
    const tag = rq.tag;
    const qp = q.pair.qp;
    const ref = q.ref[tag] as number;
    const bs = this.blockSize;
    while ((q.left[tag] as number) > 0) {
      const cmdTag = qp.nextTag;
      if (cmdTag < 0 || this.resetting) {
        this.enqueue(q, tag);
        return false;
      }
      const lba = q.lba[tag] as number;
      const lbaLo = lba % 0x100000000;
      const lbaHi = Math.floor(lba / 0x100000000);
      const listWord = cmdTag * (PRP_PAGE / 4);
      const listIova = q.listIova + cmdTag * PRP_PAGE;
      let blocks = 0;
      let sent = false;
      switch (rq.op) {
        case ReqOp.Read:
        case ReqOp.Write: {
          const p = q.prp;
          p.seg = q.seg[tag] as number;
          p.off = q.off[tag] as number;
          let bytes = p.next(this.chunkIova, rq.segments, rq.segBase, rq.segCount, q.left[tag] as number, bs, q.list, listWord, listIova);
          if (bytes < 0) {
            q.stats.unmapped++;
            this.log('warn', `${this.controller.bdf}: queue ${qp.qid}: request tag ${tag}: guest memory not mapped for DMA; failed with IOERR`);
            q.failed[tag] = 1;
            q.left[tag] = 0;
            break;
          }
          if (bytes === 0) {
            // No PRP description from here: the next command goes through a bounce buffer.
            if (q.freeSlotCount === 0) {
              this.enqueue(q, tag);
              return false;
            }
            bytes = this.bounceCommand(q, rq, cmdTag, listWord, listIova);
          } else {
            q.seg[tag] = p.seg;
            q.off[tag] = p.off;
          }
          blocks = bytes / bs;
          qp.submitIo(rq.op === ReqOp.Read ? NvmOpcode.Read : NvmOpcode.Write, this.nsid, p.prp1, p.prp2, lbaLo, lbaHi, blocks - 1, 0, ref);
          q.left[tag] = (q.left[tag] as number) - bytes;
          break;
        }
        case ReqOp.Flush:
          qp.submitIo(NvmOpcode.Flush, this.nsid, 0, 0, 0, 0, 0, 0, ref);
          q.left[tag] = 0;
          sent = true;
          break;
        case ReqOp.WriteZeroes:
          blocks = Math.min((q.left[tag] as number) / bs, WZ_MAX_BLOCKS);
          qp.submitIo(NvmOpcode.WriteZeroes, this.nsid, 0, 0, lbaLo, lbaHi, ((blocks - 1) | (rq.unmap && this.deallocateZeroes ? WZ_DEAC : 0)) >>> 0, 0, ref);
          q.left[tag] = (q.left[tag] as number) - blocks * bs;
          break;
        case ReqOp.Discard: {
          blocks = Math.min((q.left[tag] as number) / bs, DSM_MAX_BLOCKS);
          // The one range (context attributes, length in blocks, starting LBA) in this command's list page.
          q.list[listWord] = 0;
          q.list[listWord + 1] = blocks;
          q.list[listWord + 2] = lbaLo;
          q.list[listWord + 3] = lbaHi;
          qp.submitIo(NvmOpcode.DatasetManagement, this.nsid, listIova, 0, 0, DSM_ATTR_DEALLOCATE, 0, 0, ref);
          q.left[tag] = (q.left[tag] as number) - blocks * bs;
          break;
        }
        default:
          q.failed[tag] = 1;
          q.left[tag] = 0;
      }
      if (blocks > 0 || sent) {
        q.cmdRef[cmdTag] = ref;
        if (q.outstanding[tag]! > 0) q.stats.splits++;
        q.outstanding[tag]!++;
        q.stats.commands++;
        q.lba[tag] = lba + blocks;
      }
    }
    if (q.outstanding[tag] === 0) rq.end(q.failed[tag] === 1 ? BlkStatus.IoErr : BlkStatus.Ok);
    return true;
  }

  /**
   * Prepares the next command of `rq` (Read/Write) on bounce slot: as many bytes as one
   * transfer allows from the request's cursor, copied in for a write; PRPs of the slot in the
   * PrpBuilder's prp1/prp2 (entries 2..n in the command's list page); the cursor moved on.
   * Returns the command's bytes.
   */
  private bounceCommand(q: IoQueue, rq: Request, cmdTag: number, listWord: number, listIova: number): number {
    const tag = rq.tag;
    const slot = q.freeSlots[--q.freeSlotCount] as number;
    const bytes = Math.min(q.left[tag] as number, q.slotBytes);
    const seg = q.seg[tag] as number;
    const off = q.off[tag] as number;
    q.slotSeg[slot] = seg;
    q.slotOff[slot] = off;
    q.slotLen[slot] = bytes;
    q.slotRead[slot] = rq.op === ReqOp.Read ? 1 : 0;
    q.cmdSlot[cmdTag] = slot;
    const at = slot * q.slotBytes;
    const end = this.copySegments(rq, seg, off, bytes, q.bounce, at, rq.op === ReqOp.Write);
    q.seg[tag] = end.seg;
    q.off[tag] = end.off;
    const iova = q.bounceIova + at;
    const p = q.prp;
    p.prp1 = iova;
    const pages = Math.ceil(bytes / PRP_PAGE);
    if (pages === 1) p.prp2 = 0;
    else if (pages === 2) p.prp2 = iova + PRP_PAGE;
    else {
      for (let i = 1; i < pages; i++) {
        const e = iova + i * PRP_PAGE;
        q.list[listWord + (i - 1) * 2] = e % 0x100000000;
        q.list[listWord + (i - 1) * 2 + 1] = Math.floor(e / 0x100000000);
      }
      p.prp2 = listIova;
    }
    q.stats.bounces++;
    return bytes;
  }

  /** Where copySegments stopped. */
  private readonly cursor = { seg: 0, off: 0 };

  /**
   * Copies `bytes` of the request's data from segment `seg`, offset `off` between guest memory
   * and `buf` at `at`: into buf when `fromGuest`, else out of it. Returns the cursor after them.
   */
  private copySegments(rq: Request, seg: number, off: number, bytes: number, buf: Buffer, at: number, fromGuest: boolean): { seg: number; off: number } {
    let rest = bytes;
    while (rest > 0 && seg < rq.segCount) {
      const w = rq.segBase + seg * 4;
      const view = rq.memory[rq.segments[w] as number] as Buffer;
      const start = (rq.segments[w + 1] as number) + off;
      const len = (rq.segments[w + 2] as number) - off;
      const n = Math.min(len, rest);
      if (fromGuest) view.copy(buf, at, start, start + n);
      else buf.copy(view, start, at, at + n);
      at += n;
      rest -= n;
      if (n < len) off += n;
      else {
        seg++;
        off = 0;
      }
    }
    this.cursor.seg = seg;
    this.cursor.off = off;
    return this.cursor;
  }

  private onInterrupt(i: number): void {
    const q = this.queues[i] as IoQueue;
    q.stats.interrupts++;
    this.reap(q);
  }

  private pollTick(i: number): void {
    const q = this.queues[i] as IoQueue;
    this.reap(q);
    if (q.pair.qp.inFlight > 0) setImmediate(this.pollFns[i] as () => void);
    else q.polling = false;
  }

  /** Reaps every completion there now, resumes waiting requests, rings the SQ doorbell once. */
  private reap(q: IoQueue): void {
    if (this.resetting) return; // the queues are being reset: nothing there is valid
    const fn = this.completeFns[q.pair.qp.qid - 1] as (ref: number, status: number, dw0: number, cmdTag: number) => void;
    while (q.pair.qp.reap(fn) > 0);
    const hctx = q.hctx;
    while (q.waitCount > 0 && q.pair.qp.nextTag >= 0 && hctx !== null) {
      const tag = q.waitRing[q.waitHead] as number;
      q.waitHead = (q.waitHead + 1) % MAX_QUEUE_SIZE;
      q.waitCount--;
      q.waiting[tag] = 0;
      const rq = hctx.reclaim(q.ref[tag] as number);
      if (rq === null) continue; // ended meanwhile (timed out)
      if (!this.pump(q, rq)) break;
    }
    this.commit(q);
  }

  private completed(i: number, ref: number, status: number, cmdTag: number): void {
    const q = this.queues[i] as IoQueue;
    const tag = ref % TAG_SPACE;
    const rq = q.hctx?.reclaim(ref) ?? null;
    const slot = q.cmdSlot[cmdTag] as number;
    if (slot >= 0) {
      // A bounced read: the data goes to the guest now (unless the request ended meanwhile).
      q.cmdSlot[cmdTag] = -1;
      if (rq !== null && q.ref[tag] === ref && status === 0 && q.slotRead[slot] === 1) {
        this.copySegments(rq, q.slotSeg[slot] as number, q.slotOff[slot] as number, q.slotLen[slot] as number, q.bounce, slot * q.slotBytes, false);
      }
      q.freeSlots[q.freeSlotCount++] = slot;
    }
    if (rq === null || q.ref[tag] !== ref) {
      q.stats.late++;
      if (!this.lateLogged.done) {
        this.lateLogged.done = true;
        this.log('warn', `${this.controller.bdf}: queue ${i + 1}: completion of a request that had ended (timed out): dropped (logged once)`);
      }
      return;
    }
    if (status !== 0) {
      q.stats.errors++;
      q.failed[tag] = 1;
      this.log('warn', `${this.controller.bdf}: queue ${i + 1}: command of request tag ${tag} failed: status 0x${status.toString(16)} (SCT ${(status >>> 8) & 7}, SC 0x${(status & 0xff).toString(16)})`);
    }
    q.outstanding[tag]!--;
    if (q.outstanding[tag] === 0 && q.left[tag] === 0 && q.waiting[tag] === 0) rq.end(q.failed[tag] === 1 ? BlkStatus.IoErr : BlkStatus.Ok);
  }
}
