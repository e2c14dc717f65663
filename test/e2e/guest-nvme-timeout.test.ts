/**
 * The NVMe driver's timeout ladder against QEMU's emulated controller in a TCG guest (issue
 * 10): the namespace's backing drive is throttled (-drive throttling.iops-total=R) and the
 * daemon runs with a short io_timeout T, chosen so that one request at a time (1/R s each) fits
 * well under T while a burst of B requests at once (the last waits B/R s) does not. The burst's
 * oldest requests time out -> Abort (QEMU 7.2 answers "not aborted") -> controller reset ->
 * every outstanding request resubmitted with a fresh timeout; what is left of the burst then
 * fits. Run by test/guest/nvme-timeout-check.js; see its header.
 *
 * Sizing (R = 40, T = 2 s, B = 1.5 R T = 120): the last request of the burst would end at 1.5 T
 * (later in the loaded TCG guest); the first expiry is noticed between T and 1.25 T (the
 * watchdog checks every T/4), when at most about 0.5 R T requests are left (fewer once the
 * Abort's answer comes back); after the reset these take about 0.5 T, under T, with their
 * timeouts started when the controller is back. A slower guest may need another round; each
 * request may go through MAX_RETRIES (5) resets. Measured points are in the README.
 *
 * Asserted: every request of a write burst and of a read burst completes exactly once (the used
 * ring holds each head once, nothing more after a quiet period) with status OK; the reads return
 * what was written; a one-at-a-time verify run reads every block back; the blocks are in the host
 * backing file at the right offsets; `rnull ctl stats` counts timeouts, Aborts, resets and
 * retries; the log shows the "not aborted" answer and the resets; no DMAR fault.
 */
import * as path from 'node:path';
import { bdfOf, NvmeGuestRun, patterned, readBacking, type NvmeControllerSpec } from '../guest/nvme-guest';
import { count } from '../guest/qemu';

/** Throttle (IOPS), io_timeout (ms) and burst size; overridable to measure other points. */
const IOPS = Number(process.env.RNULL_E2E_NVME_TIMEOUT_IOPS ?? 40);
const IO_TIMEOUT_MS = Number(process.env.RNULL_E2E_NVME_TIMEOUT_MS ?? 2000);
const BURST = Number(process.env.RNULL_E2E_NVME_TIMEOUT_BURST ?? Math.round((1.5 * IOPS * IO_TIMEOUT_MS) / 1000));
const LIGHT = 10;
const BASE_SECTOR = 2048;

describe('NVMe timeout ladder in a TCG guest: throttled drive, short io_timeout', () => {
  const g = new NvmeGuestRun('nvme-timeout');
  const ctrl: NvmeControllerSpec = {
    id: 'nvme0',
    serial: 'rnull-nvme-t',
    slot: 4,
    namespaces: [{ nsid: 1, file: path.join(g.workDir, 'ns1.img'), sizeBytes: 16 << 20, blockSize: 512, driveOptions: [`throttling.iops-total=${IOPS}`] }],
  };
  const n = (name: string): number => count(g.report, name);

  g.boot({
    controllers: [ctrl],
    script: 'nvme-timeout-check.js',
    needs: 'drivers/nvme/namespace.js',
    frontend: true,
    plan: () => ({ bdf: bdfOf(ctrl), nsid: 1, ioTimeoutMs: IO_TIMEOUT_MS, burst: BURST, light: LIGHT, baseSector: BASE_SECTOR }),
    timings: (v) =>
      `throttle ${IOPS} IOPS, io_timeout ${IO_TIMEOUT_MS} ms, burst ${BURST}; ` +
      `light load: first write ${v('light_first_ms')} ms, then max ${v('light_max_ms')} ms per write; write burst ${v('wburst_ms')} ms, read burst ${v('rburst_ms')} ms; ` +
      `after the write burst: timeouts ${v('after_wburst_timeouts')} aborts ${v('after_wburst_aborts')} resets ${v('after_wburst_resets')} retries ${v('after_wburst_retries')}; ` +
      `final: timeouts ${v('final_timeouts')} aborts ${v('final_aborts')} resets ${v('final_resets')} retries ${v('final_retries')} commands ${v('final_commands')} late ${v('final_late')} stale ${v('final_stale')}; ` +
      `"not aborted" answers logged ${v('not_aborted_logged')}, requests failed after the budget ${v('failed_logged')}`,
  });

  test('the guest run completed without a DMAR fault; clean shutdown', () => {
    g.expectCompleted();
    expect(n('exit')).toBe(0);
    expect(n('shutdown_logged')).toBe(1);
    expect(n('errors_logged')).toBe(0);
  });

  test('one request at a time fits under io_timeout: no timeout', () => {
    expect(n('light_max_ms')).toBeLessThan(IO_TIMEOUT_MS); // after the first (the front-end's warm-up)
    expect(n('after_light_timeouts')).toBe(0);
    expect(n('after_light_resets')).toBe(0);
  });

  test('the write burst goes through timeout -> Abort ("not aborted") -> controller reset -> resubmission', () => {
    expect(n('after_wburst_timeouts')).toBeGreaterThan(0);
    expect(n('after_wburst_aborts')).toBeGreaterThan(0);
    expect(n('after_wburst_resets')).toBeGreaterThan(0);
    expect(n('after_wburst_retries')).toBeGreaterThan(0);
    expect(n('not_aborted_logged')).toBeGreaterThan(0);
    expect(n('reset_done_logged')).toBe(n('final_resets'));
    expect(n('failed_logged')).toBe(0); // no request ran out of its retry budget
  });

  test.each([['wburst'], ['rburst']])('%s: every request completed exactly once, status OK', (k) => {
    expect(n(`${k}_used`)).toBe(BURST);
    expect(n(`${k}_heads_once`)).toBe(BURST);
    expect(n(`${k}_heads_twice`)).toBe(0);
    expect(n(`${k}_status_ok`)).toBe(BURST);
  });

  test('the reads of the burst return what was written; the verify run reads every block back', () => {
    expect(n('rburst_data_ok')).toBe(BURST);
    expect(n('verified_same')).toBe(BURST + LIGHT);
  });

  test('the burst\'s blocks are in the host backing file at the right offsets', () => {
    for (let i = 0; i < BURST; i++) {
      expect(readBacking(ctrl.namespaces[0]!.file, (BASE_SECTOR + i * 8) * 512, 4096).equals(patterned(i, 4096))).toBe(true);
    }
  });

  test('shadow doorbells (--shadow-doorbells true): Doorbell Buffer Config accepted at start and again after every reset', () => {
    expect(n('dbbc_logged')).toBe(1 + n('reset_done_logged'));
  });

  test('nothing in flight at the end; no completion counted twice', () => {
    expect(n('final_in_flight')).toBe(0);
    expect(n('final_late')).toBe(0);
  });
});
