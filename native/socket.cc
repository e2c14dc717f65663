#include "socket.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <string>

#include "errors.h"

namespace rnull {
namespace {

// vhost-user message header: request (u32), flags (u32), size (u32); vhost-user.rst "Message format".
constexpr size_t kHeaderSize = 12;
// At most this many fds ride on one message (SET_MEM_TABLE carries one per region, 8 at most).
constexpr size_t kMaxFds = 16;
// A peer that sent a header must deliver its payload within this time, or it is dropped.
constexpr int kPayloadTimeoutMs = 2000;

void CloseAll(const int* fds, size_t n) {
  for (size_t i = 0; i < n; i++) ::close(fds[i]);
}

// Fills `addr` from the path argument; false after throwing for a bad or over-long path.
bool UnixAddress(const Napi::CallbackInfo& info, struct sockaddr_un* addr) {
  if (info.Length() < 1 || !info[0].IsString()) {
    ThrowTypeError(info.Env(), "expected a string for path");
    return false;
  }
  std::string path = info[0].As<Napi::String>().Utf8Value();
  memset(addr, 0, sizeof *addr);
  addr->sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof addr->sun_path) {
    ThrowRangeError(info.Env(), "socket path is empty or longer than 107 bytes");
    return false;
  }
  memcpy(addr->sun_path, path.c_str(), path.size());
  return true;
}

// listenUnix(path): a non-blocking listening SOCK_STREAM unix socket bound at path.
Napi::Value ListenUnix(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  struct sockaddr_un addr;
  if (!UnixAddress(info, &addr)) return Napi::Value();
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    ThrowSyscallError(env, "socket", errno);
    return Napi::Value();
  }
  if (::bind(fd, reinterpret_cast<struct sockaddr*>(&addr), sizeof addr) < 0) {
    int e = errno;
    ::close(fd);
    ThrowSyscallError(env, "bind", e);
    return Napi::Value();
  }
  if (::listen(fd, 8) < 0) {
    int e = errno;
    ::close(fd);
    ThrowSyscallError(env, "listen", e);
    return Napi::Value();
  }
  return Napi::Number::New(env, fd);
}

// connectUnix(path): a connected non-blocking socket (used by test front-ends and stale-socket checks).
Napi::Value ConnectUnix(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  struct sockaddr_un addr;
  if (!UnixAddress(info, &addr)) return Napi::Value();
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);  // blocking for connect(), then non-blocking below
  if (fd < 0) {
    ThrowSyscallError(env, "socket", errno);
    return Napi::Value();
  }
  if (::connect(fd, reinterpret_cast<struct sockaddr*>(&addr), sizeof addr) < 0) {
    int e = errno;
    ::close(fd);
    ThrowSyscallError(env, "connect", e);
    return Napi::Value();
  }
  int fl = ::fcntl(fd, F_GETFL);
  if (fl < 0 || ::fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
    int e = errno;
    ::close(fd);
    ThrowSyscallError(env, "fcntl", e);
    return Napi::Value();
  }
  return Napi::Number::New(env, fd);
}

// acceptUnix(listenFd): a connected non-blocking fd, or -1 when no connection is pending.
Napi::Value AcceptUnix(const Napi::CallbackInfo& info) {
  int64_t lfd;
  if (!ArgInt(info, 0, "fd", &lfd)) return Napi::Value();
  int fd = ::accept4(static_cast<int>(lfd), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (fd < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNABORTED) return Napi::Number::New(info.Env(), -1);
    ThrowSyscallError(info.Env(), "accept4", errno);
    return Napi::Value();
  }
  return Napi::Number::New(info.Env(), fd);
}

// Reads exactly len bytes (the rest of a message) from a non-blocking socket, waiting at most
// kPayloadTimeoutMs for each part. Returns 0, or an errno value (ETIMEDOUT, ECONNRESET on EOF).
int ReadFull(int fd, uint8_t* p, size_t len) {
  while (len > 0) {
    ssize_t n = ::recv(fd, p, len, 0);
    if (n > 0) {
      p += n;
      len -= static_cast<size_t>(n);
      continue;
    }
    if (n == 0) return ECONNRESET;
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return errno;
    struct pollfd pfd = {fd, POLLIN, 0};
    int r = ::poll(&pfd, 1, kPayloadTimeoutMs);
    if (r == 0) return ETIMEDOUT;
    if (r < 0 && errno != EINTR) return errno;
  }
  return 0;
}

// recvMessage(fd, buf): reads one whole vhost-user message (header + payload) into buf.
// Returns { length, fds } with length = 12 + payload size, null when nothing is pending,
// or { length: 0, fds: [] } at end of stream. A payload larger than buf, truncated fd
// control data, or a peer stalling mid-message throws (received fds are closed first).
Napi::Value RecvMessage(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int64_t fd64;
  if (!ArgInt(info, 0, "fd", &fd64)) return Napi::Value();
  if (info.Length() < 2 || !info[1].IsBuffer()) {
    ThrowTypeError(env, "expected a Buffer for buf");
    return Napi::Value();
  }
  int fd = static_cast<int>(fd64);
  Napi::Buffer<uint8_t> buf = info[1].As<Napi::Buffer<uint8_t>>();
  if (buf.Length() < kHeaderSize) {
    ThrowRangeError(env, "buffer smaller than a message header");
    return Napi::Value();
  }
  uint8_t* data = buf.Data();

  struct iovec iov = {data, kHeaderSize};
  alignas(struct cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
  struct msghdr msg;
  memset(&msg, 0, sizeof msg);
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  ssize_t n;
  do {
    n = ::recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return env.Null();
    ThrowSyscallError(env, "recvmsg", errno);
    return Napi::Value();
  }

  int fds[kMaxFds];
  size_t nfds = 0;
  for (struct cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    const unsigned char* src = CMSG_DATA(c);
    for (size_t i = 0; i < count && nfds < kMaxFds; i++) memcpy(&fds[nfds++], src + i * sizeof(int), sizeof(int));
  }
  if (msg.msg_flags & MSG_CTRUNC) {
    CloseAll(fds, nfds);
    ThrowError(env, "vhost-user message carried more fds than allowed (control data truncated)");
    return Napi::Value();
  }

  Napi::Object result = Napi::Object::New(env);
  if (n == 0) {
    CloseAll(fds, nfds);
    result.Set("length", Napi::Number::New(env, 0));
    result.Set("fds", Napi::Array::New(env, 0));
    return result;
  }
  int err = 0;
  if (static_cast<size_t>(n) < kHeaderSize) err = ReadFull(fd, data + n, kHeaderSize - static_cast<size_t>(n));
  uint32_t size = 0;
  if (err == 0) {
    memcpy(&size, data + 8, sizeof size);  // little-endian host (x86-64, aarch64)
    if (size > buf.Length() - kHeaderSize) {
      CloseAll(fds, nfds);
      std::string m = "vhost-user message payload of " + std::to_string(size) + " bytes exceeds the limit of " +
                      std::to_string(buf.Length() - kHeaderSize);
      ThrowRangeError(env, m.c_str());
      return Napi::Value();
    }
    err = ReadFull(fd, data + kHeaderSize, size);
  }
  if (err != 0) {
    CloseAll(fds, nfds);
    ThrowSyscallError(env, "recv", err);
    return Napi::Value();
  }
  Napi::Array arr = Napi::Array::New(env, nfds);
  for (size_t i = 0; i < nfds; i++) arr.Set(static_cast<uint32_t>(i), Napi::Number::New(env, fds[i]));
  result.Set("length", Napi::Number::New(env, static_cast<double>(kHeaderSize + size)));
  result.Set("fds", arr);
  return result;
}

// sendMessage(fd, buf, length, fds?): writes buf[0..length) whole, the fds (SCM_RIGHTS) riding
// on the first byte. Waits for socket space (the peer is expected to read its replies).
Napi::Value SendMessage(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int64_t fd64, len64;
  if (!ArgInt(info, 0, "fd", &fd64)) return Napi::Value();
  if (info.Length() < 2 || !info[1].IsBuffer()) {
    ThrowTypeError(env, "expected a Buffer for buf");
    return Napi::Value();
  }
  if (!ArgInt(info, 2, "length", &len64)) return Napi::Value();
  Napi::Buffer<uint8_t> buf = info[1].As<Napi::Buffer<uint8_t>>();
  if (len64 < 0 || static_cast<uint64_t>(len64) > buf.Length()) {
    ThrowRangeError(env, "length outside the buffer");
    return Napi::Value();
  }
  int fds[kMaxFds];
  size_t nfds = 0;
  if (info.Length() > 3 && info[3].IsArray()) {
    Napi::Array a = info[3].As<Napi::Array>();
    if (a.Length() > kMaxFds) {
      ThrowRangeError(env, "too many fds for one message");
      return Napi::Value();
    }
    for (uint32_t i = 0; i < a.Length(); i++) fds[nfds++] = a.Get(i).As<Napi::Number>().Int32Value();
  }
  int fd = static_cast<int>(fd64);
  const uint8_t* p = buf.Data();
  size_t left = static_cast<size_t>(len64);
  bool first = true;
  while (left > 0 || first) {
    struct iovec iov = {const_cast<uint8_t*>(p), left};
    alignas(struct cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (first && nfds > 0) {
      msg.msg_control = control;
      msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
      struct cmsghdr* c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
      memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    }
    ssize_t n = ::sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        struct pollfd pfd = {fd, POLLOUT, 0};
        if (::poll(&pfd, 1, kPayloadTimeoutMs) == 0) {
          ThrowSyscallError(env, "sendmsg", ETIMEDOUT);
          return Napi::Value();
        }
        continue;
      }
      ThrowSyscallError(env, "sendmsg", errno);
      return Napi::Value();
    }
    first = false;
    p += n;
    left -= static_cast<size_t>(n);
  }
  return env.Undefined();
}

}  // namespace

void InitSocket(Napi::Env env, Napi::Object exports) {
  exports.Set("listenUnix", Napi::Function::New(env, ListenUnix, "listenUnix"));
  exports.Set("connectUnix", Napi::Function::New(env, ConnectUnix, "connectUnix"));
  exports.Set("acceptUnix", Napi::Function::New(env, AcceptUnix, "acceptUnix"));
  exports.Set("recvMessage", Napi::Function::New(env, RecvMessage, "recvMessage"));
  exports.Set("sendMessage", Napi::Function::New(env, SendMessage, "sendMessage"));
}

}  // namespace rnull
