#include "runtime/token_picker.hpp"

namespace moeflux {

int32_t TokenPicker::next(const Session& session, Sampler& sampler) {
  if (sampler.picks_argmax()) return session.greedy_token();
  if (const int64_t k = sampler.candidate_k(); k > 0 && k <= capacity) {
    ids_.resize(size_t(capacity)), z_.resize(size_t(capacity));
    const std::vector<int32_t>& window = sampler.penalty_ids();
    window_logits_.resize(window.size());
    // Greedy with a penalty selects by the logit itself: x / 1 is x, bit for bit.
    const float temperature = sampler.params().temperature > 0.0f ? sampler.params().temperature : 1.0f;
    const int64_t n = session.top_candidates(temperature, k, ids_.data(), z_.data(), capacity, window, window_logits_.data());
    if (n >= 0) return sampler.sample_candidates(ids_.data(), z_.data(), n, window_logits_.data());
  }
  if (Sampler::DeviceDraw draw; sampler.device_draw(&draw)) {
    // The draw's bits taken first, so the row path below draws with the same ones (a greedy pick takes none).
    const uint64_t bits = draw.temperature > 0.0f ? sampler.draw_bits() : 0;
    if (const int64_t token = session.draw_token(draw, bits); token >= 0) return int32_t(token);
    return sampler.sample(session.logits(), bits);
  }
  return sampler.sample(session.logits());
}

}  // namespace moeflux
