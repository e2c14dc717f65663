/**
 * Shadow doorbells (NVM Express 1.3, 5.7 "Doorbell Buffer Config command" and 7.13 "Updating
 * Controller Doorbell Properties using a Shadow Doorbell Buffer"): the host gives the controller
 * two pages of its memory, laid out like the doorbell registers (queue `qid`'s SQ tail entry at
 * 2 x qid x stride bytes, its CQ head entry at (2 x qid + 1) x stride). The host writes every new
 * SQ tail and CQ head into the Shadow Doorbell page; the controller writes into the EventIdx page
 * the index past which it wants an MMIO doorbell write again. The MMIO write is then needed only
 * when the new value moves past that EventIdx, which an emulated controller (every MMIO write a
 * VM exit) answers much faster.
 *
 * Ordering for one update: the shadow entry is stored, a full fence (vfioFence), the EventIdx
 * entry is loaded, and the doorbell register is written only if needEvent() says so. The
 * controller does the mirror image (EventIdx store, then shadow load), so either it sees the new
 * value or the host sees its EventIdx and rings.
 *
 * A controller that never writes an EventIdx entry (or one that has not yet): the host fills the
 * EventIdx page with EVENT_IDX_UNKNOWN, which is no queue index, and rings the register for every
 * update while an entry holds it. So nothing is lost with a controller that accepts the buffers
 * and ignores the EventIdx side, and after a reset (the entries are filled again while the
 * controller is disabled) no EventIdx from before can suppress a needed write.
 *
 * Used for I/O queues only (as Linux and SPDK do); the admin queue is rung by MMIO, which QEMU's
 * emulated controller (7.1 and later) mirrors into the admin queue's shadow entry itself.
 */

/** What the host writes into an EventIdx entry: no queue index (ring until the controller writes one). */
export const EVENT_IDX_UNKNOWN = 0xffffffff;

/**
 * The event-index test (as Linux's nvme_dbbuf_need_event and virtio's vring_need_event): does
 * moving a doorbell from `oldIdx` to `newIdx` (ring indexes, 0..entries-1) pass `eventIdx`, i.e.
 * is `eventIdx` in the circular window [oldIdx, newIdx)? Computed as
 * (u16)(new - eventIdx - 1) < (u16)(new - old), which is exact for indexes below `entries`
 * (at most 65536). An `eventIdx` that is no index of the ring (EVENT_IDX_UNKNOWN, garbage) says
 * "ring". `newIdx` equal to `oldIdx` moves nothing: false.
 */
export function needEvent(eventIdx: number, newIdx: number, oldIdx: number, entries: number): boolean {
  if (!(eventIdx >= 0 && eventIdx < entries)) return true;
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}

/** One queue pair's shadow doorbell and EventIdx entries (QueuePairOptions.shadow). */
export interface ShadowDoorbell {
  /** The Shadow Doorbell page (the host writes). */
  shadow: DataView;
  /** The EventIdx page (the controller writes). */
  eventIdx: DataView;
  /** Byte offsets of the queue's SQ tail and CQ head entries in both pages. */
  sqOffset: number;
  cqOffset: number;
  /** A full memory fence between the shadow store and the EventIdx load. */
  fence(): void;
}

/** Bytes of each of the two buffers: one memory page (CC.MPS = 4 KiB). */
export const DOORBELL_BUFFER_BYTES = 4096;

/**
 * The two pages of one controller, in DMA memory the caller allocated (page aligned, at least
 * DOORBELL_BUFFER_BYTES each), with the controller's doorbell stride (CAP.DSTRD, bytes).
 */
export class DoorbellBuffer {
  private readonly sv: DataView;
  private readonly ev: DataView;

  constructor(
    readonly shadowBytes: Uint8Array,
    readonly eventIdxBytes: Uint8Array,
    readonly stride: number,
    private readonly fence: () => void,
  ) {
    if (shadowBytes.byteLength < DOORBELL_BUFFER_BYTES || eventIdxBytes.byteLength < DOORBELL_BUFFER_BYTES) {
      throw new RangeError(`doorbell buffers must be ${DOORBELL_BUFFER_BYTES} bytes each`);
    }
    if (!Number.isInteger(stride) || stride < 4 || stride % 4 !== 0) throw new RangeError(`doorbell stride ${stride}`);
    this.sv = new DataView(shadowBytes.buffer, shadowBytes.byteOffset, DOORBELL_BUFFER_BYTES);
    this.ev = new DataView(eventIdxBytes.buffer, eventIdxBytes.byteOffset, DOORBELL_BUFFER_BYTES);
  }

  /** Whether queue `qid`'s two entries lie inside the page. */
  fits(qid: number): boolean {
    return Number.isInteger(qid) && qid >= 0 && (2 * qid + 1) * this.stride + 4 <= DOORBELL_BUFFER_BYTES;
  }

  /**
   * Every entry back to its start: shadow values 0, EventIdx entries EVENT_IDX_UNKNOWN. Only
   * while the controller does not use the buffers (before Doorbell Buffer Config, or disabled).
   */
  reset(): void {
    this.shadowBytes.fill(0, 0, DOORBELL_BUFFER_BYTES);
    for (let at = 0; at < DOORBELL_BUFFER_BYTES; at += 4) this.ev.setUint32(at, EVENT_IDX_UNKNOWN, true);
  }

  /** Queue `qid`'s entries back to their start (before the queue is created). RangeError if they do not fit. */
  resetQueue(qid: number): void {
    const q = this.forQueue(qid);
    for (const at of [q.sqOffset, q.cqOffset]) {
      this.sv.setUint32(at, 0, true);
      this.ev.setUint32(at, EVENT_IDX_UNKNOWN, true);
    }
  }

  /** Queue `qid`'s entries. RangeError if they do not fit in the page. */
  forQueue(qid: number): ShadowDoorbell {
    if (!this.fits(qid)) throw new RangeError(`queue ${qid}'s doorbell entries do not fit in one ${DOORBELL_BUFFER_BYTES}-byte page (stride ${this.stride})`);
    return { shadow: this.sv, eventIdx: this.ev, sqOffset: 2 * qid * this.stride, cqOffset: (2 * qid + 1) * this.stride, fence: this.fence };
  }
}
