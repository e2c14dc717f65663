/**
 * Socket I/O never blocks the daemon's thread (issue 9, defect 4): messages are assembled as
 * bytes arrive, with an absolute deadline per message, fds kept with the message they came with,
 * and replies sent without waiting (a front-end that does not read them is disconnected).
 */
import { execFileSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { native } from '../../native';
import { Req } from '../../vhost/protocol';
import { startBackend, TestBackend, until } from '../helpers/backend';
import { header, state, TestFrontend } from '../helpers/frontend';

const backends: TestBackend[] = [];
const frontends: TestFrontend[] = [];
const rawFds: number[] = [];
let dir: string;

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-sockio-'));
});

afterEach(async () => {
  for (const f of frontends.splice(0)) f.close();
  for (const fd of rawFds.splice(0)) native.close(fd);
  for (const b of backends.splice(0)) await b.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

function backend(): TestBackend {
  const b = startBackend();
  backends.push(b);
  return b;
}

function frontend(b: TestBackend): TestFrontend {
  const f = new TestFrontend(b.socket);
  frontends.push(f);
  return f;
}

/** Records the longest gap between ticks of a 20 ms interval: a blocked event loop shows here. */
function tickMonitor(): { maxGapMs: () => number; stop: () => void } {
  let last = Date.now();
  let max = 0;
  const t = setInterval(() => {
    const now = Date.now();
    max = Math.max(max, now - last);
    last = now;
  }, 20);
  return { maxGapMs: () => Math.max(max, Date.now() - last), stop: () => clearInterval(t) };
}

const hasLog = (b: TestBackend, re: RegExp): boolean => b.logs.some((l) => re.test(String(l.msg)));

/**
 * A FIFO's write end to send, and its read end to learn whether every copy of the write end was
 * closed: reading gives EOF only then (EAGAIN while a writer remains).
 */
function fifoPair(): { write: number; writersGone: () => boolean } {
  const p = path.join(dir, `fifo${rawFds.length}`);
  execFileSync('mkfifo', [p]);
  const r = fs.openSync(p, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
  const w = fs.openSync(p, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK);
  rawFds.push(r);
  return {
    write: w,
    writersGone: () => {
      try {
        return fs.readSync(r, Buffer.alloc(1), 0, 1, null) === 0;
      } catch {
        return false; // EAGAIN: a writer is still open
      }
    },
  };
}

describe('a front-end that stalls mid-message', () => {
  test('header, then one payload byte every 1.5 s: disconnected at the 2 s deadline while another disk keeps being served', async () => {
    const slowBe = backend();
    const otherBe = backend();
    const other = frontend(otherBe);
    await other.setup();
    const slow = frontend(slowBe);
    await slow.getU64(Req.GET_QUEUE_NUM);

    const ticks = tickMonitor();
    const payload = state(0, 64);
    let sentBytes = 0;
    const t0 = Date.now();
    slow.sendBytes(header(Req.SET_VRING_NUM, payload.length));
    const drip = setInterval(() => {
      if (sentBytes < payload.length && !slow.closed) slow.sendBytes(payload.subarray(sentBytes, ++sentBytes));
    }, 1500);
    let servedWhileStalled = 0;
    try {
      while (!slow.closed && Date.now() - t0 < 6000) {
        expect(await other.blk(0, 0, 0, { readLen: 512 })).toMatchObject({ status: 0 });
        if (!slow.closed) servedWhileStalled++;
        await new Promise((r) => setTimeout(r, 10));
      }
      await slow.waitClosed(1000);
    } finally {
      clearInterval(drip);
      ticks.stop();
    }
    const closedAfter = Date.now() - t0;
    expect(closedAfter).toBeGreaterThanOrEqual(1900);
    expect(closedAfter).toBeLessThan(4000);
    expect(sentBytes).toBeLessThan(payload.length);
    await until(() => hasLog(slowBe, /SET_VRING_NUM message not complete 2000 ms after its first byte/), 'deadline log');
    expect(servedWhileStalled).toBeGreaterThan(5);
    expect(ticks.maxGapMs()).toBeLessThan(1000);
    // The stalled disk serves the next front-end.
    const next = frontend(slowBe);
    await next.setup();
    expect(await next.blk(0, 0, 0, { readLen: 512 })).toMatchObject({ status: 0 });
  });

  test('a partial header that never completes is dropped at the deadline too', async () => {
    const be = backend();
    const fe = frontend(be);
    const ticks = tickMonitor();
    const t0 = Date.now();
    fe.sendBytes(header(Req.GET_FEATURES, 0).subarray(0, 5));
    await fe.waitClosed(5000);
    ticks.stop();
    expect(Date.now() - t0).toBeGreaterThanOrEqual(1900);
    expect(ticks.maxGapMs()).toBeLessThan(1000);
    await until(() => hasLog(be, /message not complete 2000 ms after its first byte \(5 bytes received\)/), 'deadline log');
  });
});

describe('fds stay with their message', () => {
  test('an fd arriving mid-payload ends the connection, and the daemon closes it', async () => {
    const be = backend();
    const fe = frontend(be);
    await fe.getU64(Req.GET_QUEUE_NUM);
    const fifo = fifoPair();
    fe.sendBytes(header(Req.SET_VRING_CALL, 8));
    await new Promise((r) => setTimeout(r, 20));
    fe.sendBytes(Buffer.alloc(8), [fifo.write]);
    fs.closeSync(fifo.write);
    await fe.waitClosed();
    await until(() => hasLog(be, /fds arrived in the middle of a message/), 'mid-message fd log');
    await until(fifo.writersGone, 'the daemon to close the fd');
    const next = frontend(be);
    await next.setup();
  });

  test('more fds than a message may carry end the connection; every one of them is closed', async () => {
    const be = backend();
    const fe = frontend(be);
    await fe.getU64(Req.GET_QUEUE_NUM);
    const fifos = Array.from({ length: 9 }, () => fifoPair());
    const p = fe.memTablePayload();
    fe.sendBytes(Buffer.concat([header(Req.SET_MEM_TABLE, p.length), p]), fifos.map((f) => f.write));
    for (const f of fifos) fs.closeSync(f.write);
    await fe.waitClosed();
    await until(() => hasLog(be, /9 fds on one message, at most 8/), 'too many fds log');
    await until(() => fifos.every((f) => f.writersGone()), 'the daemon to close every fd');
  });

  test('the fds of a refused message are closed (a version error on a message with an fd)', async () => {
    const be = backend();
    const fe = frontend(be);
    const fifo = fifoPair();
    fe.sendBytes(Buffer.concat([header(Req.SET_VRING_CALL, 8, 0x2), Buffer.alloc(8)]), [fifo.write]);
    fs.closeSync(fifo.write);
    await fe.waitClosed();
    await until(fifo.writersGone, 'the daemon to close the fd');
  });
});

describe('a front-end that never reads its replies', () => {
  test('does not stall the daemon: disconnected once its socket is full, the next front-end is served', async () => {
    const be = backend();
    const fd = native.connectUnix(be.socket);
    rawFds.push(fd);
    const req = header(Req.GET_FEATURES, 0);
    const ticks = tickMonitor();
    const end = Date.now() + 15000;
    let sent = 0;
    try {
      outer: while (!hasLog(be, /does not read its replies/) && Date.now() < end) {
        for (let i = 0; i < 64; i++) {
          try {
            if (native.sendMessage(fd, req, req.length) === 0) break;
          } catch {
            break outer; // the daemon hung up
          }
          sent++;
        }
        await new Promise((r) => setTimeout(r, 1));
      }
    } finally {
      ticks.stop();
    }
    await until(() => hasLog(be, /vhost-user connection closed: front-end does not read its replies/), 'disconnect log');
    expect(sent).toBeGreaterThan(50);
    expect(ticks.maxGapMs()).toBeLessThan(1000);
    const next = frontend(be);
    await next.setup();
    expect(await next.blk(0, 0, 0, { readLen: 512 })).toMatchObject({ status: 0 });
  });
});
