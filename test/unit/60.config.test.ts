/** config/: per-VM files, flags on top, and messages that name the key, the value and what was expected. */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { ConfigError, loadConfig } from '../../config/load';

function file(content: unknown): string {
  const p = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-cfg-')), 'vm.json');
  fs.writeFileSync(p, typeof content === 'string' ? content : JSON.stringify(content));
  return p;
}

describe('loadConfig()', () => {
  test('no file: one 1 GiB memory-backed disk at ./rnull.sock with 512-byte blocks', () => {
    const c = loadConfig(undefined, {});
    expect(c.disks).toEqual([
      { name: 'rnull', socket: './rnull.sock', socket_mode: '0600', socket_group: '', size: 1024, blocksize: 512, memory_backed: true, store: expect.stringMatching(/\/rnull-[0-9a-f]{12}\.store$/), store_fresh: false, store_remove_on_exit: false, num_queues: Math.min(64, os.availableParallelism()), threads: 1, cpus: [], read_only: false, serial: 'rnull', poll_us: 50, irqmode: 0, completion_nsec: null, io_timeout: 30000, discard: false, badblocks: [], badblocks_once: false, mbps: 0, cache_size: 0, hw_queue_depth: 1024, submit_queues: null, shared_tags: false, nr_devices: 1, rotational: false, driver: 'null', pci: '', nsid: 1, nvme_poll: false, shadow_doorbells: false },
    ]);
    expect(c.log_level).toBe('info');
    expect(c.management_socket).toBe('');
  });

  test('flags override the defaults', () => {
    const c = loadConfig(undefined, { socket: '/tmp/vm1.sock', size: 64, blocksize: 4096, memory_backed: false });
    expect(c.disks[0]).toMatchObject({ name: 'vm1', socket: '/tmp/vm1.sock', size: 64, blocksize: 4096, memory_backed: false });
  });

  test('a file with several disks; flags apply to each', () => {
    const p = file({ log_level: 'debug', disks: [{ socket: '/tmp/a.sock', size: 10 }, { socket: '/tmp/b.sock', name: 'data', read_only: true }] });
    const c = loadConfig(p, { num_queues: 4 });
    expect(c.log_level).toBe('debug');
    expect(c.disks.map((d) => [d.name, d.size, d.read_only, d.num_queues])).toEqual([
      ['a', 10, false, 4],
      ['data', 1024, true, 4],
    ]);
  });

  const bad: Array<[string, unknown, RegExp]> = [
    ['a block size null_blk would refuse', { disks: [{ blocksize: 1000 }] }, /disks\[0\]: blocksize: must be one of the possible values: \[512,1024,2048,4096\]: value was 1000/],
    ['a negative size', { disks: [{ size: -5 }] }, /disks\[0\]: size: expected a positive whole number: value was -5/],
    ['a misspelled key', { disks: [{ memorybacked: false }] }, /disks\[0\]: configuration param 'memorybacked' not declared in the schema/],
    ['a boolean given as a string', { disks: [{ memory_backed: 'yes' }] }, /memory_backed: expected true or false: value was "yes"/],
    ['too many queues', { disks: [{ num_queues: 65 }] }, /num_queues: expected a whole number from 1 to 64: value was 65/],
    ['a long serial', { disks: [{ serial: 'x'.repeat(21) }] }, /serial: expected at most 20 printable ASCII characters/],
    ['an unknown log level', { log_level: 'loud' }, /log_level: must be one of the possible values/],
    ['two disks on one socket', { disks: [{ socket: '/tmp/x.sock' }, { socket: '/tmp/x.sock' }] }, /disks\[1\]\.socket: \/tmp\/x\.sock is used by another disk/],
    ['a disk that is not an object', { disks: [7] }, /disks\[0\]: expected an object/],
  ];
  test.each(bad)('refuses %s, naming the file and key', (_what, content, pattern) => {
    const p = file(content);
    expect(() => loadConfig(p, {})).toThrow(ConfigError);
    expect(() => loadConfig(p, {})).toThrow(pattern);
    expect(() => loadConfig(p, {})).toThrow(p);
  });

  test('refuses a file that is not JSON, or does not exist', () => {
    expect(() => loadConfig(file('{ disks: ['), {})).toThrow(/is not valid JSON/);
    expect(() => loadConfig('/nonexistent/vm.json', {})).toThrow(/cannot read config file \/nonexistent\/vm.json/);
  });

  test('refuses --socket for a file with several disks', () => {
    const p = file({ disks: [{ socket: '/tmp/a.sock' }, { socket: '/tmp/b.sock' }] });
    expect(() => loadConfig(p, { socket: '/tmp/c.sock' })).toThrow(/--socket cannot apply to 2 disks/);
  });
});

describe('null_blk option combinations', () => {
  test('discard without memory backing is refused', () => {
    expect(() => loadConfig(undefined, { discard: true, memory_backed: false })).toThrow(/discard: needs memory_backed true/);
  });
  test('completion_nsec outside timer mode is refused', () => {
    expect(() => loadConfig(undefined, { completion_nsec: 5000 })).toThrow(/completion_nsec: applies to irqmode 2 \(timer\) only, but irqmode is 0/);
    expect(loadConfig(undefined, { completion_nsec: 5000, irqmode: 2 }).disks[0]).toMatchObject({ irqmode: 2, completion_nsec: 5000 });
  });
  test('threads: at most num_queues; per-disk state (cache, bandwidth, shared tags, bad-once) needs one thread', () => {
    expect(loadConfig(undefined, { threads: 2, num_queues: 4 }).disks[0]).toMatchObject({ threads: 2, num_queues: 4 });
    expect(() => loadConfig(undefined, { threads: 3, num_queues: 2 })).toThrow(/threads 3 exceeds num_queues 2: each thread serves at least one hardware queue/);
    expect(() => loadConfig(undefined, { threads: 65, num_queues: 64 })).toThrow(/threads: expected a whole number from 1 to 64/);
    const needOne: Array<[string, Record<string, unknown>]> = [
      ['cache_size', { cache_size: 4 }],
      ['mbps', { mbps: 100 }],
      ['shared_tags', { shared_tags: true }],
      ['badblocks_once', { badblocks_once: true }],
    ];
    for (const [key, o] of needOne) {
      expect(() => loadConfig(undefined, { threads: 2, num_queues: 2, ...o })).toThrow(new RegExp(`${key}: needs threads 1 .* but threads is 2`));
      expect(loadConfig(undefined, { threads: 1, num_queues: 2, ...o }).disks[0]).toMatchObject(o);
    }
  });
});
