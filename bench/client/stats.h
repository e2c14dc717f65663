// Measurements: a log-linear latency histogram (relative bucket width 1/128, so any reported
// quantile is within 0.4% of the true value, taking bucket midpoints), per-queue counters, and
// CPU-time sampling of the back-end process from /proc.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace vb {

class LatencyHistogram {
 public:
  static constexpr unsigned kSubBits = 7;  // 128 linear sub-buckets per power of two
  static constexpr unsigned kSub = 1u << kSubBits;
  static constexpr unsigned kBuckets = kSub + (64 - kSubBits) * kSub;

  LatencyHistogram() : counts_(kBuckets, 0) {}
  void record(uint64_t ns) {
    counts_[index(ns)]++;
    count_++;
    sum_ += ns;
    if (ns > max_) max_ = ns;
    if (ns < min_) min_ = ns;
  }
  void merge(const LatencyHistogram& o);
  uint64_t max_ns() const { return count_ ? max_ : 0; }
  uint64_t min_ns() const { return count_ ? min_ : 0; }
  double mean_ns() const { return count_ ? double(sum_) / double(count_) : 0.0; }
  // Value at quantile q (0..1): the midpoint of the bucket holding the ceil(q*count)-th sample,
  // clamped to [min, max].
  double quantile_ns(double q) const;

  static unsigned index(uint64_t v) {
    if (v < kSub) return unsigned(v);
    unsigned e = 63u - unsigned(__builtin_clzll(v));  // >= kSubBits
    unsigned shift = e - kSubBits;
    return kSub + shift * kSub + unsigned((v >> shift) - kSub);
  }
  static uint64_t lower(unsigned idx) {
    if (idx < kSub) return idx;
    unsigned shift = (idx - kSub) / kSub;
    uint64_t mant = (idx - kSub) % kSub;
    return (kSub + mant) << shift;
  }
  static uint64_t width(unsigned idx) { return idx < kSub ? 1 : 1ull << ((idx - kSub) / kSub); }

 private:
  std::vector<uint64_t> counts_;
  uint64_t count_ = 0;
  uint64_t sum_ = 0;
  uint64_t max_ = 0;
  uint64_t min_ = UINT64_MAX;
};

// virtio-blk status values and how they are counted.
constexpr uint8_t VIRTIO_BLK_S_OK = 0;
constexpr uint8_t VIRTIO_BLK_S_IOERR = 1;
constexpr uint8_t VIRTIO_BLK_S_UNSUPP = 2;

struct QueueCounters {
  uint64_t ios = 0;  // completions inside the measurement window
  uint64_t reads = 0;
  uint64_t writes = 0;
  uint64_t bytes = 0;
  uint64_t st_ok = 0, st_ioerr = 0, st_unsupp = 0, st_other = 0;  // all completions, any phase
  uint64_t total_completions = 0;  // ramp + window + drain + read-back
  uint64_t used_len_unexpected = 0;
  uint64_t kicks = 0;      // eventfd writes (whole run)
  uint64_t kick_checks = 0;  // avail publishes (whole run)
  uint64_t waits = 0;        // times we slept on the call eventfd
  uint64_t wakeups = 0;      // ...and it was readable
  uint64_t verify_checked = 0;     // reads whose data was compared
  uint64_t verify_mismatches = 0;  // reads with at least one bad sector
  uint64_t verify_unwritten = 0;   // reads of blocks not written in this run (zero or own pattern accepted)
  uint64_t readback_ios = 0;       // verify read-back pass
  uint64_t last_completion_ns = 0;

  void add(const QueueCounters& o);
  uint64_t errors() const { return st_ioerr + st_unsupp + st_other; }
};

// CPU time consumed by a process: utime+stime from /proc/PID/stat (clock ticks) and the sum of
// /proc/PID/task/*/schedstat run time (ns, present threads only).
struct CpuSample {
  bool ok = false;
  uint64_t stat_ticks = 0;
  uint64_t stime_ticks = 0;        // the kernel-mode part of stat_ticks
  uint64_t main_schedstat_ns = 0;  // the thread whose tid is PID (Node's event loop)
  bool schedstat_ok = false;
  uint64_t schedstat_ns = 0;
  int threads = 0;
};
CpuSample sample_process_cpu(int pid);
// utime+stime of this process (all threads), in ns.
uint64_t self_cpu_ns();
long clock_ticks_per_sec();

}  // namespace vb
