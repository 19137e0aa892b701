// The kernel of attention.cuh.
#include <algorithm>
#include <cmath>

#include "backends/cuda/attention.cuh"
#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_common.cuh"

namespace moeflux::cuda {
namespace {

constexpr int attention_warps = 4;

// Shared memory: q [k_dim], then each warp's weighted value sum [attention_warps, v_dim].
__global__ void __launch_bounds__(32 * attention_warps)
    attention_kernel(const float* __restrict__ q, const float* __restrict__ k_cache, const float* __restrict__ v_cache,
                     int64_t n_past, AttentionLayout l, int64_t group, float scale, float* __restrict__ out) {
  extern __shared__ float shared[];
  __shared__ float warp_max[attention_warps], warp_sum_p[attention_warps];
  const int64_t h = blockIdx.x, t = blockIdx.y, kv = h / group;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* qs = shared;
  float* acc = shared + l.k_dim + warp * l.v_dim;
  const float* qh = q + (t * l.n_head + h) * l.k_dim;
  for (int64_t d = threadIdx.x; d < l.k_dim; d += blockDim.x) qs[d] = qh[d];
  for (int64_t d = lane; d < l.v_dim; d += 32) acc[d] = 0.f;
  __syncthreads();
  const int64_t n_keys = n_past + t + 1;
  float m = -INFINITY, sum = 0.f;
  for (int64_t j = warp; j < n_keys; j += attention_warps) {
    const float* kj = k_cache + j * l.k_stride + kv * l.k_dim;
    float dot = 0.f;
    for (int64_t d = lane; d < l.k_dim; d += 32) dot += qs[d] * kj[d];
    const float s = warp_sum(dot) * scale;
    const float m_new = fmaxf(m, s);
    const float correction = expf(m - m_new), p = expf(s - m_new);  // expf(−inf) = 0 on the first key
    sum = sum * correction + p;
    const float* vj = v_cache + j * l.v_stride + kv * l.v_dim;
    for (int64_t d = lane; d < l.v_dim; d += 32) acc[d] = acc[d] * correction + p * vj[d];
    m = m_new;
  }
  if (lane == 0) warp_max[warp] = m, warp_sum_p[warp] = sum;
  __syncthreads();
  float m_all = -INFINITY;
  for (int w = 0; w < attention_warps; ++w) m_all = fmaxf(m_all, warp_max[w]);
  float weight[attention_warps], total = 0.f;
  for (int w = 0; w < attention_warps; ++w) {
    weight[w] = warp_max[w] == -INFINITY ? 0.f : expf(warp_max[w] - m_all);  // a warp that saw no key weighs 0
    total += warp_sum_p[w] * weight[w];
  }
  float* oh = out + (t * l.n_head + h) * l.v_dim;
  for (int64_t d = threadIdx.x; d < l.v_dim; d += blockDim.x) {
    float o = 0.f;
    for (int w = 0; w < attention_warps; ++w) o += shared[l.k_dim + w * l.v_dim + d] * weight[w];
    oh[d] = o / total;
  }
}

}  // namespace

void attention(const float* q, const float* k_cache, const float* v_cache, int64_t n_tokens, int64_t n_past,
               const AttentionLayout& layout, float scale, float* out, cudaStream_t stream) {
  if (n_tokens <= 0 || layout.n_head <= 0) return;
  if (layout.n_head_kv <= 0 || layout.n_head % layout.n_head_kv != 0) {
    std::fprintf(stderr, "%s:%d: attention: n_head %lld is not a multiple of n_head_kv %lld\n", __FILE__, __LINE__,
                 (long long)layout.n_head, (long long)layout.n_head_kv);
    std::abort();
  }
  const size_t shared = size_t(layout.k_dim + attention_warps * layout.v_dim) * sizeof(float);
  if (shared > 48 * 1024) MF_CUDA_CHECK(cudaFuncSetAttribute(attention_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared)));
  // Tokens beyond grid.y's 65535 go in further launches, each a later slice of queries.
  for (int64_t t0 = 0; t0 < n_tokens; t0 += 65535) {
    const dim3 grid(unsigned(layout.n_head), unsigned(std::min<int64_t>(n_tokens - t0, 65535)));
    attention_kernel<<<grid, 32 * attention_warps, shared, stream>>>(q + t0 * layout.n_head * layout.k_dim, k_cache, v_cache, n_past + t0,
                                                                      layout, layout.n_head / layout.n_head_kv, scale,
                                                                      out + t0 * layout.n_head * layout.v_dim);
    MF_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace moeflux::cuda
