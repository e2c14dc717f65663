// What kind of socket an inherited fd is (for `--fd N`: a listening unix stream socket handed
// over by a service manager or libvirt).
#pragma once
#include <napi.h>

namespace rnull {
void InitSocketInfo(Napi::Env env, Napi::Object exports);
}
