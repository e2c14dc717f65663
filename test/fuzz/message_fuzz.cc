// libFuzzer target: vhost-user message framing and fd handling (native/vhost_framing.cc).
//
// Each input is a script run against a real non-blocking socketpair: messages (well-formed
// or not: oversized size fields, wrong payload lengths, fds at their first byte, in their
// middle or too many) are queued, then sent in pieces cut at points the input picks, with real
// fds (pipes, eventfds, memfds) attached, and received through ReceiveMessage at points the
// input picks. A model parses the same byte stream and checks, for every delivered message:
// its bytes are exactly the next message of the stream, its size is bounded, its fds are
// exactly the fds sent within it (compared by inode); and for every refusal, that the stream
// really was malformed there. After each input the process has exactly the fds it had before
// (every fd delivered or closed). Counts print at exit: "message_fuzz: N messages ...".
#include <dirent.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "vhost_framing.h"

using rnull::kMaxMessageFds;
using rnull::kVhostHeaderSize;
using rnull::MessageAssembler;
using rnull::ReceiveMessage;
using rnull::RecvResult;
using rnull::SendMessageNow;

namespace {

uint64_t gMessages = 0, gFds = 0, gRefused = 0, gInputs = 0;

void PrintCounts() {
  fprintf(stderr, "message_fuzz: %llu messages delivered, %llu fds delivered, %llu streams refused, %llu inputs\n",
          (unsigned long long)gMessages, (unsigned long long)gFds, (unsigned long long)gRefused, (unsigned long long)gInputs);
}

#define CHECK(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      fprintf(stderr, "message_fuzz: check failed at line %d: %s\n", __LINE__, #cond); \
      abort();                                                                      \
    }                                                                               \
  } while (0)

int CountFds() {
  DIR* d = opendir("/proc/self/fd");
  CHECK(d != nullptr);
  int n = 0;
  while (readdir(d) != nullptr) n++;
  closedir(d);
  return n;
}

using Inode = std::pair<uint64_t, uint64_t>;

Inode InodeOf(int fd) {
  struct stat st;
  CHECK(fstat(fd, &st) == 0);
  return {static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino)};
}

class Input {
 public:
  Input(const uint8_t* d, size_t n) : d_(d), n_(n) {}
  bool empty() const { return i_ >= n_; }
  uint8_t u8() { return i_ < n_ ? d_[i_++] : 0; }
  uint32_t u32() { return u8() | (u8() << 8) | (u8() << 16) | (static_cast<uint32_t>(u8()) << 24); }

 private:
  const uint8_t* d_;
  size_t n_;
  size_t i_ = 0;
};

// A fresh fd of a kind the input picks; its inode identifies it on the other side.
int NewFd(uint8_t sel) {
  switch (sel % 4) {
    case 0: return eventfd(0, EFD_CLOEXEC);
    case 1: return memfd_create("fuzz", MFD_CLOEXEC);
    default: {
      int p[2];
      CHECK(pipe2(p, O_CLOEXEC) == 0);
      close(p[1]);
      return p[0];
    }
  }
}

struct Run {
  explicit Run(size_t maxPayload) : a(maxPayload), max(maxPayload) {
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, s) == 0);
  }
  ~Run() {
    if (s[0] >= 0) close(s[0]);
    close(s[1]);
  }

  MessageAssembler a;
  size_t max;
  int s[2];
  std::vector<uint8_t> stream;                  // every byte queued, in order
  std::map<size_t, std::vector<int>> toAttach;  // fds to send at a stream offset (not sent yet)
  std::map<size_t, std::vector<Inode>> sentAt;  // fds sent, by the offset of their first byte
  size_t sent = 0;                              // bytes of stream sent
  size_t consumed = 0;                          // bytes of stream delivered as messages
  bool done = false;                            // refused, or end of stream seen

  // The message the receiver is assembling, as far as it was sent: its payload size (if the
  // header is in) and its end.
  bool HeaderIn(uint32_t* size) const {
    if (sent - consumed < kVhostHeaderSize) return false;
    memcpy(size, &stream[consumed + 8], 4);
    return true;
  }

  void Check(RecvResult r, const std::string& err) {
    if (r == RecvResult::kMessage) {
      size_t len = a.length();
      CHECK(len >= kVhostHeaderSize && len <= kVhostHeaderSize + max);
      CHECK(consumed + len <= sent);
      CHECK(memcmp(a.message(), &stream[consumed], len) == 0);
      uint32_t size;
      memcpy(&size, a.message() + 8, 4);
      CHECK(size == len - kVhostHeaderSize);
      std::vector<int> fds;
      a.TakeFds(&fds);
      CHECK(fds.size() <= kMaxMessageFds);
      std::vector<Inode> got, want;
      for (int fd : fds) got.push_back(InodeOf(fd));
      for (auto it = sentAt.lower_bound(consumed); it != sentAt.end() && it->first < consumed + len; ++it)
        want.insert(want.end(), it->second.begin(), it->second.end());
      std::sort(got.begin(), got.end());
      std::sort(want.begin(), want.end());
      CHECK(got == want);
      for (int fd : fds) close(fd);
      consumed += len;
      gMessages++;
      gFds += fds.size();
      return;
    }
    if (r == RecvResult::kError) {
      // Only a malformed stream is refused: a size over the limit, fds after a message's first
      // byte, or more fds on it than allowed.
      uint32_t size = 0;
      bool header = HeaderIn(&size);
      size_t end = header ? consumed + kVhostHeaderSize + size : sent;
      if (end > sent) end = sent;
      bool oversize = header && size > max;
      bool misplaced = false;
      size_t atStart = 0;
      for (auto it = sentAt.lower_bound(consumed); it != sentAt.end() && it->first < end; ++it) {
        if (it->first == consumed) atStart += it->second.size();
        else misplaced = true;
      }
      if (!(oversize || misplaced || atStart > kMaxMessageFds)) {
        fprintf(stderr, "message_fuzz: unjustified refusal: %s\n", err.c_str());
        abort();
      }
      CHECK(!err.empty());
      CHECK(a.buffered() == 0);
      gRefused++;
      done = true;
    }
    if (r == RecvResult::kEof) done = true;
  }

  // Receives until nothing more is pending (or the stream ends or is refused).
  void ReceiveAll() {
    while (!done) {
      std::string err;
      RecvResult r = ReceiveMessage(s[1], &a, &err);
      if (r == RecvResult::kAgain) return;
      Check(r, err);
    }
  }

  // Sends up to n more bytes, in one sendmsg per fd attachment point.
  void Send(size_t n) {
    int spins = 0;
    while (n > 0 && sent < stream.size() && !done) {
      size_t len = std::min(n, stream.size() - sent);
      auto next = toAttach.upper_bound(sent);
      if (next != toAttach.end() && next->first < sent + len) len = next->first - sent;
      std::vector<int> fds;
      auto here = toAttach.find(sent);
      if (here != toAttach.end()) fds = here->second;
      ssize_t k = SendMessageNow(s[0], &stream[sent], len, fds.data(), fds.size());
      CHECK(k >= 0);
      if (k == 0) {
        // Socket buffer full: let the receiver drain it.
        ReceiveAll();
        CHECK(++spins < 1000);
        continue;
      }
      if (here != toAttach.end()) {
        for (int fd : here->second) {
          sentAt[sent].push_back(InodeOf(fd));
          close(fd);  // the kernel holds the sent copy
        }
        toAttach.erase(here);
      }
      sent += static_cast<size_t>(k);
      n -= static_cast<size_t>(k);
    }
  }

  void Attach(size_t offset, int count, Input* in) {
    for (int i = 0; i < count; i++) {
      int fd = NewFd(in->u8());
      CHECK(fd >= 0);
      toAttach[offset].push_back(fd);
    }
  }

  void Run1(Input* in) {
    while (!in->empty() && !done) {
      uint8_t op = in->u8();
      switch (op % 8) {
        case 0:
        case 1:
        case 2: {  // a message: header, payload, fds
          size_t start = stream.size();
          uint32_t req = in->u8();
          uint8_t sel = in->u8();
          uint32_t size = sel < 224 ? sel % (max + 1) : (sel < 240 ? static_cast<uint32_t>(max + 1 + (sel & 7)) : in->u32());
          uint32_t actual = size;
          if (op % 8 == 2) actual = in->u8() % (max + 16);  // payload shorter or longer than its size field
          if (actual > 4096) actual = 4096;
          uint8_t hdr[12];
          uint32_t flags = 1;
          memcpy(hdr, &req, 4);
          memcpy(hdr + 4, &flags, 4);
          memcpy(hdr + 8, &size, 4);
          stream.insert(stream.end(), hdr, hdr + 12);
          for (uint32_t i = 0; i < actual; i++) stream.push_back(static_cast<uint8_t>(i * 31 + req));
          uint8_t f = in->u8();
          int nfds = f < 160 ? 0 : (f < 240 ? (f & 3) : (f & 15));
          size_t at = start;
          if (nfds > 0 && (f & 0x10) && stream.size() - start > 1) at = start + 1 + in->u8() % (stream.size() - start - 1);
          if (at >= sent) Attach(at, nfds, in);
          break;
        }
        case 3: {  // raw bytes
          int k = in->u8() % 24;
          for (int i = 0; i < k; i++) stream.push_back(in->u8());
          break;
        }
        case 4:
        case 5:
          Send(1 + in->u8() % 64);
          break;
        case 6:
          Send(1 + in->u8() * 16);
          break;
        default:
          ReceiveAll();
          break;
      }
    }
    // Everything left is sent and received; a whole well-formed message must not be left over.
    Send(stream.size());
    ReceiveAll();
    if (!done) {
      uint32_t size;
      bool whole = HeaderIn(&size) && size <= max && sent - consumed >= kVhostHeaderSize + size;
      CHECK(!whole);
      close(s[0]);
      s[0] = -1;
      ReceiveAll();
      CHECK(done);  // end of stream seen
      CHECK(a.buffered() == 0);
    }
    for (auto& kv : toAttach)
      for (int fd : kv.second) close(fd);
  }
};

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  atexit(PrintCounts);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  int before = CountFds();
  {
    Input in(data, size);
    size_t max = 8 + (in.u8() % 8) * 32;
    Run run(max);
    run.Run1(&in);
  }
  CHECK(CountFds() == before);
  gInputs++;
  return 0;
}
