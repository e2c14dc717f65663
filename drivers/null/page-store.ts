/**
 * PageStore: the memory backing of a null disk, a sparse map from page number to a 4 KiB page
 * (null_blk and rnull keep the same shape: an xarray of pages). Pages that were never written
 * read as zeroes; discarded whole pages are freed. It lives in native code (native/page_store.h)
 * so that every thread serving the disk's hardware queues (`threads` > 1) uses the same store.
 *
 * Byte positions are disk offsets in bytes (sector * 512).
 */
import { native, NativePageStore } from '../../native';

export const PAGE_SIZE = 4096;

export type PageStore = NativePageStore;

/**
 * A new, empty store; or, given `id` (PageStore#id on any thread of this process), that store.
 * @throws Error when no store has that id.
 */
export function openPageStore(id?: number): PageStore {
  return new native.PageStore(id);
}
