#include "fd_watcher.h"

#include <errno.h>
#include <stdint.h>
#include <unistd.h>

#include "errors.h"

namespace rnull {

void FdWatcher::Init(Napi::Env env, Napi::Object exports) {
  Napi::Function ctor = DefineClass(env, "FdWatcher",
                                    {InstanceMethod<&FdWatcher::Start>("start"), InstanceMethod<&FdWatcher::Stop>("stop")});
  exports.Set("FdWatcher", ctor);
}

FdWatcher::FdWatcher(const Napi::CallbackInfo& info) : Napi::ObjectWrap<FdWatcher>(info) {
  Napi::Env env = info.Env();
  int64_t fd;
  if (!ArgInt(info, 0, "fd", &fd)) return;
  if (info.Length() < 2 || !info[1].IsFunction()) {
    ThrowTypeError(env, "expected a function for callback");
    return;
  }
  fd_ = static_cast<int>(fd);
  drainEventfd_ = info.Length() > 2 && info[2].ToBoolean().Value();
  callback_ = Napi::Persistent(info[1].As<Napi::Function>());
  asyncContext_ = new Napi::AsyncContext(env, "rnull:FdWatcher");
}

FdWatcher::~FdWatcher() {
  // Only reached once stopped (a started watcher holds a strong reference to itself).
  delete asyncContext_;
}

// start(): begins watching; idempotent.
Napi::Value FdWatcher::Start(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (active_) return env.Undefined();
  uv_loop_t* loop = nullptr;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok) {
    ThrowError(env, "no event loop");
    return Napi::Value();
  }
  poll_ = new uv_poll_t;
  int r = uv_poll_init(loop, poll_, fd_);
  if (r == 0) {
    poll_->data = this;
    r = uv_poll_start(poll_, UV_READABLE | UV_DISCONNECT, OnPoll);
    if (r != 0) uv_close(reinterpret_cast<uv_handle_t*>(poll_), OnClose);
  } else {
    delete poll_;
  }
  if (r != 0) {
    poll_ = nullptr;
    ThrowSyscallError(env, "uv_poll_start", -r);
    return Napi::Value();
  }
  active_ = true;
  Ref();
  napi_add_env_cleanup_hook(env, OnEnvCleanup, this);
  return env.Undefined();
}

// stop(): stops watching (does not close the fd); idempotent; safe inside the callback.
Napi::Value FdWatcher::Stop(const Napi::CallbackInfo& info) {
  StopPolling();
  return info.Env().Undefined();
}

void FdWatcher::StopPolling() {
  if (!active_) return;
  napi_remove_env_cleanup_hook(Env(), OnEnvCleanup, this);
  ClosePoll();
  Unref();
}

void FdWatcher::ClosePoll() {
  active_ = false;
  uv_poll_stop(poll_);
  uv_close(reinterpret_cast<uv_handle_t*>(poll_), OnClose);
  poll_ = nullptr;
}

// The environment ends (a worker thread terminated, or the process exiting) with the watcher
// still started: its handle must be closed, or Node aborts on closing the thread's loop.
void FdWatcher::OnEnvCleanup(void* arg) {
  FdWatcher* self = static_cast<FdWatcher*>(arg);
  if (self->active_) self->ClosePoll();
}

void FdWatcher::OnClose(uv_handle_t* handle) { delete reinterpret_cast<uv_poll_t*>(handle); }

void FdWatcher::OnPoll(uv_poll_t* handle, int status, int events) {
  FdWatcher* self = static_cast<FdWatcher*>(handle->data);
  if (!self->active_) return;
  if (self->drainEventfd_) {
    uint64_t v;
    while (::read(self->fd_, &v, sizeof v) < 0 && errno == EINTR) {
    }
  }
  Napi::Env env = self->Env();
  Napi::HandleScope scope(env);
  // Errors (a poll error, or UV_DISCONNECT) are reported as the callback's argument; the JS side
  // decides (a connection closes, a kick fd is dropped).
  Napi::Value arg = status < 0 ? Napi::Number::New(env, status) : Napi::Number::New(env, 0);
  self->callback_.MakeCallback(self->Value(), {arg}, *self->asyncContext_);
}

}  // namespace rnull
