// Plain fd syscalls JavaScript has no binding for: eventfd and memfd (kick/call notifiers and the
// test front-end's guest memory), dup(), close() and O_NONBLOCK. Each is one syscall; errors throw SyscallError.
#pragma once
#include <napi.h>

namespace rnull {
void InitFdOps(Napi::Env env, Napi::Object exports);

// What an fd a front-end sent refers to (plain C++, no N-API):
// - kEventfd: an eventfd (/proc/self/fd/N links to "anon_inode:[eventfd]");
// - kHugetlbfs: a file on hugetlbfs (fstatfs gives HUGETLBFS_MAGIC), memfd or not;
// - kMemfd: a memfd on tmpfs (F_GET_SEALS succeeds and the link starts with "/memfd:");
// - kRegular: any other regular file (tmpfs files under /dev/shm included);
// - kOther: pipes, FIFOs, sockets, devices, directories, other anonymous inodes.
enum class FdKind { kEventfd, kMemfd, kRegular, kHugetlbfs, kOther };

struct FdInfo {
  FdKind kind;
  int64_t size;         // st_size in bytes (regular, memfd and hugetlbfs files)
  bool memfd;           // created by memfd_create (kind kMemfd, or kHugetlbfs with MFD_HUGETLB)
  int seals;            // F_GET_SEALS of a memfd (F_SEAL_* bits), else 0
  uint64_t pageSize;    // mmap offset granularity: the huge page size on hugetlbfs, else the page size
};

// Sets (on) or clears O_NONBLOCK on fd, keeping its other file status flags; *was (if given)
// tells whether it was set. Returns 0 or an errno. The flag belongs to the open file
// description, which a passed fd shares with its sender.
int SetFdNonBlocking(int fd, bool on, bool* was);

// Classifies fd. Returns 0, or an errno value when fstat/fstatfs fails (EBADF for a closed fd).
int ClassifyFd(int fd, FdInfo* out);
// 'eventfd' | 'memfd' | 'regular' | 'hugetlbfs' | 'other'
const char* FdKindName(FdKind kind);
}
