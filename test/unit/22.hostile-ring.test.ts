/**
 * A hostile guest in the rings: chain errors never make the back-end write into a
 * device-readable buffer (VIRTIO 1.2 section 2.7.4.1: the device MUST NOT write to a
 * device-readable buffer), and indirect tables at any 16-byte-misaligned address are read
 * without misaligned accesses (the fuzz target checks that under UBSan; here: they still work).
 */
import { Req } from '../../vhost/protocol';
import { startBackend, TestBackend } from '../helpers/backend';
import { blkHeader, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, writeDesc } from '../helpers/driver-ring';
import { state, TestFrontend } from '../helpers/frontend';

let be: TestBackend;
let fe: TestFrontend;

afterEach(async () => {
  fe?.close();
  await be?.close();
});

async function ready(): Promise<void> {
  be = startBackend();
  fe = new TestFrontend(be.socket);
  await fe.setup();
}

/** A 16-byte request header at a fresh address, and a copy of its bytes. */
function header(): { addr: number; bytes: Buffer } {
  const addr = fe.ram.alloc(16);
  fe.ram.bytes(addr, 16).set(blkHeader(0, 0));
  return { addr, bytes: Buffer.from(fe.ram.bytes(addr, 16)) };
}

describe('hard chain errors: nothing written, used length 0', () => {
  test('a header descriptor whose next index is out of range', async () => {
    await ready();
    const ring = fe.rings[0];
    const h = header();
    ring.setDesc(0, { addr: h.addr, len: 16, flags: DESC_F_NEXT, next: 500 });
    ring.offer(0);
    fe.kick(0);
    await fe.waitUsedIdx(0, 1);
    expect(ring.takeUsed()).toEqual([{ id: 0, len: 0 }]);
    expect(Buffer.from(fe.ram.bytes(h.addr, 16))).toEqual(h.bytes);
    // The queue is still served.
    expect(await fe.blk(0, 0, 0, { readLen: 512 })).toMatchObject({ status: 0, len: 513 });
  });

  test('a chain that loops back to its header', async () => {
    await ready();
    const ring = fe.rings[0];
    const h = header();
    const data = fe.ram.alloc(512);
    ring.setDesc(0, { addr: h.addr, len: 16, flags: DESC_F_NEXT, next: 1 });
    ring.setDesc(1, { addr: data, len: 512, flags: DESC_F_NEXT | DESC_F_WRITE, next: 0 });
    ring.offer(0);
    fe.kick(0);
    await fe.waitUsedIdx(0, 1);
    expect(ring.takeUsed()).toEqual([{ id: 0, len: 0 }]);
    expect(Buffer.from(fe.ram.bytes(h.addr, 16))).toEqual(h.bytes);
  });

  test('a bad indirect descriptor after the header (indirect with NEXT)', async () => {
    await ready();
    const ring = fe.rings[0];
    const h = header();
    const table = fe.ram.alloc(32, 16);
    ring.setDesc(0, { addr: h.addr, len: 16, flags: DESC_F_NEXT, next: 1 });
    ring.setDesc(1, { addr: table, len: 32, flags: DESC_F_INDIRECT | DESC_F_NEXT, next: 2 });
    ring.offer(0);
    fe.kick(0);
    await fe.waitUsedIdx(0, 1);
    expect(ring.takeUsed()).toEqual([{ id: 0, len: 0 }]);
    expect(Buffer.from(fe.ram.bytes(h.addr, 16))).toEqual(h.bytes);
  });
});

describe('soft chain errors: IOERR only in a device-writable last descriptor', () => {
  test('a zero-length data buffer fails the request at its status byte', async () => {
    await ready();
    const ring = fe.rings[0];
    const h = header();
    const st = fe.ram.alloc(1);
    fe.ram.bytes(st, 1)[0] = 0xff;
    ring.addChain([{ addr: h.addr, len: 16 }, { addr: fe.ram.alloc(512), len: 0, write: true }, { addr: st, len: 1, write: true }]);
    fe.kick(0);
    await fe.waitUsedIdx(0, 1);
    expect(ring.takeUsed()).toEqual([{ id: 0, len: 1 }]);
    expect(fe.ram.bytes(st, 1)[0]).toBe(1); // VIRTIO_BLK_S_IOERR
    expect(Buffer.from(fe.ram.bytes(h.addr, 16))).toEqual(h.bytes);
  });

  test('a soft error whose last descriptor is device-readable: nothing written, used length 0', async () => {
    await ready();
    const ring = fe.rings[0];
    const h = header();
    const tail = fe.ram.alloc(16);
    fe.ram.bytes(tail, 16).fill(0x5a);
    ring.addChain([{ addr: h.addr, len: 16 }, { addr: 0x7ff00000000, len: 512 }, { addr: tail, len: 16 }]);
    fe.kick(0);
    await fe.waitUsedIdx(0, 1);
    expect(ring.takeUsed()).toEqual([{ id: 0, len: 0 }]);
    expect(Buffer.from(fe.ram.bytes(h.addr, 16))).toEqual(h.bytes);
    expect(fe.ram.bytes(tail, 16).every((b) => b === 0x5a)).toBe(true);
  });
});

describe('indirect tables', () => {
  test('an indirect table at an address that is 8 mod 16 is read correctly', async () => {
    await ready();
    const ring = fe.rings[0];
    const h = header();
    const data = fe.ram.alloc(512, 512);
    const st = fe.ram.alloc(1);
    const table = fe.ram.alloc(16 * 3 + 8, 16) + 8;
    writeDesc(fe.ram.bytes(table, 16), { addr: h.addr, len: 16, flags: DESC_F_NEXT, next: 1 });
    writeDesc(fe.ram.bytes(table + 16, 16), { addr: data, len: 512, flags: DESC_F_NEXT | DESC_F_WRITE, next: 2 });
    writeDesc(fe.ram.bytes(table + 32, 16), { addr: st, len: 1, flags: DESC_F_WRITE });
    ring.setDesc(0, { addr: table, len: 48, flags: DESC_F_INDIRECT });
    ring.offer(0);
    fe.kick(0);
    await fe.waitUsedIdx(0, 1);
    expect(ring.takeUsed()).toEqual([{ id: 0, len: 513 }]);
    expect(fe.ram.bytes(st, 1)[0]).toBe(0);
    // And the ring still answers the front-end.
    fe.send(Req.SET_VRING_ENABLE, state(0, 0));
    const r = await fe.call(Req.GET_VRING_BASE, state(0, 0));
    expect(r.payload.readUInt32LE(4)).toBe(1);
  });
});
