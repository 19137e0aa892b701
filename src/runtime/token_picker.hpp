// The next token from a session's last logits as a sampler picks it, taken where the logits are.
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/session.hpp"
#include "sampling/sampler.hpp"

namespace moeflux {

// Greedy picks by Session::greedy_token (an id comes back from a GPU, not the row); a temperature draw
// over the whole row, with min-p or not (Sampler::device_draw), by Session::draw_token (the GPU draws it
// with the sampler's random bits); top-k sampling and penalized greedy or top-k picks
// (Sampler::candidate_k) draw from Session::top_candidates (a GPU sends at most 32 KB of candidates and
// the penalty window's raw logits), and so does top-p without top-k (Sampler::sample_nucleus, with the
// row's total weight from Session::row_mass) while its nucleus lies within the candidates; anything else
// samples the whole row on the host. The same token as sampler.sample(session.logits()), draw for draw. Does not accept the token.
// Keeps the candidate buffers between calls.
class TokenPicker {
 public:
  int32_t next(const Session& session, Sampler& sampler);

 private:
  static constexpr int64_t capacity = 4096;  // candidates at most; more (ties at the cut) falls back to the row
  static constexpr int64_t nucleus_k = 1024;  // top-p without top-k asks for at least this many
  std::vector<int32_t> ids_;
  std::vector<float> z_;
  std::vector<float> window_logits_;
};

}  // namespace moeflux
