/**
 * issue 9, the management socket: an idle client cannot hold shutdown (defect 9), the socket
 * is never reachable with a looser mode, a live socket is not taken over, and the framing does
 * not copy the whole buffer for every chunk (defect 11).
 */
import * as fs from 'fs';
import * as net from 'net';
import * as os from 'os';
import * as path from 'path';
import pino from 'pino';
import { defaultDiskConfig } from '../../config/load';
import { managementCall } from '../../daemon/management/client';
import { RequestType } from '../../daemon/management/schema';
import { FrameBuffer, ManagementServer } from '../../daemon/management/server';
import { Service } from '../../daemon/service';
import { native } from '../../native';

const silent = pino({ level: 'silent' });
let dir: string;
const cleanup: Array<() => unknown> = [];
beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-mgmt-'));
});
afterEach(async () => {
  for (const c of cleanup.splice(0).reverse()) await c();
  fs.rmSync(dir, { recursive: true, force: true });
});

/** Connects and stays idle; resolves once connected. */
function idleClient(socket: string): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const c = net.createConnection(socket, () => resolve(c));
    c.on('error', reject);
    cleanup.push(() => c.destroy());
  });
}

/** Resolves with `value`, or with 'timeout' after `ms`. */
function within<T>(p: Promise<T>, ms: number): Promise<T | 'timeout'> {
  let t: NodeJS.Timeout;
  return Promise.race([p, new Promise<'timeout'>((r) => (t = setTimeout(() => r('timeout'), ms)))]).finally(() => clearTimeout(t));
}

describe('shutdown with management clients (defect 9)', () => {
  test('Service.stop() completes promptly with an idle management client connected, and closes it', async () => {
    const ctl = path.join(dir, 'ctl.sock');
    const service = new Service([{ ...defaultDiskConfig(), name: 'd', socket: path.join(dir, 'd.sock'), size: 4 }], silent, ctl);
    await service.start();
    const c = await idleClient(ctl);
    const closed = new Promise<void>((r) => c.on('close', () => r()));
    const stopped = service.stop().then(() => 'stopped');
    const r = await within(stopped, 3000);
    if (r === 'timeout') {
      c.destroy(); // let the hung stop() finish before the next test
      await stopped;
    }
    expect(r).toBe('stopped');
    expect(await within(closed, 1000)).not.toBe('timeout');
    expect(fs.existsSync(path.join(dir, 'd.sock'))).toBe(false);
  });

  test('an idle client is disconnected after the idle timeout; an active one is answered', async () => {
    const ctl = path.join(dir, 'ctl.sock');
    const server = new ManagementServer(ctl, [], silent, { idleTimeoutMs: 200 });
    await server.listen();
    cleanup.push(() => server.close());
    const c = await idleClient(ctl);
    const closed = new Promise<void>((r) => c.on('close', () => r()));
    expect(await within(closed, 3000)).not.toBe('timeout');
    expect((await managementCall(ctl, { list_disks: {} })).ok).toBe(true);
  });
});

describe('socket hygiene (defect 11)', () => {
  test('the socket never exists with a mode looser than 0600, even under umask 0', async () => {
    const ctl = path.join(dir, 'ctl.sock');
    const server = new ManagementServer(ctl, [], silent);
    const old = process.umask(0);
    let early: number | null;
    let listening: Promise<void>;
    try {
      listening = server.listen();
      // Right after listen() returns (the bind is synchronous): absent, or already 0600.
      try {
        early = fs.lstatSync(ctl).mode & 0o777;
      } catch {
        early = null;
      }
    } finally {
      process.umask(old);
    }
    await listening;
    cleanup.push(() => server.close());
    expect(early === null || early === 0o600).toBe(true);
    expect(fs.lstatSync(ctl).mode & 0o777).toBe(0o600);
    expect(fs.readdirSync(dir)).toEqual(['ctl.sock']); // no temporary name left behind
  });

  test('a live management socket is not taken over; a stale one is replaced; close removes it', async () => {
    const ctl = path.join(dir, 'ctl.sock');
    const first = new ManagementServer(ctl, [], silent);
    await first.listen();
    cleanup.push(() => first.close());
    const second = new ManagementServer(ctl, [], silent);
    await expect(second.listen()).rejects.toThrow(/is in use by another process/);
    expect((await managementCall(ctl, { list_disks: {} })).ok).toBe(true); // the first still answers
    await first.close();
    expect(fs.existsSync(ctl)).toBe(false);
    // A stale socket file (its daemon was killed): replaced.
    const fd = native.listenUnix(ctl);
    native.close(fd);
    expect(fs.lstatSync(ctl).isSocket()).toBe(true);
    const third = new ManagementServer(ctl, [], silent);
    await third.listen();
    cleanup.push(() => third.close());
    expect((await managementCall(ctl, { list_disks: {} })).ok).toBe(true);
    // Not a socket: refused, left alone.
    const file = path.join(dir, 'file');
    fs.writeFileSync(file, 'x');
    await expect(new ManagementServer(file, [], silent).listen()).rejects.toThrow(/not a socket/);
    expect(fs.readFileSync(file, 'utf8')).toBe('x');
  });

  test('FrameBuffer: a frame of almost 1 MiB fed 10 bytes at a time is assembled in linear time', () => {
    const name = 'n'.repeat(1_000_000);
    const frame = Buffer.from(RequestType.encodeDelimited(RequestType.fromObject({ get_stats: { disk: name } })).finish());
    const two = Buffer.concat([frame, frame]);
    const fb = new FrameBuffer();
    const got: Buffer[] = [];
    const t0 = Date.now();
    // 200000 pieces: recopying what is buffered for each would move ~100 GB.
    for (let off = 0; off < two.length; off += 10) {
      for (const m of fb.push(two.subarray(off, off + 10))) got.push(Buffer.from(m));
      fb.consumed();
    }
    const ms = Date.now() - t0;
    expect(got.length).toBe(2);
    expect(RequestType.toObject(RequestType.decode(got[1]), { oneofs: true })).toMatchObject({ get_stats: { disk: name } });
    expect(fb.length).toBe(0);
    expect(ms).toBeLessThan(5000); // linear: ~0.1 s here
  });

  test('a frame over 1 MiB is refused as soon as its length prefix is read', async () => {
    const ctl = path.join(dir, 'ctl.sock');
    const server = new ManagementServer(ctl, [], silent);
    await server.listen();
    cleanup.push(() => server.close());
    // Over the cap: refused as soon as the length prefix is read.
    const big = Buffer.from([0x81, 0x80, 0x80, 0x01]); // 2^21 + 1
    const answer = await new Promise<string>((resolve) => {
      const d = net.createConnection(ctl, () => d.write(big));
      const got: Buffer[] = [];
      d.on('data', (b) => got.push(b));
      d.on('close', () => resolve(Buffer.concat(got).toString('latin1')));
    });
    expect(answer).toContain('exceeds 1 MiB');
  }, 60000);
});
