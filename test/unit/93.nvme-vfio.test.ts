/**
 * native/vfio without hardware: setup problems give messages saying what to do, the native
 * constructor checks its arguments and names the failed call in its SyscallError.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { SyscallError } from '../../native';
import { VfioDevice, openVfioDevice, pciDeviceStatus, vfioConstants } from '../../native/vfio';

/** A fake sysfs with one PCI device, its driver link and IOMMU group link. */
function fakeSysfs(bdf: string, driver: string | null, group: number | null): string {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-sysfs-'));
  const dev = path.join(root, 'bus/pci/devices', bdf);
  fs.mkdirSync(dev, { recursive: true });
  if (driver !== null) fs.symlinkSync(`../../../bus/pci/drivers/${driver}`, path.join(dev, 'driver'));
  if (group !== null) fs.symlinkSync(`../../../kernel/iommu_groups/${group}`, path.join(dev, 'iommu_group'));
  return root;
}

describe('native/vfio', () => {
  const roots: string[] = [];
  afterAll(() => roots.forEach((r) => fs.rmSync(r, { recursive: true, force: true })));

  test('constants', () => {
    expect(vfioConstants.PAGE_SIZE).toBe(4096);
    expect(vfioConstants.MSIX_IRQ_INDEX).toBe(2);
    expect(vfioConstants.CONFIG_REGION_INDEX).toBe(7);
  });

  test('pciDeviceStatus reads driver and group from sysfs', () => {
    const root = fakeSysfs('0000:00:04.0', 'vfio-pci', 7);
    roots.push(root);
    expect(pciDeviceStatus('0000:00:04.0', root)).toEqual({ bdf: '0000:00:04.0', driver: 'vfio-pci', group: 7 });
    expect(() => pciDeviceStatus('00:04.0', root)).toThrow(/not a PCI address/);
    expect(() => pciDeviceStatus('0000:00:09.0', root)).toThrow(/no PCI device 0000:00:09.0/);
  });

  test('a device bound to another driver: the message says how to bind it to vfio-pci', () => {
    const root = fakeSysfs('0000:00:04.0', 'nvme', 3);
    roots.push(root);
    expect(() => openVfioDevice('0000:00:04.0', root)).toThrow(
      /bound to nvme, not vfio-pci: modprobe vfio-pci; echo vfio-pci > \/sys\/bus\/pci\/devices\/0000:00:04.0\/driver_override; echo 0000:00:04.0 > \/sys\/bus\/pci\/devices\/0000:00:04.0\/driver\/unbind; echo 0000:00:04.0 > \/sys\/bus\/pci\/drivers_probe/,
    );
  });

  test('a device without an IOMMU group: the message says to enable the IOMMU', () => {
    const root = fakeSysfs('0000:00:04.0', 'vfio-pci', null);
    roots.push(root);
    expect(() => openVfioDevice('0000:00:04.0', root)).toThrow(/no IOMMU group: enable the IOMMU/);
  });

  test('the constructor checks its arguments, and a failed open is a SyscallError naming the call', () => {
    expect(() => new (VfioDevice as unknown as new (...a: unknown[]) => unknown)(1, 2)).toThrow(/expected \(groupPath: string, bdf: string\)/);
    let err: unknown;
    try {
      // This host has no VFIO container device (or no access to it), or no such group.
      new VfioDevice('/nonexistent/vfio/group', '0000:00:04.0');
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(SyscallError);
    expect((err as SyscallError).syscall).toMatch(/^open \/(dev\/vfio\/vfio|nonexistent\/vfio\/group)$/);
    expect((err as SyscallError).errno).toBeGreaterThan(0);
  });
});
