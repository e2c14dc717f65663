/**
 * PageStore: the memory backing of a null disk, a sparse map from page number to a 4 KiB page
 * (null_blk and rnull keep the same shape: an xarray of pages). Pages that were never written
 * read as zeroes.
 *
 * Pages are slots in 1 MiB slabs (slot = slab * 256 + index) rather than objects: the data
 * path allocates nothing but one slab per 256 new pages, and a run of disk pages that sit in
 * consecutive slots of one slab — what sequential writes produce — is copied with one call
 * (bench, 128k seqread on a memory-backed disk: 32 copies per request became one or two).
 *
 * Byte positions are disk offsets in bytes (sector * 512).
 *
 * Invariants: every slot is either in `pages` (exactly once) or in `free`, or not yet carved;
 * free slots are zeroed when handed out again.
 */
import { native } from '../../native';

export const PAGE_SIZE = 4096;
const PAGE_SHIFT = 12;
const SLAB_PAGES = 256;

/** No view per copy (Buffer#copy creates one on Node 20). */
const copyBytes = native.copyBytes;
const u8fill = Uint8Array.prototype.fill;

export class PageStore {
  private readonly pages = new Map<number, number>();
  private readonly slabs: Buffer[] = [];
  private carved = 0;
  private readonly free: number[] = [];

  /** Pages holding data (each 4 KiB of memory). */
  get pageCount(): number {
    return this.pages.size;
  }

  /** Bytes of memory held, including freed pages kept for reuse. */
  get bytesAllocated(): number {
    return (this.pages.size + this.free.length) * PAGE_SIZE;
  }

  /** Copies `len` bytes of `src` from `srcOff` into the disk at byte `pos`. */
  write(pos: number, src: Uint8Array, srcOff: number, len: number): void {
    while (len > 0) {
      const pageNo = Math.floor(pos / PAGE_SIZE);
      const inPage = pos - pageNo * PAGE_SIZE;
      let slot = this.pages.get(pageNo);
      if (slot === undefined) {
        slot = this.allocSlot();
        this.pages.set(pageNo, slot);
      }
      const n = Math.min(len, this.runBytes(pageNo, slot, inPage, len, true));
      copyBytes(this.slabs[slot >>> 8], ((slot & 255) << PAGE_SHIFT) + inPage, src, srcOff, n);
      pos += n;
      srcOff += n;
      len -= n;
    }
  }

  /** Copies `len` bytes from the disk at byte `pos` into `dst` at `dstOff` (zeroes where unwritten). */
  read(pos: number, dst: Uint8Array, dstOff: number, len: number): void {
    while (len > 0) {
      const pageNo = Math.floor(pos / PAGE_SIZE);
      const inPage = pos - pageNo * PAGE_SIZE;
      const slot = this.pages.get(pageNo);
      let n: number;
      if (slot === undefined) {
        n = Math.min(len, PAGE_SIZE - inPage);
        u8fill.call(dst, 0, dstOff, dstOff + n);
      } else {
        n = Math.min(len, this.runBytes(pageNo, slot, inPage, len, false));
        copyBytes(dst, dstOff, this.slabs[slot >>> 8], ((slot & 255) << PAGE_SHIFT) + inPage, n);
      }
      pos += n;
      dstOff += n;
      len -= n;
    }
  }

  /**
   * Bytes from `inPage` of `pageNo` (in `slot`) that lie in consecutive slots of the same slab
   * for the following disk pages, up to `len`. Writing, absent following pages are allocated
   * in the next slot when it is the next one to be carved.
   */
  private runBytes(pageNo: number, slot: number, inPage: number, len: number, allocate: boolean): number {
    let bytes = PAGE_SIZE - inPage;
    let s = slot;
    let p = pageNo;
    while (bytes < len && (s & 255) !== 255) {
      const next = this.pages.get(p + 1);
      if (next === undefined && allocate && this.free.length === 0 && this.carved === s + 1) {
        this.carved++;
        this.pages.set(p + 1, s + 1);
      } else if (next !== s + 1) {
        break;
      }
      s++;
      p++;
      bytes += PAGE_SIZE;
    }
    return bytes;
  }

  /** Makes `len` bytes from `pos` read as zeroes: whole pages are freed, partial ones zeroed. */
  discard(pos: number, len: number): void {
    while (len > 0) {
      const pageNo = Math.floor(pos / PAGE_SIZE);
      const inPage = pos - pageNo * PAGE_SIZE;
      const n = Math.min(len, PAGE_SIZE - inPage);
      const slot = this.pages.get(pageNo);
      if (slot !== undefined) {
        if (n === PAGE_SIZE) {
          this.pages.delete(pageNo);
          this.free.push(slot);
        } else {
          const base = (slot & 255) << PAGE_SHIFT;
          u8fill.call(this.slabs[slot >>> 8], 0, base + inPage, base + inPage + n);
        }
      }
      pos += n;
      len -= n;
    }
  }

  // --- slot access for the write cache -------------------------------------------------------

  /** The slot holding `pageNo`, if written. */
  slotOf(pageNo: number): number | undefined {
    return this.pages.get(pageNo);
  }

  /** Installs `slot` (from allocSlot) as `pageNo`; the slot it replaces is freed. */
  putSlot(pageNo: number, slot: number): void {
    const old = this.pages.get(pageNo);
    if (old !== undefined && old !== slot) this.free.push(old);
    this.pages.set(pageNo, slot);
  }

  /** Returns a slot from allocSlot that is no longer needed. */
  freeSlot(slot: number): void {
    this.free.push(slot);
  }

  /** A zeroed page slot. */
  allocSlot(): number {
    const reused = this.free.pop();
    if (reused !== undefined) {
      const base = (reused & 255) << PAGE_SHIFT;
      u8fill.call(this.slabs[reused >>> 8], 0, base, base + PAGE_SIZE);
      return reused;
    }
    if (this.carved === this.slabs.length * SLAB_PAGES) this.slabs.push(Buffer.alloc(SLAB_PAGES << PAGE_SHIFT));
    return this.carved++;
  }

  /** Copies `n` bytes between a slot (from byte `inPage`) and an array. */
  copyToSlot(slot: number, inPage: number, src: Uint8Array, srcOff: number, n: number): void {
    copyBytes(this.slabs[slot >>> 8], ((slot & 255) << PAGE_SHIFT) + inPage, src, srcOff, n);
  }

  copyFromSlot(slot: number, inPage: number, dst: Uint8Array, dstOff: number, n: number): void {
    copyBytes(dst, dstOff, this.slabs[slot >>> 8], ((slot & 255) << PAGE_SHIFT) + inPage, n);
  }

  /** Copies a whole page from slot `from` to slot `to`. */
  copySlot(to: number, from: number): void {
    copyBytes(this.slabs[to >>> 8], (to & 255) << PAGE_SHIFT, this.slabs[from >>> 8], (from & 255) << PAGE_SHIFT, PAGE_SIZE);
  }
}
