// vhost-ceiling: a do-nothing vhost-user-blk back-end, the ceiling for the benchmarks.
//
// It completes every request with VIRTIO_BLK_S_OK without reading or writing its data: it only
// writes the status byte (the last byte of the chain's last, device-writable descriptor) and the
// used ring. Everything else a back-end must do on the data path it does: it walks and checks
// every descriptor it touches (head and next indices inside the ring, chains no longer than the
// ring, indirect tables only when negotiated, never nested, every address range inside a region
// of the memory table), publishes used entries with release ordering, follows the event-index
// rules (VIRTIO 1.2 sections 2.7.7-2.7.10) or the ring flags, and polls adaptively as rnull does:
// after a batch it spins on the avail indices for a bounded budget (halved after each miss,
// raised to twice the idle gap when a kick comes back within the limit), then re-arms kicks,
// re-checks and sleeps on the kick eventfds.
//
// One data-path thread serves every enabled ring (as rnull with one thread); the main thread
// serves the vhost-user socket (one front-end at a time, then the next) and stops the data-path
// thread around every message that changes rings or memory. A malformed chain or ring index
// marks that ring broken (logged, no longer processed); a malformed message ends the connection.
//
//   vhost-ceiling --socket PATH [--queues N] [--size MIB] [--blocksize B] [--poll-us US]
//
// Exits 0 on SIGTERM/SIGINT (the socket file removed), 1 on a set-up error.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <thread>
#include <vector>

namespace {

// ---- protocol constants (vhost-user spec; VIRTIO 1.2 sections 2.7 and 5.2) ----
enum : uint32_t {
  GET_FEATURES = 1, SET_FEATURES = 2, SET_OWNER = 3, RESET_OWNER = 4, SET_MEM_TABLE = 5,
  SET_VRING_NUM = 8, SET_VRING_ADDR = 9, SET_VRING_BASE = 10, GET_VRING_BASE = 11,
  SET_VRING_KICK = 12, SET_VRING_CALL = 13, SET_VRING_ERR = 14, GET_PROTOCOL_FEATURES = 15,
  SET_PROTOCOL_FEATURES = 16, GET_QUEUE_NUM = 17, SET_VRING_ENABLE = 18, GET_CONFIG = 24,
  SET_CONFIG = 25,
};
constexpr uint32_t kFlagVersion = 0x1, kFlagReply = 0x4, kFlagNeedReply = 0x8;
constexpr int kMaxRegions = 8;
constexpr uint32_t kMaxPayload = 4096;
constexpr uint32_t kMaxQueues = 64;
constexpr uint64_t kVringFdMask = 0xff, kVringNoFd = 0x100;

constexpr uint64_t F_SEG_MAX = 1ull << 2, F_BLK_SIZE = 1ull << 6, F_FLUSH = 1ull << 9, F_MQ = 1ull << 12,
                   F_INDIRECT = 1ull << 28, F_EVENT_IDX = 1ull << 29, F_PROTOCOL = 1ull << 30,
                   F_VERSION_1 = 1ull << 32;
constexpr uint64_t P_MQ = 1ull << 0, P_REPLY_ACK = 1ull << 3, P_CONFIG = 1ull << 9;

constexpr uint16_t D_NEXT = 1, D_WRITE = 2, D_INDIRECT = 4;
constexpr uint16_t AVAIL_F_NO_INTERRUPT = 1, USED_F_NO_NOTIFY = 1;
constexpr uint64_t kMinPollNs = 1000;

struct Desc {
  uint64_t addr;
  uint32_t len;
  uint16_t flags;
  uint16_t next;
};

bool g_quiet = false;
void logf(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::fprintf(stderr, "vhost-ceiling: ");
  std::vfprintf(stderr, fmt, ap);
  std::fputc('\n', stderr);
  va_end(ap);
}

uint64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1000000000ull + uint64_t(ts.tv_nsec);
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// ---- memory table ----
struct Region {
  uint64_t gpa = 0, size = 0, uaddr = 0;
  uint8_t* host = nullptr;  // gpa maps here
  void* map = nullptr;
  size_t map_len = 0;
};

struct Memory {
  std::vector<Region> regions;
  // Host pointer for [gpa, gpa+len) when it lies inside one region, else nullptr.
  uint8_t* gpa(uint64_t a, uint64_t len) const {
    for (const Region& r : regions)
      if (a >= r.gpa && a - r.gpa <= r.size && len <= r.size - (a - r.gpa)) return r.host + (a - r.gpa);
    return nullptr;
  }
  uint8_t* uva(uint64_t a, uint64_t len) const {
    for (const Region& r : regions)
      if (a >= r.uaddr && a - r.uaddr <= r.size && len <= r.size - (a - r.uaddr)) return r.host + (a - r.uaddr);
    return nullptr;
  }
  void clear() {
    for (Region& r : regions) munmap(r.map, r.map_len);
    regions.clear();
  }
};

// ---- one split virtqueue, device side ----
struct Ring {
  uint32_t num = 0;
  uint64_t desc_ua = 0, avail_ua = 0, used_ua = 0;
  bool have_addr = false, enabled = false, started = false, broken = false;
  int kick = -1, call = -1;
  uint16_t last_avail = 0, used_idx = 0;
  // Valid while the data path runs (resolved from the memory table at start).
  Desc* desc = nullptr;
  uint16_t* avail = nullptr;  // flags, idx, ring[num], used_event
  uint8_t* used = nullptr;    // flags, idx, ring[num] {id, len}, avail_event
  uint64_t requests = 0, calls = 0;

  uint16_t avail_idx() const { return __atomic_load_n(&avail[1], __ATOMIC_ACQUIRE); }
  uint16_t* used_flags() const { return reinterpret_cast<uint16_t*>(used); }
  uint16_t* used_idx_p() const { return reinterpret_cast<uint16_t*>(used + 2); }
  uint16_t* avail_event() const { return reinterpret_cast<uint16_t*>(used + 4 + 8ull * num); }
  uint16_t used_event() const { return __atomic_load_n(&avail[2 + num], __ATOMIC_RELAXED); }
  void close_fds() {
    if (kick >= 0) close(kick);
    if (call >= 0) close(call);
    kick = call = -1;
  }
};

class Device {
 public:
  Device(uint32_t queues, uint64_t sectors, uint32_t blk_size, uint64_t poll_max_ns)
      : queues_(queues), sectors_(sectors), blk_size_(blk_size), poll_max_ns_(poll_max_ns), rings_(queues) {
    stop_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  }
  ~Device() { reset(); close(stop_fd_); }

  // Serves one connection until it closes or misbehaves; returns false when asked to exit.
  bool serve(int conn, int sig_fd);

 private:
  bool handle(uint32_t req, uint32_t flags, const uint8_t* p, uint32_t size, std::vector<int>& fds, int conn);
  void reply(int conn, uint32_t req, const void* payload, uint32_t size);
  void start_worker();
  void stop_worker();
  void reset();
  bool resolve(Ring& r);
  void run();
  uint32_t process(Ring& r);
  bool chain(Ring& r, uint16_t head, uint32_t* written, uint8_t** status);
  void mark_broken(Ring& r, const char* why, unsigned v);
  uint64_t features() const {
    return F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_MQ | F_INDIRECT | F_EVENT_IDX | F_PROTOCOL | F_VERSION_1;
  }

  uint32_t queues_;
  uint64_t sectors_;
  uint32_t blk_size_;
  uint64_t poll_max_ns_;
  std::vector<Ring> rings_;
  Memory mem_;
  uint64_t acked_ = 0, proto_ = 0;
  std::thread worker_;
  std::atomic<bool> stop_{false};
  int stop_fd_ = -1;
  uint64_t poll_ns_ = 0;
};

void Device::mark_broken(Ring& r, const char* why, unsigned v) {
  r.broken = true;
  logf("ring %u broken: %s (%u); no longer processed", unsigned(&r - rings_.data()), why, v);
}

// Walks the chain at `head`: every index, flag and range checked. On success `status` points at
// the status byte (last byte of the last descriptor, which must be device-writable) and
// `written` is the sum of the device-writable lengths (what a device filling them reports).
bool Device::chain(Ring& r, uint16_t head, uint32_t* written, uint8_t** status) {
  if (head >= r.num) { mark_broken(r, "head index outside the ring", head); return false; }
  const Desc* table = r.desc;
  uint32_t table_n = r.num;
  uint32_t i = head, seen = 0;
  bool indirect = false;
  uint64_t wsum = 0, readable = 0;
  for (;;) {
    if (++seen > table_n) { mark_broken(r, "chain longer than its table (a loop?)", seen); return false; }
    Desc d = table[i];  // one copy: the driver may change the table under us
    if (d.flags & D_INDIRECT) {
      if (indirect || !(acked_ & F_INDIRECT)) { mark_broken(r, "nested or unnegotiated indirect descriptor", i); return false; }
      if (d.flags & D_NEXT) { mark_broken(r, "indirect descriptor with NEXT", i); return false; }
      if (d.len == 0 || d.len % sizeof(Desc) != 0 || d.len / sizeof(Desc) > 65536) { mark_broken(r, "bad indirect table length", d.len); return false; }
      uint8_t* t = mem_.gpa(d.addr, d.len);
      if (t == nullptr || (reinterpret_cast<uintptr_t>(t) & 15) != 0) { mark_broken(r, "indirect table outside guest memory or misaligned", i); return false; }
      table = reinterpret_cast<const Desc*>(t);
      table_n = d.len / sizeof(Desc);
      indirect = true;
      i = 0;
      seen = 0;
      continue;
    }
    if (mem_.gpa(d.addr, d.len) == nullptr) { mark_broken(r, "buffer outside guest memory", i); return false; }
    if (d.flags & D_WRITE) wsum += d.len;
    else if (wsum != 0) { mark_broken(r, "device-readable descriptor after a writable one", i); return false; }
    else readable += d.len;
    if (!(d.flags & D_NEXT)) {
      if (!(d.flags & D_WRITE) || d.len == 0) { mark_broken(r, "last descriptor is not a writable status byte", i); return false; }
      if (readable < 16) { mark_broken(r, "request header shorter than 16 bytes", unsigned(readable)); return false; }
      *status = mem_.gpa(d.addr, d.len) + d.len - 1;
      *written = wsum > 0xffffffffull ? 0xffffffffu : uint32_t(wsum);
      return true;
    }
    if (d.next >= table_n) { mark_broken(r, "next index outside the table", d.next); return false; }
    i = d.next;
  }
}

// Serves everything pending on `r` (at most one ring's worth), publishes and signals once.
uint32_t Device::process(Ring& r) {
  if (r.broken) return 0;
  uint16_t avail = r.avail_idx();
  uint16_t pending = uint16_t(avail - r.last_avail);
  if (pending == 0) return 0;
  if (pending > r.num) { mark_broken(r, "avail index ran more than a ring ahead", pending); return 0; }
  uint16_t old_used = r.used_idx;
  uint8_t* used_ring = r.used + 4;
  uint32_t done = 0;
  for (; done < pending; done++) {
    uint16_t head = __atomic_load_n(&r.avail[2 + (r.last_avail & (r.num - 1))], __ATOMIC_RELAXED);
    uint32_t written = 0;
    uint8_t* status = nullptr;
    if (!chain(r, head, &written, &status)) break;
    *status = 0;  // VIRTIO_BLK_S_OK
    uint8_t* e = used_ring + 8ull * (r.used_idx & (r.num - 1));
    uint32_t id = head;
    std::memcpy(e, &id, 4);
    std::memcpy(e + 4, &written, 4);
    r.used_idx++;
    r.last_avail++;
  }
  if (r.used_idx == old_used) return 0;
  __atomic_store_n(r.used_idx_p(), r.used_idx, __ATOMIC_RELEASE);
  r.requests += uint16_t(r.used_idx - old_used);
  __atomic_thread_fence(__ATOMIC_SEQ_CST);  // used idx store before the used_event / flags load
  bool notify;
  if (acked_ & F_EVENT_IDX) {
    uint16_t ev = r.used_event();
    notify = uint16_t(r.used_idx - ev - 1) < uint16_t(r.used_idx - old_used);
  } else {
    notify = !(__atomic_load_n(&r.avail[0], __ATOMIC_RELAXED) & AVAIL_F_NO_INTERRUPT);
  }
  if (notify && r.call >= 0) {
    uint64_t one = 1;
    if (write(r.call, &one, 8) == 8) r.calls++;  // EAGAIN: the counter is already non-zero
  }
  return done;
}

void Device::run() {
  std::vector<Ring*> active;
  for (Ring& r : rings_)
    if (r.started && r.enabled && !r.broken) active.push_back(&r);
  std::vector<pollfd> pfds;
  pfds.push_back({stop_fd_, POLLIN, 0});
  for (Ring* r : active) pfds.push_back({r->kick, POLLIN, 0});
  bool event_idx = acked_ & F_EVENT_IDX;
  auto suppress = [&]() {
    // With event index a stale avail_event already suppresses kicks; else the flag.
    if (!event_idx)
      for (Ring* r : active) __atomic_store_n(r->used_flags(), USED_F_NO_NOTIFY, __ATOMIC_RELAXED);
  };
  auto any_pending = [&]() {
    for (Ring* r : active)
      if (!r->broken && r->avail_idx() != r->last_avail) return true;
    return false;
  };
  suppress();
  while (!stop_.load(std::memory_order_relaxed)) {
    uint32_t n = 0;
    for (Ring* r : active) n += process(*r);
    if (n > 0) continue;
    if (poll_ns_ > 0) {
      uint64_t deadline = now_ns() + poll_ns_;
      bool hit = false;
      while (!(hit = any_pending()) && now_ns() < deadline && !stop_.load(std::memory_order_relaxed)) cpu_relax();
      if (hit) continue;
      poll_ns_ /= 2;
      if (poll_ns_ < kMinPollNs) poll_ns_ = 0;
    }
    // Re-arm kicks, then re-check: a request published before the re-arm is seen here.
    for (Ring* r : active) {
      if (event_idx) __atomic_store_n(r->avail_event(), r->last_avail, __ATOMIC_RELAXED);
      else __atomic_store_n(r->used_flags(), 0, __ATOMIC_RELAXED);
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (any_pending()) { suppress(); continue; }
    uint64_t slept = now_ns();
    int rc = poll(pfds.data(), pfds.size(), -1);  // woken by a kick or by stop_worker()
    if (rc < 0 && errno != EINTR) { logf("poll: %s", std::strerror(errno)); break; }
    for (size_t k = 1; k < pfds.size(); k++) {
      if (pfds[k].revents & POLLIN) {
        uint64_t v;
        if (read(pfds[k].fd, &v, 8) < 0 && errno != EAGAIN) logf("kick read: %s", std::strerror(errno));
      }
      if (pfds[k].revents & (POLLERR | POLLNVAL)) pfds[k].fd = -1;  // a dead kick fd: polled rings only
    }
    uint64_t idle = now_ns() - slept;
    if (poll_max_ns_ > 0 && idle < poll_max_ns_) {
      uint64_t want = 2 * idle < kMinPollNs ? kMinPollNs : 2 * idle;
      if (want > poll_ns_) poll_ns_ = want > poll_max_ns_ ? poll_max_ns_ : want;
    }
    suppress();
  }
}

bool Device::resolve(Ring& r) {
  r.desc = reinterpret_cast<Desc*>(mem_.uva(r.desc_ua, 16ull * r.num));
  r.avail = reinterpret_cast<uint16_t*>(mem_.uva(r.avail_ua, 6ull + 2ull * r.num));
  r.used = mem_.uva(r.used_ua, 6ull + 8ull * r.num);
  if (r.desc == nullptr || r.avail == nullptr || r.used == nullptr) return false;
  if ((r.desc_ua & 15) || (r.avail_ua & 1) || (r.used_ua & 3)) return false;
  return true;
}

void Device::start_worker() {
  bool any = false;
  for (Ring& r : rings_) {
    if (!r.started || !r.enabled || r.broken) continue;
    if (!resolve(r)) { mark_broken(r, "ring addresses outside guest memory or misaligned", r.num); continue; }
    any = true;
  }
  if (!any) return;
  stop_ = false;
  poll_ns_ = poll_max_ns_;
  worker_ = std::thread([this] { run(); });
}

void Device::stop_worker() {
  if (!worker_.joinable()) return;
  stop_ = true;
  uint64_t one = 1;
  if (write(stop_fd_, &one, 8) < 0) logf("stop eventfd: %s", std::strerror(errno));
  worker_.join();
  uint64_t v;
  if (read(stop_fd_, &v, 8) < 0 && errno != EAGAIN) logf("stop eventfd read: %s", std::strerror(errno));
}

void Device::reset() {
  stop_worker();
  for (Ring& r : rings_) {
    r.close_fds();
    r = Ring();
  }
  mem_.clear();
  acked_ = proto_ = 0;
}

void Device::reply(int conn, uint32_t req, const void* payload, uint32_t size) {
  uint8_t buf[12 + 512];
  uint32_t hdr[3] = {req, kFlagVersion | kFlagReply, size};
  std::memcpy(buf, hdr, 12);
  std::memcpy(buf + 12, payload, size);
  size_t off = 0, len = 12 + size;
  while (off < len) {
    ssize_t n = send(conn, buf + off, len - off, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) { logf("reply to %u: %s", req, std::strerror(errno)); return; }
    off += size_t(n);
  }
}

// Handles one message; false ends the connection (logged).
bool Device::handle(uint32_t req, uint32_t flags, const uint8_t* p, uint32_t size, std::vector<int>& fds, int conn) {
  auto u64 = [&](uint64_t* v) { if (size != 8) return false; std::memcpy(v, p, 8); return true; };
  auto bad = [&](const char* why) { logf("message %u: %s; closing the connection", req, why); return false; };
  bool own_reply = false, ok = true;
  uint64_t v = 0;
  switch (req) {
    case GET_FEATURES: v = features(); reply(conn, req, &v, 8); own_reply = true; break;
    case GET_PROTOCOL_FEATURES: v = P_MQ | P_REPLY_ACK | P_CONFIG; reply(conn, req, &v, 8); own_reply = true; break;
    case GET_QUEUE_NUM: v = queues_; reply(conn, req, &v, 8); own_reply = true; break;
    case SET_FEATURES:
      if (!u64(&v)) return bad("payload is not a u64");
      if (v & ~features()) return bad("features not offered");
      stop_worker(); acked_ = v; start_worker(); break;
    case SET_PROTOCOL_FEATURES:
      if (!u64(&v)) return bad("payload is not a u64");
      if (v & ~(P_MQ | P_REPLY_ACK | P_CONFIG)) return bad("protocol features not offered");
      proto_ = v; break;
    case SET_OWNER: break;
    case RESET_OWNER: reset(); break;
    case GET_CONFIG: {
      if (size < 12 || size > 12 + 256) return bad("bad config payload");
      uint32_t off, len;
      std::memcpy(&off, p, 4); std::memcpy(&len, p + 4, 4);
      if (len != size - 12 || off > 256 || len > 256 - off) return bad("config range");
      uint8_t cfg[256 + 12] = {};
      uint8_t* c = cfg + 12;  // virtio_blk_config (VIRTIO 1.2 section 5.2.4)
      uint32_t seg_max = 128 - 2;
      uint16_t nq = uint16_t(queues_);
      std::memcpy(c + 0, &sectors_, 8);
      std::memcpy(c + 12, &seg_max, 4);
      std::memcpy(c + 20, &blk_size_, 4);
      std::memcpy(c + 34, &nq, 2);
      std::memcpy(cfg, p, 12);
      std::memmove(cfg + 12, c + off, len);
      reply(conn, req, cfg, 12 + len); own_reply = true; break;
    }
    case SET_CONFIG: ok = false; break;  // read-only config
    case SET_MEM_TABLE: {
      uint32_t n;
      if (size < 8) return bad("short memory table");
      std::memcpy(&n, p, 4);
      if (n == 0 || n > kMaxRegions || size != 8 + 32 * n || fds.size() != n) return bad("memory table shape (regions, size, fds)");
      stop_worker();
      mem_.clear();
      for (uint32_t i = 0; i < n; i++) {
        Region r;
        uint64_t off;
        std::memcpy(&r.gpa, p + 8 + 32 * i, 8);
        std::memcpy(&r.size, p + 16 + 32 * i, 8);
        std::memcpy(&r.uaddr, p + 24 + 32 * i, 8);
        std::memcpy(&off, p + 32 + 32 * i, 8);
        struct stat st;
        if (r.size == 0 || off > UINT64_MAX - r.size || fstat(fds[i], &st) != 0 || uint64_t(st.st_size) < off + r.size) {
          mem_.clear();
          return bad("region empty or larger than its file");
        }
        r.map_len = off + r.size;
        r.map = mmap(nullptr, r.map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fds[i], 0);
        if (r.map == MAP_FAILED) { mem_.clear(); return bad("mmap of a region failed"); }
        r.host = static_cast<uint8_t*>(r.map) + off;
        mem_.regions.push_back(r);
      }
      start_worker();
      break;
    }
    case SET_VRING_NUM: case SET_VRING_BASE: case SET_VRING_ENABLE: case GET_VRING_BASE: {
      if (size != 8) return bad("vring state payload");
      uint32_t idx, num;
      std::memcpy(&idx, p, 4); std::memcpy(&num, p + 4, 4);
      if (idx >= queues_) return bad("ring index");
      stop_worker();
      Ring& r = rings_[idx];
      if (req == SET_VRING_NUM) {
        if (num == 0 || num > 32768 || (num & (num - 1))) { start_worker(); return bad("ring size not a power of two <= 32768"); }
        r.num = num;
        r.started = r.kick >= 0 && r.have_addr;
      } else if (req == SET_VRING_BASE) {
        r.last_avail = r.used_idx = uint16_t(num);
      } else if (req == SET_VRING_ENABLE) {
        if (num > 1) { start_worker(); return bad("enable is neither 0 nor 1"); }
        r.enabled = num != 0;
      } else {
        // Stops the ring and returns where the next request would be taken (vhost-user spec).
        uint32_t st[2] = {idx, r.last_avail};
        r.started = false;
        if (!g_quiet) logf("ring %u stopped: %llu requests, %llu calls", idx, (unsigned long long)r.requests, (unsigned long long)r.calls);
        r.close_fds();
        r.broken = false;
        start_worker();
        reply(conn, req, st, 8);
        own_reply = true;
        break;
      }
      start_worker();
      break;
    }
    case SET_VRING_ADDR: {
      if (size != 40) return bad("vring address payload");
      uint32_t idx;
      std::memcpy(&idx, p, 4);
      if (idx >= queues_) return bad("ring index");
      stop_worker();
      Ring& r = rings_[idx];
      std::memcpy(&r.desc_ua, p + 8, 8);
      std::memcpy(&r.used_ua, p + 16, 8);
      std::memcpy(&r.avail_ua, p + 24, 8);
      r.have_addr = true;
      r.started = r.kick >= 0 && r.num != 0;  // whatever order ADDR and KICK came in
      if (!(acked_ & F_PROTOCOL)) r.enabled = r.started;
      start_worker();
      break;
    }
    case SET_VRING_KICK: case SET_VRING_CALL: case SET_VRING_ERR: {
      if (!u64(&v)) return bad("payload is not a u64");
      uint32_t idx = uint32_t(v & kVringFdMask);
      bool nofd = v & kVringNoFd;
      if (idx >= queues_ || (nofd ? !fds.empty() : fds.size() != 1)) return bad("ring index or fd count");
      int fd = nofd ? -1 : fds[0];
      if (!nofd) fds.clear();  // owned now
      stop_worker();
      Ring& r = rings_[idx];
      if (req == SET_VRING_ERR) {
        if (fd >= 0) close(fd);
      } else if (req == SET_VRING_CALL) {
        if (r.call >= 0) close(r.call);
        r.call = fd;
        if (fd >= 0) fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
      } else {
        if (r.kick >= 0) close(r.kick);
        r.kick = fd;
        if (fd >= 0) fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        // Started by its kick fd; without PROTOCOL_FEATURES also enabled by it.
        r.started = fd >= 0 && r.have_addr && r.num != 0;
        if (!(acked_ & F_PROTOCOL)) r.enabled = r.started;
        if (fd < 0) logf("ring %u: no kick fd (polling front-end not supported); ring idle", idx);
      }
      start_worker();
      break;
    }
    default:
      return bad("not supported by this back-end");
  }
  if (!own_reply && (flags & kFlagNeedReply) && (proto_ & P_REPLY_ACK)) {
    uint64_t status = ok ? 0 : 1;
    reply(conn, req, &status, 8);
  }
  return true;
}

// Reads exactly `len` bytes, each wait bounded (a peer stuck mid-message is dropped).
bool read_full(int fd, uint8_t* buf, size_t len) {
  size_t off = 0;
  while (off < len) {
    pollfd pf{fd, POLLIN, 0};
    int rc = poll(&pf, 1, 5000);
    if (rc == 0) return false;
    if (rc < 0) { if (errno == EINTR) continue; return false; }
    ssize_t n = read(fd, buf + off, len - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    off += size_t(n);
  }
  return true;
}

bool Device::serve(int conn, int sig_fd) {
  std::vector<uint8_t> payload(kMaxPayload);
  bool keep_running = true;
  for (;;) {
    pollfd pf[2] = {{conn, POLLIN, 0}, {sig_fd, POLLIN, 0}};
    if (poll(pf, 2, -1) < 0) { if (errno == EINTR) continue; break; }
    if (pf[1].revents & POLLIN) { keep_running = false; break; }
    if (!(pf[0].revents & (POLLIN | POLLHUP | POLLERR))) continue;
    uint32_t hdr[3];
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxRegions)];
    iovec iov{hdr, 12};
    msghdr mh{};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = control;
    mh.msg_controllen = sizeof(control);
    ssize_t n = recvmsg(conn, &mh, MSG_CMSG_CLOEXEC);
    std::vector<int> fds;
    for (cmsghdr* c = CMSG_FIRSTHDR(&mh); c != nullptr; c = CMSG_NXTHDR(&mh, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t j = 0; j < k; j++) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(c) + j * sizeof(int), sizeof(int));
        fds.push_back(fd);
      }
    }
    auto drop = [&](const char* why) {
      for (int fd : fds) close(fd);
      if (why != nullptr) logf("%s; closing the connection", why);
    };
    if (n == 0) { drop(nullptr); break; }
    if (n < 0) { if (errno == EINTR) continue; drop("recvmsg failed"); break; }
    if (mh.msg_flags & MSG_CTRUNC) { drop("too many fds"); break; }
    if (n < 12 && !read_full(conn, reinterpret_cast<uint8_t*>(hdr) + n, 12 - size_t(n))) { drop("short header"); break; }
    if ((hdr[1] & 0x3) != kFlagVersion || hdr[2] > kMaxPayload) { drop("bad header (version or size)"); break; }
    if (hdr[2] > 0 && !read_full(conn, payload.data(), hdr[2])) { drop("short payload"); break; }
    bool ok = handle(hdr[0], hdr[1], payload.data(), hdr[2], fds, conn);
    drop(nullptr);  // fds not taken by the handler
    if (!ok) break;
  }
  reset();
  return keep_running;
}

}  // namespace

int main(int argc, char** argv) {
  std::string sock;
  uint32_t queues = 2, blk = 512;
  uint64_t size_mib = 1024, poll_us = 50;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) { logf("%s needs a value", a.c_str()); std::exit(1); }
      return argv[++i];
    };
    if (a == "--socket") sock = next();
    else if (a == "--queues") queues = uint32_t(std::strtoul(next(), nullptr, 0));
    else if (a == "--size") size_mib = std::strtoull(next(), nullptr, 0);
    else if (a == "--blocksize") blk = uint32_t(std::strtoul(next(), nullptr, 0));
    else if (a == "--poll-us") poll_us = std::strtoull(next(), nullptr, 0);
    else if (a == "--quiet") g_quiet = true;
    else if (a == "--help") {
      std::printf("usage: vhost-ceiling --socket PATH [--queues N (2)] [--size MIB (1024)] [--blocksize B (512)] [--poll-us US (50; 0 = sleep after every batch)] [--quiet]\n");
      return 0;
    } else { logf("unknown option %s", a.c_str()); return 1; }
  }
  if (sock.empty() || queues == 0 || queues > kMaxQueues || size_mib == 0 || poll_us > 1000000 ||
      (blk != 512 && blk != 1024 && blk != 2048 && blk != 4096)) {
    logf("need --socket; --queues 1..%u, --size > 0, --blocksize 512..4096 (power of two), --poll-us <= 1e6", kMaxQueues);
    return 1;
  }
  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGINT);
  pthread_sigmask(SIG_BLOCK, &mask, nullptr);  // before any thread: all inherit it
  int sig_fd = signalfd(-1, &mask, SFD_CLOEXEC);
  int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (sock.size() >= sizeof(addr.sun_path)) { logf("socket path too long"); return 1; }
  // Bound under a temporary name and renamed once listening: a client that sees the path never
  // finds it refusing connections (bind makes the file appear before listen).
  const std::string tmp = sock + ".tmp";
  if (tmp.size() >= sizeof(addr.sun_path)) { logf("socket path too long"); return 1; }
  std::strcpy(addr.sun_path, tmp.c_str());
  unlink(tmp.c_str());
  if (sig_fd < 0 || lfd < 0 || bind(lfd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || listen(lfd, 1) != 0 ||
      rename(tmp.c_str(), sock.c_str()) != 0) {
    logf("listening on %s: %s", sock.c_str(), std::strerror(errno));
    return 1;
  }
  if (!g_quiet) logf("serving %u queues, %llu MiB, %u-byte blocks, poll %llu us on %s", queues, (unsigned long long)size_mib, blk, (unsigned long long)poll_us, sock.c_str());
  Device dev(queues, size_mib << 11, blk, poll_us * 1000);
  for (;;) {
    pollfd pf[2] = {{lfd, POLLIN, 0}, {sig_fd, POLLIN, 0}};
    if (poll(pf, 2, -1) < 0) { if (errno == EINTR) continue; break; }
    if (pf[1].revents & POLLIN) break;
    int conn = accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
    if (conn < 0) continue;
    bool more = dev.serve(conn, sig_fd);
    close(conn);
    if (!more) break;
  }
  unlink(sock.c_str());
  close(lfd);
  if (!g_quiet) logf("exiting");
  return 0;
}
