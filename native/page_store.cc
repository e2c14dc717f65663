#include "page_store.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/magic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "errors.h"

namespace rnull {

namespace {
constexpr uint64_t kPageSize = 4096;
constexpr uint64_t kPageShift = 12;
// The file is mapped in chunks of 1 GiB, each when first written (or found holding data), so a
// disk larger than the address space (up to 2^53 bytes) works as long as its data fits.
constexpr uint64_t kChunkShift = 30;
constexpr uint64_t kChunkPagesShift = kChunkShift - kPageShift;
constexpr uint64_t kChunkPages = uint64_t{1} << kChunkPagesShift;
constexpr uint64_t kChunkWords = kChunkPages / 64;
// Byte positions are JS numbers: exact below 2^53.
constexpr double kMaxPos = 9007199254740991.0;
constexpr uint64_t kAnonymousSize = uint64_t{64} << 30;

// A syscall interrupted by a signal is retried a few times, then reported as EINTR.
template <typename F>
int Retry(F f) {
  for (int i = 0; i < 8; i++) {
    if (f() == 0) return 0;
    if (errno != EINTR) return errno;
  }
  return EINTR;
}

// One mapped GiB of the file and its page bitmap: a bit is set when the file holds the page
// (allocated), clear for a hole.
struct Chunk {
  uint8_t* base = nullptr;
  size_t len = 0;
  std::atomic<uint64_t> bits[kChunkWords];
};
}  // namespace

struct PageMap {
  uint32_t id = 0;
  std::shared_mutex mu;
  int fd = -1;
  bool open = false;  // false once closed
  uint64_t size = 0;  // bytes, a multiple of kPageSize
  // chunks[c]: chunk c once mapped, else null (an anonymous mapping: untouched entries cost nothing).
  std::atomic<Chunk*>* chunks = nullptr;
  size_t chunksBytes = 0;
  std::mutex madeMu;
  std::vector<Chunk*> made;
  std::atomic<uint64_t> pages{0};

  ~PageMap() { Unmap(); }

  void Unmap() {
    for (Chunk* c : made) {
      ::munmap(c->base, c->len);
      delete c;
    }
    made.clear();
    if (chunks != nullptr) ::munmap(chunks, chunksBytes);
    if (fd >= 0) ::close(fd);
    chunks = nullptr;
    fd = -1;
    open = false;
  }

  Chunk* Get(uint64_t c) const { return chunks[c].load(std::memory_order_acquire); }

  // Chunk c, mapped now if it was not; nullptr with *err set when mmap fails.
  Chunk* Make(uint64_t c, int* err) {
    Chunk* ch = Get(c);
    if (ch != nullptr) return ch;
    uint64_t off = c << kChunkShift;
    size_t len = static_cast<size_t>(std::min<uint64_t>(uint64_t{1} << kChunkShift, size - off));
    void* base = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, static_cast<off_t>(off));
    if (base == MAP_FAILED) {
      *err = errno;
      return nullptr;
    }
    Chunk* fresh = new Chunk();
    fresh->base = static_cast<uint8_t*>(base);
    fresh->len = len;
    for (auto& w : fresh->bits) w.store(0, std::memory_order_relaxed);
    Chunk* expected = nullptr;
    if (!chunks[c].compare_exchange_strong(expected, fresh, std::memory_order_acq_rel)) {
      ::munmap(base, len);  // another thread mapped it first
      delete fresh;
      return expected;
    }
    std::lock_guard<std::mutex> lock(madeMu);
    made.push_back(fresh);
    return fresh;
  }

  // The byte at disk position pos, in a mapped chunk.
  uint8_t* At(uint64_t pos) const { return Get(pos >> kChunkShift)->base + (pos & ((uint64_t{1} << kChunkShift) - 1)); }

  static std::atomic<uint64_t>& Word(Chunk* ch, uint64_t p) { return ch->bits[(p & (kChunkPages - 1)) >> 6]; }

  bool Test(uint64_t p) const {
    Chunk* ch = Get(p >> kChunkPagesShift);
    return ch != nullptr && ((Word(ch, p).load(std::memory_order_acquire) >> (p & 63)) & 1);
  }

  // Sets (on; the chunks must be mapped) or clears the bits of pages [p, q), a word at a time,
  // keeping `pages` exact.
  void Mark(uint64_t p, uint64_t q, bool on) {
    while (p < q) {
      uint64_t n = std::min<uint64_t>(64 - (p & 63), q - p);
      Chunk* ch = Get(p >> kChunkPagesShift);
      if (ch != nullptr) {
        uint64_t mask = (n == 64 ? ~uint64_t{0} : ((uint64_t{1} << n) - 1)) << (p & 63);
        std::atomic<uint64_t>& w = Word(ch, p);
        uint64_t old = on ? w.fetch_or(mask, std::memory_order_acq_rel) : w.fetch_and(~mask, std::memory_order_acq_rel);
        uint64_t changed = static_cast<uint64_t>(__builtin_popcountll(on ? (~old & mask) : (old & mask)));
        if (on) pages.fetch_add(changed, std::memory_order_relaxed);
        else pages.fetch_sub(changed, std::memory_order_relaxed);
      }
      p += n;
    }
  }

  // The end of the run of pages in [p, end) that are all allocated (want) or all holes; whole
  // words, and whole unmapped chunks, at a time where it can.
  uint64_t RunEnd(uint64_t p, uint64_t end, bool want) const {
    const uint64_t all = want ? ~uint64_t{0} : 0;
    while (p < end) {
      Chunk* ch = Get(p >> kChunkPagesShift);
      if (ch == nullptr) {
        if (want) break;
        p = std::min(end, ((p >> kChunkPagesShift) + 1) << kChunkPagesShift);
        continue;
      }
      uint64_t w = Word(ch, p).load(std::memory_order_acquire);
      if ((p & 63) == 0 && end - p >= 64 && w == all) {
        p += 64;
        continue;
      }
      if (((w >> (p & 63)) & 1) != static_cast<uint64_t>(want)) break;
      p++;
    }
    return p;
  }

  // Maps the chunks of pages [p, q); 0 or an errno.
  int MakeRange(uint64_t p, uint64_t q) {
    int err = 0;
    for (uint64_t c = p >> kChunkPagesShift; c <= (q - 1) >> kChunkPagesShift; c++) {
      if (Make(c, &err) == nullptr) return err;
    }
    return 0;
  }

  // Copies n bytes between the disk at pos (mapped chunks) and buf, chunk piece by piece.
  void Copy(uint64_t pos, uint8_t* buf, uint64_t n, bool toDisk) const {
    while (n > 0) {
      uint64_t k = std::min(n, (((pos >> kChunkShift) + 1) << kChunkShift) - pos);
      if (toDisk) memcpy(At(pos), buf, k);
      else memcpy(buf, At(pos), k);
      pos += k;
      buf += k;
      n -= k;
    }
  }
  void Zero(uint64_t pos, uint64_t n) const {
    while (n > 0) {
      uint64_t k = std::min(n, (((pos >> kChunkShift) + 1) << kChunkShift) - pos);
      memset(At(pos), 0, k);
      pos += k;
      n -= k;
    }
  }
};

namespace {

std::mutex gRegistryMu;
std::unordered_map<uint32_t, std::weak_ptr<PageMap>> gRegistry;
uint32_t gNextId = 1;

void Register(const std::shared_ptr<PageMap>& map) {
  std::lock_guard<std::mutex> lock(gRegistryMu);
  for (auto it = gRegistry.begin(); it != gRegistry.end();) {
    if (it->second.expired()) it = gRegistry.erase(it);
    else ++it;
  }
  map->id = gNextId++;
  gRegistry[map->id] = map;
}

std::shared_ptr<PageMap> FindMap(uint32_t id) {
  std::lock_guard<std::mutex> lock(gRegistryMu);
  auto it = gRegistry.find(id);
  return it == gRegistry.end() ? nullptr : it->second.lock();
}

// Throws an Error whose `code` tells JavaScript what is wrong with the store file.
void ThrowStoreError(Napi::Env env, const char* code, const std::string& message) {
  Napi::Error e = Napi::Error::New(env, message);
  e.Set("code", Napi::String::New(env, code));
  e.ThrowAsJavaScriptException();
}

// Marks the pages the file holds, from SEEK_DATA/SEEK_HOLE (tmpfs answers per page), mapping
// their chunks. 0 or an errno.
int ScanFile(PageMap& m) {
  uint64_t pos = 0;
  while (pos < m.size) {
    off_t data = ::lseek(m.fd, static_cast<off_t>(pos), SEEK_DATA);
    if (data < 0) return errno == ENXIO ? 0 : errno;
    off_t hole = ::lseek(m.fd, data, SEEK_HOLE);
    if (hole < 0) return errno;
    uint64_t end = std::min<uint64_t>(static_cast<uint64_t>(hole), m.size);
    uint64_t p = static_cast<uint64_t>(data) >> kPageShift;
    uint64_t q = (end + kPageSize - 1) >> kPageShift;
    if (p < q) {
      int err = m.MakeRange(p, q);
      if (err != 0) return err;
      m.Mark(p, q, true);
    }
    pos = end;
  }
  return 0;
}

// The chunk table (fd owned by m, sized); false after throwing.
bool MapTable(Napi::Env env, PageMap& m) {
  uint64_t n = (m.size + (uint64_t{1} << kChunkShift) - 1) >> kChunkShift;
  m.chunksBytes = static_cast<size_t>(((n * sizeof(std::atomic<Chunk*>) + kPageSize - 1) / kPageSize) * kPageSize);
  void* t = ::mmap(nullptr, m.chunksBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (t == MAP_FAILED) {
    ThrowSyscallError(env, "mmap", errno);
    return false;
  }
  m.chunks = static_cast<std::atomic<Chunk*>*>(t);  // zero pages: every entry null
  m.open = true;
  return true;
}

// The store of a file: on tmpfs, locked (flock, so two daemons never share it), sized (an
// empty file, or any file when `fresh`, gets `size` bytes of holes; another size is refused),
// its data found.
bool OpenFile(Napi::Env env, PageMap& m, int fd, bool fresh) {
  m.fd = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (m.fd < 0) {
    ThrowSyscallError(env, "fcntl", errno);
    return false;
  }
  struct stat st;
  if (::fstat(m.fd, &st) < 0) {
    ThrowSyscallError(env, "fstat", errno);
    return false;
  }
  if (!S_ISREG(st.st_mode)) {
    ThrowStoreError(env, "ESTORETYPE", "not a regular file");
    return false;
  }
  struct statfs sfs;
  if (::fstatfs(m.fd, &sfs) < 0) {
    ThrowSyscallError(env, "fstatfs", errno);
    return false;
  }
  if (static_cast<unsigned long>(sfs.f_type) != TMPFS_MAGIC) {
    char hex[32];
    snprintf(hex, sizeof hex, "0x%lx", static_cast<unsigned long>(sfs.f_type));
    ThrowStoreError(env, "ESTOREFS", std::string("on a file system of type ") + hex + ", not tmpfs");
    return false;
  }
  int err = Retry([&] { return ::flock(m.fd, LOCK_EX | LOCK_NB); });
  if (err != 0) {
    ThrowSyscallError(env, "flock", err);
    return false;
  }
  if (::fstat(m.fd, &st) < 0) {  // the size once locked
    ThrowSyscallError(env, "fstat", errno);
    return false;
  }
  uint64_t have = static_cast<uint64_t>(st.st_size);
  if (fresh && have != 0) {
    if ((err = Retry([&] { return ::ftruncate(m.fd, 0); })) != 0) {
      ThrowSyscallError(env, "ftruncate", err);
      return false;
    }
    have = 0;
  }
  if (have == 0) {
    if ((err = Retry([&] { return ::ftruncate(m.fd, static_cast<off_t>(m.size)); })) != 0) {
      ThrowSyscallError(env, "ftruncate", err);
      return false;
    }
  } else if (have != m.size) {
    ThrowStoreError(env, "ESTORESIZE", "holds " + std::to_string(have) + " bytes, but the disk has " + std::to_string(m.size));
    return false;
  }
  if (!MapTable(env, m)) return false;
  if ((err = ScanFile(m)) != 0) {
    ThrowSyscallError(env, "mmap", err);
    return false;
  }
  return true;
}

bool OpenMemfd(Napi::Env env, PageMap& m) {
  m.fd = ::memfd_create("rnull-store", MFD_CLOEXEC);
  if (m.fd < 0) {
    ThrowSyscallError(env, "memfd_create", errno);
    return false;
  }
  int err = Retry([&] { return ::ftruncate(m.fd, static_cast<off_t>(m.size)); });
  if (err != 0) {
    ThrowSyscallError(env, "ftruncate", err);
    return false;
  }
  return MapTable(env, m);
}

// Reads (pos, array, offset, length) arguments: a byte position on the disk and a range of the
// array; false after throwing. The range must lie inside the store.
bool CopyArgs(const Napi::CallbackInfo& info, uint64_t size, uint64_t* pos, uint8_t** data, uint64_t* len) {
  double p;
  size_t n;
  if (!ArgNumber(info, 0, "position", &p) || !ArgByteRange(info, 1, 2, 3, "PageStore", data, &n)) return false;
  if (!(p >= 0) || p + static_cast<double>(n) > kMaxPos || static_cast<uint64_t>(p) + n > size) {
    ThrowRangeError(info.Env(), "PageStore: range outside the disk");
    return false;
  }
  *pos = static_cast<uint64_t>(p);
  *len = n;
  return true;
}

}  // namespace

void PageStore::Init(Napi::Env env, Napi::Object exports) {
  Napi::Function ctor = DefineClass(env, "PageStore",
                                    {
                                        InstanceAccessor<&PageStore::Id>("id"),
                                        InstanceAccessor<&PageStore::Size>("size"),
                                        InstanceAccessor<&PageStore::PageCount>("pageCount"),
                                        InstanceAccessor<&PageStore::BytesAllocated>("bytesAllocated"),
                                        InstanceMethod<&PageStore::Write>("write"),
                                        InstanceMethod<&PageStore::Read>("read"),
                                        InstanceMethod<&PageStore::Discard>("discard"),
                                        InstanceMethod<&PageStore::Close>("close"),
                                    });
  exports.Set("PageStore", ctor);
}

// new PageStore(id): the store `id` created on any thread of this process (Error if it no
// longer exists or was closed). new PageStore({ size }): a new, empty store in a memfd;
// new PageStore(): the same of kAnonymousSize (address space only until written).
// new PageStore({ size, fd, fresh }): the store in the file fd refers to (fd is duplicated; the
// caller keeps its own). size: bytes, a positive multiple of 4096.
PageStore::PageStore(const Napi::CallbackInfo& info) : Napi::ObjectWrap<PageStore>(info) {
  Napi::Env env = info.Env();
  if (info.Length() >= 1 && info[0].IsNumber()) {
    int64_t id;
    if (!ArgInt(info, 0, "id", &id)) return;
    map_ = FindMap(static_cast<uint32_t>(id));
    if (map_ != nullptr) {
      std::shared_lock<std::shared_mutex> lock(map_->mu);
      if (map_->open) return;
    }
    map_ = nullptr;
    ThrowError(env, "PageStore: no store with that id in this process (or it was closed)");
    return;
  }
  auto map = std::make_shared<PageMap>();
  if (info.Length() < 1 || info[0].IsUndefined()) {
    map->size = kAnonymousSize;
    if (!OpenMemfd(env, *map)) return;
    Register(map);
    map_ = map;
    return;
  }
  if (!info[0].IsObject()) {
    ThrowTypeError(env, "PageStore: expected a store id or { size, fd?, fresh? }");
    return;
  }
  Napi::Object o = info[0].As<Napi::Object>();
  if (!GetSafeU64(o, "size", &map->size) || map->size == 0 || map->size % kPageSize != 0) {
    ThrowRangeError(env, "PageStore: size must be a positive multiple of 4096 bytes");
    return;
  }
  Napi::Value fdv = o.Get("fd");
  if (fdv.IsUndefined()) {
    if (!OpenMemfd(env, *map)) return;
  } else {
    uint64_t fd;
    if (!GetSafeU64(o, "fd", &fd) || fd > INT32_MAX) {
      ThrowTypeError(env, "PageStore: fd must be a file descriptor");
      return;
    }
    if (!OpenFile(env, *map, static_cast<int>(fd), o.Get("fresh").ToBoolean().Value())) return;
  }
  Register(map);
  map_ = map;
}

Napi::Value PageStore::Id(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), map_ ? map_->id : 0);
}

Napi::Value PageStore::Size(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), map_ ? static_cast<double>(map_->size) : 0);
}

Napi::Value PageStore::PageCount(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), map_ ? static_cast<double>(map_->pages.load(std::memory_order_relaxed)) : 0);
}

// Bytes of memory the file takes (st_blocks), 0 once closed.
Napi::Value PageStore::BytesAllocated(const Napi::CallbackInfo& info) {
  if (!map_) return Napi::Number::New(info.Env(), 0);
  std::shared_lock<std::shared_mutex> lock(map_->mu);
  struct stat st;
  if (map_->fd < 0 || ::fstat(map_->fd, &st) < 0) return Napi::Number::New(info.Env(), 0);
  return Napi::Number::New(info.Env(), static_cast<double>(st.st_blocks) * 512);
}

// write(pos, src, srcOffset, length): copies `length` bytes of src into the disk at byte `pos`.
// Returns 0, or the errno of allocating the holes written (ENOSPC: the file system is full;
// ENOMEM: no address space to map it); then nothing was copied. RangeError outside the disk.
Napi::Value PageStore::Write(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t pos, len;
  uint8_t* src;
  if (!map_ || !CopyArgs(info, map_->size, &pos, &src, &len)) return Napi::Value();
  PageMap& m = *map_;
  std::shared_lock<std::shared_mutex> lock(m.mu);
  if (!m.open) {
    ThrowError(env, "PageStore: closed");
    return Napi::Value();
  }
  if (len == 0) return Napi::Number::New(env, 0);
  uint64_t end = ((pos + len - 1) >> kPageShift) + 1;
  for (uint64_t p = m.RunEnd(pos >> kPageShift, end, true); p < end; p = m.RunEnd(p, end, true)) {
    uint64_t q = m.RunEnd(p, end, false);
    int err = m.MakeRange(p, q);
    if (err == 0) err = Retry([&] { return ::fallocate(m.fd, 0, static_cast<off_t>(p << kPageShift), static_cast<off_t>((q - p) << kPageShift)); });
    if (err != 0) return Napi::Number::New(env, err);
    m.Mark(p, q, true);
    p = q;
  }
  m.Copy(pos, src, len, true);
  return Napi::Number::New(env, 0);
}

// read(pos, dst, dstOffset, length): copies from the disk at byte `pos`; holes read as zeroes
// (never through the mapping: on tmpfs a read fault on a hole would allocate it).
Napi::Value PageStore::Read(const Napi::CallbackInfo& info) {
  uint64_t pos, len;
  uint8_t* dst;
  if (!map_ || !CopyArgs(info, map_->size, &pos, &dst, &len)) return Napi::Value();
  PageMap& m = *map_;
  std::shared_lock<std::shared_mutex> lock(m.mu);
  if (!m.open) {
    ThrowError(info.Env(), "PageStore: closed");
    return Napi::Value();
  }
  uint64_t at = pos;
  const uint64_t stop = pos + len;
  while (at < stop) {
    uint64_t p = at >> kPageShift;
    bool held = m.Test(p);
    uint64_t q = m.RunEnd(p + 1, ((stop - 1) >> kPageShift) + 1, held);
    uint64_t runStop = std::min(stop, q << kPageShift);
    if (held) m.Copy(at, dst + (at - pos), runStop - at, false);
    else memset(dst + (at - pos), 0, runStop - at);
    at = runStop;
  }
  return info.Env().Undefined();
}

// discard(pos, length): the range reads as zeroes; whole pages become holes (their memory is
// freed), partial pages are zeroed. RangeError outside the disk.
Napi::Value PageStore::Discard(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  double pd, nd;
  if (!map_ || !ArgNumber(info, 0, "position", &pd) || !ArgNumber(info, 1, "length", &nd)) return Napi::Value();
  if (!(pd >= 0 && nd >= 0) || pd + nd > kMaxPos || static_cast<uint64_t>(pd) + static_cast<uint64_t>(nd) > map_->size) {
    ThrowRangeError(env, "PageStore: range outside the disk");
    return Napi::Value();
  }
  PageMap& m = *map_;
  std::unique_lock<std::shared_mutex> lock(m.mu);
  if (!m.open) {
    ThrowError(env, "PageStore: closed");
    return Napi::Value();
  }
  uint64_t pos = static_cast<uint64_t>(pd);
  const uint64_t stop = pos + static_cast<uint64_t>(nd);
  // Zeroes [from, to) inside one page if the file holds that page.
  auto zeroPart = [&](uint64_t from, uint64_t to) {
    if (from < to && m.Test(from >> kPageShift)) memset(m.At(from), 0, to - from);
  };
  uint64_t first = (pos + kPageSize - 1) >> kPageShift;  // first whole page
  uint64_t last = stop >> kPageShift;                    // end of the whole pages
  if (first >= last) {  // within one page, or across one page boundary without a whole page
    uint64_t mid = std::min(stop, first << kPageShift);
    zeroPart(pos, mid);
    zeroPart(mid, stop);
    return env.Undefined();
  }
  zeroPart(pos, first << kPageShift);
  zeroPart(last << kPageShift, stop);
  // Punch only the runs the file holds (a discard of a mostly empty disk costs no syscalls).
  for (uint64_t p = m.RunEnd(first, last, false); p < last; p = m.RunEnd(p, last, false)) {
    uint64_t q = m.RunEnd(p, last, true);
    int err = Retry([&] {
      return ::fallocate(m.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(p << kPageShift), static_cast<off_t>((q - p) << kPageShift));
    });
    if (err != 0) m.Zero(p << kPageShift, (q - p) << kPageShift);  // still reads as zeroes
    else m.Mark(p, q, false);
    p = q;
  }
  return env.Undefined();
}

// close(): unmaps the store and closes its file (releasing its lock); idempotent. Every other
// thread's handle on it fails from then on.
Napi::Value PageStore::Close(const Napi::CallbackInfo& info) {
  if (map_) {
    std::unique_lock<std::shared_mutex> lock(map_->mu);
    map_->Unmap();
  }
  return info.Env().Undefined();
}

}  // namespace rnull
