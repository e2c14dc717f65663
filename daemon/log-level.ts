/**
 * LiveLogLevel: changes the level of a pino logger and of every child made from it so far
 * (pino copies the level into a child when the child is made, so setting the root's level
 * alone would leave the disks' and connections' loggers as they were). Children are tracked
 * through pino's `onChild` hook with weak references: a child no longer used is not kept.
 * Worker threads have their own loggers and keep the level they started with.
 */
import type { Logger, LoggerOptions } from 'pino';

export class LiveLogLevel {
  private readonly children = new Set<WeakRef<Logger>>();
  private readonly finalizer = new FinalizationRegistry<WeakRef<Logger>>((ref) => this.children.delete(ref));

  /** Options to merge into pino's: registers every child (and grandchild) made. */
  readonly options: Pick<LoggerOptions, 'onChild'> = {
    onChild: (child: Logger) => {
      const ref = new WeakRef(child);
      this.children.add(ref);
      this.finalizer.register(child, ref);
    },
  };

  /** Sets `level` on `root` and on each of its live children. */
  set(root: Logger, level: string): void {
    root.level = level;
    for (const ref of this.children) {
      const c = ref.deref();
      if (c === undefined) this.children.delete(ref);
      else c.level = level;
    }
  }
}
