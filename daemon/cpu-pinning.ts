/**
 * Pinning of queue threads (the disk option `cpus`): thread i of a disk runs on cpus[i]. Each
 * thread pins itself (native setThreadAffinity acts on the calling thread only): the main
 * thread here at start, worker threads in daemon/queue-worker.ts as they start.
 *
 * The main thread serves thread 0 of every disk, so it is pinned to the first CPU that the
 * disks' cpus name (config/cpu-agreement.ts refuses disks that disagree); with no disk giving
 * cpus, no thread is pinned. Threads that run no queues keep the affinity they had when they
 * started: V8's and libuv's helper threads started with the process stay unpinned; threads
 * started later inherit the main thread's CPU.
 */
import * as fs from 'fs';
import type { DiskConfig } from '../config/disk-schema';
import { formatCpuList, parseCpuList } from '../config/cpu-list';
import { mainThreadCpu } from '../config/cpu-agreement';
import { native } from '../native';

/** Where Linux lists the online CPUs. */
const ONLINE_PATH = '/sys/devices/system/cpu/online';

/** The online CPUs, or null when the kernel does not say (then only the allowed set is checked). */
function onlineCpus(): Set<number> | null {
  try {
    return new Set(parseCpuList(fs.readFileSync(ONLINE_PATH, 'utf8')));
  } catch {
    return null;
  }
}

/**
 * Why the disks' cpus cannot be used here — a CPU outside the set this thread may run on
 * (sched_getaffinity: taskset, a cgroup cpuset) or offline — or null when they can. Call on the
 * main thread before pinning it (its set is then the daemon's).
 */
export function unusableCpus(disks: readonly DiskConfig[]): string | null {
  const allowed = new Set(native.threadAffinity());
  const online = onlineCpus();
  for (const d of disks) {
    for (const [i, cpu] of d.cpus.entries()) {
      if (online !== null && !online.has(cpu)) {
        return `disk ${d.name}: cpus: CPU ${cpu} (thread ${i}) is not online (online: ${formatCpuList([...online])})`;
      }
      if (!allowed.has(cpu)) {
        return `disk ${d.name}: cpus: CPU ${cpu} (thread ${i}) is outside the CPUs this daemon may run on (${formatCpuList([...allowed])}; see taskset or its cgroup's cpuset)`;
      }
    }
  }
  return null;
}

/**
 * Pins the calling (main) thread to thread 0's CPU when a disk gives cpus; returns that CPU,
 * or null when nothing is pinned.
 * @throws SyscallError from sched_setaffinity (the CPU went away since unusableCpus()).
 */
export function pinMainThread(disks: readonly DiskConfig[]): number | null {
  const cpu = mainThreadCpu(disks);
  if (cpu !== null) native.setThreadAffinity([cpu]);
  return cpu;
}
