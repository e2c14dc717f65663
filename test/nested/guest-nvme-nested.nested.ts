/**
 * The real front-end over an NVMe-backed disk (issue 10): in the NVMe test guest (TCG, emulated
 * Intel IOMMU, QEMU's emulated NVMe bound to vfio-pci, test/guest/nvme-guest.ts), `rnull --driver
 * nvme` serves the namespace and a QEMU started inside that guest (nested TCG) attaches it as a
 * vhost-user-blk disk with shared memfd memory; its guest (a tiny busybox initramfs) writes 2 MiB
 * of random data with O_DIRECT, reads them back with O_DIRECT and checksums both. Run by
 * test/guest/nvme-nested.js; see its header.
 *
 * Asserted: the inner guest sees the namespace's capacity and block size; the data it read back
 * has the checksum of what it wrote; the host's backing file holds those bytes at the offset the
 * inner guest wrote (so they went through rnull and the NVMe controller, not a cache); rnull mapped the inner guest's memory once, logged no error or
 * warning, shut the controller down cleanly on SIGTERM; no DMAR fault in the outer guest.
 * Slow (nested TCG: the inner kernel alone takes minutes to boot, ~8 minutes in all on a 2-core
 * machine), so it is not in test/e2e: `npm test` (and so CI) runs it with everything else,
 * `npm run test:nvme-nested` alone, `npm run test:e2e` leaves it out. The timings are printed.
 * RNULL_NESTED_INNER_TIMEOUT_S bounds the inner QEMU (default 1200 s).
 */
import { createHash } from 'node:crypto';
import * as path from 'node:path';
import { buildInitramfs, type GuestImage } from '../guest/initramfs';
import { bdfOf, compileForGuest, NvmeGuestRun, readBacking, ROOT, type NvmeControllerSpec } from '../guest/nvme-guest';
import { count, value } from '../guest/qemu';

const INNER_TIMEOUT_MS = Number(process.env.RNULL_NESTED_INNER_TIMEOUT_S ?? 1200) * 1000;
const OFFSET_MIB = 8;
const SIZE_MIB = 2;
const NS_BYTES = 64 << 20;

describe('a nested QEMU guest reads and writes an NVMe-backed rnull disk over vhost-user', () => {
  const g = new NvmeGuestRun('nvme-nested');
  const controllers: NvmeControllerSpec[] = [
    { id: 'nvme0', serial: 'rnull-nested', slot: 4, namespaces: [{ nsid: 1, file: path.join(g.workDir, 'ns1.img'), sizeBytes: NS_BYTES, blockSize: 512 }] },
  ];

  g.boot({
    controllers,
    script: 'nvme-nested.js',
    needs: 'drivers/nvme/driver.js',
    plan: () => {
      // test/guest/qemu.ts (and what it imports) compiled to dist/test/guest for the guest script.
      compileForGuest(['test/guest/qemu.ts'], true);
      const qemuJs = path.join(ROOT, 'dist', 'test', 'guest', 'qemu.js');
      const cacheDir = path.join(process.env.TMPDIR ?? '/tmp', 'rnull-guest-cache');
      // The inner guest: busybox and the virtio-blk modules only.
      const inner: GuestImage = buildInitramfs({ cacheDir, modules: ['virtio_pci', 'virtio_blk', 'qemu_fw_cfg'], programs: [] });
      // quiet: every console byte is a port write the nested QEMU emulates.
      const kernelArgs = ['quiet', 'tsc=reliable', 'mitigations=off'];
      return { image: inner, qemuJs, bdf: bdfOf(controllers[0]!), nsid: 1, offsetMiB: OFFSET_MIB, sizeMiB: SIZE_MIB, timeoutMs: INNER_TIMEOUT_MS, memoryMiB: 192, kernelArgs };
    },
    timeoutMs: INNER_TIMEOUT_MS + 240_000,
    // TSC clock reads in the vDSO: under TCG the kernel otherwise picks the HPET, and every
    // clock read of the inner QEMU (it reads the clock constantly) traps to the outer QEMU.
    // no_timer_check: with the TSC trusted, the kernel's IO-APIC timer check can fail under a
    // loaded host and panic ("timer doesn't work through Interrupt-remapped IO-APIC").
    kernelArgs: ['tsc=reliable', 'no_timer_check'],
    timings: (v) =>
      `rnull start ${v('rnull_start_ms')} ms, ` +
      `inner QEMU ${v('inner_qemu_ms')} ms (kernel to /init ${v('inner_kernel_to_init_s')} s, script at ${v('inner_boot_s')} s, ${SIZE_MIB} MiB write ${v('inner_write_s')} s, read ${v('inner_read_s')} s)`,
  });

  test('the outer guest ran to the end without a DMAR fault', () => {
    g.expectCompleted(false);
  });

  test('the inner guest sees the namespace: capacity and logical block size', () => {
    expect(count(g.report, 'inner_exit')).toBe(0);
    expect(count(g.report, 'inner_done')).toBe(1);
    expect(count(g.report, 'inner_sectors')).toBe(NS_BYTES / 512);
    expect(count(g.report, 'inner_lbs')).toBe(512);
  });

  test('data written with O_DIRECT reads back with the same checksum', () => {
    expect(value(g.report, 'inner_data_md5')).toMatch(/^[0-9a-f]{32}$/);
    expect(value(g.report, 'inner_readback_md5')).toBe(value(g.report, 'inner_data_md5'));
  });

  test("the data is on the namespace: the host's backing file at the offset has the checksum", () => {
    const buf = readBacking(controllers[0]!.namespaces[0]!.file, OFFSET_MIB << 20, SIZE_MIB << 20);
    expect(createHash('md5').update(buf).digest('hex')).toBe(value(g.report, 'inner_data_md5'));
  });

  test('rnull mapped the inner guest memory once, logged nothing bad and shut the controller down', () => {
    expect(count(g.report, 'rnull_exit')).toBe(0);
    expect(count(g.report, 'rnull_dma_mapped_logged')).toBeGreaterThanOrEqual(1);
    expect(count(g.report, 'rnull_errors_logged')).toBe(0);
    expect(count(g.report, 'rnull_warnings_logged')).toBe(0);
    expect(count(g.report, 'rnull_shutdown_logged')).toBe(1);
  });
});
