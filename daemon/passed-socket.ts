/**
 * `--fd N` (vhost-user.rst, "Backend program conventions"): the vhost-user socket arrives
 * already open as fd N, from a systemd `.socket` unit (`ExecStart=rnull --fd 3`), libvirt or a
 * test. It must be a listening unix stream socket; rnull then accepts on it and leaves the path
 * (if any) alone: whoever created the socket owns its file, mode and group.
 */
import { native, SyscallError } from '../native';

/** What --fd was given is not usable; the message says why (a usage error: exit 2). */
export class PassedSocketError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'PassedSocketError';
  }
}

/**
 * Checks that `fd` is an open, listening, SOCK_STREAM unix socket, then takes it over: returns
 * a close-on-exec, non-blocking duplicate (`fd` itself is closed, so no child inherits it) and
 * the socket's bound path ('' if unbound, '@name' if abstract) for logs.
 * @throws PassedSocketError naming the fd and what it is instead
 */
export function adoptPassedSocket(fd: number): { fd: number; path: string } {
  if (!Number.isSafeInteger(fd) || fd < 0 || fd > 2 ** 31 - 1) throw new PassedSocketError(`--fd ${fd}: expected a file descriptor number`);
  if (fd <= 2) throw new PassedSocketError(`--fd ${fd}: 0, 1 and 2 are stdin, stdout and stderr, not the vhost-user socket`);
  let info;
  try {
    info = native.socketInfo(fd);
  } catch (e) {
    if (e instanceof SyscallError) throw new PassedSocketError(`--fd ${fd}: not an open file descriptor (${e.message})`);
    throw e;
  }
  if (info === null) throw new PassedSocketError(`--fd ${fd}: not a socket`);
  if (info.domain !== 'unix' || info.type !== 'stream') throw new PassedSocketError(`--fd ${fd}: a ${info.domain} ${info.type} socket, expected a unix stream socket`);
  if (!info.listening) throw new PassedSocketError(`--fd ${fd}: a unix stream socket that is not listening (listen() it before passing it)`);
  const own = native.dup(fd);
  native.close(fd);
  native.setNonBlocking(own, true);
  return { fd: own, path: info.path };
}
