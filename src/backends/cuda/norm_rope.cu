// The kernels of norm_rope.cuh.
#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_common.cuh"
#include "backends/cuda/norm_rope.cuh"

#include <algorithm>

namespace moeflux::cuda {
namespace {

// One block per row: x (+ y) held in registers, V float4s per thread; out = x · rsqrt(mean(x²) + eps) · w.
// With y, x + y first, written to x_out (x itself, or another buffer: the same float addition axpy makes,
// 1 · y + x, an exact product), so add_rms_norm gives exactly axpy followed by rms_norm. out may alias x.
// With Gate, out = swiglu_of(gate, the normed value) (gated_rms_norm: the swiglu kernel's arithmetic).
template <int V, bool Add, bool Gate = false>
__global__ void rms_norm_vec_kernel(const float* x, const float* __restrict__ y, float* x_out, const float* __restrict__ weight, float eps,
                                    int dim, float* out, const float* __restrict__ gate) {
  dependent_launch_begin();
  const int n4 = dim / 4;
  const float4* xr = reinterpret_cast<const float4*>(x + int64_t(blockIdx.x) * dim);
  float4 v[V];
  float sum_sq = 0.f;
#pragma unroll
  for (int q = 0; q < V; ++q) {
    const int i = threadIdx.x + q * blockDim.x;
    if (i >= n4) break;
    v[q] = xr[i];
    if constexpr (Add) {
      // y may sit anywhere (rms_norm on the same x must take this path too, for the same Σx²).
      const float* yr = y + int64_t(blockIdx.x) * dim + 4 * int64_t(i);
      const float4 a = (reinterpret_cast<uintptr_t>(yr) & 15u) == 0 ? *reinterpret_cast<const float4*>(yr)
                                                                      : make_float4(yr[0], yr[1], yr[2], yr[3]);
      v[q].x += a.x, v[q].y += a.y, v[q].z += a.z, v[q].w += a.w;
      reinterpret_cast<float4*>(x_out + int64_t(blockIdx.x) * dim)[i] = v[q];
    }
    sum_sq += sum_sq4(v[q]);
  }
  sum_sq = block_sum(sum_sq);
  const float inv_rms = 1.0f / sqrtf(sum_sq / float(dim) + eps);
  float4* o = reinterpret_cast<float4*>(out + int64_t(blockIdx.x) * dim);
#pragma unroll
  for (int q = 0; q < V; ++q) {
    const int i = threadIdx.x + q * blockDim.x;
    if (i >= n4) break;
    float4 r = rms_scaled4(v[q], inv_rms, reinterpret_cast<const float4*>(weight)[i]);
    if constexpr (Gate) {
      const float4 g = reinterpret_cast<const float4*>(gate + int64_t(blockIdx.x) * dim)[i];
      r = make_float4(swiglu_of(g.x, r.x), swiglu_of(g.y, r.y), swiglu_of(g.z, r.z), swiglu_of(g.w, r.w));
    }
    o[i] = r;
  }
}

// Any dim and alignment: one block per row, a strided loop.
template <bool Add>
__global__ void rms_norm_kernel(const float* x, const float* __restrict__ y, float* x_out, const float* __restrict__ weight, float eps,
                                int64_t dim, float* out) {
  dependent_launch_begin();
  const float* xr = (Add ? x_out : x) + int64_t(blockIdx.x) * dim;  // the normalized row, read back below
  float sum_sq = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    float v = x[int64_t(blockIdx.x) * dim + i];
    if constexpr (Add) {
      v += y[int64_t(blockIdx.x) * dim + i];
      x_out[int64_t(blockIdx.x) * dim + i] = v;
    }
    sum_sq += v * v;
  }
  sum_sq = block_sum(sum_sq);  // each thread reads back only the elements it wrote, or nothing was written
  const float inv_rms = 1.0f / sqrtf(sum_sq / float(dim) + eps);
  float* o = out + int64_t(blockIdx.x) * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) o[i] = xr[i] * inv_rms * weight[i];
}

// rms_norm_vec_kernel with enough threads that each holds at most 4 float4s (and as few as one warp for
// a 128-wide head).
template <bool Add, bool Gate>
void launch_rms_norm_vec(const float* x, const float* y, float* x_out, const float* weight, float eps, int64_t n_rows, int64_t dim,
                         float* out, const float* gate, cudaStream_t stream) {
  const int n4 = int(dim / 4);
  const int threads = rms_norm_threads(n4);
  const int per = (n4 + threads - 1) / threads;
  const auto kernel = per <= 1 ? rms_norm_vec_kernel<1, Add, Gate> : per == 2 ? rms_norm_vec_kernel<2, Add, Gate> : rms_norm_vec_kernel<4, Add, Gate>;
  launch(kernel, unsigned(n_rows), threads, 0, stream, x, y, x_out, weight, eps, int(dim), out, gate);
  MF_CUDA_CHECK_LAUNCH();
}

// Whether rms_norm_vec_kernel takes rows of dim at these addresses. It depends on x, out and weight only
// (and x_out, gate where given), so add_rms_norm, rms_norm and gated_rms_norm on the same x sum alike.
bool rms_norm_vec_fits(int64_t dim, const float* x, const float* out, const float* weight) {
  return dim % 4 == 0 && dim <= 4 * 4 * 1024 && aligned16(x) && aligned16(out) && aligned16(weight);
}

template <bool Add>
void launch_rms_norm(const float* x, const float* y, float* x_out, const float* weight, float eps, int64_t n_rows, int64_t dim,
                     float* out, cudaStream_t stream) {
  if (n_rows <= 0) return;
  // n_rows ≤ 2^31 − 1 blocks.
  if (rms_norm_vec_fits(dim, x, out, weight) && (!Add || aligned16(x_out))) {
    launch_rms_norm_vec<Add, false>(x, y, x_out, weight, eps, n_rows, dim, out, nullptr, stream);
  } else {
    launch(rms_norm_kernel<Add>, unsigned(n_rows), 256, 0, stream, x, y, x_out, weight, eps, dim, out);
    MF_CUDA_CHECK_LAUNCH();
  }
}

// Per-head RMSNorm then rotary (rope_neox_kernel's arithmetic), in place: one warp per head of a token,
// the head staged in the warp's slice of shared memory. grid: (head groups, tokens); heads 0 .. n_q − 1
// are q's, the rest k's. Shared: 4 warps × head_dim floats.
__global__ void qk_norm_rope_kernel(float* q, float* k, int n_q, int n_k, int head_dim, int half, const float* __restrict__ q_norm,
                                    const float* __restrict__ k_norm, float eps, const int32_t* __restrict__ positions,
                                    const float* __restrict__ inv_freq, float scale) {
  dependent_launch_begin();
  extern __shared__ float heads[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int head = blockIdx.x * 4 + warp, t = blockIdx.y;
  if (head >= n_q + n_k) return;
  const bool is_q = head < n_q;
  float* v = is_q ? q + (int64_t(t) * n_q + head) * head_dim : k + (int64_t(t) * n_k + (head - n_q)) * head_dim;
  const float* w = is_q ? q_norm : k_norm;
  float* s = heads + warp * head_dim;
  float sum_sq = 0.f;
  for (int i = lane; i < head_dim; i += 32) {
    const float a = v[i];
    s[i] = a;
    sum_sq += a * a;
  }
  sum_sq = warp_sum(sum_sq);
  const float inv_rms = 1.0f / sqrtf(sum_sq / float(head_dim) + eps);
  for (int i = lane; i < head_dim; i += 32) s[i] = s[i] * inv_rms * w[i];
  __syncwarp();
  const float position = float(positions[t]);
  for (int i = lane; i < head_dim; i += 32) {
    if (i < half) {
      const float angle = position * inv_freq[i];
      const float c = cosf(angle) * scale, sn = sinf(angle) * scale;
      const float x0 = s[i], x1 = s[i + half];
      v[i] = x0 * c - x1 * sn;
      v[i + half] = x1 * c + x0 * sn;
    } else if (i >= 2 * half) {
      v[i] = s[i];  // dims past the rotary pass through, normalized
    }
  }
}

// grid: (heads, tokens); threads over the rot_dim/2 pairs.
__global__ void rope_neox_kernel(float* x, int64_t n_heads, int64_t head_dim, int64_t half, const int32_t* __restrict__ positions,
                                 const float* __restrict__ inv_freq, float scale, int64_t row_stride) {
  dependent_launch_begin();
  const int64_t t = blockIdx.y, h = blockIdx.x;
  float* v = x + t * row_stride + h * head_dim;
  const float position = float(positions[t]);
  for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
    const float angle = position * inv_freq[i];  // fp32, as the reference and transformers
    const float c = cosf(angle) * scale, s = sinf(angle) * scale;
    const float x0 = v[i], x1 = v[i + half];
    v[i] = x0 * c - x1 * s;
    v[i + half] = x1 * c + x0 * s;
  }
}

}  // namespace

bool gated_rms_norm(const float* x, const float* weight, float eps, int64_t n_rows, int64_t dim, const float* gate, float* out,
                    cudaStream_t stream) {
  if (n_rows <= 0) return true;
  // Only on the vectorized path, the one rms_norm takes for these rows (the same Σx²): else the caller composes.
  if (!rms_norm_vec_fits(dim, x, out, weight) || !aligned16(gate)) return false;
  launch_rms_norm_vec<false, true>(x, nullptr, nullptr, weight, eps, n_rows, dim, out, gate, stream);
  return true;
}

void add_rms_norm(float* x, const float* y, const float* weight, float eps, int64_t n_rows, int64_t dim, float* out, cudaStream_t stream) {
  launch_rms_norm<true>(x, y, x, weight, eps, n_rows, dim, out, stream);
}

void add_rms_norm_to(const float* x, const float* y, float* x_out, const float* weight, float eps, int64_t n_rows, int64_t dim, float* out,
                     cudaStream_t stream) {
  launch_rms_norm<true>(x, y, x_out, weight, eps, n_rows, dim, out, stream);
}

void rms_norm(const float* x, const float* weight, float eps, int64_t n_rows, int64_t dim, float* out, cudaStream_t stream) {
  launch_rms_norm<false>(x, nullptr, nullptr, weight, eps, n_rows, dim, out, stream);
}

void qk_norm_rope(float* q, float* k, int64_t n_tokens, int64_t n_head, int64_t n_head_kv, int64_t head_dim, int64_t rot_dim,
                  const float* q_norm, const float* k_norm, float eps, const int32_t* positions, const float* inv_freq, float scale,
                  cudaStream_t stream) {
  if (n_tokens <= 0) return;
  const int64_t heads = n_head + n_head_kv;
  // Tokens beyond grid.y's 65535 go in further launches.
  for (int64_t t0 = 0; t0 < n_tokens; t0 += 65535) {
    const dim3 grid(unsigned((heads + 3) / 4), unsigned(std::min<int64_t>(n_tokens - t0, 65535)));
    launch(qk_norm_rope_kernel, grid, 128, size_t(4 * head_dim) * sizeof(float), stream, q + t0 * n_head * head_dim,
           k + t0 * n_head_kv * head_dim, int(n_head), int(n_head_kv), int(head_dim), int(rot_dim / 2), q_norm, k_norm, eps,
           positions + t0, inv_freq, scale);
    MF_CUDA_CHECK_LAUNCH();
  }
}

void rope_neox(float* x, int64_t n_tokens, int64_t n_heads, int64_t head_dim, int64_t rot_dim, const int32_t* positions,
               const float* inv_freq, float scale, int64_t row_stride, cudaStream_t stream) {
  if (n_tokens <= 0 || n_heads <= 0 || rot_dim <= 0) return;
  const int64_t half = rot_dim / 2;
  const int threads = half >= 128 ? 128 : half >= 64 ? 64 : 32;
  launch(rope_neox_kernel, dim3(unsigned(n_heads), unsigned(n_tokens)), threads, 0, stream, x, n_heads, head_dim, half, positions, inv_freq,
                                                                                        scale, row_stride);
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace moeflux::cuda
