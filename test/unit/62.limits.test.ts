/**
 * issue 9, limits a guest or a configuration could overrun: the request timer's FIFO, the
 * bandwidth throttle after timeouts, completion_nsec against io_timeout, the disk size, and the
 * driver's failure logs.
 */
import { HwQueue } from '../../block/hw-queue';
import { BlkStatus } from '../../block/operations';
import type { Request } from '../../block/request';
import { RequestTimer } from '../../block/request-timer';
import { ConfigError, loadConfig } from '../../config/load';
import { Throttle } from '../../drivers/null/throttle';
import { native } from '../../native';
import { startBackend, TestBackend, until } from '../helpers/backend';
import { TestFrontend } from '../helpers/frontend';
import { GuestRam } from '../helpers/guest-ram';

describe('RequestTimer: entries of aborted requests never push live ones out', () => {
  test('a request aborted and resubmitted while its entry is queued: every live request still expires on time', async () => {
    const hctx = new HwQueue(0, 2);
    const ended: number[] = [];
    hctx.attach({ queueRq: () => BlkStatus.Ok }, { requestEnded: (rq) => ended.push(rq.tag), requestTimedOut: () => undefined });
    const expired: number[] = [];
    let stale = 0;
    const timer = new RequestTimer(
      hctx,
      (rq: Request) => {
        expired.push(rq.tag);
        rq.end(BlkStatus.Ok);
      },
      () => stale++,
    );
    try {
      const [a, b] = hctx.requests;
      const now = native.monotonicNs();
      hctx.dispatch(a, false, now);
      timer.schedule(a, now + 30e6);
      hctx.dispatch(b, true, now);
      timer.schedule(b, now + 30e6);
      hctx.abort(b, BlkStatus.IoErr); // timed out: its entry stays queued
      hctx.dispatch(b, true, now + 1e6); // the guest resubmits on the same tag
      timer.schedule(b, now + 40e6);
      expect(timer.pending).toBeLessThanOrEqual(2);
      // Aborted and resubmitted again: the FIFO is full of one live and one stale entry.
      hctx.abort(b, BlkStatus.IoErr);
      hctx.dispatch(b, true, now + 2e6);
      timer.schedule(b, now + 45e6);
      expect(timer.pending).toBeLessThanOrEqual(2);
      await until(() => expired.length === 2, 'both live requests to expire', 2000);
      expect(expired.sort()).toEqual([0, 1]);
      expect(ended.sort()).toEqual([0, 1, 1, 1]); // b's two aborts and its last run, a once
      expect(hctx.inFlight).toBe(0);
      expect(timer.pending).toBe(0);
      expect(stale).toBe(2);
    } finally {
      timer.close();
      hctx.detach();
    }
  });

  test('more live entries than the queue depth are refused, not written past the end', () => {
    const hctx = new HwQueue(0, 2);
    hctx.attach({ queueRq: () => BlkStatus.Ok }, { requestEnded: () => undefined, requestTimedOut: () => undefined });
    const timer = new RequestTimer(hctx, (rq) => rq.end(BlkStatus.Ok), () => undefined);
    try {
      const [a, b] = hctx.requests;
      const now = native.monotonicNs();
      hctx.dispatch(a, false, now);
      hctx.dispatch(b, true, now);
      timer.schedule(a, now + 1e9);
      timer.schedule(b, now + 1e9);
      // A driver bug scheduling a live request twice: the FIFO has no room.
      expect(() => timer.schedule(a, now + 1e9)).toThrow(RangeError);
      expect(timer.pending).toBe(2);
    } finally {
      timer.close();
      hctx.detach();
    }
  });
});

test('Throttle: a reservation never ends further ahead than maxAheadNs', () => {
  const t = new Throttle(1, 0, 100e6); // 1 MiB/s, 100 ms ahead at most
  expect(t.reserve(1e9, 1048576)).toBeCloseTo(1e9 + 100e6, -2);
  expect(t.reserve(1e9, 4096)).toBeCloseTo(1e9 + 100e6, -2); // never backwards
  expect(t.reserve(2e9, 4096)).toBeCloseTo(2e9 + 4096 * (1e9 / 1048576), -2);
});

describe('throttle (mbps) after timeouts', () => {
  let be: TestBackend;
  let fe: TestFrontend;
  afterEach(async () => {
    fe.close();
    await be.close();
  });

  test('a deep queue beyond the bandwidth, timed out and resubmitted: the resubmitted requests complete', async () => {
    // 1 MiB/s: 256 reads of 4 KiB need 1 s, five times io_timeout.
    be = startBackend({ num_queues: 1, mbps: 1, io_timeout: 200 });
    fe = new TestFrontend(be.socket, new GuestRam([{ gpa: 0, size: 16 << 20, uaddr: 0x7f0000000000 }]));
    await fe.setup({ queueSize: 1024 });
    const N = 256;
    const first = fe.offerReads(N, { bytes: 4096 });
    await fe.waitUsedIdx(0, N, 10000);
    const second = fe.offerReads(N, { bytes: 4096, sector: 4096 });
    await fe.waitUsedIdx(0, 2 * N, 10000);
    const ok = (sts: number[]): number => sts.filter((a) => fe.ram.bytes(a, 1)[0] === 0).length;
    expect(ok(second)).toBe(N);
    expect(ok(first)).toBe(N);
  });
});

describe('configuration', () => {
  test('completion_nsec at or above io_timeout is refused (every request would time out first)', () => {
    expect(() => loadConfig(undefined, { irqmode: 2, completion_nsec: 1_000_000_000, io_timeout: 1000 })).toThrow(ConfigError);
    expect(() => loadConfig(undefined, { irqmode: 2, completion_nsec: 2_000_000_000, io_timeout: 1000 })).toThrow(
      /completion_nsec: 2000000000 ns is not below io_timeout 1000 ms/,
    );
    expect(loadConfig(undefined, { irqmode: 2, completion_nsec: 999_999_999, io_timeout: 1000 }).disks[0].completion_nsec).toBe(999_999_999);
    expect(loadConfig(undefined, { irqmode: 2, completion_nsec: 5_000_000_000, io_timeout: 0 }).disks[0].io_timeout).toBe(0); // no timeout
  });
});

describe('disk size (defect 12)', () => {
  let be: TestBackend;
  let fe: TestFrontend;
  afterEach(async () => {
    fe?.close();
    await be?.close();
  });

  test('size stays below 2^53 bytes (at most 8589934591 MiB): beyond, byte positions are not exact numbers', () => {
    expect(() => loadConfig(undefined, { size: 8589934592 })).toThrow(/size: expected at most 8589934591 MiB \(the capacity must stay below 2\^53 bytes\): value was 8589934592/);
    expect(() => loadConfig(undefined, { size: 2 ** 40 })).toThrow(ConfigError);
    expect(loadConfig(undefined, { size: 8589934591 }).disks[0].size).toBe(8589934591);
  });

  test('the largest disk: its last sector is written and read back', async () => {
    be = startBackend({ size: 8589934591, num_queues: 1 });
    fe = new TestFrontend(be.socket);
    await fe.setup();
    const last = 8589934591 * 2048 - 1;
    const data = Buffer.alloc(512, 0x5a);
    expect((await fe.blk(0, 1, last, { data })).status).toBe(0);
    expect((await fe.blk(0, 0, last, { readLen: 512 })).data!.equals(data)).toBe(true);
    expect((await fe.blk(0, 0, last + 1, { readLen: 512 })).status).toBe(1); // past the end
  });

  test('driver failures are logged at most 10 a second per queue, with a count of the ones left out', async () => {
    let thrown = 0;
    be = startBackend({ num_queues: 1 }, {
      queueRq() {
        thrown++;
        throw new Error('driver bug');
      },
    });
    fe = new TestFrontend(be.socket);
    await fe.setup({ queueSize: 256 });
    for (let round = 0; round < 4; round++) {
      fe.offerReads(50, { bytes: 512, sector: 0 });
      await fe.waitUsedIdx(0, 50 * (round + 1));
    }
    expect(thrown).toBe(200);
    const lines = () => be.logs.filter((l) => String(l.msg).startsWith('driver failed a request'));
    expect(lines().length).toBeLessThanOrEqual(10);
    expect(lines().length).toBeGreaterThan(0);
    // A second later the next failure is logged again, saying how many were left out.
    await new Promise((r) => setTimeout(r, 1100));
    fe.offerReads(1, { bytes: 512 });
    await fe.waitUsedIdx(0, 201);
    const last = lines()[lines().length - 1];
    expect(last.suppressed).toBe(200 - (lines().length - 1));
  });
});
