#include "fd_ops.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <linux/magic.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <string>

#include "errors.h"

namespace rnull {

int SetFdNonBlocking(int fd, bool on, bool* was) {
  int fl = ::fcntl(fd, F_GETFL);
  if (fl < 0) return errno;
  if (was != nullptr) *was = (fl & O_NONBLOCK) != 0;
  int want = on ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK);
  if (want != fl && ::fcntl(fd, F_SETFL, want) < 0) return errno;
  return 0;
}

const char* FdKindName(FdKind kind) {
  switch (kind) {
    case FdKind::kEventfd: return "eventfd";
    case FdKind::kMemfd: return "memfd";
    case FdKind::kRegular: return "regular";
    case FdKind::kHugetlbfs: return "hugetlbfs";
    default: return "other";
  }
}

int ClassifyFd(int fd, FdInfo* out) {
  *out = FdInfo{FdKind::kOther, 0, false, 0, static_cast<uint64_t>(::sysconf(_SC_PAGESIZE))};
  struct stat st;
  if (::fstat(fd, &st) < 0) return errno;
  out->size = st.st_size;
  char path[64], link[256];
  snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
  ssize_t n = ::readlink(path, link, sizeof link - 1);
  link[n > 0 ? n : 0] = '\0';
  if (!S_ISREG(st.st_mode)) {
    if (strcmp(link, "anon_inode:[eventfd]") == 0) out->kind = FdKind::kEventfd;
    return 0;
  }
  struct statfs sfs;
  if (::fstatfs(fd, &sfs) < 0) return errno;
  int seals = ::fcntl(fd, F_GET_SEALS);
  // Plain tmpfs files answer F_GET_SEALS too (F_SEAL_SEAL): the name tells a memfd apart.
  if (seals >= 0 && strncmp(link, "/memfd:", 7) == 0) {
    out->memfd = true;
    out->seals = seals;
  }
  if (static_cast<unsigned long>(sfs.f_type) == HUGETLBFS_MAGIC) {
    out->kind = FdKind::kHugetlbfs;
    out->pageSize = static_cast<uint64_t>(sfs.f_bsize);
    return 0;
  }
  if (out->memfd) {
    out->kind = FdKind::kMemfd;
    return 0;
  }
  out->kind = FdKind::kRegular;
  return 0;
}

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

// fdKind(fd): 'eventfd' | 'memfd' | 'regular' | 'hugetlbfs' | 'other' (see ClassifyFd).
// SyscallError when fstat fails (EBADF: not an open fd).
Napi::Value FdKindJs(const Napi::CallbackInfo& info) {
  int64_t fd;
  if (!ArgInt(info, 0, "fd", &fd)) return Napi::Value();
  FdInfo fi;
  int e = ClassifyFd(static_cast<int>(fd), &fi);
  if (e != 0) {
    ThrowSyscallError(info.Env(), "fstat", e);
    return Napi::Value();
  }
  return Napi::String::New(info.Env(), FdKindName(fi.kind));
}

// memfdCreate(name, sizeBytes, seal = true): a close-on-exec memfd of that size (guest RAM for
// test front-ends and tools). Sealed as QEMU's memory-backend-memfd seals (F_SEAL_SHRINK |
// F_SEAL_GROW | F_SEAL_SEAL), unless seal is false (an unsealed one, to test refusals).
Napi::Value MemfdCreate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) {
    ThrowTypeError(env, "expected a string for name");
    return Napi::Value();
  }
  int64_t size;
  if (!ArgInt(info, 1, "size", &size)) return Napi::Value();
  std::string name = info[0].As<Napi::String>().Utf8Value();
  bool seal = !(info.Length() > 2 && info[2].IsBoolean() && !info[2].As<Napi::Boolean>().Value());
  int fd = ::memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING);
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
  if (seal && ::fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
    int e = errno;
    ::close(fd);
    ThrowSyscallError(env, "fcntl(F_ADD_SEALS)", e);
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

// setNonBlocking(fd, on): sets or clears O_NONBLOCK (other file status flags kept) and returns
// whether it was set before. Note the flag belongs to the open file description, which a
// passed fd shares with its sender. Throws SyscallError (EBADF...).
Napi::Value SetNonBlocking(const Napi::CallbackInfo& info) {
  int64_t fd;
  if (!ArgInt(info, 0, "fd", &fd)) return Napi::Value();
  bool was = false;
  int e = SetFdNonBlocking(static_cast<int>(fd), info.Length() > 1 && info[1].ToBoolean().Value(), &was);
  if (e != 0) {
    ThrowSyscallError(info.Env(), "fcntl", e);
    return Napi::Value();
  }
  return Napi::Boolean::New(info.Env(), was);
}

}  // namespace

void InitFdOps(Napi::Env env, Napi::Object exports) {
  exports.Set("close", Napi::Function::New(env, Close, "close"));
  exports.Set("dup", Napi::Function::New(env, Dup, "dup"));
  exports.Set("eventfd", Napi::Function::New(env, EventFd, "eventfd"));
  exports.Set("eventfdRead", Napi::Function::New(env, EventFdRead, "eventfdRead"));
  exports.Set("eventfdWrite", Napi::Function::New(env, EventFdWrite, "eventfdWrite"));
  exports.Set("setNonBlocking", Napi::Function::New(env, SetNonBlocking, "setNonBlocking"));
  exports.Set("fdKind", Napi::Function::New(env, FdKindJs, "fdKind"));
  exports.Set("memfdCreate", Napi::Function::New(env, MemfdCreate, "memfdCreate"));
  exports.Set("copyBytes", Napi::Function::New(env, CopyBytes, "copyBytes"));
}

}  // namespace rnull
