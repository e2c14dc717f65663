/**
 * The main thread is thread 0 of every disk (the others are each disk's own worker threads), so
 * it can be pinned to one CPU only: disks that give `cpus` must agree on their first CPU.
 */
import type { DiskConfig } from './disk-schema';

/** The CPU the main thread is pinned to (the first of any disk's `cpus`), or null: not pinned. */
export function mainThreadCpu(disks: readonly DiskConfig[]): number | null {
  for (const d of disks) if (d.cpus.length > 0) return d.cpus[0];
  return null;
}

/**
 * Why the disks cannot share the main thread's pinning (two of them want it on different
 * CPUs), or null when they can.
 */
export function cpuConflict(disks: readonly DiskConfig[]): string | null {
  const pinned = disks.filter((d) => d.cpus.length > 0);
  const other = pinned.find((d) => d.cpus[0] !== pinned[0].cpus[0]);
  if (other === undefined) return null;
  return `disks ${pinned[0].name} and ${other.name} want the main thread (thread 0 of every disk) on CPU ${pinned[0].cpus[0]} and on CPU ${other.cpus[0]}: the first CPU of every disk's cpus must be the same`;
}
