/**
 * The inflight region of VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD (virtqueue/inflight-region.ts and
 * the native tracking in SplitRing): fresh blocks, resubmit order, a crash after every single
 * store of the submit/complete sequence, corrupt blocks (refused, never a throw), and the native
 * writer checked byte for byte against a model of the spec's sequence.
 */
import fc from 'fast-check';
import { BATCH_WORDS, MAX_SEGMENTS, native, NativeVirtqueue, SEGMENT_WORDS } from '../../native';
import {
  BLOCK_HEADER_BYTES,
  checkDescription,
  createInflightFd,
  DESC_STATE_BYTES,
  InflightRegion,
  inflightRegionBytes,
  initSplitBlock,
  queueBlockBytes,
  recoverSplitQueue,
} from '../../virtqueue/inflight-region';
import { DriverRing } from '../helpers/driver-ring';
import { GuestRam } from '../helpers/guest-ram';

const E = (i: number): number => BLOCK_HEADER_BYTES + DESC_STATE_BYTES * i;

/** A used block by hand: entries [head, counter] in flight, header fields as given. */
function usedBlock(descNum: number, opts: { usedIdx?: number; lastBatchHead?: number; inflight?: Array<[number, number]>; next?: Array<[number, number]> } = {}): Buffer {
  const b = Buffer.alloc(queueBlockBytes(descNum));
  initSplitBlock(b, descNum, opts.usedIdx ?? 0);
  b.writeUInt16LE(opts.lastBatchHead ?? 0, 12);
  for (const [h, c] of opts.inflight ?? []) {
    b[E(h)] = 1;
    b.writeBigUInt64LE(BigInt(c), E(h) + 8);
  }
  for (const [h, n] of opts.next ?? []) b.writeUInt16LE(n, E(h) + 6);
  return b;
}

describe('layout', () => {
  test('blocks are 16 + 16 x queue size bytes rounded up to 64; a region is one block per queue', () => {
    expect(queueBlockBytes(128)).toBe(2112); // 16 + 2048 = 2064 -> 2112
    expect(queueBlockBytes(1)).toBe(64);
    expect(queueBlockBytes(1024) % 64).toBe(0);
    expect(inflightRegionBytes(4, 256)).toBe(4 * queueBlockBytes(256));
  });

  test('descriptions outside the layout are refused with the field named', () => {
    const ok = { mmapSize: inflightRegionBytes(2, 128), mmapOffset: 0, numQueues: 2, queueSize: 128 };
    expect(checkDescription(ok, 4)).toBeNull();
    expect(checkDescription({ ...ok, numQueues: 0 }, 4)).toMatch(/num_queues/);
    expect(checkDescription({ ...ok, numQueues: 5, mmapSize: inflightRegionBytes(5, 128) }, 4)).toMatch(/num_queues 5/);
    expect(checkDescription({ ...ok, queueSize: 0 }, 4)).toMatch(/queue_size/);
    expect(checkDescription({ ...ok, queueSize: 2048 }, 4)).toMatch(/queue_size/);
    expect(checkDescription({ ...ok, mmapSize: ok.mmapSize - 64 }, 4)).toMatch(/mmap_size/);
    expect(checkDescription({ ...ok, mmapSize: -1 }, 4)).toMatch(/mmap_size/);
    expect(checkDescription({ ...ok, mmapOffset: 100 }, 4)).toMatch(/mmap_offset/);
    expect(checkDescription({ ...ok, mmapOffset: -1 }, 4)).toMatch(/mmap_offset/);
  });

  test('a created region is a sealed, zeroed memfd of the layout size; other fds are refused', () => {
    const { fd, description } = createInflightFd(2, 64, 4);
    try {
      expect(native.fdKind(fd)).toBe('memfd');
      const r = new InflightRegion(fd, description, 4);
      expect(r.view.length).toBe(inflightRegionBytes(2, 64));
      expect(r.view.every((x) => x === 0)).toBe(true);
      expect(r.blockOffset(1)).toBe(queueBlockBytes(64));
      r.release();
      expect(r.view.length).toBe(0); // detached: no access to unmapped memory
      expect(() => new InflightRegion(fd, { ...description, mmapOffset: 4096 }, 4)).toThrow(/ends at byte/);
    } finally {
      native.close(fd);
    }
    const ev = native.eventfd();
    expect(() => new InflightRegion(ev, { mmapSize: inflightRegionBytes(1, 64), mmapOffset: 0, numQueues: 1, queueSize: 64 }, 4)).toThrow(/eventfd, not a memfd/);
    native.close(ev);
    const unsealed = native.memfdCreate('unsealed', inflightRegionBytes(1, 64), false);
    expect(() => new InflightRegion(unsealed, { mmapSize: inflightRegionBytes(1, 64), mmapOffset: 0, numQueues: 1, queueSize: 64 }, 4)).toThrow(/F_SEAL_SHRINK/);
    native.close(unsealed);
  });
});

describe('recovery of one block', () => {
  test('a fresh block is initialised: version 1, desc_num, used_idx seeded from the ring (not 0), the ring goes on at SET_VRING_BASE', () => {
    const b = Buffer.alloc(queueBlockBytes(8), 0);
    b[E(3)] = 1; // leftovers in a block still marked fresh are wiped, not resubmitted
    const r = recoverSplitQueue(b, 8, 8, 1234, 1234);
    expect(r).toMatchObject({ fresh: true, refused: null, lastAvailIdx: 1234, counter: 1 });
    expect([...r.resubmit]).toEqual([]);
    expect(b.readUInt16LE(8)).toBe(1);
    expect(b.readUInt16LE(10)).toBe(8);
    expect(b.readUInt16LE(14)).toBe(1234);
    expect(b[E(3)]).toBe(0);
    // Used again at once (nothing happened): not fresh, nothing in flight, the same place.
    expect(recoverSplitQueue(b, 8, 8, 1234, 0)).toMatchObject({ fresh: false, lastAvailIdx: 1234, counter: 1 });
  });

  test('in-flight entries are resubmitted oldest first by counter; the ring goes on past them; the counter after the newest', () => {
    const b = usedBlock(16, { usedIdx: 65530, inflight: [[9, 41], [2, 40], [15, 44], [0, 43]] });
    const r = recoverSplitQueue(b, 16, 16, 65530, 65530);
    expect(r.fresh).toBe(false);
    expect([...r.resubmit]).toEqual([2, 9, 0, 15]);
    expect(r.lastAvailIdx).toBe((65530 + 4) & 0xffff); // wraps
    expect(r.counter).toBe(45);
  });

  test('a batch published but not cleared (used->idx past used_idx) is cleared by walking next from last_batch_head', () => {
    // Batch of 3 published (heads 5 -> 1 -> 7), one more (4) still in flight.
    const b = usedBlock(8, { usedIdx: 10, lastBatchHead: 5, inflight: [[7, 3], [1, 4], [5, 5], [4, 6]], next: [[5, 1], [1, 7], [7, 4]] });
    const r = recoverSplitQueue(b, 8, 8, 13, 13);
    expect(r.batchCleared).toBe(3);
    expect([...r.resubmit]).toEqual([4]); // next of 7 points at 4, but the walk stops after 3
    expect(r.lastAvailIdx).toBe(14);
    expect(b.readUInt16LE(14)).toBe(13);
    for (const h of [5, 1, 7]) expect(b[E(h)]).toBe(0);
    expect(b[E(4)]).toBe(1);
  });

  test('a region queue size above the ring size: heads are checked against the ring', () => {
    const b = usedBlock(128, { inflight: [[3, 1]] });
    expect([...recoverSplitQueue(b, 128, 64, 0, 0).resubmit]).toEqual([3]);
    const c = usedBlock(128, { inflight: [[100, 1]] });
    expect(recoverSplitQueue(c, 128, 64, 0, 0).refused).toMatch(/entry 100 is in flight but outside the ring of 64/);
  });

  const corrupt: Array<[string, (b: Buffer) => void, number, RegExp]> = [
    ['version 7', (b) => b.writeUInt16LE(7, 8), 0, /version 7/],
    ['features set', (b) => b.writeBigUInt64LE(1n, 0), 0, /features 0x1/],
    ['desc_num not the region queue size', (b) => b.writeUInt16LE(9, 10), 0, /desc_num 9/],
    ['used->idx far past used_idx', () => undefined, 20, /more than the ring/],
    ['last batch head outside the ring', (b) => b.writeUInt16LE(60000, 12), 2, /head 60000, outside/],
    ['last batch list loops', (b) => { b.writeUInt16LE(3, 12); b.writeUInt16LE(3, E(3) + 6); }, 2, /loops at head 3/],
    ['inflight flag 2', (b) => { b[E(2)] = 2; }, 0, /inflight 2/],
    ['in-flight counter 0', (b) => { b[E(2)] = 1; }, 0, /counter 0/],
    ['in-flight counter 2^64 - 1', (b) => { b[E(2)] = 1; b.writeBigUInt64LE(0xffffffffffffffffn, E(2) + 8); }, 0, /counter 18446744073709551615/],
    ['two entries with one counter', (b) => { b[E(1)] = 1; b[E(2)] = 1; b.writeBigUInt64LE(5n, E(1) + 8); b.writeBigUInt64LE(5n, E(2) + 8); }, 0, /share counter 5/],
  ];
  test.each(corrupt)('corrupt: %s: refused with the reason, re-initialised, the ring goes on at SET_VRING_BASE', (_name, damage, usedAdvance, why) => {
    const b = usedBlock(8, { usedIdx: 100, inflight: [[6, 9]] });
    damage(b);
    const r = recoverSplitQueue(b, 8, 8, 100 + usedAdvance, 777);
    expect(r.refused).toMatch(why);
    expect(r).toMatchObject({ fresh: true, lastAvailIdx: 777, counter: 1 });
    expect([...r.resubmit]).toEqual([]);
    // Re-initialised: a clean block in use, seeded from the ring.
    expect(b.readUInt16LE(8)).toBe(1);
    expect(b.readUInt16LE(14)).toBe((100 + usedAdvance) & 0xffff);
    expect(b.subarray(BLOCK_HEADER_BYTES).every((x) => x === 0)).toBe(true);
  });

  test('random bytes never throw; whatever is resubmitted is distinct, inside the ring, and no more than the ring', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: queueBlockBytes(16), maxLength: queueBlockBytes(16) }), fc.integer({ min: 0, max: 0xffff }), fc.boolean(), (bytes, usedIdx, validHeader) => {
        const b = Buffer.from(bytes);
        if (validHeader) {
          b.writeBigUInt64LE(0n, 0);
          b.writeUInt16LE(1, 8);
          b.writeUInt16LE(16, 10);
          b.writeUInt16LE(usedIdx, 14);
          for (let i = 0; i < 16; i++) b[E(i)] &= 1;
        }
        const r = recoverSplitQueue(b, 16, 8, usedIdx, 3);
        expect(new Set(r.resubmit).size).toBe(r.resubmit.length);
        for (const h of r.resubmit) expect(h).toBeLessThan(8);
        expect(((r.lastAvailIdx - usedIdx) & 0xffff) <= 8 || r.fresh).toBe(true);
        expect(Number.isSafeInteger(r.counter) && r.counter >= 1).toBe(true);
      }),
      { numRuns: 400 },
    );
  });
});

/**
 * A model of the split sequence (vhost-user.rst "Inflight I/O tracking") as this back-end runs
 * it, one store at a time, on a block and a used ring; crash(after) stops it after that many
 * stores. It mirrors SplitRing: pop marks counter then inflight; publish writes used elements
 * and next links, last_batch_head, used->idx (the commit), clears inflight, then used_idx.
 */
class Model {
  readonly block: Buffer;
  usedIdx = 0;
  readonly usedRing: number[] = [];
  counter = 1;
  lastBatchHead = 0;
  stores = 0;
  limit = Infinity;
  /** Avail entries the guest offered, in order, and how many the back-end has taken. */
  readonly avail: number[] = [];
  taken = 0;

  constructor(readonly size: number) {
    this.block = Buffer.alloc(queueBlockBytes(size));
    initSplitBlock(this.block, size, 0);
  }

  private store(fn: () => void): void {
    if (this.stores >= this.limit) throw new Crash();
    fn();
    this.stores++;
  }

  pop(): number {
    const head = this.avail[this.taken];
    const c = this.counter++;
    this.store(() => this.block.writeBigUInt64LE(BigInt(c), E(head) + 8));
    this.store(() => (this.block[E(head)] = 1));
    this.taken++;
    return head;
  }

  publish(heads: number[]): void {
    for (const h of heads) {
      this.store(() => (this.usedRing[this.usedIdx + heads.indexOf(h)] = h));
      const prev = this.lastBatchHead;
      this.store(() => this.block.writeUInt16LE(prev, E(h) + 6));
      this.lastBatchHead = h;
    }
    this.store(() => this.block.writeUInt16LE(this.lastBatchHead, 12));
    this.store(() => (this.usedIdx += heads.length));
    for (const h of heads) this.store(() => (this.block[E(h)] = 0));
    this.store(() => this.block.writeUInt16LE(this.usedIdx & 0xffff, 14));
  }
}

class Crash extends Error {}

/** A random workload: offers, pops and out-of-order batches of completions, on a ring of `size`. */
type Op = { offer: number[] } | { pop: number } | { publish: number[] };
function workload(size: number, seed: number): { ops: Op[] } {
  let s = seed;
  const rnd = (n: number): number => {
    s = (s * 1103515245 + 12345) & 0x7fffffff;
    return s % n;
  };
  const free = Array.from({ length: size }, (_, i) => i);
  const offers: number[] = [];
  const inflight: number[] = [];
  const ops: Op[] = [];
  let offered = 0;
  let popped = 0;
  for (let step = 0; step < 40; step++) {
    if (free.length > 0 && rnd(2) === 0) {
      const k = 1 + rnd(free.length);
      const heads: number[] = [];
      for (let i = 0; i < k; i++) heads.push(free.splice(rnd(free.length), 1)[0]);
      offers.push(...heads);
      ops.push({ offer: heads });
      offered += k;
    }
    if (popped < offered && rnd(3) !== 0) {
      const k = 1 + rnd(offered - popped);
      ops.push({ pop: k });
      for (let i = 0; i < k; i++) inflight.push(offers[popped + i]);
      popped += k;
    }
    if (inflight.length > 0 && rnd(2) === 0) {
      const batch: number[] = [];
      const k = 1 + rnd(inflight.length);
      for (let i = 0; i < k; i++) batch.push(inflight.splice(rnd(inflight.length), 1)[0]);
      ops.push({ publish: batch });
      free.push(...batch);
    }
  }
  return { ops };
}

function run(m: Model, w: { ops: Op[] }): void {
  for (const op of w.ops) {
    if ('offer' in op) m.avail.push(...op.offer);
    else if ('pop' in op) for (let i = 0; i < op.pop; i++) m.pop();
    else m.publish(op.publish);
  }
}

describe('a crash at every store of the submit/complete sequence', () => {
  test.each([1, 2, 3, 4, 5])('workload %i: every head offered is used exactly once or resubmitted, oldest first, the ring going on after them', (seed) => {
    const size = 8;
    const w = workload(size, seed);
    const full = new Model(size);
    run(full, w);
    const total = full.stores;
    expect(total).toBeGreaterThan(20);
    for (let crashAt = 0; crashAt <= total; crashAt++) {
      const m = new Model(size);
      m.limit = crashAt;
      try {
        run(m, w);
      } catch (e) {
        if (!(e instanceof Crash)) throw e;
      }
      // What QEMU 7.2 does on reconnect: SET_VRING_BASE = used->idx.
      const r = recoverSplitQueue(m.block, size, size, m.usedIdx, m.usedIdx);
      expect(r.refused).toBeNull();
      // Where the ring goes on: right after the last head whose mark was complete.
      expect(r.lastAvailIdx).toBe(m.taken);
      // Exactly once: what the used ring shows plus what is resubmitted = the avail entries taken.
      const usedHeads = m.usedRing.slice(0, m.usedIdx);
      const taken = m.avail.slice(0, m.taken);
      expect([...usedHeads, ...r.resubmit].sort((a, b) => a - b)).toEqual([...taken].sort((a, b) => a - b));
      // Oldest first: in the order they were taken from the avail ring.
      const order = [...r.resubmit].map((h) => taken.lastIndexOf(h));
      expect(order).toEqual([...order].sort((a, b) => a - b));
      expect(r.counter).toBeGreaterThan(0);
    }
  });
});

describe('native tracking (SplitRing) against the model', () => {
  const SIZE = 8;
  let ram: GuestRam;
  let vq: NativeVirtqueue;
  let fd: number;
  let region: InflightRegion;
  let ring: DriverRing;
  const segments = new Uint32Array(SIZE * MAX_SEGMENTS * SEGMENT_WORDS);
  const batch = new Uint32Array(SIZE * BATCH_WORDS);
  const used = new Uint32Array(SIZE * 2);

  beforeEach(() => {
    ram = new GuestRam();
    ring = new DriverRing(ram, SIZE);
    for (let i = 0; i < SIZE; i++) ring.setDesc(i, { addr: ram.alloc(16), len: 16 });
    vq = new native.Virtqueue();
    vq.configure({ memory: ram.table, ...ring.frontEndAddrs(), lastAvailIdx: 0, eventIdx: false, indirect: false, segments, batch, used });
    const c = createInflightFd(2, SIZE, 2);
    fd = c.fd;
    region = new InflightRegion(fd, c.description, 2);
  });
  afterEach(() => {
    vq.stop();
    region.release();
    native.close(fd);
    ram.close();
  });

  function attach(resubmit: number[] = [], lastAvailIdx = 0, counter = 1): void {
    vq.setInflight({ region: region.table, offset: region.blockOffset(1), descNum: SIZE, counter, lastAvailIdx, resubmit: Uint16Array.from(resubmit) });
  }

  function popHeads(max: number): number[] {
    const n = vq.pop(0, max);
    return Array.from({ length: Math.max(n, 0) }, (_, i) => batch[i * BATCH_WORDS]);
  }

  function push(heads: number[]): number {
    heads.forEach((h, i) => {
      used[2 * i] = h;
      used[2 * i + 1] = 1;
    });
    return vq.push(heads.length);
  }

  test.each([1, 2, 3, 4, 5])('workload %i: the block bytes equal the model after every pop and every publish', (seed) => {
    const block = region.block(1);
    initSplitBlock(block, SIZE, 0);
    attach();
    const w = workload(SIZE, seed);
    const m = new Model(SIZE);
    for (const op of w.ops) {
      if ('offer' in op) {
        for (const h of op.offer) ring.offer(h);
        m.avail.push(...op.offer);
        continue;
      }
      if ('pop' in op) {
        const got = popHeads(op.pop);
        const want = Array.from({ length: op.pop }, () => m.pop());
        expect(got).toEqual(want);
      } else {
        expect(push(op.publish)).toBe(op.publish.length);
        m.publish(op.publish);
      }
      expect(Buffer.compare(block.subarray(0, m.block.length), m.block)).toBe(0);
      expect(ring.usedIdx()).toBe(m.usedIdx & 0xffff);
    }
    expect(region.block(0).every((x) => x === 0)).toBe(true); // another queue's block: untouched
  });

  test('resubmitted heads are popped first, oldest first, before any avail entry; the avail ring goes on at lastAvailIdx', () => {
    initSplitBlock(region.block(1), SIZE, 0);
    // Guest view: heads 4, 6 offered at avail 0, 1 (in flight before the "crash"), then 1 at avail 2.
    ring.offer(4);
    ring.offer(6);
    ring.offer(1);
    attach([6, 4], 2, 10);
    expect(vq.state()).toMatchObject({ inflightTracked: true, resubmitPending: 2, inflight: 2 });
    expect(popHeads(1)).toEqual([6]);
    expect(popHeads(8)).toEqual([4, 1]);
    const b = region.block(1);
    expect(b[E(1)]).toBe(1);
    expect(b.readBigUInt64LE(E(1) + 8)).toBe(10n); // counters go on from where recovery said
    expect(push([4, 6, 1])).toBe(3);
    expect([4, 6, 1].map((h) => b[E(h)])).toEqual([0, 0, 0]);
    expect(b.readUInt16LE(14)).toBe(3);
  });

  test('pop(n, max, true) takes only resubmits (what GET_VRING_BASE drains), never the avail ring', () => {
    initSplitBlock(region.block(1), SIZE, 0);
    ring.offer(3);
    ring.offer(5);
    attach([3], 1);
    expect(vq.pop(0, SIZE, true)).toBe(1);
    expect(batch[0]).toBe(3);
    expect(vq.pop(0, SIZE, true)).toBe(0);
    expect(vq.state().lastAvailIdx).toBe(1);
  });

  test('an avail entry offering a head that is being resubmitted breaks the ring instead of running it twice', () => {
    initSplitBlock(region.block(1), SIZE, 0);
    ring.offer(2);
    ring.offer(2);
    attach([2], 1);
    expect(popHeads(8)).toEqual([2]);
    expect(vq.pop(0, 8)).toBe(-1);
    expect(vq.state().brokenReason).toMatch(/head 2 which is still in flight/);
  });

  test('setInflight refuses what does not fit and changes nothing', () => {
    const base = { region: region.table, offset: region.blockOffset(1), descNum: SIZE, counter: 1, lastAvailIdx: 0, resubmit: new Uint16Array(0) };
    expect(() => vq.setInflight({ ...base, offset: region.blockOffset(1) + 64 })).toThrow(/outside the region/);
    expect(() => vq.setInflight({ ...base, offset: 8 })).toThrow(/aligned/);
    expect(() => vq.setInflight({ ...base, descNum: SIZE / 2 })).toThrow(/fewer entries than the ring/);
    expect(() => vq.setInflight({ ...base, counter: 0 })).toThrow(/counter must be above 0/);
    expect(() => vq.setInflight({ ...base, resubmit: Uint16Array.from([SIZE]) })).toThrow(/outside the ring/);
    expect(() => vq.setInflight({ ...base, resubmit: Uint16Array.from([1, 1]) })).toThrow(/listed twice/);
    expect(() => vq.setInflight({ ...base, region: ram.table })).toThrow(/one mapped region/);
    expect(vq.state()).toMatchObject({ inflightTracked: false, inflight: 0, resubmitPending: 0 });
    ring.offer(0);
    expect(popHeads(8)).toEqual([0]); // still usable, untracked
    expect(region.block(1).every((x) => x === 0)).toBe(true);
  });

  test('a region unmapped under a running ring: the ring goes on untracked (no access to the unmapped block)', () => {
    initSplitBlock(region.block(1), SIZE, 0);
    attach();
    ring.offer(0);
    expect(popHeads(8)).toEqual([0]);
    region.release();
    expect(push([0])).toBe(1);
    expect(vq.state().inflightTracked).toBe(false);
    ring.offer(1);
    expect(popHeads(8)).toEqual([1]);
  });
});
