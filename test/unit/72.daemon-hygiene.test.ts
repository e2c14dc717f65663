/**
 * issue 9, the daemon process: logging never blocks a ring or the exit (defect 10), an idle
 * management client does not hold up SIGTERM (defect 9), and an unhandled rejection is logged
 * without taking the daemon down.
 */
import { ChildProcess, spawn, spawnSync } from 'child_process';
import { EventEmitter } from 'events';
import * as fs from 'fs';
import * as net from 'net';
import * as os from 'os';
import * as path from 'path';
import { managementCall } from '../../daemon/management/client';
import { BadBlocksAction } from '../../daemon/management/schema';
import { StdoutLog } from '../../daemon/logging';
import { until } from '../helpers/backend';
import { TestFrontend } from '../helpers/frontend';

const BIN = path.join(__dirname, '..', '..', 'bin', 'rnull');

interface Daemon {
  proc: ChildProcess;
  exit: Promise<number | null>;
  exited: boolean;
}

function start(args: string[], cwd: string): Daemon {
  const proc = spawn(process.execPath, [BIN, ...args], { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
  proc.stderr!.resume();
  const d: Daemon = { proc, exit: Promise.resolve(null), exited: false };
  d.exit = new Promise<number | null>((resolve) =>
    proc.on('exit', (code) => {
      d.exited = true;
      resolve(code);
    }),
  );
  return d;
}

/** Resolves with the exit code, or 'timeout' after `ms`. */
async function exitWithin(d: Daemon, ms: number): Promise<number | null | 'timeout'> {
  let t: NodeJS.Timeout | undefined;
  const r = await Promise.race([d.exit, new Promise<'timeout'>((res) => (t = setTimeout(() => res('timeout'), ms)))]);
  clearTimeout(t);
  return r;
}

/** `n` management calls that each log a line at info (bad blocks changed). */
async function logLines(ctl: string, n: number): Promise<void> {
  for (let i = 0; i < n; i++) {
    const r = await managementCall(ctl, { bad_blocks: { disk: 'd', action: i % 2 === 0 ? BadBlocksAction.ADD : BadBlocksAction.REMOVE, start: 1_000_000, end: 1_000_007 } });
    expect(r.ok).toBe(true);
  }
}

let dir: string;
let d: Daemon | undefined;
const cleanup: Array<() => void> = [];
beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-hyg-'));
});
afterEach(async () => {
  for (const c of cleanup.splice(0)) c();
  if (d !== undefined && !d.exited) {
    d.proc.kill('SIGKILL');
    await d.exit;
  }
  d = undefined;
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('stdout that nobody reads (defect 10)', () => {
  test('the reader of stdout is gone: SIGTERM still exits 0 within seconds', async () => {
    const sock = path.join(dir, 'd.sock');
    d = start(['--socket', sock, '--size', '4'], dir);
    const out: string[] = [];
    d.proc.stdout!.on('data', (b: Buffer) => out.push(b.toString()));
    await until(() => out.join('').includes('vhost-user-blk-pci'), 'the daemon to start', 10000);
    d.proc.stdout!.destroy(); // closes our end of the pipe: the daemon's writes fail with EPIPE
    await new Promise((r) => setTimeout(r, 100));
    d.proc.kill('SIGTERM');
    expect(await exitWithin(d, 5000)).toBe(0);
  });

  test('the reader stops reading: the daemon keeps answering, and exits on SIGTERM within seconds', async () => {
    const sock = path.join(dir, 'd.sock');
    const ctl = path.join(dir, 'ctl.sock');
    d = start(['--socket', sock, '--size', '4', '--management-socket', ctl], dir);
    d.proc.stdout!.pause(); // never read again: the pipe fills up
    await until(() => fs.existsSync(ctl), 'the management socket', 10000);
    await logLines(ctl, 2000); // ~400 KB of log lines, several pipe buffers
    const fe = new TestFrontend(sock);
    cleanup.push(() => fe.close());
    await fe.setup();
    expect((await fe.blk(0, 0, 0, { readLen: 512 })).status).toBe(0);
    d.proc.kill('SIGTERM');
    expect(await exitWithin(d, 5000)).toBe(0);
  }, 30000);

  test('a worker-thread disk keeps serving while stdout is not read', async () => {
    const sock = path.join(dir, 'd.sock');
    const ctl = path.join(dir, 'ctl.sock');
    d = start(['--socket', sock, '--size', '4', '--num-queues', '2', '--threads', '2', '--management-socket', ctl, '--log-level', 'debug'], dir);
    d.proc.stdout!.pause();
    await until(() => fs.existsSync(ctl), 'the management socket', 10000);
    const fe = new TestFrontend(sock);
    cleanup.push(() => fe.close());
    await fe.setup({ queues: 2 });
    await logLines(ctl, 2000); // stdout's pipe is full from here on
    // An unsupported request type on the worker's ring: the worker logs it (debug).
    expect((await fe.blk(1, 99, 0, { readLen: 512 })).status).toBe(2);
    for (let i = 0; i < 20; i++) expect((await fe.blk(1, 0, 8 * i, { readLen: 512 })).status).toBe(0);
    d.proc.kill('SIGTERM');
    expect(await exitWithin(d, 5000)).toBe(0);
  }, 30000);
});

describe('shutdown (defect 9)', () => {
  test('SIGTERM with an idle management client connected: exits 0 promptly', async () => {
    const sock = path.join(dir, 'd.sock');
    const ctl = path.join(dir, 'ctl.sock');
    d = start(['--socket', sock, '--size', '4', '--management-socket', ctl], dir);
    d.proc.stdout!.resume();
    await until(() => fs.existsSync(ctl), 'the management socket', 10000);
    const c = net.createConnection(ctl);
    c.on('error', () => undefined);
    cleanup.push(() => c.destroy());
    await new Promise<void>((r) => c.on('connect', () => r()));
    d.proc.kill('SIGTERM');
    expect(await exitWithin(d, 5000)).toBe(0);
    expect(fs.existsSync(sock)).toBe(false);
    expect(fs.existsSync(ctl)).toBe(false);
  });
});

describe('StdoutLog', () => {
  /** A stream whose reader never reads: everything written stays pending. */
  class StalledStream extends EventEmitter {
    written: string[] = [];
    writableLength = 0;
    write(chunk: string): boolean {
      this.written.push(chunk);
      this.writableLength += chunk.length;
      return false;
    }
  }

  test('beyond maxPendingBytes lines are dropped and counted; the next line written says how many', () => {
    const s = new StalledStream();
    const log = new StdoutLog(s, 100);
    for (let i = 0; i < 10; i++) log.write(`${'x'.repeat(39)}\n`);
    expect(s.written.length).toBe(3); // 0, 40, 80 bytes pending when written
    expect(log.dropped).toBe(7);
    s.writableLength = 0; // the reader caught up
    log.write('{"msg":"next"}\n');
    expect(JSON.parse(s.written[3])).toMatchObject({ dropped: 7, level: 40 });
    expect(s.written[4]).toBe('{"msg":"next"}\n');
  });

  test('after a write error (EPIPE) nothing more is written; flush() resolves at once', async () => {
    const s = new StalledStream();
    const log = new StdoutLog(s, 1 << 20);
    log.write('a\n');
    s.emit('error', Object.assign(new Error('write EPIPE'), { code: 'EPIPE' }));
    log.write('b\n');
    expect(s.written).toEqual(['a\n']);
    await log.flush(60000);
  });

  test('flush() gives up after its timeout when the reader never drains', async () => {
    const s = new StalledStream();
    const log = new StdoutLog(s, 1 << 20);
    log.write('a\n');
    const t0 = Date.now();
    await log.flush(100);
    expect(Date.now() - t0).toBeLessThan(2000);
  });
});

describe('unhandled rejections', () => {
  /** Runs `body` in a fresh node (main thread, or a worker thread) with the built dist/. */
  function run(body: string, inWorker: boolean): { status: number | null; stdout: string } {
    const dist = path.join(__dirname, '..', '..', 'dist', 'daemon', 'logging.js');
    const code = `
      const pino = require('pino');
      const { logUnhandledRejections, StdoutLog } = require(${JSON.stringify(dist)});
      const log = pino({ base: null }, new StdoutLog());
      logUnhandledRejections(log);
      ${body}`;
    const script = inWorker ? `const { Worker } = require('worker_threads'); new Worker(${JSON.stringify(code)}, { eval: true }).on('exit', (c) => process.exit(c));` : code;
    const r = spawnSync(process.execPath, ['-e', script], { cwd: path.join(__dirname, '..', '..'), encoding: 'utf8', timeout: 10000 });
    return { status: r.status, stdout: r.stdout };
  }

  test.each([false, true])('are logged and the thread goes on (worker thread: %s)', (inWorker) => {
    const r = run(`Promise.reject(new Error('forgotten')); setTimeout(() => { log.info('still here'); setTimeout(() => process.exit(0), 50); }, 50);`, inWorker);
    expect(r.status).toBe(0);
    const lines = r.stdout.split('\n').filter((l) => l !== '').map((l) => JSON.parse(l));
    expect(lines[0]).toMatchObject({ level: 50, err: { message: 'forgotten' }, msg: 'unhandled promise rejection (a bug): logged, still serving' });
    expect(lines[1]).toMatchObject({ msg: 'still here' });
  });
});
