// The kernels of delta_net.cuh.
#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/delta_net.cuh"
#include "backends/cuda/device_common.cuh"

namespace moeflux::cuda {
namespace {

// m = state ++ x, [hist + T, channels]; thread c reads and rewrites only column c.
__global__ void causal_conv1d_silu_kernel(const float* __restrict__ x, float* __restrict__ conv_state, const float* __restrict__ weight,
                                          int64_t n_tokens, int64_t channels, int64_t kernel, float* __restrict__ out) {
  const int64_t hist = kernel - 1;
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < channels; c += int64_t(gridDim.x) * blockDim.x) {
    auto m = [&](int64_t i) { return i < hist ? conv_state[i * channels + c] : x[(i - hist) * channels + c]; };
    for (int64_t t = 0; t < n_tokens; ++t) {
      float sum = 0.f;
      for (int64_t j = 0; j < kernel; ++j) sum += weight[c * kernel + j] * m(t + j);
      out[t * channels + c] = sum / (1.0f + expf(-sum));
    }
    // The new state is m's last hist rows; row i reads row T + i ≥ i, so ascending i reads before it writes.
    for (int64_t i = 0; i < hist; ++i) conv_state[i * channels + c] = m(n_tokens + i);
  }
}

__global__ void gated_delta_gates_kernel(const float* __restrict__ a, const float* __restrict__ b, const float* __restrict__ a_log,
                                         const float* __restrict__ dt_bias, int64_t n, int64_t n_heads, float* __restrict__ g,
                                         float* __restrict__ beta) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t h = i % n_heads;
    const float x = a[i] + dt_bias[h];
    const float softplus = x > 20.0f ? x : log1pf(expf(x));
    g[i] = -expf(a_log[h]) * softplus;
    beta[i] = 1.0f / (1.0f + expf(-b[i]));
  }
}

// Shared memory: S [k_dim, v_dim], then q and k of the current token [k_dim] each.
__global__ void gated_delta_rule_kernel(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                                        int64_t stride, const float* __restrict__ g, const float* __restrict__ beta,
                                        float* __restrict__ state, int64_t n_tokens, int64_t n_v_heads, int64_t ratio,
                                        int64_t k_dim, int64_t v_dim, float q_scale, float* __restrict__ out) {
  extern __shared__ float shared[];
  float* S = shared;
  float* qs = shared + k_dim * v_dim;
  float* ks = qs + k_dim;
  const int64_t h = blockIdx.x, j = h / ratio, c = threadIdx.x;
  const bool column = c < v_dim;
  float* state_h = state + h * k_dim * v_dim;
  if (column)
    for (int64_t i = 0; i < k_dim; ++i) S[i * v_dim + c] = state_h[i * v_dim + c];
  for (int64_t t = 0; t < n_tokens; ++t) {
    for (int64_t i = threadIdx.x; i < k_dim; i += blockDim.x) {
      qs[i] = q[t * stride + j * k_dim + i];
      ks[i] = k[t * stride + j * k_dim + i];
    }
    __syncthreads();
    if (column) {
      // l2norm(x) = x · rsqrt(Σx² + 1e-6), each thread summing in the reference's order.
      float sum_q = 0.f, sum_k = 0.f;
      for (int64_t i = 0; i < k_dim; ++i) sum_q += qs[i] * qs[i], sum_k += ks[i] * ks[i];
      const float inv_q = 1.0f / sqrtf(sum_q + 1e-6f), inv_k = 1.0f / sqrtf(sum_k + 1e-6f);
      const float decay = expf(g[t * n_v_heads + h]), b = beta[t * n_v_heads + h];
      float u = 0.f;
      for (int64_t i = 0; i < k_dim; ++i) {
        const float s = S[i * v_dim + c] * decay;
        S[i * v_dim + c] = s;
        u += s * (ks[i] * inv_k);
      }
      u = b * (v[t * stride + h * v_dim + c] - u);
      float o = 0.f;
      for (int64_t i = 0; i < k_dim; ++i) {
        const float s = S[i * v_dim + c] + (ks[i] * inv_k) * u;
        S[i * v_dim + c] = s;
        o += s * (qs[i] * inv_q * q_scale);
      }
      out[(t * n_v_heads + h) * v_dim + c] = o;
    }
    __syncthreads();  // qs, ks are rewritten by the next token
  }
  if (column)
    for (int64_t i = 0; i < k_dim; ++i) state_h[i * v_dim + c] = S[i * v_dim + c];
}

}  // namespace

void causal_conv1d_silu(const float* x, float* conv_state, const float* weight, int64_t n_tokens, int64_t channels,
                        int64_t kernel, float* out, cudaStream_t stream) {
  if (channels <= 0 || n_tokens < 0) return;
  causal_conv1d_silu_kernel<<<grid_for(channels, 128), 128, 0, stream>>>(x, conv_state, weight, n_tokens, channels, kernel, out);
  MF_CUDA_CHECK_LAUNCH();
}

void gated_delta_gates(const float* a, const float* b, const float* a_log, const float* dt_bias, int64_t n_tokens,
                       int64_t n_heads, float* g, float* beta, cudaStream_t stream) {
  const int64_t n = n_tokens * n_heads;
  if (n <= 0) return;
  gated_delta_gates_kernel<<<grid_for(n, 256), 256, 0, stream>>>(a, b, a_log, dt_bias, n, n_heads, g, beta);
  MF_CUDA_CHECK_LAUNCH();
}

void gated_delta_rule(const float* q, const float* k, const float* v, int64_t stride, const float* g, const float* beta,
                      float* state, int64_t n_tokens, int64_t n_k_heads, int64_t n_v_heads, int64_t k_dim, int64_t v_dim,
                      float q_scale, float* out, cudaStream_t stream) {
  if (n_v_heads <= 0 || n_tokens < 0) return;
  const size_t shared = size_t(k_dim * v_dim + 2 * k_dim) * sizeof(float);
  int device = 0, shared_max = 0;
  MF_CUDA_CHECK(cudaGetDevice(&device));
  MF_CUDA_CHECK(cudaDeviceGetAttribute(&shared_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (n_k_heads <= 0 || n_v_heads % n_k_heads != 0 || v_dim > 1024 || shared > size_t(shared_max)) {
    std::fprintf(stderr, "%s:%d: gated_delta_rule: heads %lld/%lld, k_dim %lld, v_dim %lld need %zu bytes of shared memory (have %d)\n",
                 __FILE__, __LINE__, (long long)n_k_heads, (long long)n_v_heads, (long long)k_dim, (long long)v_dim, shared, shared_max);
    std::abort();
  }
  if (shared > 48 * 1024)
    MF_CUDA_CHECK(cudaFuncSetAttribute(gated_delta_rule_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared)));
  const int threads = int((v_dim + 31) / 32 * 32);
  gated_delta_rule_kernel<<<unsigned(n_v_heads), threads, shared, stream>>>(q, k, v, stride, g, beta, state, n_tokens, n_v_heads,
                                                                            n_v_heads / n_k_heads, k_dim, v_dim, q_scale, out);
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace moeflux::cuda
