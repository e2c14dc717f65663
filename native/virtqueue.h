// Virtqueue: one split virtqueue (VIRTIO 1.2+ section 2.7) walked on the back-end side.
//
// pop() drains the avail ring into a batch: for each available head it walks the descriptor
// chain (following NEXT and one level of INDIRECT), translates every buffer through the memory
// table, and writes the resulting segments into the head's own slot of a segment table shared
// with JavaScript. The ring walking itself is plain C++ in split_ring.h (fuzzed without N-API);
// this class binds it to JavaScript and adds polling and the call eventfd. push(n) publishes n used elements written by JavaScript, with one used->idx
// store and at most one call. So the JS/native boundary is crossed once per batch each way.
//
// Shared arrays (Uint32Array, allocated by JS, pinned here by references):
// - segments: size * kMaxSegments * 4 words; slot h holds chain h's segments as
//   [chunk, offsetInChunk, lengthBytes, flags(bit 0 = device-writable)];
// - batch:    size * 3 words: [head, segmentCount, chainError] per popped chain;
// - used:     size * 2 words: [head, bytesWritten] per element to publish;
// - info:     optional Float64Array(2..4): [monotonic ns at the last pop, published by pop(n),
//             when the polling spin must end (0: no limit), pollId of the sibling virtqueue the
//             last spin gave way to (-1: none)].
//
// Invariants:
// - a head is "in flight" from pop() to the push() that returns it; a head the guest offers
//   again while in flight, a head >= size, or an avail index more than size ahead marks the
//   queue broken (nothing more is popped) instead of touching the in-flight request's slot;
// - every guest-supplied address, length and index is checked before use (SplitRing::Walk);
// - no call to a peer's fd blocks: the call fd is made O_NONBLOCK, and EAGAIN (a counter that
//   is already non-zero) counts as signalled;
// - a kick is never lost: pop() returns 0 only after re-arming notifications (avail_event or
//   clearing VRING_USED_F_NO_NOTIFY) and re-checking the avail index behind a full fence;
// - ring memory stays mapped while configured: the GuestMemory is referenced, and mapped() is
//   checked on every entry point.
#pragma once
#include <napi.h>
#include <stdint.h>

#include "guest_memory.h"
#include "split_ring.h"

namespace rnull {

static_assert(kRingChunkShift == kChunkShift, "split_ring.h and guest_memory.h disagree on the chunk size");

class Virtqueue : public Napi::ObjectWrap<Virtqueue> {
 public:
  static void Init(Napi::Env env, Napi::Object exports);
  explicit Virtqueue(const Napi::CallbackInfo& info);
  ~Virtqueue() override;

 private:
  Napi::Value Configure(const Napi::CallbackInfo& info);
  Napi::Value SetCallFd(const Napi::CallbackInfo& info);
  Napi::Value SetPolling(const Napi::CallbackInfo& info);
  Napi::Value Pop(const Napi::CallbackInfo& info);
  Napi::Value Push(const Napi::CallbackInfo& info);
  Napi::Value Stop(const Napi::CallbackInfo& info);
  Napi::Value State(const Napi::CallbackInfo& info);
  Napi::Value SetInflight(const Napi::CallbackInfo& info);
  Napi::Value Signal(const Napi::CallbackInfo& info);
  Napi::Value PollId(const Napi::CallbackInfo& info);
  // Drops the inflight block if its mapping went away (the ring then runs untracked).
  void CheckInflightMapping();

  bool Usable() const { return ring_.ready() && !ring_.broken() && memory_ != nullptr && memory_->mapped(); }
  // Polling siblings: the configured virtqueues of this thread (one event loop) share its
  // core, so a polling spin on one ring ends as soon as another of them has new avail entries
  // (a two-queue guest would otherwise wait out the whole spin of the other queue).
  void JoinSiblings();
  void LeaveSiblings();
  const Virtqueue* SiblingWithWork() const;
  uint32_t PublishUsed(uint32_t n);
  void Notify();

  GuestMemory* memory_ = nullptr;
  Napi::ObjectReference memoryRef_;
  RegionTable regions_;  // memory_'s regions, as the ring walk sees them
  SplitRing ring_;
  Napi::Reference<Napi::Uint32Array> segRef_, batchRef_, usedRef_;
  Napi::Reference<Napi::Float64Array> infoRef_;
  GuestMemory* inflightMem_ = nullptr;  // the inflight region's mapping (setInflight), or none
  Napi::ObjectReference inflightRef_;
  double* info_ = nullptr;   // [0] monotonic ns of the last pop, [1] published by the last pop(n)
  bool infoSpinLimit_ = false;  // info_ has [2]: the polling spin ends by that time (0: no limit)
  bool infoSibling_ = false;    // info_ has [3]: the pollId of the sibling a spin yielded to (-1: none)
  double pollId_ = 0;           // unique in the process (pollId accessor), reported in a sibling's info[3]
  uint64_t batchBytes_ = 0;  // a batch ends once its chains hold this many bytes (0: no limit)
  int callFd_ = -1;
  double calls_ = 0;  // statistics: calls signalled
  // Adaptive polling (see Pop): the budget grows to twice the idle gap when work comes back
  // within the limit after the queue went to sleep, and halves when a spin finds nothing.
  uint64_t pollMaxNs_ = 0;
  uint64_t pollNs_ = 0;
  uint64_t sleptAtNs_ = 0;
  bool sleeping_ = true;  // notifications re-armed, waiting for a kick
  uint16_t seenAvail_ = 0;  // the avail index the last pop() saw (entries past it are new work)
  double spins_ = 0, spinHits_ = 0, spinYields_ = 0;  // statistics (yields: spins ended for a sibling)
};

}  // namespace rnull
