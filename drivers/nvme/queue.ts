/**
 * One NVMe submission/completion queue pair in DMA memory (NVM Express Base 1.4, 4.1 "Submission
 * Queue & Completion Queue Definition", 7.2.x doorbells): SQEs written at the tail, the tail
 * doorbell rung once per batch (`commit`), completions found by the phase tag and the CQ head
 * doorbell rung once per completion batch.
 *
 * Command identifiers carry a generation: CID = generation << 12 | tag, with a 4-bit generation
 * bumped each time a tag is handed out. A completion whose tag is not in flight, or whose
 * generation is not the tag's current one, is dropped (counted and logged): a late completion
 * after an abort, a timeout or a reset can never end the request that reused the tag.
 *
 * At most `entries - 1` commands are in flight (tags), so neither ring can overflow: the
 * controller never has more unconsumed SQEs or unreaped CQEs than commands outstanding.
 *
 * With shadow doorbells (shadow-doorbell.ts; setShadow) each new SQ tail and CQ head is stored
 * in the queue's Shadow Doorbell entries, and the doorbell register is written only when the
 * controller's EventIdx entry asks for it (needEvent); the writes left out are counted.
 */
import { CQE_SIZE, SQE_SIZE, readCqe, writeSqe, type CommandFields, type Completion } from './command';
import { needEvent, type ShadowDoorbell } from './shadow-doorbell';

export const TAG_BITS = 12;
export const MAX_TAGS = 1 << TAG_BITS;
const GEN_MASK = 0xf;

/** Writes the queue's doorbells (BAR0 MMIO in the driver, a recorder in tests). */
export interface Doorbells {
  /** New SQ tail (0..entries-1). */
  sqTail(value: number): void;
  /** New CQ head (0..entries-1). */
  cqHead(value: number): void;
}

export interface QueuePairOptions {
  /** Queue id (0: admin). */
  qid: number;
  /** Slots in each ring (2..4097: tags = entries - 1 must fit in 12 bits). */
  entries: number;
  /** SQ ring memory, at least entries x 64 bytes. */
  sq: Uint8Array;
  /** CQ ring memory, at least entries x 16 bytes; must start zeroed (phase 0 everywhere). */
  cq: Uint8Array;
  doorbells: Doorbells;
  /** Most CQEs handled by one poll() (default min(entries, 256)). */
  maxBatch?: number;
  /** Told about every dropped completion. */
  onStale?: (qid: number, c: Completion, reason: string) => void;
  /** Shadow doorbell entries to use from the start (see setShadow). */
  shadow?: ShadowDoorbell | null;
}

export interface QueueStats {
  submitted: number;
  completed: number;
  /** Completions dropped: tag not in flight, or generation mismatch. */
  stale: number;
  /** SQ tail doorbell writes. */
  sqDoorbells: number;
  /** CQ head doorbell writes. */
  cqDoorbells: number;
  /** SQ tails / CQ heads published in the shadow doorbell only (the EventIdx did not ask for the write). */
  sqDoorbellsSkipped: number;
  cqDoorbellsSkipped: number;
}

export class QueuePair<T> {
  readonly qid: number;
  readonly entries: number;
  /** Commands that can be in flight at once. */
  readonly capacity: number;
  readonly stats: QueueStats = { submitted: 0, completed: 0, stale: 0, sqDoorbells: 0, cqDoorbells: 0, sqDoorbellsSkipped: 0, cqDoorbellsSkipped: 0 };

  private readonly sqView: DataView;
  private readonly cqView: DataView;
  private readonly doorbells: Doorbells;
  private readonly maxBatch: number;
  private readonly onStale: (qid: number, c: Completion, reason: string) => void;

  private sqTail = 0;
  /** The tail the controller was last told. */
  private sqTailRung = 0;
  /** Last SQ head the controller reported. */
  private sqHeadSeen = 0;
  private cqHead = 0;
  /** The CQ head the controller was last told. */
  private cqHeadRung = 0;
  private phase = 1;
  private shadow: ShadowDoorbell | null = null;

  private readonly gen: Uint8Array;
  private readonly ctx: (T | undefined)[];
  private readonly busy: Uint8Array;
  private readonly freeTags: number[];

  constructor(o: QueuePairOptions) {
    if (!Number.isInteger(o.entries) || o.entries < 2 || o.entries > MAX_TAGS + 1) {
      throw new RangeError(`queue size ${o.entries} not in 2..${MAX_TAGS + 1}`);
    }
    if (o.sq.byteLength < o.entries * SQE_SIZE) throw new RangeError(`SQ memory ${o.sq.byteLength} bytes < ${o.entries} x ${SQE_SIZE}`);
    if (o.cq.byteLength < o.entries * CQE_SIZE) throw new RangeError(`CQ memory ${o.cq.byteLength} bytes < ${o.entries} x ${CQE_SIZE}`);
    this.qid = o.qid;
    this.entries = o.entries;
    this.capacity = o.entries - 1;
    this.sqView = new DataView(o.sq.buffer, o.sq.byteOffset, o.entries * SQE_SIZE);
    this.cqView = new DataView(o.cq.buffer, o.cq.byteOffset, o.entries * CQE_SIZE);
    this.doorbells = o.doorbells;
    this.maxBatch = Math.max(1, Math.min(o.maxBatch ?? 256, o.entries));
    this.onStale = o.onStale ?? (() => undefined);
    this.gen = new Uint8Array(this.capacity);
    this.ctx = new Array<T | undefined>(this.capacity).fill(undefined);
    this.busy = new Uint8Array(this.capacity);
    // Pop from the end: tag 0 first.
    this.freeTags = Array.from({ length: this.capacity }, (_, i) => this.capacity - 1 - i);
    if (o.shadow) this.setShadow(o.shadow);
  }

  /**
   * Uses shadow doorbell entries `s` from now on (null: the registers only). Set it when the
   * controller has accepted the buffers, with the entries holding this queue's current SQ tail
   * and CQ head (Doorbell Buffer Config on a fresh queue: both 0).
   */
  setShadow(s: ShadowDoorbell | null): void {
    this.shadow = s;
  }

  /** The SQ tail and CQ head the controller was last told (doorbell or shadow). */
  get publishedSqTail(): number {
    return this.sqTailRung;
  }
  get publishedCqHead(): number {
    return this.cqHeadRung;
  }

  /** Whether the queue uses shadow doorbells. */
  get shadowed(): boolean {
    return this.shadow !== null;
  }

  /** Commands submitted and not yet completed (or abandoned). */
  get inFlight(): number {
    return this.capacity - this.freeTags.length;
  }

  /** The SQ head the controller last reported (entries it has consumed up to). */
  get sqHead(): number {
    return this.sqHeadSeen;
  }

  /**
   * Writes the command into the next SQ slot with a fresh command id and remembers `ctx` for
   * its completion. The controller is not told until commit(). Returns the command id, or -1
   * when every tag is in flight. RangeError for a bad field (no tag is used then).
   */
  submit(fields: CommandFields, ctx: T): number {
    const tag = this.freeTags.pop();
    if (tag === undefined) return -1;
    const g = (this.gen[tag]! + 1) & GEN_MASK;
    const cid = (g << TAG_BITS) | tag;
    try {
      writeSqe(this.sqView, this.sqTail * SQE_SIZE, cid, fields);
    } catch (err) {
      this.freeTags.push(tag);
      throw err;
    }
    this.gen[tag] = g;
    this.ctx[tag] = ctx;
    this.busy[tag] = 1;
    this.sqTail = (this.sqTail + 1) % this.entries;
    this.stats.submitted++;
    return cid;
  }

  /** The tag the next submit will use (its PRP list page, say), or -1 when every tag is in flight. */
  get nextTag(): number {
    const n = this.freeTags.length;
    return n === 0 ? -1 : (this.freeTags[n - 1] as number);
  }

  /**
   * submit() for the data path, allocation-free: an NVM command with NSID, PRP1/PRP2 (IOVAs,
   * dword aligned; the caller checks) and CDW10-13 (32-bit values), PSDT 0. Uses the tag
   * `nextTag` named. Returns the command id, or -1 when every tag is in flight.
   */
  submitIo(opcode: number, nsid: number, prp1: number, prp2: number, cdw10: number, cdw11: number, cdw12: number, cdw13: number, ctx: T): number {
    const tag = this.freeTags.pop();
    if (tag === undefined) return -1;
    const g = (this.gen[tag]! + 1) & GEN_MASK;
    const cid = (g << TAG_BITS) | tag;
    const v = this.sqView;
    const at = this.sqTail * SQE_SIZE;
    v.setUint32(at, (opcode | (cid << 16)) >>> 0, true);
    v.setUint32(at + 4, nsid, true);
    v.setUint32(at + 8, 0, true);
    v.setUint32(at + 12, 0, true);
    v.setUint32(at + 16, 0, true); // MPTR
    v.setUint32(at + 20, 0, true);
    v.setUint32(at + 24, prp1 % 0x100000000, true);
    v.setUint32(at + 28, Math.floor(prp1 / 0x100000000), true);
    v.setUint32(at + 32, prp2 % 0x100000000, true);
    v.setUint32(at + 36, Math.floor(prp2 / 0x100000000), true);
    v.setUint32(at + 40, cdw10, true);
    v.setUint32(at + 44, cdw11, true);
    v.setUint32(at + 48, cdw12, true);
    v.setUint32(at + 52, cdw13, true);
    v.setUint32(at + 56, 0, true);
    v.setUint32(at + 60, 0, true);
    this.gen[tag] = g;
    this.ctx[tag] = ctx;
    this.busy[tag] = 1;
    this.sqTail = (this.sqTail + 1) % this.entries;
    this.stats.submitted++;
    return cid;
  }

  /**
   * poll() for the data path, allocation-free: each live completion is passed to `complete`
   * at once (its tag already free, so `complete` may submit) with its context, status field
   * (without the phase bit; 0 is success), DW0 and the command's tag (cid bits 11:0, for
   * per-command state such as a PRP list page or a bounce buffer). At most `max` entries; the CQ head doorbell
   * is rung once at the end if any entry was consumed. Returns the entries consumed.
   */
  reap(complete: (ctx: T, status: number, dw0: number, tag: number) => void, max = this.maxBatch): number {
    let n = 0;
    const limit = Math.min(max, this.maxBatch);
    const v = this.cqView;
    while (n < limit) {
      const at = this.cqHead * CQE_SIZE;
      const dw3 = v.getUint32(at + 12, true);
      if (((dw3 >>> 16) & 1) !== this.phase) break;
      const dw0 = v.getUint32(at, true);
      const sqHead = v.getUint32(at + 8, true) & 0xffff;
      n++;
      this.cqHead++;
      if (this.cqHead === this.entries) {
        this.cqHead = 0;
        this.phase ^= 1;
      }
      if (sqHead < this.entries) this.sqHeadSeen = sqHead;
      const cid = dw3 & 0xffff;
      const tag = cid & (MAX_TAGS - 1);
      if (tag >= this.capacity || this.busy[tag] === 0 || this.gen[tag] !== cid >>> TAG_BITS) {
        this.stats.stale++;
        this.onStale(this.qid, readCqe(v, at), tag >= this.capacity ? `tag ${tag} out of range` : this.busy[tag] === 0 ? `tag ${tag} not in flight` : `generation ${cid >>> TAG_BITS} of tag ${tag}, expected ${this.gen[tag]}`);
        continue;
      }
      const ctx = this.ctx[tag] as T;
      this.release(tag);
      this.stats.completed++;
      complete(ctx, dw3 >>> 17, dw0, tag);
    }
    if (n > 0) this.publishCqHead();
    return n;
  }

  /** How many new completions the CQ holds now, up to `max`, consuming none (diagnostics, tests). */
  peek(max: number): number {
    let n = 0;
    let head = this.cqHead;
    let phase = this.phase;
    while (n < max && n < this.entries) {
      if (((this.cqView.getUint32(head * CQE_SIZE + 12, true) >>> 16) & 1) !== phase) break;
      n++;
      if (++head === this.entries) {
        head = 0;
        phase ^= 1;
      }
    }
    return n;
  }

  /**
   * Tells the controller the SQ tail if commands were added since the last commit: the doorbell
   * register, or with shadow doorbells the shadow entry (and the register if the EventIdx asks).
   * Returns whether there was anything to tell.
   */
  commit(): boolean {
    const tail = this.sqTail;
    const old = this.sqTailRung;
    if (tail === old) return false;
    this.sqTailRung = tail;
    const s = this.shadow;
    if (s !== null && this.leftToShadow(s, s.sqOffset, tail, old)) {
      this.stats.sqDoorbellsSkipped++;
      return true;
    }
    this.doorbells.sqTail(tail);
    this.stats.sqDoorbells++;
    return true;
  }

  /** Tells the controller the CQ head (after a completion batch), as commit() does the SQ tail. */
  private publishCqHead(): void {
    const head = this.cqHead;
    const old = this.cqHeadRung;
    this.cqHeadRung = head;
    const s = this.shadow;
    if (s !== null && this.leftToShadow(s, s.cqOffset, head, old)) {
      this.stats.cqDoorbellsSkipped++;
      return;
    }
    this.doorbells.cqHead(head);
    this.stats.cqDoorbells++;
  }

  /**
   * Stores `value` in the shadow entry at `offset`, then (after a full fence) reads the
   * controller's EventIdx entry there: true when moving from `old` to `value` does not pass it,
   * so the register write can be left out.
   */
  private leftToShadow(s: ShadowDoorbell, offset: number, value: number, old: number): boolean {
    s.shadow.setUint32(offset, value, true);
    s.fence();
    return !needEvent(s.eventIdx.getUint32(offset, true), value, old, this.entries);
  }

  /**
   * Handles up to `max` (default maxBatch) new completions: each live one is passed to
   * `complete` with its context and its tag is freed first (so `complete` may submit again);
   * stale ones are dropped. Rings the CQ head doorbell once if any entry was consumed.
   * Returns how many entries were consumed (live + stale).
   */
  poll(complete: (ctx: T, c: Completion) => void, max = this.maxBatch): number {
    let n = 0;
    const limit = Math.min(max, this.maxBatch);
    const done: [T, Completion][] = [];
    while (n < limit) {
      const at = this.cqHead * CQE_SIZE;
      // The phase tag is read first; the rest of the entry after it (x86 keeps loads in order).
      const dw3 = this.cqView.getUint32(at + 12, true);
      if (((dw3 >>> 16) & 1) !== this.phase) break;
      const c = readCqe(this.cqView, at);
      n++;
      this.cqHead++;
      if (this.cqHead === this.entries) {
        this.cqHead = 0;
        this.phase ^= 1;
      }
      if (c.sqHead < this.entries) this.sqHeadSeen = c.sqHead;
      const tag = c.cid & (MAX_TAGS - 1);
      const g = c.cid >>> TAG_BITS;
      let reason: string | null = null;
      if (tag >= this.capacity) reason = `tag ${tag} out of range`;
      else if (this.busy[tag] === 0) reason = `tag ${tag} not in flight`;
      else if (this.gen[tag] !== g) reason = `generation ${g} of tag ${tag}, expected ${this.gen[tag]}`;
      if (reason !== null) {
        this.stats.stale++;
        this.onStale(this.qid, c, reason);
        continue;
      }
      const ctx = this.ctx[tag] as T;
      this.release(tag);
      this.stats.completed++;
      done.push([ctx, c]);
    }
    if (n > 0) this.publishCqHead();
    for (const [ctx, c] of done) complete(ctx, c);
    return n;
  }

  /**
   * Gives up on command `cid` (timed out, or its queue is being torn down): frees its tag and
   * returns its context; a completion that still arrives for it is dropped as stale. Returns
   * undefined if `cid` is not the tag's current in-flight command.
   */
  abandon(cid: number): T | undefined {
    const tag = cid & (MAX_TAGS - 1);
    if (tag >= this.capacity || this.busy[tag] === 0 || this.gen[tag] !== cid >>> TAG_BITS) return undefined;
    const ctx = this.ctx[tag] as T;
    this.release(tag);
    return ctx;
  }

  /**
   * Back to an empty, freshly created queue (after a controller reset, before the queue is
   * created again on the controller at the same memory): indexes and phase to their start, the
   * CQ memory zeroed, every command forgotten (tags freed; their generations stay, so nothing
   * from before the reset can match later). Returns the contexts that were in flight.
   */
  resetRing(cqMemory: Uint8Array): T[] {
    const lost: T[] = [];
    for (let tag = 0; tag < this.capacity; tag++) {
      if (this.busy[tag] === 1) {
        lost.push(this.ctx[tag] as T);
        this.release(tag);
      }
    }
    this.sqTail = 0;
    this.sqTailRung = 0;
    this.sqHeadSeen = 0;
    this.cqHead = 0;
    this.cqHeadRung = 0;
    this.phase = 1;
    cqMemory.fill(0);
    return lost;
  }

  /** The tag of every command in flight (slow path: timeouts). */
  busyTags(): number[] {
    const out: number[] = [];
    for (let tag = 0; tag < this.capacity; tag++) if (this.busy[tag] === 1) out.push(tag);
    return out;
  }

  /** The command id of tag `tag`'s current command. */
  cidOf(tag: number): number {
    return ((this.gen[tag] as number) << TAG_BITS) | tag;
  }

  /** Contexts of every command in flight, in tag order (for a reset, later). */
  outstanding(): { cid: number; ctx: T }[] {
    const out: { cid: number; ctx: T }[] = [];
    for (let tag = 0; tag < this.capacity; tag++) {
      if (this.busy[tag] === 1) out.push({ cid: (this.gen[tag]! << TAG_BITS) | tag, ctx: this.ctx[tag] as T });
    }
    return out;
  }

  private release(tag: number): void {
    this.busy[tag] = 0;
    this.ctx[tag] = undefined;
    this.freeTags.push(tag);
  }
}
