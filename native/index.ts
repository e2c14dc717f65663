/**
 * Typed binding of the native shim (native/*.cc, built by binding.gyp into
 * build/Release/rnull_native.node). See each C++ file for the contract of its functions.
 */
import * as path from 'path';
import * as errors from './errors';

/** One region of a vhost-user memory table; every field in bytes (vhost-user.rst, "Memory regions"). */
export interface MemoryRegionSpec {
  gpa: number;
  size: number;
  uaddr: number;
  mmapOffset: number;
  fd: number;
}

/** The mapped memory table; chunk i is the i-th (at most 1 GiB) piece of the regions in order. */
export interface NativeGuestMemory {
  chunks(): ArrayBuffer[];
  /**
   * Per region, in table order (empty once unmapped): its size in bytes, the index of its first
   * chunk, and its host address modulo the page size (where it starts inside a DMA mapping).
   */
  regionLayout(): { size: number; firstChunk: number; hostPageOffset: number }[];
  unmap(): void;
}

export interface VirtqueueConfig {
  memory: NativeGuestMemory;
  /** Ring size in descriptors: a power of two, 1..1024. */
  size: number;
  /** Front-end virtual addresses of the descriptor table, avail ring and used ring. */
  descAddr: number;
  availAddr: number;
  usedAddr: number;
  /** Next avail index to read (SET_VRING_BASE). */
  lastAvailIdx: number;
  eventIdx: boolean;
  indirect: boolean;
  /** size * MAX_SEGMENTS * SEGMENT_WORDS words: [chunk, offset, length, flags] per segment, by head. */
  segments: Uint32Array;
  /** size * BATCH_WORDS words: [head, segmentCount, chainError] per popped chain. */
  batch: Uint32Array;
  /** size * 2 words: [head, bytesWritten] per used element to publish. */
  used: Uint32Array;
  /**
   * Optional: [monotonic ns at the last pop, used elements published by the last pop(n)], and
   * optionally [2]: written by the caller, the polling spin of pop() ends by this monotonic ns
   * (0: no limit), e.g. when a request timer is due; such a cut spin keeps the budget; and [3]:
   * written by pop(), the pollId of the virtqueue of this thread its spin gave way to because
   * that one had new work (-1: none).
   */
  info?: Float64Array;
  /** A batch ends after the chain that brings its buffers to this many bytes (0: no limit). */
  batchBytes?: number;
  /**
   * Most guest descriptors in one chain (an indirect table's own descriptor not counted; 0: no
   * limit). A longer chain is chain error 8 (soft: the status byte is still reported).
   */
  maxDescriptors?: number;
  /**
   * Most bytes in one chain, summed over its descriptors (0: no limit). A larger chain is
   * chain error 9 (soft). Chains above 2^32 - 1 bytes are refused whatever this says (2.7.4).
   */
  maxBytes?: number;
}

export interface VirtqueueState {
  ready: boolean;
  broken: boolean;
  brokenReason: string;
  lastAvailIdx: number;
  usedIdx: number;
  inflight: number;
  calls: number;
  pollNs: number;
  spins: number;
  spinHits: number;
  /** Polling spins ended early because another virtqueue of this thread had work. */
  spinYields: number;
  /** An inflight region block is attached (setInflight). */
  inflightTracked: boolean;
  /** Heads to resubmit that pop() has not returned yet. */
  resubmitPending: number;
  /** The next inflight counter value. */
  inflightCounter: number;
}

/** Virtqueue.setInflight options (vhost-user.rst "Inflight I/O tracking", split layout). */
export interface InflightAttach {
  /** The mapped inflight region: a GuestMemory of exactly one region. */
  region: NativeGuestMemory;
  /** Byte offset of this queue's block in the region (a multiple of 64). */
  offset: number;
  /** Entries in the block (desc_num), at least the ring size. */
  descNum: number;
  /** Next counter value, 1 .. 2^53 - 1. */
  counter: number;
  /** Where the avail ring goes on. */
  lastAvailIdx: number;
  /** Heads to resubmit before any avail entry, oldest first (distinct, below the ring size). */
  resubmit: Uint16Array;
}

export interface NativeVirtqueue {
  /** Unique in the process, never reused: what another virtqueue's pop() reports in info[3]. */
  readonly pollId: number;
  configure(config: VirtqueueConfig): void;
  setCallFd(fd: number): void;
  /** Adaptive busy-polling limit in ns after a batch (0: sleep on the kick eventfd at once). */
  setPolling(maxNs: number): void;
  /**
   * Chains popped into the batch (0: none), or -1 once the queue is broken. pop(n) first
   * publishes used[0..n) as push(n) does (info[1] = how many); pop(n, max) pops at most max;
   * pop(n, max, true) pops only heads still to resubmit (setInflight), never from the avail ring.
   */
  pop(publish?: number, max?: number, resubmitOnly?: boolean): number;
  /**
   * Tracks the ring in an inflight region from now on (after configure, before any pop).
   * @throws RangeError when the block does not fit the region or the ring (nothing changes).
   */
  setInflight(options: InflightAttach): void;
  /** Signals the call eventfd once. */
  signal(): void;
  /** Publishes used[0..n); returns how many were published. */
  push(n: number): number;
  /** Stops the ring; returns the next avail index (for GET_VRING_BASE). */
  stop(): number;
  state(): VirtqueueState;
}

/** A CLOCK_MONOTONIC timerfd armed at absolute deadlines (native/timer.h). */
export interface NativeTimer {
  readonly fd: number;
  /** Fires once at `deadlineNs` (monotonicNs() units); re-arming replaces the deadline. */
  arm(deadlineNs: number): void;
  disarm(): void;
  close(): void;
}

/**
 * The data of a memory-backed disk (native/page_store.h): a file on tmpfs (or a memfd) mapped
 * shared, sparse, shareable by worker threads. Positions and lengths in bytes; unwritten bytes
 * read as zeroes. RangeError outside the array or beyond `size`; Error once closed.
 */
export interface NativePageStore {
  /** Process-wide id: `new PageStore(id)` on another thread attaches to this store. */
  readonly id: number;
  /** Capacity in bytes (the file's size). */
  readonly size: number;
  /** 4 KiB pages the file holds (written and not discarded since). */
  readonly pageCount: number;
  /** Memory the file takes, in bytes (its st_blocks * 512). */
  readonly bytesAllocated: number;
  /** Returns 0, or an errno (ENOSPC: the file system is full) when nothing new could be allocated. */
  write(pos: number, src: Uint8Array, srcOffset: number, length: number): number;
  read(pos: number, dst: Uint8Array, dstOffset: number, length: number): void;
  /** Whole pages become holes (memory freed), partial pages are zeroed. */
  discard(pos: number, length: number): void;
  /** Unmaps and closes the file (its lock released); every thread's handle fails after. */
  close(): void;
}

/**
 * How a store is made: `size` bytes (a positive multiple of 4096) in a new memfd, or, with `fd`,
 * in that file (duplicated, locked with flock; must be a regular file on tmpfs of `size` bytes,
 * or empty, or any size when `fresh`: it is then emptied). Errors carry `code`: 'ESTORETYPE',
 * 'ESTOREFS' (not tmpfs), 'ESTORESIZE' (another size), or are SyscallErrors (flock EWOULDBLOCK:
 * another process holds it).
 */
export interface PageStoreSpec {
  size: number;
  fd?: number;
  fresh?: boolean;
}

export interface NativeFdWatcher {
  start(): void;
  stop(): void;
}

/** The kinds of fd a front-end may send (native/fd_ops.h). */
export type FdKind = 'eventfd' | 'memfd' | 'regular' | 'hugetlbfs' | 'other';

export interface ReceivedMessage {
  /** Bytes of the message in the buffer (header + payload); 0 at end of stream. */
  length: number;
  fds: number[];
}

/**
 * One connection's vhost-user message assembly: reads never wait and never go past the end of
 * the message being assembled; fds must ride on a message's first byte (at most 8 per message).
 */
export interface NativeMessageReader {
  /**
   * Reads what the socket has. A complete message is copied into buf (header + payload; buf
   * must hold 12 + maxPayload bytes) and returned with its fds, which the caller then owns;
   * null when none is complete yet; `{ length: 0, fds: [] }` at end of stream. Throws Error
   * for a malformed stream (payload over maxPayload, fds in the middle of a message, too many
   * fds), SyscallError if recvmsg fails; every fd held is closed first.
   */
  receive(fd: number, buf: Buffer): ReceivedMessage | null;
  /** Bytes of a message not complete yet (0 between messages). */
  readonly buffered: number;
  /** The request code of the message not complete yet, once its first 4 bytes are in; else -1. */
  readonly pendingRequest: number;
  /** Drops a partial message and closes its fds; the reader cannot be used after. */
  close(): void;
}

/** An inherited socket's kind (native/socket_info.cc). */
export interface SocketInfo {
  domain: 'unix' | 'inet' | 'inet6' | 'other';
  type: 'stream' | 'dgram' | 'seqpacket' | 'other';
  listening: boolean;
  /** The bound unix path; '@name' for an abstract socket; '' when unbound or not unix. */
  path: string;
}

interface NativeAddon {
  initialize(errorClass: typeof errors.SyscallError): void;
  close(fd: number): void;
  /** A close-on-exec duplicate of fd. */
  dup(fd: number): number;
  eventfd(): number;
  eventfdRead(fd: number): number;
  eventfdWrite(fd: number): void;
  /**
   * A close-on-exec memfd of `size` bytes, sealed against shrinking and growing (F_SEAL_SHRINK |
   * F_SEAL_GROW | F_SEAL_SEAL, as QEMU's memory-backend-memfd) unless `seal` is false.
   */
  memfdCreate(name: string, size: number, seal?: boolean): number;
  /** What fd refers to (native/fd_ops.h ClassifyFd); SyscallError (EBADF) for a closed fd. */
  fdKind(fd: number): FdKind;
  /** memmove(dst + dstOffset, src + srcOffset, length); RangeError outside either array. */
  copyBytes(dst: Uint8Array, dstOffset: number, src: Uint8Array, srcOffset: number, length: number): void;
  /**
   * A listening non-blocking unix socket at path; with `mode` (permission bits) and `gid` (>= 0),
   * the socket file gets them before it listens.
   */
  listenUnix(path: string, mode?: number, gid?: number): number;
  connectUnix(path: string): number;
  acceptUnix(fd: number): number;
  /** Assembles one connection's messages without waiting (native/socket.cc, vhost_framing.h). */
  MessageReader: new (maxPayload: number) => NativeMessageReader;
  /**
   * Sends buf[0..length) with one non-blocking sendmsg, the fds (SCM_RIGHTS, at most 8) riding
   * on its first byte. Never waits: returns the bytes sent, which is less than `length` (0 when
   * nothing was sent) when the peer's socket buffer is full. SyscallError for other failures
   * (EPIPE once the peer hung up).
   */
  sendMessage(fd: number, buf: Buffer, length: number, fds?: number[]): number;
  FdWatcher: new (fd: number, callback: (status: number) => void, drainEventfd: boolean) => NativeFdWatcher;
  /**
   * Sets (on) or clears O_NONBLOCK on fd (other flags kept); returns whether it was set.
   * The flag is shared with every holder of the same open file description.
   */
  setNonBlocking(fd: number, on: boolean): boolean;
  GuestMemory: new (regions: MemoryRegionSpec[]) => NativeGuestMemory;
  Virtqueue: new () => NativeVirtqueue;
  Timer: new () => NativeTimer;
  /**
   * A spec: a new store (PageStoreSpec); an id: that store, opened on any thread (Error if gone
   * or closed); nothing: a new memfd store of 64 GiB.
   */
  PageStore: new (specOrId?: PageStoreSpec | number) => NativePageStore;
  /** CLOCK_MONOTONIC in nanoseconds. */
  monotonicNs(): number;
  /**
   * Busy-waits (CPU pause loop, no syscall but clock_gettime) until CLOCK_MONOTONIC reaches
   * `deadlineNs`, or `maxNs` nanoseconds have passed, whichever comes first; returns the time
   * then (monotonicNs() units). For deadlines too close for a timerfd wake-up (native/timer.cc).
   * RangeError for a negative or non-finite maxNs, or one above 1e9 (1 s).
   */
  spinUntil(deadlineNs: number, maxNs: number): number;
  /**
   * Pins the calling thread (pid 0 of sched_setaffinity: this thread only, not the process) to
   * these CPU numbers (0-1023). RangeError for an empty list or a bad number; SyscallError
   * (EINVAL) when none of them is allowed to the thread or online (native/affinity.cc).
   */
  setThreadAffinity(cpus: number[]): void;
  /** The CPUs the calling thread may run on, ascending (sched_getaffinity of this thread). */
  threadAffinity(): number[];
  /**
   * Sends `message` as one datagram to the unix datagram socket `address` (a path, or '@name'
   * for an abstract socket, as $NOTIFY_SOCKET writes it), without waiting (native/sd_notify.cc).
   * Returns the bytes sent. RangeError for an empty or over-long address or an empty message;
   * SyscallError from socket/sendto (EAGAIN when the receiver's queue is full).
   */
  notifySend(address: string, message: string): number;
  /**
   * What `fd` is: null if not a socket, else its domain, type, whether it listens
   * (SO_ACCEPTCONN) and its bound unix path ('@name' abstract, '' none). SyscallError (EBADF)
   * for a closed fd (native/socket_info.cc).
   */
  socketInfo(fd: number): SocketInfo | null;
  virtqueueConstants: { MAX_QUEUE_SIZE: number; MAX_SEGMENTS: number; SEGMENT_WORDS: number; BATCH_WORDS: number };
}

// eslint-disable-next-line @typescript-eslint/no-var-requires
// The package root: one folder up from the source (native/index.ts, run by ts-jest), two from
// the build (dist/native/index.js).
const root = __filename.endsWith('.ts') ? path.join(__dirname, '..') : path.join(__dirname, '..', '..');
const addon: NativeAddon = require(path.join(root, 'build', 'Release', 'rnull_native.node'));
addon.initialize(errors.SyscallError);

export const native = addon;
export const { MAX_QUEUE_SIZE, MAX_SEGMENTS, SEGMENT_WORDS, BATCH_WORDS } = addon.virtqueueConstants;
/**
 * Re-exported as a plain value and its type. A re-export (`export { X }`) compiles to a getter
 * defined over a data property, which turns this module's exports object into dictionary mode:
 * every load of the constants above on the data path then became a generic inline-cache call
 * in optimized code (one fifth of `node bench/micro/dispatch.js`'s time).
 */
export const SyscallError = errors.SyscallError;
export type SyscallError = errors.SyscallError;
