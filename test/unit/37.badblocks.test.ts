/** Bad blocks (null_blk badblocks, badblocks_once) and the management API that changes them at run time. */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import pino from 'pino';
import { managementCall } from '../../daemon/management/client';
import type { ManagedDisk } from '../../daemon/management/managed-disk';
import { BadBlocksAction, readDelimited } from '../../daemon/management/schema';
import { ManagementServer } from '../../daemon/management/server';
import { TagSet } from '../../block/tag-set';
import { BadBlocks, parseRange } from '../../drivers/null/badblocks';
import { startBackend, TestBackend } from '../helpers/backend';
import { TestFrontend } from '../helpers/frontend';

describe('BadBlocks', () => {
  test('ranges merge when they overlap or touch, and split on removal', () => {
    const b = new BadBlocks();
    b.add(100, 199);
    b.add(200, 299);
    b.add(50, 60);
    b.add(55, 120);
    expect(b.list()).toEqual([[50, 299]]);
    b.remove(100, 149);
    expect(b.list()).toEqual([[50, 99], [150, 299]]);
    b.remove(0, 1000);
    expect(b.count).toBe(0);
  });

  test('hit() checks every sector of a request; once clears the range from the first bad sector hit, as null_blk', () => {
    const b = new BadBlocks(true);
    b.add(100, 199);
    b.add(300, 309);
    expect(b.hit(92, 8)).toBe(false); // 92..99
    expect(b.hit(150, 8)).toBe(true); // first bad sector 150: clears 150..199
    expect(b.list()).toEqual([[100, 149], [300, 309]]);
    expect(b.hit(150, 50)).toBe(false);
    expect(b.hit(96, 8)).toBe(true); // first bad sector 100: clears 100..149
    expect(b.list()).toEqual([[300, 309]]);
    const plain = new BadBlocks(false);
    plain.add(10, 20);
    expect([plain.hit(15, 1), plain.hit(15, 1)]).toEqual([true, true]); // without once nothing clears
  });

  test('parseRange accepts "start-end" and "sector", refuses the rest', () => {
    expect(parseRange('10-20')).toEqual([10, 20]);
    expect(parseRange(' 7 ')).toEqual([7, 7]);
    expect(() => parseRange('20-10')).toThrow(/start <= end/);
    expect(() => parseRange('a-b')).toThrow(/expected "start-end"/);
  });
});

describe('through a back-end', () => {
  let be: TestBackend;
  let fe: TestFrontend;
  afterEach(async () => {
    fe?.close();
    await be?.close();
  });

  test('I/O fails with IOERR exactly in the configured range, in every completion mode', async () => {
    for (const irqmode of [0, 1, 2]) {
      be = startBackend({ badblocks: ['16-23'], irqmode, ...(irqmode === 2 ? { completion_nsec: 10000 } : {}) });
      fe = new TestFrontend(be.socket);
      await fe.setup();
      expect((await fe.blk(0, 0, 8, { readLen: 4096 })).status).toBe(0); // 8..15
      expect((await fe.blk(0, 0, 12, { readLen: 4096 })).status).toBe(1); // 12..19
      expect((await fe.blk(0, 1, 23, { data: Buffer.alloc(512) })).status).toBe(1);
      expect((await fe.blk(0, 1, 24, { data: Buffer.alloc(512) })).status).toBe(0);
      expect((await fe.blk(0, 4, 0)).status).toBe(0); // flush has no sectors
      fe.close();
      await be.close();
    }
    be = undefined as unknown as TestBackend;
    fe = undefined as unknown as TestFrontend;
  });

  test('the management API adds, lists and removes bad blocks at run time; stats count the failures', async () => {
    be = startBackend();
    fe = new TestFrontend(be.socket);
    await fe.setup();
    const sock = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-mgmt-')), 'ctl.sock');
    const mgmt = new ManagementServer(sock, [be], pino({ level: 'silent' }));
    await mgmt.listen();
    try {
      expect((await fe.blk(0, 0, 100, { readLen: 512 })).status).toBe(0);
      const added = await managementCall(sock, { bad_blocks: { disk: 'test', action: 1, start: 100, end: 107 } });
      expect(added).toMatchObject({ ok: true, bad_blocks: [{ start: 100, end: 107 }] });
      expect((await fe.blk(0, 0, 100, { readLen: 512 })).status).toBe(1);
      expect((await managementCall(sock, { get_stats: { disk: 'test' } })).queues[0]).toMatchObject({ index: 0, running: true, failed_requests: 1, in_flight: 0, broken: false });
      await managementCall(sock, { bad_blocks: { disk: 'test', action: 2, start: 100, end: 107 } });
      expect((await fe.blk(0, 0, 100, { readLen: 512 })).status).toBe(0);
      const disks = await managementCall(sock, { list_disks: {} });
      expect(disks.disks).toEqual([{ name: 'test', socket: be.socket, capacity_sectors: 16 * 2048, logical_block_size: 512, connected: true, num_queues: 2, rotational: false, hw_queue_depth: 1024, shared_tags: false }]);
      expect(await managementCall(sock, { bad_blocks: { disk: 'nope', action: 0 } })).toMatchObject({ ok: false, error: expect.stringContaining('no disk named "nope"') });
      expect(await managementCall(sock, { bad_blocks: { disk: 'test', action: 1, start: 9, end: 3 } })).toMatchObject({ ok: false, error: expect.stringContaining('start <= end') });
    } finally {
      await mgmt.close();
    }
  });
});

describe('management framing', () => {
  test('a length prefix above 1 MiB is refused as soon as it is read, before the message arrives', () => {
    const prefix = Buffer.from([0x80, 0x80, 0x80, 0x01]); // varint 2 MiB, no payload yet
    expect(() => readDelimited(prefix)).toThrow(/2097152 bytes exceeds 1 MiB/);
    expect(readDelimited(Buffer.from([0x80, 0x80, 0x20])).messages).toEqual([]); // 512 KiB: waits for more
  });
});

describe('a disk without a bad-block list (driver nvme)', () => {
  test('bad-block requests are refused with the reason; its stats still answer', async () => {
    const nvmeLike: ManagedDisk = {
      config: { name: 'nvme0', socket: '/tmp/none.sock', num_queues: 1, rotational: false, shared_tags: false },
      disk: { capacitySectors: 2048, logicalBlockSize: 4096, tagSet: new TagSet({ nrHwQueues: 1, queueDepth: 4 }) },
      server: { isConnected: false },
      driver: { badblocks: null, cache: null },
      workers: null,
      device: { vrings: [] },
    };
    const mgmt = new ManagementServer(path.join(os.tmpdir(), 'unused.sock'), [nvmeLike], pino({ level: 'silent' }));
    for (const action of [BadBlocksAction.LIST, BadBlocksAction.ADD]) {
      expect(await mgmt.handle({ bad_blocks: { disk: 'nvme0', action, start: 0, end: 7 } })).toEqual({ ok: false, error: 'disk "nvme0" has no bad-block list (only null disks have one)' });
    }
    expect(await mgmt.handle({ get_stats: { disk: 'nvme0' } })).toMatchObject({ ok: true, queues: [] });
  });
});
