// Command-line options of vhost-bench (long flags only: --name value or --name=value).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace vb {

enum class RwMode { RandRead, RandWrite, Read, Write, RandRw };
enum class WaitMode { Call, Poll };
enum class Indirect { Off, On, Auto };

struct Options {
  std::string socket;
  uint32_t queues = 1;
  uint32_t qd = 32;
  uint32_t bs = 4096;
  RwMode rw = RwMode::RandRead;
  uint32_t mix = 50;  // % reads for randrw
  double runtime_s = 5.0;
  uint64_t ios = 0;  // total I/Os after the ramp; 0 = run for runtime_s
  double ramp_s = 0.0;
  WaitMode wait = WaitMode::Call;
  bool event_idx = true;
  // Negotiate VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD when offered (as QEMU does): the back-end then
  // tracks every request in the inflight region.
  bool inflight = true;
  uint32_t ring_size = 256;
  Indirect indirect = Indirect::Auto;
  std::vector<int> pin;  // cpu per queue thread (wraps)
  int backend_pid = 0;
  bool verify = false;
  std::string json_path;
  int timeout_ms = 5000;
  uint64_t disk_size = 0;  // bytes; 0 = capacity from GET_CONFIG
  uint64_t seed = 0;       // 0 = from time
  uint32_t config_size = 60;
  bool quiet = false;

  bool use_indirect() const { return indirect == Indirect::On || (indirect == Indirect::Auto && 3ull * qd > ring_size); }
};

const char* rw_name(RwMode m);
// Parses argv; throws Error with a message naming the bad flag. Prints help and exits for --help.
Options parse_options(int argc, char** argv);
std::vector<int> parse_cpulist(const std::string& s);

}  // namespace vb
