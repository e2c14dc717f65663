/**
 * sd_notify without libsystemd: the native sendto (path and abstract addresses), ServiceNotifier's
 * messages, and the real daemon against a listener bound on NOTIFY_SOCKET (a python3 unix
 * datagram socket, as systemd's): READY=1 only once every disk socket listens, STATUS= lines
 * that follow front-ends attaching, WATCHDOG=1 at half of WATCHDOG_USEC (and none when
 * WATCHDOG_PID names another process), RELOADING=1 with MONOTONIC_USEC then READY=1 around a
 * SIGHUP reload, STOPPING=1 on SIGTERM.
 */
import { ChildProcess, spawn } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import pino from 'pino';
import { ServiceNotifier } from '../../daemon/sd-notify';
import { native, SyscallError } from '../../native';
import { until } from '../helpers/backend';
import { TestFrontend } from '../helpers/frontend';

const BIN = path.join(__dirname, '..', '..', 'bin', 'rnull');

/** A unix datagram socket bound by python3 (as systemd binds NOTIFY_SOCKET); one record per datagram. */
const LISTENER = `
import json, socket, sys, time
addr = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind('\\0' + addr[1:] if addr.startswith('@') else addr)
print(json.dumps({"bound": True}), flush=True)
while True:
    d = s.recv(65536)
    print(json.dumps({"t": time.monotonic(), "msg": d.decode()}), flush=True)
`;

interface Note {
  t: number;
  msg: string;
  /** Which sockets existed when the test read the record. */
  seen: Record<string, boolean>;
}

class Listener {
  readonly notes: Note[] = [];
  private readonly proc: ChildProcess;
  private bound = false;
  private buf = '';

  constructor(
    readonly address: string,
    private readonly watch: string[] = [],
  ) {
    this.proc = spawn('python3', ['-c', LISTENER, address], { stdio: ['ignore', 'pipe', 'inherit'] });
    this.proc.stdout!.on('data', (d: Buffer) => {
      this.buf += d.toString();
      let i;
      while ((i = this.buf.indexOf('\n')) >= 0) {
        const rec = JSON.parse(this.buf.slice(0, i)) as { bound?: boolean; t: number; msg: string };
        this.buf = this.buf.slice(i + 1);
        if (rec.bound === true) this.bound = true;
        else this.notes.push({ t: rec.t, msg: rec.msg, seen: Object.fromEntries(this.watch.map((p) => [p, fs.existsSync(p)])) });
      }
    });
  }

  ready(): Promise<void> {
    return until(() => this.bound, 'the notify listener to bind', 10000);
  }

  /** Records whose message has every assignment in `fields` (e.g. "READY=1"). */
  with(...fields: string[]): Note[] {
    return this.notes.filter((n) => fields.every((f) => n.msg.split('\n').includes(f)));
  }

  kill(): void {
    this.proc.kill('SIGKILL');
  }
}

function fields(msg: string): Record<string, string> {
  return Object.fromEntries(msg.split('\n').map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
}

let dir: string;
const cleanup: Array<() => void> = [];
beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-notify-'));
});
afterEach(() => {
  for (const f of cleanup.splice(0)) f();
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('native notifySend', () => {
  test('reaches a listener on a path and on an abstract name; fails (SyscallError) with nobody listening', async () => {
    for (const address of [path.join(dir, 'notify.sock'), `@rnull-test-${process.pid}-${Date.now()}`]) {
      const l = new Listener(address);
      cleanup.push(() => l.kill());
      await l.ready();
      expect(native.notifySend(address, 'READY=1\nSTATUS=hello')).toBe('READY=1\nSTATUS=hello'.length);
      await until(() => l.notes.length === 1, 'the datagram', 10000);
      expect(l.notes[0].msg).toBe('READY=1\nSTATUS=hello');
    }
    expect(() => native.notifySend(path.join(dir, 'none.sock'), 'READY=1')).toThrow(SyscallError);
    // RangeError (from the addon's realm: matched by message).
    expect(() => native.notifySend('', 'READY=1')).toThrow(/address is empty/);
    expect(() => native.notifySend('@', 'READY=1')).toThrow(/address is empty/);
    expect(() => native.notifySend(`/${'x'.repeat(200)}`, 'READY=1')).toThrow(/longer than 107 bytes/);
    expect(() => native.notifySend(path.join(dir, 'none.sock'), '')).toThrow(/message is empty/);
  });
});

describe('ServiceNotifier', () => {
  const log = pino({ level: 'silent' });
  const recorder = (): { sent: Array<[string, string]>; transport: { notifySend(a: string, m: string): number; monotonicNs(): number } } => {
    const sent: Array<[string, string]> = [];
    return { sent, transport: { notifySend: (a, m) => (sent.push([a, m]), m.length), monotonicNs: () => 5_000_123_456 } };
  };

  test('without NOTIFY_SOCKET every call is a no-op', () => {
    const r = recorder();
    const n = new ServiceNotifier(log, { WATCHDOG_USEC: '1000000' }, r.transport);
    expect(n.enabled).toBe(false);
    expect(n.ready('x')).toBe(false);
    expect(n.startWatchdog()).toBe(0);
    expect(r.sent).toEqual([]);
  });

  test('messages: READY/STATUS, STATUS only when changed, RELOADING with MONOTONIC_USEC, STOPPING', () => {
    const r = recorder();
    const n = new ServiceNotifier(log, { NOTIFY_SOCKET: '@x' }, r.transport);
    n.ready('serving 1 disk');
    n.status('serving 1 disk');
    n.status('serving 1 disk, 1 attached');
    n.reloading('reloading');
    n.stopping('stopping\nnow');
    expect(r.sent.map(([, m]) => m)).toEqual([
      'READY=1\nSTATUS=serving 1 disk',
      'STATUS=serving 1 disk, 1 attached',
      'RELOADING=1\nMONOTONIC_USEC=5000123\nSTATUS=reloading',
      'STOPPING=1\nSTATUS=stopping now',
    ]);
    expect(r.sent.every(([a]) => a === '@x')).toBe(true);
  });

  test('the watchdog: half of WATCHDOG_USEC; off when WATCHDOG_PID is another process', () => {
    const r = recorder();
    const mine = new ServiceNotifier(log, { NOTIFY_SOCKET: '@x', WATCHDOG_USEC: '3000000', WATCHDOG_PID: String(process.pid) }, r.transport);
    expect(mine.startWatchdog()).toBe(1500);
    mine.stopWatchdog();
    const other = new ServiceNotifier(log, { NOTIFY_SOCKET: '@x', WATCHDOG_USEC: '3000000', WATCHDOG_PID: '1' }, r.transport);
    expect(other.watchdogUsec).toBe(0);
    expect(other.startWatchdog()).toBe(0);
  });

  test('the watchdog with a health check: pings only once it answers true; none while it hangs', async () => {
    const env = { NOTIFY_SOCKET: '@x', WATCHDOG_USEC: '40000' }; // a tick every 20 ms
    const pings = (r: ReturnType<typeof recorder>): number => r.sent.filter(([, m]) => m === 'WATCHDOG=1').length;
    const ok = recorder();
    const hung = recorder();
    const no = recorder();
    const nOk = new ServiceNotifier(log, env, ok.transport);
    const nHung = new ServiceNotifier(log, env, hung.transport);
    const nNo = new ServiceNotifier(log, env, no.transport);
    let checks = 0;
    nOk.startWatchdog(async () => true);
    nHung.startWatchdog(() => {
      checks++;
      return new Promise<boolean>(() => undefined); // a worker that never answers
    });
    nNo.startWatchdog(() => false);
    await until(() => pings(ok) >= 5, 'five pings', 10000);
    for (const n of [nOk, nHung, nNo]) n.stopWatchdog();
    expect(pings(hung)).toBe(0);
    expect(checks).toBe(1); // the hanging check is not asked again and again
    expect(pings(no)).toBe(0);
  });

  test('a failing send never throws; it is logged once and counted', () => {
    const lines: string[] = [];
    const l = pino({ level: 'warn' }, { write: (s: string) => lines.push(s) });
    const n = new ServiceNotifier(l, { NOTIFY_SOCKET: path.join(dir, 'nobody.sock') });
    expect(n.ready('a')).toBe(false);
    expect(n.status('b')).toBe(false);
    expect(n.failures).toBe(2);
    expect(lines.length).toBe(1);
    expect(lines[0]).toContain('cannot notify the service manager');
  });
});

describe('the daemon under a NOTIFY_SOCKET listener', () => {
  function startDaemon(args: string[], env: Record<string, string>): { proc: ChildProcess; exit: Promise<number | null>; out: string[] } {
    const proc = spawn(process.execPath, [BIN, ...args], { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
    const out: string[] = [];
    proc.stdout!.on('data', (d: Buffer) => out.push(...d.toString().split('\n').filter((x) => x !== '')));
    proc.stderr!.on('data', (d: Buffer) => out.push(d.toString()));
    const exit = new Promise<number | null>((resolve) => proc.on('exit', (code) => resolve(code)));
    cleanup.push(() => proc.kill('SIGKILL'));
    return { proc, exit, out };
  }

  test('READY=1 after every socket listens; STATUS follows attach; WATCHDOG=1 at the interval; RELOADING/READY on SIGHUP; STOPPING=1 on SIGTERM', async () => {
    const a = path.join(dir, 'a.sock');
    const b = path.join(dir, 'b.sock');
    const cfg = path.join(dir, 'vm.json');
    fs.writeFileSync(cfg, JSON.stringify({ disks: [{ socket: a, size: 4 }, { socket: b, size: 4 }] }));
    const l = new Listener(path.join(dir, 'notify.sock'), [a, b]);
    cleanup.push(() => l.kill());
    await l.ready();
    const d = startDaemon(['--config', cfg], { NOTIFY_SOCKET: l.address, WATCHDOG_USEC: '400000' });
    await until(() => l.with('READY=1').length === 1, 'READY=1', 20000);
    const ready = l.with('READY=1')[0];
    // Both sockets were there when READY=1 arrived, and READY=1 was the first message.
    expect(ready.seen).toEqual({ [a]: true, [b]: true });
    expect(l.notes[0]).toBe(ready);
    expect(fields(ready.msg).STATUS).toBe('serving 2 disks, 0 attached');

    const fe = new TestFrontend(b);
    await fe.setup({ queues: 1 });
    await until(() => l.notes.some((n) => fields(n.msg).STATUS === 'serving 2 disks, 1 attached'), 'STATUS with 1 attached', 10000);

    // WATCHDOG=1 every 200 ms: over ~2 s at least 4 arrive even on a loaded machine.
    const t0 = Date.now();
    const w0 = l.with('WATCHDOG=1').length;
    await until(() => l.with('WATCHDOG=1').length >= w0 + 4, 'four more WATCHDOG=1', 10000);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(500);

    d.proc.kill('SIGHUP');
    await until(() => l.with('RELOADING=1').length === 1 && l.with('READY=1').length === 2, 'RELOADING=1 then READY=1', 10000);
    const reloading = l.with('RELOADING=1')[0];
    expect(l.notes.indexOf(reloading)).toBeLessThan(l.notes.indexOf(l.with('READY=1')[1]));
    const usec = Number(fields(reloading.msg).MONOTONIC_USEC);
    // CLOCK_MONOTONIC in µs, as python's time.monotonic() (same clock) saw it, within 5 s.
    expect(Math.abs(usec / 1e6 - reloading.t)).toBeLessThan(5);

    d.proc.kill('SIGTERM');
    expect(await d.exit).toBe(0);
    await until(() => l.with('STOPPING=1').length === 1, 'STOPPING=1', 10000);
    const stopping = l.with('STOPPING=1')[0];
    // No watchdog ping after STOPPING=1.
    expect(l.notes.slice(l.notes.indexOf(stopping) + 1).filter((n) => n.msg === 'WATCHDOG=1')).toEqual([]);
    await fe.waitClosed();
    fe.close();
  });

  test('a disk on two threads: the watchdog pings once the worker thread answers too', async () => {
    const l = new Listener(path.join(dir, 'notify.sock'));
    cleanup.push(() => l.kill());
    await l.ready();
    const sock = path.join(dir, 't.sock');
    const d = startDaemon(['--socket', sock, '--size', '4', '--num-queues', '2', '--threads', '2'], { NOTIFY_SOCKET: l.address, WATCHDOG_USEC: '400000' });
    await until(() => l.with('READY=1').length === 1, 'READY=1', 20000);
    await until(() => l.with('WATCHDOG=1').length >= 4, 'four WATCHDOG=1', 15000);
    d.proc.kill('SIGTERM');
    expect(await d.exit).toBe(0);
  });

  test('an abstract NOTIFY_SOCKET; WATCHDOG_PID of another process: no pings; a bad config: no READY, exit 2', async () => {
    const l = new Listener(`@rnull-test-${process.pid}-${Date.now()}`);
    cleanup.push(() => l.kill());
    await l.ready();
    const sock = path.join(dir, 'x.sock');
    const d = startDaemon(['--socket', sock, '--size', '4'], { NOTIFY_SOCKET: l.address, WATCHDOG_USEC: '200000', WATCHDOG_PID: '1' });
    await until(() => l.with('READY=1').length === 1, 'READY=1', 20000);
    await new Promise((r) => setTimeout(r, 1000));
    expect(l.with('WATCHDOG=1')).toEqual([]);
    d.proc.kill('SIGTERM');
    expect(await d.exit).toBe(0);

    const cfg = path.join(dir, 'bad.json');
    fs.writeFileSync(cfg, JSON.stringify({ disks: [{ size: 0 }] }));
    const bad = startDaemon(['--config', cfg], { NOTIFY_SOCKET: l.address });
    expect(await bad.exit).toBe(2);
    expect(l.with('READY=1').length).toBe(1);
  });
});
