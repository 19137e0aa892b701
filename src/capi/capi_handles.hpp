// The C API's handles that more than one of its translation units opens: a session and a sampler meet in
// moeflux_session_sample.
#pragma once

#include <memory>

#include "runtime/session.hpp"
#include "runtime/token_picker.hpp"
#include "sampling/sampler.hpp"

struct moeflux_session {
  std::unique_ptr<moeflux::Session> session;
};

struct moeflux_sampler {
  moeflux::Sampler sampler;
  moeflux::TokenPicker picker;  // moeflux_session_sample's candidate buffers
};
