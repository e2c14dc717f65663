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
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Daemon, E2eRun, MIB, TEST_TIMEOUT_MS } from '../guest/daemon';
import { fioSummary, type FioPhase, type FioSummary } from '../guest/fio';
import { requireQemu, value, type GuestReport } from '../guest/qemu';

const FIO_RESULTS_FILE = path.join(__dirname, '.last-fio.json');

type BackendKind = 'rnull' | 'qemu-storage-daemon';
const BACKEND: BackendKind = process.env.RNULL_E2E_BACKEND === 'qemu-storage-daemon' ? 'qemu-storage-daemon' : 'rnull';

const run = new E2eRun('rnull-e2e-');

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

/** Starts the selected back-end serving `disk` on NAME.sock in the run directory, and waits until it listens. */
function startDaemon(name: string, disk: DiskConfig): Promise<Daemon> {
  const dir = run.dir;
  const socketPath = path.join(dir, `${name}.sock`);
  if (BACKEND === 'rnull') {
    return Daemon.startCli(name, { size: disk.sizeMiB, blocksize: disk.blockSize, 'memory-backed': disk.memoryBacked, 'num-queues': disk.numQueues }, dir);
  }
  // Reference back-end: a raw file (memory-backed stand-in) or null-co (reads zeroes).
  let blockdev = `driver=null-co,node-name=disk0,size=${disk.sizeMiB * MIB},read-zeroes=on`;
  if (disk.memoryBacked) {
    const image = path.join(dir, `${name}.img`);
    fs.writeFileSync(image, '');
    fs.truncateSync(image, disk.sizeMiB * MIB);
    blockdev = `driver=file,node-name=disk0,filename=${image}`;
  }
  return Daemon.spawn({
    name,
    command: 'qemu-storage-daemon',
    args: [
      '--blockdev', blockdev,
      '--export',
      `type=vhost-user-blk,id=export0,node-name=disk0,addr.type=unix,addr.path=${socketPath},` +
        `writable=on,num-queues=${disk.numQueues},logical-block-size=${disk.blockSize}`,
    ],
    sockets: [socketPath],
    dir,
  });
}

// ---------------------------------------------------------------------------
// Guests
// ---------------------------------------------------------------------------

/** Boots a guest on the daemon's disk, runs the script, returns its report. */
function bootGuest(daemon: Daemon, script: string, opts: { cpus: number; numQueues: number }): Promise<GuestReport> {
  return run.boot(daemon.name, [daemon], [daemon.disk(0, opts.numQueues)], script, { cpus: opts.cpus });
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

const fioResults: Record<string, FioSummary> = {};

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

beforeAll(() => {
  run.setup({
    needsRnull: BACKEND === 'rnull',
    check: () => {
      if (BACKEND === 'qemu-storage-daemon') requireQemu('qemu-storage-daemon');
    },
  });
}, 180_000);

afterAll(async () => {
  await run.finish(` [${BACKEND}]`);
  if (Object.keys(fioResults).length > 0) {
    const record = { backend: BACKEND, date: new Date().toISOString(), kernel: run.kernelVersion, results: fioResults };
    fs.writeFileSync(FIO_RESULTS_FILE, `${JSON.stringify(record, null, 2)}\n`);
  }
}, 60_000);

describe(`guest on a ${BACKEND} null disk`, () => {
  describe('memory-backed, 512-byte blocks, 1 queue', () => {
    const disk: DiskConfig = { sizeMiB: 256, blockSize: 512, memoryBacked: true, numQueues: 1 };
    let daemon: Daemon;
    let written: Record<string, string> | undefined;

    beforeAll(run.counted(async () => {
      daemon = await startDaemon('mem512', disk);
    }), 60_000);

    test('1: geometry, fio random write + verify, ext4 round trip', run.counted(async () => {
      await run.timed('scenario 1', async () => {
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
      });
    }), TEST_TIMEOUT_MS);

    test('2: the data survives a reconnect (second guest, same daemon)', run.counted(async () => {
      if (written === undefined) throw new Error('scenario 1 did not produce checksums');
      await run.timed('scenario 2', async () => {
        const report = await bootGuest(daemon, REPORT_GEOMETRY + EXT4_READ_BACK, { cpus: 1, numQueues: 1 });
        expect(value(report, 'size_sectors')).toBe(String(256 * 2048));
        expect(checksums(report)).toEqual(written);
      });
    }), TEST_TIMEOUT_MS);

    test('SIGTERM stops the daemon and removes its socket', run.counted(() => daemon.stopAndCheck()), 30_000);
  });

  describe('memory-backed, 4096-byte blocks, 2 queues on 2 vCPUs', () => {
    const disk: DiskConfig = { sizeMiB: 256, blockSize: 4096, memoryBacked: true, numQueues: 2 };
    let daemon: Daemon;

    beforeAll(run.counted(async () => {
      daemon = await startDaemon('mem4k-mq', disk);
    }), 60_000);

    test('3: 4096-byte blocks, two hardware queues, one fio job per CPU', run.counted(async () => {
      await run.timed('scenario 3', async () => {
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
      });
    }), TEST_TIMEOUT_MS);

    test('SIGTERM stops the daemon and removes its socket', run.counted(() => daemon.stopAndCheck()), 30_000);
  });

  describe('not memory-backed', () => {
    const disk: DiskConfig = { sizeMiB: 256, blockSize: 512, memoryBacked: false, numQueues: 1 };
    let daemon: Daemon;

    beforeAll(run.counted(async () => {
      daemon = await startDaemon('null', disk);
    }), 60_000);

    test('4: writes are accepted, reads return zeroes', run.counted(async () => {
      await run.timed('scenario 4', async () => {
        const report = await bootGuest(daemon, REPORT_GEOMETRY + ZERO_READS, { cpus: 1, numQueues: 1 });
        expect(value(report, 'size_sectors')).toBe(String(256 * 2048));
        expect(value(report, 'logical_block_size')).toBe('512');
        expect(value(report, 'pattern')).toBe('random'); // the block written was not zeroes
        expect(value(report, 'readback_bytes')).toBe('4096');
        expect(value(report, 'readback')).toBe('zero');
        expect(value(report, 'head')).toBe('zero');
      });
    }), TEST_TIMEOUT_MS);

    test('SIGTERM stops the daemon and removes its socket', run.counted(() => daemon.stopAndCheck()), 30_000);
  });
});
