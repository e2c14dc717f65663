/**
 * The null block driver (after Linux null_blk and the Rust rnull): requests complete at once
 * (null_blk irqmode 0, "none"). Memory-backed, it keeps written data in a sparse PageStore for
 * as long as the daemon runs (a guest reconnecting finds its data); otherwise reads return
 * zeroes and writes are dropped.
 */
import { BlkStatus, Operations, ReqOp } from '../../block/operations';
import type { Request } from '../../block/request';
import { SEGMENT_WORDS } from '../../native';
import { PageStore } from './page-store';

export interface NullDriverOptions {
  /** Keep written data (null_blk memory_backed). */
  memoryBacked: boolean;
}

export class NullDriver implements Operations {
  readonly store: PageStore | null;

  constructor(options: NullDriverOptions) {
    this.store = options.memoryBacked ? new PageStore() : null;
  }

  queueRq(rq: Request, _isLast: boolean): BlkStatus {
    switch (rq.op) {
      case ReqOp.Read:
        if (this.store !== null) this.transfer(rq, false);
        else zeroFill(rq);
        break;
      case ReqOp.Write:
        if (this.store !== null) this.transfer(rq, true);
        break;
      case ReqOp.Flush:
        break; // memory is as durable as this disk gets
    }
    rq.end(BlkStatus.Ok);
    return BlkStatus.Ok;
  }

  /** Copies between the request's guest segments and the page store, segment by segment. */
  private transfer(rq: Request, write: boolean): void {
    const store = this.store as PageStore;
    const segs = rq.segments;
    let pos = rq.sector * 512;
    for (let i = 0, w = rq.segBase; i < rq.segCount; i++, w += SEGMENT_WORDS) {
      const view = rq.memory[segs[w]];
      const off = segs[w + 1];
      const len = segs[w + 2];
      if (write) store.write(pos, view, off, len);
      else store.read(pos, view, off, len);
      pos += len;
    }
  }
}

/**
 * TypedArray's own fill: Buffer.prototype.fill validates and dispatches on every call, which
 * cost ~20% of the whole dispatch path in bench/micro/dispatch.js (4k reads, batches of 32).
 */
const u8fill = Uint8Array.prototype.fill;

/** Fills a read request's segments with zeroes. */
function zeroFill(rq: Request): void {
  const segs = rq.segments;
  for (let i = 0, w = rq.segBase; i < rq.segCount; i++, w += SEGMENT_WORDS) {
    const off = segs[w + 1];
    u8fill.call(rq.memory[segs[w]], 0, off, off + segs[w + 2]);
  }
}
