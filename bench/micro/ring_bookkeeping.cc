// The native cost of inflight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) per request: the
// split ring alone (native/split_ring.cc, no N-API, no JavaScript), popping and publishing
// batches of one-descriptor chains with and without an inflight block attached, interleaved.
//
//   g++ -O2 -std=c++17 -I native bench/micro/ring_bookkeeping.cc native/split_ring.cc -o /tmp/ring_bookkeeping
//   /tmp/ring_bookkeeping [requests per run, default 20000000] [batch, default 32]
//
// Prints ns per request (pop + publish) for each mode, the median of 9 interleaved runs.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <algorithm>
#include <vector>

#include "split_ring.h"

using namespace rnull;

namespace {

constexpr uint32_t kSize = 256;

uint64_t NowNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1000000000ull + uint64_t(ts.tv_nsec);
}

struct Bench {
  std::vector<uint8_t> mem = std::vector<uint8_t>(1 << 20);
  std::vector<uint8_t> block = std::vector<uint8_t>(kInflightHeaderBytes + kInflightDescBytes * kSize);
  std::vector<uint32_t> segments = std::vector<uint32_t>(size_t(kSize) * kMaxSegments * kSegmentWords);
  std::vector<uint32_t> batch = std::vector<uint32_t>(kSize * kBatchWords);
  std::vector<uint32_t> used = std::vector<uint32_t>(kSize * 2);
  RegionTable table;
  SplitRing ring;
  uint16_t availIdx = 0;
  const uint64_t desc = 0x1000, avail = desc + 16 * kSize, usedRing = avail + 4096, data = 0x10000;

  explicit Bench(bool tracked) {
    RingRegion r{0, mem.size(), 0, mem.data(), 0};
    table.Assign(&r, 1);
    for (uint32_t i = 0; i < kSize; i++) {
      uint64_t addr = data + 64 * i;
      uint32_t len = 16;
      uint16_t flags = 0, next = 0;
      memcpy(&mem[desc + 16 * i], &addr, 8);
      memcpy(&mem[desc + 16 * i + 8], &len, 4);
      memcpy(&mem[desc + 16 * i + 12], &flags, 2);
      memcpy(&mem[desc + 16 * i + 14], &next, 2);
    }
    if (ring.Configure(&table, kSize, desc, avail, usedRing, 0, false, false, ChainLimits{}, segments.data(), batch.data(),
                       used.data()) != nullptr) {
      abort();
    }
    if (tracked && ring.AttachInflight(block.data(), kSize, 1, nullptr, 0, 0) != nullptr) abort();
  }

  // Offers n heads, pops them, publishes them: one batch.
  void Round(uint32_t n) {
    for (uint32_t i = 0; i < n; i++) {
      uint16_t head = uint16_t((availIdx + i) % kSize);
      memcpy(&mem[avail + 4 + 2 * ((availIdx + i) % kSize)], &head, 2);
    }
    availIdx = uint16_t(availIdx + n);
    __atomic_store_n(reinterpret_cast<uint16_t*>(&mem[avail + 2]), availIdx, __ATOMIC_RELEASE);
    uint32_t count = 0;
    uint64_t bytes = 0;
    ring.PopChains(ring.AvailIdx(), n, 0, &count, &bytes);
    for (uint32_t k = 0; k < count; k++) {
      used[2 * k] = batch[k * kBatchWords];
      used[2 * k + 1] = 1;
    }
    bool signal;
    if (ring.PublishUsed(count, &signal) != n) abort();
  }
};

double Run(bool tracked, uint64_t requests, uint32_t batch) {
  Bench b(tracked);
  for (int i = 0; i < 10000; i++) b.Round(batch);  // warm up
  uint64_t t0 = NowNs();
  for (uint64_t done = 0; done < requests; done += batch) b.Round(batch);
  return double(NowNs() - t0) / double(requests);
}

}  // namespace

int main(int argc, char** argv) {
  uint64_t requests = argc > 1 ? strtoull(argv[1], nullptr, 10) : 20000000;
  uint32_t batch = argc > 2 ? uint32_t(strtoul(argv[2], nullptr, 10)) : 32;
  std::vector<double> plain, tracked;
  for (int r = 0; r < 9; r++) {
    plain.push_back(Run(false, requests, batch));
    tracked.push_back(Run(true, requests, batch));
  }
  std::sort(plain.begin(), plain.end());
  std::sort(tracked.begin(), tracked.end());
  printf("{\"requests\":%llu,\"batch\":%u,\"untrackedNsPerRequest\":%.2f,\"trackedNsPerRequest\":%.2f,\"costNs\":%.2f,"
         "\"untrackedMin\":%.2f,\"trackedMin\":%.2f}\n",
         (unsigned long long)requests, batch, plain[4], tracked[4], tracked[4] - plain[4], plain[0], tracked[0]);
  return 0;
}
