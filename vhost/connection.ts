/**
 * VhostUserConnection: one front-end (QEMU) on the socket. Assembles messages as their bytes
 * arrive (with their fds; native MessageReader), checks the header and the fd rules, runs the
 * device's handler, and sends the reply or the REPLY_ACK answer. Messages are handled one at a
 * time: while a handler is pending (e.g. GET_VRING_BASE waiting for in-flight requests), the
 * socket is not read.
 *
 * Nothing here waits on the front-end: a message must be complete MESSAGE_DEADLINE_MS after its
 * first byte arrived (a timer checks), and a reply the socket cannot take at once (the front-end
 * does not read its replies) ends the connection.
 *
 * Any malformed or unsupported message is logged with its name and the reason, and the
 * connection is closed cleanly: the device is reset (rings stopped, memory unmapped) so the
 * next front-end starts from scratch.
 */
import type { Logger } from 'pino';
import { native, NativeFdWatcher, NativeMessageReader } from '../native';
import { MessageError, type Message, readHeader, writeHeader } from './message';
import { VhostUserBlkDevice, VhostUserError, type HandlerResult } from './blk-device';
import {
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  FLAG_VERSION,
  HEADER_SIZE,
  MAX_PAYLOAD,
  requestName,
} from './protocol';
import { closeFd } from './vring';

/** A message must be complete this many milliseconds after its first byte arrived. */
export const MESSAGE_DEADLINE_MS = 2000;

export class VhostUserConnection {
  private readonly watcher: NativeFdWatcher;
  private readonly reader: NativeMessageReader = new native.MessageReader(MAX_PAYLOAD);
  private readonly inBuf = Buffer.alloc(HEADER_SIZE + MAX_PAYLOAD);
  private readonly outBuf = Buffer.alloc(HEADER_SIZE + MAX_PAYLOAD);
  private busy = false;
  /** The handler being run (busy), which close() lets settle before resetting the device. */
  private pending: Promise<void> | null = null;
  private closing: Promise<void> | null = null;
  /** Armed at the first byte of a message, cleared when it is complete. */
  private deadline: NodeJS.Timeout | null = null;

  /** `onClosed` runs once the device has been reset after the connection ended. */
  constructor(
    private readonly fd: number,
    private readonly device: VhostUserBlkDevice,
    private readonly log: Logger,
    private readonly onClosed: () => void,
  ) {
    this.watcher = new native.FdWatcher(fd, (status) => this.onReadable(status), false);
    this.watcher.start();
    device.onFailure = (e) => void this.close(e.message, 'error', e);
  }

  get isClosing(): boolean {
    return this.closing !== null;
  }

  /** Reads and handles whatever is pending now (also used to notice a hang-up early). */
  poll(): void {
    this.onReadable(0);
  }

  private onReadable(status: number): void {
    if (this.busy || this.closing !== null) return;
    if (status !== 0) {
      void this.close('socket error');
      return;
    }
    let msg: Message | null;
    try {
      msg = this.receive();
    } catch (e) {
      void this.close(`bad message: ${(e as Error).message}`, 'error');
      return;
    }
    if (msg === null) return;
    this.pending = this.handle(msg);
  }

  /**
   * One message, or null when none is complete yet (then the deadline runs if part of one
   * arrived); throws for a malformed stream or header. Closes on EOF.
   */
  private receive(): Message | null {
    const r = this.reader.receive(this.fd, this.inBuf);
    if (r === null) {
      if (this.reader.buffered > 0 && this.deadline === null) {
        this.deadline = setTimeout(() => this.onDeadline(), MESSAGE_DEADLINE_MS);
        this.deadline.unref();
      }
      return null;
    }
    this.clearDeadline();
    if (r.length === 0) {
      void this.close('front-end disconnected');
      return null;
    }
    const msg: Message = { request: 0, flags: 0, payload: Buffer.from(this.inBuf.subarray(HEADER_SIZE, r.length)), fds: r.fds };
    try {
      const h = readHeader(this.inBuf.subarray(0, r.length));
      msg.request = h.request;
      msg.flags = h.flags;
    } catch (e) {
      this.closeFds(msg);
      throw e;
    }
    return msg;
  }

  private onDeadline(): void {
    this.deadline = null;
    const have = this.reader.buffered;
    if (this.closing !== null || have === 0) return;
    const req = this.reader.pendingRequest;
    const name = req >= 0 ? `${requestName(req)} message` : 'message';
    void this.close(`${name} not complete ${MESSAGE_DEADLINE_MS} ms after its first byte (${have} bytes received)`, 'error');
  }

  private clearDeadline(): void {
    if (this.deadline !== null) clearTimeout(this.deadline);
    this.deadline = null;
  }

  private async handle(msg: Message): Promise<void> {
    const name = requestName(msg.request);
    const spec = this.device.specs.get(msg.request);
    this.busy = true;
    this.watcher.stop(); // level-triggered: do not spin while a handler is pending
    try {
      if (spec === undefined) throw new VhostUserError(`unsupported request ${name}`);
      if (!spec.fds && msg.fds.length > 0) throw new MessageError(`${name} carries ${msg.fds.length} fds, expected none`);
      this.log.trace({ request: name, size: msg.payload.length, fds: msg.fds.length }, 'message');
      const result: HandlerResult = await spec.handler(msg);
      if (this.closing !== null) {
        if (result !== false && result !== undefined && !Buffer.isBuffer(result)) for (const fd of result.fds) closeFd(fd);
        return;
      }
      if (spec.hasReply) {
        if (result !== false && result !== undefined && !Buffer.isBuffer(result)) {
          try {
            this.reply(msg.request, result.payload, result.fds);
          } finally {
            for (const fd of result.fds) closeFd(fd);
          }
        } else {
          this.reply(msg.request, result === false || result === undefined ? Buffer.alloc(0) : result);
        }
      } else if ((msg.flags & FLAG_NEED_REPLY) !== 0 && this.device.replyAck) {
        const ack = Buffer.alloc(8);
        ack.writeBigUInt64LE(result === false ? 1n : 0n);
        this.reply(msg.request, ack);
      }
    } catch (e) {
      this.closeFds(msg);
      const err = e as Error;
      const expected = err instanceof VhostUserError || err instanceof MessageError;
      void this.close(`${expected ? '' : 'internal error: '}${err.message}`, 'error', expected ? undefined : err);
      return;
    } finally {
      this.busy = false;
      this.pending = null;
    }
    if (this.closing === null) this.watcher.start(); // fires at once if more is pending
  }

  /**
   * Sends a reply without waiting. Replies are small and a front-end waits for each one (QEMU
   * does), so a socket that cannot take one at once belongs to a front-end that does not read:
   * the connection ends (a half-sent reply would leave the stream unusable anyway).
   */
  private reply(request: number, payload: Buffer, fds: number[] = []): void {
    writeHeader(this.outBuf, request, FLAG_VERSION | FLAG_REPLY, payload.length);
    payload.copy(this.outBuf, HEADER_SIZE);
    const length = HEADER_SIZE + payload.length;
    let sent: number;
    try {
      sent = fds.length > 0 ? native.sendMessage(this.fd, this.outBuf, length, fds) : native.sendMessage(this.fd, this.outBuf, length);
    } catch (e) {
      void this.close(`cannot send the ${requestName(request)} reply: ${(e as Error).message}`);
      return;
    }
    if (sent < length) {
      void this.close(`front-end does not read its replies: ${requestName(request)} reply not sent (${sent} of ${length} bytes, socket buffer full)`, 'error');
    }
  }

  private closeFds(msg: Message): void {
    for (const fd of msg.fds) closeFd(fd);
    msg.fds.length = 0;
  }

  /**
   * Ends the connection: stops reading, resets the device (waiting for in-flight requests),
   * closes the socket. Idempotent; resolves when done.
   */
  close(reason: string, level: 'info' | 'error' = 'info', cause?: Error): Promise<void> {
    if (this.closing === null) {
      this.closing = (async () => {
        this.watcher.stop();
        this.clearDeadline();
        this.reader.close(); // a partial message's fds

        if (level === 'error') this.log.error({ err: cause }, `vhost-user connection closed: ${reason}`);
        else this.log.info(`vhost-user connection closed: ${reason}`);
        // A handler still pending stops at its next step (the device checks), then the reset
        // undoes whatever it had done: nothing is mapped or started after the close.
        this.device.detach();
        if (this.pending !== null) await this.pending;
        try {
          await this.device.reset();
        } catch (e) {
          this.log.error({ err: e }, 'device reset failed');
        }
        closeFd(this.fd);
        this.onClosed();
      })();
    }
    return this.closing;
  }
}
