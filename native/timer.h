// Timer: a CLOCK_MONOTONIC timerfd armed at absolute deadlines, for completions that must
// happen microseconds after submission (null_blk's timer mode, completion_nsec) — Node's own
// timers have a 1 ms granularity. The fd is watched with an FdWatcher (drainEventfd: the
// expiration count is read like an eventfd's counter).
#pragma once
#include <napi.h>

namespace rnull {

class Timer : public Napi::ObjectWrap<Timer> {
 public:
  static void Init(Napi::Env env, Napi::Object exports);
  explicit Timer(const Napi::CallbackInfo& info);
  ~Timer() override;

 private:
  Napi::Value Fd(const Napi::CallbackInfo& info);
  Napi::Value Arm(const Napi::CallbackInfo& info);
  Napi::Value Disarm(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);
  int fd_ = -1;
};

}  // namespace rnull
