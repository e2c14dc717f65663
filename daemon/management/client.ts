/** A management client: one request, one response (used by `rnull ctl` and tests). */
import * as net from 'net';
import { readDelimited, RequestMsg, RequestType, ResponseMsg, toResponse, ResponseType } from './schema';

/** Sends `req` to the daemon's management socket; rejects after `timeoutMs`. */
export function managementCall(socketPath: string, req: RequestMsg, timeoutMs = 5000): Promise<ResponseMsg> {
  return new Promise((resolve, reject) => {
    const conn = net.createConnection(socketPath);
    const timer = setTimeout(() => {
      conn.destroy();
      reject(new Error(`no answer from ${socketPath} within ${timeoutMs} ms`));
    }, timeoutMs);
    let buf = Buffer.alloc(0);
    conn.on('connect', () => conn.write(Buffer.from(RequestType.encodeDelimited(RequestType.fromObject(req)).finish())));
    conn.on('data', (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      const { messages } = readDelimited(buf);
      if (messages.length > 0) {
        clearTimeout(timer);
        conn.end();
        resolve(toResponse(ResponseType.decode(messages[0])));
      }
    });
    conn.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
  });
}
