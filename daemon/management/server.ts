/**
 * ManagementServer: the daemon's control socket. Answers ListDisks, BadBlocks (list, add,
 * remove at run time) and GetStats; a malformed message gets an error Response and the
 * connection is closed. Unix stream socket, created with mode 0600.
 */
import * as fs from 'fs';
import * as net from 'net';
import type { Logger } from 'pino';
import type { ManagedDisk } from './managed-disk';
import { BadBlocksAction, readDelimited, RequestMsg, RequestType, ResponseMsg, ResponseType } from './schema';

export class ManagementServer {
  private readonly server: net.Server;

  constructor(
    readonly socketPath: string,
    private readonly disks: readonly ManagedDisk[],
    private readonly log: Logger,
  ) {
    this.server = net.createServer((c) => this.serve(c));
  }

  listen(): Promise<void> {
    try {
      if (fs.lstatSync(this.socketPath).isSocket()) fs.unlinkSync(this.socketPath);
    } catch {
      // nothing there
    }
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(this.socketPath, () => {
        fs.chmodSync(this.socketPath, 0o600);
        this.log.info({ socket: this.socketPath }, 'management socket listening');
        resolve();
      });
    });
  }

  close(): Promise<void> {
    return new Promise((resolve) => this.server.close(() => resolve()));
  }

  private serve(conn: net.Socket): void {
    let pending = Buffer.alloc(0);
    let replies = Promise.resolve();
    conn.on('data', (chunk: Buffer) => {
      pending = Buffer.concat([pending, chunk]);
      let parsed;
      try {
        parsed = readDelimited(pending);
      } catch (e) {
        this.reply(conn, { ok: false, error: (e as Error).message });
        conn.end();
        return;
      }
      pending = Buffer.from(parsed.rest);
      for (const m of parsed.messages) {
        let req: RequestMsg;
        try {
          req = RequestType.toObject(RequestType.decode(m), { longs: Number, oneofs: true }) as RequestMsg;
        } catch (e) {
          const error = `malformed request: ${(e as Error).message}`;
          replies = replies.then(() => {
            this.reply(conn, { ok: false, error });
            conn.end();
          });
          return;
        }
        // Answered in order, each once its (possibly asynchronous) handling is done.
        replies = replies.then(async () => this.reply(conn, await this.handle(req)));
      }
    });
    conn.on('error', () => conn.destroy());
  }

  private reply(conn: net.Socket, r: Partial<ResponseMsg>): void {
    conn.write(Buffer.from(ResponseType.encodeDelimited(ResponseType.fromObject(r)).finish()));
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
      if (req.get_stats !== undefined) {
        const d = this.disk(req.get_stats.disk);
        const snapshots = await Promise.all(d.device.vrings.map((r) => r.queue.snapshot()));
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
            poll_ns: q.pollNs,
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
