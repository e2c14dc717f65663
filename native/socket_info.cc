#include "socket_info.h"

#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <string>

#include "errors.h"

namespace rnull {
namespace {

// socketInfo(fd): null when fd is open but not a socket; otherwise { domain, type, listening,
// path } from SO_DOMAIN, SO_TYPE, SO_ACCEPTCONN and getsockname (path: the bound unix path,
// '@name' for an abstract one, '' when unbound or not AF_UNIX). SyscallError (EBADF) for a
// closed fd. Reads only; changes nothing on the fd.
Napi::Value SocketInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int64_t fd;
  if (!ArgInt(info, 0, "fd", &fd)) return Napi::Value();
  struct stat st;
  if (::fstat(static_cast<int>(fd), &st) < 0) {
    ThrowSyscallError(env, "fstat", errno);
    return Napi::Value();
  }
  if (!S_ISSOCK(st.st_mode)) return env.Null();
  int domain = -1, type = -1, accepting = 0;
  socklen_t l = sizeof domain;
  if (::getsockopt(static_cast<int>(fd), SOL_SOCKET, SO_DOMAIN, &domain, &l) < 0) {
    ThrowSyscallError(env, "getsockopt", errno);
    return Napi::Value();
  }
  l = sizeof type;
  if (::getsockopt(static_cast<int>(fd), SOL_SOCKET, SO_TYPE, &type, &l) < 0) {
    ThrowSyscallError(env, "getsockopt", errno);
    return Napi::Value();
  }
  l = sizeof accepting;
  if (::getsockopt(static_cast<int>(fd), SOL_SOCKET, SO_ACCEPTCONN, &accepting, &l) < 0) accepting = 0;
  std::string path;
  if (domain == AF_UNIX) {
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    socklen_t al = sizeof addr;
    if (::getsockname(static_cast<int>(fd), reinterpret_cast<struct sockaddr*>(&addr), &al) == 0 && al > offsetof(struct sockaddr_un, sun_path)) {
      size_t n = al - offsetof(struct sockaddr_un, sun_path);
      if (addr.sun_path[0] == '\0') path = "@" + std::string(addr.sun_path + 1, n - 1);
      else path = std::string(addr.sun_path, strnlen(addr.sun_path, n));
    }
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("domain", Napi::String::New(env, domain == AF_UNIX ? "unix" : domain == AF_INET ? "inet" : domain == AF_INET6 ? "inet6" : "other"));
  o.Set("type", Napi::String::New(env, type == SOCK_STREAM ? "stream" : type == SOCK_DGRAM ? "dgram" : type == SOCK_SEQPACKET ? "seqpacket" : "other"));
  o.Set("listening", Napi::Boolean::New(env, accepting != 0));
  o.Set("path", Napi::String::New(env, path));
  return o;
}

}  // namespace

void InitSocketInfo(Napi::Env env, Napi::Object exports) {
  exports.Set("socketInfo", Napi::Function::New(env, SocketInfo, "socketInfo"));
}

}  // namespace rnull
