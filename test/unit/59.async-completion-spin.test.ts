/**
 * issue 10/12, the data path of asynchronously completing drivers (NVMe): while a request of
 * the queue is in flight at such a driver, the queue's ring is not spun on after a batch (the
 * thread would be busy in the spin while the interrupt that ends the request waits for the
 * event loop); once nothing is in flight the adaptive spin for the guest's next request is back.
 * A driver that ends requests inside queue_rq, or holds them without saying it completes
 * asynchronously, keeps spinning as before.
 */
import pino from 'pino';
import { hctxOf } from '../../block/disk';
import { SPIN_NONE, type HwQueue } from '../../block/hw-queue';
import { BlkStatus, type Operations } from '../../block/operations';
import type { Request } from '../../block/request';
import { native } from '../../native';
import { VirtioBlkQueue } from '../../virtqueue/blk-queue';
import type { GuestMemoryMap } from '../../virtqueue/guest-memory';
import { startBackend, TestBackend } from '../helpers/backend';
import { DriverRing, offerRead } from '../helpers/driver-ring';
import { GuestRam } from '../helpers/guest-ram';

const silent = pino({ level: 'silent' });

describe('no polling spin while an asynchronously completing driver has requests in flight', () => {
  let be: TestBackend;
  let ram: GuestRam;
  let memory: GuestMemoryMap;
  let kick: number;
  let q: VirtioBlkQueue | null = null;
  const held: Request[] = [];

  /** Keeps every request for the test to end; `async` says whether it declares completesAsync. */
  function holding(async: boolean): Operations {
    return {
      initHctx: (hctx: HwQueue) => {
        hctx.completesAsync = async;
      },
      queueRq: (rq) => (held.push(rq), BlkStatus.Ok),
    };
  }

  /** Queue 0 on a 16-entry ring polling up to 1 ms after a batch, started, gone to sleep once. */
  function startQueue(): { hctx: HwQueue; q: VirtioBlkQueue; ring: DriverRing } {
    const hctx = hctxOf(be.disk, 0);
    q = new VirtioBlkQueue(0, hctx, be.disk, silent);
    const ring = new DriverRing(ram, 16);
    q.start({ ...ring.setup(memory, kick), pollUs: 1000 }, true);
    q.drain();
    return { hctx, q, ring };
  }

  beforeEach(() => {
    held.length = 0;
    ram = new GuestRam();
    memory = ram.memoryMap();
    kick = native.eventfd();
  });
  afterEach(async () => {
    for (const rq of held.splice(0)) rq.end(BlkStatus.Ok);
    if (q?.isRunning) await q.stop();
    q = null;
    native.close(kick);
    await be.close();
    memory.release();
    ram.close();
  });

  test('HwQueue.spinEndNs: SPIN_NONE only for an asynchronous driver with requests in flight', () => {
    be = startBackend({ num_queues: 1 }, holding(true));
    const { hctx, ring } = startQueue();
    expect(hctx.completesAsync).toBe(true);
    expect(hctx.spinEndNs()).toBe(hctx.pollEndNs);
    offerRead(ram, ring, 0);
    q!.drain();
    expect(held.length).toBe(1);
    expect(hctx.inFlight).toBe(1);
    expect(hctx.spinEndNs()).toBe(SPIN_NONE);
    held.shift()!.end(BlkStatus.Ok);
    expect(hctx.spinEndNs()).toBe(hctx.pollEndNs);
  });

  test('the pop after dispatching to an asynchronous driver does not spin; after the completion it does', () => {
    be = startBackend({ num_queues: 1 }, holding(true));
    const { ring } = startQueue();
    const s0 = q!.state();
    // The request goes to the driver and stays in flight: the batch's pop ends without a spin.
    offerRead(ram, ring, 0);
    q!.drain();
    const s1 = q!.state();
    expect(held.length).toBe(1);
    expect(s1.spins - s0.spins).toBe(0);
    // The completion (an interrupt in the NVMe driver) ends the request and drains the ring:
    // nothing is in flight any more, so that pop spins for the guest's next request.
    const rq = held.shift()!;
    rq.hctx.beginCompletionBatch();
    rq.end(BlkStatus.Ok);
    rq.hctx.endCompletionBatch();
    expect(ring.usedIdx()).toBe(1);
    expect(q!.state().spins - s1.spins).toBe(1);
  });

  test('a driver that holds requests without declaring completesAsync still spins (the old behaviour)', () => {
    be = startBackend({ num_queues: 1 }, holding(false));
    const { ring } = startQueue();
    const s0 = q!.state();
    offerRead(ram, ring, 0);
    q!.drain();
    expect(held.length).toBe(1);
    expect(q!.state().spins - s0.spins).toBe(1);
  });
});
