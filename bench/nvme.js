#!/usr/bin/env node
// `npm run bench:nvme`: rnull's NVMe disk against qemu-storage-daemon's `nvme` driver on the same
// emulated controller, with the do-nothing back-end (bench/ceiling) as the ceiling, all in ONE
// boot of the NVMe test guest (TCG, 2 vCPUs, emulated Intel IOMMU, the controller bound to
// vfio-pci: test/guest/nvme-guest.ts), the same front-end (vhost-bench), interleaved over rounds
// (A B C A B C). The guest side is test/guest/nvme-bench.js. Prints IOPS, p50/p99 latency and
// back-end CPU per I/O (guest CPU), medians over the rounds, with the ratios rnull/QSD and
// rnull/ceiling; writes bench/out/nvme-results.{json,md}. See bench/README.md.
//
//   node bench/nvme.js [--rounds N] [--runtime S] [--ramp S] [--workloads ids] [--backends names]
//                      [--cpu-prof] [--no-build] [--timeout S] [--keep]
'use strict';
const cp = require('child_process');
const fs = require('fs');
const os = require('os');
const path = require('path');

const ROOT = path.join(__dirname, '..');
const OUT = path.join(__dirname, 'out');

const WORKLOADS = [
  { id: '4k-randread-qd1', title: '4k randread QD1', args: ['--rw', 'randread', '--bs', '4096', '--qd', '1', '--queues', '1'] },
  { id: '4k-randread-qd32-2q', title: '4k randread QD32 x 2 queues', args: ['--rw', 'randread', '--bs', '4096', '--qd', '32', '--queues', '2'] },
  { id: '4k-randwrite-qd32', title: '4k randwrite QD32', args: ['--rw', 'randwrite', '--bs', '4096', '--qd', '32', '--queues', '1'] },
];
const BACKENDS = ['rnull', 'rnull-poll', 'rnull-db', 'rnull-poll-db', 'rnull-nodb', 'rnull-poll-nodb', 'qsd', 'ceiling'];

function usage() {
  return `usage: node bench/nvme.js [options]
  --rounds N          rounds, each runs every workload on every back-end (default 3)
  --runtime S         measured seconds per run (default 4)
  --ramp S            warm-up seconds per run, every back-end (default 8: under TCG, V8's optimizing
                      compiler still runs on rnull's pinned vCPU for several seconds after a start)
  --workloads LIST    comma-separated ids (default all: ${WORKLOADS.map((w) => w.id).join(', ')})
  --backends LIST     comma-separated, from ${BACKENDS.join(', ')} (default rnull,qsd,ceiling)
  --size MIB          namespace size (default 1024; a sparse host file)
  --node-flags FLAGS  extra node flags for rnull in the guest (space-separated, e.g. "--jitless")
  --rnull-args ARGS   extra rnull arguments in the guest (space-separated, e.g. "--poll-us 0")
  --clock NAME        guest clock source: tsc (default; the kernel gets tsc=reliable) or hpet (the
                      kernel's own choice under TCG: every clock read traps to QEMU's HPET)
  --cpu-prof          profile rnull in round 1 (node --cpu-prof in the guest) and print its top functions
  --timeout S         hard limit for the guest boot (default: estimated from the plan)
  --no-build          do not build dist/, vhost-bench, vhost-ceiling
  --keep              keep the run directory (console and output logs)`;
}

function parseArgs(argv) {
  const o = { rounds: 3, runtime: 4, ramp: 8, workloads: WORKLOADS.map((w) => w.id), backends: ['rnull', 'qsd', 'ceiling'], size: 1024, cpuProf: false, nodeFlags: [], rnullArgs: [], clock: 'tsc', timeout: 0, build: true, keep: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    const num = (v) => {
      const n = Number(v);
      if (!Number.isFinite(n) || n <= 0) throw new Error(`${a}: not a positive number: ${v}`);
      return n;
    };
    if (a === '--rounds') o.rounds = Math.floor(num(next()));
    else if (a === '--runtime') o.runtime = num(next());
    else if (a === '--ramp') o.ramp = num(next());
    else if (a === '--size') o.size = Math.floor(num(next()));
    else if (a === '--timeout') o.timeout = num(next());
    else if (a === '--workloads') o.workloads = next().split(',');
    else if (a === '--backends') o.backends = next().split(',');
    else if (a === '--cpu-prof') o.cpuProf = true;
    else if (a === '--clock') o.clock = next();
    else if (a === '--rnull-args') o.rnullArgs = next().split(' ').filter((x) => x !== '');
    else if (a === '--node-flags') o.nodeFlags = next().split(' ').filter((x) => x !== '');
    else if (a === '--no-build') o.build = false;
    else if (a === '--keep') o.keep = true;
    else if (a === '--help' || a === '-h') {
      console.log(usage());
      process.exit(0);
    } else throw new Error(`unknown option ${a}\n${usage()}`);
  }
  for (const w of o.workloads) if (!WORKLOADS.some((x) => x.id === w)) throw new Error(`unknown workload ${w}`);
  for (const b of o.backends) if (!BACKENDS.includes(b)) throw new Error(`unknown back-end ${b}`);
  if (!['tsc', 'hpet'].includes(o.clock)) throw new Error(`--clock: tsc or hpet, not ${o.clock}`);
  return o;
}

/** Loads test/guest/*.ts by transpiling on require (they only use erasable TypeScript). */
function registerTs() {
  const ts = require('typescript');
  require.extensions['.ts'] = (module, filename) => {
    const src = fs.readFileSync(filename, 'utf8');
    const out = ts.transpileModule(src, { compilerOptions: { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2022, esModuleInterop: true }, fileName: filename });
    module._compile(out.outputText, filename);
  };
}

function median(xs) {
  const s = xs.filter((x) => typeof x === 'number' && Number.isFinite(x)).sort((a, b) => a - b);
  if (s.length === 0) return null;
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

function fmtIops(v) {
  if (v === null) return '—';
  return v >= 1e6 ? `${(v / 1e6).toFixed(2)} M` : v >= 1e3 ? `${(v / 1e3).toFixed(1)} k` : `${Math.round(v)}`;
}
const f1 = (v) => (v === null ? '—' : v >= 100 ? v.toFixed(0) : v.toFixed(1));
const f2 = (v) => (v === null ? '—' : v.toFixed(2));
const ratio = (a, b) => (a === null || b === null || b === 0 ? null : a / b);
const fx = (v) => (v === null ? '—' : `${v.toFixed(2)}x`);

function summarize(runs, opts) {
  const med = {};
  for (const w of opts.workloads) {
    med[w] = {};
    for (const b of opts.backends) {
      const ok = runs.filter((r) => r.workload === w && r.backend === b && r.ok);
      med[w][b] = {
        runs: ok.length,
        iops: median(ok.map((r) => r.iops)),
        p50: median(ok.map((r) => r.lat_us.p50)),
        p99: median(ok.map((r) => r.lat_us.p99)),
        cpu: median(ok.map((r) => r.cpu_us_per_io)),
      };
    }
  }
  return med;
}

function table(med, opts) {
  const rn = opts.backends.filter((b) => b.startsWith('rnull'));
  const lines = [];
  const head = ['workload', ...opts.backends.map((b) => `${b} IOPS`)];
  for (const r of rn) {
    if (opts.backends.includes('qsd')) head.push(`${r}/QSD IOPS`);
    if (opts.backends.includes('ceiling')) head.push(`${r}/ceiling IOPS`);
  }
  lines.push(`| ${head.join(' | ')} |`, `|${head.map((_, i) => (i === 0 ? '---' : '---:')).join('|')}|`);
  for (const w of opts.workloads) {
    const title = WORKLOADS.find((x) => x.id === w).title;
    const row = [title, ...opts.backends.map((b) => fmtIops(med[w][b].iops))];
    for (const r of rn) {
      if (opts.backends.includes('qsd')) row.push(fx(ratio(med[w][r].iops, med[w].qsd.iops)));
      if (opts.backends.includes('ceiling')) row.push(fx(ratio(med[w][r].iops, med[w].ceiling.iops)));
    }
    lines.push(`| ${row.join(' | ')} |`);
  }
  lines.push('');
  const h2 = ['workload', ...opts.backends.flatMap((b) => [`${b} p50/p99 us`, `${b} CPU us/IO`])];
  lines.push(`| ${h2.join(' | ')} |`, `|${h2.map((_, i) => (i === 0 ? '---' : '---:')).join('|')}|`);
  for (const w of opts.workloads) {
    const title = WORKLOADS.find((x) => x.id === w).title;
    lines.push(`| ${[title, ...opts.backends.flatMap((b) => [`${f1(med[w][b].p50)} / ${f1(med[w][b].p99)}`, f2(med[w][b].cpu)])].join(' | ')} |`);
  }
  if (rn.length > 0 && opts.backends.includes('qsd')) {
    lines.push('');
    const h3 = ['workload', ...rn.flatMap((r) => [`${r}/QSD p50`, `${r}/QSD p99`, `${r}/QSD CPU/IO`])];
    lines.push(`| ${h3.join(' | ')} |`, `|${h3.map((_, i) => (i === 0 ? '---' : '---:')).join('|')}|`);
    for (const w of opts.workloads) {
      const title = WORKLOADS.find((x) => x.id === w).title;
      lines.push(`| ${[title, ...rn.flatMap((r) => [fx(ratio(med[w][r].p50, med[w].qsd.p50)), fx(ratio(med[w][r].p99, med[w].qsd.p99)), fx(ratio(med[w][r].cpu, med[w].qsd.cpu))])].join(' | ')} |`);
    }
  }
  return lines.join('\n');
}

/** rnull's doorbell writes per back-end and workload (round 1: rnull ctl stats after the run, ramp included). */
function doorbells(runs, opts) {
  const rn = opts.backends.filter((b) => b.startsWith('rnull'));
  const rows = [];
  for (const w of opts.workloads) {
    for (const b of rn) {
      const r = runs.find((x) => x.workload === w && x.backend === b && x.round === 1 && x.nvme && x.nvme.commands !== undefined);
      if (r === undefined) continue;
      const n = r.nvme;
      const perKio = (v) => (n.commands > 0 ? ((1000 * (v ?? 0)) / n.commands).toFixed(0) : '—');
      rows.push(`| ${WORKLOADS.find((x) => x.id === w).title} | ${b} | ${n.commands} | ${n.sq_doorbells ?? 0} | ${n.sq_doorbells_skipped ?? 0} | ${n.cq_doorbells ?? 0} | ${n.cq_doorbells_skipped ?? 0} | ${perKio((n.sq_doorbells ?? 0) + (n.cq_doorbells ?? 0))} |`);
    }
  }
  if (rows.length === 0) return '';
  return ['| workload | back-end | commands | SQ MMIO | SQ shadow only | CQ MMIO | CQ shadow only | MMIO doorbells per 1000 commands |', '|---|---|---:|---:|---:|---:|---:|---:|', ...rows].join('\n');
}

function target(med, opts) {
  const w = '4k-randread-qd32-2q';
  if (!opts.workloads.includes(w) || !opts.backends.includes('qsd')) return [];
  return opts.backends
    .filter((b) => b.startsWith('rnull'))
    .map((b) => {
      const r = ratio(med[w][b].iops, med[w].qsd.iops);
      return { target: `${b} >= 3x qemu-storage-daemon IOPS at 4k randread QD32 (2 queues)`, factor: r, status: r === null ? 'not measured' : r >= 3 ? 'met' : 'missed' };
    });
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const bench = path.join(ROOT, 'bench', 'client', 'build', 'vhost-bench');
  const ceiling = path.join(ROOT, 'bench', 'ceiling', 'build', 'vhost-ceiling');
  if (opts.build) {
    cp.execFileSync('make', ['-s', '-C', path.join(ROOT, 'bench', 'client')], { stdio: 'inherit' });
    cp.execFileSync('make', ['-s', '-C', path.join(ROOT, 'bench', 'ceiling')], { stdio: 'inherit' });
    cp.execFileSync(process.execPath, [path.join(ROOT, 'scripts', 'build-if-needed.js')], { stdio: 'inherit' });
  }
  for (const f of [bench, ceiling, path.join(ROOT, 'dist', 'drivers', 'nvme', 'driver.js')]) if (!fs.existsSync(f)) throw new Error(`${f} is missing: build first (npm run build, make -C bench/client, make -C bench/ceiling)`);
  registerTs();
  const { bdfOf, createBackingFiles, nvmeGuestImage, runNvmeGuest } = require(path.join(ROOT, 'test', 'guest', 'nvme-guest.ts'));
  const { requireQemu } = require(path.join(ROOT, 'test', 'guest', 'qemu.ts'));
  requireQemu();

  const workDir = fs.mkdtempSync(path.join(process.env.TMPDIR ?? os.tmpdir(), 'rnull-bench-nvme-'));
  const controllers = [{ id: 'nvme0', serial: 'rnull-bench', slot: 4, namespaces: [{ nsid: 1, file: path.join(workDir, 'ns1.img'), sizeBytes: opts.size << 20, blockSize: 512 }] }];
  createBackingFiles(controllers);
  // Allocated up front: random writes into a sparse file pay the host file system's allocation,
  // which would favour whichever back-end writes a block second.
  const fa = cp.spawnSync('fallocate', ['-l', String(opts.size << 20), controllers[0].namespaces[0].file], { encoding: 'utf8' });
  if (fa.status !== 0) throw new Error(`fallocate of the namespace's backing file failed: ${fa.stderr || fa.error}`);
  const workloads = opts.workloads.map((id) => WORKLOADS.find((w) => w.id === id));
  const plan = {
    bench,
    ceiling,
    bdf: bdfOf(controllers[0]),
    nsid: 1,
    sizeMiB: opts.size,
    backends: opts.backends,
    workloads: workloads.map((w) => ({ id: w.id, args: w.args })),
    rounds: opts.rounds,
    runtime: opts.runtime,
    ramp: opts.ramp,
    qsdStartMs: 20000,
    qsdAttempts: 3,
    cpuProf: opts.cpuProf,
    nodeFlags: opts.nodeFlags,
    rnullArgs: opts.rnullArgs,
  };
  const runsTotal = opts.rounds * workloads.length * opts.backends.length;
  const timeoutS = opts.timeout || 180 + runsTotal * (opts.runtime + opts.ramp + 30);
  const started = new Date();
  const load0 = os.loadavg();
  console.log(`bench:nvme: ${runsTotal} runs (${opts.rounds} rounds x ${workloads.length} workloads x ${opts.backends.join('/')}), ${opts.runtime} s + ${opts.ramp} s ramp each, one guest boot (limit ${timeoutS} s); load average ${load0.map((x) => x.toFixed(2)).join(' ')}`);
  let result;
  try {
    result = await runNvmeGuest({ image: nvmeGuestImage(), workDir, controllers, nodeScript: path.join(ROOT, 'test', 'guest', 'nvme-bench.js'), args: [JSON.stringify(plan)], timeoutMs: timeoutS * 1000, kernelArgs: opts.clock === 'tsc' ? ['tsc=reliable', 'no_timer_check'] : [] });
  } catch (err) {
    console.error(`bench:nvme: the guest run failed (run directory kept: ${workDir}):\n${err.message}`);
    process.exit(1);
  }
  const out = result.output;
  const runs = [...out.matchAll(/^@@RUN (.*)$/gm)].map((m) => JSON.parse(m[1]));
  const profiles = {};
  for (const m of out.matchAll(/^@@BEGIN (profile_\S+)\n([\s\S]*?)\n@@END \1$/gm)) profiles[m[1]] = m[2];
  const clocksource = (/^@@VAL clocksource (\S+)/m.exec(out) ?? [])[1] ?? '?';
  const dmar = Number((/^@@VAL dmar_faults (\d+)/m.exec(out) ?? [])[1] ?? NaN);
  const benchSeconds = Number((/^@@VAL bench_seconds (\S+)/m.exec(out) ?? [])[1] ?? NaN);
  const med = summarize(runs, opts);
  const targets = target(med, opts);
  const failed = runs.filter((r) => !r.ok);
  const qsdRetries = runs.filter((r) => r.backend === 'qsd').map((r) => r.attempts - 1);

  const md = [
    `# rnull NVMe disk vs qemu-storage-daemon nvme:// vs do-nothing ceiling (one TCG guest boot)`,
    '',
    `${started.toISOString()}; ${opts.rounds} rounds, ${opts.runtime} s + ${opts.ramp} s ramp per run, medians over the rounds; guest: TCG, 2 vCPUs, clock source ${clocksource}, emulated Intel IOMMU, QEMU emulated NVMe (512-byte LBAs, ${opts.size} MiB sparse file); back-end pinned to guest cpu 0, vhost-bench to cpu 1; CPU = back-end guest CPU per I/O (schedstat). Command: \`node bench/nvme.js ${process.argv.slice(2).join(' ')}\``,
    '',
    table(med, opts),
    '',
    ...(doorbells(runs, opts) ? ['Doorbell writes (round 1, from `rnull ctl stats`; `-db`/`-nodb`: --shadow-doorbells true/false):', '', doorbells(runs, opts), ''] : []),
    ...targets.map((t) => `- Target: ${t.target}: **${t.status}** (${fx(t.factor)})`),
    `- DMAR faults in the guest's dmesg: ${dmar}`,
    `- qemu-storage-daemon start retries per run: ${qsdRetries.join(' ') || '—'}`,
    ...(failed.length ? ['', '## Failed runs', ...failed.map((r) => `- round ${r.round} ${r.workload} ${r.backend}: ${r.failure ?? `vhost-bench exit ${r.bench_status}`} ${(r.bench_out ?? r.log_tail ?? '').split('\n').slice(-3).join(' / ')}`)] : []),
  ].join('\n');
  fs.mkdirSync(OUT, { recursive: true });
  fs.writeFileSync(path.join(OUT, 'nvme-results.md'), md + '\n');
  fs.writeFileSync(
    path.join(OUT, 'nvme-results.json'),
    JSON.stringify({ date: started.toISOString(), options: opts, command: `node bench/nvme.js ${process.argv.slice(2).join(' ')}`, host: { cpus: os.cpus().length, loadavg_start: load0, loadavg_end: os.loadavg(), kernel: os.release() }, guest_seconds: result.durationMs / 1000, bench_seconds: benchSeconds, clocksource, dmar_faults: dmar, medians: med, targets, runs, profiles }, null, 2),
  );
  console.log(`\n${md}\n`);
  for (const [k, v] of Object.entries(profiles)) console.log(`--- ${k} ---\n${v}\n`);
  console.log(`guest boot + bench ${(result.durationMs / 1000).toFixed(0)} s (bench ${benchSeconds} s); results in ${path.relative(process.cwd(), OUT)}/nvme-results.{md,json}`);
  if (!opts.keep) fs.rmSync(workDir, { recursive: true, force: true });
  else console.log(`run directory: ${workDir}`);
  process.exit(failed.length > 0 || runs.length !== runsTotal || dmar !== 0 ? 1 : 0);
}

main().catch((err) => {
  console.error(`bench:nvme: ${err.message}`);
  process.exit(1);
});
