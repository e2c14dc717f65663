/**
 * Service: the disks of one daemon, each with its driver, tag set, vhost-user device and
 * socket; started together and stopped together (rings stopped, sockets removed).
 */
import * as path from 'path';
import type { Logger } from 'pino';
import type { Disk } from '../block/disk';
import { TagSet } from '../block/tag-set';
import type { DiskConfig } from '../config/disk-schema';
import type { NullDriver } from '../drivers/null/null-driver';
import type { ManagedDisk } from './management/managed-disk';
import { ManagementServer } from './management/server';
import { buildNullDisk } from './null-disk';
import { QueueWorkers } from './queue-workers';
import { VhostUserBlkDevice } from '../vhost/blk-device';
import { VhostUserServer } from '../vhost/server';

/** A disk this daemon serves; the management API sees it as a ManagedDisk. */
export interface ServedDisk extends ManagedDisk {
  config: DiskConfig;
  disk: Disk;
  driver: NullDriver;
  device: VhostUserBlkDevice;
  server: VhostUserServer;
  /** The worker threads serving some of its queues (threads > 1), or null. */
  workers: QueueWorkers | null;
}

/**
 * Builds a null disk and its vhost-user server from its configuration (not yet listening).
 * `tagSet`, when given, is shared with other disks (shared_tags). With threads > 1, starts
 * the disk's worker threads.
 */
export function createDisk(config: DiskConfig, log: Logger, sharedTagSet?: TagSet): ServedDisk {
  const dlog = log.child({ disk: config.name });
  const { disk, driver } = buildNullDisk(config, dlog, { tagSet: sharedTagSet });
  const workers = config.threads > 1 ? new QueueWorkers(config, driver.storeId, dlog) : null;
  const device = new VhostUserBlkDevice(disk, config.num_queues, dlog, config.poll_us, workers);
  const server = new VhostUserServer(config.socket, device, dlog, { mode: config.socket_mode, group: config.socket_group });
  return { config, disk, driver, device, server, workers };
}

/** The QEMU options that attach `d` to a guest (memory must be shared with the back-end). */
export function qemuCommandLine(disks: readonly DiskConfig[]): string {
  const parts = ['qemu-system-x86_64 -machine q35 -m 1G', '-object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem'];
  disks.forEach((d, i) => {
    parts.push(`-chardev socket,id=rnull${i},path=${path.resolve(d.socket)},reconnect=1`);
    parts.push(`-device vhost-user-blk-pci,chardev=rnull${i},num-queues=${d.num_queues}`);
  });
  return parts.join(' ');
}

export class Service {
  readonly disks: ServedDisk[];
  private management: ManagementServer | null = null;

  constructor(
    configs: readonly DiskConfig[],
    private readonly log: Logger,
    private readonly managementSocket = '',
  ) {
    const shared = configs.filter((c) => c.shared_tags);
    const sharedTagSet =
      shared.length > 0 ? new TagSet({ nrHwQueues: Math.max(...shared.map((c) => c.num_queues)), queueDepth: shared[0].hw_queue_depth }) : undefined;
    this.disks = configs.map((c) => createDisk(c, log, c.shared_tags ? sharedTagSet : undefined));
  }

  /** Listens on every disk socket, then the management socket (if configured). */
  async start(): Promise<void> {
    this.listenDisks();
    if (this.managementSocket !== '') {
      this.management = new ManagementServer(this.managementSocket, this.disks, this.log);
      try {
        await this.management.listen();
      } catch (e) {
        await this.stop();
        throw e;
      }
    }
  }

  /** Listens on every socket; on a failure, closes the ones already open and rethrows. */
  private listenDisks(): void {
    const started: ServedDisk[] = [];
    try {
      for (const d of this.disks) {
        d.server.listen();
        started.push(d);
      }
    } catch (e) {
      for (const d of started) void d.server.close();
      throw e;
    }
  }

  /**
   * Stops the disks first (front-ends disconnected, rings stopped, sockets removed), then the
   * management socket (its clients disconnected, idle or not), then the worker threads.
   */
  async stop(): Promise<void> {
    await Promise.all(this.disks.map((d) => d.server.close()));
    const management = this.management;
    this.management = null;
    if (management !== null) await management.close();
    await Promise.all(this.disks.map((d) => d.workers?.close()));
  }
}
