/**
 * GET_INFLIGHT_FD / SET_INFLIGHT_FD through the project's test front-end: the region the
 * back-end creates, regions it refuses (with a log line, the connection kept), and restarts:
 * the daemon (dist/daemon/main.js) killed with SIGKILL while requests are in flight and started
 * again, the front-end reconnecting the way QEMU 7.2 does (same region, SET_VRING_BASE =
 * used->idx, a fresh kick fd that is never kicked). With threads 1 and 2.
 */
import { ChildProcess, spawn } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { native } from '../../native';
import { Req } from '../../vhost/protocol';
import { inflightRegionBytes, InflightRegion } from '../../virtqueue/inflight-region';
import { startBackend, TestBackend, until } from '../helpers/backend';
import { blkHeader, DriverRing } from '../helpers/driver-ring';
import { state, TestFrontend, u64 } from '../helpers/frontend';
import { GuestRam } from '../helpers/guest-ram';

const MAIN = path.join(__dirname, '..', '..', 'dist', 'daemon', 'main.js');
const QSIZE = 64;

function inflightPayload(d: { mmapSize: number; mmapOffset: number; numQueues: number; queueSize: number }): Buffer {
  const b = Buffer.alloc(24);
  b.writeBigUInt64LE(BigInt(d.mmapSize), 0);
  b.writeBigUInt64LE(BigInt(d.mmapOffset), 8);
  b.writeUInt16LE(d.numQueues, 16);
  b.writeUInt16LE(d.queueSize, 18);
  return b;
}

interface Region {
  fd: number;
  desc: { mmapSize: number; mmapOffset: number; numQueues: number; queueSize: number };
}

/** What QEMU 7.2 sends before its rings: features, then GET_INFLIGHT_FD once (no region yet), SET_INFLIGHT_FD always. */
async function handshake(fe: TestFrontend, queues: number, region: Region | null): Promise<{ region: Region; answers: Buffer[] }> {
  const answers: Buffer[] = [];
  const features = await fe.getU64(Req.GET_FEATURES);
  answers.push(u64(features));
  const pf = await fe.getU64(Req.GET_PROTOCOL_FEATURES);
  answers.push(u64(pf));
  fe.send(Req.SET_PROTOCOL_FEATURES, u64(pf));
  answers.push((await fe.call(Req.GET_QUEUE_NUM)).payload);
  fe.send(Req.SET_OWNER);
  answers.push(await fe.getConfig(0, 57));
  fe.features = features;
  fe.send(Req.SET_FEATURES, u64(features));
  if (region === null) {
    const r = await fe.call(Req.GET_INFLIGHT_FD, inflightPayload({ mmapSize: 0, mmapOffset: 0, numQueues: queues, queueSize: QSIZE }));
    expect(r.payload.length).toBe(24);
    expect(r.fds.length).toBe(1);
    region = {
      fd: r.fds[0],
      desc: { mmapSize: Number(r.payload.readBigUInt64LE(0)), mmapOffset: Number(r.payload.readBigUInt64LE(8)), numQueues: r.payload.readUInt16LE(16), queueSize: r.payload.readUInt16LE(18) },
    };
  }
  const ack = await fe.call(Req.SET_INFLIGHT_FD, inflightPayload(region.desc), [region.fd], true);
  expect(ack.payload.readBigUInt64LE(0)).toBe(0n);
  fe.send(Req.SET_MEM_TABLE, fe.memTablePayload(), Array(fe.ram.regions.length).fill(fe.ram.fd));
  return { region, answers };
}

/** Starts the rings (new ones, or those of a previous front-end) at `base`, with fresh kick/call eventfds; no kick. */
async function startRings(fe: TestFrontend, rings: DriverRing[], bases: number[], enable = true): Promise<void> {
  fe.rings = rings;
  rings.forEach((ring, q) => {
    fe.send(Req.SET_VRING_NUM, state(q, ring.size));
    fe.send(Req.SET_VRING_BASE, state(q, bases[q]));
    const a = Buffer.alloc(40);
    a.writeUInt32LE(q, 0);
    const addrs = ring.frontEndAddrs();
    a.writeBigUInt64LE(BigInt(addrs.descAddr), 8);
    a.writeBigUInt64LE(BigInt(addrs.usedAddr), 16);
    a.writeBigUInt64LE(BigInt(addrs.availAddr), 24);
    fe.send(Req.SET_VRING_ADDR, a);
    const call = native.eventfd();
    const kick = native.eventfd();
    fe.kickFds[q] = kick;
    fe.callFds[q] = call;
    fe.send(Req.SET_VRING_CALL, u64(BigInt(q)), [call]);
    fe.send(Req.SET_VRING_KICK, u64(BigInt(q)), [kick]);
    if (enable) fe.send(Req.SET_VRING_ENABLE, state(q, 1));
  });
  await fe.call(Req.GET_QUEUE_NUM); // everything above was handled
}

/** Offers a 4 KiB write of `fill` at `sector` on ring q (no kick); returns its head and status address. */
function offerWrite(fe: TestFrontend, q: number, sector: number, fill: number): { head: number; st: number } {
  const h = fe.ram.alloc(16);
  fe.ram.bytes(h, 16).set(blkHeader(1, sector));
  const data = fe.ram.alloc(4096, 512);
  fe.ram.bytes(data, 4096).fill(fill);
  const st = fe.ram.alloc(1);
  fe.ram.bytes(st, 1)[0] = 0xff;
  const head = fe.rings[q].addChain([{ addr: h, len: 16 }, { addr: data, len: 4096 }, { addr: st, len: 1, write: true }]);
  return { head, st };
}

class ChildDaemon {
  proc: ChildProcess;
  out = '';
  constructor(readonly args: string[]) {
    this.proc = spawn(process.execPath, [MAIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    this.proc.stdout?.on('data', (d: Buffer) => (this.out += d.toString()));
    this.proc.stderr?.on('data', (d: Buffer) => (this.out += d.toString()));
  }
  async listening(socket: string): Promise<void> {
    await until(() => fs.existsSync(socket) && this.out.includes('listening'), `daemon listening on ${socket}:\n${this.out}`, 15000);
  }
  async kill9(): Promise<void> {
    const exited = new Promise((r) => this.proc.once('exit', r));
    this.proc.kill('SIGKILL');
    await exited;
  }
  lines(): Array<Record<string, unknown>> {
    return this.out
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as Record<string, unknown>);
  }
}

let dir: string;
let daemons: ChildDaemon[] = [];
let fes: TestFrontend[] = [];
let be: TestBackend | null = null;

/** Completion modes for a daemon's two lives: requests end 10 s after they start (all still in flight at a kill), or at once. */
const SLOW = ['--irqmode', '2', '--completion-nsec', '10000000000'];
const FAST = ['--irqmode', '0'];

/** Starts the daemon with `args` (killed after the test) and waits until it listens on `socket`. */
async function serve(args: string[], socket: string): Promise<ChildDaemon> {
  const d = new ChildDaemon(args);
  daemons.push(d);
  await d.listening(socket);
  return d;
}

/** A front-end on `socket` over `ram` (closed after the test), after the handshake for `queues` queues with `region` (see handshake). */
async function attach(socket: string, ram: GuestRam, queues: number, region: Region | null): Promise<{ fe: TestFrontend; hs: { region: Region; answers: Buffer[] } }> {
  const fe = new TestFrontend(socket, ram);
  fes.push(fe);
  return { fe, hs: await handshake(fe, queues, region) };
}
beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-56-'));
});
afterEach(async () => {
  for (const fe of fes) fe.close();
  fes = [];
  for (const d of daemons) if (d.proc.exitCode === null && d.proc.signalCode === null) await d.kill9();
  daemons = [];
  await be?.close();
  be = null;
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('the region the back-end creates', () => {
  test('GET_INFLIGHT_FD: 24 bytes and one sealed memfd of the layout size; requests are tracked in it and cleared once used', async () => {
    be = startBackend({ num_queues: 2 });
    const fe = new TestFrontend(be.socket);
    fes.push(fe);
    const { region } = await handshake(fe, 2, null);
    expect(region.desc).toEqual({ mmapSize: inflightRegionBytes(2, QSIZE), mmapOffset: 0, numQueues: 2, queueSize: QSIZE });
    expect(native.fdKind(region.fd)).toBe('memfd');
    await startRings(fe, [new DriverRing(fe.ram, QSIZE), new DriverRing(fe.ram, 32)], [0, 0]);
    for (let i = 0; i < 5; i++) expect((await fe.blk(1, 1, 8 * i, { data: Buffer.alloc(512, i) })).status).toBe(0);
    const mine = new InflightRegion(region.fd, region.desc, 2);
    try {
      const b1 = mine.block(1);
      expect(b1.readUInt16LE(8)).toBe(1); // version: in use
      expect(b1.readUInt16LE(10)).toBe(QSIZE); // desc_num: the region's queue size, above this ring's 32
      expect(b1.readUInt16LE(14)).toBe(5); // used_idx follows used->idx
      for (let h = 0; h < QSIZE; h++) expect(b1[16 + 16 * h]).toBe(0); // nothing left in flight
      const counters = Array.from({ length: QSIZE }, (_, h) => b1.readBigUInt64LE(16 + 16 * h + 8)).filter((c) => c > 0n);
      expect(counters.sort()).toEqual([1n, 2n, 3n, 4n, 5n]); // one counter per request, from 1
      expect(mine.block(0).readUInt16LE(8)).toBe(1);
    } finally {
      mine.release();
      native.close(region.fd);
    }
  });

  test('a second GET_INFLIGHT_FD gives a new region (the old one is dropped); one asking for too many queues gets mmap_size 0 and no fd', async () => {
    be = startBackend({ num_queues: 2 });
    const fe = new TestFrontend(be.socket);
    fes.push(fe);
    await fe.call(Req.GET_FEATURES);
    const a = await fe.call(Req.GET_INFLIGHT_FD, inflightPayload({ mmapSize: 0, mmapOffset: 0, numQueues: 1, queueSize: 128 }));
    const b = await fe.call(Req.GET_INFLIGHT_FD, inflightPayload({ mmapSize: 0, mmapOffset: 0, numQueues: 2, queueSize: 256 }));
    expect(Number(b.payload.readBigUInt64LE(0))).toBe(inflightRegionBytes(2, 256));
    const c = await fe.call(Req.GET_INFLIGHT_FD, inflightPayload({ mmapSize: 0, mmapOffset: 0, numQueues: 3, queueSize: 128 }));
    expect(c.payload.readBigUInt64LE(0)).toBe(0n);
    expect(c.fds).toEqual([]);
    expect(be.logs.some((l) => String(l.msg).includes('GET_INFLIGHT_FD refused: num_queues 3'))).toBe(true);
    for (const fd of [...a.fds, ...b.fds]) native.close(fd);
    expect(fe.closed).toBe(false);
  });
});

describe('regions the back-end refuses (logged; REPLY_ACK says so; the connection and I/O go on)', () => {
  const goodDesc = { mmapSize: inflightRegionBytes(2, QSIZE), mmapOffset: 0, numQueues: 2, queueSize: QSIZE };
  const good = (): Region => ({ fd: native.memfdCreate('fe-inflight', goodDesc.mmapSize), desc: goodDesc });
  const cases: Array<[string, () => { payload: Buffer; fds: number[] }, RegExp]> = [
    ['no fd', () => ({ payload: inflightPayload(goodDesc), fds: [] }), /exactly one fd/],
    ['two fds', () => { const g = good(); return { payload: inflightPayload(g.desc), fds: [g.fd, native.dup(g.fd)] }; }, /exactly one fd/],
    ['an eventfd', () => ({ payload: inflightPayload(goodDesc), fds: [native.eventfd()] }), /eventfd, not a memfd/],
    ['an unsealed memfd', () => ({ payload: inflightPayload(goodDesc), fds: [native.memfdCreate('x', inflightRegionBytes(2, QSIZE), false)] }), /F_SEAL_SHRINK/],
    ['mmap_size not the layout', () => { const g = good(); return { payload: inflightPayload({ ...g.desc, mmapSize: g.desc.mmapSize + 64 }), fds: [g.fd] }; }, /mmap_size/],
    ['mmap_size 2^64 - 1', () => { const g = good(); const p = inflightPayload(g.desc); p.writeBigUInt64LE(0xffffffffffffffffn, 0); return { payload: p, fds: [g.fd] }; }, /mmap_size -1/],
    ['num_queues above the device', () => { const g = good(); return { payload: inflightPayload({ ...g.desc, numQueues: 3, mmapSize: inflightRegionBytes(3, QSIZE) }), fds: [g.fd] }; }, /num_queues 3/],
    ['queue_size 0', () => { const g = good(); return { payload: inflightPayload({ ...g.desc, queueSize: 0, mmapSize: 0 }), fds: [g.fd] }; }, /queue_size 0/],
    ['an offset past the end of the fd', () => { const g = good(); return { payload: inflightPayload({ ...g.desc, mmapOffset: 1 << 20 }), fds: [g.fd] }; }, /ends at byte/],
  ];
  test.each(cases)('%s', async (_name, make, why) => {
    be = startBackend({ num_queues: 2 });
    const fe = new TestFrontend(be.socket);
    fes.push(fe);
    await fe.setup({ queues: 1, enable: false });
    // The region comes before the rings start (as in QEMU's start sequence): stop ring 0 first.
    await fe.call(Req.GET_VRING_BASE, state(0, 0));
    const m = make();
    const ack = await fe.call(Req.SET_INFLIGHT_FD, m.payload, m.fds, true);
    for (const fd of m.fds) native.close(fd); // ours: the back-end closed its copies
    expect(ack.payload.readBigUInt64LE(0)).toBe(1n);
    expect(be.logs.some((l) => /SET_INFLIGHT_FD refused/.test(String(l.msg)) && why.test(String(l.msg)))).toBe(true);
    fe.restartRing(0, 0);
    expect((await fe.blk(0, 1, 0, { data: Buffer.alloc(512, 7) })).status).toBe(0);
    expect(fe.closed).toBe(false);
  });

  test('SET_INFLIGHT_FD while a ring runs ends the connection (QEMU sends it before the rings start)', async () => {
    be = startBackend({ num_queues: 2 });
    const fe = new TestFrontend(be.socket);
    fes.push(fe);
    await fe.setup({ queues: 1 });
    const g = good();
    fe.send(Req.SET_INFLIGHT_FD, inflightPayload(g.desc), [g.fd]);
    native.close(g.fd);
    await fe.waitClosed();
    expect(be.logs.some((l) => String(l.msg).includes('SET_INFLIGHT_FD while ring 0 runs'))).toBe(true);
  });
});

describe('restart', () => {
  test('a clean reconnect with the region in use: the guest is signalled once, the rings go on at used->idx whatever SET_VRING_BASE says', async () => {
    be = startBackend({ num_queues: 1 });
    const ram = new GuestRam();
    const fe1 = new TestFrontend(be.socket, ram);
    fes.push(fe1);
    const { region } = await handshake(fe1, 1, null);
    const rings = [new DriverRing(ram, QSIZE)];
    await startRings(fe1, rings, [0]);
    for (let i = 0; i < 3; i++) expect((await fe1.blk(0, 1, 8 * i, { data: Buffer.alloc(512, 1) })).status).toBe(0);
    native.eventfdRead(fe1.callFds[0]);
    fe1.close();
    await until(() => be!.logs.some((l) => String(l.msg).includes('connection closed')), 'disconnect');
    const fe2 = new TestFrontend(be.socket, ram);
    fes.push(fe2);
    await handshake(fe2, 1, region);
    await startRings(fe2, rings, [0]); // a stale base: the region says where the ring is
    await until(() => native.eventfdRead(fe2.callFds[0]) === 1, 'one signal after the restart');
    expect(native.eventfdRead(fe2.callFds[0])).toBe(0); // once
    expect((await fe2.blk(0, 0, 0, { readLen: 512 })).status).toBe(0);
    expect(rings[0].usedIdx()).toBe(4);
    native.close(region.fd);
  });

  test.each([1, 2])('threads %i: SIGKILL with requests in flight; restarted, they are resubmitted oldest first before those offered meanwhile, without a kick; answers identical', async (threads) => {
    const socket = path.join(dir, 'd.sock');
    const common = ['--socket', socket, '--size', '16', '--num-queues', '2', '--threads', String(threads), '--poll-us', '0', '--memory-backed', 'false'];
    // First life: requests end 10 s after they start, so they are all in flight at the kill.
    const d1 = await serve([...common, ...SLOW], socket);
    const ram = new GuestRam();
    const { fe: fe1, hs: first } = await attach(socket, ram, 2, null);
    const rings = [new DriverRing(ram, QSIZE), new DriverRing(ram, QSIZE)];
    await startRings(fe1, rings, [0, 0]);
    const inflight: Array<Array<{ head: number; st: number }>> = [[], []];
    for (const q of [0, 1]) {
      for (let i = 0; i < 6; i++) inflight[q].push(offerWrite(fe1, q, 8 * i, 0x10 + i));
      fe1.kick(q);
    }
    // All popped (in flight in the daemon), none used.
    const region = new InflightRegion(first.region.fd, first.region.desc, 2);
    try {
      await until(() => [0, 1].every((q) => inflight[q].every(({ head }) => region.block(q)[16 + 16 * head] === 1)), 'requests marked in flight', 10000);
      expect(rings.map((r) => r.usedIdx())).toEqual([0, 0]);
      await d1.kill9();
      fe1.close();
      // While the daemon is down the guest offers more (its kicks go nowhere).
      const later = [0, 1].map((q) => [offerWrite(fe1, q, 1000, 0xa0), offerWrite(fe1, q, 1008, 0xa1)]);
      // Second life, the same disk (requests now end at once).
      const d2 = await serve([...common, ...FAST], socket);
      const { fe: fe2, hs: second } = await attach(socket, ram, 2, first.region);
      expect(second.answers).toEqual(first.answers); // features, protocol features, queue count, config
      await startRings(fe2, rings, rings.map((r) => r.usedIdx())); // what QEMU 7.2 sends: used->idx
      for (const q of [0, 1]) {
        await fe2.waitUsedIdx(q, 8, 10000);
        const used = rings[q].takeUsed().map((u) => u.id);
        // Resubmitted ones first, in the order they were first taken; then the new ones in avail order.
        expect(used).toEqual([...inflight[q].map((r) => r.head), ...later[q].map((r) => r.head)]);
        for (const { st } of [...inflight[q], ...later[q]]) expect(ram.bytes(st, 1)[0]).toBe(0);
        expect(region.block(q).readUInt16LE(14)).toBe(8);
      }
      expect(d2.lines().filter((l) => l.msg === 'inflight region: resubmitting requests in flight before the restart').map((l) => l.resubmit)).toEqual([6, 6]);
      // And the rings go on as usual.
      expect((await fe2.blk(1, 0, 0, { readLen: 512 })).status).toBe(0);
      expect(d2.lines().filter((l) => Number(l.level) >= 50)).toEqual([]);
    } finally {
      region.release();
      native.close(first.region.fd);
    }
  });

  test('GET_VRING_BASE runs requests still to resubmit (a ring never enabled) before it answers', async () => {
    const socket = path.join(dir, 'd.sock');
    const common = ['--socket', socket, '--size', '16', '--num-queues', '1', '--poll-us', '0', '--memory-backed', 'false'];
    const d1 = await serve([...common, ...SLOW], socket);
    const ram = new GuestRam();
    const { fe: fe1, hs: first } = await attach(socket, ram, 1, null);
    const rings = [new DriverRing(ram, QSIZE)];
    await startRings(fe1, rings, [0]);
    const reqs = [offerWrite(fe1, 0, 0, 1), offerWrite(fe1, 0, 8, 2), offerWrite(fe1, 0, 16, 3)];
    fe1.kick(0);
    const region = new InflightRegion(first.region.fd, first.region.desc, 1);
    try {
      await until(() => reqs.every(({ head }) => region.block(0)[16 + 16 * head] === 1), 'in flight', 10000);
      await d1.kill9();
      fe1.close();
      await serve([...common, ...FAST], socket);
      const { fe: fe2 } = await attach(socket, ram, 1, first.region);
      await startRings(fe2, rings, [0], false);
      const base = await fe2.call(Req.GET_VRING_BASE, state(0, 0), [], false, 10000);
      expect(base.payload.readUInt32LE(4)).toBe(3);
      expect(rings[0].usedIdx()).toBe(3);
      for (const { st } of reqs) expect(ram.bytes(st, 1)[0]).toBe(0);
    } finally {
      region.release();
      native.close(first.region.fd);
    }
  });
});
