// The kernels of norm_rope.cuh.
#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_common.cuh"
#include "backends/cuda/norm_rope.cuh"

namespace moeflux::cuda {
namespace {

__global__ void rms_norm_kernel(const float* x, const float* __restrict__ weight, float eps, int64_t dim, float* out) {
  const float* xr = x + int64_t(blockIdx.x) * dim;
  float sum_sq = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) sum_sq += xr[i] * xr[i];
  sum_sq = block_sum(sum_sq);  // every read of xr happens before this barrier: out may alias x
  const float inv_rms = 1.0f / sqrtf(sum_sq / float(dim) + eps);
  float* o = out + int64_t(blockIdx.x) * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) o[i] = xr[i] * inv_rms * weight[i];
}

// rms_norm_kernel after x += y, the sum the same float addition axpy makes (1 · y + x, exact product).
__global__ void add_rms_norm_kernel(float* x, const float* __restrict__ y, const float* __restrict__ weight, float eps, int64_t dim,
                                    float* out) {
  float* xr = x + int64_t(blockIdx.x) * dim;
  const float* yr = y + int64_t(blockIdx.x) * dim;
  float sum_sq = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const float v = xr[i] + yr[i];
    xr[i] = v;
    sum_sq += v * v;
  }
  sum_sq = block_sum(sum_sq);  // each thread reads back only the elements it wrote
  const float inv_rms = 1.0f / sqrtf(sum_sq / float(dim) + eps);
  float* o = out + int64_t(blockIdx.x) * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) o[i] = xr[i] * inv_rms * weight[i];
}

// grid: (heads, tokens); threads over the rot_dim/2 pairs.
__global__ void rope_neox_kernel(float* x, int64_t n_heads, int64_t head_dim, int64_t half, const int32_t* __restrict__ positions,
                                 const float* __restrict__ inv_freq, float scale, int64_t row_stride) {
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

void add_rms_norm(float* x, const float* y, const float* weight, float eps, int64_t n_rows, int64_t dim, float* out, cudaStream_t stream) {
  if (n_rows <= 0) return;
  add_rms_norm_kernel<<<unsigned(n_rows), 256, 0, stream>>>(x, y, weight, eps, dim, out);
  MF_CUDA_CHECK_LAUNCH();
}

void rms_norm(const float* x, const float* weight, float eps, int64_t n_rows, int64_t dim, float* out, cudaStream_t stream) {
  if (n_rows <= 0) return;
  // n_rows ≤ 2^31 − 1 blocks.
  rms_norm_kernel<<<unsigned(n_rows), 256, 0, stream>>>(x, weight, eps, dim, out);
  MF_CUDA_CHECK_LAUNCH();
}

void rope_neox(float* x, int64_t n_tokens, int64_t n_heads, int64_t head_dim, int64_t rot_dim, const int32_t* positions,
               const float* inv_freq, float scale, int64_t row_stride, cudaStream_t stream) {
  if (n_tokens <= 0 || n_heads <= 0 || rot_dim <= 0) return;
  const int64_t half = rot_dim / 2;
  const int threads = half >= 128 ? 128 : half >= 64 ? 64 : 32;
  rope_neox_kernel<<<dim3(unsigned(n_heads), unsigned(n_tokens)), threads, 0, stream>>>(x, n_heads, head_dim, half, positions, inv_freq,
                                                                                        scale, row_stride);
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace moeflux::cuda
