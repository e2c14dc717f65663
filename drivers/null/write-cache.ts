/**
 * WriteCache: null_blk's write-back cache emulation (`cache_size`). In writeback mode, writes
 * land in a volatile cache of at most `capacityBytes` (4 KiB pages of its own); FLUSH makes
 * them durable by writing the dirty pages into the PageStore; when the cache is full, the
 * oldest dirty pages are written back first. In writethrough mode (the guest cleared
 * `writeback` through VIRTIO_BLK_F_CONFIG_WCE) writes go straight to the store. Reads see the
 * cache first.
 *
 * drop() loses every dirty page, as a power failure would: the way to check, from a guest,
 * that data it flushed survives and data it did not flush may not. A crash of the daemon loses
 * them too (the cache is in the daemon's memory, the store in a file that outlives it).
 *
 * A store write that fails (errno, e.g. ENOSPC: its file system is full) keeps the page dirty
 * and is returned by the call that caused it (write, flush), whose request then fails.
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

  /** Returns 0, or the errno of a store write (writethrough, or a page written back for room). */
  write(pos: number, src: Uint8Array, srcOff: number, len: number): number {
    // Writethrough goes straight to the store unless pages a failed flush left dirty would hide it.
    if (!this.writeback && this.dirty.size === 0) return this.store.write(pos, src, srcOff, len);
    while (len > 0) {
      const pageNo = Math.floor(pos / PAGE_SIZE);
      const inPage = pos - pageNo * PAGE_SIZE;
      const n = Math.min(len, PAGE_SIZE - inPage);
      let page = this.dirty.get(pageNo);
      if (page === undefined) {
        if (this.dirty.size >= this.maxPages) {
          const err = this.writeBackOldest(); // room first: the cache never holds more than its size
          if (err !== 0) return err;
        }
        page = this.spare.pop() ?? Buffer.allocUnsafe(PAGE_SIZE);
        if (n < PAGE_SIZE) this.store.read(pageNo * PAGE_SIZE, page, 0, PAGE_SIZE); // keep the rest of the page
        this.dirty.set(pageNo, page);
      }
      copyBytes(page, inPage, src, srcOff, n);
      pos += n;
      srcOff += n;
      len -= n;
    }
    return 0;
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

  /**
   * The range reads as zeroes: dirty pages wholly inside it are dropped, the discarded part of
   * the others zeroed in the cache; then the store discards the range.
   */
  discard(pos: number, len: number): void {
    const first = Math.floor(pos / PAGE_SIZE);
    const last = Math.floor((pos + len - 1) / PAGE_SIZE);
    for (let p = first; p <= last && this.dirty.size > 0; p++) {
      const page = this.dirty.get(p);
      if (page === undefined) continue;
      const from = Math.max(pos, p * PAGE_SIZE) - p * PAGE_SIZE;
      const to = Math.min(pos + len, (p + 1) * PAGE_SIZE) - p * PAGE_SIZE;
      if (from === 0 && to === PAGE_SIZE) {
        this.dirty.delete(p);
        this.spare.push(page);
      } else {
        page.fill(0, from, to);
      }
    }
    this.store.discard(pos, len);
  }

  /** FLUSH: every dirty page becomes durable. Returns 0, or the errno of the first store write that failed. */
  flush(): number {
    let first = 0;
    for (const pageNo of [...this.dirty.keys()]) {
      const err = this.writeBack(pageNo);
      if (first === 0) first = err;
    }
    return first;
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

  private writeBackOldest(): number {
    const oldest = this.dirty.keys().next();
    return oldest.done === true ? 0 : this.writeBack(oldest.value);
  }

  /** Writes dirty page `pageNo` (if it is dirty) into the store; it stays dirty if that fails. */
  private writeBack(pageNo: number): number {
    const page = this.dirty.get(pageNo);
    if (page === undefined) return 0;
    const err = this.store.write(pageNo * PAGE_SIZE, page, 0, PAGE_SIZE);
    if (err !== 0) return err;
    this.dirty.delete(pageNo);
    this.spare.push(page);
    return 0;
  }
}
