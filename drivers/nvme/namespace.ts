/**
 * NvmeNamespace: the Operations of one disk served from one namespace of a controller whose I/O
 * queue pairs (NvmeDriver) may be shared with the controller's other namespaces, as the kernel's
 * nvme driver shares one tag set per controller: each disk has its own hardware queues,
 * requests, front-end and guest memory mapping; the commands of every disk go through the same
 * queue pairs and carry the disk's NSID.
 *
 * Per disk here: geometry (block size, capacity), the DMA mapping of its front-end's memory table
 * (each region at its own allocator IOVA, so two front-ends with overlapping guest-physical
 * addresses never share an IOVA; unmapped when the table changes or the front-end goes, which
 * the vhost device does only after the disk's rings stopped, i.e. after every request of the disk
 * ended, i.e. after every command that used the mapping completed), and per hardware queue the
 * progress of each request by tag (NsQueue). The queue pairs, command ids, PRP list pages,
 * bounce buffers, the wait FIFO, the timeout ladder and controller resets are the NvmeDriver's.
 */
import type { HwQueue } from '../../block/hw-queue';
import type { BlkStatus, Operations } from '../../block/operations';
import type { Request } from '../../block/request';
import { MAX_QUEUE_SIZE, type NativeGuestMemory } from '../../native/index';
import { vfioConstants } from '../../native/vfio';
import type { NvmeController } from './controller';
import type { IdentifyNamespace } from './identify';

/** One disk's requests on one hardware queue: progress per request tag. */
export class NsQueue {
  hctx: HwQueue | null = null;
  readonly ref = new Float64Array(MAX_QUEUE_SIZE);
  /** Next logical block to send. */
  readonly lba = new Float64Array(MAX_QUEUE_SIZE);
  /** Bytes still to send (Flush: 1 until sent). */
  readonly left = new Float64Array(MAX_QUEUE_SIZE);
  /** Data cursor: segment index and byte offset in it. */
  readonly seg = new Int32Array(MAX_QUEUE_SIZE);
  readonly off = new Float64Array(MAX_QUEUE_SIZE);
  /** Commands in flight. */
  readonly outstanding = new Int32Array(MAX_QUEUE_SIZE);
  /** A command failed for good (IOERR at the end). */
  readonly failed = new Uint8Array(MAX_QUEUE_SIZE);
  /** A command failed with a status worth retrying (no DNR): the request starts over at its end. */
  readonly retry = new Uint8Array(MAX_QUEUE_SIZE);
  /** In the queue pair's wait FIFO. */
  readonly waiting = new Uint8Array(MAX_QUEUE_SIZE);
  /** An Abort was sent for it. */
  readonly aborted = new Uint8Array(MAX_QUEUE_SIZE);
  /** Times it started over (controller resets and retried statuses). */
  readonly retries = new Uint8Array(MAX_QUEUE_SIZE);
}

/** What the namespace needs of its NvmeDriver (the shared queue pairs). */
export interface NvmeQueueOwner {
  readonly controller: NvmeController;
  readonly log: (level: 'info' | 'warn' | 'error', msg: string) => void;
  attachHctx(ns: NvmeNamespace, hctx: HwQueue): void;
  detachHctx(ns: NvmeNamespace, hctx: HwQueue): void;
  submitRq(ns: NvmeNamespace, rq: Request, isLast: boolean): BlkStatus;
  commitHctx(hctx: HwQueue): void;
  timeoutRq(ns: NvmeNamespace, rq: Request): 'done' | 'reset';
  /** The namespace's chunk IOVAs changed (threads serving its other queues need them). */
  chunkIovaChanged?(ns: NvmeNamespace): void;
}

export class NvmeNamespace implements Operations {
  readonly nsid: number;
  readonly blockSize: number;
  /** log2(blockSize / 512). */
  readonly blockShift: number;
  /** Capacity in logical blocks. */
  readonly blocks: number;
  /** Write Zeroes may deallocate (DLFEAT: deallocated blocks read as zeroes). */
  readonly deallocateZeroes: boolean;
  /** Per hardware queue. */
  readonly queues: NsQueue[] = [];
  /** IOVA of each guest memory chunk's first byte (NaN: none), for the current memory table. */
  chunkIova = new Float64Array(0);
  /** IOVAs where this front-end's guest memory regions are mapped. */
  private guestMaps: number[] = [];
  private memory: NativeGuestMemory | null = null;

  /**
   * @param index this namespace's index among the driver's (0..), stored with each command
   * @param queues hardware queues (the driver's I/O queue pairs)
   */
  constructor(
    private readonly owner: NvmeQueueOwner,
    readonly index: number,
    nsid: number,
    namespace: IdentifyNamespace,
    queues: number,
  ) {
    this.nsid = nsid;
    this.blockSize = namespace.blockSize;
    this.blockShift = Math.log2(this.blockSize / 512);
    this.blocks = namespace.nsze;
    this.deallocateZeroes = namespace.dlfeat === 1;
    for (let i = 0; i < queues; i++) this.queues.push(new NsQueue());
  }

  /** Guest memory of this disk's front-end is mapped for DMA. */
  get mapped(): boolean {
    return this.memory !== null;
  }

  /**
   * Maps every region of the front-end's memory table for DMA (VFIO_IOMMU_MAP_DMA) at IOVAs from
   * the controller's allocator (apart from every other front-end's), and records each chunk's
   * IOVA. Throws (nothing left mapped) if the IOVA space or the memlock limit is exhausted.
   */
  memoryMapped(memory: NativeGuestMemory): void {
    if (this.memory !== null) this.memoryReleased(this.memory);
    const layout = memory.regionLayout();
    const chunks = layout.reduce((n, r) => Math.max(n, r.firstChunk + Math.ceil(r.size / 2 ** 30)), 0);
    const chunkIova = new Float64Array(chunks).fill(NaN);
    const controller = this.owner.controller;
    const dev = controller.dev;
    const alloc = controller.dma.iova;
    const maps: number[] = [];
    try {
      layout.forEach((r, i) => {
        const bytes = Math.ceil((r.hostPageOffset + r.size) / vfioConstants.PAGE_SIZE) * vfioConstants.PAGE_SIZE;
        const iova = alloc.alloc(bytes);
        try {
          dev.dmaMapGuest(memory, i, iova);
        } catch (err) {
          alloc.release(iova);
          throw err;
        }
        maps.push(iova);
        const first = iova + r.hostPageOffset;
        for (let c = 0; c * 2 ** 30 < r.size; c++) chunkIova[r.firstChunk + c] = first + c * 2 ** 30;
      });
    } catch (err) {
      for (const iova of maps) {
        dev.dmaUnmapGuest(iova);
        alloc.release(iova);
      }
      throw new Error(`cannot map guest memory for DMA: ${(err as Error).message}${/ENOMEM|EAGAIN|EPERM/.test((err as Error).message) ? ' (is the memlock limit, ulimit -l, at least the guest memory size?)' : ''}`);
    }
    this.memory = memory;
    this.guestMaps = maps;
    this.chunkIova = chunkIova;
    this.owner.chunkIovaChanged?.(this);
    this.owner.log('info', `namespace ${this.nsid}: guest memory mapped for DMA: ${layout.length} regions, IOVAs ${maps.map((v) => '0x' + v.toString(16)).join(', ')}`);
  }

  /** Unmaps the table's DMA mappings (no request of this disk is in flight: its rings stopped). */
  memoryReleased(memory: NativeGuestMemory): void {
    if (this.memory !== memory) return;
    const controller = this.owner.controller;
    for (const iova of this.guestMaps) {
      try {
        controller.dev.dmaUnmapGuest(iova);
      } catch (err) {
        this.owner.log('warn', `namespace ${this.nsid}: unmapping guest memory at IOVA 0x${iova.toString(16)}: ${(err as Error).message}`);
      }
      controller.dma.iova.release(iova);
    }
    this.guestMaps = [];
    this.chunkIova = new Float64Array(0);
    this.memory = null;
    this.owner.chunkIovaChanged?.(this);
  }

  initHctx(hctx: HwQueue): void {
    hctx.completesAsync = true; // completions come by MSI-X eventfd or poll tick
    this.owner.attachHctx(this, hctx);
  }

  exitHctx(hctx: HwQueue): void {
    this.owner.detachHctx(this, hctx);
  }

  queueRq(rq: Request, isLast: boolean): BlkStatus {
    return this.owner.submitRq(this, rq, isLast);
  }

  commitRqs(hctx: HwQueue): void {
    this.owner.commitHctx(hctx);
  }

  timeout(rq: Request): 'done' | 'reset' {
    return this.owner.timeoutRq(this, rq);
  }
}
