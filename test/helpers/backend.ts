/**
 * Starts a real rnull disk (driver, tag set, vhost-user device, server) in this process on a
 * temporary socket, with logs captured in memory for assertions.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import pino from 'pino';
import { Writable } from 'stream';
import type { DiskConfig } from '../../config/disk-schema';
import { defaultDiskConfig } from '../../config/load';
import { Disk } from '../../block/disk';
import type { Operations } from '../../block/operations';
import { createDisk, ServedDisk } from '../../daemon/service';
import type { NullDriver } from '../../drivers/null/null-driver';
import { VhostUserBlkDevice } from '../../vhost/blk-device';
import { VhostUserServer } from '../../vhost/server';

export interface TestBackend extends ServedDisk {
  driver: NullDriver;
  socket: string;
  logs: Array<Record<string, unknown>>;
  close(): Promise<void>;
}

/**
 * `ops`, when given, replaces the null driver (the disk, device and server are the real ones).
 */
export function startBackend(overrides: Partial<DiskConfig> = {}, ops?: Operations): TestBackend {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-test-'));
  const socket = path.join(dir, 'disk.sock');
  const logs: Array<Record<string, unknown>> = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const line of chunk.toString().split('\n')) if (line.trim() !== '') logs.push(JSON.parse(line));
      cb();
    },
  });
  const log = pino({ level: 'debug' }, sink);
  const config: DiskConfig = {
    ...defaultDiskConfig(),
    name: 'test',
    socket,
    size: 16,
    num_queues: 2,
    serial: 'rnull-test',
    poll_us: 0,
    ...overrides,
  };
  const served = createDisk(config, log);
  if (ops !== undefined) {
    const disk = new Disk({ ...served.disk, ops });
    const device = new VhostUserBlkDevice(disk, config.num_queues, log);
    Object.assign(served, { disk, device, server: new VhostUserServer(socket, device, log) });
  }
  served.server.listen();
  return {
    ...served,
    socket,
    logs,
    async close() {
      await served.server.close();
      await served.workers?.close();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Waits until `pred()` holds, polling on the event loop. */
export async function until(pred: () => boolean, what: string, timeoutMs = 5000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}
