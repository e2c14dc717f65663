#include "sd_notify.h"

#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <string>

#include "errors.h"

namespace rnull {
namespace {

// notifySend(address, message): sends `message` as one datagram to the unix datagram socket
// `address`: a path, or an abstract name written with a leading '@' (as $NOTIFY_SOCKET does).
// Never waits: the socket is non-blocking, so a manager that does not read makes it fail with
// EAGAIN instead. Returns the bytes sent. RangeError for an empty or over-long address or an
// empty message; SyscallError from socket/sendto.
Napi::Value NotifySend(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsString() || !info[1].IsString()) {
    ThrowTypeError(env, "expected (address: string, message: string)");
    return Napi::Value();
  }
  std::string address = info[0].As<Napi::String>().Utf8Value();
  std::string message = info[1].As<Napi::String>().Utf8Value();
  struct sockaddr_un addr;
  memset(&addr, 0, sizeof addr);
  addr.sun_family = AF_UNIX;
  if (address.size() < 2 && (address.empty() || address[0] == '@')) {
    ThrowRangeError(env, "notify socket address is empty");
    return Napi::Value();
  }
  if (address.size() > sizeof addr.sun_path - (address[0] == '@' ? 0 : 1)) {
    ThrowRangeError(env, "notify socket address is longer than 107 bytes");
    return Napi::Value();
  }
  if (message.empty()) {
    ThrowRangeError(env, "notify message is empty");
    return Napi::Value();
  }
  memcpy(addr.sun_path, address.data(), address.size());
  socklen_t len = static_cast<socklen_t>(offsetof(struct sockaddr_un, sun_path) + address.size());
  if (address[0] == '@') addr.sun_path[0] = '\0';  // abstract: no terminating NUL counted
  else len += 1;
  int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    ThrowSyscallError(env, "socket", errno);
    return Napi::Value();
  }
  ssize_t n;
  do {
    n = ::sendto(fd, message.data(), message.size(), MSG_NOSIGNAL, reinterpret_cast<struct sockaddr*>(&addr), len);
  } while (n < 0 && errno == EINTR);
  int e = errno;
  ::close(fd);
  if (n < 0) {
    ThrowSyscallError(env, "sendto", e);
    return Napi::Value();
  }
  return Napi::Number::New(env, static_cast<double>(n));
}

}  // namespace

void InitSdNotify(Napi::Env env, Napi::Object exports) {
  exports.Set("notifySend", Napi::Function::New(env, NotifySend, "notifySend"));
}

}  // namespace rnull
