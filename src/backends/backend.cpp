// The defaults of Backend that fit every host-memory backend.
#include "backends/backend.hpp"

#include <cstring>
#include <vector>

#include "sampling/sampler.hpp"

namespace moeflux {

int64_t Backend::argmax(const float* x, int64_t n) {
  if (!host_memory()) return -1;
  synchronize();
  return argmax_first(x, n);
}

void Backend::copy_to_host(void* host_dst, const void* src, size_t bytes) {
  if (bytes) std::memcpy(host_dst, src, bytes);
}

void Backend::copy_from_host(void* dst, const void* host_src, size_t bytes) {
  if (bytes) std::memcpy(dst, host_src, bytes);
}

void Backend::scatter_add_rows(float* dst, const float* src, const int32_t* rows, const float* weights, int64_t n_rows,
                               int64_t dim) {
  for (int64_t r = 0; r < n_rows; ++r) axpy(dst + int64_t(rows[r]) * dim, src + r * dim, weights[r], dim);
}

void Backend::add_rms_norm(float* x, const float* y, const float* weight, float eps, int64_t n_rows, int64_t dim, float* out) {
  axpy(x, y, 1.0f, n_rows * dim);
  rms_norm(x, weight, eps, n_rows, dim, out);
}

void Backend::gated_rms_norm(const float* x, const float* weight, float eps, int64_t n_rows, int64_t dim, const float* gate, float* out) {
  rms_norm(x, weight, eps, n_rows, dim, out);
  swiglu(gate, out, out, n_rows * dim);
}

void Backend::qk_norm_rope(float* q, float* k, int64_t n_tokens, int64_t n_head, int64_t n_head_kv, int64_t head_dim, int64_t rot_dim,
                           const float* q_norm, const float* k_norm, float eps, const int32_t* positions, const float* inv_freq) {
  rms_norm(q, q_norm, eps, n_tokens * n_head, head_dim, q);
  rms_norm(k, k_norm, eps, n_tokens * n_head_kv, head_dim, k);
  if (rot_dim > 0) {
    rope_neox(q, n_tokens, n_head, head_dim, rot_dim, positions, inv_freq);
    rope_neox(k, n_tokens, n_head_kv, head_dim, rot_dim, positions, inv_freq);
  }
}

void Backend::qk_norm_rope_attention(float* q, float* k_cache, const float* v_cache, int64_t n_tokens, int64_t n_past,
                                     const AttentionLayout& layout, float scale, float* out, int64_t rot_dim, const float* q_norm,
                                     const float* k_norm, float eps, const int32_t* positions, const float* inv_freq) {
  qk_norm_rope(q, k_cache + n_past * layout.k_stride, n_tokens, layout.n_head, layout.n_head_kv, layout.k_dim, rot_dim, q_norm, k_norm, eps,
               positions, inv_freq);
  attention(q, k_cache, v_cache, n_tokens, n_past, layout, scale, out);
}

void Backend::add_rms_norm_matmul(const float* x, const float* y, const float* weight, float eps, int64_t n_rows, int64_t dim,
                                  float* x_out, float* h, const MatmulJob* jobs, int64_t n_jobs) {
  if (y) {
    if (x_out != x) copy_rows(x, dim, x_out, dim, n_rows, dim);
    add_rms_norm(x_out, y, weight, eps, n_rows, dim, h);
  } else {
    rms_norm(x, weight, eps, n_rows, dim, h);
  }
  matmul_many(jobs, n_jobs);
}

void Backend::swiglu_matmul(float* gate, const float* up, const WeightView& w, float* y, int64_t n_tokens) {
  swiglu(gate, up, gate, n_tokens * w.cols);
  matmul(w, gate, y, n_tokens);
}

void Backend::router_softmax_topk_device(const float* logits, int64_t n_tokens, int64_t n_expert, int64_t k, bool normalize, int32_t* ids,
                                         float* weights) {
  router_softmax_topk(logits, n_tokens, n_expert, k, normalize, ids, weights);  // host memory is this backend's memory
}

void Backend::add_rms_norm_route_device(const float* x, const float* y, const float* weight, float eps, int64_t dim, float* x_out,
                                        float* h, const WeightView& router, float* logits, int64_t k, bool normalize, int32_t* ids,
                                        float* weights) {
  const MatmulJob job{router, h, logits, 1};
  add_rms_norm_matmul(x, y, weight, eps, 1, dim, x_out, h, &job, 1);
  router_softmax_topk_device(logits, 1, router.rows, k, normalize, ids, weights);
}

void Backend::router_sigmoid_grouped_topk_device(const float* logits, const float* bias, int64_t n_tokens, int64_t n_expert,
                                                 int64_t n_group, int64_t topk_group, int64_t k, bool normalize, float scaling, int32_t* ids,
                                                 float* weights) {
  router_sigmoid_grouped_topk(logits, bias, n_tokens, n_expert, n_group, topk_group, k, normalize, scaling, ids, weights);
}

namespace {
WeightView at_blob(const WeightView& offsets, const void* blob) {
  const auto* base = static_cast<const uint8_t*>(blob);
  WeightView v = offsets;
  v.data = base + reinterpret_cast<uintptr_t>(offsets.data);
  v.scales = offsets.scales ? base + reinterpret_cast<uintptr_t>(offsets.scales) : nullptr;
  v.biases = offsets.biases ? base + reinterpret_cast<uintptr_t>(offsets.biases) : nullptr;
  return v;
}
}  // namespace

// Host-memory backends: the contract with this backend's own matmul and swiglu, expert by expert.
void Backend::moe_decode(const ExpertLayout& layout, const void* const* table, const int32_t* ids, const float* weights, int64_t k,
                         const float* x, float* h, float* part, float* y, bool accumulate) {
  const int64_t I = layout.gate.rows, H = layout.down.rows;
  std::vector<float> up(static_cast<size_t>(I));
  for (int64_t j = 0; j < k; ++j) {
    const void* blob = table[ids[j]];
    float* hj = h + j * I;
    const MatmulJob gate_up[] = {{at_blob(layout.gate, blob), x, hj, 1}, {at_blob(layout.up, blob), x, up.data(), 1}};
    matmul_many(gate_up, 2);
    swiglu(hj, up.data(), hj, I);
    matmul(at_blob(layout.down, blob), hj, part + j * H, 1);
  }
  if (!accumulate) fill(y, 0.0f, H);
  for (int64_t j = 0; j < k; ++j) axpy(y, part + j * H, weights[j], H);
}

}  // namespace moeflux
