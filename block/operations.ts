/**
 * The driver contract, after the kernel's `kernel::block::mq::Operations`
 * (rust/kernel/block/mq/operations.rs): a driver receives requests in `queueRq`, may batch
 * work until `commitRqs`, and ends each request exactly once (see Request).
 */
import type { NativeGuestMemory } from '../native';
import type { HwQueue } from './hw-queue';
import type { Request } from './request';

/**
 * Completion status of a request. The values are virtio-blk's status byte
 * (VIRTIO 1.2 section 5.2.6: VIRTIO_BLK_S_OK, _IOERR, _UNSUPP), the counterpart of blk_status_t.
 */
export const enum BlkStatus {
  Ok = 0,
  IoErr = 1,
  Unsupp = 2,
}

/** What a request asks for (the counterpart of REQ_OP_*). */
export const enum ReqOp {
  /** Read `bytes` from `sector` into the request's (device-writable) segments. */
  Read = 0,
  /** Write the request's (device-readable) segments to `sector`. */
  Write = 1,
  /** Make every completed write durable. No data. */
  Flush = 2,
  /** Deallocate `bytes` from `sector`; reads of the range may return anything (here: zeroes). No data. */
  Discard = 3,
  /** Make `bytes` from `sector` read as zeroes; `unmap` allows deallocating them. No data. */
  WriteZeroes = 4,
}

export interface Operations {
  /**
   * Called for each request taken from a hardware queue, with `isLast` true for the last of
   * the current batch (its hardware queue is `request.hctx`). The driver now owns the request and must end it (now or later) with
   * `request.end(status)`. Returning a status other than Ok refuses the request: the core
   * ends it with that status, and the driver must not end it too.
   */
  queueRq(request: Request, isLast: boolean): BlkStatus;
  /**
   * Called after a batch whose last request was not passed with isLast (kernel commit_rqs):
   * submit whatever queueRq held back for `hctx` (e.g. ring a doorbell once).
   */
  commitRqs?(hctx: HwQueue): void;
  /**
   * Deferred completion: after `request.complete()`, the core calls this once the current
   * batch is done (the counterpart of the softirq `complete` callback); the driver ends it here.
   */
  complete?(request: Request): void;
  /**
   * A request was not ended within the disk's timeout. Return 'done' once it has been dealt
   * with (ended, or aborted through hctx.abort), or 'reset' to give it another full timeout.
   * Without this operation the core fails the request with IOERR (abort).
   */
  timeout?(request: Request): 'done' | 'reset';
  /**
   * The guest switched the volatile write cache on (writeback) or off (writethrough), through
   * VIRTIO_BLK_F_CONFIG_WCE. Only called for disks that offer it (Disk.writeCache).
   */
  setWriteCache?(writeback: boolean): void;
  /**
   * The front-end's memory table was mapped (SET_MEM_TABLE), before any ring starts on it: a
   * driver whose device reaches guest memory by DMA maps it here (once per table, not per
   * request). Throwing refuses the table.
   */
  memoryMapped?(memory: NativeGuestMemory): void;
  /**
   * The memory table is about to be unmapped (a new table, or the front-end went away); every
   * ring using it has stopped, so no request using it is in flight.
   */
  memoryReleased?(memory: NativeGuestMemory): void;
  /** A hardware queue starts serving (a virtqueue started): set up per-queue state. */
  initHctx?(hctx: HwQueue): void;
  /** A hardware queue stopped, with nothing in flight: release per-queue state. */
  exitHctx?(hctx: HwQueue): void;
}
