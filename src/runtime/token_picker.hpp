// The next token from a session's last logits as a sampler picks it, taken where the logits are.
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/session.hpp"
#include "sampling/sampler.hpp"

namespace moeflux {

// Greedy picks by Session::greedy_token (an id comes back from a GPU, not the row); top-k sampling (k ≤
// 1024) and penalized greedy or top-k picks (Sampler::candidate_k) draw from Session::top_candidates (a GPU
// sends at most 32 KB of candidates and the penalty window's raw logits); every other draw with temperature
// > 0 — temperature alone, min-p, top-p, top-k past 1024, penalties without top-k — and any pick whose
// penalty window passes the candidates, by Session::draw_token (the GPU draws it with the sampler's random
// bits: 4 bytes come back); what a backend does not offer (a CPU backend) samples the whole row on the
// host. The same token as sampler.sample(session.logits()), draw for draw. Does not accept the token.
// Keeps the candidate buffers between calls.
class TokenPicker {
 public:
  int32_t next(const Session& session, Sampler& sampler);

 private:
  static constexpr int64_t capacity = 4096;  // candidates at most; more (ties at the cut) take draw_token
  std::vector<int32_t> ids_;
  std::vector<float> z_;
  std::vector<float> window_logits_;
};

}  // namespace moeflux
