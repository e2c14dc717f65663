/**
 * How log lines look on stdout, chosen once at start (`chooseLogFormat`):
 * - "journal": stdout is journald's stream (systemd sets $JOURNAL_STREAM to the "dev:inode" of
 *   the stream it gave; it must match stdout's, or stdout was redirected since). Each JSON line
 *   gets its syslog priority as a `<N>` prefix (sd-daemon(3)): fatal <2>, error <3>, warn <4>,
 *   info <6>, debug and trace <7>. journald strips the prefix and stores PRIORITY=N, so
 *   `journalctl -p warning` works and MESSAGE stays the JSON line.
 * - "pretty": stdout is a terminal and pino-pretty can be loaded: one coloured, human line per
 *   record, formatted in this thread (pino-pretty's prettyFactory).
 * - "json": pino's JSON lines, unchanged (a pipe, a file, or no pino-pretty installed).
 *
 * The choice wraps the stream under StdoutLog (daemon/logging.ts), so its guarantees (never
 * blocking, bounded memory, no exit-time hang) hold in every format.
 */
import * as fs from 'fs';
import type { LogStream } from './logging';

export type LogFormat = 'json' | 'pretty' | 'journal';

/** The syslog priority of a pino level number (10 trace ... 60 fatal). */
export function syslogPriority(level: number): number {
  if (level >= 60) return 2;
  if (level >= 50) return 3;
  if (level >= 40) return 4;
  if (level >= 30) return 6;
  return 7;
}

/** The `<N>`-prefixed line for journald; a line without a leading level number gets <6>. */
export function journalLine(line: string): string {
  const m = /^\{"level":(\d+)/.exec(line);
  return `<${m === null ? 6 : syslogPriority(Number(m[1]))}>${line}`;
}

/**
 * stdout is the stream journald gave the service: $JOURNAL_STREAM ("device:inode", decimal)
 * names the same device and inode as fd `fd`.
 */
export function connectedToJournal(env: NodeJS.ProcessEnv = process.env, fd = 1): boolean {
  const js = env.JOURNAL_STREAM;
  if (js === undefined || !/^\d+:\d+$/.test(js)) return false;
  try {
    const st = fs.fstatSync(fd, { bigint: true });
    return js === `${st.dev}:${st.ino}`;
  } catch {
    return false;
  }
}

/** pino-pretty's line formatter, or null when the package cannot be loaded. */
export function loadPrettifier(): ((line: string) => string) | null {
  try {
    // Optional: used only when installed (not a dependency every install needs).
    // eslint-disable-next-line @typescript-eslint/no-var-requires
    const { prettyFactory } = require('pino-pretty') as { prettyFactory(o: object): (line: string) => string };
    return prettyFactory({ colorize: true, translateTime: 'SYS:HH:MM:ss.l', ignore: 'pid,hostname' });
  } catch {
    return null;
  }
}

/**
 * The format for this process: "journal" when stdout is journald's, "pretty" on a terminal
 * with pino-pretty available, else "json".
 */
export function chooseLogFormat(env: NodeJS.ProcessEnv = process.env, isTTY = process.stdout.isTTY === true): LogFormat {
  if (connectedToJournal(env)) return 'journal';
  if (isTTY && loadPrettifier() !== null) return 'pretty';
  return 'json';
}

/** A LogStream writing each line through `format` to `inner`. */
class FormattingStream implements LogStream {
  constructor(
    private readonly inner: LogStream,
    private readonly format: (line: string) => string,
  ) {}

  write(chunk: string): boolean {
    return this.inner.write(this.format(chunk));
  }

  get writableLength(): number {
    return this.inner.writableLength;
  }

  on(event: 'error', listener: (err: Error) => void): unknown {
    return this.inner.on(event, listener);
  }

  once(event: 'drain', listener: () => void): unknown {
    return this.inner.once(event, listener);
  }

  removeListener(event: 'drain', listener: () => void): unknown {
    return this.inner.removeListener(event, listener);
  }
}

/** `inner` (default stdout) wrapped for `format`; "pretty" falls back to JSON without pino-pretty. */
export function logStream(format: LogFormat, inner: LogStream = process.stdout): LogStream {
  if (format === 'journal') return new FormattingStream(inner, journalLine);
  if (format === 'pretty') {
    const pretty = loadPrettifier();
    if (pretty !== null) return new FormattingStream(inner, pretty);
  }
  return inner;
}

/** The format the main thread chose (queue worker threads log the same way). */
let processFormat: LogFormat = 'json';

export function setProcessLogFormat(format: LogFormat): void {
  processFormat = format;
}

export function processLogFormat(): LogFormat {
  return processFormat;
}
