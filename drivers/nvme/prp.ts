/**
 * PRP descriptions of a request's guest-memory segments (NVM Express Base 1.4, 4.3 "Physical
 * Region Page Entry and List"): the first entry may start anywhere dword aligned, every other
 * entry is the start of a memory page, and a transfer of more than two entries puts entries 2..n
 * in a PRP list (here one list page per command id, so at most PRP_LIST_ENTRIES + 1 entries).
 *
 * A chain of segments is PRP-compatible when every segment but the first starts on a page and
 * every segment but the last ends on one. Where a chain breaks that rule, or exceeds the
 * transfer limit, the request is cut into several commands at logical-block boundaries
 * (`PrpBuilder.next` measures one command at a time); a cut that cannot fall on a block
 * boundary (a block straddling an unaligned junction) cannot be expressed with PRPs at all.
 *
 * Segments are [chunk, offset, length, flags] words (block/request.ts); `chunkIova[chunk]` is
 * the IOVA of the chunk's first byte (guest memory mapped for DMA). Nothing here allocates.
 */
export const PRP_PAGE = 4096;
/** Entries of one PRP list page. */
export const PRP_LIST_ENTRIES = PRP_PAGE / 8;
const SEGMENT_WORDS = 4;

export class PrpBuilder {
  /** PRP1 and PRP2 of the command measured by the last next(). */
  prp1 = 0;
  prp2 = 0;
  /** Cursor: segment index (relative to the request's first) and byte offset inside it. */
  seg = 0;
  off = 0;

  /**
   * @param maxBytes most bytes per command (MDTS), a multiple of every block size used, at most
   *   PRP_LIST_ENTRIES pages (so one list page always suffices)
   */
  constructor(readonly maxBytes: number) {
    if (maxBytes > PRP_LIST_ENTRIES * PRP_PAGE || maxBytes < PRP_PAGE || maxBytes % PRP_PAGE !== 0) {
      throw new RangeError(`maximum transfer ${maxBytes} must be whole pages from 1 to ${PRP_LIST_ENTRIES}`);
    }
  }

  /** Starts a request's data at its first segment. */
  start(): void {
    this.seg = 0;
    this.off = 0;
  }

  /**
   * Builds the next command of a request from the cursor: at most `left` bytes (the request's
   * remaining data), a whole number of `blockSize` blocks, described by PRP1/PRP2 with entries
   * 2..n written to `list` (32-bit words from `listWord`; the page is at IOVA `listIova`).
   * Advances the cursor. Returns the command's bytes, or 0 when no whole block from the cursor
   * can be described with PRPs (unaligned address or junction; nothing written then), or -1
   * when a segment's chunk has no IOVA.
   */
  next(
    chunkIova: Float64Array,
    segments: Uint32Array,
    segBase: number,
    segCount: number,
    left: number,
    blockSize: number,
    list: Uint32Array,
    listWord: number,
    listIova: number,
  ): number {
    // Pass 1: how far PRPs reach from the cursor.
    let bytes = 0;
    let seg = this.seg;
    let off = this.off;
    const limit = Math.min(left, this.maxBytes);
    while (seg < segCount && bytes < limit) {
      const w = segBase + seg * SEGMENT_WORDS;
      const base = chunkIova[segments[w] as number] as number;
      if (!(base >= 0)) return -1;
      const addr = base + (segments[w + 1] as number) + off;
      const len = (segments[w + 2] as number) - off;
      if (bytes === 0 ? addr % 4 !== 0 : addr % PRP_PAGE !== 0) break;
      const take = Math.min(len, limit - bytes);
      bytes += take;
      if (take < len || (addr + take) % PRP_PAGE !== 0) break;
      seg++;
      off = 0;
    }
    bytes -= bytes % blockSize;
    if (bytes === 0) return 0;
    // Pass 2: the entries, and the cursor moved past them.
    seg = this.seg;
    off = this.off;
    let entries = 0;
    let rest = bytes;
    while (rest > 0) {
      const w = segBase + seg * SEGMENT_WORDS;
      const addr = (chunkIova[segments[w] as number] as number) + (segments[w + 1] as number) + off;
      const len = (segments[w + 2] as number) - off;
      const take = Math.min(len, rest);
      // One entry per page touched: the segment's start, then each page boundary inside it.
      let page = addr;
      const end = addr + take;
      while (page < end) {
        if (entries === 0) this.prp1 = page;
        else {
          if (entries === 1) this.prp2 = page;
          const at = listWord + (entries - 1) * 2;
          list[at] = page % 0x100000000;
          list[at + 1] = Math.floor(page / 0x100000000);
        }
        entries++;
        page = page - (page % PRP_PAGE) + PRP_PAGE;
      }
      rest -= take;
      if (take < len) off += take;
      else {
        seg++;
        off = 0;
      }
    }
    if (entries === 1) this.prp2 = 0;
    else if (entries > 2) this.prp2 = listIova;
    this.seg = seg;
    this.off = off;
    return bytes;
  }
}
