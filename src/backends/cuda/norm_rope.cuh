// CUDA rms_norm, add_rms_norm, rope_neox and their fusion qk_norm_rope (Backend::…). References: ReferenceBackend's;
// tolerances in the op tests (rms_norm 1e-5 relative: Σx² reordered; rope a few ulp of cos/sin).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moeflux::cuda {

// One block per row. x, weight, out: device; out may alias x.
// x += y, then rms_norm of x (Backend::add_rms_norm): one block per row.
void add_rms_norm(float* x, const float* y, const float* weight, float eps, int64_t n_rows, int64_t dim, float* out, cudaStream_t stream);
// The same with x + y written to x_out instead of x (the same bits; x_out may be x).
void add_rms_norm_to(const float* x, const float* y, float* x_out, const float* weight, float eps, int64_t n_rows, int64_t dim, float* out,
                     cudaStream_t stream);
void rms_norm(const float* x, const float* weight, float eps, int64_t n_rows, int64_t dim, float* out, cudaStream_t stream);
// Backend::gated_rms_norm in one kernel (the same bits as rms_norm, then swiglu); false, having launched
// nothing, where rms_norm would not take its vectorized path (the caller composes the two).
bool gated_rms_norm(const float* x, const float* weight, float eps, int64_t n_rows, int64_t dim, const float* gate, float* out,
                    cudaStream_t stream);

// Per-head RMSNorm of q [T, n_head, head_dim] and k [T, n_head_kv, head_dim] (weights q_norm, k_norm:
// [head_dim]), then rotary over the first rot_dim dims, in place. positions, inv_freq: device memory.
void qk_norm_rope(float* q, float* k, int64_t n_tokens, int64_t n_head, int64_t n_head_kv, int64_t head_dim, int64_t rot_dim,
                  const float* q_norm, const float* k_norm, float eps, const int32_t* positions, const float* inv_freq, float scale,
                  cudaStream_t stream);

// positions [n_tokens] and inv_freq [rot_dim/2]: device copies of the caller's host arrays.
void rope_neox(float* x, int64_t n_tokens, int64_t n_heads, int64_t head_dim, int64_t rot_dim, const int32_t* positions,
               const float* inv_freq, float scale, int64_t row_stride, cudaStream_t stream);

}  // namespace moeflux::cuda
