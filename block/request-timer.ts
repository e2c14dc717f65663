/**
 * RequestTimer: ends requests a fixed delay after they started, with microsecond accuracy
 * (null_blk's timer mode, `completion_nsec`; the hrtimer in the Rust rnull). Node's timers
 * tick in milliseconds, so the deadline is a timerfd (native Timer) watched on the event loop.
 *
 * A sleeping event loop wakes from a timerfd tens of microseconds late (~30 us on a 2-vCPU VM),
 * which would make every completion that late. With a spin budget (`spinNs`, the disk's
 * poll_us), the timerfd is armed `spinNs` before the deadline instead, and the callback
 * busy-waits the rest (native spinUntil) and ends the request at its deadline, not after. The
 * spin is bounded: one callback spins at most `spinNs`, only toward a deadline closer than
 * that, and returns to the event loop after each expiry (the queue publishes the completions
 * there); with nothing pending nothing is armed, so an idle disk spins never. A request never
 * ends before its deadline either way.
 *
 * With one delay per queue, deadlines arrive in order, so a FIFO ring ordered by deadline is
 * an exact timer wheel: schedule() and expiry are O(1) and allocate nothing.
 *
 * Each entry owns the request's handle, leaked into a number (Request.leak); expiry reclaims
 * it. If the request was ended meanwhile (a timeout), reclaim fails and the late completion is
 * dropped and reported once (onStale). cancel() (teardown) aborts every pending request.
 *
 * Invariants: count <= capacity (the queue depth: a live request is in at most one entry, and
 * entries of ended requests are dropped first when the FIFO is full);
 * deadlines[head..head+count) are non-decreasing; the timerfd is armed at deadlines[head]
 * whenever count > 0.
 */
import { native, NativeFdWatcher, NativeTimer } from '../native';
import type { HwQueue } from './hw-queue';
import { BlkStatus } from './operations';
import { type Request, TAG_BITS } from './request';

/**
 * The queue's polling spin (native pop) ends this long before a deadline: the time from its
 * end through the event loop into expire(), which spins the rest (measured ~5-9 us p50 on a
 * loaded 2-vCPU VM).
 */
const HANDOFF_NS = 15_000;

export class RequestTimer {
  private readonly timer: NativeTimer = new native.Timer();
  private readonly watcher: NativeFdWatcher;
  private readonly deadlines: Float64Array;
  private readonly refs: Float64Array;
  private head = 0;
  private count = 0;
  /** Late completions dropped (requests ended by a timeout before their timer fired). */
  stale = 0;

  /**
   * @param onExpire ends the request (it holds the sole handle when called)
   * @param onStale called for each late completion dropped
   * @param spinNs spin budget in ns (0 to 1e9): busy-wait toward a deadline closer than this
   *   instead of sleeping on the timerfd; 0 always sleeps
   * @throws RangeError for a spinNs outside 0..1e9
   */
  constructor(
    private readonly hctx: HwQueue,
    private readonly onExpire: (rq: Request) => void,
    private readonly onStale: (tag: number) => void,
    private readonly spinNs = 0,
  ) {
    if (!(spinNs >= 0 && spinNs <= 1e9)) throw new RangeError(`request timer spin budget must be 0 to 1e9 ns, got ${spinNs}`);
    this.deadlines = new Float64Array(hctx.depth);
    this.refs = new Float64Array(hctx.depth);
    this.watcher = new native.FdWatcher(this.timer.fd, () => this.expire(), true);
    this.watcher.start();
  }

  /** Pending entries. */
  get pending(): number {
    return this.count;
  }

  /**
   * Takes `rq`'s handle; onExpire(rq) runs at `deadlineNs` (monotonic ns) or soon after.
   * Entries of requests ended meanwhile (timed out, then possibly resubmitted on the same tag)
   * still hold their place until their deadline; when they fill the FIFO they are dropped
   * first (each reported to onStale), so live requests always have room.
   * @throws RangeError when the FIFO is full of live entries (a request scheduled twice).
   */
  schedule(rq: Request, deadlineNs: number): void {
    const cap = this.deadlines.length;
    if (this.count === cap) {
      this.dropStale();
      if (this.count === cap) throw new RangeError(`request timer of hardware queue ${this.hctx.index} is full (${cap} live entries): tag ${rq.tag} not scheduled`);
    }
    const i = (this.head + this.count) % cap;
    this.deadlines[i] = deadlineNs;
    this.refs[i] = rq.leak();
    if (this.count++ === 0) this.arm(deadlineNs);
  }

  /**
   * Removes the entries whose request has ended meanwhile (stale handles), keeping the others
   * in deadline order from the same head. O(capacity); only when the FIFO is full.
   */
  private dropStale(): void {
    const cap = this.deadlines.length;
    let kept = 0;
    for (let k = 0; k < this.count; k++) {
      const from = (this.head + k) % cap;
      const ref = this.refs[from];
      if (this.hctx.reclaim(ref) === null) {
        this.stale++;
        this.onStale(ref % (1 << TAG_BITS));
        continue;
      }
      const to = (this.head + kept) % cap;
      this.refs[to] = ref;
      this.deadlines[to] = this.deadlines[from];
      kept++;
    }
    this.count = kept;
    if (kept > 0) this.arm(this.deadlines[this.head]);
    else this.disarm();
  }

  /**
   * Arms the timerfd for the entry at `deadlineNs`: spinNs early when spinning (expire() spins
   * the rest); the queue's own polling spin stops by then (HwQueue.pollEndNs).
   */
  private arm(deadlineNs: number): void {
    this.timer.arm(deadlineNs - this.spinNs);
    this.hctx.pollEndNs = deadlineNs - HANDOFF_NS;
  }

  private disarm(): void {
    this.timer.disarm();
    this.hctx.pollEndNs = 0;
  }

  private expire(): void {
    const cap = this.deadlines.length;
    let now = native.monotonicNs();
    // Woken early on purpose (arm): spin to the first deadline if it is within the budget.
    // Only toward that one: what ends now is published when this callback returns.
    if (this.count > 0 && this.spinNs > 0) {
      const first = this.deadlines[this.head];
      if (first > now && first - now <= this.spinNs) now = native.spinUntil(first, this.spinNs);
    }
    const hctx = this.hctx;
    hctx.beginCompletionBatch();
    try {
      while (this.count > 0 && this.deadlines[this.head] <= now) {
        const ref = this.refs[this.head];
        this.head = (this.head + 1) % cap;
        this.count--;
        const rq = hctx.reclaim(ref);
        if (rq !== null) this.onExpire(rq);
        else {
          this.stale++;
          this.onStale(ref % (1 << TAG_BITS));
        }
      }
      if (this.count > 0) this.arm(this.deadlines[this.head]);
      else hctx.pollEndNs = 0;
    } finally {
      // Publishes what ended, at once (and the queue's drain may catch the next request).
      hctx.endCompletionBatch();
    }
  }

  /** Teardown: every pending request is aborted with IOERR; the timer stops. */
  cancel(): void {
    this.disarm();
    const cap = this.deadlines.length;
    while (this.count > 0) {
      const rq = this.hctx.reclaim(this.refs[this.head]);
      this.head = (this.head + 1) % cap;
      this.count--;
      if (rq !== null) this.hctx.abort(rq, BlkStatus.IoErr);
    }
  }

  /** cancel(), then releases the timerfd. */
  close(): void {
    this.cancel();
    this.watcher.stop();
    this.timer.close();
  }
}
