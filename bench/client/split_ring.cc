#include "split_ring.h"

namespace vb {

void DriverRing::init(uint32_t n, void* desc, void* avail, void* used, bool event_idx) {
  n_ = n;
  mask_ = uint16_t(n - 1);
  event_idx_ = event_idx;
  desc_ = static_cast<VringDesc*>(desc);
  uint16_t* a = static_cast<uint16_t*>(avail);
  avail_flags_ = a;
  avail_idx_ = a + 1;
  avail_ring_ = a + 2;
  used_event_ = a + 2 + n;
  uint8_t* u = static_cast<uint8_t*>(used);
  used_flags_ = reinterpret_cast<uint16_t*>(u);
  used_idx_ = reinterpret_cast<uint16_t*>(u + 2);
  used_ring_ = reinterpret_cast<VringUsedElem*>(u + 4);
  avail_event_ = reinterpret_cast<uint16_t*>(u + 4 + 8ull * n);
  avail_shadow_ = published_ = last_used_ = suppressed_at_ = 0;
  suppressing_ = false;
}

bool DriverRing::publish() {
  uint16_t old_idx = published_;
  uint16_t new_idx = avail_shadow_;
  if (old_idx == new_idx) return false;
  __atomic_store_n(avail_idx_, new_idx, __ATOMIC_RELEASE);
  published_ = new_idx;
  // Our avail->idx store must be visible before we read the device's suppression state, or
  // the device could go to sleep having missed the new entries while we skip the kick.
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  if (event_idx_) {
    uint16_t ev = __atomic_load_n(avail_event_, __ATOMIC_RELAXED);
    return vring_crosses_event(ev, new_idx, old_idx);
  }
  return (__atomic_load_n(used_flags_, __ATOMIC_RELAXED) & VRING_USED_F_NO_NOTIFY) == 0;
}

void DriverRing::arm_call() {
  suppressing_ = false;
  if (event_idx_) {
    __atomic_store_n(used_event_, last_used_, __ATOMIC_RELAXED);
  } else if (__atomic_load_n(avail_flags_, __ATOMIC_RELAXED) & VRING_AVAIL_F_NO_INTERRUPT) {
    __atomic_store_n(avail_flags_, uint16_t(0), __ATOMIC_RELAXED);
  }
  // The caller re-reads used->idx next: order our store before that load.
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

void DriverRing::suppress_call() {
  if (event_idx_) {
    // used_event half the index space ahead is never crossed by the at most n entries the
    // device can add before we come back; refresh it well before that stops being true.
    if (!suppressing_ || uint16_t(last_used_ - suppressed_at_) > 0x2000) {
      __atomic_store_n(used_event_, uint16_t(last_used_ + 0x8000), __ATOMIC_RELAXED);
      suppressed_at_ = last_used_;
      suppressing_ = true;
    }
  } else if (!suppressing_) {
    __atomic_store_n(avail_flags_, VRING_AVAIL_F_NO_INTERRUPT, __ATOMIC_RELAXED);
    suppressing_ = true;
  }
}

}  // namespace vb
