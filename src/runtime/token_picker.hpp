// The next token from a session's last logits as a sampler picks it, taken where the logits are.
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/session.hpp"
#include "sampling/sampler.hpp"

namespace moeflux {

// Greedy picks by Session::greedy_token (an id comes back from a GPU, not the row); a temperature draw
// over the whole row, with top-p, min-p, both or neither (Sampler::device_draw), by Session::draw_token
// (the GPU draws it with the sampler's random bits); top-k sampling and penalized greedy or top-k picks
// (Sampler::candidate_k) draw from Session::top_candidates (a GPU sends at most 32 KB of candidates and
// the penalty window's raw logits); anything else samples the whole row on the host. The same token as
// sampler.sample(session.logits()), draw for draw. Does not accept the token. Keeps the candidate buffers
// between calls.
class TokenPicker {
 public:
  int32_t next(const Session& session, Sampler& sampler);

 private:
  static constexpr int64_t capacity = 4096;  // candidates at most; more (ties at the cut) falls back to the row
  std::vector<int32_t> ids_;
  std::vector<float> z_;
  std::vector<float> window_logits_;
};

}  // namespace moeflux
