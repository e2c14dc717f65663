// Small helpers shared by the scripts that run INSIDE the NVMe test guest (nvme-*-check.js,
// nvme-bench.js, nvme-nested.js): the "@@VAL name value" lines the host tests parse, the byte
// pattern the host tests also compute to find written data in the backing files, and bounded
// waits.
'use strict';

/** Prints one "@@VAL name value" line (on a line of its own) for the host test to parse. */
function val(name, value) {
  process.stdout.write(`\n@@VAL ${name} ${value}\n`);
}

/** Byte i of the pattern for `seed`; test/e2e/guest-nvme*.test.ts compute the same function. */
function pattern(seed, i) {
  return (i * 7 + seed * 13 + (i >>> 9) * 3 + 1) & 0xff;
}

/** `n` bytes of the pattern for `seed`. */
function patterned(seed, n) {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = pattern(seed, i);
  return b;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
/** Resolves after `ms` without keeping the process alive (for Promise.race against a child). */
const deadline = (ms) => new Promise((r) => setTimeout(r, ms).unref());

/**
 * Polls `cond` every 50 ms.
 * @throws Error "timed out waiting for <what>" after `ms` milliseconds.
 */
async function waitFor(cond, ms, what) {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

module.exports = { val, pattern, patterned, sleep, deadline, waitFor };
