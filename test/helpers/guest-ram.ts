/**
 * GuestRam: "guest memory" for tests — one memfd split into regions at chosen guest-physical
 * and front-end virtual addresses (deliberately different, so translation mistakes show), with
 * a bump allocator and accessors by guest-physical address.
 */
import { native, NativeGuestMemory } from '../../native';
import { GuestMemoryMap, type MemRegion } from '../../virtqueue/guest-memory';

export interface RamLayout {
  gpa: number;
  size: number;
  uaddr: number;
}

/** Two 4 MiB regions: one low, one above 4 GiB, with front-end addresses elsewhere. */
export const DEFAULT_LAYOUT: RamLayout[] = [
  { gpa: 0x0, size: 4 << 20, uaddr: 0x7f0000000000 },
  { gpa: 0x100000000, size: 4 << 20, uaddr: 0x7f1000000000 },
];

export class GuestRam {
  readonly fd: number;
  readonly regions: MemRegion[];
  readonly table: NativeGuestMemory;
  readonly views: Buffer[];
  private next: number[];

  constructor(layout: RamLayout[] = DEFAULT_LAYOUT) {
    const total = layout.reduce((n, r) => n + r.size, 0);
    this.fd = native.memfdCreate('rnull-test-ram', total);
    let off = 0;
    this.regions = layout.map((r) => {
      const reg = { gpa: r.gpa, size: r.size, uaddr: r.uaddr, mmapOffset: off };
      off += r.size;
      return reg;
    });
    this.table = new native.GuestMemory(this.regions.map((r) => ({ ...r, fd: this.fd })));
    this.views = this.table.chunks().map((ab) => Buffer.from(ab));
    this.next = this.regions.map((r) => r.gpa);
  }

  /** Allocates `len` bytes in region `region`, aligned; returns the guest-physical address. */
  alloc(len: number, align = 16, region = 0): number {
    const r = this.regions[region];
    const a = Math.ceil(this.next[region] / align) * align;
    if (a + len > r.gpa + r.size) throw new Error('test guest RAM exhausted');
    this.next[region] = a + len;
    return a;
  }

  /** The last `len` bytes of region `region` (for buffers that end at a region edge). */
  regionEnd(region: number, len: number): number {
    const r = this.regions[region];
    return r.gpa + r.size - len;
  }

  private locate(gpa: number): { view: Buffer; off: number } {
    for (let i = 0; i < this.regions.length; i++) {
      const r = this.regions[i];
      if (gpa >= r.gpa && gpa < r.gpa + r.size) return { view: this.views[i], off: gpa - r.gpa };
    }
    throw new Error(`gpa 0x${gpa.toString(16)} not in test RAM`);
  }

  /** A Buffer over [gpa, gpa+len) (must not cross a region). */
  bytes(gpa: number, len: number): Buffer {
    const { view, off } = this.locate(gpa);
    return view.subarray(off, off + len);
  }

  /** Front-end virtual address of a guest-physical address. */
  uaddr(gpa: number): number {
    for (const r of this.regions) if (gpa >= r.gpa && gpa < r.gpa + r.size) return r.uaddr + (gpa - r.gpa);
    throw new Error(`gpa 0x${gpa.toString(16)} not in test RAM`);
  }

  /** The back-end's own mapping of these regions, as SET_MEM_TABLE would give it (release it first). */
  memoryMap(): GuestMemoryMap {
    return new GuestMemoryMap(this.regions, this.regions.map(() => this.fd));
  }

  close(): void {
    this.table.unmap();
    native.close(this.fd);
  }
}
