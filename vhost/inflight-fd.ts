/**
 * GET_INFLIGHT_FD / SET_INFLIGHT_FD (vhost-user.rst "Inflight description", message ids 31
 * and 32): the payload codec and the device side of both messages.
 *
 * The payload is {u64 mmap_size, u64 mmap_offset, u16 num_queues, u16 queue_size} plus 4 bytes
 * of padding: 24 bytes, as QEMU sends and checks (sizeof VhostUserInflight).
 *
 * GET_INFLIGHT_FD: a new zeroed, sealed memfd sized for the message's num_queues x queue_size
 * (the front-end keeps it across back-end restarts and resets it on a device reset); the old
 * region, if any, is dropped. SET_INFLIGHT_FD: the front-end hands a region back, on every
 * device start (after a restart it carries the requests that were in flight). Every field and
 * the fd are untrusted: a region that does not fit is refused with a log line (the rings then
 * run untracked) and the connection stays up, because QEMU would only reconnect and send the
 * same region again.
 */
import type { Logger } from 'pino';
import { checkDescription, createInflightFd, inflightRegionBytes, InflightRegion, type InflightDescription } from '../virtqueue/inflight-region';
import { MessageError, type Message } from './message';
import { requestName } from './protocol';
import { closeFd } from './vring';

/** Bytes of the inflight description payload. */
export const INFLIGHT_PAYLOAD_BYTES = 24;

/**
 * Reads the payload. u64 fields above 2^53 become -1 (refused later by checkDescription).
 * @throws MessageError for a payload that is not 24 bytes.
 */
export function readInflightDescription(msg: Message): InflightDescription {
  if (msg.payload.length !== INFLIGHT_PAYLOAD_BYTES) {
    throw new MessageError(`${requestName(msg.request)}: payload is ${msg.payload.length} bytes, expected ${INFLIGHT_PAYLOAD_BYTES}`);
  }
  const big = (off: number): number => {
    const v = msg.payload.readBigUInt64LE(off);
    return v > BigInt(Number.MAX_SAFE_INTEGER) ? -1 : Number(v);
  };
  return { mmapSize: big(0), mmapOffset: big(8), numQueues: msg.payload.readUInt16LE(16), queueSize: msg.payload.readUInt16LE(18) };
}

export function writeInflightDescription(d: InflightDescription): Buffer {
  const b = Buffer.alloc(INFLIGHT_PAYLOAD_BYTES);
  b.writeBigUInt64LE(BigInt(d.mmapSize), 0);
  b.writeBigUInt64LE(BigInt(d.mmapOffset), 8);
  b.writeUInt16LE(d.numQueues, 16);
  b.writeUInt16LE(d.queueSize, 18);
  return b;
}

/** What the device does with a region once it is mapped here (e.g. lend it to worker threads). */
export interface InflightTarget {
  readonly numQueues: number;
  /** Takes `region` (mapped from `fd`; fd stays the caller's) as the current region. */
  adopt(region: InflightRegion, fd: number): Promise<void>;
  /** Drops the current region (if any). */
  drop(): Promise<void>;
}

/**
 * GET_INFLIGHT_FD: creates the region asked for and makes it current. Returns the reply
 * payload and the fd to send with it (the caller closes it once sent). A request that does
 * not fit the layout gets mmap_size 0 and no fd ("no region": QEMU goes on without one).
 */
export async function getInflightFd(
  msg: Message,
  target: InflightTarget,
  log: Logger,
): Promise<{ payload: Buffer; fds: number[] }> {
  const d = readInflightDescription(msg);
  await target.drop();
  // Size and offset are ours to choose: only the queue count and size are checked.
  const why = checkDescription({ ...d, mmapSize: inflightRegionBytes(d.numQueues, d.queueSize), mmapOffset: 0 }, target.numQueues);
  if (why !== null) {
    log.error({ numQueues: d.numQueues, queueSize: d.queueSize }, `GET_INFLIGHT_FD refused: ${why}; running without an inflight region`);
    return { payload: writeInflightDescription({ mmapSize: 0, mmapOffset: 0, numQueues: d.numQueues, queueSize: d.queueSize }), fds: [] };
  }
  const { fd, description } = createInflightFd(d.numQueues, d.queueSize, target.numQueues);
  let region: InflightRegion | null = null;
  try {
    region = new InflightRegion(fd, description, target.numQueues);
    await target.adopt(region, fd);
  } catch (e) {
    region?.release();
    closeFd(fd);
    throw e;
  }
  log.info({ numQueues: d.numQueues, queueSize: d.queueSize, bytes: description.mmapSize }, 'inflight region created');
  return { payload: writeInflightDescription(description), fds: [fd] };
}

/**
 * SET_INFLIGHT_FD: maps the region the front-end hands back and makes it current. Returns
 * false (a refusal: REPLY_ACK reports it, the connection stays) when it does not fit: wrong
 * fd count or kind, fields outside the layout, an fd shorter than the region. The fds are
 * closed here either way (the mapping keeps the memory).
 */
export async function setInflightFd(msg: Message, target: InflightTarget, log: Logger): Promise<boolean> {
  const d = readInflightDescription(msg);
  const fds = msg.fds.splice(0);
  try {
    await target.drop();
    if (fds.length !== 1) {
      log.error({ fds: fds.length }, 'SET_INFLIGHT_FD refused: expected exactly one fd; running without an inflight region');
      return false;
    }
    let region: InflightRegion;
    try {
      region = new InflightRegion(fds[0], d, target.numQueues);
    } catch (e) {
      log.error({ ...d }, `SET_INFLIGHT_FD refused: ${(e as Error).message}; running without an inflight region`);
      return false;
    }
    try {
      await target.adopt(region, fds[0]);
    } catch (e) {
      region.release();
      throw e;
    }
    log.info({ ...d }, 'inflight region mapped');
    return true;
  } finally {
    for (const fd of fds) closeFd(fd);
  }
}
