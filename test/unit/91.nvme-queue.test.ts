/**
 * The NVMe queue pair (drivers/nvme/queue.ts) against a fake, memory-backed controller: SQEs and
 * command ids, one SQ doorbell per batch, completions by phase tag across wrap-around, one CQ
 * doorbell per completion batch, and the command-id generation that drops late completions.
 */
import { CQE_SIZE, SQE_SIZE, NvmOpcode, readWrite } from '../../drivers/nvme/command';
import { QueuePair, TAG_BITS } from '../../drivers/nvme/queue';
import type { Completion } from '../../drivers/nvme/command';
import { postCqe } from '../helpers/fake-nvme';

/** A fake controller: consumes SQEs on demand and posts CQEs with the right phase. */
class FakeController {
  readonly sq: Uint8Array;
  readonly cq: Uint8Array;
  readonly sqTails: number[] = [];
  readonly cqHeads: number[] = [];
  sqHead = 0;
  cqTail = 0;
  phase = 1;
  constructor(readonly entries: number) {
    this.sq = new Uint8Array(entries * SQE_SIZE);
    this.cq = new Uint8Array(entries * CQE_SIZE);
  }
  get doorbells(): { sqTail(v: number): void; cqHead(v: number): void } {
    return { sqTail: (v) => this.sqTails.push(v), cqHead: (v) => this.cqHeads.push(v) };
  }
  /** Takes the SQEs up to the last rung tail; returns their command ids. */
  fetch(): number[] {
    const tail = this.sqTails.at(-1) ?? 0;
    const cids: number[] = [];
    const v = new DataView(this.sq.buffer);
    while (this.sqHead !== tail) {
      cids.push(v.getUint16(this.sqHead * SQE_SIZE + 2, true));
      this.sqHead = (this.sqHead + 1) % this.entries;
    }
    return cids;
  }
  /** Posts a completion for `cid` with `status` (without the phase bit). */
  post(cid: number, status = 0, dw0 = 0): void {
    postCqe(this, cid, status, dw0);
  }
}

function setup(entries = 8, stale: string[] = []): { hw: FakeController; qp: QueuePair<string> } {
  const hw = new FakeController(entries);
  const qp = new QueuePair<string>({
    qid: 1,
    entries,
    sq: hw.sq,
    cq: hw.cq,
    doorbells: hw.doorbells,
    onStale: (_q, c, reason) => stale.push(`0x${c.cid.toString(16)}: ${reason}`),
  });
  return { hw, qp };
}

const rw = (slba: number) => readWrite(NvmOpcode.Read, 1, slba, 8, 0x10000);

describe('QueuePair', () => {
  test('writes the SQE with a fresh cid and rings the SQ doorbell once per batch', () => {
    const { hw, qp } = setup();
    const a = qp.submit(rw(5), 'a');
    const b = qp.submit(rw(6), 'b');
    expect(hw.sqTails).toEqual([]); // nothing rung before commit
    expect(qp.commit()).toBe(true);
    expect(qp.commit()).toBe(false); // nothing new
    expect(hw.sqTails).toEqual([2]);
    const v = new DataView(hw.sq.buffer);
    expect(v.getUint8(0)).toBe(NvmOpcode.Read);
    expect(v.getUint16(2, true)).toBe(a);
    expect(v.getUint32(40, true)).toBe(5); // CDW10: SLBA low
    expect(v.getUint16(SQE_SIZE + 2, true)).toBe(b);
    expect(a & ((1 << TAG_BITS) - 1)).not.toBe(b & ((1 << TAG_BITS) - 1));
    expect(a >>> TAG_BITS).toBe(1); // first use of a tag: generation 1
  });

  test('completions by phase tag across several wraps; one CQ doorbell per batch', () => {
    const { hw, qp } = setup(4);
    const done: string[] = [];
    for (let round = 0; round < 5; round++) {
      const ids = [qp.submit(rw(round), `r${round}a`), qp.submit(rw(round), `r${round}b`), qp.submit(rw(round), `r${round}c`)];
      expect(qp.submit(rw(0), 'overflow')).toBe(-1); // entries - 1 in flight at most
      qp.commit();
      expect(hw.fetch()).toEqual(ids);
      hw.post(ids[1]!);
      hw.post(ids[0]!);
      const before = hw.cqHeads.length;
      expect(qp.poll((ctx) => done.push(ctx))).toBe(2);
      expect(hw.cqHeads.length).toBe(before + 1);
      expect(qp.poll((ctx) => done.push(ctx))).toBe(0); // no new phase: nothing, no doorbell
      expect(hw.cqHeads.length).toBe(before + 1);
      hw.post(ids[2]!);
      expect(qp.poll((ctx) => done.push(ctx))).toBe(1);
      expect(qp.inFlight).toBe(0);
    }
    expect(done).toHaveLength(15);
    expect(done.slice(0, 3)).toEqual(['r0b', 'r0a', 'r0c']);
    expect(qp.stats.completed).toBe(15);
    // 15 CQEs in a 4-slot ring: the head went round several times.
    expect(hw.cqHeads.at(-1)).toBe(15 % 4);
  });

  test('a completion for an abandoned command is dropped; the reused tag gets a new generation', () => {
    const stale: string[] = [];
    const { hw, qp } = setup(2, stale); // one tag: every command reuses it
    const first = qp.submit(rw(1), 'first');
    qp.commit();
    hw.fetch();
    expect(qp.abandon(first)).toBe('first'); // e.g. timed out
    const second = qp.submit(rw(2), 'second');
    expect(second & 0xfff).toBe(first & 0xfff);
    expect(second >>> TAG_BITS).toBe((first >>> TAG_BITS) + 1);
    qp.commit();
    hw.fetch();
    hw.post(first); // the late completion of the first command
    hw.post(second);
    const done: [string, Completion][] = [];
    expect(qp.poll((ctx, c) => done.push([ctx, c]))).toBe(2);
    expect(done.map(([ctx]) => ctx)).toEqual(['second']);
    expect(qp.stats.stale).toBe(1);
    expect(stale).toEqual([`0x${first.toString(16)}: generation 1 of tag 0, expected 2`]);
  });

  test('a completion for a tag not in flight, or out of range, is dropped and logged', () => {
    const stale: string[] = [];
    const { hw, qp } = setup(4, stale);
    const a = qp.submit(rw(1), 'a');
    qp.commit();
    hw.fetch();
    hw.post(a);
    hw.post(a); // duplicate
    hw.post(0xfff); // tag beyond capacity
    const done: string[] = [];
    expect(qp.poll((ctx) => done.push(ctx))).toBe(3);
    expect(done).toEqual(['a']);
    expect(qp.stats.stale).toBe(2);
    expect(stale[0]).toMatch(/not in flight/);
    expect(stale[1]).toMatch(/out of range/);
    expect(hw.cqHeads).toEqual([3]); // one doorbell for the three
  });

  test('the generation wraps after 16 uses of a tag', () => {
    const { hw, qp } = setup(2);
    const gens: number[] = [];
    for (let i = 0; i < 20; i++) {
      const cid = qp.submit(rw(i), `c${i}`);
      gens.push(cid >>> TAG_BITS);
      qp.commit();
      hw.fetch();
      hw.post(cid);
      expect(qp.poll(() => undefined)).toBe(1);
    }
    expect(gens.slice(0, 17)).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1]);
    expect(qp.stats.stale).toBe(0);
  });

  test('a completion batch is capped, and the status reaches the caller', () => {
    const hw = new FakeController(16);
    const qp = new QueuePair<number>({ qid: 3, entries: 16, sq: hw.sq, cq: hw.cq, doorbells: hw.doorbells, maxBatch: 4 });
    const cids = Array.from({ length: 10 }, (_, i) => qp.submit(rw(i), i));
    qp.commit();
    hw.fetch();
    for (const cid of cids) hw.post(cid, cid === cids[9] ? 0x4002 : 0); // last one: DNR + invalid field
    const got: [number, number][] = [];
    expect(qp.poll((ctx, c) => got.push([ctx, c.status]))).toBe(4);
    expect(qp.poll((ctx, c) => got.push([ctx, c.status]))).toBe(4);
    expect(qp.poll((ctx, c) => got.push([ctx, c.status]))).toBe(2);
    expect(hw.cqHeads).toEqual([4, 8, 10]);
    expect(got.at(-1)).toEqual([9, 0x4002]);
    expect(qp.outstanding()).toEqual([]);
  });

  test('a bad command field uses no tag and writes nothing', () => {
    const { hw, qp } = setup(4);
    expect(() => qp.submit({ opcode: 0x02, prp1: 3 }, 'misaligned PRP')).toThrow(RangeError);
    expect(qp.inFlight).toBe(0);
    expect(qp.commit()).toBe(false);
    expect(hw.sq.every((b) => b === 0)).toBe(true);
    expect(() => new QueuePair({ qid: 1, entries: 8, sq: new Uint8Array(64), cq: hw.cq, doorbells: hw.doorbells })).toThrow(RangeError);
  });
});
