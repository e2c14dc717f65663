/**
 * A fake NVMe controller for driver unit tests (test/unit/98, 99): one I/O queue pair whose
 * rings live in memory; the test fetches what the driver made visible (up to its last SQ
 * doorbell) and decides when and how each command completes. Admin commands are recorded
 * (Abort answers `abortDw0`); reset() empties the ring as a controller reset does.
 *
 * Shadow doorbells (offerShadow, or enableShadow): modelled on QEMU 7.2's emulated controller,
 * the fake then processes its SQ only after an MMIO SQ doorbell write (a write the driver left
 * out wrongly leaves the commands unseen: the hang), reads the tail from the shadow entry, and
 * after each command writes the EventIdx entry (the tail it knows) and reads the shadow tail
 * again; posting a completion it writes the CQ EventIdx (the head it knows) and reads the shadow
 * head. With `updatesEventIdx` false it writes no EventIdx entry at all.
 */
import { CQE_SIZE, SQE_SIZE } from '../../drivers/nvme/command';
import { IovaAllocator } from '../../drivers/nvme/iova';
import { QueuePair } from '../../drivers/nvme/queue';
import { DoorbellBuffer } from '../../drivers/nvme/shadow-doorbell';
import type { NativeGuestMemory } from '../../native';

export interface Sqe {
  opcode: number;
  cid: number;
  nsid: number;
  prp1: number;
  prp2: number;
  cdw10: number;
  cdw11: number;
  cdw12: number;
}

/** A fake controller: in-memory queues; the test decides when commands complete. */
export class FakeController {
  readonly sqTails: number[] = [];
  readonly cqHeads: number[] = [];
  readonly maps: Array<[string, number]> = [];
  readonly iova = new IovaAllocator([{ start: 0x1000, end: 0xfffffffff }]);
  private q!: { entries: number; sq: Uint8Array; cq: Uint8Array; sqHead: number; cqTail: number; phase: number };
  readonly identity = { volatileWriteCache: true, oncs: 0x0c, serial: 'FAKE' };
  readonly maxTransferBytes = 16384;
  readonly bdf = 'fake';
  readonly dev = {
    dmaMapGuest: (_m: NativeGuestMemory, region: number, iova: number): number => {
      this.maps.push([`map${region}`, iova]);
      return 1 << 20;
    },
    dmaUnmapGuest: (iova: number): void => {
      this.maps.push(['unmap', iova]);
    },
  };
  readonly dma = {
    iova: this.iova,
    alloc: (size: number) => {
      const r = { iova: this.iova.alloc(size), size, bytes: new Uint8Array(size), id: 1 };
      this.allocs.push(r);
      return r;
    },
  };
  readonly allocs: Array<{ iova: number; size: number; bytes: Uint8Array }> = [];
  /** DMA memory (queues, lists, bounce buffers) at an IOVA, as the device sees it. */
  at(iova: number, len: number): Uint8Array {
    const r = this.allocs.find((a) => iova >= a.iova && iova + len <= a.iova + a.size)!;
    return r.bytes.subarray(iova - r.iova, iova - r.iova + len);
  }
  status(): { allOnes: boolean; fatal: boolean } {
    return { allOnes: false, fatal: false };
  }
  readonly admin: Array<{ opcode: number; cdw10?: number }> = [];
  /** What Abort answers in CDW0 (QEMU 7.2: 1, "not aborted"). */
  abortDw0 = 1;
  async adminCommand(f: { opcode: number; cdw10?: number }): Promise<{ dw0: number }> {
    this.admin.push(f);
    return { dw0: this.abortDw0 };
  }
  resets = 0;
  private qp!: QueuePair<unknown>;
  /** NvmeDriver.open turns shadow doorbells on when this says the controller offers them. */
  offerShadow: { updatesEventIdx: boolean } | null = null;
  /** Shadow doorbells on: the pages, whether the fake writes EventIdx entries, and whether an MMIO SQ write came since it last ran. */
  shadow: { buffer: DoorbellBuffer; updatesEventIdx: boolean; kicked: boolean } | null = null;
  /** Fences the queue pair asked for (shadow doorbells). */
  fences = 0;
  /** The CQ head the fake knows (shadow doorbells: read from the shadow entry when posting). */
  cqHeadSeen = 0;
  async enableShadowDoorbells(): Promise<boolean> {
    if (this.offerShadow === null) return false;
    this.enableShadow(this.offerShadow.updatesEventIdx);
    return true;
  }
  /** Shadow doorbells on for the queue pair (after createIoQueuePair), as Doorbell Buffer Config would. */
  enableShadow(updatesEventIdx: boolean): DoorbellBuffer {
    const pages = this.dma.alloc(8192);
    const buffer = new DoorbellBuffer(pages.bytes.subarray(0, 4096), pages.bytes.subarray(4096), 4, () => void this.fences++);
    buffer.reset();
    this.shadow = { buffer, updatesEventIdx, kicked: false };
    this.qp.setShadow(buffer.forQueue(this.qp.qid));
    return buffer;
  }
  async reset(whileDisabled: () => void): Promise<void> {
    this.resets++;
    // As NvmeController.reset: the disabled controller forgets the buffers; they start over.
    if (this.shadow !== null) {
      this.shadow.buffer.reset();
      this.shadow.kicked = false;
      this.cqHeadSeen = 0;
    }
    this.qp.resetRing(this.q.cq);
    this.q.sqHead = 0;
    this.q.cqTail = 0;
    this.q.phase = 1;
    this.sqTails.length = 0;
    whileDisabled();
  }
  async createIoQueuePair<T>(qid: number, entries: number): Promise<{ qp: QueuePair<T>; eventfd: undefined; ring: unknown }> {
    this.q = { entries, sq: new Uint8Array(entries * SQE_SIZE), cq: new Uint8Array(entries * CQE_SIZE), sqHead: 0, cqTail: 0, phase: 1 };
    const doorbells = {
      sqTail: (v: number): void => {
        this.sqTails.push(v);
        this.kick();
      },
      cqHead: (v: number): void => void this.cqHeads.push(v),
    };
    const qp = new QueuePair<T>({ qid, entries, sq: this.q.sq, cq: this.q.cq, doorbells });
    this.qp = qp as QueuePair<unknown>;
    return { qp, eventfd: undefined, ring: {} };
  }
  async deleteIoQueue(): Promise<void> {}
  private kick(): void {
    if (this.shadow !== null) this.shadow.kicked = true;
  }
  /** The commands the driver made visible (up to the last SQ doorbell; with shadow doorbells see the file comment). */
  fetch(): Sqe[] {
    const q = this.q;
    const s = this.shadow;
    const e = s?.buffer.forQueue(this.qp.qid);
    if (s !== null && !s.kicked) return []; // no MMIO write since it last ran: it does not run
    if (s !== null) s.kicked = false;
    let tail = e !== undefined ? e.shadow.getUint32(e.sqOffset, true) : (this.sqTails.at(-1) ?? 0);
    const v = new DataView(q.sq.buffer);
    const out: Sqe[] = [];
    const u64 = (at: number): number => v.getUint32(at, true) + v.getUint32(at + 4, true) * 2 ** 32;
    while (q.sqHead !== tail) {
      const at = q.sqHead * SQE_SIZE;
      out.push({ opcode: v.getUint8(at), cid: v.getUint16(at + 2, true), nsid: v.getUint32(at + 4, true), prp1: u64(at + 24), prp2: u64(at + 32), cdw10: v.getUint32(at + 40, true), cdw11: v.getUint32(at + 44, true), cdw12: v.getUint32(at + 48, true) });
      q.sqHead = (q.sqHead + 1) % q.entries;
      if (s !== null && e !== undefined) {
        if (s.updatesEventIdx) e.eventIdx.setUint32(e.sqOffset, tail, true);
        tail = e.shadow.getUint32(e.sqOffset, true);
      }
    }
    return out;
  }
  complete(cid: number, status = 0): void {
    const s = this.shadow;
    if (s !== null) {
      const e = s.buffer.forQueue(this.qp.qid);
      if (s.updatesEventIdx) e.eventIdx.setUint32(e.cqOffset, this.cqHeadSeen, true);
      this.cqHeadSeen = e.shadow.getUint32(e.cqOffset, true);
    }
    postCqe(this.q, cid, status);
  }
}

/** The device's side of an in-memory completion queue: what posting a completion needs and moves. */
export interface FakeCq {
  cq: Uint8Array;
  entries: number;
  cqTail: number;
  phase: number;
  /** The SQ head the completion reports. */
  sqHead: number;
}

/**
 * Posts one completion queue entry at `q.cqTail` (NVMe base spec 2.0, 4.2.1 "Completion Queue
 * Entry"): DW0 `dw0`, the SQ head, the command id, the phase tag and `status` (the status field
 * without the phase bit); advances the tail and flips the phase at the wrap.
 */
export function postCqe(q: FakeCq, cid: number, status = 0, dw0 = 0): void {
  const v = new DataView(q.cq.buffer, q.cq.byteOffset, q.cq.byteLength);
  const at = q.cqTail * CQE_SIZE;
  v.setUint32(at, dw0, true);
  v.setUint32(at + 8, q.sqHead, true);
  v.setUint32(at + 12, (cid | (q.phase << 16) | (status << 17)) >>> 0, true);
  q.cqTail++;
  if (q.cqTail === q.entries) {
    q.cqTail = 0;
    q.phase ^= 1;
  }
}

