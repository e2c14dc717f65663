// CPU affinity of the calling thread (sched_setaffinity/sched_getaffinity with pid 0, which
// Linux takes as the calling thread, not the process): queue threads pin themselves, each from
// inside its own thread (the disk option `cpus`).
#pragma once
#include <napi.h>

namespace rnull {
void InitAffinity(Napi::Env env, Napi::Object exports);
}
