/**
 * buildNullDisk: a null_blk disk from its configuration — the NullDriver, its tag set and the
 * Disk — as the main thread and every queue worker thread of that disk build it. On the main
 * thread, a memory-backed disk's store file (`store`, resolved by config/load.ts) is opened or
 * created; worker threads attach to it by id. closeNullDisk ends it at shutdown.
 */
import * as path from 'path';
import type { Logger } from 'pino';
import { Disk } from '../block/disk';
import { TagSet } from '../block/tag-set';
import type { DiskConfig } from '../config/disk-schema';
import { defaultStoreDir } from '../config/store-path';
import { BadBlocks, parseRange } from '../drivers/null/badblocks';
import { IrqMode, NullDriver } from '../drivers/null/null-driver';
import type { PageStore } from '../drivers/null/page-store';
import { openStoreFile, removeStoreFile } from '../drivers/null/store-file';

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

/**
 * @throws RangeError for option combinations the driver refuses (config/load.ts checks first);
 * StoreError / Error from openStoreFile for a store file that cannot be used.
 */
export function buildNullDisk(config: DiskConfig, log: Logger, options: NullDiskOptions = {}): NullDisk {
  let lateLogged = false;
  let storeErrorLogged = false;
  const store = config.memory_backed && options.storeId === undefined && config.store !== '' ? openStore(config, log) : undefined;
  const badblocks = new BadBlocks(config.badblocks_once);
  for (const r of config.badblocks) badblocks.add(...parseRange(r));
  const driver = new NullDriver({
    memoryBacked: config.memory_backed,
    storeId: config.memory_backed ? options.storeId : undefined,
    store,
    capacityBytes: config.size * 1048576,
    onStoreError: (errno) => {
      if (storeErrorLogged) return;
      storeErrorLogged = true;
      log.error({ errno, store: config.store || undefined }, 'a write found no room in the store (its file system is full): it failed with IOERR (logged once)');
    },
    badblocks,
    mbps: config.mbps,
    // Throttling alone never makes a request time out (nor do the reservations of timed-out ones).
    throttleMaxAheadNs: config.io_timeout > 0 ? (config.io_timeout * 1e6) / 2 : undefined,
    cacheBytes: config.cache_size * 1048576,
    irqmode: config.irqmode as IrqMode,
    completionNsec: config.completion_nsec ?? undefined,
    // Timer deadlines closer than the poll budget are spun to, not slept toward (request-timer.ts).
    timerSpinNs: config.poll_us * 1000,
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

/** Opens (or creates) the disk's store file and logs what it found. */
function openStore(config: DiskConfig, log: Logger): PageStore {
  const bytes = config.size * 1048576;
  const { store, created } = openStoreFile(config.store, bytes, {
    fresh: config.store_fresh,
    privateDir: path.dirname(config.store) === defaultStoreDir(),
  });
  const found = store.pageCount * 4096;
  log.info({ store: config.store, created, fresh: config.store_fresh, foundBytes: found }, created || config.store_fresh ? 'store: the disk starts empty' : `store: found ${found} bytes of data`);
  return store;
}

/**
 * At shutdown, once no request runs (rings stopped, worker threads ended): dirty pages of the
 * write cache are written back (an orderly stop loses nothing), then the store file is removed
 * with store_remove_on_exit, or when it holds no data (a missing store is an empty disk: nothing
 * is lost, and no empty files pile up), and closed. Removed while still locked, so a daemon
 * starting meanwhile never has its new store removed.
 */
export function closeNullDisk(config: DiskConfig, driver: NullDriver, log: Logger): void {
  if (driver.store === null) return;
  const err = driver.cache?.flush() ?? 0;
  if (err !== 0) log.error({ errno: err, store: config.store }, 'the write cache could not be written back to the store at shutdown');
  if (config.store !== '' && (config.store_remove_on_exit || driver.store.pageCount === 0)) {
    removeStoreFile(config.store);
    log.info({ store: config.store, empty: driver.store.pageCount === 0 }, 'store removed');
  }
  driver.store.close();
}
