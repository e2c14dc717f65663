/**
 * End-to-end tests of rnull's null_blk features, seen from a real Linux
 * guest (QEMU, TCG) over vhost-user-blk:
 *
 *  1. Completion modes: one daemon (config file) serves four disks with
 *     irqmode 0 (none), 1 (softirq) and 2 (timer, completion_nsec 50 us and
 *     1 ms); one guest runs fio random write + crc32c verify on each, then a
 *     queue-depth-1 latency probe on each. In timer mode no request may
 *     complete before completion_nsec, and the timer must add about
 *     completion_nsec to the fastest request.
 *  2. Discard and write zeroes: a `--discard true` disk (discard of unaligned
 *     ranges, `blkdiscard -z`, `fallocate -p` = write zeroes with unmap and no
 *     fallback, ext4 + fstrim, a whole-disk discard larger than
 *     max_discard_sectors) and a `--discard false` disk (no limits, discard
 *     refused, data untouched), in one guest.
 *  3. Multiple disks: one daemon (config file), two disks with different
 *     sizes, block sizes and queue counts in one guest; writes stay on
 *     their own disk.
 *  4. Threads: two disks with num_queues 2, one on 1 thread and one on 2
 *     (queue 1 on a worker thread), in a 2-vCPU guest: fio writes from both
 *     CPUs at once and verifies each region from the other CPU (the other
 *     queue); two writers on different CPUs overwrite the same blocks and
 *     every block holds one of their patterns afterwards.
 * Each daemon must exit 0 on SIGTERM and remove its sockets.
 *
 * Disks are found in the guest by their serial (/sys/block/vdX/serial, the
 * GET_ID answer), not by their vdX name.
 *
 * The back-end is `node dist/daemon/main.js` (`npm run build` first);
 * RNULL_E2E_DAEMON points elsewhere (e.g. a copy of dist/ made while a
 * rebuild runs). The figures of scenario 1 are printed and written to
 * test/e2e/.last-modes.json.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Daemon, DAEMON_MAIN, E2eRun, expectRefused, MIB, TEST_TIMEOUT_MS } from '../guest/daemon';
import { fioSummary, round, type FioPhase, type FioSummary } from '../guest/fio';
import { DEFAULT_PROGRAMS } from '../guest/initramfs';
import { count, DISK_HELPERS, value, type GuestReport, type VhostUserBlkDisk } from '../guest/qemu';

const MODES_RESULTS_FILE = path.join(__dirname, '.last-modes.json');

/**
 * util-linux tools added to the guest image. Busybox has blkdiscard, fstrim
 * and fallocate applets, but without -z / -p, and its sh runs its own applets
 * before anything on PATH: guest scripts call these by their full path.
 */
const BLKDISCARD = '/usr/sbin/blkdiscard';
const FSTRIM = '/usr/sbin/fstrim';
const FALLOCATE = '/usr/bin/fallocate';
const EXTRA_PROGRAMS = [BLKDISCARD, FSTRIM, FALLOCATE];

const run = new E2eRun('rnull-e2e-features-');

/**
 * Boots one guest with `disks` attached in order (GUEST_HELPERS before the
 * script) and returns its report; the daemons must log no warning or error.
 */
function bootGuest(label: string, daemons: Daemon[], disks: VhostUserBlkDisk[], script: string, cpus = 1): Promise<GuestReport> {
  return run.boot(label, daemons, disks, GUEST_HELPERS + script, { cpus });
}

/** One rnull disk from the command line, on NAME.sock in the run directory. */
function startCli(name: string, flags: Record<string, string | number | boolean>): Promise<Daemon> {
  return Daemon.startCli(name, flags, run.dir);
}

/** Fields of /sys/block/X/stat (Documentation/block/stat.rst) used here. */
interface BlockStat {
  writeIos: number;
  writeSectors: number;
  discardIos: number;
  discardSectors: number;
}

function blockStat(report: GuestReport, name: string): BlockStat {
  const f = value(report, name).trim().split(/\s+/).map(Number);
  if (f.length < 15 || f.some((x) => !Number.isSafeInteger(x))) throw new Error(`bad block stat ${name}: ${value(report, name)}`);
  return { writeIos: f[4]!, writeSectors: f[6]!, discardIos: f[11]!, discardSectors: f[13]! };
}

function statDelta(report: GuestReport, before: string, after: string): BlockStat {
  const a = blockStat(report, before);
  const b = blockStat(report, after);
  return {
    writeIos: b.writeIos - a.writeIos,
    writeSectors: b.writeSectors - a.writeSectors,
    discardIos: b.discardIos - a.discardIos,
    discardSectors: b.discardSectors - a.discardSectors,
  };
}

// ---------------------------------------------------------------------------
// Guest script helpers (busybox sh; `val` and `block` come from the harness prelude)
// ---------------------------------------------------------------------------

/**
 * DISK_HELPERS (dev_by_serial, check, nonzero, fresh: see qemu.ts), and
 *  geometry PREFIX DEV  reports PREFIX_size (512-byte sectors), _lbs, _pbs,
 *                       _hw_queues, _discard_max, _discard_gran, _wz_max
 *  bstat NAME DEV       reports /sys/block/DEV/stat as NAME
 */
const GUEST_HELPERS = `${DISK_HELPERS}
M=${MIB}
geometry() {
  q=/sys/block/\${2##*/}
  val "$1_size" "$(cat $q/size)"
  val "$1_lbs" "$(cat $q/queue/logical_block_size)"
  val "$1_pbs" "$(cat $q/queue/physical_block_size)"
  val "$1_hw_queues" "$(ls $q/mq | wc -l)"
  val "$1_discard_max" "$(cat $q/queue/discard_max_bytes)"
  val "$1_discard_gran" "$(cat $q/queue/discard_granularity)"
  val "$1_wz_max" "$(cat $q/queue/write_zeroes_max_bytes)"
}
bstat() { val "$1" "$(cat /sys/block/\${2##*/}/stat)"; }
`;

// ---------------------------------------------------------------------------
// fio results
// ---------------------------------------------------------------------------

function describePhase(dir: string, p: FioPhase): string {
  return `${dir}: ${p.iops} IOPS, ${p.bwMiBps} MiB/s, clat min ${p.clatMinUs} / mean ${p.clatMeanUs} / p50 ${p.clatP50Us} / p99 ${p.clatP99Us} us (${p.ios} IOs)`;
}

// ---------------------------------------------------------------------------
// Setup and teardown
// ---------------------------------------------------------------------------

beforeAll(() => run.setup({ programs: [...DEFAULT_PROGRAMS, ...EXTRA_PROGRAMS] }), 180_000);

afterAll(() => run.finish(), 60_000);

// ---------------------------------------------------------------------------
// 1. Completion modes
// ---------------------------------------------------------------------------

describe('completion modes (irqmode 0, 1, 2) under fio verify', () => {
  /**
   * The disks, one per mode, named by their serial. Timer mode twice: the
   * 50 us of the brief, and 1 ms. Under TCG a request's fastest round trip
   * is ~140-250 us and timer mode itself costs ~50 us more (timerfd wake-up,
   * timer slack), so 50 us barely tells a timer that waits from one that
   * does not (measured: +80-90 us with 50 us, +45-55 us with a daemon
   * patched to wait 50 ns); 1 ms does (+1090 us; the patched daemon +54 us).
   */
  const DISKS = [
    { serial: 'irq0', irqmode: 0 },
    { serial: 'irq1', irqmode: 1 },
    { serial: 'irq2', irqmode: 2, completionNsec: 50_000 },
    { serial: 'irq2-1ms', irqmode: 2, completionNsec: 1_000_000 },
  ] as const;
  type ModeDisk = (typeof DISKS)[number];
  const FIO_MIB = 32;
  const PROBE_IOS = 1000;
  const PROBE_ROUNDS = 2;
  let daemon: Daemon;

  beforeAll(run.counted(async () => {
    daemon = await Daemon.startConfig('modes', DISKS.map((d) => ({
      socket: `${d.serial}.sock`,
      size: 64,
      blocksize: 512,
      memory_backed: true,
      num_queues: 1,
      serial: d.serial,
      irqmode: d.irqmode,
      ...('completionNsec' in d ? { completion_nsec: d.completionNsec } : {}),
    })), run.dir);
  }), 60_000);

  /**
   * Per disk: random 4k writes over 32 MiB at queue depth 16, every block
   * read back and checked (crc32c). Then rounds of a queue-depth-1 latency
   * probe (synchronous 4k random reads), the disks interleaved so that host
   * load hits them alike.
   */
  const serials = DISKS.map((d) => d.serial).join(' ');
  const script = `
for s in ${serials}; do
  D=$(dev_by_serial $s)
  val dev_$s $D
  geometry $s $D
  fio --name=verify-$s --filename=$D --rw=randwrite --bs=4k --size=${FIO_MIB}M \\
      --ioengine=libaio --iodepth=16 --direct=1 \\
      --verify=crc32c --do_verify=1 --verify_fatal=1 \\
      --group_reporting --eta=never --output-format=json --output=/tmp/fio.json
  block fio-$s /tmp/fio.json
done
for r in $(seq ${PROBE_ROUNDS}); do
  for s in ${serials}; do
    D=$(dev_by_serial $s)
    fio --name=probe-$s --filename=$D --rw=randread --bs=4k --size=${FIO_MIB}M --number_ios=${PROBE_IOS} \\
        --ioengine=psync --direct=1 --eta=never --output-format=json --output=/tmp/probe.json
    block probe-$s-r$r /tmp/probe.json
  done
done
`;

  const title = (d: ModeDisk): string =>
    `irqmode ${d.irqmode}${'completionNsec' in d ? `, completion_nsec ${d.completionNsec}` : ''}`;

  test('fio verify passes in every mode; the timer never completes early', run.counted(async () => {
    const report = await run.timed(`1: completion modes (one guest, ${DISKS.length} disks)`, () =>
      bootGuest('modes', [daemon], DISKS.map((_, i) => daemon.disk(i)), script));

    const results: Record<string, { irqmode: number; completionNsec: number | null; verify: FioSummary; probe: FioSummary[] }> = {};
    const lines: string[] = [];
    for (const d of DISKS) {
      expect(count(report, `${d.serial}_size`)).toBe(64 * 2048);
      const verify = fioSummary(report, `fio-${d.serial}`);
      const probe = Array.from({ length: PROBE_ROUNDS }, (_, r) => fioSummary(report, `probe-${d.serial}-r${r + 1}`));
      results[d.serial] = { irqmode: d.irqmode, completionNsec: 'completionNsec' in d ? d.completionNsec : null, verify, probe };
      lines.push(
        `${title(d)} (${value(report, `dev_${d.serial}`)})`,
        `  ${describePhase('randwrite qd16', verify.write)}`,
        `  ${describePhase('verify reads qd16', verify.read)}`,
        ...probe.map((p, r) => `  ${describePhase(`probe qd1 #${r + 1}`, p.read)}`),
      );
    }
    const fastest = (serial: string): number => Math.min(...results[serial]!.probe.map((p) => p.read.clatMinUs));
    const timerLines = DISKS.filter((d) => 'completionNsec' in d).map((d) =>
      `${title(d)}: fastest qd1 request ${fastest(d.serial)} us vs ${fastest('irq0')} us in irqmode 0 ` +
        `(+${round(fastest(d.serial) - fastest('irq0'))} us)`);
    console.log(`fio per completion mode\n${lines.join('\n')}\n${timerLines.join('\n')}`);
    fs.writeFileSync(
      MODES_RESULTS_FILE,
      `${JSON.stringify({ date: new Date().toISOString(), kernel: run.kernelVersion, daemon: DAEMON_MAIN, results }, null, 2)}\n`,
    );

    for (const d of DISKS) {
      const { verify, probe } = results[d.serial]!;
      expect({ disk: d.serial, error: verify.error, written: verify.write.ioMiB, verified: verify.read.ioMiB }).toEqual({
        disk: d.serial, error: 0, written: FIO_MIB, verified: FIO_MIB, // every written block was read back and matched
      });
      for (const p of probe) expect({ disk: d.serial, error: p.error, ios: p.read.ios }).toEqual({ disk: d.serial, error: 0, ios: PROBE_IOS });
    }

    for (const d of DISKS) {
      if (!('completionNsec' in d)) continue;
      const completionUs = d.completionNsec / 1000;
      // A request ends completion_nsec after it starts: no request, and so
      // no mean, may complete faster than that (fio's clat).
      const { verify, probe } = results[d.serial]!;
      for (const p of [verify.write, verify.read, ...probe.map((x) => x.read)]) {
        expect({ disk: d.serial, meanAtLeastCompletion: p.clatMeanUs >= completionUs, minAtLeastCompletion: p.clatMinUs >= completionUs })
          .toEqual({ disk: d.serial, meanAtLeastCompletion: true, minAtLeastCompletion: true });
      }
      // Not milliseconds late either (a unit mix-up would be).
      expect(fastest(d.serial) - fastest('irq0')).toBeLessThan(completionUs + 2000);
    }
    // How much the timer adds is visible from the guest only when it is well
    // above the guest's own noise: in this TCG guest the submitting vCPU
    // still runs its side of a request (~150-250 us) after the kick, and a
    // short timer runs out inside that time (CI once saw the fastest 50 us
    // request only 2.8 us slower than the fastest irqmode-0 one, another run
    // +86.9 us). The 50 us timer's accuracy is test 57's (a polling client
    // on the host, where microseconds show); here 1 ms must show, at least
    // half of it above irqmode 0's fastest request (+976 to +1038 us seen).
    expect(fastest('irq2-1ms') - fastest('irq0')).toBeGreaterThanOrEqual(500);
  }), TEST_TIMEOUT_MS);

  test('completion_nsec is refused outside timer mode', run.counted(async () => {
    const output = await expectRefused(run.dir, ['--size', '16', '--irqmode', '1', '--completion-nsec', '50000']);
    expect(output).toMatch(/completion_nsec/);
  }), 30_000);

  test('SIGTERM stops the daemon and removes all its sockets', run.counted(() => daemon.stopAndCheck()), 30_000);
});

// ---------------------------------------------------------------------------
// 2. Discard and write zeroes
// ---------------------------------------------------------------------------

describe('discard and write zeroes', () => {
  /** Larger than max_discard_sectors (128 MiB), so a whole-disk discard takes two requests. */
  const ON_MIB = 160;
  const OFF_MIB = 64;
  let on: Daemon;
  let off: Daemon;

  beforeAll(run.counted(async () => {
    on = await startCli('discard-on', {
      size: ON_MIB, blocksize: 512, 'memory-backed': true, 'num-queues': 1, discard: true, serial: 'discard-on',
    });
    off = await startCli('discard-off', {
      size: OFF_MIB, blocksize: 4096, 'memory-backed': true, 'num-queues': 1, discard: false, serial: 'discard-off',
    });
  }), 60_000);

  /** Ranges in bytes; all multiples of 512 but not of 4096, so partial pages of the store are hit. */
  const DISCARD = { region: 16 * MIB, off: 17 * MIB + 1536, len: 2 * MIB + 2560 };
  const ZEROOUT = { region: 32 * MIB, off: 33 * MIB + 512, len: MIB + 1024 };
  const PUNCH = { region: 48 * MIB, off: 49 * MIB + 2048, len: 3 * MIB + 512 };
  const REGION = 8 * MIB;
  const EXT4_KEEP_MIB = 8;
  const EXT4_BIG_MIB = 48;

  /**
   * For an operation on [off, off+len) inside an 8 MiB region filled with
   * random data: write the region, run the operation, read the region back
   * (O_DIRECT) and check the three parts: before (pattern), inside (zeroes),
   * after (pattern). Block stats around the operation.
   */
  const rangeOp = (name: string, r: { region: number; off: number; len: number }, command: string): string => {
    const head = r.off - r.region;
    const end = head + r.len;
    return `
dd if=/tmp/pat of=$D bs=1M seek=${r.region / MIB} oflag=direct conv=fsync 2>/dev/null
bstat ${name}_stat_before $D
${command}
bstat ${name}_stat_after $D
dd if=$D of=/tmp/rb bs=1M skip=${r.region / MIB} count=${REGION / MIB} iflag=direct 2>/dev/null
check ${name}_head /tmp/rb 0 /tmp/pat 0 ${head}
check ${name}_range /tmp/rb ${head} /dev/zero 0 ${r.len}
check ${name}_tail /tmp/rb ${end} /tmp/pat ${end} ${REGION - end}
`;
  };

  const script = `
D=$(dev_by_serial discard-on)
N=$(dev_by_serial discard-off)
geometry on $D
geometry off $N
dd if=/dev/urandom of=/tmp/pat bs=1M count=${REGION / MIB} 2>/dev/null
val pat_nonzero "$(nonzero /tmp/pat)"

# --- discard-on: discard, write zeroes (BLKZEROOUT), write zeroes with unmap and no fallback
${rangeOp('discard', DISCARD, `${BLKDISCARD} -o ${DISCARD.off} -l ${DISCARD.len} $D`)}
${rangeOp('zeroout', ZEROOUT, `${BLKDISCARD} -z -o ${ZEROOUT.off} -l ${ZEROOUT.len} $D`)}
${rangeOp('punch', PUNCH, `${FALLOCATE} -p -o ${PUNCH.off} -l ${PUNCH.len} $D`)}
dd if=$D of=/tmp/rb bs=1M count=16 iflag=direct 2>/dev/null
check never_written /tmp/rb 0 /dev/zero 0 ${16 * MIB}

# --- discard-on: ext4, a deleted file, fstrim
mkfs.ext4 -F -q $D
mount -t ext4 $D /mnt
dd if=/dev/urandom of=/mnt/keep bs=1M count=${EXT4_KEEP_MIB} 2>/dev/null
dd if=/dev/urandom of=/mnt/big bs=1M count=${EXT4_BIG_MIB} 2>/dev/null
sync
(cd /mnt && sha256sum keep) > /tmp/keep.sum
rm /mnt/big
sync
umount /mnt
fresh
val fs_nonzero_before "$(nonzero $D)"
mount -t ext4 $D /mnt
bstat fstrim_stat_before $D
val fstrim "$(${FSTRIM} -v /mnt)"
bstat fstrim_stat_after $D
umount /mnt
fresh
val fs_nonzero_after "$(nonzero $D)"
mount -t ext4 -o ro $D /mnt
if (cd /mnt && sha256sum -c /tmp/keep.sum >/dev/null 2>&1); then val keep intact; else val keep damaged; fi
umount /mnt

# --- discard-on: the whole disk, more than one request's worth
bstat whole_stat_before $D
${BLKDISCARD} $D
bstat whole_stat_after $D
val whole_nonzero "$(nonzero $D)"

# --- discard-off: nothing offered, the kernel refuses, the data stays
dd if=/tmp/pat of=$N bs=1M count=${REGION / MIB} oflag=direct conv=fsync 2>/dev/null
if out=$(${BLKDISCARD} -o 0 -l ${MIB} $N 2>&1); then val off_blkdiscard "succeeded: $out"; else val off_blkdiscard "failed: $out"; fi
if out=$(${FALLOCATE} -p -o 0 -l ${MIB} $N 2>&1); then val off_punch "succeeded: $out"; else val off_punch "failed: $out"; fi
dd if=$N of=/tmp/rb bs=1M count=${REGION / MIB} iflag=direct 2>/dev/null
check off_data /tmp/rb 0 /tmp/pat 0 ${REGION}
`;

  test('discard, write zeroes and fstrim on --discard true; refused on --discard false', run.counted(async () => {
    const report = await run.timed('2: discard (one guest, 2 daemons)', () =>
      bootGuest('discard', [on, off], [on.disk(0), off.disk(0)], script));

    // Limits in the config space, as the guest's block layer took them.
    expect({
      size: count(report, 'on_size'), lbs: count(report, 'on_lbs'), gran: count(report, 'on_discard_gran'),
    }).toEqual({ size: ON_MIB * 2048, lbs: 512, gran: 512 });
    expect(count(report, 'on_discard_max')).toBeGreaterThan(0);
    expect(count(report, 'on_wz_max')).toBeGreaterThan(0);
    expect({
      size: count(report, 'off_size'), lbs: count(report, 'off_lbs'),
      discardMax: count(report, 'off_discard_max'), wzMax: count(report, 'off_wz_max'),
    }).toEqual({ size: OFF_MIB * 2048, lbs: 4096, discardMax: 0, wzMax: 0 });
    // The pattern itself is not zeroes where it matters (else the checks below prove nothing).
    const patNonzero = count(report, 'pat_nonzero');
    expect(patNonzero).toBeGreaterThan(REGION * 0.99);

    // Discard of an unaligned range: one DISCARD request of exactly that
    // range; the range reads as zeroes, its neighbours (same pages) keep the data.
    for (const op of ['discard', 'zeroout', 'punch']) {
      expect({ op, head: value(report, `${op}_head`), range: value(report, `${op}_range`), tail: value(report, `${op}_tail`) })
        .toEqual({ op, head: 'same', range: 'same', tail: 'same' });
    }
    expect(statDelta(report, 'discard_stat_before', 'discard_stat_after')).toMatchObject({
      discardIos: 1, discardSectors: DISCARD.len / 512, writeIos: 0,
    });
    // Write zeroes count as writes (of the whole range) in the block stats, not as discards.
    for (const [op, r] of [['zeroout', ZEROOUT], ['punch', PUNCH]] as const) {
      const d = statDelta(report, `${op}_stat_before`, `${op}_stat_after`);
      expect({ op, discardIos: d.discardIos, writeSectors: d.writeSectors }).toEqual({ op, discardIos: 0, writeSectors: r.len / 512 });
    }
    expect(value(report, 'never_written')).toBe('same');

    // fstrim: trims at least the deleted file; the data of the deleted file is gone
    // from the disk (every byte that was not zero before is zero now), the kept file is intact.
    const fstrim = value(report, 'fstrim');
    const trimmed = Number(/\((\d+) bytes\) trimmed/.exec(fstrim)?.[1] ?? NaN);
    const fsNonzeroBefore = count(report, 'fs_nonzero_before');
    const fsNonzeroAfter = count(report, 'fs_nonzero_after');
    console.log(
      `discard: fstrim "${fstrim}"; non-zero bytes on the disk ${fsNonzeroBefore} before, ${fsNonzeroAfter} after ` +
        `(deleted file ${EXT4_BIG_MIB} MiB); fstrim stats ${JSON.stringify(statDelta(report, 'fstrim_stat_before', 'fstrim_stat_after'))}`,
    );
    expect(trimmed).toBeGreaterThanOrEqual(EXT4_BIG_MIB * MIB);
    expect(statDelta(report, 'fstrim_stat_before', 'fstrim_stat_after').discardSectors).toBe(trimmed / 512);
    expect(fsNonzeroBefore - fsNonzeroAfter).toBeGreaterThanOrEqual(EXT4_BIG_MIB * MIB * 0.99);
    expect(fsNonzeroAfter).toBeGreaterThanOrEqual(EXT4_KEEP_MIB * MIB * 0.99);
    expect(value(report, 'keep')).toBe('intact');

    // The whole disk: split by the guest into max_discard_sectors pieces, all zeroes afterwards.
    const whole = statDelta(report, 'whole_stat_before', 'whole_stat_after');
    const maxDiscard = count(report, 'on_discard_max');
    expect(whole.discardSectors).toBe(ON_MIB * 2048);
    expect(whole.discardIos).toBeGreaterThanOrEqual(Math.ceil((ON_MIB * MIB) / maxDiscard));
    expect(count(report, 'whole_nonzero')).toBe(0);

    // --discard false.
    expect(value(report, 'off_blkdiscard')).toMatch(/^failed: .*Operation not supported/);
    // (util-linux words EOPNOTSUPP for fallocate as "keep size mode is unsupported")
    expect(value(report, 'off_punch')).toMatch(/^failed: .*(Operation not supported|unsupported)/);
    expect(value(report, 'off_data')).toBe('same');
  }), TEST_TIMEOUT_MS);

  test('--discard true is refused without memory backing', run.counted(async () => {
    const output = await expectRefused(run.dir, ['--size', '16', '--memory-backed', 'false', '--discard', 'true']);
    expect(output).toMatch(/memory_backed/);
  }), 30_000);

  test('SIGTERM stops both daemons and removes their sockets', run.counted(async () => {
    await on.stopAndCheck();
    await off.stopAndCheck();
  }), 60_000);
});

// ---------------------------------------------------------------------------
// 3. Multiple disks in one daemon
// ---------------------------------------------------------------------------

describe('multiple disks from one config file', () => {
  const A = { serial: 'multi-a', size: 48, blocksize: 512, queues: 1 } as const;
  const B = { serial: 'multi-b', size: 80, blocksize: 4096, queues: 2 } as const;
  let daemon: Daemon;

  beforeAll(run.counted(async () => {
    daemon = await Daemon.startConfig('multi', [A, B].map((d) => ({
      socket: `${d.serial}.sock`, size: d.size, blocksize: d.blocksize, memory_backed: true, num_queues: d.queues, serial: d.serial,
    })), run.dir);
  }), 60_000);

  /**
   * Patterns pa/pb (1 MiB each, different): pa at 4 MiB of A; B reads
   * zeroes there. pb at 4 MiB of B; A still reads pa. pa2/pb2 in the last
   * MiB of each disk. Finally each disk holds exactly its own patterns'
   * non-zero bytes and nothing else.
   */
  const script = `
A=$(dev_by_serial ${A.serial})
B=$(dev_by_serial ${B.serial})
geometry a $A
geometry b $B
for p in pa pb pa2 pb2; do dd if=/dev/urandom of=/tmp/$p bs=1M count=1 2>/dev/null; done
check patterns_differ /tmp/pa 0 /tmp/pb 0 ${MIB}
dd if=/tmp/pa of=$A bs=1M seek=4 oflag=direct conv=fsync 2>/dev/null
dd if=$B of=/tmp/rb bs=1M skip=4 count=1 iflag=direct 2>/dev/null
check b_after_a /tmp/rb 0 /dev/zero 0 ${MIB}
dd if=/tmp/pb of=$B bs=1M seek=4 oflag=direct conv=fsync 2>/dev/null
dd if=/tmp/pa2 of=$A bs=1M seek=${A.size - 1} oflag=direct conv=fsync 2>/dev/null
dd if=/tmp/pb2 of=$B bs=1M seek=${B.size - 1} oflag=direct conv=fsync 2>/dev/null
fresh
dd if=$A of=/tmp/rb bs=1M skip=4 count=1 iflag=direct 2>/dev/null
check a_data /tmp/rb 0 /tmp/pa 0 ${MIB}
dd if=$B of=/tmp/rb bs=1M skip=4 count=1 iflag=direct 2>/dev/null
check b_data /tmp/rb 0 /tmp/pb 0 ${MIB}
dd if=$A of=/tmp/rb bs=1M skip=${A.size - 1} count=1 iflag=direct 2>/dev/null
check a_last /tmp/rb 0 /tmp/pa2 0 ${MIB}
dd if=$B of=/tmp/rb bs=1M skip=${B.size - 1} count=1 iflag=direct 2>/dev/null
check b_last /tmp/rb 0 /tmp/pb2 0 ${MIB}
val a_expected_nonzero $(( $(nonzero /tmp/pa) + $(nonzero /tmp/pa2) ))
val b_expected_nonzero $(( $(nonzero /tmp/pb) + $(nonzero /tmp/pb2) ))
val a_nonzero "$(nonzero $A)"
val b_nonzero "$(nonzero $B)"
`;

  test('sizes, block sizes and queues as configured; data stays on its disk', run.counted(async () => {
    const report = await run.timed('3: two disks (one guest, 2 vCPUs)', () =>
      bootGuest('multi', [daemon], [daemon.disk(0, A.queues), daemon.disk(1, B.queues)], script, 2));

    for (const [p, d] of [['a', A], ['b', B]] as const) {
      expect({
        disk: d.serial, size: count(report, `${p}_size`), lbs: count(report, `${p}_lbs`), hwQueues: count(report, `${p}_hw_queues`),
        discardMax: count(report, `${p}_discard_max`),
      }).toEqual({ disk: d.serial, size: d.size * 2048, lbs: d.blocksize, hwQueues: d.queues, discardMax: 0 });
    }
    expect(value(report, 'patterns_differ')).toMatch(/^differs/);
    expect({
      bAfterA: value(report, 'b_after_a'), aData: value(report, 'a_data'), bData: value(report, 'b_data'),
      aLast: value(report, 'a_last'), bLast: value(report, 'b_last'),
    }).toEqual({ bAfterA: 'same', aData: 'same', bData: 'same', aLast: 'same', bLast: 'same' });
    expect(count(report, 'a_nonzero')).toBe(count(report, 'a_expected_nonzero'));
    expect(count(report, 'b_nonzero')).toBe(count(report, 'b_expected_nonzero'));
  }), TEST_TIMEOUT_MS);

  test('SIGTERM stops the daemon and removes both sockets', run.counted(() => daemon.stopAndCheck()), 30_000);
});

// ---------------------------------------------------------------------------
// 4. Threads
// ---------------------------------------------------------------------------

describe('1 and 2 threads with num-queues=2', () => {
  const DISKS = [
    { serial: 'thr1', threads: 1 },
    { serial: 'thr2', threads: 2 },
  ] as const;
  const REGION_MIB = 16;
  const OVERLAP_MIB = 8;
  let daemon: Daemon;

  beforeAll(run.counted(async () => {
    daemon = await Daemon.startConfig('threads', DISKS.map((d) => ({
      socket: `${d.serial}.sock`, size: 64, blocksize: 512, memory_backed: true, num_queues: 2, threads: d.threads, serial: d.serial,
    })), run.dir, { management: true });
  }), 60_000);

  /** fio over region $r of $D (shell variables), job name region-SERIAL-$r. */
  const fioRegion = (s: string): string =>
    `fio --name=region-${s}-$r --filename=$D --offset=$(($r * ${REGION_MIB}))M --size=${REGION_MIB}M --rw=randwrite --bs=4k ` +
    '--ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c --verify_fatal=1 --eta=never --output-format=json';

  /**
   * Per disk, with hctx i on CPU i: (a) two fio jobs at once, the one on
   * CPU r writing region r (16 MiB at 16 MiB * r, random 4k, crc32c verify
   * headers); (b) two fio verify-only passes at once, region r read back
   * from CPU 1 - r, i.e. through the other hardware queue; (c) two writers
   * at once on CPUs 0 and 1 filling the same 8 MiB with 0xaa and 0x55
   * (same random order: they race for the same blocks); the region must
   * then hold nothing but those two bytes (a lost page would read zeroes).
   */
  const script = DISKS.map(({ serial: s }) => `
D=$(dev_by_serial ${s})
geometry ${s} $D
val ${s}_cpus_hctx0 "$(cat /sys/block/\${D##*/}/mq/0/cpu_list)"
val ${s}_cpus_hctx1 "$(cat /sys/block/\${D##*/}/mq/1/cpu_list)"
for r in 0 1; do
  ${fioRegion(s)} --do_verify=0 --cpus_allowed=$r --output=/tmp/w-$r.json &
done
wait
for r in 0 1; do
  ${fioRegion(s)} --verify_only --cpus_allowed=$((1 - $r)) --output=/tmp/v-$r.json &
done
wait
for r in 0 1; do block ${s}-write-$r /tmp/w-$r.json; block ${s}-verify-$r /tmp/v-$r.json; done
fio --name=same-a --filename=$D --offset=${2 * REGION_MIB}M --size=${OVERLAP_MIB}M --rw=randwrite --bs=4k --ioengine=libaio --iodepth=16 \\
    --direct=1 --buffer_pattern=0xaa --cpus_allowed=0 --eta=never --output-format=json --output=/tmp/oa.json &
fio --name=same-b --filename=$D --offset=${2 * REGION_MIB}M --size=${OVERLAP_MIB}M --rw=randwrite --bs=4k --ioengine=libaio --iodepth=16 \\
    --direct=1 --buffer_pattern=0x55 --cpus_allowed=1 --eta=never --output-format=json --output=/tmp/ob.json &
wait
block ${s}-same-a /tmp/oa.json
block ${s}-same-b /tmp/ob.json
fresh
dd if=$D of=/tmp/same bs=1M skip=${2 * REGION_MIB} count=${OVERLAP_MIB} iflag=direct 2>/dev/null
val ${s}_same_bytes "$(wc -c < /tmp/same)"
val ${s}_same_other "$(tr -d '\\252\\125' < /tmp/same | wc -c)"
rm -f /tmp/same
`).join('');

  test('fio from both CPUs verifies through the other queue; racing writers leave only their patterns', run.counted(async () => {
    const report = await run.timed('4: threads 1 and 2 (one guest, 2 vCPUs)', () =>
      bootGuest('threads', [daemon], DISKS.map((_, i) => daemon.disk(i, 2)), script, 2));
    const lines: string[] = [];
    for (const d of DISKS) {
      const s = d.serial;
      expect({ disk: s, hwQueues: count(report, `${s}_hw_queues`), hctx0: value(report, `${s}_cpus_hctx0`), hctx1: value(report, `${s}_cpus_hctx1`) })
        .toEqual({ disk: s, hwQueues: 2, hctx0: '0', hctx1: '1' });
      for (const r of [0, 1]) {
        const w = fioSummary(report, `${s}-write-${r}`);
        const v = fioSummary(report, `${s}-verify-${r}`);
        lines.push(`threads ${d.threads}, region ${r}: ${describePhase(`randwrite qd16 on CPU ${r}`, w.write)}; ${describePhase(`verify on CPU ${1 - r}`, v.read)}`);
        // Every block written from CPU r read back from the other CPU and matched.
        expect({ disk: s, region: r, errors: [w.error, v.error], written: w.write.ioMiB, verified: v.read.ioMiB })
          .toEqual({ disk: s, region: r, errors: [0, 0], written: REGION_MIB, verified: REGION_MIB });
      }
      for (const w of ['a', 'b']) expect({ disk: s, writer: w, error: fioSummary(report, `${s}-same-${w}`).error }).toEqual({ disk: s, writer: w, error: 0 });
      expect({ disk: s, bytes: count(report, `${s}_same_bytes`), other: count(report, `${s}_same_other`) })
        .toEqual({ disk: s, bytes: OVERLAP_MIB * MIB, other: 0 });

      // Both hardware queues carried requests, on the threads the config gave them.
      const stats = await daemon.ctl('stats', s);
      const queues = stats.queues ?? [];
      lines.push(`threads ${d.threads}: ${queues.map((q) => `queue ${q.index} on thread ${String(q.thread)}: ${q.requests} requests`).join(', ')}`);
      expect(queues.map((q) => ({ index: q.index, thread: q.thread ?? 0, busy: q.requests > 1000, failed: q.failed_requests })))
        .toEqual([0, 1].map((i) => ({ index: i, thread: i % d.threads, busy: true, failed: 0 })));
    }
    console.log(`threads\n${lines.join('\n')}`);
  }), TEST_TIMEOUT_MS);

  test('SIGTERM stops the daemon and its worker threads and removes both sockets', run.counted(() => daemon.stopAndCheck()), 30_000);
});
