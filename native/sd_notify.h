// The service manager's notification socket (sd_notify(3) protocol, written here without
// libsystemd): one datagram per call to the unix socket named by $NOTIFY_SOCKET.
#pragma once
#include <napi.h>

namespace rnull {
void InitSdNotify(Napi::Env env, Napi::Object exports);
}
