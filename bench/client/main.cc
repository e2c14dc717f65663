// vhost-bench: drives a vhost-user-blk back-end the way a guest driver would (split rings in
// shared memory, eventfd kicks and calls) and reports IOPS, latency quantiles, errors by
// status, data verification and the back-end's CPU time per I/O.
//
// main(): options, the vhost-user handshake, memory and ring set-up, the run (one thread per
// queue), then the report.
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common.h"
#include "guest_memory.h"
#include "json_writer.h"
#include "options.h"
#include "queue_worker.h"
#include "stats.h"
#include "vhost_user.h"
#include "workload.h"

using namespace vb;

namespace {

// virtio feature bits this front-end knows.
constexpr unsigned F_BLK_SEG_MAX = 2;
constexpr unsigned F_BLK_RO = 5;
constexpr unsigned F_BLK_BLK_SIZE = 6;
constexpr unsigned F_BLK_FLUSH = 9;
constexpr unsigned F_BLK_TOPOLOGY = 10;
constexpr unsigned F_BLK_MQ = 12;
constexpr unsigned F_RING_INDIRECT_DESC = 28;
constexpr unsigned F_RING_EVENT_IDX = 29;
constexpr unsigned F_PROTOCOL_FEATURES = 30;
constexpr unsigned F_VERSION_1 = 32;

constexpr uint64_t kGpaBase = 0x100000000ull;  // guest-physical address of our memory (4 GiB)

inline uint64_t bit(unsigned b) { return 1ull << b; }

std::string hex(uint64_t v) {
  char b[32];
  std::snprintf(b, sizeof(b), "0x%" PRIx64, v);
  return b;
}

struct Device {
  uint64_t features_offered = 0, features_acked = 0;
  uint64_t proto_offered = 0, proto_acked = 0;
  uint64_t queues_supported = 1;
  uint64_t capacity_sectors = 0;
  uint32_t blk_size = 512;
  uint16_t config_num_queues = 0;
  uint64_t disk_bytes = 0;  // offset range used
};

Device handshake(VhostUserConn& c, const Options& o) {
  Device d;
  d.features_offered = c.get_u64(VU_GET_FEATURES);
  if (!(d.features_offered & bit(F_VERSION_1))) throw Error("back-end does not offer VIRTIO_F_VERSION_1");
  if (o.event_idx && !(d.features_offered & bit(F_RING_EVENT_IDX))) throw Error("back-end does not offer RING_EVENT_IDX (use --event-idx off)");
  if (o.use_indirect() && !(d.features_offered & bit(F_RING_INDIRECT_DESC))) {
    throw Error("back-end does not offer RING_INDIRECT_DESC (raise --ring-size or use --indirect off)");
  }
  uint64_t want = bit(F_VERSION_1) | bit(F_PROTOCOL_FEATURES) | bit(F_BLK_SEG_MAX) | bit(F_BLK_BLK_SIZE) |
                  bit(F_BLK_TOPOLOGY) | bit(F_BLK_FLUSH) | bit(F_BLK_MQ) | bit(F_BLK_RO);
  if (o.event_idx) want |= bit(F_RING_EVENT_IDX);
  if (o.use_indirect()) want |= bit(F_RING_INDIRECT_DESC);
  d.features_acked = d.features_offered & want;
  const bool writes = o.rw != RwMode::RandRead && o.rw != RwMode::Read;
  if (writes && (d.features_acked & bit(F_BLK_RO))) throw Error("the disk is read-only (VIRTIO_BLK_F_RO) and --rw writes");
  c.set_u64(VU_SET_FEATURES, d.features_acked);

  if (d.features_acked & bit(F_PROTOCOL_FEATURES)) {
    d.proto_offered = c.get_u64(VU_GET_PROTOCOL_FEATURES);
    d.proto_acked = d.proto_offered & (bit(VU_PROTO_MQ) | bit(VU_PROTO_REPLY_ACK) | bit(VU_PROTO_CONFIG) |
                                       (o.inflight ? bit(VU_PROTO_INFLIGHT_SHMFD) : 0));
    c.set_u64(VU_SET_PROTOCOL_FEATURES, d.proto_acked);
    c.use_reply_ack((d.proto_acked & bit(VU_PROTO_REPLY_ACK)) != 0);
    if (d.proto_acked & bit(VU_PROTO_MQ)) d.queues_supported = c.get_u64(VU_GET_QUEUE_NUM);
  }
  if (o.queues > d.queues_supported) {
    throw Error("back-end supports " + std::to_string(d.queues_supported) + " queue(s), --queues is " + std::to_string(o.queues));
  }
  c.set_owner();

  if (d.proto_acked & bit(VU_PROTO_CONFIG)) {
    std::vector<uint8_t> cfg = c.get_config(o.config_size);
    std::memcpy(&d.capacity_sectors, cfg.data(), 8);
    if (d.features_acked & bit(F_BLK_BLK_SIZE)) std::memcpy(&d.blk_size, cfg.data() + 20, 4);
    std::memcpy(&d.config_num_queues, cfg.data() + 34, 2);  // get_config checked the size (>= 40)
    if (d.capacity_sectors > (uint64_t(1) << 54)) {
      throw Error("back-end reports a capacity of " + std::to_string(d.capacity_sectors) + " sectors (over 2^54)");
    }
    d.disk_bytes = d.capacity_sectors * 512;
    if (o.disk_size != 0) {
      if (o.disk_size > d.disk_bytes) {
        throw Error("--disk-size " + std::to_string(o.disk_size) + " exceeds the capacity " + std::to_string(d.disk_bytes));
      }
      d.disk_bytes = o.disk_size;
    }
  } else {
    if (o.disk_size == 0) throw Error("back-end does not offer the CONFIG protocol feature: give --disk-size");
    d.disk_bytes = o.disk_size;
  }
  if (d.blk_size == 0 || d.blk_size % 512 != 0) throw Error("disk block size " + std::to_string(d.blk_size) + " is not a multiple of 512");
  if (o.bs % d.blk_size != 0) {
    throw Error("--bs " + std::to_string(o.bs) + " is not a multiple of the disk block size " + std::to_string(d.blk_size));
  }
  return d;
}

void sleep_until(uint64_t t, const RunControl& ctl) {
  for (;;) {
    uint64_t now = now_ns();
    if (now >= t || ctl.abort.load()) return;
    uint64_t d = t - now;
    if (d > 5000000) d = 5000000;
    timespec ts{time_t(d / 1000000000ull), long(d % 1000000000ull)};
    nanosleep(&ts, nullptr);
  }
}

double us_per_io(double ns, uint64_t ios) { return ios ? ns / 1000.0 / double(ios) : NAN; }

void lat_object(JsonWriter& j, const char* key, const LatencyHistogram& h) {
  j.open(key);
  j.num("min", double(h.min_ns()) / 1000.0);
  j.num("mean", h.mean_ns() / 1000.0);
  j.num("p50", h.quantile_ns(0.50) / 1000.0);
  j.num("p90", h.quantile_ns(0.90) / 1000.0);
  j.num("p99", h.quantile_ns(0.99) / 1000.0);
  j.num("p999", h.quantile_ns(0.999) / 1000.0);
  j.num("max", double(h.max_ns()) / 1000.0);
  j.close();
}

int run(const Options& o) {
  signal(SIGPIPE, SIG_IGN);
  if (!o.pin.empty()) {
    // Every cpu of the list must be usable; the queue threads pin themselves to them.
    for (int cpu : o.pin) {
      if (int e = pin_current_thread(cpu)) throw sys_error("cannot pin to cpu " + std::to_string(cpu), e);
    }
    pin_current_thread(o.pin[0]);
  }

  VhostUserConn conn(o.socket, o.timeout_ms);
  Device dev = handshake(conn, o);

  // Offset ranges: with --verify, or for sequential streams, each queue gets its own slice.
  const bool sequential = o.rw == RwMode::Read || o.rw == RwMode::Write;
  const bool sliced = o.verify || sequential;
  const uint64_t slice = sliced ? dev.disk_bytes / o.queues / o.bs * o.bs : dev.disk_bytes / o.bs * o.bs;
  if (slice < o.bs) throw Error("the disk (" + std::to_string(dev.disk_bytes) + " bytes) is too small for --bs and --queues");
  const uint64_t run_id = (o.seed * 0x9E3779B97F4A7C15ull) ^ uint64_t(now_ns());

  Carver carver;
  std::vector<QueueLayout> layouts;
  for (uint32_t q = 0; q < o.queues; q++) layouts.push_back(QueueLayout::plan(carver, o));
  GuestMemory mem(carver.used(), kGpaBase);

  RunControl ctl;
  std::vector<std::unique_ptr<QueueWorker>> workers;
  for (uint32_t q = 0; q < o.queues; q++) {
    Workload w(o, q, sliced ? q * slice : 0, slice, run_id);
    uint64_t quota = o.ios ? o.ios / o.queues + (q < o.ios % o.queues ? 1 : 0) : 0;
    workers.push_back(std::make_unique<QueueWorker>(o, q, mem, layouts[q], std::move(w), quota, ctl));
  }

  // The inflight region, as QEMU's device start does (GET once, SET back); kept open until the end.
  int inflight_fd = -1;
  if (dev.proto_acked & bit(VU_PROTO_INFLIGHT_SHMFD)) {
    VuInflight d{};
    inflight_fd = conn.get_inflight_fd(uint16_t(o.queues), uint16_t(o.ring_size), &d);
    if (inflight_fd >= 0) conn.set_inflight_fd(inflight_fd, d);
  }
  struct FdCloser {
    int fd;
    ~FdCloser() {
      if (fd >= 0) close(fd);
    }
  } inflight_closer{inflight_fd};
  conn.set_mem_table({mem.region()}, {mem.fd()});
  const bool enable_needed = (dev.features_acked & bit(F_PROTOCOL_FEATURES)) != 0;
  for (auto& w : workers) {
    const uint32_t i = w->index();
    conn.set_vring_state(VU_SET_VRING_NUM, i, o.ring_size);
    conn.set_vring_state(VU_SET_VRING_BASE, i, 0);
    conn.set_vring_addr(i, w->desc_uaddr(), w->used_uaddr(), w->avail_uaddr());
    conn.set_u64(VU_SET_VRING_KICK, i, w->kick_fd());
    conn.set_u64(VU_SET_VRING_CALL, i, w->call_fd());
    if (enable_needed) conn.set_vring_state(VU_SET_VRING_ENABLE, i, 1);
  }

  // Run.
  std::vector<std::thread> threads;
  for (auto& w : workers) threads.emplace_back([&w]() { w->run(); });
  ctl.t_begin = now_ns() + 2000000;  // threads get 2 ms to reach the start line
  ctl.t_measure = ctl.t_begin + uint64_t(o.ramp_s * 1e9);
  ctl.t_end = o.ios ? 0 : ctl.t_measure + uint64_t(o.runtime_s * 1e9);
  sleep_until(ctl.t_begin, ctl);
  ctl.go.store(true, std::memory_order_release);

  sleep_until(ctl.t_measure, ctl);
  const CpuSample be0 = sample_process_cpu(o.backend_pid);
  const uint64_t self0 = self_cpu_ns();
  const uint64_t cpu_t0 = now_ns();
  if (o.ios == 0) {
    sleep_until(ctl.t_end, ctl);
  } else {
    while (ctl.main_done.load() < int(o.queues) && !ctl.abort.load()) usleep(1000);
  }
  const uint64_t cpu_t1 = now_ns();
  const CpuSample be1 = sample_process_cpu(o.backend_pid);
  const uint64_t self1 = self_cpu_ns();
  // Wake sleepers promptly if a queue gave up; otherwise they finish by themselves.
  auto wake_all = [&]() {
    const uint64_t one = 1;
    for (auto& w : workers) {
      ssize_t r = write(w->call_fd(), &one, sizeof(one));  // a full eventfd is awake anyway
      (void)r;
    }
  };
  for (;;) {
    if (ctl.abort.load()) {
      wake_all();
      break;
    }
    if (ctl.finished.load() >= int(o.queues)) break;
    usleep(1000);
  }
  for (auto& t : threads) t.join();

  // Aggregate.
  QueueCounters total;
  LatencyHistogram hist;
  std::vector<std::string> mismatch_details;
  std::string failure;
  for (auto& w : workers) {
    total.add(w->counters);
    hist.merge(w->hist);
    for (auto& d : w->mismatch_details) mismatch_details.push_back(d);
    if (!w->failure.empty() && failure.empty()) failure = "queue " + std::to_string(w->index()) + ": " + w->failure;
  }
  const int stalled = ctl.stalled_queue.load();
  std::vector<uint32_t> inflight_at_stop;
  std::vector<std::string> ring_states;
  for (auto& w : workers) {
    inflight_at_stop.push_back(w->inflight());
    ring_states.push_back(w->ring_state());
  }

  // Stop the rings the way a front-end does (GET_VRING_BASE returns where the back-end would
  // resume: every offered request has been consumed, so it must equal our avail index).
  std::vector<std::string> warnings;
  if (stalled < 0 && failure.empty()) {
    for (auto& w : workers) {
      try {
        uint32_t base = conn.get_vring_base(w->index());
        if (base != w->avail_idx()) {
          warnings.push_back("GET_VRING_BASE of ring " + std::to_string(w->index()) + " returned " + std::to_string(base) +
                             ", our avail index is " + std::to_string(w->avail_idx()));
        }
      } catch (const Error& e) {
        warnings.push_back(std::string("GET_VRING_BASE: ") + e.what());
        break;
      }
    }
  }

  const double runtime_s = o.ios ? (total.last_completion_ns > ctl.t_measure ? double(total.last_completion_ns - ctl.t_measure) / 1e9 : 0.0)
                                 : o.runtime_s;
  const double iops = runtime_s > 0 ? double(total.ios) / runtime_s : 0.0;
  const double mbps = runtime_s > 0 ? double(total.bytes) / runtime_s / 1e6 : 0.0;
  const long tck = clock_ticks_per_sec();
  const bool have_be = be0.ok && be1.ok;
  const double be_stat_us = have_be ? us_per_io(double(be1.stat_ticks - be0.stat_ticks) * 1e9 / double(tck), total.ios) : NAN;
  const bool have_sched = have_be && be0.schedstat_ok && be1.schedstat_ok && be1.schedstat_ns >= be0.schedstat_ns;
  const double be_sched_us = have_sched ? us_per_io(double(be1.schedstat_ns - be0.schedstat_ns), total.ios) : NAN;
  const double self_us = us_per_io(double(self1 - self0), total.ios);
  const double cpu_window_s = double(cpu_t1 - cpu_t0) / 1e9;

  // Human-readable summary.
  if (!o.quiet) {
    std::printf("vhost-bench %s bs=%u qd=%u queues=%u wait=%s event-idx=%s ring=%u%s%s\n", rw_name(o.rw), o.bs, o.qd, o.queues,
                o.wait == WaitMode::Call ? "call" : "poll", o.event_idx ? "on" : "off", o.ring_size,
                o.use_indirect() ? " indirect" : "", o.verify ? " verify" : "");
    std::printf("  disk: %" PRIu64 " bytes, block %u, back-end queues %" PRIu64 "\n", dev.disk_bytes, dev.blk_size, dev.queues_supported);
    std::printf("  ios %" PRIu64 " in %.3f s: %.0f IOPS, %.1f MB/s\n", total.ios, runtime_s, iops, mbps);
    std::printf("  latency us: p50 %.1f  p99 %.1f  p99.9 %.1f  max %.1f  mean %.1f\n", hist.quantile_ns(0.5) / 1e3,
                hist.quantile_ns(0.99) / 1e3, hist.quantile_ns(0.999) / 1e3, double(hist.max_ns()) / 1e3, hist.mean_ns() / 1e3);
    std::printf("  status: ok %" PRIu64 " ioerr %" PRIu64 " unsupp %" PRIu64 " other %" PRIu64 "\n", total.st_ok, total.st_ioerr,
                total.st_unsupp, total.st_other);
    if (o.backend_pid) {
      std::printf("  back-end cpu us/IO: %.3f (stat)  %.3f (schedstat)\n", be_stat_us, be_sched_us);
    }
    std::printf("  client cpu us/IO: %.3f  kicks/IO %.3f  wakeups/IO %.3f\n", self_us,
                total.ios ? double(total.kicks) / double(total.total_completions) : 0.0,
                total.ios ? double(total.wakeups) / double(total.total_completions) : 0.0);
    if (o.verify) {
      std::printf("  verify: %" PRIu64 " reads checked (%" PRIu64 " of blocks not written in this run), %" PRIu64
                  " mismatches, %" PRIu64 " read-back reads\n",
                  total.verify_checked, total.verify_unwritten, total.verify_mismatches, total.readback_ios);
    }
    for (size_t q = 0; q < workers.size(); q++) {
      std::printf("  queue %zu: ios %" PRIu64 " kicks %" PRIu64 " wakeups %" PRIu64 "\n", q, workers[q]->counters.ios,
                  workers[q]->counters.kicks, workers[q]->counters.wakeups);
    }
  }
  for (auto& d : mismatch_details) std::fprintf(stderr, "vhost-bench: verify mismatch: %s\n", d.c_str());
  for (auto& wmsg : warnings) std::fprintf(stderr, "vhost-bench: warning: %s\n", wmsg.c_str());
  if (!failure.empty()) std::fprintf(stderr, "vhost-bench: protocol error: %s\n", failure.c_str());
  if (stalled >= 0) {
    std::fprintf(stderr, "vhost-bench: STALL: queue %d saw no completion for %d ms with requests in flight\n", stalled, o.timeout_ms);
    for (size_t q = 0; q < workers.size(); q++) {
      std::fprintf(stderr, "vhost-bench:   queue %zu: %u in flight; %s\n", q, inflight_at_stop[q], ring_states[q].c_str());
    }
  }

  if (!o.json_path.empty()) {
    JsonWriter j;
    j.open();
    j.str("tool", "vhost-bench");
    j.boolean("ok", stalled < 0 && failure.empty() && total.errors() == 0 && total.verify_mismatches == 0);
    j.open("options");
    j.str("socket", o.socket);
    j.num("queues", o.queues);
    j.num("qd", o.qd);
    j.num("bs", o.bs);
    j.str("rw", rw_name(o.rw));
    j.num("mix", o.mix);
    if (o.ios) {
      j.null("runtime_s");
      j.num("ios", o.ios);
    } else {
      j.num("runtime_s", o.runtime_s);
      j.null("ios");
    }
    j.num("ramp_s", o.ramp_s);
    j.str("wait", o.wait == WaitMode::Call ? "call" : "poll");
    j.boolean("event_idx", o.event_idx);
    j.boolean("inflight", (dev.proto_acked & bit(VU_PROTO_INFLIGHT_SHMFD)) != 0);
    j.num("ring_size", o.ring_size);
    j.boolean("indirect", o.use_indirect());
    j.open_array("pin");
    for (int c : o.pin) j.num(nullptr, c);
    j.close();
    if (o.backend_pid) {
      j.num("backend_pid", o.backend_pid);
    } else {
      j.null("backend_pid");
    }
    j.boolean("verify", o.verify);
    j.num("timeout_ms", o.timeout_ms);
    j.num("seed", o.seed);
    j.close();
    j.open("device");
    j.str("features_offered", hex(dev.features_offered));
    j.str("features_acked", hex(dev.features_acked));
    j.str("protocol_features_offered", hex(dev.proto_offered));
    j.str("protocol_features_acked", hex(dev.proto_acked));
    j.num("queues_supported", dev.queues_supported);
    j.num("config_num_queues", uint32_t(dev.config_num_queues));
    j.num("capacity_sectors", dev.capacity_sectors);
    j.num("blk_size", dev.blk_size);
    j.num("disk_size", dev.disk_bytes);
    j.close();
    j.num("ios", total.ios);
    j.num("reads", total.reads);
    j.num("writes", total.writes);
    j.num("bytes", total.bytes);
    j.num("runtime_s", runtime_s);
    j.num("iops", iops);
    j.num("mbps", mbps);
    lat_object(j, "lat_us", hist);
    j.open("errors");
    j.num("ioerr", total.st_ioerr);
    j.num("unsupp", total.st_unsupp);
    j.num("other", total.st_other);
    j.num("total", total.errors());
    j.close();
    j.open("status");
    j.num("ok", total.st_ok);
    j.num("ioerr", total.st_ioerr);
    j.num("unsupp", total.st_unsupp);
    j.num("other", total.st_other);
    j.close();
    j.num("completions", total.total_completions);
    j.num("used_len_unexpected", total.used_len_unexpected);
    j.open("verify");
    j.boolean("enabled", o.verify);
    j.num("checked", total.verify_checked);
    j.num("unwritten", total.verify_unwritten);
    j.num("mismatches", total.verify_mismatches);
    j.num("readback_ios", total.readback_ios);
    j.open_array("details");
    for (auto& d : mismatch_details) j.str(nullptr, d);
    j.close();
    j.close();
    j.open("backend_cpu_us_per_io");
    j.num("stat", be_stat_us);
    j.num("schedstat", be_sched_us);
    j.close();
    j.open("backend_cpu");
    j.num("pid", o.backend_pid);
    j.num("window_s", cpu_window_s);
    j.num("clk_tck", int64_t(tck));
    j.num("stat_ticks", have_be ? be1.stat_ticks - be0.stat_ticks : uint64_t(0));
    j.num("schedstat_ns", have_sched ? be1.schedstat_ns - be0.schedstat_ns : uint64_t(0));
    j.num("threads", be1.threads);
    j.num("stime_ticks", have_be ? be1.stime_ticks - be0.stime_ticks : uint64_t(0));
    j.num("main_thread_schedstat_ns", have_sched ? be1.main_schedstat_ns - be0.main_schedstat_ns : uint64_t(0));
    j.num("utilization", have_sched && cpu_window_s > 0 ? double(be1.schedstat_ns - be0.schedstat_ns) / 1e9 / cpu_window_s : NAN);
    j.close();
    j.num("client_cpu_us_per_io", self_us);
    j.open("notifications");
    j.num("kicks", total.kicks);
    j.num("publishes", total.kick_checks);
    j.num("waits", total.waits);
    j.num("wakeups", total.wakeups);
    j.num("kicks_per_io", total.total_completions ? double(total.kicks) / double(total.total_completions) : 0.0);
    j.num("wakeups_per_io", total.total_completions ? double(total.wakeups) / double(total.total_completions) : 0.0);
    j.close();
    j.open_array("per_queue");
    for (size_t q = 0; q < workers.size(); q++) {
      const QueueCounters& c = workers[q]->counters;
      j.open();
      j.num("queue", uint64_t(q));
      j.num("ios", c.ios);
      j.num("iops", runtime_s > 0 ? double(c.ios) / runtime_s : 0.0);
      j.num("reads", c.reads);
      j.num("writes", c.writes);
      j.num("errors", c.errors());
      j.num("verify_mismatches", c.verify_mismatches);
      j.num("kicks", c.kicks);
      j.num("wakeups", c.wakeups);
      j.num("inflight_at_end", inflight_at_stop[q]);
      lat_object(j, "lat_us", workers[q]->hist);
      j.close();
    }
    j.close();
    if (stalled >= 0) {
      j.open("stall");
      j.num("queue", stalled);
      j.num("timeout_ms", o.timeout_ms);
      j.open_array("per_queue");
      for (size_t q = 0; q < workers.size(); q++) {
        j.open();
        j.num("queue", uint64_t(q));
        j.num("inflight", inflight_at_stop[q]);
        j.str("ring", ring_states[q]);
        j.close();
      }
      j.close();
      j.close();
    } else {
      j.null("stall");
    }
    if (failure.empty()) {
      j.null("failure");
    } else {
      j.str("failure", failure);
    }
    j.open_array("warnings");
    for (auto& wmsg : warnings) j.str(nullptr, wmsg);
    j.close();
    j.close();
    std::ofstream f(o.json_path);
    f << j.text() << "\n";
    if (!f) throw Error("cannot write " + o.json_path);
  }

  if (stalled >= 0) return 3;
  if (!failure.empty()) return 1;
  if (total.errors() != 0 || total.verify_mismatches != 0) return 2;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_options(argc, argv));
  } catch (const Error& e) {
    std::fprintf(stderr, "vhost-bench: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vhost-bench: %s\n", e.what());
    return 1;
  }
}
