/**
 * The vhost-user protocol against a real in-process back-end: negotiation, config space, ring
 * life cycle, and malformed messages (logged, clean disconnect, next front-end served).
 */
import { native } from '../../native';
import type { VirtioBlkQueue } from '../../virtqueue/blk-queue';
import { Req } from '../../vhost/protocol';
import { startBackend, TestBackend, until } from '../helpers/backend';
import { DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, blkHeader } from '../helpers/driver-ring';
import { state, TestFrontend, u64 } from '../helpers/frontend';

let be: TestBackend;
let fe: TestFrontend;

afterEach(async () => {
  fe?.close();
  await be?.close();
});

const bitOf = (n: number): bigint => 1n << BigInt(n);

describe('negotiation and config space', () => {
  test('offers the virtio-blk and ring features, MQ/REPLY_ACK/CONFIG, and the queue count', async () => {
    be = startBackend({ num_queues: 3 });
    fe = new TestFrontend(be.socket);
    const f = await fe.getU64(Req.GET_FEATURES);
    for (const b of [32, 29, 28, 2, 6, 9, 10, 12, 30]) expect(f & bitOf(b)).toBe(bitOf(b));
    for (const b of [5, 13, 14, 11]) expect(f & bitOf(b)).toBe(0n); // RO, DISCARD, WRITE_ZEROES, CONFIG_WCE
    expect(await fe.getU64(Req.GET_PROTOCOL_FEATURES)).toBe(bitOf(0) | bitOf(3) | bitOf(9) | bitOf(12)); // MQ, REPLY_ACK, CONFIG, INFLIGHT_SHMFD
    expect(await fe.getU64(Req.GET_QUEUE_NUM)).toBe(3n);
  });

  test('a read-only disk offers VIRTIO_BLK_F_RO', async () => {
    be = startBackend({ read_only: true });
    fe = new TestFrontend(be.socket);
    expect((await fe.getU64(Req.GET_FEATURES)) & bitOf(5)).toBe(bitOf(5));
  });

  test('config space: capacity in sectors, seg_max, blk_size, min_io_size, num_queues', async () => {
    be = startBackend({ size: 64, blocksize: 4096, num_queues: 2 });
    fe = new TestFrontend(be.socket);
    const c = (await fe.getConfig(0, 60)).subarray(12);
    expect(c.readBigUInt64LE(0)).toBe(64n * 2048n);
    expect(c.readUInt32LE(12)).toBe(126);
    expect(c.readUInt32LE(20)).toBe(4096);
    expect(c.readUInt16LE(26)).toBe(1);
    expect(c.readUInt16LE(34)).toBe(2);
    const part = await fe.getConfig(20, 4);
    expect(part.length).toBe(16);
    expect(part.readUInt32LE(12)).toBe(4096);
  });

  test('GET_CONFIG beyond the config space answers an empty payload', async () => {
    be = startBackend();
    fe = new TestFrontend(be.socket);
    expect((await fe.getConfig(250, 60)).length).toBe(0);
    expect(await fe.getU64(Req.GET_QUEUE_NUM)).toBe(2n); // still connected
  });

  test('REPLY_ACK: success acks 0; a refused SET_CONFIG acks non-zero and keeps the connection', async () => {
    be = startBackend();
    fe = new TestFrontend(be.socket);
    fe.send(Req.SET_PROTOCOL_FEATURES, u64(bitOf(3) | bitOf(9)));
    expect((await fe.call(Req.SET_OWNER, Buffer.alloc(0), [], true)).payload.readBigUInt64LE(0)).toBe(0n);
    const cfg = Buffer.alloc(13);
    cfg.writeUInt32LE(32, 0);
    cfg.writeUInt32LE(1, 4);
    expect((await fe.call(Req.SET_CONFIG, cfg, [], true)).payload.readBigUInt64LE(0)).toBe(1n);
    expect(await fe.getU64(Req.GET_QUEUE_NUM)).toBe(2n);
  });
});

describe('ring life cycle', () => {
  test('a ring is not processed until SET_VRING_ENABLE 1 (protocol features negotiated)', async () => {
    be = startBackend();
    fe = new TestFrontend(be.socket);
    await fe.setup({ enable: false });
    const p = fe.blk(0, 0, 0, { readLen: 512 });
    await new Promise((r) => setTimeout(r, 50));
    expect(fe.rings[0].usedIdx()).toBe(0);
    fe.send(Req.SET_VRING_ENABLE, state(0, 1));
    expect(await p).toMatchObject({ status: 0 });
  });

  test('GET_VRING_BASE returns the next avail index; the ring resumes from SET_VRING_BASE', async () => {
    be = startBackend();
    fe = new TestFrontend(be.socket);
    await fe.setup();
    for (let i = 0; i < 5; i++) await fe.blk(0, 0, i, { readLen: 512 });
    fe.send(Req.SET_VRING_ENABLE, state(0, 0));
    const r = await fe.call(Req.GET_VRING_BASE, state(0, 0));
    expect(r.payload.readUInt32LE(0)).toBe(0);
    expect(r.payload.readUInt32LE(4)).toBe(5);
    fe.restartRing(0, 5);
    expect(await fe.blk(0, 0, 0, { readLen: 512 })).toMatchObject({ status: 0 });
    expect(fe.rings[0].usedIdx()).toBe(6);
  });

  test('SET_VRING_KICK on a running ring: kicks on the new eventfd are served, from where the ring was', async () => {
    be = startBackend();
    fe = new TestFrontend(be.socket);
    await fe.setup();
    await fe.blk(0, 0, 0, { readLen: 512 });
    const old = fe.kickFds[0];
    const kick = native.eventfd();
    fe.kickFds[0] = kick;
    fe.send(Req.SET_VRING_KICK, u64(0n), [kick]);
    await fe.call(Req.GET_QUEUE_NUM);
    native.close(old);
    expect(await fe.blk(0, 0, 8, { readLen: 512 })).toMatchObject({ status: 0 });
    expect(fe.rings[0].usedIdx()).toBe(2);
  });

  test('the call eventfd is signalled after completions', async () => {
    be = startBackend();
    fe = new TestFrontend(be.socket);
    await fe.setup({ featureMask: ~bitOf(29) }); // no event idx: every batch calls
    native.eventfdRead(fe.callFds[0]);
    await fe.blk(0, 0, 0, { readLen: 512 });
    expect(native.eventfdRead(fe.callFds[0])).toBe(1);
  });

  test('two queues serve requests independently and share the disk', async () => {
    be = startBackend({ num_queues: 2 });
    fe = new TestFrontend(be.socket);
    await fe.setup({ queues: 2 });
    const data = Buffer.alloc(512, 0x3c);
    expect(await fe.blk(1, 1, 40, { data })).toMatchObject({ status: 0 });
    const r = await fe.blk(0, 0, 40, { readLen: 512 });
    expect(r.data!.equals(data)).toBe(true);
    expect(fe.rings[1].usedIdx()).toBe(1);
    expect(fe.rings[0].usedIdx()).toBe(1);
  });

  test('SET_MEM_TABLE on running rings moves them to the new table', async () => {
    be = startBackend();
    fe = new TestFrontend(be.socket);
    await fe.setup();
    await fe.blk(0, 1, 0, { data: Buffer.alloc(512, 9) });
    fe.send(Req.SET_MEM_TABLE, fe.memTablePayload(), Array(fe.ram.regions.length).fill(fe.ram.fd));
    const r = await fe.blk(0, 0, 0, { readLen: 512 });
    expect(r.data!.every((b) => b === 9)).toBe(true);
  });
});

describe('bad messages end the connection cleanly; the next front-end is served', () => {
  async function expectDisconnect(send: (f: TestFrontend) => void, logPattern: RegExp): Promise<void> {
    be = startBackend();
    fe = new TestFrontend(be.socket);
    send(fe);
    await fe.waitClosed();
    await until(() => be.logs.some((l) => l.level === 50 && logPattern.test(String(l.msg))), `error log ${logPattern}`);
    fe.close();
    fe = new TestFrontend(be.socket);
    await fe.setup();
    expect(await fe.blk(0, 0, 0, { readLen: 512 })).toMatchObject({ status: 0 });
  }

  test('unknown request', () => expectDisconnect((f) => f.send(99), /unsupported request unknown request 99/));
  test('unsupported request (SET_LOG_BASE)', () => expectDisconnect((f) => f.send(Req.SET_LOG_BASE, Buffer.alloc(16)), /unsupported request SET_LOG_BASE/));
  test('wrong header version', () => expectDisconnect((f) => f.sendRaw(Req.GET_FEATURES, 0x2, Buffer.alloc(0)), /header version 2/));
  test('payload size over the limit', () => expectDisconnect((f) => f.sendRaw(Req.SET_OWNER, 0x1, Buffer.alloc(0), [], 100000), /exceeds the limit/));
  test('wrong payload size', () => expectDisconnect((f) => f.send(Req.SET_VRING_NUM, Buffer.alloc(4)), /payload is 4 bytes, expected 8/));
  test('fds on a message that takes none', () => expectDisconnect((f) => f.send(Req.GET_FEATURES, Buffer.alloc(0), [f.ram.fd]), /carries 1 fds/));
  test('features that were not offered', () => expectDisconnect((f) => f.send(Req.SET_FEATURES, u64(1n << 63n)), /not offered/));
  test('ring size not a power of two', () => expectDisconnect((f) => f.send(Req.SET_VRING_NUM, state(0, 100)), /not a power of two/));
  test('ring size above 1024', () => expectDisconnect((f) => f.send(Req.SET_VRING_NUM, state(0, 2048)), /not a power of two/));
  test('ring index out of range', () => expectDisconnect((f) => f.send(Req.SET_VRING_BASE, state(7, 0)), /ring 7 does not exist/));
  test('more memory regions than allowed', () =>
    expectDisconnect((f) => {
      const p = Buffer.alloc(8 + 32 * 9);
      p.writeUInt32LE(9, 0);
      f.send(Req.SET_MEM_TABLE, p);
    }, /9 regions/));
  test('memory table with a missing fd', () => expectDisconnect((f) => f.send(Req.SET_MEM_TABLE, f.memTablePayload(), [f.ram.fd]), /1 fds for 2 regions/));
  test('memory region larger than its fd can map', () =>
    expectDisconnect((f) => {
      const p = f.memTablePayload();
      p.writeBigUInt64LE(1n << 40n, 8 + 24); // mmap offset 1 TiB
      f.send(Req.SET_MEM_TABLE, p, [f.ram.fd, f.ram.fd]);
      f.send(Req.GET_QUEUE_NUM);
    }, /SET_MEM_TABLE: memory region ends at byte/));
  test('ring addresses outside guest memory', () =>
    expectDisconnect((f) => {
      f.send(Req.SET_MEM_TABLE, f.memTablePayload(), [f.ram.fd, f.ram.fd]);
      f.send(Req.SET_VRING_NUM, state(0, 64));
      const a = Buffer.alloc(40);
      a.writeBigUInt64LE(0x1000n, 8); // a guest-physical address where a front-end address belongs
      f.send(Req.SET_VRING_ADDR, a);
      f.send(Req.SET_VRING_KICK, u64(0n), [native.eventfd()]);
    }, /not inside guest memory/));
  test('kick before the memory table', () => expectDisconnect((f) => f.send(Req.SET_VRING_KICK, u64(0n), [native.eventfd()]), /before SET_MEM_TABLE/));
});

describe('a hostile guest', () => {
  test('seeded random descriptor chains: no crash, every offered head answered or the queue declared broken', async () => {
    be = startBackend({ size: 4 });
    fe = new TestFrontend(be.socket);
    await fe.setup({ queueSize: 64 });
    const ring = fe.rings[0];
    let seed = 0x2545f491;
    const rnd = (n: number): number => {
      seed ^= seed << 13;
      seed ^= seed >>> 17;
      seed ^= seed << 5;
      return (seed >>> 0) % n;
    };
    const hdr = fe.ram.alloc(16 * 8);
    for (let t = 0; t < 8; t++) fe.ram.bytes(hdr + 16 * t, 16).set(blkHeader([0, 1, 4, 8, 11, 0, 1, 77][t], rnd(9000)));
    const data = fe.ram.alloc(64 * 1024);
    const table = fe.ram.alloc(16 * 64);
    const addrs = () => [hdr + 16 * rnd(8), data + rnd(64 * 1024), 0x7ffff000, fe.ram.regionEnd(0, 8), table, fe.ram.regionEnd(1, 100)][rnd(6)];
    let answered = 0;
    for (let round = 0; round < 200 && !(be.device.vrings[0].queue as VirtioBlkQueue).state().broken; round++) {
      const before = ring.usedIdx();
      const n = 1 + rnd(6);
      for (let k = 0; k < n; k++) {
        const head = rnd(64);
        const len = [16, 1, 512, 4096, 0, 100000, 32][rnd(7)];
        const flags = (rnd(2) ? DESC_F_NEXT : 0) | (rnd(2) ? DESC_F_WRITE : 0) | (rnd(10) === 0 ? DESC_F_INDIRECT : 0);
        ring.setDesc(head, { addr: addrs(), len, flags, next: rnd(70) });
        if (rnd(4) === 0) {
          const { writeDesc } = await import('../helpers/driver-ring');
          writeDesc(fe.ram.bytes(table + 16 * rnd(64), 16), { addr: addrs(), len: 16, flags: rnd(8), next: rnd(66) });
        }
        ring.offer(head);
      }
      fe.kick(0);
      // Heads may repeat within a round (the guest offering an in-flight head): that breaks the queue.
      await until(() => ring.usedIdx() === ((before + n) & 0xffff) || (be.device.vrings[0].queue as VirtioBlkQueue).state().broken, 'chains answered');
      answered += (ring.usedIdx() - before) & 0xffff;
    }
    expect(answered).toBeGreaterThan(0);
    // The daemon is alive and still speaks the protocol.
    expect(await fe.getU64(Req.GET_QUEUE_NUM)).toBe(2n);
  });

  test('a broken queue logs an error once and the disk is usable after reconnecting', async () => {
    be = startBackend();
    fe = new TestFrontend(be.socket);
    await fe.setup();
    fe.rings[0].offer(1000);
    fe.kick(0);
    await until(() => be.logs.some((l) => /virtqueue broken/.test(String(l.msg))), 'broken log');
    expect(be.logs.filter((l) => /virtqueue broken/.test(String(l.msg)))[0]).toMatchObject({ reason: expect.stringContaining('head 1000') });
    fe.close();
    fe = new TestFrontend(be.socket);
    await fe.setup();
    expect(await fe.blk(0, 0, 0, { readLen: 512 })).toMatchObject({ status: 0 });
  });

  test('an indirect descriptor pointing at the ring itself is refused as a chain error', async () => {
    be = startBackend();
    fe = new TestFrontend(be.socket);
    await fe.setup();
    const ring = fe.rings[0];
    ring.setDesc(0, { addr: ring.descAddr, len: 16 * 64, flags: DESC_F_INDIRECT });
    ring.setDesc(1, { addr: ring.descAddr, len: 16, flags: DESC_F_INDIRECT });
    ring.offer(0);
    fe.kick(0);
    await fe.waitUsedIdx(0, 1);
    expect(ring.takeUsed()).toEqual([{ id: 0, len: 0 }]);
  });
});
