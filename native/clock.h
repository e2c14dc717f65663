// The monotonic clock and the busy-wait hint shared by the virtqueues' polling spin
// (virtqueue.cc) and the request timer's spin (timer.cc).
#pragma once
#include <stdint.h>
#include <time.h>

namespace rnull {

// CLOCK_MONOTONIC in nanoseconds (the vDSO: no system call).
inline uint64_t MonotonicNowNs() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

// One iteration of a busy-wait: tells the CPU this is a spin loop (x86 PAUSE, Arm YIELD).
inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

}  // namespace rnull
