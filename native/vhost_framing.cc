#include "vhost_framing.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

namespace rnull {
namespace {

void CloseFds(const int* fds, size_t n) {
  for (size_t i = 0; i < n; i++) ::close(fds[i]);
}

// Room for more fds than a message may carry, so that a few too many are reported as such
// (and closed) rather than truncated; beyond this the kernel truncates (MSG_CTRUNC) and closes
// the excess itself.
constexpr size_t kControlFds = 2 * kMaxMessageFds;

}  // namespace

MessageAssembler::MessageAssembler(size_t maxPayload) : buf_(kVhostHeaderSize + maxPayload), maxPayload_(maxPayload) {}

MessageAssembler::~MessageAssembler() { Reset(); }

size_t MessageAssembler::wanted() const {
  if (failed_) return 0;
  if (have_ < kVhostHeaderSize) return kVhostHeaderSize - have_;
  return kVhostHeaderSize + size_ - have_;
}

MessageAssembler::Status MessageAssembler::Fail(std::string why) {
  Reset();
  failed_ = true;
  error_ = std::move(why);
  return Status::kError;
}

MessageAssembler::Status MessageAssembler::Received(size_t n, const int* fds, size_t nfds) {
  if (failed_ || n == 0 || n > wanted()) {
    CloseFds(fds, nfds);
    if (failed_) return Status::kError;
    return Fail("internal error: " + std::to_string(n) + " bytes received where " + std::to_string(wanted()) + " were wanted");
  }
  if (nfds > 0) {
    if (have_ > 0) {
      CloseFds(fds, nfds);
      return Fail(std::to_string(nfds) + " fds arrived in the middle of a message (at byte " + std::to_string(have_) +
                  "): fds must ride on a message's first byte");
    }
    if (fds_.size() + nfds > kMaxMessageFds) {
      size_t total = fds_.size() + nfds;
      CloseFds(fds, nfds);
      return Fail(std::to_string(total) + " fds on one message, at most " + std::to_string(kMaxMessageFds));
    }
    fds_.insert(fds_.end(), fds, fds + nfds);
  }
  size_t before = have_;
  have_ += n;
  if (before < kVhostHeaderSize && have_ >= kVhostHeaderSize) {
    memcpy(&size_, buf_.data() + 8, sizeof size_);  // little-endian host (x86-64, aarch64)
    if (size_ > maxPayload_) {
      uint32_t size = size_;
      return Fail("message payload of " + std::to_string(size) + " bytes exceeds the limit of " + std::to_string(maxPayload_));
    }
  }
  return complete() ? Status::kComplete : Status::kIncomplete;
}

void MessageAssembler::TakeFds(std::vector<int>* out) {
  out->insert(out->end(), fds_.begin(), fds_.end());
  fds_.clear();
  have_ = 0;
  size_ = 0;
}

void MessageAssembler::Reset() {
  CloseFds(fds_.data(), fds_.size());
  fds_.clear();
  have_ = 0;
  size_ = 0;
  failed_ = false;
  error_.clear();
}

RecvResult ReceiveMessage(int sock, MessageAssembler* a, std::string* error) {
  if (a->failed()) {
    *error = a->error();
    return RecvResult::kError;
  }
  while (!a->complete()) {
    struct iovec iov = {a->writePtr(), a->wanted()};
    alignas(struct cmsghdr) char control[CMSG_SPACE(sizeof(int) * kControlFds)];
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t n = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return RecvResult::kAgain;
      *error = std::string("recvmsg: ") + strerror(errno);
      a->Reset();
      return RecvResult::kError;
    }
    int fds[kControlFds];
    size_t nfds = 0;
    for (struct cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS || c->cmsg_len < CMSG_LEN(0)) continue;
      size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      const unsigned char* src = CMSG_DATA(c);
      for (size_t i = 0; i < count && nfds < kControlFds; i++) memcpy(&fds[nfds++], src + i * sizeof(int), sizeof(int));
    }
    if (msg.msg_flags & MSG_CTRUNC) {
      CloseFds(fds, nfds);
      a->Reset();
      *error = "more fds than a message may carry (control data truncated)";
      return RecvResult::kError;
    }
    if (n == 0) {
      CloseFds(fds, nfds);
      a->Reset();
      return RecvResult::kEof;
    }
    if (a->Received(static_cast<size_t>(n), fds, nfds) == MessageAssembler::Status::kError) {
      *error = a->error();
      a->Reset();
      return RecvResult::kError;
    }
  }
  return RecvResult::kMessage;
}

ssize_t SendMessageNow(int sock, const uint8_t* p, size_t len, const int* fds, size_t nfds) {
  if (nfds > kMaxSendFds) {
    errno = EINVAL;
    return -1;
  }
  struct iovec iov = {const_cast<uint8_t*>(p), len};
  std::vector<uint64_t> control((CMSG_SPACE(sizeof(int) * nfds) + 7) / 8);  // 8-byte aligned for cmsghdr
  struct msghdr msg;
  memset(&msg, 0, sizeof msg);
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (nfds > 0) {
    msg.msg_control = control.data();
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    struct cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
  }
  for (;;) {
    ssize_t n = ::sendmsg(sock, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n >= 0) return n;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
    return -1;
  }
}

}  // namespace rnull
