/**
 * WriteCache: null_blk's write-back cache emulation (`cache_size`). In writeback mode, writes
 * land in a volatile cache of at most `capacityBytes` (4 KiB pages of its own); FLUSH makes
 * them durable by writing the dirty pages into the PageStore; when the cache is full, the
 * oldest dirty pages are written back first. In writethrough mode (the guest cleared
 * `writeback` through VIRTIO_BLK_F_CONFIG_WCE) writes go straight to the store. Reads see the
 * cache first.
 *
 * drop() loses every dirty page, as a power failure would: the way to check, from a guest,
 * that data it flushed survives and data it did not flush may not.
 *
 * Invariant: dirty.size * PAGE_SIZE <= capacityBytes after every write.
 */
import { native } from '../../native';
import { PAGE_SIZE, type PageStore } from './page-store';

const copyBytes = native.copyBytes;

export class WriteCache {
  /** Dirty pages by page number, oldest first (Map keeps insertion order). */
  private readonly dirty = new Map<number, Buffer>();
  /** Page buffers no longer dirty, kept for reuse (never more than the capacity in all). */
  private readonly spare: Buffer[] = [];
  private readonly maxPages: number;
  writeback = true;

  /** @throws RangeError unless the capacity holds at least one page. */
  constructor(
    private readonly store: PageStore,
    capacityBytes: number,
  ) {
    this.maxPages = Math.floor(capacityBytes / PAGE_SIZE);
    if (this.maxPages < 1) throw new RangeError(`cache size must be at least ${PAGE_SIZE} bytes, got ${capacityBytes}`);
  }

  get dirtyBytes(): number {
    return this.dirty.size * PAGE_SIZE;
  }

  write(pos: number, src: Uint8Array, srcOff: number, len: number): void {
    if (!this.writeback) {
      this.store.write(pos, src, srcOff, len);
      return;
    }
    while (len > 0) {
      const pageNo = Math.floor(pos / PAGE_SIZE);
      const inPage = pos - pageNo * PAGE_SIZE;
      const n = Math.min(len, PAGE_SIZE - inPage);
      let page = this.dirty.get(pageNo);
      if (page === undefined) {
        page = this.spare.pop() ?? Buffer.allocUnsafe(PAGE_SIZE);
        if (n < PAGE_SIZE) this.store.read(pageNo * PAGE_SIZE, page, 0, PAGE_SIZE); // keep the rest of the page
        this.dirty.set(pageNo, page);
        if (this.dirty.size > this.maxPages) this.writeBackOldest();
      }
      copyBytes(page, inPage, src, srcOff, n);
      pos += n;
      srcOff += n;
      len -= n;
    }
  }

  read(pos: number, dst: Uint8Array, dstOff: number, len: number): void {
    if (this.dirty.size === 0) {
      this.store.read(pos, dst, dstOff, len);
      return;
    }
    while (len > 0) {
      const pageNo = Math.floor(pos / PAGE_SIZE);
      const inPage = pos - pageNo * PAGE_SIZE;
      const n = Math.min(len, PAGE_SIZE - inPage);
      const page = this.dirty.get(pageNo);
      if (page !== undefined) copyBytes(dst, dstOff, page, inPage, n);
      else this.store.read(pos, dst, dstOff, n);
      pos += n;
      dstOff += n;
      len -= n;
    }
  }

  /** Dirty pages in the range are written back, then the store discards the range. */
  discard(pos: number, len: number): void {
    const first = Math.floor(pos / PAGE_SIZE);
    const last = Math.floor((pos + len - 1) / PAGE_SIZE);
    for (let p = first; p <= last && this.dirty.size > 0; p++) this.writeBack(p);
    this.store.discard(pos, len);
  }

  /** FLUSH: every dirty page becomes durable. */
  flush(): void {
    for (const pageNo of [...this.dirty.keys()]) this.writeBack(pageNo);
  }

  /** Switches writeback (true) or writethrough (false); going writethrough flushes first. */
  setWriteback(on: boolean): void {
    if (!on) this.flush();
    this.writeback = on;
  }

  /** Loses every dirty page (power-failure emulation). */
  drop(): void {
    for (const page of this.dirty.values()) this.spare.push(page);
    this.dirty.clear();
  }

  private writeBackOldest(): void {
    const oldest = this.dirty.keys().next();
    if (oldest.done !== true) this.writeBack(oldest.value);
  }

  /** Writes dirty page `pageNo` (if it is dirty) into the store. */
  private writeBack(pageNo: number): void {
    const page = this.dirty.get(pageNo);
    if (page === undefined) return;
    this.store.write(pageNo * PAGE_SIZE, page, 0, PAGE_SIZE);
    this.dirty.delete(pageNo);
    this.spare.push(page);
  }
}
