// SplitRing: the back-end side of one split virtqueue (VIRTIO 1.2 section 2.7) as plain C++:
// the avail ring, direct and indirect descriptor chains, translation of guest-physical buffers
// into chunk references across memory regions, and the used ring. No N-API here, so it links
// into the libFuzzer target (test/fuzz/chain_walk_fuzz.cc); native/virtqueue.cc binds it to
// JavaScript and adds polling, the call eventfd and the shared arrays' life cycle.
//
// Everything the guest writes (indexes, descriptors, indirect tables) is untrusted: every
// index, address and length is checked before use, every descriptor is copied once (memcpy,
// so no alignment is assumed) before any field is looked at, and no chain takes more than a
// bounded number of steps.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <string>
#include <vector>

namespace rnull {

constexpr uint32_t kMaxQueueSize = 1024;  // QEMU's VIRTQUEUE_MAX_SIZE
constexpr uint32_t kMaxSegments = 256;    // per chain, after splitting at region/chunk edges
constexpr uint32_t kSegmentWords = 4;
constexpr uint32_t kBatchWords = 3;
// Chunks: the pieces (at most 1 GiB) in which JavaScript sees each region; a segment never
// crosses one. Must equal GuestMemory's kChunkShift (checked in virtqueue.cc).
constexpr uint64_t kRingChunkShift = 30;
constexpr uint64_t kRingChunkBytes = uint64_t(1) << kRingChunkShift;
// 2.7.4: "the total length of a descriptor chain MUST NOT exceed 2^32" — and the used length
// is 32 bits: no chain above this many bytes is ever accepted, whatever the configured limit.
constexpr uint64_t kMaxChainBytes = 0xffffffffull;
// Inflight region, split queue (vhost-user.rst "Inflight I/O tracking"): QueueRegionSplit is a
// 16-byte header {u64 features, u16 version, u16 desc_num, u16 last_batch_head, u16 used_idx}
// followed by DescStateSplit entries {u8 inflight, u8 padding[5], u16 next, u64 counter}.
constexpr size_t kInflightHeaderBytes = 16;
constexpr size_t kInflightDescBytes = 16;

// Chain errors reported in batch[2]. "Soft" errors leave the chain structure intact, so the
// status byte (the last byte of the last descriptor, if device-writable) is still reported as
// the one segment and the request can be failed (VIRTIO_BLK_S_IOERR). "Hard" errors report no
// segment at all: the caller writes nothing and returns the head with used length 0.
enum ChainError : uint32_t {
  kChainOk = 0,
  kErrDescAddress = 1,         // soft: a buffer is not inside guest memory
  kErrDescZeroLength = 2,      // soft: a zero-length buffer
  kErrDescOrder = 3,           // soft: a device-readable buffer after a device-writable one
  kErrTooManySegments = 4,     // soft: more than kMaxSegments segments
  kErrChainLoop = 5,           // hard: more descriptors than the table holds (a loop)
  kErrNextIndex = 6,           // hard: next index outside the table
  kErrIndirect = 7,            // hard: indirect not negotiated, nested, with NEXT, or a bad table
  kErrTooManyDescriptors = 8,  // soft: more descriptors than ChainLimits::maxDescriptors
  kErrTooManyBytes = 9,        // soft: more bytes than ChainLimits::maxBytes (or 2^32 - 1)
};

inline bool IsSoftChainError(uint32_t e) {
  return e == kErrDescAddress || e == kErrDescZeroLength || e == kErrDescOrder || e == kErrTooManySegments ||
         e == kErrTooManyDescriptors || e == kErrTooManyBytes;
}

// One mapped memory region: guest-physical and front-end virtual start, size in bytes, our
// host mapping, and the chunk index of its first byte.
struct RingRegion {
  uint64_t gpa;
  uint64_t size;
  uint64_t uaddr;
  uint8_t* host;
  uint32_t firstChunk;
};

// A translated piece of a guest buffer: chunk, byte offset in it, length (to the end of the
// chunk, of the region or of the buffer, whichever comes first).
struct RingChunkRef {
  uint32_t chunk;
  uint32_t offset;
  uint32_t length;
};

// The memory table as the ring sees it. Regions must not overlap (GuestMemory checks that);
// host pointers must stay valid while a ring uses the table.
class RegionTable {
 public:
  void Assign(const RingRegion* regions, size_t n) { regions_.assign(regions, regions + n); lastHit_ = 0; }
  size_t size() const { return regions_.size(); }
  // Host pointer for [gpa, gpa+len) if it lies inside one region, else nullptr.
  uint8_t* HostRangeGpa(uint64_t gpa, uint64_t len) const;
  // Host pointer for a front-end virtual address range inside one region, else nullptr.
  uint8_t* HostRangeUaddr(uint64_t uaddr, uint64_t len) const;
  // Translates the start of [gpa, gpa+len) (len > 0). False if gpa is in no region.
  bool Translate(uint64_t gpa, uint64_t len, RingChunkRef* out) const;

 private:
  std::vector<RingRegion> regions_;
  mutable size_t lastHit_ = 0;
};

// Per-chain limits (0: none). A descriptor is one guest descriptor (an indirect table's
// descriptor is not counted, the ones inside it are); bytes are the sum of their lengths.
struct ChainLimits {
  uint32_t maxDescriptors = 0;
  uint64_t maxBytes = 0;
};

class SplitRing {
 public:
  // Starts the ring. Addresses are front-end virtual addresses (SET_VRING_ADDR); size is a
  // power of two 1..1024. segments (size * kMaxSegments * kSegmentWords words), batch
  // (size * kBatchWords) and used (size * 2) stay owned by the caller. Returns nullptr, or
  // why the ring cannot start (nothing changed then).
  const char* Configure(const RegionTable* memory, uint32_t size, uint64_t descAddr, uint64_t availAddr, uint64_t usedAddr,
                        uint16_t lastAvail, bool eventIdx, bool indirect, ChainLimits limits, uint32_t* segments,
                        uint32_t* batch, uint32_t* used);
  void Stop();

  bool ready() const { return ready_; }
  bool broken() const { return broken_; }
  const std::string& brokenReason() const { return brokenReason_; }
  uint32_t size() const { return size_; }
  uint16_t lastAvail() const { return lastAvail_; }
  uint16_t usedIdx() const { return usedIdx_; }
  uint32_t inflight() const { return inflightCount_; }
  bool eventIdx() const { return eventIdx_; }

  // The driver's avail->idx (acquire).
  uint16_t AvailIdx() const;
  // Pops chains offered up to availIdx into batch[*count..], at most `max` in all; stops once
  // the popped chains hold batchBytes bytes (0: no limit). Returns the entries still pending
  // (0 when the ring is drained up to availIdx); marks the ring broken on a bad index or head.
  uint16_t PopChains(uint16_t availIdx, uint32_t max, uint64_t batchBytes, uint32_t* count, uint64_t* bytes);
  // Walks the chain at head (< size). On success the segments are in seg[0..*nseg); on a soft
  // error seg[0] is the status byte if it can be located (*nseg = 1, else 0); on a hard error
  // *nseg = 0. Returns a ChainError.
  uint32_t Walk(uint16_t head, uint32_t* seg, uint32_t* nseg);
  // Notifications: suppress kicks (while polling), or re-arm them before sleeping (the caller
  // then re-checks AvailIdx() after a full fence).
  void SuppressKicks();
  void ArmKicks();
  // Publishes used[0..n) = [head, bytesWritten]: heads not in flight are skipped. Entries
  // first, then a release store of used->idx. Returns the number published; *signal tells
  // whether the driver asked to be called (2.7.7, 2.7.10), checked after a full fence.
  // With an inflight block attached, the batch is linked there (desc[head].next,
  // last_batch_head) before the used->idx store and cleared (inflight = 0, then used_idx)
  // after it.
  uint32_t PublishUsed(uint32_t n, bool* signal);

  // Inflight I/O tracking (vhost-user.rst "Inflight I/O tracking", split queue region):
  // `block` is this queue's QueueRegionSplit (16-byte header, then descNum 16-byte
  // DescStateSplit entries), already checked and recovered by the caller; descNum >= size().
  // From here on every popped head gets desc[head].counter = counter++ and then inflight = 1
  // before it is returned. `resubmit` (heads < size(), distinct, oldest first) are in flight
  // again: PopChains returns them before any avail entry; lastAvail is where the avail ring
  // goes on. Returns nullptr, or why nothing changed. Only the thread serving the ring writes
  // the block (one writer per queue); nothing is read back from it (the front-end can write it).
  const char* AttachInflight(uint8_t* block, uint32_t descNum, uint64_t counter, const uint16_t* resubmit, uint32_t n,
                             uint16_t lastAvail);
  void DetachInflight();
  bool hasInflight() const { return inflightBlock_ != nullptr; }
  uint32_t resubmitPending() const { return static_cast<uint32_t>(resubmit_.size() - resubmitPos_); }
  uint64_t inflightCounter() const { return counter_; }
  // Pops only the resubmitted heads still pending (GET_VRING_BASE drains them too).
  void PopResubmits(uint32_t max, uint64_t batchBytes, uint32_t* count, uint64_t* bytes);

 private:
  struct Desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
  };
  static Desc LoadDesc(const uint8_t* table, uint32_t i);
  void MarkBroken(const std::string& reason);
  bool AddBuffer(uint64_t addr, uint32_t len, uint32_t flags, uint32_t* seg, uint32_t* nseg, uint32_t* err);
  bool LastByteInMemory(uint64_t addr, uint32_t len) const;
  void EmitChain(uint16_t head, uint32_t* count, uint64_t* bytes);
  void MarkInflight(uint16_t head);

  const RegionTable* memory_ = nullptr;
  const uint8_t* desc_ = nullptr;
  volatile uint16_t* avail_ = nullptr;  // flags, idx, ring[size], used_event
  volatile uint8_t* used_ = nullptr;    // flags, idx, ring[size] of {u32 id, u32 len}, avail_event
  uint32_t* segments_ = nullptr;
  uint32_t* batch_ = nullptr;
  uint32_t* usedBuf_ = nullptr;
  ChainLimits limits_;
  uint32_t size_ = 0;
  uint16_t lastAvail_ = 0;
  uint16_t usedIdx_ = 0;
  bool eventIdx_ = false;
  bool indirect_ = false;
  bool ready_ = false;
  bool broken_ = false;
  std::string brokenReason_;
  std::vector<uint8_t> inflight_;
  uint32_t inflightCount_ = 0;
  // Inflight region block of this queue (nullptr: not tracked), its global counter, the heads
  // to resubmit (oldest first) and how many of them were popped, and the heads of the batch
  // being published (to clear after used->idx).
  uint8_t* inflightBlock_ = nullptr;
  uint64_t counter_ = 0;
  std::vector<uint16_t> resubmit_;
  size_t resubmitPos_ = 0;
  std::vector<uint16_t> batchHeads_;
  uint16_t lastBatchHead_ = 0;
};

}  // namespace rnull
