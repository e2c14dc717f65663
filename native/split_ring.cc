#include "split_ring.h"

#include <string.h>

namespace rnull {
namespace {

constexpr uint16_t kDescFNext = 1;      // VIRTQ_DESC_F_NEXT
constexpr uint16_t kDescFWrite = 2;     // VIRTQ_DESC_F_WRITE
constexpr uint16_t kDescFIndirect = 4;  // VIRTQ_DESC_F_INDIRECT
constexpr uint16_t kAvailFNoInterrupt = 1;
constexpr uint16_t kUsedFNoNotify = 1;

// vring_need_event(): VIRTIO 1.2 section 2.7.10, "the event index" comparison.
inline bool NeedEvent(uint16_t eventIdx, uint16_t newIdx, uint16_t oldIdx) {
  return static_cast<uint16_t>(newIdx - eventIdx - 1) < static_cast<uint16_t>(newIdx - oldIdx);
}

}  // namespace

uint8_t* RegionTable::HostRangeGpa(uint64_t gpa, uint64_t len) const {
  for (const RingRegion& r : regions_) {
    if (gpa >= r.gpa && gpa - r.gpa < r.size && len <= r.size - (gpa - r.gpa)) return r.host + (gpa - r.gpa);
  }
  return nullptr;
}

uint8_t* RegionTable::HostRangeUaddr(uint64_t uaddr, uint64_t len) const {
  for (const RingRegion& r : regions_) {
    if (uaddr >= r.uaddr && uaddr - r.uaddr < r.size && len <= r.size - (uaddr - r.uaddr)) return r.host + (uaddr - r.uaddr);
  }
  return nullptr;
}

bool RegionTable::Translate(uint64_t gpa, uint64_t len, RingChunkRef* out) const {
  size_t n = regions_.size();
  for (size_t k = 0; k < n; k++) {
    size_t i = lastHit_ + k < n ? lastHit_ + k : lastHit_ + k - n;  // descriptors cluster: last hit first
    const RingRegion& r = regions_[i];
    if (gpa < r.gpa || gpa - r.gpa >= r.size) continue;
    lastHit_ = i;
    uint64_t rel = gpa - r.gpa;
    uint64_t inChunk = rel & (kRingChunkBytes - 1);
    uint64_t avail = kRingChunkBytes - inChunk;
    if (avail > r.size - rel) avail = r.size - rel;
    out->chunk = r.firstChunk + static_cast<uint32_t>(rel >> kRingChunkShift);
    out->offset = static_cast<uint32_t>(inChunk);
    out->length = static_cast<uint32_t>(len < avail ? len : avail);
    return true;
  }
  return false;
}

const char* SplitRing::Configure(const RegionTable* memory, uint32_t size, uint64_t descAddr, uint64_t availAddr,
                                 uint64_t usedAddr, uint16_t lastAvail, bool eventIdx, bool indirect, ChainLimits limits,
                                 uint32_t* segments, uint32_t* batch, uint32_t* used) {
  if (size == 0 || size > kMaxQueueSize || (size & (size - 1)) != 0) return "ring size must be a power of two from 1 to 1024";
  if (descAddr % 16 != 0 || availAddr % 2 != 0 || usedAddr % 4 != 0)
    return "ring address misaligned (descriptor table 16, avail 2, used 4)";
  uint8_t* d = memory->HostRangeUaddr(descAddr, 16ull * size);
  uint8_t* a = memory->HostRangeUaddr(availAddr, 6ull + 2ull * size);
  uint8_t* u = memory->HostRangeUaddr(usedAddr, 6ull + 8ull * size);
  if (d == nullptr || a == nullptr || u == nullptr) return "ring address is not inside guest memory";
  // The avail and used rings are read and written in place with 16/32-bit accesses: their host
  // addresses must be aligned too (a region mapped at an odd file offset would break that).
  if (reinterpret_cast<uintptr_t>(a) % 2 != 0 || reinterpret_cast<uintptr_t>(u) % 4 != 0)
    return "ring host address misaligned (avail 2, used 4): region mmap offset not aligned";
  memory_ = memory;
  desc_ = d;
  avail_ = reinterpret_cast<volatile uint16_t*>(a);
  used_ = reinterpret_cast<volatile uint8_t*>(u);
  segments_ = segments;
  batch_ = batch;
  usedBuf_ = used;
  limits_ = limits;
  size_ = size;
  lastAvail_ = lastAvail;
  usedIdx_ = __atomic_load_n(reinterpret_cast<volatile uint16_t*>(used_ + 2), __ATOMIC_ACQUIRE);
  eventIdx_ = eventIdx;
  indirect_ = indirect;
  inflight_.assign(size_, 0);
  inflightCount_ = 0;
  inflightBlock_ = nullptr;
  resubmit_.clear();
  resubmitPos_ = 0;
  broken_ = false;
  brokenReason_.clear();
  ready_ = true;
  if (eventIdx_) {
    // avail_event = where we will look next, so a ring restarted at a non-zero index kicks us.
    volatile uint16_t* availEvent = reinterpret_cast<volatile uint16_t*>(used_ + 4 + 8 * size_);
    __atomic_store_n(availEvent, lastAvail_, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
  }
  return nullptr;
}

void SplitRing::Stop() {
  ready_ = false;
  memory_ = nullptr;
  desc_ = nullptr;
  avail_ = nullptr;
  used_ = nullptr;
  segments_ = batch_ = usedBuf_ = nullptr;
  inflight_.clear();
  inflightCount_ = 0;
  inflightBlock_ = nullptr;
  resubmit_.clear();
  resubmitPos_ = 0;
}

void SplitRing::MarkBroken(const std::string& reason) {
  if (broken_) return;
  broken_ = true;
  brokenReason_ = reason;
}

uint16_t SplitRing::AvailIdx() const { return __atomic_load_n(avail_ + 1, __ATOMIC_ACQUIRE); }

// One descriptor, copied out of guest memory once (memcpy: a table may sit at any address, an
// indirect one at any 16-byte misalignment) before any field is looked at. The compiler
// barrier keeps the compiler from re-reading the guest's copy instead of ours.
SplitRing::Desc SplitRing::LoadDesc(const uint8_t* table, uint32_t i) {
  Desc d;
  memcpy(&d, table + 16 * static_cast<size_t>(i), sizeof d);
  asm volatile("" ::: "memory");
  return d;
}

// True when the buffer's last byte (addr + len - 1, not wrapping past 2^64) is guest memory:
// where a failed chain's status byte would be.
bool SplitRing::LastByteInMemory(uint64_t addr, uint32_t len) const {
  uint64_t last = addr + (len ? len - 1 : 0);
  return last >= addr && memory_->HostRangeGpa(last, 1) != nullptr;
}

// Appends the segments of one guest buffer [addr, addr+len), split at region and chunk edges.
// Returns false (setting *err) if the buffer is not wholly inside guest memory.
bool SplitRing::AddBuffer(uint64_t addr, uint32_t len, uint32_t flags, uint32_t* seg, uint32_t* nseg, uint32_t* err) {
  uint64_t left = len;
  while (left > 0) {
    RingChunkRef ref;
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

uint32_t SplitRing::Walk(uint16_t head, uint32_t* seg, uint32_t* nseg) {
  const uint8_t* table = desc_;
  uint32_t tableSize = size_;
  uint32_t budget = size_;  // descriptors left before the chain must be a loop
  bool inIndirect = false;
  bool seenWritable = false;
  uint32_t err = kChainOk;
  uint32_t i = head;
  uint32_t descriptors = 0;
  uint64_t bytes = 0;
  const uint64_t maxBytes = limits_.maxBytes != 0 && limits_.maxBytes < kMaxChainBytes ? limits_.maxBytes : kMaxChainBytes;
  const uint32_t maxDescriptors = limits_.maxDescriptors;
  Desc last = {0, 0, 0, 0};
  *nseg = 0;
  for (;;) {
    if (budget-- == 0) {
      *nseg = 0;
      return kErrChainLoop;
    }
    Desc d = LoadDesc(table, i);
    if (d.flags & kDescFIndirect) {
      // VIRTIO 1.2 section 2.7.5.3.1: no NEXT with INDIRECT, no indirect inside indirect.
      if (!indirect_ || inIndirect || (d.flags & kDescFNext) || d.len == 0 || d.len % 16 != 0 || d.len / 16 > kMaxQueueSize) {
        *nseg = 0;
        return kErrIndirect;
      }
      const uint8_t* t = memory_->HostRangeGpa(d.addr, d.len);
      if (t == nullptr) {
        *nseg = 0;
        return kErrIndirect;
      }
      table = t;
      tableSize = d.len / 16;
      budget = tableSize;
      inIndirect = true;
      i = 0;
      continue;
    }
    bool writable = (d.flags & kDescFWrite) != 0;
    descriptors++;
    bytes += d.len;  // at most 2 * 1024 descriptors of < 2^32: no overflow
    if (err == kChainOk) {
      // Limits first: an oversized chain is refused before any of its buffers is translated.
      if (maxDescriptors != 0 && descriptors > maxDescriptors) {
        err = kErrTooManyDescriptors;
      } else if (bytes > maxBytes) {
        err = kErrTooManyBytes;
      } else if (d.len == 0) {
        err = kErrDescZeroLength;
      } else if (!writable && seenWritable) {
        // VIRTIO 1.2 section 2.7.4.2: device-writable buffers come after device-readable ones.
        err = kErrDescOrder;
      } else {
        AddBuffer(d.addr, d.len, writable ? 1 : 0, seg, nseg, &err);
      }
    }
    seenWritable = seenWritable || writable;
    last = d;
    if (!(d.flags & kDescFNext)) break;
    i = d.next;
    if (i >= tableSize) {
      *nseg = 0;
      return kErrNextIndex;
    }
  }
  if (err != kChainOk) {
    // Soft error: the chain's structure held, so its status byte is the last byte of its last
    // descriptor, if that one is device-writable and in guest memory (else nothing is written).
    *nseg = 0;
    if ((last.flags & kDescFWrite) && last.len > 0 && LastByteInMemory(last.addr, last.len)) {
      uint32_t e2 = kChainOk;
      AddBuffer(last.addr + last.len - 1, 1, 1, seg, nseg, &e2);
      if (e2 != kChainOk) *nseg = 0;
    }
  }
  return err;
}

// Walks head's chain into its segment slot and appends it to the batch.
void SplitRing::EmitChain(uint16_t head, uint32_t* count, uint64_t* bytes) {
  uint32_t* seg = segments_ + static_cast<size_t>(head) * kMaxSegments * kSegmentWords;
  uint32_t nseg = 0;
  uint32_t err = Walk(head, seg, &nseg);
  uint32_t* b = batch_ + (*count) * kBatchWords;
  b[0] = head;
  b[1] = nseg;
  b[2] = err;
  (*count)++;
  for (uint32_t k = 0; k < nseg; k++) *bytes += seg[k * kSegmentWords + 2];
}

// Inflight region entry of a head just taken from the avail ring: counter first, then the
// inflight flag (vhost-user.rst "When receiving available buffers"). A crash in between leaves
// inflight = 0: the avail entry is then popped again after the restart.
void SplitRing::MarkInflight(uint16_t head) {
  uint8_t* e = inflightBlock_ + kInflightHeaderBytes + kInflightDescBytes * static_cast<size_t>(head);
  __atomic_store_n(reinterpret_cast<uint64_t*>(e + 8), counter_++, __ATOMIC_RELAXED);
  __atomic_store_n(e, static_cast<uint8_t>(1), __ATOMIC_RELEASE);
}

void SplitRing::PopResubmits(uint32_t max, uint64_t batchBytes, uint32_t* count, uint64_t* bytes) {
  while (resubmitPos_ < resubmit_.size() && *count < max) {
    EmitChain(resubmit_[resubmitPos_++], count, bytes);
    if (batchBytes != 0 && *bytes >= batchBytes) break;
  }
  if (resubmitPos_ == resubmit_.size()) {
    resubmit_.clear();
    resubmitPos_ = 0;
  }
}

uint16_t SplitRing::PopChains(uint16_t availIdx, uint32_t max, uint64_t batchBytes, uint32_t* count, uint64_t* bytes) {
  const uint32_t mask = size_ - 1;
  // Requests in flight before a restart go first, oldest first, before any new avail entry.
  if (!resubmit_.empty()) {
    PopResubmits(max, batchBytes, count, bytes);
    if (!resubmit_.empty() || *count >= max || (batchBytes != 0 && *bytes >= batchBytes)) {
      return static_cast<uint16_t>(availIdx - lastAvail_) <= size_ ? static_cast<uint16_t>(availIdx - lastAvail_) : 0;
    }
  }
  uint16_t pending = static_cast<uint16_t>(availIdx - lastAvail_);
  if (pending > size_) {
    MarkBroken("avail index " + std::to_string(availIdx) + " is more than the ring size ahead of " + std::to_string(lastAvail_));
    return 0;
  }
  while (pending > 0 && *count < max) {
    uint16_t head = avail_[2 + (lastAvail_ & mask)];
    if (head >= size_) {
      MarkBroken("avail ring offers head " + std::to_string(head) + " outside the ring of " + std::to_string(size_));
      break;
    }
    if (inflight_[head]) {
      MarkBroken("avail ring offers head " + std::to_string(head) + " which is still in flight");
      break;
    }
    EmitChain(head, count, bytes);
    if (inflightBlock_ != nullptr) MarkInflight(head);
    inflight_[head] = 1;
    inflightCount_++;
    lastAvail_++;
    pending--;
    if (batchBytes != 0 && *bytes >= batchBytes) break;
  }
  return pending;
}

const char* SplitRing::AttachInflight(uint8_t* block, uint32_t descNum, uint64_t counter, const uint16_t* resubmit,
                                      uint32_t n, uint16_t lastAvail) {
  if (!ready_) return "ring not configured";
  if (block == nullptr || descNum < size_) return "inflight block has fewer entries than the ring";
  if (inflightCount_ != 0) return "requests are in flight already";
  if (n > size_) return "more heads to resubmit than the ring holds";
  for (uint32_t k = 0; k < n; k++) {
    if (resubmit[k] >= size_) return "head to resubmit outside the ring";
    if (inflight_[resubmit[k]]) {
      for (uint32_t j = 0; j < k; j++) inflight_[resubmit[j]] = 0;
      return "head to resubmit listed twice";
    }
    inflight_[resubmit[k]] = 1;
  }
  inflightBlock_ = block;
  counter_ = counter;
  resubmit_.assign(resubmit, resubmit + n);
  resubmitPos_ = 0;
  inflightCount_ = n;
  lastBatchHead_ = 0;
  batchHeads_.assign(size_, 0);
  lastAvail_ = lastAvail;
  if (eventIdx_) {
    __atomic_store_n(reinterpret_cast<volatile uint16_t*>(used_ + 4 + 8 * size_), lastAvail_, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
  }
  return nullptr;
}

void SplitRing::DetachInflight() {
  inflightBlock_ = nullptr;
}

void SplitRing::SuppressKicks() {
  if (!eventIdx_) {
    volatile uint16_t* usedFlags = reinterpret_cast<volatile uint16_t*>(used_);
    *usedFlags = *usedFlags | kUsedFNoNotify;
  }
}

void SplitRing::ArmKicks() {
  if (eventIdx_) {
    __atomic_store_n(reinterpret_cast<volatile uint16_t*>(used_ + 4 + 8 * size_), lastAvail_, __ATOMIC_RELAXED);
  } else {
    volatile uint16_t* usedFlags = reinterpret_cast<volatile uint16_t*>(used_);
    *usedFlags = *usedFlags & static_cast<uint16_t>(~kUsedFNoNotify);
  }
}

uint32_t SplitRing::PublishUsed(uint32_t n, bool* signal) {
  *signal = false;
  const uint32_t mask = size_ - 1;
  uint16_t old = usedIdx_;
  uint32_t published = 0;
  uint8_t* const block = inflightBlock_;
  for (uint32_t k = 0; k < n; k++) {
    uint32_t head = usedBuf_[2 * k];
    uint32_t len = usedBuf_[2 * k + 1];
    if (head >= size_ || !inflight_[head]) continue;
    volatile uint32_t* elem = reinterpret_cast<volatile uint32_t*>(used_ + 4 + 8 * (usedIdx_ & mask));
    elem[0] = head;
    elem[1] = len;
    if (block != nullptr) {
      // "When supplying used buffers": desc[head].next = last_batch_head; last_batch_head = head.
      uint8_t* e = block + kInflightHeaderBytes + kInflightDescBytes * static_cast<size_t>(head);
      __atomic_store_n(reinterpret_cast<uint16_t*>(e + 6), lastBatchHead_, __ATOMIC_RELAXED);
      lastBatchHead_ = static_cast<uint16_t>(head);
      batchHeads_[published] = static_cast<uint16_t>(head);
    }
    inflight_[head] = 0;
    inflightCount_--;
    usedIdx_++;
    published++;
  }
  if (published == 0) return 0;
  if (block != nullptr) __atomic_store_n(reinterpret_cast<uint16_t*>(block + 12), lastBatchHead_, __ATOMIC_RELEASE);
  // The commit point, for the guest and for recovery alike.
  __atomic_store_n(reinterpret_cast<volatile uint16_t*>(used_ + 2), usedIdx_, __ATOMIC_RELEASE);
  if (block != nullptr) {
    // The batch reached the guest: its entries are no longer in flight, then used_idx says so.
    for (uint32_t k = 0; k < published; k++) {
      __atomic_store_n(block + kInflightHeaderBytes + kInflightDescBytes * static_cast<size_t>(batchHeads_[k]),
                       static_cast<uint8_t>(0), __ATOMIC_RELEASE);
    }
    __atomic_store_n(reinterpret_cast<uint16_t*>(block + 14), usedIdx_, __ATOMIC_RELEASE);
  }
  // Order the used->idx store before reading the driver's suppression fields (2.7.7, 2.7.10).
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  if (eventIdx_) {
    uint16_t usedEvent = avail_[2 + size_];
    *signal = NeedEvent(usedEvent, usedIdx_, old);
  } else {
    *signal = (avail_[0] & kAvailFNoInterrupt) == 0;
  }
  return published;
}

}  // namespace rnull
