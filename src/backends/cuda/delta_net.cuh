// CUDA ops of Gated DeltaNet layers: causal_conv1d_silu, gated_delta_gates and gated_delta_rule
// (Backend's, same contracts). References: ReferenceBackend's; tolerances in the op tests (conv 1e-6·(1 +
// |out|), gates 1e-6 relative, the rule 2e-6 on outputs and 1e-5 on states relative to 1 + |reference|).
// Measurements: docs/BENCHMARKS.md ("CUDA attention and delta rule").
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moeflux::cuda {

// One thread per channel, tokens in order; the state column is the thread's own, so it is updated in place.
void causal_conv1d_silu(const float* x, float* conv_state, const float* weight, int64_t n_tokens, int64_t channels,
                        int64_t kernel, float* out, cudaStream_t stream);

void gated_delta_gates(const float* a, const float* b, const float* a_log, const float* dt_bias, int64_t n_tokens,
                       int64_t n_heads, float* g, float* beta, cudaStream_t stream);

// Tokens from which gated_delta_rule runs the chunked form. attention_lab on an H200 (docs/BENCHMARKS.md,
// "CUDA attention and delta rule"), Qwen3.5-397B's 64 heads of 128 × 128: token by token 117 / 153 /
// 609 µs at 96 / 128 / 512 tokens, chunked 134 / 142 / 578 µs.
constexpr int64_t gated_delta_chunked_min_tokens = 128;

// The gated delta rule of backend.hpp, in one of two forms:
//  - token by token (T < chunked_min_tokens, decode included): block (32 state columns, value head),
//    the columns' state in registers, one cross-warp reduction per token that also yields the l2 norms.
//    The state is read and written once per call: 2·n_v_heads·k_dim·v_dim·4 bytes (8 MiB per
//    Qwen3.5-397B layer), plus q, k, v. A decode step: 6.9 µs per call on an H200, of which 3.5 µs is
//    the launch floor of back-to-back calls (~2.4 TB/s over the difference, an estimate).
//  - chunked (WY) form, 64 tokens a chunk (T ≥ chunked_min_tokens, k_dim ≤ 128, ~144 KiB of shared
//    memory for the state kernel, else token by token): a prepare kernel per (chunk, value head)
//    computes the chunk's state-independent matrices (T = (I + A)⁻¹ by forward substitution, U, W,
//    masked Q̂K̂ᵀ) into stream_scratch, in passes of at most 64 MiB; a state kernel per (32 state
//    columns, value head) then walks the pass's chunks in order with its state tile in shared memory.
//    Only ~5–10% faster than token by token so far. Not profiled; likely limits: the state kernel's
//    broadcast reads of shared memory, its two waves (one 144 KiB block per multiprocessor) and the
//    63-step serial solve in the prepare kernel.
// Both are fp32 reorderings of the recurrence's sums (max relative difference to the per-head kernel
// they replaced ≤ 7e-7 over 1 … 2048 tokens in attention_lab): the op test holds outputs to 2e-6 and
// states to 1e-5 of (1 + |reference|), as for the CPU backend. chunked_min_tokens overrides the
// threshold (labs, tests). Aborts for k_dim > 256 or head counts that do not divide.
void gated_delta_rule(const float* q, const float* k, const float* v, int64_t stride, const float* g, const float* beta,
                      float* state, int64_t n_tokens, int64_t n_k_heads, int64_t n_v_heads, int64_t k_dim, int64_t v_dim,
                      float q_scale, float* out, cudaStream_t stream,
                      int64_t chunked_min_tokens = gated_delta_chunked_min_tokens);

}  // namespace moeflux::cuda
