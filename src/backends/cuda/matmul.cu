// The matmul kernels of matmul.cuh.
#include <algorithm>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_common.cuh"
#include "backends/cuda/matmul.cuh"

namespace moeflux::cuda {
namespace {

// One job as the kernel sees it.
struct DeviceJob {
  const void* data;
  const void* scales;
  const void* biases;
  const float* x;   // [n_tokens, cols]
  float* y;         // [n_tokens, rows]
  int64_t rows, cols, n_tokens;
  bool fast;  // 16-byte aligned rows and x: the v6 dot products
};

// Passed by value as the kernel's parameter (≤ 4 KiB), so a launch needs no copy of the table;
// __grid_constant__ lets a block index it in the parameter bank instead of copying it per thread.
constexpr int max_jobs_per_launch = 40;
struct JobTable {
  DeviceJob jobs[max_jobs_per_launch];
};

constexpr int warps_per_block = 4;
// Rows per warp (lab v6: bf16 2, q8 4, q4 8 measured best on the H200; f32 as bf16).
template <WeightFormat F> __host__ __device__ constexpr int rows_per_warp() {
  return F == WeightFormat::q4 ? 8 : F == WeightFormat::q8 ? 4 : 2;
}
// Columns covered by one 16-byte chunk of weights.
__host__ __device__ constexpr int chunk_cols(WeightFormat f) {
  return f == WeightFormat::f32 ? 4 : f == WeightFormat::bf16 ? 8 : f == WeightFormat::q8 ? 16 : 32;
}

// Byte k of w as the float 2^23 + byte (exact), via the exponent-bias trick (lab v4).
__device__ __forceinline__ float byte_as_biased_float(uint32_t w, int k) {
  return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7540u + unsigned(k)));
}

// Lab v6: rows r0 .. r0 + R − 1 of one token, R rows per warp, x chunk in registers.
template <WeightFormat F>
__device__ void rows_dot_fast(const DeviceJob& m, int64_t r0, const float* __restrict__ x, float* __restrict__ y) {
  constexpr int R = rows_per_warp<F>();
  constexpr int per_chunk = chunk_cols(F);
  const int lane = threadIdx.x & 31;
  float acc[R];
#pragma unroll
  for (int j = 0; j < R; ++j) acc[j] = 0.f;
  const int rows = int(min(int64_t(R), m.rows - r0));
  const int64_t n_chunks = m.cols / per_chunk;
  for (int64_t i = lane; i < n_chunks; i += 32) {
    float xv[per_chunk];
#pragma unroll
    for (int k = 0; k < per_chunk / 4; ++k) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(x) + i * (per_chunk / 4) + k);
      xv[4 * k] = v.x, xv[4 * k + 1] = v.y, xv[4 * k + 2] = v.z, xv[4 * k + 3] = v.w;
    }
    float xsum = 0.f;
    if constexpr (F == WeightFormat::q4) {
#pragma unroll
      for (int k = 0; k < per_chunk; ++k) xsum += xv[k];
    }
#pragma unroll
    for (int j = 0; j < R; ++j) {
      if (j >= rows) break;
      const int64_t r = r0 + j;
      if constexpr (F == WeightFormat::f32) {
        const float4 w = __ldg(reinterpret_cast<const float4*>(static_cast<const float*>(m.data) + size_t(r) * m.cols) + i);
        acc[j] += w.x * xv[0] + w.y * xv[1] + w.z * xv[2] + w.w * xv[3];
      } else if constexpr (F == WeightFormat::bf16) {
        const uint4 p = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(m.data) + size_t(r) * m.cols) + i);
        const uint32_t w[4] = {p.x, p.y, p.z, p.w};
        float d = 0.f;
#pragma unroll
        for (int k = 0; k < 4; ++k) d += __uint_as_float(w[k] << 16) * xv[2 * k] + __uint_as_float(w[k] & 0xffff0000u) * xv[2 * k + 1];
        acc[j] += d;
      } else if constexpr (F == WeightFormat::q8) {
        const uint4 p = __ldg(reinterpret_cast<const uint4*>(static_cast<const int8_t*>(m.data) + size_t(r) * m.cols) + i);
        const uint32_t w[4] = {p.x, p.y, p.z, p.w};
        const float sc = __half2float(__ldg(static_cast<const __half*>(m.scales) + size_t(r) * (m.cols / 32) + i / 2));
        float d = 0.f;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const uint32_t u = w[k] ^ 0x80808080u;  // signed byte b → unsigned b + 128
          constexpr float bias = 8388608.f + 128.f;
#pragma unroll
          for (int b = 0; b < 4; ++b) d += (byte_as_biased_float(u, b) - bias) * xv[4 * k + b];
        }
        acc[j] += sc * d;
      } else {
        const uint4 p = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint32_t*>(m.data) + size_t(r) * m.cols / 8) + i);
        const uint32_t w[4] = {p.x, p.y, p.z, p.w};
        const size_t g = size_t(r) * (m.cols / 64) + i / 2;
        const float sc = bf16_bits_to_float(__ldg(static_cast<const unsigned short*>(m.scales) + g));
        const float bi = bf16_bits_to_float(__ldg(static_cast<const unsigned short*>(m.biases) + g));
        float qx = 0.f;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          // Even elements in the low nibble of each byte, odd ones in the high nibble.
          const uint32_t lo = w[k] & 0x0F0F0F0Fu, hi = (w[k] >> 4) & 0x0F0F0F0Fu;
          constexpr float bias = 8388608.f;
#pragma unroll
          for (int b = 0; b < 4; ++b)
            qx += (byte_as_biased_float(lo, b) - bias) * xv[8 * k + 2 * b] + (byte_as_biased_float(hi, b) - bias) * xv[8 * k + 2 * b + 1];
        }
        acc[j] += sc * qx + bi * xsum;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < R; ++j) {
    const float v = warp_sum(acc[j]);
    if (lane == 0 && j < rows) y[r0 + j] = v;
  }
}

// Any layout: one row at a time, lanes over columns, each weight decoded alone.
template <WeightFormat F>
__device__ void rows_dot_plain(const DeviceJob& m, int64_t r0, const float* __restrict__ x, float* __restrict__ y) {
  const int lane = threadIdx.x & 31;
  const int64_t r_end = min(r0 + rows_per_warp<F>(), m.rows);
  for (int64_t r = r0; r < r_end; ++r) {
    float acc = 0.f;
    for (int64_t c = lane; c < m.cols; c += 32) acc += weight_at(F, m.cols, m.data, m.scales, m.biases, r, c) * x[c];
    acc = warp_sum(acc);
    if (lane == 0) y[r] = acc;
  }
}

// grid: x = row blocks of the largest job, y = job, z = tokens (strided). 4 warps per block. One format
// per launch, so each format's kernel has the registers it needs (q4's x chunk is 32 floats) and no more.
template <WeightFormat F>
__global__ void __launch_bounds__(32 * warps_per_block) matmul_kernel(const __grid_constant__ JobTable table) {
  const DeviceJob& m = table.jobs[blockIdx.y];
  const int64_t r0 = (int64_t(blockIdx.x) * warps_per_block + threadIdx.x / 32) * rows_per_warp<F>();
  if (r0 >= m.rows) return;
  for (int64_t t = blockIdx.z; t < m.n_tokens; t += gridDim.z) {
    const float* x = m.x + t * m.cols;
    float* y = m.y + t * m.rows;
    if (m.fast)
      rows_dot_fast<F>(m, r0, x, y);
    else
      rows_dot_plain<F>(m, r0, x, y);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <WeightFormat F>
void launch_format(const MatmulJob* jobs, int64_t n_jobs, cudaStream_t stream) {
  JobTable table;
  int n = 0;
  int64_t max_row_blocks = 0, max_tokens = 0;
  auto launch = [&] {
    if (n == 0) return;
    const dim3 grid(unsigned(max_row_blocks), unsigned(n), unsigned(std::min<int64_t>(max_tokens, 65535)));
    matmul_kernel<F><<<grid, 32 * warps_per_block, 0, stream>>>(table);
    MF_CUDA_CHECK_LAUNCH();
    n = 0, max_row_blocks = 0, max_tokens = 0;
  };
  constexpr int64_t rows_per_block = int64_t(warps_per_block) * rows_per_warp<F>();
  for (int64_t i = 0; i < n_jobs; ++i) {
    const MatmulJob& job = jobs[i];
    const WeightView& w = job.w;
    if (w.format != F || job.n_tokens <= 0 || w.rows <= 0) continue;
    const bool fast = w.cols % chunk_cols(F) == 0 && aligned16(w.data) && aligned16(job.x);
    table.jobs[n++] = {w.data, w.scales, w.biases, job.x, job.y, w.rows, w.cols, job.n_tokens, fast};
    max_row_blocks = std::max(max_row_blocks, (w.rows + rows_per_block - 1) / rows_per_block);
    max_tokens = std::max(max_tokens, job.n_tokens);
    if (n == max_jobs_per_launch) launch();
  }
  launch();
}

}  // namespace

void matmul_jobs(const MatmulJob* jobs, int64_t n_jobs, cudaStream_t stream) {
  for (int64_t i = 0; i < n_jobs; ++i) {
    const WeightView& w = jobs[i].w;
    if (jobs[i].n_tokens <= 0 || w.rows <= 0) continue;
    if (!weight_format_fits(w.format, w.cols) || w.data == nullptr ||
        (w.format == WeightFormat::q8 && w.scales == nullptr) ||
        (w.format == WeightFormat::q4 && (w.scales == nullptr || w.biases == nullptr))) {
      std::fprintf(stderr, "%s:%d: matmul: weight [%lld, %lld] of format %s is incomplete\n", __FILE__, __LINE__,
                   (long long)w.rows, (long long)w.cols, weight_format_name(w.format));
      std::abort();
    }
  }
  // One launch (per 40 jobs) for each format present.
  launch_format<WeightFormat::f32>(jobs, n_jobs, stream);
  launch_format<WeightFormat::bf16>(jobs, n_jobs, stream);
  launch_format<WeightFormat::q8>(jobs, n_jobs, stream);
  launch_format<WeightFormat::q4>(jobs, n_jobs, stream);
}

}  // namespace moeflux::cuda
