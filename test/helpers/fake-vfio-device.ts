/**
 * The parts of a fake VFIO device (native/vfio.ts NativeVfioDevice) that every fake NVMe
 * controller of the unit tests shares: device, IOMMU and BAR information, DMA memory blocks kept
 * as ArrayBuffers with the IOVA each is mapped at, and mem() to reach them by IOVA as the
 * controller would. A subclass emulates the registers (read32/write32), config space and MSI-X.
 */
import type { DmaAllocation, IommuInfo, NativeVfioDevice, RegionInfo } from '../../native/vfio';

export abstract class FakeVfioDevice implements NativeVfioDevice {
  private readonly blocks = new Map<number, { bytes: Uint8Array; iova?: number }>();
  private nextId = 1;

  /** @param iovaRanges what iommuInfo() reports as usable (inclusive ends). */
  constructor(private readonly iovaRanges: IommuInfo['ranges'] = [{ start: 0, end: 2 ** 39 - 1 }]) {}

  abstract read32(bar: number, off: number): number;
  abstract write32(bar: number, off: number, v: number): void;
  abstract configRead(off: number, width: number): number;
  abstract configWrite(off: number, width: number, v: number): void;
  abstract setMsix(fds: number[]): void;
  abstract close(): void;

  info(): ReturnType<NativeVfioDevice['info']> {
    return { iommuType: 'TYPE1v2', numRegions: 9, numIrqs: 5, configSize: 4096 };
  }
  iommuInfo(): IommuInfo {
    return { pageSizes: 0x40201000n, minPageSize: 4096, ranges: this.iovaRanges };
  }
  regionInfo(): RegionInfo {
    return { size: 16384, offset: 0, flags: 7, read: true, write: true, mmap: true };
  }
  irqCount(): number {
    return 65;
  }
  mapBar(): number {
    return 16384;
  }
  read64(): bigint {
    throw new Error('unused');
  }
  write64(): void {
    throw new Error('unused');
  }
  dmaAlloc(size: number): DmaAllocation {
    const id = this.nextId++;
    const buffer = new ArrayBuffer(size);
    this.blocks.set(id, { bytes: new Uint8Array(buffer) });
    return { id, buffer };
  }
  dmaMap(id: number, iova: number): void {
    this.blocks.get(id)!.iova = iova;
  }
  dmaUnmap(id: number): void {
    delete this.blocks.get(id)!.iova;
  }
  dmaFree(id: number): void {
    this.blocks.delete(id);
  }
  dmaMapGuest(): number {
    throw new Error('not emulated');
  }
  dmaUnmapGuest(): void {}
  reset(): void {}

  /** DMA memory at an IOVA (must lie in one mapped block). */
  mem(iova: number, len: number): Uint8Array {
    for (const b of this.blocks.values()) {
      if (b.iova !== undefined && iova >= b.iova && iova + len <= b.iova + b.bytes.byteLength) {
        return b.bytes.subarray(iova - b.iova, iova - b.iova + len);
      }
    }
    throw new Error(`DMA to unmapped IOVA 0x${iova.toString(16)}`);
  }
}
