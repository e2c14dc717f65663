// PageStore: the data of a memory-backed null disk, kept in a file on tmpfs that is mapped
// MAP_SHARED, so a write is in the file (the page cache, which is the memory) the moment it
// returns: the data outlives the process, whatever way it ends, and a restarted daemon maps the
// same file again. Sparse like null_blk's page tree: pages never written take no memory and
// read as zeroes; discarding whole pages punches holes (fallocate PUNCH_HOLE | KEEP_SIZE).
// Without a file, the store is a memfd (data dies with the process, tests and tools).
//
// The file is mapped in 1 GiB chunks as they are first written (a disk may be larger than the
// address space). A bitmap per chunk (one bit per 4 KiB page) says which pages the file holds. Reads never touch a hole through the mapping (on tmpfs a read fault on a hole
// allocates a page); writes allocate a run of holes with fallocate first, so a full file system
// fails the write with ENOSPC instead of a SIGBUS. Built from SEEK_DATA/SEEK_HOLE at open.
//
// Shared by the threads of a disk (`threads` > 1): a process-wide registry maps a store id to
// it, and a worker attaches with `new PageStore(id)` (JavaScript has no shared mutable map).
// Consistency: one reader-writer lock per store, held for a whole call (one guest segment):
// reads and writes share it (the page cache orders concurrent copies as it would for two
// processes), discard holds it alone, so a page is never punched under a copy in progress.
#pragma once
#include <napi.h>

#include <memory>

namespace rnull {

struct PageMap;

class PageStore : public Napi::ObjectWrap<PageStore> {
 public:
  static void Init(Napi::Env env, Napi::Object exports);
  explicit PageStore(const Napi::CallbackInfo& info);

 private:
  Napi::Value Id(const Napi::CallbackInfo& info);
  Napi::Value Size(const Napi::CallbackInfo& info);
  Napi::Value PageCount(const Napi::CallbackInfo& info);
  Napi::Value BytesAllocated(const Napi::CallbackInfo& info);
  Napi::Value Write(const Napi::CallbackInfo& info);
  Napi::Value Read(const Napi::CallbackInfo& info);
  Napi::Value Discard(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);
  std::shared_ptr<PageMap> map_;
};

}  // namespace rnull
