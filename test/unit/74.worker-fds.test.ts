/**
 * issue 9, "no fd leak when a dup or a lost worker fails midway": the duplicated fds a worker
 * thread is handed (guest memory, kick and call eventfds) are closed on every failure path.
 * Counted in /proc/self/fd.
 */
import * as fs from 'fs';
import { native } from '../../native';
import type { QueueWorkers } from '../../daemon/queue-workers';
import { GuestMemoryMap } from '../../virtqueue/guest-memory';
import { startBackend, TestBackend, until } from '../helpers/backend';
import { DriverRing } from '../helpers/driver-ring';
import { GuestRam } from '../helpers/guest-ram';

function openFds(): number {
  return fs.readdirSync('/proc/self/fd').length;
}

/** The open fd count, once it has stayed the same for a few event-loop turns. */
async function settledFds(): Promise<number> {
  let last = -1;
  for (let i = 0; i < 50; i++) {
    await new Promise((r) => setTimeout(r, 20));
    const n = openFds();
    if (n === last) return n;
    last = n;
  }
  return last;
}

describe('worker thread fds', () => {
  let be: TestBackend;
  let ram: GuestRam;
  let workers: QueueWorkers;
  beforeEach(async () => {
    be = startBackend({ threads: 2, num_queues: 2 });
    workers = be.workers!;
    ram = new GuestRam();
    await workers.remoteQueue(1)!.snapshot(); // the worker is up
  });
  afterEach(async () => {
    await be.close();
    ram.close();
  });

  test('a dup failing midway through SET_MEM_TABLE leaves no duplicate open', async () => {
    const before = await settledFds();
    // The second region's fd is not open: its dup fails after the first one's succeeded.
    await expect(workers.mapMemory(ram.regions, [ram.fd, 987654])).rejects.toThrow();
    expect(await settledFds()).toBe(before);
    // A good table afterwards maps, and its duplicates are closed once mapped.
    await workers.mapMemory(ram.regions, [ram.fd, ram.fd]);
    expect(await settledFds()).toBe(before);
  });

  test('the kick and call duplicates of a started ring are closed when its worker is lost', async () => {
    await workers.mapMemory(ram.regions, [ram.fd, ram.fd]);
    const kick = native.eventfd();
    const call = native.eventfd();
    try {
      const before = await settledFds();
      const rq = workers.remoteQueue(1)!;
      await rq.start(new DriverRing(ram, 16).setup(new GuestMemoryMap([], []), kick, call), true);
      expect(await settledFds()).toBe(before + 2); // the worker's duplicates
      // The worker thread dies (as a native crash or an uncaught error would end it).
      const channel = (workers as unknown as { channels: Array<{ worker: { terminate(): Promise<number> }; incarnation: number }> }).channels[0];
      await channel.worker.terminate();
      await until(() => channel.incarnation === 1, 'the worker to be replaced');
      await workers.remoteQueue(1)!.snapshot(); // the replacement is up
      await expect(rq.stop()).rejects.toThrow(/was lost/);
      expect(await settledFds()).toBe(before);
    } finally {
      native.close(kick);
      native.close(call);
    }
  });

  test('a ring stopped normally gives its duplicates back; so does SET_VRING_CALL for the old call fd', async () => {
    await workers.mapMemory(ram.regions, [ram.fd, ram.fd]);
    const fds = [native.eventfd(), native.eventfd(), native.eventfd()];
    try {
      const before = await settledFds();
      const rq = workers.remoteQueue(1)!;
      await rq.start(new DriverRing(ram, 16).setup(new GuestMemoryMap([], []), fds[0], fds[1]), true);
      await rq.setCallFd(fds[2]);
      expect(await settledFds()).toBe(before + 2);
      await rq.stop();
      expect(await settledFds()).toBe(before);
    } finally {
      for (const fd of fds) native.close(fd);
    }
  });
});
