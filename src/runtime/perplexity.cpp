#include "runtime/perplexity.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/timer.hpp"
#include "runtime/model.hpp"
#include "runtime/session.hpp"

namespace moeflux {

namespace {

// −log softmax(logits)[target], in double.
double token_nll(const float* logits, int64_t n_vocab, int32_t target) {
  double m = logits[0];
  for (int64_t i = 1; i < n_vocab; ++i) m = std::max(m, double(logits[i]));
  double sum = 0;
  for (int64_t i = 0; i < n_vocab; ++i) sum += std::exp(double(logits[i]) - m);
  return std::log(sum) + m - double(logits[target]);
}

}  // namespace

Result<PerplexityResult> compute_perplexity(Model& model, std::span<const int32_t> tokens, int64_t window, int64_t stride,
                                            const std::function<void(int64_t, int64_t)>& progress) {
  const int64_t n = int64_t(tokens.size());
  if (window < 2 || stride < 1 || stride > window)
    return make_error(ErrorCode::invalid_argument, "perplexity: window {} and stride {} (need window ≥ 2, 1 ≤ stride ≤ window)", window, stride);
  if (n < 2) return make_error(ErrorCode::invalid_argument, "perplexity: {} tokens (need at least 2)", n);
  const int64_t V = model.n_vocab();
  // Logits are taken in chunks so memory stays at chunk × vocab floats whatever the window.
  const int64_t chunk = 64;
  MF_ASSIGN_OR_RETURN(auto session, Session::create(model, SessionOptions{window, chunk}));
  if (session->n_ctx() < window)
    return make_error(ErrorCode::invalid_argument, "perplexity: window {} exceeds the model's context of {}", window, session->n_ctx());
  std::vector<float> logits(size_t(chunk * V));
  PerplexityResult r;
  Timer timer;
  double nll_sum = 0;
  int64_t prev_end = 0;  // targets below prev_end were scored by an earlier window
  for (int64_t begin = 0; begin < n; begin += stride) {
    const int64_t end = std::min(begin + window, n);
    session->reset();
    for (int64_t first = begin; first < end; first += chunk) {
      const int64_t count = std::min(chunk, end - first);
      MF_TRY(session->eval_prompt(tokens.subspan(size_t(first), size_t(count)), logits.data()));
      for (int64_t j = 0; j < count; ++j) {
        const int64_t target = first + j + 1;  // the logits at position first + j predict this token
        if (target >= end || target < std::max<int64_t>(prev_end, begin + 1)) continue;
        nll_sum += token_nll(logits.data() + j * V, V, tokens[size_t(target)]);
        ++r.scored_tokens;
      }
    }
    ++r.windows;
    prev_end = end;
    if (progress) progress(r.scored_tokens, n - 1);
    if (end == n) break;
  }
  r.mean_nll = nll_sum / double(r.scored_tokens);
  r.perplexity = std::exp(r.mean_nll);
  r.seconds = timer.seconds();
  return r;
}

}  // namespace moeflux
