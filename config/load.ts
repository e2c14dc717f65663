/**
 * Loads the per-VM configuration: a JSON file `{ "log_level": ..., "disks": [ {...}, ... ] }`
 * (each disk as in disk-schema.ts), then command-line flags on top. Every problem is reported
 * as a ConfigError naming the file, the key, the value and what was expected.
 */
import convict from 'convict';
import * as fs from 'fs';
import * as path from 'path';
import { DEFAULT_COMPLETION_NSEC } from '../drivers/null/null-driver';
import { addFormats, DiskConfig, diskSchema } from './disk-schema';
import { cpuListOf } from './cpu-list';
import { cpuConflict } from './cpu-agreement';
import { defaultStorePath } from './store-path';

export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ConfigError';
  }
}

export interface DaemonConfig {
  log_level: string;
  /** Unix socket of the management API ('' for none). */
  management_socket: string;
  disks: DiskConfig[];
}

const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

/** Disk keys that flags may set, by flag-derived name. */
export type DiskOverrides = Partial<Omit<DiskConfig, 'name'>>;

const topSchema = {
  log_level: { doc: 'Log level: fatal, error, warn, info, debug, trace or silent.', format: LOG_LEVELS, default: 'info' },
  disks: { doc: 'The disks of this VM, each on its own socket.', format: Array, default: [] as unknown[] },
  management_socket: { doc: 'Unix socket for the management API (`rnull ctl`); empty for none.', format: String, default: '' },
};

/**
 * Builds the daemon configuration from an optional file and flag overrides. Without a file
 * there is one disk with the defaults (1 GiB memory-backed null disk at ./rnull.sock). Flags
 * apply to every disk of the file; --socket only when the file has a single disk.
 * @throws ConfigError
 */
export function loadConfig(file: string | undefined, overrides: DiskOverrides, logLevel?: string, managementSocket?: string): DaemonConfig {
  addFormats();
  const where = file ?? 'command line';
  let raw: Record<string, unknown> = {};
  if (file !== undefined) {
    let text: string;
    try {
      text = fs.readFileSync(file, 'utf8');
    } catch (e) {
      throw new ConfigError(`cannot read config file ${file}: ${(e as Error).message}`);
    }
    try {
      raw = JSON.parse(text) as Record<string, unknown>;
    } catch (e) {
      throw new ConfigError(`config file ${file} is not valid JSON: ${(e as Error).message}`);
    }
    if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) throw new ConfigError(`config file ${file}: expected a JSON object`);
  }
  const top = convict(topSchema, { args: [], env: {} });
  try {
    top.load(raw);
    if (logLevel !== undefined) top.set('log_level', logLevel);
    if (managementSocket !== undefined) top.set('management_socket', managementSocket);
    top.validate({ allowed: 'strict' });
  } catch (e) {
    throw new ConfigError(`${where}: ${(e as Error).message}`);
  }
  let disks = (top.get('disks') as unknown[]).slice();
  if (disks.length === 0) disks = [{}];
  if (overrides.socket !== undefined && disks.length > 1) {
    throw new ConfigError(`${where}: --socket cannot apply to ${disks.length} disks; give each disk its socket in the file`);
  }
  if (overrides.store !== undefined && disks.length > 1) {
    throw new ConfigError(`${where}: --store cannot apply to ${disks.length} disks; give each disk its store in the file`);
  }
  const out = disks.flatMap((d, i) => expandDevices(loadDisk(d, overrides, `${where}: disks[${i}]`)));
  const shared = out.filter((d) => d.shared_tags);
  if (shared.some((d) => d.hw_queue_depth !== shared[0].hw_queue_depth)) {
    throw new ConfigError(`${where}: shared_tags: disks sharing tags must have the same hw_queue_depth (${shared.map((d) => `${d.name}: ${d.hw_queue_depth}`).join(', ')})`);
  }
  const sockets = new Set<string>();
  for (const [i, d] of out.entries()) {
    const abs = path.resolve(d.socket);
    if (sockets.has(abs)) throw new ConfigError(`${where}: disks[${i}].socket: ${d.socket} is used by another disk`);
    sockets.add(abs);
  }
  const conflict = cpuConflict(out);
  if (conflict !== null) throw new ConfigError(`${where}: cpus: ${conflict}`);
  resolveStores(out, where);
  return { log_level: top.get('log_level') as string, management_socket: top.get('management_socket') as string, disks: out };
}

/** nr_devices N: N copies named NAME0.. on sockets NAME-0.sock.. (serials suffixed too). */
function expandDevices(d: DiskConfig): DiskConfig[] {
  if (d.nr_devices <= 1) return [d];
  const ext = path.extname(d.socket);
  const base = d.socket.slice(0, d.socket.length - ext.length);
  return Array.from({ length: d.nr_devices }, (_, i) => ({
    ...d,
    nr_devices: 1,
    name: `${d.name}${i}`,
    socket: `${base}-${i}${ext}`,
    store: d.store === '' ? '' : `${d.store}-${i}`,
    serial: `${d.serial.slice(0, 20 - String(i).length - 1)}-${i}`,
  }));
}

/**
 * Memory-backed null disks get their store's absolute path (the default one when `store` is
 * empty); two disks may not share one. Other disks keep '' (and may not give one).
 */
function resolveStores(disks: DiskConfig[], where: string): void {
  const stores = new Map<string, number>();
  for (const [i, d] of disks.entries()) {
    if (d.driver === 'nvme' || !d.memory_backed) {
      if (d.store !== '') throw new ConfigError(`${where}: disks[${i}].store: applies to memory-backed null disks only`);
      continue;
    }
    d.store = d.store === '' ? defaultStorePath(d.socket) : path.resolve(d.store);
    const other = stores.get(d.store);
    if (other !== undefined) throw new ConfigError(`${where}: disks[${i}].store: ${d.store} is the store of disks[${other}] too`);
    stores.set(d.store, i);
  }
}

/** Every disk key at its schema default (a disk given no settings; `name` still empty). */
export function defaultDiskConfig(): DiskConfig {
  addFormats();
  return convict<DiskConfig>(diskSchema as convict.Schema<DiskConfig>, { args: [], env: {} }).getProperties();
}

function loadDisk(raw: unknown, overrides: DiskOverrides, where: string): DiskConfig {
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) throw new ConfigError(`${where}: expected an object`);
  const c = convict<DiskConfig>(diskSchema as convict.Schema<DiskConfig>, { args: [], env: {} });
  try {
    c.load(raw as Partial<DiskConfig>);
    for (const [k, v] of Object.entries(overrides)) if (v !== undefined) c.set(k as keyof DiskConfig, v as never);
    c.validate({ allowed: 'strict' });
  } catch (e) {
    throw new ConfigError(`${where}: ${(e as Error).message}`);
  }
  const d = c.getProperties();
  if (d.submit_queues !== null) {
    const explicit = (raw as Record<string, unknown>).num_queues !== undefined || overrides.num_queues !== undefined;
    if (explicit && d.num_queues !== d.submit_queues) {
      throw new ConfigError(`${where}: submit_queues ${d.submit_queues} and num_queues ${d.num_queues} disagree (they are the same setting)`);
    }
    d.num_queues = d.submit_queues;
  }
  if (d.cache_size > 0 && !d.memory_backed) {
    throw new ConfigError(`${where}: cache_size: needs memory_backed true (a disk that keeps nothing has nothing to cache)`);
  }
  if (d.discard && !d.memory_backed) {
    throw new ConfigError(`${where}: discard: needs memory_backed true (a disk that keeps nothing has nothing to discard)`);
  }
  if (d.completion_nsec !== null && d.irqmode !== 2) {
    throw new ConfigError(`${where}: completion_nsec: applies to irqmode 2 (timer) only, but irqmode is ${d.irqmode}`);
  }
  if (d.irqmode === 2 && d.io_timeout > 0 && (d.completion_nsec ?? DEFAULT_COMPLETION_NSEC) >= d.io_timeout * 1e6) {
    throw new ConfigError(
      `${where}: completion_nsec: ${d.completion_nsec ?? DEFAULT_COMPLETION_NSEC} ns is not below io_timeout ${d.io_timeout} ms: every request would time out before it completes`,
    );
  }
  d.cpus = cpuListOf(d.cpus);
  if (d.cpus.length > 0 && d.cpus.length !== d.threads) {
    throw new ConfigError(`${where}: cpus: gives ${d.cpus.length} CPU(s) for ${d.threads} thread(s): give one CPU per queue thread (thread i on the i-th)`);
  }
  checkThreads(d, where);
  checkDriver(d, raw as Record<string, unknown>, overrides, where);
  if (d.name === '') d.name = path.basename(d.socket).replace(/\.[^.]*$/, '');
  return d;
}

/**
 * threads > 1: every thread needs a hardware queue, and the features whose state is one ordered
 * structure per disk (the volatile cache, the bandwidth clock, a tag budget shared between
 * disks, bad ranges that clear on first hit) stay on one thread.
 */
function checkThreads(d: DiskConfig, where: string): void {
  if (d.threads === 1) return;
  if (d.threads > d.num_queues) {
    throw new ConfigError(`${where}: threads ${d.threads} exceeds num_queues ${d.num_queues}: each thread serves at least one hardware queue`);
  }
  const needOne: Array<[boolean, string]> = [
    [d.cache_size > 0, 'cache_size'],
    [d.mbps > 0, 'mbps'],
    [d.shared_tags, 'shared_tags'],
    [d.badblocks_once, 'badblocks_once'],
  ];
  for (const [set, key] of needOne) {
    if (set) throw new ConfigError(`${where}: ${key}: needs threads 1 (its state is one per disk, not shared between threads), but threads is ${d.threads}`);
  }
}

/** Keys that only the null driver has: refused with driver nvme when given. */
const NULL_ONLY_KEYS: ReadonlyArray<keyof DiskOverrides> = ['size', 'blocksize', 'memory_backed', 'irqmode', 'completion_nsec', 'discard', 'badblocks', 'badblocks_once', 'mbps', 'cache_size', 'store'];

/**
 * driver nvme: pci is required; capacity, block size and the null driver's other settings come
 * from the namespace or do not exist, so giving them is refused; one thread (for now).
 */
function checkDriver(d: DiskConfig, raw: Record<string, unknown>, overrides: DiskOverrides, where: string): void {
  if (d.driver !== 'nvme') {
    for (const k of ['pci', 'nvme_poll', 'shadow_doorbells'] as const) {
      if (raw[k] !== undefined || overrides[k] !== undefined) throw new ConfigError(`${where}: ${k}: applies to driver "nvme" only, but driver is "${d.driver}"`);
    }
    return;
  }
  if (d.pci === '') throw new ConfigError(`${where}: pci: driver "nvme" needs the PCI address of the controller (e.g. --pci 0000:00:04.0)`);
  for (const k of NULL_ONLY_KEYS) {
    if (raw[k] !== undefined || overrides[k] !== undefined) {
      const why = k === 'size' || k === 'blocksize' ? 'the capacity and logical block size come from the namespace' : 'it is a setting of the null driver';
      throw new ConfigError(`${where}: ${k}: cannot be given with driver "nvme" (${why})`);
    }
  }
  if (d.nr_devices > 1) throw new ConfigError(`${where}: nr_devices: driver "nvme" serves one namespace per disk (nr_devices 1)`);
  if (d.shared_tags) throw new ConfigError(`${where}: shared_tags: not supported with driver "nvme" yet`);
  // The default num_queues (the host's CPUs) is for disks whose unstarted queues cost nothing;
  // an NVMe disk creates every queue pair on the controller at start (memory, a vector, and a
  // controller that grants fewer refuses to start), so it keeps 1 unless num_queues is given.
  const given = (k: 'num_queues' | 'submit_queues'): boolean => raw[k] !== undefined || overrides[k] !== undefined;
  if (!given('num_queues') && !given('submit_queues')) d.num_queues = 1;
  if (d.threads > d.num_queues) {
    throw new ConfigError(`${where}: threads ${d.threads} exceeds num_queues ${d.num_queues} (driver "nvme" has 1 queue unless num_queues is given): each thread serves at least one hardware queue`);
  }
  // The default serial of an NVMe disk is the controller's serial and the nsid (set at open).
  if (raw.serial === undefined && overrides.serial === undefined) d.serial = '';
}
