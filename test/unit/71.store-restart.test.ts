/**
 * A memory-backed disk's data outlives the daemon (issue 11): the real `rnull` process writes
 * into its store file on tmpfs; killed with SIGKILL (or stopped with SIGTERM) and started again
 * with the same command line, it serves the same data. store_fresh starts empty,
 * store_remove_on_exit removes the file on SIGTERM, the default location is derived from the
 * socket, a store in use by another daemon is refused, and the volatile write cache is lost on
 * a crash but written back on SIGTERM.
 */
import { spawn, spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { defaultStorePath } from '../../config/store-path';
import { until } from '../helpers/backend';
import { BIN, killDaemon, startRnull, type Daemon } from '../helpers/daemon-process';
import { TestFrontend } from '../helpers/frontend';

const T_IN = 0;
const T_OUT = 1;
const T_FLUSH = 4;

/** A block of `n` bytes, different for every (seed, byte). */
function pattern(n: number, seed: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 7 + seed * 13 + (i >> 9)) & 0xff;
  return b;
}

let dir: string; // sockets (not tmpfs)
let shm: string; // stores (tmpfs)
let running: Daemon[] = [];
let frontends: TestFrontend[] = [];

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-store-'));
  shm = fs.mkdtempSync('/dev/shm/rnull-store-test-');
});
afterEach(async () => {
  for (const fe of frontends) fe.close();
  frontends = [];
  for (const d of running) await killDaemon(d);
  running = [];
  fs.rmSync(dir, { recursive: true, force: true });
  fs.rmSync(shm, { recursive: true, force: true });
});

/** Starts the daemon and waits until its socket listens and it logged 'listening'. */
async function serve(args: string[], sock: string, cwd = dir, env?: NodeJS.ProcessEnv): Promise<Daemon> {
  const d = startRnull(args, cwd, env);
  running.push(d);
  await until(() => d.out.some((l) => l.includes('"listening"')) || d.proc.exitCode !== null, 'listening', 15000);
  if (d.proc.exitCode !== null) throw new Error(`daemon exited ${d.proc.exitCode}: ${d.out.join('\n')}`);
  expect(fs.existsSync(sock)).toBe(true);
  return d;
}

async function connect(sock: string, queues = 1): Promise<TestFrontend> {
  const fe = new TestFrontend(sock);
  frontends.push(fe);
  await fe.setup({ queues });
  return fe;
}

async function kill9(d: Daemon): Promise<void> {
  for (const fe of frontends) fe.close();
  frontends = [];
  d.proc.kill('SIGKILL');
  await d.exit;
}

async function term(d: Daemon): Promise<void> {
  for (const fe of frontends) fe.close();
  frontends = [];
  d.proc.kill('SIGTERM');
  expect(await d.exit).toBe(0);
}

/** The 'store' log line of a daemon. */
function storeLine(d: Daemon): Record<string, unknown> {
  const line = d.out.find((l) => l.includes('"store: '));
  if (line === undefined) throw new Error(`no store line in:\n${d.out.join('\n')}`);
  return JSON.parse(line) as Record<string, unknown>;
}

/** Writes three blocks (one across a page edge, one 64 KiB) and returns them by sector. */
async function writeSome(fe: TestFrontend, q = 0, seed = 1): Promise<Array<[number, Buffer]>> {
  const blocks: Array<[number, Buffer]> = [
    [0, pattern(4096, seed)],
    [7, pattern(1024, seed + 1)], // sectors 7-8: crosses the first page's end
    [20480, pattern(65536, seed + 2)],
  ];
  for (const [sector, data] of blocks) expect(await fe.blk(q, T_OUT, sector, { data })).toMatchObject({ status: 0 });
  return blocks;
}

/** The bytes the disk should hold after writeSome (later writes over earlier ones). */
async function expectBlocks(fe: TestFrontend, blocks: Array<[number, Buffer]>, q = 0): Promise<void> {
  const ref = Buffer.alloc(20480 * 512 + 65536);
  for (const [sector, data] of blocks) data.copy(ref, sector * 512);
  for (const [sector, data] of blocks) {
    const r = await fe.blk(q, T_IN, sector, { readLen: data.length });
    expect(r.status).toBe(0);
    expect(r.data!.equals(ref.subarray(sector * 512, sector * 512 + data.length))).toBe(true);
  }
}

async function expectZeroes(fe: TestFrontend, sector: number, len: number): Promise<void> {
  const r = await fe.blk(0, T_IN, sector, { readLen: len });
  expect(r.status).toBe(0);
  expect(r.data!.every((b) => b === 0)).toBe(true);
}

test('data written survives SIGKILL: the same command line finds it, unwritten blocks still read zeroes', async () => {
  const sock = path.join(dir, 'd.sock');
  const store = path.join(shm, 'd.store');
  const args = ['--socket', sock, '--size', '16', '--store', store];
  let d = await serve(args, sock);
  expect(storeLine(d)).toMatchObject({ store, created: true });
  expect(fs.statSync(store)).toMatchObject({ size: 16 << 20, mode: 0o100600 });
  let fe = await connect(sock);
  const blocks = await writeSome(fe);
  await kill9(d);
  expect(fs.existsSync(store)).toBe(true);

  d = await serve(args, sock);
  expect(storeLine(d)).toMatchObject({ store, created: false, foundBytes: 3 * 4096 + 65536 - 4096 });
  fe = await connect(sock);
  await expectBlocks(fe, blocks);
  await expectZeroes(fe, 100, 8192);
  // Sparse: the file holds only the pages written (4 KiB pages 0, 1 and 2560..2575).
  expect(fs.statSync(store).blocks * 512).toBe(2 * 4096 + 65536);
});

test('threads 2: both threads write into the one store; after SIGKILL every block is back, read through the other queue', async () => {
  const sock = path.join(dir, 't.sock');
  const store = path.join(shm, 't.store');
  const args = ['--socket', sock, '--size', '16', '--store', store, '--num-queues', '2', '--threads', '2'];
  let d = await serve(args, sock);
  let fe = await connect(sock, 2);
  const a: Buffer = pattern(8192, 5);
  const b: Buffer = pattern(8192, 9);
  expect(await fe.blk(0, T_OUT, 64, { data: a })).toMatchObject({ status: 0 }); // main thread
  expect(await fe.blk(1, T_OUT, 128, { data: b })).toMatchObject({ status: 0 }); // worker thread
  await kill9(d);

  d = await serve(args, sock);
  fe = await connect(sock, 2);
  expect((await fe.blk(1, T_IN, 64, { readLen: 8192 })).data!.equals(a)).toBe(true);
  expect((await fe.blk(0, T_IN, 128, { readLen: 8192 })).data!.equals(b)).toBe(true);
  await term(d);
});

test('store_fresh starts the disk empty; SIGTERM keeps the store; store_remove_on_exit removes it', async () => {
  const sock = path.join(dir, 'f.sock');
  const store = path.join(shm, 'f.store');
  const args = ['--socket', sock, '--size', '16', '--store', store];
  let d = await serve(args, sock);
  let fe = await connect(sock);
  const blocks = await writeSome(fe);
  await term(d);
  expect(fs.existsSync(store)).toBe(true);

  d = await serve(args, sock); // SIGTERM kept it
  fe = await connect(sock);
  await expectBlocks(fe, blocks);
  await term(d);

  d = await serve([...args, '--store-fresh', 'true'], sock);
  expect(storeLine(d)).toMatchObject({ fresh: true, foundBytes: 0 });
  expect(fs.statSync(store).blocks).toBe(0);
  fe = await connect(sock);
  await expectZeroes(fe, 0, 4096);
  await expectZeroes(fe, 20480, 65536);
  const again = await writeSome(fe, 0, 3);
  await term(d);

  d = await serve([...args, '--store-remove-on-exit', 'true'], sock);
  fe = await connect(sock);
  await expectBlocks(fe, again);
  await term(d);
  expect(fs.existsSync(store)).toBe(false);
  expect(d.out.some((l) => l.includes('store removed'))).toBe(true);
});

test('a second daemon on a store in use is refused (exit 1, the reason), and the first keeps serving', async () => {
  const sock = path.join(dir, 'a.sock');
  const store = path.join(shm, 'a.store');
  const d = await serve(['--socket', sock, '--size', '16', '--store', store], sock);
  const fe = await connect(sock);
  const blocks = await writeSome(fe);
  const other = startRnull(['--socket', path.join(dir, 'b.sock'), '--size', '16', '--store', store], dir);
  running.push(other);
  expect(await other.exit).toBe(1);
  expect(other.out.join('\n')).toContain(`store ${store} is in use by another process`);
  expect(fs.existsSync(path.join(dir, 'b.sock'))).toBe(false);
  await expectBlocks(fe, blocks);
  await term(d);
});

test('default location: under $RUNTIME_DIRECTORY, named after the socket; the same start twice keeps the data', async () => {
  // As `npm start` (no flags, ./rnull.sock) run twice in one directory under systemd.
  const env = { ...process.env, RUNTIME_DIRECTORY: shm };
  const sock = path.join(dir, 'rnull.sock');
  const store = defaultStorePath(sock, env);
  expect(path.dirname(store)).toBe(shm);
  expect(path.basename(store)).toMatch(/^rnull-[0-9a-f]{12}\.store$/);
  let d = await serve(['--size', '16'], sock, dir, env);
  expect(storeLine(d)).toMatchObject({ store, created: true });
  let fe = await connect(sock);
  const blocks = await writeSome(fe);
  await kill9(d);
  d = await serve(['--size', '16'], sock, dir, env);
  fe = await connect(sock);
  await expectBlocks(fe, blocks);
  await term(d);
  expect(fs.existsSync(store)).toBe(true);
});

test('default location without systemd: /dev/shm/rnull-UID, a private directory', async () => {
  const env = { ...process.env };
  delete env.RUNTIME_DIRECTORY;
  const sock = path.join(dir, 'rnull.sock');
  const store = defaultStorePath(sock, env);
  expect(path.dirname(store)).toBe(`/dev/shm/rnull-${process.geteuid!()}`);
  try {
    let d = await serve(['--size', '16'], sock, dir, env);
    expect(storeLine(d)).toMatchObject({ store });
    expect(fs.lstatSync(path.dirname(store)).mode & 0o077).toBe(0);
    let fe = await connect(sock);
    const blocks = await writeSome(fe);
    await kill9(d);
    d = await serve(['--size', '16', '--store-remove-on-exit', 'true'], sock, dir, env);
    fe = await connect(sock);
    await expectBlocks(fe, blocks);
    await term(d);
    expect(fs.existsSync(store)).toBe(false);
  } finally {
    fs.rmSync(store, { force: true });
  }
});

test('cache_size: unflushed cached writes are lost on SIGKILL, flushed ones are not; SIGTERM writes the cache back', async () => {
  const sock = path.join(dir, 'c.sock');
  const store = path.join(shm, 'c.store');
  const args = ['--socket', sock, '--size', '16', '--store', store, '--cache-size', '1'];
  let d = await serve(args, sock);
  let fe = await connect(sock);
  const flushed = pattern(4096, 21);
  const unflushed = pattern(4096, 22);
  expect(await fe.blk(0, T_OUT, 0, { data: flushed })).toMatchObject({ status: 0 });
  expect(await fe.blk(0, T_FLUSH, 0)).toMatchObject({ status: 0 });
  expect(await fe.blk(0, T_OUT, 800, { data: unflushed })).toMatchObject({ status: 0 });
  expect((await fe.blk(0, T_IN, 800, { readLen: 4096 })).data!.equals(unflushed)).toBe(true); // from the cache
  await kill9(d); // a crash: as a power failure, the volatile cache is gone

  d = await serve(args, sock);
  fe = await connect(sock);
  expect((await fe.blk(0, T_IN, 0, { readLen: 4096 })).data!.equals(flushed)).toBe(true);
  await expectZeroes(fe, 800, 4096);
  const later = pattern(4096, 23);
  expect(await fe.blk(0, T_OUT, 1600, { data: later })).toMatchObject({ status: 0 }); // not flushed
  await term(d); // an orderly stop writes the cache back

  d = await serve(args, sock);
  fe = await connect(sock);
  expect((await fe.blk(0, T_IN, 1600, { readLen: 4096 })).data!.equals(later)).toBe(true);
  await term(d);
});

/** Runs the daemon with a store it must refuse: exit 2 within 20 s, the reason on stderr, no socket. */
async function refused(store: string, extra: string[] = []): Promise<string> {
  const sock = path.join(dir, `r${running.length}.sock`);
  const d = startRnull(['--socket', sock, '--size', '16', '--store', store, ...extra], dir);
  running.push(d);
  const timer = setTimeout(() => d.proc.kill('SIGKILL'), 20_000);
  const code = await d.exit;
  clearTimeout(timer);
  const out = d.out.join('\n');
  expect({ code, out }).toEqual({ code: 2, out: expect.stringContaining(`rnull: store ${store}`) });
  expect(fs.existsSync(sock)).toBe(false);
  return out;
}

test('hostile store paths: a symlink, a FIFO, a directory, a file of another size are refused (exit 2, the reason, no hang)', async () => {
  const target = path.join(shm, 'target');
  fs.writeFileSync(target, 'not a disk');
  const link = path.join(shm, 'link.store');
  fs.symlinkSync(target, link);
  expect(await refused(link)).toContain('is a symbolic link');
  expect(fs.readFileSync(target, 'utf8')).toBe('not a disk');

  const fifo = path.join(shm, 'fifo.store');
  expect(spawnSync('mkfifo', [fifo]).status).toBe(0);
  expect(await refused(fifo)).toContain('is a FIFO');

  const sub = path.join(shm, 'dir.store');
  fs.mkdirSync(sub);
  expect(await refused(sub)).toContain('is a directory');

  const small = path.join(shm, 'small.store');
  fs.writeFileSync(small, Buffer.alloc(8192, 1));
  fs.chmodSync(small, 0o600);
  expect(await refused(small)).toContain('holds 8192 bytes, but the disk has 16777216 (16 MiB)');
  expect(fs.readFileSync(small).equals(Buffer.alloc(8192, 1))).toBe(true); // untouched
  // With store_fresh, that last one is the user's way out.
  const sock = path.join(dir, 'fresh.sock');
  const d = await serve(['--socket', sock, '--size', '16', '--store', small, '--store-fresh', 'true'], sock);
  expect(fs.statSync(small).size).toBe(16 << 20);
  await term(d);
});

test('a full file system: writes into new blocks fail with IOERR (logged once), the daemon goes on, the data written before is intact', async () => {
  // The daemon in a mount namespace of its own with a 1 MiB tmpfs for its store.
  const mnt = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-full-'));
  const sock = path.join(dir, 'full.sock');
  try {
    const u = spawn('unshare', ['-rm', 'sh', '-c', `mount -t tmpfs -o size=1m tmpfs "$1" && exec "$2" "$3" --socket "$4" --size 16 --store "$1/d.store"`, 'sh', mnt, process.execPath, BIN, sock], {
      cwd: dir,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const daemon: Daemon = { proc: u, out: [], exit: new Promise((resolve) => u.on('exit', (code) => resolve(code))) };
    u.stdout!.on('data', (b: Buffer) => daemon.out.push(...b.toString().split('\n').filter((l) => l !== '')));
    u.stderr!.on('data', (b: Buffer) => daemon.out.push(b.toString()));
    running.push(daemon);
    await until(() => daemon.out.some((l) => l.includes('"listening"')) || u.exitCode !== null, 'listening', 15000);
    expect(u.exitCode).toBeNull();
    const fe = await connect(sock);
    const blocks: Buffer[] = [];
    let status = 0;
    for (let i = 0; i < 12 && status === 0; i++) {
      const data = pattern(131072, 40 + i);
      status = (await fe.blk(0, T_OUT, i * 256, { data })).status;
      if (status === 0) blocks.push(data);
    }
    expect({ status, written: blocks.length }).toEqual({ status: 1, written: 8 }); // 8 x 128 KiB = 1 MiB
    expect((await fe.blk(0, T_OUT, 9 * 256, { data: pattern(4096, 1) })).status).toBe(1); // still full
    expect((await fe.blk(0, T_OUT, 0, { data: pattern(4096, 2) })).status).toBe(0); // an allocated block: room enough
    blocks[0] = Buffer.concat([pattern(4096, 2), blocks[0].subarray(4096)]);
    for (const [i, data] of blocks.entries()) expect((await fe.blk(0, T_IN, i * 256, { readLen: 131072 })).data!.equals(data)).toBe(true);
    await expectZeroes(fe, 8 * 256, 131072);
    const noRoom = () => daemon.out.filter((l) => l.includes('found no room in the store'));
    await until(() => noRoom().length > 0, 'the no-room log line', 10000);
    await term(daemon);
    expect(noRoom()).toHaveLength(1);
  } finally {
    fs.rmSync(mnt, { recursive: true, force: true });
  }
});

test('discard and write-zeroes through the daemon punch holes in the store: st_blocks falls, zeroes read back, also after SIGKILL', async () => {
  const sock = path.join(dir, 'z.sock');
  const store = path.join(shm, 'z.store');
  const args = ['--socket', sock, '--size', '16', '--store', store, '--discard', 'true'];
  let d = await serve(args, sock);
  let fe = await connect(sock);
  const data = pattern(1 << 20, 77);
  expect(await fe.blk(0, T_OUT, 0, { data })).toMatchObject({ status: 0 });
  expect(fs.statSync(store).blocks * 512).toBe(1 << 20);
  const seg = (type: number, sector: number, num: number) => {
    const b = Buffer.alloc(16);
    b.writeBigUInt64LE(BigInt(sector), 0);
    b.writeUInt32LE(num, 8);
    return fe.blk(0, type, 0, { data: b });
  };
  expect(await seg(11, 8, 1024)).toMatchObject({ status: 0 }); // DISCARD bytes 4 KiB .. 516 KiB
  expect(await seg(13, 1536, 8)).toMatchObject({ status: 0 }); // WRITE_ZEROES bytes 768 KiB .. 772 KiB
  expect(fs.statSync(store).blocks * 512).toBe((1 << 20) - (512 << 10) - 4096);
  const ref = Buffer.from(data);
  ref.fill(0, 4096, 4096 + (512 << 10));
  ref.fill(0, 768 << 10, (768 << 10) + 4096);
  expect((await fe.blk(0, T_IN, 0, { readLen: 1 << 20 })).data!.equals(ref)).toBe(true);
  await kill9(d);
  d = await serve(args, sock);
  expect(storeLine(d)).toMatchObject({ foundBytes: (1 << 20) - (512 << 10) - 4096 });
  fe = await connect(sock);
  expect((await fe.blk(0, T_IN, 0, { readLen: 1 << 20 })).data!.equals(ref)).toBe(true);
  await term(d);
});

test('an orderly stop removes a store that holds no data (nothing lost: a missing store is an empty disk)', async () => {
  const sock = path.join(dir, 'e.sock');
  const store = path.join(shm, 'e.store');
  const args = ['--socket', sock, '--size', '16', '--store', store, '--discard', 'true'];
  let d = await serve(args, sock);
  expect(fs.existsSync(store)).toBe(true);
  await term(d);
  expect(fs.existsSync(store)).toBe(false);
  d = await serve(args, sock);
  const fe = await connect(sock);
  expect(await fe.blk(0, T_OUT, 0, { data: pattern(4096, 1) })).toMatchObject({ status: 0 });
  const b = Buffer.alloc(16);
  b.writeUInt32LE(8, 8); // DISCARD sectors 0..7: the store holds nothing again
  expect(await fe.blk(0, 11, 0, { data: b })).toMatchObject({ status: 0 });
  await term(d);
  expect(fs.existsSync(store)).toBe(false);
});
