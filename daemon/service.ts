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
import { buildNullDisk, closeNullDisk } from './null-disk';
import { closeNvmeDisk, openNvmeDisk, openNvmeDisks, type NvmeDisk } from './nvme-disk';
import { connectNvmeWorkers, nvmeWorkerSetup } from './nvme-thread';
import { QueueWorkers } from './queue-workers';
import { VhostUserBlkDevice } from '../vhost/blk-device';
import { VhostUserServer } from '../vhost/server';

/** A disk this daemon serves; the management API sees it as a ManagedDisk. */
export interface ServedDisk extends ManagedDisk {
  config: DiskConfig;
  disk: Disk;
  driver: NullDriver | NvmeDisk['driver'];
  /** driver nvme: the namespace's driver and controller. */
  nvme?: NvmeDisk;
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
export function createDisk(config: DiskConfig, log: Logger, sharedTagSet?: TagSet): ServedDisk & { driver: NullDriver } {
  const dlog = log.child({ disk: config.name });
  const { disk, driver } = buildNullDisk(config, dlog, { tagSet: sharedTagSet });
  const workers = config.threads > 1 ? new QueueWorkers(config, driver.storeId, dlog) : null;
  const device = new VhostUserBlkDevice(disk, config.num_queues, dlog, config.poll_us, workers);
  const server = new VhostUserServer(config.socket, device, dlog, { mode: config.socket_mode, group: config.socket_group });
  return { config, disk, driver, device, server, workers };
}

/** Builds a disk served from an NVMe namespace (driver "nvme"): opens its controller first. */
export async function createNvmeDisk(config: DiskConfig, log: Logger): Promise<ServedDisk> {
  return serveNvmeDisk(config, await openNvmeDisk(config, log.child({ disk: config.name })), log);
}

/** The vhost-user device and server (not yet listening) of a disk opened by openNvmeDisks. */
export function serveNvmeDisk(config: DiskConfig, nvme: NvmeDisk, log: Logger): ServedDisk {
  const dlog = log.child({ disk: config.name });
  // threads > 1: hardware queue i and its queue pair on thread i mod threads (daemon/nvme-thread.ts).
  const workers = config.threads > 1 ? new QueueWorkers(config, null, dlog, nvmeWorkerSetup(nvme)) : null;
  if (workers !== null) connectNvmeWorkers(nvme.nvme, workers, dlog);
  const device = new VhostUserBlkDevice(nvme.disk, config.num_queues, dlog, config.poll_us, workers);
  const server = new VhostUserServer(config.socket, device, dlog, { mode: config.socket_mode, group: config.socket_group });
  return { config, disk: nvme.disk, driver: nvme.driver, nvme, device, server, workers };
}

/**
 * The QEMU options that attach `d` to a guest (memory must be shared with the back-end).
 * `reconnect`: the chardev's reconnect option for the QEMU at hand (daemon/qemu-version.ts).
 */
export function qemuCommandLine(disks: readonly DiskConfig[], reconnect = 'reconnect=1'): string {
  const parts = ['qemu-system-x86_64 -machine q35 -m 1G', '-object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem'];
  disks.forEach((d, i) => {
    parts.push(`-chardev socket,id=rnull${i},path=${path.resolve(d.socket)},${reconnect}`);
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
    /** Listening sockets passed in (`--fd`), by disk name: served instead of binding the path. */
    private readonly listenFds: ReadonlyMap<string, number> = new Map(),
  ) {
    const shared = configs.filter((c) => c.shared_tags);
    const sharedTagSet =
      shared.length > 0 ? new TagSet({ nrHwQueues: Math.max(...shared.map((c) => c.num_queues)), queueDepth: shared[0].hw_queue_depth }) : undefined;
    this.disks = configs.filter((c) => c.driver !== 'nvme').map((c) => createDisk(c, log, c.shared_tags ? sharedTagSet : undefined));
    this.nvmeConfigs = configs.filter((c) => c.driver === 'nvme');
  }

  private readonly nvmeConfigs: DiskConfig[];

  /**
   * Opens the NVMe disks' controllers (throws NvmeSetupError for what the user must fix), then
   * listens on every disk socket, then the management socket (if configured).
   */
  async start(): Promise<void> {
    // Disks naming the same controller are its namespaces: one bring-up, shared queue pairs and tags.
    const byPci = new Map<string, DiskConfig[]>();
    for (const c of this.nvmeConfigs) byPci.set(c.pci, [...(byPci.get(c.pci) ?? []), c]);
    try {
      for (const group of byPci.values()) {
        const first = group[0] as DiskConfig;
        const opened = await openNvmeDisks(group, group.length === 1 ? this.log.child({ disk: first.name }) : this.log.child({ pci: first.pci }));
        group.forEach((c, i) => this.disks.push(serveNvmeDisk(c, opened[i] as NvmeDisk, this.log)));
      }
    } catch (e) {
      await this.closeNvme();
      throw e;
    }
    try {
      this.listenDisks();
    } catch (e) {
      await this.closeNvme();
      throw e;
    }
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
        const fd = this.listenFds.get(d.config.name);
        if (fd !== undefined) d.server.listenOn(fd);
        else d.server.listen();
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
    for (const d of this.disks) if (d.nvme === undefined && d.config.driver !== 'nvme') closeNullDisk(d.config, d.driver as NullDriver, this.log.child({ disk: d.config.name }));
    await this.closeNvme();
  }

  /**
   * Starts serving one more disk (a reload added it): builds it (opening its NVMe controller
   * for driver "nvme") and listens on its socket; the management API sees it at once.
   * @throws Error when it cannot start (nothing of it is left open): a socket in use, a
   *   controller already serving a disk, shared_tags (its tag set is sized at start), or what
   *   createNvmeDisk throws
   */
  async addDisk(config: DiskConfig): Promise<ServedDisk> {
    if (config.shared_tags) throw new Error('a disk with shared_tags cannot be added while running (the shared tag set is sized at start): restart to add it');
    if (config.driver === 'nvme' && this.disks.some((d) => d.config.driver === 'nvme' && d.config.pci === config.pci)) {
      throw new Error(`controller ${config.pci} already serves another disk`);
    }
    const d = config.driver === 'nvme' ? await createNvmeDisk(config, this.log) : createDisk(config, this.log);
    try {
      d.server.listen();
    } catch (e) {
      await d.workers?.close();
      if (d.nvme !== undefined) await closeNvmeDisk(d.nvme, this.log.child({ disk: config.name }));
      throw e;
    }
    this.disks.push(d);
    return d;
  }

  /**
   * Stops serving the disk named `name` (a reload removed it): its front-end is disconnected,
   * its rings stop, its socket is removed, its threads and controller are closed. False if no
   * such disk.
   */
  async removeDisk(name: string): Promise<boolean> {
    const i = this.disks.findIndex((d) => d.config.name === name);
    if (i < 0) return false;
    const [d] = this.disks.splice(i, 1);
    await d.server.close();
    await d.workers?.close();
    if (d.nvme !== undefined) {
      const n = d.nvme;
      d.nvme = undefined;
      await closeNvmeDisk(n, this.log.child({ disk: name }));
    } else if (d.config.driver !== 'nvme') {
      // Writes the cache back and unlocks the store, so the disk can be added again.
      closeNullDisk(d.config, d.driver as NullDriver, this.log.child({ disk: name }));
    }
    return true;
  }

  /** Shuts down the NVMe controllers (their disks' rings stopped). */
  private async closeNvme(): Promise<void> {
    for (const d of this.disks) {
      if (d.nvme === undefined) continue;
      const n = d.nvme;
      d.nvme = undefined;
      await closeNvmeDisk(n, this.log.child({ disk: d.config.name }));
    }
  }
}
