/**
 * Identify data structures (NVM Express Base 1.4, 5.15.2): the fields the driver uses, read from
 * the 4096-byte buffer the controller filled. Sizes in bytes unless a name says blocks.
 */

export const IDENTIFY_SIZE = 4096;

/** Identify Controller (CNS 01h, 1.4 figure 247). */
export interface IdentifyController {
  vid: number;
  /** Serial Number, trailing spaces removed. */
  serial: string;
  /** Model Number, trailing spaces removed. */
  model: string;
  firmware: string;
  /** Maximum Data Transfer Size as the power of two in units of CAP.MPSMIN (0: no limit). */
  mdts: number;
  cntlid: number;
  /** VER as reported (0 for controllers before 1.2). */
  version: number;
  /** RTD3 Entry Latency, microseconds (0: not reported). */
  rtd3e: number;
  /** Optional Admin Command Support (bit 8: Doorbell Buffer Config). */
  oacs: number;
  /** Abort Command Limit, as a count (ACL + 1). */
  abortLimit: number;
  /** Required/maximum SQ and CQ entry sizes, bytes. */
  sqEntryMin: number;
  sqEntryMax: number;
  cqEntryMin: number;
  cqEntryMax: number;
  /** Number of Namespaces (highest valid NSID). */
  nn: number;
  /** Optional NVM Command Support (bit 2: DSM, bit 3: Write Zeroes, ...). */
  oncs: number;
  /** Volatile Write Cache present (VWC bit 0). */
  volatileWriteCache: boolean;
  /** SGL Support (SGLS; bits 1:0 non-zero: SGLs supported for NVM commands). */
  sgls: number;
}

function ascii(b: Uint8Array, from: number, len: number): string {
  return Buffer.from(b.buffer, b.byteOffset + from, len).toString('latin1').replace(/[\s\0]+$/, '');
}

function view(b: Uint8Array): DataView {
  if (b.byteLength < IDENTIFY_SIZE) throw new RangeError(`identify data is ${b.byteLength} bytes, expected ${IDENTIFY_SIZE}`);
  return new DataView(b.buffer, b.byteOffset, IDENTIFY_SIZE);
}

export function parseIdentifyController(b: Uint8Array): IdentifyController {
  const v = view(b);
  return {
    vid: v.getUint16(0, true),
    serial: ascii(b, 4, 20),
    model: ascii(b, 24, 40),
    firmware: ascii(b, 64, 8),
    mdts: v.getUint8(77),
    cntlid: v.getUint16(78, true),
    version: v.getUint32(80, true),
    rtd3e: v.getUint32(88, true),
    oacs: v.getUint16(256, true),
    abortLimit: v.getUint8(258) + 1,
    sqEntryMin: 2 ** (v.getUint8(512) & 0xf),
    sqEntryMax: 2 ** (v.getUint8(512) >> 4),
    cqEntryMin: 2 ** (v.getUint8(513) & 0xf),
    cqEntryMax: 2 ** (v.getUint8(513) >> 4),
    nn: v.getUint32(516, true),
    oncs: v.getUint16(520, true),
    volatileWriteCache: (v.getUint8(525) & 1) !== 0,
    sgls: v.getUint32(536, true),
  };
}

/** OACS bit 8: the controller supports Doorbell Buffer Config (shadow doorbells). */
export const OACS_DOORBELL_BUFFER_CONFIG = 1 << 8;

/** ONCS bits (1.4 figure 247, byte 521:520). */
export const ONCS_COMPARE = 1 << 0;
export const ONCS_WRITE_UNCORRECTABLE = 1 << 1;
export const ONCS_DSM = 1 << 2;
export const ONCS_WRITE_ZEROES = 1 << 3;

/** One LBA format (1.4 figure 250). */
export interface LbaFormat {
  /** Metadata bytes per block. */
  metadataSize: number;
  /** LBA data size as a power of two (LBADS); 0 means the format is not available. */
  lbads: number;
  /** Relative performance (0 best). */
  relativePerformance: number;
}

/** Identify Namespace (CNS 00h, 1.4 figure 249). */
export interface IdentifyNamespace {
  /** Namespace Size, capacity and utilization, in logical blocks. */
  nsze: number;
  ncap: number;
  nuse: number;
  nsfeat: number;
  /** Index of the LBA format in use (FLBAS bits 3:0, and 6:5 for more than 16 formats). */
  formatIndex: number;
  /** Metadata transferred at the end of the data LBA (FLBAS bit 4). */
  extendedLba: boolean;
  formats: LbaFormat[];
  /** The format in use. */
  format: LbaFormat;
  /** Logical block size, bytes (2^LBADS of the format in use). */
  blockSize: number;
  /** End-to-end Data Protection type settings (DPS bits 2:0; 0: none). */
  protectionType: number;
  /** Deallocate Logical Block Features (DLFEAT bits 2:0: what deallocated blocks read as). */
  dlfeat: number;
}

/** Reads a 64-bit little-endian count; RangeError above 2^53 - 1. */
function u64(v: DataView, at: number, what: string): number {
  const n = v.getBigUint64(at, true);
  if (n > BigInt(Number.MAX_SAFE_INTEGER)) throw new RangeError(`${what} ${n} is too large`);
  return Number(n);
}

/** Parses Identify Namespace data. An inactive NSID reads as all zeroes (NSZE 0). */
export function parseIdentifyNamespace(b: Uint8Array): IdentifyNamespace {
  const v = view(b);
  const nlbaf = v.getUint8(25) + 1;
  const flbas = v.getUint8(26);
  const formats: LbaFormat[] = [];
  for (let i = 0; i < Math.min(nlbaf, 64); i++) {
    const d = v.getUint32(128 + 4 * i, true);
    formats.push({ metadataSize: d & 0xffff, lbads: (d >>> 16) & 0xff, relativePerformance: (d >>> 24) & 3 });
  }
  const formatIndex = (flbas & 0xf) | (((flbas >> 5) & 3) << 4);
  const format = formats[formatIndex] ?? { metadataSize: 0, lbads: 0, relativePerformance: 0 };
  return {
    nsze: u64(v, 0, 'NSZE'),
    ncap: u64(v, 8, 'NCAP'),
    nuse: u64(v, 16, 'NUSE'),
    nsfeat: v.getUint8(24),
    formatIndex,
    extendedLba: (flbas & 0x10) !== 0,
    formats,
    format,
    blockSize: format.lbads >= 9 ? 2 ** format.lbads : 0,
    protectionType: v.getUint8(29) & 7,
    dlfeat: v.getUint8(33) & 7,
  };
}

/** Parses an Active Namespace ID list (CNS 02h): the non-zero NSIDs, ascending. */
export function parseNamespaceList(b: Uint8Array): number[] {
  const v = view(b);
  const out: number[] = [];
  for (let i = 0; i < IDENTIFY_SIZE / 4; i++) {
    const id = v.getUint32(4 * i, true);
    if (id === 0) break;
    out.push(id);
  }
  return out;
}
