// Error plumbing shared by the C API's translation units: the per-thread last-error message, and
// guarded(), which turns any exception into a status so nothing crosses into C.
#pragma once

#include <exception>
#include <new>
#include <string>

#include "core/status.hpp"
#include "moeflux/moeflux.h"

namespace moeflux::capi {

// Per calling thread, as the header documents: a C caller has no other place to receive the message.
std::string& last_error();

inline moeflux_status fail(const Status& s) {
  last_error() = s.to_string();
  return moeflux_status(int(s.code()));
}

inline moeflux_status fail(moeflux_status code, const char* message) {
  last_error() = message;
  return code;
}

template <typename F>
moeflux_status guarded(F&& f) {
  try {
    last_error().clear();
    return f();
  } catch (const std::bad_alloc&) {
    return fail(MOEFLUX_ERR_OUT_OF_MEMORY, "out of memory");
  } catch (const std::exception& e) {
    last_error() = std::string("internal error: ") + e.what();
    return MOEFLUX_ERR_INTERNAL;
  } catch (...) {
    return fail(MOEFLUX_ERR_INTERNAL, "internal error: unknown exception");
  }
}

}  // namespace moeflux::capi
