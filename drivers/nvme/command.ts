/**
 * NVMe submission queue entries (64 bytes) and completion queue entries (16 bytes), built and
 * read in place in queue memory (NVM Express Base 1.4, 4.2 "Submission Queue Entry" and 4.6
 * "Completion Queue Entry"; admin commands in section 5, NVM commands in NVM Command Set 1.0 /
 * Base 1.4 section 6). All fields little-endian. Addresses (PRPs) are IOVAs in bytes.
 */

export const SQE_SIZE = 64;
export const CQE_SIZE = 16;

/** Admin command opcodes (1.4, figure 139). */
export const enum AdminOpcode {
  DeleteIoSq = 0x00,
  CreateIoSq = 0x01,
  GetLogPage = 0x02,
  DeleteIoCq = 0x04,
  CreateIoCq = 0x05,
  Identify = 0x06,
  Abort = 0x08,
  SetFeatures = 0x09,
  GetFeatures = 0x0a,
  DoorbellBufferConfig = 0x7c,
}

/** NVM command set opcodes (1.4, figure 346). */
export const enum NvmOpcode {
  Flush = 0x00,
  Write = 0x01,
  Read = 0x02,
  WriteZeroes = 0x08,
  DatasetManagement = 0x09,
}

/** Identify CNS values (1.4, figure 244). */
export const enum IdentifyCns {
  Namespace = 0x00,
  Controller = 0x01,
  ActiveNamespaceList = 0x02,
}

/** Feature identifiers (1.4, figure 271). */
export const enum FeatureId {
  VolatileWriteCache = 0x06,
  NumberOfQueues = 0x07,
}

/** The fields of one command; unset dwords are zero. */
export interface CommandFields {
  opcode: number;
  /** Namespace ID (0 when the command has none). */
  nsid?: number;
  /** Data pointer: PRP entry 1 and 2 (IOVAs; PRP2 may be a PRP list IOVA). */
  prp1?: number;
  prp2?: number;
  cdw10?: number;
  cdw11?: number;
  cdw12?: number;
  cdw13?: number;
  cdw14?: number;
  cdw15?: number;
}

function u32(name: string, v: number | undefined): number {
  if (v === undefined) return 0;
  if (!Number.isInteger(v) || v < 0 || v > 0xffffffff) throw new RangeError(`${name} ${v} is not a 32-bit unsigned value`);
  return v;
}

function setU64(view: DataView, at: number, name: string, v: number | undefined): void {
  if (v === undefined) v = 0;
  if (!Number.isSafeInteger(v) || v < 0) throw new RangeError(`${name} ${v} is not a non-negative safe integer`);
  view.setUint32(at, v % 0x100000000, true);
  view.setUint32(at + 4, Math.floor(v / 0x100000000), true);
}

/**
 * Writes one SQE at `offset` of `view` (PSDT = 0: PRPs; FUSE = 0), with command identifier `cid`.
 * RangeError for a field out of range; nothing is written then.
 */
export function writeSqe(view: DataView, offset: number, cid: number, f: CommandFields): void {
  if (!Number.isInteger(f.opcode) || f.opcode < 0 || f.opcode > 0xff) throw new RangeError(`opcode ${f.opcode}`);
  if (!Number.isInteger(cid) || cid < 0 || cid > 0xffff) throw new RangeError(`command id ${cid}`);
  const dw = [f.nsid, f.cdw10, f.cdw11, f.cdw12, f.cdw13, f.cdw14, f.cdw15].map((v, i) => u32(`dword ${i}`, v));
  for (const [n, v] of [['PRP1', f.prp1], ['PRP2', f.prp2]] as const) {
    if (v !== undefined && (!Number.isSafeInteger(v) || v < 0 || v % 4 !== 0)) {
      throw new RangeError(`${n} 0x${v.toString(16)} must be a dword-aligned IOVA`);
    }
  }
  if (offset < 0 || offset + SQE_SIZE > view.byteLength) throw new RangeError('SQE outside the queue');
  view.setUint32(offset, (f.opcode | (cid << 16)) >>> 0, true); // CDW0: OPC, FUSE=0, PSDT=0, CID
  view.setUint32(offset + 4, dw[0]!, true); // NSID
  view.setUint32(offset + 8, 0, true); // CDW2
  view.setUint32(offset + 12, 0, true); // CDW3
  setU64(view, offset + 16, 'MPTR', 0);
  setU64(view, offset + 24, 'PRP1', f.prp1);
  setU64(view, offset + 32, 'PRP2', f.prp2);
  for (let i = 0; i < 6; i++) view.setUint32(offset + 40 + 4 * i, dw[i + 1]!, true);
}

/** A completion queue entry, decoded. */
export interface Completion {
  /** Command specific dword 0 (e.g. granted queue counts for Set Features Number of Queues). */
  dw0: number;
  dw1: number;
  /** SQ head pointer when the controller posted this entry. */
  sqHead: number;
  sqId: number;
  cid: number;
  /** Status field without the phase bit: SC bits 0-7, SCT 8-10, CRD 11-12, M 13, DNR 14. */
  status: number;
}

/** Reads the CQE at `offset` (its phase bit is read by the caller first). */
export function readCqe(view: DataView, offset: number): Completion {
  const dw2 = view.getUint32(offset + 8, true);
  const dw3 = view.getUint32(offset + 12, true);
  return {
    dw0: view.getUint32(offset, true),
    dw1: view.getUint32(offset + 4, true),
    sqHead: dw2 & 0xffff,
    sqId: dw2 >>> 16,
    cid: dw3 & 0xffff,
    status: dw3 >>> 17,
  };
}

/** Status Code Type and Status Code (1.4, 4.6.1.2). */
export function statusCode(status: number): { sct: number; sc: number; dnr: boolean; more: boolean; crd: number } {
  return { sc: status & 0xff, sct: (status >>> 8) & 7, crd: (status >>> 11) & 3, more: (status & 0x2000) !== 0, dnr: (status & 0x4000) !== 0 };
}

/** A command that completed with a non-zero status. */
export class NvmeStatusError extends Error {
  override name = 'NvmeStatusError';
  readonly sct: number;
  readonly sc: number;
  readonly dnr: boolean;
  constructor(
    what: string,
    readonly status: number,
  ) {
    const s = statusCode(status);
    super(`${what} failed: status code type ${s.sct}, status code 0x${s.sc.toString(16)}${s.dnr ? ' (do not retry)' : ''}`);
    this.sct = s.sct;
    this.sc = s.sc;
    this.dnr = s.dnr;
  }
}

// ---------------------------------------------------------------------------
// Command builders (fields only; the queue writes them with its command id)
// ---------------------------------------------------------------------------

/** Identify (1.4, 5.15): CNS in CDW10, 4 KiB of data into `buffer`. */
export function identify(cns: IdentifyCns, nsid: number, buffer: number): CommandFields {
  return { opcode: AdminOpcode.Identify, nsid, prp1: buffer, cdw10: cns };
}

/**
 * Set Features Number of Queues (1.4, 5.21.1.7): asks for `sq` I/O submission and `cq`
 * completion queues (each 1..65535). The completion's dw0 says what was granted.
 */
export function setNumberOfQueues(sq: number, cq: number): CommandFields {
  for (const n of [sq, cq]) if (!Number.isInteger(n) || n < 1 || n > 65535) throw new RangeError(`queue count ${n}`);
  return { opcode: AdminOpcode.SetFeatures, cdw10: FeatureId.NumberOfQueues, cdw11: (((cq - 1) << 16) | (sq - 1)) >>> 0 };
}

/** Granted counts from a Number of Queues completion's dw0 (each 1-based). */
export function grantedQueues(dw0: number): { sq: number; cq: number } {
  return { sq: (dw0 & 0xffff) + 1, cq: (dw0 >>> 16) + 1 };
}

function checkQueue(qid: number, entries: number): void {
  if (!Number.isInteger(qid) || qid < 1 || qid > 0xffff) throw new RangeError(`I/O queue id ${qid} not in 1..65535`);
  if (!Number.isInteger(entries) || entries < 2 || entries > 65536) throw new RangeError(`queue size ${entries} not in 2..65536`);
}

/**
 * Create I/O Completion Queue (1.4, 5.3): physically contiguous at `iova`, `entries` slots,
 * interrupts enabled on MSI-X `vector` when `vector` is given, else polled (IEN=0).
 */
export function createIoCq(qid: number, entries: number, iova: number, vector: number | null): CommandFields {
  checkQueue(qid, entries);
  if (vector !== null && (!Number.isInteger(vector) || vector < 0 || vector > 2047)) throw new RangeError(`vector ${vector}`);
  const ien = vector !== null ? 2 : 0;
  return {
    opcode: AdminOpcode.CreateIoCq,
    prp1: iova,
    cdw10: (((entries - 1) << 16) | qid) >>> 0,
    cdw11: (((vector ?? 0) << 16) | ien | 1) >>> 0, // PC = 1
  };
}

/** Create I/O Submission Queue (1.4, 5.4): contiguous at `iova`, bound to completion queue `cqid`. */
export function createIoSq(qid: number, entries: number, iova: number, cqid: number): CommandFields {
  checkQueue(qid, entries);
  return {
    opcode: AdminOpcode.CreateIoSq,
    prp1: iova,
    cdw10: (((entries - 1) << 16) | qid) >>> 0,
    cdw11: ((cqid << 16) | 1) >>> 0, // QPRIO = 0 (urgent, unused with RR), PC = 1
  };
}

/**
 * Doorbell Buffer Config (NVMe 1.3, 5.7; offered when OACS bit 8 is set): PRP1 the Shadow
 * Doorbell buffer, PRP2 the EventIdx buffer, each one memory page at a page-aligned IOVA.
 * RangeError for an address that is not page aligned.
 */
export function doorbellBufferConfig(shadowIova: number, eventIdxIova: number, pageSize = 4096): CommandFields {
  for (const a of [shadowIova, eventIdxIova]) {
    if (!Number.isSafeInteger(a) || a <= 0 || a % pageSize !== 0) throw new RangeError(`doorbell buffer address 0x${a.toString(16)} is not page aligned`);
  }
  return { opcode: AdminOpcode.DoorbellBufferConfig, prp1: shadowIova, prp2: eventIdxIova };
}

export function deleteIoSq(qid: number): CommandFields {
  return { opcode: AdminOpcode.DeleteIoSq, cdw10: qid };
}

export function deleteIoCq(qid: number): CommandFields {
  return { opcode: AdminOpcode.DeleteIoCq, cdw10: qid };
}

/**
 * Read or Write (NVM 1.4, 6.9 / 6.15): `blocks` logical blocks (1..65536) from `slba`, data at
 * PRP1/PRP2. `fua` sets Force Unit Access (CDW12 bit 30).
 */
export function readWrite(
  op: NvmOpcode.Read | NvmOpcode.Write,
  nsid: number,
  slba: number,
  blocks: number,
  prp1: number,
  prp2 = 0,
  fua = false,
): CommandFields {
  if (!Number.isSafeInteger(slba) || slba < 0) throw new RangeError(`starting LBA ${slba}`);
  if (!Number.isInteger(blocks) || blocks < 1 || blocks > 65536) throw new RangeError(`block count ${blocks} not in 1..65536`);
  return {
    opcode: op,
    nsid,
    prp1,
    prp2,
    cdw10: slba % 0x100000000,
    cdw11: Math.floor(slba / 0x100000000),
    cdw12: ((blocks - 1) | (fua ? 1 << 30 : 0)) >>> 0,
  };
}

export function flush(nsid: number): CommandFields {
  return { opcode: NvmOpcode.Flush, nsid };
}
