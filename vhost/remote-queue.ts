/**
 * RemoteQueue: the main thread's stand-in for a virtqueue served on a worker thread. Each ring
 * operation becomes a message (thread-messages.ts); the worker's VirtioBlkQueue does the work.
 * Messages to one worker are delivered in order, so an enable after a start finds the ring
 * started. Kick and call eventfds are duplicated and lent to the worker; this queue gives them
 * back (closes them) once the worker is done with them (thread-messages.ts).
 */
import { native } from '../native';
import type { VringSetup } from '../virtqueue/ring-queue';
import type { QueueSnapshot, RingQueue } from '../virtqueue/ring-queue';
import type { ThreadChannel } from './thread-messages';

export class RemoteQueue implements RingQueue {
  private running = false;
  /** The channel's incarnation the ring was started on. */
  private startedOn = -1;
  /** The duplicates lent to the worker for the running ring (-1: none); given back at stop. */
  private kickDup = -1;
  private callDup = -1;

  constructor(
    readonly index: number,
    private readonly channel: ThreadChannel,
  ) {}

  get isRunning(): boolean {
    return this.running;
  }

  /** @throws Error with the worker's reason when it cannot start the ring. */
  async start(setup: VringSetup, enabled: boolean): Promise<void> {
    const kickFd = native.dup(setup.kickFd);
    let callFd = -1;
    try {
      if (setup.callFd >= 0) callFd = native.dup(setup.callFd);
    } catch (e) {
      native.close(kickFd); // nothing was handed over yet
      throw e;
    }
    const { memory: _memory, inflight: _inflight, ...rest } = setup; // the worker maps its own
    // Running from here: a reply that never comes (worker lost) still needs stop() to clean up.
    this.running = true;
    this.startedOn = this.channel.incarnation;
    try {
      await this.channel.call({ op: 'start', queue: this.index, setup: { ...rest, kickFd, callFd }, enabled });
    } catch (e) {
      this.running = false;
      this.channel.giveBack([kickFd, callFd]); // the worker's start is all or nothing
      throw e;
    }
    this.channel.giveBack([this.kickDup, this.callDup]); // a previous run's, if any
    this.kickDup = kickFd;
    this.callDup = callFd;
  }

  /** Resolves once the worker has applied it (REPLY_ACK then means what it says). */
  async setEnabled(enabled: boolean): Promise<void> {
    if (this.running) await this.channel.call({ op: 'enable', queue: this.index, enabled });
  }

  /** Resolves once the worker signals the new fd (it owns a duplicate, and closes its old one). */
  async setCallFd(fd: number): Promise<void> {
    if (!this.running) return;
    const dup = fd >= 0 ? native.dup(fd) : -1;
    try {
      await this.channel.call({ op: 'call', queue: this.index, fd: dup });
    } catch (e) {
      this.channel.giveBack([dup]);
      throw e;
    }
    this.channel.giveBack([this.callDup]); // the worker signals the new one now
    this.callDup = dup;
  }

  /** Rejects if the worker cannot stop the ring (or is gone); the ring counts as stopped then. */
  async stop(): Promise<number> {
    const lent = [this.kickDup, this.callDup];
    this.kickDup = this.callDup = -1;
    if (this.startedOn !== this.channel.incarnation) {
      this.running = false;
      this.channel.giveBack(lent); // closed already when the lost thread exited
      throw new Error(`worker thread ${this.channel.thread} was lost while ring ${this.index} ran: its position is unknown`);
    }
    try {
      const base = await this.channel.call({ op: 'stop', queue: this.index });
      this.channel.giveBack(lent);
      return base;
    } finally {
      // A stop the worker refused leaves its fds lent until the thread exits.
      this.running = false;
    }
  }

  snapshot(): Promise<QueueSnapshot> {
    return this.channel.call({ op: 'snapshot', queue: this.index });
  }
}
