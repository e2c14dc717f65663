/**
 * VhostUserServer: the listening unix socket of one disk. rnull is the server, QEMU the client;
 * one front-end at a time. When a front-end goes away, the device is reset and the next
 * connection (a restarted or reconnecting QEMU) is served; the disk's data stays.
 */
import * as fs from 'fs';
import * as path from 'path';
import type { Logger } from 'pino';
import { native, NativeFdWatcher, SyscallError } from '../native';
import type { VhostUserBlkDevice } from './blk-device';
import { VhostUserConnection } from './connection';
import { DEFAULT_SOCKET_MODE, parseSocketMode, resolveSocketGroup } from './socket-options';

const ECONNREFUSED = 111;

export class VhostUserServer {
  private listenFd = -1;
  private watcher: NativeFdWatcher | null = null;
  private connection: VhostUserConnection | null = null;
  /** A connection accepted while the previous one was still being torn down. */
  private pendingFd = -1;
  /** Connections served so far. */
  connections = 0;

  /** A front-end is attached. */
  get isConnected(): boolean {
    return this.connection !== null && !this.connection.isClosing;
  }

  /**
   * @param access the socket's permission bits (`socket_mode`: number or octal string; default
   *   0600) and group (`socket_group`: name or gid; '' keeps the daemon's group)
   */
  constructor(
    readonly socketPath: string,
    readonly device: VhostUserBlkDevice,
    private readonly log: Logger,
    private readonly access: { mode?: number | string; group?: number | string } = {},
  ) {}

  /**
   * Binds and listens. A stale socket file (nobody listening) is replaced. The socket gets its
   * mode and group before it listens and before it is renamed into place, so it never exists at
   * its path with the umask's mode.
   * @throws Error if the path is a live socket or not a socket, or the group is unknown;
   *   RangeError for a bad mode; SyscallError from bind/chown/chmod/listen.
   */
  listen(): void {
    const mode = parseSocketMode(this.access.mode ?? DEFAULT_SOCKET_MODE);
    const gid = resolveSocketGroup(this.access.group ?? '');
    removeStaleSocket(this.socketPath);
    // Bind and listen under a temporary name, then rename: once the path exists, connecting
    // works (a client never sees a bound socket that is not listening yet).
    const tmp = path.join(path.dirname(this.socketPath), `.${path.basename(this.socketPath)}.${process.pid}.tmp`);
    try {
      fs.unlinkSync(tmp);
    } catch {
      // none left over
    }
    this.listenFd = native.listenUnix(tmp, mode, gid);
    try {
      fs.renameSync(tmp, this.socketPath);
    } catch (e) {
      native.close(this.listenFd);
      this.listenFd = -1;
      fs.rmSync(tmp, { force: true });
      throw e;
    }
    this.watcher = new native.FdWatcher(this.listenFd, () => this.onAcceptable(), false);
    this.watcher.start();
    this.log.info({ socket: this.socketPath, mode: `0${mode.toString(8)}`, gid: gid >= 0 ? gid : undefined }, 'listening');
  }

  /**
   * Serves on a listening unix socket passed in (`--fd`, daemon/passed-socket.ts checks it)
   * instead of binding `socketPath`. The socket's file, mode and group stay the passer's:
   * close() closes the fd but removes no file.
   */
  listenOn(fd: number): void {
    this.listenFd = fd;
    this.passed = true;
    this.watcher = new native.FdWatcher(this.listenFd, () => this.onAcceptable(), false);
    this.watcher.start();
    this.log.info({ fd, socket: this.socketPath }, 'listening on a passed socket');
  }

  /** The listening socket came from listenOn() (its file is not ours to remove). */
  private passed = false;

  private onAcceptable(): void {
    for (;;) {
      const fd = native.acceptUnix(this.listenFd);
      if (fd < 0) return;
      if (this.connection !== null) {
        // A reconnecting front-end may connect before we noticed the old one hang up.
        this.connection.poll();
        if (this.connection !== null && this.connection.isClosing && this.pendingFd < 0) {
          this.pendingFd = fd;
          continue;
        }
        this.log.warn('refusing a second front-end: this disk is already attached');
        native.close(fd);
        continue;
      }
      this.serve(fd);
    }
  }

  private serve(fd: number): void {
    this.connections++;
    this.log.info({ connection: this.connections }, 'front-end connected');
    this.connection = new VhostUserConnection(fd, this.device, this.log, () => {
      this.connection = null;
      if (this.pendingFd >= 0) {
        const next = this.pendingFd;
        this.pendingFd = -1;
        this.serve(next);
      }
    });
  }

  /** Stops listening, disconnects the front-end (stopping its rings) and removes the socket. */
  async close(): Promise<void> {
    if (this.watcher !== null) {
      this.watcher.stop();
      this.watcher = null;
    }
    if (this.pendingFd >= 0) {
      native.close(this.pendingFd);
      this.pendingFd = -1;
    }
    if (this.connection !== null) await this.connection.close('daemon shutting down');
    if (this.listenFd >= 0) {
      native.close(this.listenFd);
      this.listenFd = -1;
      try {
        if (!this.passed) fs.unlinkSync(this.socketPath);
      } catch {
        // already gone
      }
    }
  }
}

/** Removes `path` if it is a socket nobody listens on; throws if it is live or not a socket. */
function removeStaleSocket(path: string): void {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(path);
  } catch {
    return;
  }
  if (!st.isSocket()) throw new Error(`${path} exists and is not a socket; refusing to replace it`);
  try {
    const fd = native.connectUnix(path);
    native.close(fd);
  } catch (e) {
    if (e instanceof SyscallError && e.errno === ECONNREFUSED) {
      fs.unlinkSync(path);
      return;
    }
    throw e;
  }
  throw new Error(`${path} is in use by another process`);
}
