/**
 * WriteCache: null_blk's write-back cache emulation (`cache_size`). In writeback mode, writes
 * land in a volatile cache of at most `capacityBytes`; FLUSH makes them durable by moving the
 * dirty pages into the PageStore (no copy); when the cache is full, the oldest dirty pages are
 * written back first. In writethrough mode (the guest cleared `writeback` through
 * VIRTIO_BLK_F_CONFIG_WCE) writes go straight to the store. Reads see the cache first.
 *
 * drop() loses every dirty page, as a power failure would: the way to check, from a guest,
 * that data it flushed survives and data it did not flush may not.
 *
 * Invariant: dirty.size * PAGE_SIZE <= capacityBytes after every write.
 */
import { native } from '../../native';
import { PAGE_SIZE, PageStore } from './page-store';

const copyBytes = native.copyBytes;

export class WriteCache {
  /** Dirty pages by page number, oldest first (Map keeps insertion order). */
  private readonly dirty = new Map<number, Buffer>();
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

  write(pos: number, src: Buffer, srcOff: number, len: number): void {
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
        page = this.store.allocPage();
        const clean = this.store.getPage(pageNo);
        if (clean !== undefined && n < PAGE_SIZE) clean.copy(page); // keep the rest of the page
        this.dirty.set(pageNo, page);
        if (this.dirty.size > this.maxPages) this.writeBackOldest();
      }
      copyBytes(page, inPage, src, srcOff, n);
      pos += n;
      srcOff += n;
      len -= n;
    }
  }

  read(pos: number, dst: Buffer, dstOff: number, len: number): void {
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

  /** Discarded ranges are dropped from the cache, then from the store. */
  discard(pos: number, len: number): void {
    const first = Math.floor(pos / PAGE_SIZE);
    const last = Math.floor((pos + len - 1) / PAGE_SIZE);
    for (let p = first; p <= last && this.dirty.size > 0; p++) {
      const page = this.dirty.get(p);
      if (page === undefined) continue;
      this.dirty.delete(p);
      this.store.putPage(p, page); // the store then zeroes or frees exactly the discarded part
    }
    this.store.discard(pos, len);
  }

  /** FLUSH: every dirty page becomes durable. */
  flush(): void {
    for (const [pageNo, page] of this.dirty) this.store.putPage(pageNo, page);
    this.dirty.clear();
  }

  /** Switches writeback (true) or writethrough (false); going writethrough flushes first. */
  setWriteback(on: boolean): void {
    if (!on) this.flush();
    this.writeback = on;
  }

  /** Loses every dirty page (power-failure emulation). */
  drop(): void {
    for (const page of this.dirty.values()) this.store.freePage(page);
    this.dirty.clear();
  }

  private writeBackOldest(): void {
    const oldest = this.dirty.keys().next();
    if (oldest.done === true) return;
    const page = this.dirty.get(oldest.value) as Buffer;
    this.dirty.delete(oldest.value);
    this.store.putPage(oldest.value, page);
  }
}
