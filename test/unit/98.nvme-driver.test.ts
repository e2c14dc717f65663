/**
 * NvmeDriver (drivers/nvme/driver.ts) against a fake controller whose queues live in memory:
 * guest memory mapped for DMA once per table, PRPs into it, one SQ doorbell per batch, split
 * commands ending their request once, requests waiting for command ids when the queue pair is
 * full, IOERR for chains PRPs cannot describe, discard/write zeroes/flush commands, and late
 * completions after a timeout dropped.
 */
import { HwQueue, type CompletionSink } from '../../block/hw-queue';
import { BlkStatus, ReqOp } from '../../block/operations';
import type { Request } from '../../block/request';
import { CQE_SIZE, SQE_SIZE } from '../../drivers/nvme/command';
import type { NvmeController } from '../../drivers/nvme/controller';
import { NvmeDriver } from '../../drivers/nvme/driver';
import type { IdentifyNamespace } from '../../drivers/nvme/identify';
import { IovaAllocator } from '../../drivers/nvme/iova';
import { QueuePair } from '../../drivers/nvme/queue';
import type { NativeGuestMemory } from '../../native';

interface Sqe {
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
class FakeController {
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
    alloc: (size: number) => ({ iova: this.iova.alloc(size), size, bytes: new Uint8Array(size), id: 1 }),
  };
  status(): { allOnes: boolean; fatal: boolean } {
    return { allOnes: false, fatal: false };
  }
  async createIoQueuePair<T>(qid: number, entries: number): Promise<{ qp: QueuePair<T>; eventfd: undefined; ring: unknown }> {
    this.q = { entries, sq: new Uint8Array(entries * SQE_SIZE), cq: new Uint8Array(entries * CQE_SIZE), sqHead: 0, cqTail: 0, phase: 1 };
    const qp = new QueuePair<T>({ qid, entries, sq: this.q.sq, cq: this.q.cq, doorbells: { sqTail: (v) => this.sqTails.push(v), cqHead: (v) => this.cqHeads.push(v) } });
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
    const q = this.q;
    const v = new DataView(q.cq.buffer);
    const at = q.cqTail * CQE_SIZE;
    v.setUint32(at + 8, q.sqHead, true);
    v.setUint32(at + 12, (cid | (q.phase << 16) | (status << 17)) >>> 0, true);
    q.cqTail++;
    if (q.cqTail === q.entries) {
      q.cqTail = 0;
      q.phase ^= 1;
    }
  }
}

const MEMORY = { regionLayout: () => [{ size: 1 << 20, firstChunk: 0, hostPageOffset: 0 }] } as unknown as NativeGuestMemory;
const NS = { nsze: 1 << 20, blockSize: 512, dlfeat: 1 } as IdentifyNamespace;
const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

async function setup(entries = 64): Promise<{ hw: FakeController; driver: NvmeDriver; hctx: HwQueue; ended: Array<[number, BlkStatus]>; chunk0: number }> {
  const hw = new FakeController();
  const driver = await NvmeDriver.open({ controller: hw as unknown as NvmeController, nsid: 3, namespace: NS, queues: 1, entries, poll: true, log: () => undefined });
  const ended: Array<[number, BlkStatus]> = [];
  const sink: CompletionSink = { requestEnded: (rq) => ended.push([rq.tag, rq.status]), requestTimedOut: () => undefined };
  const hctx = new HwQueue(0, 64);
  hctx.attach(driver, sink);
  driver.memoryMapped(MEMORY);
  const chunk0 = hw.maps[0]![1];
  return { hw, driver, hctx, ended, chunk0 };
}

/** Dispatches a request with segments [offset, length] in chunk 0. */
function submit(hctx: HwQueue, tag: number, op: ReqOp, sector: number, segs: Array<[number, number]>, isLast = true, bytes?: number): Request {
  const rq = hctx.requests[tag]!;
  rq.op = op;
  rq.sector = sector;
  rq.bytes = bytes ?? segs.reduce((n, [, l]) => n + l, 0);
  rq.segments = new Uint32Array(segs.flatMap(([o, l]) => [0, o, l, 0]));
  rq.segBase = 0;
  rq.segCount = segs.length;
  hctx.dispatch(rq, isLast, 0);
  return rq;
}

test('guest memory is mapped once per table at an allocator IOVA, and unmapped', async () => {
  const { hw, driver, chunk0 } = await setup();
  expect(hw.maps).toEqual([['map0', chunk0]]);
  driver.memoryReleased(MEMORY);
  expect(hw.maps).toEqual([['map0', chunk0], ['unmap', chunk0]]);
});

test('a batch: PRPs into guest memory, one SQ doorbell, one CQ doorbell, each request ends once', async () => {
  const { hw, hctx, ended, chunk0 } = await setup();
  submit(hctx, 0, ReqOp.Read, 8, [[4096, 4096]], false);
  submit(hctx, 1, ReqOp.Write, 100, [[8192 + 512, 1024]], false);
  submit(hctx, 2, ReqOp.Read, 200, [[16384, 12288]], true);
  expect(hw.sqTails).toEqual([3]);
  const cmds = hw.fetch();
  expect(cmds.map((c) => [c.opcode, c.nsid, c.cdw10, c.cdw12])).toEqual([[2, 3, 8, 7], [1, 3, 100, 1], [2, 3, 200, 23]]);
  expect(cmds[0]).toMatchObject({ prp1: chunk0 + 4096, prp2: 0 });
  expect(cmds[1]).toMatchObject({ prp1: chunk0 + 8192 + 512, prp2: 0 });
  expect(cmds[2]!.prp1).toBe(chunk0 + 16384);
  expect(cmds[2]!.prp2).not.toBe(chunk0 + 20480); // three pages: PRP2 is the list page
  for (const c of cmds) hw.complete(c.cid);
  await tick();
  expect(ended).toEqual([[0, 0], [1, 0], [2, 0]]);
  expect(hw.cqHeads).toEqual([3]);
});

test('an unaligned inner segment splits the request; it ends once, after both commands, with the worst status', async () => {
  const { hw, driver, hctx, ended, chunk0 } = await setup();
  submit(hctx, 5, ReqOp.Write, 0, [[0, 1024], [4096 + 512, 1024]]);
  const cmds = hw.fetch();
  expect(cmds.map((c) => [c.cdw10, c.cdw12, c.prp1 - chunk0])).toEqual([[0, 1, 0], [2, 1, 4096 + 512]]);
  hw.complete(cmds[0]!.cid, 0x281); // an error status on the first
  await tick();
  expect(ended).toEqual([]);
  hw.complete(cmds[1]!.cid);
  await tick();
  expect(ended).toEqual([[5, BlkStatus.IoErr]]);
  expect(driver.stats()[0]).toMatchObject({ splits: 1, commands: 2, errors: 1 });
});

test('a full queue pair: requests wait for command ids and go on as commands complete', async () => {
  const { hw, driver, hctx, ended } = await setup(4); // 3 command ids
  for (let t = 0; t < 5; t++) submit(hctx, t, ReqOp.Read, t * 8, [[t * 4096, 4096]], t === 4);
  let cmds = hw.fetch();
  expect(cmds.map((c) => c.cdw10)).toEqual([0, 8, 16]);
  for (const c of cmds) hw.complete(c.cid);
  await tick();
  cmds = hw.fetch();
  expect(cmds.map((c) => c.cdw10)).toEqual([24, 32]);
  for (const c of cmds) hw.complete(c.cid);
  await tick();
  expect(ended.map(([t]) => t).sort()).toEqual([0, 1, 2, 3, 4]);
  expect(ended.every(([, s]) => s === BlkStatus.Ok)).toBe(true);
  expect(driver.stats()[0]!.waits).toBe(2);
});

test('a block across an unaligned junction fails with IOERR and sends nothing', async () => {
  const { hw, driver, hctx, ended } = await setup();
  submit(hctx, 0, ReqOp.Write, 0, [[0, 256], [4096 + 64, 256]]);
  expect(hw.fetch()).toEqual([]);
  expect(ended).toEqual([[0, BlkStatus.IoErr]]);
  expect(driver.stats()[0]!.unaligned).toBe(1);
});

test('flush, discard (range in the list page) and write zeroes with deallocate', async () => {
  const { hw, hctx, ended } = await setup();
  submit(hctx, 0, ReqOp.Flush, 0, [], false, 0);
  submit(hctx, 1, ReqOp.Discard, 64, [], false, 8192);
  const wz = hctx.requests[2]!;
  wz.unmap = true;
  submit(hctx, 2, ReqOp.WriteZeroes, 128, [], true, 4096);
  const cmds = hw.fetch();
  expect(cmds.map((c) => c.opcode)).toEqual([0x00, 0x09, 0x08]);
  expect(cmds[1]).toMatchObject({ cdw10: 0, cdw11: 4 }); // one range, deallocate
  expect(cmds[2]).toMatchObject({ cdw10: 128, cdw12: (7 | (1 << 25)) >>> 0 });
  for (const c of cmds) hw.complete(c.cid);
  await tick();
  expect(ended).toEqual([[0, 0], [1, 0], [2, 0]]);
});

test('a timed-out request fails; its late completion is dropped and cannot end the next request on the tag', async () => {
  const { hw, driver, hctx, ended } = await setup();
  const rq = submit(hctx, 7, ReqOp.Read, 0, [[0, 4096]]);
  const [old] = hw.fetch();
  expect(driver.timeout(rq)).toBe('done');
  expect(ended).toEqual([[7, BlkStatus.IoErr]]);
  submit(hctx, 7, ReqOp.Read, 8, [[0, 4096]]);
  const [fresh] = hw.fetch();
  hw.complete(old!.cid);
  await tick();
  expect(ended).toHaveLength(1);
  expect(driver.stats()[0]!.late).toBe(1);
  hw.complete(fresh!.cid);
  await tick();
  expect(ended).toEqual([[7, BlkStatus.IoErr], [7, BlkStatus.Ok]]);
});

test('without a memory table, a read fails with IOERR', async () => {
  const { hw, driver, hctx, ended } = await setup();
  driver.memoryReleased(MEMORY);
  submit(hctx, 0, ReqOp.Read, 0, [[0, 4096]]);
  expect(hw.fetch()).toEqual([]);
  expect(ended).toEqual([[0, BlkStatus.IoErr]]);
});
