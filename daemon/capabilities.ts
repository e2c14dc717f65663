/**
 * What rnull tells management software about itself, as the vhost-user spec's "Backend program
 * conventions" ask (vhost-user.rst; schema docs/interop/vhost-user.json in QEMU):
 * - `--print-capabilities`: `VHostUserBackendCapabilities` for type "block" on stdout, then exit
 *   0 without serving anything;
 * - a JSON descriptor (`VhostUserBackend`) installed under /usr/share/qemu/vhost-user/, naming
 *   the back-end type and binary (qemu/50-rnull.json, filled in by scripts/install-service.sh).
 */

/** Block features of `--print-capabilities` (`VHostUserBackendBlockFeature`). */
export type BlockFeature = 'read-only' | 'blk-file';

/** `VHostUserBackendCapabilities` with type "block". */
export interface BlockCapabilities {
  type: 'block';
  features: BlockFeature[];
}

/**
 * rnull's capabilities: `--read-only` is supported (a bare `--read-only` offers every disk
 * read-only); `--blk-file` is not (rnull's disks are null_blk-style or NVMe namespaces).
 */
export function capabilities(): BlockCapabilities {
  return { type: 'block', features: ['read-only'] };
}

/** The `--print-capabilities` output: the JSON and a newline. */
export function capabilitiesText(): string {
  return `${JSON.stringify(capabilities(), null, 2)}\n`;
}

/** `VhostUserBackend`: one installed back-end program, for discovery by libvirt and others. */
export interface VhostUserBackendDescriptor {
  description: string;
  type: 'block';
  /** Absolute path of the program. */
  binary: string;
  tags?: string[];
}

/** The descriptor of an rnull installed at `binary` (an absolute path). */
export function descriptor(binary: string): VhostUserBackendDescriptor {
  return { description: 'rnull: vhost-user-blk back-end serving null_blk-style disks and NVMe namespaces', type: 'block', binary, tags: ['rnull'] };
}
