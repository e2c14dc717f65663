/**
 * CPU lists as Linux writes them (cpuset(7) "List format"): comma-separated CPU numbers and
 * inclusive ranges, e.g. "0,1" or "2-3" or "0-1,4". Used by the disk option `cpus` (queue
 * thread i on the i-th CPU of the list) and to read /sys/devices/system/cpu/online.
 */

/** Highest CPU number accepted (the native cpu_set_t holds 1024 CPUs). */
export const MAX_CPU = 1023;

/**
 * The CPUs of a list, in the order written (a range ascending); repeats are kept (two threads
 * may share a CPU). '' is the empty list.
 * @throws RangeError naming the bad part: not a number, a range running backwards, a CPU above
 * MAX_CPU.
 */
export function parseCpuList(text: string): number[] {
  const out: number[] = [];
  const t = text.trim();
  if (t === '') return out;
  for (const part of t.split(',')) {
    const m = /^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$/.exec(part);
    if (m === null) throw new RangeError(`"${part}" is not a CPU number or a range like 2-3`);
    const first = Number(m[1]);
    const last = m[2] === undefined ? first : Number(m[2]);
    if (last < first) throw new RangeError(`range ${part.trim()} runs backwards`);
    if (last > MAX_CPU) throw new RangeError(`CPU ${last} is above ${MAX_CPU}`);
    for (let c = first; c <= last; c++) out.push(c);
  }
  return out;
}

/**
 * The disk option's value as a list: an array of CPU numbers, or a list string.
 * @throws RangeError for anything else, or a number that is not a CPU number.
 */
export function cpuListOf(v: unknown): number[] {
  if (typeof v === 'string') return parseCpuList(v);
  if (!Array.isArray(v)) throw new RangeError('expected a list of CPU numbers, e.g. [0, 1] or "0,1" or "2-3"');
  return v.map((c) => {
    if (typeof c === 'string' && /^\s*\d+\s*$/.test(c)) c = Number(c);
    if (typeof c !== 'number' || !Number.isInteger(c) || c < 0 || c > MAX_CPU) throw new RangeError(`${JSON.stringify(c)} is not a CPU number (0 to ${MAX_CPU})`);
    return c;
  });
}

/** "0,2-3"-style text of a list (sorted, repeats dropped), as /proc's Cpus_allowed_list. */
export function formatCpuList(cpus: readonly number[]): string {
  const s = [...new Set(cpus)].sort((a, b) => a - b);
  const parts: string[] = [];
  for (let i = 0; i < s.length; ) {
    let j = i;
    while (j + 1 < s.length && s[j + 1] === s[j] + 1) j++;
    parts.push(j === i ? `${s[i]}` : `${s[i]}-${s[j]}`);
    i = j + 1;
  }
  return parts.join(',');
}
