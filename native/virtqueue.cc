#include "virtqueue.h"

#include <errno.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <atomic>

#include "clock.h"
#include "errors.h"
#include "fd_ops.h"

namespace rnull {
namespace {

// Smallest non-zero polling budget: below a few microseconds a spin cannot beat a wake-up.
constexpr uint64_t kMinPollNs = 2000;

inline uint64_t NowNs() { return MonotonicNowNs(); }

// The configured virtqueues of this thread (see Virtqueue::JoinSiblings). Each Node thread
// (main, workers) has its own event loop and its own list. Plain arrays, nothing to destroy at
// thread exit (a Virtqueue finalized after that must still find a valid list). A queue beyond
// the capacity just does not take part (its spins never yield, nobody yields to it).
constexpr uint32_t kMaxSiblings = 512;
thread_local Virtqueue* tlsSiblings[kMaxSiblings];
thread_local uint32_t tlsSiblingCount = 0;



// o[key] as a safe non-negative integer, or *out = 0 when absent or undefined; false if it is
// something else.
bool OptionalU64(Napi::Object o, const char* key, uint64_t* out) {
  *out = 0;
  if (!o.Has(key) || o.Get(key).IsUndefined()) return true;
  return GetSafeU64(o, key, out);
}

bool GetArray(Napi::Object o, const char* key, size_t minWords, Napi::Uint32Array* out) {
  Napi::Value v = o.Get(key);
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_uint32_array) return false;
  *out = v.As<Napi::Uint32Array>();
  return out->ElementLength() >= minWords;
}

}  // namespace

void Virtqueue::Init(Napi::Env env, Napi::Object exports) {
  Napi::Function f = DefineClass(env, "Virtqueue",
                                 {
                                     InstanceMethod<&Virtqueue::Configure>("configure"),
                                     InstanceMethod<&Virtqueue::SetCallFd>("setCallFd"),
                                     InstanceMethod<&Virtqueue::SetPolling>("setPolling"),
                                     InstanceMethod<&Virtqueue::Pop>("pop"),
                                     InstanceMethod<&Virtqueue::Push>("push"),
                                     InstanceMethod<&Virtqueue::Stop>("stop"),
                                     InstanceMethod<&Virtqueue::State>("state"),
                                     InstanceMethod<&Virtqueue::SetInflight>("setInflight"),
                                     InstanceMethod<&Virtqueue::Signal>("signal"),
                                     InstanceAccessor<&Virtqueue::PollId>("pollId"),
                                 });
  exports.Set("Virtqueue", f);
  Napi::Object c = Napi::Object::New(env);
  c.Set("MAX_QUEUE_SIZE", kMaxQueueSize);
  c.Set("MAX_SEGMENTS", kMaxSegments);
  c.Set("SEGMENT_WORDS", kSegmentWords);
  c.Set("BATCH_WORDS", kBatchWords);
  exports.Set("virtqueueConstants", c);
}

// Poll ids are unique in the process (not reused), so an id read back from info[3] can never
// name another virtqueue than the one that had the work.
Virtqueue::Virtqueue(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Virtqueue>(info) {
  static std::atomic<uint32_t> nextPollId{0};
  pollId_ = static_cast<double>(nextPollId.fetch_add(1) + 1);
}

Napi::Value Virtqueue::PollId(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), pollId_); }

Virtqueue::~Virtqueue() { LeaveSiblings(); }

void Virtqueue::JoinSiblings() {
  for (uint32_t i = 0; i < tlsSiblingCount; i++) {
    if (tlsSiblings[i] == this) return;
  }
  if (tlsSiblingCount < kMaxSiblings) tlsSiblings[tlsSiblingCount++] = this;
}

void Virtqueue::LeaveSiblings() {
  for (uint32_t i = 0; i < tlsSiblingCount; i++) {
    if (tlsSiblings[i] == this) {
      tlsSiblings[i] = tlsSiblings[--tlsSiblingCount];
      return;
    }
  }
}

// Whether another virtqueue of this thread sleeps on its kick (notifications armed) while the
// guest has made entries available past what its last pop() saw: a few loads per sibling (its
// avail index lies in guest memory it keeps mapped). A sibling that is not asleep (out of free
// tags, or resuming after its drain budget) has its own way back and does not count.
const Virtqueue* Virtqueue::SiblingWithWork() const {
  for (uint32_t i = 0; i < tlsSiblingCount; i++) {
    const Virtqueue* v = tlsSiblings[i];
    if (v != this && v->sleeping_ && v->Usable() && v->ring_.AvailIdx() != v->seenAvail_) return v;
  }
  return nullptr;
}

// configure({ memory, size, descAddr, availAddr, usedAddr, lastAvailIdx, eventIdx, indirect,
//             segments, batch, used, info?, batchBytes?, maxDescriptors?, maxBytes? }): starts
// the ring. Addresses are the front-end's virtual addresses (SET_VRING_ADDR); size is the ring
// size (power of two, 1..1024); lastAvailIdx comes from SET_VRING_BASE. The used index
// continues from the ring's used->idx. maxDescriptors / maxBytes bound each chain (guest
// descriptors, not segments; bytes summed over them; 0 or absent: none, but never more than
// 2^32 - 1 bytes): a longer chain is a soft chain error (8, 9). Throws RangeError when a ring
// is not inside guest memory or misaligned (VIRTIO 1.2 section 2.7, table 2.1).
Napi::Value Virtqueue::Configure(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsObject()) {
    ThrowTypeError(env, "expected an options object");
    return Napi::Value();
  }
  Napi::Object o = info[0].As<Napi::Object>();
  Napi::Value memv = o.Get("memory");
  if (!memv.IsObject()) {
    ThrowTypeError(env, "memory must be a GuestMemory");
    return Napi::Value();
  }
  AddonData* data = env.GetInstanceData<AddonData>();
  Napi::Object memObj = memv.As<Napi::Object>();
  if (!memObj.InstanceOf(data->guestMemoryCtor.Value())) {
    ThrowTypeError(env, "memory must be a GuestMemory");
    return Napi::Value();
  }
  GuestMemory* mem = GuestMemory::Unwrap(memObj);
  uint64_t size, descAddr, availAddr, usedAddr, lastAvail;
  if (!GetSafeU64(o, "size", &size) || !GetSafeU64(o, "descAddr", &descAddr) || !GetSafeU64(o, "availAddr", &availAddr) ||
      !GetSafeU64(o, "usedAddr", &usedAddr) || !GetSafeU64(o, "lastAvailIdx", &lastAvail)) {
    ThrowTypeError(env, "size, descAddr, availAddr, usedAddr, lastAvailIdx must be safe non-negative integers");
    return Napi::Value();
  }
  if (size == 0 || size > kMaxQueueSize || (size & (size - 1)) != 0) {
    ThrowRangeError(env, "ring size must be a power of two from 1 to 1024");
    return Napi::Value();
  }
  if (lastAvail > 0xffff) {
    ThrowRangeError(env, "lastAvailIdx must fit 16 bits");
    return Napi::Value();
  }
  Napi::Uint32Array seg, batch, used;
  if (!GetArray(o, "segments", size * kMaxSegments * kSegmentWords, &seg) ||
      !GetArray(o, "batch", size * kBatchWords, &batch) || !GetArray(o, "used", size * 2, &used)) {
    ThrowTypeError(env, "segments, batch and used must be Uint32Arrays of the documented sizes");
    return Napi::Value();
  }
  uint64_t batchBytes = 0, maxDescriptors = 0, maxBytes = 0;
  if (!OptionalU64(o, "batchBytes", &batchBytes) || !OptionalU64(o, "maxDescriptors", &maxDescriptors) ||
      !OptionalU64(o, "maxBytes", &maxBytes) || maxDescriptors > 0xffffffffull) {
    ThrowTypeError(env, "batchBytes, maxDescriptors and maxBytes must be safe non-negative integers");
    return Napi::Value();
  }
  if (!mem->mapped()) {
    ThrowRangeError(env, "guest memory is not mapped");
    return Napi::Value();
  }
  RegionTable regions;
  std::vector<RingRegion> rr;
  rr.reserve(mem->regions().size());
  for (const GuestRegion& g : mem->regions()) rr.push_back(RingRegion{g.gpa, g.size, g.uaddr, g.host, g.firstChunk});
  regions.Assign(rr.data(), rr.size());
  // Check the ring against the new table before anything changes (a failed configure leaves
  // the queue as it was).
  SplitRing probe;
  ChainLimits limits;
  limits.maxDescriptors = static_cast<uint32_t>(maxDescriptors);
  limits.maxBytes = maxBytes;
  const char* why = probe.Configure(&regions, static_cast<uint32_t>(size), descAddr, availAddr, usedAddr,
                                    static_cast<uint16_t>(lastAvail), false, false, limits, seg.Data(), batch.Data(), used.Data());
  if (why != nullptr) {
    ThrowRangeError(env, why);
    return Napi::Value();
  }
  // Everything is checked: from here on the queue changes.
  memory_ = mem;
  memoryRef_ = Napi::Persistent(memObj);
  segRef_ = Napi::Persistent(seg);
  batchRef_ = Napi::Persistent(batch);
  usedRef_ = Napi::Persistent(used);
  batchBytes_ = batchBytes;
  Napi::Value infov = o.Get("info");
  if (infov.IsTypedArray() && infov.As<Napi::TypedArray>().TypedArrayType() == napi_float64_array &&
      infov.As<Napi::Float64Array>().ElementLength() >= 2) {
    infoRef_ = Napi::Persistent(infov.As<Napi::Float64Array>());
    info_ = infov.As<Napi::Float64Array>().Data();
    infoSpinLimit_ = infov.As<Napi::Float64Array>().ElementLength() >= 3;
    infoSibling_ = infov.As<Napi::Float64Array>().ElementLength() >= 4;
  } else {
    info_ = nullptr;
    infoSpinLimit_ = false;
    infoSibling_ = false;
  }
  regions_ = regions;
  ring_.Configure(&regions_, static_cast<uint32_t>(size), descAddr, availAddr, usedAddr, static_cast<uint16_t>(lastAvail),
                  o.Get("eventIdx").ToBoolean().Value(), o.Get("indirect").ToBoolean().Value(), limits, seg.Data(),
                  batch.Data(), used.Data());
  sleeping_ = true;
  sleptAtNs_ = 0;
  pollNs_ = pollMaxNs_;
  seenAvail_ = static_cast<uint16_t>(lastAvail);
  JoinSiblings();
  return env.Undefined();
}

// setCallFd(fd): the call eventfd to signal after publishing used elements; -1 for none.
// Sets O_NONBLOCK on it (other flags kept): a peer's fd must never block this thread.
// Throws SyscallError when fd is not an open fd.
Napi::Value Virtqueue::SetCallFd(const Napi::CallbackInfo& info) {
  int64_t fd;
  if (!ArgInt(info, 0, "fd", &fd)) return Napi::Value();
  if (fd >= 0) {
    int e = SetFdNonBlocking(static_cast<int>(fd), true, nullptr);
    if (e != 0) {
      ThrowSyscallError(info.Env(), "fcntl", e);
      return Napi::Value();
    }
  }
  callFd_ = fd < 0 ? -1 : static_cast<int>(fd);
  return info.Env().Undefined();
}

// setPolling(maxNs): after a batch, spin on the avail index for up to the current adaptive
// budget (at most maxNs nanoseconds) before sleeping on the kick eventfd; 0 disables polling.
// While spinning, the driver's kicks stay suppressed (VIRTIO 1.2 section 2.7.10).
Napi::Value Virtqueue::SetPolling(const Napi::CallbackInfo& info) {
  int64_t ns;
  if (!ArgInt(info, 0, "maxNs", &ns)) return Napi::Value();
  if (ns < 0 || ns > 1000000000) {
    ThrowRangeError(info.Env(), "polling limit must be 0 to 1e9 ns");
    return Napi::Value();
  }
  pollMaxNs_ = static_cast<uint64_t>(ns);
  pollNs_ = pollMaxNs_;
  return info.Env().Undefined();
}

// pop(): pops available chains into the batch and returns how many, or -1 once the queue is
// broken (see state().brokenReason). When the ring is empty it may first spin for the adaptive
// polling budget (setPolling); it returns 0 only after re-arming notifications and re-checking
// the avail index, so a kick can never be lost.
Napi::Value Virtqueue::Pop(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  // pop(n): first publish used[0..n) as push(n) would (one crossing per batch, not two);
  // info[1] tells how many were published.
  if (info.Length() > 0) {
    int64_t n;
    if (!ArgInt(info, 0, "n", &n)) return Napi::Value();
    if (n < 0 || n > static_cast<int64_t>(ring_.size())) {
      ThrowRangeError(env, "n outside the used buffer");
      return Napi::Value();
    }
    uint32_t published = n > 0 && ring_.ready() && memory_ != nullptr && memory_->mapped() ? PublishUsed(static_cast<uint32_t>(n)) : 0;
    if (info_ != nullptr) info_[1] = published;
  }
  // pop(n, max): at most `max` chains (free tags); the rest stay in the avail ring, and
  // notifications are not re-armed for them (the caller comes back when tags free up).
  uint32_t max = ring_.size();
  if (info.Length() > 1) {
    int64_t m;
    if (!ArgInt(info, 1, "max", &m)) return Napi::Value();
    if (m < 0) m = 0;
    if (m < static_cast<int64_t>(max)) max = static_cast<uint32_t>(m);
  }
  CheckInflightMapping();
  if (ring_.broken()) return Napi::Number::New(env, -1);
  if (!Usable() || max == 0) return Napi::Number::New(env, 0);
  if (infoSibling_) info_[3] = -1;
  // pop(n, max, true): only requests resubmitted after a restart (GET_VRING_BASE drains them
  // before answering; nothing new is taken from the avail ring).
  if (info.Length() > 2 && info[2].ToBoolean().Value()) {
    if (info_ != nullptr) info_[0] = static_cast<double>(NowNs());
    uint32_t count = 0;
    uint64_t bytes = 0;
    ring_.PopResubmits(max, batchBytes_, &count, &bytes);
    return Napi::Number::New(env, count);
  }
  if (sleeping_) {
    sleeping_ = false;
    // Woken by a kick within the limit: a spin of twice this idle gap would have caught it,
    // so that becomes the budget at once (doubling from a small floor converged far too slowly:
    // the round trip through a sleeping front-end is ~40-60 us on these machines).
    uint64_t idle = NowNs() - sleptAtNs_;
    if (pollMaxNs_ > 0 && idle < pollMaxNs_) {
      uint64_t want = 2 * idle < kMinPollNs ? kMinPollNs : 2 * idle;
      if (want > pollNs_) pollNs_ = want > pollMaxNs_ ? pollMaxNs_ : want;
    }
  }
  uint16_t availIdx = ring_.AvailIdx();
  // The batch's start time (info[0]) is taken after the avail index is read, so every chain
  // this pop takes was made available before it: a timer-mode deadline counted from it can
  // never fall before the front-end's submission (stamped before the read, a thread preempted
  // in between gave a polling client 46.6 us at completion_nsec 50000).
  if (info_ != nullptr) info_[0] = static_cast<double>(NowNs());
  uint32_t count = 0;
  uint64_t bytes = 0;
  bool spun = false;
  for (;;) {
    uint16_t pending = ring_.PopChains(availIdx, max, batchBytes_, &count, &bytes);
    // Hand over what we have; the caller comes back for more (notifications stay off meanwhile).
    if (ring_.broken() || count > 0 || pending > 0) break;
    // info[2] already past (a timer due, or SPIN_NONE: the driver has requests in flight that
    // end through the event loop): no spin, not counted as one. The clock is read only then.
    if (!spun && pollNs_ > 0 && !(infoSpinLimit_ && info_[2] > 0 && info_[2] <= static_cast<double>(NowNs()))) {
      spun = true;
      spins_++;
      ring_.SuppressKicks();
      uint64_t deadline = NowNs() + pollNs_;
      // info[2] (when given and non-zero): the spin ends by then (monotonic ns), e.g. for a
      // request timer due then; a spin cut short that way does not shrink the budget.
      bool cut = false;
      if (infoSpinLimit_ && info_[2] > 0 && info_[2] < static_cast<double>(deadline)) {
        deadline = static_cast<uint64_t>(info_[2]);
        cut = true;
      }
      uint16_t seen = availIdx;
      const Virtqueue* yieldTo = nullptr;
      const bool siblings = tlsSiblingCount > 1;
      while (seen == availIdx && NowNs() < deadline) {
        CpuRelax();
        seen = ring_.AvailIdx();
        // Another ring of this thread has work: end the spin (without shrinking the budget)
        // and say which (info[3]), so the caller serves it now rather than after this spin.
        if (siblings && seen == availIdx && (yieldTo = SiblingWithWork()) != nullptr) break;
      }
      if (yieldTo != nullptr) {
        spinYields_++;
        cut = true;
        if (infoSibling_) info_[3] = yieldTo->pollId_;
      }
      if (seen != availIdx) {
        spinHits_++;
        // The chains popped next arrived now, not when this pop began: their start time.
        if (info_ != nullptr) info_[0] = static_cast<double>(NowNs());
        availIdx = seen;
        continue;
      }
      if (!cut) {
        pollNs_ /= 2;
        if (pollNs_ < kMinPollNs) pollNs_ = 0;
      }
    }
    // Going to sleep: re-arm notifications, then make sure nothing arrived in between.
    ring_.ArmKicks();
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t again = ring_.AvailIdx();
    if (again != availIdx) {
      // Arrived after the spin (or instead of it): now is their start time, not this pop's
      // beginning (a timer-mode request stamped with the older time could end up to a whole
      // spin earlier than completion_nsec after its arrival).
      if (info_ != nullptr) info_[0] = static_cast<double>(NowNs());
      availIdx = again;
      continue;
    }
    sleeping_ = true;
    sleptAtNs_ = NowNs();
    break;
  }
  seenAvail_ = availIdx;
  // Chains popped before the queue broke are still returned (they are in flight); -1 after.
  return Napi::Number::New(env, ring_.broken() && count == 0 ? -1 : static_cast<double>(count));
}

// push(n): publishes used elements used[0..n) = [head, bytesWritten]: entries first, then a
// release store of used->idx, then (after a full fence) the driver's suppression state decides
// whether to signal the call eventfd once. Heads not in flight are skipped (and counted).
// Returns the number published.
Napi::Value Virtqueue::Push(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int64_t n;
  if (!ArgInt(info, 0, "n", &n)) return Napi::Value();
  if (!ring_.ready() || memory_ == nullptr || !memory_->mapped()) return Napi::Number::New(env, 0);
  if (n < 0 || n > static_cast<int64_t>(ring_.size())) {
    ThrowRangeError(env, "n outside the used buffer");
    return Napi::Value();
  }
  return Napi::Number::New(env, PublishUsed(static_cast<uint32_t>(n)));
}

uint32_t Virtqueue::PublishUsed(uint32_t n) {
  CheckInflightMapping();
  bool signal = false;
  uint32_t published = ring_.PublishUsed(n, &signal);
  if (signal) Notify();
  return published;
}

// Signals the call fd without ever blocking. The fd is O_NONBLOCK (setCallFd), and EAGAIN means
// the counter cannot take another 1: it is non-zero, so the front-end will wake anyway.
// O_NONBLOCK belongs to the open file description the front-end shares: a front-end that clears
// it again and fills the counter can still block this write (see README). A check before every
// write (poll for POLLOUT, or F_GETFL) narrows that to a race but costs a syscall per call:
// measured here, a third of the QD1 IOPS.
void Virtqueue::Notify() {
  if (callFd_ < 0) return;
  uint64_t one = 1;
  ssize_t r;
  do {
    r = ::write(callFd_, &one, sizeof one);
  } while (r < 0 && errno == EINTR);
  calls_++;
}

// stop(): stops the ring (nothing more is popped or pushed) and returns the next avail index
// to hand back in GET_VRING_BASE. Releases the memory and shared arrays.
Napi::Value Virtqueue::Stop(const Napi::CallbackInfo& info) {
  uint16_t lastAvail = ring_.lastAvail();
  ring_.Stop();
  LeaveSiblings();
  memory_ = nullptr;
  regions_.Assign(nullptr, 0);
  if (!memoryRef_.IsEmpty()) memoryRef_.Reset();
  if (!segRef_.IsEmpty()) segRef_.Reset();
  if (!batchRef_.IsEmpty()) batchRef_.Reset();
  if (!usedRef_.IsEmpty()) usedRef_.Reset();
  if (!infoRef_.IsEmpty()) infoRef_.Reset();
  info_ = nullptr;
  callFd_ = -1;
  inflightMem_ = nullptr;
  if (!inflightRef_.IsEmpty()) inflightRef_.Reset();
  return Napi::Number::New(info.Env(), lastAvail);
}

// state(): { ready, broken, brokenReason, lastAvailIdx, usedIdx, inflight, calls, pollNs, spins, spinHits }.
Napi::Value Virtqueue::State(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("ready", ring_.ready());
  o.Set("broken", ring_.broken());
  o.Set("brokenReason", ring_.brokenReason());
  o.Set("lastAvailIdx", ring_.lastAvail());
  o.Set("usedIdx", ring_.usedIdx());
  o.Set("inflight", ring_.inflight());
  o.Set("calls", calls_);
  o.Set("pollNs", static_cast<double>(pollNs_));
  o.Set("spins", spins_);
  o.Set("spinHits", spinHits_);
  o.Set("spinYields", spinYields_);
  o.Set("inflightTracked", ring_.hasInflight());
  o.Set("resubmitPending", ring_.resubmitPending());
  o.Set("inflightCounter", static_cast<double>(ring_.inflightCounter()));
  return o;
}

void Virtqueue::CheckInflightMapping() {
  if (inflightMem_ != nullptr && !inflightMem_->mapped()) {
    ring_.DetachInflight();
    inflightMem_ = nullptr;
    inflightRef_.Reset();
  }
}

// setInflight({ region, offset, descNum, counter, lastAvailIdx, resubmit }): tracks this ring
// in an inflight region (vhost-user.rst "Inflight I/O tracking", split layout; see
// SplitRing::AttachInflight). region is a GuestMemory of one region (the mapped inflight fd);
// offset is the byte offset of this queue's block in it; descNum its entry count (>= ring
// size); counter the next counter value (1 .. 2^53); resubmit a Uint16Array of heads to resubmit,
// oldest first; lastAvailIdx where the avail ring goes on. Call after configure() and before
// any pop(). Throws TypeError for bad argument types, RangeError when the block does not fit
// the region or the ring (nothing changes then).
Napi::Value Virtqueue::SetInflight(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsObject()) {
    ThrowTypeError(env, "expected an options object");
    return Napi::Value();
  }
  Napi::Object o = info[0].As<Napi::Object>();
  AddonData* data = env.GetInstanceData<AddonData>();
  Napi::Value rv = o.Get("region");
  if (!rv.IsObject() || !rv.As<Napi::Object>().InstanceOf(data->guestMemoryCtor.Value())) {
    ThrowTypeError(env, "region must be a GuestMemory");
    return Napi::Value();
  }
  Napi::Object regionObj = rv.As<Napi::Object>();
  GuestMemory* region = GuestMemory::Unwrap(regionObj);
  uint64_t offset, descNum, counter, lastAvail;
  if (!GetSafeU64(o, "offset", &offset) || !GetSafeU64(o, "descNum", &descNum) || !GetSafeU64(o, "counter", &counter) ||
      !GetSafeU64(o, "lastAvailIdx", &lastAvail)) {
    ThrowTypeError(env, "offset, descNum, counter, lastAvailIdx must be safe non-negative integers");
    return Napi::Value();
  }
  Napi::Value resv = o.Get("resubmit");
  if (!resv.IsTypedArray() || resv.As<Napi::TypedArray>().TypedArrayType() != napi_uint16_array) {
    ThrowTypeError(env, "resubmit must be a Uint16Array");
    return Napi::Value();
  }
  Napi::Uint16Array res = resv.As<Napi::Uint16Array>();
  if (!region->mapped() || region->regions().size() != 1) {
    ThrowRangeError(env, "inflight region is not one mapped region");
    return Napi::Value();
  }
  const GuestRegion& g = region->regions()[0];
  if (descNum == 0 || descNum > 0xffff || lastAvail > 0xffff || counter == 0) {
    ThrowRangeError(env, "descNum, lastAvailIdx must fit 16 bits and counter must be above 0");
    return Napi::Value();
  }
  uint64_t blockBytes = kInflightHeaderBytes + kInflightDescBytes * descNum;
  if (offset % 64 != 0 || offset > g.size || blockBytes > g.size - offset) {
    ThrowRangeError(env, "inflight block outside the region (or not 64-byte aligned)");
    return Napi::Value();
  }
  if (!Usable()) {
    ThrowRangeError(env, "ring not configured");
    return Napi::Value();
  }
  const char* why = ring_.AttachInflight(g.host + offset, static_cast<uint32_t>(descNum), counter, res.Data(),
                                         static_cast<uint32_t>(res.ElementLength()), static_cast<uint16_t>(lastAvail));
  if (why != nullptr) {
    ThrowRangeError(env, why);
    return Napi::Value();
  }
  inflightMem_ = region;
  inflightRef_ = Napi::Persistent(regionObj);
  return env.Undefined();
}

// signal(): signals the call eventfd once (after a restart: the guest may wait on completions
// whose interrupt was lost with the previous back-end).
Napi::Value Virtqueue::Signal(const Napi::CallbackInfo& info) {
  if (ring_.ready()) Notify();
  return info.Env().Undefined();
}

}  // namespace rnull
