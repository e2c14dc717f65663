// The "guest RAM" the benchmark shares with the back-end: one memfd, mapped MAP_SHARED here and
// handed over with SET_MEM_TABLE. Rings and request buffers are carved out of it; descriptors
// carry guest-physical addresses (gpa_base + offset), ring addresses in SET_VRING_ADDR carry
// this process's virtual addresses.
#pragma once

#include <cstddef>
#include <cstdint>

#include "vhost_user.h"

namespace vb {

// Lays out offsets before the memory exists, so its size is known up front.
class Carver {
 public:
  // Returns the offset of `size` bytes aligned to `align` (a power of two).
  uint64_t take(uint64_t size, uint64_t align);
  uint64_t used() const { return used_; }

 private:
  uint64_t used_ = 0;
};

class GuestMemory {
 public:
  // Creates a memfd of `size` bytes (rounded up to 2 MiB) and maps it. `gpa_base` is the
  // guest-physical address of its first byte.
  GuestMemory(uint64_t size, uint64_t gpa_base);
  ~GuestMemory();
  GuestMemory(const GuestMemory&) = delete;
  GuestMemory& operator=(const GuestMemory&) = delete;

  uint8_t* at(uint64_t offset) const { return base_ + offset; }
  uint64_t gpa(uint64_t offset) const { return gpa_base_ + offset; }
  uint64_t uaddr(uint64_t offset) const { return uint64_t(reinterpret_cast<uintptr_t>(base_ + offset)); }
  int fd() const { return fd_; }
  // The SET_MEM_TABLE entry describing this memory.
  VuRegion region() const;

 private:
  int fd_ = -1;
  uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  uint64_t gpa_base_ = 0;
};

}  // namespace vb
