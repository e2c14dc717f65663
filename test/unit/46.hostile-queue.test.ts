/**
 * issue 9, the queue loop under a hostile front-end or guest: a ring start that fails half-way
 * leaves nothing behind (on the main thread and on a worker thread), and a guest that re-offers
 * every completed request at once cannot keep the thread inside one drain().
 */
import * as fs from 'fs';
import pino from 'pino';
import { hctxOf } from '../../block/disk';
import { BlkStatus, type Operations } from '../../block/operations';
import type { Request } from '../../block/request';
import { native } from '../../native';
import { VirtioBlkQueue } from '../../virtqueue/blk-queue';
import { GuestMemoryMap } from '../../virtqueue/guest-memory';
import { startBackend, TestBackend, until } from '../helpers/backend';
import { blkHeader, DESC_F_NEXT, DESC_F_WRITE, DriverRing, offerRead } from '../helpers/driver-ring';
import { TestFrontend } from '../helpers/frontend';
import { GuestRam } from '../helpers/guest-ram';

const silent = pino({ level: 'silent' });

describe('a ring start that fails half-way (kick fd epoll refuses: /dev/null) leaves nothing started', () => {
  let be: TestBackend;
  let ram: GuestRam;
  let devNull: number;
  const fds: number[] = [];
  beforeEach(() => {
    ram = new GuestRam();
    devNull = fs.openSync('/dev/null', 'r');
  });
  afterEach(async () => {
    fs.closeSync(devNull);
    for (const fd of fds.splice(0)) native.close(fd);
    await be.close();
    ram.close();
  });

  test('main thread: VirtioBlkQueue.start throws, the queue is not running, and a fresh start serves requests', async () => {
    be = startBackend({ num_queues: 1 });
    const memory = ram.memoryMap();
    const hctx = hctxOf(be.disk, 0);
    const q = new VirtioBlkQueue(0, hctx, be.disk, silent);
    const ring = new DriverRing(ram, 16);
    expect(() => q.start(ring.setup(memory, devNull), true)).toThrow();
    expect(q.isRunning).toBe(false);
    expect(q.snapshot().running).toBe(false);
    // Disabled at start: the bad kick fd is refused all the same (not later, at enable).
    expect(() => q.start(ring.setup(memory, devNull), false)).toThrow();
    expect(q.isRunning).toBe(false);
    // Nothing kept the memory: it can be released and mapped again.
    memory.release();
    const memory2 = ram.memoryMap();
    const kick = native.eventfd();
    fds.push(kick);
    q.start(ring.setup(memory2, kick), true);
    expect(q.isRunning).toBe(true);
    const st = offerRead(ram, ring, 8);
    native.eventfdWrite(kick);
    await until(() => ring.usedIdx() === 1, 'the request to complete');
    expect(ram.bytes(st, 1)[0]).toBe(0);
    expect(await q.stop()).toBe(1);
    expect(q.isRunning).toBe(false);
    memory2.release();
  });

  test('worker thread: the start rejects, the worker\'s queue is stopped, memory is released and remapped, a fresh start serves', async () => {
    be = startBackend({ threads: 2, num_queues: 2 });
    const workers = be.workers!;
    await workers.mapMemory(ram.regions, ram.regions.map(() => ram.fd));
    const rq = workers.remoteQueue(1)!;
    const ring = new DriverRing(ram, 16);
    const unused = new GuestMemoryMap([], []);
    await expect(Promise.resolve(rq.start(ring.setup(unused, devNull), true))).rejects.toThrow();
    expect(rq.isRunning).toBe(false);
    expect((await rq.snapshot()).running).toBe(false);
    // The worker gives its mapping up (it refused while a half-started ring held it).
    await workers.releaseMemory();
    await workers.mapMemory(ram.regions, ram.regions.map(() => ram.fd));
    const kick = native.eventfd();
    fds.push(kick);
    await rq.start(ring.setup(unused, kick), true);
    const st = offerRead(ram, ring, 16);
    native.eventfdWrite(kick);
    await until(() => ring.usedIdx() === 1, 'the request to complete on the worker');
    expect(ram.bytes(st, 1)[0]).toBe(0);
    expect(await rq.stop()).toBe(1);
    await workers.releaseMemory();
  });
});

describe('drain() has a budget (a guest that re-offers every completed request at once)', () => {
  let be: TestBackend;
  let fe: TestFrontend;
  afterEach(async () => {
    fe.close();
    await be.close();
  });

  test('other rings, timers and immediates run while the storm lasts; every request still completes', async () => {
    const STORM = 100_000;
    const CHAINS = 85; // 3 descriptors each in a ring of 256
    const STARTED = 8;
    let reoffer: (() => void) | null = null;
    let ended = 0;
    // A driver that ends each request at once, while the "vCPU" re-offers another chain for
    // every request it sees taken (what a guest spinning on the used ring does).
    const ops: Operations = {
      queueRq(rq: Request): BlkStatus {
        rq.end(BlkStatus.Ok);
        if (rq.hctx.index === 0) {
          ended++;
          if (reoffer !== null) reoffer();
        }
        return BlkStatus.Ok;
      },
    };
    be = startBackend({ num_queues: 2 }, ops);
    fe = new TestFrontend(be.socket);
    await fe.setup({ queues: 2, queueSize: 256 });
    const ring = fe.rings[0];
    const ram = fe.ram;
    const status: number[] = [];
    for (let c = 0; c < CHAINS; c++) {
      const h = ram.alloc(16);
      ram.bytes(h, 16).set(blkHeader(0, 8 * c));
      const data = ram.alloc(4096, 512);
      const st = ram.alloc(1);
      status.push(st);
      ring.setDesc(3 * c, { addr: h, len: 16, flags: DESC_F_NEXT, next: 3 * c + 1 });
      ring.setDesc(3 * c + 1, { addr: data, len: 4096, flags: DESC_F_NEXT | DESC_F_WRITE, next: 3 * c + 2 });
      ring.setDesc(3 * c + 2, { addr: st, len: 1, flags: DESC_F_WRITE });
    }
    let offered = 0;
    const offerNext = (): void => {
      const c = offered++ % CHAINS;
      ram.bytes(status[c], 1)[0] = 0xff;
      ring.offer(3 * c);
    };
    reoffer = () => {
      if (offered < STORM) offerNext();
    };
    for (let i = 0; i < STARTED; i++) offerNext();

    // Event loop turns seen while the storm is on (some requests served, not all).
    let turnsDuring = 0;
    let timersDuring = 0;
    let ticking = true;
    const tick = (): void => {
      if (ended > 0 && ended < STORM) turnsDuring++;
      if (ticking) setImmediate(tick);
    };
    setImmediate(tick);
    const timer = setInterval(() => {
      if (ended > 0 && ended < STORM) timersDuring++;
    }, 1);
    fe.kick(0);
    await until(() => ended > 0, 'the storm to start');
    // A request on the other ring of the same thread is served before the storm ends.
    const other = await fe.blk(1, 0, 0, { readLen: 512 });
    const endedWhenOtherDone = ended;
    await until(() => ended === STORM, 'the storm to end', 60000);
    ticking = false;
    clearInterval(timer);
    expect(other.status).toBe(0);
    expect(endedWhenOtherDone).toBeLessThan(STORM);
    expect(turnsDuring).toBeGreaterThan(5);
    expect(timersDuring).toBeGreaterThan(0);
    await fe.waitUsedIdx(0, STORM);
    for (const st of status) expect(ram.bytes(st, 1)[0]).toBe(0);
    const s = await be.device.vrings[0].queue.snapshot();
    expect(s).toMatchObject({ requests: STORM, failedRequests: 0, badChains: 0, broken: false, inFlight: 0 });
  });
});
