/**
 * native Virtqueue: chain walking, translation and ring index handling against rings built by
 * hand in a memfd (test/helpers/driver-ring.ts). Exact error codes and segments are asserted.
 */
import { BATCH_WORDS, MAX_SEGMENTS, native, NativeVirtqueue, SEGMENT_WORDS } from '../../native';
import { DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DriverRing, writeDesc } from '../helpers/driver-ring';
import { Worker } from 'worker_threads';
import { GuestRam } from '../helpers/guest-ram';

const SIZE = 16;

interface Popped {
  head: number;
  nseg: number;
  err: number;
  segs: Array<[number, number, number, number]>;
}

class Harness {
  ram = new GuestRam();
  ring = new DriverRing(this.ram, SIZE);
  vq: NativeVirtqueue = new native.Virtqueue();
  segments = new Uint32Array(SIZE * MAX_SEGMENTS * SEGMENT_WORDS);
  batch = new Uint32Array(SIZE * BATCH_WORDS);
  used = new Uint32Array(SIZE * 2);

  constructor(opts: { eventIdx?: boolean; indirect?: boolean; lastAvailIdx?: number; batchBytes?: number } = {}) {
    this.vq.configure({
      memory: this.ram.table,
      ...this.ring.frontEndAddrs(),
      lastAvailIdx: opts.lastAvailIdx ?? 0,
      eventIdx: opts.eventIdx ?? false,
      indirect: opts.indirect ?? true,
      segments: this.segments,
      batch: this.batch,
      used: this.used,
      batchBytes: opts.batchBytes,
    });
  }

  pop(): Popped[] | number {
    const n = this.vq.pop();
    if (n < 0) return n;
    const out: Popped[] = [];
    for (let i = 0; i < n; i++) {
      const head = this.batch[i * 3];
      const nseg = this.batch[i * 3 + 1];
      const base = head * MAX_SEGMENTS * SEGMENT_WORDS;
      const segs: Array<[number, number, number, number]> = [];
      for (let s = 0; s < nseg; s++) {
        const w = base + s * 4;
        segs.push([this.segments[w], this.segments[w + 1], this.segments[w + 2], this.segments[w + 3]]);
      }
      out.push({ head, nseg, err: this.batch[i * 3 + 2], segs });
    }
    return out;
  }

  popOne(): Popped {
    const r = this.pop();
    if (typeof r === 'number' || r.length !== 1) throw new Error(`expected one chain, got ${JSON.stringify(r)}`);
    return r[0];
  }

  push(entries: Array<[number, number]>): number {
    entries.forEach(([h, l], i) => {
      this.used[2 * i] = h;
      this.used[2 * i + 1] = l;
    });
    return this.vq.push(entries.length);
  }

  close(): void {
    this.vq.stop();
    this.ram.close();
  }
}

let h: Harness;
afterEach(() => h.close());

describe('Virtqueue#pop() well-formed chains', () => {
  test('a three-descriptor chain becomes three segments with directions', () => {
    h = new Harness();
    const a = h.ram.alloc(16);
    const b = h.ram.alloc(4096);
    const c = h.ram.alloc(1);
    const head = h.ring.addChain([{ addr: a, len: 16 }, { addr: b, len: 4096, write: true }, { addr: c, len: 1, write: true }]);
    const p = h.popOne();
    expect(p).toEqual({ head, nseg: 3, err: 0, segs: [[0, a, 16, 0], [0, b, 4096, 1], [0, c, 1, 1]] });
  });

  test('buffers in the high region translate to its chunk, by guest-physical address', () => {
    h = new Harness();
    const hi = h.ram.alloc(512, 16, 1);
    h.ring.addChain([{ addr: hi, len: 512, write: true }]);
    const p = h.popOne();
    expect(p.segs).toEqual([[1, hi - 0x100000000, 512, 1]]);
  });

  test('an indirect table is followed', () => {
    h = new Harness();
    const a = h.ram.alloc(16);
    const b = h.ram.alloc(512);
    const head = h.ring.addIndirectChain([{ addr: a, len: 16 }, { addr: b, len: 512 }, { addr: b + 512, len: 1, write: true }]);
    const p = h.popOne();
    expect(p.head).toBe(head);
    expect(p.err).toBe(0);
    expect(p.segs.map((s) => s[2])).toEqual([16, 512, 1]);
  });

  test('several chains are popped in one batch, in avail order', () => {
    h = new Harness();
    const a = h.ram.alloc(16);
    const heads = [h.ring.addChain([{ addr: a, len: 16 }]), h.ring.addChain([{ addr: a, len: 16 }]), h.ring.addChain([{ addr: a, len: 16 }])];
    const r = h.pop() as Popped[];
    expect(r.map((p) => p.head)).toEqual(heads);
    expect(h.vq.state().inflight).toBe(3);
    expect(h.pop()).toEqual([]);
  });
});

describe('Virtqueue#pop() malformed chains', () => {
  test('a buffer outside guest memory: error 1, status byte still located', () => {
    h = new Harness();
    const st = h.ram.alloc(1);
    h.ring.addChain([{ addr: 0x80000000, len: 16 }, { addr: st, len: 1, write: true }]);
    const p = h.popOne();
    expect(p.err).toBe(1);
    expect(p.segs).toEqual([[0, st, 1, 1]]);
  });

  test('a buffer running past the end of a region: error 1', () => {
    h = new Harness();
    const st = h.ram.alloc(1);
    h.ring.addChain([{ addr: h.ram.regionEnd(0, 8), len: 16 }, { addr: st, len: 1, write: true }]);
    expect(h.popOne().err).toBe(1);
  });

  test('an address that wraps around 2^64: error 1', () => {
    h = new Harness();
    h.ring.setDesc(0, { addr: 0xfffffffffffff000, len: 0x2000 });
    h.ring.offer(0);
    const p = h.popOne();
    expect(p.err).toBe(1);
    expect(p.nseg).toBe(0);
  });

  test('a zero-length buffer: error 2', () => {
    h = new Harness();
    const a = h.ram.alloc(16);
    h.ring.addChain([{ addr: a, len: 0 }, { addr: a, len: 1, write: true }]);
    expect(h.popOne().err).toBe(2);
  });

  test('a readable buffer after a writable one: error 3', () => {
    h = new Harness();
    const a = h.ram.alloc(16);
    h.ring.addChain([{ addr: a, len: 4, write: true }, { addr: a, len: 4 }]);
    const p = h.popOne();
    expect(p.err).toBe(3);
    expect(p.nseg).toBe(0); // the last descriptor is not writable: no status byte
  });

  test('a chain that loops: error 5, head returned once', () => {
    h = new Harness();
    const a = h.ram.alloc(16);
    h.ring.setDesc(0, { addr: a, len: 16, flags: DESC_F_NEXT, next: 1 });
    h.ring.setDesc(1, { addr: a, len: 16, flags: DESC_F_NEXT, next: 0 });
    h.ring.offer(0);
    const p = h.popOne();
    expect(p.err).toBe(5);
    expect(h.push([[0, 0]])).toBe(1);
  });

  test('a self-referencing descriptor: error 5', () => {
    h = new Harness();
    h.ring.setDesc(3, { addr: h.ram.alloc(16), len: 16, flags: DESC_F_NEXT, next: 3 });
    h.ring.offer(3);
    expect(h.popOne().err).toBe(5);
  });

  test('next index outside the table: error 6', () => {
    h = new Harness();
    h.ring.setDesc(0, { addr: h.ram.alloc(16), len: 16, flags: DESC_F_NEXT, next: SIZE });
    h.ring.offer(0);
    expect(h.popOne().err).toBe(6);
  });

  test('indirect when not negotiated: error 7', () => {
    h = new Harness({ indirect: false });
    h.ring.addIndirectChain([{ addr: h.ram.alloc(16), len: 16 }]);
    expect(h.popOne().err).toBe(7);
  });

  test('indirect with NEXT, nested indirect, bad table length, table outside memory: error 7', () => {
    h = new Harness();
    const table = h.ram.alloc(64);
    const cases = [
      { addr: table, len: 32, flags: DESC_F_INDIRECT | DESC_F_NEXT, next: 1 },
      { addr: table, len: 20, flags: DESC_F_INDIRECT },
      { addr: table, len: 0, flags: DESC_F_INDIRECT },
      { addr: 0x90000000, len: 32, flags: DESC_F_INDIRECT },
    ];
    for (const [i, d] of cases.entries()) {
      h.ring.setDesc(i, d);
      h.ring.offer(i);
    }
    writeDesc(h.ram.bytes(table, 16), { addr: table, len: 16, flags: DESC_F_INDIRECT });
    h.ring.setDesc(4, { addr: table, len: 16, flags: DESC_F_INDIRECT }); // nested
    h.ring.offer(4);
    const r = h.pop() as Popped[];
    expect(r.map((p) => p.err)).toEqual([7, 7, 7, 7, 7]);
  });

  test('a loop inside an indirect table: error 5', () => {
    h = new Harness();
    const table = h.ram.alloc(32);
    const a = h.ram.alloc(16);
    writeDesc(h.ram.bytes(table, 16), { addr: a, len: 16, flags: DESC_F_NEXT, next: 1 });
    writeDesc(h.ram.bytes(table + 16, 16), { addr: a, len: 16, flags: DESC_F_NEXT, next: 0 });
    h.ring.setDesc(0, { addr: table, len: 32, flags: DESC_F_INDIRECT });
    h.ring.offer(0);
    expect(h.popOne().err).toBe(5);
  });

  test('more than 256 segments: error 4, status byte still located', () => {
    h = new Harness();
    const n = 300;
    const table = h.ram.alloc(16 * n);
    const a = h.ram.alloc(512);
    for (let k = 0; k < n; k++) {
      const last = k === n - 1;
      writeDesc(h.ram.bytes(table + 16 * k, 16), { addr: a, len: 1, flags: (last ? DESC_F_WRITE : 0) | (last ? 0 : DESC_F_NEXT), next: k + 1 });
    }
    h.ring.setDesc(0, { addr: table, len: 16 * n, flags: DESC_F_INDIRECT });
    h.ring.offer(0);
    const p = h.popOne();
    expect(p.err).toBe(4);
    expect(p.segs).toEqual([[0, a, 1, 1]]);
  });
});

describe('Virtqueue batches bounded in bytes', () => {
  test('a batch ends after the chain that reaches batchBytes; the rest comes with the next pop', () => {
    h = new Harness({ batchBytes: 65536 });
    const a = h.ram.alloc(32768);
    const heads = [0, 1, 2, 3, 4].map(() => h.ring.addChain([{ addr: a, len: 32768, write: true }]));
    expect((h.pop() as Popped[]).map((p) => p.head)).toEqual(heads.slice(0, 2));
    expect((h.pop() as Popped[]).map((p) => p.head)).toEqual(heads.slice(2, 4));
    expect((h.pop() as Popped[]).map((p) => p.head)).toEqual(heads.slice(4));
  });
});

describe('Virtqueue ring indexes (the guest is untrusted)', () => {
  test('a head outside the ring breaks the queue: -1 from then on', () => {
    h = new Harness();
    h.ring.offer(SIZE + 3);
    expect(h.vq.pop()).toBe(-1);
    expect(h.vq.state()).toMatchObject({ broken: true, brokenReason: expect.stringContaining('outside the ring') });
    expect(h.vq.pop()).toBe(-1);
  });

  test('an avail index more than the ring size ahead breaks the queue', () => {
    h = new Harness();
    h.ring.setAvailIdx(SIZE + 1);
    expect(h.vq.pop()).toBe(-1);
    expect(h.vq.state().brokenReason).toMatch(/more than the ring size ahead/);
  });

  test('a head offered again while in flight breaks the queue without touching its slot', () => {
    h = new Harness();
    const a = h.ram.alloc(16);
    const head = h.ring.addChain([{ addr: a, len: 16 }]);
    const first = h.popOne();
    const slot = Array.from(h.segments.subarray(head * MAX_SEGMENTS * 4, head * MAX_SEGMENTS * 4 + 4));
    h.ring.setDesc(head, { addr: a + 4096, len: 32 });
    h.ring.offer(head);
    expect(h.vq.pop()).toBe(-1); // nothing popped: the queue is now broken
    expect(h.vq.state().broken).toBe(true);
    expect(Array.from(h.segments.subarray(head * MAX_SEGMENTS * 4, head * MAX_SEGMENTS * 4 + 4))).toEqual(slot);
    expect(first.segs[0][1]).toBe(a);
  });

  test('push() skips heads that are not in flight', () => {
    h = new Harness();
    const head = h.ring.addChain([{ addr: h.ram.alloc(16), len: 16 }]);
    h.popOne();
    expect(h.push([[head, 0], [head, 0], [SIZE + 1, 0], [5, 0]])).toBe(1);
    expect(h.ring.takeUsed()).toEqual([{ id: head, len: 0 }]);
  });

  test('configure() refuses rings outside guest memory or misaligned', () => {
    h = new Harness();
    const vq = new native.Virtqueue();
    const base = {
      memory: h.ram.table,
      ...h.ring.frontEndAddrs(),
      lastAvailIdx: 0,
      eventIdx: false,
      indirect: false,
      segments: h.segments,
      batch: h.batch,
      used: h.used,
    };
    expect(() => vq.configure({ ...base, descAddr: h.ring.descAddr })).toThrow(/not inside guest memory/);
    expect(() => vq.configure({ ...base, usedAddr: base.usedAddr + 2 })).toThrow(/misaligned/);
    expect(() => vq.configure({ ...base, size: 24 })).toThrow(/power of two/);
    expect(() => vq.configure({ ...base, size: 2048 })).toThrow(/power of two/);
    expect(() => vq.configure({ ...base, segments: new Uint32Array(4) })).toThrow(/Uint32Arrays/);
  });
});

describe('Virtqueue notifications', () => {
  test('push() signals the call eventfd once per batch', () => {
    h = new Harness();
    const call = native.eventfd();
    h.vq.setCallFd(call);
    const a = h.ram.alloc(16);
    const heads = [h.ring.addChain([{ addr: a, len: 16 }]), h.ring.addChain([{ addr: a, len: 16 }])];
    h.pop();
    expect(h.push(heads.map((x) => [x, 0] as [number, number]))).toBe(2);
    expect(native.eventfdRead(call)).toBe(1);
    expect(h.ring.usedIdx()).toBe(2);
    native.close(call);
  });

  test('VRING_AVAIL_F_NO_INTERRUPT suppresses the call (no event idx)', () => {
    h = new Harness();
    const call = native.eventfd();
    h.vq.setCallFd(call);
    h.ring.setAvailFlags(1);
    const head = h.ring.addChain([{ addr: h.ram.alloc(16), len: 16 }]);
    h.pop();
    h.push([[head, 0]]);
    expect(native.eventfdRead(call)).toBe(0);
    native.close(call);
  });

  test('event idx: call only when used_event is crossed; avail_event re-armed to the next index', () => {
    h = new Harness({ eventIdx: true });
    const call = native.eventfd();
    h.vq.setCallFd(call);
    const a = h.ram.alloc(16);
    h.ring.setUsedEvent(5); // driver wants a call once used idx passes 5
    const heads: number[] = [];
    for (let i = 0; i < 3; i++) heads.push(h.ring.addChain([{ addr: a, len: 16 }]));
    expect((h.pop() as Popped[]).length).toBe(3);
    expect(h.ring.availEvent()).toBe(0); // not re-armed while there may be more to take
    expect(h.pop()).toEqual([]);
    expect(h.ring.availEvent()).toBe(3); // re-armed once the ring is empty
    h.push(heads.map((x) => [x, 0] as [number, number]));
    expect(native.eventfdRead(call)).toBe(0); // used idx 0 -> 3 does not cross 5
    const more: number[] = [];
    for (let i = 0; i < 4; i++) more.push(h.ring.addChain([{ addr: a, len: 16 }]));
    h.pop();
    h.push(more.map((x) => [x, 0] as [number, number]));
    expect(native.eventfdRead(call)).toBe(1); // 3 -> 7 crosses 5
    native.close(call);
  });

  test('a ring restarted at a non-zero index arms avail_event there', () => {
    h = new Harness({ eventIdx: true, lastAvailIdx: 40 });
    expect(h.ring.availEvent()).toBe(40);
  });
});

describe('GuestMemory', () => {
  test('unmap() empties the views instead of leaving dangling memory', () => {
    h = new Harness();
    const ram2 = new GuestRam();
    const view = ram2.views[0];
    expect(view.length).toBe(4 << 20);
    ram2.table.unmap();
    expect(view.length).toBe(0);
    native.close(ram2.fd);
  });

  test('overlapping or empty regions are refused', () => {
    h = new Harness();
    const fd = h.ram.fd;
    expect(() => new native.GuestMemory([{ gpa: 0, size: 8192, uaddr: 0, mmapOffset: 0, fd }, { gpa: 4096, size: 8192, uaddr: 1 << 20, mmapOffset: 0, fd }])).toThrow(/overlap/);
    expect(() => new native.GuestMemory([{ gpa: 0, size: 0, uaddr: 0, mmapOffset: 0, fd }])).toThrow(/empty/);
    expect(() => new native.GuestMemory([{ gpa: 0, size: 4096, uaddr: 0, mmapOffset: 0, fd: -1 }])).toThrow(/mmap/);
  });
});

describe('Virtqueue adaptive polling', () => {
  /** Offers `head` (a one-descriptor chain at desc slot `head`) from another thread after `delayUs`. */
  function offerFromWorker(ram: GuestRam, availAddr: number, head: number, delayUs: number): Worker {
    const addon = require.resolve('../../build/Release/rnull_native.node');
    const region = ram.regions[0];
    const code = `
      const { workerData } = require('worker_threads');
      const native = require(workerData.addon);
      const mem = new native.GuestMemory([workerData.region]);
      const view = Buffer.from(mem.chunks()[0]);
      const until = process.hrtime.bigint() + BigInt(workerData.delayUs * 1000);
      while (process.hrtime.bigint() < until) {}
      const a = workerData.availAddr;
      const idx = view.readUInt16LE(a + 2);
      view.writeUInt16LE(workerData.head, a + 4 + 2 * (idx % 16));
      view.writeUInt16LE((idx + 1) & 0xffff, a + 2);
      mem.unmap();
    `;
    return new Worker(code, { eval: true, workerData: { addon, region: { ...region, fd: ram.fd }, availAddr, head, delayUs } });
  }

  test('work offered while spinning is popped without a kick; kicks stay suppressed meanwhile', async () => {
    h = new Harness({ eventIdx: false });
    h.vq.setPolling(500_000_000); // up to 0.5 s, far longer than the worker's delay
    h.ring.setDesc(2, { addr: h.ram.alloc(16), len: 16 });
    const w = offerFromWorker(h.ram, h.ring.availAddr, 2, 20_000);
    await new Promise((r) => w.once('online', r));
    const got = h.pop() as Popped[]; // spins until the worker offers head 2
    await new Promise((r) => w.once('exit', r));
    expect(got.map((p) => p.head)).toEqual([2]);
    expect(h.vq.state()).toMatchObject({ spins: 1, spinHits: 1 });
    const usedFlags = () => h.ram.bytes(h.ring.usedAddr, 2).readUInt16LE(0);
    expect(usedFlags()).toBe(1); // VRING_USED_F_NO_NOTIFY while we keep polling
    h.vq.setPolling(2000);
    expect(h.pop()).toEqual([]); // the spin runs out: notifications re-armed before sleeping
    expect(usedFlags()).toBe(0);
  });

  const idle = (us: number): void => {
    const end = process.hrtime.bigint() + BigInt(us * 1000);
    while (process.hrtime.bigint() < end) {
      // an idle disk: no kick for longer than the polling limit
    }
  };

  test('the budget halves after each fruitless spin down to none; work soon after sleeping grows it again', () => {
    h = new Harness();
    h.vq.setPolling(2_000_000); // 2 ms limit
    let spinsBefore = -1;
    for (let i = 0; i < 16 && h.vq.state().pollNs > 0; i++) {
      spinsBefore = h.vq.state().spins;
      h.pop(); // ring empty: spins for the whole budget, then halves it
      expect(h.vq.state().spins).toBe(spinsBefore + 1);
      idle(2500); // no kick for longer than the limit: nothing grows
    }
    // 2 ms halves to below the 2 us floor in ten fruitless spins, then polling stops.
    expect(h.vq.state()).toMatchObject({ pollNs: 0, spins: 10, spinHits: 0 });
    h.pop(); // an idle period ended: no budget, no spin
    expect(h.vq.state().spins).toBe(10);
    h.pop(); // called again well within the limit after sleeping (as a quick kick would): grows
    expect(h.vq.state().spins).toBe(11);
  });

  test('polling off: pop() never spins', () => {
    h = new Harness();
    h.vq.setPolling(0);
    for (let i = 0; i < 5; i++) h.pop();
    expect(h.vq.state()).toMatchObject({ pollNs: 0, spins: 0 });
  });
});
