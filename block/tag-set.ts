/**
 * TagSet: the request slots of a set of hardware queues (the kernel's blk_mq_tag_set):
 * `nrHwQueues` queues with `queueDepth` tags each. One tag set can serve several disks
 * (null_blk `shared_tags`): their hardware queues of the same index then draw from the same
 * tags, so together they never have more than `queueDepth` requests in flight there.
 *
 * A request holds a tag from dispatch to end. When a queue finds no free tag it leaves the
 * remaining chains in its avail ring and waits (Tags.wait) until a tag is released.
 */

/** The tags of one hardware-queue index. */
export class Tags {
  used = 0;
  private waiters: Array<() => void> = [];
  private scheduled = false;

  constructor(readonly depth: number) {}

  /** Tags free now. */
  get free(): number {
    return this.depth - this.used;
  }

  /** Calls `fn` once, soon after a tag is released (on a later turn of the event loop). */
  wait(fn: () => void): void {
    if (!this.waiters.includes(fn)) this.waiters.push(fn);
  }

  /** @internal a request took a tag */
  take(): void {
    this.used++;
  }

  /** @internal a request ended */
  release(): void {
    this.used--;
    if (this.waiters.length > 0 && !this.scheduled) {
      this.scheduled = true;
      setImmediate(() => {
        this.scheduled = false;
        const w = this.waiters;
        this.waiters = [];
        for (const fn of w) fn();
      });
    }
  }
}

export interface TagSetOptions {
  /** Number of hardware queues, 1..64. */
  nrHwQueues: number;
  /** Tags (requests in flight) per hardware queue, 1..1024 (null_blk hw_queue_depth). */
  queueDepth: number;
}

export class TagSet {
  readonly nrHwQueues: number;
  readonly queueDepth: number;
  readonly tags: readonly Tags[];

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
    const tags: Tags[] = [];
    for (let i = 0; i < nrHwQueues; i++) tags.push(new Tags(queueDepth));
    this.tags = tags;
  }

  /** The tags of hardware queue `index`. @throws RangeError if there is no such queue. */
  tagsOf(index: number): Tags {
    const t = this.tags[index];
    if (t === undefined) throw new RangeError(`hardware queue ${index} does not exist (tag set has ${this.nrHwQueues})`);
    return t;
  }
}
