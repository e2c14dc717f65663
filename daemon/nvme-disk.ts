/**
 * openNvmeDisks: the disks served from the namespaces of one NVMe controller (driver "nvme", the
 * same `pci`) — start-up checks, the controller brought up through VFIO once, each namespace
 * identified, one NvmeDriver with one I/O queue pair per hardware queue and one TagSet shared by
 * the disks (as the kernel's nvme driver: one tag set per controller), and a Disk per namespace
 * with that namespace's geometry.
 *
 * Problems the user must fix (device not bound to vfio-pci, no IOMMU group, missing namespace,
 * namespace with metadata or protection information, memlock limit too low) throw
 * NvmeSetupError with what to do; the daemon exits with status 2 on it.
 */
import * as fs from 'fs';
import type { Logger } from 'pino';
import { Disk } from '../block/disk';
import { TagSet } from '../block/tag-set';
import type { DiskConfig } from '../config/disk-schema';
import { NvmeController } from '../drivers/nvme/controller';
import { NvmeDriver } from '../drivers/nvme/driver';
import type { NvmeNamespace } from '../drivers/nvme/namespace';
import { pciDeviceStatus } from '../native/vfio';
import { SEG_MAX, SIZE_MAX_BYTES } from '../vhost/blk-config';

export class NvmeSetupError extends Error {
  override name = 'NvmeSetupError';
}

/** Locked memory the driver needs at least (queues, PRP lists) before any guest memory. */
export const MIN_MEMLOCK_BYTES = 64 * 1048576;

export interface NvmeDisk {
  disk: Disk;
  /** The controller's queue pairs, shared by the disks of its namespaces. */
  nvme: NvmeDriver;
  /** This disk's namespace (the Disk's operations). */
  namespace: NvmeNamespace;
  /** Disks of the controller not closed yet. */
  group: { open: number };
  /** What the management API sees of the driver: no bad-block list, no write cache. */
  driver: { badblocks: null; cache: null };
}

/**
 * RLIMIT_MEMLOCK (soft) in bytes from /proc/self/limits (Infinity: unlimited), and whether the
 * process has CAP_IPC_LOCK (then VFIO does not count pinned pages against it).
 */
export function memlockStatus(proc = '/proc/self'): { limit: number; capIpcLock: boolean } {
  let limit = Infinity;
  const m = /^Max locked memory\s+(\S+)/m.exec(fs.readFileSync(`${proc}/limits`, 'utf8'));
  if (m !== null && m[1] !== 'unlimited') limit = Number(m[1]);
  const cap = /^CapEff:\s+([0-9a-f]+)/m.exec(fs.readFileSync(`${proc}/status`, 'utf8'));
  const capIpcLock = cap !== null && (BigInt('0x' + cap[1]) & (1n << 14n)) !== 0n;
  return { limit, capIpcLock };
}

/** The checks that need no device access: bound to vfio-pci, IOMMU group, memlock. */
export function checkNvmeSetup(bdf: string, sysfs = '/sys', proc = '/proc/self'): void {
  let st;
  try {
    st = pciDeviceStatus(bdf, sysfs);
  } catch (err) {
    throw new NvmeSetupError(`${(err as Error).message}: check the pci setting (lspci -D lists the devices)`);
  }
  if (st.driver !== 'vfio-pci') {
    throw new NvmeSetupError(
      `PCI device ${bdf} is bound to ${st.driver ?? 'no driver'}, not vfio-pci. Bind it with: modprobe vfio-pci; ` +
        `echo vfio-pci > /sys/bus/pci/devices/${bdf}/driver_override; ` +
        (st.driver !== null ? `echo ${bdf} > /sys/bus/pci/devices/${bdf}/driver/unbind; ` : '') +
        `echo ${bdf} > /sys/bus/pci/drivers_probe`,
    );
  }
  if (st.group === null) throw new NvmeSetupError(`PCI device ${bdf} has no IOMMU group: enable the IOMMU (e.g. intel_iommu=on on the kernel command line)`);
  const ml = memlockStatus(proc);
  if (!ml.capIpcLock && ml.limit < MIN_MEMLOCK_BYTES) {
    throw new NvmeSetupError(
      `the locked-memory limit is ${ml.limit} bytes: the NVMe driver pins its queues and the guest's whole memory for DMA. ` +
        `Raise it to at least the guest memory size plus ${MIN_MEMLOCK_BYTES / 1048576} MiB (ulimit -l, or LimitMEMLOCK= in a systemd unit)`,
    );
  }
}

/**
 * Opens the controller and the namespace of `config` and builds the disk (openNvmeDisks of one).
 */
export async function openNvmeDisk(config: DiskConfig, log: Logger): Promise<NvmeDisk> {
  return (await openNvmeDisks([config], log))[0] as NvmeDisk;
}

/**
 * Disks naming the same controller (`pci`) are the namespaces of one controller: checks that
 * they agree on what belongs to the controller (num_queues, hw_queue_depth, nvme_poll, shadow_doorbells) and name
 * distinct namespaces. Throws NvmeSetupError saying which key differs.
 */
export function checkSharedController(configs: readonly DiskConfig[]): void {
  const first = configs[0];
  if (first === undefined) return;
  const nsids = new Set<number>();
  for (const c of configs) {
    if (configs.length > 1 && c.threads > 1) {
      throw new NvmeSetupError(`disk "${c.name}": threads ${c.threads}: the namespaces of controller ${c.pci} (disks ${configs.map((x) => `"${x.name}"`).join(', ')}) share one set of queue pairs served from one thread; give each of them threads 1, or serve one namespace of this controller`);
    }
    if (c.pci !== first.pci) throw new NvmeSetupError(`disks "${first.name}" and "${c.name}" name different controllers (${first.pci}, ${c.pci})`);
    if (nsids.has(c.nsid)) throw new NvmeSetupError(`disk "${c.name}": namespace ${c.nsid} of ${c.pci} is served by another disk already; give each disk its own nsid`);
    nsids.add(c.nsid);
    for (const k of ['num_queues', 'hw_queue_depth', 'nvme_poll', 'shadow_doorbells'] as const) {
      if (c[k] !== first[k]) {
        throw new NvmeSetupError(
          `disks "${first.name}" and "${c.name}" are namespaces of controller ${c.pci}, which they share with one set of I/O queue pairs and one tag set, but their ${k} differ (${String(first[k])}, ${String(c[k])}): give them the same ${k}`,
        );
      }
    }
  }
}

/**
 * Opens one controller for the disks of `configs` (all naming its `pci`; one namespace each),
 * creates one set of I/O queue pairs (NvmeDriver) and one TagSet shared by them, and builds a
 * Disk per namespace with that namespace's capacity and block size. Throws NvmeSetupError for
 * what the user must fix (the controller is shut down again then).
 */
export async function openNvmeDisks(configs: readonly DiskConfig[], log: Logger): Promise<NvmeDisk[]> {
  checkSharedController(configs);
  const first = configs[0] as DiskConfig;
  checkNvmeSetup(first.pci);
  const clog = (level: 'info' | 'warn' | 'error', msg: string): void => log[level](msg);
  const controller = await NvmeController.open({ bdf: first.pci, ioQueues: first.num_queues, interrupts: !first.nvme_poll, log: clog });
  try {
    if (controller.grantedIoQueues < first.num_queues) {
      throw new NvmeSetupError(`${first.pci}: the controller grants ${controller.grantedIoQueues} I/O queue pairs, fewer than num_queues ${first.num_queues}`);
    }
    const active = await controller.activeNamespaces();
    const namespaces = [];
    for (const config of configs) {
      if (!active.includes(config.nsid)) {
        throw new NvmeSetupError(`${config.pci}: namespace ${config.nsid} does not exist or is not attached (active namespaces: ${active.join(', ') || 'none'}); set nsid to one of them`);
      }
      const ns = await controller.identifyNamespace(config.nsid);
      if (ns.format.metadataSize !== 0 || ns.protectionType !== 0) {
        throw new NvmeSetupError(
          `${config.pci}: namespace ${config.nsid} has ${ns.format.metadataSize} bytes of metadata per block` +
            (ns.protectionType !== 0 ? ` and protection information type ${ns.protectionType}` : '') +
            `, which rnull does not serve: format it without (e.g. nvme format with an LBA format whose metadata size is 0) or choose another namespace`,
        );
      }
      if (ns.blockSize < 512 || ns.blockSize > 4096) throw new NvmeSetupError(`${config.pci}: namespace ${config.nsid} has ${ns.blockSize}-byte blocks; 512 to 4096 are served`);
      namespaces.push({ nsid: config.nsid, namespace: ns });
    }
    const entries = Math.min(controller.cap.maxQueueEntries, 1024);
    // threads > 1: this (main) thread serves hardware queues i with i mod threads = 0 (daemon/nvme-thread.ts).
    const served = first.threads > 1 ? (i: number): boolean => i % first.threads === 0 : undefined;
    const nvme = await NvmeDriver.open({ controller, namespaces, queues: first.num_queues, entries, poll: first.nvme_poll, log: clog, served, shadowDoorbells: first.shadow_doorbells });
    const tagSet = new TagSet({ nrHwQueues: first.num_queues, queueDepth: first.hw_queue_depth });
    const group = { open: configs.length };
    return configs.map((config, i) => {
      const ns = nvme.namespaces[i] as NvmeNamespace;
      const serial = config.serial !== '' ? config.serial : `${controller.identity.serial.slice(0, 20 - String(config.nsid).length - 1)}-${config.nsid}`;
      const disk = new Disk({
        name: config.name,
        capacitySectors: ns.blocks * (ns.blockSize / 512),
        logicalBlockSize: ns.blockSize,
        readOnly: config.read_only,
        serial: serial.replace(/[^\x20-\x7e]/g, '?'),
        flush: nvme.volatileWriteCache,
        discard: nvme.discard,
        timeoutMs: config.io_timeout,
        sizeMax: Math.min(SIZE_MAX_BYTES, nvme.maxTransferBytes),
        segMax: Math.min(SEG_MAX, Math.max(1, nvme.maxTransferBytes / 4096)),
        tagSet,
        ops: ns,
      });
      log.info(
        { disk: config.name, pci: config.pci, nsid: config.nsid, blocks: ns.blocks, blockSize: ns.blockSize, maxTransfer: nvme.maxTransferBytes, vwc: nvme.volatileWriteCache, discard: nvme.discard, poll: config.nvme_poll, shadowDoorbells: controller.shadowDoorbells, queues: config.num_queues, sharedWith: configs.length - 1 },
        'NVMe namespace opened',
      );
      return { disk, nvme, namespace: ns, group, driver: { badblocks: null, cache: null } };
    });
  } catch (err) {
    await controller.shutdown().catch(() => controller.close());
    throw err;
  }
}

/**
 * Closes a disk; the last disk of a controller stops the driver and shuts the controller down
 * cleanly (CC.SHN). Each disk is closed once (after its rings stopped).
 */
export async function closeNvmeDisk(d: NvmeDisk, log: Logger): Promise<void> {
  if (--d.group.open > 0) return;
  d.nvme.close();
  try {
    const ms = await d.nvme.controller.shutdown();
    log.info({ pci: d.nvme.controller.bdf, ms: Math.round(ms) }, 'NVMe controller shut down');
  } catch (err) {
    log.warn({ err }, `NVMe shutdown: ${(err as Error).message}`);
  }
}
