/**
 * ServiceNotifier: tells the service manager (systemd, `Type=notify`) how the daemon is doing,
 * with the sd_notify(3) protocol: newline-separated `KEY=value` assignments in one datagram to
 * the unix socket named by $NOTIFY_SOCKET (a path, or '@name' for an abstract socket). Sent by
 * the native shim (native/sd_notify.cc): non-blocking, no libsystemd.
 *
 * - Without $NOTIFY_SOCKET every call is a no-op (a daemon started by hand, a test).
 * - A failed send never stops the daemon: the first failure is logged (warn), later ones are
 *   only counted.
 * - The watchdog (`WatchdogSec=` in the unit: $WATCHDOG_USEC, and $WATCHDOG_PID when set must
 *   be this process) sends WATCHDOG=1 from a timer on the main thread's event loop every half
 *   period, so a loop that is stuck stops the pings and systemd restarts the daemon.
 * - The variables are read once and removed from process.env, so child processes and worker
 *   threads started later do not notify on the daemon's behalf.
 */
import type { Logger } from 'pino';
import { native } from '../native';

/** The part of the native shim used here (tests may pass their own). */
export interface NotifyTransport {
  notifySend(address: string, message: string): number;
  monotonicNs(): number;
}

export class ServiceNotifier {
  /** $NOTIFY_SOCKET at construction ('' when unset). */
  readonly address: string;
  /** Watchdog period in microseconds ($WATCHDOG_USEC; 0 when off or meant for another pid). */
  readonly watchdogUsec: number;
  /** Messages sent, and sends that failed. */
  sent = 0;
  failures = 0;
  private watchdogTimer: NodeJS.Timeout | null = null;
  private lastStatus = '';

  constructor(
    private readonly log: Logger,
    env: NodeJS.ProcessEnv = process.env,
    private readonly transport: NotifyTransport = native,
  ) {
    this.address = env.NOTIFY_SOCKET ?? '';
    const usec = Number(env.WATCHDOG_USEC ?? '');
    const pidOk = env.WATCHDOG_PID === undefined || env.WATCHDOG_PID === '' || Number(env.WATCHDOG_PID) === process.pid;
    this.watchdogUsec = Number.isSafeInteger(usec) && usec > 0 && pidOk && this.address !== '' ? usec : 0;
    if (env === process.env) {
      delete process.env.NOTIFY_SOCKET;
      delete process.env.WATCHDOG_USEC;
      delete process.env.WATCHDOG_PID;
    }
  }

  /** A service manager listens ($NOTIFY_SOCKET was set). */
  get enabled(): boolean {
    return this.address !== '';
  }

  /**
   * Sends the assignments (e.g. `{ READY: 1, STATUS: 'serving 2 disks' }`) as one datagram.
   * Newlines in values are replaced by spaces. Returns whether it was sent; never throws.
   */
  notify(fields: Record<string, string | number>): boolean {
    if (!this.enabled) return false;
    const message = Object.entries(fields)
      .map(([k, v]) => `${k}=${String(v).replace(/\n/g, ' ')}`)
      .join('\n');
    try {
      this.transport.notifySend(this.address, message);
      this.sent++;
      return true;
    } catch (e) {
      if (this.failures++ === 0) this.log.warn({ err: e, notifySocket: this.address }, `cannot notify the service manager: ${(e as Error).message} (logged once)`);
      return false;
    }
  }

  /** READY=1: every disk socket listens (start-up done, or a reload finished). */
  ready(status: string): boolean {
    this.lastStatus = status;
    return this.notify({ READY: 1, STATUS: status });
  }

  /** STATUS=…, sent only when it differs from the last status sent. */
  status(status: string): boolean {
    if (status === this.lastStatus) return false;
    this.lastStatus = status;
    return this.notify({ STATUS: status });
  }

  /**
   * RELOADING=1 with MONOTONIC_USEC= (CLOCK_MONOTONIC in µs: systemd 253+ needs it to match a
   * reload under Type=notify-reload; older ones ignore it). READY=1 must follow.
   */
  reloading(status: string): boolean {
    this.lastStatus = status;
    return this.notify({ RELOADING: 1, MONOTONIC_USEC: Math.floor(this.transport.monotonicNs() / 1000), STATUS: status });
  }

  /** STOPPING=1: shutdown began. Also stops the watchdog pings. */
  stopping(status: string): boolean {
    this.stopWatchdog();
    this.lastStatus = status;
    return this.notify({ STOPPING: 1, STATUS: status });
  }

  /**
   * Starts pinging WATCHDOG=1 every half watchdog period (the timer does not keep the process
   * alive). With `healthy`, each ping waits for it: a ping is sent only once it resolves true,
   * and while one check is still pending the next ticks send nothing (so a worker thread that
   * never answers stops the pings, as a stuck main loop does). Returns the interval in ms, or 0
   * when no watchdog is asked for.
   */
  startWatchdog(healthy?: () => boolean | Promise<boolean>): number {
    if (this.watchdogUsec === 0 || this.watchdogTimer !== null) return 0;
    const ms = Math.max(1, Math.floor(this.watchdogUsec / 2000));
    let pending = false;
    const tick = (): void => {
      if (healthy === undefined) {
        this.notify({ WATCHDOG: 1 });
        return;
      }
      if (pending) return;
      pending = true;
      Promise.resolve()
        .then(healthy)
        .then(
          (ok) => {
            pending = false;
            if (ok && this.watchdogTimer !== null) this.notify({ WATCHDOG: 1 });
          },
          () => {
            pending = false;
          },
        );
    };
    this.watchdogTimer = setInterval(tick, ms);
    this.watchdogTimer.unref();
    tick();
    return ms;
  }

  stopWatchdog(): void {
    if (this.watchdogTimer !== null) clearInterval(this.watchdogTimer);
    this.watchdogTimer = null;
  }
}
