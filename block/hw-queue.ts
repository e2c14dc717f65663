/**
 * HwQueue: a hardware queue of one disk (the kernel's blk_mq_hw_ctx, "hctx"). Requests arrive
 * from one submission source (a virtqueue), go to the driver through queueRq/commitRqs, and
 * their completions go back to that source through its CompletionSink.
 *
 * Requests are kept by slot (`requests[tag]`, the virtio descriptor head, < `depth`); how many
 * may be in flight at once is the tag set's business (`tags`, possibly shared with other disks).
 *
 * Invariants:
 * - requests[tag] exists for every tag < depth once the queue is first used, and is never
 *   replaced (no allocation per I/O);
 * - each request in flight holds one of `tags` (taken at dispatch, released at its end);
 * - `inFlight` counts requests owned by the driver (refcount >= 1);
 * - a request reaches the sink exactly once per start: through Request.end() (2 -> 0) or
 *   through abort() (any refcount -> 0, generation bumped so leaked handles go stale).
 */
import { BlkStatus, Operations } from './operations';
import { native } from '../native';
import { Request, TAG_BITS } from './request';
import { Tags } from './tag-set';

/** Where completions go: the submission side that owns the tags (e.g. a virtqueue). */
export interface CompletionSink {
  /** The request ended (refcount 0, status set); publish its completion (possibly batched). */
  requestEnded(request: Request): void;
  /** The request exceeded the timeout (before the driver's timeout operation runs); for logs. */
  requestTimedOut(request: Request): void;
  /**
   * A completion batch (HwQueue.endCompletionBatch) is over: publish what ended in it now. Not
   * called for requests ended inside queueRq (the submission side publishes those itself).
   */
  completionBatchEnded?(): void;
}

const TAG_SPACE = 1 << TAG_BITS;

/** spinEndNs(): a time already past, so the ring's polling spin ends before it starts. */
export const SPIN_NONE = 1;

export class HwQueue {
  readonly index: number;
  readonly depth: number;
  /** Request slots by tag, allocated when first used (see `requests`). */
  private requestSlots: Request[] | null = null;
  private ops: Operations | null = null;
  private sink: CompletionSink | null = null;
  /** Requests waiting for Operations.complete (deferred completion), in order. */
  private readonly deferred: Request[];
  private deferredCount = 0;
  /** Requests the driver currently owns. */
  inFlight = 0;
  /**
   * When the queue's polling spin must end (monotonic ns; 0: no limit), kept by
   * block/request-timer.ts: a little before its earliest deadline, so the event loop gets to
   * the timer in time.
   */
  pollEndNs = 0;
  /**
   * Set by a driver (in initHctx) whose requests end later, through the event loop (an interrupt
   * eventfd, a poll tick), not inside queue_rq or the drain. While such a request is in flight
   * the queue's ring is not spun on (spinEndNs): the thread would be busy in the spin while the
   * interrupt that ends the request waits for the event loop.
   */
  completesAsync = false;
  /**
   * When the polling spin of this queue's ring must end (monotonic ns): pollEndNs, or
   * SPIN_NONE (no spin at all) while a request of an asynchronously completing driver is in
   * flight.
   */
  spinEndNs(): number {
    return this.completesAsync && this.inFlight > 0 ? SPIN_NONE : this.pollEndNs;
  }
  /**
   * Open completion batches (begin/endCompletionBatch): while > 0 the sink waits for the end of
   * the batch to publish, instead of scheduling a publish of its own for the next event-loop turn.
   */
  completing = 0;

  readonly tags: Tags;

  constructor(index: number, depth: number, tags: Tags = new Tags(depth)) {
    this.index = index;
    this.depth = depth;
    this.tags = tags;
    this.deferred = new Array<Request>(depth);
  }

  /**
   * The request of each tag (`requests[tag]`, tag < depth), created on first use: a queue that
   * is offered but never started by a front-end holds no Request objects (~370 KiB at depth
   * 1024), so offering many queues costs next to nothing.
   */
  get requests(): Request[] {
    if (this.requestSlots !== null) return this.requestSlots;
    const slots = new Array<Request>(this.depth);
    for (let tag = 0; tag < this.depth; tag++) slots[tag] = new Request(this, tag);
    this.requestSlots = slots;
    return slots;
  }

  private watchdog: NodeJS.Timeout | null = null;
  private timeoutNs = 0;
  /** One more than the highest tag ever dispatched: no request at or above it is in flight. */
  private tagLimit = 0;

  /**
   * Connects the queue to its driver and its completion sink (a virtqueue starting), runs the
   * driver's initHctx, and starts the timeout watchdog when `timeoutMs` > 0. When initHctx
   * throws, the queue stays detached.
   */
  attach(ops: Operations, sink: CompletionSink, timeoutMs = 0): void {
    if (ops.initHctx !== undefined) ops.initHctx(this); // may throw: nothing is attached then
    this.ops = ops;
    this.sink = sink;
    this.timeoutNs = timeoutMs * 1e6;
    if (timeoutMs > 0) {
      // Check a few times per timeout; a request fails between 1x and 1.25x the timeout.
      const period = Math.max(5, Math.min(1000, Math.floor(timeoutMs / 4)));
      this.watchdog = setInterval(() => this.checkTimeouts(native.monotonicNs()), period);
      this.watchdog.unref();
    }
  }

  /** Disconnects (a virtqueue stopped, nothing in flight): stops the watchdog, runs exitHctx. */
  detach(): void {
    if (this.watchdog !== null) clearInterval(this.watchdog);
    this.watchdog = null;
    const ops = this.ops;
    if (ops?.exitHctx !== undefined) ops.exitHctx(this);
    this.sink = null;
  }

  /**
   * Fails (or hands to Operations.timeout) every request started more than the timeout ago.
   * Looks at the tags below `tagLimit` only (a ring of 256 entries never uses tag 300), so the
   * check, which runs too rarely to be optimized by the JIT, stays short.
   */
  checkTimeouts(nowNs: number): void {
    if (this.inFlight === 0 || this.timeoutNs <= 0) return;
    const limit = nowNs - this.timeoutNs;
    const ops = this.ops as Operations;
    const requests = this.requests;
    for (let tag = 0; tag < this.tagLimit; tag++) {
      const rq = requests[tag];
      if (rq.refcount === 0 || rq.startNs > limit) continue;
      if (this.sink !== null) this.sink.requestTimedOut(rq);
      if (ops.timeout === undefined) {
        this.abort(rq, BlkStatus.IoErr);
      } else if (ops.timeout(rq) === 'reset') {
        rq.startNs = nowNs;
      }
    }
  }

  /**
   * Starts `request` (prepared by the caller: op, sector, bytes, segments; `nowNs` is the
   * batch's monotonic time) and hands it to the driver with one handle (refcount 2). A status
   * other than Ok from queueRq ends it with that status.
   */
  dispatch(request: Request, isLast: boolean, nowNs: number): void {
    if (request.tag >= this.tagLimit) this.tagLimit = request.tag + 1;
    request.refcount = 2;
    request.generation++;
    request.startNs = nowNs;
    request.status = BlkStatus.Ok;
    this.inFlight++;
    this.tags.take();
    const status = (this.ops as Operations).queueRq(request, isLast);
    if (status !== BlkStatus.Ok && request.refcount !== 0) this.abort(request, status);
  }

  /** End of a batch whose last request did not carry isLast. */
  commit(): void {
    const ops = this.ops as Operations;
    if (ops.commitRqs !== undefined) ops.commitRqs(this);
  }

  /**
   * The request of `tag` with a new handle (refcount + 1), if the driver owns it; null when
   * the tag is out of range or the request is not in flight (blk_mq_tag_to_rq, checked).
   */
  tagToRq(tag: number): Request | null {
    const rq = this.requests[tag];
    if (rq === undefined || rq.refcount === 0) return null;
    rq.refcount++;
    return rq;
  }

  /**
   * Turns a leaked handle (Request.leak()) back into the request, or null when that request
   * was ended meanwhile (e.g. by a timeout) or recycled for a newer one.
   */
  reclaim(ref: number): Request | null {
    const tag = ref % TAG_SPACE;
    const rq = this.requests[tag];
    if (rq === undefined || rq.refcount < 2 || rq.generation !== (ref - tag) / TAG_SPACE) return null;
    return rq;
  }

  /**
   * Ends a request whatever handles exist (timeouts, teardown): the generation moves on, so
   * leaked handles become stale and reclaim() refuses them. No-op if the core owns it.
   */
  abort(request: Request, status: BlkStatus): void {
    if (request.refcount === 0) return;
    request.refcount = 0;
    request.generation++;
    request.status = status;
    this.requestEnded(request);
  }

  /**
   * A driver about to end several requests outside queueRq (an interrupt's or a poll's reap, a
   * timer expiry) brackets them with begin/endCompletionBatch, as blk_mq_end_request_batch
   * does with an io_comp_batch: the sink then publishes them together, once, when the batch
   * ends, in the same call (no event-loop turn in between, nothing allocated). Batches nest.
   */
  beginCompletionBatch(): void {
    this.completing++;
  }

  /** Ends a batch begun by beginCompletionBatch; the outermost end tells the sink. */
  endCompletionBatch(): void {
    if (this.completing > 0 && --this.completing === 0 && this.sink !== null && this.sink.completionBatchEnded !== undefined) this.sink.completionBatchEnded();
  }

  /** Runs the deferred completions collected during the batch (softirq-style). */
  runDeferred(): void {
    const complete = (this.ops as Operations).complete as (r: Request) => void;
    for (let i = 0; i < this.deferredCount; i++) {
      const rq = this.deferred[i];
      this.deferred[i] = undefined as unknown as Request;
      if (rq.refcount >= 2) complete(rq);
    }
    this.deferredCount = 0;
  }

  /** @internal Request.complete() */
  deferComplete(request: Request): void {
    if (this.ops?.complete === undefined) throw new Error(`driver has no complete operation (request tag ${request.tag})`);
    this.deferred[this.deferredCount++] = request;
  }

  /** @internal Request.end() and abort() */
  requestEnded(request: Request): void {
    this.inFlight--;
    this.tags.release();
    if (this.sink !== null) this.sink.requestEnded(request);
  }

  get hasDeferred(): boolean {
    return this.deferredCount > 0;
  }
}
