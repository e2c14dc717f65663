/**
 * VhostUserBlkDevice: the vhost-user back-end state of one disk, with one handler per
 * front-end message (vhost-user.rst, "Front-end message types"), named after it.
 *
 * The connection (connection.ts) checks header syntax and which messages may carry fds; the
 * handlers here check meaning (ring indexes, sizes, negotiated features) and throw
 * VhostUserError for anything wrong, which ends the connection with a logged error.
 *
 * Ring life cycle (vhost-user.rst "Ring states"): a ring starts when SET_VRING_KICK arrives
 * with memory, size and addresses known; it is processed while also enabled (always, unless
 * VHOST_USER_F_PROTOCOL_FEATURES was negotiated, then after SET_VRING_ENABLE 1); it stops at
 * GET_VRING_BASE, which answers only once the ring's in-flight requests have completed.
 */
import type { Logger } from 'pino';
import { Disk, hctxOf } from '../block/disk';
import { MAX_QUEUE_SIZE, native } from '../native';
import { VirtioBlkQueue } from '../virtqueue/blk-queue';
import { GuestMemoryMap } from '../virtqueue/guest-memory';
import { blkConfigSpace, blkFeatures, OFF_WRITEBACK } from './blk-config';
import {
  Message,
  readConfigAccess,
  readMemTable,
  readU64,
  readVringAddr,
  readVringFile,
  readVringState,
} from './message';
import { bit, Feature, hasBit, ProtocolFeature, Req } from './protocol';
import type { QueueThreads } from './queue-threads';
import { closeFd, Vring } from './vring';
import { getInflightFd, setInflightFd, type InflightTarget } from './inflight-fd';
import type { InflightRegion } from '../virtqueue/inflight-region';

export class VhostUserError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'VhostUserError';
  }
}

/** Protocol features offered (GET_PROTOCOL_FEATURES). */
export const PROTOCOL_FEATURES =
  bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG) | bit(ProtocolFeature.INFLIGHT_SHMFD);

/**
 * A handler's answer: a payload for messages that have their own reply, `undefined` for
 * success without one, or `false` for a refusal that keeps the connection (REPLY_ACK failure).
 */
export type HandlerResult = Buffer | undefined | false | FdReply;

/** A reply payload with fds riding along (GET_INFLIGHT_FD); the connection closes them once sent. */
export interface FdReply {
  payload: Buffer;
  fds: number[];
}

type Handler = (msg: Message) => HandlerResult | Promise<HandlerResult>;

export interface MessageSpec {
  handler: Handler;
  /** The message has a reply of its own (REPLY_ACK does not apply). */
  hasReply: boolean;
  /** The message may carry fds (all others must not). */
  fds: boolean;
}

export class VhostUserBlkDevice {
  readonly disk: Disk;
  readonly numQueues: number;
  readonly vrings: Vring[];
  private readonly log: Logger;
  private readonly offered: bigint;
  private readonly config: Buffer;
  private features = 0n;
  private protocolFeatures = 0n;
  private memory: GuestMemoryMap | null = null;
  /** The inflight region (GET/SET_INFLIGHT_FD) the rings track their requests in, if any. */
  private inflight: InflightRegion | null = null;
  /**
   * Bumped when the front-end goes away (detach) and by reset: a handler that awaited something
   * checks it before acting, so a message still pending when its connection closed neither
   * maps memory nor starts a ring afterwards.
   */
  private epoch = 0;
  readonly specs: ReadonlyMap<number, MessageSpec>;
  /**
   * Told when the device can no longer serve the front-end (a worker thread was lost with
   * its rings): the connection then ends, with this reason logged.
   */
  onFailure: ((error: Error) => void) | null = null;

  /**
   * @param pollUs busy-poll limit per virtqueue after a batch, in microseconds (0: none)
   * @param threads worker threads serving some of the rings (`threads` > 1); null: all rings
   *   run on this thread
   */
  constructor(
    disk: Disk,
    numQueues: number,
    log: Logger,
    private readonly pollUs = 0,
    private readonly threads: QueueThreads | null = null,
  ) {
    if (numQueues > disk.tagSet.nrHwQueues) {
      throw new RangeError(`num-queues ${numQueues} exceeds the tag set's ${disk.tagSet.nrHwQueues} hardware queues`);
    }
    this.disk = disk;
    this.numQueues = numQueues;
    this.log = log;
    this.offered = blkFeatures(disk);
    this.config = blkConfigSpace(disk, numQueues);
    this.vrings = [];
    for (let i = 0; i < numQueues; i++) {
      this.vrings.push(new Vring(i, threads?.remoteQueue(i) ?? new VirtioBlkQueue(i, hctxOf(disk, i), disk, log)));
    }
    const s = new Map<number, MessageSpec>();
    const def = (req: Req, handler: Handler, hasReply = false, fds = false): void => {
      s.set(req, { handler: handler.bind(this), hasReply, fds });
    };
    def(Req.GET_FEATURES, this.getFeatures, true);
    def(Req.SET_FEATURES, this.setFeatures);
    def(Req.GET_PROTOCOL_FEATURES, this.getProtocolFeatures, true);
    def(Req.SET_PROTOCOL_FEATURES, this.setProtocolFeatures);
    def(Req.SET_OWNER, this.setOwner);
    def(Req.RESET_OWNER, this.resetOwner);
    def(Req.GET_QUEUE_NUM, this.getQueueNum, true);
    def(Req.GET_CONFIG, this.getConfig, true);
    def(Req.SET_CONFIG, this.setConfig);
    def(Req.SET_MEM_TABLE, this.setMemTable, false, true);
    def(Req.SET_VRING_NUM, this.setVringNum);
    def(Req.SET_VRING_ADDR, this.setVringAddr);
    def(Req.SET_VRING_BASE, this.setVringBase);
    def(Req.GET_VRING_BASE, this.getVringBase, true);
    def(Req.SET_VRING_KICK, this.setVringKick, false, true);
    def(Req.SET_VRING_CALL, this.setVringCall, false, true);
    def(Req.SET_VRING_ERR, this.setVringErr, false, true);
    def(Req.SET_VRING_ENABLE, this.setVringEnable);
    def(Req.GET_INFLIGHT_FD, this.getInflightFd, true);
    def(Req.SET_INFLIGHT_FD, this.setInflightFd, false, true);
    this.specs = s;
    threads?.onLost((e) => this.onFailure?.(e));
  }

  /** True while a memory table is mapped (SET_MEM_TABLE until the next reset). */
  get hasMemory(): boolean {
    return this.memory !== null;
  }

  /** True once REPLY_ACK was negotiated. */
  get replyAck(): boolean {
    return hasBit(this.protocolFeatures, ProtocolFeature.REPLY_ACK);
  }

  /**
   * The front-end is gone: a handler still pending stops at its next step (throwing
   * VhostUserError) instead of mapping memory or starting rings. Call reset() once it settled.
   */
  detach(): void {
    this.epoch++;
  }

  /** Throws if the front-end went away (detach/reset) since `epoch` was read. */
  private checkEpoch(epoch: number, what: string): void {
    if (this.epoch !== epoch) throw new VhostUserError(`${what}: the connection closed while it was pending`);
  }

  /**
   * Back to the state of a fresh connection: stops every ring (waiting for in-flight requests),
   * closes eventfds, unmaps guest memory, forgets negotiated features.
   */
  async reset(): Promise<void> {
    this.epoch++;
    // A ring on a lost worker thread fails to stop: everything else is still reset.
    try {
      await this.stopRings();
    } finally {
      for (const r of this.vrings) r.reset();
      this.features = 0n;
      this.protocolFeatures = 0n;
      if (this.disk.writeCache && this.config[OFF_WRITEBACK] !== 1) {
        // A new front-end finds the device as reset: write cache in writeback.
        (this.disk.ops.setWriteCache as (on: boolean) => void)(true);
        this.config[OFF_WRITEBACK] = 1;
      }
      try {
        await this.releaseMemory();
      } finally {
        await this.dropInflight();
      }
    }
  }

  // --- feature negotiation -------------------------------------------------------------

  private getFeatures(): HandlerResult {
    return u64(this.offered);
  }

  private setFeatures(msg: Message): HandlerResult {
    const f = readU64(msg);
    if ((f & ~this.offered) !== 0n) {
      throw new VhostUserError(`SET_FEATURES acks features 0x${(f & ~this.offered).toString(16)} that were not offered`);
    }
    this.features = f;
    return undefined;
  }

  private getProtocolFeatures(): HandlerResult {
    return u64(PROTOCOL_FEATURES);
  }

  private setProtocolFeatures(msg: Message): HandlerResult {
    const f = readU64(msg);
    if ((f & ~PROTOCOL_FEATURES) !== 0n) {
      throw new VhostUserError(`SET_PROTOCOL_FEATURES acks 0x${(f & ~PROTOCOL_FEATURES).toString(16)} that were not offered`);
    }
    this.protocolFeatures = f;
    return undefined;
  }

  private setOwner(): HandlerResult {
    return undefined;
  }

  private async resetOwner(): Promise<HandlerResult> {
    await this.reset();
    return undefined;
  }

  private getQueueNum(): HandlerResult {
    return u64(BigInt(this.numQueues));
  }

  // --- config space ----------------------------------------------------------------------

  private getConfig(msg: Message): HandlerResult {
    const a = readConfigAccess(msg);
    const reply = Buffer.alloc(12 + a.size);
    reply.writeUInt32LE(a.offset, 0);
    reply.writeUInt32LE(a.size, 4);
    reply.writeUInt32LE(a.flags, 8);
    if (a.offset > this.config.length || a.size > this.config.length - a.offset) {
      this.log.error({ offset: a.offset, size: a.size }, 'GET_CONFIG outside the config space');
      return Buffer.alloc(0); // "zero length of payload to indicate an error"
    }
    this.config.copy(reply, 12, a.offset, a.offset + a.size);
    return reply;
  }

  /**
   * SET_CONFIG: only the one-byte `writeback` field is writable, and only when
   * VIRTIO_BLK_F_CONFIG_WCE was negotiated (5.2.4); anything else is refused.
   */
  private setConfig(msg: Message): HandlerResult {
    const a = readConfigAccess(msg);
    if (this.disk.writeCache && hasBit(this.features, Feature.BLK_CONFIG_WCE) && a.offset === OFF_WRITEBACK && a.size === 1 && a.data[0] <= 1) {
      const writeback = a.data[0] === 1;
      (this.disk.ops.setWriteCache as (on: boolean) => void)(writeback);
      this.config[OFF_WRITEBACK] = a.data[0];
      this.log.info({ writeback }, writeback ? 'guest switched the write cache to writeback' : 'guest switched the write cache to writethrough');
      return undefined;
    }
    this.log.warn({ offset: a.offset, size: a.size }, 'SET_CONFIG refused: only the writeback byte of a disk with a write cache is writable');
    return false;
  }

  // --- memory ----------------------------------------------------------------------------

  private async setMemTable(msg: Message): Promise<HandlerResult> {
    const epoch = this.epoch;
    const regions = readMemTable(msg);
    const fds = msg.fds.splice(0);
    let map: GuestMemoryMap;
    try {
      map = new GuestMemoryMap(regions, fds);
    } catch (e) {
      for (const fd of fds) closeFd(fd);
      throw new VhostUserError(`SET_MEM_TABLE: ${(e as Error).message}`);
    }
    try {
      // Running rings move to the new table: stop them (their requests finish on the old one),
      // swap, restart where they stopped. Worker threads map the table themselves.
      const running = this.vrings.filter((r) => r.queue.isRunning);
      for (const r of running) r.base = await r.queue.stop();
      this.checkEpoch(epoch, 'new table');
      await this.releaseMemory();
      this.checkEpoch(epoch, 'new table');
      this.disk.ops.memoryMapped?.(map.table); // e.g. DMA mappings for a device driver
      this.memory = map;
      if (this.threads !== null) await this.threads.mapMemory(regions, fds);
      this.checkEpoch(epoch, 'new table'); // reset() unmaps what was mapped meanwhile
      this.log.info({ regions: regions.length, bytes: map.size }, 'guest memory mapped');
      for (const r of running) await this.startRing(r, epoch);
    } catch (e) {
      if (this.memory !== map) map.release(); // failed before the new table was taken
      throw new VhostUserError(`SET_MEM_TABLE: ${(e as Error).message}`);
    } finally {
      for (const fd of fds) closeFd(fd); // the mappings keep the memory alive
    }
    return undefined;
  }

  /** Unmaps guest memory here, then on the worker threads (which refuse while a ring runs). */
  private async releaseMemory(): Promise<void> {
    if (this.memory !== null) {
      this.disk.ops.memoryReleased?.(this.memory.table);
      this.memory.release();
      this.memory = null;
      if (this.threads !== null) await this.threads.releaseMemory();
    }
  }

  // --- inflight region (vhost-user.rst "Inflight I/O tracking"; inflight-fd.ts) ----------

  private readonly inflightTarget: InflightTarget = {
    numQueues: 0,
    adopt: async (region, fd) => {
      if (this.threads !== null) await this.threads.mapInflight?.(fd, region.description);
      this.inflight = region;
    },
    drop: () => this.dropInflight(),
  };

  private async dropInflight(): Promise<void> {
    if (this.inflight !== null) {
      this.inflight.release();
      this.inflight = null;
    }
    if (this.threads !== null) await this.threads.releaseInflight?.();
  }

  /** Refuses a new region while a ring tracks into the current one (QEMU sends it before rings start). */
  private checkNoRingRuns(what: string): void {
    const r = this.vrings.find((v) => v.queue.isRunning);
    if (r !== undefined) throw new VhostUserError(`${what} while ring ${r.index} runs`);
  }

  private async getInflightFd(msg: Message): Promise<HandlerResult> {
    this.checkNoRingRuns('GET_INFLIGHT_FD');
    return getInflightFd(msg, { ...this.inflightTarget, numQueues: this.numQueues }, this.log);
  }

  private async setInflightFd(msg: Message): Promise<HandlerResult> {
    try {
      this.checkNoRingRuns('SET_INFLIGHT_FD');
    } catch (e) {
      for (const fd of msg.fds.splice(0)) closeFd(fd);
      throw e;
    }
    return (await setInflightFd(msg, { ...this.inflightTarget, numQueues: this.numQueues }, this.log)) ? undefined : false;
  }

  // --- rings -------------------------------------------------------------------------------

  private ring(index: number, what: string): Vring {
    const r = this.vrings[index];
    if (r === undefined) throw new VhostUserError(`${what}: ring ${index} does not exist (${this.numQueues} queues)`);
    return r;
  }

  private setVringNum(msg: Message): HandlerResult {
    const { index, num } = readVringState(msg);
    const r = this.ring(index, 'SET_VRING_NUM');
    const max = MAX_QUEUE_SIZE;
    if (num === 0 || num > max || (num & (num - 1)) !== 0) {
      throw new VhostUserError(`SET_VRING_NUM: ring size ${num} is not a power of two from 1 to ${max}`);
    }
    r.num = num;
    return undefined;
  }

  private setVringAddr(msg: Message): HandlerResult {
    const a = readVringAddr(msg);
    this.ring(a.index, 'SET_VRING_ADDR').addr = a;
    return undefined;
  }

  private setVringBase(msg: Message): HandlerResult {
    const { index, num } = readVringState(msg);
    if (num > 0xffff) throw new VhostUserError(`SET_VRING_BASE: index ${num} does not fit 16 bits`);
    this.ring(index, 'SET_VRING_BASE').base = num;
    return undefined;
  }

  private async getVringBase(msg: Message): Promise<HandlerResult> {
    const epoch = this.epoch;
    const { index } = readVringState(msg);
    const r = this.ring(index, 'GET_VRING_BASE');
    if (r.queue.isRunning) r.base = await r.queue.stop();
    this.checkEpoch(epoch, 'GET_VRING_BASE');
    r.closeFds();
    const reply = Buffer.alloc(8);
    reply.writeUInt32LE(index, 0);
    reply.writeUInt32LE(r.base, 4);
    return reply;
  }

  private async setVringKick(msg: Message): Promise<HandlerResult> {
    const f = readVringFile(msg);
    const r = this.ring(f.index, 'SET_VRING_KICK');
    if (f.noFd) throw new VhostUserError('SET_VRING_KICK without an fd: polling mode is not supported');
    requireEventfd(msg, 'SET_VRING_KICK');
    const epoch = this.epoch;
    // A running ring moves to the new kick fd: stopped first (its watcher holds the old one).
    if (r.queue.isRunning) r.base = await r.queue.stop();
    this.checkEpoch(epoch, 'SET_VRING_KICK'); // the fd stays in msg: the connection closes it
    r.setKickFd(msg.fds[0]);
    msg.fds.length = 0;
    await this.startRing(r, epoch);
    return undefined;
  }

  private async setVringCall(msg: Message): Promise<HandlerResult> {
    const f = readVringFile(msg);
    const r = this.ring(f.index, 'SET_VRING_CALL');
    if (!f.noFd) requireEventfd(msg, 'SET_VRING_CALL');
    const fd = f.noFd ? -1 : msg.fds[0];
    msg.fds.length = 0;
    await r.setCallFd(fd);
    return undefined;
  }

  private setVringErr(msg: Message): HandlerResult {
    const f = readVringFile(msg);
    const r = this.ring(f.index, 'SET_VRING_ERR');
    if (!f.noFd) requireEventfd(msg, 'SET_VRING_ERR');
    r.setErrFd(f.noFd ? -1 : msg.fds[0]);
    msg.fds.length = 0;
    return undefined;
  }

  private async setVringEnable(msg: Message): Promise<HandlerResult> {
    const { index, num } = readVringState(msg);
    const r = this.ring(index, 'SET_VRING_ENABLE');
    if (num > 1) throw new VhostUserError(`SET_VRING_ENABLE: state ${num} is neither 0 nor 1`);
    r.enabled = num === 1;
    await r.queue.setEnabled(this.ringEnabled(r));
    return undefined;
  }

  private ringEnabled(r: Vring): boolean {
    return hasBit(this.features, Feature.VHOST_USER_PROTOCOL_FEATURES) ? r.enabled : true;
  }

  /** Starts ring r, unless the front-end went away since `epoch` (then throws VhostUserError). */
  private async startRing(r: Vring, epoch: number): Promise<void> {
    this.checkEpoch(epoch, `ring ${r.index} start`);
    if (this.memory === null) throw new VhostUserError(`ring ${r.index} started before SET_MEM_TABLE`);
    if (r.num === 0 || r.addr === null) throw new VhostUserError(`ring ${r.index} started before its size and addresses were set`);
    try {
      await r.queue.start(
        {
          memory: this.memory,
          size: r.num,
          descAddr: r.addr.descAddr,
          availAddr: r.addr.availAddr,
          usedAddr: r.addr.usedAddr,
          lastAvailIdx: r.base,
          eventIdx: hasBit(this.features, Feature.RING_EVENT_IDX),
          indirect: hasBit(this.features, Feature.RING_INDIRECT_DESC),
          kickFd: r.kickFd,
          callFd: r.callFd,
          pollUs: this.pollUs,
          inflight: this.inflight,
        },
        this.ringEnabled(r),
      );
    } catch (e) {
      throw new VhostUserError(`ring ${r.index}: ${(e as Error).message}`);
    }
    this.log.debug({ queue: r.index, size: r.num, base: r.base }, 'ring started');
  }

  /** Stops every running ring; all are tried, the first failure is rethrown after. */
  private async stopRings(): Promise<void> {
    let failure: unknown = null;
    for (const r of this.vrings) {
      if (!r.queue.isRunning) continue;
      try {
        r.base = await r.queue.stop();
      } catch (e) {
        failure ??= e;
      }
    }
    if (failure !== null) throw failure;
  }
}

/**
 * Kick, call and err fds must be eventfds (vhost-user.rst, "SET_VRING_KICK"): the rings read
 * and write them as 8-byte counters, and a pipe, FIFO, socket or file could block or spin the
 * thread. Throws VhostUserError naming the message and the fd's kind (the connection then
 * closes the message's fds and disconnects).
 */
function requireEventfd(msg: Message, name: string): void {
  const kind = native.fdKind(msg.fds[0]);
  if (kind !== 'eventfd') throw new VhostUserError(`${name}: expected an eventfd, got an fd of kind ${kind}`);
}

function u64(v: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(v);
  return b;
}
