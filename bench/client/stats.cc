#include "stats.h"

#include <dirent.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

namespace vb {

void LatencyHistogram::merge(const LatencyHistogram& o) {
  for (unsigned i = 0; i < kBuckets; i++) counts_[i] += o.counts_[i];
  count_ += o.count_;
  sum_ += o.sum_;
  if (o.count_) {
    if (o.max_ > max_) max_ = o.max_;
    if (o.min_ < min_) min_ = o.min_;
  }
}

double LatencyHistogram::quantile_ns(double q) const {
  if (count_ == 0) return 0.0;
  uint64_t rank = uint64_t(std::ceil(q * double(count_)));
  if (rank < 1) rank = 1;
  if (rank > count_) rank = count_;
  uint64_t seen = 0;
  for (unsigned i = 0; i < kBuckets; i++) {
    seen += counts_[i];
    if (seen >= rank) {
      double mid = double(lower(i)) + double(width(i) - 1) / 2.0;
      if (mid > double(max_)) mid = double(max_);
      if (mid < double(min_)) mid = double(min_);
      return mid;
    }
  }
  return double(max_);
}

void QueueCounters::add(const QueueCounters& o) {
  ios += o.ios;
  reads += o.reads;
  writes += o.writes;
  bytes += o.bytes;
  st_ok += o.st_ok;
  st_ioerr += o.st_ioerr;
  st_unsupp += o.st_unsupp;
  st_other += o.st_other;
  total_completions += o.total_completions;
  used_len_unexpected += o.used_len_unexpected;
  kicks += o.kicks;
  kick_checks += o.kick_checks;
  waits += o.waits;
  wakeups += o.wakeups;
  verify_checked += o.verify_checked;
  verify_mismatches += o.verify_mismatches;
  verify_unwritten += o.verify_unwritten;
  readback_ios += o.readback_ios;
  if (o.last_completion_ns > last_completion_ns) last_completion_ns = o.last_completion_ns;
}

long clock_ticks_per_sec() { return sysconf(_SC_CLK_TCK); }

static bool read_file(const std::string& path, std::string& out) {
  std::ifstream f(path);
  if (!f) return false;
  std::stringstream ss;
  ss << f.rdbuf();
  out = ss.str();
  return true;
}

CpuSample sample_process_cpu(int pid) {
  CpuSample s;
  if (pid <= 0) return s;
  std::string text;
  const std::string base = "/proc/" + std::to_string(pid);
  if (read_file(base + "/stat", text)) {
    // Fields after the command name (which may contain spaces) start at field 3 (state);
    // utime and stime are fields 14 and 15.
    size_t rp = text.rfind(')');
    if (rp != std::string::npos) {
      std::istringstream is(text.substr(rp + 2));
      std::string field;
      uint64_t utime = 0, stime = 0;
      for (int i = 3; i <= 15 && (is >> field); i++) {
        if (i == 14) utime = std::strtoull(field.c_str(), nullptr, 10);
        if (i == 15) stime = std::strtoull(field.c_str(), nullptr, 10);
      }
      s.stat_ticks = utime + stime;
      s.stime_ticks = stime;
      s.ok = true;
    }
  }
  DIR* d = opendir((base + "/task").c_str());
  if (d != nullptr) {
    uint64_t total = 0;
    int n = 0;
    bool any = false;
    while (dirent* e = readdir(d)) {
      if (e->d_name[0] == '.') continue;
      std::string st;
      if (!read_file(base + "/task/" + e->d_name + "/schedstat", st)) continue;
      const uint64_t ns = std::strtoull(st.c_str(), nullptr, 10);
      total += ns;
      if (std::to_string(pid) == e->d_name) s.main_schedstat_ns = ns;
      n++;
      any = true;
    }
    closedir(d);
    s.schedstat_ok = any;
    s.schedstat_ns = total;
    s.threads = n;
  }
  return s;
}

uint64_t self_cpu_ns() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  auto ns = [](const timeval& tv) { return uint64_t(tv.tv_sec) * 1000000000ull + uint64_t(tv.tv_usec) * 1000ull; };
  return ns(ru.ru_utime) + ns(ru.ru_stime);
}

}  // namespace vb
