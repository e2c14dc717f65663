/**
 * Turns a descriptor chain (already walked and translated by native/virtqueue.cc) into a block
 * request: the virtio-blk request header, data segments and status byte (VIRTIO 1.2 section
 * 5.2.6), checking everything the guest controls. Transport-independent: it sees segments only.
 *
 * A request is: a 16-byte device-readable header { le32 type; le32 reserved; le64 sector },
 * data (device-readable for OUT, device-writable for IN and GET_ID), then one device-writable
 * status byte. The header and status may share descriptors with data (any layout, 2.7.4.4).
 */
import { BlkStatus, ReqOp } from '../block/operations';
import type { Request } from '../block/request';
import { SEGMENT_WORDS } from '../native';

/** virtio-blk request types (5.2.6). */
export const enum BlkType {
  In = 0,
  Out = 1,
  Flush = 4,
  GetId = 8,
  GetLifetime = 10,
  Discard = 11,
  WriteZeroes = 13,
  SecureErase = 14,
}

/** Discard and write-zeroes limits offered in the config space (5.2.4). */
export const MAX_DISCARD_SEG = 1;
export const MAX_DISCARD_SECTORS = 262144; // 128 MiB per request
const DWZ_SEGMENT_BYTES = 16; // struct virtio_blk_discard_write_zeroes
const DWZ_FLAG_UNMAP = 1;

/**
 * Request size limits, advertised in the config space (5.2.4) and enforced per chain (native
 * pop() counts guest descriptors and bytes before any buffer is translated; parse() checks the
 * data bytes again): SEG_MAX data descriptors (seg_max; with the header and status descriptors
 * that is 128, QEMU's own virtio-blk/vhost-user-blk default), each at most SIZE_MAX_BYTES
 * (size_max, VIRTIO_BLK_F_SIZE_MAX), so a request moves at most MAX_TRANSFER_BYTES =
 * SEG_MAX * SIZE_MAX_BYTES = 31.5 MiB: a guest that honours both limits can never exceed it,
 * a Linux guest's largest request by default (max_sectors_kb 1280 to 4096) is far below it, and
 * it bounds the work one request can make a thread do (a zero-fill of 31.5 MiB is a few ms) and
 * keeps every used length far below 2^32. 256 KiB keeps single-descriptor 128 KiB requests
 * (the bench's largest) in one descriptor.
 */
export const SEG_MAX = 126;
export const SIZE_MAX_BYTES = 256 * 1024;
export const MAX_TRANSFER_BYTES = SEG_MAX * SIZE_MAX_BYTES;
/** Per chain, as native pop() counts them: the data descriptors plus a header and a status one. */
export const MAX_CHAIN_DESCRIPTORS = SEG_MAX + 2;
/** Per chain: the data plus a 16-byte header and a status byte (any layout, 2.7.4.4). */
export const MAX_CHAIN_BYTES = MAX_TRANSFER_BYTES + 16 + 1;

/** Length of the GET_ID answer (VIRTIO_BLK_ID_BYTES). */
export const BLK_ID_BYTES = 20;
const HEADER_BYTES = 16;
const SECTOR = 512;
/** Largest sector high word that keeps sector * 512 exact in a double (2^53 bytes). */
const MAX_SECTOR_HI = 0x1fffff;

/** What to do with a parsed chain. */
export const enum ParseOutcome {
  /** A Read/Write/Flush request for the driver: `rq` is prepared. */
  Dispatch = 0,
  /** Answered here (an error, or GET_ID): write `status` at the status byte, used length `usedLen`. */
  Finish = 1,
  /** No usable status byte: return the head with used length 0 and write nothing. */
  Drop = 2,
}

export interface DiskGeometry {
  capacitySectors: number;
  logicalBlockSize: number;
  readOnly: boolean;
  flush: boolean;
  discard: boolean;
  /** GET_ID answer, BLK_ID_BYTES long, NUL-padded. */
  serialId: Buffer;
}

/**
 * Parses chains of one virtqueue. One instance per queue; no allocation per request (results
 * are left in fields).
 */
export class BlkRequestParser {
  /** Outputs of the last parse(). */
  status: BlkStatus = BlkStatus.Ok;
  usedLen = 0;
  statusChunk = 0;
  statusOffset = 0;
  /** Why the last chain failed (for rate-limited debug logs); '' when it did not. */
  reason = '';

  private readonly header = Buffer.alloc(HEADER_BYTES);
  private readonly headerWords = new DataView(this.header.buffer, this.header.byteOffset, HEADER_BYTES);
  /** DataViews over the chunks: a header word is one load (Buffer.readUInt32LE is four). */
  private words: DataView[];

  constructor(
    private readonly disk: DiskGeometry,
    private views: Buffer[],
    private readonly segments: Uint32Array,
  ) {
    this.words = views.map((v) => new DataView(v.buffer, v.byteOffset, v.byteLength));
  }

  /**
   * Parses the chain whose `nseg` segments start at word `base` of the segment table, and
   * prepares `rq` (op, sector, bytes, data segments) when the outcome is Dispatch. Segment
   * words are rewritten in place to exclude the header and status bytes.
   */
  parse(base: number, nseg: number, rq: Request): ParseOutcome {
    const segs = this.segments;
    this.reason = '';
    // Status: the last byte of the last segment, which must be device-writable (5.2.6.1).
    let last = base + (nseg - 1) * SEGMENT_WORDS;
    if (nseg === 0 || (segs[last + 3] & 1) === 0) {
      this.reason = 'last descriptor is not device-writable: no status byte';
      return ParseOutcome.Drop;
    }
    this.statusChunk = segs[last];
    this.statusOffset = segs[last + 1] + segs[last + 2] - 1;
    this.usedLen = 1;
    if (--segs[last + 2] === 0) {
      nseg--;
      last -= SEGMENT_WORDS;
    }
    // Header: the first 16 bytes, all device-readable. Read in place when one segment holds
    // it (Linux always does that); gather it into a scratch buffer otherwise.
    let s = base;
    const end = base + nseg * SEGMENT_WORDS;
    let hdr: DataView<ArrayBufferLike> = this.headerWords;
    let hoff = 0;
    let got = 0;
    if (nseg > 0 && (segs[s + 3] & 1) === 0 && segs[s + 2] >= HEADER_BYTES) {
      hdr = this.words[segs[s]];
      hoff = segs[s + 1];
      got = HEADER_BYTES;
      if (segs[s + 2] === HEADER_BYTES) {
        s += SEGMENT_WORDS;
      } else {
        segs[s + 1] += HEADER_BYTES;
        segs[s + 2] -= HEADER_BYTES;
      }
    }
    while (got < HEADER_BYTES) {
      if (s >= end || (segs[s + 3] & 1) !== 0) return this.fail(BlkStatus.IoErr, 'request header shorter than 16 device-readable bytes');
      const view = this.views[segs[s]];
      const off = segs[s + 1];
      const take = Math.min(segs[s + 2], HEADER_BYTES - got);
      if (view.copy(this.header, got, off, off + take) !== take) return this.fail(BlkStatus.IoErr, 'header outside mapped memory');
      got += take;
      if (take === segs[s + 2]) {
        s += SEGMENT_WORDS;
      } else {
        segs[s + 1] += take;
        segs[s + 2] -= take;
      }
    }
    const type = hdr.getUint32(hoff, true);
    const sectorLo = hdr.getUint32(hoff + 8, true);
    const sectorHi = hdr.getUint32(hoff + 12, true);
    // Data: the segments between header and status; one direction for all of them.
    let bytes = 0;
    let writable = 0;
    for (let w = s; w < end; w += SEGMENT_WORDS) {
      bytes += segs[w + 2];
      writable += segs[w + 3] & 1;
    }
    const count = (end - s) / SEGMENT_WORDS;
    switch (type) {
      case BlkType.In:
      case BlkType.Out: {
        const isRead = type === BlkType.In;
        if (isRead ? writable !== count : writable !== 0) {
          return this.fail(BlkStatus.IoErr, isRead ? 'read data buffer is device-readable' : 'write data buffer is device-writable');
        }
        if (!isRead && this.disk.readOnly) return this.fail(BlkStatus.IoErr, 'write to a read-only disk');
        if (bytes > MAX_TRANSFER_BYTES) return this.fail(BlkStatus.IoErr, `data of ${bytes} bytes exceeds ${MAX_TRANSFER_BYTES} per request`);
        const lbs = this.disk.logicalBlockSize; // a power of two (Disk checks it): masks, not divisions
        if ((bytes & (lbs - 1)) !== 0) return this.fail(BlkStatus.IoErr, `data length ${bytes} is not a multiple of the ${lbs}-byte block`);
        if (sectorHi > MAX_SECTOR_HI) return this.fail(BlkStatus.IoErr, 'sector beyond the disk');
        const sector = sectorHi * 0x100000000 + sectorLo;
        if ((sectorLo & (lbs / SECTOR - 1)) !== 0) return this.fail(BlkStatus.IoErr, `sector ${sector} is not aligned to the ${lbs}-byte block`);
        const cap = this.disk.capacitySectors;
        const nsect = bytes / SECTOR;
        // Overflow-safe: sector <= cap first, then the length against what is left.
        if (sector > cap || nsect > cap - sector) return this.fail(BlkStatus.IoErr, `sectors ${sector}+${nsect} beyond capacity ${cap}`);
        rq.op = isRead ? ReqOp.Read : ReqOp.Write;
        rq.sector = sector;
        rq.bytes = bytes;
        rq.segBase = s;
        rq.segCount = count;
        if (isRead) this.usedLen = bytes + 1;
        return ParseOutcome.Dispatch;
      }
      case BlkType.Flush:
        if (!this.disk.flush) return this.fail(BlkStatus.Unsupp, 'flush without VIRTIO_BLK_F_FLUSH');
        rq.op = ReqOp.Flush;
        rq.sector = 0;
        rq.bytes = 0;
        rq.segBase = s;
        rq.segCount = 0;
        return ParseOutcome.Dispatch;
      case BlkType.GetId: {
        if (writable !== count) return this.fail(BlkStatus.IoErr, 'GET_ID buffer is device-readable');
        // Write up to 20 bytes of the NUL-padded serial across the data segments.
        let done = 0;
        for (let w = s; w < end && done < BLK_ID_BYTES; w += SEGMENT_WORDS) {
          const n = Math.min(segs[w + 2], BLK_ID_BYTES - done);
          this.disk.serialId.copy(this.views[segs[w]], segs[w + 1], done, done + n);
          done += n;
        }
        this.status = BlkStatus.Ok;
        this.usedLen = done + 1;
        return ParseOutcome.Finish;
      }
      case BlkType.Discard:
      case BlkType.WriteZeroes:
        return this.parseDiscard(type, s, end, bytes, writable, rq);
      default:
        return this.fail(BlkStatus.Unsupp, `unsupported request type ${type}`);
    }
  }

  /**
   * DISCARD / WRITE_ZEROES: one struct virtio_blk_discard_write_zeroes { le64 sector;
   * le32 num_sectors; le32 flags } (MAX_DISCARD_SEG is 1). The range is copied into the
   * request, so the guest cannot change it after it was checked.
   */
  private parseDiscard(type: number, s: number, end: number, bytes: number, writable: number, rq: Request): ParseOutcome {
    const name = type === BlkType.Discard ? 'discard' : 'write zeroes';
    if (!this.disk.discard) return this.fail(BlkStatus.Unsupp, `${name} not offered`);
    if (writable !== 0) return this.fail(BlkStatus.IoErr, `${name} data is device-writable`);
    if (bytes === 0 || bytes % DWZ_SEGMENT_BYTES !== 0) return this.fail(BlkStatus.IoErr, `${name} data of ${bytes} bytes is not whole segments`);
    if (bytes > MAX_DISCARD_SEG * DWZ_SEGMENT_BYTES) return this.fail(BlkStatus.IoErr, `${name} with more than ${MAX_DISCARD_SEG} segment`);
    const segs = this.segments;
    let got = 0;
    for (let w = s; w < end; w += SEGMENT_WORDS) {
      const off = segs[w + 1];
      const n = segs[w + 2];
      if (this.views[segs[w]].copy(this.header, got, off, off + n) !== n) return this.fail(BlkStatus.IoErr, 'segment outside mapped memory');
      got += n;
    }
    const lo = this.header.readUInt32LE(0);
    const hi = this.header.readUInt32LE(4);
    const num = this.header.readUInt32LE(8);
    const flags = this.header.readUInt32LE(12);
    // 5.2.6.2: unknown flags, or unmap on a discard, are UNSUPP.
    if ((flags & ~DWZ_FLAG_UNMAP) !== 0) return this.fail(BlkStatus.Unsupp, `${name} with unknown flags 0x${flags.toString(16)}`);
    if (type === BlkType.Discard && flags !== 0) return this.fail(BlkStatus.Unsupp, 'discard with the unmap flag');
    if (this.disk.readOnly) return this.fail(BlkStatus.IoErr, `${name} on a read-only disk`);
    if (num > MAX_DISCARD_SECTORS) return this.fail(BlkStatus.IoErr, `${name} of ${num} sectors exceeds ${MAX_DISCARD_SECTORS}`);
    if (hi > MAX_SECTOR_HI) return this.fail(BlkStatus.IoErr, 'sector beyond the disk');
    const sector = hi * 0x100000000 + lo;
    const per = this.disk.logicalBlockSize / SECTOR;
    if (sector % per !== 0 || num % per !== 0) return this.fail(BlkStatus.IoErr, `${name} range not aligned to the ${this.disk.logicalBlockSize}-byte block`);
    const cap = this.disk.capacitySectors;
    if (sector > cap || num > cap - sector) return this.fail(BlkStatus.IoErr, `${name} sectors ${sector}+${num} beyond capacity ${cap}`);
    rq.op = type === BlkType.Discard ? ReqOp.Discard : ReqOp.WriteZeroes;
    rq.sector = sector;
    rq.bytes = num * SECTOR;
    rq.unmap = (flags & DWZ_FLAG_UNMAP) !== 0;
    rq.segBase = s;
    rq.segCount = 0;
    return ParseOutcome.Dispatch;
  }

  private fail(status: BlkStatus, reason: string): ParseOutcome {
    this.status = status;
    this.usedLen = 1;
    this.reason = reason;
    return ParseOutcome.Finish;
  }
}

/** The GET_ID answer for a serial: ASCII, NUL-padded to 20 bytes (no NUL when exactly 20). */
export function serialId(serial: string): Buffer {
  const b = Buffer.alloc(BLK_ID_BYTES);
  b.write(serial.slice(0, BLK_ID_BYTES), 'latin1');
  return b;
}
