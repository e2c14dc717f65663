/**
 * vhost-user protocol constants (vhost-user.rst, QEMU 7.x) and the virtio feature bits rnull
 * negotiates (VIRTIO 1.2 sections 5.2.3 and 6). Feature masks are bigint: they are u64 on the wire.
 */

/** Front-end request codes ("Front-end message types"). */
export const enum Req {
  GET_FEATURES = 1,
  SET_FEATURES = 2,
  SET_OWNER = 3,
  RESET_OWNER = 4,
  SET_MEM_TABLE = 5,
  SET_LOG_BASE = 6,
  SET_LOG_FD = 7,
  SET_VRING_NUM = 8,
  SET_VRING_ADDR = 9,
  SET_VRING_BASE = 10,
  GET_VRING_BASE = 11,
  SET_VRING_KICK = 12,
  SET_VRING_CALL = 13,
  SET_VRING_ERR = 14,
  GET_PROTOCOL_FEATURES = 15,
  SET_PROTOCOL_FEATURES = 16,
  GET_QUEUE_NUM = 17,
  SET_VRING_ENABLE = 18,
  GET_CONFIG = 24,
  SET_CONFIG = 25,
  GET_INFLIGHT_FD = 31,
  SET_INFLIGHT_FD = 32,
  RESET_DEVICE = 34,
  GET_MAX_MEM_SLOTS = 36,
}

/** Names for log messages, by request code. */
export const REQUEST_NAMES: Readonly<Record<number, string>> = {
  1: 'GET_FEATURES', 2: 'SET_FEATURES', 3: 'SET_OWNER', 4: 'RESET_OWNER', 5: 'SET_MEM_TABLE',
  6: 'SET_LOG_BASE', 7: 'SET_LOG_FD', 8: 'SET_VRING_NUM', 9: 'SET_VRING_ADDR', 10: 'SET_VRING_BASE',
  11: 'GET_VRING_BASE', 12: 'SET_VRING_KICK', 13: 'SET_VRING_CALL', 14: 'SET_VRING_ERR',
  15: 'GET_PROTOCOL_FEATURES', 16: 'SET_PROTOCOL_FEATURES', 17: 'GET_QUEUE_NUM', 18: 'SET_VRING_ENABLE',
  19: 'SEND_RARP', 20: 'NET_SET_MTU', 21: 'SET_BACKEND_REQ_FD', 22: 'IOTLB_MSG', 23: 'SET_VRING_ENDIAN',
  24: 'GET_CONFIG', 25: 'SET_CONFIG', 26: 'CREATE_CRYPTO_SESSION', 27: 'CLOSE_CRYPTO_SESSION',
  28: 'POSTCOPY_ADVISE', 29: 'POSTCOPY_LISTEN', 30: 'POSTCOPY_END', 31: 'GET_INFLIGHT_FD',
  32: 'SET_INFLIGHT_FD', 33: 'GPU_SET_SOCKET', 34: 'RESET_DEVICE', 35: 'VRING_KICK',
  36: 'GET_MAX_MEM_SLOTS', 37: 'ADD_MEM_REG', 38: 'REM_MEM_REG', 39: 'SET_STATUS', 40: 'GET_STATUS',
};

export function requestName(code: number): string {
  return REQUEST_NAMES[code] ?? `unknown request ${code}`;
}

/** Header: u32 request, u32 flags, u32 payload size. */
export const HEADER_SIZE = 12;
/** Largest payload accepted (SET_MEM_TABLE with 8 regions is 264 bytes; config space <= 256 + 12). */
export const MAX_PAYLOAD = 4096;
/** Header flags: bits 0-1 version (1), bit 2 reply, bit 3 need_reply. */
export const FLAG_VERSION = 0x1;
export const FLAG_VERSION_MASK = 0x3;
export const FLAG_REPLY = 0x4;
export const FLAG_NEED_REPLY = 0x8;

/** Memory regions in SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS). */
export const MAX_MEM_REGIONS = 8;

/** Payload of SET_VRING_KICK/CALL/ERR: bits 0-7 ring index, bit 8 "no fd" (polling). */
export const VRING_IDX_MASK = 0xff;
export const VRING_NOFD_MASK = 0x100;

/** Protocol feature bits (GET/SET_PROTOCOL_FEATURES). */
export const enum ProtocolFeature {
  MQ = 0,
  LOG_SHMFD = 1,
  REPLY_ACK = 3,
  BACKEND_REQ = 5,
  CONFIG = 9,
  INFLIGHT_SHMFD = 12,
  CONFIGURE_MEM_SLOTS = 15,
}

/** virtio feature bits: device-independent (6) and virtio-blk (5.2.3). */
export const enum Feature {
  BLK_SIZE_MAX = 1,
  BLK_SEG_MAX = 2,
  BLK_GEOMETRY = 4,
  BLK_RO = 5,
  BLK_BLK_SIZE = 6,
  BLK_FLUSH = 9,
  BLK_TOPOLOGY = 10,
  BLK_CONFIG_WCE = 11,
  BLK_MQ = 12,
  BLK_DISCARD = 13,
  BLK_WRITE_ZEROES = 14,
  RING_INDIRECT_DESC = 28,
  RING_EVENT_IDX = 29,
  /** VHOST_USER_F_PROTOCOL_FEATURES: the back-end speaks GET/SET_PROTOCOL_FEATURES. */
  VHOST_USER_PROTOCOL_FEATURES = 30,
  VERSION_1 = 32,
}

export function bit(n: number): bigint {
  return 1n << BigInt(n);
}

export function hasBit(mask: bigint, n: number): boolean {
  return (mask & bit(n)) !== 0n;
}
