#include "socket.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <memory>
#include <string>
#include <vector>

#include "errors.h"
#include "fd_ops.h"
#include "vhost_framing.h"

namespace rnull {
namespace {

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

// listenUnix(path, mode?, gid?): a non-blocking listening SOCK_STREAM unix socket bound at path.
// With mode (permission bits) and/or gid (>= 0), the socket file gets them after bind and before
// listen, so no peer can connect while it has the umask's mode. SyscallError from any step (the
// file is removed again if chmod/chown fail).
Napi::Value ListenUnix(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  struct sockaddr_un addr;
  if (!UnixAddress(info, &addr)) return Napi::Value();
  int64_t mode = -1, gid = -1;
  if (info.Length() > 1 && !info[1].IsUndefined() && !ArgInt(info, 1, "mode", &mode)) return Napi::Value();
  if (info.Length() > 2 && !info[2].IsUndefined() && !ArgInt(info, 2, "gid", &gid)) return Napi::Value();
  if (mode > 0777 || gid > 0xfffffffeLL) {
    ThrowRangeError(env, "mode must be permission bits (0 to 0777) and gid a group id");
    return Napi::Value();
  }
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
  const char* step = nullptr;
  if (gid >= 0 && ::chown(addr.sun_path, static_cast<uid_t>(-1), static_cast<gid_t>(gid)) < 0) step = "chown";
  else if (mode >= 0 && ::chmod(addr.sun_path, static_cast<mode_t>(mode)) < 0) step = "chmod";
  if (step != nullptr) {
    int e = errno;
    ::unlink(addr.sun_path);
    ::close(fd);
    ThrowSyscallError(env, step, e);
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
  if (int e = SetFdNonBlocking(fd, true, nullptr)) {
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

// sendMessage(fd, buf, length, fds?): one non-blocking sendmsg of buf[0..length), the fds
// (SCM_RIGHTS) riding on its first byte. Never waits: returns the bytes sent, fewer than length
// (0: none) when the peer's socket buffer is full. SyscallError for other failures (EPIPE).
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
  std::vector<int> fds;
  if (info.Length() > 3 && info[3].IsArray()) {
    Napi::Array a = info[3].As<Napi::Array>();
    if (a.Length() > kMaxSendFds) {
      ThrowRangeError(env, "too many fds for one message");
      return Napi::Value();
    }
    for (uint32_t i = 0; i < a.Length(); i++) {
      Napi::Value v = a.Get(i);
      if (!v.IsNumber()) {
        ThrowTypeError(env, "expected numbers in fds");
        return Napi::Value();
      }
      fds.push_back(v.As<Napi::Number>().Int32Value());
    }
  }
  ssize_t n = SendMessageNow(static_cast<int>(fd64), buf.Data(), static_cast<size_t>(len64), fds.data(), fds.size());
  if (n < 0) {
    ThrowSyscallError(env, "sendmsg", errno);
    return Napi::Value();
  }
  return Napi::Number::New(env, static_cast<double>(n));
}

// MessageReader: one connection's message assembly (vhost_framing.h) for JavaScript.
class MessageReader : public Napi::ObjectWrap<MessageReader> {
 public:
  static void Init(Napi::Env env, Napi::Object exports) {
    Napi::Function f = DefineClass(env, "MessageReader",
                                   {InstanceMethod<&MessageReader::Receive>("receive"),
                                    InstanceAccessor<&MessageReader::Buffered>("buffered"),
                                    InstanceAccessor<&MessageReader::PendingRequest>("pendingRequest"),
                                    InstanceMethod<&MessageReader::Close>("close")});
    exports.Set("MessageReader", f);
  }

  // new MessageReader(maxPayload): payloads above maxPayload bytes (at most 1 MiB) are refused.
  explicit MessageReader(const Napi::CallbackInfo& info) : Napi::ObjectWrap<MessageReader>(info) {
    int64_t max;
    if (!ArgInt(info, 0, "maxPayload", &max)) return;
    if (max < 0 || max > (1 << 20)) {
      ThrowRangeError(info.Env(), "maxPayload must be 0 to 1048576 bytes");
      return;
    }
    assembler_.reset(new MessageAssembler(static_cast<size_t>(max)));
  }

 private:
  // receive(fd, buf): reads what the socket has, without waiting. A complete message is copied
  // to buf: { length (12 + payload size), fds } (the caller owns the fds); null when no message
  // is complete yet (`buffered` bytes of one may be held); { length: 0, fds: [] } at end of
  // stream. A malformed stream (payload over the limit, misplaced or too many fds) throws an
  // Error naming the problem, after closing every fd held.
  Napi::Value Receive(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t fd;
    if (!ArgInt(info, 0, "fd", &fd)) return Napi::Value();
    if (info.Length() < 2 || !info[1].IsBuffer()) {
      ThrowTypeError(env, "expected a Buffer for buf");
      return Napi::Value();
    }
    Napi::Buffer<uint8_t> buf = info[1].As<Napi::Buffer<uint8_t>>();
    if (assembler_ == nullptr) {
      ThrowError(env, "MessageReader is closed");
      return Napi::Value();
    }
    std::string error;
    RecvResult r = ReceiveMessage(static_cast<int>(fd), assembler_.get(), &error);
    if (r == RecvResult::kAgain) return env.Null();
    Napi::Object result = Napi::Object::New(env);
    if (r == RecvResult::kEof) {
      result.Set("length", Napi::Number::New(env, 0));
      result.Set("fds", Napi::Array::New(env, 0));
      return result;
    }
    if (r == RecvResult::kError) {
      ThrowError(env, error.c_str());
      return Napi::Value();
    }
    std::vector<int> fds;
    size_t len = assembler_->length();
    if (len > buf.Length()) {
      assembler_->TakeFds(&fds);
      for (int f : fds) ::close(f);
      ThrowRangeError(env, "buffer smaller than the message");
      return Napi::Value();
    }
    memcpy(buf.Data(), assembler_->message(), len);
    assembler_->TakeFds(&fds);
    Napi::Array arr = Napi::Array::New(env, fds.size());
    for (size_t i = 0; i < fds.size(); i++) arr.Set(static_cast<uint32_t>(i), Napi::Number::New(env, fds[i]));
    result.Set("length", Napi::Number::New(env, static_cast<double>(len)));
    result.Set("fds", arr);
    return result;
  }

  // buffered: bytes of a message not complete yet (0 between messages).
  Napi::Value Buffered(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), assembler_ == nullptr ? 0 : static_cast<double>(assembler_->buffered()));
  }

  // pendingRequest: the request code of the message not complete yet once its first 4 bytes
  // are in (for the log line of a stalled message), else -1.
  Napi::Value PendingRequest(const Napi::CallbackInfo& info) {
    uint32_t req;
    if (assembler_ == nullptr || assembler_->buffered() < sizeof req) return Napi::Number::New(info.Env(), -1);
    memcpy(&req, assembler_->message(), sizeof req);
    return Napi::Number::New(info.Env(), req);
  }

  // close(): drops a partial message and closes its fds; idempotent.
  Napi::Value Close(const Napi::CallbackInfo& info) {
    assembler_.reset();
    return info.Env().Undefined();
  }

  std::unique_ptr<MessageAssembler> assembler_;
};

}  // namespace

void InitSocket(Napi::Env env, Napi::Object exports) {
  exports.Set("listenUnix", Napi::Function::New(env, ListenUnix, "listenUnix"));
  exports.Set("connectUnix", Napi::Function::New(env, ConnectUnix, "connectUnix"));
  exports.Set("acceptUnix", Napi::Function::New(env, AcceptUnix, "acceptUnix"));
  MessageReader::Init(env, exports);
  exports.Set("sendMessage", Napi::Function::New(env, SendMessage, "sendMessage"));
}

}  // namespace rnull
