/**
 * The file that holds a memory-backed disk's data, so that it outlives the daemon: a sparse
 * file on tmpfs, mapped shared (native/page_store.h), created with mode 0600, locked (flock) for
 * as long as the daemon serves the disk. A daemon started again with the same configuration
 * maps the same file and finds the data (a SIGKILL loses nothing a write had returned for).
 *
 * Nothing on the path is trusted: a symbolic link, FIFO, socket, device or directory there, a
 * file of another user or writable by others, a file not on tmpfs, or of another size than the
 * disk is refused with a StoreError saying what to do; the file is opened O_NOFOLLOW|O_NONBLOCK
 * (a FIFO swapped in after the check cannot make the daemon wait) and checked again by its fd.
 */
import * as fs from 'fs';
import * as path from 'path';
import { native, SyscallError } from '../../native';
import type { PageStore } from './page-store';

/** A store the user must fix (path, owner, file system, size): like a configuration error. */
export class StoreError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'StoreError';
  }
}

export interface StoreFileOptions {
  /** Start empty: an existing file's data is dropped (after the lock is taken). */
  fresh?: boolean;
  /**
   * The directory is rnull's own default one (config/store-path.ts): created 0700 if missing,
   * and refused unless it is a real directory of this user that no one else may write.
   */
  privateDir?: boolean;
}

export interface OpenedStore {
  store: PageStore;
  /** The file did not exist (or was empty) and was created for this disk. */
  created: boolean;
}

const EWOULDBLOCK = 11;

function kind(st: fs.Stats): string {
  if (st.isSymbolicLink()) return 'a symbolic link';
  if (st.isDirectory()) return 'a directory';
  if (st.isFIFO()) return 'a FIFO';
  if (st.isSocket()) return 'a socket';
  if (st.isCharacterDevice() || st.isBlockDevice()) return 'a device';
  return 'not a regular file';
}

function uid(): number {
  return process.geteuid?.() ?? 0;
}

/** A file this daemon may keep a disk in: a regular file of its user that others cannot write. */
function checkFile(file: string, st: fs.Stats): void {
  if (!st.isFile()) throw new StoreError(`store ${file} is ${kind(st)}: a store must be a regular file (remove it, or give another --store path)`);
  if (st.uid !== uid()) throw new StoreError(`store ${file} belongs to uid ${st.uid}, not to this daemon's user (uid ${uid()}): refused`);
  if ((st.mode & 0o022) !== 0) throw new StoreError(`store ${file} is writable by other users (mode 0${(st.mode & 0o777).toString(8)}): refused (chmod 600 it)`);
}

function checkDir(dir: string, privateDir: boolean): void {
  try {
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  } catch (e) {
    throw new StoreError(`cannot create the store directory ${dir}: ${(e as Error).message}`);
  }
  let st: fs.Stats;
  try {
    st = privateDir ? fs.lstatSync(dir) : fs.statSync(dir);
  } catch (e) {
    throw new StoreError(`store directory ${dir}: ${(e as Error).message}`);
  }
  if (!st.isDirectory()) throw new StoreError(`store directory ${dir} is ${kind(st)}, not a directory`);
  if (privateDir && (st.uid !== uid() || (st.mode & 0o022) !== 0)) {
    throw new StoreError(`store directory ${dir} belongs to uid ${st.uid} with mode 0${(st.mode & 0o777).toString(8)}: it must be this daemon's user's (uid ${uid()}) and writable by no one else`);
  }
}

/**
 * Opens the store of a disk of `sizeBytes` at `file`, creating it (mode 0600) when missing.
 * @throws StoreError for what the user must fix (see the file comment); Error "... is in use by
 * another process" when another process holds the file's lock (another daemon serves it).
 */
export function openStoreFile(file: string, sizeBytes: number, opts: StoreFileOptions = {}): OpenedStore {
  checkDir(path.dirname(file), opts.privateDir === true);
  let before: fs.Stats | null = null;
  try {
    before = fs.lstatSync(file);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw new StoreError(`store ${file}: ${(e as Error).message}`);
  }
  if (before !== null) checkFile(file, before);
  const c = fs.constants;
  let fd: number;
  try {
    fd = fs.openSync(file, c.O_RDWR | c.O_CREAT | c.O_NOFOLLOW | c.O_NONBLOCK, 0o600);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ELOOP') throw new StoreError(`store ${file} is a symbolic link: a store must be a regular file (remove it, or give another --store path)`);
    throw new StoreError(`cannot open store ${file}: ${(e as Error).message}`);
  }
  let created = false;
  try {
    const st = fs.fstatSync(fd);
    checkFile(file, st);
    created = before === null || st.size === 0;
    let store: PageStore;
    try {
      store = new native.PageStore({ fd, size: sizeBytes, fresh: opts.fresh === true });
    } catch (e) {
      throw storeError(file, sizeBytes, e as Error);
    }
    return { store, created };
  } catch (e) {
    // Made here for nothing (but never removed when another process holds it: it is theirs).
    if (before === null && e instanceof StoreError) fs.rmSync(file, { force: true });
    throw e;
  } finally {
    fs.closeSync(fd);
  }
}

function storeError(file: string, sizeBytes: number, e: Error): Error {
  const code = (e as Error & { code?: string }).code;
  if (e instanceof SyscallError && e.syscall === 'flock' && e.errno === EWOULDBLOCK) {
    return new Error(`store ${file} is in use by another process (another rnull serving this disk?)`);
  }
  if (code === 'ESTOREFS') {
    return new StoreError(`store ${file} is ${e.message}: a memory-backed disk keeps its data in memory, so its store must be on tmpfs (/dev/shm, /run): on another file system page faults would wait for the disk`);
  }
  if (code === 'ESTORESIZE') {
    return new StoreError(
      `store ${file} ${e.message} (${sizeBytes / 1048576} MiB): start with the size it was made with, or with store_fresh (--store-fresh true) to start the disk empty (its data is then lost)`,
    );
  }
  return new StoreError(`store ${file}: ${e.message}`);
}

/** Removes the store file (store_remove_on_exit); a missing file is not an error. */
export function removeStoreFile(file: string): void {
  fs.rmSync(file, { force: true });
}
