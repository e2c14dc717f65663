// rnull_native: the small native shim of rnull. It does only what JavaScript cannot do well:
// the unix socket with fd passing, mmap of guest memory, fd watching, eventfds, the split
// virtqueue walk that needs memory barriers, and the page store of memory-backed disks, which
// worker threads share (JavaScript has no shared mutable map). Everything else lives in TypeScript (src/).
#include <napi.h>

#include "affinity.h"
#include "errors.h"
#include "fd_ops.h"
#include "fd_watcher.h"
#include "guest_memory.h"
#include "page_store.h"
#include "sd_notify.h"
#include "socket.h"
#include "socket_info.h"
#include "timer.h"
#include "virtqueue.h"
#include "vfio.h"

namespace rnull {

// initialize(SyscallError): registers the JS error class thrown for failed syscalls.
static Napi::Value Initialize(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsFunction()) {
    ThrowTypeError(info.Env(), "expected the SyscallError class");
    return Napi::Value();
  }
  AddonData* data = info.Env().GetInstanceData<AddonData>();
  data->syscallError = Napi::Persistent(info[0].As<Napi::Function>());
  return info.Env().Undefined();
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  AddonData* data = new AddonData();
  env.SetInstanceData(data);
  exports.Set("initialize", Napi::Function::New(env, Initialize, "initialize"));
  InitFdOps(env, exports);
  InitSocket(env, exports);
  FdWatcher::Init(env, exports);
  GuestMemory::Init(env, exports, &data->guestMemoryCtor);
  Virtqueue::Init(env, exports);
  Timer::Init(env, exports);
  PageStore::Init(env, exports);
  VfioDevice::Init(env, exports);
  InitSdNotify(env, exports);
  InitSocketInfo(env, exports);
  InitAffinity(env, exports);
  return exports;
}

}  // namespace rnull

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) { return rnull::Init(env, exports); }

NODE_API_MODULE(rnull_native, InitModule)
