/**
 * An NVMe-backed disk with `threads` 2 in a real guest (issue 10): `rnull --driver nvme
 * --num-queues 2 --threads 2` serves a namespace of QEMU's emulated NVMe (behind an emulated
 * Intel IOMMU, bound to vfio-pci in the guest) with hardware queue 1 and its I/O queue pair
 * (qid 2) on a worker thread, through the same BAR and DMA memory and the guest memory the main
 * thread mapped once. Run by test/guest/nvme-threads-check.js; see its header.
 *
 * Asserted: vhost-bench --verify on 2 queues reads back every write, with a controller reset by
 * `rnull ctl reset` landing in the middle of the run (both threads' queues stopped, requeued and
 * resubmitted: nothing lost, no error); writes through each queue read back through the other
 * and are in the host's backing file at the right offsets; queue 1 is served by thread 1 and
 * its queue pair carried commands and took the reset; guest memory mapped for DMA once per
 * front-end; clean shutdown on SIGTERM; no DMAR fault.
 */
import * as path from 'node:path';
import { bdfOf, defaultControllers, NvmeGuestRun, patterned, readBacking, ROOT } from '../guest/nvme-guest';
import { count, value } from '../guest/qemu';

const BENCH = path.join(ROOT, 'bench', 'client', 'build', 'vhost-bench');

describe('NVMe-backed disk with threads 2 in a TCG guest', () => {
  const g = new NvmeGuestRun('nvme-threads');
  const controllers = defaultControllers(g.workDir);
  const ctrl = controllers[0]!;
  const nsid = 1;
  // Written through queue 0 (main thread) and queue 1 (worker thread).
  const writes = [
    { sector: 0, bytes: 65536, seed: 21, queue: 1 },
    { sector: 4097, bytes: 1536, seed: 22, queue: 0 },
    { sector: 9000, bytes: 12288, seed: 23, queue: 1 },
  ];

  g.boot({
    controllers,
    script: 'nvme-threads-check.js',
    needs: 'daemon/nvme-thread.js',
    bench: true,
    frontend: true,
    plan: () => ({ bench: BENCH, bdf: bdfOf(ctrl), nsid, runtime: 20, writes }),
    timings: (v) =>
      `daemon start ${v('start_ms')} ms; vhost-bench ${v('bench_ios')} I/Os in ${v('bench_ms')} ms (${v('bench_iops')} IOPS); ` +
      `queue 0: thread ${v('q0_thread')} ${v('q0_commands')} commands; queue 1: thread ${v('q1_thread')} ${v('q1_commands')} commands`,
  });

  test('the guest run completed without a DMAR fault', () => {
    g.expectCompleted();
  });

  test('vhost-bench --verify on 2 queues reads back every write, across a `rnull ctl reset` in the middle of the run', () => {
    expect(count(g.report, 'reset_status')).toBe(0);
    expect(count(g.report, 'reset_bench_running')).toBe(1);
    expect(count(g.report, 'bench_status')).toBe(0);
    expect(count(g.report, 'bench_ios')).toBeGreaterThanOrEqual(1000);
    expect(count(g.report, 'bench_verified')).toBeGreaterThan(0);
    expect(count(g.report, 'bench_mismatches')).toBe(0);
    expect(count(g.report, 'bench_errors')).toBe(0);
  });

  test('queue 1 is served by worker thread 1 over queue pair 2, queue 0 by the main thread over queue pair 1; both took the reset', () => {
    expect(count(g.report, 'stats_status')).toBe(0);
    expect(count(g.report, 'q0_thread')).toBe(0);
    expect(count(g.report, 'q1_thread')).toBe(1);
    expect(count(g.report, 'q0_qid')).toBe(1);
    expect(count(g.report, 'q1_qid')).toBe(2);
    for (const q of ['q0', 'q1']) {
      expect(count(g.report, `${q}_commands`)).toBeGreaterThan(300);
      expect(count(g.report, `${q}_resets`)).toBe(1);
      expect(count(g.report, `${q}_interrupts`)).toBeGreaterThan(0); // its MSI-X eventfd, on its thread
      expect(count(g.report, `${q}_errors`)).toBe(0);
      expect(count(g.report, `${q}_late`)).toBe(0);
      expect(count(g.report, `${q}_stale`)).toBe(0);
      expect(count(g.report, `${q}_in_flight`)).toBe(0);
    }
  });

  test('writes through either queue read back through the other and are in the host backing file', () => {
    const ns = ctrl.namespaces.find((n) => n.nsid === nsid)!;
    writes.forEach((w, i) => {
      expect(value(g.report, `w${i}`)).toBe('same');
      expect(readBacking(ns.file, w.sector * 512, w.bytes).equals(patterned(w.seed, w.bytes))).toBe(true);
    });
  });

  test('shadow doorbells (--shadow-doorbells true): Doorbell Buffer Config at start and after the reset; the worker thread\'s queue pair publishes through them too', () => {
    expect(count(g.report, 'dbbc_logged')).toBe(2);
    expect(count(g.report, 'q0_shadow_doorbells')).toBe(1);
    expect(count(g.report, 'q1_shadow_doorbells')).toBe(1);
  });

  test('guest memory mapped for DMA once per front-end; no error logged; clean shutdown on SIGTERM', () => {
    expect(count(g.report, 'dma_mapped_logged')).toBe(2);
    expect(count(g.report, 'errors_logged')).toBe(0);
    expect(count(g.report, 'exit')).toBe(0);
    expect(count(g.report, 'shutdown_logged')).toBe(1);
  });
});
