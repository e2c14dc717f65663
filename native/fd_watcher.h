// FdWatcher: calls a JS function whenever an fd becomes readable, on the event loop of the
// thread that created it (libuv uv_poll). Used for the listening socket, the connection and
// every kick eventfd. The watcher keeps itself alive (a strong reference) while it is
// started, so a watcher the JS side dropped can never fire into a collected object.
#pragma once
#include <napi.h>
#include <uv.h>

namespace rnull {

class FdWatcher : public Napi::ObjectWrap<FdWatcher> {
 public:
  static void Init(Napi::Env env, Napi::Object exports);
  explicit FdWatcher(const Napi::CallbackInfo& info);
  ~FdWatcher() override;

 private:
  // new FdWatcher(fd, callback, drainEventfd): with drainEventfd the counter is read (reset)
  // before callback() runs, so one callback answers any number of kicks. callback(status):
  // 0, or a negative libuv error code (UV_EOF for a drained fd that hung up or read 0 bytes);
  // a drained fd is no longer watched once its callback got a non-zero status.
  // start() sets O_NONBLOCK on fd (other flags kept), so no read can block the thread.
  Napi::Value Start(const Napi::CallbackInfo& info);
  Napi::Value Stop(const Napi::CallbackInfo& info);
  void StopPolling();
  void ClosePoll();
  static void OnEnvCleanup(void* arg);
  static void OnPoll(uv_poll_t* handle, int status, int events);
  static void OnClose(uv_handle_t* handle);
  ssize_t ReadNoWait(uint64_t* v);

  int fd_;
  bool drainEventfd_;
  bool active_ = false;
  bool noNowait_ = false;  // preadv2(RWF_NOWAIT) is not supported for this fd
  uv_poll_t* poll_ = nullptr;
  Napi::FunctionReference callback_;
  Napi::AsyncContext* asyncContext_ = nullptr;
};

}  // namespace rnull
