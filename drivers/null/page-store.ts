/**
 * PageStore: the data of a memory-backed null disk (native/page_store.h). A file on tmpfs mapped
 * shared (drivers/null/store-file.ts opens one so that the data outlives the daemon), or a memfd
 * that dies with the process. Sparse as null_blk's page tree: pages never written take no memory
 * and read as zeroes; discarded whole pages are freed (holes punched). Native so that every
 * thread serving the disk's hardware queues (`threads` > 1) uses the same store.
 *
 * Byte positions are disk offsets in bytes (sector * 512); the store's size is the capacity.
 */
import { native, NativePageStore } from '../../native';

export const PAGE_SIZE = 4096;

/** Size of a store made without one (openPageStore()): address space only until written. */
export const ANONYMOUS_STORE_BYTES = 64 * 2 ** 30;

export type PageStore = NativePageStore;

/**
 * A new, empty store of ANONYMOUS_STORE_BYTES in a memfd (gone with the process); or, given
 * `id` (PageStore#id on any thread of this process), that store.
 * @throws Error when no open store has that id.
 */
export function openPageStore(id?: number): PageStore {
  return new native.PageStore(id ?? { size: ANONYMOUS_STORE_BYTES });
}

/**
 * A new, empty store of `sizeBytes` (a positive multiple of 4096) in a memfd.
 * @throws RangeError for another size; SyscallError if memfd_create or mmap fails.
 */
export function memoryPageStore(sizeBytes: number): PageStore {
  return new native.PageStore({ size: sizeBytes });
}
