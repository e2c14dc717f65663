/**
 * drivers/null/store-file.ts and native/page_store: a memory-backed disk's store file on tmpfs.
 * Reopened, it holds what was written (pages found again from the file's holes and data);
 * discard punches holes (st_blocks falls); holes are never allocated by reads; one process at a
 * time; store_fresh empties it; paths that are not a private regular file on tmpfs of the
 * disk's size are refused with what to do; a full file system fails writes with ENOSPC.
 * Plus the config keys that name the store.
 */
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { loadConfig } from '../../config/load';
import { PAGE_SIZE } from '../../drivers/null/page-store';
import { memoryPageStore, type PageStore } from '../../drivers/null/page-store';
import { openStoreFile, StoreError } from '../../drivers/null/store-file';
import { WriteCache } from '../../drivers/null/write-cache';
import { native } from '../../native';
import { randomOpsAgainstReference, seededRandom } from '../helpers/store-model';

const MIB = 1 << 20;
const ROOT = path.join(__dirname, '..', '..');
const ENOSPC = 28;

let shm: string;
const open: Array<{ close(): void }> = [];
beforeEach(() => {
  shm = fs.mkdtempSync('/dev/shm/rnull-store-file-');
});
afterEach(() => {
  for (const s of open.splice(0)) s.close();
  fs.rmSync(shm, { recursive: true, force: true });
});

function openStore(file: string, size: number, fresh = false) {
  const r = openStoreFile(file, size, { fresh });
  open.push(r.store);
  return r;
}

function pattern(n: number, seed: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 7 + seed * 13 + (i >> 9)) & 0xff;
  return b;
}

describe('a store file', () => {
  test('created 0600 at the disk size, sparse; reopened it holds every byte, its pages found again', () => {
    const file = path.join(shm, 'a.store');
    const a = openStore(file, 8 * MIB);
    expect(a.created).toBe(true);
    const st = fs.statSync(file);
    expect({ size: st.size, mode: st.mode & 0o777, blocks: st.blocks }).toEqual({ size: 8 * MIB, mode: 0o600, blocks: 0 });
    a.store.write(5000, pattern(10000, 1), 0, 10000); // pages 1-3
    a.store.write(6 * MIB, pattern(PAGE_SIZE, 2), 0, PAGE_SIZE); // one page
    expect(a.store.pageCount).toBe(4);
    expect(a.store.bytesAllocated).toBe(4 * PAGE_SIZE);
    a.store.close();
    expect(() => a.store.read(0, Buffer.alloc(1), 0, 1)).toThrow(/closed/);

    const b = openStore(file, 8 * MIB);
    expect(b.created).toBe(false);
    expect(b.store.pageCount).toBe(4);
    const out = Buffer.alloc(10000);
    b.store.read(5000, out, 0, 10000);
    expect(out.equals(pattern(10000, 1))).toBe(true);
    b.store.read(6 * MIB, out, 0, PAGE_SIZE);
    expect(out.subarray(0, PAGE_SIZE).equals(pattern(PAGE_SIZE, 2))).toBe(true);
    // Reading the whole disk, holes included, allocates nothing.
    const all = Buffer.alloc(8 * MIB, 0xee);
    b.store.read(0, all, 0, all.length);
    expect(all.subarray(0, 5000).every((x) => x === 0)).toBe(true);
    expect(all.subarray(15000, 6 * MIB).every((x) => x === 0)).toBe(true);
    expect(b.store.bytesAllocated).toBe(4 * PAGE_SIZE);
    expect(fs.statSync(file).blocks * 512).toBe(4 * PAGE_SIZE);
  });

  test('discard punches holes: st_blocks falls by the whole pages, partial pages are zeroed and kept, all reads zeroes', () => {
    const file = path.join(shm, 'd.store');
    const { store } = openStore(file, 4 * MIB);
    store.write(0, pattern(MIB, 3), 0, MIB); // 256 pages
    expect(fs.statSync(file).blocks * 512).toBe(MIB);
    store.discard(1000, 64 * 1024); // whole pages 1..15, partial 0 and 16
    expect(store.pageCount).toBe(256 - 15);
    expect(fs.statSync(file).blocks * 512).toBe(MIB - 15 * PAGE_SIZE);
    const out = Buffer.alloc(70000, 0xee);
    store.read(0, out, 0, out.length);
    const ref = pattern(MIB, 3).subarray(0, 70000);
    ref.fill(0, 1000, 1000 + 64 * 1024);
    expect(out.equals(ref)).toBe(true);
    store.discard(0, 4 * MIB); // everything, and beyond what was written
    expect(store.pageCount).toBe(0);
    expect(fs.statSync(file).blocks).toBe(0);
    store.close();
    // The holes are in the file: reopened, nothing is found.
    expect(openStore(file, 4 * MIB).store.pageCount).toBe(0);
  });

  test('against a flat reference: seeded writes, reads and discards, reopening the file between rounds', () => {
    const DISK = 3 * MIB;
    const file = path.join(shm, 'r.store');
    const ref = Buffer.alloc(DISK);
    const rnd = seededRandom(4242);
    for (let round = 0; round < 4; round++) {
      const { store } = openStore(file, DISK);
      randomOpsAgainstReference(store, ref, 800, rnd);
      store.close();
    }
    const { store } = openStore(file, DISK);
    const all = Buffer.alloc(DISK);
    store.read(0, all, 0, DISK);
    expect(all.equals(ref)).toBe(true);
    // The file holds exactly the pages that are not all zero... or were written since a discard.
    expect(store.bytesAllocated).toBe(store.pageCount * PAGE_SIZE);
  });

  test('one process at a time: a second open is refused as in use until the first closes', () => {
    const file = path.join(shm, 'l.store');
    const a = openStore(file, MIB);
    a.store.write(0, pattern(512, 4), 0, 512);
    expect(() => openStoreFile(file, MIB)).toThrow(`store ${file} is in use by another process`);
    expect(fs.existsSync(file)).toBe(true); // a refused open removes nothing
    a.store.close();
    const b = openStore(file, MIB);
    const out = Buffer.alloc(512);
    b.store.read(0, out, 0, 512);
    expect(out.equals(pattern(512, 4))).toBe(true);
  });

  test('fresh: the data is dropped and its memory freed; the size may differ then', () => {
    const file = path.join(shm, 'f.store');
    const a = openStore(file, 2 * MIB);
    a.store.write(0, pattern(MIB, 5), 0, MIB);
    a.store.close();
    const b = openStore(file, 4 * MIB, true);
    expect({ pages: b.store.pageCount, size: fs.statSync(file).size, blocks: fs.statSync(file).blocks }).toEqual({ pages: 0, size: 4 * MIB, blocks: 0 });
    const out = Buffer.alloc(MIB, 0xee);
    b.store.read(0, out, 0, MIB);
    expect(out.every((x) => x === 0)).toBe(true);
  });

  test('writes and discards past the end of the disk are RangeErrors; nothing is written', () => {
    const { store } = openStore(path.join(shm, 'e.store'), MIB);
    expect(() => store.write(MIB - 100, Buffer.alloc(200), 0, 200)).toThrow(/range outside the disk/);
    expect(() => store.read(MIB, Buffer.alloc(1), 0, 1)).toThrow(/range outside the disk/);
    expect(() => store.discard(MIB - 4096, 8192)).toThrow(/range outside the disk/);
    expect(store.pageCount).toBe(0);
    expect(store.write(MIB - 200, Buffer.alloc(200, 1), 0, 200)).toBe(0);
  });

  test('a worker thread attaches by id; after close() the id is refused', () => {
    const { store } = openStore(path.join(shm, 'w.store'), MIB);
    const b = new native.PageStore(store.id);
    b.write(4096, Buffer.from('shared'), 0, 6);
    const out = Buffer.alloc(6);
    store.read(4096, out, 0, 6);
    expect(out.toString()).toBe('shared');
    store.close();
    expect(() => new native.PageStore(store.id)).toThrow(/no store with that id/);
    expect(() => b.write(0, Buffer.alloc(1), 0, 1)).toThrow(/closed/);
  });
});

describe('store paths that are refused, with what to do', () => {
  const refused = (file: string, size: number, msg: RegExp): void => {
    let err: unknown;
    try {
      openStore(file, size);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(StoreError);
    expect((err as Error).message).toMatch(msg);
  };

  test('a symbolic link (even to a good store: its target is left alone)', () => {
    const target = path.join(shm, 'target.store');
    openStore(target, MIB).store.close();
    const link = path.join(shm, 'link.store');
    fs.symlinkSync(target, link);
    refused(link, MIB, /is a symbolic link: a store must be a regular file/);
    expect(fs.lstatSync(link).isSymbolicLink()).toBe(true);
    expect(fs.statSync(target).size).toBe(MIB);
  });

  test('a FIFO, a directory, a device', () => {
    const fifo = path.join(shm, 'fifo.store');
    expect(spawnSync('mkfifo', [fifo]).status).toBe(0);
    refused(fifo, MIB, /is a FIFO: a store must be a regular file/);
    const dir = path.join(shm, 'dir.store');
    fs.mkdirSync(dir);
    refused(dir, MIB, /is a directory/);
    refused('/dev/null', MIB, /is a device/);
  });

  test('a file of another size: start with its size, or fresh', () => {
    const file = path.join(shm, 's.store');
    openStore(file, 2 * MIB).store.close();
    refused(file, 4 * MIB, /holds 2097152 bytes, but the disk has 4194304 \(4 MiB\): start with the size it was made with, or with store_fresh/);
    expect(fs.statSync(file).size).toBe(2 * MIB); // left as it was
  });

  test('a file of another user, and one others may write', () => {
    const theirs = path.join(shm, 'theirs.store');
    fs.writeFileSync(theirs, '');
    fs.chmodSync(theirs, 0o600);
    if (process.geteuid!() === 0) fs.chownSync(theirs, 65534, 65534);
    else fs.rmSync(theirs); // not root: cannot give a file away; the mode check below still runs
    if (fs.existsSync(theirs)) refused(theirs, MIB, /belongs to uid 65534, not to this daemon's user/);
    const open = path.join(shm, 'open.store');
    fs.writeFileSync(open, '');
    fs.chmodSync(open, 0o666);
    refused(open, MIB, /is writable by other users \(mode 0666\)/);
  });

  test('a file not on tmpfs: refused, and the file made for it removed again', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-store-disk-'));
    try {
      const file = path.join(dir, 'x.store');
      const fsType = spawnSync('stat', ['-f', '-c', '%T', dir], { encoding: 'utf8' }).stdout.trim();
      if (fsType === 'tmpfs') {
        // This machine's tmpdir is tmpfs: then /var/tmp or the repository's file system is not.
        return refusedElsewhere();
      }
      refused(file, MIB, /is on a file system of type 0x[0-9a-f]+, not tmpfs: .* its store must be on tmpfs/);
      expect(fs.existsSync(file)).toBe(false);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
    function refusedElsewhere(): void {
      const file = path.join(ROOT, `.store-test-${process.pid}.store`);
      try {
        refused(file, MIB, /not tmpfs/);
      } finally {
        fs.rmSync(file, { force: true });
      }
    }
  });

  test('rnull\'s default directory must be private: one others can write is refused', () => {
    const dir = path.join(shm, 'shared');
    fs.mkdirSync(dir, { mode: 0o777 });
    fs.chmodSync(dir, 0o777);
    expect(() => openStoreFile(path.join(dir, 'x.store'), MIB, { privateDir: true })).toThrow(/must be this daemon's user's .* and writable by no one else/);
    const made = path.join(shm, 'made', 'x.store');
    const r = openStoreFile(made, MIB, { privateDir: true });
    open.push(r.store);
    expect(fs.statSync(path.dirname(made)).mode & 0o777).toBe(0o700);
  });
});

describe('a full file system', () => {
  test('writes into holes fail with ENOSPC (no SIGBUS), nothing of them is copied; earlier data and overwrites still work', () => {
    // A private 1 MiB tmpfs in a mount namespace of a child process (cleaned up with it).
    const mnt = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-small-tmpfs-'));
    const script = `
      const { openStoreFile } = require(${JSON.stringify(path.join(ROOT, 'dist', 'drivers', 'null', 'store-file.js'))});
      const { store } = openStoreFile(process.argv[1] + '/x.store', 16 << 20);
      const page = Buffer.alloc(4096, 0x5a);
      let written = 0, err = 0;
      for (let p = 0; p < 4096 && err === 0; p++) { err = store.write(p * 4096, page, 0, 4096); if (err === 0) written++; }
      const after = store.write(0, Buffer.alloc(4096, 0x77), 0, 4096); // an allocated page: no room needed
      const out = Buffer.alloc(4096);
      store.read(0, out, 0, 4096);
      const hole = Buffer.alloc(4096, 0xee);
      store.read(written * 4096, hole, 0, 4096);
      console.log(JSON.stringify({ written, err, after, first: out[0], holeZero: hole.every((b) => b === 0), pages: store.pageCount }));`;
    try {
      const r = spawnSync('unshare', ['-rm', 'sh', '-c', `mount -t tmpfs -o size=1m tmpfs "$1" && exec "${process.execPath}" -e '${script.replace(/'/g, "'\\''")}' "$1"`, 'sh', mnt], {
        encoding: 'utf8',
        timeout: 60_000,
      });
      expect(r.stderr).toBe('');
      const res = JSON.parse(r.stdout.trim()) as Record<string, number | boolean>;
      expect(res).toEqual({ written: 256, err: ENOSPC, after: 0, first: 0x77, holeZero: true, pages: 256 });
    } finally {
      fs.rmSync(mnt, { recursive: true, force: true });
    }
  });
});

describe('config: the store keys', () => {
  test('a relative store is made absolute; nr_devices suffixes it; the default differs per socket', () => {
    const c = loadConfig(undefined, { socket: '/tmp/vm9.sock', store: 'vm9.store', nr_devices: 2 });
    expect(c.disks.map((d) => d.store)).toEqual([path.resolve('vm9.store-0'), path.resolve('vm9.store-1')]);
    const d = loadConfig(undefined, { socket: '/tmp/vm9.sock', nr_devices: 2 });
    expect(d.disks[0].store).not.toBe(d.disks[1].store);
    expect(d.disks[0].store).toMatch(/\/vm9-0-[0-9a-f]{12}\.store$/);
  });

  test('refused: two disks on one store, --store for several disks, a store without memory backing', () => {
    const file = path.join(shm, 'vm.json');
    fs.writeFileSync(file, JSON.stringify({ disks: [{ socket: '/tmp/a.sock', store: '/dev/shm/x.store' }, { socket: '/tmp/b.sock', store: '/dev/shm/x.store' }] }));
    expect(() => loadConfig(file, {})).toThrow(/disks\[1\]\.store: \/dev\/shm\/x\.store is the store of disks\[0\] too/);
    fs.writeFileSync(file, JSON.stringify({ disks: [{ socket: '/tmp/a.sock' }, { socket: '/tmp/b.sock' }] }));
    expect(() => loadConfig(file, { store: '/dev/shm/y.store' })).toThrow(/--store cannot apply to 2 disks/);
    expect(() => loadConfig(undefined, { memory_backed: false, store: '/dev/shm/z.store' })).toThrow(/store: applies to memory-backed null disks only/);
    expect(loadConfig(undefined, { memory_backed: false }).disks[0].store).toBe('');
  });
});

describe('the write cache over a store that runs out of room', () => {
  test('a write needing room and a flush return ENOSPC and keep their pages dirty; nothing is lost; once there is room, flush writes all', () => {
    const real = memoryPageStore(MIB);
    open.push(real);
    let full = false;
    const store = {
      write: (pos: number, src: Uint8Array, off: number, len: number) => (full ? ENOSPC : real.write(pos, src, off, len)),
      read: (pos: number, dst: Uint8Array, off: number, len: number) => real.read(pos, dst, off, len),
      discard: (pos: number, len: number) => real.discard(pos, len),
    } as unknown as PageStore;
    const cache = new WriteCache(store, 2 * PAGE_SIZE);
    expect(cache.write(0, pattern(PAGE_SIZE, 1), 0, PAGE_SIZE)).toBe(0);
    expect(cache.write(PAGE_SIZE, pattern(PAGE_SIZE, 2), 0, PAGE_SIZE)).toBe(0);
    full = true;
    expect(cache.write(2 * PAGE_SIZE, pattern(PAGE_SIZE, 3), 0, PAGE_SIZE)).toBe(ENOSPC); // no room to write one back
    expect(cache.dirtyBytes).toBe(2 * PAGE_SIZE);
    expect(cache.flush()).toBe(ENOSPC);
    expect(cache.dirtyBytes).toBe(2 * PAGE_SIZE);
    cache.setWriteback(false); // its flush fails too: the dirty pages stay, and later writes go through them
    expect(cache.write(0, Buffer.from('new'), 0, 3)).toBe(0);
    const out = Buffer.alloc(PAGE_SIZE);
    cache.read(0, out, 0, PAGE_SIZE);
    expect(out.equals(Buffer.concat([Buffer.from('new'), pattern(PAGE_SIZE, 1).subarray(3)]))).toBe(true);
    cache.discard(PAGE_SIZE + 100, 100); // part of a dirty page: zeroed in the cache
    full = false;
    expect(cache.flush()).toBe(0);
    expect(cache.dirtyBytes).toBe(0);
    real.read(0, out, 0, PAGE_SIZE);
    expect(out.subarray(0, 3).toString()).toBe('new');
    const second = pattern(PAGE_SIZE, 2).fill(0, 100, 200);
    real.read(PAGE_SIZE, out, 0, PAGE_SIZE);
    expect(out.equals(second)).toBe(true);
  });
});
