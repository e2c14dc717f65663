/**
 * Throttle: a bandwidth limit (null_blk `mbps`, in MiB/s) as a virtual clock shared by every
 * hardware queue of a disk — the moment its link would be free again. Each request reserves
 * its bytes and may complete only when its transfer would have ended; a burst of up to
 * `burstNs` of idle time is granted, as a token bucket would.
 *
 * Reservations never move backwards, so per-queue completion times stay in order (the
 * RequestTimer FIFO relies on it); that is also why an aborted request's reservation is not
 * given back: the clock is capped at `maxAheadNs` ahead of now instead.
 */
export class Throttle {
  private nextFree = 0;
  private readonly nsPerByte: number;

  /**
   * @param maxAheadNs how far ahead of now a reservation may end (ns); the null driver passes
   * half the io timeout, so throttling alone never makes a request time out
   * @throws RangeError unless mbps is a positive number of MiB/s.
   */
  constructor(
    readonly mbps: number,
    private readonly burstNs = 1_000_000,
    readonly maxAheadNs = Infinity,
  ) {
    if (!(mbps > 0)) throw new RangeError(`mbps must be positive, got ${mbps}`);
    this.nsPerByte = 1e9 / (mbps * 1048576);
  }

  /**
   * Reserves `bytes` at monotonic time `nowNs`; returns when the transfer ends (ns), at most
   * `maxAheadNs` after `nowNs`: a queue deeper than the link can drain in that time (or the
   * reservations of requests that timed out and were resubmitted) gets the excess for free
   * rather than pushing every later request past its timeout.
   */
  reserve(nowNs: number, bytes: number): number {
    const start = this.nextFree > nowNs - this.burstNs ? this.nextFree : nowNs - this.burstNs;
    const end = start + bytes * this.nsPerByte;
    const limit = nowNs + this.maxAheadNs;
    // nowNs never moves backwards, so neither does the limit: reservations stay in order.
    this.nextFree = end < limit ? end : limit;
    return this.nextFree;
  }
}
