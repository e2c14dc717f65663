/**
 * A hostile front-end's fds (issue 9, defects 1 and 2): kick/call/err fds must be eventfds,
 * guest memory fds must be sealed memfds (or regular/hugetlbfs files holding the region), and
 * each region is mapped from its page-aligned offset.
 */
import { execFileSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { native } from '../../native';
import { Req } from '../../vhost/protocol';
import { startBackend, TestBackend, until } from '../helpers/backend';
import { TestFrontend, u64 } from '../helpers/frontend';

let be: TestBackend | undefined;
let fe: TestFrontend | undefined;
let dir: string;
const opened: number[] = [];

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-fds-'));
});

afterEach(async () => {
  fe?.close();
  fe = undefined;
  await be?.close();
  be = undefined;
  for (const fd of opened.splice(0)) fs.closeSync(fd);
  fs.rmSync(dir, { recursive: true, force: true });
});

/** An fd of the given kind, closed after the test (the daemon closes its received copy). */
function fdOf(kind: 'pipe' | 'devnull' | 'socket' | 'regular'): number {
  let fd: number;
  if (kind === 'pipe') {
    const p = path.join(dir, 'fifo');
    execFileSync('mkfifo', [p]);
    fd = fs.openSync(p, fs.constants.O_RDWR | fs.constants.O_NONBLOCK); // a pipe with both ends open
  } else if (kind === 'devnull') {
    fd = fs.openSync('/dev/null', 'r+');
  } else if (kind === 'socket') {
    return native.connectUnix(be!.socket); // a second connection: refused and closed by the daemon
  } else {
    fd = fs.openSync(path.join(dir, 'file'), 'w+');
  }
  opened.push(fd);
  return fd;
}

async function expectRefused(logPattern: RegExp): Promise<void> {
  await fe!.waitClosed();
  await until(() => be!.logs.some((l) => l.level === 50 && logPattern.test(String(l.msg))), `error log ${logPattern}`);
  fe!.close();
  fe = new TestFrontend(be!.socket);
  await fe.setup();
  expect(await fe.blk(0, 0, 0, { readLen: 512 })).toMatchObject({ status: 0 });
}

describe('kick, call and err fds must be eventfds', () => {
  test('fdKind tells eventfds, memfds and regular files from the rest', () => {
    be = startBackend();
    const ev = native.eventfd();
    const mem = native.memfdCreate('kind', 4096);
    try {
      expect(native.fdKind(ev)).toBe('eventfd');
      expect(native.fdKind(mem)).toBe('memfd');
      expect(native.fdKind(fdOf('regular'))).toBe('regular');
      expect(native.fdKind(fdOf('pipe'))).toBe('other');
      expect(native.fdKind(fdOf('devnull'))).toBe('other');
      expect(native.fdKind(native.listenUnix(path.join(dir, 's')))).toBe('other');
    } finally {
      native.close(ev);
      native.close(mem);
    }
  });

  test('a pipe sent as SET_VRING_CALL is refused with a logged error and a disconnect; the next front-end is served', async () => {
    be = startBackend();
    fe = new TestFrontend(be.socket);
    await fe.setup();
    fe.send(Req.SET_VRING_CALL, u64(0n), [fdOf('pipe')]);
    await expectRefused(/SET_VRING_CALL: expected an eventfd, got an fd of kind other/);
  });

  const cases: Array<[number, string, 'pipe' | 'devnull' | 'socket' | 'regular']> = [
    [Req.SET_VRING_KICK, 'SET_VRING_KICK', 'devnull'],
    [Req.SET_VRING_KICK, 'SET_VRING_KICK', 'pipe'],
    [Req.SET_VRING_CALL, 'SET_VRING_CALL', 'socket'],
    [Req.SET_VRING_CALL, 'SET_VRING_CALL', 'regular'],
    [Req.SET_VRING_ERR, 'SET_VRING_ERR', 'pipe'],
    [Req.SET_VRING_ERR, 'SET_VRING_ERR', 'devnull'],
  ];
  test.each(cases)('request %i (%s) with a %s fd is refused', async (req, name, kind) => {
    be = startBackend();
    fe = new TestFrontend(be.socket);
    await fe.setup();
    fe.send(req, u64(1n), [fdOf(kind)]);
    await expectRefused(new RegExp(`${name}: expected an eventfd, got an fd of kind`));
  });
});

describe('guest memory fds', () => {
  test('an unsealed memfd in SET_MEM_TABLE is refused (a shrink would SIGBUS the daemon)', async () => {
    be = startBackend();
    fe = new TestFrontend(be.socket);
    const fd = native.memfdCreate('unsealed', 8 << 20, false);
    try {
      fe.send(Req.SET_MEM_TABLE, fe.memTablePayload(), [fd, fd]);
      await expectRefused(/SET_MEM_TABLE: region 0: memfd without F_SEAL_SHRINK/);
    } finally {
      native.close(fd);
    }
  });

  test('a sealed memfd whose region lies beyond its size is refused', async () => {
    be = startBackend();
    fe = new TestFrontend(be.socket);
    const fd = native.memfdCreate('small', 4 << 20); // the second region starts at its end
    try {
      fe.send(Req.SET_MEM_TABLE, fe.memTablePayload(), [fd, fd]);
      await expectRefused(/SET_MEM_TABLE: memory region ends at byte 8388608 of an fd that has only 4194304 \(region 1\)/);
    } finally {
      native.close(fd);
    }
  });

  test('a pipe as a memory region fd is refused, naming its kind', async () => {
    be = startBackend();
    fe = new TestFrontend(be.socket);
    const fd = fdOf('pipe');
    fe.send(Req.SET_MEM_TABLE, fe.memTablePayload(), [fd, fd]);
    await expectRefused(/SET_MEM_TABLE: region 0: an fd of kind other cannot back guest memory/);
  });

  test('a regular file holding the regions is accepted and served', async () => {
    be = startBackend();
    fe = new TestFrontend(be.socket);
    const fd = fdOf('regular');
    fs.ftruncateSync(fd, 8 << 20);
    const probe = new native.GuestMemory([{ gpa: 0, size: 8 << 20, uaddr: 0, mmapOffset: 0, fd }]);
    probe.unmap();
    fe.send(Req.SET_MEM_TABLE, fe.memTablePayload(), [fd, fd]);
    expect(await fe.getU64(Req.GET_QUEUE_NUM)).toBe(2n);
    expect(be.logs.some((l) => /guest memory mapped/.test(String(l.msg)))).toBe(true);
  });

  test('a region is mapped from its page-aligned offset: the right bytes, even 128 TiB into the file', () => {
    const far = 2 ** 47 + 3 * 4096 + 100; // beyond what a mapping from offset 0 could ever cover
    const fd = native.memfdCreate('far', far + (2 << 20)); // sparse, sealed
    try {
      const pattern = Buffer.from(Array.from({ length: 8192 }, (_, i) => (i * 7 + 3) & 0xff));
      fs.writeSync(fd, pattern, 0, pattern.length, far);
      fs.writeSync(fd, Buffer.from([0xaa]), 0, 1, far - 1);
      const mem = new native.GuestMemory([{ gpa: 0x1000, size: 1 << 20, uaddr: 0x7000, mmapOffset: far, fd }]);
      const view = Buffer.from(mem.chunks()[0]);
      expect(view.length).toBe(1 << 20);
      expect(view.subarray(0, 8192).equals(pattern)).toBe(true);
      view[8192] = 0x5c; // shared: the write reaches the file at the same offset
      const back = Buffer.alloc(1);
      fs.readSync(fd, back, 0, 1, far + 8192);
      expect(back[0]).toBe(0x5c);
      mem.unmap();
    } finally {
      native.close(fd);
    }
  });
});
