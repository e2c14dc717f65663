/**
 * VirtioBlkQueue: one virtqueue serving one hardware queue of a disk.
 *
 * A kick drains the avail ring in batches (one native pop() per batch), turns each chain into
 * a Request (BlkRequestParser) and dispatches it to the driver; ended requests become used
 * elements, published together (one native push() per batch: one used->idx store, at most one
 * call). Completions that arrive outside a batch (deferred, timers) are published on the next
 * turn of the event loop, again as one batch.
 *
 * Invariants:
 * - a head is either with the guest, or in flight here (popped, not yet pushed) — the native
 *   queue enforces it and marks the queue broken if the guest offers an in-flight head;
 * - a head's status byte is written before its used element is published;
 * - stop() resolves only once every popped head has been pushed back (nothing left behind).
 */
import type { Logger } from 'pino';
import type { Disk } from '../block/disk';
import type { CompletionSink, HwQueue } from '../block/hw-queue';
import { BlkStatus } from '../block/operations';
import type { Request } from '../block/request';
import { BATCH_WORDS, MAX_SEGMENTS, native, NativeFdWatcher, NativeVirtqueue, SEGMENT_WORDS } from '../native';
import type { QueueSnapshot, RingQueue, VringSetup } from './ring-queue';

import { BlkRequestParser, MAX_CHAIN_BYTES, MAX_CHAIN_DESCRIPTORS, ParseOutcome, serialId } from './blk-request';
import { recoverSplitQueue, type SplitRecovery } from './inflight-region';

/**
 * A batch ends once it holds this many bytes of buffers (native pop), so a front-end waiting on
 * large requests gets their completions (one publish, at most one call per batch) while later
 * ones are still copied. bench (128k seqread QD8, null disk): 116k -> 230k IOPS against
 * batches bounded by count only.
 */
const BATCH_BYTES = 65536;

/**
 * One drain() call stops taking batches once it has run this long (monotonic ns, measured
 * from its first batch) and goes on at the next turn of the event loop, so a guest that
 * re-offers every completed request at once cannot keep the thread (other rings, messages,
 * timers, signals) waiting (the CVE-2019-3900 pattern). Notifications stay suppressed
 * meanwhile: the native pop re-arms them only once it finds the ring empty.
 */
const DRAIN_BUDGET_NS = 1_000_000;

/**
 * The running virtqueues of this thread (module state is per thread: each worker loads its
 * own), by poll id. When a queue's polling spin gives way to another of them (native pop,
 * info[3]), that one is drained right away, in the same event-loop turn: several queues on one
 * thread share one polling loop instead of taking an event-loop turn and a guest kick each.
 */
const pollGroup = new Map<number, VirtioBlkQueue>();
/** A hand-off loop is running (handOff): a nested hand-off only names the next queue. */
let handingOff = false;
let nextHandoff: VirtioBlkQueue | undefined;

/**
 * Drains `first`, then each queue a drain's spin gave way to, until none is named or
 * DRAIN_BUDGET_NS has passed (then the event loop turns: the queue not served yet sleeps with
 * its notifications armed, so the guest's kick brings it back).
 */
function handOff(first: VirtioBlkQueue): void {
  if (handingOff) {
    nextHandoff = first;
    return;
  }
  handingOff = true;
  const start = native.monotonicNs();
  try {
    let q: VirtioBlkQueue | undefined = first;
    while (q !== undefined) {
      nextHandoff = undefined;
      q.drain();
      q = nextHandoff;
      if (q !== undefined && native.monotonicNs() - start >= DRAIN_BUDGET_NS) break;
    }
  } finally {
    handingOff = false;
    nextHandoff = undefined;
  }
}

/** Driver failures logged per second per queue at most (the rest are counted). */
const FAILURE_LOGS_PER_SECOND = 10;

/** Names of the chain errors native/virtqueue.h reports, by code. */
const CHAIN_ERRORS = [
  'ok',
  'buffer outside guest memory',
  'zero-length buffer',
  'device-readable buffer after a device-writable one',
  'too many segments',
  'descriptor loop',
  'next index outside the table',
  'bad indirect descriptor',
  'more descriptors than seg_max allows',
  'more bytes than a request may transfer',
];

export interface QueueStats {
  requests: number;
  badChains: number;
  failedRequests: number;
  batches: number;
}

export class VirtioBlkQueue implements CompletionSink, RingQueue {
  readonly index: number;
  readonly stats: QueueStats = { requests: 0, badChains: 0, failedRequests: 0, batches: 0 };
  private readonly vq: NativeVirtqueue = new native.Virtqueue();
  private readonly hctx: HwQueue;
  private readonly disk: Disk;
  private readonly log: Logger;
  private size = 0;
  private segments = new Uint32Array(0);
  private batch = new Uint32Array(0);
  private used = new Uint32Array(0);
  /**
   * Shared with native pop(): [monotonic ns of the batch, used elements published by it, when
   * its polling spin must end (0: no limit), poll id of the queue its spin gave way to (-1)].
   */
  private readonly info = new Float64Array(4);
  /** This queue is in pollGroup (under its native virtqueue's poll id). */
  private polled = false;
  /** Status byte location and used length per head, kept while the head is in flight. */
  private statusChunk = new Uint32Array(0);
  private statusOffset = new Uint32Array(0);
  private usedLen = new Uint32Array(0);
  private parser: BlkRequestParser | null = null;
  private views: Buffer[] = [];
  private kickWatcher: NativeFdWatcher | null = null;
  private usedCount = 0;
  private inflight = 0;
  private draining = false;
  private publishScheduled = false;
  /** drain() ran out of budget and goes on at the next turn (setImmediate). */
  private resumeScheduled = false;
  private running = false;
  /** stop() is waiting for the in-flight requests. */
  private stopping = false;
  /** stop() pops the heads still to resubmit after a restart (nothing from the avail ring). */
  private flushResubmits = false;
  private enabled = false;
  private brokenLogged = false;
  private lastNoiseLog = 0;
  private lastTimeoutLog = 0;
  /** driverFailed() log limit: start of the current one-second window, lines logged in it, lines left out since the last one. */
  private failureLogWindow = 0;
  private failureLogs = 0;
  private failureLogsSuppressed = 0;
  private idleWaiters: Array<() => void> = [];
  private readonly drainLater = (): void => this.drain();
  private readonly resumeLater = (): void => {
    this.resumeScheduled = false;
    this.drain();
  };
  private readonly publishLater = (): void => {
    this.publishScheduled = false;
    // Completions that ended outside a batch (timers) go out with a pop, as a batch's do: its
    // adaptive spin then catches the front-end's next request instead of a kick wake-up
    // (tens of us late on a sleeping thread). publish() sends what drain() did not (a ring
    // not enabled or stopping).
    this.drain();
    this.publish();
  };
  private readonly onKick = (status: number): void => {
    if (status !== 0) {
      this.log.error({ queue: this.index, status }, 'kick eventfd poll failed; queue stops');
      this.stopWatching();
      return;
    }
    this.drain();
  };

  constructor(index: number, hctx: HwQueue, disk: Disk, log: Logger) {
    this.index = index;
    this.hctx = hctx;
    this.disk = disk;
    this.log = log;
  }

  /**
   * Starts the ring: configures the native virtqueue and watches the kick eventfd. Processing
   * begins once the ring is also enabled (setEnabled). Takes no ownership of kickFd/callFd.
   * All or nothing: when it throws, nothing is left started (no ring configured, no kick
   * watched, the hardware queue not attached), so guest memory may be released at once.
   * @throws RangeError when the ring does not lie in guest memory; SyscallError when the kick
   * fd cannot be watched (whether or not the ring starts enabled); Error if it runs already.
   */
  start(setup: VringSetup, enabled: boolean): void {
    if (this.running) throw new Error(`ring ${this.index} is already running: stop it first`);
    if (this.size !== setup.size) {
      this.size = setup.size;
      this.segments = new Uint32Array(setup.size * MAX_SEGMENTS * SEGMENT_WORDS);
      this.batch = new Uint32Array(setup.size * BATCH_WORDS);
      this.used = new Uint32Array(setup.size * 2);
      this.statusChunk = new Uint32Array(setup.size);
      this.statusOffset = new Uint32Array(setup.size);
      this.usedLen = new Uint32Array(setup.size);
    }
    this.views = setup.memory.views;
    // Every request of this queue reads its data through these (set once, not per request).
    for (const rq of this.hctx.requests) {
      rq.memory = this.views;
      rq.segments = this.segments;
    }
    this.parser = new BlkRequestParser(
      {
        capacitySectors: this.disk.capacitySectors,
        logicalBlockSize: this.disk.logicalBlockSize,
        readOnly: this.disk.readOnly,
        flush: this.disk.flush,
        discard: this.disk.discard,
        serialId: serialId(this.disk.serial),
      },
      this.views,
      this.segments,
    );
    let watcher: NativeFdWatcher | null = null;
    let attached = false;
    this.joinPollGroup();
    try {
      this.configureRing(setup);
      // Watched once now even for a disabled ring, so a kick fd the event loop refuses fails
      // the start rather than a later SET_VRING_ENABLE.
      watcher = new native.FdWatcher(setup.kickFd, this.onKick, true);
      watcher.start();
      if (!enabled) watcher.stop();
      this.hctx.attach(this.disk.ops, this, this.disk.timeoutMs);
      attached = true;
    } catch (e) {
      if (watcher !== null) watcher.stop();
      if (attached) this.hctx.detach();
      this.vq.stop(); // forgets the ring and its memory (a no-op if configure() failed first)
      this.leavePollGroup();
      throw e;
    }
    this.running = true;
    this.brokenLogged = false;
    this.kickWatcher = watcher;
    const restarted = this.attachInflight(setup);
    this.setEnabled(enabled);
    // After a restart the guest may wait for an interrupt the previous back-end never sent.
    if (restarted) this.vq.signal();
  }

  /**
   * start(): recovers this queue's inflight block (inflight-region.ts) and tracks the ring in it.
   * Returns true when the block was in use before (a restart, or a ring stopped and started
   * again): the caller then signals the guest once. A block that cannot serve this ring (none
   * for this queue, too few entries) leaves the ring untracked; a block refused by the recovery
   * checks is re-initialised. Either is logged; neither stops the ring.
   */
  private attachInflight(setup: VringSetup): boolean {
    const region = setup.inflight;
    if (region === undefined || region === null) return false;
    if (this.index >= region.numQueues || region.queueSize < setup.size) {
      this.log.error(
        { queue: this.index, regionQueues: region.numQueues, regionQueueSize: region.queueSize, ringSize: setup.size },
        'inflight region has no block for this ring: its requests are not tracked (a restart loses them)',
      );
      return false;
    }
    const usedIdx = this.vq.state().usedIdx;
    let r: SplitRecovery;
    try {
      r = recoverSplitQueue(region.block(this.index), region.queueSize, setup.size, usedIdx, setup.lastAvailIdx);
      this.vq.setInflight({
        region: region.table,
        offset: region.blockOffset(this.index),
        descNum: region.queueSize,
        counter: r.counter,
        lastAvailIdx: r.lastAvailIdx,
        resubmit: r.resubmit,
      });
    } catch (e) {
      // A region released under us (its views empty) or one the native ring refuses.
      this.log.error({ queue: this.index, err: e }, 'inflight region not usable: this ring runs untracked');
      return false;
    }
    if (r.refused !== null) {
      this.log.error({ queue: this.index, reason: r.refused }, 'inflight region block refused and re-initialised: requests in flight before the restart cannot be resubmitted');
    }
    if (!r.fresh) {
      this.log.info(
        { queue: this.index, resubmit: r.resubmit.length, lastAvailIdx: r.lastAvailIdx, usedIdx, batchCleared: r.batchCleared },
        r.resubmit.length > 0 ? 'inflight region: resubmitting requests in flight before the restart' : 'inflight region: nothing was in flight',
      );
    }
    return !r.fresh;
  }

  /** start(): the native ring's configuration (may throw, nothing is watched yet). */
  private configureRing(setup: VringSetup): void {
    this.vq.configure({
      memory: setup.memory.table,
      size: setup.size,
      descAddr: setup.descAddr,
      availAddr: setup.availAddr,
      usedAddr: setup.usedAddr,
      lastAvailIdx: setup.lastAvailIdx,
      eventIdx: setup.eventIdx,
      indirect: setup.indirect,
      segments: this.segments,
      batch: this.batch,
      used: this.used,
      info: this.info,
      batchBytes: BATCH_BYTES,
      maxDescriptors: MAX_CHAIN_DESCRIPTORS,
      maxBytes: MAX_CHAIN_BYTES,
    });
    this.vq.setCallFd(setup.callFd);
    this.vq.setPolling(setup.pollUs * 1000);
  }

  /** SET_VRING_ENABLE: a disabled ring is not processed (kicks wait until it is enabled). */
  setEnabled(enabled: boolean): void {
    this.enabled = enabled;
    if (!this.running || this.stopping || this.kickWatcher === null) return;
    if (enabled) {
      this.kickWatcher.start();
      this.drain(); // buffers made available before the ring was enabled
    } else {
      this.kickWatcher.stop();
    }
  }

  /** SET_VRING_CALL on a running ring: signal this eventfd from now on (-1: none). */
  setCallFd(fd: number): void {
    if (this.running) this.vq.setCallFd(fd);
  }

  get isRunning(): boolean {
    return this.running;
  }

  /**
   * GET_VRING_BASE: stops taking new chains, waits until every in-flight request has ended and
   * been published, then stops the ring. Resolves with the next avail index.
   */
  async stop(): Promise<number> {
    this.stopping = true; // drain() takes nothing more, not even when a tag frees up
    this.stopWatching();
    // Requests resubmitted after a restart are in flight too: they run before the answer.
    this.flushResubmits = this.vq.state().resubmitPending > 0;
    for (;;) {
      const batches = this.stats.batches;
      if (this.flushResubmits) this.drain();
      if (this.inflight > 0) {
        await new Promise<void>((resolve) => this.idleWaiters.push(resolve));
        continue;
      }
      // Out of drain budget with resubmits left: go on (a broken ring pops nothing: stop).
      if (!this.flushResubmits || this.stats.batches === batches || this.vq.state().resubmitPending === 0) break;
    }
    this.flushResubmits = false;
    this.publish();
    this.stopping = false;
    this.running = false;
    this.hctx.detach();
    const next = this.vq.stop();
    this.leavePollGroup();
    return next;
  }

  private joinPollGroup(): void {
    pollGroup.set(this.vq.pollId, this);
    this.polled = true;
  }

  private leavePollGroup(): void {
    if (!this.polled) return;
    pollGroup.delete(this.vq.pollId);
    this.polled = false;
  }

  private stopWatching(): void {
    if (this.kickWatcher !== null) {
      this.kickWatcher.stop();
      this.kickWatcher = null;
    }
  }

  /**
   * Drains the avail ring: batch after batch until it is empty, or until DRAIN_BUDGET_NS has
   * passed since the first batch: then the completions so far are published and the drain goes
   * on at the next turn of the event loop.
   */
  drain(): void {
    if (!this.running || this.draining) return;
    if ((!this.enabled || this.stopping) && !this.flushResubmits) return;
    this.draining = true;
    const resubmitOnly = this.flushResubmits;
    const parser = this.parser as BlkRequestParser;
    const requests = this.hctx.requests;
    const batch = this.batch;
    let firstNs = -1;
    let yieldTo: VirtioBlkQueue | undefined;
    try {
      const tags = this.hctx.tags;
      for (;;) {
        // One crossing per batch: publish the last batch's completions, then pop the next
        // (no more chains than free tags: the rest wait in the avail ring).
        const room = tags.free;
        if (room <= 0) {
          this.publish();
          tags.wait(this.drainLater);
          break;
        }
        const toPublish = this.usedCount;
        this.usedCount = 0;
        this.info[2] = this.hctx.spinEndNs(); // before a timer's deadline; none with device I/O in flight
        const n = resubmitOnly ? this.vq.pop(toPublish, room, true) : this.vq.pop(toPublish, room);
        if (toPublish > 0) this.published(this.info[1]);
        if (n <= 0) {
          if (n < 0) this.reportBroken();
          else if (this.info[3] > 0) yieldTo = pollGroup.get(this.info[3]);
          break;
        }
        this.stats.batches++;
        this.inflight += n;
        const now = this.info[0];
        if (firstNs < 0) firstNs = now;
        let lastDispatched = false;
        for (let i = 0; i < n; i++) {
          const b = i * BATCH_WORDS;
          const head = batch[b];
          const nseg = batch[b + 1];
          const chainError = batch[b + 2];
          const base = head * MAX_SEGMENTS * SEGMENT_WORDS;
          lastDispatched = false;
          if (chainError !== 0) {
            this.badChain(head, base, nseg, chainError);
            continue;
          }
          const rq = requests[head];
          const outcome = parser.parse(base, nseg, rq);
          if (outcome === ParseOutcome.Dispatch) {
            this.statusChunk[head] = parser.statusChunk;
            this.statusOffset[head] = parser.statusOffset;
            this.usedLen[head] = parser.usedLen;
            this.stats.requests++;
            lastDispatched = i === n - 1;
            try {
              this.hctx.dispatch(rq, lastDispatched, now);
            } catch (e) {
              this.driverFailed(rq, e as Error);
            }

          } else if (outcome === ParseOutcome.Finish) {
            if (parser.status !== BlkStatus.Ok) this.noise(head, parser.reason);
            this.finish(head, parser.statusChunk, parser.statusOffset, parser.status, parser.usedLen);
          } else {
            this.noise(head, parser.reason);
            this.addUsed(head, 0);
          }
        }
        if (!lastDispatched) this.hctx.commit();
        if (this.hctx.hasDeferred) this.hctx.runDeferred();
        if (now - firstNs >= DRAIN_BUDGET_NS) {
          // Out of budget: hand over what ended, let the event loop turn, then go on.
          this.publish();
          if (!this.resumeScheduled) {
            this.resumeScheduled = true;
            setImmediate(this.resumeLater);
          }
          break;
        }
      }
    } finally {
      this.draining = false;
    }
    // The spin gave way to another queue of this thread: serve it now (see handOff).
    if (yieldTo !== undefined && yieldTo !== this) handOff(yieldTo);
  }

  /** CompletionSink: a request ended; its used element joins the current batch. */
  requestEnded(rq: Request): void {
    const head = rq.tag;
    const status = rq.status;
    if (status !== BlkStatus.Ok) this.stats.failedRequests++;
    this.finish(head, this.statusChunk[head], this.statusOffset[head], status, status === BlkStatus.Ok ? this.usedLen[head] : 1);
    // Inside a drain the batch publishes it; inside a driver's completion batch its end does.
    if (!this.draining && !this.publishScheduled && this.hctx.completing === 0) {
      this.publishScheduled = true;
      setImmediate(this.publishLater);
    }
  }

  /**
   * CompletionSink: a driver's completion batch ended (interrupt, poll, timer): its requests are
   * published now, as publishLater would on the next turn, one event-loop turn earlier.
   */
  completionBatchEnded(): void {
    if (this.draining || this.usedCount === 0) return;
    this.drain();
    this.publish();
  }

  /** CompletionSink: logged at warn, at most once a second per queue. */
  requestTimedOut(rq: Request): void {
    const now = Date.now();
    if (now - this.lastTimeoutLog < 1000) return;
    this.lastTimeoutLog = now;
    this.log.warn({ queue: this.index, tag: rq.tag, sector: rq.sector, timeoutMs: this.disk.timeoutMs }, 'request timed out');
  }

  private finish(head: number, chunk: number, offset: number, status: BlkStatus, usedLen: number): void {
    const view = this.views[chunk];
    if (view !== undefined && offset < view.length) view[offset] = status;
    this.addUsed(head, usedLen);
  }

  private addUsed(head: number, len: number): void {
    const u = this.usedCount * 2;
    this.used[u] = head;
    this.used[u + 1] = len;
    this.usedCount++;
  }

  /** Publishes the collected used elements: one native crossing, at most one call. */
  private publish(): void {
    const n = this.usedCount;
    if (n === 0) return;
    this.usedCount = 0;
    this.published(this.vq.push(n));
  }

  /** `count` used elements reached the guest: wake stop() once nothing is in flight. */
  private published(count: number): void {
    this.inflight -= count;
    if (this.inflight === 0 && this.idleWaiters.length > 0) {
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const w of waiters) w();
    }
  }

  /**
   * A chain native pop() refused. Soft errors (the chain's structure held: codes 1-4, 8, 9)
   * report the status byte as the one segment when the last descriptor is device-writable:
   * the request fails with IOERR there. Hard errors (5-7: loop, bad next index, bad indirect)
   * report none: nothing is written and the head returns with used length 0 (a device MUST
   * NOT write to a device-readable buffer, VIRTIO 1.2 section 2.7.4.1).
   */
  private badChain(head: number, base: number, nseg: number, code: number): void {
    this.stats.badChains++;
    this.noise(head, CHAIN_ERRORS[code] ?? `chain error ${code}`);
    const soft = code <= 4 || code === 8 || code === 9;
    if (soft && nseg === 1 && (this.segments[base + 3] & 1) !== 0) {
      this.finish(head, this.segments[base], this.segments[base + 1] + this.segments[base + 2] - 1, BlkStatus.IoErr, 1);
    } else {
      this.addUsed(head, 0);
    }
  }

  /**
   * A driver threw from queueRq: a bug, but one request's, not the daemon's. The request
   * fails with IOERR (if the driver had not ended it) and the error is logged: at most
   * FAILURE_LOGS_PER_SECOND a second per queue, the next logged line giving the number left
   * out (`suppressed`), so a guest repeating a failing request cannot flood the log.
   */
  private driverFailed(rq: Request, err: Error): void {
    const now = Date.now();
    if (now - this.failureLogWindow >= 1000) {
      this.failureLogWindow = now;
      this.failureLogs = 0;
    }
    if (this.failureLogs < FAILURE_LOGS_PER_SECOND) {
      this.failureLogs++;
      const suppressed = this.failureLogsSuppressed;
      this.failureLogsSuppressed = 0;
      this.log.error({ queue: this.index, tag: rq.tag, err, ...(suppressed > 0 ? { suppressed } : {}) }, 'driver failed a request');
    } else {
      this.failureLogsSuppressed++;
    }
    this.hctx.abort(rq, BlkStatus.IoErr);
  }

  /** Guest mistakes are logged at debug, at most once a second per queue. */
  private noise(head: number, reason: string): void {
    const now = Date.now();
    if (now - this.lastNoiseLog < 1000) return;
    this.lastNoiseLog = now;
    this.log.debug({ queue: this.index, head, reason }, 'request failed');
  }

  private reportBroken(): void {
    if (this.brokenLogged) return;
    this.brokenLogged = true;
    const st = this.vq.state();
    this.log.error({ queue: this.index, reason: st.brokenReason }, 'virtqueue broken by the guest; no further requests are taken from it');
    this.stopWatching();
  }

  /** Counters and ring state; `thread` is the thread this queue runs on (0: main). */
  snapshot(thread = 0): QueueSnapshot {
    const ring = this.running ? this.vq.state() : null;
    return {
      running: this.running,
      thread,
      requests: this.stats.requests,
      failedRequests: this.stats.failedRequests,
      badChains: this.stats.badChains,
      batches: this.stats.batches,
      inFlight: this.hctx.inFlight,
      broken: ring?.broken ?? false,
      calls: ring?.calls ?? 0,
      spins: ring?.spins ?? 0,
      spinHits: ring?.spinHits ?? 0,
      spinYields: ring?.spinYields ?? 0,
      pollNs: ring?.pollNs ?? 0,
    };
  }

  /** Native ring state, for tests and diagnostics. */
  state(): ReturnType<NativeVirtqueue['state']> {
    return this.vq.state();
  }
}
