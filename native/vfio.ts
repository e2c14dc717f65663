/**
 * Typed binding of native/vfio.cc: one PCI device owned through VFIO with a type1 IOMMU
 * (https://docs.kernel.org/driver-api/vfio.html). Sizes, offsets and addresses are in bytes.
 * Every failed ioctl/mmap/pread throws a SyscallError whose `syscall` names the call
 * (e.g. "VFIO_IOMMU_MAP_DMA"); bad arguments throw TypeError/RangeError before any syscall.
 */
import * as fs from 'fs';
import * as path from 'path';
import { native, type NativeGuestMemory } from './index';

/** A usable IOVA range reported by the IOMMU; `end` is inclusive. */
export interface IovaRange {
  start: number;
  end: number;
}

export interface IommuInfo {
  /** Bitmap of the IOMMU page sizes (bit n set: 2^n bytes). */
  pageSizes: bigint;
  /** Smallest IOMMU page, bytes. */
  minPageSize: number;
  /** VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, ascending; empty if the kernel reports none. */
  ranges: IovaRange[];
  /** How many more MAP_DMA entries the container accepts, when the kernel says. */
  dmaAvail?: number;
}

export interface RegionInfo {
  size: number;
  /** Offset of the region in the device fd. */
  offset: number;
  flags: number;
  read: boolean;
  write: boolean;
  mmap: boolean;
}

/** A page-aligned, zeroed block of anonymous memory; `buffer` is empty once freed. */
export interface DmaAllocation {
  id: number;
  buffer: ArrayBuffer;
  /** Process-wide share id: worker threads view the same memory by it (vfioShareView). */
  share?: number;
}

export interface NativeVfioDevice {
  info(): { iommuType: 'TYPE1v2' | 'TYPE1'; numRegions: number; numIrqs: number; configSize: number };
  iommuInfo(): IommuInfo;
  regionInfo(index: number): RegionInfo;
  /** Interrupts the device has at a VFIO irq index (e.g. vfioConstants.MSIX_IRQ_INDEX). */
  irqCount(index: number): number;
  /** mmaps BAR `index` (0..5) for its whole size; returns the size. */
  mapBar(index: number): number;
  /** The process-wide share id of mapped BAR `index`, for MMIO from worker threads (vfioShareWrite32). */
  barShare?(index: number): number;
  /** One 32-bit MMIO load (offset 4-aligned, inside the mapped BAR). */
  read32(bar: number, offset: number): number;
  /** One 32-bit MMIO store, after a full fence (earlier DMA-memory stores are visible first). */
  write32(bar: number, offset: number, value: number): void;
  read64(bar: number, offset: number): bigint;
  write64(bar: number, offset: number, value: bigint): void;
  /** PCI config space through VFIO; width 1, 2 or 4, naturally aligned. */
  configRead(offset: number, width: 1 | 2 | 4): number;
  configWrite(offset: number, width: 1 | 2 | 4, value: number): void;
  /** `size`: a non-zero multiple of PAGE_SIZE, at most MAX_DMA_BLOCK. */
  dmaAlloc(size: number): DmaAllocation;
  /** VFIO_IOMMU_MAP_DMA of the whole block at `iova` (page aligned), device read+write. */
  dmaMap(id: number, iova: number): void;
  dmaUnmap(id: number): void;
  /** Unmaps (if mapped), detaches the buffer, frees the memory. */
  dmaFree(id: number): void;
  /**
   * VFIO_IOMMU_MAP_DMA of guest memory region `region` of `memory` (whole pages around it) at
   * `iova` (page aligned), device read+write; returns the bytes mapped. The region's first byte
   * is at iova + regionLayout()[region].hostPageOffset. The pages stay pinned until unmapped.
   */
  dmaMapGuest(memory: NativeGuestMemory, region: number, iova: number): number;
  /** Unmaps what dmaMapGuest mapped at `iova`. RangeError if nothing is. */
  dmaUnmapGuest(iova: number): void;
  /** MSI-X vectors 0..n-1 -> eventfds (enables MSI-X); [] disables it. */
  setMsix(eventfds: number[]): void;
  /** VFIO_DEVICE_RESET. */
  reset(): void;
  /** Idempotent: MSI-X off, DMA unmapped and freed, BARs unmapped, fds closed. */
  close(): void;
}

interface VfioAddon {
  VfioDevice: new (groupPath: string, bdf: string) => NativeVfioDevice;
  vfioShareView(share: number): ArrayBuffer;
  vfioShareRead32(share: number, offset: number): number;
  vfioShareWrite32(share: number, offset: number, value: number): void;
  vfioFence(): void;
  vfioConstants: { PAGE_SIZE: number; MAX_DMA_BLOCK: number; MSIX_IRQ_INDEX: number; CONFIG_REGION_INDEX: number };
}

const addon = native as unknown as VfioAddon;

export const vfioConstants = addon.vfioConstants;

/** PCI config space offsets and bits used by drivers (PCI Local Bus 3.0, 6.2). */
export const PCI_COMMAND = 0x04;
export const PCI_COMMAND_MEMORY = 1 << 1;
export const PCI_COMMAND_MASTER = 1 << 2;
export const PCI_COMMAND_INTX_DISABLE = 1 << 10;

/** A PCI address as sysfs spells it: domain:bus:device.function, e.g. 0000:00:04.0. */
export const BDF_PATTERN = /^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$/;

/** Where a device is, and who drives it, as sysfs says. */
export interface PciDeviceStatus {
  bdf: string;
  /** Bound driver name, or null. */
  driver: string | null;
  /** IOMMU group number, or null when the device has no IOMMU group (IOMMU off). */
  group: number | null;
}

/**
 * Reads /sys/bus/pci/devices/<bdf>: its driver and IOMMU group. Throws Error naming the device
 * when it does not exist. `sysfs` is for tests.
 */
export function pciDeviceStatus(bdf: string, sysfs = '/sys'): PciDeviceStatus {
  if (!BDF_PATTERN.test(bdf)) throw new RangeError(`"${bdf}" is not a PCI address like 0000:00:04.0`);
  const dir = path.join(sysfs, 'bus/pci/devices', bdf);
  if (!fs.existsSync(dir)) throw new Error(`no PCI device ${bdf} (${dir} does not exist)`);
  const link = (name: string): string | null => {
    try {
      return path.basename(fs.readlinkSync(path.join(dir, name)));
    } catch {
      return null;
    }
  };
  const group = link('iommu_group');
  return { bdf, driver: link('driver'), group: group === null ? null : Number(group) };
}

/**
 * Opens a PCI device through VFIO: checks it is bound to vfio-pci and has an IOMMU group (with a
 * message saying how to fix either), then opens container, group and device
 * (TYPE1v2 when offered, else TYPE1). Throws Error for the setup problems, SyscallError for the
 * failed call otherwise (e.g. EBUSY when another process owns the group).
 */
export function openVfioDevice(bdf: string, sysfs = '/sys'): NativeVfioDevice {
  const st = pciDeviceStatus(bdf, sysfs);
  if (st.driver !== 'vfio-pci') {
    throw new Error(
      `PCI device ${bdf} is bound to ${st.driver ?? 'no driver'}, not vfio-pci: ` +
        `modprobe vfio-pci; echo vfio-pci > /sys/bus/pci/devices/${bdf}/driver_override; ` +
        (st.driver !== null ? `echo ${bdf} > /sys/bus/pci/devices/${bdf}/driver/unbind; ` : '') +
        `echo ${bdf} > /sys/bus/pci/drivers_probe`,
    );
  }
  if (st.group === null) {
    throw new Error(`PCI device ${bdf} has no IOMMU group: enable the IOMMU (e.g. intel_iommu=on on the kernel command line)`);
  }
  return new addon.VfioDevice(`/dev/vfio/${st.group}`, bdf);
}

/** Sets Bus Master Enable and Memory Space Enable in the PCI command register. */
export function enableBusMaster(dev: NativeVfioDevice): void {
  const cmd = dev.configRead(PCI_COMMAND, 2);
  dev.configWrite(PCI_COMMAND, 2, cmd | PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY);
}

/**
 * A view, from any thread, of a DMA block a VfioDevice allocated (DmaAllocation.share): the same
 * memory, kept mapped while the view lives. Throws Error once the block is freed.
 */
export function vfioShareView(share: number): ArrayBuffer {
  return addon.vfioShareView(share);
}

/**
 * 32-bit MMIO on a mapped BAR from any thread, by its share id (NativeVfioDevice.barShare); a
 * store comes after a full fence, a load before later loads. Byte offsets, 4-aligned. Throws
 * Error once the device is closed, RangeError outside the BAR.
 */
export function vfioShareRead32(share: number, offset: number): number {
  return addon.vfioShareRead32(share, offset);
}
export function vfioShareWrite32(share: number, offset: number, value: number): void {
  addon.vfioShareWrite32(share, offset, value);
}

/**
 * A full memory fence (x86 MFENCE): every earlier store, to DMA memory too, is visible to the
 * device before any later load. For a shadow doorbell store followed by its EventIdx load.
 */
export const vfioFence: () => void = addon.vfioFence;

/** The raw constructor, for tests of argument checking. */
export const VfioDevice = addon.VfioDevice;
