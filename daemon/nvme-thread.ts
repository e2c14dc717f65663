/**
 * NVMe disks with `threads` > 1: hardware queue i (and its NVMe I/O queue pair, qid i + 1) is
 * served on thread i mod threads, as for null disks (daemon/queue-workers.ts).
 *
 * The main thread owns the controller: it creates every queue pair, maps each front-end's guest
 * memory for DMA once, sends admin commands (Abort, queue creation) and resets the controller.
 * A worker thread builds an NvmeDriver over the same queue pairs (NvmeDriver.attach): their
 * rings and PRP/bounce memory through process-wide views of the main thread's DMA blocks
 * (vfioShareView), doorbells and CSTS through the BAR's share (vfioShareWrite32/Read32), the
 * MSI-X eventfd of each of its queue pairs lent by dup (queue-workers.ts). Doorbells, completion
 * polling, the eventfd, request timeouts and the requests of a queue pair live on its thread.
 *
 * Messages (thread-messages.ts op 'driver'): main -> worker NvmeWorkerMessage; worker -> main
 * NvmeMainMessage (Abort and reset requests). A controller reset (NvmeDriver.resetController on
 * the main thread) quiesces every worker (no submission, no reaping) before CC.EN=0, has each
 * worker empty its rings and requeue its requests while the controller is disabled, and resumes
 * them once the queues are created again; a controller that does not come back has every
 * thread fail its requests with IOERR. A lost worker thread resets the controller (its queue
 * pairs' positions are unknown; the new worker starts from empty rings).
 */
import type { Logger } from 'pino';
import { Disk } from '../block/disk';
import { TagSet } from '../block/tag-set';
import type { DiskConfig } from '../config/disk-schema';
import type { DmaRegion, NvmeController } from '../drivers/nvme/controller';
import { NvmeDriver, sharedRegion, type AttachedQueue, type NvmeQueueStats, type SharedRegion } from '../drivers/nvme/driver';
import type { IdentifyNamespace } from '../drivers/nvme/identify';
import { QueuePair } from '../drivers/nvme/queue';
import { Reg, cqHeadDoorbell, decodeCsts, sqTailDoorbell } from '../drivers/nvme/registers';
import { DoorbellBuffer } from '../drivers/nvme/shadow-doorbell';
import { vfioFence, vfioShareRead32, vfioShareView, vfioShareWrite32 } from '../native/vfio';
import type { NvmeDisk } from './nvme-disk';

/** What a worker thread needs to serve its queue pairs of an NVMe disk (structured-clonable). */
export interface NvmeWorkerSetup {
  bdf: string;
  /** BAR0's share id. */
  barShare: number;
  doorbellStride: number;
  identity: { volatileWriteCache: boolean; oncs: number; abortLimit?: number; serial: string };
  /** Bytes per command (MDTS), Infinity if unlimited. */
  maxTransferBytes: number;
  nsid: number;
  namespace: IdentifyNamespace;
  poll: boolean;
  /** Every queue pair by hardware queue index (the worker serves those of its thread). */
  queues: Array<{ qid: number; entries: number; eventfd: number; sq: SharedRegion; cq: SharedRegion; lists: SharedRegion; bounce: SharedRegion }>;
  /**
   * The MSI-X eventfd of each hardware queue's queue pair: the main thread's numbers here;
   * in a worker's own workerData, duplicates lent to it for its queues (-1 for the others).
   */
  eventfds: number[];
  /** The Shadow Doorbell and EventIdx pages while the controller uses them (shadow doorbells), else null. */
  doorbellBuffer?: { shadow: SharedRegion; eventIdx: SharedRegion } | null;
  /** The disk as the main thread built it. */
  disk: { capacitySectors: number; logicalBlockSize: number; serial: string; flush: boolean; discard: boolean; sizeMax: number; segMax: number };
}

/** main -> worker. */
export type NvmeWorkerMessage =
  | { kind: 'quiesce' }
  | { kind: 'requeue' }
  | { kind: 'resume' }
  | { kind: 'broken' }
  | { kind: 'chunkIova'; ns: number; chunkIova: Float64Array }
  | { kind: 'stats' };

/** worker -> main. */
export type NvmeMainMessage = { kind: 'abort'; qid: number; cid: number; what: string } | { kind: 'reset'; why: string };

type Counters = ReturnType<NvmeDriver['stats']>[number];

/**
 * The worker threads' setup of a one-namespace NVMe disk (main thread). Throws if the DMA
 * memory or the BAR has no share id (a device that is not a native VfioDevice).
 */
export function nvmeWorkerSetup(d: NvmeDisk): NvmeWorkerSetup {
  const c = d.nvme.controller;
  const barShare = c.dev.barShare?.(0);
  if (barShare === undefined) throw new Error('the VFIO device cannot share its BAR with worker threads');
  const queues = d.nvme.sharedLayout();
  const disk = d.disk;
  return {
    bdf: c.bdf,
    barShare,
    doorbellStride: c.cap.doorbellStride,
    identity: { volatileWriteCache: c.identity.volatileWriteCache, oncs: c.identity.oncs, abortLimit: c.identity.abortLimit, serial: c.identity.serial },
    maxTransferBytes: c.maxTransferBytes,
    nsid: d.namespace.nsid,
    namespace: { nsze: d.namespace.blocks, blockSize: d.namespace.blockSize, dlfeat: d.namespace.deallocateZeroes ? 1 : 0 } as IdentifyNamespace,
    poll: d.nvme.poll,
    queues,
    eventfds: queues.map((q) => q.eventfd),
    doorbellBuffer: sharedDoorbellBuffer(c),
    disk: { capacitySectors: disk.capacitySectors, logicalBlockSize: disk.logicalBlockSize, serial: disk.serial, flush: disk.flush, discard: disk.discard, sizeMax: disk.sizeMax ?? 0, segMax: disk.segMax ?? 0 },
  };
}

/** The controller's doorbell buffer pages as worker threads reach them, or null without shadow doorbells. */
function sharedDoorbellBuffer(c: NvmeController): NvmeWorkerSetup['doorbellBuffer'] {
  const b = c.doorbellBuffer;
  if (!c.shadowDoorbells || b === null) return null;
  return { shadow: sharedRegion(b.shadow), eventIdx: sharedRegion(b.eventIdx) };
}

/** What the main thread needs of the disk's worker threads (daemon/queue-workers.ts). */
export interface NvmeWorkerGroup {
  /** Sends `msg` to every worker; resolves with each worker's answer (a lost worker: undefined). */
  driverCall(msg: NvmeWorkerMessage): Promise<unknown[]>;
  /** `handler` hears each worker's NvmeMainMessage. */
  onDriverMessage(handler: (thread: number, msg: unknown) => void): void;
  /** `handler` hears of each worker thread lost. */
  onDriverLost(handler: (error: Error) => void): void;
}

/**
 * Main thread: makes `driver` reset and stop/resume the workers' queue pairs with its own
 * (NvmePeers), sends them each memory table's chunk IOVAs, serves their Abort and reset
 * requests, and resets the controller when a worker thread is lost.
 */
export function connectNvmeWorkers(driver: NvmeDriver, workers: NvmeWorkerGroup, log: Logger): void {
  const call = (msg: NvmeWorkerMessage): Promise<unknown[]> => workers.driverCall(msg);
  driver.setPeers({
    quiesce: async () => void (await call({ kind: 'quiesce' })),
    requeue: async () => void (await call({ kind: 'requeue' })),
    resume: () => void call({ kind: 'resume' }),
    broken: () => void call({ kind: 'broken' }),
    chunkIova: (ns, chunkIova) => void call({ kind: 'chunkIova', ns, chunkIova }),
    stats: async () => (await call({ kind: 'stats' })).flatMap((r) => (Array.isArray(r) ? (r as Array<[number, Counters]>) : [])),
  });
  workers.onDriverMessage((thread, raw) => {
    const m = raw as NvmeMainMessage;
    if (m.kind === 'abort' && Number.isInteger(m.qid) && Number.isInteger(m.cid)) driver.abort(m.qid, m.cid);
    else if (m.kind === 'reset') void driver.resetController(`thread ${thread}: ${String(m.why)}`);
  });
  workers.onDriverLost((e) => {
    log.warn({ err: e }, 'NVMe queue worker thread lost: resetting the controller (its queue pairs start over)');
    void driver.resetController(`${e.message}: its queue pairs start over`);
  });
}

/** Worker thread: the disk, the driver over the main thread's queue pairs, and the message handler. */
export interface NvmeWorkerDisk {
  disk: Disk;
  driver: NvmeDriver;
  handle(msg: NvmeWorkerMessage): unknown;
}

/**
 * Worker thread `thread` of an NVMe disk: an NvmeDriver attached to the queue pairs of `setup`
 * serving hardware queues i with i mod threads = thread, and a Disk like the main thread's over
 * it. `post` sends an NvmeMainMessage to the main thread. Throws if a share is gone.
 */
export function buildNvmeWorkerDisk(config: DiskConfig, setup: NvmeWorkerSetup, thread: number, log: Logger, post: (m: NvmeMainMessage) => void): NvmeWorkerDisk {
  const bar = setup.barShare;
  const stride = setup.doorbellStride;
  const region = (r: SharedRegion): DmaRegion => ({ id: 0, share: r.share, iova: r.iova, size: r.size, bytes: new Uint8Array(vfioShareView(r.share)) });
  const served = (i: number): boolean => i % config.threads === thread;
  const db = setup.doorbellBuffer;
  const dbbuf = db ? new DoorbellBuffer(region(db.shadow).bytes, region(db.eventIdx).bytes, stride, vfioFence) : null;
  const queues: AttachedQueue[] = setup.queues.map((q, i) => {
    const sq = region(q.sq);
    const cq = region(q.cq);
    const qp = new QueuePair<number>({
      qid: q.qid,
      entries: q.entries,
      sq: sq.bytes,
      cq: cq.bytes,
      doorbells: {
        sqTail: (v) => vfioShareWrite32(bar, sqTailDoorbell(q.qid, stride), v),
        cqHead: (v) => vfioShareWrite32(bar, cqHeadDoorbell(q.qid, stride), v),
      },
      onStale: (qid, c, reason) => log.warn(`${setup.bdf}: queue ${qid}: dropped completion cid 0x${c.cid.toString(16)} (${reason})`),
      shadow: dbbuf?.forQueue(q.qid) ?? null,
    });
    const fd = setup.eventfds[i] ?? -1;
    return { pair: { qp, eventfd: served(i) && fd >= 0 ? fd : undefined, ring: { sq, cq } }, lists: region(q.lists), bounce: region(q.bounce) };
  });
  const controller = {
    bdf: setup.bdf,
    identity: setup.identity,
    maxTransferBytes: setup.maxTransferBytes,
    status: () => decodeCsts(vfioShareRead32(bar, Reg.CSTS)),
  } as unknown as NvmeController;
  const driver = NvmeDriver.attach(
    {
      controller,
      nsid: setup.nsid,
      namespace: setup.namespace,
      queues: setup.queues.length,
      entries: setup.queues[0]?.entries ?? 2,
      poll: setup.poll,
      log: (level, msg) => log[level](msg),
      served,
      main: {
        abort: (qid, cid, what) => post({ kind: 'abort', qid, cid, what }),
        reset: (why) => post({ kind: 'reset', why }),
      },
    },
    queues,
  );
  const d = setup.disk;
  const disk = new Disk({
    name: config.name,
    capacitySectors: d.capacitySectors,
    logicalBlockSize: d.logicalBlockSize,
    readOnly: config.read_only,
    serial: d.serial,
    flush: d.flush,
    discard: d.discard,
    timeoutMs: config.io_timeout,
    sizeMax: d.sizeMax > 0 ? d.sizeMax : undefined,
    segMax: d.segMax > 0 ? d.segMax : undefined,
    tagSet: new TagSet({ nrHwQueues: config.num_queues, queueDepth: config.hw_queue_depth }),
    ops: driver.first,
  });
  const handle = (msg: NvmeWorkerMessage): unknown => {
    switch (msg.kind) {
      case 'quiesce':
        driver.quiesce();
        return undefined;
      case 'requeue':
        driver.requeueLocal();
        return undefined;
      case 'resume':
        driver.resumeAfterReset();
        return undefined;
      case 'broken':
        driver.failAll();
        return undefined;
      case 'chunkIova': {
        const ns = driver.namespaces[msg.ns];
        if (ns !== undefined) ns.chunkIova = new Float64Array(msg.chunkIova);
        return undefined;
      }
      case 'stats':
        return driver.stats().flatMap((s, i): Array<[number, NvmeQueueStats]> => (served(i) ? [[i, s]] : []));
    }
  };
  return { disk, driver, handle };
}
