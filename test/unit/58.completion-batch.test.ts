/**
 * issue 12, the data path: completions a driver ends in a batch outside queueRq (an interrupt's
 * reap, a timer) are published when the batch ends, in the same call, rather than on the next
 * event-loop turn; and a polling spin on one virtqueue gives way as soon as another virtqueue
 * of the same thread has work, which is then drained at once.
 */
import pino from 'pino';
import { hctxOf } from '../../block/disk';
import type { HwQueue } from '../../block/hw-queue';
import { BlkStatus, type Operations } from '../../block/operations';
import type { Request } from '../../block/request';
import { native } from '../../native';
import { VirtioBlkQueue } from '../../virtqueue/blk-queue';
import type { GuestMemoryMap } from '../../virtqueue/guest-memory';
import { startBackend, TestBackend, until } from '../helpers/backend';
import { DriverRing, offerRead } from '../helpers/driver-ring';
import { GuestRam } from '../helpers/guest-ram';

const silent = pino({ level: 'silent' });

const nextTurn = (): Promise<void> => new Promise((r) => setImmediate(r));

/** Queues a test started: afterEach stops those still running before their fds are closed. */
const started: VirtioBlkQueue[] = [];
async function stopAll(): Promise<void> {
  for (const q of started.splice(0)) if (q.isRunning) await q.stop();
}

describe('completion batches (HwQueue.begin/endCompletionBatch)', () => {
  let be: TestBackend;
  let ram: GuestRam;
  let memory: GuestMemoryMap;
  let kick: number;
  const held: Request[] = [];
  /** A driver that keeps every request, for the test to end. */
  const holding: Operations = { queueRq: (rq) => (held.push(rq), BlkStatus.Ok) };

  /** Queue 0 of the disk on a 16-entry ring, started and enabled. */
  function startQueue(): { hctx: HwQueue; q: VirtioBlkQueue; ring: DriverRing } {
    const hctx = hctxOf(be.disk, 0);
    const q = new VirtioBlkQueue(0, hctx, be.disk, silent);
    const ring = new DriverRing(ram, 16);
    q.start(ring.setup(memory, kick), true);
    started.push(q);
    return { hctx, q, ring };
  }

  beforeEach(() => {
    held.length = 0;
    ram = new GuestRam();
    memory = ram.memoryMap();
    kick = native.eventfd();
    be = startBackend({ num_queues: 1 }, holding);
  });
  afterEach(async () => {
    await stopAll();
    native.close(kick);
    await be.close();
    memory.release();
    ram.close();
  });

  test('requests ended inside a batch reach the used ring when it ends, in the same call; outside a batch, on the next turn', async () => {
    const { hctx, q, ring } = startQueue();
    const st = [offerRead(ram, ring, 0), offerRead(ram, ring, 8), offerRead(ram, ring, 16)];
    native.eventfdWrite(kick);
    await until(() => held.length === 3, 'the driver to hold 3 requests');

    hctx.beginCompletionBatch();
    hctx.beginCompletionBatch(); // batches nest: only the outermost end publishes
    for (const rq of held.splice(0)) rq.end(BlkStatus.Ok);
    hctx.endCompletionBatch();
    expect(ring.usedIdx()).toBe(0);
    hctx.endCompletionBatch();
    // Published before this test's code goes on: no event-loop turn in between.
    expect(ring.usedIdx()).toBe(3);
    for (const a of st) expect(ram.bytes(a, 1)[0]).toBe(BlkStatus.Ok);
    expect(hctx.completing).toBe(0);

    // A request ended outside any batch goes out on the next turn of the event loop.
    offerRead(ram, ring, 24);
    native.eventfdWrite(kick);
    await until(() => held.length === 1, 'the driver to hold the 4th request');
    held.splice(0)[0].end(BlkStatus.Ok);
    expect(ring.usedIdx()).toBe(3);
    await nextTurn();
    await nextTurn();
    expect(ring.usedIdx()).toBe(4);
    expect(await q.stop()).toBe(4);
  });

  test('an unbalanced end (no batch open) is ignored and publishes nothing twice', async () => {
    const { hctx, q, ring } = startQueue();
    offerRead(ram, ring, 0);
    native.eventfdWrite(kick);
    await until(() => held.length === 1, 'the driver to hold the request');
    hctx.endCompletionBatch();
    expect(hctx.completing).toBe(0);
    hctx.beginCompletionBatch();
    held.splice(0)[0].end(BlkStatus.IoErr);
    hctx.endCompletionBatch();
    expect(ring.usedIdx()).toBe(1);
    await nextTurn();
    await nextTurn();
    expect(ring.usedIdx()).toBe(1);
    expect(q.stats.failedRequests).toBe(1);
    expect(await q.stop()).toBe(1);
  });
});

describe('polling siblings: a spin on one virtqueue ends when another of the thread has work, which is served at once', () => {
  let be: TestBackend;
  let ram: GuestRam;
  let memory: GuestMemoryMap;
  const fds: number[] = [];

  beforeEach(() => {
    ram = new GuestRam();
    memory = ram.memoryMap();
    be = startBackend({ num_queues: 2 });
  });
  afterEach(async () => {
    await stopAll();
    for (const fd of fds.splice(0)) native.close(fd);
    await be.close();
    memory.release();
    ram.close();
  });

  /** Two queues of one disk on this thread, each polling up to 1 ms after a batch. */
  function twoQueues(): Array<{ q: VirtioBlkQueue; ring: DriverRing; kick: number }> {
    return [0, 1].map((i) => {
      const q = new VirtioBlkQueue(i, hctxOf(be.disk, i), be.disk, silent);
      const ring = new DriverRing(ram, 16);
      const kick = native.eventfd();
      fds.push(kick);
      q.start({ ...ring.setup(memory, kick), pollUs: 1000 }, true);
      started.push(q);
      return { q, ring, kick };
    });
  }

  test('queue 0 spins its whole budget while queue 1 is idle, and yields at once when queue 1 has a request', async () => {
    const [a, b] = twoQueues();
    // Both rings go to sleep (armed) with nothing to do: their first pops find them empty.
    a.q.drain();
    b.q.drain();
    const a0 = a.q.state();

    // Queue 1 idle: queue 0's drain serves its request, then spins until its budget ends.
    offerRead(ram, a.ring, 0);
    a.q.drain();
    const a1 = a.q.state();
    expect(a.ring.usedIdx()).toBe(1);
    expect(a1.spins - a0.spins).toBe(1);
    expect(a1.spinYields).toBe(0);
    expect(a1.spinHits).toBe(0);

    // Queue 1 has a request (made available, its kick pending on the event loop): queue 0's
    // spin after its next request gives way instead of running out its budget, and queue 1 is
    // drained right away, in the same call (one polling loop for the thread's queues).
    const st = offerRead(ram, b.ring, 8);
    native.eventfdWrite(b.kick);
    offerRead(ram, a.ring, 16);
    a.q.drain();
    const a2 = a.q.state();
    expect(a.ring.usedIdx()).toBe(2);
    expect(a2.spins - a1.spins).toBe(1);
    expect(a2.spinYields).toBe(1);
    // A yield does not shrink queue 0's budget (it was cut short, not idle); the wake-up at the
    // start of this drain may have raised it (twice the idle gap, if the test was slow).
    expect(a2.pollNs).toBeGreaterThanOrEqual(a1.pollNs);
    expect(a.q.snapshot().spinYields).toBe(1);
    expect(b.ring.usedIdx()).toBe(1);
    expect(ram.bytes(st, 1)[0]).toBe(BlkStatus.Ok);
    // Its kick, still pending, finds nothing more to do.
    await nextTurn();
    await nextTurn();
    expect(b.ring.usedIdx()).toBe(1);
    expect(await a.q.stop()).toBe(2);
    expect(await b.q.stop()).toBe(1);
  });

  test('a stopped queue is no longer a sibling: queue 0 spins its budget again', async () => {
    const [a, b] = twoQueues();
    a.q.drain();
    b.q.drain();
    expect(await b.q.stop()).toBe(0);
    offerRead(ram, b.ring, 8); // work on a stopped ring: nobody's business
    offerRead(ram, a.ring, 0);
    a.q.drain();
    expect(a.ring.usedIdx()).toBe(1);
    expect(a.q.state().spinYields).toBe(0);
    expect(await a.q.stop()).toBe(1);
  });
});
