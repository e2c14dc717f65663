// One virtqueue driven by one thread: preallocated request slots (header, data buffer, status
// byte and, with indirect descriptors, a 3-entry table each) in guest memory, the submit /
// reap loop, notification handling (kick and call eventfds, event index or flags), latency
// timing and stall detection. Nothing is allocated inside the I/O loop.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "guest_memory.h"
#include "options.h"
#include "split_ring.h"
#include "stats.h"
#include "workload.h"

namespace vb {

// Run-wide control shared by the queue threads and main().
struct RunControl {
  std::atomic<bool> go{false};
  std::atomic<bool> abort{false};
  std::atomic<int> stalled_queue{-1};
  std::atomic<int> failed_queue{-1};
  std::atomic<int> main_done{0};
  std::atomic<int> finished{0};   // queue threads that returned  // queues whose measured phase has fully completed
  uint64_t t_begin = 0;    // set before go
  uint64_t t_measure = 0;  // end of ramp
  uint64_t t_end = 0;      // end of the measured window (runtime mode); 0 with --ios
};

// Where a queue's pieces live in guest memory (offsets).
struct QueueLayout {
  uint64_t desc = 0, avail = 0, used = 0;
  uint64_t meta = 0;  // per slot: header @0 (16 B), indirect table @16 (48 B), status @64
  uint64_t data = 0;  // per slot: data_stride bytes
  uint64_t data_stride = 0;
  static constexpr uint64_t kMetaStride = 128;
  // Appends the layout of one queue to `c`.
  static QueueLayout plan(Carver& c, const Options& o);
};

class QueueWorker {
 public:
  QueueWorker(const Options& o, uint32_t index, GuestMemory& mem, const QueueLayout& layout, Workload workload,
              uint64_t quota, RunControl& ctl);
  ~QueueWorker();
  QueueWorker(const QueueWorker&) = delete;
  QueueWorker& operator=(const QueueWorker&) = delete;

  int kick_fd() const { return kick_fd_; }
  int call_fd() const { return call_fd_; }
  uint64_t desc_uaddr() const;
  uint64_t avail_uaddr() const;
  uint64_t used_uaddr() const;

  void run();  // thread body

  // Results, read by main() after the thread ended.
  QueueCounters counters;
  LatencyHistogram hist;
  std::string failure;           // protocol violation seen (empty if none)
  std::vector<std::string> mismatch_details;  // first few verify mismatches
  uint32_t inflight() const { return inflight_; }  // requests in flight (read after the thread ended)
  std::string ring_state();  // one line: indices and flags of the ring
  uint16_t avail_idx() const { return ring_.avail_idx(); }
  uint32_t index() const { return index_; }

 private:
  struct Slot {
    uint8_t* hdr;
    uint8_t* data;
    uint8_t* status;
    VringDesc* data_desc;
    uint16_t head;
    bool busy;
    bool measured;  // --ios mode: submitted after the ramp
    uint64_t submit_ns;
    IoPlan plan;
  };

  void loop();
  void setup_descriptors();
  bool prepare(Slot& s, bool readback);
  void complete(uint32_t id, uint32_t len, uint64_t now);
  bool wait_for_used(uint64_t& now);  // false: stall or abort
  void fail(const std::string& why);

  const Options& o_;
  uint32_t index_;
  GuestMemory& mem_;
  QueueLayout layout_;
  Workload workload_;
  uint64_t quota_;  // --ios mode: requests to submit after the ramp
  RunControl& ctl_;
  DriverRing ring_;
  bool indirect_;
  int kick_fd_ = -1;
  int call_fd_ = -1;
  std::vector<Slot> slots_;
  std::vector<uint32_t> free_;    // stack of free slot indices
  std::vector<uint32_t> staged_;  // slots staged since the last publish
  uint32_t inflight_ = 0;
  uint64_t last_progress_ns_ = 0;  // when a completion last arrived (stall detection)
  uint64_t submitted_measured_ = 0;
  uint32_t spins_ = 0;  // poll mode: idle iterations (the clock is read every 256)
};

}  // namespace vb
