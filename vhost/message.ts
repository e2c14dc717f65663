/**
 * vhost-user message codec: syntax only (sizes, field ranges), no device state. Each reader
 * throws MessageError naming the message and what was wrong; the connection logs it and
 * disconnects (vhost-user.rst gives no way to reject a malformed message otherwise).
 */
import type { MemRegion } from '../virtqueue/guest-memory';
import { FLAG_VERSION, FLAG_VERSION_MASK, HEADER_SIZE, MAX_MEM_REGIONS, VRING_IDX_MASK, VRING_NOFD_MASK, requestName } from './protocol';

export class MessageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'MessageError';
  }
}

/** A received message: header fields, a view of its payload, and the fds that came with it. */
export interface Message {
  request: number;
  flags: number;
  payload: Buffer;
  fds: number[];
}

export interface VringState {
  index: number;
  num: number;
}

/** SET_VRING_ADDR: the front-end's virtual addresses of the three ring parts (bytes). */
export interface VringAddr {
  index: number;
  flags: number;
  descAddr: number;
  usedAddr: number;
  availAddr: number;
  logAddr: number;
}

export interface ConfigAccess {
  offset: number;
  size: number;
  flags: number;
  data: Buffer;
}

export interface VringFile {
  index: number;
  /** true when bit 8 says no fd rides along (the front-end polls / wants polling). */
  noFd: boolean;
}

function expectSize(msg: Message, size: number): void {
  if (msg.payload.length !== size) {
    throw new MessageError(`${requestName(msg.request)}: payload is ${msg.payload.length} bytes, expected ${size}`);
  }
}

/** A u64 field as a number; values above 2^53 are refused (no address or size here is that big). */
function safeU64(buf: Buffer, offset: number, what: string): number {
  const v = buf.readBigUInt64LE(offset);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new MessageError(`${what} 0x${v.toString(16)} is out of range`);
  return Number(v);
}

export function readU64(msg: Message): bigint {
  expectSize(msg, 8);
  return msg.payload.readBigUInt64LE(0);
}

export function readVringState(msg: Message): VringState {
  expectSize(msg, 8);
  return { index: msg.payload.readUInt32LE(0), num: msg.payload.readUInt32LE(4) };
}

export function readVringAddr(msg: Message): VringAddr {
  expectSize(msg, 40);
  const p = msg.payload;
  const name = requestName(msg.request);
  return {
    index: p.readUInt32LE(0),
    flags: p.readUInt32LE(4),
    descAddr: safeU64(p, 8, `${name}: descriptor table address`),
    usedAddr: safeU64(p, 16, `${name}: used ring address`),
    availAddr: safeU64(p, 24, `${name}: avail ring address`),
    logAddr: safeU64(p, 32, `${name}: log address`),
  };
}

/**
 * SET_VRING_KICK/CALL/ERR: a u64 whose bits 0-7 are the ring index and bit 8 the invalid-fd
 * flag; every other bit is reserved and refused (vhost-user.rst "SET_VRING_KICK"). One fd rides
 * along unless the flag is set.
 */
export function readVringFile(msg: Message): VringFile {
  const raw = readU64(msg);
  if ((raw & ~BigInt(VRING_IDX_MASK | VRING_NOFD_MASK)) !== 0n) {
    throw new MessageError(`${requestName(msg.request)}: reserved bits set in 0x${raw.toString(16)} (only bits 0-8 are defined)`);
  }
  const v = Number(raw);
  const noFd = (v & VRING_NOFD_MASK) !== 0;
  const expectedFds = noFd ? 0 : 1;
  if (msg.fds.length !== expectedFds) {
    throw new MessageError(`${requestName(msg.request)}: ${msg.fds.length} fds attached, expected ${expectedFds}`);
  }
  return { index: v & VRING_IDX_MASK, noFd };
}

/** SET_MEM_TABLE: u32 nregions, u32 padding, then 32 bytes per region; one fd per region. */
export function readMemTable(msg: Message): MemRegion[] {
  const p = msg.payload;
  if (p.length < 8) throw new MessageError(`SET_MEM_TABLE: payload of ${p.length} bytes is shorter than 8`);
  const n = p.readUInt32LE(0);
  if (n === 0 || n > MAX_MEM_REGIONS) throw new MessageError(`SET_MEM_TABLE: ${n} regions, expected 1 to ${MAX_MEM_REGIONS}`);
  expectSize(msg, 8 + 32 * n);
  if (msg.fds.length !== n) throw new MessageError(`SET_MEM_TABLE: ${msg.fds.length} fds for ${n} regions`);
  const regions: MemRegion[] = [];
  for (let i = 0; i < n; i++) {
    const o = 8 + 32 * i;
    regions.push({
      gpa: safeU64(p, o, `SET_MEM_TABLE: region ${i} guest address`),
      size: safeU64(p, o + 8, `SET_MEM_TABLE: region ${i} size`),
      uaddr: safeU64(p, o + 16, `SET_MEM_TABLE: region ${i} user address`),
      mmapOffset: safeU64(p, o + 24, `SET_MEM_TABLE: region ${i} mmap offset`),
    });
  }
  return regions;
}

/** GET_CONFIG/SET_CONFIG: u32 offset, u32 size, u32 flags, then size bytes. */
export function readConfigAccess(msg: Message): ConfigAccess {
  const p = msg.payload;
  if (p.length < 12) throw new MessageError(`${requestName(msg.request)}: payload of ${p.length} bytes is shorter than 12`);
  const offset = p.readUInt32LE(0);
  const size = p.readUInt32LE(4);
  if (size !== p.length - 12) {
    throw new MessageError(`${requestName(msg.request)}: size field ${size} does not match the ${p.length - 12} bytes sent`);
  }
  return { offset, size, flags: p.readUInt32LE(8), data: p.subarray(12) };
}

export interface Header {
  request: number;
  flags: number;
  /** Payload size in bytes. */
  size: number;
}

/**
 * The header at buf[0..12) (vhost-user.rst "Message format": u32 request, u32 flags, u32 size).
 * @throws MessageError when buf is shorter than a header or the version (flags bits 0-1) is not 1
 */
export function readHeader(buf: Buffer): Header {
  if (buf.length < HEADER_SIZE) throw new MessageError(`message of ${buf.length} bytes is shorter than its ${HEADER_SIZE}-byte header`);
  const request = buf.readUInt32LE(0);
  const flags = buf.readUInt32LE(4);
  if ((flags & FLAG_VERSION_MASK) !== FLAG_VERSION) {
    throw new MessageError(`${requestName(request)}: header version ${flags & FLAG_VERSION_MASK}, expected ${FLAG_VERSION}`);
  }
  return { request, flags, size: buf.readUInt32LE(8) };
}

/** Writes a header into buf[0..12). */
export function writeHeader(buf: Buffer, request: number, flags: number, size: number): void {
  buf.writeUInt32LE(request, 0);
  buf.writeUInt32LE(flags, 4);
  buf.writeUInt32LE(size, 8);
}

export { HEADER_SIZE };
