/**
 * virtio-blk request parsing through the real path: chains built by hand in guest RAM, sent by
 * a test front-end to an in-process back-end; the status byte and used length are asserted.
 */
import { startBackend, TestBackend } from '../helpers/backend';
import { TestFrontend } from '../helpers/frontend';
import { Buf, blkHeader } from '../helpers/driver-ring';

const T_IN = 0;
const T_OUT = 1;
const T_FLUSH = 4;
const T_GET_ID = 8;
const OK = 0;
const IOERR = 1;
const UNSUPP = 2;

let be: TestBackend;
let fe: TestFrontend;

async function start(overrides = {}): Promise<void> {
  be = startBackend(overrides);
  fe = new TestFrontend(be.socket);
  await fe.setup();
}

afterEach(async () => {
  fe.close();
  await be.close();
});

/** Sends a hand-built chain on queue 0; returns { status, len } (status byte at `st`). */
async function raw(bufs: Buf[], st: number): Promise<{ status: number; len: number }> {
  const ring = fe.rings[0];
  fe.ram.bytes(st, 1)[0] = 0xff;
  const target = (ring.usedIdx() + 1) & 0xffff;
  ring.takeUsed();
  ring.addChain(bufs);
  fe.kick(0);
  await fe.waitUsedIdx(0, target);
  return { status: fe.ram.bytes(st, 1)[0], len: ring.takeUsed()[0].len };
}

function header(type: number, sector: number): number {
  const a = fe.ram.alloc(16);
  fe.ram.bytes(a, 16).set(blkHeader(type, sector));
  return a;
}

describe('read and write', () => {
  test('read: used length is data + status byte', async () => {
    await start();
    expect(await fe.blk(0, T_IN, 0, { readLen: 1024 })).toMatchObject({ status: OK, len: 1025 });
  });

  test('write then read across a page boundary returns the data', async () => {
    await start();
    const data = Buffer.alloc(3 * 512);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 0xff;
    expect(await fe.blk(0, T_OUT, 7, { data })).toMatchObject({ status: OK, len: 1 });
    const r = await fe.blk(0, T_IN, 7, { readLen: 3 * 512 });
    expect(r.data!.equals(data)).toBe(true);
  });

  test('header, data and status in one indirect table; header split over two descriptors', async () => {
    await start();
    const hdr = blkHeader(T_OUT, 16);
    const h1 = fe.ram.alloc(16);
    const h2 = fe.ram.alloc(16);
    fe.ram.bytes(h1, 5).set(hdr.subarray(0, 5));
    fe.ram.bytes(h2, 11).set(hdr.subarray(5));
    const d = fe.ram.alloc(512);
    fe.ram.bytes(d, 512).fill(0x42);
    const st = fe.ram.alloc(1);
    const ring = fe.rings[0];
    const target = ring.usedIdx() + 1;
    ring.takeUsed();
    ring.addIndirectChain([{ addr: h1, len: 5 }, { addr: h2, len: 11 }, { addr: d, len: 512 }, { addr: st, len: 1, write: true }]);
    fe.kick(0);
    await fe.waitUsedIdx(0, target);
    expect(fe.ram.bytes(st, 1)[0]).toBe(OK);
    const r = await fe.blk(0, T_IN, 16, { readLen: 512 });
    expect(r.data!.every((b) => b === 0x42)).toBe(true);
  });

  test('data and status sharing the last writable descriptor', async () => {
    await start();
    const buf = fe.ram.alloc(513);
    const r = await raw([{ addr: header(T_IN, 0), len: 16 }, { addr: buf, len: 513, write: true }], buf + 512);
    expect(r).toEqual({ status: OK, len: 513 });
  });
});

describe('requests that fail', () => {
  test('read past the end of the disk: IOERR', async () => {
    await start({ size: 1 });
    expect(await fe.blk(0, T_IN, 2048, { readLen: 512 })).toMatchObject({ status: IOERR, len: 1 });
    expect(await fe.blk(0, T_IN, 2047, { readLen: 1024 })).toMatchObject({ status: IOERR, len: 1 });
    expect(await fe.blk(0, T_IN, 2047, { readLen: 512 })).toMatchObject({ status: OK });
  });

  test('a sector near 2^64 does not wrap around the capacity check: IOERR', async () => {
    await start();
    const ring = fe.rings[0];
    const h = fe.ram.alloc(16);
    const b = fe.ram.bytes(h, 16);
    b.writeUInt32LE(T_IN, 0);
    b.writeBigUInt64LE(0xffffffffffffffffn, 8);
    const d = fe.ram.alloc(512);
    const st = fe.ram.alloc(1);
    expect(await raw([{ addr: h, len: 16 }, { addr: d, len: 512, write: true }, { addr: st, len: 1, write: true }], st)).toEqual({ status: IOERR, len: 1 });
    expect(ring.usedIdx()).toBe(1);
  });

  test('length not a multiple of the block size, or sector not aligned to it (4096-byte blocks): IOERR', async () => {
    await start({ blocksize: 4096 });
    expect(await fe.blk(0, T_IN, 0, { readLen: 512 })).toMatchObject({ status: IOERR });
    expect(await fe.blk(0, T_IN, 1, { readLen: 4096 })).toMatchObject({ status: IOERR });
    expect(await fe.blk(0, T_IN, 8, { readLen: 4096 })).toMatchObject({ status: OK, len: 4097 });
  });

  test('write to a read-only disk: IOERR, data unchanged', async () => {
    await start({ read_only: true });
    expect(await fe.blk(0, T_OUT, 0, { data: Buffer.alloc(512, 1) })).toMatchObject({ status: IOERR, len: 1 });
    const r = await fe.blk(0, T_IN, 0, { readLen: 512 });
    expect(r.data!.every((x) => x === 0)).toBe(true);
  });

  test('unknown, discard and write-zeroes types (not offered): UNSUPP', async () => {
    await start();
    for (const t of [2, 11, 13, 14, 0x7fffffff]) {
      expect(await fe.blk(0, t, 0, { data: Buffer.alloc(16) })).toMatchObject({ status: UNSUPP, len: 1 });
    }
  });

  test('a read whose data buffer is device-readable: IOERR', async () => {
    await start();
    const st = fe.ram.alloc(1);
    expect(await raw([{ addr: header(T_IN, 0), len: 16 }, { addr: fe.ram.alloc(512), len: 512 }, { addr: st, len: 1, write: true }], st)).toEqual({ status: IOERR, len: 1 });
  });

  test('a write whose data buffer is device-writable: IOERR', async () => {
    await start();
    const st = fe.ram.alloc(1);
    expect(await raw([{ addr: header(T_OUT, 0), len: 16 }, { addr: fe.ram.alloc(512), len: 512, write: true }, { addr: st, len: 1, write: true }], st)).toEqual({ status: IOERR, len: 1 });
  });

  test('a header shorter than 16 bytes: IOERR', async () => {
    await start();
    const st = fe.ram.alloc(1);
    expect(await raw([{ addr: header(T_IN, 0), len: 8 }, { addr: st, len: 1, write: true }], st)).toEqual({ status: IOERR, len: 1 });
  });

  test('a data buffer outside guest memory: IOERR, nothing written elsewhere', async () => {
    await start();
    const st = fe.ram.alloc(1);
    expect(await raw([{ addr: header(T_IN, 0), len: 16 }, { addr: 0x7ffff000, len: 4096, write: true }, { addr: st, len: 1, write: true }], st)).toEqual({ status: IOERR, len: 1 });
  });

  test('no device-writable status byte: head returned with length 0', async () => {
    await start();
    const ring = fe.rings[0];
    ring.takeUsed();
    ring.addChain([{ addr: header(T_IN, 0), len: 16 }]);
    fe.kick(0);
    await fe.waitUsedIdx(0, 1);
    expect(ring.takeUsed()).toEqual([{ id: 0, len: 0 }]);
    // and the queue still works
    expect(await fe.blk(0, T_IN, 0, { readLen: 512 })).toMatchObject({ status: OK });
  });
});

describe('flush and GET_ID', () => {
  test('flush: OK, used length 1', async () => {
    await start();
    const st = fe.ram.alloc(1);
    expect(await raw([{ addr: header(T_FLUSH, 0), len: 16 }, { addr: st, len: 1, write: true }], st)).toEqual({ status: OK, len: 1 });
  });

  test('GET_ID writes the NUL-padded serial', async () => {
    await start({ serial: 'vm1-disk0' });
    const r = await fe.blk(0, T_GET_ID, 0, { readLen: 20 });
    expect(r.status).toBe(OK);
    expect(r.len).toBe(21);
    expect(r.data!.toString('latin1')).toBe('vm1-disk0' + '\0'.repeat(11));
  });

  test('GET_ID into a short buffer writes only what fits', async () => {
    await start({ serial: 'abcdefghijklmnopqrst' });
    const r = await fe.blk(0, T_GET_ID, 0, { readLen: 8 });
    expect(r).toMatchObject({ status: OK, len: 9 });
    expect(r.data!.toString('latin1')).toBe('abcdefgh');
  });
});
