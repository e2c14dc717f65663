/**
 * QueueWorkers: the worker threads of one disk whose `threads` is above 1. Hardware queue i runs
 * on thread i mod threads; thread 0 is the main thread, threads 1.. are worker_threads started
 * here, each building the same null disk (daemon/null-disk.ts) over the shared page store and
 * serving its queues (daemon/queue-worker.ts).
 *
 * A worker that fails is logged; its pending and later calls reject, so the ring operation
 * that needed it fails and the front-end is disconnected with that reason.
 */
import * as fs from 'fs';
import * as path from 'path';
import type { Logger } from 'pino';
import { Worker } from 'worker_threads';
import type { DiskConfig } from '../config/disk-schema';
import { native } from '../native';
import type { MemRegion } from '../vhost/message';
import { RemoteQueue } from '../vhost/remote-queue';
import type { QueueThreads, RingQueue } from '../vhost/ring-queue';
import type { ThreadChannel, ThreadReply, ThreadRequest, ThreadResults } from '../vhost/thread-messages';

/** What a worker is started with (workerData). */
export interface QueueWorkerData {
  config: DiskConfig;
  /** The SharedPageStore id of a memory-backed disk, else null. */
  storeId: number | null;
  thread: number;
  /** Hardware queue indexes this thread serves. */
  queues: number[];
  logLevel: string;
}

/** The compiled worker script (under ts-jest, this file is .ts: use the build in dist/). */
function workerScript(): string {
  const here = path.join(__dirname, 'queue-worker.js');
  if (fs.existsSync(here)) return here;
  return path.join(__dirname, '..', '..', 'dist', 'daemon', 'queue-worker.js');
}

class WorkerChannel implements ThreadChannel {
  private readonly worker: Worker;
  private nextId = 1;
  private readonly pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private gone: Error | null = null;

  constructor(
    readonly thread: number,
    data: QueueWorkerData,
    private readonly log: Logger,
  ) {
    this.worker = new Worker(workerScript(), { workerData: data, stdout: false, stderr: false });
    this.worker.on('message', (r: ThreadReply) => {
      const p = this.pending.get(r.id);
      if (p === undefined) return;
      this.pending.delete(r.id);
      if (r.ok) p.resolve(r.value);
      else p.reject(new Error(`worker thread ${thread}: ${r.error}`));
    });
    this.worker.on('error', (e) => this.fail(new Error(`worker thread ${thread} failed: ${e.message}`)));
    this.worker.on('exit', (code) => this.fail(new Error(`worker thread ${thread} exited (code ${code})`)));
  }

  call<R extends ThreadRequest>(request: R): Promise<ThreadResults[R['op']]> {
    if (this.gone !== null) return Promise.reject(this.gone);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.worker.postMessage({ id, ...request });
    });
  }

  async terminate(): Promise<void> {
    this.gone ??= new Error(`worker thread ${this.thread} stopped`);
    await this.worker.terminate();
  }

  private fail(e: Error): void {
    if (this.gone === null) this.log.error({ thread: this.thread, err: e }, 'queue worker thread lost; its rings stop');
    this.gone ??= e;
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
  }
}

export class QueueWorkers implements QueueThreads {
  /** Channels to threads 1..threads-1 (index t - 1). */
  private readonly channels: WorkerChannel[] = [];

  /** Starts `config.threads - 1` worker threads. */
  constructor(
    private readonly config: DiskConfig,
    storeId: number | null,
    private readonly log: Logger,
  ) {
    for (let t = 1; t < config.threads; t++) {
      const queues: number[] = [];
      for (let q = t; q < config.num_queues; q += config.threads) queues.push(q);
      this.channels.push(new WorkerChannel(t, { config, storeId, thread: t, queues, logLevel: log.level }, log));
    }
  }

  remoteQueue(index: number): RingQueue | null {
    const t = index % this.config.threads;
    return t === 0 ? null : new RemoteQueue(index, this.channels[t - 1], this.log);
  }

  async mapMemory(regions: readonly MemRegion[], fds: readonly number[]): Promise<void> {
    await Promise.all(this.channels.map((c) => c.call({ op: 'memory', regions: [...regions], fds: fds.map((fd) => native.dup(fd)) })));
  }

  async releaseMemory(): Promise<void> {
    await Promise.all(this.channels.map((c) => c.call({ op: 'release' })));
  }

  /** Bad block ranges changed at run time (management API): every worker takes the new list. */
  async setBadBlocks(ranges: Array<[number, number]>): Promise<void> {
    await Promise.all(this.channels.map((c) => c.call({ op: 'badblocks', ranges })));
  }

  async close(): Promise<void> {
    await Promise.all(this.channels.map((c) => c.terminate()));
  }
}
