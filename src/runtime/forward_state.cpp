#include "runtime/forward_state.hpp"

#include <cstring>

#include "backends/backend.hpp"

namespace moeflux {

ForwardState::~ForwardState() {
  scratch.reset();
  for (auto& b : buffers_) backend_.free_activations(b.data);
}

float* ForwardState::add_per_position(const std::string& name, size_t floats_per_position) {
  float* p = backend_.alloc_activations(size_t(n_ctx_) * floats_per_position);
  if (p) buffers_.push_back({name, p, floats_per_position, 0});
  return p;
}

float* ForwardState::add_fixed(const std::string& name, size_t floats) {
  float* p = backend_.alloc_activations(floats);
  if (p) buffers_.push_back({name, p, 0, floats});
  return p;
}

}  // namespace moeflux
