/**
 * DriverRing: the driver (guest) side of a split virtqueue laid out in GuestRam, for tests.
 * Builds descriptor tables and avail entries by hand — well-formed or deliberately broken —
 * and reads the used ring (VIRTIO 1.2 section 2.7).
 */
import type { GuestMemoryMap } from '../../virtqueue/guest-memory';
import type { VringSetup } from '../../virtqueue/ring-queue';
import type { GuestRam } from './guest-ram';

export const DESC_F_NEXT = 1;
export const DESC_F_WRITE = 2;
export const DESC_F_INDIRECT = 4;

export interface Desc {
  addr: number;
  len: number;
  flags?: number;
  next?: number;
}

export interface Buf {
  addr: number;
  len: number;
  write?: boolean;
}

export class DriverRing {
  readonly descAddr: number;
  readonly availAddr: number;
  readonly usedAddr: number;
  private availIdx = 0;
  private lastUsed = 0;
  private freeHead = 0;

  constructor(
    readonly ram: GuestRam,
    readonly size: number,
  ) {
    this.descAddr = ram.alloc(16 * size, 16);
    this.availAddr = ram.alloc(6 + 2 * size, 2);
    this.usedAddr = ram.alloc(6 + 8 * size, 4);
  }

  /** Size and ring addresses as a front-end gives them (SET_VRING_NUM/ADDR: front-end virtual addresses). */
  frontEndAddrs(): { size: number; descAddr: number; availAddr: number; usedAddr: number } {
    return { size: this.size, descAddr: this.ram.uaddr(this.descAddr), availAddr: this.ram.uaddr(this.availAddr), usedAddr: this.ram.uaddr(this.usedAddr) };
  }

  /** What VirtioBlkQueue.start (or a worker's RemoteQueue) takes to serve this ring: no event idx, no indirect, no polling. */
  setup(memory: GuestMemoryMap, kickFd: number, callFd = -1): VringSetup {
    return { memory, ...this.frontEndAddrs(), lastAvailIdx: 0, eventIdx: false, indirect: false, kickFd, callFd, pollUs: 0 };
  }

  setDesc(i: number, d: Desc): void {
    writeDesc(this.ram.bytes(this.descAddr + 16 * i, 16), d);
  }

  /** Puts `head` in the avail ring and bumps avail->idx (no kick). */
  offer(head: number): void {
    const a = this.ram.bytes(this.availAddr, 6 + 2 * this.size);
    a.writeUInt16LE(head, 4 + 2 * (this.availIdx % this.size));
    this.availIdx = (this.availIdx + 1) & 0xffff;
    a.writeUInt16LE(this.availIdx, 2);
  }

  /** Sets avail->idx directly (to fake a corrupt index). */
  setAvailIdx(v: number): void {
    this.ram.bytes(this.availAddr, 4).writeUInt16LE(v & 0xffff, 2);
  }

  setAvailFlags(v: number): void {
    this.ram.bytes(this.availAddr, 2).writeUInt16LE(v, 0);
  }

  /** used_event (after the avail ring), for VIRTIO_RING_F_EVENT_IDX. */
  setUsedEvent(v: number): void {
    this.ram.bytes(this.availAddr + 4 + 2 * this.size, 2).writeUInt16LE(v & 0xffff, 0);
  }

  availEvent(): number {
    return this.ram.bytes(this.usedAddr + 4 + 8 * this.size, 2).readUInt16LE(0);
  }

  usedIdx(): number {
    return this.ram.bytes(this.usedAddr, 4).readUInt16LE(2);
  }

  /** Used elements published since the last call: [{ id, len }]. */
  takeUsed(): Array<{ id: number; len: number }> {
    const out: Array<{ id: number; len: number }> = [];
    const idx = this.usedIdx();
    const u = this.ram.bytes(this.usedAddr, 4 + 8 * this.size);
    while (this.lastUsed !== idx) {
      const e = 4 + 8 * (this.lastUsed % this.size);
      out.push({ id: u.readUInt32LE(e), len: u.readUInt32LE(e + 4) });
      this.lastUsed = (this.lastUsed + 1) & 0xffff;
    }
    return out;
  }

  /**
   * Writes a chain of buffers into descriptors starting at a free slot (wrapping), offers it,
   * and returns its head. Descriptor slots are reused round-robin, so callers keep fewer than
   * `size` descriptors in flight.
   */
  addChain(bufs: Buf[]): number {
    const head = this.freeHead;
    for (let k = 0; k < bufs.length; k++) {
      const i = (head + k) % this.size;
      const last = k === bufs.length - 1;
      this.setDesc(i, {
        addr: bufs[k].addr,
        len: bufs[k].len,
        flags: (bufs[k].write ? DESC_F_WRITE : 0) | (last ? 0 : DESC_F_NEXT),
        next: last ? 0 : (head + k + 1) % this.size,
      });
    }
    this.freeHead = (head + bufs.length) % this.size;
    this.offer(head);
    return head;
  }

  /** Like addChain, but the buffers sit in an indirect table referenced by one descriptor. */
  addIndirectChain(bufs: Buf[]): number {
    const table = this.ram.alloc(16 * bufs.length, 16);
    for (let k = 0; k < bufs.length; k++) {
      const last = k === bufs.length - 1;
      writeDesc(this.ram.bytes(table + 16 * k, 16), {
        addr: bufs[k].addr,
        len: bufs[k].len,
        flags: (bufs[k].write ? DESC_F_WRITE : 0) | (last ? 0 : DESC_F_NEXT),
        next: last ? 0 : k + 1,
      });
    }
    const head = this.freeHead;
    this.setDesc(head, { addr: table, len: 16 * bufs.length, flags: DESC_F_INDIRECT });
    this.freeHead = (head + 1) % this.size;
    this.offer(head);
    return head;
  }
}

export function writeDesc(b: Buffer, d: Desc): void {
  b.writeBigUInt64LE(BigInt(d.addr), 0);
  b.writeUInt32LE(d.len >>> 0, 8);
  b.writeUInt16LE(d.flags ?? 0, 12);
  b.writeUInt16LE(d.next ?? 0, 14);
}

/** A virtio-blk request header: type, sector (512-byte units). */
export function blkHeader(type: number, sector: number): Buffer {
  const h = Buffer.alloc(16);
  h.writeUInt32LE(type, 0);
  h.writeBigUInt64LE(BigInt(sector), 8);
  return h;
}

/**
 * Offers a 512-byte read of `sector` (512-byte units) on `ring`: header, a device-writable data
 * buffer and a status byte preset to 0xff. Returns the status byte's guest address.
 */
export function offerRead(ram: GuestRam, ring: DriverRing, sector: number): number {
  const h = ram.alloc(16);
  ram.bytes(h, 16).set(blkHeader(0, sector));
  const st = ram.alloc(1);
  ram.bytes(st, 1)[0] = 0xff;
  ring.addChain([{ addr: h, len: 16 }, { addr: ram.alloc(512, 512), len: 512, write: true }, { addr: st, len: 1, write: true }]);
  return st;
}
