/** block/: the Request state machine, HwQueue dispatch and deferred completion, TagSet and Disk checks. */
import { Disk, validateBlockSize } from '../../block/disk';
import { CompletionSink, HwQueue } from '../../block/hw-queue';
import { BlkStatus, Operations, ReqOp } from '../../block/operations';
import { Request, RequestStateError } from '../../block/request';
import { TagSet } from '../../block/tag-set';
import { startBackend, TestBackend } from '../helpers/backend';
import { TestFrontend } from '../helpers/frontend';

class RecordingSink implements CompletionSink {
  ended: Array<[number, BlkStatus]> = [];
  timedOut: number[] = [];
  requestEnded(rq: Request): void {
    this.ended.push([rq.tag, rq.status]);
  }
  requestTimedOut(rq: Request): void {
    this.timedOut.push(rq.tag);
  }
}

function queueWith(ops: Operations): { hctx: HwQueue; sink: RecordingSink } {
  const hctx = new HwQueue(0, 8);
  const sink = new RecordingSink();
  hctx.attach(ops, sink);
  return { hctx, sink };
}

/** A driver that keeps every request it is given, for the test to act on. */
function holdingQueue(): { hctx: HwQueue; sink: RecordingSink; held: Request[] } {
  const held: Request[] = [];
  return { ...queueWith({ queueRq: (rq) => (held.push(rq), BlkStatus.Ok) }), held };
}

describe('Request ownership (refcount states as the merged Rust Request)', () => {
  test('queueRq receives one handle: refcount 2; end() takes it to 0 and publishes once', () => {
    const { hctx, sink, held } = holdingQueue();
    hctx.dispatch(hctx.requests[3], true, 0);
    expect(held[0].refcount).toBe(2);
    expect(hctx.inFlight).toBe(1);
    held[0].end(BlkStatus.Ok);
    expect(held[0].refcount).toBe(0);
    expect(sink.ended).toEqual([[3, BlkStatus.Ok]]);
    expect(hctx.inFlight).toBe(0);
  });

  test('ending twice throws and changes nothing', () => {
    const { hctx, sink, held } = holdingQueue();
    hctx.dispatch(hctx.requests[3], true, 0);
    held[0].end(BlkStatus.Ok);
    expect(() => held[0].end(BlkStatus.IoErr)).toThrow(RequestStateError);
    expect(() => held[0].end(BlkStatus.IoErr)).toThrow(/tag 3 on hardware queue 0 ended while it is not owned by the driver/);
    expect(sink.ended).toEqual([[3, BlkStatus.Ok]]);
    expect(held[0].status).toBe(BlkStatus.Ok);
  });

  test('ending while another handle exists throws and changes nothing; after drop() it works', () => {
    const { hctx, sink, held } = holdingQueue();
    hctx.dispatch(hctx.requests[1], true, 0);
    const other = held[0].clone();
    expect(held[0].refcount).toBe(3);
    expect(() => held[0].end(BlkStatus.Ok)).toThrow(/ended while 2 handles exist/);
    expect(held[0].refcount).toBe(3);
    expect(sink.ended).toEqual([]);
    other.drop();
    held[0].end(BlkStatus.Ok);
    expect(sink.ended).toEqual([[1, BlkStatus.Ok]]);
  });

  test('a request never started cannot be ended, cloned or completed', () => {
    const { hctx, sink } = queueWith({ queueRq: () => BlkStatus.Ok, complete: () => undefined });
    const rq = hctx.requests[0];
    expect(() => rq.end(BlkStatus.Ok)).toThrow(/not owned by the driver/);
    expect(() => rq.clone()).toThrow(/cloned while it is not owned/);
    expect(() => rq.complete()).toThrow(/completed while it is not owned/);
    expect(sink.ended).toEqual([]);
  });

  test('tagToRq(): a new handle for a request the driver owns, null otherwise', () => {
    const { hctx, held } = holdingQueue();
    expect(hctx.tagToRq(5)).toBeNull(); // idle tag
    expect(hctx.tagToRq(100)).toBeNull(); // no such tag
    hctx.dispatch(hctx.requests[5], true, 0);
    held[0].drop(); // driver owns it, no handle: refcount 1
    expect(held[0].refcount).toBe(1);
    expect(() => held[0].end(BlkStatus.Ok)).toThrow(/no handle is held/);
    const h = hctx.tagToRq(5)!;
    expect(h.refcount).toBe(2);
    h.end(BlkStatus.Ok);
    expect(hctx.tagToRq(5)).toBeNull();
  });

  test('leak()/reclaim(): a numeric handle survives a timer; stale after the tag is reused', () => {
    const { hctx, held } = holdingQueue();
    hctx.dispatch(hctx.requests[2], true, 0);
    const ref = held[0].leak();
    expect(hctx.reclaim(ref)).toBe(held[0]);
    held[0].end(BlkStatus.Ok);
    expect(hctx.reclaim(ref)).toBeNull(); // ended
    hctx.dispatch(hctx.requests[2], true, 0); // the tag serves a newer request
    expect(hctx.reclaim(ref)).toBeNull(); // the old handle must not reach it
    expect(hctx.reclaim(held[1].ref)).toBe(held[1]);
  });

  test('abort() ends whatever handles exist and makes leaked handles stale (a timeout)', () => {
    const { hctx, sink, held } = holdingQueue();
    hctx.dispatch(hctx.requests[4], true, 0);
    const ref = held[0].leak();
    held[0].clone();
    hctx.abort(held[0], BlkStatus.IoErr);
    expect(sink.ended).toEqual([[4, BlkStatus.IoErr]]);
    expect(hctx.reclaim(ref)).toBeNull();
    expect(() => held[0].end(BlkStatus.Ok)).toThrow(/not owned/); // a late completion is refused
    hctx.abort(held[0], BlkStatus.IoErr); // no-op: already the core's
    expect(sink.ended.length).toBe(1);
  });

  test('the generation changes each time a tag is reused', () => {
    const seen: number[] = [];
    const { hctx } = queueWith({ queueRq: (rq) => (seen.push(rq.generation), rq.end(BlkStatus.Ok), BlkStatus.Ok) });
    hctx.dispatch(hctx.requests[1], true, 0);
    hctx.dispatch(hctx.requests[1], true, 0);
    expect(seen).toEqual([1, 2]);
  });

  test('a status other than Ok from queueRq ends the request with it', () => {
    const { hctx, sink } = queueWith({ queueRq: () => BlkStatus.Unsupp });
    hctx.dispatch(hctx.requests[2], true, 0);
    expect(sink.ended).toEqual([[2, BlkStatus.Unsupp]]);
    expect(hctx.inFlight).toBe(0);
  });

  test('complete(): Operations.complete runs after the batch, not inside queueRq', () => {
    const order: string[] = [];
    const { hctx, sink } = queueWith({
      queueRq: (rq) => (order.push(`queue ${rq.tag}`), rq.complete(), BlkStatus.Ok),
      complete: (rq) => (order.push(`complete ${rq.tag}`), rq.end(BlkStatus.Ok)),
    });
    hctx.dispatch(hctx.requests[0], false, 0);
    hctx.dispatch(hctx.requests[1], true, 0);
    expect(sink.ended).toEqual([]);
    expect(hctx.hasDeferred).toBe(true);
    hctx.runDeferred();
    expect(order).toEqual(['queue 0', 'queue 1', 'complete 0', 'complete 1']);
    expect(sink.ended).toEqual([[0, BlkStatus.Ok], [1, BlkStatus.Ok]]);
  });

  test('complete() without a complete operation throws', () => {
    const { hctx, held } = holdingQueue();
    hctx.dispatch(hctx.requests[0], true, 0);
    expect(() => held[0].complete()).toThrow(/no complete operation/);
  });
});

describe('TagSet and Disk', () => {
  test('a disk has one hardware queue per tag-set queue, each with a Request per slot', () => {
    const ts = new TagSet({ nrHwQueues: 3, queueDepth: 16 });
    const disk = new Disk({ name: 'd', capacitySectors: 8, logicalBlockSize: 512, readOnly: false, serial: 's', flush: true, tagSet: ts, ops: { queueRq: () => BlkStatus.Ok } });
    expect(disk.hwQueues.map((q) => q.requests.length)).toEqual([1024, 1024, 1024]);
    expect(disk.hwQueues[2].requests[15].tag).toBe(15);
    expect(disk.hwQueues[2].tags).toBe(ts.tags[2]);
    expect(() => ts.tagsOf(3)).toThrow(/hardware queue 3 does not exist/);
    expect(() => new TagSet({ nrHwQueues: 0, queueDepth: 16 })).toThrow(RangeError);
    expect(() => new TagSet({ nrHwQueues: 1, queueDepth: 2048 })).toThrow(/1 to 1024/);
  });

  test('tags: two disks sharing a tag set share its in-flight budget', () => {
    const ts = new TagSet({ nrHwQueues: 1, queueDepth: 2 });
    const held: Request[] = [];
    const ops = { queueRq: (rq: Request) => (held.push(rq), BlkStatus.Ok) };
    const a = new Disk({ name: 'a', capacitySectors: 8, logicalBlockSize: 512, readOnly: false, serial: 's', flush: true, tagSet: ts, ops });
    const b = new Disk({ name: 'b', capacitySectors: 8, logicalBlockSize: 512, readOnly: false, serial: 's', flush: true, tagSet: ts, ops });
    a.hwQueues[0].attach(ops, new RecordingSink());
    b.hwQueues[0].attach(ops, new RecordingSink());
    a.hwQueues[0].dispatch(a.hwQueues[0].requests[0], true, 0);
    b.hwQueues[0].dispatch(b.hwQueues[0].requests[0], true, 0);
    expect(ts.tags[0].free).toBe(0);
    held[0].end(BlkStatus.Ok);
    expect(ts.tags[0].free).toBe(1);
  });

  test('block sizes: powers of two from 512 to 4096 only; capacity whole blocks', () => {
    for (const ok of [512, 1024, 2048, 4096]) expect(() => validateBlockSize(ok)).not.toThrow();
    for (const bad of [0, 256, 1000, 8192]) expect(() => validateBlockSize(bad)).toThrow(/power of two from 512 to 4096/);
    const base = { name: 'd', readOnly: false, serial: 's', flush: true, tagSet: new TagSet({ nrHwQueues: 1, queueDepth: 8 }), ops: { queueRq: () => BlkStatus.Ok } };
    expect(() => new Disk({ ...base, capacitySectors: 9, logicalBlockSize: 4096 })).toThrow(/whole number of 4096-byte blocks/);
    expect(() => new Disk({ ...base, capacitySectors: 8, logicalBlockSize: 4096, serial: 'x'.repeat(21) })).toThrow(/serial/);
  });
});

describe('a driver bug fails one request, not the daemon', () => {
  let be: TestBackend;
  let fe: TestFrontend;
  afterEach(async () => {
    fe.close();
    await be.close();
  });

  test('queueRq throwing: that request gets IOERR, the error is logged, the next one works', async () => {
    let calls = 0;
    const ops: Operations = {
      queueRq(rq) {
        if (calls++ === 0) throw new Error('driver exploded');
        if (rq.op === ReqOp.Read) for (let i = 0; i < rq.segCount; i++) rq.memory[rq.segments[rq.segBase + 4 * i]].fill(7, rq.segments[rq.segBase + 4 * i + 1], rq.segments[rq.segBase + 4 * i + 1] + rq.segments[rq.segBase + 4 * i + 2]);
        rq.end(BlkStatus.Ok);
        return BlkStatus.Ok;
      },
    };
    be = startBackend({}, ops);
    fe = new TestFrontend(be.socket);
    await fe.setup();
    expect(await fe.blk(0, 0, 0, { readLen: 512 })).toMatchObject({ status: 1, len: 1 });
    expect(be.logs.some((l) => l.msg === 'driver failed a request')).toBe(true);
    const r = await fe.blk(0, 0, 0, { readLen: 512 });
    expect(r.status).toBe(0);
    expect(r.data!.every((b) => b === 7)).toBe(true);
  });

  test('a request completed later (outside the batch) is published, and GET_VRING_BASE waits for it', async () => {
    const held: Request[] = [];
    be = startBackend({}, { queueRq: (rq) => (held.push(rq), BlkStatus.Ok) });
    fe = new TestFrontend(be.socket);
    await fe.setup();
    const p = fe.blk(0, 0, 0, { readLen: 512 });
    await new Promise((r) => setTimeout(r, 20));
    expect(fe.rings[0].usedIdx()).toBe(0);
    const base = fe.call(11 /* GET_VRING_BASE */, Buffer.from([0, 0, 0, 0, 0, 0, 0, 0]));
    let answered = false;
    void base.then(() => (answered = true));
    await new Promise((r) => setTimeout(r, 20));
    expect(answered).toBe(false); // still waiting for the in-flight request
    held[0].end(BlkStatus.Ok);
    expect((await base).payload.readUInt32LE(4)).toBe(1);
    expect(await p).toMatchObject({ status: 0, len: 513 });
  });
});

describe('timeouts', () => {
  test('a request older than the timeout fails with IOERR; younger ones are left alone', () => {
    const { hctx, sink, held } = holdingQueue();
    hctx.attach({ queueRq: (rq) => (held.push(rq), BlkStatus.Ok) }, sink, 100);
    hctx.dispatch(hctx.requests[0], false, 1e9);
    hctx.dispatch(hctx.requests[1], true, 1.05e9);
    hctx.checkTimeouts(1.1e9 + 1); // 100 ms after the first started
    expect(sink.timedOut).toEqual([0]);
    expect(sink.ended).toEqual([[0, BlkStatus.IoErr]]);
    expect(() => held[0].end(BlkStatus.Ok)).toThrow(/not owned/); // late completion refused
    held[1].end(BlkStatus.Ok);
    expect(sink.ended).toEqual([[0, BlkStatus.IoErr], [1, BlkStatus.Ok]]);
    hctx.detach();
  });

  test('the highest tag dispatched is checked too (the check stops above it, not below)', () => {
    const { hctx, sink, held } = holdingQueue();
    hctx.attach({ queueRq: (rq) => (held.push(rq), BlkStatus.Ok) }, sink, 100);
    hctx.dispatch(hctx.requests[7], false, 1e9); // the last tag of the 8
    hctx.dispatch(hctx.requests[2], true, 1e9);
    hctx.checkTimeouts(1.2e9);
    expect(sink.timedOut).toEqual([2, 7]);
    expect(sink.ended).toEqual([[2, BlkStatus.IoErr], [7, BlkStatus.IoErr]]);
    hctx.detach();
  });

  test("the driver's timeout operation decides: 'reset' restarts the clock", () => {
    const sink = new RecordingSink();
    const hctx = new HwQueue(0, 8);
    let calls = 0;
    hctx.attach({ queueRq: () => BlkStatus.Ok, timeout: () => (calls++ === 0 ? 'reset' : 'done') }, sink, 100);
    hctx.dispatch(hctx.requests[0], true, 0);
    hctx.checkTimeouts(2e8);
    expect(calls).toBe(1);
    hctx.checkTimeouts(2.5e8); // reset at 2e8: not yet due
    expect(calls).toBe(1);
    hctx.checkTimeouts(3.1e8);
    expect(calls).toBe(2);
    expect(sink.ended).toEqual([]); // 'done' without ending: the driver's business
    hctx.detach();
  });

  test('initHctx/exitHctx run on attach/detach', () => {
    const log: string[] = [];
    const hctx = new HwQueue(1, 8);
    hctx.attach({ queueRq: () => BlkStatus.Ok, initHctx: (h) => log.push(`init ${h.index}`), exitHctx: (h) => log.push(`exit ${h.index}`) }, new RecordingSink());
    hctx.detach();
    expect(log).toEqual(['init 1', 'exit 1']);
  });
});
