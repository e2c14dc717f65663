/**
 * driver "nvme" configuration and start-up checks (config/load.ts, daemon/nvme-disk.ts): the
 * keys and flags, what is refused with nvme, and the checks that stop the daemon with exit
 * status 2 and what to do (device not on vfio-pci, no IOMMU group, memlock limit too low).
 */
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { ConfigError, loadConfig } from '../../config/load';
import { checkNvmeSetup, memlockStatus, NvmeSetupError } from '../../daemon/nvme-disk';

const MAIN = path.join(__dirname, '..', '..', 'dist', 'daemon', 'main.js');

function file(content: unknown): string {
  const p = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-cfg-')), 'vm.json');
  fs.writeFileSync(p, JSON.stringify(content));
  return p;
}

describe('config: driver nvme', () => {
  test('driver defaults to null; nvme takes pci, nsid, nvme_poll from a file or flags', () => {
    expect(loadConfig(undefined, {}).disks[0]).toMatchObject({ driver: 'null', pci: '', nsid: 1, nvme_poll: false });
    const c = loadConfig(file({ disks: [{ driver: 'nvme', pci: '0000:00:04.0', nsid: 2, socket: '/tmp/v.sock', num_queues: 4 }] }), {});
    expect(c.disks[0]).toMatchObject({ driver: 'nvme', pci: '0000:00:04.0', nsid: 2, num_queues: 4, nvme_poll: false, serial: '' });
    expect(loadConfig(undefined, { driver: 'nvme', pci: '0000:00:05.0', nvme_poll: true, serial: 'mine' }).disks[0]).toMatchObject({ nvme_poll: true, serial: 'mine' });
  });

  test.each([
    [{ driver: 'nvme' }, /pci: driver "nvme" needs the PCI address/],
    [{ driver: 'nvme', pci: '0000:00:04.0', size: 64 }, /size: cannot be given with driver "nvme" \(the capacity and logical block size come from the namespace\)/],
    [{ driver: 'nvme', pci: '0000:00:04.0', blocksize: 4096 }, /blocksize: cannot be given with driver "nvme"/],
    [{ driver: 'nvme', pci: '0000:00:04.0', memory_backed: false }, /memory_backed: cannot be given with driver "nvme" \(it is a setting of the null driver\)/],
    [{ driver: 'nvme', pci: '0000:00:04.0', threads: 2 }, /threads 2 exceeds num_queues 1 \(driver "nvme" has 1 queue unless num_queues is given\)/],
    [{ driver: 'nvme', pci: '4:0' }, /PCI address like 0000:00:04.0/],
    [{ driver: 'disk' }, /driver/],
    [{ pci: '0000:00:04.0' }, /pci: applies to driver "nvme" only/],
    [{ nvme_poll: true }, /nvme_poll: applies to driver "nvme" only/],
  ])('refused: %j', (disk, message) => {
    expect(() => loadConfig(file({ disks: [disk] }), {})).toThrow(ConfigError);
    expect(() => loadConfig(file({ disks: [disk] }), {})).toThrow(message);
  });

  test('the flags reach the config; --size with --driver nvme exits 2 with the reason', () => {
    const r = spawnSync(process.execPath, [MAIN, '--driver', 'nvme', '--pci', '0000:00:04.0', '--size', '64', '--socket', '/tmp/x.sock'], { encoding: 'utf8' });
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/size: cannot be given with driver "nvme"/);
  });
});

describe('start-up checks', () => {
  function fakeSys(driver: string | null, group: number | null): string {
    const root = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-sys-'));
    const dev = path.join(root, 'bus/pci/devices/0000:00:04.0');
    fs.mkdirSync(dev, { recursive: true });
    if (driver !== null) fs.symlinkSync(`../../../bus/pci/drivers/${driver}`, path.join(dev, 'driver'));
    if (group !== null) fs.symlinkSync(`../../../kernel/iommu_groups/${group}`, path.join(dev, 'iommu_group'));
    return root;
  }
  function fakeProc(memlock: string, capEff: string): string {
    const root = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-proc-'));
    fs.writeFileSync(path.join(root, 'limits'), `Limit                     Soft Limit           Hard Limit           Units\nMax locked memory         ${memlock}              ${memlock}              bytes\n`);
    fs.writeFileSync(path.join(root, 'status'), `Name:\tnode\nCapEff:\t${capEff}\n`);
    return root;
  }
  const ok = fakeProc('unlimited', '0000000000000000');

  test('a device on another driver: the bind commands', () => {
    const sys = fakeSys('nvme', 3);
    expect(() => checkNvmeSetup('0000:00:04.0', sys, ok)).toThrow(NvmeSetupError);
    expect(() => checkNvmeSetup('0000:00:04.0', sys, ok)).toThrow(
      /bound to nvme, not vfio-pci.*modprobe vfio-pci; echo vfio-pci > \/sys\/bus\/pci\/devices\/0000:00:04.0\/driver_override; echo 0000:00:04.0 > \/sys\/bus\/pci\/devices\/0000:00:04.0\/driver\/unbind; echo 0000:00:04.0 > \/sys\/bus\/pci\/drivers_probe/,
    );
    expect(() => checkNvmeSetup('0000:00:04.0', fakeSys(null, 3), ok)).toThrow(/bound to no driver/);
  });

  test('no such device, no IOMMU group', () => {
    expect(() => checkNvmeSetup('0000:00:09.0', fakeSys('vfio-pci', 3), ok)).toThrow(/no PCI device 0000:00:09.0.*lspci/);
    expect(() => checkNvmeSetup('0000:00:04.0', fakeSys('vfio-pci', null), ok)).toThrow(/no IOMMU group.*intel_iommu=on/);
  });

  test('memlock: too low without CAP_IPC_LOCK says ulimit -l; enough, unlimited or CAP_IPC_LOCK pass', () => {
    const sys = fakeSys('vfio-pci', 3);
    expect(() => checkNvmeSetup('0000:00:04.0', sys, fakeProc('65536', '0000000000000000'))).toThrow(/locked-memory limit is 65536 bytes.*ulimit -l/);
    expect(() => checkNvmeSetup('0000:00:04.0', sys, fakeProc('65536', '0000000000004000'))).not.toThrow(); // CAP_IPC_LOCK
    expect(() => checkNvmeSetup('0000:00:04.0', sys, fakeProc(String(1 << 30), '0'))).not.toThrow();
    expect(() => checkNvmeSetup('0000:00:04.0', sys, ok)).not.toThrow();
    expect(memlockStatus(fakeProc('8388608', '0000000000004000'))).toEqual({ limit: 8388608, capIpcLock: true });
  });
});
