/**
 * NvmeDriver (drivers/nvme/driver.ts) against a fake controller whose queues live in memory:
 * guest memory mapped for DMA once per table, PRPs into it, one SQ doorbell per batch, split
 * commands ending their request once, requests waiting for command ids when the queue pair is
 * full, bounce buffers for chains PRPs cannot describe, discard/write zeroes/flush commands, and late
 * completions after a timeout dropped, the timeout ladder (Abort, then controller reset with
 * the outstanding requests resubmitted).
 */
import { HwQueue, type CompletionSink } from '../../block/hw-queue';
import { BlkStatus, ReqOp } from '../../block/operations';
import type { Request } from '../../block/request';
import type { NvmeController } from '../../drivers/nvme/controller';
import { MAX_RETRIES, NvmeDriver } from '../../drivers/nvme/driver';
import type { IdentifyNamespace } from '../../drivers/nvme/identify';
import type { NativeGuestMemory } from '../../native';
import { dispatchSegments } from '../helpers/dispatch';
import { FakeController } from '../helpers/fake-nvme';

const MEMORY = { regionLayout: () => [{ size: 1 << 20, firstChunk: 0, hostPageOffset: 0 }] } as unknown as NativeGuestMemory;
const NS = { nsze: 1 << 20, blockSize: 512, dlfeat: 1 } as IdentifyNamespace;
const GUEST = Buffer.alloc(1 << 20);
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
  return dispatchSegments(hctx, tag, op, sector, segs, GUEST, isLast, bytes);
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
  hw.complete(cmds[0]!.cid, 0x4281); // an error status with DNR on the first
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

test('a block across an unaligned junction goes through a bounce buffer: copied in for a write, out after a read', async () => {
  const { hw, driver, hctx, ended, chunk0 } = await setup();
  for (let i = 0; i < 8192; i++) GUEST[i] = (i * 13 + 5) & 0xff;
  submit(hctx, 0, ReqOp.Write, 0, [[0, 256], [4096 + 64, 256]]);
  const [w] = hw.fetch();
  expect(w!.prp1 - chunk0 >= 0 && w!.prp1 - chunk0 < 1 << 20).toBe(false); // not guest memory
  expect(w).toMatchObject({ opcode: 1, cdw12: 0, prp2: 0 });
  expect(Buffer.from(hw.at(w!.prp1, 512)).equals(Buffer.concat([GUEST.subarray(0, 256), GUEST.subarray(4096 + 64, 4096 + 320)]))).toBe(true);
  hw.complete(w!.cid);
  await tick();
  expect(ended).toEqual([[0, 0]]);

  submit(hctx, 1, ReqOp.Read, 0, [[20000, 100], [24576 + 4, 412]]);
  const [r] = hw.fetch();
  const data = Buffer.from(Array.from({ length: 512 }, (_, i) => (i * 3 + 1) & 0xff));
  hw.at(r!.prp1, 512).set(data);
  expect(GUEST.subarray(20000, 20100).equals(data.subarray(0, 100))).toBe(false);
  hw.complete(r!.cid);
  await tick();
  expect(ended).toEqual([[0, 0], [1, 0]]);
  expect(GUEST.subarray(20000, 20100).equals(data.subarray(0, 100))).toBe(true);
  expect(GUEST.subarray(24576 + 4, 24576 + 416).equals(data.subarray(100))).toBe(true);
  expect(driver.stats()[0]!.bounces).toBe(2);
});

test('a request finding every bounce slot busy waits, then goes on', async () => {
  const { hw, hctx, ended } = await setup();
  for (let t = 0; t < 6; t++) submit(hctx, t, ReqOp.Write, t * 8, [[t * 8192, 256], [t * 8192 + 4096 + 64, 256]], t === 5);
  let cmds = hw.fetch();
  expect(cmds).toHaveLength(4); // BOUNCE_SLOTS
  for (const c of cmds) hw.complete(c.cid);
  await tick();
  cmds = hw.fetch();
  expect(cmds.map((c) => c.cdw10)).toEqual([32, 40]);
  for (const c of cmds) hw.complete(c.cid);
  await tick();
  expect(ended.map(([t]) => t).sort()).toEqual([0, 1, 2, 3, 4, 5]);
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
  expect(ended).toEqual([]); // nothing ends before its command completes
  expect(cmds[1]).toMatchObject({ cdw10: 0, cdw11: 4 }); // one range, deallocate
  expect(cmds[2]).toMatchObject({ cdw10: 128, cdw12: (7 | (1 << 25)) >>> 0 });
  for (const c of cmds) hw.complete(c.cid);
  await tick();
  expect(ended).toEqual([[0, 0], [1, 0], [2, 0]]);
});

test('timeout ladder: Abort first; "not aborted" resets the controller; the request is resubmitted and ends once', async () => {
  const { hw, driver, hctx, ended } = await setup();
  const rq = submit(hctx, 7, ReqOp.Read, 40, [[0, 4096]]);
  const [old] = hw.fetch();
  expect(driver.timeout(rq)).toBe('reset'); // another full timeout, after the Abort
  expect(hw.admin).toEqual([{ opcode: 0x08, cdw10: (1 | (old!.cid << 16)) >>> 0 }]);
  await tick(); // the Abort answered "not aborted": reset
  await tick();
  expect(hw.resets).toBe(1);
  expect(ended).toEqual([]);
  const [again] = hw.fetch();
  expect(again).toMatchObject({ opcode: 2, cdw10: 40 });
  expect(rq.startNs).toBeGreaterThan(0); // re-armed at the reset (dispatched at 0 here)
  hw.complete(again!.cid);
  await tick();
  expect(ended).toEqual([[7, BlkStatus.Ok]]);
  expect(driver.stats()[0]).toMatchObject({ timeouts: 1, aborts: 1, resets: 1, retries: 1 });
});

test('a second expiry after an Abort resets; a completion from before the reset is dropped', async () => {
  const { hw, driver, hctx, ended } = await setup();
  hw.abortDw0 = 0; // "aborted"... but no completion comes
  const rq = submit(hctx, 3, ReqOp.Write, 0, [[0, 512]]);
  const [old] = hw.fetch();
  expect(driver.timeout(rq)).toBe('reset');
  await tick();
  expect(hw.resets).toBe(0);
  expect(driver.timeout(rq)).toBe('reset');
  await tick();
  expect(hw.resets).toBe(1);
  const [again] = hw.fetch();
  hw.complete(old!.cid); // from before the reset: its generation no longer matches
  await tick();
  expect(ended).toEqual([]);
  hw.complete(again!.cid);
  await tick();
  expect(ended).toEqual([[3, BlkStatus.Ok]]);
});

test('a request reset more than MAX_RETRIES times fails with IOERR', async () => {
  const { hw, driver, hctx, ended } = await setup();
  submit(hctx, 2, ReqOp.Read, 0, [[0, 512]]);
  for (let i = 0; i <= MAX_RETRIES; i++) await driver.resetController('test');
  expect(hw.resets).toBe(MAX_RETRIES + 1);
  expect(ended).toEqual([[2, BlkStatus.IoErr]]);
});

test('without a memory table, a read fails with IOERR', async () => {
  const { hw, driver, hctx, ended } = await setup();
  driver.memoryReleased(MEMORY);
  submit(hctx, 0, ReqOp.Read, 0, [[0, 4096]]);
  expect(hw.fetch()).toEqual([]);
  expect(ended).toEqual([[0, BlkStatus.IoErr]]);
});
