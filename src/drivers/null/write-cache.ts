/**
 * WriteCache: null_blk's write-back cache emulation (`cache_size`). In writeback mode, writes
 * land in a volatile cache of at most `capacityBytes`; FLUSH makes them durable by moving the
 * dirty pages into the PageStore (no copy: the page slots change hands); when the cache is
 * full, the oldest dirty pages are written back first. In writethrough mode (the guest cleared
 * `writeback` through VIRTIO_BLK_F_CONFIG_WCE) writes go straight to the store. Reads see the
 * cache first.
 *
 * drop() loses every dirty page, as a power failure would: the way to check, from a guest,
 * that data it flushed survives and data it did not flush may not.
 *
 * Invariant: dirty.size * PAGE_SIZE <= capacityBytes after every write.
 */
import { PAGE_SIZE, PageStore } from './page-store';

export class WriteCache {
  /** Dirty page slots by page number, oldest first (Map keeps insertion order). */
  private readonly dirty = new Map<number, number>();
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
      let slot = this.dirty.get(pageNo);
      if (slot === undefined) {
        slot = this.store.allocSlot();
        const clean = this.store.slotOf(pageNo);
        if (clean !== undefined && n < PAGE_SIZE) this.store.copySlot(slot, clean); // keep the rest of the page
        this.dirty.set(pageNo, slot);
        if (this.dirty.size > this.maxPages) this.writeBackOldest();
      }
      this.store.copyToSlot(slot, inPage, src, srcOff, n);
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
      const slot = this.dirty.get(pageNo);
      if (slot !== undefined) this.store.copyFromSlot(slot, inPage, dst, dstOff, n);
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
      const slot = this.dirty.get(p);
      if (slot === undefined) continue;
      this.dirty.delete(p);
      this.store.putSlot(p, slot); // the store then zeroes or frees exactly the discarded part
    }
    this.store.discard(pos, len);
  }

  /** FLUSH: every dirty page becomes durable. */
  flush(): void {
    for (const [pageNo, slot] of this.dirty) this.store.putSlot(pageNo, slot);
    this.dirty.clear();
  }

  /** Switches writeback (true) or writethrough (false); going writethrough flushes first. */
  setWriteback(on: boolean): void {
    if (!on) this.flush();
    this.writeback = on;
  }

  /** Loses every dirty page (power-failure emulation). */
  drop(): void {
    for (const slot of this.dirty.values()) this.store.freeSlot(slot);
    this.dirty.clear();
  }

  private writeBackOldest(): void {
    const oldest = this.dirty.keys().next();
    if (oldest.done === true) return;
    const slot = this.dirty.get(oldest.value) as number;
    this.dirty.delete(oldest.value);
    this.store.putSlot(oldest.value, slot);
  }
}
