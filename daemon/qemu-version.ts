/**
 * Which `reconnect` syntax the attach hint should use for the QEMU on this host: QEMU 9.2
 * deprecated `-chardev socket,...,reconnect=SECONDS` in favour of `reconnect-ms=MS` (later
 * releases drop the old one); 7.2 (Debian 12) knows only `reconnect=`. Found by running
 * `qemu-system-x86_64 --version` asynchronously with a time limit, so start-up never waits on it.
 */
import { execFile } from 'child_process';

/** Time allowed for `qemu-system-x86_64 --version` (ms). */
export const QEMU_PROBE_TIMEOUT_MS = 3000;

export interface QemuVersion {
  major: number;
  minor: number;
  micro: number;
}

/** Parses "QEMU emulator version 7.2.22 (Debian ...)"; null if it does not say. */
export function parseQemuVersion(text: string): QemuVersion | null {
  const m = /QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?/.exec(text);
  return m === null ? null : { major: Number(m[1]), minor: Number(m[2]), micro: Number(m[3] ?? 0) };
}

/**
 * The chardev option that makes QEMU reconnect after a back-end restart (1 s between tries):
 * `reconnect-ms=1000` from QEMU 9.2 on, `reconnect=1` before; `reconnect-ms=1000` when the
 * version is unknown (no QEMU found: the current syntax).
 */
export function reconnectOption(v: QemuVersion | null): string {
  if (v !== null && (v.major < 9 || (v.major === 9 && v.minor < 2))) return 'reconnect=1';
  return 'reconnect-ms=1000';
}

/**
 * Runs `<binary> --version` and resolves with its version, or null when it is missing, fails,
 * prints something else or takes longer than `timeoutMs` (then it is killed). Never rejects.
 */
export function probeQemuVersion(binary = 'qemu-system-x86_64', timeoutMs = QEMU_PROBE_TIMEOUT_MS): Promise<QemuVersion | null> {
  return new Promise((resolve) => {
    try {
      execFile(binary, ['--version'], { timeout: timeoutMs, killSignal: 'SIGKILL', maxBuffer: 64 * 1024, encoding: 'utf8' }, (err, stdout) => {
        resolve(err === null ? parseQemuVersion(stdout) : null);
      });
    } catch {
      resolve(null);
    }
  });
}
