// The vhost-user unix socket: listen/accept, and whole messages in and out with their fds
// (SCM_RIGHTS), never waiting on the peer: MessageReader assembles messages as bytes arrive
// (framing in vhost_framing.h), sendMessage never blocks. Message syntax (header fields, payload
// layout) is parsed in TypeScript (vhost/message.ts); this file only moves bytes and fds.
#pragma once
#include <napi.h>

namespace rnull {
void InitSocket(Napi::Env env, Napi::Object exports);
}
