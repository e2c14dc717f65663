/**
 * End-to-end tests of rnull's fault and limit emulation, seen from a real
 * Linux guest (QEMU, TCG) over vhost-user-blk:
 *
 *  1. Bad blocks: a disk started with `--badblocks 20004-20035,30000`; single
 *     sector O_DIRECT reads and writes succeed right outside the ranges and
 *     fail with EIO inside; a sector-by-sector scan around each range finds
 *     exactly the configured sectors; a 4 KiB request that straddles a range's
 *     edge fails as a whole. Then, while the same guest runs, the host removes
 *     the first range and adds 40000-40015 with `rnull ctl badblocks`; the
 *     guest sees the new range fail and the old one succeed (and a write that
 *     failed stored nothing). A second disk with `--badblocks-once true`: the
 *     first read of a bad sector fails, the second succeeds. Every EIO the
 *     guest saw is one failed request in the daemon's stats, and the guest
 *     kernel logged I/O errors for those sectors only.
 *  2. Write cache: `--cache-size 16`: the guest sees "write back"; data
 *     written with a FLUSH after it (dd conv=fsync) survives a power failure
 *     (QEMU SIGKILLed, then `rnull ctl drop-cache`), data written without one
 *     does not (the old contents come back), as the daemon's dirty-byte count
 *     says. After the guest switches the device to "write through"
 *     (virtio_blk's cache_type), data written without any flush survives too,
 *     and so does data written back just before the switch.
 *  3. Bandwidth: fio sequential 128 KiB writes and reads on an `--mbps 8`
 *     disk stay under 8 MiB/s; the same jobs on an unthrottled disk in the
 *     same guest run several times faster.
 * Each daemon must exit 0 on SIGTERM and remove its sockets.
 *
 * The back-end is `node dist/daemon/main.js` (`npm run build` first);
 * RNULL_E2E_DAEMON points elsewhere. The figures are printed and written to
 * test/e2e/.last-faults.json.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Daemon, DAEMON_MAIN, E2eRun, MIB, TEST_TIMEOUT_MS, type CtlAnswer } from '../guest/daemon';
import { fioSummary, round, type FioPhase } from '../guest/fio';
import { DEFAULT_PROGRAMS } from '../guest/initramfs';
import { count, DISK_HELPERS, value, type GuestReport } from '../guest/qemu';

const FAULTS_RESULTS_FILE = path.join(__dirname, '.last-faults.json');
/** Capacity of every disk here (MiB): 131072 sectors, far beyond every bad range. */
const DISK_MIB = 64;

/**
 * GNU dd, added to the guest image and called by its full path (busybox sh
 * runs its own applets first). Not busybox dd: for a block size under a page
 * it allocates an unaligned buffer, gets EINVAL from O_DIRECT and silently
 * retries without O_DIRECT, so a 512-byte "direct" read becomes a buffered
 * read of the whole 4 KiB page (and a failed page read is retried once).
 */
const GNU_DD = '/usr/bin/dd';

const run = new E2eRun('rnull-e2e-faults-');
/** Figures for .last-faults.json, by scenario. */
const figures: Record<string, unknown> = {};

beforeAll(() => run.setup({ programs: [...DEFAULT_PROGRAMS, GNU_DD] }), 180_000);

afterAll(async () => {
  await run.finish();
  if (Object.keys(figures).length > 0) {
    const record = { date: new Date().toISOString(), kernel: run.kernelVersion, daemon: DAEMON_MAIN, ...figures };
    fs.writeFileSync(FAULTS_RESULTS_FILE, `${JSON.stringify(record, null, 2)}\n`);
  }
}, 60_000);

/** A 512-byte-sector disk of DISK_MIB, memory-backed, its serial = its name, with the management API. */
function startDisk(name: string, flags: Record<string, string | number | boolean> = {}): Promise<Daemon> {
  return Daemon.startCli(
    name,
    { size: DISK_MIB, blocksize: 512, 'memory-backed': true, 'num-queues': 1, serial: name, ...flags },
    run.dir,
    { management: true },
  );
}

/** The sum of a per-queue counter in `rnull ctl stats`. */
function queueSum(stats: CtlAnswer, key: 'requests' | 'failed_requests'): number {
  if (stats.queues === undefined) throw new Error(`no queues in ${JSON.stringify(stats)}`);
  return stats.queues.reduce((sum, q) => sum + q[key], 0);
}

/**
 * A watch (see GuestRunOptions.watch) that runs `action` once, as soon as
 * the guest reported `@@VAL <marker> ...`, while the guest waits for its
 * effect. If the action fails, QEMU is killed with its error.
 */
function whenGuestReports(marker: string, action: () => Promise<void>): { watch: (out: string) => undefined; done: () => Promise<void> } {
  let started: Promise<void> | undefined;
  let failure: Error | undefined;
  const re = new RegExp(`^@@VAL ${marker}( |$)`, 'm');
  return {
    watch: (out) => {
      if (failure !== undefined) throw failure;
      if (started === undefined && re.test(out)) {
        started = action().catch((err: unknown) => {
          failure = err as Error;
        });
      }
      return undefined;
    },
    done: async () => {
      if (started === undefined) throw new Error(`the guest never reported ${marker}`);
      await started;
      if (failure !== undefined) throw failure;
    },
  };
}

/** A watch that pulls the plug (SIGKILL) as soon as the guest reported `@@VAL <marker> ...`. */
function killWhenGuestReports(marker: string): (out: string) => 'kill' | undefined {
  const re = new RegExp(`^@@VAL ${marker}( |$)`, 'm');
  return (out) => (re.test(out) ? 'kill' : undefined);
}

// ---------------------------------------------------------------------------
// 1. Bad blocks
// ---------------------------------------------------------------------------

/** Inclusive sector range. */
type Range = readonly [number, number];

/** The sectors of inclusive ranges, in order. */
function sectorsOf(...ranges: Range[]): number[] {
  return ranges.flatMap(([a, b]) => Array.from({ length: b - a + 1 }, (_, i) => a + i));
}

/** A space-separated list of sectors the guest reported ('' for none). */
function sectorList(report: GuestReport, name: string): number[] {
  const v = value(report, name).trim();
  return v === '' ? [] : v.split(/\s+/).map(Number);
}

/**
 * Guest helpers for single requests (GNU dd, O_DIRECT: one request per
 * call, no page cache, no readahead, and Linux neither retries nor splits a
 * failed request of this size):
 *  rd DEV SECTOR [BYTES]       one read of BYTES (default 512) at SECTOR into /tmp/rd
 *  wr DEV SECTOR FILE [BYTES]  one write of BYTES of FILE at SECTOR
 * Each prints "ok", or "eio" when dd failed with "Input/output error" (the
 * message stays in /tmp/dd.err, the request goes to /tmp/eio.log as
 * "vdX SECTOR BYTES rd|wr"); any other failure fails the script.
 *  scan DEV FIRST LAST         the sectors in FIRST..LAST whose single-sector read fails with EIO
 *  say NAME CMD...             runs CMD (failing the script if it fails), reports its output as NAME
 *  same NAME FILE1 FILE2 LEN   reports NAME "same" or "differs" for the first LEN bytes
 */
const IO_HELPERS = `${DISK_HELPERS}
: > /tmp/eio.log
dd_result() {
  if [ "$1" -eq 0 ]; then echo ok
  elif grep -q 'Input/output error' /tmp/dd.err; then echo "\${2##*/} $3 $4 $5" >> /tmp/eio.log; echo eio
  else echo "dd on $2 at sector $3 failed: $(cat /tmp/dd.err)" >&2; return 1; fi
}
rd() {
  n=\${3:-512}; rc=0
  ${GNU_DD} if="$1" of=/tmp/rd bs=$n skip=$(( $2 * 512 / n )) count=1 iflag=direct 2>/tmp/dd.err || rc=$?
  dd_result $rc "$1" "$2" $n rd
}
wr() {
  n=\${4:-512}; rc=0
  ${GNU_DD} if="$3" of="$1" bs=$n seek=$(( $2 * 512 / n )) count=1 oflag=direct conv=notrunc 2>/tmp/dd.err || rc=$?
  dd_result $rc "$1" "$2" $n wr
}
scan() {
  s=$2; bad=
  while [ $s -le $3 ]; do
    r=$(rd "$1" $s) || return 1
    [ "$r" = ok ] || bad="$bad $s"
    s=$((s+1))
  done
  echo $bad
}
say() { n=$1; shift; r=$("$@"); val "$n" "$r"; }
same() { if cmp -s -n "$4" "$2" "$3"; then val "$1" same; else val "$1" differs; fi; }
`;

describe('bad blocks', () => {
  /** Set at start: a 32-sector range (its edges are inside 4 KiB blocks 20000 and 20032) and one sector. */
  const RANGE: Range = [20004, 20035];
  const SINGLE: Range = [30000, 30000];
  /** Added at run time (after RANGE is removed). */
  const ADDED: Range = [40000, 40015];
  /** The --badblocks-once disk's range. */
  const ONCE: Range = [50000, 50007];
  /** How far around each range the guest scans. */
  const MARGIN = 16;
  let bad: Daemon;
  let once: Daemon;

  beforeAll(run.counted(async () => {
    bad = await startDisk('bad', { badblocks: `${RANGE[0]}-${RANGE[1]},${SINGLE[0]}` });
    once = await startDisk('once', { badblocks: `${ONCE[0]}-${ONCE[1]}`, 'badblocks-once': true });
  }), 60_000);

  const scanAround = (name: string, dev: string, r: Range): string => `say ${name} scan ${dev} ${r[0] - MARGIN} ${r[1] + MARGIN}`;

  const script = `${IO_HELPERS}
B=$(dev_by_serial bad)
O=$(dev_by_serial once)
val bad_dev "\${B##*/}"
val once_dev "\${O##*/}"
val bad_size "$(cat /sys/block/\${B##*/}/size)"
dd if=/dev/urandom of=/tmp/p512 bs=512 count=1 2>/dev/null
dd if=/dev/urandom of=/tmp/p4k bs=4096 count=1 2>/dev/null

# --- 1a. the ranges given at start
${scanAround('scan_range', '$B', RANGE)}
${scanAround('scan_single', '$B', SINGLE)}
say rd_inside rd $B ${RANGE[0]}
val eio_message "$(cat /tmp/dd.err)"
say rd_before rd $B ${RANGE[0] - 1}
say rd_after rd $B ${RANGE[1] + 1}
say rd4k_before rd $B ${RANGE[0] - 12} 4096
say rd4k_first rd $B ${RANGE[0] - 4} 4096
say rd4k_last rd $B ${RANGE[1] - 3} 4096
say rd4k_after rd $B ${RANGE[1] + 5} 4096
say wr_before wr $B ${RANGE[0] - 1} /tmp/p512
say wr_first wr $B ${RANGE[0]} /tmp/p512
say wr_last wr $B ${RANGE[1]} /tmp/p512
say wr_after wr $B ${RANGE[1] + 1} /tmp/p512
say wr4k_first wr $B ${RANGE[0] - 4} /tmp/p4k 4096
say wr4k_after wr $B ${RANGE[1] + 5} /tmp/p4k 4096
say wr_single wr $B ${SINGLE[0]} /tmp/p512

# --- 1b. badblocks_once: a request that hits bad sectors fails once, and clears the range from there on
say once_1 rd $O ${ONCE[0] + 3}
say once_2 rd $O ${ONCE[0] + 3}
say once_3 rd $O ${ONCE[0] + 4}
say once_4 rd $O ${ONCE[0] + 4}
${scanAround('once_scan', '$O', ONCE)}
${scanAround('once_rescan', '$O', ONCE)}

# --- 1c. the host removes the first range and adds another while the guest waits
val phase1 done
i=0
while r=$(rd $B ${ADDED[0]}) && [ "$r" = ok ]; do
  i=$((i+1))
  if [ $i -gt 600 ]; then echo "sector ${ADDED[0]} never went bad" >&2; exit 1; fi
  sleep 0.1
done
[ "$r" = eio ]
val polls_ok $i

# --- 1d. what the guest sees now
${scanAround('scan2_range', '$B', RANGE)}
${scanAround('scan2_single', '$B', SINGLE)}
${scanAround('scan2_added', '$B', ADDED)}
say rd4k_first_now rd $B ${RANGE[0] - 4} 4096
rd $B ${RANGE[0] - 1} > /dev/null; same data_before_range /tmp/rd /tmp/p512 512
rd $B ${RANGE[0]} > /dev/null; same data_first_failed_write /tmp/rd /dev/zero 512
rd $B ${RANGE[1]} > /dev/null; same data_last_failed_write /tmp/rd /dev/zero 512
rd $B ${RANGE[1] + 1} > /dev/null; same data_after_range /tmp/rd /tmp/p512 512
rd $B ${RANGE[1] + 5} 4096 > /dev/null; same data_4k_after /tmp/rd /tmp/p4k 4096

block eio_log /tmp/eio.log
dmesg | grep -E 'I/O error|I/O Error|critical|Buffer' > /tmp/kerr || true
block kernel_errors /tmp/kerr
`;

  test('I/O fails exactly in the bad ranges; ranges change at run time; badblocks_once clears on first hit', run.counted(async () => {
    const before = { bad: await bad.ctl('stats', 'bad'), once: await once.ctl('stats', 'once') };
    const lists: Record<string, CtlAnswer> = {};
    const change = whenGuestReports('phase1', async () => {
      lists.beforeChange = await bad.ctl('badblocks', 'bad', 'list');
      lists.removed = await bad.ctl('badblocks', 'bad', 'remove', `${RANGE[0]}-${RANGE[1]}`);
      lists.added = await bad.ctl('badblocks', 'bad', 'add', `${ADDED[0]}-${ADDED[1]}`);
    });
    const report = await run.timed('1: bad blocks (one guest, 2 disks)', () =>
      run.boot('badblocks', [bad, once], [bad.disk(), once.disk()], script, { watch: change.watch }));
    await change.done();
    const after = { bad: await bad.ctl('stats', 'bad'), once: await once.ctl('stats', 'once') };
    const onceList = await once.ctl('badblocks', 'once', 'list');

    expect(count(report, 'bad_size')).toBe(DISK_MIB * 2048);
    const scans = {
      range: sectorList(report, 'scan_range'),
      single: sectorList(report, 'scan_single'),
      range_after_remove: sectorList(report, 'scan2_range'),
      single_after_change: sectorList(report, 'scan2_single'),
      added: sectorList(report, 'scan2_added'),
      once_rest: sectorList(report, 'once_scan'),
      once_rescan: sectorList(report, 'once_rescan'),
    };
    console.log(
      `bad blocks: sectors that failed a single-sector O_DIRECT read (scanned ${MARGIN} around each range)\n` +
        Object.entries(scans).map(([k, v]) => `  ${k}: ${v.length === 0 ? 'none' : `${v[0]}..${v[v.length - 1]} (${v.length})`}`).join('\n'),
    );
    // Every scanned sector reported exactly once: the failing ones are the configured ones.
    expect(scans).toEqual({
      range: sectorsOf(RANGE),
      single: sectorsOf(SINGLE),
      range_after_remove: [],
      single_after_change: sectorsOf(SINGLE),
      added: sectorsOf(ADDED),
      // badblocks_once: the reads of ONCE[0] + 3 cleared ONCE[0] + 3 .. ONCE[1]; the scan's
      // read of ONCE[0] fails once and clears the rest (ONCE[0] .. ONCE[0] + 2), as null_blk.
      once_rest: sectorsOf([ONCE[0], ONCE[0]]),
      once_rescan: [],
    });

    // dd's own words for the failure.
    expect(value(report, 'eio_message')).toMatch(/Input\/output error/);
    // Single requests at and around the edges; a 4 KiB request that touches one bad sector fails whole.
    const ops = [
      'rd_inside', 'rd_before', 'rd_after', 'rd4k_before', 'rd4k_first', 'rd4k_last', 'rd4k_after',
      'wr_before', 'wr_first', 'wr_last', 'wr_after', 'wr4k_first', 'wr4k_after', 'wr_single',
    ];
    expect(Object.fromEntries(ops.map((k) => [k, value(report, k)]))).toEqual({
      rd_inside: 'eio', rd_before: 'ok', rd_after: 'ok',
      rd4k_before: 'ok', rd4k_first: 'eio', rd4k_last: 'eio', rd4k_after: 'ok',
      wr_before: 'ok', wr_first: 'eio', wr_last: 'eio', wr_after: 'ok',
      wr4k_first: 'eio', wr4k_after: 'ok', wr_single: 'eio',
    });

    // The run-time change, as `rnull ctl` answered it, and as the guest saw it.
    expect(lists).toEqual({
      beforeChange: expect.objectContaining({ bad_blocks: [{ start: RANGE[0], end: RANGE[1] }, { start: SINGLE[0], end: SINGLE[1] }] }),
      removed: expect.objectContaining({ bad_blocks: [{ start: SINGLE[0], end: SINGLE[1] }] }),
      added: expect.objectContaining({ bad_blocks: [{ start: SINGLE[0], end: SINGLE[1] }, { start: ADDED[0], end: ADDED[1] }] }),
    });
    const changes = bad.logEntries().filter((e) => e.msg === 'bad blocks changed');
    expect(changes.map((e) => [e.start, e.end])).toEqual([RANGE, ADDED].map(([a, b]) => [a, b]));
    expect(value(report, 'rd4k_first_now')).toBe('ok');
    // A write that failed stored nothing (the sector still reads as never written); the others did.
    expect({
      before: value(report, 'data_before_range'), firstFailed: value(report, 'data_first_failed_write'),
      lastFailed: value(report, 'data_last_failed_write'), after: value(report, 'data_after_range'), after4k: value(report, 'data_4k_after'),
    }).toEqual({ before: 'same', firstFailed: 'same', lastFailed: 'same', after: 'same', after4k: 'same' });

    // badblocks_once: the first read of a bad sector fails, the second succeeds; as null_blk,
    // the hit clears the range from that sector to its end, so a later sector is already good.
    expect({
      first: value(report, 'once_1'), second: value(report, 'once_2'),
      laterSectorFirst: value(report, 'once_3'), laterSectorSecond: value(report, 'once_4'),
    }).toEqual({ first: 'eio', second: 'ok', laterSectorFirst: 'ok', laterSectorSecond: 'ok' });
    expect(onceList.bad_blocks).toEqual([]);

    // Every EIO the guest saw was one failed request in the daemon, and nothing else failed.
    const eios = (report.blocks.get('eio_log') ?? '').split('\n').filter(Boolean).map((l) => l.split(' '));
    const badDev = value(report, 'bad_dev');
    const onceDev = value(report, 'once_dev');
    const failed = {
      bad: queueSum(after.bad, 'failed_requests') - queueSum(before.bad, 'failed_requests'),
      once: queueSum(after.once, 'failed_requests') - queueSum(before.once, 'failed_requests'),
    };
    const seen = { bad: eios.filter((e) => e[0] === badDev).length, once: eios.filter((e) => e[0] === onceDev).length };
    expect({ failedRequestsInDaemon: failed }).toEqual({ failedRequestsInDaemon: seen });
    // Scans (32 + 1 + 1 + 16) + single requests (7) + the poll (1); once: the first read of
    // ONCE[0] + 3, and the scan's read of ONCE[0] (each clears the rest of its range).
    expect(seen).toEqual({ bad: 58, once: 2 });

    // The guest kernel logged I/O errors only for requests that failed on purpose
    // (printk is rate-limited: not necessarily for every one of them).
    const failedAt = new Set(eios.map((e) => `${e[0]} ${e[1]}`));
    const kernelErrors = (report.blocks.get('kernel_errors') ?? '').split('\n').filter(Boolean);
    const unexpected = kernelErrors.filter((line) => {
      const m = /\] I\/O error, dev (\w+), sector (\d+) op 0x[01]:\((READ|WRITE)\)/.exec(line);
      return m === null || !failedAt.has(`${m[1]} ${m[2]}`);
    });
    expect(kernelErrors.length).toBeGreaterThan(0);
    expect(unexpected).toEqual([]);

    figures.badblocks = {
      configured: [RANGE, SINGLE], added: ADDED, once: ONCE, scans, failedRequests: failed,
      kernelErrorLines: kernelErrors.length, pollsBeforeTheAddedRangeFailed: count(report, 'polls_ok'),
    };
  }), TEST_TIMEOUT_MS);

  test('SIGTERM stops both daemons and removes their sockets', run.counted(async () => {
    await bad.stopAndCheck();
    await once.stopAndCheck();
  }), 60_000);
});

// ---------------------------------------------------------------------------
// 2. Write cache and flush
// ---------------------------------------------------------------------------

describe('write cache (cache_size) and FLUSH', () => {
  const CACHE_MIB = 16;
  /** 1 MiB regions, by their offset in MiB: A unflushed, B flushed, C written through, D written back before the switch. */
  const R = { a: 8, b: 16, c: 24, d: 32 } as const;
  let daemon: Daemon;

  beforeAll(run.counted(async () => {
    daemon = await startDisk('cache', { 'cache-size': CACHE_MIB });
  }), 60_000);

  /**
   * Guest lines: C is the disk, q its queue directory; NAME_wc is the block
   * layer's view of the cache (queue/write_cache), NAME_cache_type the
   * device's (virtio_blk's cache_type, there only with CONFIG_WCE);
   * rdsum NAME MIB reports the region's sha256.
   */
  const prelude = (name: string): string => `${DISK_HELPERS}
C=$(dev_by_serial cache)
q=/sys/block/\${C##*/}/queue
val ${name}_wc "$(cat $q/write_cache)"
val ${name}_cache_type "$(cat /sys/block/\${C##*/}/cache_type)"
rdsum() { val "$1" "$(dd if=$C bs=1M skip=$2 count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"; }
newdata() { dd if=/dev/urandom of=/tmp/$1 bs=1M count=1 2>/dev/null; val "$1_sum" "$(sha256sum < /tmp/$1 | cut -d' ' -f1)"; }
`;
  const ZERO_MIB_SHA256 = '30e14955ebf1352266dc2ff8067e68104607e750abb9d3b36582b8af909fcb58';

  /**
   * Guest 1: B with a FLUSH after it (dd conv=fsync), then A without one;
   * both read back while the power is on. The host then pulls the plug.
   */
  const writeBack = `${prelude('g1')}
val g1_fua "$(cat $q/fua)"
newdata a
newdata b
dd if=/tmp/b of=$C bs=1M seek=${R.b} oflag=direct conv=fsync 2>/dev/null
dd if=/tmp/a of=$C bs=1M seek=${R.a} oflag=direct 2>/dev/null
rdsum g1_a ${R.a}
rdsum g1_b ${R.b}
val written 1
sleep 600
`;

  /**
   * Guest 2 (after the power failure and drop-cache): B is there, A is not.
   * Then D written back (no flush), the switch to write through (the
   * device flushes), C written through (no flush); the host pulls the plug.
   * The switch goes through virtio_blk's cache_type, which writes the
   * config space's writeback byte (QEMU passes it on as SET_CONFIG). Not
   * through queue/write_cache: that only changes what the guest's block
   * layer believes (it stops sending FLUSH), the device never hears of it,
   * and data written then is lost in a power failure like any unflushed data.
   */
  const switchToWriteThrough = `${prelude('g2')}
rdsum g2_a ${R.a}
rdsum g2_b ${R.b}
newdata d
dd if=/tmp/d of=$C bs=1M seek=${R.d} oflag=direct 2>/dev/null
echo "write through" > /sys/block/\${C##*/}/cache_type
val g2_cache_type_switched "$(cat /sys/block/\${C##*/}/cache_type)"
val g2_wc_switched "$(cat $q/write_cache)"
newdata c
dd if=/tmp/c of=$C bs=1M seek=${R.c} oflag=direct 2>/dev/null
val written 1
sleep 600
`;

  /** Guest 3 (after the second power failure and drop-cache): what is on the disk. */
  const readBack = `${prelude('g3')}
for r in a:${R.a} b:${R.b} c:${R.c} d:${R.d}; do rdsum "g3_\${r%%:*}" "\${r##*:}"; done
`;

  /** Stats, then drop-cache: the dirty bytes it lost, as the daemon logged them. */
  async function powerFailure(): Promise<{ dirtyBefore: number; dirtyAfter: number; lostBytes: unknown }> {
    const before = await daemon.ctl('stats', 'cache');
    const dropped = await daemon.ctl('drop-cache', 'cache');
    const after = await daemon.ctl('stats', 'cache');
    const drops = daemon.logEntries().filter((e) => e.msg === 'write cache dropped on request (power-failure emulation)');
    daemon.allowWarning(/^write cache dropped on request/);
    expect(dropped.cache_dirty_bytes).toBe(0);
    return { dirtyBefore: before.cache_dirty_bytes ?? NaN, dirtyAfter: after.cache_dirty_bytes ?? NaN, lostBytes: drops[drops.length - 1]?.lostBytes };
  }

  test('flushed data survives a power failure, unflushed data does not; write through needs no flush', run.counted(async () => {
    const g1 = await run.timed('2: write cache, guest 1 (killed)', () =>
      run.boot('cache-1', [daemon], [daemon.disk()], writeBack, { watch: killWhenGuestReports('written') }));
    const fail1 = await powerFailure();
    const g2 = await run.timed('2: write cache, guest 2 (killed)', () =>
      run.boot('cache-2', [daemon], [daemon.disk()], switchToWriteThrough, { watch: killWhenGuestReports('written') }));
    const fail2 = await powerFailure();
    const g3 = await run.timed('2: write cache, guest 3', () => run.boot('cache-3', [daemon], [daemon.disk()], readBack));

    const sums = {
      a: value(g1, 'a_sum'), b: value(g1, 'b_sum'), c: value(g2, 'c_sum'), d: value(g2, 'd_sum'),
    };
    figures.writeCache = { cacheMiB: CACHE_MIB, afterGuest1: fail1, afterGuest2: fail2 };
    console.log(
      `write cache: after guest 1 (B flushed, A not) ${fail1.dirtyBefore} dirty bytes, drop-cache lost ${String(fail1.lostBytes)}; ` +
        `after guest 2 (write through) ${fail2.dirtyBefore} dirty bytes, drop-cache lost ${String(fail2.lostBytes)}`,
    );
    expect(new Set(Object.values(sums)).size).toBe(4); // four different random MiBs
    // Guest 1: the device offers a volatile cache; both regions read back while the power is on.
    expect({ wc: value(g1, 'g1_wc'), cacheType: value(g1, 'g1_cache_type'), a: value(g1, 'g1_a'), b: value(g1, 'g1_b') })
      .toEqual({ wc: 'write back', cacheType: 'write back', a: sums.a, b: sums.b });
    // Exactly A's MiB was still dirty (B's FLUSH made B durable), and drop-cache lost it.
    expect(fail1).toEqual({ dirtyBefore: MIB, dirtyAfter: 0, lostBytes: MIB });
    // Guest 2: a new front-end finds the cache in write back; B survived, A is lost (the old contents: zeroes).
    expect({
      wc: value(g2, 'g2_wc'), a: value(g2, 'g2_a'), b: value(g2, 'g2_b'),
      switched: value(g2, 'g2_cache_type_switched'), wcSwitched: value(g2, 'g2_wc_switched'),
    }).toEqual({ wc: 'write back', a: ZERO_MIB_SHA256, b: sums.b, switched: 'write through', wcSwitched: 'write through' });
    // In write through nothing stays dirty: D was flushed by the switch, C was written through.
    expect(fail2).toEqual({ dirtyBefore: 0, dirtyAfter: 0, lostBytes: 0 });
    const switches = daemon.logEntries().filter((e) => /^guest switched the write cache/.test(e.msg)).map((e) => e.msg);
    expect(switches).toEqual(['guest switched the write cache to writethrough']);
    // Guest 3: what survived both power failures.
    expect({
      wc: value(g3, 'g3_wc'), cacheType: value(g3, 'g3_cache_type'),
      a: value(g3, 'g3_a'), b: value(g3, 'g3_b'), c: value(g3, 'g3_c'), d: value(g3, 'g3_d'),
    }).toEqual({ wc: 'write back', cacheType: 'write back', a: ZERO_MIB_SHA256, b: sums.b, c: sums.c, d: sums.d });
  }), 3 * TEST_TIMEOUT_MS);

  test('SIGTERM stops the daemon and removes its sockets', run.counted(() => daemon.stopAndCheck()), 30_000);
});

// ---------------------------------------------------------------------------
// 3. Bandwidth limit
// ---------------------------------------------------------------------------

describe('bandwidth limit (mbps)', () => {
  const MBPS = 8;
  const FIO_MIB = 32;
  /**
   * fio's bandwidth on the limited disk must lie in this range (MiB/s): TCG
   * overhead may lower it; above the limit only by the throttle's 1 ms burst
   * (+0.03% over 4 s) and clock noise, so 5% over means the cap leaks.
   * Measured: 7.98 (write) and 7.99 (read).
   */
  const BOUNDS = [5.5, 8.4] as const;
  /**
   * The unlimited disk must be at least this many times faster: enough to
   * show that the cap, not the guest, sets the limited disk's pace. Measured
   * over 6 runs: 285-470 MiB/s write, 350-440 MiB/s read (35-59x), but once
   * 45 MiB/s write, 106 MiB/s read (5.6x, 13x): the unlimited jobs last only
   * 70-700 ms, so a hiccup of the host weighs on them.
   */
  const MIN_SPEEDUP = 2;
  let slow: Daemon;
  let fast: Daemon;

  beforeAll(run.counted(async () => {
    slow = await startDisk('slow', { mbps: MBPS });
    fast = await startDisk('fast');
  }), 60_000);

  const script = `${DISK_HELPERS}
for s in slow fast; do
  D=$(dev_by_serial $s)
  for rw in write read; do
    fio --name=seq$rw-$s --filename=$D --rw=$rw --bs=128k --size=${FIO_MIB}M \\
        --ioengine=libaio --iodepth=4 --direct=1 --eta=never --output-format=json --output=/tmp/fio.json
    block $rw-$s /tmp/fio.json
  done
done
`;

  test(`sequential 128 KiB I/O stays under ${MBPS} MiB/s; an unlimited disk runs faster`, run.counted(async () => {
    const report = await run.timed('3: bandwidth limit (one guest, 2 disks)', () =>
      run.boot('mbps', [slow, fast], [slow.disk(), fast.disk()], script));
    const phase = (rw: 'write' | 'read', disk: string): FioPhase => fioSummary(report, `${rw}-${disk}`)[rw];
    const results = {
      slow: { write: phase('write', 'slow'), read: phase('read', 'slow') },
      fast: { write: phase('write', 'fast'), read: phase('read', 'fast') },
    };
    const speedup = {
      write: round(results.fast.write.bwMiBps / results.slow.write.bwMiBps, 2),
      read: round(results.fast.read.bwMiBps / results.slow.read.bwMiBps, 2),
    };
    figures.bandwidth = { mbps: MBPS, fioMiB: FIO_MIB, bounds: BOUNDS, minSpeedup: MIN_SPEEDUP, results, speedup };
    const line = (p: FioPhase): string => `${p.bwMiBps} MiB/s (${p.ioMiB} MiB in ${p.runtimeMs} ms, ${p.iops} IOPS, clat mean ${p.clatMeanUs} us)`;
    console.log(
      `bandwidth, fio sequential 128 KiB at queue depth 4, ${FIO_MIB} MiB:\n` +
        `  --mbps ${MBPS}: write ${line(results.slow.write)}, read ${line(results.slow.read)}\n` +
        `  unlimited: write ${line(results.fast.write)}, read ${line(results.fast.read)}\n` +
        `  unlimited / limited: write ${speedup.write}x, read ${speedup.read}x`,
    );

    for (const [disk, dirs] of Object.entries(results)) {
      for (const [rw, p] of Object.entries(dirs)) expect({ disk, rw, ioMiB: p.ioMiB }).toEqual({ disk, rw, ioMiB: FIO_MIB });
    }
    for (const rw of ['write', 'read'] as const) {
      const bw = results.slow[rw].bwMiBps;
      expect({ rw, bw, within: bw >= BOUNDS[0] && bw <= BOUNDS[1] }).toEqual({ rw, bw, within: true });
      expect({ rw, speedup: speedup[rw], fastEnough: speedup[rw] >= MIN_SPEEDUP }).toEqual({ rw, speedup: speedup[rw], fastEnough: true });
    }
  }), TEST_TIMEOUT_MS);

  test('SIGTERM stops both daemons and removes their sockets', run.counted(async () => {
    await slow.stopAndCheck();
    await fast.stopAndCheck();
  }), 60_000);
});
