/**
 * virtio-blk device configuration space (VIRTIO 1.2 section 5.2.4, struct virtio_blk_config)
 * and the feature bits that describe it (5.2.3). Built once per disk; GET_CONFIG serves slices.
 */
import type { Disk } from '../block/disk';
import { MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SEG_MAX, SIZE_MAX_BYTES } from '../virtqueue/blk-request';
import { bit, Feature } from './protocol';

/** Size of the config space served (the struct is 96 bytes with the zoned fields; rest reads 0). */
export const CONFIG_SPACE_BYTES = 256;
/**
 * seg_max: data descriptors per request; size_max: bytes per data descriptor. Defined (and why
 * these values) in virtqueue/blk-request.ts, where they are enforced. With header and status a
 * request has at most 128 descriptors, each of which can split in two at a memory region edge:
 * within native MAX_SEGMENTS (256).
 */
export { SEG_MAX, SIZE_MAX_BYTES };

/** Field offsets in struct virtio_blk_config. */
const OFF_CAPACITY = 0;
const OFF_SIZE_MAX = 8;
const OFF_SEG_MAX = 12;
const OFF_BLK_SIZE = 20;
const OFF_PHYSICAL_BLOCK_EXP = 24;
const OFF_MIN_IO_SIZE = 26;
const OFF_OPT_IO_SIZE = 28;
export const OFF_WRITEBACK = 32;
const OFF_NUM_QUEUES = 34;
const OFF_MAX_DISCARD_SECTORS = 36;
const OFF_MAX_DISCARD_SEG = 40;
const OFF_DISCARD_SECTOR_ALIGNMENT = 44;
const OFF_MAX_WRITE_ZEROES_SECTORS = 48;
const OFF_MAX_WRITE_ZEROES_SEG = 52;
const OFF_WRITE_ZEROES_MAY_UNMAP = 56;

/** The virtio feature bits rnull offers for `disk` (VIRTIO_F_VERSION_1 and ring features included). */
export function blkFeatures(disk: Disk): bigint {
  let f =
    bit(Feature.VERSION_1) |
    bit(Feature.RING_EVENT_IDX) |
    bit(Feature.RING_INDIRECT_DESC) |
    bit(Feature.BLK_SIZE_MAX) |
    bit(Feature.BLK_SEG_MAX) |
    bit(Feature.BLK_BLK_SIZE) |
    bit(Feature.BLK_TOPOLOGY) |
    bit(Feature.BLK_MQ) |
    bit(Feature.VHOST_USER_PROTOCOL_FEATURES);
  if (disk.flush) f |= bit(Feature.BLK_FLUSH);
  if (disk.readOnly) f |= bit(Feature.BLK_RO);
  if (disk.discard) f |= bit(Feature.BLK_DISCARD) | bit(Feature.BLK_WRITE_ZEROES);
  if (disk.writeCache) f |= bit(Feature.BLK_CONFIG_WCE);
  return f;
}

/** The config space of `disk` served with `numQueues` virtqueues. All fields little-endian. */
export function blkConfigSpace(disk: Disk, numQueues: number): Buffer {
  const c = Buffer.alloc(CONFIG_SPACE_BYTES);
  c.writeBigUInt64LE(BigInt(disk.capacitySectors), OFF_CAPACITY); // 512-byte sectors
  c.writeUInt32LE(Math.min(disk.sizeMax ?? SIZE_MAX_BYTES, SIZE_MAX_BYTES), OFF_SIZE_MAX); // bytes per data descriptor
  c.writeUInt32LE(Math.min(disk.segMax ?? SEG_MAX, SEG_MAX), OFF_SEG_MAX); // data descriptors per request
  c.writeUInt32LE(disk.logicalBlockSize, OFF_BLK_SIZE); // bytes
  c.writeUInt8(0, OFF_PHYSICAL_BLOCK_EXP); // physical block = logical block
  c.writeUInt16LE(1, OFF_MIN_IO_SIZE); // in logical blocks
  c.writeUInt32LE(0, OFF_OPT_IO_SIZE); // no optimal size
  c.writeUInt16LE(numQueues, OFF_NUM_QUEUES);
  c.writeUInt8(disk.writeCache ? 1 : 0, OFF_WRITEBACK); // a write cache starts in writeback
  if (disk.discard) {
    // Limits in 512-byte sectors; alignment of a logical block.
    c.writeUInt32LE(MAX_DISCARD_SECTORS, OFF_MAX_DISCARD_SECTORS);
    c.writeUInt32LE(MAX_DISCARD_SEG, OFF_MAX_DISCARD_SEG);
    c.writeUInt32LE(disk.logicalBlockSize / 512, OFF_DISCARD_SECTOR_ALIGNMENT);
    c.writeUInt32LE(MAX_DISCARD_SECTORS, OFF_MAX_WRITE_ZEROES_SECTORS);
    c.writeUInt32LE(MAX_DISCARD_SEG, OFF_MAX_WRITE_ZEROES_SEG);
    c.writeUInt8(1, OFF_WRITE_ZEROES_MAY_UNMAP);
  }
  return c;
}
