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
import * as cp from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as ts from 'typescript';
import { bdfOf, createBackingFiles, defaultControllers, nvmeGuestImage, runNvmeGuest } from '../guest/nvme-guest';
import { count, parseGuestOutput, requireQemu, value, type GuestReport } from '../guest/qemu';

/** Same function as in test/guest/nvme-threads-check.js. */
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

describe('NVMe-backed disk with threads 2 in a TCG guest', () => {
  let report: GuestReport;
  let output = '';
  const workDir = fs.mkdtempSync(path.join(process.env.TMPDIR ?? os.tmpdir(), 'rnull-e2e-nvme-threads-'));
  const controllers = defaultControllers(workDir);
  const ctrl = controllers[0]!;
  const nsid = 1;
  // Written through queue 0 (main thread) and queue 1 (worker thread).
  const writes = [
    { sector: 0, bytes: 65536, seed: 21, queue: 1 },
    { sector: 4097, bytes: 1536, seed: 22, queue: 0 },
    { sector: 9000, bytes: 12288, seed: 23, queue: 1 },
  ];

  beforeAll(async () => {
    requireQemu();
    if (!fs.existsSync(path.join(ROOT, 'dist', 'daemon', 'nvme-thread.js'))) throw new Error('dist/ is not built: run npm run build first');
    cp.execFileSync('make', ['-C', path.join(ROOT, 'bench', 'client')], { stdio: 'pipe' });
    compileHelpers();
    createBackingFiles(controllers);
    const plan = { bench: BENCH, bdf: bdfOf(ctrl), nsid, runtime: 20, writes };
    const t = Date.now();
    const result = await runNvmeGuest({
      image: nvmeGuestImage(),
      workDir,
      controllers,
      nodeScript: path.join(ROOT, 'test', 'guest', 'nvme-threads-check.js'),
      args: [JSON.stringify(plan)],
      timeoutMs: GUEST_TIMEOUT_MS,
    });
    output = result.output;
    report = parseGuestOutput(result.output);
    const v = (n: string): string => report.values.get(n) ?? '?';
    console.log(
      `guest-nvme-threads timings: guest boot+run ${Date.now() - t} ms; daemon start ${v('start_ms')} ms; vhost-bench ${v('bench_ios')} I/Os in ${v('bench_ms')} ms (${v('bench_iops')} IOPS); ` +
        `queue 0: thread ${v('q0_thread')} ${v('q0_commands')} commands; queue 1: thread ${v('q1_thread')} ${v('q1_commands')} commands`,
    );
  }, GUEST_TIMEOUT_MS + 120_000);

  afterAll(() => {
    if (process.env.RNULL_E2E_KEEP !== '1' && report !== undefined) fs.rmSync(workDir, { recursive: true, force: true });
  });

  test('the guest run completed without a DMAR fault', () => {
    expect(output).not.toMatch(/nvme-threads-check failed/);
    expect(count(report, 'node_status')).toBe(0);
    expect(count(report, 'done')).toBe(1);
    expect(count(report, 'dmar_faults')).toBe(0);
  });

  test('vhost-bench --verify on 2 queues reads back every write, across a `rnull ctl reset` in the middle of the run', () => {
    expect(count(report, 'reset_status')).toBe(0);
    expect(count(report, 'reset_bench_running')).toBe(1);
    expect(count(report, 'bench_status')).toBe(0);
    expect(count(report, 'bench_ios')).toBeGreaterThanOrEqual(1000);
    expect(count(report, 'bench_verified')).toBeGreaterThan(0);
    expect(count(report, 'bench_mismatches')).toBe(0);
    expect(count(report, 'bench_errors')).toBe(0);
  });

  test('queue 1 is served by worker thread 1 over queue pair 2, queue 0 by the main thread over queue pair 1; both took the reset', () => {
    expect(count(report, 'stats_status')).toBe(0);
    expect(count(report, 'q0_thread')).toBe(0);
    expect(count(report, 'q1_thread')).toBe(1);
    expect(count(report, 'q0_qid')).toBe(1);
    expect(count(report, 'q1_qid')).toBe(2);
    for (const q of ['q0', 'q1']) {
      expect(count(report, `${q}_commands`)).toBeGreaterThan(300);
      expect(count(report, `${q}_resets`)).toBe(1);
      expect(count(report, `${q}_interrupts`)).toBeGreaterThan(0); // its MSI-X eventfd, on its thread
      expect(count(report, `${q}_errors`)).toBe(0);
      expect(count(report, `${q}_late`)).toBe(0);
      expect(count(report, `${q}_stale`)).toBe(0);
      expect(count(report, `${q}_in_flight`)).toBe(0);
    }
  });

  test('writes through either queue read back through the other and are in the host backing file', () => {
    const ns = ctrl.namespaces.find((n) => n.nsid === nsid)!;
    const fd = fs.openSync(ns.file, 'r');
    try {
      writes.forEach((w, i) => {
        expect(value(report, `w${i}`)).toBe('same');
        const onDisk = Buffer.alloc(w.bytes);
        fs.readSync(fd, onDisk, 0, w.bytes, w.sector * 512);
        expect(onDisk.equals(Buffer.from(Array.from({ length: w.bytes }, (_, j) => pattern(w.seed, j))))).toBe(true);
      });
    } finally {
      fs.closeSync(fd);
    }
  });

  test('guest memory mapped for DMA once per front-end; no error logged; clean shutdown on SIGTERM', () => {
    expect(count(report, 'dma_mapped_logged')).toBe(2);
    expect(count(report, 'errors_logged')).toBe(0);
    expect(count(report, 'exit')).toBe(0);
    expect(count(report, 'shutdown_logged')).toBe(1);
  });
});
