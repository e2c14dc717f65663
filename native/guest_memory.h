// GuestMemory: the front-end's memory table (SET_MEM_TABLE), mmap'd, with address translation.
//
// JavaScript reads and writes guest data through external ArrayBuffers over the mappings
// (no copy into the JS heap). Each region is exposed as "chunks" of at most kChunkBytes, so
// every JS view stays within V8's typed-array limits; a segment never crosses a chunk.
//
// Invariants:
// - regions_ do not overlap in guest-physical space, and none is empty;
// - while mapped_, every host pointer in regions_ is valid for its size;
// - unmap() detaches every chunk ArrayBuffer (their JS views become empty) before munmap(),
//   so JS can never touch unmapped memory.
#pragma once
#include <napi.h>
#include <stdint.h>

#include <vector>

namespace rnull {

constexpr uint64_t kChunkShift = 30;
constexpr uint64_t kChunkBytes = uint64_t(1) << kChunkShift;  // 1 GiB

struct GuestRegion {
  uint64_t gpa;        // guest-physical start
  uint64_t size;       // bytes
  uint64_t uaddr;      // the front-end's virtual address of the start (ring addresses use these)
  uint8_t* host;       // our mapping of gpa
  void* mapBase;       // what mmap returned: host minus the mmap offset's distance to its page start
  size_t mapLength;
  uint32_t firstChunk; // chunk index of the region's first byte
};

class GuestMemory : public Napi::ObjectWrap<GuestMemory> {
 public:
  static void Init(Napi::Env env, Napi::Object exports, Napi::FunctionReference* ctor);
  explicit GuestMemory(const Napi::CallbackInfo& info);
  ~GuestMemory() override;

  bool mapped() const { return mapped_; }
  // The mapped regions (empty once unmapped), for the ring walk's own table (split_ring.h).
  const std::vector<GuestRegion>& regions() const { return regions_; }

 private:
  Napi::Value Chunks(const Napi::CallbackInfo& info);
  Napi::Value RegionLayout(const Napi::CallbackInfo& info);
  Napi::Value Unmap(const Napi::CallbackInfo& info);
  void UnmapAll();

  std::vector<GuestRegion> regions_;
  std::vector<Napi::Reference<Napi::ArrayBuffer>> chunks_;
  bool mapped_ = false;
};

}  // namespace rnull
