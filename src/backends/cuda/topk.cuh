// The softmax router's top-k by one warp in registers, shared by the router kernel (moe.cu) and the
// norm + router + top-k kernel (matmul.cu). Included by .cu files only.
#pragma once

#include <cfloat>

#include "backends/cuda/device_common.cuh"

namespace moeflux::cuda {

constexpr int max_router_k = 64;

// The order of the top-k: p's bits (p ≥ 0, so they order as its value; a NaN sorts above every number)
// above ~id, so one integer comparison puts higher p first and, among equals, the lower id.
__device__ __forceinline__ unsigned long long rank_key(float p, int e) {
  return (static_cast<unsigned long long>(__float_as_uint(p)) << 32) | (0xffffffffu - unsigned(e));
}

// moe.cu's softmax_topk_warp with lane l's experts l, l + 32, … (fewer than 32 · PL) in registers: the same
// arithmetic in the same order, so the same bits; each of the k rounds takes the lanes' largest keys
// (their own best by PL comparisons, then the warp's by two redux steps on the key's halves) and clears
// the winner, with no shared memory and no shuffle tree per round. Router + experts of one token
// (matmul_bench --moe, q4, H100, session 14): Qwen3-30B 20.4 µs against 22.1 for the shared-memory form
// and 22.1 for a block ranking every expert against every other; Qwen3.5-397B (512 experts) 45.9
// against 48.2 and 54.0.
template <int PL>
__device__ void softmax_topk_regs(const float* logits, int n_expert, int k, bool normalize, int* chosen, float* chosen_w) {
  const int lane = threadIdx.x & 31;
  float v[PL];
#pragma unroll
  for (int i = 0; i < PL; ++i) v[i] = lane + 32 * i < n_expert ? logits[lane + 32 * i] : -FLT_MAX;
  float m = -FLT_MAX;
#pragma unroll
  for (int i = 0; i < PL; ++i) m = fmaxf(m, v[i]);
  m = warp_max(m);
  float part = 0.f;
#pragma unroll
  for (int i = 0; i < PL; ++i)
    if (lane + 32 * i < n_expert) part += v[i] = expf(v[i] - m);
  const float sum = warp_sum(part);
  unsigned long long key[PL];
#pragma unroll
  for (int i = 0; i < PL; ++i) key[i] = lane + 32 * i < n_expert ? rank_key(v[i] / sum, lane + 32 * i) : 0ull;  // 0: below every key
  float selected = 0.f;
  for (int j = 0; j < k; ++j) {
    unsigned long long best = key[0];
#pragma unroll
    for (int i = 1; i < PL; ++i) best = key[i] > best ? key[i] : best;
    const unsigned hi = __reduce_max_sync(0xffffffffu, unsigned(best >> 32));
    const unsigned lo = __reduce_max_sync(0xffffffffu, unsigned(best >> 32) == hi ? unsigned(best) : 0u);
    best = (static_cast<unsigned long long>(hi) << 32) | lo;
#pragma unroll
    for (int i = 0; i < PL; ++i) key[i] = key[i] == best ? 0ull : key[i];
    const float pe = __uint_as_float(hi);
    selected += pe;
    if (lane == 0) chosen[j] = int(0xffffffffu - lo), chosen_w[j] = pe;
  }
  __syncwarp();
  if (normalize)
    for (int j = lane; j < k; j += 32) chosen_w[j] /= selected;  // k may exceed the lanes (up to max_router_k)
}

// Experts per lane of the register form for n_expert experts (0: more than 1024, the shared-memory form).
inline int router_lane_experts(int64_t n_expert) {
  return n_expert <= 128 ? 4 : n_expert <= 256 ? 8 : n_expert <= 512 ? 16 : n_expert <= 1024 ? 32 : 0;
}

}  // namespace moeflux::cuda
