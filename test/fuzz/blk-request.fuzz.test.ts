/**
 * Property test of the virtio-blk request parser (virtqueue/blk-request.ts) with fast-check:
 * random disks, headers, sectors, lengths and segment layouts (header split or not, data in
 * any number of segments of either direction, status byte alone, inside the last data
 * segment, or missing). For every chain: parse() never throws; the outcome and status are
 * exactly what VIRTIO 1.2 section 5.2.6 and the parser's documented limits give (a reference
 * model below, written from the spec, not from the parser); a dispatched range stays within
 * capacity and the transfer limit; its data segments add up to its bytes; no used length
 * exceeds the writable bytes plus the status byte.
 *
 * Cases per property: RNULL_FUZZ_RUNS (default 2000; `npm run fuzz` runs 100000).
 */
import fc from 'fast-check';
import type { Request } from '../../block/request';
import { BLK_ID_BYTES, BlkRequestParser, MAX_DISCARD_SECTORS, MAX_TRANSFER_BYTES, ParseOutcome } from '../../virtqueue/blk-request';

const RUNS = Number(process.env.RNULL_FUZZ_RUNS ?? 2000);
const VIEW_BYTES = 1 << 16;
const OK = 0;
const IOERR = 1;
const UNSUPP = 2;
const TYPES = [0, 1, 4, 8, 10, 11, 13, 14];

interface Seg {
  len: number;
  write: boolean;
}

interface Case {
  capacitySectors: number;
  lbs: number;
  readOnly: boolean;
  flush: boolean;
  discard: boolean;
  type: number;
  sectorHi: number;
  sectorLo: number;
  /** Header split point (1..15) or 0 for one header segment; -1: header shares a segment with the data. */
  headerSplit: number;
  data: Seg[];
  /** 'own': a separate 1-byte writable status segment; 'merged': the last byte of the last data segment; 'readable': a readable last segment. */
  status: 'own' | 'merged' | 'readable';
  /** DISCARD/WRITE_ZEROES payload: sector, num_sectors, flags. */
  dwz: [number, number, number, number];
}

const sectorHi = fc.oneof(fc.constant(0), fc.integer({ min: 0, max: 4 }), fc.constantFrom(0x1fffff, 0x200000), fc.integer({ min: 0, max: 0xffffffff }));
const len = fc.oneof(
  { weight: 6, arbitrary: fc.integer({ min: 1, max: 16 }).map((k) => k * 512) },
  { weight: 2, arbitrary: fc.integer({ min: 1, max: 4096 }) },
  { weight: 2, arbitrary: fc.constantFrom(16, 256 * 1024, MAX_TRANSFER_BYTES - 4096, MAX_TRANSFER_BYTES, MAX_TRANSFER_BYTES + 4096, 0x80000000) },
);
const caseArb: fc.Arbitrary<Case> = fc.record({
  capacitySectors: fc.oneof(fc.integer({ min: 0, max: 4096 }), fc.integer({ min: 0, max: 2 ** 40 }), fc.constant(2 ** 40)),
  lbs: fc.constantFrom(512, 4096),
  readOnly: fc.boolean(),
  flush: fc.boolean(),
  discard: fc.boolean(),
  type: fc.oneof({ weight: 8, arbitrary: fc.constantFrom(0, 0, 0, 1, 1, 1, ...TYPES) }, { weight: 1, arbitrary: fc.integer({ min: 0, max: 0xffffffff }) }),
  sectorHi,
  sectorLo: fc.oneof(fc.integer({ min: 0, max: 4096 }), fc.integer({ min: 0, max: 0xffffffff })),
  headerSplit: fc.integer({ min: -1, max: 15 }),
  // Mostly one direction for all data segments (as a well-formed request), sometimes mixed.
  data: fc.oneof(
    { weight: 3, arbitrary: fc.tuple(fc.boolean(), fc.array(len, { maxLength: 8 })).map(([w, ls]) => ls.map((l) => ({ len: l, write: w }))) },
    { weight: 1, arbitrary: fc.array(fc.record({ len, write: fc.boolean() }), { maxLength: 8 }) },
  ),
  status: fc.constantFrom('own' as const, 'own' as const, 'merged' as const, 'readable' as const),
  dwz: fc.tuple(fc.integer({ min: 0, max: 4096 }), sectorHi, fc.oneof(fc.integer({ min: 0, max: 4096 }), fc.integer({ min: 0, max: 0xffffffff })), fc.oneof(fc.constant(0), fc.constant(1), fc.integer({ min: 0, max: 0xffffffff }))),
});

/** Lays the case out as segments over two 64 KiB views; returns the parser inputs. */
function build(c: Case): { views: Buffer[]; segs: Uint32Array; nseg: number } {
  const views = [Buffer.alloc(VIEW_BYTES), Buffer.alloc(VIEW_BYTES)];
  const header = Buffer.alloc(16);
  header.writeUInt32LE(c.type >>> 0, 0);
  header.writeUInt32LE(c.sectorLo >>> 0, 8);
  header.writeUInt32LE(c.sectorHi >>> 0, 12);
  const dwz = Buffer.alloc(16);
  dwz.writeUInt32LE(c.dwz[0], 0);
  dwz.writeUInt32LE(c.dwz[1] >>> 0, 4);
  dwz.writeUInt32LE(c.dwz[2] >>> 0, 8);
  dwz.writeUInt32LE(c.dwz[3] >>> 0, 12);
  const out: number[] = [];
  let hOff = 0; // header bytes live in view 0 from 0; small data in view 1 (bump), big data at view 1 offset 0
  const push = (chunk: number, off: number, n: number, write: boolean): void => {
    out.push(chunk, off, n, write ? 1 : 0);
  };
  const data = c.data.map((d) => ({ ...d }));
  if (c.headerSplit > 0) {
    header.copy(views[0], 0);
    push(0, 0, c.headerSplit, false);
    push(0, c.headerSplit, 16 - c.headerSplit, false);
    hOff = 16;
  } else if (c.headerSplit === 0 || data.length === 0 || data[0].write || data[0].len > VIEW_BYTES - 64) {
    header.copy(views[0], 0);
    push(0, 0, 16, false);
    hOff = 16;
  }
  dwz.copy(views[1], 0);
  let bump = 0;
  data.forEach((d, i) => {
    if (hOff === 0 && i === 0) {
      // Header and the first (readable) data segment in one descriptor.
      header.copy(views[0], 0);
      dwz.copy(views[0], 16, 0, Math.min(16, d.len));
      push(0, 0, 16 + d.len, false);
      hOff = 16;
      return;
    }
    if (d.len <= 4096 && bump + d.len <= VIEW_BYTES) {
      push(1, bump, d.len, d.write);
      bump += d.len;
    } else {
      push(1, 0, d.len, d.write); // big: never touched by the parser unless it is small enough
    }
  });
  if (c.status === 'own') push(0, 1000, 1, true);
  else if (c.status === 'readable') push(0, 1000, 1, false);
  else if (out.length > 0) out[out.length - 1 - 0] = 1; // merged: the last segment must be writable
  // 'merged' with a last segment that holds only the header: its flag turned writable above,
  // which makes the header short — a case the model covers too.
  return { views, segs: Uint32Array.from(out), nseg: out.length / 4 };
}

interface Expect {
  outcome: ParseOutcome;
  status?: number;
  usedLen?: number;
}

/** The reference model: VIRTIO 1.2 section 5.2.6 and the parser's documented limits. */
function model(c: Case, views: Buffer[], segs: Uint32Array, nseg: number): Expect {
  const list: Array<{ chunk: number; off: number; len: number; write: boolean }> = [];
  for (let i = 0; i < nseg; i++) list.push({ chunk: segs[4 * i], off: segs[4 * i + 1], len: segs[4 * i + 2], write: (segs[4 * i + 3] & 1) === 1 });
  if (list.length === 0 || !list[list.length - 1].write) return { outcome: ParseOutcome.Drop };
  list[list.length - 1].len -= 1; // the status byte
  const fail = (status: number): Expect => ({ outcome: ParseOutcome.Finish, status, usedLen: 1 });
  // The header: the first 16 bytes, all device-readable.
  let need = 16;
  let k = 0;
  while (need > 0) {
    if (k >= list.length || list[k].write) return fail(IOERR);
    const take = Math.min(need, list[k].len);
    need -= take;
    list[k].len -= take;
    list[k].off += take;
    if (list[k].len === 0) k++;
  }
  const rest = list.slice(k);
  let bytes = 0;
  let writable = 0;
  let count = 0;
  for (const s of rest) {
    if (s.len === 0) continue;
    bytes += s.len;
    count++;
    if (s.write) writable++;
  }
  const sector = c.sectorHi * 0x100000000 + c.sectorLo;
  const cap = c.capacitySectors;
  switch (c.type) {
    case 0:
    case 1: {
      const read = c.type === 0;
      if (read ? writable !== count : writable !== 0) return fail(IOERR);
      if (!read && c.readOnly) return fail(IOERR);
      if (bytes > MAX_TRANSFER_BYTES) return fail(IOERR);
      if (bytes % c.lbs !== 0) return fail(IOERR);
      if (c.sectorHi > 0x1fffff) return fail(IOERR);
      if (sector % (c.lbs / 512) !== 0) return fail(IOERR);
      if (sector + bytes / 512 > cap) return fail(IOERR);
      return { outcome: ParseOutcome.Dispatch, usedLen: read ? bytes + 1 : 1 };
    }
    case 4:
      return c.flush ? { outcome: ParseOutcome.Dispatch, usedLen: 1 } : fail(UNSUPP);
    case 8:
      if (writable !== count) return fail(IOERR);
      return { outcome: ParseOutcome.Finish, status: OK, usedLen: Math.min(bytes, BLK_ID_BYTES) + 1 };
    case 11:
    case 13: {
      if (!c.discard) return fail(UNSUPP);
      if (writable !== 0) return fail(IOERR);
      if (bytes === 0 || bytes % 16 !== 0 || bytes > 16) return fail(IOERR);
      // The payload: the 16 data bytes after the header, wherever the layout put them.
      const pl = Buffer.concat(rest.filter((x) => x.len > 0).map((x) => views[x.chunk].subarray(x.off, x.off + x.len)));
      const [lo, hi, num, flags] = [pl.readUInt32LE(0), pl.readUInt32LE(4), pl.readUInt32LE(8), pl.readUInt32LE(12)];
      if ((flags & ~1) !== 0) return fail(UNSUPP);
      if (c.type === 11 && flags !== 0) return fail(UNSUPP);
      if (c.readOnly) return fail(IOERR);
      if (num > MAX_DISCARD_SECTORS) return fail(IOERR);
      if (hi > 0x1fffff) return fail(IOERR);
      const s = hi * 0x100000000 + lo;
      const per = c.lbs / 512;
      if (s % per !== 0 || num % per !== 0) return fail(IOERR);
      if (s + num > cap) return fail(IOERR);
      return { outcome: ParseOutcome.Dispatch, usedLen: 1 };
    }
    default:
      return fail(UNSUPP);
  }
}

function freshRequest(): Request {
  return { op: -1, sector: -1, bytes: -1, segBase: -1, segCount: -1, unmap: false } as unknown as Request;
}

describe('BlkRequestParser (fast-check)', () => {
  test(`never throws; statuses exactly as the spec model says; ranges within capacity (${RUNS} cases)`, () => {
    fc.assert(
      fc.property(caseArb, (c) => {
        const { views, segs, nseg } = build(c);
        const parser = new BlkRequestParser(
          { capacitySectors: c.capacitySectors, logicalBlockSize: c.lbs, readOnly: c.readOnly, flush: c.flush, discard: c.discard, serialId: Buffer.alloc(BLK_ID_BYTES, 0x41) },
          views,
          segs,
        );
        const want = model(c, views, Uint32Array.from(segs), nseg);
        const rq = freshRequest();
        const got = parser.parse(0, nseg, rq);
        expect(got).toBe(want.outcome);
        if (got === ParseOutcome.Drop) return;
        if (want.status !== undefined) expect(parser.status).toBe(want.status);
        expect(parser.usedLen).toBe(want.usedLen);
        expect(parser.usedLen).toBeLessThanOrEqual(MAX_TRANSFER_BYTES + 1);
        if (got === ParseOutcome.Dispatch && (c.type === 0 || c.type === 1)) {
          expect(rq.sector + rq.bytes / 512).toBeLessThanOrEqual(c.capacitySectors);
          expect(rq.bytes).toBeLessThanOrEqual(MAX_TRANSFER_BYTES);
          let sum = 0;
          for (let i = 0; i < rq.segCount; i++) sum += segs[rq.segBase + 4 * i + 2];
          expect(sum).toBe(rq.bytes);
        }
        if (got === ParseOutcome.Dispatch && (c.type === 11 || c.type === 13)) {
          expect(rq.sector + rq.bytes / 512).toBeLessThanOrEqual(c.capacitySectors);
        }
      }),
      { numRuns: RUNS, seed: Number(process.env.RNULL_FUZZ_SEED ?? 9) },
    );
  });
});
