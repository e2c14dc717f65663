/**
 * HwQueue: a hardware queue (the kernel's blk_mq_hw_ctx, "hctx"). Requests arrive from one
 * submission source (a virtqueue), go to the driver through queueRq/commitRqs, and their
 * completions go back to that source through its CompletionSink.
 *
 * Invariants:
 * - requests[tag] exists for every tag < depth and is never replaced (no allocation per I/O);
 * - a request is in flight on at most one path at a time (Request's state machine).
 */
import { BlkStatus, Operations } from './operations';
import { Request, RequestState } from './request';

/** Where completions go: the submission side that owns the tags (e.g. a virtqueue). */
export interface CompletionSink {
  /** The request was ended; publish its completion (possibly batched). */
  requestEnded(request: Request): void;
}

export class HwQueue {
  readonly index: number;
  readonly depth: number;
  readonly requests: Request[];
  private ops: Operations | null = null;
  private sink: CompletionSink | null = null;
  /** Requests waiting for Operations.complete (deferred completion), in order. */
  private deferred: Request[] = [];
  private deferredCount = 0;
  /** Requests the driver currently owns (InFlight). */
  inFlight = 0;

  constructor(index: number, depth: number) {
    this.index = index;
    this.depth = depth;
    this.requests = new Array<Request>(depth);
    for (let tag = 0; tag < depth; tag++) this.requests[tag] = new Request(this, tag);
    this.deferred = new Array<Request>(depth);
  }

  /** Connects the queue to its driver and its completion sink (a virtqueue starting). */
  attach(ops: Operations, sink: CompletionSink): void {
    this.ops = ops;
    this.sink = sink;
  }

  /** Disconnects the sink (a virtqueue stopped); must only happen with nothing in flight. */
  detach(): void {
    this.sink = null;
  }

  /**
   * Starts `request` (prepared by the caller: op, sector, bytes, segments) and hands it to the
   * driver. A refusal from queueRq ends it with the returned status.
   */
  dispatch(request: Request, isLast: boolean): void {
    request.state = RequestState.InFlight;
    request.generation++;
    this.inFlight++;
    const status = (this.ops as Operations).queueRq(request, isLast);
    if (status !== BlkStatus.Ok && request.state === RequestState.InFlight) request.end(status);
  }

  /** End of a batch whose last request did not carry isLast. */
  commit(): void {
    const ops = this.ops as Operations;
    if (ops.commitRqs !== undefined) ops.commitRqs(this);
  }

  /** Runs the deferred completions collected during the batch (softirq-style). */
  runDeferred(): void {
    const ops = this.ops as Operations;
    for (let i = 0; i < this.deferredCount; i++) {
      const rq = this.deferred[i];
      this.deferred[i] = undefined as unknown as Request;
      if (rq.state === RequestState.InFlight && rq.completing) (ops.complete as (r: Request) => void)(rq);
    }
    this.deferredCount = 0;
  }

  /** @internal Request.complete() */
  deferComplete(request: Request): void {
    if (this.ops?.complete === undefined) throw new Error(`driver has no complete operation (request tag ${request.tag})`);
    this.deferred[this.deferredCount++] = request;
  }

  /** @internal Request.end() */
  requestEnded(request: Request): void {
    this.inFlight--;
    if (this.sink !== null) this.sink.requestEnded(request);
  }

  /** @internal the sink published the completion: the tag is free again. */
  release(request: Request): void {
    request.state = RequestState.Idle;
  }

  get hasDeferred(): boolean {
    return this.deferredCount > 0;
  }
}
