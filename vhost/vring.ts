/**
 * Vring: what the front-end told us about one virtqueue (SET_VRING_NUM/ADDR/BASE/KICK/CALL/
 * ERR/ENABLE), and the queue that serves it once started. Owns the eventfds it holds.
 */
import { native } from '../native';
import type { VringAddr } from './message';
import type { RingQueue } from '../virtqueue/ring-queue';

export class Vring {
  num = 0;
  addr: VringAddr | null = null;
  /** Next avail index (SET_VRING_BASE; updated by GET_VRING_BASE). */
  base = 0;
  kickFd = -1;
  callFd = -1;
  errFd = -1;
  /** SET_VRING_ENABLE state (used when VHOST_USER_F_PROTOCOL_FEATURES was negotiated). */
  enabled = false;

  constructor(
    readonly index: number,
    readonly queue: RingQueue,
  ) {}

  setKickFd(fd: number): void {
    closeFd(this.kickFd);
    this.kickFd = fd;
  }

  /** SET_VRING_CALL: the queue switches to `fd` (a worker thread acknowledges), then the old fd is closed. */
  async setCallFd(fd: number): Promise<void> {
    const old = this.callFd;
    this.callFd = fd;
    try {
      await this.queue.setCallFd(fd);
    } finally {
      closeFd(old); // a worker that refused holds its own duplicate
    }
  }

  setErrFd(fd: number): void {
    closeFd(this.errFd);
    this.errFd = fd;
  }

  /** Closes the eventfds once the queue has stopped (after GET_VRING_BASE or a disconnect). */
  closeFds(): void {
    this.setKickFd(-1);
    closeFd(this.callFd);
    this.callFd = -1;
    this.setErrFd(-1);
  }

  /** Forgets everything the front-end said (a new connection). */
  reset(): void {
    this.closeFds();
    this.num = 0;
    this.addr = null;
    this.base = 0;
    this.enabled = false;
  }
}

export function closeFd(fd: number): void {
  if (fd >= 0) native.close(fd);
}
