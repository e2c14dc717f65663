#include "workload.h"

#include <cstdio>
#include <cstring>

#include "common.h"

namespace vb {

namespace {

constexpr uint64_t kMagic = 0x31484342'4E425648ull;  // "VHBNCHB1" little-endian-ish tag
constexpr uint32_t kSector = 512;
constexpr uint32_t kWords = kSector / 8;
constexpr uint32_t kHeaderWords = 4;

uint64_t mix64(uint64_t x) {
  x ^= x >> 31;
  x *= 0x7FB5D329728EA185ull;
  x ^= x >> 27;
  x *= 0x81DADEF4BC2DD44Dull;
  x ^= x >> 33;
  return x;
}

void make_sector(uint64_t* w, uint64_t lba, uint64_t run_id, uint64_t gen) {
  w[0] = kMagic;
  w[1] = lba;
  w[2] = run_id;
  w[3] = gen;
  uint64_t seed = mix64(lba * 0x9E3779B97F4A7C15ull ^ run_id ^ (gen << 17));
  for (uint32_t i = kHeaderWords; i < kWords; i++) w[i] = mix64(seed + i);
}

bool all_zero(const uint8_t* p, uint32_t n) {
  for (uint32_t i = 0; i < n; i++) {
    if (p[i] != 0) return false;
  }
  return true;
}

}  // namespace

Workload::Workload(const Options& o, uint32_t queue, uint64_t region_start, uint64_t region_bytes, uint64_t run_id)
    : rw_(o.rw), mix_(o.mix), bs_(o.bs), verify_(o.verify), region_start_(region_start), units_(region_bytes / o.bs),
      run_id_(run_id) {
  state_ = mix64(o.seed + 0x1234567ull * (queue + 1)) | 1;
  if (units_ == 0) throw Error("the disk region of queue " + std::to_string(queue) + " is smaller than one request");
  if (verify_) {
    if (units_ < 4ull * o.qd) {
      throw Error("--verify needs at least 4*qd blocks of --bs per queue; queue " + std::to_string(queue) + " has " +
                  std::to_string(units_));
    }
    gen_.assign(units_, 0);
    busy_.assign(units_, 0);
  }
}

Op Workload::pick_op() {
  switch (rw_) {
    case RwMode::RandRead:
    case RwMode::Read: return Op::Read;
    case RwMode::RandWrite:
    case RwMode::Write: return Op::Write;
    case RwMode::RandRw: return rand_below(100) < mix_ ? Op::Read : Op::Write;
  }
  return Op::Read;
}

bool Workload::pick_unit(uint64_t& unit) {
  const bool sequential = rw_ == RwMode::Read || rw_ == RwMode::Write;
  if (!verify_) {
    if (sequential) {
      unit = seq_cursor_;
      seq_cursor_ = seq_cursor_ + 1 == units_ ? 0 : seq_cursor_ + 1;
    } else {
      unit = rand_below(units_);
    }
    return true;
  }
  if (!sequential) {
    for (int tries = 0; tries < 64; tries++) {
      uint64_t u = rand_below(units_);
      if (!busy_[u]) {
        unit = u;
        return true;
      }
    }
    seq_cursor_ = rand_below(units_);
  }
  for (uint64_t k = 0; k < units_; k++) {
    uint64_t u = seq_cursor_;
    seq_cursor_ = seq_cursor_ + 1 == units_ ? 0 : seq_cursor_ + 1;
    if (!busy_[u]) {
      unit = u;
      return true;
    }
  }
  return false;
}

bool Workload::next(IoPlan& p) {
  uint64_t unit;
  if (!pick_unit(unit)) return false;
  p.op = pick_op();
  p.readback = false;
  p.unit = unit;
  p.offset = region_start_ + unit * bs_;
  p.gen = 0;
  if (verify_) {
    busy_[unit] = 1;
    p.gen = p.op == Op::Write ? next_gen_++ : gen_[unit];
    if (next_gen_ == kGenUnknown) next_gen_ = 1;
  }
  return true;
}

bool Workload::next_readback(IoPlan& p) {
  if (!verify_) return false;
  while (readback_cursor_ < units_) {
    uint64_t u = readback_cursor_++;
    if (gen_[u] == 0 || gen_[u] == kGenUnknown || busy_[u]) continue;
    busy_[u] = 1;
    p.op = Op::Read;
    p.readback = true;
    p.unit = u;
    p.offset = region_start_ + u * bs_;
    p.gen = gen_[u];
    return true;
  }
  return false;
}

void Workload::complete(const IoPlan& p, bool ok) {
  if (!verify_) return;
  busy_[p.unit] = 0;
  if (p.op == Op::Write) {
    gen_[p.unit] = ok ? p.gen : kGenUnknown;
    writes_done_++;
  }
}

void Workload::fill(uint8_t* buf, const IoPlan& p) const {
  uint64_t w[kWords];
  const uint64_t lba0 = p.offset / kSector;
  for (uint32_t s = 0; s < bs_ / kSector; s++) {
    make_sector(w, lba0 + s, run_id_, p.gen);
    std::memcpy(buf + uint64_t(s) * kSector, w, kSector);
  }
}

void Workload::poison(uint8_t* buf, uint32_t len) {
  for (uint32_t off = 0; off + kSector <= len; off += kSector) std::memset(buf + off, 0xA5, 8 * kHeaderWords);
}

CheckResult Workload::check(const uint8_t* buf, const IoPlan& p, std::string* detail) const {
  const uint64_t lba0 = p.offset / kSector;
  const bool unwritten = p.gen == 0 || p.gen == kGenUnknown;
  uint64_t want[kWords], got[kWords];
  for (uint32_t s = 0; s < bs_ / kSector; s++) {
    const uint8_t* sec = buf + uint64_t(s) * kSector;
    const uint64_t lba = lba0 + s;
    std::memcpy(got, sec, kSector);
    if (p.gen == kGenUnknown) continue;  // a failed write left this block in an unknown state
    if (unwritten) {
      // Not written in this run: zeroes, or a pattern (of any earlier run) for this very lba.
      if (all_zero(sec, kSector)) continue;
      if (got[0] == kMagic && got[1] == lba) {
        make_sector(want, lba, got[2], got[3]);
        if (std::memcmp(want, got, kSector) == 0) continue;
      }
    } else {
      make_sector(want, lba, run_id_, p.gen);
      if (std::memcmp(want, got, kSector) == 0) continue;
    }
    if (detail != nullptr) {
      char found[160];
      if (all_zero(sec, kSector)) {
        std::snprintf(found, sizeof(found), "zeroes");
      } else if (sec[0] == 0xA5 && sec[1] == 0xA5 && sec[2] == 0xA5 && sec[3] == 0xA5) {
        std::snprintf(found, sizeof(found), "the poison we wrote before the read (data not transferred)");
      } else if (got[0] == kMagic) {
        std::snprintf(found, sizeof(found), "a pattern for lba %llu, run %016llx, gen %llu", (unsigned long long)got[1],
                      (unsigned long long)got[2], (unsigned long long)got[3]);
      } else {
        std::snprintf(found, sizeof(found), "other data (first word %016llx)", (unsigned long long)got[0]);
      }
      char line[320];
      if (unwritten) {
        std::snprintf(line, sizeof(line), "lba %llu (byte offset %llu), not written in this run: expected zeroes or an old pattern for this lba; found %s",
                      (unsigned long long)lba, (unsigned long long)(lba * kSector), found);
      } else {
        std::snprintf(line, sizeof(line), "lba %llu (byte offset %llu): expected the pattern of gen %u (run %016llx); found %s",
                      (unsigned long long)lba, (unsigned long long)(lba * kSector), p.gen, (unsigned long long)run_id_, found);
      }
      *detail = line;
    }
    return CheckResult::Mismatch;
  }
  return unwritten ? CheckResult::Unwritten : CheckResult::Ok;
}

}  // namespace vb
