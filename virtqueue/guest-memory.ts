/**
 * GuestMemoryMap: the front-end's memory table mapped into this process, with one Buffer view
 * per chunk (at most 1 GiB each; native/guest_memory.h). Segment words name a chunk and an
 * offset inside it, so guest data is read and written in place, never copied into the JS heap.
 *
 * release() unmaps the table; the views become empty (detached), so a late access finds no
 * bytes instead of unmapped memory. Release only once no virtqueue or request uses the table.
 */
import { native, NativeGuestMemory } from '../native';

/**
 * One guest memory region (vhost-user SET_MEM_TABLE): guest-physical address, size in bytes,
 * the front-end's virtual address of its start, and its byte offset into the region's fd.
 */
export interface MemRegion {
  gpa: number;
  size: number;
  uaddr: number;
  mmapOffset: number;
}

export class GuestMemoryMap {
  readonly table: NativeGuestMemory;
  readonly views: Buffer[];
  readonly regions: readonly MemRegion[];

  /**
   * Maps each region from its fd (fds[i] for regions[i]). The fds are not closed here.
   * @throws RangeError for empty, wrapping or overlapping regions; SyscallError if mmap fails.
   */
  constructor(regions: readonly MemRegion[], fds: readonly number[]) {
    this.regions = regions;
    this.table = new native.GuestMemory(regions.map((r, i) => ({ ...r, fd: fds[i] })));
    this.views = this.table.chunks().map((ab) => Buffer.from(ab));
  }

  release(): void {
    this.table.unmap();
  }

  /** Total mapped bytes. */
  get size(): number {
    return this.regions.reduce((n, r) => n + r.size, 0);
  }
}
