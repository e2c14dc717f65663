// Driver (front-end) side of a virtio split virtqueue in shared memory: descriptor table,
// available ring (written here, read by the device) and used ring (written by the device).
//
// Ordering rules followed here:
//  - descriptors and avail ring entries are written with plain stores, then avail->idx is
//    published with a release store, so the device never sees an index before its entries;
//  - before deciding whether to kick (reading used->flags or avail_event) and before sleeping
//    after re-arming used_event, a full fence orders our index/event store against the load of
//    the device's field (the store-load case a release/acquire pair does not cover);
//  - used->idx is read with an acquire load, so used entries read after it are current.
#pragma once

#include <cstddef>
#include <cstdint>

namespace vb {

constexpr uint16_t VRING_DESC_F_NEXT = 1;
constexpr uint16_t VRING_DESC_F_WRITE = 2;
constexpr uint16_t VRING_DESC_F_INDIRECT = 4;
constexpr uint16_t VRING_AVAIL_F_NO_INTERRUPT = 1;
constexpr uint16_t VRING_USED_F_NO_NOTIFY = 1;

struct VringDesc {
  uint64_t addr;
  uint32_t len;
  uint16_t flags;
  uint16_t next;
};
static_assert(sizeof(VringDesc) == 16, "virtq_desc is 16 bytes");

struct VringUsedElem {
  uint32_t id;
  uint32_t len;
};

// True when an index moving from `old_idx` to `new_idx` passes `event` (the event-index rule:
// notify iff event is in [old_idx, new_idx) modulo 2^16).
inline bool vring_crosses_event(uint16_t event, uint16_t new_idx, uint16_t old_idx) {
  return uint16_t(new_idx - event - 1) < uint16_t(new_idx - old_idx);
}

class DriverRing {
 public:
  // Byte sizes of the three parts for a ring of n entries (event-index words included).
  static uint64_t desc_bytes(uint32_t n) { return 16ull * n; }
  static uint64_t avail_bytes(uint32_t n) { return 6ull + 2ull * n; }
  static uint64_t used_bytes(uint32_t n) { return 6ull + 8ull * n; }

  DriverRing() = default;
  // `desc`, `avail`, `used` point into shared memory that is zeroed.
  void init(uint32_t n, void* desc, void* avail, void* used, bool event_idx);

  VringDesc& desc(uint32_t i) { return desc_[i]; }

  // Puts `head` in the next avail slot; not visible to the device until publish().
  void stage(uint16_t head) {
    avail_ring_[avail_shadow_ & mask_] = head;
    avail_shadow_++;
  }
  // Release-stores avail->idx. Returns true if the device must be kicked for the entries
  // published since the previous publish() (EVENT_IDX: avail_event crossed; otherwise
  // VRING_USED_F_NO_NOTIFY clear).
  bool publish();
  uint16_t avail_idx() const { return avail_shadow_; }

  // Acquire load of used->idx.
  uint16_t used_idx() const { return __atomic_load_n(used_idx_, __ATOMIC_ACQUIRE); }
  const VringUsedElem& used_elem(uint16_t idx) const { return used_ring_[idx & mask_]; }
  uint16_t last_used() const { return last_used_; }
  void consume(uint16_t count) { last_used_ = uint16_t(last_used_ + count); }

  // Asks for a call when the next used entry arrives (EVENT_IDX: used_event = last_used;
  // otherwise clears VRING_AVAIL_F_NO_INTERRUPT), then fences. The caller re-checks used_idx()
  // before sleeping.
  void arm_call();
  // Asks the device not to call (EVENT_IDX: keeps used_event far ahead; otherwise sets
  // VRING_AVAIL_F_NO_INTERRUPT). Cheap to call often: writes only when needed.
  void suppress_call();

  // Raw views, for diagnostics.
  uint16_t avail_flags() const { return __atomic_load_n(avail_flags_, __ATOMIC_RELAXED); }
  uint16_t used_flags() const { return __atomic_load_n(used_flags_, __ATOMIC_RELAXED); }
  uint16_t used_event() const { return __atomic_load_n(used_event_, __ATOMIC_RELAXED); }
  uint16_t avail_event() const { return __atomic_load_n(avail_event_, __ATOMIC_RELAXED); }

 private:
  uint32_t n_ = 0;
  uint16_t mask_ = 0;
  bool event_idx_ = false;
  VringDesc* desc_ = nullptr;
  uint16_t* avail_flags_ = nullptr;
  uint16_t* avail_idx_ = nullptr;
  uint16_t* avail_ring_ = nullptr;
  uint16_t* used_event_ = nullptr;  // avail->ring[n]
  uint16_t* used_flags_ = nullptr;
  uint16_t* used_idx_ = nullptr;
  VringUsedElem* used_ring_ = nullptr;
  uint16_t* avail_event_ = nullptr;  // used->ring[n]
  uint16_t avail_shadow_ = 0;        // next avail idx to publish
  uint16_t published_ = 0;           // avail idx at the last publish()
  uint16_t last_used_ = 0;           // used entries consumed so far
  uint16_t suppressed_at_ = 0;       // last_used when used_event was last pushed ahead
  bool suppressing_ = false;
};

}  // namespace vb
