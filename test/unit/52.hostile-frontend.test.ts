/**
 * A hostile front-end on the socket (issue 9, "also from reading"): reserved payload bits of
 * SET_VRING_KICK/CALL/ERR are refused, and a handler still pending when its connection closes
 * neither maps memory nor starts rings after the close.
 */
import { native } from '../../native';
import { Req } from '../../vhost/protocol';
import { startBackend, TestBackend, until } from '../helpers/backend';
import { TestFrontend, u64 } from '../helpers/frontend';

let be: TestBackend | undefined;
let fe: TestFrontend | undefined;

afterEach(async () => {
  fe?.close();
  fe = undefined;
  await be?.close();
  be = undefined;
});

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

describe('SET_VRING_KICK/CALL/ERR payload: bits 0-7 index, bit 8 no-fd, the rest reserved', () => {
  const cases: Array<[string, number, string]> = [
    ['SET_VRING_CALL', Req.SET_VRING_CALL, '200'],
    ['SET_VRING_CALL', Req.SET_VRING_CALL, '10000'],
    ['SET_VRING_KICK', Req.SET_VRING_KICK, '100000000'],
    ['SET_VRING_ERR', Req.SET_VRING_ERR, '8000000000000000'],
  ];
  test.each(cases)('%s (request %i) with reserved bits 0x%s is refused; the next front-end is served', async (name, req, hex) => {
    const bits = BigInt(`0x${hex}`);
    be = startBackend();
    fe = new TestFrontend(be.socket);
    await fe.setup();
    const ev = native.eventfd();
    try {
      fe.send(req, u64(bits), [ev]);
      await fe.waitClosed();
    } finally {
      native.close(ev);
    }
    await until(() => be!.logs.some((l) => l.level === 50 && new RegExp(`${name}: reserved bits set in 0x${bits.toString(16)}`).test(String(l.msg))), 'error log');
    fe.close();
    fe = new TestFrontend(be.socket);
    await fe.setup();
    expect(await fe.blk(0, 0, 0, { readLen: 512 })).toMatchObject({ status: 0 });
  });

  test('index and the no-fd flag are still accepted (SET_VRING_CALL without an fd)', async () => {
    be = startBackend();
    fe = new TestFrontend(be.socket);
    await fe.setup();
    fe.send(Req.SET_VRING_CALL, u64(0x100n));
    expect(await fe.getU64(Req.GET_QUEUE_NUM)).toBe(2n);
  });
});

describe('a handler pending when the connection closes does not go on', () => {
  /**
   * A front-end with a read in flight for 400 ms (timer completion mode), so a message that
   * must first stop the running ring stays pending that long.
   */
  async function withSlowRequest(threads = 1): Promise<void> {
    be = startBackend({ irqmode: 2, completion_nsec: 400_000_000, num_queues: threads, threads });
    fe = new TestFrontend(be.socket);
    await fe.setup({ queues: threads });
    for (let q = 0; q < threads; q++) fe.offerReads(1, { q });
    await until(() => be!.device.vrings.every((r) => r.queue.isRunning), 'rings running');
    await sleep(30); // the read is popped and in flight
  }

  async function closeWhilePending(): Promise<void> {
    await sleep(50); // the handler is waiting for the ring to stop
    const closedAt = be!.logs.length;
    await be!.server.close();
    await sleep(600); // past the in-flight read: a handler that went on has acted by now
    expect(be!.device.hasMemory).toBe(false);
    expect(be!.device.vrings.every((r) => !r.queue.isRunning)).toBe(true);
    expect(be!.device.vrings[0].kickFd).toBe(-1);
    const after = be!.logs.slice(closedAt).map((l) => String(l.msg));
    expect(after.some((m) => /vhost-user connection closed: daemon shutting down/.test(m))).toBe(true);
    expect(after.filter((m) => /guest memory mapped|ring started/.test(m))).toEqual([]);
  }

  test.each([1, 2])('SET_MEM_TABLE pending (stopping running rings), threads %i: maps nothing after the close', async (threads) => {
    await withSlowRequest(threads);
    fe!.send(Req.SET_MEM_TABLE, fe!.memTablePayload(), [fe!.ram.fd, fe!.ram.fd]);
    await closeWhilePending();
  });

  test('SET_VRING_KICK pending (stopping a running ring) starts no ring after the close, and its fd is closed', async () => {
    await withSlowRequest();
    const kick = native.eventfd();
    fe!.send(Req.SET_VRING_KICK, u64(0n), [kick]);
    native.close(kick);
    await closeWhilePending();
  });

  test('GET_VRING_BASE pending: the close waits for it, then resets', async () => {
    await withSlowRequest();
    fe!.send(Req.GET_VRING_BASE, Buffer.from([0, 0, 0, 0, 0, 0, 0, 0]));
    await closeWhilePending();
  });
});
