#include "errors.h"

#include <cmath>
#include <cstring>
#include <string>

namespace rnull {

void ThrowSyscallError(Napi::Env env, const char* syscall, int err) {
  AddonData* data = env.GetInstanceData<AddonData>();
  std::string msg = std::string(syscall) + ": " + std::strerror(err);
  if (data == nullptr || data->syscallError.IsEmpty()) {
    Napi::Error::New(env, msg).ThrowAsJavaScriptException();
    return;
  }
  Napi::Object e = data->syscallError.New({Napi::String::New(env, syscall), Napi::Number::New(env, err),
                                           Napi::String::New(env, msg)});
  if (env.IsExceptionPending()) return;
  Napi::Error(env, e).ThrowAsJavaScriptException();
}

void ThrowTypeError(Napi::Env env, const char* message) {
  Napi::TypeError::New(env, message).ThrowAsJavaScriptException();
}
void ThrowRangeError(Napi::Env env, const char* message) {
  Napi::RangeError::New(env, message).ThrowAsJavaScriptException();
}
void ThrowError(Napi::Env env, const char* message) {
  Napi::Error::New(env, message).ThrowAsJavaScriptException();
}

bool ArgNumber(const Napi::CallbackInfo& info, size_t i, const char* name, double* out) {
  if (info.Length() <= i || !info[i].IsNumber()) {
    ThrowTypeError(info.Env(), (std::string("expected a number for ") + name).c_str());
    return false;
  }
  *out = info[i].As<Napi::Number>().DoubleValue();
  return true;
}

bool ArgInt(const Napi::CallbackInfo& info, size_t i, const char* name, int64_t* out) {
  double d;
  if (!ArgNumber(info, i, name, &d)) return false;
  // Only exact integers within the safe range are accepted (no silent truncation).
  if (!(std::floor(d) == d) || std::fabs(d) > 9007199254740991.0) {
    ThrowRangeError(info.Env(), (std::string("expected a safe integer for ") + name).c_str());
    return false;
  }
  *out = static_cast<int64_t>(d);
  return true;
}

bool ArgByteRange(const Napi::CallbackInfo& info, size_t arr, size_t off, size_t len, const char* what, uint8_t** data, size_t* length) {
  if (info.Length() <= arr || !info[arr].IsTypedArray() || info[arr].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
    ThrowTypeError(info.Env(), (std::string(what) + ": expected a Uint8Array").c_str());
    return false;
  }
  double o, n;
  if (!ArgNumber(info, off, "offset", &o) || !ArgNumber(info, len, "length", &n)) return false;
  Napi::Uint8Array a = info[arr].As<Napi::Uint8Array>();
  if (!(o >= 0 && n >= 0) || o + n > static_cast<double>(a.ByteLength())) {
    ThrowRangeError(info.Env(), (std::string(what) + ": range outside the array").c_str());
    return false;
  }
  *data = a.Data() + static_cast<size_t>(o);
  *length = static_cast<size_t>(n);
  return true;
}

bool GetSafeU64(Napi::Object o, const char* key, uint64_t* out) {
  Napi::Value v = o.Get(key);
  if (!v.IsNumber()) return false;
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= 0) || d > 9007199254740991.0 || d != static_cast<double>(static_cast<uint64_t>(d))) return false;
  *out = static_cast<uint64_t>(d);
  return true;
}

}  // namespace rnull
