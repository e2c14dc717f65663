#include "vhost_user.h"

#include <pthread.h>
#include <sched.h>

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "common.h"

namespace vb {

namespace {

constexpr uint32_t kHeaderSize = 12;
constexpr uint32_t kFlagVersion = 0x1;
constexpr uint32_t kFlagReply = 0x4;
constexpr uint32_t kFlagNeedReply = 0x8;
constexpr int kMaxFds = 8;

struct Header {
  uint32_t request;
  uint32_t flags;
  uint32_t size;
};
static_assert(sizeof(Header) == kHeaderSize, "vhost-user header is 12 bytes");

#pragma pack(push, 1)
struct VringState {
  uint32_t index;
  uint32_t num;
};
struct VringAddr {
  uint32_t index;
  uint32_t flags;
  uint64_t desc_user_addr;
  uint64_t used_user_addr;
  uint64_t avail_user_addr;
  uint64_t log_guest_addr;
};
struct MemTable {
  uint32_t nregions;
  uint32_t padding;
  VuRegion regions[kMaxFds];
};
struct ConfigHeader {
  uint32_t offset;
  uint32_t size;
  uint32_t flags;
};
#pragma pack(pop)
static_assert(sizeof(VringAddr) == 40, "vring address payload");
static_assert(sizeof(MemTable) == 8 + 8 * 32, "memory table payload");

}  // namespace

Error sys_error(const std::string& what, int err) { return Error(what + ": " + std::strerror(err)); }

int pin_current_thread(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

const char* vu_req_name(uint32_t req) {
  switch (req) {
    case VU_GET_FEATURES: return "GET_FEATURES";
    case VU_SET_FEATURES: return "SET_FEATURES";
    case VU_SET_OWNER: return "SET_OWNER";
    case VU_SET_MEM_TABLE: return "SET_MEM_TABLE";
    case VU_SET_VRING_NUM: return "SET_VRING_NUM";
    case VU_SET_VRING_ADDR: return "SET_VRING_ADDR";
    case VU_SET_VRING_BASE: return "SET_VRING_BASE";
    case VU_GET_VRING_BASE: return "GET_VRING_BASE";
    case VU_SET_VRING_KICK: return "SET_VRING_KICK";
    case VU_SET_VRING_CALL: return "SET_VRING_CALL";
    case VU_GET_PROTOCOL_FEATURES: return "GET_PROTOCOL_FEATURES";
    case VU_SET_PROTOCOL_FEATURES: return "SET_PROTOCOL_FEATURES";
    case VU_GET_QUEUE_NUM: return "GET_QUEUE_NUM";
    case VU_SET_VRING_ENABLE: return "SET_VRING_ENABLE";
    case VU_GET_CONFIG: return "GET_CONFIG";
    default: return "?";
  }
}

VhostUserConn::VhostUserConn(const std::string& path, int timeout_ms) : timeout_ms_(timeout_ms) {
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  if (path.size() >= sizeof(sa.sun_path)) throw Error("socket path too long: " + path);
  std::memcpy(sa.sun_path, path.c_str(), path.size() + 1);
  const uint64_t deadline = now_ns() + uint64_t(timeout_ms) * 1000000ull;
  for (;;) {
    fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd_ < 0) throw sys_error("socket", errno);
    if (connect(fd_, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) == 0) return;
    int err = errno;
    close(fd_);
    fd_ = -1;
    // The back-end may not be listening yet: retry for a bounded time.
    if ((err == ENOENT || err == ECONNREFUSED) && now_ns() < deadline) {
      usleep(20000);
      continue;
    }
    throw sys_error("connect " + path, err);
  }
}

VhostUserConn::~VhostUserConn() {
  if (fd_ >= 0) close(fd_);
}

void VhostUserConn::send_msg(uint32_t req, bool need_reply, const void* payload, uint32_t size, const int* fds, int nfds) {
  Header h{req, kFlagVersion | (need_reply ? kFlagNeedReply : 0u), size};
  iovec iov[2];
  iov[0].iov_base = &h;
  iov[0].iov_len = sizeof(h);
  iov[1].iov_base = const_cast<void*>(payload);
  iov[1].iov_len = size;
  msghdr mh{};
  mh.msg_iov = iov;
  mh.msg_iovlen = size > 0 ? 2 : 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
  if (nfds > 0) {
    if (nfds > kMaxFds) throw Error("too many file descriptors for one message");
    std::memset(control, 0, sizeof(control));
    mh.msg_control = control;
    mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    cmsghdr* c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    std::memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
  }
  size_t total = sizeof(h) + size;
  ssize_t n;
  do {
    n = sendmsg(fd_, &mh, MSG_NOSIGNAL);
  } while (n < 0 && errno == EINTR);
  if (n < 0) throw sys_error(std::string("send ") + vu_req_name(req), errno);
  // Messages are small; a short write on a unix stream socket is not expected, but finish it.
  size_t done = size_t(n);
  while (done < total) {
    const uint8_t* src = done < sizeof(h) ? reinterpret_cast<const uint8_t*>(&h) + done
                                          : static_cast<const uint8_t*>(payload) + (done - sizeof(h));
    size_t chunk = done < sizeof(h) ? sizeof(h) - done : total - done;
    ssize_t m = send(fd_, src, chunk, MSG_NOSIGNAL);
    if (m < 0 && errno == EINTR) continue;
    if (m < 0) throw sys_error(std::string("send ") + vu_req_name(req), errno);
    done += size_t(m);
  }
}

// Reads len bytes; with fd_out, an fd riding on them (SCM_RIGHTS) is returned there (else -1).
void VhostUserConn::read_full(void* buf, size_t len, uint32_t req, int* fd_out) {
  if (fd_out != nullptr) *fd_out = -1;
  uint8_t* p = static_cast<uint8_t*>(buf);
  const uint64_t deadline = now_ns() + uint64_t(timeout_ms_) * 1000000ull;
  while (len > 0) {
    uint64_t now = now_ns();
    if (now >= deadline) throw Error(std::string("no reply to ") + vu_req_name(req) + " within the timeout");
    pollfd pfd{fd_, POLLIN, 0};
    int r = poll(&pfd, 1, int((deadline - now) / 1000000ull) + 1);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw sys_error("poll", errno);
    if (r == 0) continue;
    ssize_t n;
    if (fd_out != nullptr) {
      iovec iov{p, len};
      alignas(cmsghdr) char ctl[CMSG_SPACE(sizeof(int) * kMaxFds)];
      msghdr mh{};
      mh.msg_iov = &iov;
      mh.msg_iovlen = 1;
      mh.msg_control = ctl;
      mh.msg_controllen = sizeof ctl;
      n = recvmsg(fd_, &mh, MSG_CMSG_CLOEXEC);
      for (cmsghdr* c = n > 0 ? CMSG_FIRSTHDR(&mh) : nullptr; c != nullptr; c = CMSG_NXTHDR(&mh, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t nfds = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t k = 0; k < nfds; k++) {
          int fd;
          std::memcpy(&fd, CMSG_DATA(c) + k * sizeof(int), sizeof(int));
          if (*fd_out < 0) *fd_out = fd;
          else close(fd);  // only one is expected
        }
      }
    } else {
      n = recv(fd_, p, len, 0);
    }
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n < 0) throw sys_error(std::string("recv reply to ") + vu_req_name(req), errno);
    if (n == 0) throw Error(std::string("back-end closed the connection while answering ") + vu_req_name(req));
    p += n;
    len -= size_t(n);
  }
}

std::vector<uint8_t> VhostUserConn::recv_reply(uint32_t req, uint32_t expect_size) {
  Header h;
  read_full(&h, sizeof(h), req);
  if (h.request != req) {
    throw Error(std::string("reply to ") + vu_req_name(req) + " carries request code " + std::to_string(h.request));
  }
  if ((h.flags & 0x3) != kFlagVersion || !(h.flags & kFlagReply)) {
    throw Error(std::string("reply to ") + vu_req_name(req) + " has bad flags " + std::to_string(h.flags));
  }
  if (h.size > 4096) throw Error(std::string("reply to ") + vu_req_name(req) + " too large");
  std::vector<uint8_t> payload(h.size);
  if (h.size > 0) read_full(payload.data(), h.size, req);
  if (expect_size != 0 && h.size != expect_size) {
    throw Error(std::string("reply to ") + vu_req_name(req) + " has " + std::to_string(h.size) + " payload bytes, expected " +
                std::to_string(expect_size));
  }
  return payload;
}

int VhostUserConn::get_inflight_fd(uint16_t num_queues, uint16_t queue_size, VuInflight* out) {
  uint8_t p[24] = {};
  std::memcpy(p + 16, &num_queues, 2);
  std::memcpy(p + 18, &queue_size, 2);
  send_msg(VU_GET_INFLIGHT_FD, false, p, sizeof p, nullptr, 0);
  Header h;
  int fd = -1;
  read_full(&h, sizeof(h), VU_GET_INFLIGHT_FD, &fd);
  if (h.request != VU_GET_INFLIGHT_FD || (h.flags & 0x3) != kFlagVersion || !(h.flags & kFlagReply) || h.size != 24) {
    if (fd >= 0) close(fd);
    throw Error("bad reply to GET_INFLIGHT_FD");
  }
  uint8_t r[24];
  read_full(r, sizeof r, VU_GET_INFLIGHT_FD);
  std::memcpy(&out->mmap_size, r, 8);
  std::memcpy(&out->mmap_offset, r + 8, 8);
  std::memcpy(&out->num_queues, r + 16, 2);
  std::memcpy(&out->queue_size, r + 18, 2);
  if (out->mmap_size != 0 && fd < 0) throw Error("GET_INFLIGHT_FD reply without an fd");
  return fd;
}

void VhostUserConn::set_inflight_fd(int fd, const VuInflight& d) {
  uint8_t p[24] = {};
  std::memcpy(p, &d.mmap_size, 8);
  std::memcpy(p + 8, &d.mmap_offset, 8);
  std::memcpy(p + 16, &d.num_queues, 2);
  std::memcpy(p + 18, &d.queue_size, 2);
  send_set(VU_SET_INFLIGHT_FD, p, sizeof p, &fd, 1);
}

uint64_t VhostUserConn::recv_u64(uint32_t req) {
  std::vector<uint8_t> p = recv_reply(req, 8);
  uint64_t v;
  std::memcpy(&v, p.data(), 8);
  return v;
}

void VhostUserConn::send_set(uint32_t req, const void* payload, uint32_t size, const int* fds, int nfds) {
  send_msg(req, reply_ack_, payload, size, fds, nfds);
  if (!reply_ack_) return;
  uint64_t v = recv_u64(req);
  if (v != 0) throw Error(std::string("back-end refused ") + vu_req_name(req) + " (ack " + std::to_string(v) + ")");
}

uint64_t VhostUserConn::get_u64(VuReq req) {
  send_msg(req, false, nullptr, 0, nullptr, 0);
  return recv_u64(req);
}

void VhostUserConn::set_u64(VuReq req, uint64_t value, int fd) {
  if (fd >= 0) {
    send_set(req, &value, 8, &fd, 1);
  } else {
    send_set(req, &value, 8);
  }
}

void VhostUserConn::set_owner() { send_set(VU_SET_OWNER, nullptr, 0); }

void VhostUserConn::set_vring_state(VuReq req, uint32_t index, uint32_t num) {
  VringState s{index, num};
  send_set(req, &s, sizeof(s));
}

uint32_t VhostUserConn::get_vring_base(uint32_t index) {
  VringState s{index, 0};
  send_msg(VU_GET_VRING_BASE, false, &s, sizeof(s), nullptr, 0);
  std::vector<uint8_t> p = recv_reply(VU_GET_VRING_BASE, sizeof(s));
  std::memcpy(&s, p.data(), sizeof(s));
  return s.num;
}

void VhostUserConn::set_vring_addr(uint32_t index, uint64_t desc, uint64_t used, uint64_t avail) {
  VringAddr a{index, 0, desc, used, avail, 0};
  send_set(VU_SET_VRING_ADDR, &a, sizeof(a));
}

void VhostUserConn::set_mem_table(const std::vector<VuRegion>& regions, const std::vector<int>& fds) {
  if (regions.empty() || regions.size() > size_t(kMaxFds) || regions.size() != fds.size()) {
    throw Error("SET_MEM_TABLE takes 1 to 8 regions, one fd each");
  }
  MemTable t{};
  t.nregions = uint32_t(regions.size());
  for (size_t i = 0; i < regions.size(); i++) t.regions[i] = regions[i];
  // The payload covers the regions in use only (header words + nregions entries), as QEMU sends it.
  uint32_t size = uint32_t(8 + sizeof(VuRegion) * regions.size());
  send_set(VU_SET_MEM_TABLE, &t, size, fds.data(), int(fds.size()));
}

std::vector<uint8_t> VhostUserConn::get_config(uint32_t size) {
  std::vector<uint8_t> msg(sizeof(ConfigHeader) + size, 0);
  ConfigHeader h{0, size, 0};
  std::memcpy(msg.data(), &h, sizeof(h));
  send_msg(VU_GET_CONFIG, false, msg.data(), uint32_t(msg.size()), nullptr, 0);
  std::vector<uint8_t> p = recv_reply(VU_GET_CONFIG, 0);
  if (p.empty()) throw Error("back-end answered GET_CONFIG with an empty payload (error)");
  if (p.size() != msg.size()) throw Error("GET_CONFIG reply has " + std::to_string(p.size()) + " bytes, expected " + std::to_string(msg.size()));
  return std::vector<uint8_t>(p.begin() + sizeof(ConfigHeader), p.end());
}

}  // namespace vb
