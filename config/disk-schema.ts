/**
 * Configuration of one disk (convict schema). Keys use null_blk's names where null_blk has
 * them (size, blocksize, memory_backed); each has a kebab-case command-line flag.
 */
import convict from 'convict';
import * as os from 'os';
import { parseRange } from '../drivers/null/badblocks';
import { cpuListOf } from './cpu-list';
import { checkSocketGroup, parseSocketMode } from '../vhost/socket-options';

export interface DiskConfig {
  name: string;
  socket: string;
  socket_mode: string | number;
  socket_group: string | number;
  size: number;
  blocksize: number;
  memory_backed: boolean;
  store: string;
  store_fresh: boolean;
  store_remove_on_exit: boolean;
  num_queues: number;
  threads: number;
  /** CPU of each queue thread (thread i on cpus[i]); empty: not pinned. */
  cpus: number[];
  read_only: boolean;
  serial: string;
  poll_us: number;
  irqmode: number;
  completion_nsec: number | null;
  io_timeout: number;
  discard: boolean;
  badblocks: string[];
  badblocks_once: boolean;
  mbps: number;
  cache_size: number;
  hw_queue_depth: number;
  submit_queues: number | null;
  shared_tags: boolean;
  nr_devices: number;
  rotational: boolean;
  driver: string;
  pci: string;
  nsid: number;
  nvme_poll: boolean;
  shadow_doorbells: boolean;
}

/** The default num_queues: the host's CPU count, at most 64 (the largest queue count). */
export function defaultNumQueues(): number {
  return Math.max(1, Math.min(64, os.availableParallelism()));
}

export const diskSchema = {
  name: {
    doc: 'Disk name used in logs; defaults to the socket file name without its extension.',
    format: String,
    default: '',
  },
  socket: {
    doc: 'Path of the vhost-user unix socket that QEMU connects to (rnull is the server).',
    format: String,
    default: './rnull.sock',
  },
  socket_mode: {
    doc: 'Permission bits of the vhost-user socket, an octal string such as "0660" or a number; set before it listens. Default 0600: only the daemon\'s user (QEMU running as that user) may connect.',
    format: 'socket-mode',
    default: '0600' as string | number,
  },
  socket_group: {
    doc: 'Group of the vhost-user socket (a name or a gid), for a QEMU running as another user with socket_mode 0660; empty keeps the daemon\'s group.',
    format: 'socket-group',
    default: '' as string | number,
  },
  size: {
    doc: 'Capacity in MiB (null_blk "size"), 1 to 8589934591 (below 2^53 bytes: byte positions stay exact numbers).',
    format: 'disk-size',
    default: 1024,
  },
  blocksize: {
    doc: 'Logical block size in bytes (null_blk "blocksize"): 512, 1024, 2048 or 4096.',
    format: [512, 1024, 2048, 4096],
    default: 512,
  },
  memory_backed: {
    doc: 'Keep written data in memory (null_blk "memory_backed"); otherwise reads return zeroes and writes are dropped.',
    format: 'bool',
    default: true,
  },
  store: {
    doc: 'memory_backed: the file on tmpfs that holds the disk\'s data, so that it outlives the daemon (a daemon started again with the same configuration finds it). Default: derived from the socket path, in $RUNTIME_DIRECTORY when systemd sets it, else in /dev/shm/rnull-UID. Sparse: unwritten blocks take no memory.',
    format: String,
    default: '',
  },
  store_fresh: {
    doc: 'memory_backed: start the disk empty, dropping what its store held (ignored by disks without a store).',
    format: 'bool',
    default: false,
  },
  store_remove_on_exit: {
    doc: 'memory_backed: remove the store when the daemon stops on SIGTERM or SIGINT (by default it is kept for the next start; a crash always keeps it).',
    format: 'bool',
    default: false,
  },
  num_queues: {
    doc: 'Largest number of virtqueues (hardware queues) a front-end may use, 1 to 64 (QEMU: num-queues). Default: the host\'s CPU count (at most 64), so QEMU\'s default num-queues (one per vCPU) works; the front-end decides how many it starts, and a queue it never starts costs about 11 KiB. driver nvme: 1 unless given (its queue pairs are made on the controller at start).',
    format: 'queue-count',
    default: defaultNumQueues(),
  },
  threads: {
    doc: 'Threads serving the hardware queues, 1 to 64, at most num_queues: hardware queue i runs on thread i mod threads (thread 0 is the main thread, the others are worker threads), so one disk can use that many cores. Above 1, a memory-backed disk keeps its data in a store shared by the threads; cache_size, mbps, shared_tags and badblocks_once need threads 1.',
    format: 'queue-count',
    default: 1,
  },
  cpus: {
    doc: 'Pin the disk\'s queue threads: thread i runs on the i-th CPU of this list, a JSON array [0, 1] or a list string "0,1" / "2-3" (as SPDK\'s reactor mask or pinned QSD iothreads). Empty (default): not pinned. Give one CPU per thread (as many as threads). Thread 0 is the main thread, which serves thread 0 of every disk: disks that give cpus must agree on its first CPU, and a disk without cpus then has its thread 0 on that CPU too. CPUs outside the daemon\'s allowed set or offline are refused at start.',
    format: 'cpu-list',
    default: [] as number[],
  },
  read_only: {
    doc: 'Offer the disk read-only (VIRTIO_BLK_F_RO); writes fail with IOERR.',
    format: 'bool',
    default: false,
  },
  irqmode: {
    doc: 'Completion mode (null_blk "irqmode"): 0 none (requests end at once), 1 softirq (deferred to the end of each batch), 2 timer (requests end completion_nsec after they start).',
    format: [0, 1, 2],
    default: 0,
  },
  completion_nsec: {
    doc: 'Timer mode only: nanoseconds from a request\'s start to its completion (null_blk "completion_nsec"; default 10000 in timer mode).',
    format: 'nullable-nsec',
    default: null as number | null,
  },
  discard: {
    doc: 'Accept discard and write-zeroes (null_blk "discard"; VIRTIO_BLK_F_DISCARD and _F_WRITE_ZEROES): discarded blocks read as zeroes. Needs memory_backed.',
    format: 'bool',
    default: false,
  },
  badblocks: {
    doc: 'Sector ranges that fail with IOERR (null_blk "badblocks"), e.g. ["1000-1999", "4096"]: 512-byte sectors, inclusive. Changed at run time with `rnull ctl badblocks`.',
    format: 'sector-ranges',
    default: [] as string[],
  },
  badblocks_once: {
    doc: 'A bad range is cleared by the first request that hits it (null_blk "badblocks_once").',
    format: 'bool',
    default: false,
  },
  hw_queue_depth: {
    doc: 'Requests in flight per hardware queue (null_blk "hw_queue_depth"), 1 to 1024; chains beyond it wait in the virtqueue. The default lets a full 1024-entry ring be in flight (null_blk\'s own default is 64).',
    format: 'queue-depth',
    default: 1024,
  },
  submit_queues: {
    doc: 'null_blk\'s name for num_queues; give one or the other.',
    format: 'nullable-queue-count',
    default: null as number | null,
  },
  shared_tags: {
    doc: 'Share one tag set with every other disk of this daemon that sets it (null_blk "shared_tags"): their hardware queues of the same index together hold at most hw_queue_depth requests.',
    format: 'bool',
    default: false,
  },
  nr_devices: {
    doc: 'Serve this many identical disks (null_blk "nr_devices"), on sockets NAME-0.sock, NAME-1.sock, ... derived from socket.',
    format: 'queue-count',
    default: 1,
  },
  rotational: {
    doc: 'null_blk "rotational". virtio-blk has no field for it, so the guest cannot see it: kept as a label, shown by `rnull ctl disks`.',
    format: 'bool',
    default: false,
  },
  cache_size: {
    doc: 'Volatile write-back cache in MiB (null_blk "cache_size"); 0 for none. Offers VIRTIO_BLK_F_CONFIG_WCE; FLUSH makes cached writes durable. Needs memory_backed.',
    format: 'nat',
    default: 0,
  },
  mbps: {
    doc: 'Bandwidth limit in MiB/s (null_blk "mbps"); 0 for none.',
    format: 'nat',
    default: 0,
  },
  io_timeout: {
    doc: 'Milliseconds after which a request the driver has not ended fails with IOERR (as the block layer\'s io_timeout); 0 disables.',
    format: 'nat',
    default: 30000,
  },
  poll_us: {
    doc: 'After a batch, busy-poll each virtqueue for up to this many microseconds before sleeping on its kick eventfd (0 to 1000; 0 disables). Adaptive: the spin shrinks while it finds nothing, so an idle disk costs no CPU.',
    format: 'poll-us',
    default: 50,
  },
  driver: {
    doc: 'What serves the disk: "null" (null_blk-like, in memory) or "nvme" (an NVMe namespace driven from user space through VFIO; needs pci and nsid, takes capacity and block size from the namespace).',
    format: ['null', 'nvme'],
    default: 'null',
  },
  pci: {
    doc: 'driver nvme: PCI address of the NVMe controller, bound to vfio-pci, e.g. "0000:00:04.0".',
    format: 'pci-address',
    default: '',
  },
  nsid: {
    doc: 'driver nvme: the namespace ID to serve (1 and up).',
    format: 'positive-int',
    default: 1,
  },
  nvme_poll: {
    doc: 'driver nvme: poll the completion queues instead of waiting for MSI-X interrupts (lower latency, one core busy while requests are in flight).',
    format: 'bool',
    default: false,
  },
  shadow_doorbells: {
    doc: 'driver nvme: shadow doorbells (Doorbell Buffer Config) when the controller offers them: doorbell values go to a page in memory and the doorbell registers are written only when the controller asks. Default false: on QEMU 7.2\'s emulated controller they left out only 3-12 % of the MMIO doorbell writes and measured slower (bench:nvme, rnull-db vs rnull).',
    format: 'bool',
    default: false,
  },
  serial: {
    doc: 'Serial number answered to VIRTIO_BLK_T_GET_ID: at most 20 printable ASCII characters.',
    format: 'serial',
    default: 'rnull',
  },
};

/** Largest `size` in MiB: the capacity stays below 2^53 bytes (exact byte positions, PageStore's limit). */
export const MAX_SIZE_MIB = 2 ** 33 - 1;

let formatsAdded = false;

/** Registers the custom formats the schemas use (idempotent). */
export function addFormats(): void {
  if (formatsAdded) return;
  formatsAdded = true;
  convict.addFormat({
    name: 'positive-int',
    validate(v: unknown) {
      if (typeof v !== 'number' || !Number.isSafeInteger(v) || v <= 0) throw new Error('expected a positive whole number');
    },
    coerce: (v: unknown) => (typeof v === 'string' && /^\d+$/.test(v) ? Number(v) : v),
  });
  convict.addFormat({
    name: 'disk-size',
    validate(v: unknown) {
      if (typeof v !== 'number' || !Number.isSafeInteger(v) || v <= 0) throw new Error('expected a positive whole number');
      if (v > MAX_SIZE_MIB) throw new Error(`expected at most ${MAX_SIZE_MIB} MiB (the capacity must stay below 2^53 bytes)`);
    },
    coerce: (v: unknown) => (typeof v === 'string' && /^\d+$/.test(v) ? Number(v) : v),
  });
  convict.addFormat({
    name: 'queue-count',
    validate(v: unknown) {
      if (typeof v !== 'number' || !Number.isInteger(v) || v < 1 || v > 64) throw new Error('expected a whole number from 1 to 64');
    },
    coerce: (v: unknown) => (typeof v === 'string' && /^\d+$/.test(v) ? Number(v) : v),
  });
  convict.addFormat({
    name: 'sector-ranges',
    validate(v: unknown) {
      if (!Array.isArray(v)) throw new Error('expected an array of "start-end" strings');
      for (const r of v) parseRange(String(r));
    },
  });
  convict.addFormat({
    name: 'queue-depth',
    validate(v: unknown) {
      if (typeof v !== 'number' || !Number.isInteger(v) || v < 1 || v > 1024) throw new Error('expected a whole number from 1 to 1024');
    },
  });
  convict.addFormat({
    name: 'nullable-queue-count',
    validate(v: unknown) {
      if (v !== null && (typeof v !== 'number' || !Number.isInteger(v) || v < 1 || v > 64)) throw new Error('expected a whole number from 1 to 64');
    },
  });
  convict.addFormat({
    name: 'nullable-nsec',
    validate(v: unknown) {
      if (v !== null && (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > 1e10)) {
        throw new Error('expected a whole number of nanoseconds from 0 to 10000000000');
      }
    },
  });
  convict.addFormat({
    name: 'cpu-list',
    validate(v: unknown) {
      cpuListOf(v);
    },
  });
  convict.addFormat({
    name: 'poll-us',
    validate(v: unknown) {
      if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > 1000) throw new Error('expected a whole number of microseconds from 0 to 1000');
    },
  });
  convict.addFormat({
    name: 'socket-mode',
    validate(v: unknown) {
      parseSocketMode(v);
    },
  });
  convict.addFormat({
    name: 'socket-group',
    validate(v: unknown) {
      checkSocketGroup(v);
    },
  });
  convict.addFormat({
    name: 'bool',
    validate(v: unknown) {
      if (typeof v !== 'boolean') throw new Error('expected true or false');
    },
  });
  convict.addFormat({
    name: 'pci-address',
    validate(v: unknown) {
      if (typeof v !== 'string' || (v !== '' && !/^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$/.test(v))) throw new Error('expected a PCI address like 0000:00:04.0');
    },
  });
  convict.addFormat({
    name: 'serial',
    validate(v: unknown) {
      if (typeof v !== 'string' || !/^[\x20-\x7e]{0,20}$/.test(v)) throw new Error('expected at most 20 printable ASCII characters');
    },
  });
}
