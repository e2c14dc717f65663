/**
 * The messages between the main thread and a queue worker thread (worker_threads postMessage,
 * structured clone). fds are process-wide numbers: each one sent is a duplicate, lent to the
 * worker and still owned by the main thread, which closes it once the worker is done with it
 * (ThreadChannel.giveBack after the reply that ends its use) or once the worker thread has
 * exited. The worker never closes an fd it was sent, so no fd is closed twice or left open,
 * whenever a worker dies.
 * Every request carries an id; the worker answers each with a ThreadReply of the same id.
 */
import type { VringSetup } from '../virtqueue/ring-queue';
import type { MemRegion } from '../virtqueue/guest-memory';
import type { InflightDescription } from '../virtqueue/inflight-region';
import type { QueueSnapshot } from '../virtqueue/ring-queue';

/** A VringSetup without the memory (the worker maps its own), with the worker's own kick/call fds. */
export type RemoteVringSetup = Omit<VringSetup, 'memory' | 'inflight'>;

export type ThreadRequest =
  | { op: 'memory'; regions: MemRegion[]; fds: number[] }
  | { op: 'release' }
  | { op: 'inflight'; fd: number; description: InflightDescription }
  | { op: 'releaseInflight' }
  | { op: 'start'; queue: number; setup: RemoteVringSetup; enabled: boolean }
  | { op: 'enable'; queue: number; enabled: boolean }
  | { op: 'call'; queue: number; fd: number }
  | { op: 'stop'; queue: number }
  | { op: 'snapshot'; queue: number }
  | { op: 'badblocks'; ranges: Array<[number, number]> }
  /** A message for the worker's driver (e.g. daemon/nvme-thread.ts), answered by it. */
  | { op: 'driver'; msg: unknown };

/** What each request resolves with. */
export interface ThreadResults {
  memory: undefined;
  release: undefined;
  inflight: undefined;
  releaseInflight: undefined;
  start: undefined;
  enable: undefined;
  call: undefined;
  stop: number;
  snapshot: QueueSnapshot;
  badblocks: undefined;
  driver: unknown;
}

export type ThreadReply = { id: number; ok: true; value: unknown } | { id: number; ok: false; error: string };

/** One worker thread, as its queues see it. */
export interface ThreadChannel {
  readonly thread: number;
  /** Bumped each time the worker is replaced after being lost: a ring started before is gone. */
  readonly incarnation: number;
  /**
   * Sends `request`, lending the worker the fds it carries (see above). Rejects with the
   * worker's error message, or when the worker is gone.
   */
  call<R extends ThreadRequest>(request: R): Promise<ThreadResults[R['op']]>;
  /**
   * The worker is done with these lent fds: they are closed now (those of a worker that has
   * exited meanwhile were closed then; -1 is ignored).
   */
  giveBack(fds: readonly number[]): void;
}
