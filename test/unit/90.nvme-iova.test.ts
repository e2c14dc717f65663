/** The NVMe driver's IOVA allocator (drivers/nvme/iova.ts): ranges, the MSI window, alignment, reuse. */
import fc from 'fast-check';
import { IovaAllocator, IovaExhaustedError, MSI_WINDOW } from '../../drivers/nvme/iova';

/** What VFIO reported in the test guest (emulated VT-d, 39-bit address width). */
const GUEST_RANGES = [
  { start: 0, end: 0xfedfffff },
  { start: 0xfef00000, end: 0x7fffffffff },
];

const inMsi = (a: number, size: number): boolean => a <= MSI_WINDOW.end && a + size - 1 >= MSI_WINDOW.start;

describe('IovaAllocator', () => {
  test('hands out page-aligned addresses from the floor up, inside the ranges', () => {
    const a = new IovaAllocator(GUEST_RANGES);
    const x = a.alloc(4096);
    const y = a.alloc(100); // rounded up to a page
    expect(x).toBe(0x10000);
    expect(y).toBe(0x11000);
    expect(a.count).toBe(2);
    expect(a.capacity - a.available).toBe(8192);
  });

  test('keeps out of the MSI window even when the reported ranges include it', () => {
    // One range spanning 0xfee00000: the allocator must still skip the window.
    const a = new IovaAllocator([{ start: 0xfe000000, end: 0xffffffff }], { floor: 0 });
    const free = a.freeRanges();
    expect(free).toEqual([
      { start: 0xfe000000, end: MSI_WINDOW.start - 1 },
      { start: MSI_WINDOW.end + 1, end: 0xffffffff },
    ]);
    // Fill everything below the window, then the next allocation must land above it.
    a.alloc(MSI_WINDOW.start - 0xfe000000);
    const next = a.alloc(0x200000);
    expect(next).toBe(MSI_WINDOW.end + 1);
    expect(inMsi(next, 0x200000)).toBe(false);
  });

  test('an allocation never straddles a hole between ranges', () => {
    const a = new IovaAllocator(GUEST_RANGES, { floor: 0xfed00000 });
    // 1 MiB left below the hole at 0xfee00000; a 2 MiB request must go above it.
    const big = a.alloc(2 << 20);
    expect(big).toBe(0xfef00000);
    const small = a.alloc(1 << 20);
    expect(small).toBe(0xfed00000);
  });

  test('honours alignment, and reserved ranges given by the caller', () => {
    const a = new IovaAllocator(GUEST_RANGES, { reserved: [{ start: 0x10000, end: 0x1fffff }] });
    const x = a.alloc(4096, 2 << 20);
    expect(x % (2 << 20)).toBe(0);
    expect(x).toBeGreaterThanOrEqual(0x200000);
    expect(() => a.alloc(4096, 3000)).toThrow(RangeError);
    expect(() => a.alloc(0)).toThrow(RangeError);
  });

  test('with no reported ranges uses [floor, 2^39)', () => {
    const a = new IovaAllocator([]);
    expect(a.freeRanges()[0]!.start).toBe(0x10000);
    expect(a.freeRanges().at(-1)!.end).toBe(2 ** 39 - 1);
  });

  test('release coalesces, so freed space is reused whole; exhaustion is a clear error', () => {
    const a = new IovaAllocator([{ start: 0x10000, end: 0x1ffff }]); // 16 pages
    const pages = Array.from({ length: 16 }, () => a.alloc(4096));
    expect(() => a.alloc(4096)).toThrow(IovaExhaustedError);
    for (const p of pages) a.release(p);
    expect(a.freeRanges()).toEqual([{ start: 0x10000, end: 0x1ffff }]);
    expect(a.alloc(16 * 4096)).toBe(0x10000);
    expect(() => a.release(0x12345000)).toThrow(RangeError);
  });

  test('random alloc/release: no overlap, always inside the ranges, never the MSI window', () => {
    fc.assert(
      fc.property(
        fc.array(fc.tuple(fc.boolean(), fc.integer({ min: 1, max: 64 }), fc.nat()), { maxLength: 200 }),
        (ops) => {
          const a = new IovaAllocator([{ start: 0xfed00000, end: 0xff1fffff }], { floor: 0 });
          const live = new Map<number, number>();
          for (const [isAlloc, pages, pick] of ops) {
            if (isAlloc || live.size === 0) {
              let at: number;
              try {
                at = a.alloc(pages * 4096);
              } catch (err) {
                expect(err).toBeInstanceOf(IovaExhaustedError);
                continue;
              }
              const size = pages * 4096;
              expect(inMsi(at, size)).toBe(false);
              expect(at).toBeGreaterThanOrEqual(0xfed00000);
              expect(at + size - 1).toBeLessThanOrEqual(0xff1fffff);
              for (const [s, n] of live) expect(at + size <= s || s + n <= at).toBe(true);
              live.set(at, size);
            } else {
              const key = [...live.keys()][pick % live.size]!;
              a.release(key);
              live.delete(key);
            }
          }
          const used = [...live.values()].reduce((s, n) => s + n, 0);
          expect(a.available + used).toBe(a.capacity);
        },
      ),
      { numRuns: 200 },
    );
  });
});
