/**
 * Request size limits (VIRTIO 1.2 section 5.2.4 seg_max/size_max, 2.7.4 "the total length of
 * a chain MUST NOT exceed 2^32"): an oversized request fails with VIRTIO_BLK_S_IOERR before any
 * data is touched, a request at exactly the advertised limits succeeds, and no used length wraps.
 */
import { BATCH_WORDS, MAX_SEGMENTS, native, SEGMENT_WORDS } from '../../native';
import { Req } from '../../vhost/protocol';
import { startBackend, TestBackend } from '../helpers/backend';
import { blkHeader, Buf, DriverRing } from '../helpers/driver-ring';
import { TestFrontend } from '../helpers/frontend';
import { GuestRam } from '../helpers/guest-ram';

const GIB = 1 << 30;
const HIGH = 0x100000000;
/** What the config space must advertise (checked in the first test). */
const SEG_MAX = 126;
const SIZE_MAX = 256 * 1024;

/** 8 MiB for rings and headers, and a sparse 1 GiB region at 4 GiB for big buffers. */
const LAYOUT = [
  { gpa: 0, size: 8 << 20, uaddr: 0x7f0000000000 },
  { gpa: HIGH, size: GIB, uaddr: 0x7f1000000000 },
];

let be: TestBackend | undefined;
let fe: TestFrontend;

afterEach(async () => {
  if (be === undefined) return;
  fe.close();
  fe.ram.close();
  await be.close();
  be = undefined;
});

async function ready(): Promise<void> {
  be = startBackend({ size: 65536 }); // 64 GiB (a null disk: no memory): capacity is no limit here
  fe = new TestFrontend(be.socket, new GuestRam(LAYOUT));
  await fe.setup();
}

/** Marks a few bytes of the big region (start, middle, end) so a zero-fill would show. */
function mark(): number[] {
  const at = [HIGH, HIGH + GIB / 2, HIGH + GIB - 16];
  for (const a of at) fe.ram.bytes(a, 16).fill(0xa5);
  return at;
}

/** Offers header + data buffers + status as one indirect chain; returns status and used length. */
async function read(data: Buf[]): Promise<{ status: number; len: number }> {
  const ring = fe.rings[0];
  const hdr = fe.ram.alloc(16);
  fe.ram.bytes(hdr, 16).set(blkHeader(0, 0));
  const st = fe.ram.alloc(1);
  fe.ram.bytes(st, 1)[0] = 0xff;
  const target = (ring.usedIdx() + 1) & 0xffff;
  ring.takeUsed();
  ring.addIndirectChain([{ addr: hdr, len: 16 }, ...data, { addr: st, len: 1, write: true }]);
  fe.kick(0);
  await fe.waitUsedIdx(0, target, 20000);
  const used = ring.takeUsed();
  return { status: fe.ram.bytes(st, 1)[0], len: used[0].len };
}

describe('advertised limits', () => {
  test('VIRTIO_BLK_F_SIZE_MAX and SEG_MAX are offered with size_max 256 KiB and seg_max 126', async () => {
    await ready();
    const f = await fe.getU64(Req.GET_FEATURES);
    expect(f & 0b110n).toBe(0b110n);
    const c = (await fe.getConfig(0, 16)).subarray(12);
    expect(c.readUInt32LE(8)).toBe(SIZE_MAX);
    expect(c.readUInt32LE(12)).toBe(SEG_MAX);
  });
});

describe('oversized requests fail with IOERR before any data is touched', () => {
  test('header + 32 descriptors of 1 GiB at the same address: IOERR at once, nothing written', async () => {
    await ready();
    const marks = mark();
    const r = await read(Array.from({ length: 32 }, () => ({ addr: HIGH, len: GIB, write: true })));
    expect(r).toEqual({ status: 1, len: 1 });
    for (const a of marks) expect(fe.ram.bytes(a, 16).every((b) => b === 0xa5)).toBe(true);
  });

  test('seg_max + 1 data descriptors: IOERR, nothing written', async () => {
    await ready();
    const marks = mark();
    const r = await read(Array.from({ length: SEG_MAX + 1 }, () => ({ addr: HIGH, len: 512, write: true })));
    expect(r).toEqual({ status: 1, len: 1 });
    expect(fe.ram.bytes(marks[0], 16).every((b) => b === 0xa5)).toBe(true);
  });

  test('seg_max descriptors whose total exceeds seg_max * size_max: IOERR, nothing written', async () => {
    await ready();
    const marks = mark();
    const data = Array.from({ length: SEG_MAX }, () => ({ addr: HIGH, len: SIZE_MAX, write: true }));
    data[0].len += 512;
    const r = await read(data);
    expect(r).toEqual({ status: 1, len: 1 });
    expect(fe.ram.bytes(marks[0], 16).every((b) => b === 0xa5)).toBe(true);
  });

  test('a request at exactly the limits succeeds (seg_max descriptors of size_max bytes)', async () => {
    await ready();
    const marks = mark();
    const r = await read(Array.from({ length: SEG_MAX }, () => ({ addr: HIGH, len: SIZE_MAX, write: true })));
    expect(r).toEqual({ status: 0, len: SEG_MAX * SIZE_MAX + 1 });
    expect(fe.ram.bytes(marks[0], 16).every((b) => b === 0)).toBe(true); // the null disk reads zeroes
  });
});

describe('native Virtqueue: no chain over 2^32 - 1 bytes, whatever the configured limits', () => {
  test('5 descriptors of 1 GiB: a soft error with the status byte located, no segments of data', () => {
    const ram = new GuestRam(LAYOUT);
    const ring = new DriverRing(ram, 8);
    const vq = new native.Virtqueue();
    const segments = new Uint32Array(8 * MAX_SEGMENTS * SEGMENT_WORDS);
    const batch = new Uint32Array(8 * BATCH_WORDS);
    try {
      vq.configure({
        memory: ram.table,
        ...ring.frontEndAddrs(),
        lastAvailIdx: 0,
        eventIdx: false,
        indirect: true,
        segments,
        batch,
        used: new Uint32Array(16),
      });
      const st = ram.alloc(1);
      const head = ring.addIndirectChain([...Array.from({ length: 5 }, () => ({ addr: HIGH, len: GIB, write: true })), { addr: st, len: 1, write: true }]);
      expect(vq.pop()).toBe(1);
      expect(batch[0]).toBe(head);
      expect(batch[1]).toBe(1); // the status byte only
      expect(batch[2]).not.toBe(0);
      const base = head * MAX_SEGMENTS * SEGMENT_WORDS;
      expect(Array.from(segments.subarray(base, base + 4))).toEqual([0, st, 1, 1]);
    } finally {
      vq.stop();
      ram.close();
    }
  });
});
