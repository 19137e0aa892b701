// The reference CPU backend: every op of backend.hpp as plain single-threaded loops, written to be
// obviously correct rather than fast. It is the oracle of the op tests; nothing here is optimized.
// Accumulation choice: dot products and sums accumulate in fp32, left to right. fp32 is what every
// optimized backend computes in, so a difference between them measures reordering only; the op tests
// size their tolerances from that (≈ eps_fp32 · Σ|terms|).
#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <vector>

#include "backends/backend.hpp"
#include "backends/cpu/router_ops.hpp"
#include "core/status.hpp"
#include "quant/quantize.hpp"

namespace moeflux {
namespace {

class ReferenceBackend final : public Backend {
 public:
  const char* name() const override { return "cpu-reference"; }

  float* alloc_activations(size_t n_floats) override {
    void* p = nullptr;
    if (n_floats > SIZE_MAX / sizeof(float) || posix_memalign(&p, 64, std::max<size_t>(n_floats, 1) * sizeof(float)) != 0) return nullptr;
    return static_cast<float*>(p);
  }
  void free_activations(float* p) override { std::free(p); }

  void matmul(const WeightView& w, const float* x, float* y, int64_t n_tokens) override {
    MF_CHECK(n_tokens >= 0);
    std::vector<float> row(size_t(w.cols));  // [cols] one dequantized weight row
    for (int64_t r = 0; r < w.rows; ++r) {
      dequantize_row(w, r, row.data());
      for (int64_t t = 0; t < n_tokens; ++t) {
        const float* xt = x + t * w.cols;
        float sum = 0.0f;
        for (int64_t c = 0; c < w.cols; ++c) sum += row[c] * xt[c];
        y[t * w.rows + r] = sum;
      }
    }
  }

  void matmul_many(const MatmulJob* jobs, int64_t n_jobs) override {
    for (int64_t j = 0; j < n_jobs; ++j) matmul(jobs[j].w, jobs[j].x, jobs[j].y, jobs[j].n_tokens);
  }

  void embed_rows(const WeightView& w, const int32_t* ids, int64_t n_tokens, float* out) override {
    for (int64_t t = 0; t < n_tokens; ++t) {
      MF_CHECK_MSG(ids[t] >= 0 && ids[t] < w.rows, "token id {} outside [0, {})", ids[t], w.rows);
      dequantize_row(w, ids[t], out + t * w.cols);
    }
  }

  void rms_norm(const float* x, const float* weight, float eps, int64_t n_rows, int64_t dim, float* out) override {
    for (int64_t r = 0; r < n_rows; ++r) {
      const float* xr = x + r * dim;
      float sum_sq = 0.0f;
      for (int64_t i = 0; i < dim; ++i) sum_sq += xr[i] * xr[i];
      const float inv_rms = 1.0f / std::sqrt(sum_sq / float(dim) + eps);
      for (int64_t i = 0; i < dim; ++i) out[r * dim + i] = xr[i] * inv_rms * weight[i];
    }
  }

  void rope_neox(float* x, int64_t n_tokens, int64_t n_heads, int64_t head_dim, int64_t rot_dim,
                 const int32_t* positions, const float* inv_freq, float scale, int64_t row_stride) override {
    MF_CHECK(rot_dim % 2 == 0 && rot_dim <= head_dim);
    const int64_t half = rot_dim / 2;
    if (row_stride == 0) row_stride = n_heads * head_dim;
    for (int64_t t = 0; t < n_tokens; ++t) {
      for (int64_t h = 0; h < n_heads; ++h) {
        float* v = x + t * row_stride + h * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          // The angle is formed in fp32, as transformers does (position · inv_freq in the model dtype);
          // cos and sin carry the scale, as transformers multiplies them by the attention factor.
          const float angle = float(positions[t]) * inv_freq[i];
          const float c = std::cos(angle) * scale, s = std::sin(angle) * scale;
          const float x0 = v[i], x1 = v[i + half];
          v[i] = x0 * c - x1 * s;
          v[i + half] = x1 * c + x0 * s;
        }
      }
    }
  }

  void attention(const float* q, const float* k_cache, const float* v_cache, int64_t n_tokens, int64_t n_past,
                 const AttentionLayout& layout, float scale, float* out) override {
    const int64_t n_head = layout.n_head, n_head_kv = layout.n_head_kv, k_dim = layout.k_dim, v_dim = layout.v_dim;
    MF_CHECK(n_head_kv > 0 && n_head % n_head_kv == 0);
    const int64_t group = n_head / n_head_kv;
    std::vector<float> p;  // [n_past + T] attention probabilities of one query head
    for (int64_t t = 0; t < n_tokens; ++t) {
      const int64_t n_keys = n_past + t + 1;
      p.assign(size_t(n_keys), 0.0f);
      for (int64_t h = 0; h < n_head; ++h) {
        const int64_t kv = h / group;
        const float* qh = q + (t * n_head + h) * k_dim;
        float max_score = -INFINITY;
        for (int64_t j = 0; j < n_keys; ++j) {
          const float* kj = k_cache + j * layout.k_stride + kv * k_dim;
          float dot = 0.0f;
          for (int64_t d = 0; d < k_dim; ++d) dot += qh[d] * kj[d];
          p[j] = dot * scale;
          max_score = std::max(max_score, p[j]);
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < n_keys; ++j) {
          p[j] = std::exp(p[j] - max_score);
          sum += p[j];
        }
        for (int64_t j = 0; j < n_keys; ++j) p[j] /= sum;
        float* oh = out + (t * n_head + h) * v_dim;
        for (int64_t d = 0; d < v_dim; ++d) {
          float acc = 0.0f;
          for (int64_t j = 0; j < n_keys; ++j) acc += p[j] * v_cache[j * layout.v_stride + kv * v_dim + d];
          oh[d] = acc;
        }
      }
    }
  }

  void router_softmax_topk(const float* logits, int64_t n_tokens, int64_t n_expert, int64_t k, bool normalize,
                           int32_t* ids, float* weights) override {
    MF_CHECK(k > 0 && k <= n_expert);
    std::vector<float> p(static_cast<size_t>(n_expert));      // [n_expert] probabilities of one token
    std::vector<int32_t> order(static_cast<size_t>(n_expert));  // expert ids, best first
    for (int64_t t = 0; t < n_tokens; ++t) {
      const float* lt = logits + t * n_expert;
      const float max_logit = *std::max_element(lt, lt + n_expert);
      float sum = 0.0f;
      for (int64_t e = 0; e < n_expert; ++e) {
        p[e] = std::exp(lt[e] - max_logit);
        sum += p[e];
      }
      for (int64_t e = 0; e < n_expert; ++e) p[e] /= sum;
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return p[a] > p[b]; });
      float selected_sum = 0.0f;
      for (int64_t i = 0; i < k; ++i) selected_sum += p[order[i]];
      for (int64_t i = 0; i < k; ++i) {
        ids[t * k + i] = order[i];
        weights[t * k + i] = normalize ? p[order[i]] / selected_sum : p[order[i]];
      }
    }
  }

  void router_sigmoid_grouped_topk(const float* logits, const float* bias, int64_t n_tokens, int64_t n_expert, int64_t n_group,
                                   int64_t topk_group, int64_t k, bool normalize, float scaling, int32_t* ids,
                                   float* weights) override {
    MF_CHECK(k > 0 && k <= n_expert && n_group > 0 && n_expert % n_group == 0 && topk_group > 0 && topk_group <= n_group);
    for (int64_t t = 0; t < n_tokens; ++t)
      cpu::sigmoid_grouped_topk_row(logits + t * n_expert, bias, n_expert, n_group, topk_group, k, normalize, scaling, ids + t * k,
                                    weights + t * k);
  }

  void swiglu(const float* gate, const float* up, float* out, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) {
      const float g = gate[i];
      out[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
  }

  void axpy(float* acc, const float* x, float a, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) acc[i] += a * x[i];
  }

  // x[i] = value: plain stores, exact.
  void fill(float* x, float value, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) x[i] = value;
  }

  void gather_rows(const float* src, const int32_t* rows, int64_t n_rows, int64_t dim, float* dst) override {
    for (int64_t i = 0; i < n_rows; ++i) std::copy(src + rows[i] * dim, src + (rows[i] + 1) * dim, dst + i * dim);
  }

  void copy_rows(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t n_rows, int64_t dim) override {
    for (int64_t r = 0; r < n_rows; ++r)
      for (int64_t i = 0; i < dim; ++i) dst[r * dst_stride + i] = src[r * src_stride + i];
  }

  void sigmoid_mul(float* x, const float* gate, int64_t n_rows, int64_t dim, bool per_row) override {
    for (int64_t r = 0; r < n_rows; ++r)
      for (int64_t i = 0; i < dim; ++i) {
        const float g = per_row ? gate[r] : gate[r * dim + i];
        x[r * dim + i] *= 1.0f / (1.0f + std::exp(-g));
      }
  }

  void causal_conv1d_silu(const float* x, float* conv_state, const float* weight, int64_t n_tokens, int64_t channels,
                          int64_t kernel, float* out) override {
    const int64_t hist = kernel - 1;
    // m = state ++ x, [hist + T, channels]
    std::vector<float> m(size_t((hist + n_tokens) * channels));
    std::copy(conv_state, conv_state + hist * channels, m.begin());
    std::copy(x, x + n_tokens * channels, m.begin() + hist * channels);
    for (int64_t t = 0; t < n_tokens; ++t)
      for (int64_t c = 0; c < channels; ++c) {
        float sum = 0.0f;
        for (int64_t j = 0; j < kernel; ++j) sum += weight[c * kernel + j] * m[size_t((t + j) * channels + c)];
        out[t * channels + c] = sum / (1.0f + std::exp(-sum));
      }
    std::copy(m.end() - hist * channels, m.end(), conv_state);
  }

  void gated_delta_gates(const float* a, const float* b, const float* a_log, const float* dt_bias, int64_t n_tokens,
                         int64_t n_heads, float* g, float* beta) override {
    for (int64_t t = 0; t < n_tokens; ++t)
      for (int64_t h = 0; h < n_heads; ++h) {
        const float x = a[t * n_heads + h] + dt_bias[h];
        const float softplus = x > 20.0f ? x : std::log1p(std::exp(x));
        g[t * n_heads + h] = -std::exp(a_log[h]) * softplus;
        beta[t * n_heads + h] = 1.0f / (1.0f + std::exp(-b[t * n_heads + h]));
      }
  }

  // The recurrence exactly as written in backend.hpp, token by token.
  void gated_delta_rule(const float* q, const float* k, const float* v, int64_t stride, const float* g, const float* beta,
                        float* state, int64_t n_tokens, int64_t n_k_heads, int64_t n_v_heads, int64_t k_dim, int64_t v_dim,
                        float q_scale, float* out) override {
    const int64_t ratio = n_v_heads / n_k_heads;
    std::vector<float> qn(static_cast<size_t>(k_dim)), kn(static_cast<size_t>(k_dim)), u(static_cast<size_t>(v_dim));
    auto l2 = [&](const float* x, float scale, float* y) {
      float sum = 0.0f;
      for (int64_t i = 0; i < k_dim; ++i) sum += x[i] * x[i];
      const float inv = 1.0f / std::sqrt(sum + 1e-6f);
      for (int64_t i = 0; i < k_dim; ++i) y[i] = x[i] * inv * scale;
    };
    for (int64_t t = 0; t < n_tokens; ++t)
      for (int64_t h = 0; h < n_v_heads; ++h) {
        const int64_t j = h / ratio;
        l2(q + t * stride + j * k_dim, q_scale, qn.data());
        l2(k + t * stride + j * k_dim, 1.0f, kn.data());
        const float* vt = v + t * stride + h * v_dim;
        float* S = state + h * k_dim * v_dim;
        const float decay = std::exp(g[t * n_v_heads + h]), b = beta[t * n_v_heads + h];
        for (int64_t i = 0; i < k_dim * v_dim; ++i) S[i] *= decay;
        std::fill(u.begin(), u.end(), 0.0f);
        for (int64_t i = 0; i < k_dim; ++i)
          for (int64_t c = 0; c < v_dim; ++c) u[size_t(c)] += S[i * v_dim + c] * kn[size_t(i)];
        for (int64_t c = 0; c < v_dim; ++c) u[size_t(c)] = b * (vt[c] - u[size_t(c)]);
        for (int64_t i = 0; i < k_dim; ++i)
          for (int64_t c = 0; c < v_dim; ++c) S[i * v_dim + c] += kn[size_t(i)] * u[size_t(c)];
        float* o = out + (t * n_v_heads + h) * v_dim;
        for (int64_t c = 0; c < v_dim; ++c) {
          float sum = 0.0f;
          for (int64_t i = 0; i < k_dim; ++i) sum += S[i * v_dim + c] * qn[size_t(i)];
          o[c] = sum;
        }
      }
  }
};

}  // namespace

std::unique_ptr<Backend> make_reference_backend() { return std::make_unique<ReferenceBackend>(); }

}  // namespace moeflux
