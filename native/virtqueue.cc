#include "virtqueue.h"

#include <errno.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "errors.h"

namespace rnull {
namespace {

constexpr uint16_t kDescFNext = 1;      // VIRTQ_DESC_F_NEXT
constexpr uint16_t kDescFWrite = 2;     // VIRTQ_DESC_F_WRITE
constexpr uint16_t kDescFIndirect = 4;  // VIRTQ_DESC_F_INDIRECT
constexpr uint16_t kAvailFNoInterrupt = 1;
constexpr uint16_t kUsedFNoNotify = 1;
// Smallest non-zero polling budget: below a few microseconds a spin cannot beat a wake-up.
constexpr uint64_t kMinPollNs = 2000;

inline uint64_t NowNs() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

// vring_need_event(): VIRTIO 1.2 section 2.7.10, "the event index" comparison.
inline bool NeedEvent(uint16_t eventIdx, uint16_t newIdx, uint16_t oldIdx) {
  return static_cast<uint16_t>(newIdx - eventIdx - 1) < static_cast<uint16_t>(newIdx - oldIdx);
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
                                 });
  exports.Set("Virtqueue", f);
  Napi::Object c = Napi::Object::New(env);
  c.Set("MAX_QUEUE_SIZE", kMaxQueueSize);
  c.Set("MAX_SEGMENTS", kMaxSegments);
  c.Set("SEGMENT_WORDS", kSegmentWords);
  c.Set("BATCH_WORDS", kBatchWords);
  exports.Set("virtqueueConstants", c);
}

Virtqueue::Virtqueue(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Virtqueue>(info) {}

void Virtqueue::MarkBroken(const std::string& reason) {
  if (broken_) return;
  broken_ = true;
  brokenReason_ = reason;
}

// configure({ memory, size, descAddr, availAddr, usedAddr, lastAvailIdx, eventIdx, indirect,
//             segments, batch, used }): starts the ring. Addresses are the front-end's virtual
// addresses (SET_VRING_ADDR); size is the ring size (power of two, 1..1024); lastAvailIdx comes
// from SET_VRING_BASE. The used index continues from the ring's used->idx. Throws RangeError
// when a ring is not inside guest memory or misaligned (VIRTIO 1.2 section 2.7, table 2.1).
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
  if (descAddr % 16 != 0 || availAddr % 2 != 0 || usedAddr % 4 != 0) {
    ThrowRangeError(env, "ring address misaligned (descriptor table 16, avail 2, used 4)");
    return Napi::Value();
  }
  if (!mem->mapped()) {
    ThrowRangeError(env, "guest memory is not mapped");
    return Napi::Value();
  }
  uint8_t* d = mem->HostRangeUaddr(descAddr, 16 * size);
  uint8_t* a = mem->HostRangeUaddr(availAddr, 6 + 2 * size);
  uint8_t* u = mem->HostRangeUaddr(usedAddr, 6 + 8 * size);
  if (d == nullptr || a == nullptr || u == nullptr) {
    ThrowRangeError(env, "ring address is not inside guest memory");
    return Napi::Value();
  }
  uint64_t batchBytes = 0;
  if (o.Has("batchBytes") && !o.Get("batchBytes").IsUndefined() && !GetSafeU64(o, "batchBytes", &batchBytes)) {
    ThrowTypeError(env, "batchBytes must be a safe non-negative integer");
    return Napi::Value();
  }
  // Everything is checked: from here on the queue changes (nothing above left it half-changed).
  memory_ = mem;
  memoryRef_ = Napi::Persistent(memObj);
  segRef_ = Napi::Persistent(seg);
  batchRef_ = Napi::Persistent(batch);
  usedRef_ = Napi::Persistent(used);
  segments_ = seg.Data();
  batch_ = batch.Data();
  usedBuf_ = used.Data();
  batchBytes_ = batchBytes;
  Napi::Value infov = o.Get("info");
  if (infov.IsTypedArray() && infov.As<Napi::TypedArray>().TypedArrayType() == napi_float64_array &&
      infov.As<Napi::Float64Array>().ElementLength() >= 2) {
    infoRef_ = Napi::Persistent(infov.As<Napi::Float64Array>());
    info_ = infov.As<Napi::Float64Array>().Data();
  } else {
    info_ = nullptr;
  }
  desc_ = reinterpret_cast<volatile Desc*>(d);
  avail_ = reinterpret_cast<volatile uint16_t*>(a);
  used_ = reinterpret_cast<volatile uint8_t*>(u);
  size_ = static_cast<uint32_t>(size);
  lastAvail_ = static_cast<uint16_t>(lastAvail);
  usedIdx_ = __atomic_load_n(reinterpret_cast<volatile uint16_t*>(used_ + 2), __ATOMIC_ACQUIRE);
  eventIdx_ = o.Get("eventIdx").ToBoolean().Value();
  indirect_ = o.Get("indirect").ToBoolean().Value();
  inflight_.assign(size_, 0);
  inflightCount_ = 0;
  broken_ = false;
  brokenReason_.clear();
  sleeping_ = true;
  sleptAtNs_ = 0;
  pollNs_ = pollMaxNs_;
  ready_ = true;
  if (eventIdx_) {
    // avail_event = where we will look next, so a ring restarted at a non-zero index kicks us.
    volatile uint16_t* availEvent = reinterpret_cast<volatile uint16_t*>(used_ + 4 + 8 * size_);
    __atomic_store_n(availEvent, lastAvail_, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
  }
  return env.Undefined();
}

// setCallFd(fd): the call eventfd to signal after publishing used elements; -1 for none.
Napi::Value Virtqueue::SetCallFd(const Napi::CallbackInfo& info) {
  int64_t fd;
  if (!ArgInt(info, 0, "fd", &fd)) return Napi::Value();
  callFd_ = static_cast<int>(fd);
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

// Appends the segments of one guest buffer [addr, addr+len), split at region and chunk edges.
// Returns false (setting *err) if the buffer is not wholly inside guest memory.
// True when the buffer's last byte (addr + len - 1, not wrapping past 2^64) is guest memory:
// where a failed chain's status byte would be.
bool Virtqueue::LastByteInMemory(uint64_t addr, uint32_t len) {
  uint64_t last = addr + (len ? len - 1 : 0);
  return last >= addr && memory_->HostRangeGpa(last, 1) != nullptr;
}

bool Virtqueue::AddBuffer(uint64_t addr, uint32_t len, uint32_t flags, uint32_t* seg, uint32_t* nseg, uint32_t* err) {
  uint64_t left = len;
  while (left > 0) {
    ChunkRef ref;
    if (addr + left < addr || !memory_->Translate(addr, left, &ref)) {
      if (*err == kChainOk) *err = kErrDescAddress;
      return false;
    }
    if (*nseg >= kMaxSegments) {
      if (*err == kChainOk) *err = kErrTooManySegments;
      return true;
    }
    uint32_t* s = seg + (*nseg) * kSegmentWords;
    s[0] = ref.chunk;
    s[1] = ref.offset;
    s[2] = ref.length;
    s[3] = flags;
    (*nseg)++;
    addr += ref.length;
    left -= ref.length;
  }
  return true;
}

// Walks the chain starting at head (head < size_, checked by the caller). Every descriptor is
// copied once from guest memory before use, so a guest rewriting the table concurrently cannot
// make one field checked and another used. Returns a ChainError; on success the segments are
// in seg[0..*nseg). On a soft error, seg[0] is the status byte if it can be located (*nseg = 1).
uint32_t Virtqueue::Walk(uint16_t head, uint32_t* seg, uint32_t* nseg) {
  volatile Desc* table = desc_;
  uint32_t tableSize = size_;
  uint32_t budget = size_;  // descriptors left before the chain must be a loop
  bool inIndirect = false;
  bool seenWritable = false;
  uint32_t err = kChainOk;
  uint16_t i = head;
  Desc last = {0, 0, 0, 0};
  bool lastTranslated = false;
  *nseg = 0;
  for (;;) {
    if (budget-- == 0) return kErrChainLoop;
    Desc d;
    d.addr = table[i].addr;
    d.len = table[i].len;
    d.flags = table[i].flags;
    d.next = table[i].next;
    if (d.flags & kDescFIndirect) {
      // VIRTIO 1.2 section 2.7.5.3.1: no NEXT with INDIRECT, no indirect inside indirect.
      if (!indirect_ || inIndirect || (d.flags & kDescFNext) || d.len == 0 || d.len % 16 != 0 ||
          d.len / 16 > kMaxQueueSize)
        return kErrIndirect;
      uint8_t* t = memory_->HostRangeGpa(d.addr, d.len);
      if (t == nullptr) return kErrIndirect;
      table = reinterpret_cast<volatile Desc*>(t);
      tableSize = d.len / 16;
      budget = tableSize;
      inIndirect = true;
      i = 0;
      continue;
    }
    bool writable = (d.flags & kDescFWrite) != 0;
    if (d.len == 0) {
      if (err == kChainOk) err = kErrDescZeroLength;
    } else if (!writable && seenWritable) {
      // VIRTIO 1.2 section 2.7.4.2: device-writable buffers come after device-readable ones.
      if (err == kChainOk) err = kErrDescOrder;
    }
    seenWritable = seenWritable || writable;
    lastTranslated = err == kChainOk ? AddBuffer(d.addr, d.len, writable ? 1 : 0, seg, nseg, &err)
                                     : LastByteInMemory(d.addr, d.len);
    last = d;
    if (!(d.flags & kDescFNext)) break;
    i = d.next;
    if (i >= tableSize) return kErrNextIndex;
  }
  if (err != kChainOk) {
    *nseg = 0;
    uint32_t e2 = kChainOk;
    if ((last.flags & kDescFWrite) && last.len > 0 && lastTranslated)
      AddBuffer(last.addr + last.len - 1, 1, 1, seg, nseg, &e2);
    if (e2 != kChainOk) *nseg = 0;
  }
  return err;
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
    if (n < 0 || n > static_cast<int64_t>(size_)) {
      ThrowRangeError(env, "n outside the used buffer");
      return Napi::Value();
    }
    uint32_t published = n > 0 && ready_ && memory_ != nullptr && memory_->mapped() ? PublishUsed(static_cast<uint32_t>(n)) : 0;
    if (info_ != nullptr) info_[1] = published;
  }
  // pop(n, max): at most `max` chains (free tags); the rest stay in the avail ring, and
  // notifications are not re-armed for them (the caller comes back when tags free up).
  uint32_t max = size_;
  if (info.Length() > 1) {
    int64_t m;
    if (!ArgInt(info, 1, "max", &m)) return Napi::Value();
    if (m < 0) m = 0;
    if (m < static_cast<int64_t>(max)) max = static_cast<uint32_t>(m);
  }
  if (broken_) return Napi::Number::New(env, -1);
  if (!Usable() || max == 0) return Napi::Number::New(env, 0);
  if (info_ != nullptr) info_[0] = static_cast<double>(NowNs());
  volatile uint16_t* availIdxP = avail_ + 1;
  volatile uint16_t* availEvent = reinterpret_cast<volatile uint16_t*>(used_ + 4 + 8 * size_);
  volatile uint16_t* usedFlags = reinterpret_cast<volatile uint16_t*>(used_);
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
  uint16_t availIdx = __atomic_load_n(availIdxP, __ATOMIC_ACQUIRE);
  uint32_t count = 0;
  uint64_t bytes = 0;
  bool spun = false;
  const uint32_t mask = size_ - 1;
  for (;;) {
    uint16_t pending = static_cast<uint16_t>(availIdx - lastAvail_);
    if (pending > size_) {
      MarkBroken("avail index " + std::to_string(availIdx) + " is more than the ring size ahead of " +
                 std::to_string(lastAvail_));
      break;
    }
    while (pending > 0 && count < max) {
      uint16_t head = avail_[2 + (lastAvail_ & mask)];
      if (head >= size_) {
        MarkBroken("avail ring offers head " + std::to_string(head) + " outside the ring of " + std::to_string(size_));
        break;
      }
      if (inflight_[head]) {
        MarkBroken("avail ring offers head " + std::to_string(head) + " which is still in flight");
        break;
      }
      uint32_t* seg = segments_ + static_cast<size_t>(head) * kMaxSegments * kSegmentWords;
      uint32_t nseg = 0;
      uint32_t err = Walk(head, seg, &nseg);
      uint32_t* b = batch_ + count * kBatchWords;
      b[0] = head;
      b[1] = nseg;
      b[2] = err;
      inflight_[head] = 1;
      inflightCount_++;
      lastAvail_++;
      pending--;
      count++;
      if (batchBytes_ != 0) {
        for (uint32_t k = 0; k < nseg; k++) bytes += seg[k * kSegmentWords + 2];
        if (bytes >= batchBytes_) break;
      }
    }
    // Hand over what we have; the caller comes back for more (notifications stay off meanwhile).
    if (broken_ || count > 0 || pending > 0) break;
    if (!spun && pollNs_ > 0) {
      spun = true;
      spins_++;
      if (!eventIdx_) *usedFlags = *usedFlags | kUsedFNoNotify;
      uint64_t deadline = NowNs() + pollNs_;
      uint16_t seen = availIdx;
      while (seen == availIdx && NowNs() < deadline) {
        CpuRelax();
        seen = __atomic_load_n(availIdxP, __ATOMIC_ACQUIRE);
      }
      if (seen != availIdx) {
        spinHits_++;
        availIdx = seen;
        continue;
      }
      pollNs_ /= 2;
      if (pollNs_ < kMinPollNs) pollNs_ = 0;
    }
    // Going to sleep: re-arm notifications, then make sure nothing arrived in between.
    if (eventIdx_) {
      __atomic_store_n(availEvent, lastAvail_, __ATOMIC_RELAXED);
    } else {
      *usedFlags = *usedFlags & static_cast<uint16_t>(~kUsedFNoNotify);
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t again = __atomic_load_n(availIdxP, __ATOMIC_ACQUIRE);
    if (again != availIdx) {
      availIdx = again;
      continue;
    }
    sleeping_ = true;
    sleptAtNs_ = NowNs();
    break;
  }
  // Chains popped before the queue broke are still returned (they are in flight); -1 after.
  return Napi::Number::New(env, broken_ && count == 0 ? -1 : static_cast<double>(count));
}

// push(n): publishes used elements used[0..n) = [head, bytesWritten]: entries first, then a
// release store of used->idx, then (after a full fence) the driver's suppression state decides
// whether to signal the call eventfd once. Heads not in flight are skipped (and counted).
// Returns the number published.
Napi::Value Virtqueue::Push(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int64_t n;
  if (!ArgInt(info, 0, "n", &n)) return Napi::Value();
  if (!ready_ || memory_ == nullptr || !memory_->mapped()) return Napi::Number::New(env, 0);
  if (n < 0 || n > static_cast<int64_t>(size_)) {
    ThrowRangeError(env, "n outside the used buffer");
    return Napi::Value();
  }
  return Napi::Number::New(env, PublishUsed(static_cast<uint32_t>(n)));
}

uint32_t Virtqueue::PublishUsed(uint32_t n) {
  const uint32_t mask = size_ - 1;
  uint16_t old = usedIdx_;
  uint32_t published = 0;
  for (uint32_t k = 0; k < n; k++) {
    uint32_t head = usedBuf_[2 * k];
    uint32_t len = usedBuf_[2 * k + 1];
    if (head >= size_ || !inflight_[head]) continue;
    volatile uint32_t* elem = reinterpret_cast<volatile uint32_t*>(used_ + 4 + 8 * (usedIdx_ & mask));
    elem[0] = head;
    elem[1] = len;
    inflight_[head] = 0;
    inflightCount_--;
    usedIdx_++;
    published++;
  }
  if (published == 0) return 0;
  __atomic_store_n(reinterpret_cast<volatile uint16_t*>(used_ + 2), usedIdx_, __ATOMIC_RELEASE);
  Notify(old);
  return published;
}

void Virtqueue::Notify(uint16_t oldUsed) {
  if (callFd_ < 0) return;
  // Order the used->idx store before reading the driver's suppression fields (2.7.7, 2.7.10).
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  bool signal;
  if (eventIdx_) {
    uint16_t usedEvent = avail_[2 + size_];
    signal = NeedEvent(usedEvent, usedIdx_, oldUsed);
  } else {
    signal = (avail_[0] & kAvailFNoInterrupt) == 0;
  }
  if (!signal) return;
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
  ready_ = false;
  desc_ = nullptr;
  avail_ = nullptr;
  used_ = nullptr;
  memory_ = nullptr;
  if (!memoryRef_.IsEmpty()) memoryRef_.Reset();
  if (!segRef_.IsEmpty()) segRef_.Reset();
  if (!batchRef_.IsEmpty()) batchRef_.Reset();
  if (!usedRef_.IsEmpty()) usedRef_.Reset();
  if (!infoRef_.IsEmpty()) infoRef_.Reset();
  info_ = nullptr;
  segments_ = batch_ = usedBuf_ = nullptr;
  inflight_.clear();
  inflightCount_ = 0;
  callFd_ = -1;
  return Napi::Number::New(info.Env(), lastAvail_);
}

// state(): { ready, broken, brokenReason, lastAvailIdx, usedIdx, inflight, calls }.
Napi::Value Virtqueue::State(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("ready", ready_);
  o.Set("broken", broken_);
  o.Set("brokenReason", brokenReason_);
  o.Set("lastAvailIdx", lastAvail_);
  o.Set("usedIdx", usedIdx_);
  o.Set("inflight", inflightCount_);
  o.Set("calls", calls_);
  o.Set("pollNs", static_cast<double>(pollNs_));
  o.Set("spins", spins_);
  o.Set("spinHits", spinHits_);
  return o;
}

}  // namespace rnull
