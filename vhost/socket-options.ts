/**
 * Who may connect to a vhost-user socket: its permission bits and group (disk keys
 * `socket_mode`, `socket_group`). The socket is created with these before it listens, so it
 * never exists with the umask's looser mode. Pure parsing, no native code.
 */
import { execFileSync } from 'child_process';
import * as fs from 'fs';

/** Default mode of a vhost-user socket: the daemon's user only. */
export const DEFAULT_SOCKET_MODE = 0o600;

/**
 * A socket mode from the configuration: a number (0 to 0o777, e.g. 432 for 0660) or an octal
 * string ('0660', '660', '0o660'). Permission bits only: setuid/setgid/sticky are refused.
 * @throws RangeError naming the value
 */
export function parseSocketMode(v: unknown): number {
  let mode: number;
  if (typeof v === 'number') mode = v;
  else if (typeof v === 'string' && /^(0o?)?[0-7]{1,4}$/i.test(v.trim())) mode = parseInt(v.trim().replace(/^0o/i, ''), 8);
  else throw new RangeError(`socket mode ${JSON.stringify(v)}: expected an octal string such as "0660" or a number`);
  if (!Number.isInteger(mode) || mode < 0 || mode > 0o777) {
    throw new RangeError(`socket mode ${JSON.stringify(v)}: expected permission bits from 0 to 0777`);
  }
  return mode;
}

/**
 * Checks the syntax of a socket group: '' (the daemon's own group), a gid (a whole number or
 * decimal string) or a group name.
 * @throws RangeError naming the value
 */
export function checkSocketGroup(v: unknown): void {
  if (typeof v === 'number' ? Number.isInteger(v) && v >= 0 && v < 2 ** 32 - 1 : typeof v === 'string' && /^$|^[A-Za-z0-9_.][A-Za-z0-9_.-]*\$?$/.test(v)) return;
  throw new RangeError(`socket group ${JSON.stringify(v)}: expected a group name or a gid`);
}

/**
 * The gid for a socket group: -1 for '' (leave the daemon's group), the number for a gid, or
 * the name looked up in /etc/group, then through NSS (`getent group`).
 * @throws Error for an unknown group name
 */
export function resolveSocketGroup(v: string | number): number {
  checkSocketGroup(v);
  if (typeof v === 'number') return v;
  if (v === '') return -1;
  if (/^\d+$/.test(v)) return Number(v);
  const fromLine = (line: string): number | null => {
    const f = line.split(':');
    return f.length >= 3 && f[0] === v && /^\d+$/.test(f[2]) ? Number(f[2]) : null;
  };
  try {
    for (const line of fs.readFileSync('/etc/group', 'utf8').split('\n')) {
      const gid = fromLine(line);
      if (gid !== null) return gid;
    }
  } catch {
    // no /etc/group: ask NSS
  }
  try {
    const gid = fromLine(execFileSync('getent', ['group', v], { encoding: 'utf8', timeout: 5000 }).trim());
    if (gid !== null) return gid;
  } catch {
    // not found
  }
  throw new Error(`socket group ${v}: no such group`);
}
