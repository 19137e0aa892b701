#include "runtime/token_picker.hpp"

namespace moeflux {

int32_t TokenPicker::next(const Session& session, Sampler& sampler) {
  if (sampler.picks_argmax()) return session.greedy_token();
  if (sampler.samples_from_top_k()) {
    ids_.resize(size_t(capacity)), z_.resize(size_t(capacity));
    const int64_t n = session.top_candidates(sampler.params().temperature, sampler.params().top_k, ids_.data(), z_.data(), capacity);
    if (n >= 0) return sampler.sample_candidates(ids_.data(), z_.data(), n);
  }
  return sampler.sample(session.logits());
}

}  // namespace moeflux
