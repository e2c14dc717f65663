#include "options.h"

#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <cerrno>
#include <unistd.h>

#include "common.h"

namespace vb {

namespace {

const char* kHelp =
    "vhost-bench: a vhost-user-blk front-end load generator\n"
    "\n"
    "  --socket PATH          vhost-user socket of the back-end (required)\n"
    "  --queues N             virtqueues, one thread each (default 1)\n"
    "  --qd N                 requests in flight per queue (default 32)\n"
    "  --bs BYTES             request size, a multiple of 512 and of the disk block size (default 4096)\n"
    "  --rw MODE              randread|randwrite|read|write|randrw (default randread)\n"
    "  --mix PCT              reads in percent for randrw (default 50)\n"
    "  --runtime SEC          measured time (default 5)\n"
    "  --ios N                instead of --runtime: total I/Os submitted after the ramp\n"
    "  --ramp SEC             warm-up before measuring (default 0)\n"
    "  --wait call|poll       sleep on the call eventfd, or busy-poll the used ring (default call)\n"
    "  --event-idx on|off     negotiate VIRTIO_F_RING_EVENT_IDX (default on)\n"
    "  --inflight on|off      negotiate VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD when offered, as QEMU does (default on)\n"
    "  --ring-size N          virtqueue size, power of two (default 256)\n"
    "  --indirect on|off|auto indirect descriptor tables; auto = only when 3*qd > ring size (default auto)\n"
    "  --pin CPULIST          pin queue thread i to the i-th cpu of the list (wraps), e.g. 1 or 2,3 or 0-3\n"
    "  --backend-pid PID      back-end process to charge CPU time to (us per I/O)\n"
    "  --verify               write an lba+generation pattern and check every read (one disk region per queue)\n"
    "  --json FILE            write the results as JSON\n"
    "  --timeout-ms N         longest wait for a completion or a reply before declaring a stall (default 5000)\n"
    "  --disk-size BYTES      limit the offset range (default: capacity from GET_CONFIG)\n"
    "  --seed N               random seed (default: from the clock)\n"
    "  --config-size N        GET_CONFIG size in bytes (default 60, >= 40)\n"
    "  --quiet                no human-readable summary\n"
    "\n"
    "Exit status: 0 ok; 1 set-up or protocol failure; 2 I/O errors or verify mismatches; 3 stall.\n";

uint64_t parse_u64(const std::string& flag, const std::string& v, uint64_t lo, uint64_t hi) {
  char* end = nullptr;
  errno = 0;
  unsigned long long x = std::strtoull(v.c_str(), &end, 0);
  if (v.empty() || *end != '\0' || errno != 0 || v[0] == '-') throw Error(flag + " expects a whole number, got \"" + v + "\"");
  if (x < lo || x > hi) throw Error(flag + " must be from " + std::to_string(lo) + " to " + std::to_string(hi) + ", got " + v);
  return x;
}

double parse_seconds(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end != '\0' || !(x >= 0) || x > 86400) throw Error(flag + " expects seconds (0 to 86400), got \"" + v + "\"");
  return x;
}

bool parse_onoff(const std::string& flag, const std::string& v) {
  if (v == "on" || v == "1" || v == "true") return true;
  if (v == "off" || v == "0" || v == "false") return false;
  throw Error(flag + " expects on or off, got \"" + v + "\"");
}

}  // namespace

const char* rw_name(RwMode m) {
  switch (m) {
    case RwMode::RandRead: return "randread";
    case RwMode::RandWrite: return "randwrite";
    case RwMode::Read: return "read";
    case RwMode::Write: return "write";
    case RwMode::RandRw: return "randrw";
  }
  return "?";
}

std::vector<int> parse_cpulist(const std::string& s) {
  std::vector<int> cpus;
  size_t i = 0;
  while (i < s.size()) {
    size_t comma = s.find(',', i);
    std::string part = s.substr(i, comma == std::string::npos ? std::string::npos : comma - i);
    size_t dash = part.find('-');
    if (dash == std::string::npos) {
      cpus.push_back(int(parse_u64("--pin", part, 0, 4095)));
    } else {
      int a = int(parse_u64("--pin", part.substr(0, dash), 0, 4095));
      int b = int(parse_u64("--pin", part.substr(dash + 1), 0, 4095));
      if (b < a) throw Error("--pin: bad range " + part);
      for (int c = a; c <= b; c++) cpus.push_back(c);
    }
    if (comma == std::string::npos) break;
    i = comma + 1;
  }
  if (cpus.empty()) throw Error("--pin expects a cpu list, got \"" + s + "\"");
  return cpus;
}

Options parse_options(int argc, char** argv) {
  Options o;
  bool have_runtime = false;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::fputs(kHelp, stdout);
      std::exit(0);
    }
    if (a.rfind("--", 0) != 0) throw Error("unexpected argument \"" + a + "\" (see --help)");
    std::string name = a, value;
    bool has_value = false;
    size_t eq = a.find('=');
    if (eq != std::string::npos) {
      name = a.substr(0, eq);
      value = a.substr(eq + 1);
      has_value = true;
    }
    auto need = [&]() -> std::string {
      if (has_value) return value;
      if (i + 1 >= argc) throw Error(name + " needs a value");
      return argv[++i];
    };
    if (name == "--verify") {
      o.verify = true;
    } else if (name == "--quiet") {
      o.quiet = true;
    } else if (name == "--socket") {
      o.socket = need();
    } else if (name == "--queues") {
      o.queues = uint32_t(parse_u64(name, need(), 1, 64));
    } else if (name == "--qd") {
      o.qd = uint32_t(parse_u64(name, need(), 1, 1024));
    } else if (name == "--bs") {
      o.bs = uint32_t(parse_u64(name, need(), 512, 16u << 20));
      if (o.bs % 512 != 0) throw Error("--bs must be a multiple of 512");
    } else if (name == "--rw") {
      std::string v = need();
      if (v == "randread") o.rw = RwMode::RandRead;
      else if (v == "randwrite") o.rw = RwMode::RandWrite;
      else if (v == "read") o.rw = RwMode::Read;
      else if (v == "write") o.rw = RwMode::Write;
      else if (v == "randrw") o.rw = RwMode::RandRw;
      else throw Error("--rw expects randread, randwrite, read, write or randrw, got \"" + v + "\"");
    } else if (name == "--mix") {
      o.mix = uint32_t(parse_u64(name, need(), 0, 100));
    } else if (name == "--runtime") {
      o.runtime_s = parse_seconds(name, need());
      have_runtime = true;
    } else if (name == "--ios") {
      o.ios = parse_u64(name, need(), 1, UINT64_MAX / 2);
    } else if (name == "--ramp") {
      o.ramp_s = parse_seconds(name, need());
    } else if (name == "--wait") {
      std::string v = need();
      if (v == "call") o.wait = WaitMode::Call;
      else if (v == "poll") o.wait = WaitMode::Poll;
      else throw Error("--wait expects call or poll, got \"" + v + "\"");
    } else if (name == "--event-idx") {
      o.event_idx = parse_onoff(name, need());
    } else if (name == "--inflight") {
      o.inflight = parse_onoff(name, need());
    } else if (name == "--ring-size") {
      o.ring_size = uint32_t(parse_u64(name, need(), 1, 32768));
      if (!is_pow2(o.ring_size)) throw Error("--ring-size must be a power of two");
    } else if (name == "--indirect") {
      std::string v = need();
      if (v == "auto") o.indirect = Indirect::Auto;
      else o.indirect = parse_onoff(name, v) ? Indirect::On : Indirect::Off;
    } else if (name == "--pin") {
      o.pin = parse_cpulist(need());
    } else if (name == "--backend-pid") {
      o.backend_pid = int(parse_u64(name, need(), 1, 1u << 30));
    } else if (name == "--json") {
      o.json_path = need();
    } else if (name == "--timeout-ms") {
      o.timeout_ms = int(parse_u64(name, need(), 1, 3600000));
    } else if (name == "--disk-size") {
      o.disk_size = parse_u64(name, need(), 512, UINT64_MAX / 2);
    } else if (name == "--seed") {
      o.seed = parse_u64(name, need(), 0, UINT64_MAX);
    } else if (name == "--config-size") {
      o.config_size = uint32_t(parse_u64(name, need(), 40, 256));
    } else {
      throw Error("unknown option " + name + " (see --help)");
    }
  }
  if (o.socket.empty()) throw Error("--socket is required (see --help)");
  if (o.ios != 0 && have_runtime) throw Error("give --runtime or --ios, not both");
  if (o.ios == 0 && o.runtime_s <= 0) throw Error("--runtime must be more than 0");
  if (o.use_indirect()) {
    if (o.qd > o.ring_size) throw Error("--qd " + std::to_string(o.qd) + " exceeds --ring-size " + std::to_string(o.ring_size));
  } else if (3ull * o.qd > o.ring_size) {
    throw Error("--qd " + std::to_string(o.qd) + " needs " + std::to_string(3 * o.qd) + " descriptors: raise --ring-size or use --indirect on");
  }
  if (o.seed == 0) o.seed = uint64_t(time(nullptr)) * 2654435761ull ^ uint64_t(getpid());
  return o;
}

}  // namespace vb
