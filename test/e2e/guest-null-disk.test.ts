/**
 * End-to-end test: a real Linux guest (QEMU, TCG) uses a disk served by the
 * rnull daemon over vhost-user-blk.
 *
 *  1. 256 MiB, 512-byte blocks, memory-backed, 1 queue / 1 vCPU: geometry,
 *     fio random write + verify over 64 MiB, then an ext4 round trip
 *     (write files, checksum, remount, checksum again).
 *  2. Same daemon, a second guest (a new vhost-user connection): the ext4
 *     files are still there with the same checksums.
 *  3. 4096-byte blocks, 2 queues / 2 vCPUs: geometry, two hardware queues,
 *     fio with one verifying job per CPU.
 *  4. Not memory-backed: writes are accepted and dropped, reads return zeroes.
 * Each daemon must remove its socket when stopped with SIGTERM.
 *
 * The back-end is `node dist/daemon/main.js` (build it with `npm run build`;
 * `npm test` does that first). RNULL_E2E_BACKEND=qemu-storage-daemon runs
 * the same test against QEMU's own vhost-user-blk export, as a reference for
 * the harness and for performance figures.
 *
 * The fio figures the guests measured are printed and saved to
 * test/e2e/.last-fio.json.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { buildInitramfs, type GuestImage } from '../guest/initramfs';
import { GuestRunError, parseGuestOutput, requireQemu, runGuestScript, tail, type GuestReport } from '../guest/qemu';

const REPO_ROOT = path.resolve(__dirname, '..', '..');
/** The daemon under test; RNULL_E2E_DAEMON points elsewhere (e.g. a copy of dist/ made while a rebuild runs). */
const DAEMON_MAIN = process.env.RNULL_E2E_DAEMON ?? path.join(REPO_ROOT, 'dist', 'daemon', 'main.js');
const FIO_RESULTS_FILE = path.join(__dirname, '.last-fio.json');

type BackendKind = 'rnull' | 'qemu-storage-daemon';
const BACKEND: BackendKind = process.env.RNULL_E2E_BACKEND === 'qemu-storage-daemon' ? 'qemu-storage-daemon' : 'rnull';

/** Hard limit for one guest boot (TCG is slow; a hung back-end must still end the run). */
const GUEST_TIMEOUT_MS = Number(process.env.RNULL_E2E_GUEST_TIMEOUT_S ?? 300) * 1000;
/** jest limit per test: a guest boot plus daemon start/stop, with room to spare. */
const TEST_TIMEOUT_MS = GUEST_TIMEOUT_MS + 120_000;
const MIB = 1024 * 1024;

// ---------------------------------------------------------------------------
// The back-end daemon
// ---------------------------------------------------------------------------

/** The disk a daemon serves (mirrors rnull's command line). */
interface DiskConfig {
  sizeMiB: number;
  blockSize: 512 | 4096;
  memoryBacked: boolean;
  numQueues: number;
}

/** Command line that serves `disk` on `socketPath` with the selected back-end. */
function backendCommand(disk: DiskConfig, socketPath: string, dataDir: string): [string, string[]] {
  if (BACKEND === 'rnull') {
    return [
      process.execPath,
      [
        DAEMON_MAIN,
        '--socket', socketPath,
        '--size', String(disk.sizeMiB),
        '--blocksize', String(disk.blockSize),
        '--memory-backed', String(disk.memoryBacked),
        '--num-queues', String(disk.numQueues),
      ],
    ];
  }
  // Reference back-end: a raw file (memory-backed stand-in) or null-co (reads zeroes).
  let blockdev = `driver=null-co,node-name=disk0,size=${disk.sizeMiB * MIB},read-zeroes=on`;
  if (disk.memoryBacked) {
    const image = path.join(dataDir, `${path.basename(socketPath, '.sock')}.img`);
    fs.writeFileSync(image, '');
    fs.truncateSync(image, disk.sizeMiB * MIB);
    blockdev = `driver=file,node-name=disk0,filename=${image}`;
  }
  return [
    'qemu-storage-daemon',
    [
      '--blockdev', blockdev,
      '--export',
      `type=vhost-user-blk,id=export0,node-name=disk0,addr.type=unix,addr.path=${socketPath},` +
        `writable=on,num-queues=${disk.numQueues},logical-block-size=${disk.blockSize}`,
    ],
  ];
}

interface DaemonExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** A running back-end daemon, its log going to a file. */
class Daemon {
  /** Aborted if the daemon exits without being asked to; QEMU is then killed at once. */
  readonly died: AbortSignal;
  private readonly exit: Promise<DaemonExit>;
  private stopping = false;
  /** Set if the process could not be spawned. */
  private spawnError: Error | undefined;

  private constructor(
    readonly name: string,
    readonly socketPath: string,
    readonly logFile: string,
    private readonly child: ChildProcess,
  ) {
    const died = new AbortController();
    this.died = died.signal;
    this.exit = new Promise((resolve) => {
      child.on('exit', (code, signal) => {
        if (!this.stopping) died.abort(`back-end ${name} exited (code ${code}, signal ${signal})`);
        resolve({ code, signal });
      });
      // Could not be started at all (e.g. ENOENT): there will be no 'exit'.
      child.on('error', (err) => {
        this.spawnError = err;
        if (!this.stopping) died.abort(`back-end ${name} could not be started: ${err.message}`);
        resolve({ code: null, signal: null });
      });
    });
  }

  /** Starts the daemon and waits until its socket exists (its "ready" signal). */
  static async start(name: string, disk: DiskConfig, dir: string): Promise<Daemon> {
    const socketPath = path.join(dir, `${name}.sock`);
    const logFile = path.join(dir, `${name}.log`);
    const [cmd, args] = backendCommand(disk, socketPath, dir);
    const log = fs.openSync(logFile, 'w');
    const child = spawn(cmd, args, { stdio: ['ignore', log, log] });
    fs.closeSync(log);
    const daemon = new Daemon(name, socketPath, logFile, child);
    running.add(daemon);

    const deadline = Date.now() + 30_000;
    while (!fs.existsSync(socketPath)) {
      await sleep(50);
      if (daemon.spawnError !== undefined) {
        running.delete(daemon);
        throw new Error(`cannot start ${cmd}: ${daemon.spawnError.message}`);
      }
      if (daemon.died.aborted || Date.now() > deadline) {
        await daemon.stop();
        throw new Error(
          `${name} did not create ${socketPath} ` +
            `(${daemon.died.aborted ? String(daemon.died.reason) : 'timeout'})\n${daemon.logTail()}`,
        );
      }
    }
    return daemon;
  }

  /** SIGTERM, then SIGKILL if it has not exited after 15 s. */
  async stop(): Promise<DaemonExit> {
    this.stopping = true;
    running.delete(this);
    if (this.child.exitCode === null && this.child.signalCode === null) {
      this.child.kill('SIGTERM');
      const timer = setTimeout(() => this.child.kill('SIGKILL'), 15_000);
      const result = await this.exit;
      clearTimeout(timer);
      return result;
    }
    return this.exit;
  }

  logTail(lines = 30): string {
    return `--- ${this.name} log (${this.logFile}) ---\n${tail(fs.readFileSync(this.logFile, 'utf8'), lines)}`;
  }
}

/** Daemons not yet stopped; afterAll stops them whatever happened. */
const running = new Set<Daemon>();

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// ---------------------------------------------------------------------------
// Guests
// ---------------------------------------------------------------------------

let image: GuestImage;
let runDir: string;
let bootCount = 0;
/** Tests that threw; the run directory (guest and daemon logs) is kept if any did. */
let failures = 0;

/** Wraps a test body so that a failure is counted (jest does not tell afterAll). */
function counted(body: () => Promise<void>): () => Promise<void> {
  return async () => {
    try {
      await body();
    } catch (err) {
      failures += 1;
      throw err;
    }
  };
}

/** Boots a guest on the daemon's disk, runs the script, returns its report. */
async function bootGuest(daemon: Daemon, script: string, opts: { cpus: number; numQueues: number }): Promise<GuestReport> {
  bootCount += 1;
  const workDir = path.join(runDir, `guest-${bootCount}-${daemon.name}`);
  try {
    const result = await runGuestScript({
      image,
      disk: { socketPath: daemon.socketPath, numQueues: opts.numQueues },
      script,
      workDir,
      cpus: opts.cpus,
      timeoutMs: GUEST_TIMEOUT_MS,
      signal: daemon.died,
    });
    return parseGuestOutput(result.output);
  } catch (err) {
    if (err instanceof GuestRunError) throw new Error(`${err.message}\n${daemon.logTail()}`);
    throw err;
  }
}

/** A value the guest reported with `val`, which must be present. */
function value(report: GuestReport, name: string): string {
  const v = report.values.get(name);
  if (v === undefined) throw new Error(`guest did not report ${name}`);
  return v;
}

/** Parses `sha256sum` output into file -> digest. */
function checksums(report: GuestReport): Record<string, string> {
  const text = report.blocks.get('sums');
  if (text === undefined) throw new Error('guest did not report checksums');
  const sums: Record<string, string> = {};
  for (const line of text.split('\n').filter(Boolean)) {
    const [digest, file] = line.trim().split(/\s+/);
    if (digest === undefined || file === undefined) throw new Error(`bad sha256sum line: ${line}`);
    sums[file] = digest;
  }
  return sums;
}

// ---------------------------------------------------------------------------
// fio results
// ---------------------------------------------------------------------------

/** One direction of a fio job, as fio's JSON output has it (fields used here). */
interface FioJsonPhase {
  io_kbytes: number;
  bw: number;
  iops: number;
  total_ios: number;
  lat_ns: { mean: number };
  clat_ns: { percentile?: Record<string, number> };
}
interface FioJson {
  jobs: Array<{ jobname: string; error: number; read: FioJsonPhase; write: FioJsonPhase }>;
}

/** The figures worth quoting for one direction. */
interface FioPhase {
  ioMiB: number;
  iops: number;
  bwMiBps: number;
  latMeanUs: number;
  clatP50Us: number | null;
  clatP99Us: number | null;
}
interface FioSummary {
  job: string;
  error: number;
  write: FioPhase;
  /** The verify pass: every written block is read back and checked. */
  read: FioPhase;
}

const round = (x: number, digits = 1): number => Number(x.toFixed(digits));

function phase(p: FioJsonPhase): FioPhase {
  const pct = (k: string): number | null => {
    const ns = p.clat_ns.percentile?.[k];
    return ns === undefined ? null : round(ns / 1000);
  };
  return {
    ioMiB: round(p.io_kbytes / 1024, 2),
    iops: Math.round(p.iops),
    bwMiBps: round(p.bw / 1024, 2),
    latMeanUs: round(p.lat_ns.mean / 1000),
    clatP50Us: pct('50.000000'),
    clatP99Us: pct('99.000000'),
  };
}

/** Reads the fio JSON the guest printed (one job: the scripts use group_reporting). */
function fioSummary(report: GuestReport): FioSummary {
  const text = report.blocks.get('fio');
  if (text === undefined) throw new Error('guest did not report fio results');
  // fio may put warnings before the JSON (with numjobs > 1 it warns that
  // "multiple writers may overwrite blocks", though offset_increment keeps
  // the jobs' ranges apart).
  const start = text.search(/^\{/m);
  if (start < 0) throw new Error(`no JSON in fio output:\n${text}`);
  const json = JSON.parse(text.slice(start)) as FioJson;
  expect(json.jobs).toHaveLength(1);
  const job = json.jobs[0]!;
  return { job: job.jobname, error: job.error, write: phase(job.write), read: phase(job.read) };
}

const fioResults: Record<string, FioSummary> = {};
const timings: string[] = [];

function recordFio(scenario: string, summary: FioSummary): void {
  fioResults[scenario] = summary;
  const line = (dir: string, p: FioPhase): string =>
    `${dir}: ${p.iops} IOPS, ${p.bwMiBps} MiB/s, mean lat ${p.latMeanUs} us, p50 ${p.clatP50Us} us, p99 ${p.clatP99Us} us (${p.ioMiB} MiB)`;
  console.log(`fio [${BACKEND}] ${scenario}\n  ${line('write', summary.write)}\n  ${line('read (verify)', summary.read)}`);
}

// ---------------------------------------------------------------------------
// Guest scripts (busybox sh; `val` and `block` come from the harness prelude)
// ---------------------------------------------------------------------------

/** Geometry as the guest's block layer sees it. */
const REPORT_GEOMETRY = `
val size_sectors "$(cat /sys/block/vda/size)"
val logical_block_size "$(cat /sys/block/vda/queue/logical_block_size)"
val hw_queues "$(ls /sys/block/vda/mq | wc -l)"
val cpus "$(nproc)"
`;

/** Random 4k writes with crc32c verification, then the figures as JSON. */
function fioVerify(opts: { name: string; offsetMiB: number; sizeMiB: number; numjobs: number }): string {
  const perCpu = opts.numjobs > 1 ? `--numjobs=${opts.numjobs} --offset_increment=${opts.sizeMiB}M --cpus_allowed=0-${opts.numjobs - 1} --cpus_allowed_policy=split` : '';
  return `
fio --name=${opts.name} --filename=/dev/vda --rw=randwrite --bs=4k \\
    --offset=${opts.offsetMiB}M --size=${opts.sizeMiB}M ${perCpu} \\
    --ioengine=libaio --iodepth=16 --direct=1 \\
    --verify=crc32c --do_verify=1 --verify_fatal=1 \\
    --group_reporting --eta=never --output-format=json --output=/tmp/fio.json
block fio /tmp/fio.json
`;
}

/** Sizes (MiB) of the files written to ext4 in scenario 1. */
const EXT4_FILES_MIB = [1, 3, 5, 8];

/**
 * mkfs.ext4 over the whole disk (fio's data is overwritten), write random
 * files, checksum, unmount, drop every cache so the next reads reach the
 * back-end, mount again, checksum again: the two lists must match.
 */
const EXT4_ROUND_TRIP = `
mkfs.ext4 -F -q /dev/vda
mount -t ext4 /dev/vda /mnt
i=0
for mib in ${EXT4_FILES_MIB.join(' ')}; do
  i=$((i+1))
  dd if=/dev/urandom of=/mnt/file$i bs=1M count=$mib iflag=fullblock 2>/dev/null
done
(cd /mnt && sha256sum file*) > /tmp/sums-written
(cd /mnt && wc -c file*) > /tmp/sizes
umount /mnt
blockdev --flushbufs /dev/vda
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 /dev/vda /mnt
(cd /mnt && sha256sum file*) > /tmp/sums-reread
umount /mnt
cmp /tmp/sums-written /tmp/sums-reread
block sizes /tmp/sizes
block sums /tmp/sums-reread
`;

/** A fresh guest mounts the existing filesystem read-only and checksums it. */
const EXT4_READ_BACK = `
mount -t ext4 -o ro /dev/vda /mnt
(cd /mnt && sha256sum file*) > /tmp/sums
umount /mnt
block sums /tmp/sums
`;

/**
 * Writes one random 4 KiB block with O_DIRECT, reads it back with O_DIRECT
 * and reports whether it came back as zeroes; also checks the first 16 MiB.
 */
const ZERO_READS = `
dd if=/dev/urandom of=/tmp/pattern bs=4096 count=1 2>/dev/null
if cmp -s -n 4096 /tmp/pattern /dev/zero; then val pattern zero; else val pattern random; fi
dd if=/tmp/pattern of=/dev/vda bs=4096 seek=100 count=1 oflag=direct 2>/dev/null
blockdev --flushbufs /dev/vda
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/readback bs=4096 skip=100 count=1 iflag=direct 2>/dev/null
val readback_bytes "$(wc -c < /tmp/readback)"
if cmp -s -n 4096 /tmp/readback /dev/zero; then val readback zero; else val readback data; fi
dd if=/dev/vda of=/tmp/head bs=1M count=16 iflag=direct 2>/dev/null
if cmp -s -n ${16 * MIB} /tmp/head /dev/zero; then val head zero; else val head data; fi
`;

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

/** Why the test bed could not be set up; every later hook and test fails with it. */
let setupError: Error | undefined;

beforeAll(() => {
  try {
    // Fail (never skip) when the test bed is missing, saying how to get it.
    requireQemu();
    if (BACKEND === 'rnull' && !fs.existsSync(DAEMON_MAIN)) {
      throw new Error(`${DAEMON_MAIN} is missing: run \`npm run build\` first (\`npm test\` does it)`);
    }
    if (BACKEND === 'qemu-storage-daemon') requireQemu('qemu-storage-daemon');
    const started = Date.now();
    image = buildInitramfs({ cacheDir: path.join(os.tmpdir(), 'rnull-guest-cache') });
    timings.push(`initramfs ${image.built ? 'built' : 'cached'}: ${((Date.now() - started) / 1000).toFixed(1)} s`);
    runDir = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-e2e-'));
  } catch (err) {
    setupError = err as Error;
    throw err;
  }
}, 180_000);

/** Starts a daemon for a describe block, unless the test bed itself is missing. */
function startDaemon(name: string, disk: DiskConfig): Promise<Daemon> {
  if (setupError !== undefined) throw setupError;
  return Daemon.start(name, disk, runDir);
}

afterAll(async () => {
  for (const daemon of [...running]) await daemon.stop();
  if (Object.keys(fioResults).length > 0) {
    const record = { backend: BACKEND, date: new Date().toISOString(), kernel: image?.kernel.version, results: fioResults };
    fs.writeFileSync(FIO_RESULTS_FILE, `${JSON.stringify(record, null, 2)}\n`);
  }
  if (setupError !== undefined) return;
  console.log(`timings [${BACKEND}]\n  ${timings.join('\n  ')}\nguest logs: ${runDir}`);
  if (runDir !== undefined && failures === 0 && process.env.RNULL_E2E_KEEP === undefined) {
    fs.rmSync(runDir, { recursive: true, force: true });
  }
}, 60_000);

/** Stops a daemon with SIGTERM and checks that it exits and removes its socket. */
async function stopAndCheckSocket(daemon: Daemon): Promise<void> {
  const exit = await daemon.stop();
  expect(exit).toEqual({ code: 0, signal: null }); // a clean exit of its own, not our SIGKILL
  expect(fs.existsSync(daemon.socketPath)).toBe(false);
}

describe(`guest on a ${BACKEND} null disk`, () => {
  describe('memory-backed, 512-byte blocks, 1 queue', () => {
    const disk: DiskConfig = { sizeMiB: 256, blockSize: 512, memoryBacked: true, numQueues: 1 };
    let daemon: Daemon;
    let written: Record<string, string> | undefined;

    beforeAll(counted(async () => {
      daemon = await startDaemon('mem512', disk);
    }), 60_000);

    test('1: geometry, fio random write + verify, ext4 round trip', counted(async () => {
      const started = Date.now();
      const report = await bootGuest(
        daemon,
        REPORT_GEOMETRY + fioVerify({ name: 'randwrite-verify', offsetMiB: 64, sizeMiB: 64, numjobs: 1 }) + EXT4_ROUND_TRIP,
        { cpus: 1, numQueues: 1 },
      );
      expect(value(report, 'size_sectors')).toBe(String(256 * 2048));
      expect(value(report, 'logical_block_size')).toBe('512');
      expect(value(report, 'hw_queues')).toBe('1');

      const fio = fioSummary(report);
      recordFio('1: 1 job, 64 MiB, 512 B blocks, 1 queue', fio);
      expect(fio.error).toBe(0);
      expect(fio.write.ioMiB).toBe(64);
      expect(fio.read.ioMiB).toBe(64); // every written block verified

      const sizes = report.blocks.get('sizes') ?? '';
      EXT4_FILES_MIB.forEach((mib, i) => expect(sizes).toMatch(new RegExp(`^\\s*${mib * MIB}\\s+file${i + 1}$`, 'm')));
      written = checksums(report);
      expect(Object.keys(written).sort()).toEqual(EXT4_FILES_MIB.map((_, i) => `file${i + 1}`));
      console.log(`ext4 checksums:\n  ${Object.entries(written).map(([f, s]) => `${s}  ${f}`).join('\n  ')}`);
      timings.push(`scenario 1: ${((Date.now() - started) / 1000).toFixed(1)} s`);
    }), TEST_TIMEOUT_MS);

    test('2: the data survives a reconnect (second guest, same daemon)', counted(async () => {
      if (written === undefined) throw new Error('scenario 1 did not produce checksums');
      const started = Date.now();
      const report = await bootGuest(daemon, REPORT_GEOMETRY + EXT4_READ_BACK, { cpus: 1, numQueues: 1 });
      expect(value(report, 'size_sectors')).toBe(String(256 * 2048));
      expect(checksums(report)).toEqual(written);
      timings.push(`scenario 2: ${((Date.now() - started) / 1000).toFixed(1)} s`);
    }), TEST_TIMEOUT_MS);

    test('SIGTERM stops the daemon and removes its socket', counted(() => stopAndCheckSocket(daemon)), 30_000);
  });

  describe('memory-backed, 4096-byte blocks, 2 queues on 2 vCPUs', () => {
    const disk: DiskConfig = { sizeMiB: 256, blockSize: 4096, memoryBacked: true, numQueues: 2 };
    let daemon: Daemon;

    beforeAll(counted(async () => {
      daemon = await startDaemon('mem4k-mq', disk);
    }), 60_000);

    test('3: 4096-byte blocks, two hardware queues, one fio job per CPU', counted(async () => {
      const started = Date.now();
      const report = await bootGuest(
        daemon,
        REPORT_GEOMETRY + fioVerify({ name: 'mq-randwrite-verify', offsetMiB: 0, sizeMiB: 32, numjobs: 2 }),
        { cpus: 2, numQueues: 2 },
      );
      expect(value(report, 'size_sectors')).toBe(String(256 * 2048)); // always 512-byte units
      expect(value(report, 'logical_block_size')).toBe('4096');
      expect(value(report, 'cpus')).toBe('2');
      expect(value(report, 'hw_queues')).toBe('2');

      const fio = fioSummary(report);
      recordFio('3: 2 jobs x 32 MiB, 4 KiB blocks, 2 queues', fio);
      expect(fio.error).toBe(0);
      expect(fio.write.ioMiB).toBe(64);
      expect(fio.read.ioMiB).toBe(64);
      timings.push(`scenario 3: ${((Date.now() - started) / 1000).toFixed(1)} s`);
    }), TEST_TIMEOUT_MS);

    test('SIGTERM stops the daemon and removes its socket', counted(() => stopAndCheckSocket(daemon)), 30_000);
  });

  describe('not memory-backed', () => {
    const disk: DiskConfig = { sizeMiB: 256, blockSize: 512, memoryBacked: false, numQueues: 1 };
    let daemon: Daemon;

    beforeAll(counted(async () => {
      daemon = await startDaemon('null', disk);
    }), 60_000);

    test('4: writes are accepted, reads return zeroes', counted(async () => {
      const started = Date.now();
      const report = await bootGuest(daemon, REPORT_GEOMETRY + ZERO_READS, { cpus: 1, numQueues: 1 });
      expect(value(report, 'size_sectors')).toBe(String(256 * 2048));
      expect(value(report, 'logical_block_size')).toBe('512');
      expect(value(report, 'pattern')).toBe('random'); // the block written was not zeroes
      expect(value(report, 'readback_bytes')).toBe('4096');
      expect(value(report, 'readback')).toBe('zero');
      expect(value(report, 'head')).toBe('zero');
      timings.push(`scenario 4: ${((Date.now() - started) / 1000).toFixed(1)} s`);
    }), TEST_TIMEOUT_MS);

    test('SIGTERM stops the daemon and removes its socket', counted(() => stopAndCheckSocket(daemon)), 30_000);
  });
});
