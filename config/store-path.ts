/**
 * Where a memory-backed disk keeps its data when the configuration does not say (`store` ''):
 * a file named after the disk's socket in rnull's store directory, so that the same command
 * line or configuration file finds the same store again (`npm start` twice keeps the default
 * disk's data). The directory is $RUNTIME_DIRECTORY (set by systemd's RuntimeDirectory=) when
 * set, else /dev/shm/rnull-UID (per user: a name in a world-writable directory that another
 * user could otherwise take first).
 */
import { createHash } from 'crypto';
import * as path from 'path';

/** rnull's default store directory for this process's environment. */
export function defaultStoreDir(env: NodeJS.ProcessEnv = process.env): string {
  const runtime = env.RUNTIME_DIRECTORY?.split(':')[0];
  if (runtime !== undefined && runtime !== '' && path.isAbsolute(runtime)) return runtime;
  return `/dev/shm/rnull-${process.geteuid?.() ?? 0}`;
}

/**
 * The default store of the disk served on `socket`: `<dir>/<socket name>-<hash>.store`, the
 * hash (12 hex digits of SHA-256) of the socket's absolute path, which no two disks share.
 */
export function defaultStorePath(socket: string, env: NodeJS.ProcessEnv = process.env): string {
  const abs = path.resolve(socket);
  const name = path.basename(abs).replace(/\.[^.]*$/, '').replace(/[^A-Za-z0-9._-]/g, '_').slice(0, 64) || 'disk';
  const hash = createHash('sha256').update(abs).digest('hex').slice(0, 12);
  return path.join(defaultStoreDir(env), `${name}-${hash}.store`);
}
