/**
 * BadBlocks: sector ranges where I/O fails with IOERR (null_blk's `badblocks` configfs
 * attribute, and `badblocks_once`: as null_blk, a request that hits a bad range clears it from
 * the first bad sector the request touched to the end of that range).
 * Ranges are in 512-byte sectors, `start` and `end` inclusive as in null_blk's "+start-end",
 * kept sorted and merged. Changed at run time through the management API.
 */
export class BadBlocks {
  /** Sorted, non-overlapping, non-adjacent [start, end] pairs (inclusive). */
  private ranges: Array<[number, number]> = [];

  constructor(public once = false) {}

  get count(): number {
    return this.ranges.length;
  }

  list(): Array<[number, number]> {
    return this.ranges.map(([s, e]) => [s, e]);
  }

  /** Marks sectors start..end (inclusive) bad. @throws RangeError for an empty or negative range. */
  add(start: number, end: number): void {
    check(start, end);
    const out: Array<[number, number]> = [];
    let s = start;
    let e = end;
    for (const [a, b] of this.ranges) {
      if (b + 1 < s || a > e + 1) out.push([a, b]);
      else {
        s = Math.min(s, a);
        e = Math.max(e, b);
      }
    }
    out.push([s, e]);
    out.sort((x, y) => x[0] - y[0]);
    this.ranges = out;
  }

  /** Clears sectors start..end (inclusive); parts of ranges outside stay bad. */
  remove(start: number, end: number): void {
    check(start, end);
    const out: Array<[number, number]> = [];
    for (const [a, b] of this.ranges) {
      if (b < start || a > end) {
        out.push([a, b]);
        continue;
      }
      if (a < start) out.push([a, start - 1]);
      if (b > end) out.push([end + 1, b]);
    }
    this.ranges = out;
  }

  /**
   * True if any of `nsectors` sectors from `sector` is bad. With `once`, the first bad range
   * hit is cleared from the first bad sector of the request to its end (null_blk clears the
   * extent badblocks_check() reports), so the next request there succeeds.
   */
  hit(sector: number, nsectors: number): boolean {
    const last = sector + Math.max(nsectors, 1) - 1;
    for (const [a, b] of this.ranges) {
      if (a > last) return false;
      if (b >= sector) {
        if (this.once) this.remove(Math.max(a, sector), b);
        return true;
      }
    }
    return false;
  }
}

function check(start: number, end: number): void {
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || start < 0 || end < start) {
    throw new RangeError(`bad block range ${start}-${end}: expected whole sectors with start <= end`);
  }
}

/** Parses "start-end" or "sector" (inclusive, 512-byte sectors). @throws RangeError */
export function parseRange(text: string): [number, number] {
  const m = /^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$/.exec(text);
  if (m === null) throw new RangeError(`bad block range "${text}": expected "start-end" or "sector" in 512-byte sectors`);
  const start = Number(m[1]);
  const end = m[2] === undefined ? start : Number(m[2]);
  check(start, end);
  return [start, end];
}
