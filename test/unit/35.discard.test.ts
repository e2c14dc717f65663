/** DISCARD and WRITE_ZEROES (VIRTIO 1.2 5.2.6): statuses, limits, and data reading back as zeroes. */
import { startBackend, TestBackend } from '../helpers/backend';
import { blkHeader } from '../helpers/driver-ring';
import { TestFrontend } from '../helpers/frontend';

const T_DISCARD = 11;
const T_WRITE_ZEROES = 13;
let be: TestBackend;
let fe: TestFrontend;
afterEach(async () => {
  fe?.close();
  await be?.close();
});

async function open(overrides: Record<string, unknown> = {}): Promise<void> {
  be = startBackend({ discard: true, ...overrides });
  fe = new TestFrontend(be.socket);
  await fe.setup();
}

/** One DISCARD/WRITE_ZEROES request with the given segments ([sector, num, flags]). */
async function dwz(type: number, segs: Array<[number, number, number]>): Promise<number> {
  const data = Buffer.alloc(16 * segs.length);
  segs.forEach(([sector, num, flags], i) => {
    data.writeBigUInt64LE(BigInt(sector), 16 * i);
    data.writeUInt32LE(num, 16 * i + 8);
    data.writeUInt32LE(flags >>> 0, 16 * i + 12);
  });
  return (await fe.blk(0, type, 0, { data })).status;
}

const pattern = (n: number, v: number): Buffer => Buffer.alloc(n, v);

test('offers DISCARD and WRITE_ZEROES with their limits in the config space', async () => {
  await open({ blocksize: 4096 });
  const f = await fe.getU64(1);
  expect(f & (1n << 13n)).toBe(1n << 13n);
  expect(f & (1n << 14n)).toBe(1n << 14n);
  const c = (await fe.getConfig(0, 60)).subarray(12);
  expect([c.readUInt32LE(36), c.readUInt32LE(40), c.readUInt32LE(44)]).toEqual([262144, 1, 8]);
  expect([c.readUInt32LE(48), c.readUInt32LE(52), c.readUInt8(56)]).toEqual([262144, 1, 1]);
});

test('discarded blocks read as zeroes; neighbours keep their data; pages are freed', async () => {
  await open();
  expect((await fe.blk(0, 1, 0, { data: pattern(16384, 0xab) })).status).toBe(0);
  const pages = be.driver.store!.pageCount;
  expect(await dwz(T_DISCARD, [[8, 16, 0]])).toBe(0); // sectors 8..23: bytes 4096..12287
  const r = await fe.blk(0, 0, 0, { readLen: 16384 });
  expect(r.data!.subarray(0, 4096).every((b) => b === 0xab)).toBe(true);
  expect(r.data!.subarray(4096, 12288).every((b) => b === 0)).toBe(true);
  expect(r.data!.subarray(12288).every((b) => b === 0xab)).toBe(true);
  expect(be.driver.store!.pageCount).toBe(pages - 2);
});

test('a discard inside a page zeroes just that part', async () => {
  await open();
  await fe.blk(0, 1, 0, { data: pattern(4096, 0x11) });
  expect(await dwz(T_DISCARD, [[2, 1, 0]])).toBe(0);
  const r = await fe.blk(0, 0, 0, { readLen: 4096 });
  expect(r.data!.subarray(0, 1024).every((b) => b === 0x11)).toBe(true);
  expect(r.data!.subarray(1024, 1536).every((b) => b === 0)).toBe(true);
  expect(r.data!.subarray(1536).every((b) => b === 0x11)).toBe(true);
});

test('write zeroes, with and without unmap, reads back zeroes', async () => {
  await open();
  await fe.blk(0, 1, 0, { data: pattern(8192, 0x5a) });
  expect(await dwz(T_WRITE_ZEROES, [[0, 8, 0]])).toBe(0);
  expect(await dwz(T_WRITE_ZEROES, [[8, 8, 1]])).toBe(0);
  const r = await fe.blk(0, 0, 0, { readLen: 8192 });
  expect(r.data!.every((b) => b === 0)).toBe(true);
});

test('statuses: unmap on discard and unknown flags UNSUPP; bad ranges, lengths and segment counts IOERR', async () => {
  await open({ blocksize: 4096, size: 4 });
  expect(await dwz(T_DISCARD, [[0, 8, 1]])).toBe(2);
  expect(await dwz(T_WRITE_ZEROES, [[0, 8, 2]])).toBe(2);
  expect(await dwz(T_DISCARD, [[0, 8, 0x80000000]])).toBe(2);
  expect(await dwz(T_DISCARD, [[0, 8, 0], [16, 8, 0]])).toBe(1); // max_discard_seg is 1
  expect(await dwz(T_DISCARD, [[4, 8, 0]])).toBe(1); // not 4 KiB-aligned
  expect(await dwz(T_DISCARD, [[0, 4, 0]])).toBe(1);
  expect(await dwz(T_DISCARD, [[8192, 8, 0]])).toBe(1); // beyond 4 MiB
  expect(await dwz(T_DISCARD, [[8184, 16, 0]])).toBe(1);
  expect(await dwz(T_DISCARD, [[0, 0x7fffffff, 0]])).toBe(1); // over max_discard_sectors
  expect(await dwz(T_WRITE_ZEROES, [[0xfffffffffff0, 8, 0]])).toBe(1);
  expect((await fe.blk(0, T_DISCARD, 0, { data: Buffer.alloc(10) })).status).toBe(1); // not whole segments
  expect(await dwz(T_DISCARD, [[8, 8, 0]])).toBe(0);
});

test('a read-only disk refuses them with IOERR; a disk without discard answers UNSUPP', async () => {
  await open({ read_only: true });
  expect(await dwz(T_DISCARD, [[0, 8, 0]])).toBe(1);
  fe.close();
  await be.close();
  await open({ discard: false });
  expect(await dwz(T_DISCARD, [[0, 8, 0]])).toBe(2);
  expect(await dwz(T_WRITE_ZEROES, [[0, 8, 0]])).toBe(2);
});

test('a discard segment split over two descriptors is accepted', async () => {
  await open();
  await fe.blk(0, 1, 0, { data: pattern(4096, 1) });
  const seg = Buffer.alloc(16);
  seg.writeBigUInt64LE(0n, 0);
  seg.writeUInt32LE(8, 8);
  const h = fe.ram.alloc(16);
  fe.ram.bytes(h, 16).set(blkHeader(T_DISCARD, 0));
  const a = fe.ram.alloc(16);
  const b = fe.ram.alloc(16);
  fe.ram.bytes(a, 6).set(seg.subarray(0, 6));
  fe.ram.bytes(b, 10).set(seg.subarray(6));
  const st = fe.ram.alloc(1);
  fe.rings[0].takeUsed();
  const target = fe.rings[0].usedIdx() + 1;
  fe.rings[0].addChain([{ addr: h, len: 16 }, { addr: a, len: 6 }, { addr: b, len: 10 }, { addr: st, len: 1, write: true }]);
  fe.kick(0);
  await fe.waitUsedIdx(0, target);
  expect(fe.ram.bytes(st, 1)[0]).toBe(0);
  expect((await fe.blk(0, 0, 0, { readLen: 4096 })).data!.every((x) => x === 0)).toBe(true);
});
