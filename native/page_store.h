// SharedPageStore: the memory of a memory-backed null disk whose hardware queues run on several
// threads (`threads` > 1). A sparse map from 4 KiB page number to page, as the JS PageStore, but
// one store is shared by every thread's JS object: a process-wide registry maps a store id to it,
// and a worker attaches with `new SharedPageStore(id)`. JavaScript has no shared mutable maps.
//
// Consistency: one mutex per store, held for a whole call (one guest segment), so a page is
// never allocated twice or freed under a reader, and a segment's copy is atomic with respect to
// every other thread's.
#pragma once
#include <napi.h>

#include <memory>

namespace rnull {

struct PageMap;

class SharedPageStore : public Napi::ObjectWrap<SharedPageStore> {
 public:
  static void Init(Napi::Env env, Napi::Object exports);
  explicit SharedPageStore(const Napi::CallbackInfo& info);

 private:
  Napi::Value Id(const Napi::CallbackInfo& info);
  Napi::Value PageCount(const Napi::CallbackInfo& info);
  Napi::Value BytesAllocated(const Napi::CallbackInfo& info);
  Napi::Value Write(const Napi::CallbackInfo& info);
  Napi::Value Read(const Napi::CallbackInfo& info);
  Napi::Value Discard(const Napi::CallbackInfo& info);
  std::shared_ptr<PageMap> map_;
};

}  // namespace rnull
