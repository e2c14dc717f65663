/**
 * Queue thread pinning (disk option `cpus`, `--cpus`): the real daemon (bin/rnull over dist/),
 * its threads' Cpus_allowed_list in /proc/<pid>/task/<tid>/status, and the refusals at start
 * (exit 2 with a message naming the CPU): a CPU outside the allowed set or offline, a list
 * that does not give one CPU per thread, and disks that want the main thread on different CPUs.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { cpuListOf, formatCpuList, parseCpuList } from '../../config/cpu-list';
import { native } from '../../native';
import { until } from '../helpers/backend';
import { exitOf, killDaemon, rnullCommand, spawnDaemon, type Daemon } from '../helpers/daemon-process';

/** tid -> Cpus_allowed_list of every thread of `pid`. */
function threadCpus(pid: number): Map<number, string> {
  const out = new Map<number, string>();
  for (const tid of fs.readdirSync(`/proc/${pid}/task`)) {
    try {
      const m = /^Cpus_allowed_list:\s*(\S+)$/m.exec(fs.readFileSync(`/proc/${pid}/task/${tid}/status`, 'utf8'));
      if (m !== null) out.set(Number(tid), m[1]);
    } catch {
      // the thread ended meanwhile
    }
  }
  return out;
}

/** Two CPUs this process may run on (the same one twice on a one-CPU machine). */
const allowed = native.threadAffinity();
const [cpuA, cpuB] = [allowed[0], allowed[allowed.length - 1]];

let dir: string;
let d: Daemon | undefined;
beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-pin-'));
});
afterEach(async () => {
  await killDaemon(d);
  d = undefined;
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('CPU lists', () => {
  test('numbers and ranges, in order; bad parts are named', () => {
    expect(parseCpuList('0,1')).toEqual([0, 1]);
    expect(parseCpuList('2-3')).toEqual([2, 3]);
    expect(parseCpuList(' 1, 4-6 ,0\n')).toEqual([1, 4, 5, 6, 0]);
    expect(parseCpuList('')).toEqual([]);
    expect(() => parseCpuList('3-1')).toThrow(/backwards/);
    expect(() => parseCpuList('a')).toThrow(/not a CPU number/);
    expect(() => parseCpuList('1,,2')).toThrow(/not a CPU number/);
    expect(() => parseCpuList('1024')).toThrow(/above 1023/);
    expect(cpuListOf([1, 0])).toEqual([1, 0]);
    expect(cpuListOf('0-1')).toEqual([0, 1]);
    expect(() => cpuListOf([-1])).toThrow(/not a CPU number/);
    expect(() => cpuListOf([0.5])).toThrow(/not a CPU number/);
    expect(formatCpuList([3, 0, 1, 2, 5, 1])).toBe('0-3,5');
  });
});

describe('pinned threads', () => {
  test('threads 2 with cpus [B, A]: the main thread runs on B only, its worker thread on A only', async () => {
    const sock = path.join(dir, 'p.sock');
    d = spawnDaemon(rnullCommand(['--socket', sock, '--memory-backed', 'false', '--num-queues', '2', '--threads', '2', '--cpus', `${cpuB},${cpuA}`]), dir);
    await until(() => d!.out.some((l) => l.includes('serving null disk')), 'serving', 15000);
    const pid = d.proc.pid!;
    // The worker pins itself as it starts (asynchronously): wait for a thread besides the main one on A.
    const workerOnA = (): boolean => [...threadCpus(pid)].some(([tid, list]) => tid !== pid && list === String(cpuA));
    await until(workerOnA, `a worker thread on CPU ${cpuA}`, 15000);
    const cpus = threadCpus(pid);
    expect(cpus.get(pid)).toBe(String(cpuB)); // the main thread is the task whose tid is the pid
    const line = JSON.parse(d.out.find((l) => l.includes('serving null disk'))!);
    expect(line.cpus).toEqual([cpuB, cpuA]);
    d.proc.kill('SIGTERM');
    expect(await exitOf(d)).toBe(0);
  }, 40000);

  test('without cpus nothing is pinned: every thread keeps the allowed set', async () => {
    const sock = path.join(dir, 'u.sock');
    d = spawnDaemon(rnullCommand(['--socket', sock, '--memory-backed', 'false', '--num-queues', '2', '--threads', '2']), dir);
    await until(() => d!.out.some((l) => l.includes('serving null disk')), 'serving', 15000);
    const all = formatCpuList(allowed);
    for (const [, list] of threadCpus(d.proc.pid!)) expect(list).toBe(all);
    d.proc.kill('SIGTERM');
    expect(await exitOf(d)).toBe(0);
  }, 40000);
});

describe('refused at start with exit 2', () => {
  test('an offline or absent CPU', async () => {
    const online = parseCpuList(fs.readFileSync('/sys/devices/system/cpu/online', 'utf8'));
    const absent = [...Array(1024).keys()].reverse().find((c) => !online.includes(c))!;
    d = spawnDaemon(rnullCommand(['--socket', path.join(dir, 'o.sock'), '--memory-backed', 'false', '--cpus', String(absent)]), dir);
    expect(await exitOf(d)).toBe(2);
    expect(d.out.join('')).toContain(`cpus: CPU ${absent} (thread 0) is not online`);
    expect(fs.existsSync(path.join(dir, 'o.sock'))).toBe(false);
  }, 30000);

  test('a CPU outside the allowed set (taskset)', async () => {
    // An online CPU this daemon may not use: run it under taskset on another one.
    const online = parseCpuList(fs.readFileSync('/sys/devices/system/cpu/online', 'utf8'));
    const other = online.find((c) => c !== cpuA);
    if (other === undefined) {
      // One online CPU: nothing can be outside the allowed set but offline CPUs (above).
      expect(online).toEqual([cpuA]);
      return;
    }
    d = spawnDaemon(['taskset', '-c', String(cpuA), ...rnullCommand(['--socket', path.join(dir, 't.sock'), '--memory-backed', 'false', '--num-queues', '2', '--threads', '2', '--cpus', `${cpuA},${other}`])], dir);
    expect(await exitOf(d)).toBe(2);
    expect(d.out.join('')).toContain(`cpus: CPU ${other} (thread 1) is outside the CPUs this daemon may run on (${cpuA}`);
  }, 30000);

  test('not one CPU per thread, and a malformed list', async () => {
    d = spawnDaemon(rnullCommand(['--socket', path.join(dir, 'n.sock'), '--memory-backed', 'false', '--num-queues', '2', '--threads', '2', '--cpus', String(cpuA)]), dir);
    expect(await exitOf(d)).toBe(2);
    expect(d.out.join('')).toContain('cpus: gives 1 CPU(s) for 2 thread(s)');
    d = spawnDaemon(rnullCommand(['--socket', path.join(dir, 'm.sock'), '--memory-backed', 'false', '--cpus', '1-0']), dir);
    expect(await exitOf(d)).toBe(2);
    expect(d.out.join('')).toContain('range 1-0 runs backwards');
  }, 30000);

  test('two disks wanting the main thread on different CPUs', async () => {
    const file = path.join(dir, 'vm.json');
    const disks: Array<Record<string, unknown>> = [
      { name: 'one', socket: path.join(dir, 'one.sock'), memory_backed: false, num_queues: 2, threads: 2, cpus: [cpuA, cpuA] },
      { name: 'two', socket: path.join(dir, 'two.sock'), memory_backed: false, num_queues: 2, threads: 2, cpus: `${cpuA + 1},${cpuA}` }, // the list form in a file
    ];
    fs.writeFileSync(file, JSON.stringify({ disks }));
    d = spawnDaemon(rnullCommand(['--config', file]), dir);
    expect(await exitOf(d)).toBe(2);
    expect(d.out.join('')).toContain(`disks one and two want the main thread (thread 0 of every disk) on CPU ${cpuA} and on CPU ${cpuA + 1}`);
    // Agreeing on thread 0 (a disk without cpus has its thread 0 there too) is fine.
    disks[1].cpus = [cpuA, cpuB];
    fs.writeFileSync(file, JSON.stringify({ disks: [...disks, { name: 'three', socket: path.join(dir, 'three.sock'), memory_backed: false }] }));
    d = spawnDaemon(rnullCommand(['--config', file]), dir);
    await until(() => d!.out.filter((l) => l.includes('serving null disk')).length === 3, 'three disks', 15000);
    expect(threadCpus(d.proc.pid!).get(d.proc.pid!)).toBe(String(cpuA));
    d.proc.kill('SIGTERM');
    expect(await exitOf(d)).toBe(0);
  }, 40000);
});
