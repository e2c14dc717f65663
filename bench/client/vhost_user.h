// The front-end end of a vhost-user connection: a unix socket, the message codec (header +
// payload, file descriptors as SCM_RIGHTS) and one call per message this benchmark sends.
// Every reply is awaited with a bounded poll(); a silent or closed back-end is an Error.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace vb {

// Message codes (vhost-user "front-end message types").
enum VuReq : uint32_t {
  VU_GET_FEATURES = 1,
  VU_SET_FEATURES = 2,
  VU_SET_OWNER = 3,
  VU_SET_MEM_TABLE = 5,
  VU_SET_VRING_NUM = 8,
  VU_SET_VRING_ADDR = 9,
  VU_SET_VRING_BASE = 10,
  VU_GET_VRING_BASE = 11,
  VU_SET_VRING_KICK = 12,
  VU_SET_VRING_CALL = 13,
  VU_GET_PROTOCOL_FEATURES = 15,
  VU_SET_PROTOCOL_FEATURES = 16,
  VU_GET_QUEUE_NUM = 17,
  VU_SET_VRING_ENABLE = 18,
  VU_GET_CONFIG = 24,
  VU_GET_INFLIGHT_FD = 31,
  VU_SET_INFLIGHT_FD = 32,
};

// Protocol feature bits.
constexpr unsigned VU_PROTO_MQ = 0;
constexpr unsigned VU_PROTO_REPLY_ACK = 3;
constexpr unsigned VU_PROTO_CONFIG = 9;
constexpr unsigned VU_PROTO_INFLIGHT_SHMFD = 12;

// The inflight description of GET/SET_INFLIGHT_FD (24 bytes on the wire).
struct VuInflight {
  uint64_t mmap_size;
  uint64_t mmap_offset;
  uint16_t num_queues;
  uint16_t queue_size;
};

// One entry of SET_MEM_TABLE.
struct VuRegion {
  uint64_t guest_phys_addr;
  uint64_t memory_size;
  uint64_t userspace_addr;
  uint64_t mmap_offset;
};

const char* vu_req_name(uint32_t req);

class VhostUserConn {
 public:
  // Connects to the back-end's listening socket, retrying while it is not there yet (bounded
  // by timeout_ms). Every later reply wait is bounded by timeout_ms too.
  VhostUserConn(const std::string& path, int timeout_ms);
  ~VhostUserConn();
  VhostUserConn(const VhostUserConn&) = delete;
  VhostUserConn& operator=(const VhostUserConn&) = delete;

  // After SET_PROTOCOL_FEATURES with REPLY_ACK: every message without a reply of its own is
  // sent with need_reply and its acknowledgement is checked.
  void use_reply_ack(bool on) { reply_ack_ = on; }

  uint64_t get_u64(VuReq req);  // GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM
  void set_u64(VuReq req, uint64_t value, int fd = -1);  // SET_FEATURES, ..., SET_VRING_KICK/CALL
  void set_owner();
  void set_vring_state(VuReq req, uint32_t index, uint32_t num);  // NUM, BASE, ENABLE
  uint32_t get_vring_base(uint32_t index);
  void set_vring_addr(uint32_t index, uint64_t desc, uint64_t used, uint64_t avail);
  void set_mem_table(const std::vector<VuRegion>& regions, const std::vector<int>& fds);
  // GET_CONFIG of `size` bytes from offset 0; an empty reply payload is an Error.
  std::vector<uint8_t> get_config(uint32_t size);
  // GET_INFLIGHT_FD for num_queues x queue_size: the region's description and its fd (the
  // caller closes it; -1 with mmap_size 0 when the back-end has none). SET_INFLIGHT_FD hands it back.
  int get_inflight_fd(uint16_t num_queues, uint16_t queue_size, VuInflight* out);
  void set_inflight_fd(int fd, const VuInflight& d);

 private:
  void send_msg(uint32_t req, bool need_reply, const void* payload, uint32_t size, const int* fds, int nfds);
  // Reads one reply for `req`; returns its payload (checked against `expect_size` unless 0).
  std::vector<uint8_t> recv_reply(uint32_t req, uint32_t expect_size);
  uint64_t recv_u64(uint32_t req);
  void read_full(void* buf, size_t len, uint32_t req, int* fd_out = nullptr);
  void send_set(uint32_t req, const void* payload, uint32_t size, const int* fds = nullptr, int nfds = 0);

  int fd_ = -1;
  int timeout_ms_;
  bool reply_ack_ = false;
};

}  // namespace vb
