// CUDA ops of Gated DeltaNet layers: causal_conv1d_silu, gated_delta_gates and gated_delta_rule
// (Backend's, same contracts). References: ReferenceBackend's; tolerances in the op tests (conv 1e-6·(1 +
// |out|), gates 1e-6 relative, the rule 2e-6 on outputs and 1e-5 on states relative to 1 + |reference|).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moeflux::cuda {

// One thread per channel, tokens in order; the state column is the thread's own, so it is updated in place.
void causal_conv1d_silu(const float* x, float* conv_state, const float* weight, int64_t n_tokens, int64_t channels,
                        int64_t kernel, float* out, cudaStream_t stream);

void gated_delta_gates(const float* a, const float* b, const float* a_log, const float* dt_bias, int64_t n_tokens,
                       int64_t n_heads, float* g, float* beta, cudaStream_t stream);

// Token counts from which gated_delta_rule runs the chunked form (measured: docs/BENCHMARKS.md).
constexpr int64_t gated_delta_chunked_min_tokens = 64;

// The gated delta rule of backend.hpp, in one of two forms:
//  - token by token (T < chunked_min_tokens, and decode): block (32 state columns, value head), the
//    columns' state in registers, one cross-warp reduction per token that also yields the l2 norms. The
//    state is read and written once per call: 2·n_v_heads·k_dim·v_dim·4 bytes (8 MiB per Qwen3.5-397B
//    layer), plus q, k, v.
//  - chunked (WY) form, 64 tokens a chunk (T ≥ chunked_min_tokens, k_dim ≤ 128): a prepare kernel per
//    (chunk, value head) computes the chunk's state-independent matrices into stream_scratch (passes of
//    at most 64 MiB), then a state kernel per (32 state columns, value head) walks the chunks in order.
// Both are fp32 reorderings of the recurrence's sums: the op test holds outputs to 2e-6 and states to
// 1e-5 of (1 + |reference|), as for the CPU backend. Aborts for k_dim > 256 or head counts that do not
// divide.
void gated_delta_rule(const float* q, const float* k, const float* v, int64_t stride, const float* g, const float* beta,
                      float* state, int64_t n_tokens, int64_t n_k_heads, int64_t n_v_heads, int64_t k_dim, int64_t v_dim,
                      float q_scale, float* out, cudaStream_t stream,
                      int64_t chunked_min_tokens = gated_delta_chunked_min_tokens);

}  // namespace moeflux::cuda
