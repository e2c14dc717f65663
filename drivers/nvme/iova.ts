/**
 * An IOVA allocator over the usable ranges the IOMMU reports (VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE).
 *
 * Two front-ends (two disks of one controller, two VMs) have overlapping guest-physical
 * addresses, so every DMA mapping gets its own IOVA from here. The allocator never hands out:
 * addresses outside the reported ranges, the x86 MSI window 0xfee00000..0xfeefffff (writes there
 * are interrupt messages, not memory; VFIO normally reports it as a hole, this keeps out of it
 * even when the kernel does not), or anything below `floor` (default 64 KiB, so that a zero or
 * small bogus PRP never hits a mapping).
 *
 * First fit over a sorted free list, with coalescing on free. Addresses and sizes in bytes;
 * every address and size is a multiple of `granule` (the IOMMU page size).
 */

/** An inclusive address range [start, end]. */
export interface AddressRange {
  start: number;
  end: number;
}

/** The x86 MSI address window (Intel SDM vol. 3, 11.11.1), inclusive. */
export const MSI_WINDOW: AddressRange = { start: 0xfee00000, end: 0xfeefffff };

export interface IovaAllocatorOptions {
  /** Allocation unit, bytes (a power of two; default 4096). */
  granule?: number;
  /** Lowest address handed out (default 0x10000). */
  floor?: number;
  /** Further ranges to keep out of, inclusive (the MSI window is always excluded). */
  reserved?: AddressRange[];
}

/** Thrown when no free range can hold an allocation. */
export class IovaExhaustedError extends Error {
  override name = 'IovaExhaustedError';
}

/** A free extent [start, start + size). */
interface Extent {
  start: number;
  size: number;
}

export class IovaAllocator {
  readonly granule: number;
  /** Free extents, sorted by start, never adjacent (always coalesced). */
  private free: Extent[] = [];
  /** Live allocations: start -> size. */
  private readonly live = new Map<number, number>();
  private readonly total: number;

  /**
   * `ranges`: the usable IOVA ranges, inclusive ends (as VFIO reports them). An empty list means
   * the kernel reported none: then [floor, 2^39 - 1] is used (the smallest address width
   * common IOMMUs offer). Throws RangeError for a bad granule.
   */
  constructor(ranges: readonly AddressRange[], opts: IovaAllocatorOptions = {}) {
    const granule = opts.granule ?? 4096;
    if (!Number.isInteger(granule) || granule < 1 || (granule & (granule - 1)) !== 0 || granule > 2 ** 30) {
      throw new RangeError(`granule ${granule} is not a power of two`);
    }
    this.granule = granule;
    const floor = opts.floor ?? 0x10000;
    const usable = ranges.length > 0 ? ranges : [{ start: 0, end: 2 ** 39 - 1 }];
    const holes = [MSI_WINDOW, ...(opts.reserved ?? []), { start: 0, end: floor - 1 }];
    let extents: Extent[] = [];
    for (const r of usable) {
      if (!(Number.isSafeInteger(r.start) && Number.isSafeInteger(r.end)) || r.end < r.start) continue;
      // Shrink to whole granules.
      const start = Math.ceil(r.start / granule) * granule;
      const endExcl = Math.floor((r.end + 1) / granule) * granule;
      if (endExcl > start) extents.push({ start, size: endExcl - start });
    }
    for (const h of holes) {
      if (h.end < h.start) continue;
      const next: Extent[] = [];
      for (const e of extents) {
        const eEnd = e.start + e.size; // exclusive
        const hStart = Math.floor(h.start / granule) * granule;
        const hEnd = Math.ceil((h.end + 1) / granule) * granule; // exclusive
        if (hEnd <= e.start || hStart >= eEnd) {
          next.push(e);
          continue;
        }
        if (hStart > e.start) next.push({ start: e.start, size: hStart - e.start });
        if (hEnd < eEnd) next.push({ start: hEnd, size: eEnd - hEnd });
      }
      extents = next;
    }
    extents.sort((a, b) => a.start - b.start);
    // Merge overlapping or adjacent input ranges.
    for (const e of extents) {
      const last = this.free[this.free.length - 1];
      if (last !== undefined && e.start <= last.start + last.size) {
        last.size = Math.max(last.size, e.start + e.size - last.start);
      } else this.free.push({ ...e });
    }
    this.total = this.free.reduce((s, e) => s + e.size, 0);
  }

  /** Free bytes left. */
  get available(): number {
    return this.free.reduce((s, e) => s + e.size, 0);
  }

  /** Bytes the allocator manages in all. */
  get capacity(): number {
    return this.total;
  }

  /** Live allocations. */
  get count(): number {
    return this.live.size;
  }

  /**
   * Allocates `size` bytes (rounded up to the granule) at an address aligned to `align`
   * (a power of two, at least the granule; default the granule). Returns the start address.
   * Throws IovaExhaustedError when no free extent fits, RangeError for bad arguments.
   */
  alloc(size: number, align = this.granule): number {
    if (!Number.isSafeInteger(size) || size <= 0) throw new RangeError(`IOVA size ${size} must be a positive integer`);
    if (!Number.isSafeInteger(align) || align < this.granule || !Number.isInteger(Math.log2(align))) {
      throw new RangeError(`IOVA alignment ${align} must be a power of two >= ${this.granule}`);
    }
    const want = Math.ceil(size / this.granule) * this.granule;
    for (let i = 0; i < this.free.length; i++) {
      const e = this.free[i]!;
      const start = Math.ceil(e.start / align) * align;
      const end = e.start + e.size;
      if (start + want > end) continue;
      // Split e into [e.start, start) and [start + want, end).
      const pieces: Extent[] = [];
      if (start > e.start) pieces.push({ start: e.start, size: start - e.start });
      if (start + want < end) pieces.push({ start: start + want, size: end - start - want });
      this.free.splice(i, 1, ...pieces);
      this.live.set(start, want);
      return start;
    }
    throw new IovaExhaustedError(
      `no free IOVA range of ${want} bytes (aligned to ${align}); ${this.available} of ${this.total} bytes free in ${this.free.length} pieces`,
    );
  }

  /** Returns an allocation made by alloc(). RangeError if `start` is not a live allocation. */
  release(start: number): void {
    const size = this.live.get(start);
    if (size === undefined) throw new RangeError(`IOVA 0x${start.toString(16)} is not allocated`);
    this.live.delete(start);
    // Insert keeping the order, then coalesce with the neighbours.
    let i = 0;
    while (i < this.free.length && this.free[i]!.start < start) i++;
    this.free.splice(i, 0, { start, size });
    const next = this.free[i + 1];
    if (next !== undefined && start + size === next.start) {
      this.free[i]!.size += next.size;
      this.free.splice(i + 1, 1);
    }
    const prev = this.free[i - 1];
    if (prev !== undefined && prev.start + prev.size === start) {
      prev.size += this.free[i]!.size;
      this.free.splice(i, 1);
    }
  }

  /** The free extents as inclusive ranges (for tests and stats). */
  freeRanges(): AddressRange[] {
    return this.free.map((e) => ({ start: e.start, end: e.start + e.size - 1 }));
  }
}
