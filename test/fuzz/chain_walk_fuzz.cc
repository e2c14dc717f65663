// libFuzzer target for the split ring walk (native/split_ring.cc): avail ring, direct and
// indirect chains, translation across 1-3 memory regions with gaps, used ring publish.
//
// The input describes a memory table, a ring (size, flags, limits, indexes) and descriptor
// contents, mostly well-formed (addresses inside regions, next indexes inside the table) so
// valid chains are common, with hostile values mixed in. Invariants checked for every chain:
// - err is a known ChainError; a hard error reports no segment, a soft one at most the status
//   byte (one writable byte);
// - no chain reports more than kMaxSegments segments;
// - every segment lies inside one region (chunk, offset, length all consistent with it) and
//   inside a buffer some descriptor described, with that descriptor's direction;
// - a good chain's device-writable bytes come after its device-readable ones, and its bytes
//   stay within the configured limit and 2^32 - 1, so the used length published cannot wrap;
// - publishing the used elements writes exactly those (head, len) pairs and advances used->idx.
// At exit it prints how many chains were walked.
#include <fuzzer/FuzzedDataProvider.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <vector>

#include "split_ring.h"

using namespace rnull;

namespace {

constexpr uint64_t kSmallArea = 128 * 1024;  // host bytes per small region slot
constexpr uint64_t kBigSize = kRingChunkBytes + 64 * 1024;  // a region crossing a chunk edge
constexpr uint64_t kHostBytes = 3 * kSmallArea + kBigSize;
constexpr uint32_t kScratchDescs = 64;  // an area for indirect tables in region 0

uint8_t* g_host = nullptr;
uint64_t g_written = 0;  // bytes of region 0 written by the last input (zeroed before the next)
std::vector<uint32_t> g_segments, g_batch, g_used;
uint64_t g_chains = 0;
uint64_t g_inputs = 0;

void PrintCount() { fprintf(stderr, "chain_walk: %llu chains walked in %llu inputs\n", (unsigned long long)g_chains, (unsigned long long)g_inputs); }

void Check(bool ok, const char* what) {
  if (!ok) {
    fprintf(stderr, "chain_walk invariant violated: %s\n", what);
    abort();
  }
}

struct DescW {
  uint64_t addr;
  uint32_t len;
  uint16_t flags;
  uint16_t next;
};

struct Layout {
  RingRegion regions[3];
  size_t n;
};

// A guest address: mostly inside a region (sometimes near its edges), sometimes anything.
uint64_t GenAddr(FuzzedDataProvider& p, const Layout& m) {
  uint8_t mode = p.ConsumeIntegralInRange<uint8_t>(0, 7);
  if (mode == 7) return p.ConsumeIntegral<uint64_t>();
  const RingRegion& r = m.regions[mode % m.n];
  if (mode == 6) return r.gpa + r.size - p.ConsumeIntegralInRange<uint64_t>(0, 64);  // at the end
  if (mode == 5 && r.size > kRingChunkBytes) return r.gpa + kRingChunkBytes - p.ConsumeIntegralInRange<uint64_t>(0, 4096);
  return r.gpa + p.ConsumeIntegralInRange<uint64_t>(0, r.size < 65536 ? r.size - 1 : 65535);
}

DescW GenDesc(FuzzedDataProvider& p, const Layout& m, uint32_t tableSize, uint64_t scratchGpa) {
  DescW d;
  uint8_t kind = p.ConsumeIntegralInRange<uint8_t>(0, 15);
  d.addr = GenAddr(p, m);
  uint8_t lk = p.ConsumeIntegralInRange<uint8_t>(0, 7);
  d.len = lk < 5 ? p.ConsumeIntegralInRange<uint32_t>(0, 4096) : lk == 5 ? p.ConsumeIntegral<uint32_t>() : (1u << 30) + p.ConsumeIntegralInRange<uint32_t>(0, 70000);
  d.flags = p.ConsumeIntegralInRange<uint16_t>(0, 7);
  if (kind == 0) d.flags = p.ConsumeIntegral<uint16_t>();
  d.next = kind == 1 ? p.ConsumeIntegral<uint16_t>() : p.ConsumeIntegralInRange<uint16_t>(0, tableSize ? tableSize - 1 : 0);
  if ((d.flags & 4) && kind < 12) {
    // Mostly a plausible indirect table: in the scratch area, sometimes misaligned.
    d.addr = scratchGpa + 16 * p.ConsumeIntegralInRange<uint32_t>(0, kScratchDescs - 1) + p.ConsumeIntegralInRange<uint32_t>(0, 15) *
                                                                                               (kind < 6 ? 0 : 1);
    d.len = 16 * p.ConsumeIntegralInRange<uint32_t>(0, kScratchDescs + 2) + (kind == 11 ? 8 : 0);
  }
  return d;
}

void PutDesc(uint8_t* at, const DescW& d) {
  memcpy(at, &d.addr, 8);
  memcpy(at + 8, &d.len, 4);
  memcpy(at + 12, &d.flags, 2);
  memcpy(at + 14, &d.next, 2);
}

// The region holding [chunk, offset, length), or nullptr.
const RingRegion* SegmentRegion(const Layout& m, const uint32_t* s, uint64_t* gpa) {
  for (size_t i = 0; i < m.n; i++) {
    const RingRegion& r = m.regions[i];
    uint64_t chunks = (r.size + kRingChunkBytes - 1) >> kRingChunkShift;
    if (s[0] < r.firstChunk || s[0] - r.firstChunk >= chunks) continue;
    uint64_t rel = (uint64_t(s[0] - r.firstChunk) << kRingChunkShift) + s[1];
    Check(s[1] < kRingChunkBytes && uint64_t(s[1]) + s[2] <= kRingChunkBytes, "segment crosses a chunk");
    Check(rel + s[2] <= r.size, "segment past the end of its region");
    *gpa = r.gpa + rel;
    return &r;
  }
  return nullptr;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  void* p = mmap(nullptr, kHostBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) abort();
  g_host = static_cast<uint8_t*>(p);
  g_segments.resize(size_t(256) * kMaxSegments * kSegmentWords);
  g_batch.resize(256 * kBatchWords);
  g_used.resize(256 * 2);
  atexit(PrintCount);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider p(data, size);
  g_inputs++;
  // Ring control first (FuzzedDataProvider gives 0 once the input is used up, and descriptors
  // take most of it): size, flags, limits, indexes, heads.
  uint32_t qsize = 1u << p.ConsumeIntegralInRange<uint32_t>(0, 8);
  bool eventIdx = p.ConsumeBool();
  bool indirect = p.ConsumeIntegralInRange<uint8_t>(0, 7) != 0;
  ChainLimits limits;
  if (p.ConsumeBool()) limits.maxDescriptors = p.ConsumeIntegralInRange<uint32_t>(1, 300);
  if (p.ConsumeBool()) limits.maxBytes = p.ConsumeIntegralInRange<uint64_t>(1, uint64_t(1) << 34);
  uint16_t lastAvail = p.ConsumeIntegral<uint16_t>();
  uint16_t availIdx = p.ConsumeIntegralInRange<uint8_t>(0, 15) == 0
                          ? p.ConsumeIntegral<uint16_t>()
                          : static_cast<uint16_t>(lastAvail + p.ConsumeIntegralInRange<uint32_t>(1, qsize));
  uint32_t max = p.ConsumeIntegralInRange<uint32_t>(1, qsize);
  uint64_t batchBytes = p.ConsumeBool() ? p.ConsumeIntegralInRange<uint64_t>(1, 1 << 20) : 0;
  uint16_t availFlags = p.ConsumeIntegralInRange<uint16_t>(0, 1);
  uint16_t usedEvent = p.ConsumeIntegral<uint16_t>();
  uint16_t heads[256];
  for (uint32_t i = 0; i < qsize; i++)
    heads[i] = p.ConsumeIntegralInRange<uint8_t>(0, 31) == 0 ? p.ConsumeIntegral<uint16_t>() : p.ConsumeIntegralInRange<uint16_t>(0, qsize - 1);

  // Memory table: region 0 holds the rings and the scratch area; up to two more, one of which
  // may be big (crossing a 1 GiB chunk edge). Guest-physical gaps between them.
  Layout m;
  m.n = p.ConsumeIntegralInRange<size_t>(1, 3);
  uint64_t gpa = p.ConsumeIntegralInRange<uint64_t>(0, 16) << 12;
  uint32_t chunk = 0;
  bool big = false;
  memset(g_host, 0, g_written);
  for (size_t i = 0; i < m.n; i++) {
    RingRegion& r = m.regions[i];
    bool wantBig = i > 0 && !big && p.ConsumeBool();
    r.size = wantBig ? kBigSize : (i == 0 ? 64 * 1024 : 4096) + (p.ConsumeIntegralInRange<uint64_t>(0, 15) << 12);
    r.host = wantBig ? g_host + 3 * kSmallArea : g_host + i * kSmallArea;
    big = big || wantBig;
    r.gpa = gpa;
    r.uaddr = 0x7f0000000000ull + (uint64_t(i) << 36) + (p.ConsumeIntegralInRange<uint64_t>(0, 255) << 12);
    r.firstChunk = chunk;
    chunk += static_cast<uint32_t>((r.size + kRingChunkBytes - 1) >> kRingChunkShift);
    gpa += r.size + (p.ConsumeIntegralInRange<uint64_t>(0, 64) << 12);  // a gap (or none)
  }
  RegionTable table;
  table.Assign(m.regions, m.n);

  // The ring in region 0: descriptor table, avail ring, used ring, then the scratch area.
  uint64_t descOff = 0;
  uint64_t availOff = 16ull * qsize;
  uint64_t usedOff = (availOff + 6 + 2 * qsize + 3) & ~3ull;
  uint64_t scratchOff = (usedOff + 6 + 8 * qsize + 15) & ~15ull;
  uint64_t scratchEnd = scratchOff + 16 * (kScratchDescs + 2) + 7 + 16 * 8;
  g_written = scratchEnd;
  const RingRegion& r0 = m.regions[0];
  uint8_t* host0 = r0.host;
  uint64_t scratchGpa = r0.gpa + scratchOff;
  volatile uint16_t* avail = reinterpret_cast<volatile uint16_t*>(host0 + availOff);
  avail[0] = availFlags;
  avail[1] = availIdx;
  for (uint32_t i = 0; i < qsize; i++) avail[2 + i] = heads[i];
  avail[2 + qsize] = usedEvent;
  for (uint32_t i = 0; i < qsize; i++) PutDesc(host0 + descOff + 16 * i, GenDesc(p, m, qsize, scratchGpa));
  for (uint32_t i = 0; i < kScratchDescs + 2; i++) PutDesc(host0 + scratchOff + 16 * i, GenDesc(p, m, kScratchDescs, scratchGpa));
  // A misaligned copy of part of the scratch area: indirect tables at any byte offset.
  memmove(host0 + scratchOff + 16 * (kScratchDescs + 2) + 7, host0 + scratchOff, 16 * 8);

  std::vector<uint32_t>& segments = g_segments;
  std::vector<uint32_t>& batch = g_batch;
  std::vector<uint32_t>& used = g_used;
  SplitRing ring;
  const char* why = ring.Configure(&table, qsize, r0.uaddr + descOff, r0.uaddr + availOff, r0.uaddr + usedOff, lastAvail, eventIdx,
                                   indirect, limits, segments.data(), batch.data(), used.data());
  Check(why == nullptr, "configure refused a ring laid out inside region 0");

  // Every buffer the guest described: first the ring table and the scratch descriptors (where
  // valid chains live), else any 16 bytes of region 0 that was written, at any byte offset
  // (an indirect table may point anywhere there, rings included).
  auto described = [&](uint64_t a, uint64_t len, bool writable) {
    auto in = [&](const uint8_t* at) {
      DescW d;
      memcpy(&d.addr, at, 8);
      memcpy(&d.len, at + 8, 4);
      memcpy(&d.flags, at + 12, 2);
      return ((d.flags & 2) != 0) == writable && a >= d.addr && a - d.addr <= d.len && len <= d.len - (a - d.addr);
    };
    for (uint32_t i = 0; i < qsize; i++)
      if (in(host0 + descOff + 16 * i)) return true;
    for (uint32_t i = 0; i < kScratchDescs + 2; i++)
      if (in(host0 + scratchOff + 16 * i)) return true;
    for (uint64_t off = 0; off + 16 <= scratchEnd; off++)
      if (in(host0 + off)) return true;
    return false;
  };

  for (int round = 0; round < 4 && !ring.broken(); round++) {
    uint32_t count = 0;
    uint64_t bytes = 0;
    uint16_t pending = ring.PopChains(ring.AvailIdx(), max, batchBytes, &count, &bytes);
    Check(count <= max, "more chains than asked for");
    Check(pending <= qsize, "pending above the ring size");
    uint32_t nused = 0;
    for (uint32_t c = 0; c < count; c++) {
      g_chains++;
      uint32_t head = batch[c * kBatchWords], nseg = batch[c * kBatchWords + 1], err = batch[c * kBatchWords + 2];
      Check(head < qsize, "head outside the ring");
      Check(err <= kErrTooManyBytes, "unknown chain error");
      Check(nseg <= kMaxSegments, "more than kMaxSegments segments");
      if (err != kChainOk && !IsSoftChainError(err)) Check(nseg == 0, "a hard error reported segments");
      if (IsSoftChainError(err)) Check(nseg <= 1, "a soft error reported more than the status byte");
      const uint32_t* seg = segments.data() + size_t(head) * kMaxSegments * kSegmentWords;
      uint64_t total = 0, writable = 0;
      bool seenW = false;
      for (uint32_t k = 0; k < nseg; k++) {
        const uint32_t* s = seg + k * kSegmentWords;
        Check(s[3] <= 1, "segment flags");
        Check(s[2] > 0, "empty segment");
        uint64_t sgpa = 0;
        Check(SegmentRegion(m, s, &sgpa) != nullptr, "segment outside every region");
        Check(described(sgpa, s[2], s[3] == 1), "segment not inside a described buffer of its direction");
        if (err == kChainOk) Check(!(seenW && s[3] == 0), "device-readable segment after a writable one");
        seenW = seenW || s[3] == 1;
        total += s[2];
        if (s[3]) writable += s[2];
      }
      if (IsSoftChainError(err) && nseg == 1) Check(seg[2] == 1 && seg[3] == 1, "soft error: the status byte is one writable byte");
      Check(total <= kMaxChainBytes, "chain over 2^32 - 1 bytes");
      if (err == kChainOk && limits.maxBytes != 0) Check(total <= limits.maxBytes, "chain over the configured byte limit");
      used[2 * nused] = head;
      used[2 * nused + 1] = static_cast<uint32_t>(writable);
      nused++;
    }
    uint16_t before = ring.usedIdx();
    bool signal = false;
    uint32_t published = ring.PublishUsed(nused, &signal);
    Check(published == nused, "popped heads were not all published");
    Check(static_cast<uint16_t>(ring.usedIdx() - before) == published, "used idx moved by the published count");
    const volatile uint8_t* u = host0 + usedOff;
    Check(*reinterpret_cast<const volatile uint16_t*>(u + 2) == ring.usedIdx(), "used->idx not stored");
    for (uint32_t k = 0; k < published; k++) {
      uint32_t e[2];
      memcpy(e, const_cast<const uint8_t*>(u) + 4 + 8 * ((before + k) & (qsize - 1)), 8);
      Check(e[0] == used[2 * k] && e[1] == used[2 * k + 1], "used element differs from what was published");
    }
    if (pending == 0 && !ring.broken()) {
      ring.ArmKicks();
      ring.SuppressKicks();
    }
    // The guest moves on: offer what it has again (the same heads are back with the driver).
    avail[1] = static_cast<uint16_t>(ring.lastAvail() + p.ConsumeIntegralInRange<uint32_t>(0, qsize));
  }
  ring.Stop();
  return 0;
}
