/**
 * ManagementServer: the daemon's control socket. Answers ListDisks, BadBlocks (list, add,
 * remove at run time) and GetStats; a malformed message gets an error Response and the
 * connection is closed. Unix stream socket, mode 0600 from the moment it can be reached.
 *
 * A client idle for `idleTimeoutMs` is disconnected, and close() disconnects every client, so
 * no client can hold up shutdown. A client that does not read its answers is disconnected once
 * MAX_UNREAD_BYTES of them wait.
 */
import * as fs from 'fs';
import * as net from 'net';
import * as path from 'path';
import type { Logger } from 'pino';
import { native } from '../../native';
import { SyscallError } from '../../native/errors';
import type { ManagedDisk, NvmeQueueCounters } from './managed-disk';
import { BadBlocksAction, readDelimited, RequestMsg, RequestType, ResponseMsg, ResponseType, type NvmeQueueStatsMsg } from './schema';

export interface ManagementServerOptions {
  /** A client that sends nothing for this many milliseconds is disconnected (default 60000). */
  idleTimeoutMs?: number;
}

/** Answers a client has not read yet, in bytes, beyond which it is disconnected. */
const MAX_UNREAD_BYTES = 4 << 20;
const ECONNREFUSED = 111;

export class ManagementServer {
  private readonly server: net.Server;
  private readonly clients = new Set<net.Socket>();
  private readonly idleTimeoutMs: number;
  /** The socket file we created (its inode), removed again by close() if still ours. */
  private createdIno: number | null = null;

  constructor(
    readonly socketPath: string,
    private readonly disks: readonly ManagedDisk[],
    private readonly log: Logger,
    options: ManagementServerOptions = {},
  ) {
    this.idleTimeoutMs = options.idleTimeoutMs ?? 60000;
    this.server = net.createServer((c) => this.serve(c));
  }

  /**
   * Listens on socketPath. The socket is bound under a temporary name with umask 0177 (mode
   * 0600 from the start), chmod'ed to 0600 and renamed into place, so the path is never
   * reachable with a looser mode. A stale socket file (nobody listening) is replaced.
   * @throws (rejects) Error when the path is a live socket (another daemon's) or not a socket.
   */
  async listen(): Promise<void> {
    removeStaleSocket(this.socketPath);
    const tmp = path.join(path.dirname(this.socketPath), `.${path.basename(this.socketPath)}.${process.pid}.tmp`);
    fs.rmSync(tmp, { force: true });
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      // net binds a unix socket synchronously inside listen(): the umask covers the bind only.
      const umask = process.umask(0o177);
      try {
        this.server.listen(tmp, () => {
          this.server.off('error', reject);
          resolve();
        });
      } finally {
        process.umask(umask);
      }
    });
    try {
      fs.chmodSync(tmp, 0o600);
      fs.renameSync(tmp, this.socketPath);
      this.createdIno = fs.lstatSync(this.socketPath).ino;
    } catch (e) {
      await new Promise<void>((resolve) => this.server.close(() => resolve()));
      fs.rmSync(tmp, { force: true });
      throw e;
    }
    this.log.info({ socket: this.socketPath }, 'management socket listening');
  }

  /** Stops listening, disconnects every client (idle or not) and removes the socket file. */
  async close(): Promise<void> {
    if (!this.server.listening) return;
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const c of this.clients) c.destroy();
    this.clients.clear();
    await closed;
    try {
      if (this.createdIno !== null && fs.lstatSync(this.socketPath).ino === this.createdIno) fs.unlinkSync(this.socketPath);
    } catch {
      // already gone
    }
    this.createdIno = null;
  }

  private serve(conn: net.Socket): void {
    this.clients.add(conn);
    conn.on('close', () => this.clients.delete(conn));
    conn.setTimeout(this.idleTimeoutMs, () => {
      this.log.debug('management client idle: disconnected');
      conn.destroy();
    });
    const frames = new FrameBuffer();
    let replies = Promise.resolve();
    let failed = false;
    conn.on('data', (chunk: Buffer) => {
      if (failed) return;
      let messages: Buffer[];
      try {
        messages = frames.push(chunk);
      } catch (e) {
        failed = true;
        this.reply(conn, { ok: false, error: (e as Error).message });
        conn.end();
        return;
      }
      for (const m of messages) {
        let req: RequestMsg;
        try {
          req = RequestType.toObject(RequestType.decode(m), { longs: Number, oneofs: true }) as RequestMsg;
        } catch (e) {
          const error = `malformed request: ${(e as Error).message}`;
          failed = true;
          replies = replies.then(() => {
            this.reply(conn, { ok: false, error });
            conn.end();
          });
          break;
        }
        // Answered in order, each once its (possibly asynchronous) handling is done.
        replies = replies.then(async () => this.reply(conn, await this.handle(req)));
      }
      frames.consumed();
    });
    conn.on('error', () => conn.destroy());
  }

  private reply(conn: net.Socket, r: Partial<ResponseMsg>): void {
    if (conn.destroyed) return;
    conn.write(Buffer.from(ResponseType.encodeDelimited(ResponseType.fromObject(r)).finish()));
    if (conn.writableLength > MAX_UNREAD_BYTES) {
      this.log.warn({ unreadBytes: conn.writableLength }, 'management client does not read its answers: disconnected');
      conn.destroy();
    }
  }

  /** One request; errors are answered, never thrown. */
  async handle(req: RequestMsg): Promise<Partial<ResponseMsg>> {
    try {
      if (req.list_disks !== undefined) {
        return {
          ok: true,
          disks: this.disks.map((d) => ({
            name: d.config.name,
            socket: d.config.socket,
            capacity_sectors: d.disk.capacitySectors,
            logical_block_size: d.disk.logicalBlockSize,
            connected: d.server.isConnected,
            num_queues: d.config.num_queues,
            rotational: d.config.rotational,
            hw_queue_depth: d.disk.tagSet.queueDepth,
            shared_tags: d.config.shared_tags,
          })),
        };
      }
      if (req.bad_blocks !== undefined) {
        const b = req.bad_blocks;
        const d = this.disk(b.disk);
        const bb = d.driver.badblocks;
        if (bb === null) throw new Error(`disk "${d.config.name}" has no bad-block list (only null disks have one)`);
        if (b.action === BadBlocksAction.ADD) bb.add(b.start ?? 0, b.end ?? 0);
        else if (b.action === BadBlocksAction.REMOVE) bb.remove(b.start ?? 0, b.end ?? 0);
        if (b.action !== BadBlocksAction.LIST && d.workers !== null) await d.workers.setBadBlocks(bb.list());
        if (b.action !== BadBlocksAction.LIST) this.log.info({ disk: b.disk, action: b.action, start: b.start, end: b.end }, 'bad blocks changed');
        return { ok: true, bad_blocks: bb.list().map(([start, end]) => ({ start, end })) };
      }
      if (req.drop_cache !== undefined) {
        const d = this.disk(req.drop_cache.disk);
        if (d.driver.cache === null) throw new Error(`disk "${d.config.name}" has no write cache (cache_size 0)`);
        const lost = d.driver.cache.dirtyBytes;
        d.driver.cache.drop();
        this.log.warn({ disk: d.config.name, lostBytes: lost }, 'write cache dropped on request (power-failure emulation)');
        return { ok: true, cache_dirty_bytes: 0 };
      }
      if (req.reset_controller !== undefined) {
        const d = this.disk(req.reset_controller.disk);
        if (d.nvme === undefined) throw new Error(`disk "${d.config.name}" is not served by the nvme driver`);
        this.log.warn({ disk: d.config.name }, 'controller reset requested');
        await d.nvme.nvme.resetController('requested by rnull ctl');
        if (d.nvme.nvme.broken) throw new Error(`disk "${d.config.name}": the controller did not come back from the reset`);
        return { ok: true };
      }
      if (req.get_stats !== undefined) {
        const d = this.disk(req.get_stats.disk);
        const snapshots = await Promise.all(d.device.vrings.map((r) => r.queue.snapshot()));
        await d.nvme?.nvme.refreshStats?.(); // counters of queue pairs served on worker threads
        const nvme = d.nvme?.nvme.stats();
        return {
          ok: true,
          cache_dirty_bytes: d.driver.cache?.dirtyBytes ?? 0,
          queues: snapshots.map((q, index) => ({
            index,
            running: q.running,
            thread: q.thread,
            requests: q.requests,
            failed_requests: q.failedRequests,
            bad_chains: q.badChains,
            in_flight: q.inFlight,
            broken: q.broken,
            batches: q.batches,
            calls: q.calls,
            spins: q.spins,
            spin_hits: q.spinHits,
            spin_yields: q.spinYields,
            poll_ns: q.pollNs,
            nvme: nvmeQueueStats(nvme?.[index]),
          })),
        };
      }
      return { ok: false, error: 'empty request' };
    } catch (e) {
      return { ok: false, error: (e as Error).message };
    }
  }

  private disk(name: string): ManagedDisk {
    const d = this.disks.find((x) => x.config.name === name);
    if (d === undefined) throw new Error(`no disk named "${name}" (disks: ${this.disks.map((x) => x.config.name).join(', ')})`);
    return d;
  }
}

/**
 * The bytes of one connection not yet parsed into frames, in one buffer grown geometrically:
 * each byte is copied a bounded number of times however it is split into chunks (the old
 * concatenation on every chunk was quadratic). The 1 MiB frame cap (readDelimited) bounds it.
 */
export class FrameBuffer {
  private buf = Buffer.alloc(0);
  private len = 0;
  private used = 0;

  /**
   * Appends `chunk`; returns the complete frames now buffered (views into the buffer, valid
   * until consumed() is called). @throws Error for a corrupt or over-long length prefix.
   */
  push(chunk: Buffer): Buffer[] {
    if (this.len + chunk.length > this.buf.length) {
      const grown = Buffer.allocUnsafe(Math.max(2 * this.buf.length, this.len + chunk.length, 4096));
      this.buf.copy(grown, 0, 0, this.len);
      this.buf = grown;
    }
    chunk.copy(this.buf, this.len);
    this.len += chunk.length;
    const { messages, rest } = readDelimited(this.buf.subarray(0, this.len));
    this.used = this.len - rest.length;
    return messages;
  }

  /** The frames push() returned are handled: their bytes are dropped (the rest moves up). */
  consumed(): void {
    if (this.used === 0) return;
    this.buf.copy(this.buf, 0, this.used, this.len);
    this.len -= this.used;
    this.used = 0;
  }

  /** Bytes buffered. */
  get length(): number {
    return this.len;
  }
}

/**
 * Removes a stale socket file at `p` (nobody listening: connecting is refused).
 * @throws Error when `p` is a live socket (another process serves it) or not a socket.
 */
function removeStaleSocket(p: string): void {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(p);
  } catch {
    return; // nothing there
  }
  if (!st.isSocket()) throw new Error(`management socket ${p} exists and is not a socket; refusing to replace it`);
  try {
    native.close(native.connectUnix(p));
  } catch (e) {
    if (e instanceof SyscallError && e.errno === ECONNREFUSED) {
      fs.unlinkSync(p);
      return;
    }
    throw e;
  }
  throw new Error(`management socket ${p} is in use by another process`);
}

/** An NVMe queue pair's counters for the protocol, or undefined for other drivers. */
function nvmeQueueStats(n: NvmeQueueCounters | undefined): NvmeQueueStatsMsg | undefined {
  if (n === undefined) return undefined;
  return {
    qid: n.qid,
    commands: n.commands,
    splits: n.splits,
    bounces: n.bounces,
    aborts: n.aborts,
    resets: n.resets,
    retries: n.retries,
    waits: n.waits,
    errors: n.errors,
    timeouts: n.timeouts,
    late: n.late,
    stale: n.stale,
    interrupts: n.interrupts,
    sq_doorbells: n.sqDoorbells,
    cq_doorbells: n.cqDoorbells,
    in_flight: n.inFlight,
    sq_doorbells_skipped: n.sqDoorbellsSkipped ?? 0,
    cq_doorbells_skipped: n.cqDoorbellsSkipped ?? 0,
    shadow_doorbells: n.shadowDoorbells ?? false,
  };
}
