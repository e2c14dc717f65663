/**
 * RingQueue: what the vhost-user device needs from the queue that serves one virtqueue, whether
 * it runs on this thread (VirtioBlkQueue) or on a worker thread (vhost/RemoteQueue).
 */
import type { GuestMemoryMap } from './guest-memory';
import type { InflightRegion } from './inflight-region';

/** What a queue needs to serve one split virtqueue: the mapped memory, the ring's guest-physical
 * addresses (virtio 1.2 2.7), its size in descriptors, the negotiated ring features and fds. */
export interface VringSetup {
  memory: GuestMemoryMap;
  /** Ring size in descriptors. */
  size: number;
  descAddr: number;
  availAddr: number;
  usedAddr: number;
  lastAvailIdx: number;
  eventIdx: boolean;
  indirect: boolean;
  kickFd: number;
  callFd: number;
  /** Busy-poll limit after a batch, in microseconds (0: none). */
  pollUs: number;
  /**
   * The inflight region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) that tracks this queue's requests
   * in its block `index`, recovered when the ring starts; absent or null: not tracked.
   */
  inflight?: InflightRegion | null;
}

/** A queue's counters and native ring state (management API `rnull ctl stats`). */
export interface QueueSnapshot {
  running: boolean;
  /** 0: the main thread; n: worker thread n. */
  thread: number;
  requests: number;
  failedRequests: number;
  badChains: number;
  batches: number;
  /** Requests owned by the driver (refcount >= 1). */
  inFlight: number;
  broken: boolean;
  calls: number;
  spins: number;
  spinHits: number;
  /** Polling spins ended early for another virtqueue of the same thread. */
  spinYields: number;
  pollNs: number;
}

export interface RingQueue {
  readonly index: number;
  readonly isRunning: boolean;
  /**
   * Starts serving the ring (vhost-user.rst "Ring states"). Takes no ownership of the setup's
   * kick/call fds. @throws (or rejects with) RangeError for a ring the queue cannot serve.
   */
  start(setup: VringSetup, enabled: boolean): void | Promise<void>;
  /** SET_VRING_ENABLE: in effect once this returns (or resolves). */
  setEnabled(enabled: boolean): void | Promise<void>;
  /**
   * SET_VRING_CALL on a running ring: once this returns (or resolves), completions signal
   * `fd` and the caller may close the previous one.
   */
  setCallFd(fd: number): void | Promise<void>;
  /** GET_VRING_BASE: resolves with the next avail index once nothing is in flight. */
  stop(): Promise<number>;
  snapshot(): QueueSnapshot | Promise<QueueSnapshot>;
}
