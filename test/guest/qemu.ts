/**
 * Boots a throw-away QEMU guest whose only disk is a vhost-user-blk device
 * served by a back-end listening on a unix socket, runs one shell script in
 * it, and collects what the script printed.
 *
 * How the pieces talk (see initramfs.ts for the guest half):
 *  - the script goes in through fw_cfg (opt/rnull/cmd), so one cached
 *    initramfs serves every boot;
 *  - the kernel console goes to the first serial port -> console.log;
 *  - the script's stdout+stderr go to the second serial port -> out.log,
 *    followed by "@@EXIT <status>" written by the guest's init;
 *  - the guest powers itself off; -no-reboot and panic=-1 make QEMU exit on
 *    a power-off, a reboot or a kernel panic alike.
 * Every run has a hard timeout after which QEMU is killed, so a back-end that
 * hangs can never hang the caller.
 *
 * The vhost-user back-end is not started here: the caller starts whatever
 * serves the socket (rnull, or qemu-storage-daemon as a reference), which
 * must be listening before QEMU starts.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { EXIT_MARKER, FW_CFG_SCRIPT_NAME, type GuestImage } from './initramfs';

/** The vhost-user-blk disk attached to the guest (it appears as /dev/vda). */
export interface VhostUserBlkDisk {
  /** Unix socket the back-end listens on. */
  socketPath: string;
  /** Queues offered to the guest; the guest uses min(numQueues, cpus). */
  numQueues: number;
  /**
   * Seconds between QEMU's attempts to reconnect to the socket after the back-end went away
   * (`-chardev socket,...,reconnect=N`); default: no reconnect.
   */
  reconnect?: number;
}

export interface GuestRunOptions {
  image: GuestImage;
  /** The vhost-user-blk disk; omitted for guests that get their devices from extraArgs only. */
  disk?: VhostUserBlkDisk;
  /** Shell script (busybox sh) run as root in the guest. */
  script: string;
  /** Directory for this boot's files (script, logs); created if missing. */
  workDir: string;
  /** Hard limit for the whole boot-run-poweroff cycle. */
  timeoutMs: number;
  /** vCPUs (default 1). */
  cpus?: number;
  /** Guest RAM in MiB (default 512); it is shared memfd memory, as vhost-user requires. */
  memoryMiB?: number;
  /** Emulator binary (default: qemu-system-x86_64 from PATH). */
  qemuBinary?: string;
  /** Extra kernel command line arguments. */
  kernelArgs?: string[];
  /**
   * More vhost-user-blk disks, each on its own chardev, attached after `disk`
   * (the guest usually names them vdb, vdc, ... in this order; a script that
   * must be sure can match /sys/block/vd* by serial). Default: none.
   */
  extraDisks?: VhostUserBlkDisk[];
  /**
   * Aborting kills QEMU at once, e.g. when the back-end died and the guest
   * would otherwise wait for I/O until the timeout.
   */
  signal?: AbortSignal;
  /**
   * Called with the script's output so far (as `output` in the result) every
   * 100 ms while the guest runs, for a test that acts from the host at a
   * point of the script: change the back-end's state while the guest waits
   * for it, or pull the plug. Returning 'kill' SIGKILLs QEMU at once, as a
   * power failure would (no shutdown, nothing flushed); the run then counts
   * as complete (killedByWatch). A watch that throws kills QEMU too, and the
   * run is aborted with its error.
   */
  watch?: (output: string) => 'kill' | undefined;
  /**
   * An emulated Intel IOMMU with interrupt remapping (`-device intel-iommu,intremap=on,caching-mode=on`),
   * placed before every PCI device; the guest also needs `intel_iommu=on` (kernelArgs). Default: none.
   */
  iommu?: boolean;
  /** More QEMU arguments, appended after the disks (e.g. NVMe controllers, 9p shares). */
  extraArgs?: string[];
}

/** What a guest run produced. */
export interface GuestRunResult {
  /** Exit status of the guest script, or null if the guest never reported one. */
  scriptExitCode: number | null;
  /** What the script printed (stdout+stderr), without the exit marker. */
  output: string;
  /** The guest kernel console (boot log, init messages, oopses). */
  console: string;
  /** QEMU's own stderr (e.g. "Failed to connect to ... socket"). */
  qemuStderr: string;
  qemuExit: { code: number | null; signal: NodeJS.Signals | null };
  timedOut: boolean;
  /** Why the run was aborted through opts.signal (or by a failing watch), if it was. */
  aborted: string | null;
  /** The watch asked for QEMU to be killed (opts.watch returned 'kill'). */
  killedByWatch: boolean;
  durationMs: number;
  /** Directory holding console.log, out.log, qemu.stderr.log and the script. */
  workDir: string;
}

/** Raised by runGuestScript when the guest did not run the script to a zero exit. */
export class GuestRunError extends Error {
  override name = 'GuestRunError';
  constructor(
    message: string,
    readonly result: GuestRunResult,
  ) {
    super(message);
  }
}

/** Last n lines of a text, for error messages. */
export function tail(text: string, lines = 40): string {
  return text.split('\n').slice(-lines).join('\n');
}

/**
 * Finds the emulator, or throws a message saying how to install it. Call it
 * early: a missing QEMU must fail the test loudly, never skip it.
 */
export function requireQemu(binary = 'qemu-system-x86_64'): string {
  const probe = spawnSync(binary, ['--version'], { encoding: 'utf8' });
  if (probe.error !== undefined || probe.status !== 0) {
    throw new Error(
      `${binary} is not usable (${probe.error?.message ?? probe.stderr.trim()}); ` +
        'run scripts/install-deps.sh to install QEMU and the other guest test bed packages',
    );
  }
  return binary;
}

/** QEMUs still running, killed if the test process exits early. */
const live = new Set<ChildProcess>();
process.on('exit', () => {
  for (const child of live) child.kill('SIGKILL');
});

/**
 * Prelude prepended to every guest script: stop at the first failing
 * command (pipes included), and helpers to emit machine-readable results.
 * Markers start on a fresh line, whatever the previous command printed.
 *   val NAME VALUE       -> "@@VAL NAME VALUE"
 *   block NAME FILE      -> "@@BEGIN NAME", the file, "@@END NAME"
 */
const SCRIPT_PRELUDE = `set -eu
set -o pipefail
val() { printf '\n@@VAL %s %s\n' "$1" "$2"; }
block() { printf '\n@@BEGIN %s\n' "$1"; cat "$2"; printf '\n@@END %s\n' "$1"; }
`;

/**
 * Shell functions for guest scripts that work on disks (busybox sh; prepend
 * them to a script that uses them):
 *  dev_by_serial S      /dev/vdX of the disk whose serial is S (fails if none)
 *  check NAME F1 OFF1 F2 OFF2 LEN
 *                       compares LEN bytes of F1 at OFF1 with F2 at OFF2:
 *                       reports "same", or "differs: <cmp's first message>"
 *                       (busybox cmp -n lists every differing byte)
 *  nonzero FILE|DEV     prints how many bytes are not zero (O_DIRECT for devices)
 *  fresh                drops the guest's caches, so reads reach the back-end
 */
export const DISK_HELPERS = `
dev_by_serial() {
  for d in /sys/block/vd*; do
    if [ "$(cat "$d/serial")" = "$1" ]; then echo "/dev/\${d##*/}"; return 0; fi
  done
  echo "no disk with serial $1" >&2
  return 1
}
check() {
  if cmp -s -n "$6" "$2" "$4" "$3" "$5"; then val "$1" same
  else val "$1" "differs: $(cmp -n "$6" "$2" "$4" "$3" "$5" 2>&1 | head -n 1 || true)"; fi
}
nonzero() {
  if [ -b "$1" ]; then dd if="$1" bs=1M iflag=direct 2>/dev/null | tr -d '\\000' | wc -c
  else tr -d '\\000' < "$1" | wc -c; fi
}
fresh() { sync; echo 3 > /proc/sys/vm/drop_caches; }
`;

/** Builds the QEMU command line for one run. */
function qemuArgs(opts: GuestRunOptions, files: { script: string; console: string; output: string }): string[] {
  const mem = opts.memoryMiB ?? 512;
  const cpus = opts.cpus ?? 1;
  const append = ['console=ttyS0', 'panic=-1', 'oops=panic', ...(opts.kernelArgs ?? [])].join(' ');
  return [
    // No usable KVM on the test machines: multi-threaded TCG, one thread per vCPU.
    '-machine', 'q35',
    '-accel', 'tcg,thread=multi',
    '-cpu', 'max',
    '-smp', String(cpus),
    // vhost-user needs guest RAM the back-end can map: a shared memfd.
    '-object', `memory-backend-memfd,id=mem,size=${mem}M,share=on`,
    '-numa', 'node,memdev=mem',
    '-m', `${mem}M`,
    '-kernel', opts.image.kernel.image,
    '-initrd', opts.image.initramfs,
    '-append', append,
    '-fw_cfg', `name=${FW_CFG_SCRIPT_NAME},file=${files.script}`,
    '-serial', `file:${files.console}`,
    '-serial', `file:${files.output}`,
    ...(opts.iommu === true ? ['-device', 'intel-iommu,intremap=on,caching-mode=on'] : []),
    ...(opts.disk === undefined
      ? []
      : [
          '-chardev', `socket,id=vub0,path=${opts.disk.socketPath}${opts.disk.reconnect !== undefined ? `,reconnect=${opts.disk.reconnect}` : ''}`,
          '-device', `vhost-user-blk-pci,chardev=vub0,num-queues=${opts.disk.numQueues}`,
        ]),
    ...(opts.extraDisks ?? []).flatMap((disk, i) => [
      '-chardev', `socket,id=vub${i + 1},path=${disk.socketPath}`,
      '-device', `vhost-user-blk-pci,chardev=vub${i + 1},num-queues=${disk.numQueues}`,
    ]),
    ...(opts.extraArgs ?? []),
    '-no-reboot',
    '-display', 'none',
    '-nodefaults',
    '-monitor', 'none',
  ];
}

/** The init's "@@EXIT <status>" line in the output port's text, if it is there. */
function exitMarker(raw: string): RegExpExecArray | null {
  return new RegExp(`^${EXIT_MARKER} (\\d+)$`, 'm').exec(raw.replace(/\r/g, ''));
}

/** The script's output: the output port's text without carriage returns and the exit marker. */
function scriptOutput(raw: string): string {
  const text = raw.replace(/\r/g, '');
  const marker = exitMarker(text);
  return marker !== null ? text.slice(0, marker.index) : text;
}

/** Reads a file that may not exist (QEMU may have died before creating it). */
function readIfExists(file: string): string {
  return fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : '';
}

/**
 * Boots the guest, runs opts.script and waits for QEMU to exit (or kills it
 * at the timeout). Never throws for guest-side failures: inspect the result,
 * or use runGuestScript which does.
 */
export async function runGuest(opts: GuestRunOptions): Promise<GuestRunResult> {
  fs.mkdirSync(opts.workDir, { recursive: true });
  const files = {
    script: path.join(opts.workDir, 'guest-script.sh'),
    console: path.join(opts.workDir, 'console.log'),
    output: path.join(opts.workDir, 'out.log'),
    stderr: path.join(opts.workDir, 'qemu.stderr.log'),
  };
  fs.writeFileSync(files.script, SCRIPT_PRELUDE + opts.script);
  for (const f of [files.console, files.output, files.stderr]) fs.rmSync(f, { force: true });

  const started = Date.now();
  const qemu = spawn(opts.qemuBinary ?? 'qemu-system-x86_64', qemuArgs(opts, files), {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  live.add(qemu);
  let stderr = '';
  qemu.stderr?.setEncoding('utf8').on('data', (chunk: string) => {
    stderr += chunk;
  });

  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    qemu.kill('SIGKILL');
  }, opts.timeoutMs);
  let aborted: string | null = null;
  const onAbort = (): void => {
    aborted = String(opts.signal?.reason ?? 'aborted');
    qemu.kill('SIGKILL');
  };
  if (opts.signal?.aborted === true) onAbort();
  opts.signal?.addEventListener('abort', onAbort, { once: true });

  let killedByWatch = false;
  const watch = opts.watch;
  const watcher =
    watch === undefined
      ? undefined
      : setInterval(() => {
          if (killedByWatch || aborted !== null || timedOut) return;
          try {
            if (watch(scriptOutput(readIfExists(files.output))) === 'kill') {
              killedByWatch = true;
              qemu.kill('SIGKILL');
            }
          } catch (err) {
            aborted = `watch failed: ${(err as Error).message}`;
            qemu.kill('SIGKILL');
          }
        }, 100);

  const qemuExit = await new Promise<GuestRunResult['qemuExit']>((resolve) => {
    qemu.on('error', (err) => {
      stderr += `spawn failed: ${err.message}\n`;
      resolve({ code: null, signal: null });
    });
    qemu.on('close', (code, signal) => resolve({ code, signal }));
  });
  clearTimeout(timer);
  clearInterval(watcher);
  opts.signal?.removeEventListener('abort', onAbort);
  live.delete(qemu);
  fs.writeFileSync(files.stderr, stderr);

  const raw = readIfExists(files.output);
  const marker = exitMarker(raw);
  return {
    scriptExitCode: marker?.[1] !== undefined ? Number(marker[1]) : null,
    output: scriptOutput(raw),
    console: readIfExists(files.console),
    qemuStderr: stderr,
    qemuExit,
    timedOut,
    aborted,
    killedByWatch,
    durationMs: Date.now() - started,
    workDir: opts.workDir,
  };
}

/** Human-readable account of a failed run: why, plus the tails of every log. */
export function describeFailure(result: GuestRunResult): string {
  let why: string;
  if (result.timedOut) why = `QEMU killed after the timeout (${result.durationMs} ms)`;
  else if (result.aborted !== null) why = `QEMU killed: ${result.aborted}`;
  else if (result.killedByWatch) why = 'QEMU killed by the watch (as asked)';
  else if (result.scriptExitCode === null) {
    why = `guest never finished its script (QEMU exit code ${result.qemuExit.code}, signal ${result.qemuExit.signal})`;
  } else why = `guest script exited with status ${result.scriptExitCode}`;
  return [
    why,
    `logs in ${result.workDir}`,
    '--- guest script output (tail) ---',
    tail(result.output),
    '--- guest console (tail) ---',
    tail(result.console),
    '--- qemu stderr ---',
    tail(result.qemuStderr, 20),
  ].join('\n');
}

/**
 * runGuest, but throws GuestRunError unless the script ran and exited 0 (or
 * the watch killed QEMU, as it asked to).
 */
export async function runGuestScript(opts: GuestRunOptions): Promise<GuestRunResult> {
  const result = await runGuest(opts);
  if (result.timedOut || result.aborted !== null || (result.scriptExitCode !== 0 && !result.killedByWatch)) {
    throw new GuestRunError(describeFailure(result), result);
  }
  return result;
}

/** Results a guest script reported with the prelude's val/block helpers. */
export interface GuestReport {
  values: Map<string, string>;
  blocks: Map<string, string>;
}

/** Parses "@@VAL name value" lines and "@@BEGIN name" ... "@@END name" blocks. */
export function parseGuestOutput(output: string): GuestReport {
  const values = new Map<string, string>();
  const blocks = new Map<string, string>();
  const lines = output.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i] ?? '';
    const val = /^@@VAL (\S+) ?(.*)$/.exec(line);
    if (val?.[1] !== undefined) {
      values.set(val[1], val[2] ?? '');
      continue;
    }
    const begin = /^@@BEGIN (\S+)$/.exec(line);
    if (begin?.[1] !== undefined) {
      const name = begin[1];
      const end = lines.indexOf(`@@END ${name}`, i + 1);
      if (end < 0) throw new Error(`guest output: block ${name} is not terminated`);
      blocks.set(name, lines.slice(i + 1, end).join('\n'));
      i = end;
    }
  }
  return { values, blocks };
}

/** A value the guest reported with `val`, which must be present. */
export function value(report: GuestReport, name: string): string {
  const v = report.values.get(name);
  if (v === undefined) throw new Error(`guest did not report ${name}`);
  return v;
}

/** A whole-number value the guest reported. */
export function count(report: GuestReport, name: string): number {
  const v = value(report, name);
  if (!/^\d+$/.test(v)) throw new Error(`guest reported ${name} = "${v}", not a whole number`);
  return Number(v);
}
