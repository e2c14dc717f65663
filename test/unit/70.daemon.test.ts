/**
 * daemon/: the real `rnull` process (bin/rnull over dist/), started as a user would: its
 * defaults, its flags, its errors, and a clean SIGTERM/SIGINT shutdown with the socket removed.
 */
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as net from 'net';
import * as os from 'os';
import * as path from 'path';
import { Req } from '../../vhost/protocol';
import { until } from '../helpers/backend';
import { BIN, killDaemon, startRnull, type Daemon } from '../helpers/daemon-process';
import { TestFrontend } from '../helpers/frontend';

let dir: string;
let d: Daemon | undefined;
beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-daemon-'));
});
afterEach(async () => {
  await killDaemon(d);
  d = undefined;
  fs.rmSync(dir, { recursive: true, force: true });
});

test('with no arguments it serves a 1 GiB disk at ./rnull.sock and logs the QEMU command line', async () => {
  d = startRnull([], dir);
  const sock = path.join(dir, 'rnull.sock');
  await until(() => fs.existsSync(sock), 'socket', 10000);
  await until(() => d!.out.some((l) => l.includes('vhost-user-blk-pci')), 'QEMU command line', 10000);
  const line = JSON.parse(d.out.find((l) => l.includes('vhost-user-blk-pci'))!);
  expect(line.qemu).toContain(`-chardev socket,id=rnull0,path=${sock}`);
  expect(line.qemu).toContain('memory-backend-memfd,id=mem,size=1G,share=on');
  const fe = new TestFrontend(sock);
  const cfg = (await fe.getConfig(0, 24)).subarray(12);
  expect(cfg.readBigUInt64LE(0)).toBe(1024n * 2048n);
  expect(cfg.readUInt32LE(20)).toBe(512);
  fe.close();
  d.proc.kill('SIGTERM');
  expect(await d.exit).toBe(0);
  expect(fs.existsSync(sock)).toBe(false);
});

test('SIGINT with a front-end attached and rings running: exits 0, socket removed', async () => {
  const sock = path.join(dir, 'vm1.sock');
  d = startRnull(['--socket', sock, '--size', '8', '--blocksize', '4096', '--num-queues', '2'], dir);
  await until(() => fs.existsSync(sock), 'socket', 10000);
  const fe = new TestFrontend(sock);
  await fe.setup({ queues: 2 });
  expect(await fe.blk(1, 0, 8, { readLen: 4096 })).toMatchObject({ status: 0, len: 4097 });
  d.proc.kill('SIGINT');
  expect(await d.exit).toBe(0);
  expect(fs.existsSync(sock)).toBe(false);
  await fe.waitClosed();
  fe.close();
});

test('a config file with two disks serves both sockets', async () => {
  const cfg = path.join(dir, 'vm.json');
  fs.writeFileSync(cfg, JSON.stringify({ disks: [{ socket: path.join(dir, 'a.sock'), size: 4 }, { socket: path.join(dir, 'b.sock'), size: 8, blocksize: 4096 }] }));
  d = startRnull(['--config', cfg], dir);
  await until(() => fs.existsSync(path.join(dir, 'a.sock')) && fs.existsSync(path.join(dir, 'b.sock')), 'sockets', 10000);
  for (const [name, sectors] of [['a.sock', 4n * 2048n], ['b.sock', 8n * 2048n]] as const) {
    const fe = new TestFrontend(path.join(dir, name));
    expect((await fe.getConfig(0, 8)).subarray(12).readBigUInt64LE(0)).toBe(sectors);
    expect(await fe.getU64(Req.GET_QUEUE_NUM)).toBe(BigInt(Math.min(64, os.availableParallelism()))); // the default: the host's CPUs
    fe.close();
  }
  d.proc.kill('SIGTERM');
  expect(await d.exit).toBe(0);
});

test('a bad config file: exit 2 with a message naming the key, the value and what was expected', () => {
  const cfg = path.join(dir, 'vm.json');
  fs.writeFileSync(cfg, JSON.stringify({ disks: [{ blocksize: 3000 }] }));
  const r = spawnSync(process.execPath, [BIN, '--config', cfg], { cwd: dir, encoding: 'utf8' });
  expect(r.status).toBe(2);
  expect(r.stderr).toContain(`rnull: ${cfg}: disks[0]: blocksize: must be one of the possible values: [512,1024,2048,4096]: value was 3000`);
});

test('a bad flag: non-zero exit and the reason', () => {
  const r = spawnSync(process.execPath, [BIN, '--size', 'big'], { cwd: dir, encoding: 'utf8' });
  expect(r.status).not.toBe(0);
  expect(r.stderr).toContain('--size expects a whole number, got "big"');
});

test('a socket path in use by a live daemon is refused; a stale one is replaced', async () => {
  const sock = path.join(dir, 'x.sock');
  d = startRnull(['--socket', sock], dir);
  await until(() => fs.existsSync(sock), 'socket', 10000);
  const r = spawnSync(process.execPath, [BIN, '--socket', sock], { cwd: dir, encoding: 'utf8' });
  expect(r.status).toBe(1);
  expect(r.stdout).toContain('is in use by another process');
  d.proc.kill('SIGKILL'); // leaves a stale socket file behind
  await d.exit;
  expect(fs.existsSync(sock)).toBe(true);
  d = startRnull(['--socket', sock], dir);
  await until(() => d!.out.some((l) => l.includes('"listening"')), 'listening', 10000);
  const fe = new TestFrontend(sock);
  expect(await fe.getU64(Req.GET_QUEUE_NUM)).toBe(BigInt(Math.min(64, os.availableParallelism())));
  fe.close();
});

test('rnull ctl: bad blocks set at run time through the management socket fail guest I/O', async () => {
  const sock = path.join(dir, 'd.sock');
  const ctl = path.join(dir, 'ctl.sock');
  d = startRnull(['--socket', sock, '--size', '8', '--management-socket', ctl, '--badblocks', '0-7'], dir);
  await until(() => fs.existsSync(sock) && fs.existsSync(ctl), 'sockets', 10000);
  const run = (...args: string[]) => spawnSync(process.execPath, [BIN, 'ctl', '-m', ctl, ...args], { cwd: dir, encoding: 'utf8' });
  expect(JSON.parse(run('badblocks', 'd').stdout)).toMatchObject({ bad_blocks: [{ start: 0, end: 7 }] });
  expect(JSON.parse(run('badblocks', 'd', 'add', '64-71').stdout).bad_blocks).toEqual([{ start: 0, end: 7 }, { start: 64, end: 71 }]);
  const fe = new TestFrontend(sock);
  await fe.setup();
  expect((await fe.blk(0, 0, 64, { readLen: 512 })).status).toBe(1);
  expect((await fe.blk(0, 0, 8, { readLen: 512 })).status).toBe(0);
  run('badblocks', 'd', 'remove', '0-100');
  expect((await fe.blk(0, 0, 64, { readLen: 512 })).status).toBe(0);
  expect(JSON.parse(run('stats', 'd').stdout).queues[0]).toMatchObject({ requests: 3, failed_requests: 1 });
  const bad = run('badblocks', 'nope');
  expect(bad.status).toBe(1);
  expect(JSON.parse(bad.stdout).error).toContain('no disk named "nope"');
  fe.close();
  // A malformed frame gets an error answer and the connection is closed; the daemon goes on.
  const answer = await new Promise<Buffer>((resolve, reject) => {
    const c = net.createConnection(ctl, () => c.write(Buffer.from([0x05, 0xff, 0xff, 0xff, 0xff, 0xff])));
    const parts: Buffer[] = [];
    c.on('data', (b) => parts.push(b));
    c.on('close', () => resolve(Buffer.concat(parts)));
    c.on('error', reject);
  });
  expect(answer.toString('latin1')).toContain('malformed request');
  expect(JSON.parse(run('disks').stdout).disks[0]).toMatchObject({ name: 'd', capacity_sectors: 8 * 2048 });
  d.proc.kill('SIGTERM');
  expect(await d.exit).toBe(0);
});
