/** Bandwidth throttling (null_blk mbps): the virtual clock, and the rate a front-end observes. */
import { Throttle } from '../../drivers/null/throttle';
import { native } from '../../native';
import { startBackend, TestBackend } from '../helpers/backend';
import { TestFrontend } from '../helpers/frontend';
import { GuestRam } from '../helpers/guest-ram';

test('Throttle: back-to-back reservations advance by bytes / rate; idle time gives at most the burst', () => {
  const t = new Throttle(1, 1_000_000); // 1 MiB/s: 1 MiB takes 1 s
  expect(t.reserve(10e9, 1048576)).toBeCloseTo(10e9 - 1e6 + 1e9, -2); // burst of 1 ms credited
  expect(t.reserve(10e9, 524288)).toBeCloseTo(10e9 - 1e6 + 1.5e9, -2); // queued behind the first
  expect(t.reserve(20e9, 0)).toBeCloseTo(20e9 - 1e6, -2); // long idle: only the burst is credited
  expect(() => new Throttle(0)).toThrow(/positive/);
});

describe.each([0, 1, 2])('through a back-end, irqmode %i', (irqmode) => {
  let be: TestBackend;
  let fe: TestFrontend;
  afterEach(async () => {
    fe.close();
    await be.close();
  });

  test('4 MiB of 128 KiB writes at 20 MiB/s take about 200 ms more than unthrottled, and read back', async () => {
    const data = Buffer.alloc(131072, 0x6b);
    /** ms for 32 sequential 128 KiB writes through a fresh back-end with `mbps`. */
    const writeAll = async (mbps: number): Promise<number> => {
      be = startBackend({ mbps, irqmode, ...(irqmode === 2 ? { completion_nsec: 50000 } : {}) });
      fe = new TestFrontend(be.socket, new GuestRam([{ gpa: 0, size: 16 << 20, uaddr: 0x7f0000000000 }]));
      await fe.setup();
      const t0 = native.monotonicNs();
      for (let i = 0; i < 32; i++) expect((await fe.blk(0, 1, 256 * i, { data })).status).toBe(0);
      return (native.monotonicNs() - t0) / 1e6;
    };
    // The same writes unthrottled first: what this machine's load adds to both runs.
    const unthrottled = await writeAll(0);
    fe.close();
    await be.close();
    const ms = await writeAll(20);
    expect(ms).toBeGreaterThan(180); // 4 MiB / 20 MiB/s = 200 ms, less the 1 ms burst
    expect(ms - unthrottled).toBeLessThan(400); // the throttle adds about 200 ms, not twice that
    expect((await fe.blk(0, 0, 256 * 31, { readLen: 131072 })).data!.equals(data)).toBe(true);
  });
});
