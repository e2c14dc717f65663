#include "fd_ops.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <string.h>
#include <unistd.h>

#include "errors.h"

namespace rnull {
namespace {

// close(fd): undefined. EBADF throws; EINTR is treated as closed (Linux semantics).
Napi::Value Close(const Napi::CallbackInfo& info) {
  int64_t fd;
  if (!ArgInt(info, 0, "fd", &fd)) return Napi::Value();
  if (::close(static_cast<int>(fd)) < 0 && errno != EINTR) ThrowSyscallError(info.Env(), "close", errno);
  return info.Env().Undefined();
}

// dup(fd): a close-on-exec duplicate of fd (F_DUPFD_CLOEXEC): a worker thread gets its own
// reference to a kick/call eventfd or memory region, which it closes when done with it.
Napi::Value Dup(const Napi::CallbackInfo& info) {
  int64_t fd;
  if (!ArgInt(info, 0, "fd", &fd)) return Napi::Value();
  int nfd = ::fcntl(static_cast<int>(fd), F_DUPFD_CLOEXEC, 0);
  if (nfd < 0) {
    ThrowSyscallError(info.Env(), "fcntl(F_DUPFD_CLOEXEC)", errno);
    return Napi::Value();
  }
  return Napi::Number::New(info.Env(), nfd);
}

// eventfd(): a non-blocking, close-on-exec eventfd with counter 0.
Napi::Value EventFd(const Napi::CallbackInfo& info) {
  int fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (fd < 0) {
    ThrowSyscallError(info.Env(), "eventfd", errno);
    return Napi::Value();
  }
  return Napi::Number::New(info.Env(), fd);
}

// eventfdRead(fd): the counter value consumed (0 when it was zero: EAGAIN).
Napi::Value EventFdRead(const Napi::CallbackInfo& info) {
  int64_t fd;
  if (!ArgInt(info, 0, "fd", &fd)) return Napi::Value();
  uint64_t v = 0;
  ssize_t n = ::read(static_cast<int>(fd), &v, sizeof v);
  if (n < 0) {
    if (errno == EAGAIN) return Napi::Number::New(info.Env(), 0);
    ThrowSyscallError(info.Env(), "read", errno);
    return Napi::Value();
  }
  return Napi::Number::New(info.Env(), static_cast<double>(v));
}

// eventfdWrite(fd): adds 1 to the counter (a kick or a call).
Napi::Value EventFdWrite(const Napi::CallbackInfo& info) {
  int64_t fd;
  if (!ArgInt(info, 0, "fd", &fd)) return Napi::Value();
  uint64_t one = 1;
  if (::write(static_cast<int>(fd), &one, sizeof one) < 0 && errno != EAGAIN)
    ThrowSyscallError(info.Env(), "write", errno);
  return info.Env().Undefined();
}

// memfdCreate(name, sizeBytes): a close-on-exec memfd of that size (guest RAM for test front-ends).
Napi::Value MemfdCreate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) {
    ThrowTypeError(env, "expected a string for name");
    return Napi::Value();
  }
  int64_t size;
  if (!ArgInt(info, 1, "size", &size)) return Napi::Value();
  std::string name = info[0].As<Napi::String>().Utf8Value();
  int fd = ::memfd_create(name.c_str(), MFD_CLOEXEC);
  if (fd < 0) {
    ThrowSyscallError(env, "memfd_create", errno);
    return Napi::Value();
  }
  if (::ftruncate(fd, size) < 0) {
    int e = errno;
    ::close(fd);
    ThrowSyscallError(env, "ftruncate", e);
    return Napi::Value();
  }
  return Napi::Number::New(env, fd);
}

// copyBytes(dst, dstOffset, src, srcOffset, length): memmove between two Uint8Arrays (guest
// memory views and page-store pages) without creating a view per copy, as Buffer#copy does.
// Throws RangeError when either range falls outside its array.
Napi::Value CopyBytes(const Napi::CallbackInfo& info) {
  uint8_t *dst, *src;
  size_t dstLen, srcLen;
  if (!ArgByteRange(info, 0, 1, 4, "copyBytes", &dst, &dstLen) || !ArgByteRange(info, 2, 3, 4, "copyBytes", &src, &srcLen))
    return Napi::Value();
  memmove(dst, src, srcLen);
  return info.Env().Undefined();
}

}  // namespace

void InitFdOps(Napi::Env env, Napi::Object exports) {
  exports.Set("close", Napi::Function::New(env, Close, "close"));
  exports.Set("dup", Napi::Function::New(env, Dup, "dup"));
  exports.Set("eventfd", Napi::Function::New(env, EventFd, "eventfd"));
  exports.Set("eventfdRead", Napi::Function::New(env, EventFdRead, "eventfdRead"));
  exports.Set("eventfdWrite", Napi::Function::New(env, EventFdWrite, "eventfdWrite"));
  exports.Set("memfdCreate", Napi::Function::New(env, MemfdCreate, "memfdCreate"));
  exports.Set("copyBytes", Napi::Function::New(env, CopyBytes, "copyBytes"));
}

}  // namespace rnull
