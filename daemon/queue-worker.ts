/**
 * A queue worker thread (daemon/queue-workers.ts starts it): builds the disk's null driver over
 * the shared page store, serves the hardware queues it was given with VirtioBlkQueues on its own
 * mapping of guest memory, and answers the main thread's ring operations (thread-messages.ts).
 * Logs go through the thread's process.stdout (forwarded to the main thread's), never blocking.
 */
import pino from 'pino';
import { parentPort, workerData } from 'worker_threads';
import { hctxOf } from '../block/disk';
import type { ThreadReply, ThreadRequest } from '../vhost/thread-messages';
import { VirtioBlkQueue } from '../virtqueue/blk-queue';
import { GuestMemoryMap } from '../virtqueue/guest-memory';
import { InflightRegion } from '../virtqueue/inflight-region';
import { logUnhandledRejections, StdoutLog } from './logging';
import { logStream } from './log-format';
import { buildNullDisk } from './null-disk';
import { buildNvmeWorkerDisk, type NvmeWorkerMessage } from './nvme-thread';
import { native } from '../native';
import type { QueueWorkerData } from './queue-workers';

const data = workerData as QueueWorkerData;
// process.stdout here is Node's asynchronous forwarding to the main thread's stdout: a slow
// stdout reader never makes this thread (its rings) wait (daemon/logging.ts).
const log = pino({ level: data.logLevel, base: { pid: process.pid, thread: data.thread } }, new StdoutLog(logStream(data.logFormat ?? 'json'))).child({
  disk: data.config.name,
});
logUnhandledRejections(log);
// The disk's cpus: this thread runs on its CPU (sched_setaffinity acts on the calling thread).
// The daemon checked the CPU at start; one gone since (hot-unplugged) leaves the thread
// unpinned, logged, rather than without its rings.
if (data.cpu !== undefined) {
  try {
    native.setThreadAffinity([data.cpu]);
    log.debug({ cpu: data.cpu }, 'queue worker thread pinned');
  } catch (e) {
    log.error({ cpu: data.cpu, err: e }, 'queue worker thread could not be pinned to its CPU: it runs unpinned');
  }
}
const port = parentPort;
if (port === null) throw new Error('queue-worker.ts runs as a worker thread');
// driver nvme: the main thread's queue pairs (daemon/nvme-thread.ts); else the null disk.
const nvme = data.nvme === undefined ? null : buildNvmeWorkerDisk(data.config, data.nvme, data.thread, log, (m) => port.postMessage({ driver: m }));
const { disk, driver } = nvme !== null ? { disk: nvme.disk, driver: null } : buildNullDisk(data.config, log, { storeId: data.storeId ?? undefined });

/** The queues of this thread. The fds they use are lent by the main thread, which closes them. */
interface Served {
  queue: VirtioBlkQueue;
}
const served = new Map<number, Served>();
for (const q of data.queues) served.set(q, { queue: new VirtioBlkQueue(q, hctxOf(disk, q), disk, log) });
let memory: GuestMemoryMap | null = null;
/** This thread's mapping of the inflight region (its queues write only their own blocks). */
let inflight: InflightRegion | null = null;

function queueOf(index: number): Served {
  const s = served.get(index);
  if (s === undefined) throw new RangeError(`queue ${index} is not served by thread ${data.thread}`);
  return s;
}

/** Unmaps guest memory; refused while a ring still runs on it (its native walk would fault). */
function releaseMemory(): void {
  for (const [index, s] of served) {
    if (s.queue.isRunning) throw new Error(`guest memory kept: ring ${index} still runs on it`);
  }
  if (memory !== null) memory.release();
  memory = null;
}

/** Unmaps the inflight region; refused while a ring still tracks into it. */
function releaseInflight(): void {
  for (const [index, s] of served) {
    if (s.queue.isRunning) throw new Error(`inflight region kept: ring ${index} still runs`);
  }
  if (inflight !== null) inflight.release();
  inflight = null;
}

async function handle(m: ThreadRequest): Promise<unknown> {
  switch (m.op) {
    case 'memory':
      // The fds are lent (thread-messages.ts): the main thread closes them after the reply.
      releaseMemory();
      memory = new GuestMemoryMap(m.regions, m.fds);
      return undefined;
    case 'release':
      releaseMemory();
      return undefined;
    case 'inflight':
      releaseInflight();
      inflight = new InflightRegion(m.fd, m.description, data.config.num_queues);
      return undefined;
    case 'releaseInflight':
      releaseInflight();
      return undefined;
    case 'start': {
      const s = queueOf(m.queue);
      if (memory === null) throw new Error(`ring ${m.queue} started before its thread mapped guest memory`);
      s.queue.start({ ...m.setup, memory, inflight }, m.enabled); // all or nothing
      return undefined;
    }
    case 'enable':
      queueOf(m.queue).queue.setEnabled(m.enabled);
      return undefined;
    case 'call':
      queueOf(m.queue).queue.setCallFd(m.fd);
      return undefined;
    case 'stop':
      return queueOf(m.queue).queue.stop();
    case 'snapshot':
      return queueOf(m.queue).queue.snapshot(data.thread);
    case 'driver':
      if (nvme === null) throw new Error('this disk\'s driver takes no messages');
      return nvme.handle(m.msg as NvmeWorkerMessage);
    case 'badblocks':
      if (driver === null) throw new Error('this disk has no bad-block list');
      driver.badblocks.remove(0, Number.MAX_SAFE_INTEGER);
      for (const [start, end] of m.ranges) driver.badblocks.add(start, end);
      return undefined;
  }
}

port.on('message', (m: ThreadRequest & { id: number }) => {
  handle(m).then(
    (value) => port.postMessage({ id: m.id, ok: true, value } satisfies ThreadReply),
    (e: unknown) => {
      log.error({ op: m.op, err: e }, 'ring operation failed on a worker thread');
      port.postMessage({ id: m.id, ok: false, error: (e as Error).message } satisfies ThreadReply);
    },
  );
});
log.debug({ queues: data.queues }, 'queue worker thread ready');
