/**
 * Shadow doorbells (drivers/nvme/shadow-doorbell.ts, QueuePair with setShadow): the event-index
 * test at the wrap-around edges against a plain model of the circular window; the order of one
 * update (shadow store, fence, EventIdx load); a queue whose EventIdx says "no MMIO" gets none,
 * one that says "MMIO" gets it, one whose EventIdx was never written gets every write; and the
 * driver against the fake controller modelled on QEMU 7.2 (it runs only when an MMIO doorbell
 * write came, reads the shadow tail, writes the EventIdx): nothing is lost whether the fake
 * writes EventIdx entries or not, and after a controller reset no EventIdx from before the reset
 * suppresses a needed write (the fake would never see the commands: the hang this guards);
 * NvmeController sending Doorbell Buffer Config after the queues exist and again after a reset.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { HwQueue, type CompletionSink } from '../../block/hw-queue';
import { BlkStatus, ReqOp } from '../../block/operations';
import { CQE_SIZE, SQE_SIZE } from '../../drivers/nvme/command';
import { ConfigError, loadConfig } from '../../config/load';
import type { DiskConfig } from '../../config/disk-schema';
import { checkSharedController } from '../../daemon/nvme-disk';
import { NvmeController, type LogFn } from '../../drivers/nvme/controller';
import { NvmeDriver } from '../../drivers/nvme/driver';
import type { IdentifyNamespace } from '../../drivers/nvme/identify';
import { QueuePair } from '../../drivers/nvme/queue';
import { DOORBELL_BUFFER_BYTES, DoorbellBuffer, EVENT_IDX_UNKNOWN, needEvent, type ShadowDoorbell } from '../../drivers/nvme/shadow-doorbell';
import type { NativeGuestMemory } from '../../native';
import { vfioFence } from '../../native/vfio';
import { dispatchSegments } from '../helpers/dispatch';
import { FakeController, postCqe, type FakeCq } from '../helpers/fake-nvme';
import { FakeVfioDevice } from '../helpers/fake-vfio-device';

/** The circular window [old, new) of a ring of `entries`: does it hold `ei`? */
function inWindow(ei: number, oldIdx: number, newIdx: number, entries: number): boolean {
  return (ei - oldIdx + entries) % entries < (newIdx - oldIdx + entries) % entries;
}

describe('needEvent: (u16)(new - ei - 1) < (u16)(new - old)', () => {
  test.each([2, 3, 7, 16, 33])('every (ei, old, new) of a %i-entry ring agrees with the circular window', (entries) => {
    const wrong: number[][] = [];
    for (let ei = 0; ei < entries; ei++) {
      for (let o = 0; o < entries; o++) for (let n = 0; n < entries; n++) if (needEvent(ei, n, o, entries) !== inWindow(ei, o, n, entries)) wrong.push([ei, o, n]);
    }
    expect(wrong).toEqual([]);
  });

  test('the driver\'s ring sizes (1024, 4097) around the wrap', () => {
    for (const entries of [1024, 4097]) {
      const edge = [0, 1, 2, entries - 3, entries - 2, entries - 1];
      for (const ei of edge) for (const o of edge) for (const n of edge) expect(needEvent(ei, n, o, entries)).toBe(inWindow(ei, o, n, entries));
    }
  });

  test('16-bit wrap-around edges (a 65536-entry ring: indexes are full u16 values)', () => {
    const E = 65536;
    // Window [65534, 1): 65534, 65535, 0.
    expect(needEvent(65534, 1, 65534, E)).toBe(true);
    expect(needEvent(65535, 1, 65534, E)).toBe(true);
    expect(needEvent(0, 1, 65534, E)).toBe(true);
    expect(needEvent(1, 1, 65534, E)).toBe(false); // the new value itself is not passed
    expect(needEvent(65533, 1, 65534, E)).toBe(false); // behind the old value
    // Window [65535, 0): only 65535.
    expect(needEvent(65535, 0, 65535, E)).toBe(true);
    expect(needEvent(0, 0, 65535, E)).toBe(false);
    // The whole ring but one.
    expect(needEvent(32768, 65535, 0, E)).toBe(true);
    expect(needEvent(65535, 65535, 0, E)).toBe(false);
    for (const [ei, o, n] of [[65535, 65530, 3], [2, 65530, 3], [3, 65530, 3], [65529, 65530, 3], [100, 65530, 3]] as const) expect(needEvent(ei, n, o, E)).toBe(inWindow(ei, o, n, E));
  });

  test('an EventIdx that is no index of the ring (never written: EVENT_IDX_UNKNOWN, or garbage) says ring; nothing moved says not', () => {
    for (const [n, o] of [[1, 0], [5, 3], [0, 15]]) {
      expect(needEvent(EVENT_IDX_UNKNOWN, n!, o!, 16)).toBe(true);
      expect(needEvent(16, n!, o!, 16)).toBe(true);
      expect(needEvent(0xffff, n!, o!, 16)).toBe(true);
      expect(needEvent(-1, n!, o!, 16)).toBe(true);
    }
    expect(needEvent(3, 3, 3, 16)).toBe(false);
  });
});

describe('DoorbellBuffer: the layout of the doorbell registers, one page each', () => {
  test('queue qid: SQ entry at 2 x qid x stride, CQ entry at (2 x qid + 1) x stride; reset fills shadow 0 and EventIdx unknown', () => {
    const sh = new Uint8Array(DOORBELL_BUFFER_BYTES).fill(7);
    const ei = new Uint8Array(DOORBELL_BUFFER_BYTES);
    const b = new DoorbellBuffer(sh, ei, 4, () => undefined);
    expect(b.forQueue(1)).toMatchObject({ sqOffset: 8, cqOffset: 12 });
    expect(b.forQueue(3)).toMatchObject({ sqOffset: 24, cqOffset: 28 });
    expect(new DoorbellBuffer(sh, ei, 16, () => undefined).forQueue(2)).toMatchObject({ sqOffset: 64, cqOffset: 80 });
    expect(b.fits(511)).toBe(true);
    expect(b.fits(512)).toBe(false);
    expect(() => b.forQueue(512)).toThrow(RangeError);
    b.reset();
    expect(sh.every((x) => x === 0)).toBe(true);
    const v = new DataView(ei.buffer);
    for (let at = 0; at < DOORBELL_BUFFER_BYTES; at += 4) expect(v.getUint32(at, true)).toBe(EVENT_IDX_UNKNOWN);
    const q = b.forQueue(2);
    q.shadow.setUint32(q.sqOffset, 9, true);
    q.eventIdx.setUint32(q.cqOffset, 4, true);
    b.resetQueue(2);
    expect(q.shadow.getUint32(q.sqOffset, true)).toBe(0);
    expect(q.eventIdx.getUint32(q.cqOffset, true)).toBe(EVENT_IDX_UNKNOWN);
    expect(() => new DoorbellBuffer(sh.subarray(0, 100), ei, 4, () => undefined)).toThrow(RangeError);
  });

  test('the native fence is there (x86 MFENCE between the shadow store and the EventIdx load)', () => {
    expect(typeof vfioFence).toBe('function');
    expect(vfioFence()).toBeUndefined();
  });
});

/** A queue pair with shadow entries for qid 1, doorbell writes recorded. */
function shadowedQueue(entries = 16): { qp: QueuePair<number>; e: ShadowDoorbell; mmio: string[]; order: string[]; cq: FakeCq } {
  const sh = new Uint8Array(DOORBELL_BUFFER_BYTES);
  const ei = new Uint8Array(DOORBELL_BUFFER_BYTES);
  const order: string[] = [];
  const b = new DoorbellBuffer(sh, ei, 4, () => void order.push('fence'));
  b.reset();
  const mmio: string[] = [];
  const cqMem = new Uint8Array(entries * CQE_SIZE);
  const qp = new QueuePair<number>({ qid: 1, entries, sq: new Uint8Array(entries * SQE_SIZE), cq: cqMem, doorbells: { sqTail: (v) => void mmio.push(`sq ${v}`), cqHead: (v) => void mmio.push(`cq ${v}`) } });
  const e = b.forQueue(1);
  qp.setShadow(e);
  return { qp, e, mmio, order, cq: { cq: cqMem, entries, cqTail: 0, phase: 1, sqHead: 0 } };
}

const submitN = (qp: QueuePair<number>, n: number): number[] => Array.from({ length: n }, (_, i) => qp.submitIo(2, 1, 0x10000, 0, i, 0, 0, 0, i));

describe('QueuePair with shadow doorbells', () => {
  test('the EventIdx was never written: every SQ tail and CQ head goes to the register too (and to the shadow entry)', () => {
    const { qp, e, mmio, cq } = shadowedQueue();
    const cids = submitN(qp, 3);
    qp.commit();
    expect(e.shadow.getUint32(e.sqOffset, true)).toBe(3);
    submitN(qp, 2);
    qp.commit();
    for (const cid of cids) postCqe(cq, cid);
    expect(qp.reap(() => undefined)).toBe(3);
    expect(e.shadow.getUint32(e.cqOffset, true)).toBe(3);
    expect(mmio).toEqual(['sq 3', 'sq 5', 'cq 3']);
    expect(qp.stats).toMatchObject({ sqDoorbells: 2, cqDoorbells: 1, sqDoorbellsSkipped: 0, cqDoorbellsSkipped: 0 });
  });

  test('an EventIdx outside [old, new): no MMIO write, the value in the shadow entry; one inside: the write', () => {
    const { qp, e, mmio } = shadowedQueue();
    submitN(qp, 2);
    qp.commit(); // EventIdx unknown: rung
    e.eventIdx.setUint32(e.sqOffset, 0, true); // the controller has read tail 0 only: it is still at work
    submitN(qp, 3);
    qp.commit(); // 2 -> 5 does not pass 0
    expect(e.shadow.getUint32(e.sqOffset, true)).toBe(5);
    expect(mmio).toEqual(['sq 2']);
    e.eventIdx.setUint32(e.sqOffset, 5, true); // it caught up with tail 5 and wants to hear of more
    submitN(qp, 1);
    qp.commit();
    expect(mmio).toEqual(['sq 2', 'sq 6']);
    expect(qp.stats).toMatchObject({ sqDoorbells: 2, sqDoorbellsSkipped: 1 });
  });

  test('around the ring\'s wrap: old 14, new 1 of 16 entries passes EventIdx 15 and 0, not 1 or 13', () => {
    for (const [ei, rung] of [[15, true], [0, true], [14, true], [1, false], [13, false]] as const) {
      const { qp, e, mmio, cq } = shadowedQueue(16);
      // Walk the tail to 14 (and complete everything, to free the tags).
      for (const n of [10, 4]) {
        for (const cid of submitN(qp, n)) postCqe(cq, cid);
        qp.commit();
        qp.reap(() => undefined);
      }
      mmio.length = 0;
      e.eventIdx.setUint32(e.sqOffset, ei, true);
      submitN(qp, 3); // 14 -> 1
      qp.commit();
      expect([ei, mmio]).toEqual([ei, rung ? ['sq 1'] : []]);
    }
  });

  test('CQ head: an EventIdx behind the batch: no write; at the old head: the write', () => {
    const { qp, e, mmio, cq } = shadowedQueue();
    const cids = submitN(qp, 6);
    qp.commit();
    postCqe(cq, cids[0]!);
    postCqe(cq, cids[1]!);
    qp.reap(() => undefined); // unknown: rung (head 2)
    e.eventIdx.setUint32(e.cqOffset, 1, true); // the controller knew head 1 when it last posted
    postCqe(cq, cids[2]!);
    qp.poll(() => undefined); // 2 -> 3 does not pass 1
    e.eventIdx.setUint32(e.cqOffset, 3, true);
    postCqe(cq, cids[3]!);
    qp.reap(() => undefined); // 3 -> 4 passes 3
    expect(mmio).toEqual(['sq 6', 'cq 2', 'cq 4']);
    expect(e.shadow.getUint32(e.cqOffset, true)).toBe(4);
    expect(qp.stats).toMatchObject({ cqDoorbells: 2, cqDoorbellsSkipped: 1 });
  });

  test('order: the shadow value is stored before the fence and the EventIdx loaded after it', () => {
    const { qp, e, mmio, order } = shadowedQueue();
    submitN(qp, 1);
    qp.commit();
    e.eventIdx.setUint32(e.sqOffset, 0, true); // stale: 1 -> 2 would not pass it
    // The controller finishes and writes EventIdx 1 exactly while the host fences: a load
    // before the fence would see 0 and leave out the write the controller now waits for.
    order.length = 0;
    const fence = e.fence;
    e.fence = (): void => {
      order.push(`fence with shadow ${e.shadow.getUint32(e.sqOffset, true)}`);
      e.eventIdx.setUint32(e.sqOffset, 1, true);
      fence();
    };
    submitN(qp, 1);
    qp.commit();
    expect(order).toEqual(['fence with shadow 2', 'fence']);
    expect(mmio).toEqual(['sq 1', 'sq 2']);
  });

  test('setShadow(null): the registers only again', () => {
    const { qp, e, mmio } = shadowedQueue();
    e.eventIdx.setUint32(e.sqOffset, 9, true);
    qp.setShadow(null);
    expect(qp.shadowed).toBe(false);
    submitN(qp, 2);
    qp.commit();
    expect(mmio).toEqual(['sq 2']);
    expect(e.shadow.getUint32(e.sqOffset, true)).toBe(0);
  });
});

describe('the driver against the fake controller (QEMU 7.2 model) with shadow doorbells', () => {
  const MEMORY = { regionLayout: () => [{ size: 1 << 20, firstChunk: 0, hostPageOffset: 0 }] } as unknown as NativeGuestMemory;
  const NS = { nsze: 1 << 20, blockSize: 512, dlfeat: 1 } as IdentifyNamespace;
  const GUEST = Buffer.alloc(1 << 20);
  const tick = (): Promise<void> => new Promise((r) => setImmediate(r));
  const drivers: NvmeDriver[] = [];
  afterEach(() => {
    for (const d of drivers.splice(0)) d.close(); // their poll loops stop
  });

  async function setup(offer: { updatesEventIdx: boolean } | null, on: boolean | 'default' = true): Promise<{ hw: FakeController; driver: NvmeDriver; hctx: HwQueue; ended: Array<[number, BlkStatus]> }> {
    const hw = new FakeController();
    hw.offerShadow = offer;
    const driver = await NvmeDriver.open({ controller: hw as unknown as NvmeController, nsid: 1, namespace: NS, queues: 1, entries: 64, poll: true, log: () => undefined, shadowDoorbells: on === 'default' ? undefined : on });
    drivers.push(driver);
    const ended: Array<[number, BlkStatus]> = [];
    const sink: CompletionSink = { requestEnded: (rq) => ended.push([rq.tag, rq.status]), requestTimedOut: () => undefined };
    const hctx = new HwQueue(0, 64);
    hctx.attach(driver, sink);
    driver.memoryMapped(MEMORY);
    return { hw, driver, hctx, ended };
  }
  const read = (hctx: HwQueue, tag: number, isLast = true): void => void dispatchSegments(hctx, tag, ReqOp.Read, tag * 8, [[tag * 4096, 4096]], GUEST, isLast);

  test('a controller that writes EventIdx: a batch published while it has not run yet gets no MMIO write, and it still sees every command', async () => {
    const { hw, driver, hctx, ended } = await setup({ updatesEventIdx: true });
    expect(driver.stats()[0]!.shadowDoorbells).toBe(true);
    read(hctx, 0);
    expect(hw.sqTails).toEqual([1]); // EventIdx unknown yet: rung
    const first = hw.fetch(); // it ran: EventIdx 1
    expect(first.map((c) => c.cdw10)).toEqual([0]);
    read(hctx, 1);
    expect(hw.sqTails).toEqual([1, 2]); // 1 -> 2 passes EventIdx 1: rung
    read(hctx, 2, false);
    read(hctx, 3, true);
    expect(hw.sqTails).toEqual([1, 2]); // it has not run since: 2 -> 4 passes nothing it asked for
    const cmds = hw.fetch(); // it runs (for the MMIO write of 2) and reads the shadow tail 4
    expect(cmds.map((c) => c.cdw10)).toEqual([8, 16, 24]);
    // Completions: the first batch's head is rung (EventIdx unknown); later the fake's CQ
    // EventIdx is the head it knew before the batch, which the next heads do not pass.
    hw.complete(first[0]!.cid);
    hw.complete(cmds[0]!.cid);
    await tick();
    hw.complete(cmds[1]!.cid);
    await tick();
    hw.complete(cmds[2]!.cid);
    await tick();
    expect(ended.map(([t]) => t)).toEqual([0, 1, 2, 3]);
    expect(ended.every(([, s]) => s === BlkStatus.Ok)).toBe(true);
    expect(hw.cqHeads).toEqual([2]);
    expect(hw.cqHeadSeen).toBe(3); // read from the shadow entry when it posted the last completion
    expect(driver.stats()[0]).toMatchObject({ sqDoorbells: 2, sqDoorbellsSkipped: 1, cqDoorbells: 1, cqDoorbellsSkipped: 2, inFlight: 0 });
    expect(hw.fences).toBe(6); // one per doorbell update
  });

  test('a controller that accepts the buffers and never writes EventIdx: every doorbell is an MMIO write; nothing is lost', async () => {
    const { hw, driver, hctx, ended } = await setup({ updatesEventIdx: false });
    const seen: number[] = [];
    for (let round = 0; round < 5; round++) {
      read(hctx, 2 * round, false);
      read(hctx, 2 * round + 1, true);
      read(hctx, 40 + round, true);
      const cmds = hw.fetch();
      seen.push(...cmds.map((c) => c.cdw10 / 8));
      for (const c of cmds) hw.complete(c.cid);
      await tick();
    }
    expect(seen).toEqual([0, 1, 40, 2, 3, 41, 4, 5, 42, 6, 7, 43, 8, 9, 44]);
    expect(ended).toHaveLength(15);
    const st = driver.stats()[0]!;
    expect(st).toMatchObject({ shadowDoorbells: true, sqDoorbellsSkipped: 0, cqDoorbellsSkipped: 0, sqDoorbells: 10 });
    expect(st.cqDoorbells).toBeGreaterThanOrEqual(5);
  });

  test('after a controller reset the EventIdx entries start over: the first doorbell is an MMIO write (a stale EventIdx would hang the queue)', async () => {
    const { hw, driver, hctx, ended } = await setup({ updatesEventIdx: true });
    read(hctx, 0);
    const c0 = hw.fetch();
    expect(c0).toHaveLength(1); // EventIdx 1 now
    await driver.resetController('test'); // tag 0 requeued and resubmitted at tail 0 -> 1
    expect(hw.resets).toBe(1);
    expect(hw.sqTails).toEqual([1]); // (the fake's record starts over) unknown after the reset: rung; EventIdx 1 would have said 0 -> 1 needs none
    const again = hw.fetch();
    expect(again.map((c) => c.cdw10)).toEqual([0]);
    hw.complete(again[0]!.cid);
    await tick();
    expect(ended).toEqual([[0, BlkStatus.Ok]]);

    // The guarded failure, shown on the same fake: a stale EventIdx (1, from before a reset)
    // with a ring started over at 0 leaves out the write, and the fake never runs.
    const { hw: hw2, hctx: hctx2 } = await setup({ updatesEventIdx: true });
    read(hctx2, 0);
    hw2.fetch();
    const e = hw2.shadow!.buffer.forQueue(1);
    const stale = e.eventIdx.getUint32(e.sqOffset, true);
    await hw2.reset(() => undefined);
    e.eventIdx.setUint32(e.sqOffset, stale, true); // what a reset that did not start the buffers over would leave
    hw2.sqTails.length = 0;
    read(hctx2, 5);
    expect(hw2.sqTails).toEqual([]);
    expect(hw2.fetch()).toEqual([]); // the command is never seen
  });

  test('shadowDoorbells false or not given (the default), or a controller that does not offer them: the registers only', async () => {
    for (const [offer, on] of [[{ updatesEventIdx: true }, false], [{ updatesEventIdx: true }, 'default'], [null, true]] as const) {
      const { hw, driver, hctx } = await setup(offer, on);
      expect(hw.shadow).toBeNull();
      expect(driver.stats()[0]).toMatchObject({ shadowDoorbells: false });
      read(hctx, 0, false);
      read(hctx, 1, true);
      expect(hw.sqTails).toEqual([2]);
      expect(hw.fetch()).toHaveLength(2);
      expect(hw.fences).toBe(0);
    }
  });
});

/**
 * A fake NVMe controller behind a fake VFIO device, for NvmeController's part: registers, the
 * admin queue (Identify with OACS, Number of Queues, Create CQ/SQ, Doorbell Buffer Config), and
 * the I/O SQ doorbell registers recorded. Polled admin completions (no MSI-X).
 */
class DbbcDevice extends FakeVfioDevice {
  readonly events: string[] = [];
  /** I/O SQ tail register writes: "qid:tail". */
  readonly mmio: string[] = [];
  dbbc: { prp1: number; prp2: number } | null = null;
  cc = 0;
  csts = 0;
  private aqa = 0;
  private asq = 0;
  private acq = 0;
  private sqHead = 0;
  private cqTail = 0;
  private phase = 1;
  constructor(private readonly o: { oacs: number; refuseDbbc?: boolean }) {
    super();
  }
  read32(_bar: number, off: number): number {
    const cap = 0x7ffn | (1n << 16n) | (1n << 24n) | (1n << 37n) | (4n << 52n); // DSTRD 0: stride 4
    if (off === 0x00) return Number(cap & 0xffffffffn);
    if (off === 0x04) return Number(cap >> 32n);
    if (off === 0x08) return 0x10400;
    if (off === 0x14) return this.cc;
    if (off === 0x1c) return this.csts;
    return 0;
  }
  write32(_bar: number, off: number, v: number): void {
    if (off === 0x14) {
      const was = this.cc & 1;
      this.cc = v;
      if ((v & 1) === 1 && was === 0) {
        this.events.push('CC.EN=1');
        this.sqHead = 0;
        this.cqTail = 0;
        this.phase = 1;
        setTimeout(() => (this.csts |= 1), 1);
      } else if ((v & 1) === 0 && was === 1) {
        this.events.push('CC.EN=0');
        this.dbbc = null; // a controller reset forgets the buffers (QEMU 7.2: nvme_ctrl_reset)
        setTimeout(() => (this.csts &= ~1), 1);
      }
      if (((v >>> 14) & 3) === 1) setTimeout(() => (this.csts = (this.csts & ~0xc) | (2 << 2)), 1);
    } else if (off === 0x24) this.aqa = v;
    else if (off === 0x28) this.asq = v;
    else if (off === 0x30) this.acq = v;
    else if (off === 0x1000) this.admin(v);
    else if (off > 0x1000 && (off - 0x1000) % 8 === 0) this.mmio.push(`${(off - 0x1000) / 8}:${v}`);
  }
  configRead(): number {
    return 0;
  }
  configWrite(): void {}
  setMsix(): void {}
  close(): void {}
  private admin(tail: number): void {
    const entries = (this.aqa & 0xfff) + 1;
    while (this.sqHead !== tail) {
      const sqe = new DataView(this.mem(this.asq + this.sqHead * 64, 64).slice().buffer);
      this.sqHead = (this.sqHead + 1) % entries;
      const opcode = sqe.getUint8(0);
      const cid = sqe.getUint16(2, true);
      const prp1 = Number(sqe.getBigUint64(24, true));
      const prp2 = Number(sqe.getBigUint64(32, true));
      const cdw10 = sqe.getUint32(40, true);
      let dw0 = 0;
      let status = 0;
      if (opcode === 0x06) {
        const out = this.mem(prp1, 4096);
        out.fill(0);
        if (cdw10 === 1) {
          out.set(Buffer.from('dbbc-fake'.padEnd(20)), 4);
          new DataView(out.buffer, out.byteOffset).setUint16(256, this.o.oacs, true);
        }
      } else if (opcode === 0x09) dw0 = (3 << 16) | 3;
      else if (opcode === 0x05) this.events.push(`Create CQ ${cdw10 & 0xffff}`);
      else if (opcode === 0x01) this.events.push(`Create SQ ${cdw10 & 0xffff}`);
      else if (opcode === 0x7c) {
        this.events.push('Doorbell Buffer Config');
        if (this.o.refuseDbbc === true) status = 0x4002; // Invalid Field, DNR
        else this.dbbc = { prp1, prp2 };
      }
      const at = this.acq + this.cqTail * 16;
      const cq = new DataView(this.mem(at, 16).slice().buffer);
      cq.setUint32(0, dw0, true);
      cq.setUint32(8, this.sqHead, true);
      cq.setUint32(12, (cid | (this.phase << 16) | (status << 17)) >>> 0, true);
      this.mem(at, 16).set(new Uint8Array(cq.buffer));
      this.cqTail = (this.cqTail + 1) % entries;
      if (this.cqTail === 0) this.phase ^= 1;
    }
  }
}

describe('NvmeController.enableShadowDoorbells and its reset', () => {
  const open = (o: { oacs: number; refuseDbbc?: boolean }, log: LogFn = () => undefined): Promise<[NvmeController, DbbcDevice]> => {
    const dev = new DbbcDevice(o);
    return NvmeController.attach(dev, { bdf: '0000:00:04.0', ioQueues: 3, interrupts: false, log }).then((c) => [c, dev]);
  };
  const eventIdxAt = (dev: DbbcDevice, off: number): number => new DataView(dev.mem(dev.dbbc!.prp2, 4096).slice().buffer).getUint32(off, true);

  test('OACS bit 8: Doorbell Buffer Config after the queues exist, two distinct aligned pages, EventIdx "unknown"; each queue publishes through its entries', async () => {
    const [c, dev] = await open({ oacs: 0x100 });
    try {
      const q1 = await c.createIoQueuePair<number>(1, 16, 'poll');
      const q2 = await c.createIoQueuePair<number>(2, 16, 'poll');
      expect(await c.enableShadowDoorbells()).toBe(true);
      expect(c.shadowDoorbells).toBe(true);
      expect(dev.events.slice(-1)).toEqual(['Doorbell Buffer Config']);
      const { prp1, prp2 } = dev.dbbc!;
      expect(prp1 % 4096).toBe(0);
      expect(prp2 % 4096).toBe(0);
      expect(prp1).not.toBe(prp2);
      expect([prp1, prp2]).toEqual([c.doorbellBuffer!.shadow.iova, c.doorbellBuffer!.eventIdx.iova]);
      for (let off = 0; off < 4096; off += 4) expect(eventIdxAt(dev, off)).toBe(EVENT_IDX_UNKNOWN);
      expect([q1.qp.shadowed, q2.qp.shadowed, c.admin.qp.shadowed]).toEqual([true, true, false]);
      q2.qp.submitIo(2, 1, 0x10000, 0, 0, 0, 0, 0, 7);
      q2.qp.commit();
      expect(new DataView(dev.mem(prp1, 4096).slice().buffer).getUint32(16, true)).toBe(1); // SQ 2 entry: 2 x 2 x 4
      expect(dev.mmio).toEqual(['2:1']); // EventIdx unknown: rung
      // The controller says it has read tail 0 only (still at work): the next tail is not rung.
      new DataView(dev.mem(prp2, 4096).buffer, dev.mem(prp2, 4096).byteOffset).setUint32(16, 0, true);
      q2.qp.submitIo(2, 1, 0x10000, 0, 1, 0, 0, 0, 8);
      q2.qp.commit();
      expect(dev.mmio).toEqual(['2:1']);
      expect(q2.qp.stats).toMatchObject({ sqDoorbells: 1, sqDoorbellsSkipped: 1 });

      // A queue created later: its entries start over before the controller creates it.
      const sh = dev.mem(prp1, 4096);
      new DataView(sh.buffer, sh.byteOffset).setUint32(24, 99, true);
      const q3 = await c.createIoQueuePair<number>(3, 16, 'poll');
      expect(q3.qp.shadowed).toBe(true);
      expect(new DataView(sh.slice().buffer).getUint32(24, true)).toBe(0);
      expect(eventIdxAt(dev, 24)).toBe(EVENT_IDX_UNKNOWN);

      // Reset: the controller forgets the buffers at CC.EN=0; the EventIdx entries start over
      // (a stale "0" would leave out the first write after the reset), the queues are created
      // again, then Doorbell Buffer Config again.
      dev.events.length = 0;
      dev.mmio.length = 0;
      await c.reset(() => undefined);
      expect(dev.events).toEqual(['CC.EN=0', 'CC.EN=1', 'Create CQ 1', 'Create SQ 1', 'Create CQ 2', 'Create SQ 2', 'Create CQ 3', 'Create SQ 3', 'Doorbell Buffer Config']);
      expect(dev.dbbc).toEqual({ prp1, prp2 });
      expect(eventIdxAt(dev, 16)).toBe(EVENT_IDX_UNKNOWN);
      q2.qp.submitIo(2, 1, 0x10000, 0, 2, 0, 0, 0, 9);
      q2.qp.commit();
      expect(dev.mmio).toEqual(['2:1']);
    } finally {
      await c.shutdown();
    }
  });

  test('no OACS bit 8: nothing sent, the registers only', async () => {
    const [c, dev] = await open({ oacs: 0 });
    try {
      const q = await c.createIoQueuePair<number>(1, 16, 'poll');
      expect(await c.enableShadowDoorbells()).toBe(false);
      expect(dev.events).not.toContain('Doorbell Buffer Config');
      expect(q.qp.shadowed).toBe(false);
      expect(c.doorbellBuffer).toBeNull();
    } finally {
      await c.shutdown();
    }
  });

  test('refused: false, logged, the registers only', async () => {
    const logs: string[] = [];
    const [c, dev] = await open({ oacs: 0x100, refuseDbbc: true }, (level, msg) => logs.push(`${level} ${msg}`));
    try {
      const q = await c.createIoQueuePair<number>(1, 16, 'poll');
      expect(await c.enableShadowDoorbells()).toBe(false);
      expect(dev.events).toContain('Doorbell Buffer Config');
      expect(q.qp.shadowed).toBe(false);
      expect(logs.some((l) => /^warn .*Doorbell Buffer Config.*registers only/.test(l))).toBe(true);
      q.qp.submitIo(2, 1, 0x10000, 0, 0, 0, 0, 0, 1);
      q.qp.commit();
      expect(dev.mmio).toEqual(['1:1']);
    } finally {
      await c.shutdown();
    }
  });
});

describe('config: shadow_doorbells', () => {
  const file = (content: unknown): string => {
    const p = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-dbbuf-')), 'vm.json');
    fs.writeFileSync(p, JSON.stringify(content));
    return p;
  };

  test('driver nvme: default false; true from a file or the flag; refused with the null driver; the namespaces of one controller must agree', () => {
    expect(loadConfig(undefined, { driver: 'nvme', pci: '0000:00:04.0' }).disks[0]).toMatchObject({ shadow_doorbells: false });
    expect(loadConfig(undefined, { driver: 'nvme', pci: '0000:00:04.0', shadow_doorbells: true }).disks[0]).toMatchObject({ shadow_doorbells: true });
    expect(loadConfig(file({ disks: [{ driver: 'nvme', pci: '0000:00:04.0', socket: '/tmp/d.sock', shadow_doorbells: true }] }), {}).disks[0]).toMatchObject({ shadow_doorbells: true });
    expect(() => loadConfig(file({ disks: [{ shadow_doorbells: true }] }), {})).toThrow(ConfigError);
    expect(() => loadConfig(file({ disks: [{ shadow_doorbells: true }] }), {})).toThrow(/shadow_doorbells: applies to driver "nvme" only/);
    const base = { name: 'a', pci: '0000:00:05.0', nsid: 1, num_queues: 2, hw_queue_depth: 64, nvme_poll: false, shadow_doorbells: true } as DiskConfig;
    expect(() => checkSharedController([base, { ...base, name: 'b', nsid: 2, shadow_doorbells: false }])).toThrow(/shadow_doorbells differ/);
  });
});
