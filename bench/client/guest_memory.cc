#include "guest_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>

#include "common.h"

namespace vb {

uint64_t Carver::take(uint64_t size, uint64_t align) {
  uint64_t off = align_up(used_, align);
  used_ = off + size;
  return off;
}

GuestMemory::GuestMemory(uint64_t size, uint64_t gpa_base) : size_(align_up(size, 2ull << 20)), gpa_base_(gpa_base) {
  fd_ = int(memfd_create("vhost-bench-ram", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (fd_ < 0) throw sys_error("memfd_create", errno);
  if (ftruncate(fd_, off_t(size_)) != 0) throw sys_error("ftruncate memfd", errno);
  // Sealed as QEMU's memory-backend-memfd: a back-end refuses a memfd that could shrink.
  if (fcntl(fd_, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) throw sys_error("fcntl(F_ADD_SEALS) memfd", errno);
  void* p = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_, 0);
  if (p == MAP_FAILED) throw sys_error("mmap memfd", errno);
  base_ = static_cast<uint8_t*>(p);
}

GuestMemory::~GuestMemory() {
  if (base_ != nullptr) munmap(base_, size_);
  if (fd_ >= 0) close(fd_);
}

VuRegion GuestMemory::region() const { return VuRegion{gpa_base_, size_, uaddr(0), 0}; }

}  // namespace vb
