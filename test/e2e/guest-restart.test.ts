/**
 * End-to-end restart test: a real Linux guest (QEMU 7.2, TCG, memfd guest RAM) runs fio random
 * writes with verify=crc32c on a memory-backed rnull disk attached with
 * `-chardev socket,...,reconnect=1`, while the test kills the daemon with SIGKILL at random
 * moments and starts it again the way a systemd unit with Restart=on-failure would: the same
 * command line, after a short delay; the disk's data lives in its store file (derived from the
 * socket, in /dev/shm), which each new life maps again. Kills land mid-batch (fio keeps 16 requests in flight per
 * job, on two queues) and, every third one, during QEMU's reconnect handshake: after it handed
 * the inflight region back, while guest memory and the rings are being set up (see killer()).
 *
 * Required: every fio pass exits 0 with error 0 (no I/O error reached the guest, the crc32c
 * verify pass found every block), the guest kernel logged no I/O error, a fresh guest (a new
 * QEMU) reads back what the previous one wrote (fio --verify_only), and the daemon logged no
 * warning or error. With `threads` 1 and 2 (num-queues 2, two vCPUs).
 *
 * Figures: kills, the guest's longest I/O latency (fio's max completion latency: a request
 * caught by a kill waits for the restart), and the host-side outage from the kill to the
 * rings running again.
 *
 * RNULL_RESTART_CYCLES (default 4): kills per `threads` setting; RNULL_RESTART_THREADS
 * (default "1,2"). `npm run test:restart-loop` runs 100 cycles (50 with each). The results are
 * printed and written to test/e2e/.last-restart.json.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DAEMON_MAIN, E2eRun, GUEST_TIMEOUT_MS } from '../guest/daemon';
import { describeFailure, parseGuestOutput, runGuest, type GuestReport, type GuestRunResult } from '../guest/qemu';

const CYCLES = Number(process.env.RNULL_RESTART_CYCLES ?? 4);
const THREADS = (process.env.RNULL_RESTART_THREADS ?? '1,2').split(',').map(Number);
const RESULTS_FILE = path.join(__dirname, '.last-restart.json');

/** Disk and fio geometry: two jobs (one per vCPU, so both queues), each on its own 48 MiB. */
const DISK_MIB = 128;
const JOB_MIB = 40;
const JOBS = 2;
/** How the unit restarts the daemon: after RestartSec-like delays of this many ms. */
const RESTART_DELAY_MS: [number, number] = [100, 400];

const run = new E2eRun('rnull-restart-');

beforeAll(() => run.setup());
afterAll(() => run.finish(' (guest-restart)'));

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
function between([lo, hi]: [number, number]): number {
  return lo + Math.floor(Math.random() * (hi - lo + 1));
}

/**
 * The daemon as a service manager runs it: one command line, started again after each kill.
 * Each life logs to its own file (NAME.N.log).
 */
class ServiceDaemon {
  private proc: ChildProcess | null = null;
  lives = 0;
  readonly socket: string;

  constructor(
    readonly name: string,
    readonly args: string[],
    readonly dir: string,
  ) {
    this.socket = path.join(dir, `${name}.sock`);
  }

  logFile(life = this.lives): string {
    return path.join(this.dir, `${this.name}.${life}.log`);
  }

  log(life = this.lives): string {
    return fs.existsSync(this.logFile(life)) ? fs.readFileSync(this.logFile(life), 'utf8') : '';
  }

  /** Starts a new life and waits (bounded) until it listens. */
  async start(): Promise<void> {
    this.lives++;
    const fd = fs.openSync(this.logFile(), 'w');
    this.proc = spawn(process.execPath, [DAEMON_MAIN, '--socket', this.socket, ...this.args], { stdio: ['ignore', fd, fd] });
    fs.closeSync(fd);
    const end = Date.now() + 30_000;
    while (!this.log().includes('"msg":"listening"')) {
      if (this.proc.exitCode !== null || Date.now() > end) throw new Error(`life ${this.lives} did not listen:\n${this.log()}`);
      await sleep(10);
    }
  }

  async kill9(): Promise<void> {
    const p = this.proc;
    if (p === null || p.exitCode !== null || p.signalCode !== null) throw new Error(`life ${this.lives} is not running:\n${this.log()}`);
    const exited = new Promise((r) => p.once('exit', r));
    p.kill('SIGKILL');
    await exited;
  }

  /** SIGTERM: it must exit 0 by itself. */
  async stop(): Promise<{ code: number | null; signal: string | null }> {
    const p = this.proc;
    if (p === null || p.exitCode !== null || p.signalCode !== null) return { code: p?.exitCode ?? null, signal: p?.signalCode ?? null };
    const exited = new Promise<{ code: number | null; signal: string | null }>((r) => p.once('exit', (code, signal) => r({ code, signal })));
    p.kill('SIGTERM');
    const t = setTimeout(() => p.kill('SIGKILL'), 15_000);
    const r = await exited;
    clearTimeout(t);
    return r;
  }

  /** pino lines at warn or above, over every life. */
  warnings(): string[] {
    const out: string[] = [];
    for (let life = 1; life <= this.lives; life++) {
      for (const line of this.log(life).split('\n')) {
        const level = /^\{"level":(\d+)/.exec(line)?.[1];
        if (level !== undefined && Number(level) >= 40) out.push(`life ${life}: ${line}`);
      }
    }
    return out;
  }
}

interface Kill {
  kind: 'batch' | 'handshake';
  /** ms from the kill until the new life's rings ran again (its inflight region recovered). */
  outageMs: number;
  /** Requests the new life resubmitted. */
  resubmitted: number;
}

/**
 * Kills and restarts `d` while `guestBusy()` says fio runs, until `target` kills or the guest
 * is done. Batch kills come 0.3-1.5 s after the rings run again; every third kill instead
 * lands 0-3 ms after the new life mapped the inflight region QEMU handed back (inside the
 * device start of its handshake).
 */
async function killer(d: ServiceDaemon, target: number, guestBusy: () => boolean, done: () => boolean, kills: Kill[]): Promise<void> {
  let pendingHandshake = false;
  while (kills.length < target && !done()) {
    if (!guestBusy()) {
      await sleep(50);
      continue;
    }
    const kind: Kill['kind'] = pendingHandshake ? 'handshake' : 'batch';
    const life = d.lives;
    if (kind === 'batch') {
      // Wait for the rings (a restarted life logs its recovery per queue), then a random moment.
      const wait = Date.now() + 60_000;
      while (!done() && life > 1 && !d.log(life).includes('inflight region:')) {
        if (Date.now() > wait) throw new Error(`life ${life}: rings never ran again:\n${d.log(life)}`);
        await sleep(10);
      }
      await sleep(between([300, 1500]));
    } else {
      // Inside the device start of QEMU's reconnect: the region handed back (SET_INFLIGHT_FD),
      // guest memory and rings on their way. Not earlier: a kill before QEMU 7.2's
      // vhost_dev_init has finished (GET_FEATURES .. SET_VRING_ERR) leaves its vhost-user-blk
      // without a chardev handler for good (fixed in QEMU 8.2, "vhost-user: fix lost
      // reconnect"): it reconnects the socket but never speaks again, whatever the back-end does.
      const wait = Date.now() + 60_000;
      while (!done() && !d.log(life).includes('inflight region mapped')) {
        if (Date.now() > wait) throw new Error(`life ${life}: QEMU never reconnected:\n${d.log(life)}`);
        await sleep(1);
      }
      await sleep(between([0, 3]));
    }
    if (done() || !guestBusy()) continue;
    const killedAt = Date.now();
    await d.kill9();
    await sleep(between(RESTART_DELAY_MS));
    await d.start();
    const entry: Kill = { kind, outageMs: -1, resubmitted: 0 };
    kills.push(entry);
    pendingHandshake = kills.length % 3 === 2;
    // Outage: until the new life's rings run (measured in the background).
    void (async () => {
      const newLife = d.lives;
      const end = Date.now() + 120_000;
      while (Date.now() < end) {
        const text = d.log(newLife);
        if (text.includes('inflight region:')) {
          entry.outageMs = Date.now() - killedAt;
          entry.resubmitted = text
            .split('\n')
            .filter((l) => l.includes('resubmitting requests'))
            .reduce((n, l) => n + Number((JSON.parse(l) as { resubmit: number }).resubmit), 0);
          return;
        }
        if (d.lives !== newLife) return; // killed again in its handshake
        await sleep(10);
      }
    })();
  }
}

/** fio over both jobs' ranges; `seed` picks the pattern; `verifyOnly` reads back and checks a previous pass. */
function fio(name: string, seed: number, verifyOnly: boolean): string {
  return (
    `fio --name=${name} --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 ` +
    `--size=${JOB_MIB}M --numjobs=${JOBS} --offset_increment=${DISK_MIB / JOBS}M --randseed=${seed} ` +
    `--verify=crc32c --do_verify=1 --verify_fatal=1 ${verifyOnly ? '--verify_only ' : ''}` +
    `--group_reporting --output-format=json > /tmp/${name}.json 2>/tmp/${name}.err`
  );
}

/** One guest: verify the previous pattern (if any), then write and verify a new one. */
function guestScript(prevSeed: number | null, seed: number): string {
  const step = (name: string, cmd: string): string => `
val phase_${name} start
if ${cmd}; then st=0; else st=$?; fi
val status_${name} $st
block ${name} /tmp/${name}.json
block ${name}_err /tmp/${name}.err
val phase_${name} end`;
  return [
    prevSeed !== null ? step('check', fio('check', prevSeed, true)) : '',
    step('write', fio('write', seed, false)),
    'val ioerrors "$(dmesg | grep -c -i -E "I/O error|blk_update_request|Buffer I/O" || true)"',
    'dmesg | tail -n 20 > /tmp/dmesg.txt; block dmesg /tmp/dmesg.txt',
  ].join('\n');
}

interface FioFigures {
  error: number;
  ios: number;
  maxLatMs: number;
}

function fioFigures(report: GuestReport, name: string): FioFigures {
  const text = report.blocks.get(name) ?? '';
  const start = text.search(/^\{/m);
  if (start < 0) throw new Error(`fio ${name}: no JSON:\n${text}\n${report.blocks.get(`${name}_err`) ?? ''}`);
  const json = JSON.parse(text.slice(start)) as { jobs: Array<{ error: number; read: { total_ios: number; lat_ns: { max: number } }; write: { total_ios: number; lat_ns: { max: number } } }> };
  const j = json.jobs[0];
  return { error: j.error, ios: j.read.total_ios + j.write.total_ios, maxLatMs: Math.max(j.read.lat_ns.max, j.write.lat_ns.max) / 1e6 };
}

interface Outcome {
  threads: number;
  boots: number;
  kills: Kill[];
  ios: number;
  maxGuestLatencyMs: number;
}
const outcomes: Outcome[] = [];

async function bootOne(d: ServiceDaemon, label: string, script: string, killTarget: number, kills: Kill[]): Promise<{ report: GuestReport; result: GuestRunResult }> {
  let output = '';
  let finished = false;
  const busy = (): boolean => {
    const marks = [...output.matchAll(/@@VAL phase_\w+ (start|end)/g)];
    return marks.length > 0 && marks[marks.length - 1][1] === 'start';
  };
  const guest = runGuest({
    image: run.image,
    disk: { socketPath: d.socket, numQueues: 2, reconnect: 1 },
    script,
    workDir: path.join(run.dir, label),
    cpus: 2,
    memoryMiB: 512,
    timeoutMs: GUEST_TIMEOUT_MS,
    watch: (o) => {
      output = o;
      return undefined;
    },
  }).finally(() => {
    finished = true;
  });
  const k = killer(d, killTarget, busy, () => finished, kills);
  const result = await guest;
  await k;
  if (result.timedOut || result.aborted !== null || result.scriptExitCode !== 0) {
    throw new Error(`${label}: ${describeFailure(result)}\n--- daemon life ${d.lives} ---\n${d.log().split('\n').slice(-30).join('\n')}`);
  }
  return { report: parseGuestOutput(result.output), result };
}

describe.each(THREADS)('threads %i', (threads) => {
  test(
    `${CYCLES} SIGKILLs during fio randwrite+verify: no I/O error, verify clean, data read back by a fresh guest`,
    run.counted(async () => {
      // Requests end 20 ms after they start (timer mode: a slow disk), so nearly every kill
      // finds some in flight (the TCG guest does a few hundred I/Os a second).
      const d = new ServiceDaemon(
        `t${threads}`,
        ['--size', String(DISK_MIB), '--num-queues', '2', '--threads', String(threads), '--memory-backed', 'true', '--irqmode', '2', '--completion-nsec', '20000000',
          // The store (in /dev/shm by default, derived from the socket) outlives every SIGKILL;
          // the last SIGTERM removes it.
          '--store-remove-on-exit', 'true'],
        run.dir,
      );
      await d.start();
      const kills: Kill[] = [];
      let prevSeed: number | null = null;
      let boots = 0;
      let ios = 0;
      let maxLat = 0;
      try {
        // Boots until enough kills happened; each boot checks the previous boot's data first.
        while (kills.length < CYCLES) {
          boots++;
          const seed = 1000 * threads + boots;
          const { report } = await bootOne(d, `t${threads}-boot${boots}`, guestScript(prevSeed, seed), CYCLES, kills);
          for (const name of prevSeed !== null ? ['check', 'write'] : ['write']) {
            expect({ boot: boots, step: name, status: report.values.get(`status_${name}`) }).toEqual({ boot: boots, step: name, status: '0' });
            const f = fioFigures(report, name);
            expect({ boot: boots, step: name, error: f.error }).toEqual({ boot: boots, step: name, error: 0 });
            ios += f.ios;
            maxLat = Math.max(maxLat, f.maxLatMs);
          }
          expect({ boot: boots, ioerrors: report.values.get('ioerrors'), dmesg: report.blocks.get('dmesg') }).toMatchObject({ boot: boots, ioerrors: '0' });
          prevSeed = seed;
        }
        // A fresh guest, no more kills: everything the last one wrote reads back.
        boots++;
        const { report } = await bootOne(d, `t${threads}-final`, guestScript(prevSeed, 1000 * threads + boots), 0, kills);
        expect({ final: report.values.get('status_check') }).toEqual({ final: '0' });
        expect(fioFigures(report, 'check').error).toBe(0);
        expect(report.values.get('ioerrors')).toBe('0');
        expect(kills.length).toBeGreaterThanOrEqual(CYCLES);
        expect(kills.some((k) => k.kind === 'handshake') || CYCLES < 3).toBe(true);
        // The resubmit path ran: some kill found requests in flight.
        expect(kills.reduce((n, k) => n + k.resubmitted, 0) > 0 || CYCLES < 3).toBe(true);
        expect(d.warnings()).toEqual([]);
        expect(await d.stop()).toEqual({ code: 0, signal: null });
      } finally {
        await d.stop();
        const o: Outcome = { threads, boots, kills, ios, maxGuestLatencyMs: Math.round(maxLat) };
        outcomes.push(o);
        const outages = kills.map((k) => k.outageMs).filter((x) => x >= 0);
        console.log(
          `threads ${threads}: ${kills.length} kills (${kills.filter((k) => k.kind === 'handshake').length} in a handshake) over ${boots} guests, ` +
            `${ios} I/Os, ${kills.reduce((n, k) => n + k.resubmitted, 0)} requests resubmitted; longest guest I/O latency ${o.maxGuestLatencyMs} ms; ` +
            `outage kill -> rings running: max ${Math.max(...outages, 0)} ms, median ${outages.sort((a, b) => a - b)[Math.floor(outages.length / 2)] ?? 0} ms`,
        );
        fs.writeFileSync(RESULTS_FILE, `${JSON.stringify(outcomes, null, 2)}\n`);
      }
    }),
    GUEST_TIMEOUT_MS * Math.max(3, Math.ceil(CYCLES / 2)),
  );
});
