/** Hands a block request straight to a hardware queue's driver, as the virtqueue layer would. */
import type { HwQueue } from '../../block/hw-queue';
import type { ReqOp } from '../../block/operations';
import type { Request } from '../../block/request';

/**
 * Fills the request of `tag` on `hctx` (op, 512-byte `sector`, data segments [offset, length]
 * in bytes within memory chunk 0, which is `guest`) and dispatches it; `isLast` ends the batch
 * (the driver rings its doorbell). `bytes` defaults to the segments' total.
 */
export function dispatchSegments(hctx: HwQueue, tag: number, op: ReqOp, sector: number, segs: Array<[number, number]>, guest: Buffer, isLast = true, bytes?: number): Request {
  const rq = hctx.requests[tag]!;
  rq.op = op;
  rq.sector = sector;
  rq.bytes = bytes ?? segs.reduce((n, [, l]) => n + l, 0);
  rq.segments = new Uint32Array(segs.flatMap(([o, l]) => [0, o, l, 0]));
  rq.segBase = 0;
  rq.segCount = segs.length;
  rq.memory = [guest];
  hctx.dispatch(rq, isLast, 0);
  return rq;
}
