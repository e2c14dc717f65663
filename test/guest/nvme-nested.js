#!/usr/bin/env node
// Runs INSIDE the NVMe test guest (test/guest/nvme-guest.ts): the real front-end over an
// NVMe-backed disk. rnull --driver nvme serves namespace `nsid` of the controller bound to
// vfio-pci; a QEMU started here (nested, TCG inside TCG) attaches it as vhost-user-blk (guest RAM
// a shared memfd), and its guest (a tiny busybox initramfs built on the host, passed by path over
// the 9p host root) writes `sizeMiB` MiB of random data at `offsetMiB` with O_DIRECT, reads them
// back with O_DIRECT and checksums both (md5: cheap enough under nested TCG). The host test then finds the same checksum in the
// namespace's backing file at that offset. Every wait is bounded (the inner QEMU has a hard
// timeout, the daemon a SIGTERM/SIGKILL bound).
//
//   node test/guest/nvme-nested.js '<json plan>'
// plan: { image (GuestImage of the inner guest), qemuJs (compiled test/guest/qemu.js), bdf, nsid,
//         offsetMiB, sizeMiB, timeoutMs, memoryMiB, kernelArgs }
// Output: "@@VAL name value" lines: the inner guest's values prefixed "inner_", the daemon's
// start time, exit status and log counts, the inner QEMU's run time.
'use strict';
const cp = require('child_process');
const fs = require('fs');
const path = require('path');
const { val, sleep, deadline } = require('./check-util');

const ROOT = path.join(__dirname, '..', '..');
const dist = path.join(ROOT, 'dist');

/** The inner guest's script (busybox sh, `set -eu -o pipefail` and val() come from the prelude). */
function innerScript(plan) {
  const { offsetMiB: off, sizeMiB: n } = plan;
  return `
up() { cut -d' ' -f1 /proc/uptime; }
val boot_s "$(up)"
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
val sectors "$(cat /sys/block/vda/size)"
val lbs "$(cat /sys/block/vda/queue/logical_block_size)"
dd if=/dev/urandom of=/tmp/data bs=1M count=${n} 2>/dev/null
val data_md5 "$(md5sum /tmp/data | cut -d' ' -f1)"
t0=$(up)
dd if=/tmp/data of=/dev/vda bs=1M seek=${off} count=${n} oflag=direct conv=fsync 2>/dev/null
t1=$(up)
val readback_md5 "$(dd if=/dev/vda bs=1M skip=${off} count=${n} iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
t2=$(up)
val write_s "$(echo "$t0 $t1" | awk '{printf "%.2f", $2 - $1}')"
val read_s "$(echo "$t1 $t2" | awk '{printf "%.2f", $2 - $1}')"
val done 1
`;
}

async function main() {
  const plan = JSON.parse(process.argv[2]);
  const { runGuest } = require(plan.qemuJs);
  const sock = '/run/nested.sock';
  const log = '/run/nested-rnull.log';
  const out = fs.openSync(log, 'w');
  const t0 = Date.now();
  const child = cp.spawn(process.execPath, [path.join(dist, 'daemon/main.js'), '--driver', 'nvme', '--pci', plan.bdf, '--nsid', String(plan.nsid), '--socket', sock, '--num-queues', '1'], { stdio: ['ignore', out, out] });
  fs.closeSync(out);
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  let status = 0;
  try {
    while (!fs.existsSync(sock)) {
      if (child.exitCode !== null || Date.now() - t0 > 60000) throw new Error(`rnull did not listen on ${sock}: ${fs.readFileSync(log, 'utf8').slice(-800)}`);
      await sleep(50);
    }
    val('rnull_start_ms', Date.now() - t0);
    const r = await runGuest({
      image: plan.image,
      disk: { socketPath: sock, numQueues: 1 },
      script: innerScript(plan),
      workDir: '/run/inner',
      timeoutMs: plan.timeoutMs,
      cpus: 1,
      memoryMiB: plan.memoryMiB,
      kernelArgs: plan.kernelArgs ?? [],
    });
    val('inner_qemu_ms', r.durationMs);
    val('inner_exit', r.scriptExitCode === null ? 'none' : r.scriptExitCode);
    val('inner_timed_out', r.timedOut ? 1 : 0);
    for (const m of r.output.matchAll(/^@@VAL (\S+) ?(.*)$/gm)) val(`inner_${m[1]}`, m[2]);
    if (r.scriptExitCode !== 0) {
      status = 1;
      process.stdout.write(`--- inner output ---\n${r.output.slice(-2000)}\n--- inner console (tail) ---\n${r.console.split('\n').slice(-30).join('\n')}\n--- inner qemu stderr ---\n${r.qemuStderr.slice(-1000)}\n`);
    } else {
      const boot = /\[\s*([\d.]+)\] Run \/init/.exec(r.console);
      if (boot) val('inner_kernel_to_init_s', boot[1]);
    }
  } finally {
    child.kill('SIGTERM');
    const e = await Promise.race([exited, deadline(20000).then(() => null)]);
    if (e === null) child.kill('SIGKILL');
    val('rnull_exit', e === null ? 'hung' : e.code ?? e.signal);
    const text = fs.readFileSync(log, 'utf8');
    val('rnull_errors_logged', (text.match(/"level":50/g) || []).length);
    val('rnull_warnings_logged', (text.match(/"level":40/g) || []).length);
    val('rnull_dma_mapped_logged', (text.match(/guest memory mapped for DMA/g) || []).length);
    val('rnull_shutdown_logged', /NVMe controller shut down/.test(text) ? 1 : 0);
    const bad = text.split('\n').filter((l) => /"level":[4-6]0/.test(l));
    process.stdout.write(`--- rnull log: warnings and errors ---\n${bad.slice(0, 20).join('\n')}\n`);
  }
  process.exitCode = status;
}

main().catch((err) => {
  process.stdout.write(`nvme-nested failed: ${err.stack}\n`);
  process.exitCode = 1;
});
