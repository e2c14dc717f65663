/**
 * The vhost-user socket's mode and group (issue 9, defect 11): 0600 whatever the umask, or
 * socket_mode/socket_group for a QEMU running as another user; set before the socket listens.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { loadConfig } from '../../config/load';
import { Req } from '../../vhost/protocol';
import { parseSocketMode, resolveSocketGroup } from '../../vhost/socket-options';
import { startBackend, TestBackend } from '../helpers/backend';
import { TestFrontend } from '../helpers/frontend';

let be: TestBackend | undefined;
let fe: TestFrontend | undefined;
let savedUmask: number;

beforeEach(() => {
  savedUmask = process.umask(0); // the loosest umask: nothing may depend on it
});

afterEach(async () => {
  process.umask(savedUmask);
  fe?.close();
  fe = undefined;
  await be?.close();
  be = undefined;
});

/** A group this process may give its files, other than its own group when there is one. */
function otherGroup(): { name: string; gid: number } {
  const mine = process.getgid!();
  const allowed = (gid: number): boolean => process.getuid!() === 0 || process.getgroups!().includes(gid);
  const groups = fs
    .readFileSync('/etc/group', 'utf8')
    .split('\n')
    .map((l) => l.split(':'))
    .filter((f) => f.length >= 3 && /^\d+$/.test(f[2]))
    .map((f) => ({ name: f[0], gid: Number(f[2]) }))
    .filter((g) => allowed(g.gid));
  return groups.find((g) => g.gid !== mine) ?? groups[0];
}

describe('vhost-user socket mode and group', () => {
  test('with umask 0 the socket is 0600 and serves', async () => {
    be = startBackend();
    const st = fs.statSync(be.socket);
    expect(st.isSocket()).toBe(true);
    expect((st.mode & 0o7777).toString(8)).toBe('600');
    fe = new TestFrontend(be.socket);
    expect(await fe.getU64(Req.GET_QUEUE_NUM)).toBe(2n);
  });

  test('socket_mode "0660" with socket_group (a name) gives that mode and group', async () => {
    const g = otherGroup();
    be = startBackend({ socket_mode: '0660', socket_group: g.name });
    const st = fs.statSync(be.socket);
    expect((st.mode & 0o7777).toString(8)).toBe('660');
    expect(st.gid).toBe(g.gid);
    fe = new TestFrontend(be.socket);
    expect(await fe.getU64(Req.GET_QUEUE_NUM)).toBe(2n);
  });

  test('socket_mode as a number and socket_group as a gid', () => {
    const g = otherGroup();
    be = startBackend({ socket_mode: 0o640, socket_group: g.gid });
    const st = fs.statSync(be.socket);
    expect((st.mode & 0o7777).toString(8)).toBe('640');
    expect(st.gid).toBe(g.gid);
  });

  test('no temporary socket is left behind, and an unknown group fails listen() before anything is bound', () => {
    expect(() => startBackend({ socket_group: 'no-such-group-rnull' })).toThrow(/socket group no-such-group-rnull: no such group/);
    be = startBackend();
    expect(fs.readdirSync(path.dirname(be.socket))).toEqual([path.basename(be.socket)]);
  });

  test('parsing: octal strings and numbers; setuid bits, non-octal digits and bad names are refused', () => {
    expect(parseSocketMode('0660')).toBe(0o660);
    expect(parseSocketMode('660')).toBe(0o660);
    expect(parseSocketMode('0o600')).toBe(0o600);
    expect(parseSocketMode(0o644)).toBe(0o644);
    for (const bad of ['4755', '0680', 'rw', 1024, -1, 1.5, null]) expect(() => parseSocketMode(bad)).toThrow(RangeError);
    expect(resolveSocketGroup('')).toBe(-1);
    expect(resolveSocketGroup('1234')).toBe(1234);
    expect(resolveSocketGroup(otherGroup().name)).toBe(otherGroup().gid);
    expect(() => resolveSocketGroup('bad:name')).toThrow(RangeError);
  });

  test('the configuration takes socket_mode and socket_group and refuses bad ones', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-mode-'));
    try {
      const file = (o: unknown): string => {
        const p = path.join(dir, 'c.json');
        fs.writeFileSync(p, JSON.stringify(o));
        return p;
      };
      const c = loadConfig(file({ disks: [{ socket: '/tmp/a.sock', socket_mode: '0660', socket_group: 'kvm' }] }), {});
      expect(c.disks[0]).toMatchObject({ socket_mode: '0660', socket_group: 'kvm' });
      expect(loadConfig(undefined, {}).disks[0]).toMatchObject({ socket_mode: '0600', socket_group: '' });
      expect(() => loadConfig(file({ disks: [{ socket_mode: '0999' }] }), {})).toThrow(/socket_mode/);
      expect(() => loadConfig(file({ disks: [{ socket_group: 'a b' }] }), {})).toThrow(/socket_group/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
