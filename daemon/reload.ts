/**
 * Reloader: SIGHUP (`systemctl reload`, `ExecReload=kill -HUP $MAINPID`) re-reads the
 * configuration file and brings the running daemon in line with it, disk by disk (disks are
 * matched by `name`):
 * - a disk only in the new file starts (its socket listens);
 * - a disk no longer in the file stops: its front-end is disconnected, its socket removed;
 * - a changed key that can apply to a served disk applies at once (LIVE_DISK_KEYS), and so does
 *   the top-level `log_level`;
 * - every other changed key is refused: the disk keeps serving with its old value, and one log
 *   line (warn) names the disk and the keys (they apply at the next restart).
 * A file that does not load (unreadable, not JSON, a bad value) changes nothing; the error is
 * logged. Reloads run one at a time, in the order asked.
 */
import type { Logger } from 'pino';
import type { DaemonConfig } from '../config/load';
import type { DiskConfig } from '../config/disk-schema';
import { parseRange } from '../drivers/null/badblocks';
import type { ServedDisk } from './service';

/**
 * Disk keys a reload applies to a disk being served: `badblocks` (the list is replaced, on
 * every thread of the disk; ranges set by `rnull ctl badblocks` are kept unless the file's list
 * changed) and `rotational` (a label). Everything else (geometry, queues, threads, driver,
 * socket, mbps, io_timeout, ...) is fixed while the disk is served.
 */
export const LIVE_DISK_KEYS: ReadonlySet<string> = new Set(['badblocks', 'rotational']);

/** Top-level keys a reload applies: `log_level` (main thread's loggers; worker threads keep theirs). */
export const LIVE_TOP_KEYS: ReadonlySet<string> = new Set(['log_level']);

/** What a reload did. */
export interface ReloadOutcome {
  /** The file did not load: nothing changed. */
  error?: string;
  added: string[];
  removed: string[];
  /** Keys applied live (disk null: a top-level key). */
  applied: Array<{ disk: string | null; key: string }>;
  /** Changed keys kept at their old value until a restart. */
  refused: Array<{ disk: string | null; keys: string[] }>;
  /** Disks of the new file that could not start. */
  failed: Array<{ disk: string; error: string }>;
}

/** What the reloader needs of the service (daemon/service.ts Service). */
export interface ReloadableService {
  readonly disks: ServedDisk[];
  addDisk(config: DiskConfig): Promise<ServedDisk>;
  removeDisk(name: string): Promise<boolean>;
}

/** The keys whose values differ between two configurations of one disk (sorted). */
export function changedKeys(a: object, b: object): string[] {
  const ra = a as Record<string, unknown>;
  const rb = b as Record<string, unknown>;
  const keys = new Set([...Object.keys(ra), ...Object.keys(rb)]);
  return [...keys].filter((k) => JSON.stringify(ra[k]) !== JSON.stringify(rb[k])).sort();
}

export class Reloader {
  private chain: Promise<unknown> = Promise.resolve();
  /** The configuration in effect (as loaded, with refused keys at their old values). */
  private current: DaemonConfig;

  /**
   * @param load reads the file again with the command line's flags on top (throws ConfigError)
   * @param setLogLevel applies a new top-level log_level to the daemon's loggers
   */
  constructor(
    private readonly service: ReloadableService,
    current: DaemonConfig,
    private readonly load: () => DaemonConfig,
    private readonly log: Logger,
    private readonly setLogLevel: (level: string) => void,
  ) {
    this.current = structuredClone(current);
  }

  /** The configuration in effect now. */
  get config(): DaemonConfig {
    return structuredClone(this.current);
  }

  /** Reloads after any reload already running; never rejects. */
  reload(): Promise<ReloadOutcome> {
    const next = this.chain.then(() => this.reloadOnce());
    this.chain = next.catch(() => undefined);
    return next.catch((e: unknown) => ({ error: `reload failed: ${(e as Error).message}`, added: [], removed: [], applied: [], refused: [], failed: [] }));
  }

  private async reloadOnce(): Promise<ReloadOutcome> {
    const out: ReloadOutcome = { added: [], removed: [], applied: [], refused: [], failed: [] };
    let next: DaemonConfig;
    try {
      next = this.load();
    } catch (e) {
      out.error = (e as Error).message;
      this.log.error({ err: e }, `reload refused, nothing changed: ${out.error}`);
      return out;
    }
    const cur = this.current;
    const result: DaemonConfig = { ...cur, disks: [] };

    // Top level.
    for (const key of changedKeys({ log_level: cur.log_level, management_socket: cur.management_socket }, { log_level: next.log_level, management_socket: next.management_socket })) {
      if (LIVE_TOP_KEYS.has(key)) {
        this.setLogLevel(next.log_level);
        result.log_level = next.log_level;
        out.applied.push({ disk: null, key });
      } else {
        out.refused.push({ disk: null, keys: [key] });
        this.log.warn({ keys: [key] }, `reload: ${key} cannot change while running (restart to apply it); kept as it was`);
      }
    }

    const nextByName = new Map(next.disks.map((d) => [d.name, d]));
    const curByName = new Map(cur.disks.map((d) => [d.name, d]));

    // Removed disks first: a new disk may take over a removed one's socket.
    for (const d of cur.disks) {
      if (nextByName.has(d.name)) continue;
      await this.service.removeDisk(d.name);
      out.removed.push(d.name);
      this.log.info({ disk: d.name, socket: d.socket }, 'reload: disk removed (front-end disconnected, socket removed)');
    }

    // Disks in both: live keys apply, the rest is refused.
    for (const d of cur.disks) {
      const n = nextByName.get(d.name);
      if (n === undefined) continue;
      const kept: DiskConfig = { ...n };
      const refused: string[] = [];
      const served = this.service.disks.find((s) => s.config.name === d.name);
      for (const key of changedKeys(d, n)) {
        if (LIVE_DISK_KEYS.has(key) && served !== undefined) {
          await applyLive(served, key, n);
          out.applied.push({ disk: d.name, key });
        } else {
          refused.push(key);
          (kept as unknown as Record<string, unknown>)[key] = (d as unknown as Record<string, unknown>)[key];
        }
      }
      if (refused.length > 0) {
        out.refused.push({ disk: d.name, keys: refused });
        this.log.warn({ disk: d.name, keys: refused }, `reload: disk ${d.name}: ${refused.join(', ')} cannot change while the disk is served (restart to apply); kept as they were`);
      }
      result.disks.push(kept);
    }

    // Added disks.
    for (const n of next.disks) {
      if (curByName.has(n.name)) continue;
      try {
        await this.service.addDisk(structuredClone(n));
        out.added.push(n.name);
        result.disks.push(n);
        this.log.info({ disk: n.name, socket: n.socket }, 'reload: disk added');
      } catch (e) {
        out.failed.push({ disk: n.name, error: (e as Error).message });
        this.log.error({ disk: n.name, err: e }, `reload: disk ${n.name} could not start: ${(e as Error).message}`);
      }
    }

    this.current = result;
    // At warn when something did not apply, so that it shows at any level but error.
    const level = out.refused.length > 0 || out.failed.length > 0 ? 'warn' : 'info';
    this.log[level](
      { added: out.added, removed: out.removed, applied: out.applied, refused: out.refused, failed: out.failed },
      `reloaded: ${out.added.length} added, ${out.removed.length} removed, ${out.applied.length} applied, ${out.refused.reduce((n, r) => n + r.keys.length, 0)} refused, ${out.failed.length} failed`,
    );
    return out;
  }
}

/** Applies one LIVE_DISK_KEYS key of `next` to a served disk. */
async function applyLive(d: ServedDisk, key: string, next: DiskConfig): Promise<void> {
  if (key === 'rotational') {
    d.config.rotational = next.rotational;
    return;
  }
  if (key === 'badblocks') {
    d.config.badblocks = next.badblocks.slice();
    const bb = d.driver.badblocks;
    if (bb === null) return;
    for (const [s, e] of bb.list()) bb.remove(s, e);
    for (const r of next.badblocks) bb.add(...parseRange(r));
    if (d.workers !== null) await d.workers.setBadBlocks(bb.list());
  }
}
