/**
 * Bring-up and shutdown of one NVMe controller owned through VFIO (NVM Express Base 1.4, 7.6.1
 * "Initialization", 7.6.2 "Shutdown"), and the command queues (admin and I/O) with their
 * completion mode: MSI-X eventfd per queue, or polling.
 *
 * Bring-up order, each wait bounded by CAP.TO:
 *  1. BAR0 mapped, bus mastering on; CAP and VS read.
 *  2. A controller found enabled is disabled (waiting for RDY=1 or CFS first, then CC.EN=0 and
 *     RDY=0); one found with EN=0 but RDY=1 is waited for.
 *  3. Admin queues in DMA memory: AQA, ASQ, ACQ.
 *  4. MSI-X vectors wired to eventfds BEFORE CC.EN: QEMU 7.2's emulated controller only counts
 *     the admin queue's vector as in use if MSI-X was on when the controller was enabled, and
 *     never interrupts for admin completions otherwise.
 *  5. CC (NVM command set, 4 KiB pages, 64/16-byte entries) with EN=1; wait RDY=1.
 *  6. Identify Controller; Set Features Number of Queues (the smaller granted SQ/CQ count is
 *     used).
 * I/O queue pairs are then created on demand (completion queue first). Shadow doorbells
 * (enableShadowDoorbells, when Identify's OACS offers Doorbell Buffer Config) are set up after
 * the I/O queues exist and again after every reset.
 */
import { native } from '../../native/index';
import { enableBusMaster, openVfioDevice, vfioConstants, vfioFence, type IommuInfo, type NativeVfioDevice } from '../../native/vfio';
import {
  CQE_SIZE,
  IdentifyCns,
  NvmeStatusError,
  SQE_SIZE,
  createIoCq,
  createIoSq,
  deleteIoCq,
  deleteIoSq,
  doorbellBufferConfig,
  grantedQueues,
  identify,
  setNumberOfQueues,
  type CommandFields,
  type Completion,
} from './command';
import {
  IDENTIFY_SIZE,
  OACS_DOORBELL_BUFFER_CONFIG,
  parseIdentifyController,
  parseIdentifyNamespace,
  parseNamespaceList,
  type IdentifyController,
  type IdentifyNamespace,
} from './identify';
import { IovaAllocator } from './iova';
import { QueuePair } from './queue';
import { DOORBELL_BUFFER_BYTES, DoorbellBuffer, type ShadowDoorbell } from './shadow-doorbell';
import {
  CC_EN,
  CC_SHN_MASK,
  CC_SHN_NORMAL,
  Reg,
  SHST_COMPLETE,
  cqHeadDoorbell,
  decodeCap,
  decodeCsts,
  decodeVersion,
  encodeAqa,
  encodeCc,
  sqTailDoorbell,
  type Capabilities,
  type RegisterIo,
} from './registers';

export type LogFn = (level: 'info' | 'warn' | 'error', msg: string) => void;

/** Memory page size the driver uses (CC.MPS): 4 KiB, the host page on x86-64. */
export const NVME_PAGE = 4096;

/** A block of DMA memory mapped for the device. */
export interface DmaRegion {
  /** IOVA of the first byte. */
  iova: number;
  /** Bytes, a multiple of the page size. */
  size: number;
  /** The memory, for the CPU. */
  bytes: Uint8Array;
  /** The native block id. */
  readonly id: number;
  /** Process-wide share id (worker threads view the block by it), when the device has one. */
  readonly share?: number;
}

/** DMA memory for one device: page-aligned blocks mapped at IOVAs from an allocator. */
export class DmaSpace {
  private readonly regions = new Set<DmaRegion>();
  constructor(
    private readonly dev: NativeVfioDevice,
    readonly iova: IovaAllocator,
  ) {}

  /** Allocates and maps `size` bytes (rounded up to whole pages), zeroed. */
  alloc(size: number): DmaRegion {
    const page = vfioConstants.PAGE_SIZE;
    const bytes = Math.ceil(size / page) * page;
    const a = this.dev.dmaAlloc(bytes);
    let iova: number;
    try {
      iova = this.iova.alloc(bytes);
    } catch (err) {
      this.dev.dmaFree(a.id);
      throw err;
    }
    try {
      this.dev.dmaMap(a.id, iova);
    } catch (err) {
      this.iova.release(iova);
      this.dev.dmaFree(a.id);
      throw err;
    }
    const r: DmaRegion = { id: a.id, share: a.share, iova, size: bytes, bytes: new Uint8Array(a.buffer) };
    this.regions.add(r);
    return r;
  }

  /** Unmaps and frees a region; its `bytes` become empty. */
  free(r: DmaRegion): void {
    if (!this.regions.delete(r)) return;
    this.dev.dmaFree(r.id);
    this.iova.release(r.iova);
  }

  freeAll(): void {
    for (const r of [...this.regions]) this.free(r);
  }
}

/** How a queue learns about completions. */
export type CompletionMode = 'interrupt' | 'poll';

interface Pending {
  what: string;
  resolve: (c: Completion) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout | undefined;
}

/**
 * A queue pair plus its completion source: the MSI-X eventfd of its vector (watched on the
 * event loop) or a setImmediate poll loop that runs while commands are in flight. execute()
 * resolves with the completion or rejects with NvmeStatusError / a timeout Error.
 */
export class CommandQueue {
  /** Wake-ups by the eventfd (interrupt mode). */
  interrupts = 0;
  /** Completions found by the poll loop (poll mode). */
  polledCompletions = 0;
  private watcher: { start(): void; stop(): void } | undefined;
  private polling = false;
  private closed = false;

  constructor(
    readonly qp: QueuePair<Pending>,
    readonly mode: CompletionMode,
    readonly ring: { sq: DmaRegion; cq: DmaRegion },
    eventfd: number | undefined,
    private readonly log: LogFn,
  ) {
    if (mode === 'interrupt') {
      if (eventfd === undefined) throw new Error(`queue ${qp.qid}: interrupt mode needs an eventfd`);
      this.watcher = new native.FdWatcher(eventfd, () => this.onInterrupt(), true);
      this.watcher.start();
    }
  }

  get qid(): number {
    return this.qp.qid;
  }

  /** Submits one command, rings the doorbell and waits (at most timeoutMs) for its completion. */
  execute(fields: CommandFields, what: string, timeoutMs: number): Promise<Completion> {
    if (this.closed) return Promise.reject(new Error(`queue ${this.qid} is closed`));
    return new Promise<Completion>((resolve, reject) => {
      const p: Pending = { what, resolve, reject, timer: undefined };
      const cid = this.qp.submit(fields, p);
      if (cid < 0) {
        reject(new Error(`${what}: queue ${this.qid} is full`));
        return;
      }
      p.timer = setTimeout(() => {
        if (this.qp.abandon(cid) !== undefined) {
          reject(new Error(`${what} (queue ${this.qid}, cid 0x${cid.toString(16)}) timed out after ${timeoutMs} ms`));
        }
      }, timeoutMs);
      this.qp.commit();
      if (this.mode === 'poll') this.startPolling();
    });
  }

  /** Handles whatever completions are there now. Returns how many entries were consumed. */
  reap(): number {
    let total = 0;
    for (;;) {
      const n = this.qp.poll(finish);
      total += n;
      if (n === 0) return total;
    }
  }

  /** Fails every command in flight (their completions, if any come, are dropped as stale). */
  failOutstanding(why: string): void {
    for (const { cid, ctx } of this.qp.outstanding()) {
      this.qp.abandon(cid);
      clearTimeout(ctx.timer);
      ctx.reject(new Error(`${ctx.what}: ${why}`));
    }
  }

  /** Stops the completion source and fails what is in flight. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.watcher?.stop();
    this.watcher = undefined;
    for (const { cid, ctx } of this.qp.outstanding()) {
      this.qp.abandon(cid);
      clearTimeout(ctx.timer);
      ctx.reject(new Error(`${ctx.what}: queue ${this.qid} closed`));
    }
  }

  private onInterrupt(): void {
    this.interrupts++;
    this.reap();
  }

  private startPolling(): void {
    if (this.polling) return;
    this.polling = true;
    const tick = (): void => {
      if (this.closed) {
        this.polling = false;
        return;
      }
      this.polledCompletions += this.reap();
      if (this.qp.inFlight > 0) setImmediate(tick);
      else this.polling = false;
    };
    setImmediate(tick);
    void this.log;
  }
}

function finish(p: Pending, c: Completion): void {
  clearTimeout(p.timer);
  if (c.status !== 0) p.reject(new NvmeStatusError(p.what, c.status));
  else p.resolve(c);
}

/** A bare I/O queue pair (createIoQueuePair). */
export interface IoQueuePair<T> {
  qp: QueuePair<T>;
  /** The MSI-X eventfd of its vector (interrupt mode), else undefined. */
  eventfd: number | undefined;
  ring: { sq: DmaRegion; cq: DmaRegion };
}

export interface NvmeControllerOptions {
  /** PCI address, e.g. 0000:00:04.0 (bound to vfio-pci). */
  bdf: string;
  /** Admin queue slots (default 32). */
  adminEntries?: number;
  /** I/O queue pairs to ask for in Set Features Number of Queues (default 1). */
  ioQueues?: number;
  /** Wire MSI-X vectors (1 + ioQueues) to eventfds and complete admin commands by interrupt (default true). */
  interrupts?: boolean;
  /** Bound for each admin command, ms (default 10 000). */
  adminTimeoutMs?: number;
  log?: LogFn;
  /** sysfs root (tests). */
  sysfs?: string;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export class NvmeController {
  readonly cap: Capabilities;
  readonly version: string;
  readonly iommu: IommuInfo;
  /** Milliseconds each bring-up step took. */
  readonly timings: Record<string, number> = {};
  /** Set during bring-up. */
  identity!: IdentifyController;
  /** min(granted SQs, granted CQs) from Number of Queues. */
  grantedIoQueues = 0;
  /** Whether the controller was found enabled (and disabled first). */
  foundEnabled = false;
  admin!: CommandQueue;
  readonly dma: DmaSpace;
  readonly regs: RegisterIo;
  private readonly eventfds: number[] = [];
  private readonly ioQueues = new Map<number, CommandQueue>();
  private readonly rawQueues = new Map<number, IoQueuePair<unknown>>();
  private identifyBuf!: DmaRegion;
  /** The Shadow Doorbell and EventIdx pages, once enableShadowDoorbells allocated them. */
  private dbbuf: { buffer: DoorbellBuffer; shadow: DmaRegion; eventIdx: DmaRegion } | null = null;
  /** The controller accepted Doorbell Buffer Config: I/O queues use shadow doorbells. */
  shadowDoorbells = false;
  private readonly log: LogFn;
  private readonly adminTimeoutMs: number;
  private closed = false;

  private constructor(
    readonly dev: NativeVfioDevice,
    readonly bdf: string,
    opts: NvmeControllerOptions,
  ) {
    this.log = opts.log ?? (() => undefined);
    this.adminTimeoutMs = opts.adminTimeoutMs ?? 10_000;
    dev.mapBar(0);
    this.regs = {
      read32: (off) => dev.read32(0, off),
      write32: (off, v) => dev.write32(0, off, v),
      read64: (off) => BigInt(dev.read32(0, off)) | (BigInt(dev.read32(0, off + 4)) << 32n),
    };
    this.cap = decodeCap(this.regs.read64(Reg.CAP));
    this.version = decodeVersion(this.regs.read32(Reg.VS));
    this.iommu = dev.iommuInfo();
    this.dma = new DmaSpace(dev, new IovaAllocator(this.iommu.ranges, { granule: Math.max(this.iommu.minPageSize, vfioConstants.PAGE_SIZE) }));
  }

  /**
   * Opens the device through VFIO and brings the controller up (steps 1-6 above). On failure
   * everything opened is released and the error is thrown (setup problems as Error with what
   * to do, kernel calls as SyscallError, commands as NvmeStatusError, waits as timeout Errors).
   */
  static async open(opts: NvmeControllerOptions): Promise<NvmeController> {
    const t0 = performance.now();
    const dev = openVfioDevice(opts.bdf, opts.sysfs);
    return NvmeController.attach(dev, opts, performance.now() - t0);
  }

  /**
   * Brings up the controller behind an already open device, which the controller owns from
   * now on (closed on failure too). `open` is this after openVfioDevice; tests pass a fake.
   */
  static async attach(dev: NativeVfioDevice, opts: NvmeControllerOptions, openMs = 0): Promise<NvmeController> {
    let c: NvmeController | undefined;
    try {
      c = new NvmeController(dev, opts.bdf, opts);
      c.timings.vfioOpen = openMs;
      await c.bringUp(opts);
      return c;
    } catch (err) {
      if (c !== undefined) c.close();
      else dev.close();
      throw err;
    }
  }

  private async bringUp(opts: NvmeControllerOptions): Promise<void> {
    const step = async <R>(name: string, f: () => Promise<R> | R): Promise<R> => {
      const t = performance.now();
      const r = await f();
      this.timings[name] = performance.now() - t;
      return r;
    };
    enableBusMaster(this.dev);
    if ((this.cap.css & 1) === 0) throw new Error(`${this.bdf}: the controller does not support the NVM command set (CAP.CSS ${this.cap.css})`);
    if (NVME_PAGE < this.cap.pageSizeMin || NVME_PAGE > this.cap.pageSizeMax) {
      throw new Error(`${this.bdf}: the controller does not support ${NVME_PAGE}-byte pages (CAP.MPSMIN/MAX ${this.cap.pageSizeMin}..${this.cap.pageSizeMax})`);
    }

    await step('disable', () => this.disable());

    const adminEntries = Math.min(opts.adminEntries ?? 32, this.cap.maxQueueEntries, 4096);
    const interrupts = opts.interrupts ?? true;
    const ioWanted = Math.max(1, opts.ioQueues ?? 1);
    await step('adminQueues', () => {
      const sq = this.dma.alloc(adminEntries * SQE_SIZE);
      const cq = this.dma.alloc(adminEntries * CQE_SIZE);
      this.regs.write32(Reg.AQA, encodeAqa(adminEntries, adminEntries));
      this.write64(Reg.ASQ, sq.iova);
      this.write64(Reg.ACQ, cq.iova);
      // MSI-X on before CC.EN (QEMU 7.2 quirk, see the file comment).
      let adminFd: number | undefined;
      if (interrupts) {
        const count = Math.min(1 + ioWanted, this.dev.irqCount(vfioConstants.MSIX_IRQ_INDEX));
        if (count < 1) throw new Error(`${this.bdf}: the device has no MSI-X vectors; use polling`);
        for (let i = 0; i < count; i++) this.eventfds.push(native.eventfd());
        this.dev.setMsix(this.eventfds);
        adminFd = this.eventfds[0];
      }
      this.admin = new CommandQueue(this.queuePair(0, adminEntries, sq, cq), interrupts ? 'interrupt' : 'poll', { sq, cq }, adminFd, this.log);
      this.identifyBuf = this.dma.alloc(IDENTIFY_SIZE);
    });

    await step('enable', async () => {
      const cc = encodeCc({ css: 0, pageSize: NVME_PAGE, ams: 0, sqEntrySize: SQE_SIZE, cqEntrySize: CQE_SIZE });
      this.regs.write32(Reg.CC, cc);
      this.regs.write32(Reg.CC, cc | CC_EN);
      await this.waitReady(true, 'enable');
    });

    await step('identifyController', async () => {
      await this.adminCommand(identify(IdentifyCns.Controller, 0, this.identifyBuf.iova), 'Identify Controller');
      this.identity = parseIdentifyController(this.identifyBuf.bytes);
    });

    await step('numberOfQueues', async () => {
      const c = await this.adminCommand(setNumberOfQueues(ioWanted, ioWanted), 'Set Features Number of Queues');
      const g = grantedQueues(c.dw0);
      this.grantedIoQueues = Math.min(g.sq, g.cq);
    });
    this.log('info', `${this.bdf}: NVMe ${this.version} "${this.identity.model}" serial ${this.identity.serial}, ${this.grantedIoQueues} I/O queue pairs granted`);
  }

  /** Identify Controller's OACS offers Doorbell Buffer Config (shadow doorbells). */
  get offersShadowDoorbells(): boolean {
    return (this.identity.oacs & OACS_DOORBELL_BUFFER_CONFIG) !== 0;
  }

  /** The Shadow Doorbell and EventIdx pages (for worker threads' queue pairs), or null before enableShadowDoorbells. */
  get doorbellBuffer(): { shadow: DmaRegion; eventIdx: DmaRegion; stride: number } | null {
    return this.dbbuf === null ? null : { shadow: this.dbbuf.shadow, eventIdx: this.dbbuf.eventIdx, stride: this.cap.doorbellStride };
  }

  /**
   * Shadow doorbells for the I/O queues (NVMe 1.3, 5.7; shadow-doorbell.ts): allocates the two
   * pages once (shadow values, EventIdx entries "unknown"), writes each existing I/O queue's
   * current SQ tail and CQ head into its shadow entries, sends Doorbell Buffer Config, and from
   * then on every I/O queue (those created later too) publishes through the shadow entries. Call
   * with the I/O queues idle (after creating them). Returns false, using the registers only,
   * when OACS does not offer the command or the controller refuses it (logged); throws only
   * what allocating DMA memory throws.
   */
  async enableShadowDoorbells(): Promise<boolean> {
    if (this.shadowDoorbells) return true;
    if (!this.offersShadowDoorbells) return false;
    if (this.dbbuf === null) {
      const shadow = this.dma.alloc(DOORBELL_BUFFER_BYTES);
      const eventIdx = this.dma.alloc(DOORBELL_BUFFER_BYTES);
      this.dbbuf = { buffer: new DoorbellBuffer(shadow.bytes, eventIdx.bytes, this.cap.doorbellStride, vfioFence), shadow, eventIdx };
    }
    const { buffer, shadow, eventIdx } = this.dbbuf;
    buffer.reset();
    const queues = this.allIoQueuePairs();
    for (const qp of queues) {
      const e = buffer.forQueue(qp.qid);
      e.shadow.setUint32(e.sqOffset, qp.publishedSqTail, true);
      e.shadow.setUint32(e.cqOffset, qp.publishedCqHead, true);
    }
    if (!(await this.sendDoorbellBufferConfig(shadow, eventIdx))) return false;
    for (const qp of queues) qp.setShadow(buffer.forQueue(qp.qid));
    return true;
  }

  /** Doorbell Buffer Config with the two pages; false (logged) if the controller refuses it. */
  private async sendDoorbellBufferConfig(shadow: DmaRegion, eventIdx: DmaRegion): Promise<boolean> {
    try {
      await this.adminCommand(doorbellBufferConfig(shadow.iova, eventIdx.iova), 'Doorbell Buffer Config');
    } catch (err) {
      this.shadowDoorbells = false;
      this.log('warn', `${this.bdf}: ${(err as Error).message}: the I/O queues use the doorbell registers only`);
      return false;
    }
    this.shadowDoorbells = true;
    this.log('info', `${this.bdf}: Doorbell Buffer Config accepted: the I/O queues use shadow doorbells`);
    return true;
  }

  /** Every I/O queue pair (createIoQueue's and createIoQueuePair's). */
  private allIoQueuePairs(): QueuePair<unknown>[] {
    return [...[...this.ioQueues.values()].map((q) => q.qp as QueuePair<unknown>), ...[...this.rawQueues.values()].map((q) => q.qp)];
  }

  /** Queue `qid`'s shadow doorbell entries while shadow doorbells are on (I/O queues only), else null. */
  private shadowFor(qid: number): ShadowDoorbell | null {
    return this.shadowDoorbells && qid > 0 && this.dbbuf !== null ? this.dbbuf.buffer.forQueue(qid) : null;
  }

  /** Bytes of the largest transfer one command may carry (MDTS), or Infinity if unlimited. */
  get maxTransferBytes(): number {
    return this.identity.mdts === 0 ? Infinity : 2 ** this.identity.mdts * this.cap.pageSizeMin;
  }

  /** MSI-X vectors wired to eventfds (0 when polling). */
  get vectors(): number {
    return this.eventfds.length;
  }

  /** CSTS now. */
  status(): ReturnType<typeof decodeCsts> {
    return decodeCsts(this.regs.read32(Reg.CSTS));
  }

  /** Runs one admin command (bounded by adminTimeoutMs). */
  adminCommand(fields: CommandFields, what: string): Promise<Completion> {
    return this.admin.execute(fields, what, this.adminTimeoutMs);
  }

  /** Identify Namespace `nsid`. */
  async identifyNamespace(nsid: number): Promise<IdentifyNamespace> {
    await this.adminCommand(identify(IdentifyCns.Namespace, nsid, this.identifyBuf.iova), `Identify Namespace ${nsid}`);
    return parseIdentifyNamespace(this.identifyBuf.bytes);
  }

  /** Active namespace IDs (Identify CNS 02h from NSID 0). */
  async activeNamespaces(): Promise<number[]> {
    await this.adminCommand(identify(IdentifyCns.ActiveNamespaceList, 0, this.identifyBuf.iova), 'Identify Active Namespace List');
    return parseNamespaceList(this.identifyBuf.bytes);
  }

  /**
   * Creates I/O queue pair `qid` (1..grantedIoQueues) with `entries` slots (≤ CAP.MQES+1):
   * Create I/O CQ, then Create I/O SQ. 'interrupt' uses MSI-X vector `qid`, which must have
   * been wired at open (interrupts on, qid < vectors).
   */
  async createIoQueue(qid: number, entries: number, mode: CompletionMode): Promise<CommandQueue> {
    if (this.ioQueues.has(qid)) throw new Error(`I/O queue ${qid} exists already`);
    const { sq, cq } = await this.createQueues(qid, entries, mode);
    const q = new CommandQueue(this.queuePair(qid, entries, sq, cq), mode, { sq, cq }, mode === 'interrupt' ? this.eventfds[qid] : undefined, this.log);
    this.ioQueues.set(qid, q);
    return q;
  }

  /**
   * createIoQueue for a driver's data path: the bare queue pair (contexts of type T, completions
   * reaped by the caller), its MSI-X eventfd in interrupt mode, and its ring memory. Deleted by
   * deleteIoQueue(qid) or shutdown.
   */
  async createIoQueuePair<T>(qid: number, entries: number, mode: CompletionMode): Promise<IoQueuePair<T>> {
    if (this.ioQueues.has(qid) || this.rawQueues.has(qid)) throw new Error(`I/O queue ${qid} exists already`);
    const { sq, cq } = await this.createQueues(qid, entries, mode);
    const q: IoQueuePair<T> = { qp: this.queuePair<T>(qid, entries, sq, cq), eventfd: mode === 'interrupt' ? this.eventfds[qid] : undefined, ring: { sq, cq } };
    this.rawQueues.set(qid, q as IoQueuePair<unknown>);
    return q;
  }

  /** Create I/O CQ then SQ `qid`, in fresh DMA memory. */
  private async createQueues(qid: number, entries: number, mode: CompletionMode): Promise<{ sq: DmaRegion; cq: DmaRegion }> {
    if (!Number.isInteger(qid) || qid < 1 || qid > this.grantedIoQueues) throw new RangeError(`I/O queue id ${qid} not in 1..${this.grantedIoQueues}`);
    if (!Number.isInteger(entries) || entries < 2 || entries > Math.min(this.cap.maxQueueEntries, 4097)) {
      throw new RangeError(`I/O queue size ${entries} not in 2..${Math.min(this.cap.maxQueueEntries, 4097)}`);
    }
    if (mode === 'interrupt' && qid >= this.eventfds.length) throw new Error(`no MSI-X vector ${qid} wired (${this.eventfds.length} vectors)`);
    // Shadow doorbells on: the controller reads this queue's entries from its creation (a queue
    // of the same qid before may have left values there).
    if (this.shadowDoorbells && this.dbbuf !== null) this.dbbuf.buffer.resetQueue(qid);
    const sq = this.dma.alloc(entries * SQE_SIZE);
    const cq = this.dma.alloc(entries * CQE_SIZE);
    try {
      await this.adminCommand(createIoCq(qid, entries, cq.iova, mode === 'interrupt' ? qid : null), `Create I/O CQ ${qid}`);
      try {
        await this.adminCommand(createIoSq(qid, entries, sq.iova, qid), `Create I/O SQ ${qid}`);
      } catch (err) {
        await this.adminCommand(deleteIoCq(qid), `Delete I/O CQ ${qid}`).catch(() => undefined);
        throw err;
      }
    } catch (err) {
      this.dma.free(sq);
      this.dma.free(cq);
      throw err;
    }
    return { sq, cq };
  }

  /**
   * Controller reset (1.4, 7.3.2 "Controller Level Reset"), for the timeout ladder and `rnull
   * ctl`: CC.EN=0 and wait for RDY=0 (bounded by CAP.TO; from then on the controller does no
   * more DMA for the old commands), then `whileDisabled()` (the caller requeues or fails what
   * was outstanding), then the admin queue from empty at the same memory, CC.EN=1, Number of
   * Queues, and every bare I/O queue pair (createIoQueuePair) created again at the same memory
   * and vector. MSI-X stays on throughout (QEMU 7.2 needs it on at CC.EN). Throws if the
   * controller does not come back (gone, fatal, a command failing); it is then unusable.
   */
  async reset(whileDisabled: () => void | Promise<void>): Promise<void> {
    this.admin.failOutstanding('controller reset');
    const cc = this.regs.read32(Reg.CC);
    this.regs.write32(Reg.CC, (cc & ~CC_EN) >>> 0);
    await this.waitReady(false, 'reset: disable');
    // The disabled controller has forgotten the doorbell buffers: nothing from before the reset
    // (shadow values, EventIdx entries) may count once they are given again.
    this.dbbuf?.buffer.reset();
    for (const q of this.rawQueues.values()) q.qp.resetRing(q.ring.cq.bytes);
    await whileDisabled();
    this.admin.qp.resetRing(this.admin.ring.cq.bytes);
    this.write64(Reg.ASQ, this.admin.ring.sq.iova);
    this.write64(Reg.ACQ, this.admin.ring.cq.iova);
    this.regs.write32(Reg.CC, (cc | CC_EN) >>> 0);
    await this.waitReady(true, 'reset: enable');
    const c = await this.adminCommand(setNumberOfQueues(this.grantedIoQueues, this.grantedIoQueues), 'Set Features Number of Queues');
    const g = grantedQueues(c.dw0);
    if (Math.min(g.sq, g.cq) < this.grantedIoQueues) throw new Error(`${this.bdf}: after reset the controller grants ${Math.min(g.sq, g.cq)} I/O queue pairs, fewer than before`);
    for (const [qid, q] of this.rawQueues) {
      await this.adminCommand(createIoCq(qid, q.qp.entries, q.ring.cq.iova, q.eventfd !== undefined ? qid : null), `Create I/O CQ ${qid}`);
      await this.adminCommand(createIoSq(qid, q.qp.entries, q.ring.sq.iova, qid), `Create I/O SQ ${qid}`);
    }
    if (this.shadowDoorbells && this.dbbuf !== null && !(await this.sendDoorbellBufferConfig(this.dbbuf.shadow, this.dbbuf.eventIdx))) {
      // Refused now: the EventIdx entries stay "unknown", so every queue (worker threads' too)
      // still writes the registers; this thread's queues stop using the shadow entries.
      for (const q of this.rawQueues.values()) q.qp.setShadow(null);
    }
    this.resets++;
    this.log('info', `${this.bdf}: controller reset done`);
  }

  /** Controller resets done. */
  resets = 0;

  /** Deletes I/O queue pair `qid` (SQ first, then CQ) and frees its memory. */
  async deleteIoQueue(qid: number): Promise<void> {
    const q = this.ioQueues.get(qid) ?? this.rawQueues.get(qid);
    if (q === undefined) return;
    this.ioQueues.delete(qid);
    this.rawQueues.delete(qid);
    if (q instanceof CommandQueue) q.close();
    try {
      await this.adminCommand(deleteIoSq(qid), `Delete I/O SQ ${qid}`);
      await this.adminCommand(deleteIoCq(qid), `Delete I/O CQ ${qid}`);
    } finally {
      this.dma.free(q.ring.sq);
      this.dma.free(q.ring.cq);
    }
  }

  /**
   * Clean shutdown (1.4, 7.6.2): deletes the I/O queues, sets CC.SHN to normal and waits for
   * CSTS.SHST = complete (bounded by max(RTD3E, 5 s)), then releases everything (close()).
   * Returns the milliseconds the controller took to report completion.
   */
  async shutdown(): Promise<number> {
    try {
      for (const qid of [...this.ioQueues.keys(), ...this.rawQueues.keys()]) {
        await this.deleteIoQueue(qid).catch((err: Error) => this.log('warn', `${this.bdf}: ${err.message}`));
      }
      const t = performance.now();
      const cc = this.regs.read32(Reg.CC);
      this.regs.write32(Reg.CC, ((cc & ~CC_SHN_MASK) | CC_SHN_NORMAL) >>> 0);
      const limit = Math.max(5000, Math.ceil((this.identity?.rtd3e ?? 0) / 1000));
      const deadline = performance.now() + limit;
      for (;;) {
        const s = this.status();
        if (s.allOnes) throw new Error(`${this.bdf}: the controller is gone (CSTS reads all ones) during shutdown`);
        if (s.shutdownStatus === SHST_COMPLETE) break;
        if (performance.now() > deadline) throw new Error(`${this.bdf}: shutdown not complete after ${limit} ms (CSTS.SHST ${s.shutdownStatus})`);
        await sleep(1);
      }
      return performance.now() - t;
    } finally {
      this.close();
    }
  }

  /** Releases the device without a shutdown notification: queues closed, MSI-X off, DMA freed, fds closed. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const q of this.ioQueues.values()) q.close();
    this.ioQueues.clear();
    this.rawQueues.clear();
    this.admin?.close();
    try {
      this.dev.close();
    } finally {
      for (const fd of this.eventfds) native.close(fd);
      this.eventfds.length = 0;
    }
  }

  private queuePair<T = Pending>(qid: number, entries: number, sq: DmaRegion, cq: DmaRegion): QueuePair<T> {
    const stride = this.cap.doorbellStride;
    const sqDb = sqTailDoorbell(qid, stride);
    const cqDb = cqHeadDoorbell(qid, stride);
    return new QueuePair<T>({
      qid,
      entries,
      sq: sq.bytes,
      cq: cq.bytes,
      doorbells: {
        sqTail: (v) => this.dev.write32(0, sqDb, v),
        cqHead: (v) => this.dev.write32(0, cqDb, v),
      },
      onStale: (q, c, reason) => this.log('warn', `${this.bdf}: queue ${q}: dropped completion cid 0x${c.cid.toString(16)} (${reason})`),
      shadow: this.shadowFor(qid),
    });
  }

  private write64(off: number, v: number): void {
    this.regs.write32(off, v % 0x100000000);
    this.regs.write32(off + 4, Math.floor(v / 0x100000000));
  }

  /** Waits until CSTS.RDY = `ready`, bounded by CAP.TO; throws on CFS or all-ones. */
  private async waitReady(ready: boolean, what: string): Promise<void> {
    const limit = Math.max(this.cap.readyTimeoutMs, 500);
    const deadline = performance.now() + limit;
    for (let i = 0; ; i++) {
      const s = this.status();
      if (s.allOnes) throw new Error(`${this.bdf}: ${what}: the controller is gone (CSTS reads all ones)`);
      if (s.ready === ready) return;
      if (s.fatal && ready) throw new Error(`${this.bdf}: ${what}: controller fatal status (CSTS.CFS) while waiting for RDY=1`);
      if (performance.now() > deadline) throw new Error(`${this.bdf}: ${what}: CSTS.RDY did not become ${ready ? 1 : 0} within CAP.TO (${limit} ms)`);
      await sleep(i < 10 ? 0 : 1);
    }
  }

  /** Step 2: leaves the controller disabled (CC.EN=0, CSTS.RDY=0). */
  private async disable(): Promise<void> {
    const cc = this.regs.read32(Reg.CC);
    const s = this.status();
    if (s.allOnes) throw new Error(`${this.bdf}: the controller is gone (CSTS reads all ones)`);
    if ((cc & CC_EN) !== 0) {
      this.foundEnabled = true;
      this.log('info', `${this.bdf}: controller found enabled; disabling it`);
      // EN 1 -> 0 while RDY is still 0 is undefined: let the enable finish (or fail) first.
      if (!s.ready && !s.fatal) {
        await this.waitReady(true, 'wait for the earlier enable').catch((err: Error) => this.log('warn', err.message));
      }
      this.regs.write32(Reg.CC, (cc & ~CC_EN) >>> 0);
    }
    await this.waitReady(false, 'disable');
  }
}
