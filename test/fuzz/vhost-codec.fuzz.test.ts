/**
 * fast-check properties of the TypeScript vhost-user codec (vhost/message.ts: the header check
 * the connection applies, and each payload reader), and of the device's handlers fed arbitrary
 * messages without fds. RNULL_FUZZ_RUNS cases per property (default 2000; `npm run fuzz` runs
 * more); RNULL_FUZZ_SEED replays a run (fast-check prints the seed of a failure).
 */
import fc from 'fast-check';
import pino from 'pino';
import { createDisk } from '../../daemon/service';
import { defaultDiskConfig } from '../../config/load';
import { VhostUserError } from '../../vhost/blk-device';
import {
  Message,
  MessageError,
  readConfigAccess,
  readHeader,
  readMemTable,
  readU64,
  readVringAddr,
  readVringFile,
  readVringState,
  writeHeader,
} from '../../vhost/message';
import { MAX_MEM_REGIONS, MAX_PAYLOAD, REQUEST_NAMES } from '../../vhost/protocol';

const RUNS = Number(process.env.RNULL_FUZZ_RUNS ?? 2000);
const params = (): fc.Parameters<unknown> => ({ numRuns: RUNS, seed: process.env.RNULL_FUZZ_SEED === undefined ? undefined : Number(process.env.RNULL_FUZZ_SEED) });
const counts: Record<string, number> = {};
const count = (what: string): void => {
  counts[what] = (counts[what] ?? 0) + 1;
};

afterAll(() => {
  process.stdout.write(`vhost-codec fuzz: ${JSON.stringify(counts)}\n`);
});

const READERS: Array<[string, (m: Message) => unknown]> = [
  ['readU64', readU64],
  ['readVringState', readVringState],
  ['readVringAddr', readVringAddr],
  ['readVringFile', readVringFile],
  ['readMemTable', readMemTable],
  ['readConfigAccess', readConfigAccess],
];

/** Every request code the protocol names, a few it does not, and any u32. */
const requestCode = fc.oneof(fc.constantFrom(...Object.keys(REQUEST_NAMES).map(Number)), fc.integer({ min: 0, max: 64 }), fc.nat({ max: 0xffffffff }));

/** Payloads of the sizes readers expect (8, 12+n, 40, 8+32n) more often than chance would. */
const payload = fc.oneof(
  fc.uint8Array({ maxLength: 300 }),
  // a u64 with small values (ring index, flags, features)
  fc.oneof(fc.bigUintN(10), fc.bigUintN(64)).map((v) => {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(v);
    return new Uint8Array(b);
  }),
  // config access: offset, size matching the data (mostly), flags, data
  fc.tuple(fc.nat({ max: 300 }), fc.uint8Array({ maxLength: 64 }), fc.boolean()).map(([off, data, match]) => {
    const b = Buffer.alloc(12 + data.length);
    b.writeUInt32LE(off, 0);
    b.writeUInt32LE(match ? data.length : data.length + 1, 4);
    Buffer.from(data).copy(b, 12);
    return new Uint8Array(b);
  }),
  fc.constantFrom(0, 8, 12, 13, 40, 72, 264, 268).chain((n) => fc.uint8Array({ minLength: n, maxLength: n })),
  fc.tuple(fc.integer({ min: 0, max: 10 }), fc.uint8Array({ maxLength: 32 * 10 })).map(([n, rest]) => {
    const b = Buffer.alloc(8 + 32 * n);
    Buffer.from(rest).copy(b, 8);
    b.writeUInt32LE(n, 0);
    return new Uint8Array(b);
  }),
);

const message = fc.record({
  request: requestCode,
  flags: fc.nat({ max: 0xffffffff }),
  payload: payload.map((u) => Buffer.from(u)),
  fds: fc.array(fc.integer({ min: 100000, max: 100100 }), { maxLength: 10 }),
});

const u64 = (v: bigint): Buffer => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(v);
  return b;
};

describe('vhost-user codec properties', () => {
  test('the header check: version 1 accepted with its fields, anything else a MessageError', () => {
    const header = fc.tuple(fc.nat({ max: 0xffffffff }), fc.oneof(fc.nat({ max: 15 }), fc.nat({ max: 0xffffffff })), fc.nat({ max: 0xffffffff }), fc.uint8Array({ maxLength: 8 }))
      .map(([req, flags, size, tail]) => {
        const b = Buffer.alloc(12 + tail.length);
        writeHeader(b, req, flags, size);
        Buffer.from(tail).copy(b, 12);
        return new Uint8Array(b);
      });
    fc.assert(
      fc.property(fc.oneof(fc.uint8Array({ maxLength: 20 }), header), (bytes) => {
        const b = Buffer.from(bytes);
        let h;
        try {
          h = readHeader(b);
        } catch (e) {
          expect(e).toBeInstanceOf(MessageError);
          expect(b.length < 12 || (b.readUInt32LE(4) & 3) !== 1).toBe(true);
          count('header refused');
          return;
        }
        expect(b.length).toBeGreaterThanOrEqual(12);
        expect(h).toEqual({ request: b.readUInt32LE(0), flags: b.readUInt32LE(4), size: b.readUInt32LE(8) });
        expect(h.flags & 3).toBe(1);
        const again = Buffer.alloc(12);
        writeHeader(again, h.request, h.flags, h.size);
        expect(again.equals(b.subarray(0, 12))).toBe(true);
        count('header accepted');
      }),
      params(),
    );
  });

  test('every reader on any message of any request type throws nothing but MessageError; accepted fields lie in range', () => {
    fc.assert(
      fc.property(message, (m) => {
        for (const [name, read] of READERS) {
          const msg: Message = { ...m, fds: [...m.fds] };
          let v: unknown;
          try {
            v = read(msg);
          } catch (e) {
            if (!(e instanceof MessageError)) throw new Error(`${name} threw ${(e as Error).name}: ${(e as Error).message}`);
            count(`${name} refused`);
            continue;
          }
          count(`${name} accepted`);
          expect(msg.fds).toEqual(m.fds); // readers never take or drop fds
          checkRanges(name, v, msg);
        }
      }),
      params(),
    );
  });

  test('SET_VRING_KICK/CALL/ERR: accepted exactly when bits 9-63 are clear and the fd count fits bit 8; fields round-trip', () => {
    fc.assert(
      fc.property(fc.bigUintN(64), fc.boolean(), fc.integer({ min: 0, max: 2 }), (raw, narrow, nfds) => {
        const v = narrow ? raw & 0x3ffn : raw;
        const msg: Message = { request: 13, flags: 1, payload: u64(v), fds: Array(nfds).fill(7) };
        const noFd = (v & 0x100n) !== 0n;
        const ok = (v & ~0x1ffn) === 0n && nfds === (noFd ? 0 : 1);
        if (!ok) {
          expect(() => readVringFile(msg)).toThrow(MessageError);
          return;
        }
        expect(readVringFile(msg)).toEqual({ index: Number(v & 0xffn), noFd });
      }),
      params(),
    );
  });

  test('SET_MEM_TABLE: a table of 1-8 regions with safe fields round-trips; one fd per region', () => {
    const region = fc.record({
      gpa: fc.nat({ max: Number.MAX_SAFE_INTEGER }),
      size: fc.nat({ max: Number.MAX_SAFE_INTEGER }),
      uaddr: fc.nat({ max: Number.MAX_SAFE_INTEGER }),
      mmapOffset: fc.nat({ max: Number.MAX_SAFE_INTEGER }),
    });
    fc.assert(
      fc.property(fc.array(region, { minLength: 1, maxLength: MAX_MEM_REGIONS }), fc.integer({ min: -1, max: 1 }), (regions, fdDelta) => {
        const p = Buffer.alloc(8 + 32 * regions.length);
        p.writeUInt32LE(regions.length, 0);
        regions.forEach((r, i) => {
          p.writeBigUInt64LE(BigInt(r.gpa), 8 + 32 * i);
          p.writeBigUInt64LE(BigInt(r.size), 16 + 32 * i);
          p.writeBigUInt64LE(BigInt(r.uaddr), 24 + 32 * i);
          p.writeBigUInt64LE(BigInt(r.mmapOffset), 32 + 32 * i);
        });
        const msg: Message = { request: 5, flags: 1, payload: p, fds: Array(regions.length + fdDelta).fill(9) };
        if (fdDelta !== 0) expect(() => readMemTable(msg)).toThrow(MessageError);
        else expect(readMemTable(msg)).toEqual(regions);
      }),
      params(),
    );
  });

  test('SET_VRING_ADDR and GET/SET_CONFIG round-trip their fields', () => {
    fc.assert(
      fc.property(
        fc.nat({ max: 0xffffffff }),
        fc.nat({ max: 0xffffffff }),
        fc.array(fc.nat({ max: Number.MAX_SAFE_INTEGER }), { minLength: 4, maxLength: 4 }),
        fc.uint8Array({ maxLength: 256 }),
        (index, flags, [desc, used, avail, log], data) => {
          const a = Buffer.alloc(40);
          a.writeUInt32LE(index, 0);
          a.writeUInt32LE(flags, 4);
          [desc, used, avail, log].forEach((x, i) => a.writeBigUInt64LE(BigInt(x), 8 + 8 * i));
          expect(readVringAddr({ request: 9, flags: 1, payload: a, fds: [] })).toEqual({ index, flags, descAddr: desc, usedAddr: used, availAddr: avail, logAddr: log });
          const c = Buffer.alloc(12 + data.length);
          c.writeUInt32LE(index, 0);
          c.writeUInt32LE(data.length, 4);
          c.writeUInt32LE(flags, 8);
          Buffer.from(data).copy(c, 12);
          const got = readConfigAccess({ request: 24, flags: 1, payload: c, fds: [] });
          expect({ offset: got.offset, size: got.size, flags: got.flags }).toEqual({ offset: index, size: data.length, flags });
          expect(Buffer.from(got.data).equals(Buffer.from(data))).toBe(true);
        },
      ),
      params(),
    );
  });
});

/** The documented ranges of what each reader accepts. */
function checkRanges(name: string, v: unknown, msg: Message): void {
  const safe = (x: number): boolean => Number.isSafeInteger(x) && x >= 0;
  switch (name) {
    case 'readU64':
      expect(msg.payload.length).toBe(8);
      expect(typeof v).toBe('bigint');
      break;
    case 'readVringState': {
      const s = v as { index: number; num: number };
      expect(msg.payload.length).toBe(8);
      expect(s.index >= 0 && s.index <= 0xffffffff && s.num >= 0 && s.num <= 0xffffffff).toBe(true);
      break;
    }
    case 'readVringAddr': {
      const a = v as Record<string, number>;
      expect(msg.payload.length).toBe(40);
      for (const k of ['descAddr', 'usedAddr', 'availAddr', 'logAddr']) expect(safe(a[k])).toBe(true);
      break;
    }
    case 'readVringFile': {
      const f = v as { index: number; noFd: boolean };
      expect(f.index >= 0 && f.index <= 255).toBe(true);
      expect(msg.fds.length).toBe(f.noFd ? 0 : 1);
      expect(msg.payload.readBigUInt64LE(0) & ~0x1ffn).toBe(0n);
      break;
    }
    case 'readMemTable': {
      const regions = v as Array<Record<string, number>>;
      expect(regions.length >= 1 && regions.length <= MAX_MEM_REGIONS).toBe(true);
      expect(msg.fds.length).toBe(regions.length);
      expect(msg.payload.length).toBe(8 + 32 * regions.length);
      for (const r of regions) for (const k of ['gpa', 'size', 'uaddr', 'mmapOffset']) expect(safe(r[k])).toBe(true);
      break;
    }
    case 'readConfigAccess': {
      const c = v as { size: number; data: Buffer };
      expect(c.size).toBe(c.data.length);
      expect(c.size).toBe(msg.payload.length - 12);
      break;
    }
  }
}

describe('the device fed arbitrary fd-less messages', () => {
  test('handlers throw nothing but VhostUserError/MessageError and answer Buffer, undefined or false', async () => {
    const config = { ...defaultDiskConfig(), name: 'fuzz', socket: '/nonexistent/fuzz.sock', size: 4, num_queues: 2, poll_us: 0 };
    const served = createDisk(config, pino({ level: 'silent' }));
    const device = served.device;
    const specCodes = [...device.specs.keys()];
    const msgs = fc.array(
      fc.record({
        request: fc.oneof(fc.constantFrom(...specCodes), requestCode),
        flags: fc.constant(1),
        payload: payload.map((u) => Buffer.from(u)),
      }),
      { minLength: 1, maxLength: 12 },
    );
    await fc.assert(
      fc.asyncProperty(msgs, async (list) => {
        for (const m of list) {
          const spec = device.specs.get(m.request);
          if (spec === undefined) continue; // the connection refuses unknown requests itself
          if (m.payload.length > MAX_PAYLOAD) continue; // refused by the framing
          try {
            const r = await spec.handler({ ...m, fds: [] });
            expect(r === undefined || r === false || Buffer.isBuffer(r)).toBe(true);
            count('device handled');
          } catch (e) {
            if (!(e instanceof VhostUserError || e instanceof MessageError)) throw e;
            count('device refused');
            await device.reset(); // what the connection does after a refusal
            return;
          }
        }
        await device.reset();
      }),
      params(),
    );
  });
});
