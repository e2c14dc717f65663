// Plain fd syscalls JavaScript has no binding for: eventfd and memfd (kick/call notifiers and the
// test front-end's guest memory), dup() and close(). Each is one syscall; errors throw SyscallError.
#pragma once
#include <napi.h>

namespace rnull {
void InitFdOps(Napi::Env env, Napi::Object exports);
}
