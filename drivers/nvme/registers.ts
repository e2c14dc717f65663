/**
 * NVMe controller registers in BAR0 (NVM Express Base Specification 1.4, section 3.1 "Register
 * Definition"): offsets, field decoding and encoding. Pure functions over numbers; no I/O.
 */

/** Register offsets in BAR0, bytes. */
export const enum Reg {
  /** Controller Capabilities, 64-bit. */
  CAP = 0x00,
  /** Version, 32-bit. */
  VS = 0x08,
  INTMS = 0x0c,
  INTMC = 0x10,
  /** Controller Configuration, 32-bit. */
  CC = 0x14,
  /** Controller Status, 32-bit. */
  CSTS = 0x1c,
  /** Admin Queue Attributes, 32-bit. */
  AQA = 0x24,
  /** Admin Submission Queue Base Address, 64-bit. */
  ASQ = 0x28,
  /** Admin Completion Queue Base Address, 64-bit. */
  ACQ = 0x30,
  /** First doorbell (SQ 0 tail). */
  DOORBELLS = 0x1000,
}

/** The 32/64-bit register access the controller code needs (a mapped BAR0, or a fake). */
export interface RegisterIo {
  read32(offset: number): number;
  write32(offset: number, value: number): void;
  /** A 64-bit register as two 32-bit loads, low dword first. */
  read64(offset: number): bigint;
}

/** CAP decoded (1.4, 3.1.1). Times in milliseconds, sizes in bytes. */
export interface Capabilities {
  /** Maximum Queue Entries Supported, as a count (MQES + 1). */
  maxQueueEntries: number;
  /** Contiguous Queues Required. */
  contiguousQueues: boolean;
  /** Arbitration mechanisms beyond round robin (bit 0: weighted RR, bit 1: vendor). */
  ams: number;
  /** Worst-case time for CSTS.RDY to change after CC.EN changes: CAP.TO x 500 ms. */
  readyTimeoutMs: number;
  /** Doorbell stride, bytes (4 << DSTRD). */
  doorbellStride: number;
  /** NVM Subsystem Reset Supported. */
  subsystemReset: boolean;
  /** Command Sets Supported bitmap (bit 0: NVM command set; bit 7: no I/O command set). */
  css: number;
  /** Boot Partition Support. */
  bootPartitions: boolean;
  /** Memory page size minimum / maximum, bytes (2^(12 + MPSMIN/MPSMAX)). */
  pageSizeMin: number;
  pageSizeMax: number;
  /** Controller Memory Buffer Supported. */
  cmbs: boolean;
}

function bits(v: bigint, lo: number, width: number): number {
  return Number((v >> BigInt(lo)) & ((1n << BigInt(width)) - 1n));
}

export function decodeCap(cap: bigint): Capabilities {
  return {
    maxQueueEntries: bits(cap, 0, 16) + 1,
    contiguousQueues: bits(cap, 16, 1) === 1,
    ams: bits(cap, 17, 2),
    readyTimeoutMs: bits(cap, 24, 8) * 500,
    doorbellStride: 4 << bits(cap, 32, 4),
    subsystemReset: bits(cap, 36, 1) === 1,
    css: bits(cap, 37, 8),
    bootPartitions: bits(cap, 45, 1) === 1,
    pageSizeMin: 2 ** (12 + bits(cap, 48, 4)),
    pageSizeMax: 2 ** (12 + bits(cap, 52, 4)),
    cmbs: bits(cap, 57, 1) === 1,
  };
}

/** VS as "major.minor.tertiary" (1.4, 3.1.2). */
export function decodeVersion(vs: number): string {
  return `${vs >>> 16}.${(vs >>> 8) & 0xff}.${vs & 0xff}`;
}

/** CC fields (1.4, 3.1.5). */
export const CC_EN = 1 << 0;
export const CC_SHN_MASK = 3 << 14;
export const CC_SHN_NORMAL = 1 << 14;
export const CC_SHN_ABRUPT = 2 << 14;

export interface ControllerConfig {
  /** I/O Command Set Selected (0: NVM). */
  css: number;
  /** Memory page size, bytes: a power of two from 4096. */
  pageSize: number;
  /** Arbitration Mechanism Selected (0: round robin). */
  ams: number;
  /** I/O SQ / CQ entry sizes, bytes (64 and 16 for NVM). */
  sqEntrySize: number;
  cqEntrySize: number;
}

/** CC with EN=0 and SHN=0 for the given configuration; OR in CC_EN to enable. */
export function encodeCc(c: ControllerConfig): number {
  const log2 = (n: number, what: string): number => {
    const l = Math.log2(n);
    if (!Number.isInteger(l)) throw new RangeError(`${what} ${n} is not a power of two`);
    return l;
  };
  const mps = log2(c.pageSize, 'page size') - 12;
  if (mps < 0 || mps > 15) throw new RangeError(`page size ${c.pageSize} out of range`);
  return (
    (((c.css & 7) << 4) | (mps << 7) | ((c.ams & 7) << 11) | (log2(c.sqEntrySize, 'SQ entry size') << 16) |
      (log2(c.cqEntrySize, 'CQ entry size') << 20)) >>>
    0
  );
}

/** CSTS decoded (1.4, 3.1.6). */
export interface ControllerStatus {
  ready: boolean;
  /** Controller Fatal Status. */
  fatal: boolean;
  /** Shutdown Status: 0 normal, 1 in progress, 2 complete. */
  shutdownStatus: number;
  /** NVM Subsystem Reset Occurred. */
  subsystemResetOccurred: boolean;
  processingPaused: boolean;
  /** The register read as all ones: the device is gone (surprise removal) or the link is down. */
  allOnes: boolean;
}

export const SHST_COMPLETE = 2;

export function decodeCsts(csts: number): ControllerStatus {
  return {
    ready: (csts & 1) !== 0,
    fatal: (csts & 2) !== 0,
    shutdownStatus: (csts >>> 2) & 3,
    subsystemResetOccurred: (csts & 0x10) !== 0,
    processingPaused: (csts & 0x20) !== 0,
    allOnes: csts >>> 0 === 0xffffffff,
  };
}

/** AQA: admin queue sizes in entries (each 2..4096). */
export function encodeAqa(sqEntries: number, cqEntries: number): number {
  for (const n of [sqEntries, cqEntries]) {
    if (!Number.isInteger(n) || n < 2 || n > 4096) throw new RangeError(`admin queue size ${n} not in 2..4096`);
  }
  return (((cqEntries - 1) << 16) | (sqEntries - 1)) >>> 0;
}

/** Offset in BAR0 of queue `qid`'s SQ tail doorbell (1.4, 3.1.24). */
export function sqTailDoorbell(qid: number, stride: number): number {
  return Reg.DOORBELLS + 2 * qid * stride;
}

/** Offset in BAR0 of queue `qid`'s CQ head doorbell (1.4, 3.1.25). */
export function cqHeadDoorbell(qid: number, stride: number): number {
  return Reg.DOORBELLS + (2 * qid + 1) * stride;
}
