/** The write-back cache (null_blk cache_size) and VIRTIO_BLK_F_CONFIG_WCE. */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import pino from 'pino';
import { managementCall } from '../../daemon/management/client';
import { ManagementServer } from '../../daemon/management/server';
import { openPageStore } from '../../drivers/null/page-store';
import { WriteCache } from '../../drivers/null/write-cache';
import { Req } from '../../vhost/protocol';
import { startBackend, TestBackend } from '../helpers/backend';
import { TestFrontend } from '../helpers/frontend';

const page = (v: number, n = 4096): Buffer => Buffer.alloc(n, v);

describe('WriteCache', () => {
  test('writes stay volatile until flush(); drop() loses exactly the unflushed ones', () => {
    const store = openPageStore();
    const c = new WriteCache(store, 1 << 20);
    c.write(0, page(1), 0, 4096);
    c.flush();
    c.write(0, page(2), 0, 512); // partial rewrite of a clean page
    c.write(8192, page(3), 0, 4096);
    expect(c.dirtyBytes).toBe(8192);
    const out = Buffer.alloc(4096);
    c.read(0, out, 0, 4096);
    expect(out.subarray(0, 512).every((b) => b === 2) && out.subarray(512).every((b) => b === 1)).toBe(true);
    c.drop();
    c.read(0, out, 0, 4096);
    expect(out.every((b) => b === 1)).toBe(true); // the flushed version
    c.read(8192, out, 0, 4096);
    expect(out.every((b) => b === 0)).toBe(true); // never flushed: gone
  });

  test('a full cache writes its oldest pages back: dirty data never exceeds the capacity', () => {
    const store = openPageStore();
    const c = new WriteCache(store, 4 * 4096);
    for (let i = 0; i < 10; i++) c.write(i * 4096, page(i + 1), 0, 4096);
    expect(c.dirtyBytes).toBe(4 * 4096);
    c.drop();
    const out = Buffer.alloc(4096);
    store.read(0, out, 0, 4096);
    expect(out.every((b) => b === 1)).toBe(true); // written back when evicted
    store.read(9 * 4096, out, 0, 4096);
    expect(out.every((b) => b === 0)).toBe(true); // was still in the cache
  });

  test('writethrough: writes go to the store; switching flushes first', () => {
    const store = openPageStore();
    const c = new WriteCache(store, 1 << 20);
    c.write(0, page(5), 0, 4096);
    c.setWriteback(false);
    expect(c.dirtyBytes).toBe(0);
    c.write(4096, page(6), 0, 4096);
    expect(c.dirtyBytes).toBe(0);
    c.drop();
    const out = Buffer.alloc(8192);
    store.read(0, out, 0, 8192);
    expect(out.subarray(0, 4096).every((b) => b === 5) && out.subarray(4096).every((b) => b === 6)).toBe(true);
  });
});

describe('through a back-end', () => {
  let be: TestBackend;
  let fe: TestFrontend;
  let mgmt: ManagementServer;
  let sock: string;
  beforeEach(async () => {
    be = startBackend({ cache_size: 1 });
    sock = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-wc-')), 'ctl.sock');
    mgmt = new ManagementServer(sock, [be], pino({ level: 'silent' }));
    await mgmt.listen();
    fe = new TestFrontend(be.socket);
    await fe.setup();
  });
  afterEach(async () => {
    fe.close();
    await mgmt.close();
    await be.close();
  });

  test('offers CONFIG_WCE with writeback 1; a guest FLUSH makes data survive a cache loss', async () => {
    expect((await fe.getU64(Req.GET_FEATURES)) & (1n << 11n)).toBe(1n << 11n);
    expect((await fe.getConfig(32, 1))[12]).toBe(1);
    await fe.blk(0, 1, 0, { data: page(0x41) });
    expect((await fe.blk(0, 4, 0)).status).toBe(0); // FLUSH
    await fe.blk(0, 1, 8, { data: page(0x42) });
    expect((await managementCall(sock, { get_stats: { disk: 'test' } })).cache_dirty_bytes).toBe(4096);
    expect(await managementCall(sock, { drop_cache: { disk: 'test' } })).toMatchObject({ ok: true });
    expect((await fe.blk(0, 0, 0, { readLen: 4096 })).data!.every((b) => b === 0x41)).toBe(true);
    expect((await fe.blk(0, 0, 8, { readLen: 4096 })).data!.every((b) => b === 0)).toBe(true);
  });

  test('the guest switches to writethrough through SET_CONFIG: nothing is volatile any more', async () => {
    const cfg = Buffer.alloc(13);
    cfg.writeUInt32LE(32, 0);
    cfg.writeUInt32LE(1, 4);
    cfg[12] = 0;
    fe.send(Req.SET_PROTOCOL_FEATURES, Buffer.from([0x08 | 0x01, 0x02, 0, 0, 0, 0, 0, 0])); // MQ, REPLY_ACK, CONFIG
    expect((await fe.call(Req.SET_CONFIG, cfg, [], true)).payload.readBigUInt64LE(0)).toBe(0n);
    expect((await fe.getConfig(32, 1))[12]).toBe(0);
    await fe.blk(0, 1, 16, { data: page(0x43) });
    await managementCall(sock, { drop_cache: { disk: 'test' } });
    expect((await fe.blk(0, 0, 16, { readLen: 4096 })).data!.every((b) => b === 0x43)).toBe(true);
    cfg[12] = 7; // not 0 or 1
    expect((await fe.call(Req.SET_CONFIG, cfg, [], true)).payload.readBigUInt64LE(0)).toBe(1n);
  });

  test('drop-cache on a disk without a cache is an error', async () => {
    fe.close();
    await be.close();
    be = startBackend();
    fe = new TestFrontend(be.socket);
    const m2 = new ManagementServer(sock + '2', [be], pino({ level: 'silent' }));
    await m2.listen();
    expect(await managementCall(sock + '2', { drop_cache: { disk: 'test' } })).toMatchObject({ ok: false, error: expect.stringContaining('no write cache') });
    await m2.close();
  });
});
