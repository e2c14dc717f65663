/**
 * Several namespaces of one controller as several disks (issue 10): one NvmeDriver (one set of
 * I/O queue pairs) and one TagSet shared by the disks, each disk its own hardware queues,
 * memory table and geometry; and statuses without DNR retried within a budget. Against the fake
 * controller of test/helpers/fake-nvme.ts.
 */
import { HwQueue, type CompletionSink } from '../../block/hw-queue';
import { BlkStatus, ReqOp } from '../../block/operations';
import type { Request } from '../../block/request';
import { TagSet } from '../../block/tag-set';
import type { DiskConfig } from '../../config/disk-schema';
import { checkSharedController, NvmeSetupError } from '../../daemon/nvme-disk';
import type { NvmeController } from '../../drivers/nvme/controller';
import { MAX_RETRIES, NvmeDriver } from '../../drivers/nvme/driver';
import type { IdentifyNamespace } from '../../drivers/nvme/identify';
import type { NvmeNamespace } from '../../drivers/nvme/namespace';
import type { NativeGuestMemory } from '../../native';
import { dispatchSegments } from '../helpers/dispatch';
import { FakeController } from '../helpers/fake-nvme';

const memoryTable = (): NativeGuestMemory => ({ regionLayout: () => [{ size: 1 << 20, firstChunk: 0, hostPageOffset: 0 }] }) as unknown as NativeGuestMemory;
const NS512 = { nsze: 1 << 20, blockSize: 512, dlfeat: 1 } as IdentifyNamespace;
const NS4K = { nsze: 1 << 17, blockSize: 4096, dlfeat: 1 } as IdentifyNamespace;
const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

interface DiskUnderTest {
  ns: NvmeNamespace;
  hctx: HwQueue;
  ended: Array<[number, BlkStatus]>;
  guest: Buffer;
  memory: NativeGuestMemory;
  /** IOVA of its guest memory's first byte. */
  iova: number;
}

/** The drivers the tests opened: closed after each test (their poll loops stop). */
const opened: NvmeDriver[] = [];
afterEach(() => {
  for (const d of opened.splice(0)) d.close();
});

/** A driver over namespaces 1 (512-byte blocks) and 2 (4096-byte blocks), each served as a disk. */
async function setup(entries = 64, depth = 64): Promise<{ hw: FakeController; driver: NvmeDriver; a: DiskUnderTest; b: DiskUnderTest; tagSet: TagSet }> {
  const hw = new FakeController();
  const driver = await NvmeDriver.open({
    controller: hw as unknown as NvmeController,
    namespaces: [
      { nsid: 1, namespace: NS512 },
      { nsid: 2, namespace: NS4K },
    ],
    queues: 1,
    entries,
    poll: true,
    log: () => undefined,
  });
  opened.push(driver);
  const tagSet = new TagSet({ nrHwQueues: 1, queueDepth: depth });
  const disks = driver.namespaces.map((ns) => {
    const ended: Array<[number, BlkStatus]> = [];
    const sink: CompletionSink = { requestEnded: (rq) => ended.push([rq.tag, rq.status]), requestTimedOut: () => undefined };
    const hctx = new HwQueue(0, 64, tagSet.tagsOf(0));
    hctx.attach(ns, sink);
    const memory = memoryTable();
    ns.memoryMapped(memory);
    const iova = hw.maps.at(-1)![1];
    return { ns, hctx, ended, guest: Buffer.alloc(1 << 20), memory, iova };
  });
  return { hw, driver, a: disks[0]!, b: disks[1]!, tagSet };
}

/** Dispatches a request on a disk with segments [offset, length] of its guest memory. */
function submit(d: DiskUnderTest, tag: number, op: ReqOp, sector: number, segs: Array<[number, number]>, isLast = true): Request {
  return dispatchSegments(d.hctx, tag, op, sector, segs, d.guest, isLast);
}

describe('several namespaces of one controller, one set of queue pairs', () => {
  test('commands carry each disk\'s NSID, LBAs in its block size, PRPs into its own guest memory at its own IOVAs', async () => {
    const { hw, driver, a, b } = await setup();
    expect(driver.queues).toHaveLength(1); // one queue pair for both disks
    expect(a.iova).not.toBe(b.iova);
    expect(Math.abs(a.iova - b.iova)).toBeGreaterThanOrEqual(1 << 20); // regions apart, no overlap
    // The same tag on both disks: distinct requests.
    submit(a, 0, ReqOp.Write, 80, [[4096, 4096]]);
    submit(b, 0, ReqOp.Read, 80, [[8192, 8192]]);
    const cmds = hw.fetch();
    expect(cmds.map((c) => [c.opcode, c.nsid, c.cdw10, c.cdw12])).toEqual([
      [1, 1, 80, 7], // 8 x 512-byte blocks from LBA 80
      [2, 2, 10, 1], // 2 x 4096-byte blocks from LBA 10 (sector 80)
    ]);
    expect(cmds[0]!.prp1).toBe(a.iova + 4096);
    expect(cmds[1]).toMatchObject({ prp1: b.iova + 8192, prp2: b.iova + 12288 });
    // Completed in reverse order: each ends on its own disk, once.
    hw.complete(cmds[1]!.cid);
    await tick();
    expect(a.ended).toEqual([]);
    expect(b.ended).toEqual([[0, BlkStatus.Ok]]);
    hw.complete(cmds[0]!.cid);
    await tick();
    expect(a.ended).toEqual([[0, BlkStatus.Ok]]);
    expect(b.ended).toEqual([[0, BlkStatus.Ok]]);
    expect(driver.stats()[0]).toMatchObject({ requests: 2, commands: 2, inFlight: 0 });
  });

  test('one tag set: the disks\' requests together count against its depth', async () => {
    const { hw, a, b, tagSet } = await setup(64, 3);
    submit(a, 0, ReqOp.Read, 0, [[0, 512]]);
    submit(b, 5, ReqOp.Read, 0, [[0, 4096]]);
    submit(a, 1, ReqOp.Read, 8, [[512, 512]]);
    expect(tagSet.tagsOf(0).used).toBe(3);
    expect(tagSet.tagsOf(0).free).toBe(0);
    for (const c of hw.fetch()) hw.complete(c.cid);
    await tick();
    expect(tagSet.tagsOf(0).used).toBe(0);
  });

  test('a full queue pair: a disk\'s request waits behind the other disk\'s and goes on as command ids free up', async () => {
    const { hw, driver, a, b } = await setup(4); // 3 command ids for both disks
    submit(a, 0, ReqOp.Read, 0, [[0, 512]], false);
    submit(a, 1, ReqOp.Read, 1, [[512, 512]], true);
    submit(b, 0, ReqOp.Read, 0, [[0, 4096]], false);
    submit(b, 1, ReqOp.Read, 8, [[4096, 4096]], true);
    submit(a, 2, ReqOp.Read, 2, [[1024, 512]], true);
    let cmds = hw.fetch();
    expect(cmds.map((c) => [c.nsid, c.cdw10])).toEqual([[1, 0], [1, 1], [2, 0]]);
    hw.complete(cmds[2]!.cid);
    await tick();
    cmds = hw.fetch();
    expect(cmds.map((c) => [c.nsid, c.cdw10])).toEqual([[2, 1]]); // FIFO across disks: b's tag 1 first
    hw.complete(cmds[0]!.cid);
    await tick();
    expect(hw.fetch().map((c) => [c.nsid, c.cdw10])).toEqual([[1, 2]]);
    expect(driver.stats()[0]!.waits).toBe(2);
    expect(b.ended.map(([t]) => t).sort()).toEqual([0, 1]);
  });

  test('a table change of one disk unmaps only its regions; the other disk\'s request in flight completes', async () => {
    const { hw, a, b } = await setup();
    submit(b, 3, ReqOp.Write, 0, [[0, 4096]]);
    const [cmd] = hw.fetch();
    a.ns.memoryReleased(a.memory);
    expect(hw.maps.at(-1)).toEqual(['unmap', a.iova]);
    expect(hw.maps.filter(([k, v]) => k === 'unmap' && v === b.iova)).toEqual([]);
    submit(a, 0, ReqOp.Read, 0, [[0, 512]]); // no table: fails, nothing sent
    expect(a.ended).toEqual([[0, BlkStatus.IoErr]]);
    expect(hw.fetch()).toEqual([]);
    hw.complete(cmd!.cid);
    await tick();
    expect(b.ended).toEqual([[3, BlkStatus.Ok]]);
    // A new table for disk a: new IOVAs, apart from b's.
    a.ns.memoryMapped(memoryTable());
    const again = hw.maps.at(-1)![1];
    expect(again === b.iova).toBe(false);
  });

  test('a timeout on one disk aborts that disk\'s command (not the other\'s with the same tag); the reset resubmits both disks\' requests', async () => {
    const { hw, driver, a, b } = await setup();
    submit(a, 4, ReqOp.Read, 16, [[0, 512]], false);
    const rqB = submit(b, 4, ReqOp.Write, 16, [[0, 4096]], true);
    const old = hw.fetch();
    expect(b.ns.timeout(rqB)).toBe('reset');
    expect(hw.admin).toEqual([{ opcode: 0x08, cdw10: (1 | (old[1]!.cid << 16)) >>> 0 }]);
    await tick(); // "not aborted": reset
    await tick();
    expect(hw.resets).toBe(1);
    const again = hw.fetch();
    expect(again.map((c) => [c.opcode, c.nsid, c.cdw10])).toEqual([[2, 1, 16], [1, 2, 2]]);
    for (const c of old) hw.complete(c.cid); // from before the reset: dropped
    await tick();
    expect([a.ended, b.ended]).toEqual([[], []]);
    for (const c of again) hw.complete(c.cid);
    await tick();
    expect([a.ended, b.ended]).toEqual([[[4, BlkStatus.Ok]], [[4, BlkStatus.Ok]]]);
    expect(driver.stats()[0]).toMatchObject({ timeouts: 1, aborts: 1, resets: 1, retries: 2 });
  });

  test('Aborts in flight stay within the Abort Command Limit; the others wait a timeout more', async () => {
    const { hw, driver, a, b } = await setup();
    hw.abortDw0 = 0; // "aborted" (no reset), the commands themselves never complete here
    const rqA = submit(a, 1, ReqOp.Read, 0, [[0, 512]], false);
    const rqB = submit(b, 1, ReqOp.Read, 0, [[0, 4096]], true);
    hw.fetch();
    expect(a.ns.timeout(rqA)).toBe('reset');
    expect(b.ns.timeout(rqB)).toBe('reset'); // limit 1 (the fake's ACL): no second Abort yet
    expect(hw.admin).toHaveLength(1);
    await tick(); // the first Abort answered
    expect(b.ns.timeout(rqB)).toBe('reset');
    expect(hw.admin).toHaveLength(2);
    expect(driver.stats()[0]).toMatchObject({ aborts: 2, timeouts: 3, resets: 0 });
  });

  test('after a reset, the resubmitted requests\' timeouts start when the controller is back', async () => {
    const { hw, driver, a } = await setup();
    const rq = submit(a, 2, ReqOp.Read, 0, [[0, 512]]);
    hw.fetch();
    let armedAtRequeue = 0;
    const reset = hw.reset.bind(hw);
    hw.reset = async (whileDisabled: () => void): Promise<void> => {
      await reset(whileDisabled);
      armedAtRequeue = rq.startNs;
      await new Promise((r) => setTimeout(r, 20)); // bringing the controller back takes a while
    };
    await driver.resetController('test');
    expect(armedAtRequeue).toBeGreaterThan(0);
    expect(rq.startNs - armedAtRequeue).toBeGreaterThanOrEqual(15e6);
  });

  test('a controller that does not come back from a reset breaks every disk on it', async () => {
    const { hw, driver, a, b } = await setup();
    submit(a, 1, ReqOp.Read, 0, [[0, 512]]);
    submit(b, 2, ReqOp.Read, 0, [[0, 4096]]);
    expect(hw.fetch()).toHaveLength(2);
    hw.reset = async (whileDisabled: () => void): Promise<void> => {
      whileDisabled();
      throw new Error('CSTS.RDY did not become 1');
    };
    await driver.resetController('test');
    expect(driver.broken).toBe(true);
    expect([a.ended, b.ended]).toEqual([[[1, BlkStatus.IoErr]], [[2, BlkStatus.IoErr]]]);
    submit(a, 3, ReqOp.Read, 0, [[0, 512]]);
    submit(b, 3, ReqOp.Read, 0, [[0, 4096]]);
    expect(hw.fetch()).toEqual([]);
    expect([a.ended.at(-1), b.ended.at(-1)]).toEqual([[3, BlkStatus.IoErr], [3, BlkStatus.IoErr]]);
  });

  test('a namespace given twice is refused', async () => {
    const hw = new FakeController();
    await expect(NvmeDriver.open({ controller: hw as unknown as NvmeController, namespaces: [{ nsid: 1, namespace: NS512 }, { nsid: 1, namespace: NS512 }], queues: 1, entries: 8, poll: true, log: () => undefined })).rejects.toThrow(/namespace 1 given twice/);
  });

  test('disks sharing a controller must agree on what the controller holds, and name distinct namespaces', () => {
    const base = { name: 'a', pci: '0000:00:05.0', nsid: 1, num_queues: 2, hw_queue_depth: 64, nvme_poll: false } as DiskConfig;
    expect(() => checkSharedController([base, { ...base, name: 'b', nsid: 2 }])).not.toThrow();
    expect(() => checkSharedController([base, { ...base, name: 'b', nsid: 2, num_queues: 4 }])).toThrow(NvmeSetupError);
    expect(() => checkSharedController([base, { ...base, name: 'b', nsid: 2, num_queues: 4 }])).toThrow(/"a" and "b" are namespaces of controller 0000:00:05.0.*num_queues differ \(2, 4\)/);
    expect(() => checkSharedController([base, { ...base, name: 'b', nsid: 2, nvme_poll: true }])).toThrow(/nvme_poll differ/);
    expect(() => checkSharedController([base, { ...base, name: 'b' }])).toThrow(/disk "b": namespace 1 of 0000:00:05.0 is served by another disk already/);
  });
});

describe('statuses without DNR are retried within a budget', () => {
  const ABORT_REQUESTED = 0x07; // SCT 0, SC 07h: Command Abort Requested (no DNR)
  const INVALID_FIELD_DNR = 0x4002; // SCT 0, SC 02h with DNR

  test('an aborted command: its request starts over and ends once, OK', async () => {
    const { hw, driver, a } = await setup();
    submit(a, 6, ReqOp.Write, 24, [[0, 1024]]);
    const [first] = hw.fetch();
    hw.complete(first!.cid, ABORT_REQUESTED);
    await tick();
    expect(a.ended).toEqual([]);
    const [again] = hw.fetch();
    expect(again).toMatchObject({ opcode: 1, nsid: 1, cdw10: 24, cdw12: 1, prp1: first!.prp1 });
    expect(again!.cid).not.toBe(first!.cid);
    hw.complete(again!.cid);
    await tick();
    expect(a.ended).toEqual([[6, BlkStatus.Ok]]);
    expect(driver.stats()[0]).toMatchObject({ errors: 1, retries: 1, commands: 2 });
  });

  test('DNR: IOERR to the guest at once, nothing resubmitted', async () => {
    const { hw, driver, a } = await setup();
    submit(a, 2, ReqOp.Read, 0, [[0, 512]]);
    hw.complete(hw.fetch()[0]!.cid, INVALID_FIELD_DNR);
    await tick();
    expect(hw.fetch()).toEqual([]);
    expect(a.ended).toEqual([[2, BlkStatus.IoErr]]);
    expect(driver.stats()[0]).toMatchObject({ errors: 1, retries: 0, commands: 1 });
  });

  test(`a status that keeps coming back: ${MAX_RETRIES} retries, then IOERR`, async () => {
    const { hw, driver, b } = await setup();
    submit(b, 1, ReqOp.Read, 0, [[0, 4096]]);
    for (let i = 0; i <= MAX_RETRIES; i++) {
      const cmds = hw.fetch();
      expect(cmds).toHaveLength(1);
      hw.complete(cmds[0]!.cid, 0x82); // Namespace Not Ready, no DNR
      await tick();
    }
    expect(hw.fetch()).toEqual([]);
    expect(b.ended).toEqual([[1, BlkStatus.IoErr]]);
    expect(driver.stats()[0]).toMatchObject({ errors: MAX_RETRIES + 1, retries: MAX_RETRIES, commands: MAX_RETRIES + 1 });
  });

  test('a split request with one command to retry starts over after its other command is done, and ends once', async () => {
    const { hw, a } = await setup();
    submit(a, 0, ReqOp.Write, 0, [[0, 1024], [4096 + 512, 1024]]); // unaligned inner segment: 2 commands
    const [c1, c2] = hw.fetch();
    hw.complete(c1!.cid, ABORT_REQUESTED);
    await tick();
    expect(hw.fetch()).toEqual([]); // waits for the second command
    hw.complete(c2!.cid);
    await tick();
    const again = hw.fetch();
    expect(again.map((c) => [c.cdw10, c.cdw12])).toEqual([[0, 1], [2, 1]]);
    for (const c of again) hw.complete(c.cid);
    await tick();
    expect(a.ended).toEqual([[0, BlkStatus.Ok]]);
  });
});
