/**
 * A page store (drivers/null/page-store, store-file) checked against a flat reference buffer:
 * seeded random writes, discards and reads, the same operations a disk's requests make.
 */
import type { PageStore } from '../../drivers/null/page-store';

/** A seeded linear congruential generator: rnd(n) is an integer in [0, n), the same sequence for the same seed. */
export function seededRandom(seed: number): (n: number) => number {
  let s = seed;
  return (n: number): number => {
    s = (s * 1103515245 + 12345) & 0x7fffffff;
    return s % n;
  };
}

/**
 * Runs `ops` random operations on `store` and on `ref` (the flat reference: the whole disk,
 * bytes): half are writes of random bytes (each must return 0), a fifth discards (the reference
 * is zeroed there), the rest reads, each expected to equal the reference. Positions are
 * anywhere on the disk, lengths 1 byte to 300,000 bytes (across page edges).
 */
export function randomOpsAgainstReference(store: PageStore, ref: Buffer, ops: number, rnd: (n: number) => number): void {
  const disk = ref.length;
  const src = Buffer.alloc(300_000);
  for (let op = 0; op < ops; op++) {
    const pos = rnd(disk - 1);
    const len = 1 + rnd(Math.min(disk - pos, [600, 5000, 70000, 300000][rnd(4)]));
    const kind = rnd(10);
    if (kind < 5) {
      for (let i = 0; i < len; i++) src[i] = rnd(256);
      expect(store.write(pos, src, 0, len)).toBe(0);
      src.copy(ref, pos, 0, len);
    } else if (kind < 7) {
      store.discard(pos, len);
      ref.fill(0, pos, pos + len);
    } else {
      const out = Buffer.alloc(len, 0xee);
      store.read(pos, out, 0, len);
      expect(out.equals(ref.subarray(pos, pos + len))).toBe(true);
    }
  }
}
