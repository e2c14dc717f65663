#include "affinity.h"

#include <errno.h>
#include <sched.h>

#include "errors.h"

namespace rnull {
namespace {

// CPU numbers are below CPU_SETSIZE (1024) in the fixed cpu_set_t used here.
constexpr int64_t kMaxCpu = CPU_SETSIZE - 1;

// setThreadAffinity(cpus): the calling thread may run only on these CPUs (a non-empty array of
// CPU numbers, 0 to 1023). RangeError for an empty list or a number outside that range;
// SyscallError from sched_setaffinity (EINVAL: none of them is allowed to this thread by its
// cpuset, or none is online).
Napi::Value SetThreadAffinity(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsArray()) {
    ThrowTypeError(env, "expected (cpus: number[])");
    return Napi::Value();
  }
  Napi::Array list = info[0].As<Napi::Array>();
  if (list.Length() == 0) {
    ThrowRangeError(env, "cpus is empty");
    return Napi::Value();
  }
  cpu_set_t set;
  CPU_ZERO(&set);
  for (uint32_t i = 0; i < list.Length(); i++) {
    Napi::Value v = list.Get(i);
    if (!v.IsNumber()) {
      ThrowTypeError(env, "cpus must hold numbers");
      return Napi::Value();
    }
    double d = v.As<Napi::Number>().DoubleValue();
    if (!(d >= 0 && d <= static_cast<double>(kMaxCpu)) || d != static_cast<double>(static_cast<int64_t>(d))) {
      ThrowRangeError(env, "a CPU number must be a whole number from 0 to 1023");
      return Napi::Value();
    }
    CPU_SET(static_cast<int>(d), &set);
  }
  if (::sched_setaffinity(0, sizeof set, &set) < 0) ThrowSyscallError(env, "sched_setaffinity", errno);
  return env.Undefined();
}

// threadAffinity(): the CPUs the calling thread may run on, ascending. SyscallError from
// sched_getaffinity.
Napi::Value ThreadAffinity(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof set, &set) < 0) {
    ThrowSyscallError(env, "sched_getaffinity", errno);
    return Napi::Value();
  }
  Napi::Array out = Napi::Array::New(env);
  uint32_t n = 0;
  for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
    if (CPU_ISSET(cpu, &set)) out.Set(n++, Napi::Number::New(env, cpu));
  }
  return out;
}

}  // namespace

void InitAffinity(Napi::Env env, Napi::Object exports) {
  exports.Set("setThreadAffinity", Napi::Function::New(env, SetThreadAffinity, "setThreadAffinity"));
  exports.Set("threadAffinity", Napi::Function::New(env, ThreadAffinity, "threadAffinity"));
}

}  // namespace rnull
