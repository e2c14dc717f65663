#include "timer.h"

#include <errno.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "errors.h"

namespace rnull {

namespace {
// CLOCK_MONOTONIC as a double: exact for 104 days of uptime.
double NowNs() { return static_cast<double>(MonotonicNowNs()); }

// monotonicNs(): CLOCK_MONOTONIC in nanoseconds, as a double (exact for 104 days of uptime).
Napi::Value MonotonicNs(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), NowNs()); }

// spinUntil(deadlineNs, maxNs): busy-waits until CLOCK_MONOTONIC reaches deadlineNs or maxNs
// have passed, whichever is first, and returns the time then. The caller bounds maxNs by its
// poll budget (block/request-timer.ts): this never sleeps, so the thread is busy meanwhile.
Napi::Value SpinUntil(const Napi::CallbackInfo& info) {
  double deadline, maxNs;
  if (!ArgNumber(info, 0, "deadlineNs", &deadline) || !ArgNumber(info, 1, "maxNs", &maxNs)) return Napi::Value();
  if (!(maxNs >= 0 && maxNs <= 1e9)) {
    ThrowRangeError(info.Env(), "maxNs must be 0 to 1e9");
    return Napi::Value();
  }
  double now = NowNs();
  double end = now + maxNs;
  if (deadline < end) end = deadline;
  while (now < end) {
    CpuRelax();
    now = NowNs();
  }
  return Napi::Number::New(info.Env(), now);
}
}  // namespace

void Timer::Init(Napi::Env env, Napi::Object exports) {
  Napi::Function f = DefineClass(env, "Timer",
                                 {InstanceAccessor<&Timer::Fd>("fd"), InstanceMethod<&Timer::Arm>("arm"),
                                  InstanceMethod<&Timer::Disarm>("disarm"), InstanceMethod<&Timer::Close>("close")});
  exports.Set("Timer", f);
  exports.Set("monotonicNs", Napi::Function::New(env, MonotonicNs, "monotonicNs"));
  exports.Set("spinUntil", Napi::Function::New(env, SpinUntil, "spinUntil"));
}

// new Timer(): a non-blocking, close-on-exec CLOCK_MONOTONIC timerfd, disarmed.
Timer::Timer(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Timer>(info) {
  fd_ = ::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (fd_ < 0) ThrowSyscallError(info.Env(), "timerfd_create", errno);
}

Timer::~Timer() {
  if (fd_ >= 0) ::close(fd_);
}

Napi::Value Timer::Fd(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), fd_); }

// arm(deadlineNs): fires once at that CLOCK_MONOTONIC time (monotonicNs() units); a deadline
// in the past fires at once. Re-arming replaces the previous deadline.
Napi::Value Timer::Arm(const Napi::CallbackInfo& info) {
  double ns;
  if (!ArgNumber(info, 0, "deadlineNs", &ns)) return Napi::Value();
  if (fd_ < 0) {
    ThrowError(info.Env(), "timer is closed");
    return Napi::Value();
  }
  if (!(ns >= 1)) ns = 1;  // 0 would disarm; any past time fires at once
  struct itimerspec its = {};
  its.it_value.tv_sec = static_cast<time_t>(ns / 1e9);
  its.it_value.tv_nsec = static_cast<long>(ns - static_cast<double>(its.it_value.tv_sec) * 1e9);
  if (its.it_value.tv_nsec < 0) its.it_value.tv_nsec = 0;
  if (its.it_value.tv_nsec >= 1000000000L) its.it_value.tv_nsec = 999999999L;
  if (::timerfd_settime(fd_, TFD_TIMER_ABSTIME, &its, nullptr) < 0) ThrowSyscallError(info.Env(), "timerfd_settime", errno);
  return info.Env().Undefined();
}

// disarm(): cancels the pending expiration, if any.
Napi::Value Timer::Disarm(const Napi::CallbackInfo& info) {
  if (fd_ >= 0) {
    struct itimerspec its = {};
    ::timerfd_settime(fd_, 0, &its, nullptr);
  }
  return info.Env().Undefined();
}

// close(): closes the timerfd (stop its watcher first); idempotent.
Napi::Value Timer::Close(const Napi::CallbackInfo& info) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  return info.Env().Undefined();
}

}  // namespace rnull
