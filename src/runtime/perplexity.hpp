// Perplexity of a token sequence under a model, with the standard sliding-window definition (the one
// Hugging Face documents for fixed-length models): windows of `window` tokens starting every `stride`
// tokens; each window scores only the targets that no earlier window scored, every target predicted
// from up to window − 1 tokens of context; the result is exp(mean NLL over all scored targets).
#pragma once

#include <cstdint>
#include <functional>
#include <span>

#include "core/status.hpp"

namespace moeflux {

class Model;

struct PerplexityResult {
  double mean_nll = 0;       // nats per scored token
  double perplexity = 0;     // exp(mean_nll)
  int64_t scored_tokens = 0; // targets scored (n − 1 when stride < window)
  int64_t windows = 0;
  double seconds = 0;
};

// window ≥ 2, 1 ≤ stride ≤ window. progress (optional) receives scored tokens so far and the total.
Result<PerplexityResult> compute_perplexity(Model& model, std::span<const int32_t> tokens, int64_t window, int64_t stride,
                                            const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace moeflux
