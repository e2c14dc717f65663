/**
 * The back-end side of the guest tests: start a vhost-user-blk daemon (rnull,
 * or any other command such as qemu-storage-daemon), wait until it listens,
 * talk to rnull's management API, check its log, stop it with SIGTERM and
 * check that it exits 0 and removes its sockets. Plus the run around them
 * (E2eRun): the directory that holds every daemon's and guest's logs (kept
 * when a test failed), guest boots on the daemons' disks, timings.
 *
 * Every daemon started here is stopped by stopAll() / E2eRun.finish() (call
 * it from afterAll) whatever happened, and a daemon that dies on its own
 * aborts the guest using it at once (Daemon.died).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import type { DiskConfig } from '../../config/disk-schema';
import { buildInitramfs, DEFAULT_PROGRAMS, type GuestImage } from './initramfs';
import {
  GuestRunError,
  parseGuestOutput,
  requireQemu,
  runGuestScript,
  tail,
  type GuestReport,
  type GuestRunOptions,
  type VhostUserBlkDisk,
} from './qemu';

const REPO_ROOT = path.resolve(__dirname, '..', '..');
/** The daemon under test; RNULL_E2E_DAEMON points elsewhere (e.g. a copy of dist/ made while a rebuild runs). */
export const DAEMON_MAIN = process.env.RNULL_E2E_DAEMON ?? path.join(REPO_ROOT, 'dist', 'daemon', 'main.js');

/** Hard limit for one guest boot (TCG is slow; a hung back-end must still end the run). */
export const GUEST_TIMEOUT_MS = Number(process.env.RNULL_E2E_GUEST_TIMEOUT_S ?? 300) * 1000;
/** jest limit per guest test: one boot plus daemon start/stop, with room to spare. */
export const TEST_TIMEOUT_MS = GUEST_TIMEOUT_MS + 120_000;
export const MIB = 1024 * 1024;

export interface DaemonExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** One disk of an rnull config file (its keys; see the README): socket, size and blocksize, and any other. */
export type DiskSpec = Pick<DiskConfig, 'socket' | 'size' | 'blocksize'> & Partial<DiskConfig>;

/** How to start a daemon. */
export interface DaemonSpawn {
  /** Names its log file (NAME.log in dir) and its messages. */
  name: string;
  command: string;
  args: string[];
  /** The vhost-user sockets it creates; it is ready when they all exist. */
  sockets: string[];
  /** Where its log goes. */
  dir: string;
  /** rnull's --management-socket, if it was given one. */
  managementSocket?: string;
}

/** pino's level numbers. */
const WARN = 40;

/** Daemons not yet stopped; stopAll() stops them whatever happened. */
const running = new Set<Daemon>();

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** A running back-end daemon serving one or more sockets, its stdout+stderr going to a log file. */
export class Daemon {
  /** Aborted if the daemon exits without being asked to; QEMU is then killed at once. */
  readonly died: AbortSignal;
  readonly name: string;
  readonly sockets: string[];
  readonly logFile: string;
  readonly managementSocket: string | undefined;
  private readonly exit: Promise<DaemonExit>;
  private stopping = false;
  /** Set if the process could not be spawned. */
  private spawnError: Error | undefined;
  /** Warnings a test caused on purpose (and checked itself): warnings() leaves them out. */
  private readonly allowed: RegExp[] = [];

  private constructor(
    spec: DaemonSpawn,
    private readonly child: ChildProcess,
  ) {
    this.name = spec.name;
    this.sockets = spec.sockets;
    this.logFile = path.join(spec.dir, `${spec.name}.log`);
    this.managementSocket = spec.managementSocket;
    const died = new AbortController();
    this.died = died.signal;
    this.exit = new Promise((resolve) => {
      child.on('exit', (code, signal) => {
        if (!this.stopping) died.abort(`daemon ${this.name} exited (code ${code}, signal ${signal})`);
        resolve({ code, signal });
      });
      // Could not be started at all (e.g. ENOENT): there will be no 'exit'.
      child.on('error', (err) => {
        this.spawnError = err;
        if (!this.stopping) died.abort(`daemon ${this.name} could not be started: ${err.message}`);
        resolve({ code: null, signal: null });
      });
    });
  }

  /** Starts any daemon and waits until every socket exists (its "ready" signal). */
  static async spawn(spec: DaemonSpawn): Promise<Daemon> {
    const log = fs.openSync(path.join(spec.dir, `${spec.name}.log`), 'w');
    const child = spawn(spec.command, spec.args, { stdio: ['ignore', log, log] });
    fs.closeSync(log);
    const daemon = new Daemon(spec, child);
    running.add(daemon);

    const ready = [...spec.sockets, ...(spec.managementSocket !== undefined ? [spec.managementSocket] : [])];
    const deadline = Date.now() + 30_000;
    while (!ready.every((s) => fs.existsSync(s))) {
      await sleep(50);
      if (daemon.spawnError !== undefined) {
        running.delete(daemon);
        throw new Error(`cannot start ${spec.name} (${spec.command}): ${daemon.spawnError.message}`);
      }
      if (daemon.died.aborted || Date.now() > deadline) {
        await daemon.stop();
        throw new Error(
          `${spec.name} did not create ${ready.join(', ')} ` +
            `(${daemon.died.aborted ? String(daemon.died.reason) : 'timeout'})\n${daemon.logTail()}`,
        );
      }
    }
    return daemon;
  }

  /** `node main.js ...args` (rnull). */
  static startRnull(name: string, args: string[], sockets: string[], dir: string, managementSocket?: string): Promise<Daemon> {
    const mgmt = managementSocket !== undefined ? ['--management-socket', managementSocket] : [];
    // Memory-backed stores (in /dev/shm by default) go when the daemon stops with SIGTERM; a
    // SIGKILL keeps them, as it must (a caller's own --store-remove-on-exit comes later and wins).
    return Daemon.spawn({ name, command: process.execPath, args: [DAEMON_MAIN, '--store-remove-on-exit', 'true', ...args, ...mgmt], sockets, dir, managementSocket });
  }

  /**
   * One rnull disk from the command line, on NAME.sock in dir; with
   * `management`, the management API on NAME.ctl (see ctl()).
   */
  static startCli(
    name: string,
    flags: Record<string, string | number | boolean>,
    dir: string,
    opts: { management?: boolean } = {},
  ): Promise<Daemon> {
    const socket = path.join(dir, `${name}.sock`);
    const args = ['--socket', socket, ...Object.entries(flags).flatMap(([k, v]) => [`--${k}`, String(v)])];
    return Daemon.startRnull(name, args, [socket], dir, opts.management === true ? path.join(dir, `${name}.ctl`) : undefined);
  }

  /**
   * Several rnull disks from a config file written to dir (NAME.json);
   * `socket` is a file name there. With `management`, the management API on NAME.ctl.
   */
  static startConfig(name: string, disks: DiskSpec[], dir: string, opts: { management?: boolean } = {}): Promise<Daemon> {
    const resolved = disks.map((d) => ({ ...d, socket: path.join(dir, d.socket) }));
    const configFile = path.join(dir, `${name}.json`);
    fs.writeFileSync(configFile, `${JSON.stringify({ disks: resolved }, null, 2)}\n`);
    const mgmt = opts.management === true ? path.join(dir, `${name}.ctl`) : undefined;
    return Daemon.startRnull(name, ['--config', configFile], resolved.map((d) => d.socket), dir, mgmt);
  }

  /** SIGTERM, then SIGKILL if it has not exited after 15 s. */
  async stop(): Promise<DaemonExit> {
    this.stopping = true;
    running.delete(this);
    if (this.child.exitCode === null && this.child.signalCode === null) {
      this.child.kill('SIGTERM');
      const timer = setTimeout(() => this.child.kill('SIGKILL'), 15_000);
      const result = await this.exit;
      clearTimeout(timer);
      return result;
    }
    return this.exit;
  }

  /** Stops the daemon with SIGTERM: it must exit 0 by itself (not our SIGKILL) and remove all its sockets. */
  async stopAndCheck(): Promise<void> {
    const exit = await this.stop();
    expect({ daemon: this.name, exit }).toEqual({ daemon: this.name, exit: { code: 0, signal: null } });
    for (const socket of [...this.sockets, ...(this.managementSocket !== undefined ? [this.managementSocket] : [])]) {
      expect({ socket, exists: fs.existsSync(socket) }).toEqual({ socket, exists: false });
    }
  }

  /** The vhost-user disk on socket i, as QEMU attaches it. */
  disk(i = 0, numQueues = 1): VhostUserBlkDisk {
    const socketPath = this.sockets[i];
    if (socketPath === undefined) throw new Error(`${this.name} has no socket ${i}`);
    return { socketPath, numQueues };
  }

  /**
   * `rnull ctl -m <management socket> ...args`, through the command line as a
   * user would type it; returns the JSON line it printed. Throws unless it
   * exits 0 within 20 s.
   */
  async ctl(...args: string[]): Promise<CtlAnswer> {
    if (this.managementSocket === undefined) throw new Error(`${this.name} has no management socket`);
    const child = spawn(process.execPath, [DAEMON_MAIN, 'ctl', '-m', this.managementSocket, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout?.setEncoding('utf8').on('data', (s: string) => (stdout += s));
    child.stderr?.setEncoding('utf8').on('data', (s: string) => (stderr += s));
    const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
    const exit = await new Promise<DaemonExit>((resolve) => {
      child.on('error', (err) => {
        stderr += err.message;
        resolve({ code: null, signal: null });
      });
      child.on('close', (code, signal) => resolve({ code, signal }));
    });
    clearTimeout(timer);
    const what = `rnull ctl ${args.join(' ')}`;
    if (exit.code !== 0) throw new Error(`${what}: exit ${exit.code} (signal ${exit.signal})\n${stdout}${stderr}`);
    try {
      return JSON.parse(stdout) as CtlAnswer;
    } catch {
      throw new Error(`${what}: not one JSON line:\n${stdout}${stderr}`);
    }
  }

  /** The log's JSON lines (pino) as objects; other lines are left out. */
  logEntries(): Array<{ level: number; msg: string } & Record<string, unknown>> {
    return fs
      .readFileSync(this.logFile, 'utf8')
      .split('\n')
      .filter((line) => line.startsWith('{"level":'))
      .map((line) => JSON.parse(line) as { level: number; msg: string } & Record<string, unknown>);
  }

  /** Leaves log lines whose message matches out of warnings(): a test caused them and checks them itself. */
  allowWarning(msg: RegExp): void {
    this.allowed.push(msg);
  }

  /** pino lines at warn level or above, but for the allowed ones: a clean run has none. */
  warnings(): string[] {
    return fs
      .readFileSync(this.logFile, 'utf8')
      .split('\n')
      .filter((line) => {
        const level = /^\{"level":(\d+)/.exec(line)?.[1];
        if (level === undefined || Number(level) < WARN) return false;
        const msg = (JSON.parse(line) as { msg?: string }).msg ?? '';
        return !this.allowed.some((re) => re.test(msg));
      });
  }

  logTail(lines = 30): string {
    return `--- ${this.name} log (${this.logFile}) ---\n${tail(fs.readFileSync(this.logFile, 'utf8'), lines)}`;
  }
}

/** What `rnull ctl` prints (the fields of the answer it was asked for). */
export interface CtlAnswer {
  disks?: Array<Record<string, unknown>>;
  bad_blocks?: Array<{ start: number; end: number }>;
  queues?: Array<{ index: number; requests: number; failed_requests: number } & Record<string, unknown>>;
  cache_dirty_bytes?: number;
  error?: string;
}

/** Stops every daemon not stopped yet (afterAll). */
export async function stopAll(): Promise<void> {
  for (const daemon of [...running]) await daemon.stop();
}

/**
 * Runs rnull with a configuration it must refuse: exit status 2 (bad
 * configuration) within 20 s, a message on stderr, no socket left behind.
 * Returns what it printed.
 */
export async function expectRefused(dir: string, flags: string[]): Promise<string> {
  const socket = path.join(dir, `refused-${process.hrtime.bigint()}.sock`);
  const child = spawn(process.execPath, [DAEMON_MAIN, '--socket', socket, ...flags], { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout?.setEncoding('utf8').on('data', (s: string) => (output += s));
  child.stderr?.setEncoding('utf8').on('data', (s: string) => (output += s));
  const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
  const exit = await new Promise<DaemonExit>((resolve) => child.on('close', (code, signal) => resolve({ code, signal })));
  clearTimeout(timer);
  expect({ exit, output }).toEqual({ exit: { code: 2, signal: null }, output: expect.stringContaining('rnull:') });
  expect(fs.existsSync(socket)).toBe(false);
  return output;
}

// ---------------------------------------------------------------------------
// The run: guest image, run directory, guest boots, timings
// ---------------------------------------------------------------------------

export interface BootOptions {
  /** vCPUs (default 1). */
  cpus?: number;
  /** See GuestRunOptions.watch. */
  watch?: GuestRunOptions['watch'];
  /** Check that the daemons logged no warning or error during the boot (default true). */
  cleanLogs?: boolean;
}

/**
 * One test file's run. Create it at module level, call setup() from
 * beforeAll and finish() from afterAll; wrap test bodies in counted() so
 * that a failure keeps the run directory.
 */
export class E2eRun {
  private runDir: string | undefined;
  private guestImage: GuestImage | undefined;
  /** Why the test bed could not be set up; every later hook and test fails with it. */
  private setupError: Error | undefined;
  /** Tests that threw; the run directory (guest and daemon logs) is kept if any did. */
  private failures = 0;
  private boots = 0;
  readonly timings: string[] = [];

  /** @param prefix of the run directory's name in $TMPDIR */
  constructor(private readonly prefix: string) {}

  /**
   * Fails (never skips) when the test bed is missing, saying how to get it;
   * builds (or finds in the cache) the guest image and makes the run directory.
   */
  setup(opts: { programs?: string[]; needsRnull?: boolean; check?: () => void } = {}): void {
    try {
      requireQemu();
      if (opts.needsRnull !== false && !fs.existsSync(DAEMON_MAIN)) {
        throw new Error(`${DAEMON_MAIN} is missing: run \`npm run build\` first (\`npm test\` does it)`);
      }
      opts.check?.();
      const started = Date.now();
      this.guestImage = buildInitramfs({
        cacheDir: path.join(os.tmpdir(), 'rnull-guest-cache'),
        programs: opts.programs ?? DEFAULT_PROGRAMS,
      });
      this.timings.push(`initramfs ${this.guestImage.built ? 'built' : 'cached'}: ${((Date.now() - started) / 1000).toFixed(1)} s`);
      this.runDir = fs.mkdtempSync(path.join(os.tmpdir(), this.prefix));
    } catch (err) {
      this.setupError = err as Error;
      throw err;
    }
  }

  /** The run directory (daemon and guest logs). Throws the setup error if setup failed. */
  get dir(): string {
    if (this.setupError !== undefined) throw this.setupError;
    if (this.runDir === undefined) throw new Error('no run directory (setup() did not run)');
    return this.runDir;
  }

  /** The guest image. Throws the setup error if setup failed. */
  get image(): GuestImage {
    if (this.setupError !== undefined) throw this.setupError;
    if (this.guestImage === undefined) throw new Error('no guest image (setup() did not run)');
    return this.guestImage;
  }

  /** The guest kernel's version, if setup got that far (for figures files). */
  get kernelVersion(): string | undefined {
    return this.guestImage?.kernel.version;
  }

  /** Wraps a test body so that a failure is counted (jest does not tell afterAll). */
  counted(body: () => Promise<void>): () => Promise<void> {
    return async () => {
      try {
        await body();
      } catch (err) {
        this.failures += 1;
        throw err;
      }
    };
  }

  /** Times a body into the timings printed at the end. */
  async timed<T>(label: string, body: () => Promise<T>): Promise<T> {
    const started = Date.now();
    try {
      return await body();
    } finally {
      this.timings.push(`${label}: ${((Date.now() - started) / 1000).toFixed(1)} s`);
    }
  }

  /**
   * Boots one guest with `disks` attached in order, runs the script and
   * returns its report. QEMU is killed at once if any daemon dies; on failure
   * the error carries every daemon's log tail. Unless opts.cleanLogs is
   * false, the daemons must have logged no warning or error (but the allowed ones).
   */
  async boot(label: string, daemons: Daemon[], disks: VhostUserBlkDisk[], script: string, opts: BootOptions = {}): Promise<GuestReport> {
    this.boots += 1;
    const workDir = path.join(this.dir, `guest-${this.boots}-${label}`);
    const [first, ...extra] = disks;
    if (first === undefined) throw new Error('boot: no disk');
    let report: GuestReport;
    try {
      const result = await runGuestScript({
        image: this.image,
        disk: first,
        extraDisks: extra,
        script,
        workDir,
        cpus: opts.cpus ?? 1,
        timeoutMs: GUEST_TIMEOUT_MS,
        signal: AbortSignal.any(daemons.map((d) => d.died)),
        watch: opts.watch,
      });
      report = parseGuestOutput(result.output);
    } catch (err) {
      if (err instanceof GuestRunError) throw new Error(`${err.message}\n${daemons.map((d) => d.logTail()).join('\n')}`);
      throw err;
    }
    if (opts.cleanLogs !== false) {
      for (const daemon of daemons) {
        expect({ daemon: daemon.name, warnings: daemon.warnings() }).toEqual({ daemon: daemon.name, warnings: [] });
      }
    }
    return report;
  }

  /**
   * Stops every daemon still running, prints the timings, and removes the
   * run directory unless a test failed or RNULL_E2E_KEEP is set.
   */
  async finish(title = ''): Promise<void> {
    await stopAll();
    if (this.setupError !== undefined) return;
    const remove = this.failures === 0 && process.env.RNULL_E2E_KEEP === undefined;
    console.log(`timings${title}\n  ${this.timings.join('\n  ')}\nguest logs: ${this.runDir}${remove ? ' (removed)' : ''}`);
    if (this.runDir !== undefined && remove) fs.rmSync(this.runDir, { recursive: true, force: true });
  }
}
