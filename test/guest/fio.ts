/**
 * Reads the JSON that fio printed in a guest (`--output-format=json`, sent
 * back with the prelude's `block NAME FILE`) into the figures the guest
 * tests quote and check.
 */
import type { GuestReport } from './qemu';

/** One direction of a fio job, as fio's JSON output has it (fields used here). */
interface FioJsonPhase {
  io_kbytes: number;
  bw: number;
  iops: number;
  total_ios: number;
  runtime: number;
  lat_ns: { mean: number };
  clat_ns: { min: number; max: number; mean: number; percentile?: Record<string, number> };
}
interface FioJson {
  jobs: Array<{ jobname: string; error: number; read: FioJsonPhase; write: FioJsonPhase }>;
}

/** The figures worth quoting for one direction (latencies in microseconds). */
export interface FioPhase {
  ioMiB: number;
  ios: number;
  iops: number;
  /** fio's own bandwidth figure: io_kbytes over the phase's runtime. */
  bwMiBps: number;
  runtimeMs: number;
  latMeanUs: number;
  clatMinUs: number;
  clatMeanUs: number;
  clatP50Us: number | null;
  clatP99Us: number | null;
}
export interface FioSummary {
  job: string;
  error: number;
  write: FioPhase;
  /** Reads; for a verifying write job, the verify pass. */
  read: FioPhase;
}

export const round = (x: number, digits = 1): number => Number(x.toFixed(digits));

function phase(p: FioJsonPhase): FioPhase {
  const pct = (k: string): number | null => {
    const ns = p.clat_ns.percentile?.[k];
    return ns === undefined ? null : round(ns / 1000);
  };
  return {
    ioMiB: round(p.io_kbytes / 1024, 2),
    ios: p.total_ios,
    iops: Math.round(p.iops),
    bwMiBps: round(p.bw / 1024, 2),
    runtimeMs: p.runtime,
    latMeanUs: round(p.lat_ns.mean / 1000),
    clatMinUs: round(p.clat_ns.min / 1000),
    clatMeanUs: round(p.clat_ns.mean / 1000),
    clatP50Us: pct('50.000000'),
    clatP99Us: pct('99.000000'),
  };
}

/**
 * Reads the fio JSON the guest reported in block `name`: one job (the
 * scripts use group_reporting where they run several).
 */
export function fioSummary(report: GuestReport, name = 'fio'): FioSummary {
  const text = report.blocks.get(name);
  if (text === undefined) throw new Error(`guest did not report fio results ${name}`);
  // fio may put warnings before the JSON (with numjobs > 1 it warns that
  // "multiple writers may overwrite blocks", though offset_increment keeps
  // the jobs' ranges apart).
  const start = text.search(/^\{/m);
  if (start < 0) throw new Error(`no JSON in fio output ${name}:\n${text}`);
  const json = JSON.parse(text.slice(start)) as FioJson;
  if (json.jobs.length !== 1) throw new Error(`fio output ${name}: ${json.jobs.length} jobs, expected 1`);
  const job = json.jobs[0]!;
  return { job: job.jobname, error: job.error, write: phase(job.write), read: phase(job.read) };
}
