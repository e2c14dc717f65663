/**
 * NvmeDriver: the I/O queue pairs of one NVMe controller and the disks served from its namespaces
 * (issue 10). One I/O queue pair per hardware queue (qid = hardware queue index + 1), created at
 * open and shared by every namespace opened with it (NvmeNamespace, the Operations of one disk),
 * as the kernel's nvme driver shares one tag set per controller: commands carry each disk's
 * NSID. Each front-end's guest memory is mapped for DMA once per memory table (the namespace's
 * memoryMapped), so commands carry PRPs straight into guest memory: no copy, no mapping per
 * request. The driver is also the Operations of its first namespace (one disk per controller).
 *
 * Data path (no allocation per request): queueRq records the request's progress in typed
 * arrays indexed by its tag and builds as many commands as its data needs (PrpBuilder: a cut
 * at each PRP-incompatible junction and at the transfer limit, on block boundaries); a request
 * finding its queue pair full waits in a FIFO and goes on as completions free command ids. The
 * SQ tail doorbell is rung once per batch (isLast / commitRqs, and once after each completion
 * batch that submitted), the CQ is reaped by phase with one CQ head doorbell per batch; with
 * shadow doorbells (shadowDoorbells, when the controller offers Doorbell Buffer Config) a
 * doorbell is a store into the shadow page and an MMIO write only when the controller's
 * EventIdx asks for it (sqDoorbellsSkipped/cqDoorbellsSkipped count the others). Each
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
 *
 * Errors: a command that fails with a status without DNR (Do Not Retry; e.g. "Command Abort
 * Requested" after a successful Abort, or a transient status) makes its request start over once
 * its other commands are done, within MAX_RETRIES starts per request (controller resets count
 * too); a status with DNR, or one beyond the budget, ends the request with IOERR.
 */
import type { HwQueue } from '../../block/hw-queue';
import { BlkStatus, ReqOp, type Operations } from '../../block/operations';
import type { Request } from '../../block/request';
import { MAX_QUEUE_SIZE, native, type NativeFdWatcher, type NativeGuestMemory } from '../../native/index';
import { AdminOpcode, NvmOpcode } from './command';
import type { DmaRegion, IoQueuePair, LogFn, NvmeController } from './controller';
import type { IdentifyNamespace } from './identify';
import { NvmeNamespace, type NsQueue, type NvmeQueueOwner } from './namespace';
import { PRP_LIST_ENTRIES, PRP_PAGE, PrpBuilder } from './prp';
import type { QueueStats } from './queue';

const TAG_SPACE = 1 << 16; // block/request.ts TAG_BITS
/** Write Zeroes: at most 65536 blocks per command (NLB is 16 bits). */
const WZ_MAX_BLOCKS = 65536;
/** Dataset Management: one range of at most 2^32 - 1 blocks. */
const DSM_MAX_BLOCKS = 0xffffffff;
const DSM_ATTR_DEALLOCATE = 1 << 2;
const WZ_DEAC = 1 << 25;
/** Bounce buffers per queue pair. */
export const BOUNCE_SLOTS = 4;
/**
 * Times a request starts over (controller resets, statuses without DNR) before it fails with
 * IOERR: Linux's nvme_max_retries default.
 */
export const MAX_RETRIES = 5;
/** Status field (CQE DW3 bits 31:17): Do Not Retry. */
export const STATUS_DNR = 1 << 14;

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
  /** Aborts sent (timeout ladder), controller resets seen, requests started over (after a reset or a status without DNR). */
  aborts: number;
  resets: number;
  retries: number;
}

/** One I/O queue pair's state, shared by the namespaces' hardware queues of the same index. */
class IoQueue {
  /** Served by this thread (its hardware queue's requests, doorbells and completions are here). */
  local = true;
  readonly prp: PrpBuilder;
  readonly list: Uint32Array;
  readonly listIova: number;
  readonly stats: NvmeQueueStats = { requests: 0, commands: 0, splits: 0, unmapped: 0, waits: 0, errors: 0, late: 0, interrupts: 0, timeouts: 0, bounces: 0, aborts: 0, resets: 0, retries: 0 };
  /** FIFO of requests waiting for command ids or bounce slots: namespace index x MAX_QUEUE_SIZE + tag. */
  readonly waitRing: Int32Array;
  waitHead = 0;
  waitCount = 0;
  watcher: NativeFdWatcher | null = null;
  /** Hardware queues (one per namespace) attached to this queue pair. */
  attached = 0;
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
  /** Per command tag: the request (ref) it belongs to, and that request's namespace index. */
  readonly cmdRef: Float64Array;
  readonly cmdNs: Uint8Array;

  constructor(
    readonly pair: IoQueuePair<number>,
    readonly lists: DmaRegion,
    readonly bounceRegion: DmaRegion,
    maxBytes: number,
    namespaces: number,
  ) {
    this.prp = new PrpBuilder(maxBytes);
    this.list = new Uint32Array(lists.bytes.buffer, lists.bytes.byteOffset, lists.bytes.byteLength / 4);
    this.listIova = lists.iova;
    this.bounce = Buffer.from(bounceRegion.bytes.buffer, bounceRegion.bytes.byteOffset, bounceRegion.bytes.byteLength);
    this.bounceIova = bounceRegion.iova;
    this.slotBytes = maxBytes;
    for (let i = 0; i < BOUNCE_SLOTS; i++) this.freeSlots[i] = i;
    this.cmdSlot = new Int32Array(pair.qp.capacity).fill(-1);
    this.cmdRef = new Float64Array(pair.qp.capacity);
    this.cmdNs = new Uint8Array(pair.qp.capacity);
    this.waitRing = new Int32Array(namespaces * MAX_QUEUE_SIZE);
  }

  /** Every bounce slot free (after a controller reset). */
  freeAllSlots(): void {
    for (let i = 0; i < BOUNCE_SLOTS; i++) this.freeSlots[i] = i;
    this.freeSlotCount = BOUNCE_SLOTS;
    this.cmdSlot.fill(-1);
  }
}

/** One namespace a driver serves. */
export interface NvmeNamespaceSpec {
  nsid: number;
  namespace: IdentifyNamespace;
}

export interface NvmeDriverOptions {
  controller: NvmeController;
  /** The namespace of a driver serving one disk (or the first of `namespaces`). */
  nsid?: number;
  namespace?: IdentifyNamespace;
  /** Several namespaces sharing the queue pairs (one disk each); overrides nsid/namespace. */
  namespaces?: NvmeNamespaceSpec[];
  /** Hardware queues (I/O queue pairs 1..n). */
  queues: number;
  /** Slots per I/O queue pair (commands in flight + 1). */
  entries: number;
  /** Poll the completion queues instead of waiting for MSI-X interrupts. */
  poll: boolean;
  log: LogFn;
  /**
   * Whether hardware queue `index` is served by this thread (default: every one). The others
   * are served by other threads' drivers over the same queue pairs (NvmePeers / NvmeMain).
   */
  served?: (index: number) => boolean;
  /** Worker thread: the main thread, which sends Aborts and resets the controller. */
  main?: NvmeMain;
  /** Shadow doorbells when the controller offers Doorbell Buffer Config (default false; open() only). */
  shadowDoorbells?: boolean;
}

/** One queue pair's counters as stats() gives them: the driver's, the queue pair's, and its state. */
export type NvmeQueueCounters = NvmeQueueStats & QueueStats & { qid: number; inFlight: number; shadowDoorbells: boolean };

/**
 * The worker threads serving some of the controller's queue pairs, as the main thread's driver
 * (the one owning the controller) sees them. Each call reaches every worker; a worker lost
 * meanwhile counts as done (its rings are gone with it).
 */
export interface NvmePeers {
  /** Every worker stops submitting and reaping; resolves once each has. */
  quiesce(): Promise<void>;
  /** The controller is disabled: every worker empties its rings and requeues its requests. */
  requeue(): Promise<void>;
  /** The controller is back: every worker resubmits. */
  resume(): void;
  /** The controller did not come back: every worker fails its requests with IOERR from now on. */
  broken(): void;
  /** Namespace `ns` (index) has new chunk IOVAs (memory table mapped; empty: released). */
  chunkIova(ns: number, chunkIova: Float64Array): void;
  /** The workers' queue pair counters, by hardware queue index. */
  stats?(): Promise<Array<[number, NvmeQueueCounters]>>;
}

/** The main thread, as a worker thread's driver sees it (messages, no reply). */
export interface NvmeMain {
  /** Send Abort for command `cid` of queue `qid` (the timeout ladder's second step). */
  abort(qid: number, cid: number, what: string): void;
  /** Reset the controller (every thread's queues stop first). */
  reset(why: string): void;
}

/** A queue pair created by another thread's driver, for attach(). */
export interface AttachedQueue {
  pair: IoQueuePair<number>;
  lists: DmaRegion;
  bounce: DmaRegion;
}

/** Where one queue pair's memory is (process-wide share ids), for another thread. */
export interface SharedRegion {
  share: number;
  iova: number;
  size: number;
}

/** DMA memory `r` as another thread reaches it. @throws Error if it has no share id. */
export function sharedRegion(r: DmaRegion): SharedRegion {
  if (r.share === undefined) throw new Error('DMA memory without a share id cannot be used from another thread');
  return { share: r.share, iova: r.iova, size: r.size };
}

/** Most namespaces one driver serves (command contexts keep the index in a byte). */
export const MAX_NAMESPACES = 255;

export class NvmeDriver implements Operations, NvmeQueueOwner {
  readonly controller: NvmeController;
  /** Bytes per command: MDTS, at most one PRP list page of entries. */
  readonly maxTransferBytes: number;
  /** NVMe Flush is needed (a volatile write cache is present). */
  readonly volatileWriteCache: boolean;
  /** Dataset Management and Write Zeroes are both supported (ONCS). */
  readonly discard: boolean;
  readonly poll: boolean;
  readonly queues: IoQueue[] = [];
  /** The disks: one per namespace, in the order given at open. */
  readonly namespaces: NvmeNamespace[] = [];
  readonly log: LogFn;
  private readonly lateLogged = { done: false };
  private readonly completeFns: Array<(ctx: number, status: number, dw0: number, cmdTag: number) => void> = [];
  private readonly pollFns: Array<() => void> = [];
  private readonly served: (index: number) => boolean;
  private readonly main: NvmeMain | undefined;
  private peers: NvmePeers | undefined;
  /** Worker thread: a reset was asked of the main thread and has not begun yet. */
  private resetAsked = false;

  private constructor(o: NvmeDriverOptions) {
    this.served = o.served ?? (() => true);
    this.main = o.main;
    this.controller = o.controller;
    const mdts = o.controller.maxTransferBytes;
    this.maxTransferBytes = Math.min(mdts, PRP_LIST_ENTRIES * PRP_PAGE);
    const id = o.controller.identity;
    this.volatileWriteCache = id.volatileWriteCache;
    this.discard = (id.oncs & 0x4) !== 0 && (id.oncs & 0x8) !== 0;
    this.poll = o.poll;
    this.log = o.log;
    const specs = o.namespaces ?? (o.nsid !== undefined && o.namespace !== undefined ? [{ nsid: o.nsid, namespace: o.namespace }] : []);
    if (specs.length === 0 || specs.length > MAX_NAMESPACES) throw new RangeError(`an NVMe driver serves 1 to ${MAX_NAMESPACES} namespaces, got ${specs.length}`);
    const seen = new Set<number>();
    specs.forEach((s, i) => {
      if (seen.has(s.nsid)) throw new RangeError(`namespace ${s.nsid} given twice`);
      seen.add(s.nsid);
      this.namespaces.push(new NvmeNamespace(this, i, s.nsid, s.namespace, o.queues));
    });
  }

  /** The first namespace (the disk of a one-namespace driver). */
  get first(): NvmeNamespace {
    return this.namespaces[0] as NvmeNamespace;
  }
  get nsid(): number {
    return this.first.nsid;
  }
  get blockSize(): number {
    return this.first.blockSize;
  }
  /** Capacity of the first namespace in logical blocks. */
  get blocks(): number {
    return this.first.blocks;
  }
  get deallocateZeroes(): boolean {
    return this.first.deallocateZeroes;
  }

  /**
   * Creates the driver's I/O queue pairs (CQ then SQ each, with one PRP list page per command
   * id) on an open controller. Throws what the controller's admin commands throw (the queues
   * created so far are deleted then), RangeError for no namespace or one given twice.
   */
  static async open(o: NvmeDriverOptions): Promise<NvmeDriver> {
    const d = new NvmeDriver(o);
    const c = o.controller;
    try {
      for (let i = 0; i < o.queues; i++) {
        const pair = await c.createIoQueuePair<number>(i + 1, o.entries, o.poll ? 'poll' : 'interrupt');
        const lists = c.dma.alloc(pair.qp.capacity * PRP_PAGE);
        const bounce = c.dma.alloc(BOUNCE_SLOTS * d.maxTransferBytes);
        d.addQueue(i, { pair, lists, bounce });
      }
      // After the queues exist (the controller maps its buffers onto them), before any I/O.
      if (o.shadowDoorbells === true) await c.enableShadowDoorbells();
    } catch (err) {
      for (let i = 0; i < d.queues.length; i++) await c.deleteIoQueue(i + 1).catch(() => undefined);
      throw err;
    }
    return d;
  }

  /**
   * A driver over queue pairs another thread's driver created (a queue worker thread): `queues`
   * by hardware queue index, the same memory and doorbells; this driver serves those for which
   * `o.served` says so. Controller-wide actions (Abort, reset) go to `o.main`.
   */
  static attach(o: NvmeDriverOptions, queues: readonly AttachedQueue[]): NvmeDriver {
    const d = new NvmeDriver(o);
    queues.forEach((q, i) => d.addQueue(i, q));
    return d;
  }

  private addQueue(i: number, a: AttachedQueue): void {
    const q = new IoQueue(a.pair, a.lists, a.bounce, this.maxTransferBytes, this.namespaces.length);
    q.local = this.served(i);
    this.queues.push(q);
    // The request's ref comes from cmdRef, not from the queue pair's context: refs pass 2^30
    // (a small integer no more) after 16 k uses of a tag, and storing one in the pair's generic
    // context array would then allocate a heap number per command; its context is always 0.
    this.completeFns.push((_ctx, status, _dw0, cmdTag) => this.completed(i, q.cmdRef[cmdTag] as number, status, cmdTag));
    this.pollFns.push(() => this.pollTick(i));
  }

  /** The worker threads serving the queues this driver does not (main thread). */
  setPeers(peers: NvmePeers): void {
    this.peers = peers;
  }

  /** Each queue pair's memory as other threads reach it (share ids; DMA memory with shares only). */
  sharedLayout(): Array<{ qid: number; entries: number; eventfd: number; sq: SharedRegion; cq: SharedRegion; lists: SharedRegion; bounce: SharedRegion }> {
    return this.queues.map((q) => ({
      qid: q.pair.qp.qid,
      entries: q.pair.qp.entries,
      eventfd: q.pair.eventfd ?? -1,
      sq: sharedRegion(q.pair.ring.sq),
      cq: sharedRegion(q.pair.ring.cq),
      lists: sharedRegion(q.lists),
      bounce: sharedRegion(q.bounceRegion),
    }));
  }

  /** A namespace's chunk IOVAs changed (NvmeNamespace.memoryMapped/memoryReleased): other threads learn them. */
  chunkIovaChanged(ns: NvmeNamespace): void {
    this.peers?.chunkIova(ns.index, ns.chunkIova);
  }

  // --- Operations of the first namespace -------------------------------------------------------

  memoryMapped(memory: NativeGuestMemory): void {
    this.first.memoryMapped(memory);
  }
  memoryReleased(memory: NativeGuestMemory): void {
    this.first.memoryReleased(memory);
  }
  initHctx(hctx: HwQueue): void {
    this.attachHctx(this.first, hctx);
  }
  exitHctx(hctx: HwQueue): void {
    this.detachHctx(this.first, hctx);
  }
  queueRq(rq: Request, isLast: boolean): BlkStatus {
    return this.submitRq(this.first, rq, isLast);
  }
  commitRqs(hctx: HwQueue): void {
    this.commitHctx(hctx);
  }
  timeout(rq: Request): 'done' | 'reset' {
    return this.timeoutRq(this.first, rq);
  }

  // --- the namespaces' operations ---------------------------------------------------------------

  /** A namespace's hardware queue starts: its queue pair's MSI-X eventfd is watched while any is attached. */
  attachHctx(ns: NvmeNamespace, hctx: HwQueue): void {
    const q = this.queues[hctx.index];
    const nq = ns.queues[hctx.index];
    if (q === undefined || nq === undefined) throw new RangeError(`hardware queue ${hctx.index} has no NVMe queue pair (${this.queues.length} created)`);
    if (!q.local) throw new RangeError(`hardware queue ${hctx.index} is served by another thread`);
    if (nq.hctx === null) q.attached++;
    nq.hctx = hctx;
    if (!this.poll && q.watcher === null) {
      const i = hctx.index;
      q.watcher = new native.FdWatcher(q.pair.eventfd as number, () => this.onInterrupt(i), true);
      q.watcher.start();
    }
  }

  detachHctx(ns: NvmeNamespace, hctx: HwQueue): void {
    const q = this.queues[hctx.index];
    const nq = ns.queues[hctx.index];
    if (q === undefined || nq === undefined || nq.hctx === null) return;
    nq.hctx = null;
    if (--q.attached > 0) return;
    q.watcher?.stop();
    q.watcher = null;
  }

  submitRq(ns: NvmeNamespace, rq: Request, isLast: boolean): BlkStatus {
    const q = this.queues[rq.hctx.index] as IoQueue;
    const nq = ns.queues[rq.hctx.index] as NsQueue;
    const tag = rq.tag;
    q.stats.requests++;
    if (this.broken) {
      rq.end(BlkStatus.IoErr);
      return BlkStatus.Ok;
    }
    nq.ref[tag] = rq.leak();
    nq.aborted[tag] = 0;
    nq.retries[tag] = 0;
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
    this.restart(ns, nq, rq);
    if (q.waitCount > 0 || this.resetting) this.enqueue(q, ns, nq, tag);
    else this.pump(q, ns, nq, rq);
    if (isLast) this.commit(q);
    return BlkStatus.Ok;
  }

  commitHctx(hctx: HwQueue): void {
    this.commit(this.queues[hctx.index] as IoQueue);
  }

  /**
   * A request timed out (nvme-facts.md section 10.7): CSTS fatal or all ones -> controller reset
   * now; else the CQ is reaped once (a missed interrupt); else one Abort is sent for one of its
   * commands and the request gets another full timeout. An Abort that fails or answers "not
   * aborted" (CDW0 bit 0; QEMU 7.2 always does), or a second expiry, resets the controller,
   * which resubmits every outstanding request of every namespace (resetController). Never ends
   * a request whose commands the controller may still be working on.
   */
  timeoutRq(ns: NvmeNamespace, rq: Request): 'done' | 'reset' {
    const q = this.queues[rq.hctx.index] as IoQueue;
    const nq = ns.queues[rq.hctx.index] as NsQueue;
    const tag = rq.tag;
    q.stats.timeouts++;
    if (this.resetting) return 'reset';
    const s = this.controller.status();
    if (s.allOnes || s.fatal) {
      void this.resetController(s.allOnes ? 'CSTS reads all ones' : 'controller fatal status (CSTS.CFS)');
      return 'reset';
    }
    this.reap(q);
    if (rq.refcount === 0 || nq.ref[tag] !== rq.ref) return 'done';
    if (nq.aborted[tag] === 0) {
      // At most the controller's Abort Command Limit in flight; the others wait a timeout more.
      if (this.abortsInFlight >= (this.controller.identity.abortLimit ?? 1)) return 'reset';
      nq.aborted[tag] = 1;
      const qp = q.pair.qp;
      const cmd = qp.busyTags().find((t) => q.cmdRef[t] === rq.ref && q.cmdNs[t] === ns.index);
      if (cmd === undefined) return 'reset'; // waiting for a command id: nothing to abort yet
      const cid = qp.cidOf(cmd);
      q.stats.aborts++;
      this.log('warn', `${this.controller.bdf}: queue ${qp.qid}: namespace ${ns.nsid} request tag ${tag} timed out; sending Abort for command 0x${cid.toString(16)}`);
      this.abort(qp.qid, cid);
      return 'reset';
    }
    void this.resetController(`namespace ${ns.nsid} request tag ${tag} on queue ${q.pair.qp.qid} timed out again after its Abort`);
    return 'reset';
  }

  /**
   * Sends Abort for command `cid` of queue `qid` (main thread; a worker asks the main thread);
   * an Abort that fails or answers "not aborted" resets the controller. Beyond the controller's
   * Abort Command Limit nothing is sent (the request's next expiry resets).
   */
  abort(qid: number, cid: number): void {
    if (this.main !== undefined) {
      this.main.abort(qid, cid, `queue ${qid} command 0x${cid.toString(16)}`);
      return;
    }
    if (this.resetting || this.broken || this.abortsInFlight >= (this.controller.identity.abortLimit ?? 1)) return;
    this.abortsInFlight++;
    {
      this.controller.adminCommand({ opcode: AdminOpcode.Abort, cdw10: (qid | (cid << 16)) >>> 0 }, `Abort of queue ${qid} command 0x${cid.toString(16)}`).then(
        (c) => {
          this.abortsInFlight--;
          if ((c.dw0 & 1) !== 0) void this.resetController(`Abort of command 0x${cid.toString(16)} answered "not aborted"`);
        },
        (err: Error) => {
          this.abortsInFlight--;
          void this.resetController(`Abort failed: ${err.message}`);
        },
      );
    }
  }

  /** A controller reset is under way: nothing is submitted or reaped. */
  resetting = false;
  /** The controller did not come back from a reset: every request of every namespace fails with IOERR. */
  broken = false;
  /** close() was called: no poll loop runs or starts again. */
  private closed = false;

  /**
   * Resets the controller (NvmeController.reset) with nothing lost: submission and reaping stop;
   * once the controller is disabled (no more DMA), every request of every namespace the driver
   * owns is set back to its start, its timeout re-armed, and queued again (up to MAX_RETRIES
   * starts each; then IOERR); after the queues are created again the requests are resubmitted.
   * If the controller does not come back every disk on it is broken: every request fails with
   * IOERR from then on. Resolves when done.
   */
  async resetController(why: string): Promise<void> {
    if (this.resetting || this.broken) return;
    if (this.main !== undefined) {
      // A worker thread: the main thread owns the controller and stops every thread first.
      if (!this.resetAsked) this.main.reset(why);
      this.resetAsked = true;
      return;
    }
    this.resetting = true;
    this.log('warn', `${this.controller.bdf}: resetting the controller: ${why}`);
    try {
      // Every thread's queues stop first; then, the controller disabled, each requeues its own.
      await this.peers?.quiesce();
      await this.controller.reset(async () => {
        this.requeueAll();
        await this.peers?.requeue();
      });
      this.resumeAfterReset();
      this.peers?.resume();
    } catch (err) {
      this.log('error', `${this.controller.bdf}: the controller did not come back from a reset (${(err as Error).message}); every request of its ${this.namespaces.length === 1 ? 'disk' : `${this.namespaces.length} disks (namespaces ${this.namespaces.map((n) => n.nsid).join(', ')})`} now fails with IOERR`);
      this.failAll();
      this.peers?.broken();
    }
  }

  // --- a worker thread's part of a controller reset (the main thread's driver drives it) ----------

  /** Stop submitting and reaping: a controller reset begins. */
  quiesce(): void {
    this.resetting = true;
    this.resetAsked = false;
  }

  /**
   * The controller is disabled: this thread's rings start from empty (the queues are created
   * again at the same memory) and every request it owns is set back to its start and queued.
   */
  requeueLocal(): void {
    for (const q of this.queues) if (q.local) q.pair.qp.resetRing(q.pair.ring.cq.bytes);
    this.requeueAll();
  }

  /** The controller is back: requeued requests get a fresh timeout and are resubmitted. */
  resumeAfterReset(): void {
    this.resetting = false;
    this.rearmRequeued();
    for (const q of this.queues) {
      if (!q.local) continue;
      q.stats.resets++;
      this.reap(q);
    }
  }

  /** The controller is gone for good: every request fails with IOERR, now and from now on. */
  failAll(): void {
    this.broken = true;
    this.resetting = false;
    for (const q of this.queues) q.waitCount = 0;
    for (const ns of this.namespaces) {
      for (const nq of ns.queues) {
        const hctx = nq.hctx;
        nq.waiting.fill(0);
        if (hctx === null) continue;
        for (let tag = 0; tag < MAX_QUEUE_SIZE; tag++) {
          const rq = hctx.reclaim(nq.ref[tag] as number);
          if (rq !== null) rq.end(BlkStatus.IoErr);
        }
      }
    }
  }

  /** Aborts sent and not answered yet (the reset fails them: the admin queue starts over). */
  private abortsInFlight = 0;

  /**
   * After a reset, the controller back: each requeued request's timeout starts now, when it is
   * resubmitted (bringing the controller back took part of the timeout armed at the requeue).
   */
  private rearmRequeued(): void {
    const now = native.monotonicNs();
    for (const ns of this.namespaces) {
      for (const nq of ns.queues) {
        const hctx = nq.hctx;
        if (hctx === null) continue;
        for (let tag = 0; tag < MAX_QUEUE_SIZE; tag++) {
          if (nq.waiting[tag] === 0) continue;
          const rq = hctx.reclaim(nq.ref[tag] as number);
          if (rq !== null) rq.startNs = now;
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
    }
    for (const ns of this.namespaces) {
      ns.queues.forEach((nq, i) => {
        const q = this.queues[i] as IoQueue;
        nq.waiting.fill(0);
        const hctx = nq.hctx;
        if (hctx === null) return;
        for (let tag = 0; tag < MAX_QUEUE_SIZE; tag++) {
          const rq = hctx.reclaim(nq.ref[tag] as number);
          if (rq === null) continue;
          if (++nq.retries[tag]! > MAX_RETRIES) {
            this.log('warn', `${this.controller.bdf}: queue ${q.pair.qp.qid}: namespace ${ns.nsid} request tag ${tag} failed after ${MAX_RETRIES} controller resets or retries`);
            rq.end(BlkStatus.IoErr);
            continue;
          }
          q.stats.retries++;
          nq.aborted[tag] = 0;
          rq.startNs = now; // a resubmitted request gets a full io_timeout again
          this.restart(ns, nq, rq);
          this.enqueue(q, ns, nq, tag);
        }
      });
    }
  }

  /** Sets a request's progress to its start: no command sent, all its data still to go. */
  private restart(ns: NvmeNamespace, nq: NsQueue, rq: Request): void {
    const tag = rq.tag;
    nq.lba[tag] = rq.sector / (1 << ns.blockShift);
    nq.outstanding[tag] = 0;
    nq.failed[tag] = 0;
    nq.retry[tag] = 0;
    nq.seg[tag] = 0;
    nq.off[tag] = 0;
    nq.left[tag] = rq.op === ReqOp.Flush ? 1 : rq.bytes;
  }

  /** Per-queue-pair counters with the queue pair's own (shared by every namespace on it). */
  stats(): NvmeQueueCounters[] {
    return this.queues.map((q, i) => this.remoteStats.get(i) ?? { qid: q.pair.qp.qid, ...q.stats, ...q.pair.qp.stats, inFlight: q.pair.qp.inFlight, shadowDoorbells: q.pair.qp.shadowed });
  }

  /** Asks the worker threads for the counters of the queue pairs they serve (then in stats()). */
  async refreshStats(): Promise<void> {
    for (const [i, st] of (await this.peers?.stats?.()) ?? []) this.remoteStats.set(i, st);
  }

  /** The counters of queue pairs served on worker threads, as they last reported them (main thread). */
  readonly remoteStats = new Map<number, ReturnType<NvmeDriver['stats']>[number]>();

  /** Stops the completion sources (the controller's shutdown deletes the queues): the MSI-X watchers and the poll loops. */
  close(): void {
    this.closed = true;
    for (const q of this.queues) {
      q.watcher?.stop();
      q.watcher = null;
    }
  }

  // --- internals -----------------------------------------------------------------------------

  private commit(q: IoQueue): void {
    if (q.pair.qp.commit() && this.poll && !q.polling && !this.closed) {
      q.polling = true;
      setImmediate(this.pollFns[q.pair.qp.qid - 1] as () => void);
    }
  }

  private enqueue(q: IoQueue, ns: NvmeNamespace, nq: NsQueue, tag: number): void {
    if (nq.waiting[tag] === 1) return;
    nq.waiting[tag] = 1;
    q.stats.waits++;
    q.waitRing[(q.waitHead + q.waitCount) % q.waitRing.length] = ns.index * MAX_QUEUE_SIZE + tag;
    q.waitCount++;
  }

  /**
   * Submits the commands of `rq` from where it stopped until its data is covered or the queue
   * pair is full (then it waits in the FIFO). Returns false if it had to wait.
   */
  private pump(q: IoQueue, ns: NvmeNamespace, nq: NsQueue, rq: Request): boolean {
    const tag = rq.tag;
    const qp = q.pair.qp;
    const ref = nq.ref[tag] as number;
    const bs = ns.blockSize;
    const nsid = ns.nsid;
    while ((nq.left[tag] as number) > 0) {
      const cmdTag = qp.nextTag;
      if (cmdTag < 0 || this.resetting) {
        this.enqueue(q, ns, nq, tag);
        return false;
      }
      const lba = nq.lba[tag] as number;
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
          p.seg = nq.seg[tag] as number;
          p.off = nq.off[tag] as number;
          let bytes = p.next(ns.chunkIova, rq.segments, rq.segBase, rq.segCount, nq.left[tag] as number, bs, q.list, listWord, listIova);
          if (bytes < 0) {
            q.stats.unmapped++;
            this.log('warn', `${this.controller.bdf}: queue ${qp.qid}: namespace ${nsid} request tag ${tag}: guest memory not mapped for DMA; failed with IOERR`);
            nq.failed[tag] = 1;
            nq.left[tag] = 0;
            break;
          }
          if (bytes === 0) {
            // No PRP description from here: the next command goes through a bounce buffer.
            if (q.freeSlotCount === 0) {
              this.enqueue(q, ns, nq, tag);
              return false;
            }
            bytes = this.bounceCommand(q, nq, rq, cmdTag, listWord, listIova);
          } else {
            nq.seg[tag] = p.seg;
            nq.off[tag] = p.off;
          }
          blocks = bytes / bs;
          qp.submitIo(rq.op === ReqOp.Read ? NvmOpcode.Read : NvmOpcode.Write, nsid, p.prp1, p.prp2, lbaLo, lbaHi, blocks - 1, 0, 0);
          nq.left[tag] = (nq.left[tag] as number) - bytes;
          break;
        }
        case ReqOp.Flush:
          qp.submitIo(NvmOpcode.Flush, nsid, 0, 0, 0, 0, 0, 0, 0);
          nq.left[tag] = 0;
          sent = true;
          break;
        case ReqOp.WriteZeroes:
          blocks = Math.min((nq.left[tag] as number) / bs, WZ_MAX_BLOCKS);
          qp.submitIo(NvmOpcode.WriteZeroes, nsid, 0, 0, lbaLo, lbaHi, ((blocks - 1) | (rq.unmap && ns.deallocateZeroes ? WZ_DEAC : 0)) >>> 0, 0, 0);
          nq.left[tag] = (nq.left[tag] as number) - blocks * bs;
          break;
        case ReqOp.Discard: {
          blocks = Math.min((nq.left[tag] as number) / bs, DSM_MAX_BLOCKS);
          // The one range (context attributes, length in blocks, starting LBA) in this command's list page.
          q.list[listWord] = 0;
          q.list[listWord + 1] = blocks;
          q.list[listWord + 2] = lbaLo;
          q.list[listWord + 3] = lbaHi;
          qp.submitIo(NvmOpcode.DatasetManagement, nsid, listIova, 0, 0, DSM_ATTR_DEALLOCATE, 0, 0, 0);
          nq.left[tag] = (nq.left[tag] as number) - blocks * bs;
          break;
        }
        default:
          nq.failed[tag] = 1;
          nq.left[tag] = 0;
      }
      if (blocks > 0 || sent) {
        q.cmdRef[cmdTag] = ref;
        q.cmdNs[cmdTag] = ns.index;
        if (nq.outstanding[tag]! > 0) q.stats.splits++;
        nq.outstanding[tag]!++;
        q.stats.commands++;
        nq.lba[tag] = lba + blocks;
      }
    }
    if (nq.outstanding[tag] === 0) this.finish(q, ns, nq, rq);
    return true;
  }

  /**
   * Every command of `rq` is done: ends it (IOERR if one failed for good), or starts it over
   * when one failed with a status worth retrying (and the budget allows).
   */
  private finish(q: IoQueue, ns: NvmeNamespace, nq: NsQueue, rq: Request): void {
    const tag = rq.tag;
    if (nq.failed[tag] === 0 && nq.retry[tag] === 1) {
      nq.retries[tag]!++;
      q.stats.retries++;
      this.restart(ns, nq, rq);
      if (q.waitCount > 0 || this.resetting) this.enqueue(q, ns, nq, tag);
      else this.pump(q, ns, nq, rq);
      return;
    }
    rq.end(nq.failed[tag] === 1 ? BlkStatus.IoErr : BlkStatus.Ok);
  }

  /**
   * Prepares the next command of `rq` (Read/Write) on bounce slot: as many bytes as one
   * transfer allows from the request's cursor, copied in for a write; PRPs of the slot in the
   * PrpBuilder's prp1/prp2 (entries 2..n in the command's list page); the cursor moved on.
   * Returns the command's bytes.
   */
  private bounceCommand(q: IoQueue, nq: NsQueue, rq: Request, cmdTag: number, listWord: number, listIova: number): number {
    const tag = rq.tag;
    const slot = q.freeSlots[--q.freeSlotCount] as number;
    const bytes = Math.min(nq.left[tag] as number, q.slotBytes);
    const seg = nq.seg[tag] as number;
    const off = nq.off[tag] as number;
    q.slotSeg[slot] = seg;
    q.slotOff[slot] = off;
    q.slotLen[slot] = bytes;
    q.slotRead[slot] = rq.op === ReqOp.Read ? 1 : 0;
    q.cmdSlot[cmdTag] = slot;
    const at = slot * q.slotBytes;
    const end = this.copySegments(rq, seg, off, bytes, q.bounce, at, rq.op === ReqOp.Write);
    nq.seg[tag] = end.seg;
    nq.off[tag] = end.off;
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
    if (q.pair.qp.inFlight > 0 && !this.broken && !this.closed) setImmediate(this.pollFns[i] as () => void);
    else q.polling = false;
  }

  /**
   * Reaps every completion there now, resumes waiting requests, rings the SQ doorbell once. The
   * requests it ends reach their virtqueues as one completion batch per hardware queue,
   * published when the reap is over (HwQueue.beginCompletionBatch).
   */
  private reap(q: IoQueue): void {
    if (this.resetting) return; // the queues are being reset: nothing there is valid
    const i = q.pair.qp.qid - 1;
    const namespaces = this.namespaces;
    for (let n = 0; n < namespaces.length; n++) namespaces[n]!.queues[i]?.hctx?.beginCompletionBatch();
    try {
      this.reapLocked(q, i);
    } finally {
      for (let n = 0; n < namespaces.length; n++) namespaces[n]!.queues[i]?.hctx?.endCompletionBatch();
    }
  }

  /** reap() inside its completion batches. */
  private reapLocked(q: IoQueue, i: number): void {
    const fn = this.completeFns[i] as (ctx: number, status: number, dw0: number, cmdTag: number) => void;
    while (q.pair.qp.reap(fn) > 0);
    while (q.waitCount > 0 && q.pair.qp.nextTag >= 0 && !this.resetting) {
      const entry = q.waitRing[q.waitHead] as number;
      q.waitHead = (q.waitHead + 1) % q.waitRing.length;
      q.waitCount--;
      const ns = this.namespaces[Math.floor(entry / MAX_QUEUE_SIZE)] as NvmeNamespace;
      const tag = entry % MAX_QUEUE_SIZE;
      const nq = ns.queues[i] as NsQueue;
      nq.waiting[tag] = 0;
      const rq = nq.hctx?.reclaim(nq.ref[tag] as number) ?? null;
      if (rq === null) continue; // ended meanwhile (timed out)
      if (!this.pump(q, ns, nq, rq)) break;
    }
    this.commit(q);
  }

  private completed(i: number, ref: number, status: number, cmdTag: number): void {
    const q = this.queues[i] as IoQueue;
    const ns = this.namespaces[q.cmdNs[cmdTag] as number] as NvmeNamespace;
    const nq = ns.queues[i] as NsQueue;
    const tag = ref % TAG_SPACE;
    const rq = nq.hctx?.reclaim(ref) ?? null;
    const slot = q.cmdSlot[cmdTag] as number;
    if (slot >= 0) {
      // A bounced read: the data goes to the guest now (unless the request ended meanwhile).
      q.cmdSlot[cmdTag] = -1;
      if (rq !== null && nq.ref[tag] === ref && status === 0 && q.slotRead[slot] === 1) {
        this.copySegments(rq, q.slotSeg[slot] as number, q.slotOff[slot] as number, q.slotLen[slot] as number, q.bounce, slot * q.slotBytes, false);
      }
      q.freeSlots[q.freeSlotCount++] = slot;
    }
    if (rq === null || nq.ref[tag] !== ref) {
      q.stats.late++;
      if (!this.lateLogged.done) {
        this.lateLogged.done = true;
        this.log('warn', `${this.controller.bdf}: queue ${i + 1}: completion of a request that had ended (timed out): dropped (logged once)`);
      }
      return;
    }
    if (status !== 0) {
      q.stats.errors++;
      const again = (status & STATUS_DNR) === 0 && (nq.retries[tag] as number) < MAX_RETRIES;
      if (again) nq.retry[tag] = 1;
      else nq.failed[tag] = 1;
      this.log(
        'warn',
        `${this.controller.bdf}: queue ${i + 1}: namespace ${ns.nsid} command of request tag ${tag} failed: status 0x${status.toString(16)} (SCT ${(status >>> 8) & 7}, SC 0x${(status & 0xff).toString(16)}${(status & STATUS_DNR) !== 0 ? ', DNR' : ''}); ${again ? 'the request starts over' : 'IOERR'}`,
      );
    }
    nq.outstanding[tag]!--;
    if (nq.outstanding[tag] === 0 && nq.left[tag] === 0 && nq.waiting[tag] === 0) this.finish(q, ns, nq, rq);
  }
}
