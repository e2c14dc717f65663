/**
 * QueueThreads: the worker threads of a disk whose `threads` is above 1, as the vhost-user
 * device sees them (daemon/QueueWorkers implements it).
 */
import type { MemRegion } from '../virtqueue/guest-memory';
import type { InflightDescription } from '../virtqueue/inflight-region';
import type { RingQueue } from '../virtqueue/ring-queue';

export interface QueueThreads {
  /** The worker-thread queue serving ring `index`, or null when it runs on the main thread. */
  remoteQueue(index: number): RingQueue | null;
  /**
   * SET_MEM_TABLE: every worker maps the table from its own duplicates of `fds` (the caller keeps
   * and closes its fds). Call only while no worker ring runs.
   */
  mapMemory(regions: readonly MemRegion[], fds: readonly number[]): Promise<void>;
  /** Every worker unmaps its guest memory (rings stopped first). */
  releaseMemory(): Promise<void>;
  /**
   * SET/GET_INFLIGHT_FD: every worker maps the inflight region from its own duplicate of `fd`
   * (the caller keeps and closes fd). Call only while no worker ring runs.
   */
  mapInflight?(fd: number, description: InflightDescription): Promise<void>;
  /** Every worker unmaps its inflight region, if any. */
  releaseInflight?(): Promise<void>;
  /** `handler` hears of each worker thread lost (its rings' state with it). */
  onLost(handler: (error: Error) => void): void;
}
