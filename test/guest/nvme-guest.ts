/**
 * Guest test bed for the VFIO NVMe driver: boots a TCG guest with an emulated Intel IOMMU
 * (interrupt remapping on, caching mode on) and emulated NVMe controllers over host backing
 * files, shares the host's root file system read-only over 9p (so node, this worktree's dist/
 * and build/ run in the guest at the same paths), binds the controllers to vfio-pci through
 * driver_override + drivers_probe, runs one node script in the guest (chroot into the host
 * root) and returns its output and exit status (see qemu.ts for the output port and the
 * "@@VAL name value" convention).
 *
 * Bounded: the whole boot has a hard timeout after which QEMU is SIGKILLed; a failed or hung run
 * throws GuestRunError with the tails of the script output and the guest console.
 *
 * Facts this relies on: ../../../shared/design/guest-testbed.md ("NVMe behind an emulated IOMMU").
 */
import * as cp from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as ts from 'typescript';
import { buildInitramfs, type GuestImage } from './initramfs';
import { count, parseGuestOutput, requireQemu, runGuestScript, type GuestReport, type GuestRunResult } from './qemu';

/** One namespace of an emulated controller, backed by a sparse raw file. */
export interface NvmeNamespaceSpec {
  nsid: number;
  /** Host backing file (created, sparse, if missing). */
  file: string;
  sizeBytes: number;
  /** Logical block size: 512 or 4096. */
  blockSize: 512 | 4096;
  /** More `-drive` options for the backing drive, e.g. "throttling.iops-total=40". */
  driveOptions?: string[];
}

/** One emulated NVMe controller at a fixed PCI slot. */
export interface NvmeControllerSpec {
  id: string;
  serial: string;
  /** PCI device number on bus 0 (the controller is 0000:00:<slot>.0). */
  slot: number;
  namespaces: NvmeNamespaceSpec[];
  /** More `-device nvme` properties, e.g. "mdts=5" or "max_ioqpairs=4". */
  properties?: string[];
}

/** The guest's PCI address of a controller. */
export function bdfOf(c: NvmeControllerSpec): string {
  return `0000:00:${c.slot.toString(16).padStart(2, '0')}.0`;
}

/**
 * The standard pair: controller A (slot 4) with one 512-byte-LBA namespace, controller B
 * (slot 5) with namespaces 1 (512-byte LBAs) and 2 (4096-byte LBAs). Files go in `dir`.
 */
export function defaultControllers(dir: string): NvmeControllerSpec[] {
  return [
    {
      id: 'nvme0',
      serial: 'rnull-nvme-a',
      slot: 4,
      namespaces: [{ nsid: 1, file: path.join(dir, 'nvme0-ns1.img'), sizeBytes: 64 << 20, blockSize: 512 }],
    },
    {
      id: 'nvme1',
      serial: 'rnull-nvme-b',
      slot: 5,
      namespaces: [
        { nsid: 1, file: path.join(dir, 'nvme1-ns1.img'), sizeBytes: 32 << 20, blockSize: 512 },
        { nsid: 2, file: path.join(dir, 'nvme1-ns2.img'), sizeBytes: 48 << 20, blockSize: 4096 },
      ],
    },
  ];
}

/** Creates each namespace's backing file (sparse, zero-filled) at its size. */
export function createBackingFiles(controllers: NvmeControllerSpec[]): void {
  for (const c of controllers) {
    for (const ns of c.namespaces) {
      fs.mkdirSync(path.dirname(ns.file), { recursive: true });
      fs.closeSync(fs.openSync(ns.file, 'w'));
      fs.truncateSync(ns.file, ns.sizeBytes);
    }
  }
}

/** QEMU arguments for the controllers and the read-only 9p share of the host root. */
export function nvmeQemuArgs(controllers: NvmeControllerSpec[]): string[] {
  const args: string[] = [];
  for (const c of controllers) {
    args.push('-device', [`nvme`, `id=${c.id}`, `serial=${c.serial}`, `addr=0x${c.slot.toString(16)}`, ...(c.properties ?? [])].join(','));
    for (const ns of c.namespaces) {
      const drive = `${c.id}n${ns.nsid}`;
      args.push('-drive', [`file=${ns.file},if=none,id=${drive},format=raw,cache=writeback,discard=unmap`, ...(ns.driveOptions ?? [])].join(','));
      args.push(
        '-device',
        `nvme-ns,drive=${drive},bus=${c.id},nsid=${ns.nsid},logical_block_size=${ns.blockSize},physical_block_size=${ns.blockSize}`,
      );
    }
  }
  // Explicit slot: automatically placed devices would collide with the controllers' fixed slots.
  args.push('-fsdev', 'local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap');
  args.push('-device', 'virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot,addr=0x10');
  return args;
}

/** Kernel modules the guest loads at boot (9p for the host root, vfio for the controllers). */
export const NVME_GUEST_MODULES = ['qemu_fw_cfg', 'virtio_pci', '9pnet_virtio', '9p', 'vfio_pci', 'vfio_iommu_type1'];

/**
 * The guest image for NVMe runs: the project's initramfs builder with only busybox and the
 * modules above (no fio: every program comes from the host root over 9p). Cached.
 */
export function nvmeGuestImage(cacheDir = path.join(process.env.TMPDIR ?? '/tmp', 'rnull-guest-cache')): GuestImage {
  return buildInitramfs({ cacheDir, modules: NVME_GUEST_MODULES, programs: [] });
}

/** Where the host root is mounted in the guest before the chroot. */
const HOST = '/host';

/**
 * The guest-side shell script: mount the host root, bind the controllers to vfio-pci, run
 * `node script args` chrooted into the host root (same paths as on the host), then report the
 * number of DMAR fault lines in the kernel log (val dmar_faults N) and the script's status.
 */
export function guestScript(controllers: NvmeControllerSpec[], nodeScript: string, args: string[]): string {
  const q = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`;
  const bdfs = controllers.map(bdfOf).join(' ');
  return `
mkdir -p ${HOST}
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro,cache=loose hostroot ${HOST}
mount -t proc proc ${HOST}/proc
mount -t sysfs sysfs ${HOST}/sys
mount -t devtmpfs devtmpfs ${HOST}/dev
mount -t tmpfs tmpfs ${HOST}/run
for bdf in ${bdfs}; do
  [ -e /sys/bus/pci/devices/$bdf ] || { echo "no PCI device $bdf"; lspci 2>/dev/null || ls /sys/bus/pci/devices; exit 3; }
  echo vfio-pci > /sys/bus/pci/devices/$bdf/driver_override
  echo $bdf > /sys/bus/pci/drivers_probe
  val "group_$bdf" "$(basename "$(readlink /sys/bus/pci/devices/$bdf/iommu_group)")"
  val "driver_$bdf" "$(basename "$(readlink /sys/bus/pci/devices/$bdf/driver)")"
done
ls ${HOST}/dev/vfio
status=0
t0=$(cat /proc/uptime | cut -d' ' -f1)
chroot ${HOST} /usr/bin/env HOME=/run PATH=/usr/local/bin:/usr/bin:/bin node ${q(nodeScript)} ${args.map(q).join(' ')} || status=$?
t1=$(cat /proc/uptime | cut -d' ' -f1)
val node_seconds "$(echo "$t0 $t1" | awk '{printf "%.2f", $2 - $1}')"
val node_status $status
val dmar_faults "$(dmesg | grep -c -i -E 'DMAR.*fault|DMAR:.*\\[DMA (Read|Write)' || true)"
dmesg | grep -i -E 'DMAR|vfio' | tail -n 20 || true
exit $status
`;
}

export interface NvmeGuestOptions {
  image: GuestImage;
  /** Run directory: script, logs. */
  workDir: string;
  controllers: NvmeControllerSpec[];
  /** Absolute path (host = guest path) of the node script to run. */
  nodeScript: string;
  args?: string[];
  /** Hard limit for the whole run, ms. */
  timeoutMs: number;
  cpus?: number;
  memoryMiB?: number;
  /** More guest kernel arguments (e.g. "tsc=reliable": clock reads without a trap to QEMU's HPET). */
  kernelArgs?: string[];
}

/**
 * Boots the guest and runs the node script; resolves when it exited 0, throws GuestRunError
 * (with the console tail) otherwise or at the timeout.
 */
export async function runNvmeGuest(o: NvmeGuestOptions): Promise<GuestRunResult> {
  if (!path.isAbsolute(o.nodeScript)) throw new Error(`node script ${o.nodeScript} must be an absolute path`);
  return runGuestScript({
    image: o.image,
    script: guestScript(o.controllers, o.nodeScript, o.args ?? []),
    workDir: o.workDir,
    timeoutMs: o.timeoutMs,
    cpus: o.cpus ?? 2,
    memoryMiB: o.memoryMiB ?? 2048,
    kernelArgs: ['intel_iommu=on', 'iommu.strict=1', ...(o.kernelArgs ?? [])],
    iommu: true,
    extraArgs: nvmeQemuArgs(o.controllers),
  });
}

/** The worktree root: guest scripts, dist/ and the vhost-bench client are at the same paths in the guest. */
export const ROOT = path.join(__dirname, '..', '..');

/** Byte i of the test pattern for `seed`: the same function as test/guest/check-util.js's pattern. */
export function pattern(seed: number, i: number): number {
  return (i * 7 + seed * 13 + (i >>> 9) * 3 + 1) & 0xff;
}

/** `bytes` bytes of the pattern for `seed`. */
export function patterned(seed: number, bytes: number): Buffer {
  return Buffer.from(Array.from({ length: bytes }, (_, j) => pattern(seed, j)));
}

/** `bytes` bytes of a host file (a namespace's backing file) from byte `offset` (short at the end of the file: zero-filled). */
export function readBacking(file: string, offset: number, bytes: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(bytes);
    fs.readSync(fd, b, 0, bytes, offset);
    return b;
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Compiles project TypeScript files (paths relative to ROOT) to dist/ for a guest script to
 * require, as one program (so the const enums they use are inlined). Only the named files are
 * written unless `withImports` (then every file they import too).
 * @throws Error when a file cannot be emitted.
 */
export function compileForGuest(files: string[], withImports = false): void {
  const options: ts.CompilerOptions = { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2022, rootDir: ROOT, outDir: path.join(ROOT, 'dist'), skipLibCheck: true, esModuleInterop: true, types: ['node'] };
  const abs = files.map((f) => path.join(ROOT, f));
  const program = ts.createProgram(abs, options);
  for (const f of withImports ? [undefined] : abs) {
    if (program.emit(f === undefined ? undefined : program.getSourceFile(f)).emitSkipped) throw new Error(`cannot compile ${f ?? files.join(', ')}`);
  }
}

/** The project's test front-end (test/helpers), which the in-guest check scripts drive. */
export const FRONTEND_HELPERS = ['frontend', 'guest-ram', 'driver-ring'].map((f) => `test/helpers/${f}.ts`);

/** Per-boot hard limit: RNULL_E2E_GUEST_TIMEOUT_S seconds (default 300), in ms. */
export const GUEST_TIMEOUT_MS = Number(process.env.RNULL_E2E_GUEST_TIMEOUT_S ?? 300) * 1000;

/** What one jest file's NVMe guest boot runs (see NvmeGuestRun.boot). */
export interface NvmeGuestRunOptions {
  controllers: NvmeControllerSpec[];
  /** The node script to run in the guest: a file name in test/guest. */
  script: string;
  /** A file under dist/ the run needs (its absence means "run npm run build first"). */
  needs: string;
  /** Build vhost-bench (bench/client) on the host first. */
  bench?: boolean;
  /** Compile the test front-end (FRONTEND_HELPERS) into dist/ first. */
  frontend?: boolean;
  /** The script's argument, JSON-encoded; computed in beforeAll after the steps above. */
  plan: () => unknown;
  /** Hard limit for the boot, ms (default GUEST_TIMEOUT_MS). */
  timeoutMs?: number;
  kernelArgs?: string[];
  /** The rest of the timings line, from the guest's values (`v`: the value or "?"). */
  timings?: (v: (name: string) => string) => string;
}

/**
 * One jest file's NVMe guest run: a run directory (made at once, so specs can name files in it),
 * then `boot` registers the beforeAll that builds what the guest needs, creates the backing files,
 * boots the guest, runs the script and parses its report, and the afterAll that removes the
 * directory (kept with RNULL_E2E_KEEP=1 or when the boot failed).
 */
export class NvmeGuestRun {
  readonly workDir: string;
  report!: GuestReport;
  /** The script's whole output (stdout and stderr of the guest shell). */
  output = '';
  /** The guest image (built or cached), once booted. */
  image?: GuestImage;
  private script = '';

  /** Names the run directory (rnull-e2e-<name>-*) and the timings line (guest-<name>). */
  readonly name: string;

  constructor(name: string) {
    this.name = name;
    this.workDir = fs.mkdtempSync(path.join(process.env.TMPDIR ?? os.tmpdir(), `rnull-e2e-${name}-`));
  }

  boot(o: NvmeGuestRunOptions): void {
    const timeoutMs = o.timeoutMs ?? GUEST_TIMEOUT_MS;
    this.script = o.script;
    beforeAll(async () => {
      requireQemu();
      if (!fs.existsSync(path.join(ROOT, 'dist', o.needs))) throw new Error('dist/ is not built: run npm run build first');
      if (o.bench === true) cp.execFileSync('make', ['-C', path.join(ROOT, 'bench', 'client')], { stdio: 'pipe' });
      if (o.frontend === true) compileForGuest(FRONTEND_HELPERS);
      createBackingFiles(o.controllers);
      const args = [JSON.stringify(o.plan())];
      this.image = nvmeGuestImage();
      const t = Date.now();
      const result = await runNvmeGuest({ image: this.image, workDir: this.workDir, controllers: o.controllers, nodeScript: path.join(ROOT, 'test', 'guest', o.script), args, timeoutMs, kernelArgs: o.kernelArgs });
      this.output = result.output;
      this.report = parseGuestOutput(result.output);
      const v = (n: string): string => this.report.values.get(n) ?? '?';
      const head = `guest boot+run ${Date.now() - t} ms (image ${this.image.built ? 'built' : 'cached'}), node in guest ${v('node_seconds')} s`;
      const rest = o.timings === undefined ? '' : o.timings(v);
      console.log(`guest-${this.name} timings: ${head}${rest === '' || rest.startsWith('\n') ? '' : '; '}${rest}`);
    }, timeoutMs + 120_000);
    afterAll(() => {
      if (process.env.RNULL_E2E_KEEP !== '1' && this.report !== undefined) fs.rmSync(this.workDir, { recursive: true, force: true });
    });
  }

  /**
   * The script ran to its end: exit status 0 (and, with `done`, its "@@VAL done 1"), no
   * "<script> failed" line, no DMAR fault in the guest's kernel log.
   */
  expectCompleted(done = true): void {
    expect(count(this.report, 'node_status')).toBe(0);
    if (done) expect(count(this.report, 'done')).toBe(1);
    expect(count(this.report, 'dmar_faults')).toBe(0);
    expect(this.output).not.toMatch(new RegExp(`${this.script.replace(/\.js$/, '')} failed`));
  }
}
