// Errors thrown into JavaScript.
//
// Syscall failures become instances of the JS class SyscallError (lib: src/native/errors.ts),
// registered once through initialize(); the addon never exits or aborts the process.
#pragma once
#include <napi.h>
#include <stdint.h>

namespace rnull {

// Per-environment state of the addon (safe with worker threads: one per env).
struct AddonData {
  Napi::FunctionReference syscallError;
  Napi::FunctionReference guestMemoryCtor;
};

// Throws SyscallError{syscall, errno, message} (or a plain Error before initialize()).
void ThrowSyscallError(Napi::Env env, const char* syscall, int err);

// Throws a TypeError / RangeError / Error with the given message.
void ThrowTypeError(Napi::Env env, const char* message);
void ThrowRangeError(Napi::Env env, const char* message);
void ThrowError(Napi::Env env, const char* message);

// Argument helpers: each returns false after throwing a TypeError naming the argument.
bool ArgInt(const Napi::CallbackInfo& info, size_t i, const char* name, int64_t* out);
bool ArgNumber(const Napi::CallbackInfo& info, size_t i, const char* name, double* out);
// Reads a byte range given as three arguments: a Uint8Array (index arr), an offset (off) and a
// length (len), with [offset, offset + length) inside the array; *data points at the offset.
// False after throwing (TypeError for wrong types, RangeError naming `what` outside the array).
bool ArgByteRange(const Napi::CallbackInfo& info, size_t arr, size_t off, size_t len, const char* what, uint8_t** data, size_t* length);
// Reads o[key] as a non-negative safe integer; false (no exception) if it is not one.
bool GetSafeU64(Napi::Object o, const char* key, uint64_t* out);

}  // namespace rnull
