/**
 * Throttle: a bandwidth limit (null_blk `mbps`, in MiB/s) as a virtual clock shared by every
 * hardware queue of a disk — the moment its link would be free again. Each request reserves
 * its bytes and may complete only when its transfer would have ended; a burst of up to
 * `burstNs` of idle time is granted, as a token bucket would.
 *
 * Reservations never move backwards, so per-queue completion times stay in order (the
 * RequestTimer FIFO relies on it).
 */
export class Throttle {
  private nextFree = 0;
  private readonly nsPerByte: number;

  /** @throws RangeError unless mbps is a positive number of MiB/s. */
  constructor(
    readonly mbps: number,
    private readonly burstNs = 1_000_000,
  ) {
    if (!(mbps > 0)) throw new RangeError(`mbps must be positive, got ${mbps}`);
    this.nsPerByte = 1e9 / (mbps * 1048576);
  }

  /** Reserves `bytes` at monotonic time `nowNs`; returns when the transfer ends (ns). */
  reserve(nowNs: number, bytes: number): number {
    const start = this.nextFree > nowNs - this.burstNs ? this.nextFree : nowNs - this.burstNs;
    this.nextFree = start + bytes * this.nsPerByte;
    return this.nextFree;
  }
}
