# message_fuzz: vhost-user message framing and fd handling (plain C++ below native/socket.cc).
message_SOURCES := ../../native/vhost_framing.cc
