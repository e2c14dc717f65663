/**
 * bench/: the vhost-bench front-end (bench/client, C++) driving a real rnull daemon with data
 * verification, its stall report and option errors, and the `npm run bench` runner in --quick
 * mode. These tests check behaviour (fields, counts, verification, files written), never speed.
 */
import { ChildProcess, spawn, spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { until } from '../helpers/backend';

const ROOT = path.join(__dirname, '..', '..');
const CLIENT_DIR = path.join(ROOT, 'bench', 'client');
const CLIENT = path.join(CLIENT_DIR, 'build', 'vhost-bench');
const RUNNER = path.join(ROOT, 'bench', 'run.js');
const DAEMON = path.join(ROOT, 'dist', 'daemon', 'main.js');
const DISK_MIB = 64;

interface Latency {
  min: number;
  mean: number;
  p50: number;
  p90: number;
  p99: number;
  p999: number;
  max: number;
}

interface ClientResult {
  tool: string;
  ok: boolean;
  options: { queues: number; qd: number; bs: number; rw: string; verify: boolean; wait: string; event_idx: boolean; indirect: boolean; ios: number | null; runtime_s: number | null };
  device: { capacity_sectors: number; blk_size: number; queues_supported: number };
  ios: number;
  reads: number;
  writes: number;
  bytes: number;
  runtime_s: number;
  iops: number;
  mbps: number;
  completions: number;
  lat_us: Latency;
  errors: { ioerr: number; unsupp: number; other: number; total: number };
  status: { ok: number; ioerr: number; unsupp: number; other: number };
  verify: { enabled: boolean; checked: number; unwritten: number; mismatches: number; readback_ios: number; details: string[] };
  backend_cpu_us_per_io: { stat: number | null; schedstat: number | null };
  client_cpu_us_per_io: number | null;
  per_queue: Array<{ queue: number; ios: number; errors: number; inflight_at_end: number; lat_us: Latency }>;
  stall: null | { queue: number; timeout_ms: number; per_queue: Array<{ queue: number; inflight: number; ring: string }> };
  failure: string | null;
  warnings: string[];
}

interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Runs a command to completion (killed after `ms`). */
function run(cmd: string, args: string[], ms: number): Promise<Exit> {
  return new Promise((resolve) => {
    const p = spawn(cmd, args, { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
    p.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => p.kill('SIGKILL'), ms);
    p.on('exit', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

interface Daemon {
  proc: ChildProcess;
  socket: string;
  stderr: string[];
  exit: Promise<number | null>;
}

async function startDaemon(dir: string, name: string, memoryBacked: boolean): Promise<Daemon> {
  const socket = path.join(dir, `${name}.sock`);
  const proc = spawn(
    process.execPath,
    [DAEMON, '--socket', socket, '--size', String(DISK_MIB), '--blocksize', '512', '--memory-backed', String(memoryBacked), '--store-remove-on-exit', 'true', '--num-queues', '2', '--log-level', 'warn'],
    { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] },
  );
  const stderr: string[] = [];
  proc.stderr!.on('data', (d: Buffer) => stderr.push(d.toString()));
  const exit = new Promise<number | null>((resolve) => proc.on('exit', (code) => resolve(code)));
  await until(() => fs.existsSync(socket) || proc.exitCode !== null, `${socket}`, 15000);
  if (!fs.existsSync(socket)) throw new Error(`rnull did not start: ${stderr.join('')}`);
  return { proc, socket, stderr, exit };
}

async function stopDaemon(d: Daemon | undefined): Promise<void> {
  if (d === undefined || d.proc.exitCode !== null || d.proc.signalCode !== null) return;
  d.proc.kill('SIGCONT');
  d.proc.kill('SIGTERM');
  const timer = setTimeout(() => d.proc.kill('SIGKILL'), 5000);
  await d.exit;
  clearTimeout(timer);
}

function readResult(file: string): ClientResult {
  return JSON.parse(fs.readFileSync(file, 'utf8')) as ClientResult;
}

let dir: string;
let daemon: Daemon | undefined;

beforeAll(async () => {
  const mk = spawnSync('make', ['-C', CLIENT_DIR], { encoding: 'utf8', timeout: 240000 });
  if (mk.status !== 0) throw new Error(`make -C bench/client failed:\n${mk.stdout}\n${mk.stderr}`);
  expect(fs.existsSync(CLIENT)).toBe(true);
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-bench-test-'));
  daemon = await startDaemon(dir, 'mem', true);
}, 300000);

afterAll(async () => {
  await stopDaemon(daemon);
  if (dir !== undefined) fs.rmSync(dir, { recursive: true, force: true });
}, 30000);

function expectSaneLatency(l: Latency): void {
  expect(l.min).toBeGreaterThan(0);
  expect(l.p50).toBeGreaterThanOrEqual(l.min);
  expect(l.p99).toBeGreaterThanOrEqual(l.p50);
  expect(l.p999).toBeGreaterThanOrEqual(l.p99);
  expect(l.max).toBeGreaterThanOrEqual(l.p999);
  expect(l.mean).toBeGreaterThan(0);
}

test('two queues of mixed 4k reads and writes: every I/O counted, every read verified, no mismatch and no error', async () => {
  const out = path.join(dir, 'mixed.json');
  const r = await run(
    CLIENT,
    ['--socket', daemon!.socket, '--queues', '2', '--qd', '8', '--bs', '4096', '--rw', 'randrw', '--mix', '50', '--ios', '400', '--verify',
      '--backend-pid', String(daemon!.proc.pid), '--json', out, '--timeout-ms', '5000', '--quiet'],
    60000,
  );
  expect(r.stderr).toBe('');
  expect(r.code).toBe(0);
  const j = readResult(out);
  expect(j.tool).toBe('vhost-bench');
  expect(j.ok).toBe(true);
  expect(j.options).toMatchObject({ queues: 2, qd: 8, bs: 4096, rw: 'randrw', verify: true, ios: 400, runtime_s: null });
  expect(j.device).toMatchObject({ capacity_sectors: DISK_MIB * 2048, blk_size: 512, queues_supported: 2 });
  expect(j.ios).toBe(400);
  expect(j.reads + j.writes).toBe(400);
  expect(j.reads).toBeGreaterThan(0);
  expect(j.writes).toBeGreaterThan(0);
  expect(j.bytes).toBe(400 * 4096);
  expect(j.errors).toEqual({ ioerr: 0, unsupp: 0, other: 0, total: 0 });
  expect(j.status.ok).toBe(j.completions);
  // Reads of blocks written earlier in the run, plus the read-back pass over every written block.
  expect(j.verify.enabled).toBe(true);
  expect(j.verify.mismatches).toBe(0);
  expect(j.verify.details).toEqual([]);
  expect(j.verify.readback_ios).toBeGreaterThan(0);
  expect(j.verify.checked - j.verify.unwritten).toBeGreaterThanOrEqual(j.verify.readback_ios);
  expect(j.iops).toBeGreaterThan(0);
  expect(j.mbps).toBeGreaterThan(0);
  expect(j.runtime_s).toBeGreaterThan(0);
  expectSaneLatency(j.lat_us);
  expect(typeof j.backend_cpu_us_per_io.stat).toBe('number');
  expect(j.per_queue.map((q) => q.queue)).toEqual([0, 1]);
  expect(j.per_queue.map((q) => q.ios)).toEqual([200, 200]);
  for (const q of j.per_queue) {
    expect(q.errors).toBe(0);
    expect(q.inflight_at_end).toBe(0);
  }
  expect(j.stall).toBeNull();
  expect(j.failure).toBeNull();
  expect(j.warnings).toEqual([]);
}, 90000);

test('busy-polling without the event index, with indirect descriptors and 64k requests: verified too', async () => {
  const out = path.join(dir, 'poll.json');
  const r = await run(
    CLIENT,
    ['--socket', daemon!.socket, '--qd', '16', '--bs', '65536', '--rw', 'randrw', '--mix', '40', '--ios', '300', '--verify', '--wait', 'poll',
      '--event-idx', 'off', '--indirect', 'on', '--json', out, '--quiet'],
    60000,
  );
  expect(r.code).toBe(0);
  const j = readResult(out);
  expect(j.options).toMatchObject({ wait: 'poll', event_idx: false, indirect: true, bs: 65536 });
  expect(j.ios).toBe(300);
  expect(j.errors.total).toBe(0);
  expect(j.verify.mismatches).toBe(0);
  expect(j.verify.checked).toBeGreaterThan(0);
  expect(j.backend_cpu_us_per_io).toEqual({ stat: null, schedstat: null }); // no --backend-pid
}, 90000);

test('a timed run with a ramp counts only the measured window', async () => {
  const out = path.join(dir, 'timed.json');
  const r = await run(CLIENT, ['--socket', daemon!.socket, '--qd', '4', '--rw', 'read', '--runtime', '0.5', '--ramp', '0.2', '--json', out, '--quiet'], 60000);
  expect(r.code).toBe(0);
  const j = readResult(out);
  expect(j.options).toMatchObject({ rw: 'read', runtime_s: 0.5, ios: null });
  expect(j.runtime_s).toBe(0.5);
  expect(j.ios).toBeGreaterThan(0);
  expect(j.writes).toBe(0);
  expect(j.completions).toBeGreaterThanOrEqual(j.ios);
  expect(j.iops).toBeCloseTo(j.ios / 0.5, 3);
}, 60000);

test('a back-end that stops answering is reported as a stall with the requests in flight, exit 3', async () => {
  const d = await startDaemon(dir, 'stall', false);
  try {
    const out = path.join(dir, 'stall.json');
    const client = run(CLIENT, ['--socket', d.socket, '--queues', '2', '--qd', '4', '--runtime', '30', '--timeout-ms', '500', '--json', out, '--quiet'], 60000);
    await new Promise((r) => setTimeout(r, 1000)); // connected and running by then
    d.proc.kill('SIGSTOP');
    const r = await client;
    d.proc.kill('SIGCONT');
    expect(r.code).toBe(3);
    expect(r.stderr).toContain('STALL');
    const j = readResult(out);
    expect(j.ok).toBe(false);
    expect(j.stall).not.toBeNull();
    expect(j.stall!.timeout_ms).toBe(500);
    expect(j.stall!.per_queue).toHaveLength(2);
    expect(j.stall!.per_queue.some((q) => q.inflight > 0)).toBe(true);
    for (const q of j.stall!.per_queue) expect(q.ring).toContain('avail.idx=');
  } finally {
    await stopDaemon(d);
  }
}, 60000);

test('impossible options are refused with exit 1 and a message naming the flag', async () => {
  const noSocket = await run(CLIENT, ['--qd', '4'], 10000);
  expect(noSocket.code).toBe(1);
  expect(noSocket.stderr).toContain('--socket');
  const tooDeep = await run(CLIENT, ['--socket', daemon!.socket, '--qd', '128', '--indirect', 'off'], 10000);
  expect(tooDeep.code).toBe(1);
  expect(tooDeep.stderr).toContain('--ring-size');
  const tooManyQueues = await run(CLIENT, ['--socket', daemon!.socket, '--queues', '3', '--runtime', '0.1'], 10000);
  expect(tooManyQueues.code).toBe(1);
  expect(tooManyQueues.stderr).toContain('supports 2 queue(s)');
}, 60000);

test('npm run bench --quick writes the markdown table, the JSON and the SVG', async () => {
  const out = path.join(dir, 'out');
  const args = [RUNNER, '--quick', '--no-build', '--out', out];
  if (os.cpus().length < 2) args.push('--no-pin');
  const r = await run(process.execPath, args, 240000);
  expect(r.stderr).toBe('');
  expect(r.code).toBe(0);
  // scripts/install-deps.sh installs it (qemu-system-common): the comparison is always made.
  const haveQsd = spawnSync('qemu-storage-daemon', ['--version']).status === 0;
  expect(haveQsd).toBe(true);

  const md = fs.readFileSync(path.join(out, 'results.md'), 'utf8');
  expect(md).toContain('| workload | disk | rnull IOPS | QSD IOPS | ratio | rnull p50 / p99.9 us | QSD p50 / p99.9 us | rnull CPU us/IO | QSD CPU us/IO | CPU ratio |');
  expect(md).toMatch(/\| 4k randread QD32 \| null \| [\d.]+ [kM]? ?\|/);
  expect(md).toMatch(/\| 4k randwrite QD32 \| memory \|/);
  expect(r.stdout).toContain('| workload | disk |');

  const json = JSON.parse(fs.readFileSync(path.join(out, 'results.json'), 'utf8')) as {
    meta: { options: { backends: string[]; quick: boolean } };
    cases: Array<{ id: string; median: Record<string, { iops: number; p50: number; p999: number; errors: number } | null>; ratio: { iops: number | null } }>;
    targets: Array<{ target: string; met: boolean | null }>;
  };
  expect(json.meta.options.quick).toBe(true);
  expect(json.meta.options.backends).toEqual(haveQsd ? ['rnull', 'qsd'] : ['rnull']);
  expect(json.cases.map((c) => c.id)).toEqual(['null/4k-randread-qd32', 'mem/4k-randwrite-qd32']);
  for (const c of json.cases) {
    for (const b of json.meta.options.backends) {
      const m = c.median[b];
      expect(m).not.toBeNull();
      expect(m!.iops).toBeGreaterThan(0);
      expect(m!.p999).toBeGreaterThanOrEqual(m!.p50);
      expect(m!.errors).toBe(0);
    }
    if (haveQsd) expect(typeof c.ratio.iops).toBe('number');
  }
  // The data path's targets, listed whether or not this run measured them.
  expect(json.targets.length).toBe(haveQsd ? 14 : 0);
  // --quick measures two cases: QD32 (IOPS, CPU, p99.9) and the memory-backed random write.
  expect(json.targets.filter((t) => t.met === null).length).toBe(haveQsd ? 10 : 0);

  const svg = fs.readFileSync(path.join(out, 'results.svg'), 'utf8');
  expect(svg.startsWith('<svg')).toBe(true);
  expect(svg.trimEnd().endsWith('</svg>')).toBe(true);
  expect(svg).toContain('IOPS against queue depth');
  expect(svg).toContain('<path');
  expect(svg).toContain('<rect');
}, 300000);

test('--baseline runs a second rnull build in the same rounds and prints the before/after table', async () => {
  const out = path.join(dir, 'out-baseline');
  const args = [RUNNER, '--quick', '--no-build', '--backends', 'rnull', '--baseline', ROOT, '--workloads', 'null/4k-randread-qd32', '--out', out];
  if (os.cpus().length < 2) args.push('--no-pin');
  const r = await run(process.execPath, args, 240000);
  expect(r.stderr).toBe('');
  expect(r.code).toBe(0);
  const json = JSON.parse(fs.readFileSync(path.join(out, 'results.json'), 'utf8')) as {
    meta: { options: { backends: string[]; baseline: string } };
    cases: Array<{ median: Record<string, { iops: number; errors: number } | null>; ratio: { before: number | null } }>;
  };
  expect(json.meta.options.backends).toEqual(['rnull', 'base']);
  expect(json.meta.options.baseline).toBe(path.resolve(ROOT));
  expect(json.cases[0].median.base!.iops).toBeGreaterThan(0);
  expect(json.cases[0].median.base!.errors).toBe(0);
  expect(typeof json.cases[0].ratio.before).toBe('number');
  const md = fs.readFileSync(path.join(out, 'results.md'), 'utf8');
  expect(md).toContain('## Before and after');
  expect(md).toMatch(/\| 4k randread QD32 \| null \| [\d.]+ [kM]? ?\| [\d.]+ [kM]? ?\| [\d.]+x \|/);
  // A checkout without a build is refused before anything runs.
  const bad = await run(process.execPath, [RUNNER, '--quick', '--no-build', '--baseline', dir], 30000);
  expect(bad.code).toBe(2);
  expect(bad.stderr).toContain('no dist/daemon/main.js');
}, 300000);

test('bench/micro/dispatch.js runs the dispatch path and reports ns per request', () => {
  const r = spawnSync(process.execPath, [path.join(__dirname, '..', '..', 'bench', 'micro', 'dispatch.js'), '--requests', '20000', '--memory-backed', '--write'], { encoding: 'utf8' });
  expect(r.status).toBe(0);
  const out = JSON.parse(r.stdout);
  expect(out).toMatchObject({ requests: 20000, batch: 32, bs: 4096, memoryBacked: true, write: true });
  expect(out.nsPerRequest).toBeGreaterThan(0);
});
