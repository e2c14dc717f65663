// What each request does: read or write, and where. Random offsets come from a per-queue
// xorshift generator; sequential streams walk the queue's slice of the disk. With --verify,
// every 512-byte sector written carries a self-describing pattern (magic, lba, run id,
// generation, then words derived from those), each block's last completed generation is
// tracked, no two requests touch one block at the same time, and reads are checked.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "options.h"

namespace vb {

enum class Op : uint8_t { Read = 0, Write = 1 };

struct IoPlan {
  Op op = Op::Read;
  bool readback = false;  // verify read-back pass (not in the statistics)
  uint64_t offset = 0;    // bytes
  uint64_t unit = 0;      // block index inside the queue's region (verify bookkeeping)
  uint32_t gen = 0;       // write: generation written; read: generation expected
};

enum class CheckResult { Ok, Unwritten, Mismatch };

class Workload {
 public:
  // Requests of o.bs bytes in [region_start, region_start + region_bytes).
  Workload(const Options& o, uint32_t queue, uint64_t region_start, uint64_t region_bytes, uint64_t run_id);

  // Next request of the measured phase. False only with --verify when every block is busy.
  bool next(IoPlan& p);
  // Next read of the verify read-back pass over every block written in this run; false when done.
  bool next_readback(IoPlan& p);
  // A request finished (ok = status OK): frees its block and records a write's generation.
  void complete(const IoPlan& p, bool ok);

  // Verify helpers: pattern for a write; poison before a read; check after a read.
  void fill(uint8_t* buf, const IoPlan& p) const;
  static void poison(uint8_t* buf, uint32_t len);
  CheckResult check(const uint8_t* buf, const IoPlan& p, std::string* detail) const;

  bool wrote_anything() const { return writes_done_ > 0; }

 private:
  uint64_t rand64() {
    // xorshift64*
    state_ ^= state_ >> 12;
    state_ ^= state_ << 25;
    state_ ^= state_ >> 27;
    return state_ * 0x2545F4914F6CDD1Dull;
  }
  uint64_t rand_below(uint64_t n) { return uint64_t((__uint128_t(rand64()) * n) >> 64); }
  bool pick_unit(uint64_t& unit);
  Op pick_op();

  RwMode rw_;
  uint32_t mix_;
  uint32_t bs_;
  bool verify_;
  uint64_t region_start_;
  uint64_t units_;
  uint64_t run_id_;
  uint64_t state_;
  uint64_t seq_cursor_ = 0;
  uint64_t readback_cursor_ = 0;
  uint32_t next_gen_ = 1;
  uint64_t writes_done_ = 0;
  std::vector<uint32_t> gen_;   // verify: last completed generation per block (0 = not written in this run)
  std::vector<uint8_t> busy_;   // verify: a request on the block is in flight
};

constexpr uint32_t kGenUnknown = 0xFFFFFFFFu;  // a write to the block failed: content unknown

}  // namespace vb
