#include "guest_memory.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <string>

#include "errors.h"
#include "fd_ops.h"

namespace rnull {

void GuestMemory::Init(Napi::Env env, Napi::Object exports, Napi::FunctionReference* ctor) {
  Napi::Function f = DefineClass(env, "GuestMemory",
                                 {InstanceMethod<&GuestMemory::Chunks>("chunks"), InstanceMethod<&GuestMemory::RegionLayout>("regionLayout"), InstanceMethod<&GuestMemory::Unmap>("unmap")});
  *ctor = Napi::Persistent(f);
  exports.Set("GuestMemory", f);
}

// new GuestMemory([{ gpa, size, uaddr, mmapOffset, fd }, ...]): maps every region (MAP_SHARED,
// read/write), each from its mmap offset rounded down to the page (vhost-user.rst "Memory
// regions": mmap_offset is where the region starts in the fd). Numbers are bytes. The fds stay
// owned by the caller (they may be closed after). Throws RangeError for an empty, overflowing or
// overlapping region, a region beyond its fd's size, an unsealed memfd (no F_SEAL_SHRINK) or an
// fd that is not a memfd, regular file or hugetlbfs file; SyscallError if fstat or mmap fails.
GuestMemory::GuestMemory(const Napi::CallbackInfo& info) : Napi::ObjectWrap<GuestMemory>(info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsArray()) {
    ThrowTypeError(env, "expected an array of regions");
    return;
  }
  Napi::Array arr = info[0].As<Napi::Array>();
  uint32_t nextChunk = 0;
  for (uint32_t i = 0; i < arr.Length(); i++) {
    Napi::Value v = arr.Get(i);
    if (!v.IsObject()) {
      ThrowTypeError(env, "region is not an object");
      UnmapAll();
      return;
    }
    Napi::Object o = v.As<Napi::Object>();
    GuestRegion r = {};
    uint64_t off = 0, fd = 0;
    if (!GetSafeU64(o, "gpa", &r.gpa) || !GetSafeU64(o, "size", &r.size) || !GetSafeU64(o, "uaddr", &r.uaddr) ||
        !GetSafeU64(o, "mmapOffset", &off) || !GetSafeU64(o, "fd", &fd)) {
      ThrowTypeError(env, "region fields gpa, size, uaddr, mmapOffset, fd must be safe non-negative integers");
      UnmapAll();
      return;
    }
    if (r.size == 0 || r.gpa + r.size < r.gpa || r.uaddr + r.size < r.uaddr || off + r.size < off) {
      ThrowRangeError(env, "memory region is empty or wraps around");
      UnmapAll();
      return;
    }
    for (const GuestRegion& o2 : regions_) {
      if (r.gpa < o2.gpa + o2.size && o2.gpa < r.gpa + r.size) {
        ThrowRangeError(env, "memory regions overlap in guest-physical space");
        UnmapAll();
        return;
      }
    }
    // The fd must not be able to shrink under the mapping (a shrunk file SIGBUSes the process on
    // the next access): memfds (on tmpfs or hugetlbfs) need F_SEAL_SHRINK; regular and hugetlbfs
    // files are accepted (their owner could still truncate them: README, "Attach a guest");
    // anything else is refused.
    FdInfo fi;
    int ce = ClassifyFd(static_cast<int>(fd), &fi);
    if (ce != 0) {
      UnmapAll();
      ThrowSyscallError(env, "fstat", ce);
      return;
    }
    std::string where = "region " + std::to_string(i) + ": ";
    if (fi.memfd && (fi.seals & F_SEAL_SHRINK) == 0) {  // hugetlbfs memfds too (QEMU seals them alike)
      UnmapAll();
      ThrowRangeError(env, (where + "memfd without F_SEAL_SHRINK (it could be shrunk under the mapping)").c_str());
      return;
    }
    if (fi.kind != FdKind::kMemfd && fi.kind != FdKind::kRegular && fi.kind != FdKind::kHugetlbfs) {
      UnmapAll();
      ThrowRangeError(env, (where + "an fd of kind " + FdKindName(fi.kind) + " cannot back guest memory").c_str());
      return;
    }
    // A mapping past the end of its file would map fine and SIGBUS on first touch: refuse it.
    if (off + r.size > static_cast<uint64_t>(fi.size)) {
      UnmapAll();
      ThrowRangeError(env, ("memory region ends at byte " + std::to_string(off + r.size) + " of an fd that has only " +
                            std::to_string(fi.size) + " (region " + std::to_string(i) + ")").c_str());
      return;
    }
    // mmap takes a page-aligned file offset (the huge page size on hugetlbfs): map from the
    // offset rounded down, and point the region at its first byte inside that mapping.
    uint64_t delta = off & (fi.pageSize - 1);
    r.mapLength = static_cast<size_t>(delta + r.size);
    r.mapBase = ::mmap(nullptr, r.mapLength, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, static_cast<int>(fd),
                       static_cast<off_t>(off - delta));
    if (r.mapBase == MAP_FAILED) {
      int e = errno;
      UnmapAll();
      ThrowSyscallError(env, "mmap", e);
      return;
    }
    r.host = static_cast<uint8_t*>(r.mapBase) + delta;
    r.firstChunk = nextChunk;
    nextChunk += static_cast<uint32_t>((r.size + kChunkBytes - 1) >> kChunkShift);
    regions_.push_back(r);
    mapped_ = true;
  }
  for (const GuestRegion& r : regions_) {
    for (uint64_t start = 0; start < r.size; start += kChunkBytes) {
      uint64_t len = r.size - start < kChunkBytes ? r.size - start : kChunkBytes;
      Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, r.host + start, static_cast<size_t>(len));
      if (env.IsExceptionPending()) {
        UnmapAll();
        return;
      }
      chunks_.push_back(Napi::Persistent(ab));
    }
  }
}

GuestMemory::~GuestMemory() { UnmapAll(); }

void GuestMemory::UnmapAll() {
  for (auto& ref : chunks_) {
    if (!ref.IsEmpty()) {
      Napi::ArrayBuffer ab = ref.Value();
      if (!ab.IsEmpty() && !ab.IsDetached()) ab.Detach();
    }
  }
  chunks_.clear();
  for (const GuestRegion& r : regions_) ::munmap(r.mapBase, r.mapLength);
  regions_.clear();
  mapped_ = false;
}

// chunks(): ArrayBuffer[]: chunk i is the i-th 1 GiB piece of the regions, in table order.
Napi::Value GuestMemory::Chunks(const Napi::CallbackInfo& info) {
  Napi::Array a = Napi::Array::New(info.Env(), chunks_.size());
  for (size_t i = 0; i < chunks_.size(); i++) a.Set(static_cast<uint32_t>(i), chunks_[i].Value());
  return a;
}

// regionLayout(): [{ size, firstChunk, hostPageOffset }] per region, in table order (empty once
// unmapped): what a DMA mapping of the region (VfioDevice.dmaMapGuest) needs to place its chunks.
Napi::Value GuestMemory::RegionLayout(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Array a = Napi::Array::New(env, regions_.size());
  uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  for (size_t i = 0; i < regions_.size(); i++) {
    const GuestRegion& r = regions_[i];
    Napi::Object o = Napi::Object::New(env);
    o.Set("size", Napi::Number::New(env, static_cast<double>(r.size)));
    o.Set("firstChunk", Napi::Number::New(env, r.firstChunk));
    o.Set("hostPageOffset", Napi::Number::New(env, static_cast<double>(reinterpret_cast<uint64_t>(r.host) % page)));
    a.Set(static_cast<uint32_t>(i), o);
  }
  return a;
}

// unmap(): detaches the chunks and unmaps every region. Callers must have stopped every
// virtqueue using this table first (Virtqueue checks mapped() and fails safe otherwise).
Napi::Value GuestMemory::Unmap(const Napi::CallbackInfo& info) {
  UnmapAll();
  return info.Env().Undefined();
}

}  // namespace rnull
