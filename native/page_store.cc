#include "page_store.h"

#include <stdint.h>
#include <string.h>

#include <mutex>
#include <shared_mutex>
#include <unordered_map>
#include <vector>

#include "errors.h"

namespace rnull {

namespace {
constexpr uint64_t kPageSize = 4096;
constexpr uint64_t kPageShift = 12;
// Byte positions are JS numbers: exact below 2^53.
constexpr double kMaxPos = 9007199254740991.0;
}  // namespace

struct PageMap {
  uint32_t id = 0;
  std::shared_mutex mu;
  std::unordered_map<uint64_t, uint8_t*> pages;
  // Freed pages kept for reuse (zeroed when handed out), as the JS store's free slots.
  std::vector<uint8_t*> free;

  ~PageMap() {
    for (auto& p : pages) delete[] p.second;
    for (uint8_t* p : free) delete[] p;
  }

  uint8_t* Alloc() {
    if (!free.empty()) {
      uint8_t* p = free.back();
      free.pop_back();
      memset(p, 0, kPageSize);
      return p;
    }
    return new uint8_t[kPageSize]();
  }
};

namespace {

std::mutex gRegistryMu;
std::unordered_map<uint32_t, std::weak_ptr<PageMap>> gRegistry;
uint32_t gNextId = 1;

std::shared_ptr<PageMap> CreateMap() {
  std::lock_guard<std::mutex> lock(gRegistryMu);
  for (auto it = gRegistry.begin(); it != gRegistry.end();) {
    if (it->second.expired()) it = gRegistry.erase(it);
    else ++it;
  }
  auto map = std::make_shared<PageMap>();
  map->id = gNextId++;
  gRegistry[map->id] = map;
  return map;
}

std::shared_ptr<PageMap> FindMap(uint32_t id) {
  std::lock_guard<std::mutex> lock(gRegistryMu);
  auto it = gRegistry.find(id);
  return it == gRegistry.end() ? nullptr : it->second.lock();
}

// Reads (pos, array, offset, length) arguments: a byte position on the disk and a range of the
// array; false after throwing.
bool CopyArgs(const Napi::CallbackInfo& info, uint64_t* pos, uint8_t** data, uint64_t* len) {
  double p;
  size_t n;
  if (!ArgNumber(info, 0, "position", &p) || !ArgByteRange(info, 1, 2, 3, "PageStore", data, &n)) return false;
  if (!(p >= 0) || p + static_cast<double>(n) > kMaxPos) {
    ThrowRangeError(info.Env(), "PageStore: range outside the disk");
    return false;
  }
  *pos = static_cast<uint64_t>(p);
  *len = n;
  return true;
}

}  // namespace

void PageStore::Init(Napi::Env env, Napi::Object exports) {
  Napi::Function ctor = DefineClass(env, "PageStore",
                                    {
                                        InstanceAccessor<&PageStore::Id>("id"),
                                        InstanceAccessor<&PageStore::PageCount>("pageCount"),
                                        InstanceAccessor<&PageStore::BytesAllocated>("bytesAllocated"),
                                        InstanceMethod<&PageStore::Write>("write"),
                                        InstanceMethod<&PageStore::Read>("read"),
                                        InstanceMethod<&PageStore::Discard>("discard"),
                                    });
  exports.Set("PageStore", ctor);
}

// new PageStore(): a new, empty store. new PageStore(id): the store `id` created on
// any thread of this process (Error if it no longer exists).
PageStore::PageStore(const Napi::CallbackInfo& info) : Napi::ObjectWrap<PageStore>(info) {
  if (info.Length() < 1 || info[0].IsUndefined()) {
    map_ = CreateMap();
    return;
  }
  int64_t id;
  if (!ArgInt(info, 0, "id", &id)) return;
  map_ = FindMap(static_cast<uint32_t>(id));
  if (map_ == nullptr) ThrowError(info.Env(), "PageStore: no store with that id in this process");
}

Napi::Value PageStore::Id(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), map_ ? map_->id : 0);
}

Napi::Value PageStore::PageCount(const Napi::CallbackInfo& info) {
  std::shared_lock<std::shared_mutex> lock(map_->mu);
  return Napi::Number::New(info.Env(), static_cast<double>(map_->pages.size()));
}

Napi::Value PageStore::BytesAllocated(const Napi::CallbackInfo& info) {
  std::shared_lock<std::shared_mutex> lock(map_->mu);
  return Napi::Number::New(info.Env(), static_cast<double>((map_->pages.size() + map_->free.size()) * kPageSize));
}

namespace {

// Calls f(pageNo, offsetInPage, bytes, done) for each page piece of [pos, pos + len), where
// `done` counts the bytes before that piece.
template <typename F>
void ForEachPage(uint64_t pos, uint64_t len, F f) {
  for (uint64_t done = 0; done < len;) {
    uint64_t at = pos + done;
    uint64_t in = at & (kPageSize - 1);
    uint64_t n = std::min(len - done, kPageSize - in);
    f(at >> kPageShift, in, n, done);
    done += n;
  }
}

}  // namespace

// write(pos, src, srcOffset, length): copies `length` bytes of src into the disk at byte `pos`.
Napi::Value PageStore::Write(const Napi::CallbackInfo& info) {
  uint64_t pos, len;
  uint8_t* src;
  if (!CopyArgs(info, &pos, &src, &len)) return Napi::Value();
  PageMap& m = *map_;
  std::unique_lock<std::shared_mutex> lock(m.mu);
  ForEachPage(pos, len, [&](uint64_t pageNo, uint64_t in, uint64_t n, uint64_t done) {
    uint8_t*& page = m.pages[pageNo];
    if (page == nullptr) page = m.Alloc();
    memcpy(page + in, src + done, n);
  });
  return info.Env().Undefined();
}

// read(pos, dst, dstOffset, length): copies from the disk at byte `pos`; unwritten pages read 0.
Napi::Value PageStore::Read(const Napi::CallbackInfo& info) {
  uint64_t pos, len;
  uint8_t* dst;
  if (!CopyArgs(info, &pos, &dst, &len)) return Napi::Value();
  PageMap& m = *map_;
  std::shared_lock<std::shared_mutex> lock(m.mu);
  ForEachPage(pos, len, [&](uint64_t pageNo, uint64_t in, uint64_t n, uint64_t done) {
    auto it = m.pages.find(pageNo);
    if (it == m.pages.end()) memset(dst + done, 0, n);
    else memcpy(dst + done, it->second + in, n);
  });
  return info.Env().Undefined();
}

// discard(pos, length): the range reads as zeroes; whole pages are freed, partial ones zeroed.
Napi::Value PageStore::Discard(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  double p, n;
  if (!ArgNumber(info, 0, "position", &p) || !ArgNumber(info, 1, "length", &n)) return Napi::Value();
  if (!(p >= 0 && n >= 0) || p + n > kMaxPos) {
    ThrowRangeError(env, "PageStore: range outside the disk");
    return Napi::Value();
  }
  PageMap& m = *map_;
  std::unique_lock<std::shared_mutex> lock(m.mu);
  ForEachPage(static_cast<uint64_t>(p), static_cast<uint64_t>(n), [&](uint64_t pageNo, uint64_t in, uint64_t k, uint64_t) {
    auto it = m.pages.find(pageNo);
    if (it == m.pages.end()) return;
    if (k == kPageSize) {
      m.free.push_back(it->second);
      m.pages.erase(it);
    } else {
      memset(it->second + in, 0, k);
    }
  });
  return env.Undefined();
}

}  // namespace rnull
