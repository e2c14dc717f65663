/**
 * User-facing conventions: log lines carry their syslog priority under journald (and only
 * there), are pretty on a terminal (pino-pretty) and JSON otherwise; the attach hint uses the
 * `reconnect` syntax of the QEMU found (by a bounded probe); the default num_queues is the
 * host's CPU count, a front-end may start fewer, and a queue offered but never started costs
 * next to nothing.
 */
import { ChildProcess, spawn, spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { loadConfig } from '../../config/load';
import { chooseLogFormat, connectedToJournal, journalLine, loadPrettifier, logStream, syslogPriority } from '../../daemon/log-format';
import { parseQemuVersion, probeQemuVersion, reconnectOption } from '../../daemon/qemu-version';
import { Req } from '../../vhost/protocol';
import { until } from '../helpers/backend';
import { TestFrontend } from '../helpers/frontend';

const ROOT = path.join(__dirname, '..', '..');
const BIN = path.join(ROOT, 'bin', 'rnull');

let dir: string;
let proc: ChildProcess | undefined;
beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-conv2-'));
});
afterEach(() => {
  if (proc !== undefined && proc.exitCode === null) proc.kill('SIGKILL');
  proc = undefined;
  fs.rmSync(dir, { recursive: true, force: true });
});

function exitOf(p: ChildProcess): Promise<number | null> {
  return new Promise((resolve) => (p.exitCode !== null ? resolve(p.exitCode) : p.on('exit', (code) => resolve(code))));
}

describe('logs under journald', () => {
  test('priorities: fatal 2, error 3, warn 4, info 6, debug and trace 7; a line without a level gets 6', () => {
    expect([60, 50, 40, 30, 20, 10].map(syslogPriority)).toEqual([2, 3, 4, 6, 7, 7]);
    expect(journalLine('{"level":40,"msg":"x"}\n')).toBe('<4>{"level":40,"msg":"x"}\n');
    expect(journalLine('plain\n')).toBe('<6>plain\n');
  });

  test('JOURNAL_STREAM must name stdout\'s device and inode', () => {
    const f = path.join(dir, 'out');
    const fd = fs.openSync(f, 'w');
    try {
      const st = fs.fstatSync(fd, { bigint: true });
      expect(connectedToJournal({ JOURNAL_STREAM: `${st.dev}:${st.ino}` }, fd)).toBe(true);
      expect(connectedToJournal({ JOURNAL_STREAM: `${st.dev}:${st.ino + 1n}` }, fd)).toBe(false);
      expect(connectedToJournal({ JOURNAL_STREAM: 'junk' }, fd)).toBe(false);
      expect(connectedToJournal({}, fd)).toBe(false);
    } finally {
      fs.closeSync(fd);
    }
  });

  test.each([true, false])('the daemon with JOURNAL_STREAM matching stdout (%s): <N> prefixes only then', async (matching) => {
    const f = path.join(dir, 'journal');
    const fd = fs.openSync(f, 'w');
    const st = fs.fstatSync(fd, { bigint: true });
    const sock = path.join(dir, 'j.sock');
    const env = { ...process.env, JOURNAL_STREAM: matching ? `${st.dev}:${st.ino}` : `${st.dev}:${st.ino + 1n}` };
    proc = spawn(process.execPath, [BIN, '--socket', sock, '--size', '4'], { cwd: dir, stdio: ['ignore', fd, 'pipe'], env });
    fs.closeSync(fd);
    await until(() => fs.existsSync(sock), 'socket', 15000);
    // A second front-end is refused with a warning.
    const a = new TestFrontend(sock);
    await a.getU64(Req.GET_QUEUE_NUM);
    const b = new TestFrontend(sock);
    await b.waitClosed(10000);
    a.close();
    b.close();
    proc.kill('SIGTERM');
    expect(await exitOf(proc)).toBe(0);
    const lines = fs.readFileSync(f, 'utf8').split('\n').filter((l) => l !== '');
    const warn = lines.find((l) => l.includes('refusing a second front-end'))!;
    const info = lines.find((l) => l.includes('"msg":"listening"'))!;
    if (matching) {
      expect(lines.every((l) => /^<[2-7]>\{"level":\d+/.test(l))).toBe(true);
      expect(warn.startsWith('<4>{"level":40')).toBe(true);
      expect(info.startsWith('<6>{"level":30')).toBe(true);
      for (const l of lines) expect(l.slice(1, 2)).toBe(String(syslogPriority(Number(/"level":(\d+)/.exec(l)![1]))));
    } else {
      expect(lines.every((l) => l.startsWith('{"level":'))).toBe(true);
      expect(warn).toBeDefined();
    }
  });
});

describe('logs on a terminal', () => {
  test('pino-pretty formats a line for humans; JSON when not a terminal', () => {
    expect(loadPrettifier()).not.toBeNull();
    expect(chooseLogFormat({}, true)).toBe('pretty');
    expect(chooseLogFormat({}, false)).toBe('json');
    const written: string[] = [];
    const sink = { write: (s: string) => (written.push(s), true), writableLength: 0, on: () => undefined, once: () => undefined, removeListener: () => undefined };
    logStream('pretty', sink).write('{"level":40,"time":0,"pid":1,"disk":"vm1","msg":"slow front-end"}\n');
    expect(written[0]).not.toMatch(/^\{/);
    expect(written[0]).toContain('WARN');
    expect(written[0]).toContain('slow front-end');
    expect(written[0]).toContain('vm1');
    logStream('json', sink).write('{"level":30}\n');
    expect(written[1]).toBe('{"level":30}\n');
  });

  test('the daemon on a pseudo-terminal (script(1)) prints pretty lines', async () => {
    const sock = path.join(dir, 't.sock');
    const cmd = `${process.execPath} ${BIN} --socket ${sock} --size 4`;
    proc = spawn('script', ['-qfec', cmd, '/dev/null'], { cwd: dir, stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    proc.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    await until(() => out.includes('attach with'), 'the attach line', 20000);
    // eslint-disable-next-line no-control-regex
    const plain = out.replace(/\x1b\[[0-9;]*m/g, '');
    expect(plain).toMatch(/INFO.*listening/);
    expect(plain).not.toContain('{"level"');
    proc.kill('SIGTERM');
    await exitOf(proc);
  });
});

describe('the attach hint\'s reconnect option', () => {
  test('reconnect=1 before QEMU 9.2, reconnect-ms from 9.2 and when unknown', () => {
    expect(parseQemuVersion('QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright')).toEqual({ major: 7, minor: 2, micro: 22 });
    expect(parseQemuVersion('QEMU emulator version 10.0')).toEqual({ major: 10, minor: 0, micro: 0 });
    expect(parseQemuVersion('something else')).toBeNull();
    const opt = (s: string): string => reconnectOption(parseQemuVersion(`QEMU emulator version ${s}`));
    expect(['7.2.0', '8.2.2', '9.1.3'].map(opt)).toEqual(['reconnect=1', 'reconnect=1', 'reconnect=1']);
    expect(['9.2.0', '10.1.0'].map(opt)).toEqual(['reconnect-ms=1000', 'reconnect-ms=1000']);
    expect(reconnectOption(null)).toBe('reconnect-ms=1000');
  });

  test('the probe: the real QEMU; a missing one and a hanging one resolve null within the limit', async () => {
    const real = spawnSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8', timeout: 20000 });
    expect(await probeQemuVersion('qemu-system-x86_64', 20000)).toEqual(parseQemuVersion(real.stdout));
    expect(await probeQemuVersion(path.join(dir, 'no-such-qemu'))).toBeNull();
    const hang = path.join(dir, 'hanging-qemu');
    fs.writeFileSync(hang, '#!/bin/sh\nexec sleep 60\n', { mode: 0o755 });
    const t0 = Date.now();
    expect(await probeQemuVersion(hang, 300)).toBeNull();
    expect(Date.now() - t0).toBeLessThan(10000);
  });

  test('the daemon logs the syntax of the QEMU installed here', async () => {
    const expected = reconnectOption(parseQemuVersion(spawnSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8', timeout: 20000 }).stdout));
    const sock = path.join(dir, 'h.sock');
    proc = spawn(process.execPath, [BIN, '--socket', sock, '--size', '4'], { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    proc.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    await until(() => out.includes('vhost-user-blk-pci'), 'the attach line', 20000);
    const line = JSON.parse(out.split('\n').find((l) => l.includes('vhost-user-blk-pci'))!) as { qemu: string };
    expect(line.qemu).toContain(`path=${sock},${expected} `);
    proc.kill('SIGTERM');
    expect(await exitOf(proc)).toBe(0);
  });
});

describe('default num_queues', () => {
  const cpus = Math.min(64, os.availableParallelism());

  test('is the host\'s CPU count (at most 64); a front-end starting one queue of them is served', async () => {
    expect(loadConfig(undefined, {}).disks[0].num_queues).toBe(cpus);
    // driver nvme makes every queue pair on the controller at start: it keeps 1 unless given.
    expect(loadConfig(undefined, { driver: 'nvme', pci: '0000:00:04.0' }).disks[0].num_queues).toBe(1);
    expect(loadConfig(undefined, { driver: 'nvme', pci: '0000:00:04.0', num_queues: 3 }).disks[0].num_queues).toBe(3);
    const sock = path.join(dir, 'q.sock');
    proc = spawn(process.execPath, [BIN, '--socket', sock, '--size', '4'], { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
    await until(() => fs.existsSync(sock), 'socket', 15000);
    const fe = new TestFrontend(sock);
    expect(await fe.getU64(Req.GET_QUEUE_NUM)).toBe(BigInt(cpus));
    await fe.setup({ queues: 1 });
    expect((await fe.blk(0, 0, 8, { readLen: 512 })).status).toBe(0);
    fe.close();
    proc.kill('SIGTERM');
    expect(await exitOf(proc)).toBe(0);
  });

  test('a real QEMU with num-queues = the host\'s CPUs realizes the device against a default daemon (not against --num-queues 1)', async () => {
    const qemu = (sock: string): { p: ChildProcess; err: () => string } => {
      let err = '';
      const p = spawn('qemu-system-x86_64', [
        '-machine', 'q35,accel=tcg', '-m', '256M', '-nodefaults', '-display', 'none', '-monitor', 'none', '-serial', 'none', '-S',
        '-object', 'memory-backend-memfd,id=mem,size=256M,share=on', '-numa', 'node,memdev=mem',
        '-chardev', `socket,id=c0,path=${sock}`, '-device', `vhost-user-blk-pci,chardev=c0,num-queues=${cpus}`,
      ], { stdio: ['ignore', 'ignore', 'pipe'] });
      p.stderr!.on('data', (d: Buffer) => (err += d.toString()));
      return { p, err: () => err };
    };
    const daemon = (args: string[], sock: string): ChildProcess =>
      spawn(process.execPath, [BIN, '--socket', sock, '--size', '4', ...args], { cwd: dir, stdio: ['ignore', 'ignore', 'ignore'] });

    // The default daemon: QEMU (paused, -S) has negotiated and realized the device and keeps running.
    const sock = path.join(dir, 'qemu.sock');
    proc = daemon([], sock);
    await until(() => fs.existsSync(sock), 'socket', 15000);
    const ok = qemu(sock);
    const okExit = exitOf(ok.p);
    await new Promise((r) => setTimeout(r, 4000));
    expect(ok.p.exitCode).toBeNull();
    expect(ok.err()).not.toContain('maximum number of queues');
    ok.p.kill('SIGKILL');
    await okExit;
    proc.kill('SIGTERM');
    expect(await exitOf(proc)).toBe(0);

    if (cpus < 2) return; // one CPU: the old default was already enough
    // The old default (1 queue): QEMU refuses the device and exits.
    const sock1 = path.join(dir, 'qemu1.sock');
    proc = daemon(['--num-queues', '1'], sock1);
    await until(() => fs.existsSync(sock1), 'socket', 15000);
    const bad = qemu(sock1);
    let timer: NodeJS.Timeout | undefined;
    const code = await Promise.race([exitOf(bad.p), new Promise<'alive'>((r) => (timer = setTimeout(() => r('alive'), 20000)))]);
    clearTimeout(timer);
    if (code === 'alive') bad.p.kill('SIGKILL');
    expect(code).toBe(1);
    expect(bad.err()).toContain('The maximum number of queues supported by the backend is 1');
    proc.kill('SIGTERM');
    expect(await exitOf(proc)).toBe(0);
  }, 60000);

  test('a queue offered but never started costs under 32 KiB of heap (it was ~370 KiB)', () => {
    const script = `
      const { createDisk } = require(${JSON.stringify(path.join(ROOT, 'dist', 'daemon', 'service.js'))});
      const { defaultDiskConfig } = require(${JSON.stringify(path.join(ROOT, 'dist', 'config', 'load.js'))});
      const pino = require(${JSON.stringify(require.resolve('pino'))});
      const log = pino({ level: 'silent' });
      const heap = () => { global.gc(); global.gc(); return process.memoryUsage().heapUsed; };
      const keep = [];
      const cost = (n) => { const h0 = heap(); for (let i = 0; i < 4; i++) keep.push(createDisk({ ...defaultDiskConfig(), name: 'd' + n + i, socket: '/nonexistent/x.sock', num_queues: n }, log)); return (heap() - h0) / 4; };
      const one = cost(1), many = cost(64);
      process.stdout.write(JSON.stringify({ perQueue: (many - one) / 63 }));
    `;
    const r = spawnSync(process.execPath, ['--expose-gc', '-e', script], { encoding: 'utf8', timeout: 60000 });
    expect(r.stderr).toBe('');
    const { perQueue } = JSON.parse(r.stdout) as { perQueue: number };
    expect(perQueue).toBeLessThan(32 * 1024);
  });
});
