/**
 * The systemd unit and its installer: scripts/install-service.sh into a temporary prefix
 * installs a wrapper that runs (--version, --print-capabilities), a descriptor naming that
 * wrapper, the example configuration (valid, sockets under the unit's RuntimeDirectory, mode
 * 0660 group kvm; kept on a second install), and a template unit that `systemd-analyze verify`
 * accepts without a single warning, with the settings the service relies on. The example
 * configuration then serves with the socket's mode and group already set when it appears.
 */
import { spawn, spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { loadConfig } from '../../config/load';
import { until } from '../helpers/backend';

const ROOT = path.join(__dirname, '..', '..');
const UNIT = fs.readFileSync(path.join(ROOT, 'systemd', 'rnull@.service'), 'utf8');

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-install-'));
});
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

/** The unit's [Service] settings: key -> every value given (in order). */
function settings(text: string): Map<string, string[]> {
  const m = new Map<string, string[]>();
  for (const line of text.split('\n')) {
    const t = line.trim();
    if (t === '' || t.startsWith('#') || t.startsWith('[')) continue;
    const i = t.indexOf('=');
    m.set(t.slice(0, i), [...(m.get(t.slice(0, i)) ?? []), t.slice(i + 1)]);
  }
  return m;
}

describe('systemd/rnull@.service', () => {
  const s = settings(UNIT);
  const one = (k: string): string | undefined => s.get(k)?.[0];

  test('notify with watchdog, restart on failure but not after exit 2, reload by SIGHUP, per-instance config and runtime directory', () => {
    expect(one('Type')).toBe('notify');
    expect(one('WatchdogSec')).toMatch(/^\d+s$/);
    expect(one('Restart')).toBe('on-failure');
    expect(one('RestartPreventExitStatus')).toBe('2');
    expect(one('ExecReload')).toBe('/bin/kill -HUP $MAINPID');
    expect(one('ExecStart')).toBe('/usr/local/bin/rnull --config /etc/rnull/%i.json');
    expect(one('RuntimeDirectory')).toBe('rnull/%i');
  });

  test('sockets for group kvm; VFIO devices allowed, MEMLOCK unlimited, W^X left off for V8', () => {
    expect(one('Group')).toBe('kvm');
    expect(one('UMask')).toBe('0007');
    expect(one('PrivateDevices')).toBeUndefined();
    expect(one('DevicePolicy')).toBe('closed');
    expect(s.get('DeviceAllow')).toEqual(['/dev/vfio/vfio rw', 'char-vfio rw']);
    expect(one('LimitMEMLOCK')).toBe('infinity');
    expect(one('MemoryDenyWriteExecute')).toBe('no');
    expect(one('ProtectSystem')).toBe('strict');
    expect(one('RestrictAddressFamilies')).toBe('AF_UNIX');
  });
});

describe('scripts/install-service.sh into a temporary prefix', () => {
  const env = (): NodeJS.ProcessEnv => ({
    ...process.env,
    PREFIX: path.join(dir, 'usr', 'local'),
    SYSCONFDIR: path.join(dir, 'etc'),
    UNITDIR: path.join(dir, 'etc', 'systemd', 'system'),
    QEMUDATADIR: path.join(dir, 'usr', 'share', 'qemu'),
  });
  const bin = (): string => path.join(dir, 'usr', 'local', 'bin', 'rnull');

  beforeAll(() => {
    const r = spawnSync(path.join(ROOT, 'scripts', 'install-service.sh'), [], { env: env(), encoding: 'utf8', timeout: 120000 });
    if (r.status !== 0) throw new Error(`install-service.sh failed (${r.status}): ${r.stderr}`);
  }, 180000);

  test('the wrapper runs the installed daemon: --version, --print-capabilities', () => {
    const v = spawnSync(bin(), ['--version'], { encoding: 'utf8', timeout: 20000 });
    expect(v.status).toBe(0);
    expect(v.stdout.trim()).toBe((JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string }).version);
    const c = spawnSync(bin(), ['--print-capabilities'], { encoding: 'utf8', timeout: 20000 });
    expect(JSON.parse(c.stdout)).toEqual({ type: 'block', features: ['read-only'] });
    // It runs from its own copy, not this checkout.
    expect(fs.readFileSync(bin(), 'utf8')).toContain(path.join(dir, 'usr', 'local', 'lib', 'rnull', 'bin', 'rnull'));
  });

  test('the descriptor names the wrapper', () => {
    const d = JSON.parse(fs.readFileSync(path.join(dir, 'usr', 'share', 'qemu', 'vhost-user', '50-rnull.json'), 'utf8')) as Record<string, unknown>;
    expect(d).toMatchObject({ type: 'block', binary: bin() });
  });

  test('the installed unit passes systemd-analyze verify with no warning', () => {
    const unitDir = path.join(dir, 'etc', 'systemd', 'system');
    const unit = fs.readFileSync(path.join(unitDir, 'rnull@.service'), 'utf8');
    expect(settings(unit).get('ExecStart')).toEqual([`${bin()} --config ${path.join(dir, 'etc', 'rnull')}/%i.json`]);
    // verify names the template's instance "i"; it checks syntax, every setting and ExecStart.
    const r = spawnSync('systemd-analyze', ['verify', './rnull@.service'], { cwd: unitDir, encoding: 'utf8', timeout: 60000 });
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    // And it does catch a bad setting (so an empty stderr means something).
    fs.writeFileSync(path.join(dir, 'bad@.service'), unit.replace(/^WatchdogSec=.*$/m, 'WatchdogSec=soon'));
    const bad = spawnSync('systemd-analyze', ['verify', './bad@.service'], { cwd: dir, encoding: 'utf8', timeout: 60000 });
    expect(bad.stderr).toContain('Failed to parse sec value');
  });

  test('the example configuration is valid and kept by a second install', () => {
    const example = path.join(dir, 'etc', 'rnull', 'example.json');
    const c = loadConfig(example, {});
    expect(c.disks.map((x) => [x.socket, x.socket_mode, x.socket_group])).toEqual([['/run/rnull/example/disk0.sock', '0660', 'kvm']]);
    expect(c.management_socket).toBe('/run/rnull/example/ctl.sock');
    fs.writeFileSync(example, fs.readFileSync(example, 'utf8').replace('"size": 1024', '"size": 64'));
    const r = spawnSync(path.join(ROOT, 'scripts', 'install-service.sh'), [], { env: env(), encoding: 'utf8', timeout: 120000 });
    expect(r.status).toBe(0);
    expect(r.stdout).toContain('kept the existing');
    expect(loadConfig(example, {}).disks[0].size).toBe(64);
  }, 180000);

  test('the example served from another runtime directory: the socket has mode 0660 and its group from the moment it appears', async () => {
    // The daemon runs as root here (CI), so chown to any group works. kvm exists on a Debian host
    // with udev; a bare container may lack it, then group "daemon" (base-files) stands in.
    let group = 'kvm';
    let g = spawnSync('getent', ['group', group], { encoding: 'utf8' });
    if (g.status !== 0) {
      group = 'daemon';
      g = spawnSync('getent', ['group', group], { encoding: 'utf8' });
    }
    expect(g.status).toBe(0);
    const gid = Number(g.stdout.split(':')[2]);
    const run = path.join(dir, 'run');
    fs.mkdirSync(run);
    const cfg = path.join(dir, 'etc', 'rnull', 'vm1.json');
    const text = fs
      .readFileSync(path.join(dir, 'etc', 'rnull', 'example.json'), 'utf8')
      .split('/run/rnull/example')
      .join(run)
      .replace('"socket_group": "kvm"', `"socket_group": "${group}"`);
    fs.writeFileSync(cfg, text);
    const sock = path.join(run, 'disk0.sock');
    const p = spawn(bin(), ['--config', cfg], { stdio: ['ignore', 'pipe', 'pipe'] });
    const exit = new Promise<number | null>((resolve) => p.on('exit', (code) => resolve(code)));
    let first: fs.Stats | null = null;
    await until(() => {
      try {
        first = fs.lstatSync(sock);
        return true;
      } catch {
        return false;
      }
    }, 'the socket', 20000);
    const st = first as unknown as fs.Stats;
    expect(st.isSocket()).toBe(true);
    expect(st.mode & 0o777).toBe(0o660);
    expect(st.gid).toBe(gid);
    p.kill('SIGTERM');
    expect(await exit).toBe(0);
  }, 60000);
});
