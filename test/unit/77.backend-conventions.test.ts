/**
 * The vhost-user back-end program conventions (vhost-user.rst) and the command line's own:
 * `--fd N` serves a listening socket passed in (and refuses anything else with exit 2),
 * `--socket-path`, `--print-capabilities` (JSON for type "block", other arguments ignored),
 * bare `--read-only`, the descriptor file, `--version`, and usage errors: exit 2 with one line
 * and a hint, not the whole help.
 */
import { ChildProcess, spawn, spawnSync, StdioOptions } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { Req } from '../../vhost/protocol';
import { native } from '../../native';
import { until } from '../helpers/backend';
import { TestFrontend } from '../helpers/frontend';

const ROOT = path.join(__dirname, '..', '..');
const BIN = path.join(ROOT, 'bin', 'rnull');
const VIRTIO_BLK_F_RO = 1n << 5n;

let dir: string;
let proc: ChildProcess | undefined;
const fds: number[] = [];

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-conv-'));
});
afterEach(() => {
  if (proc !== undefined && proc.exitCode === null) proc.kill('SIGKILL');
  proc = undefined;
  for (const fd of fds.splice(0)) native.close(fd);
  fs.rmSync(dir, { recursive: true, force: true });
});

function run(args: string[], stdio: StdioOptions = ['ignore', 'pipe', 'pipe']): { proc: ChildProcess; out: string[]; err: string[]; exit: Promise<number | null> } {
  const p = spawn(process.execPath, [BIN, ...args], { cwd: dir, stdio });
  proc = p;
  const out: string[] = [];
  const err: string[] = [];
  p.stdout!.on('data', (d: Buffer) => out.push(...d.toString().split('\n').filter((l) => l !== '')));
  p.stderr!.on('data', (d: Buffer) => err.push(...d.toString().split('\n').filter((l) => l !== '')));
  const exit = new Promise<number | null>((resolve) => p.on('exit', (code) => resolve(code)));
  return { proc: p, out, err, exit };
}

describe('--fd', () => {
  test('serves a listening unix socket passed as fd 3; the socket file is left to its owner at exit', async () => {
    const sock = path.join(dir, 'passed.sock');
    const lfd = native.listenUnix(sock, 0o600);
    fds.push(lfd);
    const d = run(['--fd', '3', '--size', '8'], ['ignore', 'pipe', 'pipe', lfd]);
    await until(() => d.out.some((l) => l.includes('listening on a passed socket')), 'the daemon to serve fd 3', 15000);
    const fe = new TestFrontend(sock);
    expect((await fe.getConfig(0, 8)).subarray(12).readBigUInt64LE(0)).toBe(8n * 2048n);
    fe.close();
    // The disk is named after the passed socket's path, which the attach hint shows.
    await until(() => d.out.some((l) => l.includes('vhost-user-blk-pci')), 'the attach hint', 15000);
    const hint = JSON.parse(d.out.find((l) => l.includes('vhost-user-blk-pci'))!) as { qemu: string };
    expect(hint.qemu).toContain(`path=${sock}`);
    expect(JSON.parse(d.out.find((l) => l.includes('listening on a passed socket'))!)).toMatchObject({ disk: 'passed', fd: expect.any(Number) });
    d.proc.kill('SIGTERM');
    expect(await d.exit).toBe(0);
    expect(fs.lstatSync(sock).isSocket()).toBe(true);
  });

  test.each([
    ['a regular file', (): number => fs.openSync(path.join(dir, 'f'), 'w'), /--fd 3: not a socket/],
    ['a connected (not listening) unix socket', (): 'pipe' => 'pipe', /--fd 3: a unix stream socket that is not listening/],
  ] as const)('%s: exit 2 with the reason', async (_what, make, reason) => {
    const f = make();
    if (typeof f === 'number') fds.push(f);
    const d = run(['--fd', '3'], ['ignore', 'pipe', 'pipe', f]);
    expect(await d.exit).toBe(2);
    expect(d.err.join('\n')).toMatch(reason);
    expect(d.err[d.err.length - 1]).toBe('(see rnull --help)');
  });

  test('an fd that is not open, stdin, --fd with --socket-path, --fd with two disks: exit 2', () => {
    const r1 = spawnSync(process.execPath, [BIN, '--fd', '77'], { cwd: dir, encoding: 'utf8', timeout: 20000 });
    expect(r1.status).toBe(2);
    expect(r1.stderr).toMatch(/^rnull: --fd 77: not an open file descriptor/);
    const r2 = spawnSync(process.execPath, [BIN, '--fd', '0'], { cwd: dir, encoding: 'utf8', timeout: 20000 });
    expect(r2.status).toBe(2);
    const r3 = spawnSync(process.execPath, [BIN, '--fd', '3', '--socket-path', path.join(dir, 'x.sock')], { cwd: dir, encoding: 'utf8', timeout: 20000 });
    expect(r3.status).toBe(2);
    expect(r3.stderr).toContain('--fd cannot be combined with --socket-path');
    const sock = path.join(dir, 'two.sock');
    const lfd = native.listenUnix(sock);
    fds.push(lfd);
    const cfg = path.join(dir, 'vm.json');
    fs.writeFileSync(cfg, JSON.stringify({ disks: [{ socket: path.join(dir, 'a.sock') }, { socket: path.join(dir, 'b.sock') }] }));
    const r4 = spawnSync(process.execPath, [BIN, '--fd', '3', '--config', cfg], { cwd: dir, encoding: 'utf8', timeout: 20000, stdio: ['ignore', 'pipe', 'pipe', lfd] });
    expect(r4.status).toBe(2);
    expect(r4.stderr).toContain('--fd serves one disk, but the configuration has 2');
    expect(fs.existsSync(path.join(dir, 'a.sock'))).toBe(false);
  });
});

describe('--print-capabilities, --socket-path, --read-only, the descriptor', () => {
  test('--print-capabilities prints VHostUserBackendCapabilities for "block" and exits 0, ignoring other arguments', () => {
    for (const args of [['--print-capabilities'], ['--size', 'big', '--print-capabilities', '--socket-path', '/nonexistent/x.sock']]) {
      const r = spawnSync(process.execPath, [BIN, ...args], { cwd: dir, encoding: 'utf8', timeout: 20000 });
      expect(r.status).toBe(0);
      expect(JSON.parse(r.stdout)).toEqual({ type: 'block', features: ['read-only'] });
      expect(r.stderr).toBe('');
    }
    expect(fs.readdirSync(dir)).toEqual([]);
  });

  test('--socket-path serves like --socket; a bare --read-only offers the disk read-only', async () => {
    const sock = path.join(dir, 'sp.sock');
    const d = run(['--socket-path', sock, '--size', '4', '--read-only']);
    await until(() => fs.existsSync(sock), 'socket', 15000);
    const fe = new TestFrontend(sock);
    expect((await fe.getU64(Req.GET_FEATURES)) & VIRTIO_BLK_F_RO).toBe(VIRTIO_BLK_F_RO);
    fe.close();
    d.proc.kill('SIGTERM');
    expect(await d.exit).toBe(0);
    const r = spawnSync(process.execPath, [BIN, '--socket', path.join(dir, 'a.sock'), '--socket-path', path.join(dir, 'b.sock')], { cwd: dir, encoding: 'utf8', timeout: 20000 });
    expect(r.status).toBe(2);
    expect(r.stderr).toContain('--socket and --socket-path name the same setting');
  });

  test('qemu/50-rnull.json is a VhostUserBackend descriptor of type "block"', () => {
    const desc = JSON.parse(fs.readFileSync(path.join(ROOT, 'qemu', '50-rnull.json'), 'utf8')) as Record<string, unknown>;
    expect(Object.keys(desc).sort()).toEqual(['binary', 'description', 'tags', 'type']);
    expect(desc.type).toBe('block');
    expect(path.isAbsolute(String(desc.binary))).toBe(true);
    expect(typeof desc.description).toBe('string');
    expect(Array.isArray(desc.tags) && desc.tags.every((t) => typeof t === 'string')).toBe(true);
  });
});

describe('the command line', () => {
  test('--version prints the package version', () => {
    const version = (JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;
    for (const flag of ['--version', '-V']) {
      const r = spawnSync(process.execPath, [BIN, flag], { cwd: dir, encoding: 'utf8', timeout: 20000 });
      expect(r.status).toBe(0);
      expect(r.stdout).toBe(`${version}\n`);
    }
  });

  test.each([
    [['--bogus'], "rnull: unknown option '--bogus'"],
    [['--size', 'big'], 'rnull: option \'--size <MiB>\' argument \'big\' is invalid. --size expects a whole number, got "big"'],
    [['extra-argument'], "rnull: too many arguments. Expected 0 arguments but got 1."],
    [['ctl', '-m', '/nonexistent', 'badblocks', 'd', 'frob'], 'rnull: action must be list, add or remove, got "frob"'],
  ])('%j: exit 2, one line and a hint, no help dump', (args, line) => {
    const r = spawnSync(process.execPath, [BIN, ...args], { cwd: dir, encoding: 'utf8', timeout: 20000 });
    expect(r.status).toBe(2);
    expect(r.stderr.trimEnd().split('\n')).toEqual([line, '(see rnull --help)']);
    expect(r.stdout).toBe('');
  });

  test('a bad value from a flag is a configuration error: exit 2, one line naming it', () => {
    const r = spawnSync(process.execPath, [BIN, '--blocksize', '3000'], { cwd: dir, encoding: 'utf8', timeout: 20000 });
    expect(r.status).toBe(2);
    expect(r.stderr).toBe('rnull: command line: disks[0]: blocksize: must be one of the possible values: [512,1024,2048,4096]: value was 3000\n');
  });
});
