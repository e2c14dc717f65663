#!/usr/bin/env node
/**
 * Memory soak: runs vhost-bench against one rnull daemon for a long time and samples the
 * daemon's resident memory (VmRSS, /proc/PID/status) every few seconds, to show that memory
 * stays flat (nothing grows per request). Prints the series and the growth after warm-up, and
 * writes bench/out/soak.json.
 *
 *   node bench/soak.js [--seconds 300] [--memory-backed] [--rw randread|randwrite] [--qd 32]
 *                      [--interval 10] [--warmup 30]
 */
'use strict';
const { spawn, spawnSync } = require('child_process');
const fs = require('fs');
const os = require('os');
const path = require('path');

const args = process.argv.slice(2);
const opt = (name, def) => {
  const i = args.indexOf(name);
  return i < 0 ? def : args[i + 1];
};
const SECONDS = Number(opt('--seconds', 300));
const INTERVAL = Number(opt('--interval', 10));
const WARMUP = Number(opt('--warmup', 30));
const QD = Number(opt('--qd', 32));
const RW = opt('--rw', 'randread');
const MEMORY = args.includes('--memory-backed');
const ROOT = path.resolve(__dirname, '..');
const CLIENT = path.join(__dirname, 'client', 'build', 'vhost-bench');

if (spawnSync('make', ['-s', '-C', path.join(__dirname, 'client')], { stdio: 'inherit' }).status !== 0) process.exit(1);
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-soak-'));
const sock = path.join(dir, 'soak.sock');
const daemon = spawn('taskset', ['-c', '0', process.execPath, path.join(ROOT, 'dist', 'daemon', 'main.js'), '--socket', sock, '--size', '1024', '--memory-backed', String(MEMORY), '--store-fresh', 'true', '--store-remove-on-exit', 'true', '--log-level', 'warn'], { stdio: 'inherit' });
const cleanup = () => {
  if (daemon.exitCode === null) daemon.kill('SIGTERM');
  fs.rmSync(dir, { recursive: true, force: true });
};
process.on('exit', cleanup);
process.on('SIGINT', () => process.exit(130));

const rssKiB = () => {
  const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${daemon.pid}/status`, 'utf8'));
  return m ? Number(m[1]) : NaN;
};

(async () => {
  for (let i = 0; i < 100 && !fs.existsSync(sock); i++) await new Promise((r) => setTimeout(r, 100));
  if (!fs.existsSync(sock)) throw new Error('rnull did not start');
  const json = path.join(dir, 'client.json');
  const client = spawn(CLIENT, ['--socket', sock, '--qd', String(QD), '--rw', RW, '--runtime', String(SECONDS), '--pin', '1', '--backend-pid', String(daemon.pid), '--json', json, '--quiet'], { stdio: 'inherit' });
  const samples = [];
  const t0 = Date.now();
  const timer = setInterval(() => {
    const s = { t: Math.round((Date.now() - t0) / 1000), rssKiB: rssKiB() };
    samples.push(s);
    process.stdout.write(`t=${s.t}s rss=${(s.rssKiB / 1024).toFixed(1)} MiB\n`);
  }, INTERVAL * 1000);
  const code = await new Promise((r) => client.on('exit', r));
  clearInterval(timer);
  const result = JSON.parse(fs.readFileSync(json, 'utf8'));
  const after = samples.filter((s) => s.t >= WARMUP);
  const growthKiB = after.length >= 2 ? after[after.length - 1].rssKiB - after[0].rssKiB : NaN;
  const out = { seconds: SECONDS, rw: RW, qd: QD, memoryBacked: MEMORY, ios: result.ios, iops: result.iops, samples, growthAfterWarmupKiB: growthKiB, bytesPerMillionIos: (growthKiB * 1024) / (result.ios / 1e6) };
  fs.mkdirSync(path.join(__dirname, 'out'), { recursive: true });
  fs.writeFileSync(path.join(__dirname, 'out', 'soak.json'), JSON.stringify(out, null, 2));
  process.stdout.write(`client exit ${code}; ${result.ios} I/Os, ${Math.round(result.iops)} IOPS; RSS after ${WARMUP} s warm-up: ${after[0]?.rssKiB} -> ${after[after.length - 1]?.rssKiB} KiB (growth ${growthKiB} KiB)\n`);
  process.exit(code === 0 ? 0 : 1);
})().catch((e) => {
  process.stderr.write(`soak: ${e.stack}\n`);
  process.exit(1);
});
