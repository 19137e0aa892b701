// A session: one conversation's state over a shared Model — the KV cache (and later recurrent
// state), the position, and the last logits. eval_prompt prefills in batches, eval_token decodes one
// step; both leave logits for the sampler. State snapshots are versioned, checksummed and tied to the
// model's fingerprint.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "core/status.hpp"

namespace moeflux {

class ForwardState;
class Model;

struct SessionOptions {
  int64_t n_ctx = 4096;    // positions the KV cache holds (clamped to the model's maximum)
  int64_t n_batch = 512;   // prompt tokens per forward pass
};

class Session {
 public:
  static Result<std::unique_ptr<Session>> create(Model& model, const SessionOptions& options = {});
  ~Session();

  // Evaluates tokens at positions n_past() … and leaves the last position's logits in logits().
  // When all_logits is given it receives [tokens.size(), n_vocab] logits, one row per token.
  Status eval_prompt(std::span<const int32_t> tokens, float* all_logits = nullptr);
  Status eval_token(int32_t token);

  const float* logits() const { return logits_.data(); }  // [n_vocab], after an eval
  bool has_logits() const { return has_logits_; }
  int64_t n_past() const { return n_past_; }
  int64_t n_ctx() const;
  int64_t n_vocab() const;

  void reset();
  // Forgets positions ≥ n (attention caches are position-addressed, so this is exact). The logits
  // are no longer those of the last position and are cleared.
  Status truncate(int64_t n);

  size_t state_size() const;
  Status state_save(std::vector<uint8_t>& out) const;
  Status state_load(std::span<const uint8_t> data);

  Model& model() { return model_; }

 private:
  explicit Session(Model& model);
  Model& model_;
  SessionOptions options_;
  std::unique_ptr<ForwardState> state_;
  std::vector<float> logits_;  // [n_vocab]
  bool has_logits_ = false;
  int64_t n_past_ = 0;
};

}  // namespace moeflux
