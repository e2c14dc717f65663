/** drivers/null: the sparse page store and the zero (not memory-backed) disk. */
import { openPageStore, PAGE_SIZE } from '../../drivers/null/page-store';
import { native } from '../../native';
import { startBackend, TestBackend } from '../helpers/backend';
import { TestFrontend } from '../helpers/frontend';
import { randomOpsAgainstReference, seededRandom } from '../helpers/store-model';

const newStore = openPageStore;

describe('PageStore', () => {
  test('unwritten bytes read as zeroes and allocate nothing', () => {
    const s = newStore();
    const out = Buffer.alloc(10000, 0xaa);
    s.read(123456, out, 0, out.length);
    expect(out.every((b) => b === 0)).toBe(true);
    expect(s.pageCount).toBe(0);
  });

  test('a write spanning three pages reads back exactly; neighbours stay zero', () => {
    const s = newStore();
    const data = Buffer.alloc(PAGE_SIZE + 1000);
    for (let i = 0; i < data.length; i++) data[i] = (i * 31 + 7) & 0xff;
    const pos = 3 * PAGE_SIZE - 500;
    s.write(pos, data, 0, data.length);
    expect(s.pageCount).toBe(3);
    const out = Buffer.alloc(data.length + 200);
    s.read(pos - 100, out, 0, out.length);
    expect(out.subarray(0, 100).every((b) => b === 0)).toBe(true);
    expect(out.subarray(100, 100 + data.length).equals(data)).toBe(true);
    expect(out.subarray(100 + data.length).every((b) => b === 0)).toBe(true);
  });

  test('pages far apart (beyond 4 GiB) are independent', () => {
    const s = newStore();
    const a = Buffer.alloc(512, 1);
    const b = Buffer.alloc(512, 2);
    s.write(0, a, 0, 512);
    s.write(5 * 2 ** 32, b, 0, 512);
    const out = Buffer.alloc(512);
    s.read(0, out, 0, 512);
    expect(out.equals(a)).toBe(true);
    s.read(5 * 2 ** 32, out, 0, 512);
    expect(out.equals(b)).toBe(true);
  });
});

describe('native.copyBytes', () => {
  test('copies between arrays and refuses ranges outside either one', () => {
    const a = Buffer.from('abcdefgh');
    const b = Buffer.alloc(8, 0x2e);
    native.copyBytes(b, 2, a, 3, 4);
    expect(b.toString()).toBe('..defg..');
    expect(() => native.copyBytes(b, 6, a, 0, 4)).toThrow(/outside the array/);
    expect(() => native.copyBytes(b, 0, a, 7, 2)).toThrow(/outside the array/);
    expect(() => native.copyBytes(b, -1, a, 0, 1)).toThrow(/outside the array/);
  });
});

describe('NullDriver through a back-end', () => {
  let be: TestBackend;
  let fe: TestFrontend;
  afterEach(async () => {
    fe.close();
    await be.close();
  });

  test('not memory-backed: reads return zeroes after a write, and nothing is stored', async () => {
    be = startBackend({ memory_backed: false });
    fe = new TestFrontend(be.socket);
    await fe.setup();
    expect(await fe.blk(0, 1, 0, { data: Buffer.alloc(4096, 0x77) })).toMatchObject({ status: 0 });
    const r = await fe.blk(0, 0, 0, { readLen: 4096 });
    expect(r.status).toBe(0);
    expect(r.data!.every((b) => b === 0)).toBe(true);
    expect(be.driver.store).toBeNull();
  });

  test('memory-backed: data survives the front-end reconnecting', async () => {
    be = startBackend();
    fe = new TestFrontend(be.socket);
    await fe.setup();
    const data = Buffer.alloc(8192);
    for (let i = 0; i < data.length; i++) data[i] = i & 0xff;
    expect(await fe.blk(0, 1, 100, { data })).toMatchObject({ status: 0 });
    fe.close();
    fe = new TestFrontend(be.socket);
    await fe.setup();
    const r = await fe.blk(0, 0, 100, { readLen: 8192 });
    expect(r.data!.equals(data)).toBe(true);
    expect(be.server.connections).toBe(2);
  });
});

describe('PageStore against a flat reference (seeded random writes, reads, discards)', () => {
  test('every read matches the reference, across page edges and reused pages', () => {
    const DISK = 3 << 20; // 768 pages
    const ref = Buffer.alloc(DISK);
    const store = newStore();
    randomOpsAgainstReference(store, ref, 4000, seededRandom(12345));
    const all = Buffer.alloc(DISK);
    store.read(0, all, 0, DISK);
    expect(all.equals(ref)).toBe(true);
    expect(store.pageCount).toBeLessThanOrEqual(DISK / PAGE_SIZE);
  });

  test('2 MiB written sequentially reads back from any offset; memory is exactly the pages written', () => {
    const store = newStore();
    const data = Buffer.alloc(2 << 20);
    for (let i = 0; i < data.length; i++) data[i] = (i * 13) & 0xff;
    store.write(0, data, 0, data.length);
    const out = Buffer.alloc(131072);
    store.read((1 << 20) - 65536 + 100, out, 0, 131072);
    expect(out.equals(data.subarray((1 << 20) - 65536 + 100, (1 << 20) + 65536 + 100))).toBe(true);
    expect(store.bytesAllocated).toBe(2 << 20);
  });
});
