/**
 * buildNullDisk: a null_blk disk from its configuration — the NullDriver, its tag set and the
 * Disk — as the main thread and every queue worker thread of that disk build it.
 */
import type { Logger } from 'pino';
import { Disk } from '../block/disk';
import { TagSet } from '../block/tag-set';
import type { DiskConfig } from '../config/disk-schema';
import { BadBlocks, parseRange } from '../drivers/null/badblocks';
import { IrqMode, NullDriver } from '../drivers/null/null-driver';

const MIB_SECTORS = 2048; // 512-byte sectors per MiB

export interface NullDisk {
  disk: Disk;
  driver: NullDriver;
}

export interface NullDiskOptions {
  /** A tag set shared with other disks (shared_tags); otherwise the disk gets its own. */
  tagSet?: TagSet;
  /** A worker thread's disk: the id of the main thread's page store, to share. */
  storeId?: number;
}

/** @throws RangeError for option combinations the driver refuses (config/load.ts checks first). */
export function buildNullDisk(config: DiskConfig, log: Logger, options: NullDiskOptions = {}): NullDisk {
  let lateLogged = false;
  const badblocks = new BadBlocks(config.badblocks_once);
  for (const r of config.badblocks) badblocks.add(...parseRange(r));
  const driver = new NullDriver({
    memoryBacked: config.memory_backed,
    storeId: config.memory_backed ? options.storeId : undefined,
    badblocks,
    mbps: config.mbps,
    // Throttling alone never makes a request time out (nor do the reservations of timed-out ones).
    throttleMaxAheadNs: config.io_timeout > 0 ? (config.io_timeout * 1e6) / 2 : undefined,
    cacheBytes: config.cache_size * 1048576,
    irqmode: config.irqmode as IrqMode,
    completionNsec: config.completion_nsec ?? undefined,
    onLateCompletion: (hctx, tag) => {
      if (lateLogged) return;
      lateLogged = true;
      log.warn({ queue: hctx, tag }, 'late completion of a request that had timed out: ignored (logged once)');
    },
  });
  const tagSet = options.tagSet ?? new TagSet({ nrHwQueues: config.num_queues, queueDepth: config.hw_queue_depth });
  const disk = new Disk({
    name: config.name,
    capacitySectors: config.size * MIB_SECTORS,
    logicalBlockSize: config.blocksize,
    readOnly: config.read_only,
    serial: config.serial,
    flush: true,
    timeoutMs: config.io_timeout,
    discard: config.discard,
    writeCache: config.cache_size > 0,
    tagSet,
    ops: driver,
  });
  return { disk, driver };
}
