/**
 * A fake NVMe controller for driver unit tests (test/unit/98, 99): one I/O queue pair whose
 * rings live in memory; the test fetches what the driver made visible (up to its last SQ
 * doorbell) and decides when and how each command completes. Admin commands are recorded
 * (Abort answers `abortDw0`); reset() empties the ring as a controller reset does.
 */
import { CQE_SIZE, SQE_SIZE } from '../../drivers/nvme/command';
import { IovaAllocator } from '../../drivers/nvme/iova';
import { QueuePair } from '../../drivers/nvme/queue';
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
  async reset(whileDisabled: () => void): Promise<void> {
    this.resets++;
    this.qp.resetRing(this.q.cq);
    this.q.sqHead = 0;
    this.q.cqTail = 0;
    this.q.phase = 1;
    this.sqTails.length = 0;
    whileDisabled();
  }
  async createIoQueuePair<T>(qid: number, entries: number): Promise<{ qp: QueuePair<T>; eventfd: undefined; ring: unknown }> {
    this.q = { entries, sq: new Uint8Array(entries * SQE_SIZE), cq: new Uint8Array(entries * CQE_SIZE), sqHead: 0, cqTail: 0, phase: 1 };
    const qp = new QueuePair<T>({ qid, entries, sq: this.q.sq, cq: this.q.cq, doorbells: { sqTail: (v) => this.sqTails.push(v), cqHead: (v) => this.cqHeads.push(v) } });
    this.qp = qp as QueuePair<unknown>;
    return { qp, eventfd: undefined, ring: {} };
  }
  async deleteIoQueue(): Promise<void> {}
  /** The commands the driver made visible (up to the last SQ doorbell). */
  fetch(): Sqe[] {
    const q = this.q;
    const tail = this.sqTails.at(-1) ?? 0;
    const v = new DataView(q.sq.buffer);
    const out: Sqe[] = [];
    const u64 = (at: number): number => v.getUint32(at, true) + v.getUint32(at + 4, true) * 2 ** 32;
    while (q.sqHead !== tail) {
      const at = q.sqHead * SQE_SIZE;
      out.push({ opcode: v.getUint8(at), cid: v.getUint16(at + 2, true), nsid: v.getUint32(at + 4, true), prp1: u64(at + 24), prp2: u64(at + 32), cdw10: v.getUint32(at + 40, true), cdw11: v.getUint32(at + 44, true), cdw12: v.getUint32(at + 48, true) });
      q.sqHead = (q.sqHead + 1) % q.entries;
    }
    return out;
  }
  complete(cid: number, status = 0): void {
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

