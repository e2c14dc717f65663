/**
 * TestFrontend: a vhost-user front-end for tests (what QEMU does, minus the guest): connects
 * to a back-end's socket, negotiates, shares GuestRam, sets up split rings with kick and call
 * eventfds, and issues virtio-blk requests through DriverRing. Fully asynchronous, so the
 * back-end may run in the same process.
 */
import { native, NativeFdWatcher, NativeMessageReader } from '../../native';
import { Req } from '../../vhost/protocol';
import { blkHeader, DriverRing } from './driver-ring';
import { GuestRam } from './guest-ram';

const HDR = 12;

export interface Reply {
  request: number;
  flags: number;
  payload: Buffer;
  /** fds that came with the reply (GET_INFLIGHT_FD): the caller owns and closes them. */
  fds: number[];
}

export interface SetupOptions {
  queues?: number;
  queueSize?: number;
  /** Feature bits to ack (default: everything offered except none). */
  featureMask?: bigint;
  protocolFeatures?: bigint;
  enable?: boolean;
}

export class TestFrontend {
  readonly fd: number;
  readonly ram: GuestRam;
  rings: DriverRing[] = [];
  kickFds: number[] = [];
  callFds: number[] = [];
  features = 0n;
  private readonly watcher: NativeFdWatcher;
  private readonly buf = Buffer.alloc(HDR + 4096);
  private readonly reader: NativeMessageReader = new native.MessageReader(4096);
  private waiting: Array<{ resolve: (r: Reply) => void; reject: (e: Error) => void }> = [];
  closed = false;
  private closedWaiters: Array<() => void> = [];

  constructor(socketPath: string, ram?: GuestRam) {
    this.fd = native.connectUnix(socketPath);
    this.ram = ram ?? new GuestRam();
    this.watcher = new native.FdWatcher(this.fd, () => this.onReadable(), false);
    this.watcher.start();
  }

  private onReadable(): void {
    for (;;) {
      let r;
      try {
        r = this.reader.receive(this.fd, this.buf);
      } catch (e) {
        this.markClosed(e as Error);
        return;
      }
      if (r === null) return;
      if (r.length === 0) {
        this.markClosed(new Error('back-end closed the connection'));
        return;
      }
      const reply: Reply = {
        request: this.buf.readUInt32LE(0),
        flags: this.buf.readUInt32LE(4),
        payload: Buffer.from(this.buf.subarray(HDR, r.length)),
        fds: r.fds,
      };
      const w = this.waiting.shift();
      if (w !== undefined) w.resolve(reply);
      else for (const fd of r.fds) native.close(fd);
    }
  }

  private markClosed(err: Error): void {
    if (this.closed) return;
    this.closed = true;
    this.watcher.stop();
    for (const w of this.waiting) w.reject(err);
    this.waiting = [];
    for (const c of this.closedWaiters) c();
  }

  /** Resolves when the back-end has closed the connection (or after timeoutMs, rejecting). */
  waitClosed(timeoutMs = 5000): Promise<void> {
    if (this.closed) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('back-end did not close the connection')), timeoutMs);
      this.closedWaiters.push(() => {
        clearTimeout(t);
        resolve();
      });
    });
  }

  /** Sends a raw message (header fields as given). */
  sendRaw(request: number, flags: number, payload: Buffer, fds: number[] = [], sizeField = payload.length): void {
    const m = Buffer.alloc(HDR + payload.length);
    m.writeUInt32LE(request, 0);
    m.writeUInt32LE(flags, 4);
    m.writeUInt32LE(sizeField, 8);
    payload.copy(m, HDR);
    this.sendBytes(m, fds);
  }

  /**
   * Sends `bytes` as they are (any part of a message, or several), the fds riding on the first
   * byte: for tests that cut messages at chosen points.
   */
  sendBytes(bytes: Buffer, fds: number[] = []): void {
    const n = native.sendMessage(this.fd, bytes, bytes.length, fds);
    if (n !== bytes.length) throw new Error(`test front-end: sent ${n} of ${bytes.length} bytes (the back-end does not read)`);
  }

  send(request: number, payload: Buffer = Buffer.alloc(0), fds: number[] = [], needReply = false): void {
    this.sendRaw(request, 0x1 | (needReply ? 0x8 : 0), payload, fds);
  }

  /** Sends and waits for the reply. */
  call(request: number, payload: Buffer = Buffer.alloc(0), fds: number[] = [], needReply = false, timeoutMs = 5000): Promise<Reply> {
    const p = new Promise<Reply>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`no reply to request ${request}`)), timeoutMs);
      this.waiting.push({
        resolve: (r) => {
          clearTimeout(t);
          resolve(r);
        },
        reject: (e) => {
          clearTimeout(t);
          reject(e);
        },
      });
    });
    this.send(request, payload, fds, needReply);
    return p;
  }

  async getU64(request: number): Promise<bigint> {
    return (await this.call(request)).payload.readBigUInt64LE(0);
  }

  async getConfig(offset = 0, size = 60): Promise<Buffer> {
    const p = Buffer.alloc(12 + size);
    p.writeUInt32LE(offset, 0);
    p.writeUInt32LE(size, 4);
    return (await this.call(Req.GET_CONFIG, p)).payload;
  }

  memTablePayload(): Buffer {
    const regs = this.ram.regions;
    const p = Buffer.alloc(8 + 32 * regs.length);
    p.writeUInt32LE(regs.length, 0);
    regs.forEach((r, i) => {
      const o = 8 + 32 * i;
      p.writeBigUInt64LE(BigInt(r.gpa), o);
      p.writeBigUInt64LE(BigInt(r.size), o + 8);
      p.writeBigUInt64LE(BigInt(r.uaddr), o + 16);
      p.writeBigUInt64LE(BigInt(r.mmapOffset), o + 24);
    });
    return p;
  }

  /** The QEMU start-up sequence, ending with the rings enabled. Returns the acked features. */
  async setup(opts: SetupOptions = {}): Promise<bigint> {
    const queues = opts.queues ?? 1;
    const size = opts.queueSize ?? 64;
    const offered = await this.getU64(Req.GET_FEATURES);
    this.features = offered & (opts.featureMask ?? ~0n);
    const pf = await this.getU64(Req.GET_PROTOCOL_FEATURES);
    this.send(Req.SET_PROTOCOL_FEATURES, u64(opts.protocolFeatures ?? pf));
    await this.call(Req.GET_QUEUE_NUM);
    this.send(Req.SET_OWNER);
    this.send(Req.SET_FEATURES, u64(this.features));
    this.send(Req.SET_MEM_TABLE, this.memTablePayload(), Array(this.ram.regions.length).fill(this.ram.fd));
    for (let q = 0; q < queues; q++) {
      const ring = new DriverRing(this.ram, size);
      this.rings.push(ring);
      this.send(Req.SET_VRING_NUM, state(q, size));
      this.send(Req.SET_VRING_BASE, state(q, 0));
      const a = Buffer.alloc(40);
      a.writeUInt32LE(q, 0);
      a.writeBigUInt64LE(BigInt(this.ram.uaddr(ring.descAddr)), 8);
      a.writeBigUInt64LE(BigInt(this.ram.uaddr(ring.usedAddr)), 16);
      a.writeBigUInt64LE(BigInt(this.ram.uaddr(ring.availAddr)), 24);
      this.send(Req.SET_VRING_ADDR, a);
      const kick = native.eventfd();
      const call = native.eventfd();
      this.kickFds.push(kick);
      this.callFds.push(call);
      this.send(Req.SET_VRING_KICK, u64(BigInt(q)), [kick]);
      this.send(Req.SET_VRING_CALL, u64(BigInt(q)), [call]);
      if (opts.enable !== false) this.send(Req.SET_VRING_ENABLE, state(q, 1));
    }
    // A round trip makes sure everything above was handled.
    await this.call(Req.GET_QUEUE_NUM);
    return this.features;
  }

  /**
   * Restarts ring q after GET_VRING_BASE, as QEMU does: SET_VRING_BASE `base`, new kick and
   * call eventfds, enable.
   */
  restartRing(q: number, base: number): void {
    this.send(Req.SET_VRING_BASE, state(q, base));
    const kick = native.eventfd();
    const call = native.eventfd();
    this.kickFds[q] = kick;
    this.callFds[q] = call;
    this.send(Req.SET_VRING_KICK, u64(BigInt(q)), [kick]);
    this.send(Req.SET_VRING_CALL, u64(BigInt(q)), [call]);
    this.send(Req.SET_VRING_ENABLE, state(q, 1));
  }

  /**
   * Offers `n` reads of `bytes` each (sectors `sector`, `sector` + 8, ...) on ring q in one go,
   * with one kick. Returns the status byte addresses (0xff until the back-end writes them).
   */
  offerReads(n: number, opts: { q?: number; sector?: number; bytes?: number } = {}): number[] {
    const { q = 0, sector = 0, bytes = 512 } = opts;
    const sts: number[] = [];
    for (let i = 0; i < n; i++) {
      const h = this.ram.alloc(16);
      this.ram.bytes(h, 16).set(blkHeader(0, sector + 8 * i));
      const st = this.ram.alloc(1);
      this.ram.bytes(st, 1)[0] = 0xff;
      this.rings[q].addChain([{ addr: h, len: 16 }, { addr: this.ram.alloc(bytes, 512), len: bytes, write: true }, { addr: st, len: 1, write: true }]);
      sts.push(st);
    }
    this.kick(q);
    return sts;
  }

  kick(q = 0): void {
    native.eventfdWrite(this.kickFds[q]);
  }

  /** Waits until ring q's used index reaches `target` (polling; the back-end may be in-process). */
  async waitUsedIdx(q: number, target: number, timeoutMs = 5000): Promise<void> {
    const end = Date.now() + timeoutMs;
    while (this.rings[q].usedIdx() !== (target & 0xffff)) {
      if (Date.now() > end) throw new Error(`ring ${q}: used idx ${this.rings[q].usedIdx()}, expected ${target}`);
      await new Promise((r) => setImmediate(r));
    }
  }

  /**
   * One virtio-blk request on ring q: header, optional data buffer, status byte. Returns the
   * status and the used length. `data` is copied in for writes; for reads `readLen` bytes are
   * returned in `data`.
   */
  async blk(q: number, type: number, sector: number, opts: { data?: Buffer; readLen?: number } = {}): Promise<{ status: number; len: number; data?: Buffer }> {
    const ring = this.rings[q];
    const hdr = this.ram.alloc(16);
    this.ram.bytes(hdr, 16).set(blkHeader(type, sector));
    const bufs = [{ addr: hdr, len: 16 }];
    let dataAddr = -1;
    let dataLen = 0;
    if (opts.data !== undefined) {
      dataLen = opts.data.length;
      dataAddr = this.ram.alloc(dataLen, 512);
      this.ram.bytes(dataAddr, dataLen).set(opts.data);
      bufs.push({ addr: dataAddr, len: dataLen });
    } else if (opts.readLen !== undefined) {
      dataLen = opts.readLen;
      dataAddr = this.ram.alloc(dataLen, 512);
      this.ram.bytes(dataAddr, dataLen).fill(0xee);
      bufs.push({ addr: dataAddr, len: dataLen, write: true } as never);
    }
    const st = this.ram.alloc(1, 1);
    this.ram.bytes(st, 1)[0] = 0xff;
    bufs.push({ addr: st, len: 1, write: true } as never);
    const target = (ring.usedIdx() + 1) & 0xffff;
    ring.takeUsed();
    ring.addChain(bufs);
    this.kick(q);
    await this.waitUsedIdx(q, target);
    const used = ring.takeUsed();
    return {
      status: this.ram.bytes(st, 1)[0],
      len: used[0].len,
      data: opts.readLen !== undefined ? Buffer.from(this.ram.bytes(dataAddr, dataLen)) : undefined,
    };
  }

  private fdClosed = false;

  close(): void {
    this.watcher.stop();
    this.reader.close();
    if (!this.fdClosed) native.close(this.fd);
    this.fdClosed = true;
    this.closed = true;
    for (const fd of [...this.kickFds, ...this.callFds]) native.close(fd);
    this.kickFds = [];
    this.callFds = [];
  }
}

export function u64(v: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(v);
  return b;
}

/** A message header: request, flags, payload size (vhost-user.rst "Message format"). */
export function header(request: number, size: number, flags = 0x1): Buffer {
  const b = Buffer.alloc(HDR);
  b.writeUInt32LE(request, 0);
  b.writeUInt32LE(flags, 4);
  b.writeUInt32LE(size, 8);
  return b;
}

export function state(index: number, num: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32LE(index, 0);
  b.writeUInt32LE(num >>> 0, 4);
  return b;
}
