// Host-side routing arithmetic shared by the CPU backends and the CUDA backend (which copies the logits
// to the host): small per-token loops over the expert
// scores whose exact order of operations is the contract (backend.hpp); one implementation, so the
// reference and the optimized backend pick identical experts.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace moeflux::cpu {

// Backend::router_softmax_topk for token t: the reference's arithmetic in its order (max, exp, sum,
// divide), top-k by (p desc, id asc).
inline void softmax_topk_row(const float* logits, int64_t n_expert, int64_t k, bool normalize, int32_t* ids, float* weights) {
  std::vector<float> p(static_cast<size_t>(n_expert));        // [n_expert] probabilities
  std::vector<int32_t> order(static_cast<size_t>(n_expert));  // expert ids, best first
  const float max_logit = *std::max_element(logits, logits + n_expert);
  float sum = 0.0f;
  for (int64_t e = 0; e < n_expert; ++e) {
    p[size_t(e)] = std::exp(logits[e] - max_logit);
    sum += p[size_t(e)];
  }
  for (int64_t e = 0; e < n_expert; ++e) p[size_t(e)] /= sum;
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [&](int32_t a, int32_t b) { return p[size_t(a)] > p[size_t(b)] || (p[size_t(a)] == p[size_t(b)] && a < b); });
  float selected_sum = 0.0f;
  for (int64_t i = 0; i < k; ++i) selected_sum += p[size_t(order[size_t(i)])];
  for (int64_t i = 0; i < k; ++i) {
    ids[i] = order[size_t(i)];
    weights[i] = normalize ? p[size_t(order[size_t(i)])] / selected_sum : p[size_t(order[size_t(i)])];
  }
}

// Backend::router_sigmoid_grouped_topk for token t.
inline void sigmoid_grouped_topk_row(const float* logits, const float* bias, int64_t n_expert, int64_t n_group,
                                     int64_t topk_group, int64_t k, bool normalize, float scaling, int32_t* ids,
                                     float* weights) {
  std::vector<float> s(static_cast<size_t>(n_expert)), c(static_cast<size_t>(n_expert));
  for (int64_t e = 0; e < n_expert; ++e) {
    s[size_t(e)] = 1.0f / (1.0f + std::exp(-logits[e]));
    c[size_t(e)] = s[size_t(e)] + (bias ? bias[e] : 0.0f);
  }
  if (n_group > 1) {
    const int64_t per_group = n_expert / n_group;
    std::vector<float> group_score(static_cast<size_t>(n_group));
    for (int64_t g = 0; g < n_group; ++g) {
      const float* cg = c.data() + g * per_group;
      float top1 = -INFINITY, top2 = -INFINITY;
      for (int64_t i = 0; i < per_group; ++i) {
        if (cg[i] > top1) {
          top2 = top1;
          top1 = cg[i];
        } else if (cg[i] > top2) {
          top2 = cg[i];
        }
      }
      group_score[size_t(g)] = per_group >= 2 ? top1 + top2 : top1;
    }
    std::vector<int32_t> order(static_cast<size_t>(n_group));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return group_score[size_t(a)] > group_score[size_t(b)]; });
    std::vector<bool> kept(static_cast<size_t>(n_group), false);
    for (int64_t i = 0; i < topk_group && i < n_group; ++i) kept[size_t(order[size_t(i)])] = true;
    for (int64_t e = 0; e < n_expert; ++e)
      if (!kept[size_t(e / per_group)]) c[size_t(e)] = 0.0f;
  }
  std::vector<int32_t> order(static_cast<size_t>(n_expert));
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
    return c[size_t(a)] > c[size_t(b)] || (c[size_t(a)] == c[size_t(b)] && a < b);
  });
  float sum = 0.0f;
  for (int64_t i = 0; i < k; ++i) sum += s[size_t(order[size_t(i)])];
  for (int64_t i = 0; i < k; ++i) {
    const float w = s[size_t(order[size_t(i)])];
    ids[i] = order[size_t(i)];
    weights[i] = (normalize ? w / (sum + 1e-20f) : w) * scaling;
  }
}

}  // namespace moeflux::cpu
