/**
 * The real `rnull` daemon (bin/rnull over dist/) as a child process, for the unit tests that run
 * it as a user would: start it with its output collected, wait for it to stop by itself (bounded),
 * and kill what a test left running.
 */
import { ChildProcess, spawn } from 'child_process';
import * as path from 'path';

/** The daemon's launcher: run it with `process.execPath` (see rnullCommand). */
export const BIN = path.join(__dirname, '..', '..', 'bin', 'rnull');

/** A started daemon: its process, its output so far and its exit code (null when killed by a signal). */
export interface Daemon {
  proc: ChildProcess;
  /** stdout split into its non-empty lines (the JSON log), then stderr chunks as they arrived. */
  out: string[];
  exit: Promise<number | null>;
}

/** The argv that runs `rnull ...args` (node bin/rnull ...), e.g. to put after `taskset -c N`. */
export function rnullCommand(args: string[]): string[] {
  return [process.execPath, BIN, ...args];
}

/** Spawns `cmd` (an argv) in `cwd` with `env`, collecting its output (see Daemon.out). */
export function spawnDaemon(cmd: string[], cwd: string, env: NodeJS.ProcessEnv = process.env): Daemon {
  const proc = spawn(cmd[0], cmd.slice(1), { cwd, env, stdio: ['ignore', 'pipe', 'pipe'] });
  const out: string[] = [];
  proc.stdout!.on('data', (d: Buffer) => out.push(...d.toString().split('\n').filter((l) => l !== '')));
  proc.stderr!.on('data', (d: Buffer) => out.push(d.toString()));
  const exit = new Promise<number | null>((resolve) => proc.on('exit', (code) => resolve(code)));
  return { proc, out, exit };
}

/** Starts `rnull ...args` in `cwd` (see spawnDaemon). */
export function startRnull(args: string[], cwd: string, env: NodeJS.ProcessEnv = process.env): Daemon {
  return spawnDaemon(rnullCommand(args), cwd, env);
}

/**
 * Exit code of a daemon expected to stop by itself.
 * @throws Error "daemon did not exit: <its output>" after `ms` milliseconds.
 */
export async function exitOf(d: Daemon, ms = 15000): Promise<number | null> {
  const timeout = new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), ms).unref());
  const code = await Promise.race([d.exit, timeout]);
  if (code === 'timeout') throw new Error(`daemon did not exit: ${d.out.join('')}`);
  return code;
}

/** SIGKILLs the daemon if it still runs and waits for its exit (for afterEach). */
export async function killDaemon(d: Daemon | undefined): Promise<void> {
  if (d === undefined) return;
  if (d.proc.exitCode === null && d.proc.signalCode === null) d.proc.kill('SIGKILL');
  await d.exit;
}
