// vhost-user message framing on a non-blocking stream socket, in plain C++ (no N-API, so the
// libFuzzer target test/fuzz/message_fuzz.cc links it as it is).
//
// A message is a 12-byte header (u32 request, u32 flags, u32 payload size; vhost-user.rst
// "Message format") and its payload. Fds ride as SCM_RIGHTS on the first byte of their message.
// The assembler never reads past the end of the message it is assembling, so the kernel hands
// over a message's fds with the read that starts at its first byte; fds that arrive with any
// later read are misplaced and refused.
//
// Invariants:
// - the assembler holds at most kVhostHeaderSize + maxPayload bytes and kMaxMessageFds fds;
// - every fd it was given is either handed over with a complete message (TakeFds) or closed
//   (on a framing error, Reset() or destruction);
// - after an error it holds nothing and stays failed until Reset().
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <string>
#include <vector>

namespace rnull {

constexpr size_t kVhostHeaderSize = 12;
// Fds one message may carry: SET_MEM_TABLE has one per region, 8 regions at most.
constexpr size_t kMaxMessageFds = 8;

class MessageAssembler {
 public:
  enum class Status { kIncomplete, kComplete, kError };

  explicit MessageAssembler(size_t maxPayload);
  ~MessageAssembler();
  MessageAssembler(const MessageAssembler&) = delete;
  MessageAssembler& operator=(const MessageAssembler&) = delete;

  // Where the next bytes go, and how many may be read: up to the end of the current message
  // (0 once it is complete, or after an error).
  uint8_t* writePtr() { return buf_.data() + have_; }
  size_t wanted() const;

  // Accounts for n bytes (1 to wanted()) just read into writePtr(), and takes ownership of the
  // nfds fds that came with that read. kError: the stream is malformed (payload size over the
  // limit, fds in the middle of a message, too many fds): error() says why, every fd is closed.
  Status Received(size_t n, const int* fds, size_t nfds);

  bool complete() const { return !failed_ && have_ >= kVhostHeaderSize && have_ == kVhostHeaderSize + size_; }
  // The complete message (header + payload) and its length in bytes.
  const uint8_t* message() const { return buf_.data(); }
  size_t length() const { return have_; }
  // Hands the complete message's fds to the caller (who then owns them) and starts the next message.
  void TakeFds(std::vector<int>* out);
  // Bytes of a message not yet complete (0 between messages).
  size_t buffered() const { return complete() ? 0 : have_; }
  bool failed() const { return failed_; }
  const std::string& error() const { return error_; }
  // Closes every fd held and drops any partial message (a closed connection, or after an error).
  void Reset();

 private:
  Status Fail(std::string why);

  std::vector<uint8_t> buf_;
  size_t maxPayload_;
  size_t have_ = 0;
  uint32_t size_ = 0;  // payload size, once the header is in
  std::vector<int> fds_;
  bool failed_ = false;
  std::string error_;
};

enum class RecvResult { kMessage, kAgain, kEof, kError };

// Reads from the non-blocking stream socket `sock` into `a` until a message is complete
// (kMessage: take it, then call again), nothing more is pending (kAgain), the peer closed the
// stream (kEof; a partial message is dropped, its fds closed), or the stream is malformed or a
// syscall failed (kError: *error says why, every fd closed). Never waits.
RecvResult ReceiveMessage(int sock, MessageAssembler* a, std::string* error);

// The most fds SendMessageNow passes at once (the kernel's SCM_MAX_FD); test front-ends send
// more than kMaxMessageFds to check the receiving side.
constexpr size_t kMaxSendFds = 253;

// Sends p[0..len) with one non-blocking sendmsg (MSG_DONTWAIT | MSG_NOSIGNAL), the fds riding
// on the first byte. Returns the bytes sent (0 if the socket buffer was full: EAGAIN), or -1
// with errno set for other failures (EINVAL for more than kMaxSendFds fds). Never waits.
ssize_t SendMessageNow(int sock, const uint8_t* p, size_t len, const int* fds, size_t nfds);

}  // namespace rnull
