/**
 * Call and kick fds never block or spin a thread (issue 9, defect 1): the call write is
 * non-blocking (EAGAIN means the counter is already non-zero: the front-end will wake), and a
 * watched fd that hangs up or reaches EOF stops being watched and is reported once.
 */
import { execFileSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { native } from '../../native';
import { Req } from '../../vhost/protocol';
import { startBackend, TestBackend, until } from '../helpers/backend';
import { state, TestFrontend, u64 } from '../helpers/frontend';

let be: TestBackend;
let fe: TestFrontend;

afterEach(async () => {
  fe?.close();
  await be?.close();
});

/** The eventfd counter's largest value: one more write of 1 would block (or fail with EAGAIN). */
function fillCounter(fd: number): void {
  const v = Buffer.alloc(8);
  v.writeBigUInt64LE(0xfffffffffffffffen);
  expect(fs.writeSync(fd, v)).toBe(8);
}

async function fullCallFd(threads: number, q: number): Promise<void> {
  be = startBackend({ threads, num_queues: 2 });
  fe = new TestFrontend(be.socket);
  await fe.setup({ queues: 2, featureMask: ~(1n << 29n) }); // no event idx: every batch calls
  // A hostile front-end: a blocking eventfd as the call fd...
  const call = native.eventfd();
  native.setNonBlocking(call, false);
  native.close(fe.callFds[q]);
  fe.callFds[q] = call;
  fe.send(Req.SET_VRING_CALL, u64(BigInt(q)), [call]);
  await fe.call(Req.GET_QUEUE_NUM);
  // ...which the back-end made non-blocking (the flag belongs to the description we share:
  // setNonBlocking answers what it was, and puts it back)...
  expect(native.setNonBlocking(call, true)).toBe(true);
  // ...with its counter full, so that a blocking write of 1 would never return.
  fillCounter(call);
  try {
    expect(await fe.blk(q, 0, 0, { readLen: 512 })).toEqual({ status: 0, len: 513, data: Buffer.alloc(512) });
    expect(await fe.blk(q, 0, 8, { readLen: 512 })).toMatchObject({ status: 0, len: 513 });
    // The counter is untouched (full: the front-end is signalled anyway).
    expect(native.eventfdRead(call)).toBe(0xfffffffffffffffe);
    // And it still answers the front-end: the ring stops and reports where it was.
    fe.send(Req.SET_VRING_ENABLE, state(q, 0));
    const r = await fe.call(Req.GET_VRING_BASE, state(q, 0));
    expect(r.payload.readUInt32LE(4)).toBe(2);
  } finally {
    native.setNonBlocking(call, true);
    native.eventfdRead(call); // frees a thread stuck in write() (before the fix), so the suite ends
  }
}

describe('a call eventfd whose counter is full', () => {
  test('on a worker thread: requests complete and the daemon answers', () => fullCallFd(2, 1));
  test('on the main thread: requests complete and the daemon answers', () => fullCallFd(1, 0));
});

describe('FdWatcher on a fd that hangs up', () => {
  test('a FIFO whose writer went away: reported once with a non-zero status, then no more callbacks', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-fifo-'));
    const fifo = path.join(dir, 'kick');
    execFileSync('mkfifo', [fifo]);
    const rd = fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
    const wr = fs.openSync(fifo, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK);
    native.setNonBlocking(rd, false);
    const calls: number[] = [];
    const w = new native.FdWatcher(rd, (status) => calls.push(status), true);
    try {
      w.start();
      expect(native.setNonBlocking(rd, true)).toBe(true); // start() made it non-blocking
      native.setNonBlocking(rd, false);
      fs.writeSync(wr, Buffer.from('k'));
      fs.closeSync(wr); // POLLHUP from now on, forever
      await until(() => calls.some((s) => s !== 0), 'a hang-up report');
      const n = calls.length;
      await new Promise((r) => setTimeout(r, 100));
      expect(calls.length).toBe(n); // stopped watching: no spin
      expect(calls.filter((s) => s !== 0)).toHaveLength(1);
      expect(n).toBeLessThanOrEqual(2); // at most the byte's wake-up, then the report
    } finally {
      w.stop();
      fs.closeSync(rd);
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  test('an eventfd watcher still drains and calls back with status 0 for each wake-up', async () => {
    const efd = native.eventfd();
    const calls: number[] = [];
    const w = new native.FdWatcher(efd, (status) => calls.push(status), true);
    try {
      w.start();
      native.eventfdWrite(efd);
      native.eventfdWrite(efd);
      await until(() => calls.length > 0, 'a callback');
      await new Promise((r) => setTimeout(r, 20));
      expect(calls).toEqual([0]);
      expect(native.eventfdRead(efd)).toBe(0); // drained before the callback
    } finally {
      w.stop();
      native.close(efd);
    }
  });
});
