/**
 * Disk: one block device served to a guest (the kernel's GenDisk), immutable once built:
 * capacity, logical block size, read-only flag, serial, and the tag set and driver behind it.
 */
import type { Operations } from './operations';
import { MAX_QUEUE_SIZE } from '../native';
import { HwQueue } from './hw-queue';
import type { TagSet } from './tag-set';

export interface DiskOptions {
  name: string;
  /** Capacity in 512-byte sectors (always 512-byte units, whatever the logical block size). */
  capacitySectors: number;
  /** Logical block size in bytes: a power of two from 512 to 4096. */
  logicalBlockSize: number;
  readOnly: boolean;
  /** Serial number returned to VIRTIO_BLK_T_GET_ID: up to 20 bytes of ASCII. */
  serial: string;
  /** Advertise a volatile write cache: the guest sends FLUSH requests. */
  flush: boolean;
  /** A volatile write cache the guest can switch (VIRTIO_BLK_F_CONFIG_WCE); needs ops.setWriteCache. */
  writeCache?: boolean;
  /** Accept DISCARD and WRITE_ZEROES (VIRTIO_BLK_F_DISCARD, _F_WRITE_ZEROES). */
  discard?: boolean;
  /** Largest data descriptor the guest may send, bytes (virtio size_max); default the queue's limit. */
  sizeMax?: number;
  /** Most data descriptors per request (virtio seg_max); default the queue's limit. */
  segMax?: number;
  /** A request not ended this many milliseconds after it started times out (0: never). */
  timeoutMs?: number;
  tagSet: TagSet;
  ops: Operations;
}

/**
 * Checks a logical block size (the counterpart of gen_disk.rs validate_block_size).
 * @throws RangeError unless it is a power of two from 512 to 4096.
 */
/** The hardware queue `index` of a disk. @throws RangeError if there is none. */
export function hctxOf(disk: Disk, index: number): HwQueue {
  const q = disk.hwQueues[index];
  if (q === undefined) throw new RangeError(`hardware queue ${index} does not exist (disk has ${disk.hwQueues.length})`);
  return q;
}

export function validateBlockSize(bytes: number): void {
  if (!Number.isInteger(bytes) || bytes < 512 || bytes > 4096 || (bytes & (bytes - 1)) !== 0) {
    throw new RangeError(`block size must be a power of two from 512 to 4096 bytes, got ${bytes}`);
  }
}

export class Disk {
  readonly name: string;
  readonly capacitySectors: number;
  readonly logicalBlockSize: number;
  readonly readOnly: boolean;
  readonly serial: string;
  readonly flush: boolean;
  readonly discard: boolean;
  readonly writeCache: boolean;
  readonly timeoutMs: number;
  readonly sizeMax: number | undefined;
  readonly segMax: number | undefined;
  readonly tagSet: TagSet;
  readonly ops: Operations;
  /** This disk's hardware queues, one per tag-set queue, each with MAX_QUEUE_SIZE request slots. */
  readonly hwQueues: readonly HwQueue[];

  /** @throws RangeError for a bad block size, a capacity that is not a whole number of blocks, or a bad serial. */
  constructor(options: DiskOptions) {
    validateBlockSize(options.logicalBlockSize);
    const perBlock = options.logicalBlockSize / 512;
    if (!Number.isSafeInteger(options.capacitySectors) || options.capacitySectors <= 0 || options.capacitySectors % perBlock !== 0) {
      throw new RangeError(`capacity must be a positive whole number of ${options.logicalBlockSize}-byte blocks, got ${options.capacitySectors} sectors`);
    }
    if (!/^[\x20-\x7e]{0,20}$/.test(options.serial)) {
      throw new RangeError(`serial must be at most 20 printable ASCII characters, got ${JSON.stringify(options.serial)}`);
    }
    this.name = options.name;
    this.capacitySectors = options.capacitySectors;
    this.logicalBlockSize = options.logicalBlockSize;
    this.readOnly = options.readOnly;
    this.serial = options.serial;
    this.flush = options.flush;
    this.discard = options.discard ?? false;
    this.writeCache = options.writeCache ?? false;
    if (this.writeCache && options.ops.setWriteCache === undefined) throw new RangeError('a write cache needs the driver\'s setWriteCache operation');
    this.timeoutMs = options.timeoutMs ?? 30000;
    this.sizeMax = options.sizeMax;
    this.segMax = options.segMax;
    this.tagSet = options.tagSet;
    this.ops = options.ops;
    this.hwQueues = this.tagSet.tags.map((tags, i) => new HwQueue(i, MAX_QUEUE_SIZE, tags));
  }
}
