#include "vfio.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/vfio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <map>
#include <mutex>
#include <string>

#include "errors.h"
#include "guest_memory.h"

namespace rnull {

namespace {

constexpr uint64_t kMaxDmaBlock = uint64_t(1) << 30;  // 1 GiB: one ArrayBuffer per block
constexpr double kMaxSafe = 9007199254740991.0;
constexpr uint32_t kNumBars = 6;  // VFIO_PCI_BAR0_REGION_INDEX .. BAR5

uint64_t PageSize() {
  static const uint64_t p = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  return p;
}

// ioctl() retried on EINTR; -1 with errno set on failure.
int Ioctl(int fd, unsigned long req, void* arg) {
  int r;
  do {
    r = ioctl(fd, req, arg);
  } while (r < 0 && errno == EINTR);
  return r;
}

int IoctlVal(int fd, unsigned long req, unsigned long arg) {
  int r;
  do {
    r = ioctl(fd, req, arg);
  } while (r < 0 && errno == EINTR);
  return r;
}

double Clamp(uint64_t v) { return v > static_cast<uint64_t>(kMaxSafe) ? kMaxSafe : static_cast<double>(v); }

// Reads argument i as an integer in [0, max]; false after throwing a TypeError/RangeError naming it.
bool ArgU64(const Napi::CallbackInfo& info, size_t i, const char* name, uint64_t max, uint64_t* out) {
  int64_t v;
  if (!ArgInt(info, i, name, &v)) return false;
  if (v < 0 || static_cast<uint64_t>(v) > max) {
    ThrowRangeError(info.Env(), (std::string(name) + " is out of range").c_str());
    return false;
  }
  *out = static_cast<uint64_t>(v);
  return true;
}

// Process-wide shares: memory a VfioDevice owns (DMA blocks, BARs) that queue worker threads use
// by id. Leaked on purpose: no destructor runs at exit while a worker may still use them.
struct Share {
  uint8_t* base;
  uint64_t size;
  uint32_t views;  // live ArrayBuffer views in worker threads
  bool ownerGone;  // the device let go: unmapped when the last view goes
};
std::mutex& ShareMu() {
  static std::mutex* m = new std::mutex();
  return *m;
}
std::map<uint32_t, Share>& Shares() {
  static std::map<uint32_t, Share>* s = new std::map<uint32_t, Share>();
  return *s;
}
uint32_t gNextShare = 1;  // under ShareMu

uint32_t ShareAdd(uint8_t* base, uint64_t size) {
  std::lock_guard<std::mutex> lock(ShareMu());
  uint32_t id = gNextShare++;
  Shares()[id] = Share{base, size, 0, false};
  return id;
}

// The owner lets go of its memory: unmapped now, or by the last view's finalizer.
void ShareDrop(uint32_t id, uint8_t* base, uint64_t size) {
  {
    std::lock_guard<std::mutex> lock(ShareMu());
    auto it = Shares().find(id);
    if (it != Shares().end()) {
      if (it->second.views > 0) {
        it->second.ownerGone = true;
        return;
      }
      Shares().erase(it);
    }
  }
  munmap(base, size);
}

void ShareViewGone(napi_env, void*, void* hint) {
  uint32_t id = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(hint));
  uint8_t* base = nullptr;
  uint64_t size = 0;
  {
    std::lock_guard<std::mutex> lock(ShareMu());
    auto it = Shares().find(id);
    if (it == Shares().end()) return;
    if (--it->second.views > 0 || !it->second.ownerGone) return;
    base = it->second.base;
    size = it->second.size;
    Shares().erase(it);
  }
  munmap(base, size);
}

// vfioShareView(share) -> ArrayBuffer over a DMA block of any thread's VfioDevice: the same
// memory (the device sees what is written there). The memory stays mapped while the view lives.
// Error if the block was freed.
Napi::Value ShareView(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t id;
  if (!ArgU64(info, 0, "share", 0xffffffffu, &id)) return Napi::Value();
  uint8_t* base = nullptr;
  uint64_t size = 0;
  {
    std::lock_guard<std::mutex> lock(ShareMu());
    auto it = Shares().find(static_cast<uint32_t>(id));
    if (it != Shares().end() && !it->second.ownerGone) {
      it->second.views++;
      base = it->second.base;
      size = it->second.size;
    }
  }
  if (base == nullptr) {
    ThrowError(env, "vfioShareView: no such VFIO memory (freed, or the device closed)");
    return Napi::Value();
  }
  napi_value ab;
  napi_status st = napi_create_external_arraybuffer(env, base, size, ShareViewGone, reinterpret_cast<void*>(static_cast<uintptr_t>(id)), &ab);
  if (st != napi_ok) {
    ShareViewGone(env, nullptr, reinterpret_cast<void*>(static_cast<uintptr_t>(id)));
    ThrowError(env, "vfioShareView: cannot create the ArrayBuffer");
    return Napi::Value();
  }
  return Napi::Value(env, ab);
}

// One 32-bit MMIO access through a BAR share, under the registry lock (the BAR cannot be
// unmapped meanwhile). A store comes after a full fence (earlier DMA-memory stores first).
Napi::Value ShareMmio(const Napi::CallbackInfo& info, bool write) {
  Napi::Env env = info.Env();
  uint64_t id, off, v = 0;
  if (!ArgU64(info, 0, "share", 0xffffffffu, &id) || !ArgU64(info, 1, "MMIO offset", 0xffffffffu, &off)) return Napi::Value();
  if (write && !ArgU64(info, 2, "value", 0xffffffffu, &v)) return Napi::Value();
  int problem = 0;
  {
    std::lock_guard<std::mutex> lock(ShareMu());
    auto it = Shares().find(static_cast<uint32_t>(id));
    if (it == Shares().end() || it->second.ownerGone) {
      problem = 1;
    } else if (off % 4 != 0 || off + 4 > it->second.size) {
      problem = 2;
    } else if (write) {
      __atomic_thread_fence(__ATOMIC_SEQ_CST);
      *reinterpret_cast<volatile uint32_t*>(it->second.base + off) = static_cast<uint32_t>(v);
    } else {
      v = *reinterpret_cast<volatile uint32_t*>(it->second.base + off);
      __atomic_thread_fence(__ATOMIC_ACQUIRE);
    }
  }
  if (problem == 1) {
    ThrowError(env, "VFIO MMIO: the BAR is not mapped any more (device closed)");
    return Napi::Value();
  }
  if (problem == 2) {
    ThrowRangeError(env, "MMIO offset is unaligned or outside the BAR");
    return Napi::Value();
  }
  return write ? env.Undefined() : Napi::Number::New(env, static_cast<double>(v));
}

Napi::Value ShareRead32(const Napi::CallbackInfo& info) { return ShareMmio(info, false); }
Napi::Value ShareWrite32(const Napi::CallbackInfo& info) { return ShareMmio(info, true); }

// vfioFence(): a full memory fence, for a store to DMA memory that must be visible to the device
// before a later load from DMA memory (shadow doorbell, then its EventIdx).
Napi::Value Fence(const Napi::CallbackInfo& info) {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  return info.Env().Undefined();
}

}  // namespace

void VfioDevice::Init(Napi::Env env, Napi::Object exports) {
  Napi::Function f = DefineClass(env, "VfioDevice",
                                 {
                                     InstanceMethod<&VfioDevice::Info>("info"),
                                     InstanceMethod<&VfioDevice::IommuInfo>("iommuInfo"),
                                     InstanceMethod<&VfioDevice::RegionInfo>("regionInfo"),
                                     InstanceMethod<&VfioDevice::IrqCount>("irqCount"),
                                     InstanceMethod<&VfioDevice::MapBar>("mapBar"),
                                     InstanceMethod<&VfioDevice::BarShare>("barShare"),
                                     InstanceMethod<&VfioDevice::Read32>("read32"),
                                     InstanceMethod<&VfioDevice::Write32>("write32"),
                                     InstanceMethod<&VfioDevice::Read64>("read64"),
                                     InstanceMethod<&VfioDevice::Write64>("write64"),
                                     InstanceMethod<&VfioDevice::ConfigRead>("configRead"),
                                     InstanceMethod<&VfioDevice::ConfigWrite>("configWrite"),
                                     InstanceMethod<&VfioDevice::DmaAlloc>("dmaAlloc"),
                                     InstanceMethod<&VfioDevice::DmaMap>("dmaMap"),
                                     InstanceMethod<&VfioDevice::DmaUnmap>("dmaUnmap"),
                                     InstanceMethod<&VfioDevice::DmaFree>("dmaFree"),
                                     InstanceMethod<&VfioDevice::DmaMapGuest>("dmaMapGuest"),
                                     InstanceMethod<&VfioDevice::DmaUnmapGuest>("dmaUnmapGuest"),
                                     InstanceMethod<&VfioDevice::SetMsix>("setMsix"),
                                     InstanceMethod<&VfioDevice::Reset>("reset"),
                                     InstanceMethod<&VfioDevice::Close>("close"),
                                 });
  Napi::Object consts = Napi::Object::New(env);
  consts.Set("PAGE_SIZE", Napi::Number::New(env, static_cast<double>(PageSize())));
  consts.Set("MAX_DMA_BLOCK", Napi::Number::New(env, static_cast<double>(kMaxDmaBlock)));
  consts.Set("MSIX_IRQ_INDEX", Napi::Number::New(env, VFIO_PCI_MSIX_IRQ_INDEX));
  consts.Set("CONFIG_REGION_INDEX", Napi::Number::New(env, VFIO_PCI_CONFIG_REGION_INDEX));
  exports.Set("vfioConstants", consts);
  exports.Set("VfioDevice", f);
  exports.Set("vfioShareView", Napi::Function::New(env, ShareView, "vfioShareView"));
  exports.Set("vfioShareRead32", Napi::Function::New(env, ShareRead32, "vfioShareRead32"));
  exports.Set("vfioShareWrite32", Napi::Function::New(env, ShareWrite32, "vfioShareWrite32"));
  exports.Set("vfioFence", Napi::Function::New(env, Fence, "vfioFence"));
}

// new VfioDevice(groupPath, bdf): opens /dev/vfio/vfio, the group (e.g. "/dev/vfio/7") and the
// device "0000:00:04.0" in it, with a TYPE1v2 IOMMU when the kernel offers it, else TYPE1.
// Throws SyscallError naming the failed call, Error for a non-viable group or no type1 IOMMU.
VfioDevice::VfioDevice(const Napi::CallbackInfo& info) : Napi::ObjectWrap<VfioDevice>(info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsString() || !info[1].IsString()) {
    ThrowTypeError(env, "expected (groupPath: string, bdf: string)");
    return;
  }
  std::string groupPath = info[0].As<Napi::String>().Utf8Value();
  std::string bdf = info[1].As<Napi::String>().Utf8Value();
  if (bdf.empty() || bdf.size() > 64 || groupPath.empty() || groupPath.size() > 4096) {
    ThrowRangeError(env, "bad group path or device name");
    return;
  }

  containerFd_ = open("/dev/vfio/vfio", O_RDWR | O_CLOEXEC);
  if (containerFd_ < 0) {
    ThrowSyscallError(env, "open /dev/vfio/vfio", errno);
    return;
  }
  int version = IoctlVal(containerFd_, VFIO_GET_API_VERSION, 0);
  if (version != VFIO_API_VERSION) {
    CloseAll();
    ThrowError(env, ("VFIO_GET_API_VERSION: kernel reports " + std::to_string(version) + ", expected " +
                     std::to_string(VFIO_API_VERSION)).c_str());
    return;
  }
  if (IoctlVal(containerFd_, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) > 0) {
    iommuType_ = VFIO_TYPE1v2_IOMMU;
  } else if (IoctlVal(containerFd_, VFIO_CHECK_EXTENSION, VFIO_TYPE1_IOMMU) > 0) {
    iommuType_ = VFIO_TYPE1_IOMMU;
  } else {
    CloseAll();
    ThrowError(env, "VFIO_CHECK_EXTENSION: the kernel offers no type1 IOMMU (load vfio_iommu_type1; is the IOMMU on?)");
    return;
  }

  groupFd_ = open(groupPath.c_str(), O_RDWR | O_CLOEXEC);
  if (groupFd_ < 0) {
    FailOpen(env, "open " + groupPath);
    return;
  }
  struct vfio_group_status status = {};
  status.argsz = sizeof(status);
  if (Ioctl(groupFd_, VFIO_GROUP_GET_STATUS, &status) < 0) {
    FailOpen(env, "VFIO_GROUP_GET_STATUS");
    return;
  }
  if ((status.flags & VFIO_GROUP_FLAGS_VIABLE) == 0) {
    CloseAll();
    ThrowError(env, ("VFIO group " + groupPath +
                     " is not viable: every device of the IOMMU group must be bound to vfio-pci (or to no driver); "
                     "see /sys/kernel/iommu_groups/<group>/devices")
                        .c_str());
    return;
  }
  if (Ioctl(groupFd_, VFIO_GROUP_SET_CONTAINER, &containerFd_) < 0) {
    FailOpen(env, "VFIO_GROUP_SET_CONTAINER");
    return;
  }
  if (IoctlVal(containerFd_, VFIO_SET_IOMMU, static_cast<unsigned long>(iommuType_)) < 0) {
    FailOpen(env, "VFIO_SET_IOMMU");
    return;
  }
  deviceFd_ = ioctl(groupFd_, VFIO_GROUP_GET_DEVICE_FD, bdf.c_str());
  if (deviceFd_ < 0) {
    FailOpen(env, "VFIO_GROUP_GET_DEVICE_FD " + bdf);
    return;
  }
  struct vfio_device_info dinfo = {};
  dinfo.argsz = sizeof(dinfo);
  if (Ioctl(deviceFd_, VFIO_DEVICE_GET_INFO, &dinfo) < 0) {
    FailOpen(env, "VFIO_DEVICE_GET_INFO");
    return;
  }
  if ((dinfo.flags & VFIO_DEVICE_FLAGS_PCI) == 0 || dinfo.num_regions <= VFIO_PCI_CONFIG_REGION_INDEX) {
    CloseAll();
    ThrowError(env, ("VFIO device " + bdf + " is not a PCI device").c_str());
    return;
  }
  numRegions_ = dinfo.num_regions;
  numIrqs_ = dinfo.num_irqs;
  struct vfio_region_info rinfo = {};
  rinfo.argsz = sizeof(rinfo);
  rinfo.index = VFIO_PCI_CONFIG_REGION_INDEX;
  if (Ioctl(deviceFd_, VFIO_DEVICE_GET_REGION_INFO, &rinfo) < 0) {
    FailOpen(env, "VFIO_DEVICE_GET_REGION_INFO (config)");
    return;
  }
  configOffset_ = rinfo.offset;
  configSize_ = rinfo.size;
  bars_.resize(kNumBars);
  open_ = true;
}

// The constructor's failure path: closes whatever it opened, then throws SyscallError for the
// call named `what` with the errno it left.
void VfioDevice::FailOpen(Napi::Env env, const std::string& what) {
  int e = errno;
  CloseAll();
  ThrowSyscallError(env, what.c_str(), e);
}

VfioDevice::~VfioDevice() { CloseAll(); }

bool VfioDevice::CheckOpen(Napi::Env env) {
  if (!open_) ThrowError(env, "VFIO device is closed");
  return open_;
}

// info(): { iommuType: 'TYPE1v2' | 'TYPE1', numRegions, numIrqs, configSize (bytes) }.
Napi::Value VfioDevice::Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return Napi::Value();
  Napi::Object o = Napi::Object::New(env);
  o.Set("iommuType", iommuType_ == VFIO_TYPE1v2_IOMMU ? "TYPE1v2" : "TYPE1");
  o.Set("numRegions", numRegions_);
  o.Set("numIrqs", numIrqs_);
  o.Set("configSize", static_cast<double>(configSize_));
  return o;
}

// iommuInfo(): { pageSizes: bigint (bitmap of supported IOMMU page sizes), minPageSize (bytes),
// ranges: [{ start, end }] (usable IOVAs, end inclusive, clamped to 2^53-1), dmaAvail?: number
// (how many more MAP_DMA entries the container accepts) }. The ranges come from the
// VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE capability; an empty array when the kernel has none.
Napi::Value VfioDevice::IommuInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return Napi::Value();
  std::vector<uint8_t> buf(sizeof(struct vfio_iommu_type1_info));
  auto* ti = reinterpret_cast<struct vfio_iommu_type1_info*>(buf.data());
  ti->argsz = static_cast<uint32_t>(buf.size());
  if (Ioctl(containerFd_, VFIO_IOMMU_GET_INFO, ti) < 0) {
    ThrowSyscallError(env, "VFIO_IOMMU_GET_INFO", errno);
    return Napi::Value();
  }
  if (ti->argsz > buf.size()) {
    // The capability chain does not fit: ask again with the size the kernel asked for.
    if (ti->argsz > (1u << 20)) {
      ThrowError(env, "VFIO_IOMMU_GET_INFO: implausible argsz");
      return Napi::Value();
    }
    uint32_t want = ti->argsz;
    buf.assign(want, 0);
    ti = reinterpret_cast<struct vfio_iommu_type1_info*>(buf.data());
    ti->argsz = want;
    if (Ioctl(containerFd_, VFIO_IOMMU_GET_INFO, ti) < 0) {
      ThrowSyscallError(env, "VFIO_IOMMU_GET_INFO", errno);
      return Napi::Value();
    }
  }
  Napi::Object o = Napi::Object::New(env);
  uint64_t pgsizes = (ti->flags & VFIO_IOMMU_INFO_PGSIZES) ? ti->iova_pgsizes : PageSize();
  o.Set("pageSizes", Napi::BigInt::New(env, pgsizes));
  o.Set("minPageSize", Napi::Number::New(env, pgsizes ? static_cast<double>(pgsizes & (~pgsizes + 1)) : 0));
  Napi::Array ranges = Napi::Array::New(env);
  const size_t len = std::min<size_t>(buf.size(), ti->argsz);
  if ((ti->flags & VFIO_IOMMU_INFO_CAPS) && ti->cap_offset != 0) {
    uint32_t off = ti->cap_offset;
    for (int guard = 0; off != 0 && guard < 64; guard++) {
      if (off < sizeof(*ti) || off + sizeof(struct vfio_info_cap_header) > len) break;
      auto* hdr = reinterpret_cast<struct vfio_info_cap_header*>(buf.data() + off);
      if (hdr->id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE &&
          off + sizeof(struct vfio_iommu_type1_info_cap_iova_range) <= len) {
        auto* cap = reinterpret_cast<struct vfio_iommu_type1_info_cap_iova_range*>(hdr);
        for (uint32_t i = 0; i < cap->nr_iovas; i++) {
          size_t at = off + sizeof(*cap) + i * sizeof(struct vfio_iova_range);
          if (at + sizeof(struct vfio_iova_range) > len) break;
          auto* r = reinterpret_cast<struct vfio_iova_range*>(buf.data() + at);
          Napi::Object ro = Napi::Object::New(env);
          ro.Set("start", Napi::Number::New(env, Clamp(r->start)));
          ro.Set("end", Napi::Number::New(env, Clamp(r->end)));
          ranges.Set(ranges.Length(), ro);
        }
      }
#ifdef VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL
      if (hdr->id == VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL && off + sizeof(struct vfio_iommu_type1_info_dma_avail) <= len) {
        auto* cap = reinterpret_cast<struct vfio_iommu_type1_info_dma_avail*>(hdr);
        o.Set("dmaAvail", Napi::Number::New(env, cap->avail));
      }
#endif
      if (hdr->next != 0 && hdr->next <= off) break;  // the chain only moves forward
      off = hdr->next;
    }
  }
  o.Set("ranges", ranges);
  return o;
}

// regionInfo(index): { size, offset (bytes, in the device fd), flags, read, write, mmap }.
Napi::Value VfioDevice::RegionInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return Napi::Value();
  uint64_t index;
  if (!ArgU64(info, 0, "region index", numRegions_ - 1, &index)) return Napi::Value();
  struct vfio_region_info r = {};
  r.argsz = sizeof(r);
  r.index = static_cast<uint32_t>(index);
  if (Ioctl(deviceFd_, VFIO_DEVICE_GET_REGION_INFO, &r) < 0) {
    ThrowSyscallError(env, "VFIO_DEVICE_GET_REGION_INFO", errno);
    return Napi::Value();
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("size", Napi::Number::New(env, Clamp(r.size)));
  o.Set("offset", Napi::Number::New(env, Clamp(r.offset)));
  o.Set("flags", Napi::Number::New(env, r.flags));
  o.Set("read", Napi::Boolean::New(env, (r.flags & VFIO_REGION_INFO_FLAG_READ) != 0));
  o.Set("write", Napi::Boolean::New(env, (r.flags & VFIO_REGION_INFO_FLAG_WRITE) != 0));
  o.Set("mmap", Napi::Boolean::New(env, (r.flags & VFIO_REGION_INFO_FLAG_MMAP) != 0));
  return o;
}

// irqCount(index): how many interrupts of that VFIO index (e.g. MSIX_IRQ_INDEX) the device has.
Napi::Value VfioDevice::IrqCount(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return Napi::Value();
  uint64_t index;
  if (!ArgU64(info, 0, "irq index", numIrqs_ == 0 ? 0 : numIrqs_ - 1, &index)) return Napi::Value();
  struct vfio_irq_info irq = {};
  irq.argsz = sizeof(irq);
  irq.index = static_cast<uint32_t>(index);
  if (Ioctl(deviceFd_, VFIO_DEVICE_GET_IRQ_INFO, &irq) < 0) {
    ThrowSyscallError(env, "VFIO_DEVICE_GET_IRQ_INFO", errno);
    return Napi::Value();
  }
  return Napi::Number::New(env, irq.count);
}

// mapBar(index): mmaps BAR `index` (0..5) read/write for its whole size; returns the size in
// bytes. Mapping an already mapped BAR returns its size again. Error if the region cannot be
// mmap'd (an I/O-port BAR, or VFIO refuses), SyscallError if mmap fails.
Napi::Value VfioDevice::MapBar(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return Napi::Value();
  uint64_t index;
  if (!ArgU64(info, 0, "BAR index", kNumBars - 1, &index)) return Napi::Value();
  VfioBar& bar = bars_[index];
  if (bar.base != nullptr) return Napi::Number::New(env, static_cast<double>(bar.size));
  struct vfio_region_info r = {};
  r.argsz = sizeof(r);
  r.index = static_cast<uint32_t>(index);
  if (Ioctl(deviceFd_, VFIO_DEVICE_GET_REGION_INFO, &r) < 0) {
    ThrowSyscallError(env, "VFIO_DEVICE_GET_REGION_INFO", errno);
    return Napi::Value();
  }
  if (r.size == 0 || (r.flags & VFIO_REGION_INFO_FLAG_MMAP) == 0 || r.size > (uint64_t(1) << 32)) {
    ThrowError(env, ("BAR" + std::to_string(index) + " cannot be mmap'd (size " + std::to_string(r.size) +
                     ", flags " + std::to_string(r.flags) + ")")
                        .c_str());
    return Napi::Value();
  }
  void* p = mmap(nullptr, r.size, PROT_READ | PROT_WRITE, MAP_SHARED, deviceFd_, static_cast<off_t>(r.offset));
  if (p == MAP_FAILED) {
    ThrowSyscallError(env, ("mmap BAR" + std::to_string(index)).c_str(), errno);
    return Napi::Value();
  }
  bar.base = static_cast<uint8_t*>(p);
  bar.size = r.size;
  bar.share = ShareAdd(bar.base, bar.size);
  return Napi::Number::New(env, static_cast<double>(bar.size));
}

// barShare(index) -> the process-wide share id of mapped BAR `index` (vfioShareRead32/Write32).
Napi::Value VfioDevice::BarShare(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return Napi::Value();
  uint64_t index;
  if (!ArgU64(info, 0, "BAR index", kNumBars - 1, &index)) return Napi::Value();
  if (bars_[index].base == nullptr) {
    ThrowError(env, "BAR is not mapped (call mapBar first)");
    return Napi::Value();
  }
  return Napi::Number::New(env, bars_[index].share);
}

uint8_t* VfioDevice::MmioAddr(const Napi::CallbackInfo& info, uint32_t width) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return nullptr;
  uint64_t index, off;
  if (!ArgU64(info, 0, "BAR index", kNumBars - 1, &index)) return nullptr;
  const VfioBar& bar = bars_[index];
  if (bar.base == nullptr) {
    ThrowError(env, "BAR is not mapped (call mapBar first)");
    return nullptr;
  }
  if (!ArgU64(info, 1, "MMIO offset", bar.size, &off)) return nullptr;
  if (off % width != 0 || off + width > bar.size) {
    ThrowRangeError(env, "MMIO offset is unaligned or outside the BAR");
    return nullptr;
  }
  return bar.base + off;
}

// read32(bar, offset) -> number: one 32-bit load from the BAR; later loads are not moved before it.
Napi::Value VfioDevice::Read32(const Napi::CallbackInfo& info) {
  uint8_t* p = MmioAddr(info, 4);
  if (p == nullptr) return Napi::Value();
  uint32_t v = *reinterpret_cast<volatile uint32_t*>(p);
  __atomic_thread_fence(__ATOMIC_ACQUIRE);
  return Napi::Number::New(info.Env(), v);
}

// write32(bar, offset, value): one 32-bit store to the BAR, after a full fence, so every earlier
// store to DMA memory (a submission queue entry, a PRP list) is visible to the device first.
Napi::Value VfioDevice::Write32(const Napi::CallbackInfo& info) {
  uint8_t* p = MmioAddr(info, 4);
  if (p == nullptr) return Napi::Value();
  uint64_t v;
  if (!ArgU64(info, 2, "value", 0xffffffffu, &v)) return Napi::Value();
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  *reinterpret_cast<volatile uint32_t*>(p) = static_cast<uint32_t>(v);
  return info.Env().Undefined();
}

// read64(bar, offset) -> bigint: one 64-bit load (offset 8-byte aligned).
Napi::Value VfioDevice::Read64(const Napi::CallbackInfo& info) {
  uint8_t* p = MmioAddr(info, 8);
  if (p == nullptr) return Napi::Value();
  uint64_t v = *reinterpret_cast<volatile uint64_t*>(p);
  __atomic_thread_fence(__ATOMIC_ACQUIRE);
  return Napi::BigInt::New(info.Env(), v);
}

// write64(bar, offset, value: bigint): one 64-bit store after a full fence.
Napi::Value VfioDevice::Write64(const Napi::CallbackInfo& info) {
  uint8_t* p = MmioAddr(info, 8);
  if (p == nullptr) return Napi::Value();
  if (info.Length() < 3 || !info[2].IsBigInt()) {
    ThrowTypeError(info.Env(), "expected a bigint value");
    return Napi::Value();
  }
  bool lossless = false;
  uint64_t v = info[2].As<Napi::BigInt>().Uint64Value(&lossless);
  if (!lossless) {
    ThrowRangeError(info.Env(), "value is not a 64-bit unsigned integer");
    return Napi::Value();
  }
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  *reinterpret_cast<volatile uint64_t*>(p) = v;
  return info.Env().Undefined();
}

// configRead(offset, width) -> number: PCI config space bytes [offset, offset+width), width 1, 2
// or 4, little-endian, read through the VFIO config region.
Napi::Value VfioDevice::ConfigRead(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return Napi::Value();
  uint64_t off, width;
  if (!ArgU64(info, 0, "config offset", configSize_, &off) || !ArgU64(info, 1, "width", 4, &width)) return Napi::Value();
  if ((width != 1 && width != 2 && width != 4) || off % width != 0 || off + width > configSize_) {
    ThrowRangeError(env, "config access: width must be 1, 2 or 4, aligned, inside config space");
    return Napi::Value();
  }
  uint8_t b[4] = {0, 0, 0, 0};
  ssize_t n;
  do {
    n = pread(deviceFd_, b, width, static_cast<off_t>(configOffset_ + off));
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    ThrowSyscallError(env, "pread (PCI config)", errno);
    return Napi::Value();
  }
  if (static_cast<uint64_t>(n) != width) {
    ThrowError(env, "pread (PCI config): short read");
    return Napi::Value();
  }
  uint32_t v = uint32_t(b[0]) | (uint32_t(b[1]) << 8) | (uint32_t(b[2]) << 16) | (uint32_t(b[3]) << 24);
  return Napi::Number::New(env, v);
}

// configWrite(offset, width, value): writes width (1, 2, 4) bytes of PCI config space.
Napi::Value VfioDevice::ConfigWrite(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return Napi::Value();
  uint64_t off, width, v;
  if (!ArgU64(info, 0, "config offset", configSize_, &off) || !ArgU64(info, 1, "width", 4, &width)) return Napi::Value();
  if ((width != 1 && width != 2 && width != 4) || off % width != 0 || off + width > configSize_) {
    ThrowRangeError(env, "config access: width must be 1, 2 or 4, aligned, inside config space");
    return Napi::Value();
  }
  if (!ArgU64(info, 2, "value", width == 4 ? 0xffffffffu : (uint64_t(1) << (8 * width)) - 1, &v)) return Napi::Value();
  uint8_t b[4] = {uint8_t(v), uint8_t(v >> 8), uint8_t(v >> 16), uint8_t(v >> 24)};
  ssize_t n;
  do {
    n = pwrite(deviceFd_, b, width, static_cast<off_t>(configOffset_ + off));
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    ThrowSyscallError(env, "pwrite (PCI config)", errno);
    return Napi::Value();
  }
  if (static_cast<uint64_t>(n) != width) {
    ThrowError(env, "pwrite (PCI config): short write");
    return Napi::Value();
  }
  return env.Undefined();
}

// dmaAlloc(size) -> { id, buffer: ArrayBuffer }: `size` bytes (a multiple of PAGE_SIZE, at most
// MAX_DMA_BLOCK) of zeroed, page-aligned anonymous memory, not inherited by child processes.
// Not yet visible to the device: dmaMap(id, iova) does that.
Napi::Value VfioDevice::DmaAlloc(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return Napi::Value();
  uint64_t size;
  if (!ArgU64(info, 0, "size", kMaxDmaBlock, &size)) return Napi::Value();
  if (size == 0 || size % PageSize() != 0) {
    ThrowRangeError(env, "DMA size must be a non-zero multiple of the page size");
    return Napi::Value();
  }
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    ThrowSyscallError(env, "mmap (DMA memory)", errno);
    return Napi::Value();
  }
  // A fork (child_process) must not make the pinned pages copy-on-write in this process.
  if (madvise(p, size, MADV_DONTFORK) != 0) {
    int e = errno;
    munmap(p, size);
    ThrowSyscallError(env, "madvise MADV_DONTFORK", e);
    return Napi::Value();
  }
  uint32_t id = nextBlockId_++;
  DmaBlock& b = blocks_[id];
  b.host = static_cast<uint8_t*>(p);
  b.size = size;
  b.share = ShareAdd(b.host, size);
  Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, p, size);
  b.buffer = Napi::Persistent(ab);
  Napi::Object o = Napi::Object::New(env);
  o.Set("id", Napi::Number::New(env, id));
  o.Set("share", Napi::Number::New(env, b.share));
  o.Set("buffer", ab);
  return o;
}

DmaBlock* VfioDevice::BlockArg(const Napi::CallbackInfo& info, size_t i) {
  uint64_t id;
  if (!ArgU64(info, i, "DMA block id", 0xffffffffu, &id)) return nullptr;
  auto it = blocks_.find(static_cast<uint32_t>(id));
  if (it == blocks_.end()) {
    ThrowRangeError(info.Env(), "no such DMA block");
    return nullptr;
  }
  return &it->second;
}

// dmaMap(id, iova): VFIO_IOMMU_MAP_DMA of the whole block at `iova` (page aligned), readable and
// writable by the device. Error if the block is already mapped; SyscallError from the kernel
// (e.g. EINVAL outside the usable ranges, EEXIST over another mapping, ENOMEM past the memlock
// limit or the DMA entry limit).
Napi::Value VfioDevice::DmaMap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return Napi::Value();
  DmaBlock* b = BlockArg(info, 0);
  if (b == nullptr) return Napi::Value();
  uint64_t iova;
  if (!ArgU64(info, 1, "iova", static_cast<uint64_t>(kMaxSafe), &iova)) return Napi::Value();
  if (iova % PageSize() != 0 || iova + b->size < iova) {
    ThrowRangeError(env, "iova must be page aligned");
    return Napi::Value();
  }
  if (b->mapped) {
    ThrowError(env, "DMA block is already mapped");
    return Napi::Value();
  }
  struct vfio_iommu_type1_dma_map m = {};
  m.argsz = sizeof(m);
  m.flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
  m.vaddr = reinterpret_cast<uint64_t>(b->host);
  m.iova = iova;
  m.size = b->size;
  if (Ioctl(containerFd_, VFIO_IOMMU_MAP_DMA, &m) < 0) {
    ThrowSyscallError(env, "VFIO_IOMMU_MAP_DMA", errno);
    return Napi::Value();
  }
  b->mapped = true;
  b->iova = iova;
  return env.Undefined();
}

int VfioDevice::UnmapBlock(DmaBlock* b) {
  if (!b->mapped) return 0;
  struct vfio_iommu_type1_dma_unmap u = {};
  u.argsz = sizeof(u);
  u.iova = b->iova;
  u.size = b->size;
  if (Ioctl(containerFd_, VFIO_IOMMU_UNMAP_DMA, &u) < 0) return errno;
  if (u.size != b->size) return EIO;
  b->mapped = false;
  return 0;
}

// dmaUnmap(id): VFIO_IOMMU_UNMAP_DMA of the block (no-op if it is not mapped). The memory stays.
Napi::Value VfioDevice::DmaUnmap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return Napi::Value();
  DmaBlock* b = BlockArg(info, 0);
  if (b == nullptr) return Napi::Value();
  int e = UnmapBlock(b);
  if (e != 0) {
    ThrowSyscallError(env, "VFIO_IOMMU_UNMAP_DMA", e);
    return Napi::Value();
  }
  return env.Undefined();
}

void VfioDevice::FreeBlock(DmaBlock* b) {
  if (!b->buffer.IsEmpty()) {
    Napi::ArrayBuffer ab = b->buffer.Value();
    if (!ab.IsEmpty() && !ab.IsDetached()) ab.Detach();
    b->buffer.Reset();
  }
  if (b->host != nullptr) ShareDrop(b->share, b->host, b->size);  // munmap, now or after the last view
  b->host = nullptr;
}

// dmaFree(id): unmaps the block from the IOMMU if needed, detaches its ArrayBuffer (views become
// empty) and frees the memory. If the unmap fails the memory is kept (the device could still
// reach it) and SyscallError is thrown.
Napi::Value VfioDevice::DmaFree(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return Napi::Value();
  DmaBlock* b = BlockArg(info, 0);
  if (b == nullptr) return Napi::Value();
  int e = UnmapBlock(b);
  if (e != 0) {
    ThrowSyscallError(env, "VFIO_IOMMU_UNMAP_DMA", e);
    return Napi::Value();
  }
  FreeBlock(b);
  uint64_t id = static_cast<uint64_t>(info[0].As<Napi::Number>().DoubleValue());
  blocks_.erase(static_cast<uint32_t>(id));
  return env.Undefined();
}

// setMsix(fds: number[]): wires MSI-X vectors 0..fds.length-1 to the eventfds (VFIO_DEVICE_SET_IRQS,
// DATA_EVENTFD | ACTION_TRIGGER), which enables MSI-X on the device; [] disables MSI-X. A
// different count than the one enabled first disables MSI-X (VFIO cannot grow the set in place).
// RangeError beyond the device's vector count; SyscallError from the kernel.
Napi::Value VfioDevice::SetMsix(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return Napi::Value();
  if (info.Length() < 1 || !info[0].IsArray()) {
    ThrowTypeError(env, "expected an array of eventfds");
    return Napi::Value();
  }
  Napi::Array arr = info[0].As<Napi::Array>();
  const uint32_t n = arr.Length();
  struct vfio_irq_info irq = {};
  irq.argsz = sizeof(irq);
  irq.index = VFIO_PCI_MSIX_IRQ_INDEX;
  if (Ioctl(deviceFd_, VFIO_DEVICE_GET_IRQ_INFO, &irq) < 0) {
    ThrowSyscallError(env, "VFIO_DEVICE_GET_IRQ_INFO (MSI-X)", errno);
    return Napi::Value();
  }
  if (n > irq.count) {
    ThrowRangeError(env, ("the device has only " + std::to_string(irq.count) + " MSI-X vectors").c_str());
    return Napi::Value();
  }
  std::vector<int32_t> fds(n);
  for (uint32_t i = 0; i < n; i++) {
    Napi::Value v = arr.Get(i);
    double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
    if (!(d >= 0 && d <= 2147483647.0 && std::floor(d) == d)) {
      ThrowTypeError(env, "eventfds must be non-negative integers");
      return Napi::Value();
    }
    fds[i] = static_cast<int32_t>(d);
  }
  if (msixCount_ != 0 && (n == 0 || n != msixCount_)) {
    struct vfio_irq_set off = {};
    off.argsz = sizeof(off);
    off.flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
    off.index = VFIO_PCI_MSIX_IRQ_INDEX;
    off.start = 0;
    off.count = 0;
    if (Ioctl(deviceFd_, VFIO_DEVICE_SET_IRQS, &off) < 0) {
      ThrowSyscallError(env, "VFIO_DEVICE_SET_IRQS (MSI-X off)", errno);
      return Napi::Value();
    }
    msixCount_ = 0;
  }
  if (n == 0) return env.Undefined();
  std::vector<uint8_t> buf(sizeof(struct vfio_irq_set) + n * sizeof(int32_t));
  auto* set = reinterpret_cast<struct vfio_irq_set*>(buf.data());
  set->argsz = static_cast<uint32_t>(buf.size());
  set->flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
  set->index = VFIO_PCI_MSIX_IRQ_INDEX;
  set->start = 0;
  set->count = n;
  memcpy(set->data, fds.data(), n * sizeof(int32_t));
  if (Ioctl(deviceFd_, VFIO_DEVICE_SET_IRQS, set) < 0) {
    ThrowSyscallError(env, "VFIO_DEVICE_SET_IRQS (MSI-X eventfds)", errno);
    return Napi::Value();
  }
  msixCount_ = n;
  return env.Undefined();
}

// reset(): VFIO_DEVICE_RESET (function-level or other reset VFIO offers for the device).
Napi::Value VfioDevice::Reset(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return Napi::Value();
  if (IoctlVal(deviceFd_, VFIO_DEVICE_RESET, 0) < 0) {
    ThrowSyscallError(env, "VFIO_DEVICE_RESET", errno);
    return Napi::Value();
  }
  return env.Undefined();
}

// close(): MSI-X off, every DMA block unmapped and freed, BARs unmapped, fds closed. Idempotent.
Napi::Value VfioDevice::Close(const Napi::CallbackInfo& info) {
  CloseAll();
  return info.Env().Undefined();
}

void VfioDevice::CloseAll() {
  if (deviceFd_ >= 0 && msixCount_ != 0) {
    struct vfio_irq_set off = {};
    off.argsz = sizeof(off);
    off.flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
    off.index = VFIO_PCI_MSIX_IRQ_INDEX;
    Ioctl(deviceFd_, VFIO_DEVICE_SET_IRQS, &off);
    msixCount_ = 0;
  }
  for (auto& kv : guestMaps_) {
    if (containerFd_ < 0) break;
    struct vfio_iommu_type1_dma_unmap u = {};
    u.argsz = sizeof(u);
    u.iova = kv.first;
    u.size = kv.second;
    Ioctl(containerFd_, VFIO_IOMMU_UNMAP_DMA, &u);
  }
  guestMaps_.clear();
  for (auto& kv : blocks_) {
    // Closing the container below drops every IOMMU mapping anyway; unmap first regardless.
    if (containerFd_ >= 0) UnmapBlock(&kv.second);
    FreeBlock(&kv.second);
  }
  blocks_.clear();
  for (VfioBar& bar : bars_) {
    if (bar.base != nullptr) ShareDrop(bar.share, bar.base, bar.size);
    bar.base = nullptr;
    bar.size = 0;
  }
  if (deviceFd_ >= 0) close(deviceFd_);
  deviceFd_ = -1;
  if (groupFd_ >= 0) {
    if (open_) IoctlVal(groupFd_, VFIO_GROUP_UNSET_CONTAINER, 0);
    close(groupFd_);
  }
  groupFd_ = -1;
  if (containerFd_ >= 0) close(containerFd_);
  containerFd_ = -1;
  open_ = false;
}

}  // namespace rnull

namespace rnull {

// dmaMapGuest(memory: GuestMemory, region: number, iova: number): number
// VFIO_IOMMU_MAP_DMA of guest memory region `region` (device read+write), from the start of its
// first page to the end of its last page, at `iova` (page aligned). Returns the bytes mapped;
// the region's first byte is at iova + (its host address modulo the page size), which
// GuestMemory.regionLayout() reports as hostPageOffset.
Napi::Value VfioDevice::DmaMapGuest(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return Napi::Value();
  AddonData* data = env.GetInstanceData<AddonData>();
  if (info.Length() < 1 || !info[0].IsObject() || !info[0].As<Napi::Object>().InstanceOf(data->guestMemoryCtor.Value())) {
    ThrowTypeError(env, "dmaMapGuest: expected a GuestMemory");
    return Napi::Value();
  }
  GuestMemory* mem = GuestMemory::Unwrap(info[0].As<Napi::Object>());
  uint64_t index, iova;
  if (!ArgU64(info, 1, "region", 1u << 20, &index) || !ArgU64(info, 2, "iova", static_cast<uint64_t>(kMaxSafe), &iova)) return Napi::Value();
  if (!mem->mapped() || index >= mem->regions().size()) {
    ThrowRangeError(env, "dmaMapGuest: no such mapped guest memory region");
    return Napi::Value();
  }
  const GuestRegion& r = mem->regions()[index];
  uint64_t page = PageSize();
  uint64_t start = reinterpret_cast<uint64_t>(r.host) & ~(page - 1);
  uint64_t end = (reinterpret_cast<uint64_t>(r.host) + r.size + page - 1) & ~(page - 1);
  if (iova % page != 0 || iova + (end - start) < iova || iova + (end - start) > static_cast<uint64_t>(kMaxSafe)) {
    ThrowRangeError(env, "dmaMapGuest: iova must be page aligned");
    return Napi::Value();
  }
  if (guestMaps_.count(iova) != 0) {
    ThrowError(env, "dmaMapGuest: a guest region is already mapped at this iova");
    return Napi::Value();
  }
  struct vfio_iommu_type1_dma_map m = {};
  m.argsz = sizeof(m);
  m.flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
  m.vaddr = start;
  m.iova = iova;
  m.size = end - start;
  if (Ioctl(containerFd_, VFIO_IOMMU_MAP_DMA, &m) < 0) {
    ThrowSyscallError(env, "VFIO_IOMMU_MAP_DMA", errno);
    return Napi::Value();
  }
  guestMaps_[iova] = end - start;
  return Napi::Number::New(env, static_cast<double>(end - start));
}

// dmaUnmapGuest(iova: number): VFIO_IOMMU_UNMAP_DMA of what dmaMapGuest mapped at `iova`.
Napi::Value VfioDevice::DmaUnmapGuest(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return Napi::Value();
  uint64_t iova;
  if (!ArgU64(info, 0, "iova", static_cast<uint64_t>(kMaxSafe), &iova)) return Napi::Value();
  auto it = guestMaps_.find(iova);
  if (it == guestMaps_.end()) {
    ThrowRangeError(env, "dmaUnmapGuest: no guest region is mapped at this iova");
    return Napi::Value();
  }
  struct vfio_iommu_type1_dma_unmap u = {};
  u.argsz = sizeof(u);
  u.iova = it->first;
  u.size = it->second;
  guestMaps_.erase(it);
  if (Ioctl(containerFd_, VFIO_IOMMU_UNMAP_DMA, &u) < 0) {
    ThrowSyscallError(env, "VFIO_IOMMU_UNMAP_DMA", errno);
    return Napi::Value();
  }
  return env.Undefined();
}

}  // namespace rnull
