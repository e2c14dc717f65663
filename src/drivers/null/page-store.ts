/**
 * PageStore: the memory backing of a null disk, a sparse map from page number to a 4 KiB page
 * (null_blk and rnull keep the same shape: an xarray of pages). Pages that were never written
 * read as zeroes. Pages are carved from 1 MiB slabs, so the data path allocates one object per
 * 256 new pages, not one per page.
 *
 * Byte positions are disk offsets in bytes (sector * 512).
 */
import { native } from '../../native';

/**
 * No view per copy (Buffer#copy creates one on Node 20): with it, 4 KiB writes allocated
 * enough to trigger a scavenge every ~20k requests in bench/micro/dispatch.js.
 */
const copyBytes = native.copyBytes;

export const PAGE_SIZE = 4096;
const PAGE_SHIFT = 12;
const SLAB_PAGES = 256;

export class PageStore {
  private readonly pages = new Map<number, Buffer>();
  private slab: Buffer | null = null;
  private slabUsed = SLAB_PAGES;
  /** Pages freed by discard, reused (zeroed) before new slabs are carved. */
  private readonly free: Buffer[] = [];

  /** Pages holding data (each 4 KiB of memory). */
  get pageCount(): number {
    return this.pages.size;
  }

  /** Bytes of memory held, including freed pages kept for reuse. */
  get bytesAllocated(): number {
    return (this.pages.size + this.free.length) * PAGE_SIZE;
  }

  /** Copies `len` bytes of `src` from `srcOff` into the disk at byte `pos`. */
  write(pos: number, src: Buffer, srcOff: number, len: number): void {
    while (len > 0) {
      const pageNo = Math.floor(pos / PAGE_SIZE);
      const inPage = pos - pageNo * PAGE_SIZE;
      const n = Math.min(len, PAGE_SIZE - inPage);
      let page = this.pages.get(pageNo);
      if (page === undefined) {
        page = this.allocPage();
        this.pages.set(pageNo, page);
      }
      copyBytes(page, inPage, src, srcOff, n);
      pos += n;
      srcOff += n;
      len -= n;
    }
  }

  /** Copies `len` bytes from the disk at byte `pos` into `dst` at `dstOff` (zeroes where unwritten). */
  read(pos: number, dst: Buffer, dstOff: number, len: number): void {
    while (len > 0) {
      const pageNo = Math.floor(pos / PAGE_SIZE);
      const inPage = pos - pageNo * PAGE_SIZE;
      const n = Math.min(len, PAGE_SIZE - inPage);
      const page = this.pages.get(pageNo);
      if (page === undefined) dst.fill(0, dstOff, dstOff + n);
      else copyBytes(dst, dstOff, page, inPage, n);
      pos += n;
      dstOff += n;
      len -= n;
    }
  }

  /**
   * Makes `len` bytes from `pos` read as zeroes: whole pages are freed, partial ones zeroed.
   */
  discard(pos: number, len: number): void {
    while (len > 0) {
      const pageNo = Math.floor(pos / PAGE_SIZE);
      const inPage = pos - pageNo * PAGE_SIZE;
      const n = Math.min(len, PAGE_SIZE - inPage);
      const page = this.pages.get(pageNo);
      if (page !== undefined) {
        if (n === PAGE_SIZE) {
          this.pages.delete(pageNo);
          this.free.push(page);
        } else {
          page.fill(0, inPage, inPage + n);
        }
      }
      pos += n;
      len -= n;
    }
  }

  /** The page holding `pageNo`, if written. */
  getPage(pageNo: number): Buffer | undefined {
    return this.pages.get(pageNo);
  }

  /** Installs `page` (from allocPage) as `pageNo`; the page it replaces is recycled. */
  putPage(pageNo: number, page: Buffer): void {
    const old = this.pages.get(pageNo);
    if (old !== undefined && old !== page) this.free.push(old);
    this.pages.set(pageNo, page);
  }

  /** Returns a page from allocPage that is no longer needed. */
  freePage(page: Buffer): void {
    this.free.push(page);
  }

  /** A zeroed 4 KiB page from the store's slabs (for the write cache). */
  allocPage(): Buffer {
    const reused = this.free.pop();
    if (reused !== undefined) return reused.fill(0);
    if (this.slabUsed === SLAB_PAGES) {
      this.slab = Buffer.alloc(SLAB_PAGES << PAGE_SHIFT);
      this.slabUsed = 0;
    }
    const start = this.slabUsed++ << PAGE_SHIFT;
    return (this.slab as Buffer).subarray(start, start + PAGE_SIZE);
  }
}
