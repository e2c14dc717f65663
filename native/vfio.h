// VfioDevice: one PCI device owned through VFIO (type1 IOMMU), for the user-space NVMe driver.
//
// Only what JavaScript cannot do lives here: the VFIO ioctls, the BAR mmap with ordered 32/64-bit
// MMIO accesses, PCI config space access through the config region, page-aligned DMA memory
// (anonymous mmap, exposed to JS as external ArrayBuffers) mapped into the IOMMU at IOVAs the
// caller chooses, and MSI-X vectors wired to eventfds. Everything NVMe-specific is TypeScript
// (drivers/nvme/).
//
// Invariants:
// - while open_, containerFd_/groupFd_/deviceFd_ are valid and the group is attached to the
//   container with the IOMMU type set;
// - every BAR in bars_ is mapped for its whole region size;
// - a DmaBlock's ArrayBuffer is detached before its memory is unmapped, so JS can never touch
//   freed memory; a mapped block is unmapped from the IOMMU before its memory is freed;
// - DMA blocks and BARs are also registered as process-wide shares (by id) that worker threads
//   reach without the device object: views of a DMA block (vfioShareView) keep its memory
//   mapped until the last view is collected; MMIO through a share (vfioShareRead32/Write32)
//   takes the registry lock, so a BAR is never unmapped under an access; after close() such
//   accesses throw;
// - close() (or the destructor) disables MSI-X, unmaps and frees every block, unmaps the BARs and
//   closes the fds; after it every method throws.
#pragma once
#include <napi.h>
#include <stdint.h>

#include <map>
#include <vector>

namespace rnull {

struct VfioBar {
  uint8_t* base = nullptr;
  uint64_t size = 0;
  uint32_t share = 0;  // process-wide share id (worker threads reach the BAR by it)
};

struct DmaBlock {
  uint8_t* host = nullptr;
  uint64_t size = 0;
  bool mapped = false;
  uint64_t iova = 0;
  uint32_t share = 0;  // process-wide share id (worker threads map views of it)
  Napi::Reference<Napi::ArrayBuffer> buffer;
};

class VfioDevice : public Napi::ObjectWrap<VfioDevice> {
 public:
  static void Init(Napi::Env env, Napi::Object exports);
  explicit VfioDevice(const Napi::CallbackInfo& info);
  ~VfioDevice() override;

 private:
  Napi::Value Info(const Napi::CallbackInfo& info);
  Napi::Value IommuInfo(const Napi::CallbackInfo& info);
  Napi::Value RegionInfo(const Napi::CallbackInfo& info);
  Napi::Value IrqCount(const Napi::CallbackInfo& info);
  Napi::Value MapBar(const Napi::CallbackInfo& info);
  Napi::Value BarShare(const Napi::CallbackInfo& info);
  Napi::Value Read32(const Napi::CallbackInfo& info);
  Napi::Value Write32(const Napi::CallbackInfo& info);
  Napi::Value Read64(const Napi::CallbackInfo& info);
  Napi::Value Write64(const Napi::CallbackInfo& info);
  Napi::Value ConfigRead(const Napi::CallbackInfo& info);
  Napi::Value ConfigWrite(const Napi::CallbackInfo& info);
  Napi::Value DmaAlloc(const Napi::CallbackInfo& info);
  Napi::Value DmaMap(const Napi::CallbackInfo& info);
  Napi::Value DmaUnmap(const Napi::CallbackInfo& info);
  Napi::Value DmaFree(const Napi::CallbackInfo& info);
  Napi::Value DmaMapGuest(const Napi::CallbackInfo& info);
  Napi::Value DmaUnmapGuest(const Napi::CallbackInfo& info);
  Napi::Value SetMsix(const Napi::CallbackInfo& info);
  Napi::Value Reset(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);

  bool CheckOpen(Napi::Env env);
  // The mapped BAR and offset for an access of `width` bytes, or nullptr after throwing.
  uint8_t* MmioAddr(const Napi::CallbackInfo& info, uint32_t width);
  DmaBlock* BlockArg(const Napi::CallbackInfo& info, size_t i);
  int UnmapBlock(DmaBlock* b);
  void FreeBlock(DmaBlock* b);
  void CloseAll();
  void FailOpen(Napi::Env env, const std::string& what);

  bool open_ = false;
  int containerFd_ = -1;
  int groupFd_ = -1;
  int deviceFd_ = -1;
  int iommuType_ = 0;
  uint32_t numRegions_ = 0;
  uint32_t numIrqs_ = 0;
  uint32_t msixCount_ = 0;  // vectors currently wired to eventfds
  uint64_t configOffset_ = 0;
  uint64_t configSize_ = 0;
  std::vector<VfioBar> bars_;
  std::map<uint32_t, DmaBlock> blocks_;
  uint32_t nextBlockId_ = 1;
  // Guest memory regions mapped for DMA (dmaMapGuest): IOVA -> bytes. The pages stay pinned by
  // the IOMMU mapping until unmapped, even if the front-end's table is unmapped first.
  std::map<uint64_t, uint64_t> guestMaps_;
};

}  // namespace rnull
