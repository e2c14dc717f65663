/**
 * QueueWorkers: the worker threads of one disk whose `threads` is above 1. Hardware queue i runs
 * on thread i mod threads; thread 0 is the main thread, threads 1.. are worker_threads started
 * here, each building the same null disk (daemon/null-disk.ts) over the shared page store and
 * serving its queues (daemon/queue-worker.ts).
 *
 * A worker that fails is logged and started again (up to MAX_RESTARTS times); the calls it had
 * pending reject, so the ring operation that needed it fails and the front-end is disconnected
 * with that reason; the next front-end finds a fresh worker. The fds lent to the lost thread
 * are closed once it has exited.
 */
import * as fs from 'fs';
import * as path from 'path';
import type { Logger } from 'pino';
import { processLogFormat, type LogFormat } from './log-format';
import { Worker } from 'worker_threads';
import type { DiskConfig } from '../config/disk-schema';
import { native } from '../native';
import { closeFd } from '../vhost/vring';
import type { MemRegion } from '../virtqueue/guest-memory';
import type { InflightDescription } from '../virtqueue/inflight-region';
import { RemoteQueue } from '../vhost/remote-queue';
import type { QueueThreads } from '../vhost/queue-threads';
import type { RingQueue } from '../virtqueue/ring-queue';
import type { ThreadChannel, ThreadReply, ThreadRequest, ThreadResults } from '../vhost/thread-messages';
import type { NvmeWorkerGroup, NvmeWorkerMessage, NvmeWorkerSetup } from './nvme-thread';

/** What a worker is started with (workerData). */
export interface QueueWorkerData {
  config: DiskConfig;
  /** The PageStore id of a memory-backed disk (the workers share it), else null. */
  storeId: number | null;
  thread: number;
  /** Hardware queue indexes this thread serves. */
  queues: number[];
  logLevel: string;
  /** How log lines look (daemon/log-format.ts); absent: JSON. */
  logFormat?: LogFormat;
  /** driver nvme: the controller's queue pairs (daemon/nvme-thread.ts); the eventfds lent per spawn. */
  nvme?: NvmeWorkerSetup;
  /** The CPU this thread pins itself to (the disk's cpus[thread]); absent: not pinned. */
  cpu?: number;
}

/** The compiled worker script (under ts-jest, this file is .ts: use the build in dist/). */
function workerScript(): string {
  const here = path.join(__dirname, 'queue-worker.js');
  if (fs.existsSync(here)) return here;
  return path.join(__dirname, '..', 'dist', 'daemon', 'queue-worker.js');
}

/** The duplicated fds a request hands over. */
function fdsOf(r: ThreadRequest): number[] {
  switch (r.op) {
    case 'memory':
      return r.fds;
    case 'inflight':
      return [r.fd];
    case 'start':
      return [r.setup.kickFd, r.setup.callFd];
    case 'call':
      return [r.fd];
    default:
      return [];
  }
}

/** Duplicates of `fds`, all or none: when one dup fails, those made are closed. */
function dupAll(fds: readonly number[]): number[] {
  const out: number[] = [];
  try {
    for (const fd of fds) out.push(native.dup(fd));
  } catch (e) {
    for (const fd of out) closeFd(fd);
    throw e;
  }
  return out;
}

/** A worker lost more often than this is not started again (a bug that strikes at once). */
const MAX_RESTARTS = 5;

class WorkerChannel implements ThreadChannel {
  private worker: Worker;
  private nextId = 1;
  private readonly pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  /** fds lent to a worker thread (thread-messages.ts), and to which one. */
  private readonly lentTo = new Map<number, Worker>();
  private stopped: Error | null = null;
  private restarts = 0;
  incarnation = 0;

  constructor(
    readonly thread: number,
    private readonly data: QueueWorkerData,
    private readonly log: Logger,
    private readonly onLost: (error: Error) => void,
    private readonly onDriverMessage: (thread: number, msg: unknown) => void = () => undefined,
  ) {
    this.worker = this.spawn();
  }

  private spawn(): Worker {
    // driver nvme: each incarnation gets its own duplicates of its queue pairs' MSI-X eventfds.
    const nvme = this.data.nvme;
    const lent = nvme === undefined ? [] : dupAll(nvme.eventfds.filter((fd, i) => fd >= 0 && i % this.data.config.threads === this.thread));
    let next = 0;
    const workerData: QueueWorkerData =
      nvme === undefined ? this.data : { ...this.data, nvme: { ...nvme, eventfds: nvme.eventfds.map((fd, i) => (fd >= 0 && i % this.data.config.threads === this.thread ? (lent[next++] as number) : -1)) } };
    const w = new Worker(workerScript(), { workerData, stdout: false, stderr: false });
    for (const fd of lent) this.lentTo.set(fd, w);
    // Once the thread is gone, nothing uses what it was lent: close it (thread-messages.ts).
    w.on('exit', () => {
      for (const [fd, to] of this.lentTo) {
        if (to !== w) continue;
        this.lentTo.delete(fd);
        closeFd(fd);
      }
    });
    w.on('message', (r: ThreadReply | { driver: unknown }) => {
      if ('driver' in r) {
        if (w === this.worker) this.onDriverMessage(this.thread, r.driver);
        return;
      }
      const p = this.pending.get(r.id);
      if (p === undefined) return;
      this.pending.delete(r.id);
      if (r.ok) p.resolve(r.value);
      else p.reject(new Error(`worker thread ${this.thread}: ${r.error}`));
    });
    w.on('error', (e) => this.lost(w, `failed: ${e.message}`));
    w.on('exit', (code) => this.lost(w, `exited (code ${code})`));
    return w;
  }

  /**
   * Sends `request`, lending the worker the fds it carries: closed by giveBack(), or when this
   * worker thread exits (at once if there is no worker any more).
   */
  call<R extends ThreadRequest>(request: R): Promise<ThreadResults[R['op']]> {
    if (this.stopped !== null) {
      for (const fd of fdsOf(request)) closeFd(fd);
      return Promise.reject(this.stopped);
    }
    for (const fd of fdsOf(request)) if (fd >= 0) this.lentTo.set(fd, this.worker);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.worker.postMessage({ id, ...request });
    });
  }

  giveBack(fds: readonly number[]): void {
    for (const fd of fds) {
      if (!this.lentTo.delete(fd)) continue; // -1, or closed when its worker exited
      closeFd(fd);
    }
  }

  async terminate(): Promise<void> {
    this.stopped ??= new Error(`worker thread ${this.thread} stopped`);
    await this.worker.terminate();
  }

  /**
   * The worker is gone: what was asked of it fails (the front-end using its rings is then
   * disconnected), and a fresh worker takes its place for the next front-end.
   */
  private lost(w: Worker, how: string): void {
    if (w !== this.worker || this.stopped !== null) return;
    const e = new Error(`worker thread ${this.thread} ${how}`);
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
    this.incarnation++;
    this.onLost(e);
    if (this.restarts >= MAX_RESTARTS) {
      this.stopped = e;
      this.log.error({ thread: this.thread, err: e }, `queue worker thread lost ${this.restarts + 1} times: not restarted; its rings cannot start`);
      return;
    }
    this.restarts++;
    this.log.error({ thread: this.thread, err: e }, 'queue worker thread lost: its rings stop; restarting it');
    try {
      this.worker = this.spawn();
    } catch (err) {
      // driver nvme: its eventfds could not be duplicated (e.g. out of fds): not restarted.
      this.stopped = err as Error;
      this.log.error({ thread: this.thread, err }, 'queue worker thread cannot be started again; its rings cannot start');
    }
  }
}

export class QueueWorkers implements QueueThreads, NvmeWorkerGroup {
  /** Channels to threads 1..threads-1 (index t - 1). */
  private readonly channels: WorkerChannel[] = [];
  private lostHandler: (error: Error) => void = () => undefined;
  private driverLostHandler: (error: Error) => void = () => undefined;
  private driverMessageHandler: (thread: number, msg: unknown) => void = () => undefined;

  /** Starts `config.threads - 1` worker threads (driver nvme: serving the queue pairs of `nvme`). */
  constructor(
    private readonly config: DiskConfig,
    storeId: number | null,
    log: Logger,
    nvme?: NvmeWorkerSetup,
  ) {
    for (let t = 1; t < config.threads; t++) {
      const queues: number[] = [];
      for (let q = t; q < config.num_queues; q += config.threads) queues.push(q);
      const cpu = config.cpus.length > t ? config.cpus[t] : undefined;
      const data = { config, storeId, thread: t, queues, logLevel: log.level, logFormat: processLogFormat(), nvme, cpu };
      this.channels.push(
        new WorkerChannel(
          t,
          data,
          log,
          (e) => {
            this.lostHandler(e);
            this.driverLostHandler(e);
          },
          (thread, msg) => this.driverMessageHandler(thread, msg),
        ),
      );
    }
  }

  /** Sends `msg` to every worker's driver; resolves with each answer (undefined from a worker that failed it or was lost). */
  async driverCall(msg: NvmeWorkerMessage): Promise<unknown[]> {
    const r = await Promise.allSettled(this.channels.map((c) => c.call({ op: 'driver', msg })));
    return r.map((x) => (x.status === 'fulfilled' ? x.value : undefined));
  }

  onDriverMessage(handler: (thread: number, msg: unknown) => void): void {
    this.driverMessageHandler = handler;
  }

  onDriverLost(handler: (error: Error) => void): void {
    this.driverLostHandler = handler;
  }

  remoteQueue(index: number): RingQueue | null {
    const t = index % this.config.threads;
    return t === 0 ? null : new RemoteQueue(index, this.channels[t - 1]);
  }

  /** @throws (rejects) SyscallError when an fd cannot be duplicated; the worker's error otherwise. */
  async mapMemory(regions: readonly MemRegion[], fds: readonly number[]): Promise<void> {
    await Promise.all(
      this.channels.map(async (c) => {
        const dups = dupAll(fds);
        try {
          await c.call({ op: 'memory', regions: [...regions], fds: dups });
        } finally {
          c.giveBack(dups); // mapped (or refused): the worker needs them no more
        }
      }),
    );
  }

  /** @throws (rejects) SyscallError when the fd cannot be duplicated; the worker's error otherwise. */
  async mapInflight(fd: number, description: InflightDescription): Promise<void> {
    await Promise.all(
      this.channels.map(async (c) => {
        const [dup] = dupAll([fd]);
        try {
          await c.call({ op: 'inflight', fd: dup, description });
        } finally {
          c.giveBack([dup]); // mapped (or refused): the worker needs it no more
        }
      }),
    );
  }

  async releaseInflight(): Promise<void> {
    await Promise.all(this.channels.map((c) => c.call({ op: 'releaseInflight' })));
  }

  async releaseMemory(): Promise<void> {
    await Promise.all(this.channels.map((c) => c.call({ op: 'release' })));
  }

  onLost(handler: (error: Error) => void): void {
    this.lostHandler = handler;
  }

  /** Bad block ranges changed at run time (management API): every worker takes the new list. */
  async setBadBlocks(ranges: Array<[number, number]>): Promise<void> {
    await Promise.all(this.channels.map((c) => c.call({ op: 'badblocks', ranges })));
  }

  async close(): Promise<void> {
    await Promise.all(this.channels.map((c) => c.terminate()));
  }
}
