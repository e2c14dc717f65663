/**
 * The daemon's log destination: pino lines to stdout that never block the thread writing them
 * and never hold up exit, whoever reads stdout and however slowly.
 *
 * - A pipe on stdout is non-blocking (Node puts it in that mode): a line is handed to the
 *   stream at once. If the reader lags and more than `maxPendingBytes` wait, lines are dropped
 *   (counted; the next line written says how many). So a stalled reader costs bounded memory
 *   and no waiting.
 * - Once stdout fails (EPIPE: the reader is gone), logging stops; nothing is retried.
 * - On a worker thread process.stdout is Node's forwarding stream to the main thread
 *   (asynchronous, with back-pressure): the same bound applies there, so a worker never waits
 *   on stdout either.
 * - Nothing registers an exit-time flush (pino's own destinations do, and retry EPIPE every
 *   100 ms forever): flush() waits for what is pending, at most `timeoutMs`.
 */
import type { DestinationStream, Logger } from 'pino';

/** Bytes of log lines allowed to wait for a slow stdout reader before lines are dropped. */
export const DEFAULT_MAX_PENDING_BYTES = 1 << 20;

/** The part of a Writable that StdoutLog uses (process.stdout, or a test's stream). */
export interface LogStream {
  write(chunk: string): boolean;
  readonly writableLength: number;
  on(event: 'error', listener: (err: Error) => void): unknown;
  once(event: 'drain', listener: () => void): unknown;
  removeListener(event: 'drain', listener: () => void): unknown;
}

export class StdoutLog implements DestinationStream {
  /** Lines dropped because the reader lagged, since the last line written. */
  private droppedSince = 0;
  /** Lines dropped in all. */
  dropped = 0;
  /** stdout failed (e.g. EPIPE): nothing more is written. */
  broken = false;

  constructor(
    private readonly stream: LogStream = process.stdout,
    private readonly maxPendingBytes = DEFAULT_MAX_PENDING_BYTES,
  ) {
    // Without a listener, EPIPE on stdout would be an uncaught exception.
    stream.on('error', () => {
      this.broken = true;
    });
  }

  /** One pino line (ends with a newline). Never blocks; may drop the line (see the class). */
  write(line: string): void {
    if (this.broken) return;
    if (this.stream.writableLength > this.maxPendingBytes) {
      this.dropped++;
      this.droppedSince++;
      return;
    }
    if (this.droppedSince > 0) {
      const n = this.droppedSince;
      this.droppedSince = 0;
      this.stream.write(`${JSON.stringify({ level: 40, time: Date.now(), pid: process.pid, dropped: n, msg: `${n} log lines dropped: stdout was not read fast enough` })}\n`);
    }
    this.stream.write(line);
  }

  /** Resolves once the pending lines are written, stdout broke, or after `timeoutMs`. */
  flush(timeoutMs: number): Promise<void> {
    if (this.broken || this.stream.writableLength === 0) return Promise.resolve();
    return new Promise((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        this.stream.removeListener('drain', done);
        resolve();
      };
      const timer = setTimeout(done, timeoutMs);
      timer.unref();
      this.stream.once('drain', done);
    });
  }
}

/**
 * A promise rejected with nobody to handle it is a bug in one operation, not a reason to stop
 * every disk (Node's default is to exit): from now on such a rejection is logged at error and
 * the thread goes on serving. Call once per thread (main, and each queue worker).
 */
export function logUnhandledRejections(log: Logger): void {
  process.on('unhandledRejection', (reason: unknown) => {
    log.error({ err: reason }, 'unhandled promise rejection (a bug): logged, still serving');
  });
}
