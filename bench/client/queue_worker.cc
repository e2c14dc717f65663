#include "queue_worker.h"

#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "common.h"

namespace vb {

namespace {

constexpr uint32_t VIRTIO_BLK_T_IN = 0;
constexpr uint32_t VIRTIO_BLK_T_OUT = 1;
constexpr uint8_t kStatusPoison = 0xFF;
constexpr size_t kMaxMismatchDetails = 5;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

}  // namespace

QueueLayout QueueLayout::plan(Carver& c, const Options& o) {
  QueueLayout l;
  const uint32_t n = o.ring_size;
  l.desc = c.take(DriverRing::desc_bytes(n), 4096);
  l.avail = c.take(DriverRing::avail_bytes(n), 2);
  l.used = c.take(DriverRing::used_bytes(n), 4096);
  l.meta = c.take(kMetaStride * o.qd, 4096);
  l.data_stride = o.bs >= 4096 ? align_up(o.bs, 4096) : o.bs;
  l.data = c.take(l.data_stride * o.qd, 4096);
  return l;
}

QueueWorker::QueueWorker(const Options& o, uint32_t index, GuestMemory& mem, const QueueLayout& layout, Workload workload,
                         uint64_t quota, RunControl& ctl)
    : o_(o), index_(index), mem_(mem), layout_(layout), workload_(std::move(workload)), quota_(quota), ctl_(ctl),
      indirect_(o.use_indirect()) {
  kick_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  call_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (kick_fd_ < 0 || call_fd_ < 0) throw sys_error("eventfd", errno);
  ring_.init(o.ring_size, mem.at(layout.desc), mem.at(layout.avail), mem.at(layout.used), o.event_idx);
  slots_.resize(o.qd);
  free_.reserve(o.qd);
  staged_.reserve(o.qd);
  setup_descriptors();
  for (uint32_t i = o.qd; i > 0; i--) free_.push_back(i - 1);
}

QueueWorker::~QueueWorker() {
  if (kick_fd_ >= 0) close(kick_fd_);
  if (call_fd_ >= 0) close(call_fd_);
}

uint64_t QueueWorker::desc_uaddr() const { return mem_.uaddr(layout_.desc); }
uint64_t QueueWorker::avail_uaddr() const { return mem_.uaddr(layout_.avail); }
uint64_t QueueWorker::used_uaddr() const { return mem_.uaddr(layout_.used); }

// Descriptors never change except the data descriptor's direction, so they are written once:
// slot i owns ring descriptors 3i..3i+2 (direct), or ring descriptor i pointing at its own
// 3-entry table (indirect).
void QueueWorker::setup_descriptors() {
  for (uint32_t i = 0; i < o_.qd; i++) {
    Slot& s = slots_[i];
    const uint64_t meta = layout_.meta + QueueLayout::kMetaStride * i;
    const uint64_t data = layout_.data + layout_.data_stride * i;
    s.hdr = mem_.at(meta);
    s.status = mem_.at(meta + 64);
    s.data = mem_.at(data);
    s.busy = false;
    s.measured = false;
    s.submit_ns = 0;
    VringDesc* chain;
    uint16_t first;
    if (indirect_) {
      chain = reinterpret_cast<VringDesc*>(mem_.at(meta + 16));
      first = 0;
      VringDesc& d = ring_.desc(i);
      d.addr = mem_.gpa(meta + 16);
      d.len = 3 * sizeof(VringDesc);
      d.flags = VRING_DESC_F_INDIRECT;
      d.next = 0;
      s.head = uint16_t(i);
    } else {
      chain = &ring_.desc(3 * i);
      first = uint16_t(3 * i);
      s.head = first;
    }
    chain[0] = VringDesc{mem_.gpa(meta), 16, VRING_DESC_F_NEXT, uint16_t(first + 1)};
    chain[1] = VringDesc{mem_.gpa(data), o_.bs, VRING_DESC_F_NEXT, uint16_t(first + 2)};
    chain[2] = VringDesc{mem_.gpa(meta + 64), 1, VRING_DESC_F_WRITE, 0};
    s.data_desc = &chain[1];
  }
}

bool QueueWorker::prepare(Slot& s, bool readback) {
  IoPlan p;
  if (readback ? !workload_.next_readback(p) : !workload_.next(p)) return false;
  const uint32_t type = p.op == Op::Read ? VIRTIO_BLK_T_IN : VIRTIO_BLK_T_OUT;
  const uint32_t reserved = 0;
  const uint64_t sector = p.offset / 512;
  std::memcpy(s.hdr, &type, 4);
  std::memcpy(s.hdr + 4, &reserved, 4);
  std::memcpy(s.hdr + 8, &sector, 8);
  s.data_desc->flags = uint16_t(VRING_DESC_F_NEXT | (p.op == Op::Read ? VRING_DESC_F_WRITE : 0));
  *s.status = kStatusPoison;
  if (o_.verify) {
    if (p.op == Op::Write) {
      workload_.fill(s.data, p);
    } else {
      Workload::poison(s.data, o_.bs);
    }
  }
  s.plan = p;
  s.busy = true;
  ring_.stage(s.head);
  return true;
}

void QueueWorker::fail(const std::string& why) {
  if (failure.empty()) failure = why;
  int expected = -1;
  ctl_.failed_queue.compare_exchange_strong(expected, int(index_));
  ctl_.abort.store(true);
}

void QueueWorker::complete(uint32_t id, uint32_t len, uint64_t now) {
  uint32_t si = id;
  if (!indirect_) {
    if (id % 3 != 0) {
      fail("used ring entry with id " + std::to_string(id) + ", which is not the head of a chain we offered");
      return;
    }
    si = id / 3;
  }
  if (si >= slots_.size() || !slots_[si].busy) {
    fail("used ring entry with id " + std::to_string(id) + ", which is not a request in flight");
    return;
  }
  Slot& s = slots_[si];
  const uint64_t lat = now - s.submit_ns;
  const uint8_t st = *reinterpret_cast<volatile uint8_t*>(s.status);
  const bool read = s.plan.op == Op::Read;
  counters.total_completions++;
  switch (st) {
    case VIRTIO_BLK_S_OK: counters.st_ok++; break;
    case VIRTIO_BLK_S_IOERR: counters.st_ioerr++; break;
    case VIRTIO_BLK_S_UNSUPP: counters.st_unsupp++; break;
    default: counters.st_other++; break;
  }
  if (len != (read ? o_.bs + 1 : 1u)) counters.used_len_unexpected++;
  const bool ok = st == VIRTIO_BLK_S_OK;
  if (s.plan.readback) {
    counters.readback_ios++;
  } else {
    const bool in_window = ctl_.t_end != 0 ? (now >= ctl_.t_measure && now <= ctl_.t_end) : s.measured;
    if (in_window) {
      counters.ios++;
      if (read) {
        counters.reads++;
      } else {
        counters.writes++;
      }
      counters.bytes += o_.bs;
      counters.last_completion_ns = now;
      hist.record(lat);
    }
  }
  if (o_.verify && read && ok) {
    std::string detail;
    CheckResult r = workload_.check(s.data, s.plan, mismatch_details.size() < kMaxMismatchDetails ? &detail : nullptr);
    counters.verify_checked++;
    if (r == CheckResult::Mismatch) {
      counters.verify_mismatches++;
      if (!detail.empty()) mismatch_details.push_back("queue " + std::to_string(index_) + ": " + detail);
    } else if (r == CheckResult::Unwritten) {
      counters.verify_unwritten++;
    }
  }
  workload_.complete(s.plan, ok);
  s.busy = false;
  free_.push_back(si);
  inflight_--;
}

bool QueueWorker::wait_for_used(uint64_t& now) {
  const uint64_t timeout_ns = uint64_t(o_.timeout_ms) * 1000000ull;
  const uint64_t last = last_progress_ns_;
  if (o_.wait == WaitMode::Poll) {
    if ((++spins_ & 255) != 0) {
      cpu_relax();
      return true;
    }
    now = now_ns();
  } else {
    ring_.arm_call();
    if (ring_.used_idx() != ring_.last_used()) return true;
    now = now_ns();
    if (inflight_ > 0 && now < last + timeout_ns) {
      counters.waits++;
      pollfd pfd{call_fd_, POLLIN, 0};
      int ms = int((last + timeout_ns - now + 999999) / 1000000);
      int r = poll(&pfd, 1, ms);
      if (r > 0) {
        uint64_t v;
        if (read(call_fd_, &v, sizeof(v)) == sizeof(v)) counters.wakeups++;
      } else if (r < 0 && errno != EINTR) {
        fail(std::string("poll on the call eventfd: ") + std::strerror(errno));
        return false;
      }
      return true;
    }
  }
  if (inflight_ > 0 && now >= last + timeout_ns) {
    int expected = -1;
    ctl_.stalled_queue.compare_exchange_strong(expected, int(index_));
    ctl_.abort.store(true);
    return false;
  }
  return true;
}

std::string QueueWorker::ring_state() {
  char line[256];
  std::snprintf(line, sizeof(line),
                "avail.idx=%u used.idx=%u consumed=%u avail.flags=%u used.flags=%u used_event=%u avail_event=%u",
                ring_.avail_idx(), ring_.used_idx(), ring_.last_used(), ring_.avail_flags(), ring_.used_flags(),
                ring_.used_event(), ring_.avail_event());
  return line;
}

void QueueWorker::run() {
  loop();
  ctl_.finished.fetch_add(1);
}

void QueueWorker::loop() {
  if (!o_.pin.empty()) {
    int cpu = o_.pin[index_ % o_.pin.size()];
    if (int e = pin_current_thread(cpu)) fail("cannot pin to cpu " + std::to_string(cpu) + ": " + std::strerror(e));
  }
  while (!ctl_.go.load(std::memory_order_acquire)) {
    if (ctl_.abort.load()) return;
    sched_yield();
  }
  if (o_.wait == WaitMode::Poll) ring_.suppress_call();
  enum class Phase { Main, Drain, Readback, Done } phase = Phase::Main;
  const bool by_time = ctl_.t_end != 0;
  uint64_t now = now_ns();
  last_progress_ns_ = now;

  while (!ctl_.abort.load(std::memory_order_relaxed)) {
    // Reap.
    const uint16_t used = ring_.used_idx();
    const uint16_t n = uint16_t(used - ring_.last_used());
    if (n != 0) {
      if (n > inflight_) {
        fail("used.idx advanced by " + std::to_string(n) + " with only " + std::to_string(inflight_) + " requests in flight");
        break;
      }
      now = now_ns();
      const uint16_t first = ring_.last_used();
      for (uint16_t k = 0; k < n && failure.empty(); k++) {
        const VringUsedElem& e = ring_.used_elem(uint16_t(first + k));
        complete(e.id, e.len, now);
      }
      if (!failure.empty()) break;
      ring_.consume(n);
      last_progress_ns_ = now;
          ring_.suppress_call();
    }

    // Refill.
    if (phase == Phase::Main) {
      while (!free_.empty()) {
        const bool measured = now >= ctl_.t_measure;
        const bool may = by_time ? now < ctl_.t_end : (!measured || submitted_measured_ < quota_);
        if (!may) {
          phase = Phase::Drain;
          break;
        }
        Slot& s = slots_[free_.back()];
        if (!prepare(s, false)) break;  // verify: every block busy; wait for completions
        s.measured = measured;
        if (measured) submitted_measured_++;
        staged_.push_back(free_.back());
        free_.pop_back();
      }
      if (by_time && now >= ctl_.t_end) phase = Phase::Drain;
      if (!by_time && now >= ctl_.t_measure && submitted_measured_ >= quota_) phase = Phase::Drain;
    }
    if (phase == Phase::Drain && inflight_ == 0 && staged_.empty()) {
      ctl_.main_done.fetch_add(1);
      phase = o_.verify && workload_.wrote_anything() ? Phase::Readback : Phase::Done;
    }
    if (phase == Phase::Readback) {
      while (!free_.empty()) {
        if (!prepare(slots_[free_.back()], true)) break;
        staged_.push_back(free_.back());
        free_.pop_back();
      }
      if (staged_.empty() && inflight_ == 0) phase = Phase::Done;
    }
    if (phase == Phase::Done) break;

    // Publish and kick.
    if (!staged_.empty()) {
      const uint64_t ts = now_ns();
      for (uint32_t si : staged_) slots_[si].submit_ns = ts;
      inflight_ += uint32_t(staged_.size());
      staged_.clear();
          counters.kick_checks++;
      if (ring_.publish()) {
        const uint64_t one = 1;
        if (write(kick_fd_, &one, sizeof(one)) != sizeof(one) && errno != EAGAIN) {
          fail(std::string("kick eventfd write: ") + std::strerror(errno));
          break;
        }
        counters.kicks++;
      }
      now = ts;
      continue;  // look for completions right away
    }
    if (n == 0 && !wait_for_used(now)) break;
  }
}

}  // namespace vb
