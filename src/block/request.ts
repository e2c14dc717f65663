/**
 * Request: one block request in flight on a hardware queue, preallocated per tag and reused.
 *
 * States (the userspace counterpart of the kernel Request's refcount states):
 * - Idle:     owned by the core; the tag is free (for virtio: the head is with the guest).
 * - InFlight: handed to the driver by queueRq; the driver must end it exactly once.
 * - Ended:    the driver ended it; the core publishes the completion (a used-ring element)
 *             and returns the request to Idle. Only then can the guest reuse the tag.
 *
 * Invariants:
 * - end() succeeds only in InFlight; ending twice, or ending an Idle request, throws
 *   RequestStateError and changes nothing.
 * - `generation` increments each time the request is started, so a stale handle to a recycled
 *   request can be recognised (compare the generation it saw with the current one).
 *
 * Data: `segCount` segments describe the request's data in guest memory, in order. Segment i
 * is at words `segBase + 4*i` of `segments`: [chunk, offset, length, flags]; its bytes are
 * `memory[chunk]` [offset, offset + length). Read requests must fill them; write requests
 * read them. Header and status bytes are not part of the segments.
 */
import { BlkStatus, ReqOp } from './operations';
import type { HwQueue } from './hw-queue';

export const enum RequestState {
  Idle = 0,
  InFlight = 1,
  Ended = 2,
}

export class RequestStateError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'RequestStateError';
  }
}

export class Request {
  /** Tag: the request's slot number on its hardware queue (the virtio descriptor head). */
  readonly tag: number;
  readonly hctx: HwQueue;
  state: RequestState = RequestState.Idle;
  generation = 0;
  op: ReqOp = ReqOp.Read;
  /** First sector, in 512-byte units whatever the logical block size (as virtio-blk and the kernel). */
  sector = 0;
  /** Data length in bytes (a multiple of the logical block size for Read/Write, 0 for Flush). */
  bytes = 0;
  /** Status given to end(); valid in Ended. */
  status: BlkStatus = BlkStatus.Ok;
  /** Guest memory views, indexed by segment chunk. */
  memory: Buffer[] = [];
  segments: Uint32Array = new Uint32Array(0);
  segBase = 0;
  segCount = 0;
  /** Set by complete(): waiting for the deferred completion callback. */
  completing = false;

  constructor(hctx: HwQueue, tag: number) {
    this.hctx = hctx;
    this.tag = tag;
  }

  /**
   * Ends the request with `status` (the counterpart of blk_mq_end_request).
   * @throws RequestStateError if the request is not in flight (already ended, or never started).
   */
  end(status: BlkStatus): void {
    if (this.state !== RequestState.InFlight) {
      throw new RequestStateError(
        `request tag ${this.tag} on hardware queue ${this.hctx.index} ended while ${this.state === RequestState.Idle ? 'idle' : 'already ended'}`,
      );
    }
    this.state = RequestState.Ended;
    this.status = status;
    this.completing = false;
    this.hctx.requestEnded(this);
  }

  /**
   * Asks for deferred completion: Operations.complete(this) runs after the current batch
   * (the counterpart of blk_mq_complete_request). Throws like end() when not in flight.
   */
  complete(): void {
    if (this.state !== RequestState.InFlight || this.completing) {
      throw new RequestStateError(`request tag ${this.tag} on hardware queue ${this.hctx.index} completed while not in flight`);
    }
    this.completing = true;
    this.hctx.deferComplete(this);
  }
}
