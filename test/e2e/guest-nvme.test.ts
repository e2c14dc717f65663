/**
 * The VFIO NVMe foundation in a real guest: QEMU's emulated NVMe controllers behind an emulated
 * Intel IOMMU, bound to vfio-pci in the guest, driven by native/vfio + drivers/nvme through
 * test/guest/nvme-check.js (see test/guest/nvme-guest.ts for the test bed).
 *
 * One boot covers: controller bring-up with MSI-X on before CC.EN (admin completions arrive by
 * interrupt), Identify fields against what QEMU was given (serials, namespace sizes, 512 and
 * 4096-byte LBAs), the usable IOVA ranges leaving out the MSI window, two I/O queue pairs (one
 * completed by its MSI-X eventfd, one polled), writes read back through the other queue and found
 * in the host's backing files at the right offsets, no DMAR fault, and a clean shutdown.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createBackingFiles, defaultControllers, nvmeGuestImage, runNvmeGuest, bdfOf } from '../guest/nvme-guest';
import { parseGuestOutput, requireQemu, value, count, type GuestReport } from '../guest/qemu';

/** Same function as in test/guest/nvme-check.js. */
function pattern(seed: number, i: number): number {
  return (i * 7 + seed * 13 + (i >>> 9) * 3 + 1) & 0xff;
}

const MSI_ADDR = 0xfee00000;
const ROOT = path.join(__dirname, '..', '..');
const GUEST_TIMEOUT_MS = Number(process.env.RNULL_E2E_GUEST_TIMEOUT_S ?? 200) * 1000;

interface Write {
  slba: number;
  bytes: number;
  seed: number;
}

describe('VFIO NVMe driver foundation in a TCG guest', () => {
  let report: GuestReport;
  let workDir: string;
  let output = '';
  const controllers = (() => {
    workDir = fs.mkdtempSync(path.join(process.env.TMPDIR ?? os.tmpdir(), 'rnull-e2e-nvme-'));
    return defaultControllers(workDir);
  })();
  // Per controller and namespace: what the guest writes (a 512 and a 4096-byte LBA case each).
  const writes = new Map<string, Write[]>();
  let seed = 1;
  for (const c of controllers) {
    for (const ns of c.namespaces) {
      const w: Write[] = ns.blockSize === 512
        ? [{ slba: 2048, bytes: 8192, seed: seed++ }, { slba: 7, bytes: 4096, seed: seed++ }]
        : [{ slba: 100, bytes: 8192, seed: seed++ }, { slba: 3, bytes: 4096, seed: seed++ }];
      writes.set(`${c.id}/${ns.nsid}`, w);
    }
  }

  beforeAll(async () => {
    requireQemu();
    if (!fs.existsSync(path.join(ROOT, 'dist', 'drivers', 'nvme', 'controller.js'))) {
      throw new Error('dist/ is not built: run npm run build first');
    }
    createBackingFiles(controllers);
    const image = nvmeGuestImage();
    const plan = {
      controllers: controllers.map((c) => ({
        bdf: bdfOf(c),
        key: c.id,
        // The second controller is first brought up and dropped without a shutdown.
        reopen: c.id === 'nvme1',
        namespaces: c.namespaces.map((ns) => ({ nsid: ns.nsid, writes: writes.get(`${c.id}/${ns.nsid}`) })),
      })),
    };
    const t = Date.now();
    const result = await runNvmeGuest({
      image,
      workDir,
      controllers,
      nodeScript: path.join(ROOT, 'test', 'guest', 'nvme-check.js'),
      args: [JSON.stringify(plan)],
      timeoutMs: GUEST_TIMEOUT_MS,
    });
    output = result.output;
    report = parseGuestOutput(result.output);
    const v = (n: string): string => report.values.get(n) ?? '?';
    const timing = [
      `guest boot+run ${Date.now() - t} ms (image ${image.built ? 'built' : 'cached'}), node in guest ${v('node_seconds')} s`,
      ...controllers.map((c) => {
        const k = c.id;
        return (
          `${k}: open ${v(`${k}_open_ms`)} ms (vfio ${v(`${k}_t_vfioOpen_ms`)}, disable ${v(`${k}_t_disable_ms`)}, ` +
          `admin queues+MSI-X ${v(`${k}_t_adminQueues_ms`)}, CC.EN->RDY ${v(`${k}_t_enable_ms`)}, identify ${v(`${k}_t_identifyController_ms`)}, ` +
          `queues ${v(`${k}_t_numberOfQueues_ms`)}), create 2 I/O pairs ${v(`${k}_create_queues_ms`)} ms, ` +
          `slowest I/O ${v(`${k}_io_ms_max`)} ms, shutdown ${v(`${k}_shutdown_ms`)} ms`
        );
      }),
    ];
    console.log(`guest-nvme timings:\n  ${timing.join('\n  ')}`);
  }, GUEST_TIMEOUT_MS + 60_000);

  afterAll(() => {
    if (process.env.RNULL_E2E_KEEP !== '1' && report !== undefined) fs.rmSync(workDir, { recursive: true, force: true });
  });

  test('controllers are bound to vfio-pci and no DMAR fault was logged', () => {
    for (const c of controllers) expect(value(report, `driver_${bdfOf(c)}`)).toBe('vfio-pci');
    expect(count(report, 'node_status')).toBe(0);
    expect(count(report, 'dmar_faults')).toBe(0);
    expect(count(report, 'warnings')).toBe(0);
  });

  test.each(['nvme0', 'nvme1'])('%s comes up with MSI-X on, admin completions by interrupt', (k) => {
    expect(value(report, `${k}_iommu_type`)).toBe('TYPE1v2');
    expect(value(report, `${k}_version`)).toBe('1.4.0');
    expect(count(report, `${k}_bus_master`)).toBe(1);
    expect(count(report, `${k}_msix_enabled`)).toBe(1);
    expect(count(report, `${k}_vectors`)).toBe(3); // admin + 2 I/O queues
    expect(count(report, `${k}_msix_table_size`)).toBeGreaterThanOrEqual(3);
    // Identify Controller and Set Features completed by the admin vector's eventfd.
    expect(count(report, `${k}_admin_interrupts`)).toBeGreaterThan(0);
    expect(count(report, `${k}_mqes`)).toBeGreaterThanOrEqual(64);
    expect(count(report, `${k}_granted_queues`)).toBeGreaterThanOrEqual(2);
    expect(count(report, `${k}_done`)).toBe(1);
  });

  test('the native layer refuses bad accesses; the kernel refuses a DMA mapping in the MSI window', () => {
    for (const k of ['nvme0', 'nvme1']) {
      expect(count(report, `${k}_bar0_size`)).toBeGreaterThanOrEqual(0x2000);
      expect(value(report, `${k}_oob_read`)).toBe('RangeError');
      expect(value(report, `${k}_unaligned_read`)).toBe('RangeError');
      expect(value(report, `${k}_odd_dma_size`)).toBe('RangeError');
      expect(value(report, `${k}_config_oob`)).toBe('RangeError');
      expect(value(report, `${k}_msi_window_map`)).toMatch(/^SyscallError:VFIO_IOMMU_MAP_DMA:\d+$/);
      expect(count(report, `${k}_freed_buffer_bytes`)).toBe(0); // detached: JS cannot touch freed memory
    }
  });

  test('Identify matches what QEMU was given', () => {
    for (const c of controllers) {
      const k = c.id;
      expect(value(report, `${k}_serial`)).toBe(c.serial);
      expect(value(report, `${k}_active_ns`)).toBe(c.namespaces.map((ns) => ns.nsid).join(','));
      expect(count(report, `${k}_nn`)).toBeGreaterThanOrEqual(c.namespaces.length);
      expect(count(report, `${k}_max_transfer`)).toBeGreaterThanOrEqual(4096);
      for (const ns of c.namespaces) {
        const n = `${k}_ns${ns.nsid}`;
        expect(count(report, `${n}_block_size`)).toBe(ns.blockSize);
        expect(count(report, `${n}_nsze`)).toBe(ns.sizeBytes / ns.blockSize);
        expect(count(report, `${n}_metadata`)).toBe(0);
      }
    }
  });

  test('IOVAs come from the reported ranges, outside the MSI window', () => {
    for (const c of controllers) {
      const ranges = value(report, `${c.id}_iova_ranges`)
        .split(',')
        .map((r) => r.split('-').map((x) => Number(x)) as [number, number]);
      expect(ranges.length).toBeGreaterThan(0);
      for (const [s, e] of ranges) expect(MSI_ADDR >= s && MSI_ADDR <= e).toBe(false);
      for (const iova of value(report, `${c.id}_dma_iovas`).split(',').map(Number)) {
        expect(ranges.some(([s, e]) => iova >= s && iova + 4095 <= e)).toBe(true);
        expect(iova >= 0xfee00000 && iova <= 0xfeefffff).toBe(false);
      }
    }
  });

  test('writes read back through the other queue (interrupt and polled) and land in the backing file', () => {
    for (const c of controllers) {
      const k = c.id;
      expect(count(report, `${k}_irq_queue_interrupts`)).toBeGreaterThan(0);
      expect(count(report, `${k}_poll_queue_completions`)).toBeGreaterThan(0);
      expect(count(report, `${k}_stale`)).toBe(0);
      for (const ns of c.namespaces) {
        const n = `${k}_ns${ns.nsid}`;
        const fd = fs.openSync(ns.file, 'r');
        try {
          writes.get(`${c.id}/${ns.nsid}`)!.forEach((w, i) => {
            expect(value(report, `${n}_w${i}_roundtrip`)).toBe('same');
            expect(value(report, `${n}_w${i}_modes`)).toBe(i % 2 === 0 ? 'write:interrupt,read:poll' : 'write:poll,read:interrupt');
            expect(count(report, `${n}_w${i}_irqs`)).toBeGreaterThan(0);
            const onDisk = Buffer.alloc(w.bytes);
            fs.readSync(fd, onDisk, 0, w.bytes, w.slba * ns.blockSize);
            const expected = Buffer.from(Array.from({ length: w.bytes }, (_, j) => pattern(w.seed, j)));
            expect(onDisk.equals(expected)).toBe(true);
            // The block before the write is untouched (the offset is right, not just the data).
            if (w.slba > 0) {
              const before = Buffer.alloc(ns.blockSize);
              fs.readSync(fd, before, 0, ns.blockSize, (w.slba - 1) * ns.blockSize);
              expect(before.equals(Buffer.alloc(ns.blockSize))).toBe(true);
            }
          });
        } finally {
          fs.closeSync(fd);
        }
      }
    }
  });

  test('clean shutdown reported SHST complete', () => {
    for (const c of controllers) expect(Number(value(report, `${c.id}_shutdown_ms`))).toBeGreaterThanOrEqual(0);
    expect(output).not.toMatch(/nvme-check failed/);
  });
});
