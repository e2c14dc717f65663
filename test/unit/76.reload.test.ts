/**
 * SIGHUP reloads the configuration file in the real daemon: a disk added starts serving, a disk
 * removed stops (its front-end disconnected, its socket gone), live keys apply at once
 * (badblocks on one and two threads, log_level down to the disks' own loggers), other changed
 * keys are refused with a log line naming them and the disk keeps its old value; a file that
 * does not load changes nothing.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { changedKeys } from '../../daemon/reload';
import { until } from '../helpers/backend';
import { killDaemon, startRnull, type Daemon } from '../helpers/daemon-process';
import { TestFrontend } from '../helpers/frontend';

const IN = 0; // VIRTIO_BLK_T_IN
const IOERR = 1;

let dir: string;
let d: Daemon | undefined;
const fes: TestFrontend[] = [];

/** Parsed JSON log lines whose msg matches. */
function logged(daemon: Daemon, msg: RegExp): Array<Record<string, unknown>> {
  return daemon.out
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Record<string, unknown>)
    .filter((r) => msg.test(String(r.msg)));
}

/** Sends SIGHUP and resolves with the reload's summary line ("reloaded: ..." or "reload refused ..."). */
async function reload(daemon: Daemon): Promise<Record<string, unknown>> {
  const summaries = (): Array<Record<string, unknown>> => logged(daemon, /^reloaded: |^reload refused/);
  const n = summaries().length;
  daemon.proc.kill('SIGHUP');
  await until(() => summaries().length > n, 'the reload', 10000);
  return summaries()[n];
}

async function capacity(sock: string): Promise<bigint> {
  const fe = new TestFrontend(sock);
  const c = (await fe.getConfig(0, 8)).subarray(12).readBigUInt64LE(0);
  fe.close();
  return c;
}

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-reload-'));
});
afterEach(async () => {
  for (const fe of fes.splice(0)) fe.close();
  await killDaemon(d);
  d = undefined;
  fs.rmSync(dir, { recursive: true, force: true });
});

test('changedKeys compares values, arrays included', () => {
  expect(changedKeys({ a: 1, b: ['1-2'], c: 'x' }, { a: 1, b: ['1-3'], c: 'x', d: true })).toEqual(['b', 'd']);
});

test('added disks start, removed ones stop (front-end disconnected), badblocks apply live, size and blocksize are refused by name', async () => {
  const sock = (n: string): string => path.join(dir, `${n}.sock`);
  const cfg = path.join(dir, 'vm.json');
  const write = (disks: object[], extra: object = {}): void => fs.writeFileSync(cfg, JSON.stringify({ ...extra, disks }));
  write([
    { name: 'a', socket: sock('a'), size: 4 },
    { name: 'b', socket: sock('b'), size: 4 },
    { name: 't', socket: sock('t'), size: 4, num_queues: 2, threads: 2 },
  ]);
  d = startRnull(['--config', cfg], dir);
  await until(() => ['a', 'b', 't'].every((n) => fs.existsSync(sock(n))), 'sockets', 15000);
  const feA = new TestFrontend(sock('a'));
  const feB = new TestFrontend(sock('b'));
  const feT = new TestFrontend(sock('t'));
  fes.push(feA, feB, feT);
  await feA.setup({ queues: 1 });
  await feB.setup({ queues: 1 });
  await feT.setup({ queues: 2 });
  expect((await feA.blk(0, IN, 100, { readLen: 512 })).status).toBe(0);

  write([
    { name: 'a', socket: sock('a'), size: 8, blocksize: 4096, badblocks: ['100-107'] },
    { name: 't', socket: sock('t'), size: 4, num_queues: 2, threads: 2, badblocks: ['0-7'] },
    { name: 'c', socket: sock('c'), size: 16 },
  ]);
  const summary = await reload(d);
  expect(summary).toMatchObject({ added: ['c'], removed: ['b'], failed: [] });
  expect(summary.applied).toEqual(expect.arrayContaining([{ disk: 'a', key: 'badblocks' }, { disk: 't', key: 'badblocks' }]));
  expect(summary.refused).toEqual([{ disk: 'a', keys: ['blocksize', 'size'] }]);
  const refusal = logged(d, /^reload: disk a: /);
  expect(refusal.length).toBe(1);
  expect(refusal[0].msg).toBe('reload: disk a: blocksize, size cannot change while the disk is served (restart to apply); kept as they were');

  // b: its front-end was disconnected and its socket removed.
  await feB.waitClosed(10000);
  expect(fs.existsSync(sock('b'))).toBe(false);
  // c: serves 16 MiB.
  expect(await capacity(sock('c'))).toBe(16n * 2048n);
  // a: still attached, same size, and the new bad range fails reads; t: on its worker-thread queue too.
  expect((await feA.blk(0, IN, 100, { readLen: 512 })).status).toBe(IOERR);
  expect((await feA.blk(0, IN, 200, { readLen: 512 })).status).toBe(0);
  expect((await feA.getConfig(0, 8)).subarray(12).readBigUInt64LE(0)).toBe(4n * 2048n);
  expect((await feT.blk(1, IN, 0, { readLen: 512 })).status).toBe(IOERR);
  expect((await feT.blk(0, IN, 0, { readLen: 512 })).status).toBe(IOERR);

  // Reloading the same file again changes nothing (the refused keys are not reported twice as applied).
  const again = await reload(d);
  expect(again).toMatchObject({ added: [], removed: [], applied: [], failed: [] });
  expect(again.refused).toEqual([{ disk: 'a', keys: ['blocksize', 'size'] }]);

  d.proc.kill('SIGTERM');
  expect(await d.exit).toBe(0);
});

test('log_level applies live, to the disks\' loggers too; management_socket is refused; a bad file changes nothing', async () => {
  const a = path.join(dir, 'a.sock');
  const cfg = path.join(dir, 'vm.json');
  fs.writeFileSync(cfg, JSON.stringify({ log_level: 'info', disks: [{ name: 'a', socket: a, size: 4 }] }));
  d = startRnull(['--config', cfg], dir);
  await until(() => fs.existsSync(a), 'socket', 15000);
  const connects = (): number => logged(d!, /^front-end connected$/).length;
  const fe = new TestFrontend(a);
  await until(() => connects() === 1, 'the info line of a connection', 10000);
  fe.close();

  fs.writeFileSync(cfg, JSON.stringify({ log_level: 'warn', management_socket: path.join(dir, 'ctl.sock'), disks: [{ name: 'a', socket: a, size: 4 }] }));
  const s = await reload(d);
  expect(s.applied).toEqual([{ disk: null, key: 'log_level' }]);
  expect(s.refused).toEqual([{ disk: null, keys: ['management_socket'] }]);
  expect(logged(d, /^reload: management_socket cannot change while running/).length).toBe(1);
  expect(fs.existsSync(path.join(dir, 'ctl.sock'))).toBe(false);
  // The disk's logger (a child made before the reload) no longer logs at info.
  await new Promise((r) => setTimeout(r, 300));
  expect(await capacity(a)).toBe(4n * 2048n); // a connection that is served...
  await new Promise((r) => setTimeout(r, 500));
  expect(connects()).toBe(1); // ...but not logged at info any more

  fs.writeFileSync(cfg, '{ not json');
  const bad = await reload(d);
  expect(String(bad.msg)).toMatch(/^reload refused, nothing changed: config file .* is not valid JSON/);
  expect(await capacity(a)).toBe(4n * 2048n);
  fs.writeFileSync(cfg, JSON.stringify({ disks: [{ name: 'a', socket: a, size: 4, blocksize: 3000 }] }));
  const invalid = await reload(d);
  expect(String(invalid.msg)).toMatch(/^reload refused, nothing changed: .*blocksize/);
  expect(fs.existsSync(a)).toBe(true);

  d.proc.kill('SIGTERM');
  expect(await d.exit).toBe(0);
});

test('a disk the new file adds on a socket in use fails alone; the rest of the reload applies', async () => {
  const a = path.join(dir, 'a.sock');
  const cfg = path.join(dir, 'vm.json');
  fs.writeFileSync(cfg, JSON.stringify({ disks: [{ name: 'a', socket: a, size: 4 }] }));
  d = startRnull(['--config', cfg], dir);
  await until(() => fs.existsSync(a), 'socket', 15000);
  const notSocket = path.join(dir, 'file.sock');
  fs.writeFileSync(notSocket, 'x');
  fs.writeFileSync(cfg, JSON.stringify({ disks: [{ name: 'a', socket: a, size: 4, rotational: true }, { name: 'x', socket: notSocket, size: 4 }, { name: 'y', socket: path.join(dir, 'y.sock'), size: 4 }] }));
  const s = await reload(d);
  expect(s).toMatchObject({ added: ['y'], applied: [{ disk: 'a', key: 'rotational' }] });
  expect(s.failed).toEqual([{ disk: 'x', error: `${notSocket} exists and is not a socket; refusing to replace it` }]);
  expect(fs.readFileSync(notSocket, 'utf8')).toBe('x');
  expect(await capacity(path.join(dir, 'y.sock'))).toBe(4n * 2048n);
  d.proc.kill('SIGTERM');
  expect(await d.exit).toBe(0);
});

test('a memory-backed disk removed by a reload and added back by the next finds its data (its store was closed and unlocked)', async () => {
  const sock = path.join(dir, 'm.sock');
  const store = path.join('/dev/shm', `rnull-reload-${process.pid}-${path.basename(dir)}.store`);
  const cfg = path.join(dir, 'vm.json');
  const disk = { name: 'm', socket: sock, size: 4, store };
  const keep = { name: 'k', socket: path.join(dir, 'k.sock'), size: 4, memory_backed: false };
  fs.writeFileSync(cfg, JSON.stringify({ disks: [keep, disk] }));
  d = startRnull(['--config', cfg], dir);
  try {
    await until(() => fs.existsSync(sock), 'socket', 15000);
    const fe = new TestFrontend(sock);
    fes.push(fe);
    await fe.setup({ queues: 1 });
    const data = Buffer.alloc(4096, 0x5a);
    expect((await fe.blk(0, 1, 64, { data })).status).toBe(0);

    fs.writeFileSync(cfg, JSON.stringify({ disks: [keep] }));
    expect(await reload(d)).toMatchObject({ added: [], removed: ['m'], failed: [] });
    await fe.waitClosed(10000);

    fs.writeFileSync(cfg, JSON.stringify({ disks: [keep, disk] }));
    expect(await reload(d)).toMatchObject({ added: ['m'], removed: [], failed: [] });
    const fe2 = new TestFrontend(sock);
    fes.push(fe2);
    await fe2.setup({ queues: 1 });
    expect((await fe2.blk(0, IN, 64, { readLen: 4096 })).data!.equals(data)).toBe(true);
    d.proc.kill('SIGTERM');
    expect(await d.exit).toBe(0);
  } finally {
    fs.rmSync(store, { force: true });
  }
});
