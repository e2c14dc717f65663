/**
 * RemoteQueue: the main thread's stand-in for a virtqueue served on a worker thread. Each ring
 * operation becomes a message (thread-messages.ts); the worker's VirtioBlkQueue does the work.
 * Messages to one worker are delivered in order, so an enable after a start finds the ring
 * started. Kick and call eventfds are duplicated for the worker (it owns and closes its copies).
 */
import type { Logger } from 'pino';
import { native } from '../native';
import type { VringSetup } from '../virtqueue/blk-queue';
import type { QueueSnapshot, RingQueue } from './ring-queue';
import type { ThreadChannel } from './thread-messages';

export class RemoteQueue implements RingQueue {
  private running = false;
  /** The channel's incarnation the ring was started on. */
  private startedOn = -1;

  constructor(
    readonly index: number,
    private readonly channel: ThreadChannel,
    private readonly log: Logger,
  ) {}

  get isRunning(): boolean {
    return this.running;
  }

  /** @throws Error with the worker's reason when it cannot start the ring. */
  async start(setup: VringSetup, enabled: boolean): Promise<void> {
    const kickFd = native.dup(setup.kickFd);
    const callFd = setup.callFd >= 0 ? native.dup(setup.callFd) : -1;
    const { memory: _memory, ...rest } = setup;
    this.running = true;
    this.startedOn = this.channel.incarnation;
    try {
      await this.channel.call({ op: 'start', queue: this.index, setup: { ...rest, kickFd, callFd }, enabled });
    } catch (e) {
      this.running = false;
      throw e;
    }
  }

  setEnabled(enabled: boolean): void {
    if (this.running) this.send(this.channel.call({ op: 'enable', queue: this.index, enabled }));
  }

  setCallFd(fd: number): void {
    if (this.running) this.send(this.channel.call({ op: 'call', queue: this.index, fd: fd >= 0 ? native.dup(fd) : -1 }));
  }

  /** Rejects if the worker cannot stop the ring (or is gone); the ring counts as stopped then. */
  async stop(): Promise<number> {
    if (this.startedOn !== this.channel.incarnation) {
      this.running = false;
      throw new Error(`worker thread ${this.channel.thread} was lost while ring ${this.index} ran: its position is unknown`);
    }
    try {
      return await this.channel.call({ op: 'stop', queue: this.index });
    } finally {
      this.running = false;
    }
  }

  snapshot(): Promise<QueueSnapshot> {
    return this.channel.call({ op: 'snapshot', queue: this.index });
  }

  /** Messages nobody awaits: a failure is logged (the worker has logged its side). */
  private send(p: Promise<unknown>): void {
    p.catch((e: unknown) => this.log.error({ queue: this.index, thread: this.channel.thread, err: e }, 'worker thread refused a ring operation'));
  }
}
