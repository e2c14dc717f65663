/** hw_queue_depth and shared_tags: tags bound the requests in flight; chains beyond them wait in the ring. */
import pino from 'pino';
import type { DiskConfig } from '../../config/disk-schema';
import { loadConfig } from '../../config/load';
import { Service } from '../../daemon/service';
import { native } from '../../native';
import { startBackend, TestBackend, until } from '../helpers/backend';
import { state, TestFrontend } from '../helpers/frontend';
import { Req } from '../../vhost/protocol';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

describe('hw_queue_depth', () => {
  let be: TestBackend;
  let fe: TestFrontend;
  afterEach(async () => {
    fe.close();
    await be.close();
  });

  test('at most hw_queue_depth requests are in flight; the rest follow as tags free, without a kick', async () => {
    be = startBackend({ hw_queue_depth: 2, irqmode: 2, completion_nsec: 200_000_000 });
    fe = new TestFrontend(be.socket);
    await fe.setup();
    fe.offerReads(7);
    await until(() => be.disk.hwQueues[0].inFlight === 2, 'two in flight');
    await new Promise((r) => setTimeout(r, 20));
    expect(be.disk.hwQueues[0].inFlight).toBe(2); // 200 ms timers: the other five wait in the ring
    expect(fe.rings[0].usedIdx()).toBe(0);
    await fe.waitUsedIdx(0, 7, 5000); // 4 rounds of 200 ms, no further kick
    expect(be.disk.hwQueues[0].inFlight).toBe(0);
  });

  test('GET_VRING_BASE with chains waiting for tags: the ring stops after the in-flight ones, taking no more', async () => {
    be = startBackend({ hw_queue_depth: 2, irqmode: 2, completion_nsec: 50_000_000 });
    fe = new TestFrontend(be.socket);
    await fe.setup();
    fe.offerReads(7);
    await until(() => be.disk.hwQueues[0].inFlight === 2, 'two in flight');
    const r = await fe.call(Req.GET_VRING_BASE, state(0, 0));
    expect(r.payload.readUInt32LE(4)).toBe(2); // the five waiting chains stay with the guest
    expect(fe.rings[0].usedIdx()).toBe(2);
    expect(be.disk.hwQueues[0].inFlight).toBe(0);
  });
});

describe('Service: shared_tags, nr_devices, submit_queues', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-tags-'));
  const base = (over: Partial<DiskConfig>): Record<string, unknown> => ({ size: 4, irqmode: 2, completion_nsec: 100_000_000, hw_queue_depth: 2, ...over });

  test('two disks sharing tags hold at most hw_queue_depth requests together', async () => {
    const cfgFile = path.join(dir, 'shared.json');
    fs.writeFileSync(cfgFile, JSON.stringify({ disks: [base({ socket: path.join(dir, 'a.sock'), shared_tags: true }), base({ socket: path.join(dir, 'b.sock'), shared_tags: true })] }));
    const svc = new Service(loadConfig(cfgFile, {}).disks, pino({ level: 'silent' }));
    await svc.start();
    const [a, b] = [new TestFrontend(path.join(dir, 'a.sock')), new TestFrontend(path.join(dir, 'b.sock'))];
    try {
      await a.setup();
      await b.setup();
      expect(svc.disks[0].disk.tagSet).toBe(svc.disks[1].disk.tagSet);
      const t0 = native.monotonicNs();
      a.offerReads(2);
      await until(() => svc.disks[0].disk.hwQueues[0].inFlight === 2, 'a holds both tags');
      b.offerReads(1);
      await b.waitUsedIdx(0, 1, 3000);
      // b's request had to wait for a's (100 ms timers, never early) to free a tag, then took
      // 100 ms itself: at least 200 ms after a's were offered, however late this thread looks.
      expect((native.monotonicNs() - t0) / 1e6).toBeGreaterThan(195);
    } finally {
      a.close();
      b.close();
      await svc.stop();
    }
  });

  test('without shared_tags the same two disks do not wait for each other', async () => {
    const cfgFile = path.join(dir, 'own.json');
    // c's requests take 1 s: a wide window in which d's must already be in flight.
    fs.writeFileSync(cfgFile, JSON.stringify({ disks: [base({ socket: path.join(dir, 'c.sock'), completion_nsec: 1_000_000_000 }), base({ socket: path.join(dir, 'd.sock') })] }));
    const svc = new Service(loadConfig(cfgFile, {}).disks, pino({ level: 'silent' }));
    await svc.start();
    const [a, b] = [new TestFrontend(path.join(dir, 'c.sock')), new TestFrontend(path.join(dir, 'd.sock'))];
    try {
      await a.setup();
      await b.setup();
      a.offerReads(2);
      await until(() => svc.disks[0].disk.hwQueues[0].inFlight === 2, 'a busy');
      b.offerReads(1);
      // b's request is in flight while a still holds both of its tags (a's end 1 s later).
      await until(() => svc.disks[1].disk.hwQueues[0].inFlight === 1, 'b in flight');
      expect(svc.disks[0].disk.hwQueues[0].inFlight).toBe(2);
      await b.waitUsedIdx(0, 1, 3000);
    } finally {
      a.close();
      b.close();
      await svc.stop();
    }
  });

  test('nr_devices expands one entry into several disks with their own sockets, names and serials', () => {
    const cfgFile = path.join(dir, 'nr.json');
    fs.writeFileSync(cfgFile, JSON.stringify({ disks: [{ socket: '/run/vm1/data.sock', nr_devices: 3, serial: 'data' }] }));
    const c = loadConfig(cfgFile, {});
    expect(c.disks.map((d) => [d.name, d.socket, d.serial])).toEqual([
      ['data0', '/run/vm1/data-0.sock', 'data-0'],
      ['data1', '/run/vm1/data-1.sock', 'data-1'],
      ['data2', '/run/vm1/data-2.sock', 'data-2'],
    ]);
  });

  test('submit_queues is num_queues; a disagreement is refused; shared tags need one depth', () => {
    expect(loadConfig(undefined, { submit_queues: 4 }).disks[0].num_queues).toBe(4);
    expect(() => loadConfig(undefined, { submit_queues: 4, num_queues: 2 })).toThrow(/submit_queues 4 and num_queues 2 disagree/);
    const cfgFile = path.join(dir, 'bad.json');
    fs.writeFileSync(cfgFile, JSON.stringify({ disks: [{ socket: '/tmp/x1.sock', shared_tags: true, hw_queue_depth: 8 }, { socket: '/tmp/x2.sock', shared_tags: true, hw_queue_depth: 16 }] }));
    expect(() => loadConfig(cfgFile, {})).toThrow(/disks sharing tags must have the same hw_queue_depth/);
  });
});
