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
import * as cp from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as ts from 'typescript';
import { bdfOf, createBackingFiles, defaultControllers, nvmeGuestImage, runNvmeGuest } from '../guest/nvme-guest';
import { count, parseGuestOutput, requireQemu, value, type GuestReport } from '../guest/qemu';

/** Same function as in test/guest/nvme-ns-check.js. */
function pattern(seed: number, i: number): number {
  return (i * 7 + seed * 13 + (i >>> 9) * 3 + 1) & 0xff;
}

const ROOT = path.join(__dirname, '..', '..');
const GUEST_TIMEOUT_MS = Number(process.env.RNULL_E2E_GUEST_TIMEOUT_S ?? 300) * 1000;
const BENCH = path.join(ROOT, 'bench', 'client', 'build', 'vhost-bench');

/** The test front-end's helpers compiled into dist/test/helpers for the guest script. */
function compileHelpers(): void {
  const files = ['frontend', 'guest-ram', 'driver-ring'].map((f) => path.join(ROOT, 'test', 'helpers', `${f}.ts`));
  const options: ts.CompilerOptions = { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2022, rootDir: ROOT, outDir: path.join(ROOT, 'dist'), skipLibCheck: true, esModuleInterop: true, types: ['node'] };
  const program = ts.createProgram(files, options);
  for (const f of files) {
    const r = program.emit(program.getSourceFile(f));
    if (r.emitSkipped) throw new Error(`cannot compile ${f}`);
  }
}

describe('two namespaces of one NVMe controller served as two disks in a TCG guest', () => {
  let report: GuestReport;
  let output = '';
  const workDir = fs.mkdtempSync(path.join(process.env.TMPDIR ?? os.tmpdir(), 'rnull-e2e-nvme-ns-'));
  // nvme1: namespace 1 with 512-byte blocks (32 MiB), namespace 2 with 4096-byte blocks (48 MiB).
  const ctrl = defaultControllers(workDir)[1]!;
  const disks = [
    { key: 'ns1', nsid: 1, blockSize: 512, writes: [{ sector: 40000, bytes: 65536, seed: 21 }, { sector: 50001, bytes: 1536, seed: 22 }] },
    { key: 'ns2', nsid: 2, blockSize: 4096, writes: [{ sector: 40960, bytes: 65536, seed: 23 }, { sector: 60000, bytes: 12288, seed: 24 }] },
  ];

  beforeAll(async () => {
    requireQemu();
    if (!fs.existsSync(path.join(ROOT, 'dist', 'drivers', 'nvme', 'namespace.js'))) throw new Error('dist/ is not built: run npm run build first');
    cp.execFileSync('make', ['-C', path.join(ROOT, 'bench', 'client')], { stdio: 'pipe' });
    compileHelpers();
    createBackingFiles([ctrl]);
    const t = Date.now();
    const result = await runNvmeGuest({
      image: nvmeGuestImage(),
      workDir,
      controllers: [ctrl],
      nodeScript: path.join(ROOT, 'test', 'guest', 'nvme-ns-check.js'),
      args: [JSON.stringify({ bench: BENCH, bdf: bdfOf(ctrl), disks })],
      timeoutMs: GUEST_TIMEOUT_MS,
    });
    output = result.output;
    report = parseGuestOutput(result.output);
    const v = (n: string): string => report.values.get(n) ?? '?';
    console.log(
      `guest-nvme-ns timings: guest boot+run ${Date.now() - t} ms, node in guest ${v('node_seconds')} s, daemon start ${v('start_ms')} ms, ` +
        `two verify runs at once with a reset ${v('benches_ms')} ms (${disks.map((d) => `${d.key} ${v(`${d.key}_bench_ios`)} I/Os ${v(`${d.key}_bench_iops`)} IOPS`).join(', ')}), two front-ends at once ${v('frontends_ms')} ms`,
    );
  }, GUEST_TIMEOUT_MS + 120_000);

  afterAll(() => {
    if (process.env.RNULL_E2E_KEEP !== '1' && report !== undefined) fs.rmSync(workDir, { recursive: true, force: true });
  });

  test('the guest run completed without a DMAR fault', () => {
    expect(count(report, 'node_status')).toBe(0);
    expect(count(report, 'done')).toBe(1);
    expect(count(report, 'dmar_faults')).toBe(0);
    expect(output).not.toMatch(/nvme-ns-check failed/);
  });

  test('one controller bring-up and one clean shutdown for the two disks', () => {
    expect(count(report, 'bringups_logged')).toBe(1);
    expect(count(report, 'namespaces_logged')).toBe(2);
    expect(count(report, 'exit')).toBe(0);
    expect(count(report, 'shutdowns_logged')).toBe(1);
    // vhost-bench and the test front-end on each disk: four memory tables mapped.
    expect(count(report, 'dma_mapped_logged')).toBe(4);
    expect(count(report, 'errors_logged')).toBe(0);
    // Warnings: only the requested reset's two lines (management request, driver).
    expect(count(report, 'reset_warning_logged')).toBe(1);
    expect(count(report, 'warnings_logged')).toBe(2);
  });

  test('a controller reset through one disk while both disks\' verify runs go: the shared queue pairs reset once, nothing lost on either disk', () => {
    expect(count(report, 'reset_status')).toBe(0);
    expect(count(report, 'reset_mid_run')).toBe(1);
    for (const d of disks) {
      expect(count(report, `${d.key}_ctl_resets`)).toBe(2); // once on each of the 2 shared queue pairs
      expect(count(report, `${d.key}_bench_mismatches`)).toBe(0);
      expect(count(report, `${d.key}_bench_errors`)).toBe(0);
    }
  });

  test.each(disks.map((d) => [d.key, d] as const))('%s: geometry and serial from its namespace', (k, d) => {
    const ns = ctrl.namespaces.find((n) => n.nsid === d.nsid)!;
    expect(count(report, `${k}_capacity_sectors`)).toBe(ns.sizeBytes / 512);
    expect(count(report, `${k}_blk_size`)).toBe(d.blockSize);
    expect(value(report, `${k}_serial`)).toBe(`${ctrl.serial}-${d.nsid}`);
  });

  test.each(disks.map((d) => [d.key, d] as const))('%s: vhost-bench --verify, run at the same time as the other disk\'s, reads back every write', (k) => {
    expect(count(report, `${k}_bench_status`)).toBe(0);
    expect(count(report, `${k}_bench_ios`)).toBeGreaterThan(1000);
    expect(count(report, `${k}_bench_verified`)).toBeGreaterThan(0);
    expect(count(report, `${k}_bench_mismatches`)).toBe(0);
    expect(count(report, `${k}_bench_errors`)).toBe(0);
  });

  test.each(disks.map((d) => [d.key, d] as const))('%s: writes through the disk land in its namespace\'s backing file at the right offsets', (k, d) => {
    const ns = ctrl.namespaces.find((n) => n.nsid === d.nsid)!;
    const fd = fs.openSync(ns.file, 'r');
    try {
      d.writes.forEach((w, i) => {
        expect(value(report, `${k}_w${i}`)).toBe('same');
        const onDisk = Buffer.alloc(w.bytes);
        fs.readSync(fd, onDisk, 0, w.bytes, w.sector * 512);
        expect(onDisk.equals(Buffer.from(Array.from({ length: w.bytes }, (_, j) => pattern(w.seed, j))))).toBe(true);
      });
    } finally {
      fs.closeSync(fd);
    }
  });

  test('both disks go through the same I/O queue pairs', () => {
    for (const d of disks) {
      expect(count(report, `${d.key}_ctl_status`)).toBe(0);
      expect(value(report, `${d.key}_ctl_qids`)).toBe('1,2');
      expect(count(report, `${d.key}_ctl_errors`)).toBe(0);
      expect(count(report, `${d.key}_ctl_late`)).toBe(0);
      expect(count(report, `${d.key}_ctl_stale`)).toBe(0);
      expect(count(report, `${d.key}_ctl_in_flight`)).toBe(0);
    }
    // The queue pairs' counters are one set: both disks' commands (both benches', plus the
    // front-ends') on each disk's view.
    expect(count(report, 'ns1_ctl_commands')).toBe(count(report, 'ns2_ctl_commands'));
    expect(count(report, 'ns1_ctl_commands')).toBeGreaterThan(count(report, 'ns1_bench_ios') + count(report, 'ns2_bench_ios'));
  });
});
