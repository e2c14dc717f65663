/**
 * rnull daemon entry point: `rnull [--config vm.json] [flags]`.
 *
 * Serves each configured disk on its vhost-user socket until SIGTERM or SIGINT, then stops
 * the rings, removes the sockets and exits 0. SIGHUP reloads the configuration file
 * (daemon/reload.ts). Under systemd (`Type=notify`) it reports READY/STATUS/RELOADING/STOPPING
 * and pings the watchdog (daemon/sd-notify.ts). Exit status 2 for a usage error (a one-line
 * message and a hint to --help) or a bad configuration, 1 for any other start-up failure.
 */
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import * as fs from 'fs';
import * as path from 'path';
import pino from 'pino';
import { diskSchema } from '../config/disk-schema';
import { ConfigError, DiskOverrides, loadConfig } from '../config/load';
import { parseRange } from '../drivers/null/badblocks';
import { managementCall } from './management/client';
import { BadBlocksAction, RequestMsg } from './management/schema';
import { logUnhandledRejections, StdoutLog } from './logging';
import { qemuCommandLine, Service } from './service';
import { capabilitiesText } from './capabilities';
import { chooseLogFormat, logStream, setProcessLogFormat } from './log-format';
import { LiveLogLevel } from './log-level';
import { adoptPassedSocket, PassedSocketError } from './passed-socket';
import { probeQemuVersion, reconnectOption } from './qemu-version';
import { Reloader } from './reload';
import { pinMainThread, unusableCpus } from './cpu-pinning';
import { parseCpuList } from '../config/cpu-list';
import { ServiceNotifier } from './sd-notify';

/** Exit status of a usage or configuration error (systemd's unit says RestartPreventExitStatus=2). */
const EXIT_USAGE = 2;

/** A usage error: one line and a hint to --help on stderr, exit status 2. */
function usageError(message: string): never {
  process.stderr.write(`rnull: ${message}\n(see rnull --help)\n`);
  process.exit(EXIT_USAGE);
}

/** The package's version (package.json at the package root). */
function packageVersion(): string {
  const root = __filename.endsWith('.ts') ? path.join(__dirname, '..') : path.join(__dirname, '..', '..');
  try {
    return (JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8')) as { version: string }).version;
  } catch {
    return 'unknown';
  }
}

/** How often (ms) STATUS= is refreshed (front-ends attached) while running under systemd. */
const STATUS_INTERVAL_MS = 1000;

/** At exit, log lines still waiting for stdout get this long (ms), then are dropped. */
const EXIT_FLUSH_MS = 1000;

function int(name: string) {
  return (v: string): number => {
    if (!/^\d+$/.test(v)) throw new InvalidArgumentError(`${name} expects a whole number, got "${v}"`);
    return Number(v);
  };
}

/** --cpus: a CPU list ("0,1", "2-3"). */
function cpuList(v: string): number[] {
  try {
    return parseCpuList(v);
  } catch (e) {
    throw new InvalidArgumentError(`--cpus: ${(e as Error).message}`);
  }
}

function bool(v: string): boolean {
  if (v === 'true' || v === '1') return true;
  if (v === 'false' || v === '0') return false;
  throw new InvalidArgumentError(`expected true or false, got "${v}"`);
}

/** The command line: the daemon itself, and `rnull ctl` for the management API. */
function buildCli(run: (o: CliOptions) => Promise<void>): Command {
  const root = new Command('rnull')
    .description('vhost-user-blk back-end serving null_blk-style disks to QEMU guests')
    .version(packageVersion(), '-V, --version', 'print the version and exit')
    .option('-c, --config <file>', 'per-VM configuration file (JSON); SIGHUP re-reads it')
    .option('--socket <path>', 'vhost-user socket path (default ./rnull.sock)')
    .option('--socket-path <path>', 'the same as --socket (vhost-user back-end convention)')
    .option('--fd <n>', 'serve a listening unix socket passed in as this fd, instead of a socket path', int('--fd'))
    .option('--print-capabilities', 'print the vhost-user back-end capabilities (JSON) and exit')
    .option('--socket-mode <octal>', 'permission bits of the vhost-user socket (default 0600)')
    .option('--socket-group <group>', 'group of the vhost-user socket, name or gid (default: the daemon\'s)')
    .option('--size <MiB>', 'capacity in MiB (default 1024)', int('--size'))
    .addOption(new Option('--blocksize <bytes>', 'logical block size (default 512)').choices(['512', '1024', '2048', '4096']).argParser(Number))
    .option('--memory-backed <bool>', 'keep written data (default true)', bool)
    .option('--store <path>', 'memory-backed: the tmpfs file holding the data, kept across restarts (default: derived from the socket, in $RUNTIME_DIRECTORY or /dev/shm/rnull-UID)')
    .option('--store-fresh <bool>', 'memory-backed: start the disk empty, dropping what its store held (default false)', bool)
    .option('--store-remove-on-exit <bool>', 'memory-backed: remove the store on SIGTERM/SIGINT (default false: kept for the next start)', bool)
    .option('--num-queues <n>', 'largest number of virtqueues (default: the host\'s CPUs, at most 64)', int('--num-queues'))
    .option('--threads <n>', 'threads serving the hardware queues, at most --num-queues (default 1)', int('--threads'))
    .option('--cpus <list>', 'pin queue thread i to the i-th CPU of this list, e.g. 0,1 or 2-3; one CPU per thread (default: not pinned)', cpuList)
    .option('--read-only [bool]', 'offer the disk read-only; alone: true (default false)', bool)
    .addOption(new Option('--irqmode <mode>', 'completion mode: 0 none, 1 softirq, 2 timer (default 0)').choices(['0', '1', '2']).argParser(Number))
    .option('--completion-nsec <ns>', 'timer mode: ns from start to completion (default 10000)', int('--completion-nsec'))
    .option('--discard <bool>', 'accept discard and write-zeroes; needs memory backing (default false)', bool)
    .option('--badblocks <ranges>', 'comma-separated bad sector ranges, e.g. 1000-1999,4096', (v: string) => v.split(',').filter((x) => x !== ''))
    .option('--badblocks-once <bool>', 'a bad range clears when first hit (default false)', bool)
    .option('--hw-queue-depth <n>', 'requests in flight per hardware queue, 1-1024 (default 1024)', int('--hw-queue-depth'))
    .option('--submit-queues <n>', "null_blk's name for --num-queues", int('--submit-queues'))
    .option('--shared-tags <bool>', 'share one tag set with the other disks that set it (default false)', bool)
    .option('--nr-devices <n>', 'serve this many identical disks, on sockets NAME-0.sock... (default 1)', int('--nr-devices'))
    .option('--rotational <bool>', 'label only: virtio-blk cannot tell the guest (default false)', bool)
    .option('--cache-size <MiB>', 'volatile write-back cache; needs memory backing; 0 for none (default 0)', int('--cache-size'))
    .option('--mbps <MiB/s>', 'bandwidth limit; 0 for none (default 0)', int('--mbps'))
    .option('--io-timeout <ms>', 'fail requests not ended after this many ms; 0 never (default 30000)', int('--io-timeout'))
    .option('--poll-us <us>', 'busy-poll limit per virtqueue after a batch, 0-1000 (default 50)', int('--poll-us'))
    .addOption(new Option('--driver <name>', 'what serves the disk: null or nvme (default null)').choices(['null', 'nvme']))
    .option('--pci <address>', 'driver nvme: PCI address of the controller, bound to vfio-pci (e.g. 0000:00:04.0)')
    .option('--nsid <n>', 'driver nvme: namespace ID (default 1)', int('--nsid'))
    .option('--nvme-poll <bool>', 'driver nvme: poll completion queues instead of MSI-X interrupts (default false)', bool)
    .option('--shadow-doorbells <bool>', 'driver nvme: shadow doorbells (Doorbell Buffer Config) when the controller offers them (default false)', bool)
    .option('--serial <text>', 'GET_ID serial, at most 20 ASCII characters (default "rnull")')
    .option('--management-socket <path>', 'serve the management API (rnull ctl) on this unix socket')
    .addOption(new Option('--log-level <level>', 'log level (default info)').choices(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']))
    .allowExcessArguments(false)
    .showHelpAfterError('(see rnull --help)')
    .configureOutput({ outputError: (str, write) => write(`rnull: ${str.replace(/^error: /, '')}`) })
    .exitOverride((err: CommanderError) => process.exit(err.exitCode === 0 ? 0 : EXIT_USAGE))
    .action((o: CliOptions) => run(o));
  const ctl = root.command('ctl').description('talk to a running daemon through its management socket').requiredOption('-m, --management-socket <path>', 'the daemon\'s management socket');
  const call = async (req: RequestMsg): Promise<void> => {
    const r = await managementCall(ctl.opts<{ managementSocket: string }>().managementSocket, req);
    process.stdout.write(`${JSON.stringify(r.ok ? { disks: r.disks, bad_blocks: r.bad_blocks, queues: r.queues, cache_dirty_bytes: r.cache_dirty_bytes } : { error: r.error })}\n`);
    if (!r.ok) process.exitCode = 1;
  };
  ctl.command('disks').description('list the disks').action(() => call({ list_disks: {} }));
  ctl.command('drop-cache <disk>').description('lose the write cache\'s unflushed data, as a power failure would').action((disk: string) => call({ drop_cache: { disk } }));
  ctl.command('reset <disk>').description('driver nvme: reset the disk\'s controller (requests in flight are resubmitted)').action((disk: string) => call({ reset_controller: { disk } }));
  ctl.command('stats <disk>').description('per-queue counters of a disk').action((disk: string) => call({ get_stats: { disk } }));
  ctl
    .command('badblocks <disk> [action] [range]')
    .description('list, add or remove bad sector ranges ("start-end", 512-byte sectors, inclusive)')
    .action((disk: string, action = 'list', range?: string) => {
      const actions: Record<string, number> = { list: BadBlocksAction.LIST, add: BadBlocksAction.ADD, remove: BadBlocksAction.REMOVE };
      if (!(action in actions)) throw new InvalidArgumentError(`action must be list, add or remove, got "${action}"`);
      if (action !== 'list' && range === undefined) throw new InvalidArgumentError(`badblocks ${action} needs a range`);
      const [start, end] = range === undefined ? [0, 0] : parseRange(range);
      return call({ bad_blocks: { disk, action: actions[action], start, end } });
    });
  return root;
}

export interface CliOptions {
  config?: string;
  socket?: string;
  socketPath?: string;
  fd?: number;
  printCapabilities?: boolean;
  size?: number;
  blocksize?: number;
  memoryBacked?: boolean;
  store?: string;
  storeFresh?: boolean;
  storeRemoveOnExit?: boolean;
  numQueues?: number;
  threads?: number;
  cpus?: number[];
  readOnly?: boolean;
  serial?: string;
  pollUs?: number;
  irqmode?: number;
  completionNsec?: number;
  ioTimeout?: number;
  discard?: boolean;
  badblocks?: string[];
  badblocksOnce?: boolean;
  managementSocket?: string;
  mbps?: number;
  cacheSize?: number;
  hwQueueDepth?: number;
  submitQueues?: number;
  sharedTags?: boolean;
  nrDevices?: number;
  rotational?: boolean;
  driver?: string;
  pci?: string;
  nsid?: number;
  nvmePoll?: boolean;
  shadowDoorbells?: boolean;
  logLevel?: string;
}

export async function main(argv: string[]): Promise<void> {
  // vhost-user.rst: with --print-capabilities, other options and arguments are ignored.
  if (argv.slice(2).includes('--print-capabilities') && argv[2] !== 'ctl') {
    process.stdout.write(capabilitiesText());
    return;
  }
  try {
    await buildCli(runDaemon).parseAsync(argv);
  } catch (e) {
    if (e instanceof InvalidArgumentError) usageError(e.message);
    throw e;
  }
}

async function runDaemon(o: CliOptions): Promise<void> {
  if (o.printCapabilities === true) {
    process.stdout.write(capabilitiesText());
    return;
  }
  if (o.socket !== undefined && o.socketPath !== undefined && o.socket !== o.socketPath) usageError('--socket and --socket-path name the same setting; give one');
  o.socket ??= o.socketPath;
  const listenFds = new Map<string, number>();
  let passed: { fd: number; path: string } | null = null;
  if (o.fd !== undefined) {
    if (o.socket !== undefined) usageError('--fd cannot be combined with --socket-path (the socket is already open)');
    try {
      passed = adoptPassedSocket(o.fd);
    } catch (e) {
      if (e instanceof PassedSocketError) usageError(e.message);
      throw e;
    }
  }
  // Every disk key's flag is the key in kebab case, so its option is the key in camelCase.
  const option = (key: string): unknown => (o as Record<string, unknown>)[key.replace(/_([a-z])/g, (_m, c: string) => c.toUpperCase())];
  const overrides = Object.fromEntries(Object.keys(diskSchema).map((k) => [k, option(k)])) as DiskOverrides;

  let config;
  const load = (): ReturnType<typeof loadConfig> => loadConfig(o.config, overrides, o.logLevel, o.managementSocket);
  try {
    if (passed !== null) {
      const n = loadConfig(o.config, overrides, o.logLevel, o.managementSocket).disks.length;
      if (n !== 1) usageError(`--fd serves one disk, but the configuration has ${n}`);
      // The passed socket's path names the disk and goes into the QEMU hint (when it has one).
      if (passed.path !== '' && !passed.path.startsWith('@')) overrides.socket = passed.path;
    }
    config = load();
    // Queue threads' CPUs must exist for this daemon; the main thread (thread 0 of every disk)
    // pins itself now, before any other thread starts (those inherit it, then pin their own).
    const unusable = unusableCpus(config.disks);
    if (unusable !== null) throw new ConfigError(`${o.config ?? 'command line'}: ${unusable}`);
    pinMainThread(config.disks);
  } catch (e) {
    if (e instanceof ConfigError) {
      process.stderr.write(`rnull: ${e.message}\n`);
      process.exit(2);
    }
    throw e;
  }
  if (passed !== null) listenFds.set(config.disks[0].name, passed.fd);
  // Never blocks on stdout, never flushes without a bound at exit (daemon/logging.ts). Pretty
  // on a terminal, <N> priority prefixes under journald, JSON otherwise (daemon/log-format.ts).
  const format = chooseLogFormat();
  setProcessLogFormat(format);
  const out = new StdoutLog(logStream(format));
  const levels = new LiveLogLevel();
  const log = pino({ level: config.log_level, base: { pid: process.pid }, ...levels.options }, out);
  const notifier = new ServiceNotifier(log);
  const exit = (code: number): void => {
    void out.flush(EXIT_FLUSH_MS).then(() => process.exit(code));
  };
  logUnhandledRejections(log);
  // Signals are handled from before the first socket exists: one arriving during start-up stops
  // the daemon once start-up is done (the default action would leave sockets behind).
  let service: Service | null = null;
  let starting: Promise<void> = Promise.resolve();
  let stopping = false;
  const stop = (signal: string): void => {
    if (stopping) return;
    stopping = true;
    notifier.stopping(`stopping (${signal})`);
    if (statusTimer !== null) clearInterval(statusTimer);
    log.info({ signal }, 'shutting down');
    starting
      .then(() => reloading) // a reload under way finishes first (it may be adding a disk)
      .then(() => service?.stop())
      .then(
        () => {
          log.info('stopped');
          exit(0);
        },
        (e: unknown) => {
          log.error({ err: e }, 'shutdown failed');
          exit(1);
        },
      );
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  let statusTimer: NodeJS.Timeout | null = null;
  const statusLine = (): string => {
    const disks = service?.disks ?? [];
    const attached = disks.filter((d) => d.server.isConnected).length;
    return `serving ${disks.length} disk${disks.length === 1 ? '' : 's'}, ${attached} attached`;
  };
  // SIGHUP: reload the file (one at a time; one arriving during start-up runs once started).
  let reloader: Reloader | null = null;
  let reloadPending = false;
  let reloading: Promise<unknown> = Promise.resolve();
  const reload = (): void => {
    if (stopping) return;
    if (reloader === null) {
      reloadPending = true;
      return;
    }
    notifier.reloading(`reloading ${o.config ?? 'the command line'}`);
    reloading = reloader.reload().then((r) => {
      if (stopping) return;
      const failed = r.error !== undefined ? `; reload failed: ${r.error}` : r.failed.length > 0 ? `; ${r.failed.length} disk(s) failed to start` : '';
      const refused = r.refused.length > 0 ? `; changes refused (restart to apply): ${r.refused.map((x) => (x.disk === null ? x.keys.join(',') : `${x.disk}: ${x.keys.join(',')}`)).join('; ')}` : '';
      notifier.ready(`${statusLine()}${failed}${refused}`);
    });
  };
  process.on('SIGHUP', reload);
  try {
    const s = new Service(config.disks, log, config.management_socket, listenFds);
    starting = s.start();
    await starting;
    service = s;
  } catch (e) {
    starting = Promise.resolve(); // Service.start() closed what it had opened
    log.fatal({ err: e }, `cannot start: ${(e as Error).message}`);
    notifier.notify({ STATUS: `cannot start: ${(e as Error).message}` });
    if ((e as Error).name === 'NvmeSetupError' || (e as Error).name === 'StoreError') {
      // Something the user must fix (binding, namespace, memlock): a configuration-like error.
      process.stderr.write(`rnull: ${(e as Error).message}\n`);
      exit(2);
      return;
    }
    exit(1);
    return;
  }
  for (const d of service.disks) {
    if (d.config.driver === 'nvme') {
      log.info(
        { disk: d.config.name, socket: d.config.socket, pci: d.config.pci, nsid: d.config.nsid, sectors: d.disk.capacitySectors, blocksize: d.disk.logicalBlockSize, numQueues: d.config.num_queues, poll: d.config.nvme_poll },
        'serving NVMe namespace',
      );
      continue;
    }
    log.info(
      { disk: d.config.name, socket: d.config.socket, sizeMiB: d.config.size, blocksize: d.config.blocksize, memoryBacked: d.config.memory_backed, store: d.config.store || undefined, numQueues: d.config.num_queues, threads: d.config.threads, cpus: d.config.cpus.length > 0 ? d.config.cpus : undefined, irqmode: d.config.irqmode },
      'serving null disk',
    );
  }
  if (stopping) return;
  // Every socket listens: tell systemd, keep STATUS current, ping the watchdog.
  notifier.ready(statusLine());
  if (notifier.enabled) {
    statusTimer = setInterval(() => notifier.status(statusLine()), STATUS_INTERVAL_MS);
    statusTimer.unref();
  }
  // With threads > 1, a ping also needs every worker thread to answer (a snapshot of one of its queues).
  const workersAnswer = async (): Promise<boolean> => {
    const asks: Array<unknown> = [];
    for (const d of service?.disks ?? []) {
      if (d.workers === null) continue;
      for (let t = 1; t < d.config.threads; t++) asks.push(d.device.vrings[t].queue.snapshot());
    }
    await Promise.all(asks);
    return true;
  };
  const watchdogMs = notifier.startWatchdog(workersAnswer);
  if (watchdogMs > 0) log.info({ intervalMs: watchdogMs }, 'systemd watchdog: pinging from the event loop');
  const served = service;
  reloader = new Reloader(served, config, load, log, (level) => levels.set(log, level));
  if (reloadPending) reload();
  // The attach hint, in the reconnect syntax of the QEMU found here (a bounded async probe).
  const disks = config.disks;
  void probeQemuVersion().then((v) => {
    const qemu = qemuCommandLine(disks, reconnectOption(v));
    log.info({ qemu, qemuVersion: v === null ? null : `${v.major}.${v.minor}.${v.micro}` }, `attach with: ${qemu}`);
  });
}

if (require.main === module) {
  main(process.argv).catch((e: unknown) => {
    process.stderr.write(`rnull: ${(e as Error).stack ?? String(e)}\n`);
    process.exit(1);
  });
}
