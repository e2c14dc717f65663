/**
 * A failed system call in the native shim: `syscall` names it, `errno` is the positive errno
 * value (e.g. 2 for ENOENT), `message` reads "bind: Address already in use".
 */
export class SyscallError extends Error {
  readonly syscall: string;
  readonly errno: number;
  constructor(syscall: string, errno: number, message: string) {
    super(message);
    this.name = 'SyscallError';
    this.syscall = syscall;
    this.errno = errno;
  }
}
