// CUDA routing and routed experts for one decode token without a host round trip
// (Backend::router_*_device, Backend::moe_decode). The routers run one warp (softmax) or one block
// (grouped sigmoid) per token over the [T, n_expert] logits with the CPU's arithmetic (softmax: max,
// exp, sum — in another order, within 1e-6 —, divide; top-k by (score desc, id asc)), so they choose the
// same experts but where two scores are that close. moe_decode takes the
// expert blobs from a table indexed by the chosen ids, in two launches: gate and up of all k experts with
// SwiGLU fused (h [k, I]); down of all k experts with y = Σ_j w_j · down_j(h_j) in order j in registers.
// The dot products are the matmul's v6 form (16-byte weight loads, the lane's x chunk in registers),
// with x (or the expert's h) staged once per block in shared memory; hidden and intermediate sizes up to
// 12288.
// A result depends only on the blobs' bytes, so a streamed expert and a resident one give the same bits.
// References: ReferenceBackend's routers and Backend::moe_decode; tolerances in the op tests.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "backends/backend.hpp"

namespace moeflux::cuda {

// Whether the routers below take k of n_expert experts: n_group 0 asks of the softmax router, 1 or more
// of the grouped sigmoid one with that many groups. Where not, a caller ranks on the host.
bool routes_on_device(int64_t n_expert, int64_t k, int64_t n_group);

void router_softmax_topk(const float* logits, int64_t n_tokens, int64_t n_expert, int64_t k, bool normalize, int32_t* ids,
                         float* weights, cudaStream_t stream);

void router_sigmoid_grouped_topk(const float* logits, const float* bias, int64_t n_tokens, int64_t n_expert, int64_t n_group,
                                 int64_t topk_group, int64_t k, bool normalize, float scaling, int32_t* ids, float* weights,
                                 cudaStream_t stream);

void moe_decode(const ExpertLayout& layout, const void* const* table, const int32_t* ids, const float* weights, int64_t k,
                const float* x, float* h, float* part, float* y, bool accumulate, cudaStream_t stream);

}  // namespace moeflux::cuda
