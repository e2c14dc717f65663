/**
 * The null block driver (after Linux null_blk and the Rust rnull). Memory-backed, it keeps
 * written data in a sparse PageStore (a file on tmpfs that outlives the daemon when the daemon
 * gives one, see store-file.ts; else a memfd); otherwise reads return zeroes and writes are
 * dropped. A write the store has no room for (its file system full) fails with IOERR.
 *
 * Completion modes (null_blk `irqmode`), decided once at construction — queueRq calls the
 * chosen `finish` with no per-request branching on the mode:
 * - 0 none:    the request ends inside queueRq;
 * - 1 softirq: the request is handed to deferred completion and ends after the batch, all the
 *              batch's completions published together (one used-ring update, one call);
 * - 2 timer:   the request ends `completionNsec` after it started (a timerfd per hardware
 *              queue; see block/request-timer.ts).
 * With `mbps`, a request whose bytes exceed the bandwidth completes only when its transfer
 * would have ended (Throttle); then, whatever the mode, it ends from the queue's timer.
 */
import type { HwQueue } from '../../block/hw-queue';
import { BlkStatus, Operations, ReqOp } from '../../block/operations';
import type { Request } from '../../block/request';
import { RequestTimer } from '../../block/request-timer';
import { SEGMENT_WORDS } from '../../native';
import { BadBlocks } from './badblocks';
import { memoryPageStore, openPageStore, type PageStore } from './page-store';
import { Throttle } from './throttle';
import { WriteCache } from './write-cache';

export const enum IrqMode {
  None = 0,
  Softirq = 1,
  Timer = 2,
}

export interface NullDriverOptions {
  /** Keep written data (null_blk memory_backed). */
  memoryBacked: boolean;
  /**
   * Threads > 1: the id of the PageStore created by this disk's driver on the main thread, for
   * a worker thread's driver to share. Not with cacheBytes (the cache is one per disk).
   */
  storeId?: number;
  /** The store to keep data in (e.g. openStoreFile's); else a new memfd store of capacityBytes. */
  store?: PageStore;
  /** Size of the memfd store made when neither store nor storeId is given (default 64 GiB). */
  capacityBytes?: number;
  /** Told about each write that failed because the store had no room (errno, e.g. ENOSPC). */
  onStoreError?: (errno: number) => void;
  /** Completion mode (null_blk irqmode); default None. */
  irqmode?: IrqMode;
  /** Timer mode: delay from start to completion in nanoseconds (null_blk completion_nsec). */
  completionNsec?: number;
  /** Write-back cache size in bytes (null_blk cache_size, MiB there); needs memory backing. */
  cacheBytes?: number;
  /** Bandwidth limit in MiB/s (null_blk mbps); 0 or absent: none. */
  mbps?: number;
  /**
   * With mbps: a request waits at most this long (ns) for bandwidth (Throttle maxAheadNs);
   * absent: no limit. buildNullDisk passes half of io_timeout.
   */
  throttleMaxAheadNs?: number;
  /** Sector ranges that fail with IOERR (null_blk badblocks); `once` clears a range when hit. */
  badblocks?: BadBlocks;
  /** Told about each late completion dropped (a request that timed out before its timer). */
  onLateCompletion?: (hctx: number, tag: number) => void;
  /**
   * Timer mode and mbps: busy-wait toward a completion deadline closer than this many ns
   * instead of sleeping on the timerfd (which wakes tens of us late); buildNullDisk passes the
   * disk's poll budget (poll_us). 0 or absent: always sleep. See block/request-timer.ts.
   */
  timerSpinNs?: number;
}

/** null_blk's default completion_nsec. */
export const DEFAULT_COMPLETION_NSEC = 10_000;

/** Ends with the status the driver left in rq.status (Ok unless a bad block was hit). */
const endNow = (rq: Request): void => rq.end(rq.status);
const completeLater = (rq: Request): void => rq.complete();

/** Where a memory-backed disk's data goes: byte positions, unwritten bytes read as zeroes. */
type DataStore = Pick<PageStore, 'write' | 'read' | 'discard'>;

export class NullDriver implements Operations {
  readonly store: PageStore | null;
  readonly cache: WriteCache | null;
  /** Where data goes: the cache in front of the store, or the store. */
  private readonly data: DataStore | null;
  readonly badblocks: BadBlocks;
  readonly irqmode: IrqMode;
  readonly completionNsec: number;
  private readonly finish: (rq: Request) => void;
  private readonly timers: Array<RequestTimer | undefined> = [];
  private readonly onLate: (hctx: number, tag: number) => void;
  private readonly onStoreError: (errno: number) => void;
  private readonly timerSpinNs: number;

  /**
   * @throws RangeError for an unknown irqmode, completionNsec outside timer mode, or a cache
   * without memory backing or with a shared store; Error if storeId names no store.
   */
  constructor(options: NullDriverOptions) {
    const cached = options.cacheBytes !== undefined && options.cacheBytes > 0;
    if (cached && (!options.memoryBacked || options.storeId !== undefined)) {
      throw new RangeError('cache_size needs memory_backed and one thread: a disk that keeps nothing has nothing to cache');
    }
    this.store = !options.memoryBacked
      ? null
      : (options.store ?? (options.storeId !== undefined || options.capacityBytes === undefined ? openPageStore(options.storeId) : memoryPageStore(options.capacityBytes)));
    this.onStoreError = options.onStoreError ?? (() => undefined);
    this.cache = cached ? new WriteCache(this.store as PageStore, options.cacheBytes as number) : null;
    this.data = this.cache ?? this.store;
    this.badblocks = options.badblocks ?? new BadBlocks();
    this.irqmode = options.irqmode ?? IrqMode.None;
    if (this.irqmode !== IrqMode.Timer && options.completionNsec !== undefined) {
      throw new RangeError(`completion_nsec applies to irqmode 2 (timer) only, not irqmode ${this.irqmode}`);
    }
    this.completionNsec = options.completionNsec ?? DEFAULT_COMPLETION_NSEC;
    this.onLate = options.onLateCompletion ?? (() => undefined);
    this.timerSpinNs = options.timerSpinNs ?? 0;
    const timers = this.timers;
    const delay = this.completionNsec;
    let finish: (rq: Request) => void;
    switch (this.irqmode) {
      case IrqMode.None:
        finish = endNow;
        break;
      case IrqMode.Softirq:
        finish = completeLater;
        break;
      case IrqMode.Timer:
        finish = (rq) => (timers[rq.hctx.index] as RequestTimer).schedule(rq, rq.startNs + delay);
        break;
      default:
        throw new RangeError(`irqmode must be 0 (none), 1 (softirq) or 2 (timer), got ${String(this.irqmode)}`);
    }
    this.throttle = options.mbps !== undefined && options.mbps > 0 ? new Throttle(options.mbps, undefined, options.throttleMaxAheadNs) : null;
    const throttle = this.throttle;
    if (throttle === null) {
      this.finish = finish;
    } else {
      const modeDelay = this.irqmode === IrqMode.Timer ? delay : 0;
      this.finish = (rq) => {
        const release = throttle.reserve(rq.startNs, rq.bytes);
        if (release <= rq.startNs + modeDelay) finish(rq);
        else (timers[rq.hctx.index] as RequestTimer).schedule(rq, release);
      };
    }
  }

  readonly throttle: Throttle | null;

  /** The process-wide id of the page store (worker threads attach with it), else null. */
  get storeId(): number | null {
    return this.store?.id ?? null;
  }

  queueRq(rq: Request, _isLast: boolean): BlkStatus {
    if (this.badblocks.count !== 0 && rq.op !== ReqOp.Flush && this.badblocks.hit(rq.sector, rq.bytes / 512)) {
      // As null_blk: the request fails, and still completes through the configured mode.
      rq.status = BlkStatus.IoErr;
      this.finish(rq);
      return BlkStatus.Ok;
    }
    switch (rq.op) {
      case ReqOp.Read:
        if (this.data !== null) this.transfer(rq, false);
        else zeroFill(rq);
        break;
      case ReqOp.Write:
        if (this.data !== null) this.transfer(rq, true);
        break;
      case ReqOp.Flush:
        // Without a cache, every write is in the store when it completes.
        if (this.cache !== null) this.storeFailed(rq, this.cache.flush());
        break;
      case ReqOp.Discard:
      case ReqOp.WriteZeroes:
        if (this.data !== null) this.data.discard(rq.sector * 512, rq.bytes);
        break;
    }
    this.finish(rq);
    return BlkStatus.Ok;
  }

  /** Softirq mode: the deferred completion. */
  complete(rq: Request): void {
    rq.end(rq.status);
  }

  initHctx(hctx: HwQueue): void {
    if ((this.irqmode === IrqMode.Timer || this.throttle !== null) && this.timers[hctx.index] === undefined) {
      this.timers[hctx.index] = new RequestTimer(hctx, endNow, (tag) => this.onLate(hctx.index, tag), this.timerSpinNs);
    }
  }

  exitHctx(hctx: HwQueue): void {
    const t = this.timers[hctx.index];
    if (t !== undefined) {
      t.close();
      this.timers[hctx.index] = undefined;
    }
  }

  setWriteCache(writeback: boolean): void {
    if (this.cache !== null) this.cache.setWriteback(writeback);
  }

  /**
   * Copies between the request's guest segments and the cache or store, segment by segment. A
   * write the store has no room for ends the request with IOERR (the rest not written).
   */
  private transfer(rq: Request, write: boolean): void {
    const store = this.data as DataStore;
    const segs = rq.segments;
    let pos = rq.sector * 512;
    for (let i = 0, w = rq.segBase; i < rq.segCount; i++, w += SEGMENT_WORDS) {
      const view = rq.memory[segs[w]];
      const off = segs[w + 1];
      const len = segs[w + 2];
      if (!write) store.read(pos, view, off, len);
      else if (this.storeFailed(rq, store.write(pos, view, off, len))) return;
      pos += len;
    }
  }

  /** errno from the store: 0 is fine; else the request fails with IOERR. Returns whether it failed. */
  private storeFailed(rq: Request, errno: number): boolean {
    if (errno === 0) return false;
    rq.status = BlkStatus.IoErr;
    this.onStoreError(errno);
    return true;
  }
}

/**
 * TypedArray's own fill: Buffer.prototype.fill validates and dispatches on every call, which
 * cost ~20% of the whole dispatch path in bench/micro/dispatch.js (4k reads, batches of 32).
 */
const u8fill = Uint8Array.prototype.fill;

/** Fills a read request's segments with zeroes. */
function zeroFill(rq: Request): void {
  const segs = rq.segments;
  for (let i = 0, w = rq.segBase; i < rq.segCount; i++, w += SEGMENT_WORDS) {
    const off = segs[w + 1];
    u8fill.call(rq.memory[segs[w]], 0, off, off + segs[w + 2]);
  }
}
