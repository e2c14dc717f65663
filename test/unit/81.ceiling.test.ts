/**
 * bench/ceiling: vhost-ceiling, the do-nothing vhost-user-blk back-end that is the benchmarks'
 * ceiling. It must serve the protocol as QEMU and vhost-bench speak it (1 and 2 queues, event
 * index on and off, indirect tables), complete every request with status OK while touching no
 * data (only the status byte and the used ring), and treat a hostile ring as a broken ring:
 * logged, not processed further, the process and its other rings unharmed. Behaviour only, no
 * speed.
 */
import { ChildProcess, spawn, spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { until } from '../helpers/backend';
import { TestFrontend } from '../helpers/frontend';
import { blkHeader } from '../helpers/driver-ring';

const ROOT = path.join(__dirname, '..', '..');
const CEILING = path.join(ROOT, 'bench', 'ceiling', 'build', 'vhost-ceiling');
const CLIENT = path.join(ROOT, 'bench', 'client', 'build', 'vhost-bench');

interface Running {
  child: ChildProcess;
  sock: string;
  stderr: () => string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

let dir: string;

beforeAll(() => {
  for (const d of ['ceiling', 'client']) {
    const r = spawnSync('make', ['-s', '-C', path.join(ROOT, 'bench', d)], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`make -C bench/${d} failed: ${r.stderr}`);
  }
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-ceiling-'));
}, 120_000);

afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

async function start(name: string, args: string[] = []): Promise<Running> {
  const sock = path.join(dir, `${name}.sock`);
  const child = spawn(CEILING, ['--socket', sock, '--size', '64', ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (d) => (err += d));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => child.on('exit', (code, signal) => r({ code, signal })));
  await until(() => fs.existsSync(sock), 'vhost-ceiling socket', 10_000);
  return { child, sock, stderr: () => err, exited };
}

async function stop(b: Running): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  b.child.kill('SIGTERM');
  const t = setTimeout(() => b.child.kill('SIGKILL'), 10_000);
  const r = await b.exited;
  clearTimeout(t);
  return r;
}

function bench(sock: string, args: string[]): { code: number | null; json: any; out: string } {
  const json = path.join(dir, `bench-${Math.random().toString(36).slice(2)}.json`);
  const r = spawnSync(CLIENT, ['--socket', sock, '--json', json, '--quiet', '--timeout-ms', '10000', ...args], { encoding: 'utf8', timeout: 60_000 });
  return { code: r.status, json: fs.existsSync(json) ? JSON.parse(fs.readFileSync(json, 'utf8')) : null, out: r.stdout + r.stderr };
}

describe('vhost-ceiling serves vhost-bench', () => {
  let b: Running;
  beforeAll(async () => {
    b = await start('serve');
  });
  afterAll(async () => {
    const r = await stop(b);
    expect(r).toEqual({ code: 0, signal: null });
    expect(fs.existsSync(b.sock)).toBe(false);
  });

  test.each([
    ['1 queue QD1', ['--queues', '1', '--qd', '1', '--ios', '2000']],
    ['2 queues QD32', ['--queues', '2', '--qd', '32', '--ios', '20000']],
    ['event index off (ring flags)', ['--queues', '1', '--qd', '32', '--event-idx', 'off', '--ios', '20000']],
    ['indirect tables, writes', ['--queues', '1', '--qd', '128', '--ring-size', '128', '--indirect', 'on', '--rw', 'randwrite', '--ios', '20000']],
  ])('%s: every request completes with status OK, used lengths as for filled buffers, ring indices consistent', (_name, args) => {
    const r = bench(b.sock, args);
    expect(r.code).toBe(0);
    const j = r.json;
    expect(j.ok).toBe(true);
    expect(j.ios).toBe(Number(args[args.indexOf('--ios') + 1]));
    expect(j.errors.total).toBe(0);
    expect(j.status.ok).toBe(j.completions);
    expect(j.used_len_unexpected).toBe(0); // data + 1 for reads, 1 for writes
    expect(j.warnings).toEqual([]); // GET_VRING_BASE returned the client's avail index
    expect(j.device.queues_supported).toBe(2);
    expect(j.device.capacity_sectors).toBe(64 * 2048);
  });

  test('it touches no data: a verify run finds the poison it wrote before every read', () => {
    const r = bench(b.sock, ['--queues', '1', '--qd', '4', '--rw', 'randread', '--verify', '--ios', '200']);
    expect(r.code).toBe(2);
    expect(r.json.verify.mismatches).toBe(200);
    expect(r.out).toMatch(/found the poison we wrote before the read \(data not transferred\)/);
  });
});

describe('vhost-ceiling against the project test front-end', () => {
  test('only the status byte is written; the buffers and the header stay as they were', async () => {
    const b = await start('bytes');
    const fe = new TestFrontend(b.sock);
    try {
      await fe.setup({ queues: 1 });
      const r = await fe.blk(0, 0 /* IN */, 8, { readLen: 4096 });
      expect(r.status).toBe(0);
      expect(r.len).toBe(4097);
      expect(r.data!.every((x) => x === 0xee)).toBe(true);
      const w = await fe.blk(0, 1 /* OUT */, 8, { data: Buffer.alloc(1024, 0x5a) });
      expect(w).toMatchObject({ status: 0, len: 1 });
    } finally {
      fe.close();
      expect((await stop(b)).code).toBe(0);
    }
  });

  test.each([
    ['a buffer outside guest memory', 'buffer outside guest memory'],
    ['a chain that loops', 'chain longer than its table'],
    ['an avail index more than a ring ahead', 'avail index ran more than a ring ahead'],
    ['a readable status descriptor', 'last descriptor is not a writable status byte'],
  ])('%s breaks that ring only: logged, not completed, the other ring and the next front-end still served', async (what, message) => {
    const b = await start(`hostile-${what.length}`);
    const fe = new TestFrontend(b.sock);
    try {
      await fe.setup({ queues: 2 });
      const ram = fe.ram;
      const ring = fe.rings[0]!;
      const hdr = ram.alloc(16);
      ram.bytes(hdr, 16).set(blkHeader(0, 0));
      const st = ram.alloc(1);
      ram.bytes(st, 1)[0] = 0xff;
      if (what === 'a buffer outside guest memory') ring.addChain([{ addr: hdr, len: 16 }, { addr: 0x7fff_0000_0000, len: 4096, write: true }, { addr: st, len: 1, write: true }]);
      else if (what === 'a chain that loops') {
        ring.setDesc(0, { addr: hdr, len: 16, flags: 1, next: 1 });
        ring.setDesc(1, { addr: hdr, len: 16, flags: 1, next: 0 });
        ring.offer(0);
      } else if (what === 'an avail index more than a ring ahead') ring.setAvailIdx(1000);
      else ring.addChain([{ addr: hdr, len: 16 }, { addr: st, len: 1 }]);
      fe.kick(0);
      await until(() => b.stderr().includes(message), `the log line "${message}"`, 10_000);
      expect(b.stderr()).toMatch(/ring 0 broken: .*no longer processed/);
      expect(ring.usedIdx()).toBe(0);
      expect(ram.bytes(st, 1)[0]).toBe(0xff);
      // Ring 1 is still served.
      expect((await fe.blk(1, 0, 0, { readLen: 512 })).status).toBe(0);
      fe.close();
      // So is the next front-end.
      const r = bench(b.sock, ['--queues', '2', '--qd', '8', '--ios', '1000']);
      expect(r.code).toBe(0);
      expect(r.json.errors.total).toBe(0);
    } finally {
      if (!fe.closed) fe.close();
      expect(await stop(b)).toEqual({ code: 0, signal: null });
    }
  });

  test('a malformed message ends the connection with a log line; the back-end accepts the next one', async () => {
    const b = await start('badmsg');
    const fe = new TestFrontend(b.sock);
    try {
      fe.send(8 /* SET_VRING_NUM */, Buffer.alloc(3));
      await fe.waitClosed(10_000);
      expect(b.stderr()).toMatch(/message 8: vring state payload; closing the connection/);
      const r = bench(b.sock, ['--queues', '1', '--qd', '1', '--ios', '100']);
      expect(r.code).toBe(0);
    } finally {
      fe.close();
      expect((await stop(b)).code).toBe(0);
    }
  });
});

test('npm run bench --backends rnull,ceiling measures the ceiling and prints rnull/ceiling', () => {
  const out = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-bench-ceiling-'));
  try {
    const r = spawnSync(process.execPath, [path.join(ROOT, 'bench', 'run.js'), '--quick', '--no-build', '--no-pin', '--backends', 'rnull,ceiling', '--out', out], { encoding: 'utf8', timeout: 240_000 });
    expect(r.status).toBe(0);
    const md = fs.readFileSync(path.join(out, 'results.md'), 'utf8');
    expect(md).toContain('| workload | disk | rnull IOPS | QSD IOPS | ceiling IOPS | rnull/QSD | rnull/ceiling | QSD/ceiling |');
    const j = JSON.parse(fs.readFileSync(path.join(out, 'results.json'), 'utf8'));
    expect(j.meta.options.backends).toEqual(['rnull', 'ceiling']);
    for (const c of j.cases) {
      expect(c.median.ceiling.iops).toBeGreaterThan(0);
      expect(c.median.ceiling.errors).toBe(0);
      expect(c.ratio.ceiling).toBeCloseTo(c.median.rnull.iops / c.median.ceiling.iops, 6);
    }
  } finally {
    fs.rmSync(out, { recursive: true, force: true });
  }
}, 300_000);
