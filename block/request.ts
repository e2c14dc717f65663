/**
 * Request: one block request on a hardware queue, preallocated per tag and reused (never
 * allocated on the data path).
 *
 * Ownership follows the merged Rust `kernel::block::mq::Request` (rust/kernel/block/mq/
 * request.rs), with `refcount`:
 * - 0: owned by the core — the tag is free, or the request has ended and its completion is
 *      being published (for virtio: the head is, or is about to be, back with the guest);
 * - 1: owned by the driver, with no handle in existence (set aside, found again by tag);
 * - 2: owned by the driver through exactly one handle (what queueRq receives);
 * - >2: several handles (clone()).
 * end() is the transition 2 -> 0: it succeeds only for the sole handle of a request in flight;
 * ending twice, ending with other handles alive, or ending a request the driver does not own
 * throws RequestStateError and changes nothing.
 *
 * Handles that outlive a call (a timer, a command-id table) are numbers, `ref`, naming the tag
 * and the generation: `leak()` turns the caller's handle into one and `HwQueue.reclaim(ref)`
 * turns it back, or answers null when the request has since been ended (by a timeout) or
 * recycled for a newer request — a stale handle can never touch its successor.
 *
 * Data: `segCount` segments describe the request's data in guest memory, in order. Segment i
 * is at words `segBase + 4*i` of `segments`: [chunk, offset, length, flags]; its bytes are
 * `memory[chunk]` [offset, offset + length). Read requests fill them; write requests read
 * them. Header and status bytes are not part of the segments.
 */
import { BlkStatus, ReqOp } from './operations';
import type { HwQueue } from './hw-queue';

export class RequestStateError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'RequestStateError';
  }
}

/** Tags are below 2^16 (a virtqueue holds at most 32768 descriptors). */
export const TAG_BITS = 16;
const TAG_SPACE = 1 << TAG_BITS;

export class Request {
  /** Tag: the request's slot on its hardware queue (the virtio descriptor head). */
  readonly tag: number;
  readonly hctx: HwQueue;
  /** Ownership state, see the class documentation. */
  refcount = 0;
  /** Incremented each time the request starts, and when the core ends it by force. */
  generation = 0;
  op: ReqOp = ReqOp.Read;
  /** First sector, in 512-byte units whatever the logical block size (as virtio-blk and the kernel). */
  sector = 0;
  /** Data length in bytes (a multiple of the logical block size for Read/Write, 0 for Flush). */
  bytes = 0;
  /** WriteZeroes: the driver may deallocate the range (VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP). */
  unmap = false;
  /** Status given to end(); valid once ended. */
  status: BlkStatus = BlkStatus.Ok;
  /** When the request started (monotonic ns, taken once per batch), for timeouts. */
  startNs = 0;
  /** Guest memory views, indexed by segment chunk. */
  memory: Buffer[] = [];
  segments: Uint32Array = new Uint32Array(0);
  segBase = 0;
  segCount = 0;

  constructor(hctx: HwQueue, tag: number) {
    this.hctx = hctx;
    this.tag = tag;
  }

  /** This request in this generation, as a number (see HwQueue.reclaim). */
  get ref(): number {
    return this.generation * TAG_SPACE + this.tag;
  }

  /**
   * Ends the request with `status` (blk_mq_end_request): refcount 2 -> 0; the completion is
   * published and the tag freed.
   * @throws RequestStateError if this is not the sole handle of a request the driver owns.
   */
  end(status: BlkStatus): void {
    if (this.refcount !== 2) throw this.stateError('ended');
    this.refcount = 0;
    this.status = status;
    this.hctx.requestEnded(this);
  }

  /**
   * Hands the request to deferred completion: Operations.complete receives this handle after
   * the current batch (blk_mq_complete_request; null_blk's softirq mode).
   * @throws RequestStateError if the request is not owned by the driver.
   */
  complete(): void {
    if (this.refcount < 2) throw this.stateError('completed');
    this.hctx.deferComplete(this);
  }

  /** Another handle to the same request (ARef::clone). @throws RequestStateError unless owned by the driver. */
  clone(): this {
    if (this.refcount === 0) throw this.stateError('cloned');
    this.refcount++;
    return this;
  }

  /** Drops a handle without ending. @throws RequestStateError if no handle is held. */
  drop(): void {
    if (this.refcount < 2) throw this.stateError('dropped');
    this.refcount--;
  }

  /** Turns the caller's handle into a number that HwQueue.reclaim() turns back (e.g. into a timer). */
  leak(): number {
    if (this.refcount < 2) throw this.stateError('leaked');
    return this.ref;
  }

  private stateError(what: string): RequestStateError {
    const why =
      this.refcount === 0 ? 'it is not owned by the driver (already ended, or never started)' : this.refcount === 1 ? 'no handle is held' : `${this.refcount - 1} handles exist`;
    return new RequestStateError(`request tag ${this.tag} on hardware queue ${this.hctx.index} ${what} while ${why}`);
  }
}
