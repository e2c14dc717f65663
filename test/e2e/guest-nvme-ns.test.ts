/**
 * Two namespaces of ONE emulated NVMe controller served as two disks by one daemon (issue 10):
 * a config file with two disks naming the same pci; the controller is brought up once, its I/O
 * queue pairs and one tag set shared, each disk on its own vhost-user socket with its
 * namespace's geometry (512-byte and 4096-byte logical blocks). Run by
 * test/guest/nvme-ns-check.js in a TCG guest (emulated Intel IOMMU, controller on vfio-pci).
 *
 * Asserted: two vhost-bench --verify runs at once (one per disk) find every read as written,
 * with a controller reset (`rnull ctl reset` of one disk) in the middle of both;
 * two test front-ends at once, with the same guest-physical addresses, write patterns the host
 * finds in each namespace's backing file at the right offsets; one bring-up and one shutdown
 * for the two disks; `rnull ctl stats` shows the same queue pairs for both; no DMAR fault.
 */
import * as path from 'node:path';
import { bdfOf, defaultControllers, NvmeGuestRun, patterned, readBacking, ROOT } from '../guest/nvme-guest';
import { count, value } from '../guest/qemu';

const BENCH = path.join(ROOT, 'bench', 'client', 'build', 'vhost-bench');

describe('two namespaces of one NVMe controller served as two disks in a TCG guest', () => {
  const g = new NvmeGuestRun('nvme-ns');
  // nvme1: namespace 1 with 512-byte blocks (32 MiB), namespace 2 with 4096-byte blocks (48 MiB).
  const ctrl = defaultControllers(g.workDir)[1]!;
  const disks = [
    { key: 'ns1', nsid: 1, blockSize: 512, writes: [{ sector: 40000, bytes: 65536, seed: 21 }, { sector: 50001, bytes: 1536, seed: 22 }] },
    { key: 'ns2', nsid: 2, blockSize: 4096, writes: [{ sector: 40960, bytes: 65536, seed: 23 }, { sector: 60000, bytes: 12288, seed: 24 }] },
  ];

  g.boot({
    controllers: [ctrl],
    script: 'nvme-ns-check.js',
    needs: 'drivers/nvme/namespace.js',
    bench: true,
    frontend: true,
    plan: () => ({ bench: BENCH, bdf: bdfOf(ctrl), disks }),
    timings: (v) =>
      `daemon start ${v('start_ms')} ms, two verify runs at once with a reset ${v('benches_ms')} ms (${disks.map((d) => `${d.key} ${v(`${d.key}_bench_ios`)} I/Os ${v(`${d.key}_bench_iops`)} IOPS`).join(', ')}), two front-ends at once ${v('frontends_ms')} ms`,
  });

  test('the guest run completed without a DMAR fault', () => {
    g.expectCompleted();
  });

  test('one controller bring-up and one clean shutdown for the two disks', () => {
    expect(count(g.report, 'bringups_logged')).toBe(1);
    expect(count(g.report, 'namespaces_logged')).toBe(2);
    expect(count(g.report, 'exit')).toBe(0);
    expect(count(g.report, 'shutdowns_logged')).toBe(1);
    // vhost-bench and the test front-end on each disk: four memory tables mapped.
    expect(count(g.report, 'dma_mapped_logged')).toBe(4);
    expect(count(g.report, 'errors_logged')).toBe(0);
    // Warnings: only the requested reset's two lines (management request, driver).
    expect(count(g.report, 'reset_warning_logged')).toBe(1);
    expect(count(g.report, 'warnings_logged')).toBe(2);
  });

  test('a controller reset through one disk while both disks\' verify runs go: the shared queue pairs reset once, nothing lost on either disk', () => {
    expect(count(g.report, 'reset_status')).toBe(0);
    expect(count(g.report, 'reset_mid_run')).toBe(1);
    for (const d of disks) {
      expect(count(g.report, `${d.key}_ctl_resets`)).toBe(2); // once on each of the 2 shared queue pairs
      expect(count(g.report, `${d.key}_bench_mismatches`)).toBe(0);
      expect(count(g.report, `${d.key}_bench_errors`)).toBe(0);
    }
  });

  test.each(disks.map((d) => [d.key, d] as const))('%s: geometry and serial from its namespace', (k, d) => {
    const ns = ctrl.namespaces.find((n) => n.nsid === d.nsid)!;
    expect(count(g.report, `${k}_capacity_sectors`)).toBe(ns.sizeBytes / 512);
    expect(count(g.report, `${k}_blk_size`)).toBe(d.blockSize);
    expect(value(g.report, `${k}_serial`)).toBe(`${ctrl.serial}-${d.nsid}`);
  });

  test.each(disks.map((d) => [d.key, d] as const))('%s: vhost-bench --verify, run at the same time as the other disk\'s, reads back every write', (k) => {
    expect(count(g.report, `${k}_bench_status`)).toBe(0);
    expect(count(g.report, `${k}_bench_ios`)).toBeGreaterThan(1000);
    expect(count(g.report, `${k}_bench_verified`)).toBeGreaterThan(0);
    expect(count(g.report, `${k}_bench_mismatches`)).toBe(0);
    expect(count(g.report, `${k}_bench_errors`)).toBe(0);
  });

  test.each(disks.map((d) => [d.key, d] as const))('%s: writes through the disk land in its namespace\'s backing file at the right offsets', (k, d) => {
    const ns = ctrl.namespaces.find((n) => n.nsid === d.nsid)!;
    d.writes.forEach((w, i) => {
      expect(value(g.report, `${k}_w${i}`)).toBe('same');
      expect(readBacking(ns.file, w.sector * 512, w.bytes).equals(patterned(w.seed, w.bytes))).toBe(true);
    });
  });

  test('both disks go through the same I/O queue pairs', () => {
    for (const d of disks) {
      expect(count(g.report, `${d.key}_ctl_status`)).toBe(0);
      expect(value(g.report, `${d.key}_ctl_qids`)).toBe('1,2');
      expect(count(g.report, `${d.key}_ctl_errors`)).toBe(0);
      expect(count(g.report, `${d.key}_ctl_late`)).toBe(0);
      expect(count(g.report, `${d.key}_ctl_stale`)).toBe(0);
      expect(count(g.report, `${d.key}_ctl_in_flight`)).toBe(0);
    }
    // The queue pairs' counters are one set: both disks' commands (both benches', plus the
    // front-ends') on each disk's view.
    expect(count(g.report, 'ns1_ctl_commands')).toBe(count(g.report, 'ns2_ctl_commands'));
    expect(count(g.report, 'ns1_ctl_commands')).toBeGreaterThan(count(g.report, 'ns1_bench_ios') + count(g.report, 'ns2_bench_ios'));
  });
});
