/**
 * threads > 1: hardware queues served on worker threads (daemon/queue-workers.ts), sharing one
 * native PageStore. The back-end runs in this process; its workers run the built dist/.
 */
import * as path from 'path';
import { Worker } from 'worker_threads';
import { ManagementServer } from '../../daemon/management/server';
import { BadBlocksAction } from '../../daemon/management/schema';
import { native } from '../../native';
import { Req } from '../../vhost/protocol';
import type { QueueSnapshot } from '../../virtqueue/ring-queue';
import { startBackend, TestBackend, until } from '../helpers/backend';
import { state, TestFrontend, u64 } from '../helpers/frontend';

const ADDON = path.join(__dirname, '..', '..', 'build', 'Release', 'rnull_native.node');

/** A block of `n` bytes, different for every (seed, byte). */
function pattern(n: number, seed: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 7 + seed * 13 + (i >> 9)) & 0xff;
  return b;
}

async function snapshots(be: TestBackend): Promise<QueueSnapshot[]> {
  return Promise.all(be.device.vrings.map((r) => r.queue.snapshot()));
}

describe('PageStore across threads', () => {
  test('two threads allocating pages of one store at once: no page is lost or mixed up', async () => {
    const store = new native.PageStore();
    const PAGES = 20000;
    // Thread t writes every page p with p % 2 === t, in page order (both allocate all the time),
    // each page filled with a byte derived from its number.
    const code = `
      const { workerData, parentPort } = require('worker_threads');
      const addon = require(workerData.addon);
      const store = new addon.PageStore(workerData.id);
      const page = Buffer.alloc(4096);
      for (let p = workerData.t; p < workerData.pages; p += 2) {
        page.fill((p * 31 + 7) & 0xff);
        store.write(p * 4096, page, 0, 4096);
      }
      parentPort.postMessage('done');`;
    const run = (t: number): Promise<void> =>
      new Promise((resolve, reject) => {
        const w = new Worker(code, { eval: true, workerData: { addon: ADDON, id: store.id, t, pages: PAGES } });
        w.on('message', () => resolve());
        w.on('error', reject);
      });
    await Promise.all([run(0), run(1)]);
    expect(store.pageCount).toBe(PAGES);
    const out = Buffer.alloc(PAGES * 4096);
    store.read(0, out, 0, out.length);
    let wrong = 0;
    for (let p = 0; p < PAGES; p++) {
      const v = (p * 31 + 7) & 0xff;
      if (out[p * 4096] !== v || out[p * 4096 + 4095] !== v) wrong++;
    }
    expect(wrong).toBe(0);
  });

  test('attaching by id finds the same store; an unknown id is refused', () => {
    const a = new native.PageStore();
    const b = new native.PageStore(a.id);
    a.write(8192, Buffer.from('shared'), 0, 6);
    const out = Buffer.alloc(6);
    b.read(8192, out, 0, 6);
    expect(out.toString()).toBe('shared');
    expect(() => new native.PageStore(999999)).toThrow(/no store with that id/);
    expect(() => a.write(0, Buffer.alloc(4), 2, 4)).toThrow(/range outside the array/);
  });
});

describe('a disk with threads 2 and num_queues 2', () => {
  let be: TestBackend;
  let fe: TestFrontend;
  afterEach(async () => {
    fe.close();
    await be.close();
  });

  test('queue 1 runs on worker thread 1; data written on either queue reads back on the other', async () => {
    be = startBackend({ threads: 2, num_queues: 2, discard: true });
    fe = new TestFrontend(be.socket);
    await fe.setup({ queues: 2 });
    const a = pattern(65536, 1);
    const b = pattern(4096, 2);
    expect(await fe.blk(0, 1, 0, { data: a })).toMatchObject({ status: 0 });
    expect(await fe.blk(1, 1, 200, { data: b })).toMatchObject({ status: 0 });
    // The same blocks, overwritten from the other queue (and so the other thread).
    const c = pattern(8192, 3);
    expect(await fe.blk(1, 1, 16, { data: c })).toMatchObject({ status: 0 });
    const r0 = await fe.blk(1, 0, 0, { readLen: 65536 });
    expect(r0.data!.equals(Buffer.concat([a.subarray(0, 8192), c, a.subarray(16384)]))).toBe(true);
    expect((await fe.blk(0, 0, 200, { readLen: 4096 })).data!.equals(b)).toBe(true);
    // Discard on the worker thread: the main thread reads zeroes.
    const seg = Buffer.alloc(16);
    seg.writeBigUInt64LE(0n, 0);
    seg.writeUInt32LE(8, 8);
    expect(await fe.blk(1, 11, 0, { data: seg })).toMatchObject({ status: 0 });
    expect((await fe.blk(0, 0, 0, { readLen: 4096 })).data!.every((x) => x === 0)).toBe(true);

    const s = await snapshots(be);
    expect(s.map((q) => [q.thread, q.running])).toEqual([[0, true], [1, true]]);
    expect(s[0].requests).toBe(3);
    expect(s[1].requests).toBe(4);
    expect(be.driver.store!.pageCount).toBe(16 + 1 - 1); // 64 KiB + one page, one discarded
  });

  test('GET_VRING_BASE stops the worker ring at its next avail index; it resumes from SET_VRING_BASE', async () => {
    be = startBackend({ threads: 2, num_queues: 2 });
    fe = new TestFrontend(be.socket);
    await fe.setup({ queues: 2 });
    for (let i = 0; i < 5; i++) await fe.blk(1, 0, i, { readLen: 512 });
    const r = await fe.call(Req.GET_VRING_BASE, state(1, 0));
    expect(r.payload.readUInt32LE(4)).toBe(5);
    expect((await snapshots(be))[1].running).toBe(false);
    fe.restartRing(1, 5);
    expect(await fe.blk(1, 0, 0, { readLen: 512 })).toMatchObject({ status: 0 });
    expect(fe.rings[1].usedIdx()).toBe(6);
  });

  test('SET_VRING_CALL on a running worker ring: completions signal the new eventfd, not the old one', async () => {
    be = startBackend({ threads: 2, num_queues: 2 });
    fe = new TestFrontend(be.socket);
    await fe.setup({ queues: 2, featureMask: ~(1n << 29n) }); // no event idx: every batch calls
    const old = fe.callFds[1];
    const call = native.eventfd();
    fe.callFds[1] = call;
    fe.send(Req.SET_VRING_CALL, u64(1n), [call]);
    await fe.call(Req.GET_QUEUE_NUM); // handled once the worker has switched
    native.eventfdRead(old);
    await fe.blk(1, 0, 0, { readLen: 512 });
    expect(native.eventfdRead(call)).toBe(1);
    expect(native.eventfdRead(old)).toBe(0);
    native.close(old);
  });

  test('SET_MEM_TABLE on running rings: the worker remaps and keeps serving', async () => {
    be = startBackend({ threads: 2, num_queues: 2 });
    fe = new TestFrontend(be.socket);
    await fe.setup({ queues: 2 });
    await fe.blk(1, 1, 0, { data: Buffer.alloc(512, 9) });
    fe.send(Req.SET_MEM_TABLE, fe.memTablePayload(), Array(fe.ram.regions.length).fill(fe.ram.fd));
    expect((await fe.blk(1, 0, 0, { readLen: 512 })).data!.every((x) => x === 9)).toBe(true);
    expect((await fe.blk(0, 0, 0, { readLen: 512 })).data!.every((x) => x === 9)).toBe(true);
  });

  test('bad blocks changed at run time through the management API fail requests on the worker too', async () => {
    be = startBackend({ threads: 2, num_queues: 2 });
    fe = new TestFrontend(be.socket);
    await fe.setup({ queues: 2 });
    const mgmt = new ManagementServer(path.join(path.dirname(be.socket), 'ctl.sock'), [be], be.device['log']);
    expect(await mgmt.handle({ bad_blocks: { disk: 'test', action: BadBlocksAction.ADD, start: 64, end: 71 } })).toMatchObject({ ok: true });
    expect((await fe.blk(1, 0, 64, { readLen: 512 })).status).toBe(1);
    expect((await fe.blk(0, 0, 70, { readLen: 512 })).status).toBe(1);
    expect((await fe.blk(1, 0, 72, { readLen: 512 })).status).toBe(0);
    await mgmt.handle({ bad_blocks: { disk: 'test', action: BadBlocksAction.REMOVE, start: 0, end: 100 } });
    expect((await fe.blk(1, 0, 64, { readLen: 512 })).status).toBe(0);
    const stats = await mgmt.handle({ get_stats: { disk: 'test' } });
    expect(stats.queues!.map((q) => [q.thread, q.requests, q.failed_requests])).toEqual([
      [0, 1, 1],
      [1, 3, 1],
    ]);
  });

  test('timer mode on a worker thread: requests end completion_nsec after they started, never before', async () => {
    be = startBackend({ threads: 2, num_queues: 2, irqmode: 2, completion_nsec: 2_000_000 });
    fe = new TestFrontend(be.socket);
    await fe.setup({ queues: 2 });
    for (let i = 0; i < 5; i++) {
      const t0 = process.hrtime.bigint();
      expect(await fe.blk(1, 0, i, { readLen: 4096 })).toMatchObject({ status: 0 });
      expect(Number(process.hrtime.bigint() - t0)).toBeGreaterThanOrEqual(2_000_000);
    }
    expect((await snapshots(be))[1].requests).toBe(5);
  });

  test('a lost worker thread: the front-end is disconnected with the reason logged; a fresh worker serves the next one', async () => {
    be = startBackend({ threads: 2, num_queues: 2 });
    fe = new TestFrontend(be.socket);
    await fe.setup({ queues: 2 });
    const data = Buffer.alloc(512, 0x42);
    expect(await fe.blk(1, 1, 8, { data })).toMatchObject({ status: 0 });
    // As if the worker had crashed: its thread ends under the running ring.
    const channel = (be.workers as unknown as { channels: Array<{ worker: { terminate(): Promise<number> } }> }).channels[0];
    await channel.worker.terminate();
    await fe.waitClosed();
    await until(() => be.logs.some((l) => l.level === 50 && /worker thread 1 exited/.test(JSON.stringify(l))), 'error log naming the worker');
    fe.close();
    fe = new TestFrontend(be.socket);
    await fe.setup({ queues: 2 });
    expect((await fe.blk(1, 0, 8, { readLen: 512 })).data!.equals(data)).toBe(true);
    expect((await snapshots(be))[1]).toMatchObject({ thread: 1, running: true, requests: 1 });
  });
});
