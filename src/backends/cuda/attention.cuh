// CUDA causal softmax attention over a KV cache (Backend::attention, any AttentionLayout: GQA, MLA's
// expanded and latent forms). One block per (query head, token); its 4 warps take every 4th key, each
// keeping an online softmax (running max, sum, and the weighted sum of values in shared memory), merged
// at the end. Simple, not yet a flash-decoding split over keys: a long context runs n_head · T blocks.
// Reference: ReferenceBackend::attention; tolerance 1e-5·max|v| (op test).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "backends/backend.hpp"

namespace moeflux::cuda {

void attention(const float* q, const float* k_cache, const float* v_cache, int64_t n_tokens, int64_t n_past,
               const AttentionLayout& layout, float scale, float* out, cudaStream_t stream);

}  // namespace moeflux::cuda
