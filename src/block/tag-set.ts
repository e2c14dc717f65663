/**
 * TagSet: the request slots of a set of hardware queues (the kernel's blk_mq_tag_set):
 * `nrHwQueues` queues of `queueDepth` tags each, every tag with its preallocated Request.
 */
import { HwQueue } from './hw-queue';

export interface TagSetOptions {
  /** Number of hardware queues (virtqueues), 1..64. */
  nrHwQueues: number;
  /** Tags per hardware queue (the largest virtqueue size accepted), 1..1024. */
  queueDepth: number;
}

export class TagSet {
  readonly nrHwQueues: number;
  readonly queueDepth: number;
  readonly hwQueues: readonly HwQueue[];

  /** @throws RangeError for a queue count outside 1..64 or a depth outside 1..1024. */
  constructor(options: TagSetOptions) {
    const { nrHwQueues, queueDepth } = options;
    if (!Number.isInteger(nrHwQueues) || nrHwQueues < 1 || nrHwQueues > 64) {
      throw new RangeError(`nrHwQueues must be an integer from 1 to 64, got ${nrHwQueues}`);
    }
    if (!Number.isInteger(queueDepth) || queueDepth < 1 || queueDepth > 1024) {
      throw new RangeError(`queueDepth must be an integer from 1 to 1024, got ${queueDepth}`);
    }
    this.nrHwQueues = nrHwQueues;
    this.queueDepth = queueDepth;
    const queues: HwQueue[] = [];
    for (let i = 0; i < nrHwQueues; i++) queues.push(new HwQueue(i, queueDepth));
    this.hwQueues = queues;
  }

  hctx(index: number): HwQueue {
    const q = this.hwQueues[index];
    if (q === undefined) throw new RangeError(`hardware queue ${index} does not exist (tag set has ${this.nrHwQueues})`);
    return q;
  }
}
