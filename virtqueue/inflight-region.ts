/**
 * The inflight region of VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD (vhost-user.rst "Inflight I/O
 * tracking"), split virtqueues only: one block per queue, back to back, each a QueueRegionSplit
 *
 *   off 0  u64 features        0 (no feature defined)
 *   off 8  u16 version         0: never used (fresh), 1: in use
 *   off 10 u16 desc_num        entries that follow (= the region's queue size)
 *   off 12 u16 last_batch_head head of the list of the last published batch
 *   off 14 u16 used_idx        used->idx after the last batch was fully cleared
 *   off 16 DescStateSplit[desc_num], 16 bytes each:
 *          u8 inflight @0, u8 padding[5], u16 next @6, u64 counter @8
 *
 * padded to a multiple of 64 bytes (queueBlockBytes). The layout is rnull's own (the front-end
 * never reads it, it only keeps the memfd across back-end restarts), so it must stay the same
 * from one rnull version to the next.
 *
 * Who writes what: the thread serving a queue is the only writer of its block. The hot path
 * (mark at pop, link/publish/clear at push) is native (SplitRing); this file maps regions,
 * checks them, and recovers a queue's block when its ring starts (recoverSplitQueue).
 *
 * Everything in a region is untrusted: it is shared with the front-end, and it survives crashes
 * of this process. recoverSplitQueue reads every field it uses once into locals, range-checks
 * it, and refuses the block (the caller then re-initialises it) rather than trusting it.
 */
import { native, NativeGuestMemory } from '../native';

export const BLOCK_HEADER_BYTES = 16;
export const DESC_STATE_BYTES = 16;
export const BLOCK_ALIGN = 64;
/** The only region version this back-end writes (0 means a fresh, never used block). */
export const REGION_VERSION = 1;
/** Largest queue size in a region (QEMU's VIRTQUEUE_MAX_SIZE). */
export const MAX_REGION_QUEUE_SIZE = 1024;
/** Counters are kept below 2^53 (exact in a JS number; 285 years at a million requests a second). */
export const MAX_COUNTER = Number.MAX_SAFE_INTEGER;

/** Bytes of one queue's block for `queueSize` descriptors (a multiple of 64). */
export function queueBlockBytes(queueSize: number): number {
  const raw = BLOCK_HEADER_BYTES + DESC_STATE_BYTES * queueSize;
  return Math.ceil(raw / BLOCK_ALIGN) * BLOCK_ALIGN;
}

/** Bytes of a region for `numQueues` queues of `queueSize` descriptors. */
export function inflightRegionBytes(numQueues: number, queueSize: number): number {
  return numQueues * queueBlockBytes(queueSize);
}

/** The inflight description of GET/SET_INFLIGHT_FD (vhost-user.rst "Inflight description"). */
export interface InflightDescription {
  /** Bytes of the region in the fd. */
  mmapSize: number;
  /** Byte offset of the region in the fd. */
  mmapOffset: number;
  numQueues: number;
  /** Descriptors per queue block (desc_num). */
  queueSize: number;
}

/**
 * Why a description cannot be a region of this layout (null: it can). `maxQueues` is the
 * device's queue count.
 */
export function checkDescription(d: InflightDescription, maxQueues: number): string | null {
  if (!Number.isSafeInteger(d.numQueues) || d.numQueues < 1 || d.numQueues > maxQueues) {
    return `num_queues ${d.numQueues} is not 1 to ${maxQueues}`;
  }
  if (!Number.isSafeInteger(d.queueSize) || d.queueSize < 1 || d.queueSize > MAX_REGION_QUEUE_SIZE) {
    return `queue_size ${d.queueSize} is not 1 to ${MAX_REGION_QUEUE_SIZE}`;
  }
  const want = inflightRegionBytes(d.numQueues, d.queueSize);
  if (d.mmapSize !== want) return `mmap_size ${d.mmapSize} is not the ${want} bytes of ${d.numQueues} queues of ${d.queueSize}`;
  if (!Number.isSafeInteger(d.mmapOffset) || d.mmapOffset < 0 || d.mmapOffset % 4096 !== 0) {
    return `mmap_offset ${d.mmapOffset} is not a multiple of 4096`;
  }
  return null;
}

/**
 * A mapped inflight region (MAP_SHARED, through native GuestMemory: the fd must not be able to
 * shrink under the mapping). release() unmaps it; a ring still tracking into it then runs
 * untracked (native Virtqueue checks the mapping on every call).
 */
export class InflightRegion {
  readonly table: NativeGuestMemory;
  readonly view: Buffer;

  /**
   * Maps `fd` (not closed here) as described. @throws RangeError when the description does not
   * fit this layout or the fd is not a memfd sealed against shrinking, or is too small;
   * SyscallError when fstat or mmap fails.
   */
  constructor(
    fd: number,
    readonly description: InflightDescription,
    maxQueues: number,
  ) {
    const why = checkDescription(description, maxQueues);
    if (why !== null) throw new RangeError(why);
    const kind = native.fdKind(fd);
    if (kind !== 'memfd') throw new RangeError(`the inflight fd is a ${kind}, not a memfd`);
    this.table = new native.GuestMemory([{ gpa: 0, size: description.mmapSize, uaddr: 0, mmapOffset: description.mmapOffset, fd }]);
    this.view = Buffer.from(this.table.chunks()[0]);
  }

  get numQueues(): number {
    return this.description.numQueues;
  }

  get queueSize(): number {
    return this.description.queueSize;
  }

  /** Byte offset of queue q's block in the region. */
  blockOffset(q: number): number {
    return q * queueBlockBytes(this.description.queueSize);
  }

  /** Queue q's block (a view into the mapping; empty once released). */
  block(q: number): Buffer {
    const off = this.blockOffset(q);
    return this.view.subarray(off, off + queueBlockBytes(this.description.queueSize));
  }

  release(): void {
    this.table.unmap();
  }
}

/**
 * A new region for GET_INFLIGHT_FD: a sealed memfd (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)
 * of inflightRegionBytes(numQueues, queueSize), all zero (every block fresh). Returns the fd
 * (the caller owns it) and its description. @throws RangeError for sizes outside the layout.
 */
export function createInflightFd(numQueues: number, queueSize: number, maxQueues: number): { fd: number; description: InflightDescription } {
  const description = { mmapSize: inflightRegionBytes(numQueues, queueSize), mmapOffset: 0, numQueues, queueSize };
  const why = checkDescription(description, maxQueues);
  if (why !== null) throw new RangeError(why);
  const fd = native.memfdCreate('rnull-inflight', description.mmapSize);
  return { fd, description };
}

/** The outcome of recovering one queue's block at ring start. */
export interface SplitRecovery {
  /** The block was fresh (version 0) or refused, and is now initialised: nothing to resubmit. */
  fresh: boolean;
  /** Why the block was refused (then re-initialised as fresh), else null. */
  refused: string | null;
  /** Where the avail ring goes on. */
  lastAvailIdx: number;
  /** Heads in flight before the restart, oldest first (by counter). */
  resubmit: Uint16Array;
  /** The next counter value (1 for a fresh block). */
  counter: number;
  /** Entries of the last batch that the used ring shows as published and were cleared now. */
  batchCleared: number;
}

/**
 * Makes `block` a fresh block in use: every entry cleared, used_idx = the ring's used->idx,
 * then version = 1 last (a crash before that leaves a block that is still fresh).
 */
export function initSplitBlock(block: Buffer, descNum: number, usedIdx: number): void {
  block.fill(0, 0, block.length);
  block.writeBigUInt64LE(0n, 0);
  block.writeUInt16LE(descNum, 10);
  block.writeUInt16LE(0, 12);
  block.writeUInt16LE(usedIdx & 0xffff, 14);
  block.writeUInt16LE(REGION_VERSION, 8);
}

/**
 * Recovers one split queue's block when its ring starts (vhost-user.rst "When reconnecting"),
 * and leaves the block consistent with the ring for the native tracking that follows.
 *
 * - version 0 (fresh): initialised; the ring goes on at `base` (SET_VRING_BASE).
 * - version 1: the last batch is fixed up when used->idx moved past used_idx (the batch was
 *   published but not all cleared: walk `used->idx - used_idx` entries from last_batch_head via
 *   next, clearing inflight), used_idx = used->idx; the entries still in flight are resubmitted
 *   oldest first; the ring goes on at used->idx + their number (SET_VRING_BASE is ignored: after
 *   a crash QEMU 7.2 sends used->idx, after a clean stop the two agree).
 * - anything inconsistent refuses the block (`refused` says why): it is re-initialised and the
 *   ring goes on at `base`; requests that were in flight then cannot be resubmitted.
 *
 * @param block this queue's block (queueBlockBytes(descNum) bytes)
 * @param descNum the region's queue size (entries per block)
 * @param ringSize the ring's size in descriptors (SET_VRING_NUM), <= descNum
 * @param usedIdx the ring's used->idx as read from guest memory
 * @param base SET_VRING_BASE's avail index
 */
export function recoverSplitQueue(block: Buffer, descNum: number, ringSize: number, usedIdx: number, base: number): SplitRecovery {
  if (block.length < BLOCK_HEADER_BYTES + DESC_STATE_BYTES * descNum) throw new RangeError('inflight block shorter than its entries');
  if (ringSize > descNum) throw new RangeError(`ring of ${ringSize} does not fit a block of ${descNum} entries`);
  const fresh = (refused: string | null): SplitRecovery => {
    initSplitBlock(block, descNum, usedIdx);
    return { fresh: true, refused, lastAvailIdx: base & 0xffff, resubmit: new Uint16Array(0), counter: 1, batchCleared: 0 };
  };
  const version = block.readUInt16LE(8);
  if (version === 0) return fresh(null);
  const why = checkUsedBlock(block, descNum, ringSize, usedIdx);
  if (typeof why === 'string') return fresh(why);
  // Checked: apply the last batch's fix-up, then used_idx (as the completion path would have).
  for (const h of why.batch) block[BLOCK_HEADER_BYTES + DESC_STATE_BYTES * h] = 0;
  block.writeUInt16LE(usedIdx & 0xffff, 14);
  const resubmit = Uint16Array.from(why.inflight.map((e) => e.head));
  const last = why.inflight.length > 0 ? why.inflight[why.inflight.length - 1].counter : 0;
  return {
    fresh: false,
    refused: null,
    lastAvailIdx: (usedIdx + resubmit.length) & 0xffff,
    resubmit,
    counter: last + 1,
    batchCleared: why.batch.length,
  };
}

/**
 * The checks of a used block (version != 0). Returns why it is refused, or the heads of the
 * last batch to clear and the entries still in flight after that, sorted oldest first.
 */
function checkUsedBlock(
  block: Buffer,
  descNum: number,
  ringSize: number,
  usedIdx: number,
): string | { batch: number[]; inflight: Array<{ head: number; counter: number }> } {
  const version = block.readUInt16LE(8);
  if (version !== REGION_VERSION) return `version ${version} is not ${REGION_VERSION}`;
  const features = block.readBigUInt64LE(0);
  if (features !== 0n) return `features 0x${features.toString(16)} are not 0`;
  const num = block.readUInt16LE(10);
  if (num !== descNum) return `desc_num ${num} is not the region's queue size ${descNum}`;
  const lastBatchHead = block.readUInt16LE(12);
  const regionUsedIdx = block.readUInt16LE(14);
  const batchSize = (usedIdx - regionUsedIdx) & 0xffff;
  if (batchSize > ringSize) return `used->idx ${usedIdx} is ${batchSize} past the region's used_idx ${regionUsedIdx}: more than the ring of ${ringSize}`;
  // The last batch: batchSize distinct heads of the ring, linked from last_batch_head.
  const batch: number[] = [];
  const seen = new Uint8Array(descNum);
  let h = lastBatchHead;
  for (let k = 0; k < batchSize; k++) {
    if (h >= ringSize) return `last batch entry ${k} is head ${h}, outside the ring of ${ringSize}`;
    if (seen[h] !== 0) return `last batch list loops at head ${h}`;
    seen[h] = 1;
    batch.push(h);
    h = block.readUInt16LE(BLOCK_HEADER_BYTES + DESC_STATE_BYTES * h + 6);
  }
  const inflight: Array<{ head: number; counter: number }> = [];
  for (let i = 0; i < descNum; i++) {
    const off = BLOCK_HEADER_BYTES + DESC_STATE_BYTES * i;
    const flag = block[off];
    if (flag > 1) return `entry ${i} has inflight ${flag}`;
    if (flag === 0 || seen[i] !== 0) continue; // not in flight, or published by the last batch
    if (i >= ringSize) return `entry ${i} is in flight but outside the ring of ${ringSize}`;
    const counter = block.readBigUInt64LE(off + 8);
    if (counter === 0n || counter >= BigInt(MAX_COUNTER)) return `entry ${i} is in flight with counter ${counter}`;
    inflight.push({ head: i, counter: Number(counter) });
  }
  inflight.sort((a, b) => a.counter - b.counter || a.head - b.head);
  for (let k = 1; k < inflight.length; k++) {
    if (inflight[k].counter === inflight[k - 1].counter) return `heads ${inflight[k - 1].head} and ${inflight[k].head} share counter ${inflight[k].counter}`;
  }
  return { batch, inflight };
}
