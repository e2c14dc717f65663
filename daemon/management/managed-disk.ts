/**
 * ManagedDisk: what the management server needs of a served disk (daemon/service.ts's ServedDisk
 * is one): its configuration, geometry, connection state, the null driver's bad blocks and write
 * cache, the worker threads to tell of bad-block changes, and its rings' counters.
 */
import type { Disk } from '../../block/disk';
import type { DiskConfig } from '../../config/disk-schema';
import type { BadBlocks } from '../../drivers/null/badblocks';
import type { WriteCache } from '../../drivers/null/write-cache';
import type { QueueSnapshot } from '../../virtqueue/ring-queue';
import type { NvmeQueueStats } from '../../drivers/nvme/driver';

/** One NVMe queue pair's counters as NvmeDriver.stats() gives them. */
export type NvmeQueueCounters = NvmeQueueStats & { qid: number; stale: number; sqDoorbells: number; cqDoorbells: number; inFlight: number; sqDoorbellsSkipped?: number; cqDoorbellsSkipped?: number; shadowDoorbells?: boolean };

export interface ManagedDisk {
  readonly config: Pick<DiskConfig, 'name' | 'socket' | 'num_queues' | 'rotational' | 'shared_tags'>;
  readonly disk: Pick<Disk, 'capacitySectors' | 'logicalBlockSize' | 'tagSet'>;
  readonly server: { readonly isConnected: boolean };
  /** The null driver's bad blocks and write cache; null where the driver has none (nvme). */
  readonly driver: { readonly badblocks: BadBlocks | null; readonly cache: WriteCache | null };
  /** Worker threads serving some of its queues (threads > 1), or null. */
  readonly workers: { setBadBlocks(ranges: [number, number][]): Promise<void> } | null;
  /** driver nvme: the driver's per-queue counters (`rnull ctl stats`), by hardware queue. */
  readonly nvme?: { readonly nvme: { stats(): ReadonlyArray<NvmeQueueCounters>; refreshStats?(): Promise<void>; resetController(why: string): Promise<void>; readonly broken: boolean } };
  /** One entry per virtqueue; each queue's counters (`rnull ctl stats`). */
  readonly device: { readonly vrings: readonly { readonly queue: { snapshot(): QueueSnapshot | Promise<QueueSnapshot> } }[] };
}
