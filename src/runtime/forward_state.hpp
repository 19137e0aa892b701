// Per-session model state that a family's forward pass reads and writes: the KV cache (per-position
// buffers) and any fixed-size recurrent state, plus the family's scratch activations. The session
// serializes the buffers listed here; it never needs to know what they mean.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moeflux {

class Backend;

class ForwardState {
 public:
  struct Buffer {
    std::string name;
    float* data = nullptr;           // backend memory
    size_t floats_per_position = 0;  // > 0: per-position buffer [n_ctx, floats_per_position]
    size_t fixed_floats = 0;         // > 0: fixed-size buffer (recurrent state)
  };

  // Family-specific scratch, released with the state.
  struct Scratch {
    virtual ~Scratch() = default;
  };

  ForwardState(Backend& backend, int64_t n_ctx) : backend_(backend), n_ctx_(n_ctx) {}
  ~ForwardState();
  ForwardState(const ForwardState&) = delete;
  ForwardState& operator=(const ForwardState&) = delete;

  int64_t n_ctx() const { return n_ctx_; }
  Backend& backend() { return backend_; }

  // Allocates and registers a buffer; returns its data pointer or null when out of memory.
  float* add_per_position(const std::string& name, size_t floats_per_position);
  float* add_fixed(const std::string& name, size_t floats);
  const std::vector<Buffer>& buffers() const { return buffers_; }

  std::unique_ptr<Scratch> scratch;

  // Set by the session for one forward: where the backend's memory is not host memory, the output head
  // leaves a single row of logits there (backend_logits, valid until the next forward) instead of
  // copying it to the caller, so a decode step that wants only the greedy token does not wait for the
  // copy of the whole row. The session clears backend_logits before each forward; the head sets it.
  bool logits_stay = false;
  const float* backend_logits = nullptr;

 private:
  Backend& backend_;
  int64_t n_ctx_;
  std::vector<Buffer> buffers_;
};

}  // namespace moeflux
