/**
 * PRP descriptions of guest chains (drivers/nvme/prp.ts): one command per PRP-compatible run,
 * cuts at unaligned junctions and at the transfer limit on block boundaries, list entries page
 * aligned, and refusal when no whole block can be described.
 */
import { PRP_PAGE, PrpBuilder } from '../../drivers/nvme/prp';

const CHUNK0 = 0x10_0000_0000; // chunk 0 at an IOVA above 4 GiB (64-bit list entries)

/** Segments [chunk 0, offset, length] from [offset, length] pairs. */
function segs(list: Array<[number, number]>): Uint32Array {
  const w = new Uint32Array(list.length * 4);
  list.forEach(([off, len], i) => w.set([0, off, len, 0], i * 4));
  return w;
}

interface Cmd {
  bytes: number;
  prp1: number;
  prp2: number;
  entries: number[];
}

/** Every command of a request of `total` bytes. */
function build(list: Array<[number, number]>, blockSize: number, maxBytes = 128 * 1024): Cmd[] | number {
  const s = segs(list);
  const total = list.reduce((n, [, l]) => n + l, 0);
  const p = new PrpBuilder(maxBytes);
  const page = new Uint32Array(PRP_PAGE / 4);
  const chunkIova = new Float64Array([CHUNK0]);
  const out: Cmd[] = [];
  let left = total;
  p.start();
  while (left > 0) {
    page.fill(0);
    const bytes = p.next(chunkIova, s, 0, list.length, left, blockSize, page, 0, 0xabc000);
    if (bytes <= 0) return bytes;
    const n = Math.ceil(((p.prp1 % PRP_PAGE) + bytes) / PRP_PAGE);
    const entries: number[] = [];
    for (let i = 0; i < n - 1; i++) entries.push(page[2 * i]! + page[2 * i + 1]! * 2 ** 32);
    out.push({ bytes, prp1: p.prp1, prp2: p.prp2, entries });
    left -= bytes;
  }
  return out;
}

test('a page-aligned contiguous chain is one command; entries 2..n in the list page', () => {
  const cmds = build([[0, 16384]], 512) as Cmd[];
  expect(cmds).toHaveLength(1);
  expect(cmds[0]).toMatchObject({ bytes: 16384, prp1: CHUNK0, prp2: 0xabc000 });
  expect(cmds[0]!.entries).toEqual([CHUNK0 + 4096, CHUNK0 + 8192, CHUNK0 + 12288]);
});

test('two pages: PRP2 is the second page itself, no list', () => {
  const cmds = build([[0x200, 4096]], 512) as Cmd[];
  expect(cmds).toEqual([expect.objectContaining({ bytes: 4096, prp1: CHUNK0 + 0x200, prp2: CHUNK0 + 4096 })]);
  expect(build([[0x200, 1024]], 512)).toEqual([expect.objectContaining({ bytes: 1024, prp1: CHUNK0 + 0x200, prp2: 0 })]);
});

test('page-aligned junctions join; an unaligned inner segment starts a new command', () => {
  // [0,4096) ends on a page, 8192 starts on one: joined. 20480+512 is not page aligned: cut.
  const cmds = build([[0, 4096], [8192, 4096], [20480 + 512, 1024]], 512) as Cmd[];
  expect(cmds.map((c) => c.bytes)).toEqual([8192, 1024]);
  expect(cmds[0]).toMatchObject({ prp1: CHUNK0, prp2: CHUNK0 + 8192 });
  expect(cmds[1]).toMatchObject({ prp1: CHUNK0 + 20480 + 512, prp2: 0 });
});

test('a segment ending inside a page ends its command; cuts fall on block boundaries', () => {
  // 4096-byte blocks: 6144 + 2048 bytes; the first command can only carry one whole block.
  const cmds = build([[0, 6144], [8192, 2048]], 4096);
  expect(cmds).toBe(0); // after the first block, a block straddles the unaligned junction
  const ok = build([[0, 4096], [8192 + 256, 8192]], 4096) as Cmd[];
  expect(ok.map((c) => c.bytes)).toEqual([4096, 8192]);
  expect(ok[1]!.prp1).toBe(CHUNK0 + 8192 + 256);
  expect(ok[1]!.entries).toEqual([CHUNK0 + 12288, CHUNK0 + 16384]);
});

test('the transfer limit cuts a long run; the remainder continues mid-segment', () => {
  const cmds = build([[0, 3 * 65536 + 4096]], 512, 65536) as Cmd[];
  expect(cmds.map((c) => c.bytes)).toEqual([65536, 65536, 65536, 4096]);
  expect(cmds.map((c) => c.prp1 - CHUNK0)).toEqual([0, 65536, 131072, 196608]);
  // Unaligned start: 16 pages touched + 1, all within one list page.
  const u = build([[0x400, 65536]], 512, 65536) as Cmd[];
  expect(u.map((c) => c.bytes)).toEqual([65536]);
  expect(u[0]!.entries).toHaveLength(16);
});

test('not dword aligned, or less than a block before an unaligned junction: refused (0)', () => {
  expect(build([[0x201, 512]], 512)).toBe(0);
  expect(build([[0, 256], [4096 + 4, 256]], 512)).toBe(0);
});

test('a chunk without an IOVA: -1', () => {
  const p = new PrpBuilder(65536);
  p.start();
  expect(p.next(new Float64Array([NaN]), segs([[0, 4096]]), 0, 1, 4096, 512, new Uint32Array(1024), 0, 0)).toBe(-1);
});

test('the transfer limit must be whole pages within one list page', () => {
  expect(() => new PrpBuilder(1000)).toThrow(RangeError);
  expect(() => new PrpBuilder(513 * 4096)).toThrow(RangeError);
});
