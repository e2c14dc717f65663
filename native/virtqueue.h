// Virtqueue: one split virtqueue (VIRTIO 1.2+ section 2.7) walked on the back-end side.
//
// pop() drains the avail ring into a batch: for each available head it walks the descriptor
// chain (following NEXT and one level of INDIRECT), translates every buffer through the memory
// table, and writes the resulting segments into the head's own slot of a segment table shared
// with JavaScript. push(n) publishes n used elements written by JavaScript, with one used->idx
// store and at most one call. So the JS/native boundary is crossed once per batch each way.
//
// Shared arrays (Uint32Array, allocated by JS, pinned here by references):
// - segments: size * kMaxSegments * 4 words; slot h holds chain h's segments as
//   [chunk, offsetInChunk, lengthBytes, flags(bit 0 = device-writable)];
// - batch:    size * 3 words: [head, segmentCount, chainError] per popped chain;
// - used:     size * 2 words: [head, bytesWritten] per element to publish;
// - info:     optional Float64Array(2): [monotonic ns at the last pop, published by pop(n)].
//
// Invariants:
// - a head is "in flight" from pop() to the push() that returns it; a head the guest offers
//   again while in flight, a head >= size, or an avail index more than size ahead marks the
//   queue broken (nothing more is popped) instead of touching the in-flight request's slot;
// - every guest-supplied address, length and index is checked before use (see Walk);
// - a kick is never lost: pop() returns 0 only after re-arming notifications (avail_event or
//   clearing VRING_USED_F_NO_NOTIFY) and re-checking the avail index behind a full fence;
// - ring memory stays mapped while configured: the GuestMemory is referenced, and mapped() is
//   checked on every entry point.
#pragma once
#include <napi.h>
#include <stdint.h>

#include <string>
#include <vector>

#include "guest_memory.h"

namespace rnull {

constexpr uint32_t kMaxQueueSize = 1024;   // QEMU's VIRTQUEUE_MAX_SIZE
constexpr uint32_t kMaxSegments = 256;     // per chain, after splitting at region/chunk edges
constexpr uint32_t kSegmentWords = 4;
constexpr uint32_t kBatchWords = 3;

// Chain errors reported in batch[2]. "Soft" errors leave the chain structure intact, so the
// status byte (the last byte of the last descriptor, if device-writable) is still reported as
// segment 0 and the request can be failed with VIRTIO_BLK_S_IOERR.
enum ChainError : uint32_t {
  kChainOk = 0,
  kErrDescAddress = 1,    // soft: a buffer is not inside guest memory
  kErrDescZeroLength = 2, // soft: a zero-length buffer
  kErrDescOrder = 3,      // soft: a device-readable buffer after a device-writable one
  kErrTooManySegments = 4,// soft: more than kMaxSegments segments
  kErrChainLoop = 5,      // hard: more descriptors than the table holds (a loop)
  kErrNextIndex = 6,      // hard: next index outside the table
  kErrIndirect = 7,       // hard: indirect not negotiated, nested, with NEXT, or a bad table
};

class Virtqueue : public Napi::ObjectWrap<Virtqueue> {
 public:
  static void Init(Napi::Env env, Napi::Object exports);
  explicit Virtqueue(const Napi::CallbackInfo& info);

 private:
  struct Desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
  };

  Napi::Value Configure(const Napi::CallbackInfo& info);
  Napi::Value SetCallFd(const Napi::CallbackInfo& info);
  Napi::Value SetPolling(const Napi::CallbackInfo& info);
  Napi::Value Pop(const Napi::CallbackInfo& info);
  Napi::Value Push(const Napi::CallbackInfo& info);
  Napi::Value Stop(const Napi::CallbackInfo& info);
  Napi::Value State(const Napi::CallbackInfo& info);

  bool Usable() const { return ready_ && !broken_ && memory_ != nullptr && memory_->mapped(); }
  void MarkBroken(const std::string& reason);
  uint32_t Walk(uint16_t head, uint32_t* seg, uint32_t* nseg);
  bool AddBuffer(uint64_t addr, uint32_t len, uint32_t flags, uint32_t* seg, uint32_t* nseg, uint32_t* err);
  bool LastByteInMemory(uint64_t addr, uint32_t len);
  void Notify(uint16_t oldUsed);
  uint32_t PublishUsed(uint32_t n);

  GuestMemory* memory_ = nullptr;
  Napi::ObjectReference memoryRef_;
  Napi::Reference<Napi::Uint32Array> segRef_, batchRef_, usedRef_;
  uint32_t* segments_ = nullptr;
  uint32_t* batch_ = nullptr;
  uint32_t* usedBuf_ = nullptr;
  Napi::Reference<Napi::Float64Array> infoRef_;
  double* info_ = nullptr;   // [0] monotonic ns of the last pop, [1] published by the last pop(n)
  uint64_t batchBytes_ = 0;  // a batch ends once its chains hold this many bytes (0: no limit)

  volatile Desc* desc_ = nullptr;
  volatile uint16_t* avail_ = nullptr;  // flags, idx, ring[size], used_event
  volatile uint8_t* used_ = nullptr;    // flags, idx, ring[size] of {u32 id, u32 len}, avail_event
  uint32_t size_ = 0;
  uint16_t lastAvail_ = 0;
  uint16_t usedIdx_ = 0;
  bool eventIdx_ = false;
  bool indirect_ = false;
  bool ready_ = false;
  bool broken_ = false;
  std::string brokenReason_;
  std::vector<uint8_t> inflight_;
  uint32_t inflightCount_ = 0;
  int callFd_ = -1;
  double calls_ = 0;  // statistics: calls signalled
  // Adaptive polling (see Pop): the budget grows to twice the idle gap when work comes back
  // within the limit after the queue went to sleep, and halves when a spin finds nothing.
  uint64_t pollMaxNs_ = 0;
  uint64_t pollNs_ = 0;
  uint64_t sleptAtNs_ = 0;
  bool sleeping_ = true;  // notifications re-armed, waiting for a kick
  double spins_ = 0, spinHits_ = 0;  // statistics
};

}  // namespace rnull
