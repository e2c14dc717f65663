/**
 * NVMe disks with threads > 1 (daemon/nvme-thread.ts, NvmeDriver served/attach/peers): two
 * drivers over the same queue pairs of a fake two-queue controller, the main thread's one
 * serving hardware queue 0 and owning the controller, a "worker" one attached to the same ring
 * memory serving hardware queue 1, joined as the worker threads' messages join them (each call
 * crossing an event-loop turn). What is checked: each queue pair is driven only by the thread
 * serving it (its own doorbells, PRPs into the IOVAs the main thread mapped), the worker's
 * Abort and reset requests are carried out by the main thread, a controller reset stops the
 * worker before the controller is disabled and resubmits its requests after, nothing ends
 * twice, a late completion is dropped, a controller that does not come back fails the worker's
 * requests with IOERR, and the config rules for threads with driver nvme.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { HwQueue, type CompletionSink } from '../../block/hw-queue';
import { BlkStatus, ReqOp } from '../../block/operations';
import type { Request } from '../../block/request';
import { loadConfig, ConfigError } from '../../config/load';
import { CQE_SIZE, SQE_SIZE } from '../../drivers/nvme/command';
import type { NvmeController } from '../../drivers/nvme/controller';
import { NvmeDriver, type AttachedQueue } from '../../drivers/nvme/driver';
import type { IdentifyNamespace } from '../../drivers/nvme/identify';
import { IovaAllocator } from '../../drivers/nvme/iova';
import { QueuePair } from '../../drivers/nvme/queue';
import { checkSharedController } from '../../daemon/nvme-disk';
import { connectNvmeWorkers, type NvmeMainMessage, type NvmeWorkerMessage } from '../../daemon/nvme-thread';
import type { NativeGuestMemory } from '../../native';
import { vfioShareRead32, vfioShareView, vfioShareWrite32 } from '../../native/vfio';
import type { Logger } from 'pino';
import { dispatchSegments } from '../helpers/dispatch';

const MEMORY = { regionLayout: () => [{ size: 1 << 20, firstChunk: 0, hostPageOffset: 0 }] } as unknown as NativeGuestMemory;
const NS = { nsze: 1 << 20, blockSize: 512, dlfeat: 1 } as IdentifyNamespace;
const GUEST = Buffer.alloc(1 << 20);
const turn = (): Promise<void> => new Promise((r) => setImmediate(r));
const settle = async (n = 8): Promise<void> => {
  for (let i = 0; i < n; i++) await turn();
};

interface Sqe {
  opcode: number;
  cid: number;
  prp1: number;
  cdw10: number;
}

interface FakeQueue {
  entries: number;
  sq: Uint8Array;
  cq: Uint8Array;
  sqHead: number;
  cqTail: number;
  phase: number;
  qp: QueuePair<unknown>;
}

/** A fake controller with several I/O queue pairs in memory; the test completes commands. */
class TwoQueueFake {
  readonly bdf = 'fake';
  readonly iova = new IovaAllocator([{ start: 0x1000, end: 0xfffffffff }]);
  readonly identity = { volatileWriteCache: true, oncs: 0x0c, serial: 'FAKE', abortLimit: 4 };
  readonly maxTransferBytes = 16384;
  readonly maps: Array<[string, number]> = [];
  readonly admin: Array<{ opcode: number; cdw10?: number }> = [];
  /** SQ tail doorbell writes per qid, and which thread wrote them. */
  readonly sqTails = new Map<number, Array<[string, number]>>();
  readonly events: string[] = [];
  readonly queues = new Map<number, FakeQueue>();
  resets = 0;
  resetFails = false;
  /** What Abort answers in CDW0 (QEMU 7.2: 1, "not aborted"). */
  abortDw0 = 1;
  readonly dev = {
    dmaMapGuest: (_m: NativeGuestMemory, region: number, iova: number): number => {
      this.maps.push([`map${region}`, iova]);
      return 1 << 20;
    },
    dmaUnmapGuest: (iova: number): void => void this.maps.push(['unmap', iova]),
  };
  readonly dma = {
    iova: this.iova,
    alloc: (size: number) => ({ iova: this.iova.alloc(size), size, bytes: new Uint8Array(size), id: 1 }),
  };
  status(): { allOnes: boolean; fatal: boolean } {
    return { allOnes: false, fatal: false };
  }
  async adminCommand(f: { opcode: number; cdw10?: number }): Promise<{ dw0: number }> {
    this.admin.push(f);
    return { dw0: this.abortDw0 };
  }
  async reset(whileDisabled: () => void | Promise<void>): Promise<void> {
    this.events.push('disable');
    for (const q of this.queues.values()) {
      q.qp.resetRing(q.cq);
      q.sqHead = 0;
      q.cqTail = 0;
      q.phase = 1;
    }
    for (const t of this.sqTails.values()) t.length = 0;
    await whileDisabled();
    this.events.push('disabled-done');
    if (this.resetFails) throw new Error('CSTS.RDY did not become 1');
    this.resets++;
    this.events.push('enabled');
  }
  async createIoQueuePair<T>(qid: number, entries: number): Promise<{ qp: QueuePair<T>; eventfd: undefined; ring: { sq: { bytes: Uint8Array }; cq: { bytes: Uint8Array } } }> {
    const sq = new Uint8Array(entries * SQE_SIZE);
    const cq = new Uint8Array(entries * CQE_SIZE);
    const qp = this.queuePair<T>(qid, entries, sq, cq, 'main');
    this.queues.set(qid, { entries, sq, cq, sqHead: 0, cqTail: 0, phase: 1, qp: qp as QueuePair<unknown> });
    this.sqTails.set(qid, []);
    return { qp, eventfd: undefined, ring: { sq: { bytes: sq }, cq: { bytes: cq } } };
  }
  /** A queue pair over queue `qid`'s memory whose doorbells are recorded as `thread`'s. */
  queuePair<T>(qid: number, entries: number, sq: Uint8Array, cq: Uint8Array, thread: string): QueuePair<T> {
    return new QueuePair<T>({ qid, entries, sq, cq, doorbells: { sqTail: (v) => this.sqTails.get(qid)!.push([thread, v]), cqHead: () => undefined } });
  }
  async deleteIoQueue(): Promise<void> {}
  /** Commands made visible on queue `qid` (up to its last SQ doorbell). */
  fetch(qid: number): Sqe[] {
    const q = this.queues.get(qid)!;
    const tail = this.sqTails.get(qid)!.at(-1)?.[1] ?? 0;
    const v = new DataView(q.sq.buffer);
    const out: Sqe[] = [];
    while (q.sqHead !== tail) {
      const at = q.sqHead * SQE_SIZE;
      out.push({ opcode: v.getUint8(at), cid: v.getUint16(at + 2, true), prp1: v.getUint32(at + 24, true) + v.getUint32(at + 28, true) * 2 ** 32, cdw10: v.getUint32(at + 40, true) });
      q.sqHead = (q.sqHead + 1) % q.entries;
    }
    return out;
  }
  complete(qid: number, cid: number, status = 0): void {
    const q = this.queues.get(qid)!;
    const v = new DataView(q.cq.buffer);
    const at = q.cqTail * CQE_SIZE;
    v.setUint32(at + 8, q.sqHead | (qid << 16), true);
    v.setUint32(at + 12, (cid | (q.phase << 16) | (status << 17)) >>> 0, true);
    q.cqTail++;
    if (q.cqTail === q.entries) {
      q.cqTail = 0;
      q.phase ^= 1;
    }
  }
}

const quietLog = { warn: () => undefined, info: () => undefined, error: () => undefined } as unknown as Logger;

/**
 * The main thread's driver (hardware queue 0, the controller) and a worker's (hardware queue 1)
 * over the same queue pairs, joined through connectNvmeWorkers with each message taking an
 * event-loop turn, as between threads.
 */
async function setup(): Promise<{
  hw: TwoQueueFake;
  main: NvmeDriver;
  worker: NvmeDriver;
  h0: HwQueue;
  h1: HwQueue;
  ended: Array<[number, number, BlkStatus]>;
  chunk0: number;
  workerMessages: NvmeWorkerMessage['kind'][];
}> {
  const hw = new TwoQueueFake();
  const log = (): void => undefined;
  const main = await NvmeDriver.open({ controller: hw as unknown as NvmeController, nsid: 1, namespace: NS, queues: 2, entries: 16, poll: true, log, served: (i) => i % 2 === 0 });
  let toMain: (m: NvmeMainMessage) => void = () => undefined;
  const attached: AttachedQueue[] = [...hw.queues.entries()].map(([qid, q], i) => ({
    pair: { qp: hw.queuePair<number>(qid, q.entries, q.sq, q.cq, 'worker'), eventfd: undefined, ring: { sq: { bytes: q.sq } as never, cq: { bytes: q.cq } as never } },
    lists: main.queues[i]!.lists,
    bounce: main.queues[i]!.bounceRegion,
  }));
  const workerController = { bdf: 'fake', identity: hw.identity, maxTransferBytes: hw.maxTransferBytes, status: () => hw.status() } as unknown as NvmeController;
  const worker = NvmeDriver.attach(
    {
      controller: workerController,
      nsid: 1,
      namespace: NS,
      queues: 2,
      entries: 16,
      poll: true,
      log,
      served: (i) => i % 2 === 1,
      main: { abort: (qid, cid, what) => toMain({ kind: 'abort', qid, cid, what }), reset: (why) => toMain({ kind: 'reset', why }) },
    },
    attached,
  );
  // The worker thread's message handler, as daemon/nvme-thread.ts's buildNvmeWorkerDisk has it.
  const workerMessages: NvmeWorkerMessage['kind'][] = [];
  const handle = (m: NvmeWorkerMessage): unknown => {
    workerMessages.push(m.kind);
    if (m.kind === 'quiesce') hw.events.push('worker quiesced');
    switch (m.kind) {
      case 'quiesce':
        return worker.quiesce();
      case 'requeue':
        hw.events.push('worker requeued');
        return worker.requeueLocal();
      case 'resume':
        return worker.resumeAfterReset();
      case 'broken':
        return worker.failAll();
      case 'chunkIova':
        worker.namespaces[m.ns]!.chunkIova = new Float64Array(m.chunkIova);
        return undefined;
      case 'stats':
        return worker.stats().flatMap((s, i) => (i % 2 === 1 ? [[i, s]] : []));
    }
  };
  let onMessage: (thread: number, m: unknown) => void = () => undefined;
  connectNvmeWorkers(
    main,
    {
      driverCall: async (m) => {
        await turn();
        const r = handle(structuredClone(m));
        await turn();
        return [r];
      },
      onDriverMessage: (h) => (onMessage = h),
      onDriverLost: () => undefined,
    },
    quietLog,
  );
  toMain = (m) => setImmediate(() => onMessage(1, structuredClone(m)));
  const ended: Array<[number, number, BlkStatus]> = [];
  const sink = (index: number): CompletionSink => ({ requestEnded: (rq) => ended.push([index, rq.tag, rq.status]), requestTimedOut: () => undefined });
  const h0 = new HwQueue(0, 16);
  const h1 = new HwQueue(1, 16);
  h0.attach(main, sink(0));
  h1.attach(worker, sink(1));
  main.memoryMapped(MEMORY);
  await settle();
  return { hw, main, worker, h0, h1, ended, chunk0: hw.maps[0]![1], workerMessages };
}

function submit(hctx: HwQueue, tag: number, op: ReqOp, sector: number, segs: Array<[number, number]>): Request {
  return dispatchSegments(hctx, tag, op, sector, segs, GUEST);
}

test('each queue pair is driven by its own thread: qid 1 by the main thread, qid 2 by the worker, PRPs at the IOVA the main thread mapped', async () => {
  const { hw, main, worker, h0, h1, ended, chunk0 } = await setup();
  expect(hw.maps).toEqual([['map0', chunk0]]); // guest memory mapped once, by the main thread
  expect(() => new HwQueue(1, 16).attach(main, { requestEnded: () => undefined, requestTimedOut: () => undefined })).toThrow(/served by another thread/);
  submit(h0, 3, ReqOp.Read, 8, [[4096, 4096]]);
  submit(h1, 5, ReqOp.Write, 16, [[8192, 4096]]);
  expect(hw.sqTails.get(1)!.map(([t]) => t)).toEqual(['main']);
  expect(hw.sqTails.get(2)!.map(([t]) => t)).toEqual(['worker']);
  const [c1] = hw.fetch(1);
  const [c2] = hw.fetch(2);
  expect(c1).toMatchObject({ opcode: 2, cdw10: 8, prp1: chunk0 + 4096 });
  expect(c2).toMatchObject({ opcode: 1, cdw10: 16, prp1: chunk0 + 8192 });
  hw.complete(2, c2!.cid);
  hw.complete(1, c1!.cid);
  await settle();
  expect(ended.sort()).toEqual([
    [0, 3, BlkStatus.Ok],
    [1, 5, BlkStatus.Ok],
  ]);
  expect(main.stats()[1]!.commands).toBe(0); // the main thread never submitted on qid 2
  await main.refreshStats();
  expect(main.stats()[1]).toMatchObject({ qid: 2, commands: 1, requests: 1 });
  expect(worker.stats()[0]!.commands).toBe(0);
});

test('the worker learns each memory table\'s IOVAs from the main thread; released, its reads fail with IOERR', async () => {
  const { hw, main, h1, ended, workerMessages } = await setup();
  expect(workerMessages).toContain('chunkIova');
  main.memoryReleased(MEMORY);
  await settle();
  submit(h1, 2, ReqOp.Read, 0, [[0, 512]]);
  expect(hw.fetch(2)).toEqual([]);
  expect(ended).toEqual([[1, 2, BlkStatus.IoErr]]);
});

test('a controller reset stops the worker before disabling, requeues its requests while disabled, resubmits them after; each ends once, late completions dropped', async () => {
  const { hw, main, h0, h1, ended } = await setup();
  submit(h0, 1, ReqOp.Read, 100, [[0, 4096]]);
  submit(h1, 2, ReqOp.Write, 200, [[4096, 4096]]);
  const [old1] = hw.fetch(1);
  const [old2] = hw.fetch(2);
  await main.resetController('test');
  await settle();
  expect(hw.events.slice(0, 4)).toEqual(['worker quiesced', 'disable', 'worker requeued', 'disabled-done']);
  expect(hw.resets).toBe(1);
  expect(ended).toEqual([]);
  const [new1] = hw.fetch(1);
  const [new2] = hw.fetch(2);
  expect(new1).toMatchObject({ opcode: 2, cdw10: 100 });
  expect(new2).toMatchObject({ opcode: 1, cdw10: 200 });
  expect(hw.sqTails.get(2)!.every(([t]) => t === 'worker')).toBe(true);
  // The command ids' generations changed: completing the old ones ends nothing.
  expect(new2!.cid).not.toBe(old2!.cid);
  hw.complete(2, old2!.cid);
  hw.complete(1, old1!.cid);
  await settle();
  expect(ended).toEqual([]);
  hw.complete(2, new2!.cid);
  hw.complete(1, new1!.cid);
  await settle();
  expect(ended.sort()).toEqual([
    [0, 1, BlkStatus.Ok],
    [1, 2, BlkStatus.Ok],
  ]);
  await main.refreshStats();
  expect(main.stats()[1]).toMatchObject({ resets: 1, retries: 1 });
});

test('a worker request timing out: the main thread sends the Abort for the worker\'s queue and command, then resets; the request is resubmitted on the worker', async () => {
  const { hw, worker, h1, ended } = await setup();
  const rq = submit(h1, 4, ReqOp.Read, 40, [[0, 4096]]);
  const [old] = hw.fetch(2);
  expect(worker.timeout(rq)).toBe('reset');
  await settle();
  expect(hw.admin).toEqual([{ opcode: 0x08, cdw10: (2 | (old!.cid << 16)) >>> 0 }]);
  await settle(); // "not aborted" (QEMU 7.2): reset
  expect(hw.resets).toBe(1);
  const [again] = hw.fetch(2);
  expect(again).toMatchObject({ opcode: 2, cdw10: 40 });
  hw.complete(2, again!.cid);
  await settle();
  expect(ended).toEqual([[1, 4, BlkStatus.Ok]]);
});

test('a second expiry on the worker asks the main thread for one reset', async () => {
  const { hw, worker, h1 } = await setup();
  hw.abortDw0 = 0; // aborted: no reset from the Abort itself
  const rq = submit(h1, 6, ReqOp.Read, 48, [[0, 512]]);
  worker.timeout(rq);
  await settle();
  expect(hw.resets).toBe(0);
  worker.timeout(rq);
  worker.timeout(rq); // asked once until the reset begins
  await settle();
  expect(hw.resets).toBe(1);
  const [again] = hw.fetch(2).slice(-1);
  hw.complete(2, again!.cid);
  await settle();
});

test('a controller that does not come back fails the worker\'s requests with IOERR, now and later', async () => {
  const { hw, main, h0, h1, ended } = await setup();
  hw.resetFails = true;
  submit(h0, 1, ReqOp.Read, 0, [[0, 512]]);
  submit(h1, 2, ReqOp.Read, 0, [[0, 512]]);
  await main.resetController('test');
  await settle();
  expect(main.broken).toBe(true);
  expect(ended.sort()).toEqual([
    [0, 1, BlkStatus.IoErr],
    [1, 2, BlkStatus.IoErr],
  ]);
  submit(h1, 3, ReqOp.Read, 0, [[0, 512]]);
  expect(ended).toContainEqual([1, 3, BlkStatus.IoErr]);
});

test('the native shares a worker thread uses refuse ids no device registered (a freed block, a closed BAR) with an Error, never a fault', () => {
  expect(() => vfioShareView(0xfffffff0)).toThrow(/no such VFIO memory/);
  expect(() => vfioShareWrite32(0xfffffff0, 0x1000, 1)).toThrow(/BAR is not mapped any more/);
  expect(() => vfioShareRead32(0xfffffff0, 0x1c)).toThrow(/BAR is not mapped any more/);
  expect(() => vfioShareView(-1)).toThrow(/share is out of range/);
});

describe('config', () => {
  const file = (o: unknown): string => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-89-'));
    const p = path.join(dir, 'vm.json');
    fs.writeFileSync(p, JSON.stringify(o));
    return p;
  };
  test('threads 2 with driver nvme and num_queues 2 is accepted; threads above num_queues (1 by default) is refused', () => {
    const c = loadConfig(file({ disks: [{ driver: 'nvme', pci: '0000:00:04.0', socket: '/tmp/x.sock', num_queues: 2, threads: 2 }] }), {});
    expect(c.disks[0]).toMatchObject({ threads: 2, num_queues: 2 });
    expect(() => loadConfig(file({ disks: [{ driver: 'nvme', pci: '0000:00:04.0', socket: '/tmp/x.sock', threads: 2 }] }), {})).toThrow(ConfigError);
  });
  test('several namespaces of one controller keep threads 1, with a message saying so', () => {
    const c = loadConfig(
      file({
        disks: [
          { name: 'a', driver: 'nvme', pci: '0000:00:04.0', nsid: 1, socket: '/tmp/a.sock', num_queues: 2, threads: 2 },
          { name: 'b', driver: 'nvme', pci: '0000:00:04.0', nsid: 2, socket: '/tmp/b.sock', num_queues: 2, threads: 2 },
        ],
      }),
      {},
    );
    expect(() => checkSharedController(c.disks)).toThrow(/share one set of queue pairs served from one thread; give each of them threads 1/);
    expect(() => checkSharedController(c.disks.map((d) => ({ ...d, threads: 1 })))).not.toThrow();
  });
});
