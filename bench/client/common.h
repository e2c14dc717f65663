// Small shared helpers for vhost-bench: monotonic time, errors, byte alignment.
#pragma once

#include <cstdint>
#include <cstring>
#include <ctime>
#include <stdexcept>
#include <string>

namespace vb {

// Thrown for any set-up or protocol failure; main() prints it and exits non-zero.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// "what: strerror(errno)" as an Error.
Error sys_error(const std::string& what, int err);

// Pins the calling thread to `cpu`; returns 0 or the errno of the failure.
int pin_current_thread(int cpu);

inline uint64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1000000000ull + uint64_t(ts.tv_nsec);
}

inline uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

inline bool is_pow2(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

}  // namespace vb
