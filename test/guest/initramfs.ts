/**
 * Builds the guest's initramfs (a gzip-compressed "newc" cpio archive) from
 * files already on the host: the host's own kernel and its modules, a static
 * busybox, and a few dynamically linked tools (fio, mkfs.ext4) together with
 * their shared libraries.
 *
 * The archive is written by this file itself (no `cpio` binary, no staging
 * directory, no root needed to create /dev/console), and it is cached: the
 * cache key covers every input (kernel version, module files, programs and
 * their libraries, the init script), so a test run builds it once and later
 * runs reuse it until something on the host changes.
 *
 * The guest's /init (see INIT_SCRIPT below) loads the modules, reads a
 * per-boot shell script from QEMU's fw_cfg (opt/rnull/cmd), runs it with its
 * output on the second serial port and powers the guest off. qemu.ts is the
 * other half of that contract.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as zlib from 'node:zlib';

/** Name of the fw_cfg file that carries the per-boot guest script. */
export const FW_CFG_SCRIPT_NAME = 'opt/rnull/cmd';

/** Line the guest's init writes on the output port once the script has run. */
export const EXIT_MARKER = '@@EXIT';

/**
 * Modules the guest needs; their dependencies are added from modules.dep.
 * crc32c_generic is not a modules.dep dependency of ext4/jbd2 (they ask the
 * crypto API for "crc32c" at run time) but metadata_csum, which mkfs.ext4
 * enables by default, cannot work without it.
 */
export const DEFAULT_MODULES = ['virtio_pci', 'virtio_blk', 'crc32c_generic', 'ext4', 'qemu_fw_cfg'];

/** Host programs copied into the guest (with their shared libraries). */
export const DEFAULT_PROGRAMS = ['/usr/bin/fio', '/usr/sbin/mkfs.ext4'];

/** Static busybox providing sh, mount, dd, cmp, sha256sum, ... */
export const DEFAULT_BUSYBOX = '/usr/bin/busybox';

/** Host files copied verbatim if present (mke2fs reads its defaults from here). */
const OPTIONAL_CONFIG_FILES = ['/etc/mke2fs.conf'];

/** Where the guest keeps the list of modules to insmod, in load order. */
const MODULE_LIST_PATH = '/etc/rnull/modules';
const GUEST_MODULE_DIR = '/lib/modules';

/**
 * PID 1 of the guest. Runs under busybox sh. Its own messages go to the
 * kernel console (ttyS0); the test script's stdout+stderr go to ttyS1,
 * followed by an "@@EXIT <status>" line. It always ends by powering off
 * (sysrq 'o'), so a QEMU started with -no-reboot exits; if anything here
 * dies instead, the kernel panics and panic=-1 + -no-reboot end QEMU too.
 */
const INIT_SCRIPT = `#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export LD_LIBRARY_PATH=@LD_LIBRARY_PATH@
export HOME=/root TERM=dumb

poweroff_now() {
  sync
  echo o > /proc/sysrq-trigger
  sleep 60
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
echo 1 > /proc/sys/kernel/sysrq

# Load the modules in dependency order (the list was computed on the host).
for m in $(cat ${MODULE_LIST_PATH}); do
  insmod ${GUEST_MODULE_DIR}/"$m" || echo "rnull-init: insmod $m failed"
done

# The per-boot script arrives through fw_cfg; give the device a moment.
cmd=/sys/firmware/qemu_fw_cfg/by_name/${FW_CFG_SCRIPT_NAME}/raw
i=0
while [ ! -e "$cmd" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
if [ ! -e "$cmd" ]; then
  echo "rnull-init: no guest script at $cmd"
  poweroff_now
fi
cat "$cmd" > /tmp/cmd.sh

# Output port: no \\n -> \\r\\n translation, so the host reads plain lines.
stty -F /dev/ttyS1 raw -echo 2>/dev/null

echo "rnull-init: running guest script"
sh /tmp/cmd.sh > /dev/ttyS1 2>&1 < /dev/null
rc=$?
echo "${EXIT_MARKER} $rc" > /dev/ttyS1
echo "rnull-init: guest script exited with $rc, powering off"
poweroff_now
`;

/** Bump when the archive layout changes, to invalidate old caches. */
const FORMAT_VERSION = 1;

/** A host kernel that can boot the guest, with its module tree. */
export interface HostKernel {
  version: string;
  /** Path of the bzImage (/boot/vmlinuz-VERSION). */
  image: string;
  /** /lib/modules/VERSION */
  modulesDir: string;
}

/** What buildInitramfs produces: everything QEMU needs to boot the guest. */
export interface GuestImage {
  kernel: HostKernel;
  /** Path of the cached cpio.gz. */
  initramfs: string;
  /** Module files (relative to modulesDir) in the order the guest loads them. */
  modules: string[];
  /** Whether this call built the archive (false: it came from the cache). */
  built: boolean;
}

export interface InitramfsOptions {
  /** Directory for the cached archive (created if missing). */
  cacheDir: string;
  /** Kernel to use; default: the newest /boot/vmlinuz-* with a module tree. */
  kernel?: HostKernel;
  /** Module names (as modprobe spells them); default DEFAULT_MODULES. */
  modules?: string[];
  /** Absolute paths of host programs to include; default DEFAULT_PROGRAMS. */
  programs?: string[];
  /** Path of a static busybox; default DEFAULT_BUSYBOX. */
  busybox?: string;
}

/** Error raised when the host lacks something the guest needs. */
export class GuestImageError extends Error {
  override name = 'GuestImageError';
}

const INSTALL_HINT = 'run scripts/install-deps.sh to install the guest test bed packages';

// ---------------------------------------------------------------------------
// Kernel and modules
// ---------------------------------------------------------------------------

/** Compares kernel version strings numerically, piece by piece. */
function compareVersions(a: string, b: string): number {
  return a.localeCompare(b, 'en', { numeric: true });
}

/**
 * Finds the host's installable guest kernel by globbing /boot/vmlinuz-*.
 * (Not `uname -r`: the host itself may run a different kernel than the one
 * the linux-image package put in /boot.)
 */
export function findHostKernel(bootDir = '/boot', modulesRoot = '/lib/modules'): HostKernel {
  const candidates = (fs.existsSync(bootDir) ? fs.readdirSync(bootDir) : [])
    .filter((f) => f.startsWith('vmlinuz-'))
    .map((f) => f.slice('vmlinuz-'.length))
    .filter((v) => fs.existsSync(path.join(modulesRoot, v, 'modules.dep')))
    .sort(compareVersions);
  const version = candidates[candidates.length - 1];
  if (version === undefined) {
    throw new GuestImageError(
      `no kernel found: need ${bootDir}/vmlinuz-VERSION and ${modulesRoot}/VERSION/modules.dep; ${INSTALL_HINT}`,
    );
  }
  const image = path.join(bootDir, `vmlinuz-${version}`);
  try {
    fs.accessSync(image, fs.constants.R_OK);
  } catch {
    throw new GuestImageError(`kernel image ${image} is not readable by this user`);
  }
  return { version, image, modulesDir: path.join(modulesRoot, version) };
}

/** Module name as the kernel knows it: basename, no .ko[.xz], '-' -> '_'. */
function moduleName(file: string): string {
  return path.basename(file).replace(/\.ko(\.(gz|xz|zst))?$/, '').replace(/-/g, '_');
}

/**
 * Resolves module names to module files in load order (dependencies first),
 * using modules.dep. Names built into the kernel (modules.builtin) are
 * skipped; an unknown name is an error.
 */
export function resolveModules(modulesDir: string, names: readonly string[]): string[] {
  const deps = new Map<string, { file: string; deps: string[] }>();
  for (const line of fs.readFileSync(path.join(modulesDir, 'modules.dep'), 'utf8').split('\n')) {
    const colon = line.indexOf(':');
    if (colon < 0) continue;
    const file = line.slice(0, colon).trim();
    const needs = line.slice(colon + 1).trim().split(/\s+/).filter(Boolean);
    deps.set(moduleName(file), { file, deps: needs.map(moduleName) });
  }
  const builtinPath = path.join(modulesDir, 'modules.builtin');
  const builtin = new Set(
    fs.existsSync(builtinPath)
      ? fs.readFileSync(builtinPath, 'utf8').split('\n').filter(Boolean).map(moduleName)
      : [],
  );

  const order: string[] = [];
  const done = new Set<string>();
  const visit = (rawName: string, chain: string[]): void => {
    const name = rawName.replace(/-/g, '_');
    if (done.has(name) || builtin.has(name)) return;
    const entry = deps.get(name);
    if (entry === undefined) {
      throw new GuestImageError(
        `kernel module ${name} (needed by ${chain.join(' <- ') || 'the guest'}) is neither in ` +
          `${modulesDir}/modules.dep nor built in`,
      );
    }
    if (chain.includes(name)) throw new GuestImageError(`module dependency cycle: ${chain.join(' -> ')}`);
    for (const dep of entry.deps) visit(dep, [...chain, name]);
    done.add(name);
    order.push(entry.file);
  };
  for (const name of names) visit(name, []);
  return order;
}

/** Reads a module file, decompressing it if the distribution compresses modules. */
function readModule(file: string): Buffer {
  if (file.endsWith('.ko')) return fs.readFileSync(file);
  if (file.endsWith('.ko.gz')) return zlib.gunzipSync(fs.readFileSync(file));
  const tool = file.endsWith('.ko.xz') ? 'xz' : file.endsWith('.ko.zst') ? 'zstd' : undefined;
  if (tool === undefined) throw new GuestImageError(`unknown module format: ${file}`);
  try {
    return execFileSync(tool, ['-dc', file], { maxBuffer: 256 << 20 });
  } catch (err) {
    throw new GuestImageError(`cannot decompress ${file} with ${tool}: ${String(err)}`);
  }
}

// ---------------------------------------------------------------------------
// Programs and their shared libraries
// ---------------------------------------------------------------------------

/**
 * Lists the shared objects a dynamically linked program loads, as the paths
 * ldd reports (including the dynamic loader at its own path, e.g.
 * /lib64/ld-linux-x86-64.so.2). A static binary yields an empty list.
 */
export function sharedLibraries(program: string): string[] {
  let out: string;
  try {
    out = execFileSync('ldd', [program], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (err) {
    // ldd exits 1 with "not a dynamic executable" for static binaries.
    const e = err as { stdout?: string; stderr?: string };
    if (`${e.stdout ?? ''}${e.stderr ?? ''}`.includes('not a dynamic executable')) return [];
    throw new GuestImageError(`ldd ${program} failed: ${String(err)}`);
  }
  const libs: string[] = [];
  for (const line of out.split('\n')) {
    const arrow = /=>\s*(\S+)\s+\(0x/.exec(line);
    const direct = /^\s*(\/\S+)\s+\(0x/.exec(line);
    if (line.includes('=> not found')) throw new GuestImageError(`${program}: ${line.trim()}`);
    const lib = arrow?.[1] ?? direct?.[1];
    if (lib !== undefined) libs.push(lib);
  }
  return libs;
}

// ---------------------------------------------------------------------------
// cpio "newc" writer
// ---------------------------------------------------------------------------

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;

/**
 * Accumulates a newc cpio archive in memory (the format the kernel unpacks
 * into its rootfs). Parent directories are added automatically, because the
 * kernel's unpacker does not create them.
 */
export class CpioWriter {
  private readonly chunks: Buffer[] = [];
  private readonly seen = new Set<string>();
  private ino = 1;

  /** Adds a directory (and its parents). */
  dir(p: string, mode = 0o755): void {
    const norm = this.normalize(p);
    if (norm === '' || this.seen.has(norm)) return;
    this.dir(path.posix.dirname(norm), mode);
    this.entry(norm, S_IFDIR | mode, Buffer.alloc(0));
  }

  /** Adds a regular file with the given contents. */
  file(p: string, data: Buffer | string, mode = 0o644): void {
    const norm = this.normalize(p);
    if (this.seen.has(norm)) return; // same library listed by two programs
    this.dir(path.posix.dirname(norm));
    this.entry(norm, S_IFREG | mode, Buffer.isBuffer(data) ? data : Buffer.from(data));
  }

  /** Adds a symbolic link at p pointing to target. */
  symlink(p: string, target: string): void {
    const norm = this.normalize(p);
    if (this.seen.has(norm)) return;
    this.dir(path.posix.dirname(norm));
    this.entry(norm, S_IFLNK | 0o777, Buffer.from(target));
  }

  /** Adds a character device node (e.g. /dev/console before devtmpfs is up). */
  charDevice(p: string, major: number, minor: number, mode = 0o600): void {
    const norm = this.normalize(p);
    this.dir(path.posix.dirname(norm));
    this.entry(norm, S_IFCHR | mode, Buffer.alloc(0), major, minor);
  }

  /** Closes the archive (TRAILER!!!) and returns its bytes. */
  finish(): Buffer {
    this.entry('TRAILER!!!', 0, Buffer.alloc(0), 0, 0, 0);
    return Buffer.concat(this.chunks);
  }

  private normalize(p: string): string {
    return path.posix.normalize(p).replace(/^\/+/, '').replace(/\/+$/, '').replace(/^\.$/, '');
  }

  private entry(name: string, mode: number, data: Buffer, rdevMajor = 0, rdevMinor = 0, ino = this.ino++): void {
    this.seen.add(name);
    const nameBytes = Buffer.from(`${name}\0`);
    const fields = [
      ino,
      mode,
      0, // uid
      0, // gid
      (mode & S_IFDIR) === S_IFDIR ? 2 : 1, // nlink
      0, // mtime: fixed, so identical inputs give identical archives
      data.length,
      0, // devmajor
      0, // devminor
      rdevMajor,
      rdevMinor,
      nameBytes.length,
      0, // check
    ];
    const header = `070701${fields.map((f) => f.toString(16).padStart(8, '0')).join('')}`;
    this.chunks.push(Buffer.from(header, 'ascii'), nameBytes, pad4(header.length + nameBytes.length));
    this.chunks.push(data, pad4(data.length));
  }
}

function pad4(length: number): Buffer {
  return Buffer.alloc((4 - (length % 4)) % 4);
}

// ---------------------------------------------------------------------------
// Putting it together
// ---------------------------------------------------------------------------

/** Everything that goes into the archive, resolved to host paths. */
interface ImagePlan {
  kernel: HostKernel;
  busybox: string;
  applets: string[];
  modules: string[];
  /** guest path -> host path (regular files, symlinks followed). */
  files: Map<string, string>;
  /** guest path -> mode */
  modes: Map<string, number>;
  init: string;
}

/** Checks that a host file exists, with a helpful message if it does not. */
function requireHostFile(file: string, what: string): void {
  if (!fs.existsSync(file)) throw new GuestImageError(`${what} ${file} is missing; ${INSTALL_HINT}`);
}

/** Resolves all inputs without reading their contents (cheap; used for the cache key). */
function planImage(opts: InitramfsOptions): ImagePlan {
  const kernel = opts.kernel ?? findHostKernel();
  const busybox = opts.busybox ?? DEFAULT_BUSYBOX;
  requireHostFile(busybox, 'static busybox');
  if (sharedLibraries(busybox).length > 0) {
    throw new GuestImageError(`${busybox} is not statically linked; install busybox-static`);
  }
  const applets = execFileSync(busybox, ['--list'], { encoding: 'utf8' }).split('\n').filter(Boolean);
  const modules = resolveModules(kernel.modulesDir, opts.modules ?? DEFAULT_MODULES);

  const files = new Map<string, string>();
  const modes = new Map<string, number>();
  for (const program of opts.programs ?? DEFAULT_PROGRAMS) {
    requireHostFile(program, 'program');
    files.set(program, fs.realpathSync(program));
    modes.set(program, 0o755);
    for (const lib of sharedLibraries(program)) {
      files.set(lib, fs.realpathSync(lib));
      modes.set(lib, 0o755);
    }
  }
  for (const conf of OPTIONAL_CONFIG_FILES) {
    if (fs.existsSync(conf)) files.set(conf, conf);
  }

  // The loader finds libraries in their ldd directories (some live in
  // private directories such as /usr/lib/x86_64-linux-gnu/ceph).
  const libDirs = [...new Set([...files.keys()].filter((f) => /\.so(\.|$)/.test(f)).map((f) => path.dirname(f)))];
  const init = INIT_SCRIPT.replace('@LD_LIBRARY_PATH@', libDirs.join(':'));
  return { kernel, busybox, applets, modules, files, modes, init };
}

/** Cache key: a hash over every input's identity (path, size, mtime). */
function cacheKey(plan: ImagePlan): string {
  const stamp = (f: string): string => {
    const st = fs.statSync(f);
    return `${f}:${st.size}:${st.mtimeMs}`;
  };
  const h = createHash('sha256');
  h.update(JSON.stringify({ FORMAT_VERSION, kernel: plan.kernel, init: plan.init, applets: plan.applets }));
  h.update(stamp(plan.kernel.image));
  h.update(stamp(plan.busybox));
  for (const m of plan.modules) h.update(stamp(path.join(plan.kernel.modulesDir, m)));
  for (const [guest, host] of [...plan.files].sort()) h.update(`${guest}=${stamp(host)}`);
  return h.digest('hex').slice(0, 16);
}

/** Serializes the plan into a cpio archive. */
function writeArchive(plan: ImagePlan): Buffer {
  const cpio = new CpioWriter();
  for (const d of ['/dev', '/proc', '/sys', '/tmp', '/mnt', '/root', '/etc', '/bin', '/sbin', '/usr/bin', '/usr/sbin']) {
    cpio.dir(d);
  }
  // The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
  cpio.charDevice('/dev/console', 5, 1);
  cpio.symlink('/etc/mtab', '/proc/mounts'); // mkfs.ext4 checks for mounted filesystems

  cpio.file('/bin/busybox', fs.readFileSync(plan.busybox), 0o755);
  for (const applet of plan.applets) {
    if (applet !== 'busybox') cpio.symlink(`/bin/${applet}`, '/bin/busybox');
  }

  for (const m of plan.modules) {
    cpio.file(path.posix.join(GUEST_MODULE_DIR, path.basename(m).replace(/\.(gz|xz|zst)$/, '')), readModule(path.join(plan.kernel.modulesDir, m)));
  }
  const loadOrder = plan.modules.map((m) => path.basename(m).replace(/\.(gz|xz|zst)$/, ''));
  cpio.file(MODULE_LIST_PATH, `${loadOrder.join('\n')}\n`);

  for (const [guest, host] of plan.files) {
    cpio.file(guest, fs.readFileSync(host), plan.modes.get(guest) ?? 0o644);
  }
  cpio.file('/init', plan.init, 0o755);
  return cpio.finish();
}

/**
 * Removes archives built from older inputs (~40 MB each). Only those unused
 * for an hour: a concurrent run may still be about to boot one.
 */
function pruneCache(cacheDir: string, keep: string): void {
  const hourAgo = Date.now() - 3600_000;
  for (const f of fs.readdirSync(cacheDir)) {
    const file = path.join(cacheDir, f);
    if (file === keep || !/^initramfs-.*\.cpio\.gz$/.test(f)) continue;
    if (fs.statSync(file).mtimeMs < hourAgo) fs.rmSync(file, { force: true });
  }
}

/**
 * Returns a bootable guest image, building the initramfs unless an identical
 * one is already cached in opts.cacheDir. Safe against concurrent callers:
 * the archive is written to a temporary name and renamed into place.
 */
export function buildInitramfs(opts: InitramfsOptions): GuestImage {
  const plan = planImage(opts);
  fs.mkdirSync(opts.cacheDir, { recursive: true });
  const target = path.join(opts.cacheDir, `initramfs-${plan.kernel.version}-${cacheKey(plan)}.cpio.gz`);
  const modules = plan.modules;
  if (fs.existsSync(target)) {
    const now = new Date();
    fs.utimesSync(target, now, now); // mark as in use, for pruneCache
    return { kernel: plan.kernel, initramfs: target, modules, built: false };
  }

  // gzip level 1: the archive is ~100 MB (fio drags in large libraries) and
  // higher levels cost seconds on the host while saving little guest time.
  const gz = zlib.gzipSync(writeArchive(plan), { level: 1 });
  const tmp = `${target}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, gz);
  fs.renameSync(tmp, target);
  pruneCache(opts.cacheDir, target);
  return { kernel: plan.kernel, initramfs: target, modules, built: true };
}
