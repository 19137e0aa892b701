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

// One block per value head, its state [k_dim, v_dim] in shared memory, one thread per value column, tokens
// in order (the recurrence of backend.hpp, not the chunked form). Needs k_dim·v_dim + 2·k_dim floats of
// shared memory (66 KiB at 128 × 128) and v_dim ≤ 1024; aborts otherwise.
void gated_delta_rule(const float* q, const float* k, const float* v, int64_t stride, const float* g, const float* beta,
                      float* state, int64_t n_tokens, int64_t n_k_heads, int64_t n_v_heads, int64_t k_dim, int64_t v_dim,
                      float q_scale, float* out, cudaStream_t stream);

}  // namespace moeflux::cuda
