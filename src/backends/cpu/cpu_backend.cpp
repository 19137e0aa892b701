// The optimized CPU backend: every op of backend.hpp, multithreaded on the backend's own ThreadPool,
// with the heavy loops in the SIMD kernel table picked at construction (cpu_kernels.hpp). Each op
// names the reference it must match (reference_backend.cpp) and the tolerance the op tests hold it to.
// A backend object is not re-entrant: one caller at a time (it owns scratch buffers).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "backends/backend.hpp"
#include "backends/cpu/router_ops.hpp"
#include "backends/cpu/cpu_kernels.hpp"
#include "core/status.hpp"
#include "core/thread_pool.hpp"
#include "quant/quantize.hpp"

namespace moeflux {
namespace {

// Below this much work (floats touched) an op runs on the calling thread: a pool dispatch costs a few
// microseconds, more than the op.
constexpr int64_t min_parallel_work = 1 << 15;

class CpuBackend final : public Backend {
 public:
  CpuBackend(const CpuKernels& kernels, int n_threads, const CpuBackendTuning& tuning)
      : kernels_(kernels), tuning_(tuning), pool_(n_threads), scratch_(size_t(pool_.size())), scratch_busy_(size_t(pool_.size())) {
    name_ = std::string("cpu-") + kernels_.isa;
  }

  const char* name() const override { return name_.c_str(); }

  float* alloc_activations(size_t n_floats) override {
    void* p = nullptr;
    if (n_floats > SIZE_MAX / sizeof(float) || posix_memalign(&p, 64, std::max<size_t>(n_floats, 1) * sizeof(float)) != 0) return nullptr;
    return static_cast<float*>(p);
  }
  void free_activations(float* p) override { std::free(p); }

  // Reference: ReferenceBackend::matmul. Same exactly decoded weights, another summation order (q4
  // decode: scale and bias factored out of each group): |Δ| ≤ ~1e-6 · Σ_c |W[r,c] · x[t,c]| (tested with
  // 2e-5 · that sum). Bit-identical for every thread count, chunking and weight address (cpu_kernels.hpp).
  void matmul(const WeightView& w, const float* x, float* y, int64_t n_tokens) override {
    MF_CHECK(n_tokens >= 0 && w.rows >= 0);
    MF_CHECK_MSG(weight_format_fits(w.format, w.cols), "matmul: {} weight with {} cols", weight_format_name(w.format), w.cols);
    if (n_tokens == 0 || w.rows == 0) return;
    const float* xin = x;
    if (w.format == WeightFormat::q4) {
      q4_scratch_.resize(size_t(q4_prepared_floats(n_tokens, w.cols)));
      kernels_.prepare_q4_activations(x, n_tokens, w.cols, q4_scratch_.data());
      xin = q4_scratch_.data();
    }
    // Decode: chunks of ≥ 64 KiB of weights, so each task streams long enough to amortize its dispatch.
    // Prefill: the kernel blocks rows itself; chunks only need to give every thread a share.
    const int64_t row_bytes = std::max<int64_t>(1, int64_t(w.bytes() / size_t(w.rows)));
    const int64_t min_rows = n_tokens == 1 ? std::max<int64_t>(4, (64 << 10) / row_bytes) : 16;
    pool_.parallel_range(w.rows, min_rows, [&](int64_t begin, int64_t end) {
      kernels_.matmul_rows(w, xin, y, n_tokens, begin, end);
    });
  }

  // Reference: matmul of each job. One pool loop over the row chunks of every job, each chunk about the
  // same work (weight bytes × tokens, at least 64 KiB), so K small expert matrices cost one dispatch and
  // spread over every thread. The row chunking changes no bit (cpu_kernels.hpp): each job's y is
  // bit-identical to matmul alone.
  void matmul_many(const MatmulJob* jobs, int64_t n_jobs) override {
    MF_CHECK(n_jobs >= 0);
    // q4 jobs read prepared activations; consecutive jobs on the same x (gate and up of an expert, every
    // expert at decode) share one preparation.
    prepared_.assign(size_t(n_jobs), nullptr);
    size_t q4_floats = 0;
    int64_t total_cost = 0;
    for (int64_t j = 0; j < n_jobs; ++j) {
      const MatmulJob& job = jobs[j];
      MF_CHECK(job.n_tokens >= 0 && job.w.rows >= 0);
      MF_CHECK_MSG(weight_format_fits(job.w.format, job.w.cols), "matmul: {} weight with {} cols",
                   weight_format_name(job.w.format), job.w.cols);
      if (job.n_tokens == 0 || job.w.rows == 0) continue;
      if (job.w.format == WeightFormat::q4) q4_floats += size_t(q4_prepared_floats(job.n_tokens, job.w.cols));
      total_cost += int64_t(job.w.bytes()) * job.n_tokens;
    }
    q4_scratch_.resize(std::max<size_t>(q4_floats, 1));
    size_t q4_used = 0;
    const MatmulJob* last_q4 = nullptr;
    for (int64_t j = 0; j < n_jobs; ++j) {
      const MatmulJob& job = jobs[j];
      if (job.n_tokens == 0 || job.w.rows == 0 || job.w.format != WeightFormat::q4) continue;
      if (last_q4 != nullptr && last_q4->x == job.x && last_q4->n_tokens == job.n_tokens && last_q4->w.cols == job.w.cols) {
        prepared_[size_t(j)] = prepared_[size_t(last_q4 - jobs)];
        continue;
      }
      float* dst = q4_scratch_.data() + q4_used;
      kernels_.prepare_q4_activations(job.x, job.n_tokens, job.w.cols, dst);
      q4_used += size_t(q4_prepared_floats(job.n_tokens, job.w.cols));
      prepared_[size_t(j)] = dst;
      last_q4 = &job;
    }
    // A few chunks per thread balance uneven progress; decode chunks stream ≥ 64 KiB of weights each.
    const int64_t chunk_cost = std::max<int64_t>(64 << 10, total_cost / (int64_t(pool_.size()) * 4));
    chunks_.clear();
    for (int64_t j = 0; j < n_jobs; ++j) {
      const MatmulJob& job = jobs[j];
      if (job.n_tokens == 0 || job.w.rows == 0) continue;
      const int64_t row_cost = std::max<int64_t>(1, int64_t(job.w.bytes() / size_t(job.w.rows)) * job.n_tokens);
      const int64_t min_rows = job.n_tokens == 1 ? 4 : 16;
      const int64_t rows_per_chunk = std::max(min_rows, (chunk_cost + row_cost - 1) / row_cost);
      const int64_t n_chunks = (job.w.rows + rows_per_chunk - 1) / rows_per_chunk;
      for (int64_t c = 0; c < n_chunks; ++c)
        chunks_.push_back({j, c * job.w.rows / n_chunks, (c + 1) * job.w.rows / n_chunks});
    }
    auto run_chunk = [&](int64_t i) {
      const RowChunk& c = chunks_[size_t(i)];
      const MatmulJob& job = jobs[c.job];
      const float* xin = prepared_[size_t(c.job)] ? prepared_[size_t(c.job)] : job.x;
      kernels_.matmul_rows(job.w, xin, job.y, job.n_tokens, c.begin, c.end);
    };
    const int64_t n_chunks = int64_t(chunks_.size());
    if (n_chunks <= 1 || pool_.size() == 1) {
      for (int64_t i = 0; i < n_chunks; ++i) run_chunk(i);
    } else {
      pool_.parallel_for(n_chunks, run_chunk);
    }
  }

  // Reference: ReferenceBackend::embed_rows; decoding is exact, so the output is bit-identical.
  void embed_rows(const WeightView& w, const int32_t* ids, int64_t n_tokens, float* out) override {
    for (int64_t t = 0; t < n_tokens; ++t)
      MF_CHECK_MSG(ids[t] >= 0 && ids[t] < w.rows, "token id {} outside [0, {})", ids[t], w.rows);
    run(n_tokens, n_tokens * w.cols, [&](int64_t t) { dequantize_row(w, ids[t], out + t * w.cols); });
  }

  // Reference: ReferenceBackend::rms_norm. Only the sum of squares is reordered: relative |Δ| ≲ 1e-6.
  void rms_norm(const float* x, const float* weight, float eps, int64_t n_rows, int64_t dim, float* out) override {
    run(n_rows, n_rows * dim, [&](int64_t r) {
      const float* xr = x + r * dim;
      const float inv_rms = 1.0f / std::sqrt(kernels_.sum_squares(xr, dim) / float(dim) + eps);
      float* o = out + r * dim;
      for (int64_t i = 0; i < dim; ++i) o[i] = xr[i] * inv_rms * weight[i];
    });
  }

  // Reference: ReferenceBackend::rope_neox. The same fp32 angles, cos and sin, and the same expression
  // per element, computed once per token instead of once per head: bit-identical.
  void rope_neox(float* x, int64_t n_tokens, int64_t n_heads, int64_t head_dim, int64_t rot_dim,
                 const int32_t* positions, const float* inv_freq, float scale, int64_t row_stride) override {
    MF_CHECK(rot_dim % 2 == 0 && rot_dim <= head_dim);
    const int64_t half = rot_dim / 2;
    if (row_stride == 0) row_stride = n_heads * head_dim;
    run(n_tokens, n_tokens * n_heads * rot_dim, [&](int64_t t) {
      std::vector<float> cos_sin(size_t(2 * half));  // [cos[half], sin[half]] of token t, times scale
      for (int64_t i = 0; i < half; ++i) {
        const float angle = float(positions[t]) * inv_freq[i];
        cos_sin[i] = std::cos(angle) * scale;
        cos_sin[half + i] = std::sin(angle) * scale;
      }
      const float* c = cos_sin.data();
      const float* s = c + half;
      for (int64_t h = 0; h < n_heads; ++h) {
        float* v = x + t * row_stride + h * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const float x0 = v[i], x1 = v[i + half];
          v[i] = x0 * c[i] - x1 * s[i];
          v[i + half] = x1 * c[i] + x0 * s[i];
        }
      }
    });
  }

  // Reference: ReferenceBackend::attention. Scores use the lane-ordered dot, the value sum uses fma:
  // |Δ| ≲ 1e-5 relative to max|v| (tested with 1e-5·(1 + max|v|)). Threads over tokens × heads.
  void attention(const float* q, const float* k_cache, const float* v_cache, int64_t n_tokens, int64_t n_past,
                 const AttentionLayout& layout, float scale, float* out) override {
    const int64_t n_head = layout.n_head, n_head_kv = layout.n_head_kv, k_dim = layout.k_dim, v_dim = layout.v_dim;
    MF_CHECK(n_head_kv > 0 && n_head % n_head_kv == 0);
    const int64_t group = n_head / n_head_kv;
    const int64_t n_tasks = n_tokens * n_head;
    const int64_t work = n_tasks * (n_past + n_tokens) * (k_dim + v_dim);
    auto task_range = [&](int64_t begin, int64_t end) {
      std::vector<float> p(size_t(n_past + n_tokens));  // [n_past + T] probabilities of one query head
      for (int64_t task = begin; task < end; ++task) {
        const int64_t t = task / n_head, h = task % n_head, kv = h / group;
        const int64_t n_keys = n_past + t + 1;
        const float* qh = q + (t * n_head + h) * k_dim;
        float max_score = -INFINITY;
        for (int64_t j = 0; j < n_keys; ++j) {
          p[j] = kernels_.dot(qh, k_cache + j * layout.k_stride + kv * k_dim, k_dim) * scale;
          max_score = std::max(max_score, p[j]);
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < n_keys; ++j) {
          p[j] = std::exp(p[j] - max_score);
          sum += p[j];
        }
        float* oh = out + (t * n_head + h) * v_dim;
        std::fill(oh, oh + v_dim, 0.0f);
        for (int64_t j = 0; j < n_keys; ++j) kernels_.axpy(oh, v_cache + j * layout.v_stride + kv * v_dim, p[j] / sum, v_dim);
      }
    };
    if (work < min_parallel_work || pool_.size() == 1) {
      task_range(0, n_tasks);
    } else {
      pool_.parallel_range(n_tasks, 1, task_range);
    }
  }

  // Reference: ReferenceBackend::router_softmax_topk, with the same arithmetic in the same order
  // (router_ops.hpp), so ids and weights are bit-identical; top-k by partial sort with the (p desc, id asc) order.
  void router_softmax_topk(const float* logits, int64_t n_tokens, int64_t n_expert, int64_t k, bool normalize,
                           int32_t* ids, float* weights) override {
    MF_CHECK(k > 0 && k <= n_expert);
    run(n_tokens, n_tokens * n_expert * 8,
        [&](int64_t t) { cpu::softmax_topk_row(logits + t * n_expert, n_expert, k, normalize, ids + t * k, weights + t * k); });
  }

  // Reference: ReferenceBackend::router_sigmoid_grouped_topk; the same function (router_ops.hpp) per
  // token: bit-identical.
  void router_sigmoid_grouped_topk(const float* logits, const float* bias, int64_t n_tokens, int64_t n_expert, int64_t n_group,
                                   int64_t topk_group, int64_t k, bool normalize, float scaling, int32_t* ids,
                                   float* weights) override {
    MF_CHECK(k > 0 && k <= n_expert && n_group > 0 && n_expert % n_group == 0 && topk_group > 0 && topk_group <= n_group);
    run(n_tokens, n_tokens * n_expert * 8, [&](int64_t t) {
      cpu::sigmoid_grouped_topk_row(logits + t * n_expert, bias, n_expert, n_group, topk_group, k, normalize, scaling, ids + t * k,
                                    weights + t * k);
    });
  }

  // Reference: ReferenceBackend::swiglu; the same expression per element: bit-identical.
  void swiglu(const float* gate, const float* up, float* out, int64_t n) override {
    chunked(n, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const float g = gate[i];
        out[i] = g / (1.0f + std::exp(-g)) * up[i];
      }
    });
  }

  // Reference: ReferenceBackend::axpy; fma rounds once instead of twice: |Δ| ≤ 1 ulp of the result.
  void axpy(float* acc, const float* x, float a, int64_t n) override {
    chunked(n, [&](int64_t begin, int64_t end) { kernels_.axpy(acc + begin, x + begin, a, end - begin); });
  }

  // x[i] = value: plain stores, exact.
  void fill(float* x, float value, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) x[i] = value;
  }

  // Reference: ReferenceBackend::gather_rows; copies: bit-identical.
  void gather_rows(const float* src, const int32_t* rows, int64_t n_rows, int64_t dim, float* dst) override {
    run(n_rows, n_rows * dim, [&](int64_t i) { std::memcpy(dst + i * dim, src + rows[i] * dim, size_t(dim) * 4); });
  }

  // Reference: ReferenceBackend::copy_rows; copies: bit-identical.
  void copy_rows(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t n_rows, int64_t dim) override {
    run(n_rows, n_rows * dim, [&](int64_t r) { std::memcpy(dst + r * dst_stride, src + r * src_stride, size_t(dim) * 4); });
  }

  // Reference: ReferenceBackend::sigmoid_mul; the same expression per element: bit-identical.
  void sigmoid_mul(float* x, const float* gate, int64_t n_rows, int64_t dim, bool per_row) override {
    run(n_rows, n_rows * dim, [&](int64_t r) {
      float* xr = x + r * dim;
      for (int64_t i = 0; i < dim; ++i) {
        const float g = per_row ? gate[r] : gate[r * dim + i];
        xr[i] *= 1.0f / (1.0f + std::exp(-g));
      }
    });
  }

  // Reference: ReferenceBackend::causal_conv1d_silu. The same products summed in the same order (kernel
  // position ascending), then SiLU with the kernels' vectorized exp (a few ulp from std::exp's): tested
  // to 1e-6·(1 + |out|); the new state is copied inputs: exact. Threads over blocks of channels; a block's
  // weights are transposed first so that every loop runs along channels (vectorized).
  void causal_conv1d_silu(const float* x, float* conv_state, const float* weight, int64_t n_tokens, int64_t channels,
                          int64_t kernel, float* out) override {
    MF_CHECK(n_tokens >= 0 && channels >= 0 && kernel >= 1);
    const int64_t hist = kernel - 1;
    constexpr int64_t block = 256;  // channels per task: the weights of a block are 4 KiB at kernel 4
    const int64_t n_blocks = (channels + block - 1) / block;
    run_with_scratch(n_blocks, n_tokens * channels * kernel, block * kernel, [&](int64_t bi, float* w_t) {
      const int64_t c0 = bi * block, width = std::min(channels, c0 + block) - c0;
      for (int64_t c = 0; c < width; ++c)  // w_t: [kernel, width], this block's weights transposed
        for (int64_t j = 0; j < kernel; ++j) w_t[j * width + c] = weight[(c0 + c) * kernel + j];
      // Row i of m = state ++ x (this block's channels): i < hist is the state, then the tokens.
      auto m_row = [&](int64_t i) { return i < hist ? conv_state + i * channels + c0 : x + (i - hist) * channels + c0; };
      for (int64_t t = 0; t < n_tokens; ++t) {
        float* o = out + t * channels + c0;
        std::fill(o, o + width, 0.0f);
        for (int64_t j = 0; j < kernel; ++j) {
          const float* m = m_row(t + j);
          const float* wj = w_t + j * width;
          for (int64_t c = 0; c < width; ++c) o[c] += wj[c] * m[c];
        }
        kernels_.silu(o, width);
      }
      // The new state: the last hist rows of m. Row i takes row n_tokens + i > i, which no earlier
      // step has overwritten.
      for (int64_t i = 0; i < hist; ++i) {
        const float* src = m_row(n_tokens + i);
        std::copy(src, src + width, conv_state + i * channels + c0);
      }
    });
  }

  // Reference: ReferenceBackend::gated_delta_gates; the same expressions: bit-identical.
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

  // Reference: ReferenceBackend::gated_delta_rule (the token-by-token recurrence). Queries and keys are
  // l2-normalized once per key head with the kernels' lane-ordered sum of squares; then one task per
  // value head runs its tokens through
  //   - the recurrence (kernels_.gated_delta_recurrent): the same math with sums reordered, fma, the
  //     decay applied to Sᵀk̂ rather than to S and carried as a scalar between tokens of a call;
  //   - or, from tuning_.gated_delta_chunk_min_tokens tokens on, the chunked (WY) form
  //     (kernels_.gated_delta_chunk) one chunk of 64 tokens after another. Off by default: slower than
  //     the recurrence at every length measured (cpu_kernels.hpp, CpuBackendTuning).
  // Value heads are the only split, so results do not depend on the thread count. The tests hold out
  // and state to 1e-5·(1 + |value|) of the reference; both paths measure ≤ 3.3e-7 on outputs and
  // ≤ 1.5e-6 on states over 200-token prompts (backend_ops_test.cpp).
  void gated_delta_rule(const float* q, const float* k, const float* v, int64_t stride, const float* g, const float* beta,
                        float* state, int64_t n_tokens, int64_t n_k_heads, int64_t n_v_heads, int64_t k_dim, int64_t v_dim,
                        float q_scale, float* out) override {
    MF_CHECK(n_tokens >= 0 && n_k_heads > 0 && n_v_heads % n_k_heads == 0 && k_dim > 0 && v_dim > 0);
    if (n_tokens == 0) return;
    const int64_t ratio = n_v_heads / n_k_heads;
    // Head-major, so that each head's tokens are contiguous.
    gated_delta_qk_.resize(size_t(2 * n_k_heads * n_tokens * k_dim));
    float* qn = gated_delta_qk_.data();             // [n_k_heads, T, k_dim]
    float* kn = qn + n_k_heads * n_tokens * k_dim;  // [n_k_heads, T, k_dim]
    auto normalize = [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t j = i / n_tokens, t = i % n_tokens;
        l2_normalize(q + t * stride + j * k_dim, k_dim, q_scale, qn + i * k_dim);
        l2_normalize(k + t * stride + j * k_dim, k_dim, 1.0f, kn + i * k_dim);
      }
    };
    if (2 * n_k_heads * n_tokens * k_dim < min_parallel_work || pool_.size() == 1) {
      normalize(0, n_k_heads * n_tokens);
    } else {
      pool_.parallel_range(n_k_heads * n_tokens, 64, normalize);
    }
    const bool chunked = n_tokens >= tuning_.gated_delta_chunk_min_tokens;
    const int64_t chunk = std::min(n_tokens, gated_delta_chunk_tokens);
    const int64_t scratch = chunked ? gated_delta_chunk_scratch_floats(chunk, k_dim, v_dim) : gated_delta_recurrent_scratch_floats(k_dim, n_tokens);
    run_with_scratch(n_v_heads, n_tokens * k_dim * v_dim * 4, scratch, [&](int64_t h, float* buf) {
      const int64_t j = h / ratio;
      auto head = [&](int64_t t0, int64_t n) {
        return GatedDeltaHead{qn + (j * n_tokens + t0) * k_dim, kn + (j * n_tokens + t0) * k_dim, v + t0 * stride + h * v_dim, stride,
                              g + t0 * n_v_heads + h, beta + t0 * n_v_heads + h, n_v_heads, state + h * k_dim * v_dim,
                              out + (t0 * n_v_heads + h) * v_dim, n_v_heads * v_dim, n, k_dim, v_dim};
      };
      if (!chunked) {
        kernels_.gated_delta_recurrent(head(0, n_tokens), buf);
        return;
      }
      for (int64_t t0 = 0; t0 < n_tokens; t0 += chunk) kernels_.gated_delta_chunk(head(t0, std::min(chunk, n_tokens - t0)), buf);
    });
  }

 private:
  // fn(i) for i < n, on the pool when the op touches at least min_parallel_work floats.
  template <typename Fn>
  void run(int64_t n, int64_t work, Fn&& fn) {
    if (n <= 1 || work < min_parallel_work || pool_.size() == 1) {
      for (int64_t i = 0; i < n; ++i) fn(i);
    } else {
      pool_.parallel_for(n, [&](int64_t i) { fn(i); });
    }
  }
  // fn(begin, end) over [0, n) in chunks; elementwise ops only, so chunking cannot change results.
  template <typename Fn>
  void chunked(int64_t n, Fn&& fn) {
    if (n < min_parallel_work || pool_.size() == 1) {
      fn(0, n);
    } else {
      pool_.parallel_range(n, min_parallel_work / 4, [&](int64_t b, int64_t e) { fn(b, e); });
    }
  }

  // fn(i, scratch) for i < n like run(), each call with scratch_floats floats of its own (contents
  // undefined). At most pool_.size() tasks run at once, so that many buffers serve any loop: a task
  // claims a free one and returns it.
  template <typename Fn>
  void run_with_scratch(int64_t n, int64_t work, int64_t scratch_floats, Fn&& fn) {
    for (auto& buffer : scratch_) buffer.resize(size_t(scratch_floats));  // keeps the capacity it had
    run(n, work, [&](int64_t i) {
      int slot = 0;
      while (scratch_busy_[size_t(slot)].exchange(true, std::memory_order_acquire)) slot = (slot + 1) % int(scratch_.size());
      fn(i, scratch_[size_t(slot)].data());
      scratch_busy_[size_t(slot)].store(false, std::memory_order_release);
    });
  }

  // y = x · rsqrt(Σx² + 1e-6) · scale (transformers' l2norm, then the query scale); the sum in the
  // kernels' fixed lane order.
  void l2_normalize(const float* x, int64_t n, float scale, float* y) const {
    const float inv = 1.0f / std::sqrt(kernels_.sum_squares(x, n) + 1e-6f) * scale;
    for (int64_t i = 0; i < n; ++i) y[i] = x[i] * inv;
  }

  const CpuKernels& kernels_;
  const CpuBackendTuning tuning_;
  ThreadPool pool_;
  std::vector<std::vector<float>> scratch_;      // [pool_.size()] per-task buffers of run_with_scratch
  std::vector<std::atomic<bool>> scratch_busy_;  // [pool_.size()] whether a task holds scratch_[i]
  std::string name_;
  std::vector<float> q4_scratch_;  // prepare_q4_activations' output (cpu_kernels.hpp)
  std::vector<float> gated_delta_qk_;  // gated_delta_rule: normalized queries, then keys, [n_k_heads, T, k_dim] each
  struct RowChunk { int64_t job, begin, end; };
  std::vector<RowChunk> chunks_;          // matmul_many: rows [begin, end) of jobs[job]
  std::vector<const float*> prepared_;    // matmul_many: [n_jobs] q4 activations in q4_scratch_, or null
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend_with_kernels(const CpuKernels& kernels, int n_threads, const CpuBackendTuning& tuning) {
  return std::make_unique<CpuBackend>(kernels, n_threads, tuning);
}

std::unique_ptr<Backend> make_cpu_backend(int n_threads) { return make_cpu_backend_with_kernels(cpu_kernels_best(), n_threads); }

}  // namespace moeflux
