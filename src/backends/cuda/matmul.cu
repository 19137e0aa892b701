// The matmul kernels of matmul.cuh: two paths per format, chosen per job from its own shape and alignment
// (so a job's result does not depend on what else is in the launch), each a flat grid over the row tiles
// of every job in a table passed as the kernel's parameter.
#include <algorithm>
#include <climits>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_common.cuh"
#include "backends/cuda/matmul.cuh"

namespace moeflux::cuda {
namespace {

// How a job's rows are computed (docs/BENCHMARKS.md "CUDA kernel lab" has the measurements).
enum class Path : int8_t {
  staged_x,  // q8/q4, x ≤ 48 KiB: x copied once per block into shared memory (lab v23)
  direct,    // 16-byte aligned rows and x: x read per lane through L1 (lab v11)
  plain,     // anything else: one row at a time, each weight decoded alone
};

// One job as the kernel sees it.
struct DeviceJob {
  const void* data;
  const void* scales;
  const void* biases;
  const float* x;  // [n_tokens, cols]
  float* y;        // [n_tokens, rows]
  int rows, cols;
  int64_t n_tokens;
  Path path;
  int8_t n_split;  // direct path: warps sharing a row tile, each taking every n_split-th run of chunks
};

// Passed by value as the kernel's parameter (≤ 4 KiB), so a launch needs no copy of the table;
// __grid_constant__ lets a block read it in place from the parameter bank.
constexpr int max_jobs_per_launch = 40;
struct JobTable {
  DeviceJob jobs[max_jobs_per_launch];
  int tile_start[max_jobs_per_launch + 1];  // job j owns blocks tile_start[j] .. tile_start[j+1] − 1
  int n_jobs;
};
static_assert(sizeof(JobTable) <= 4096, "kernel parameters are limited to 4 KiB");

// The job of block b (a uniform scan of at most 40 entries).
__device__ __forceinline__ int job_of_block(const JobTable& t, int b) {
  int j = 0;
  while (j + 1 < t.n_jobs && b >= t.tile_start[j + 1]) ++j;
  return j;
}

// Columns covered by one 16-byte chunk of weights.
__host__ __device__ constexpr int chunk_cols(WeightFormat f) {
  return f == WeightFormat::f32 ? 4 : f == WeightFormat::bf16 ? 8 : f == WeightFormat::q8 ? 16 : 32;
}
__host__ __device__ constexpr int64_t row_bytes(WeightFormat f, int64_t cols) {
  return f == WeightFormat::f32 ? cols * 4 : f == WeightFormat::bf16 ? cols * 2 : f == WeightFormat::q8 ? cols : cols / 2;
}
// Scale groups per row (q8: 32 columns, q4: 64); a chunk is half a group in both.
__host__ __device__ constexpr int groups_per_row(WeightFormat f, int cols) { return f == WeightFormat::q8 ? cols / 32 : cols / 64; }

// Byte k of w as the float 2^23 + byte (exact), via the exponent-bias trick (lab v4).
__device__ __forceinline__ float byte_as_biased_float(uint32_t w, int k) {
  return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7540u + unsigned(k)));
}
// Nibble k of a word masked to 0x0F0F0F0F as the float 2 + q/64 (exact): the nibble lands in mantissa
// bits 16..19 of 2.0f, one byte_perm and no subtraction (lab v9).
__device__ __forceinline__ float nibble_as_affine_float(uint32_t w, int k) {
  return __uint_as_float(__byte_perm(w, 0x40000000u, 0x7054u | (unsigned(k) << 8)));
}

// q4's group sum from Σ f·x with f = 2 + q/64: s·Σq·x + b·Σx = (64·s)·Σf·x + (b − 128·s)·Σx.
__device__ __forceinline__ float q4_affine_sum(float fx, float xsum, uint16_t scale, uint16_t bias) {
  const float s = bf16_bits_to_float(scale), b = bf16_bits_to_float(bias);
  return fmaf(64.f * s, fx, fmaf(-128.f, s, b) * xsum);
}

// --- staged_x path (lab v23): 8 warps × 4 rows per block, x in shared memory -------------------------

constexpr int staged_warps = 4 * 2, staged_rows = 4;
// float4s per chunk of x in shared memory, padded to an odd count so that the 8 lanes of a 128-bit
// shared-memory phase, each reading its own chunk, hit different banks.
__host__ __device__ constexpr int staged_pitch(WeightFormat f) { return chunk_cols(f) / 4 + 1; }
__host__ __device__ constexpr int64_t staged_x_bytes(WeightFormat f, int64_t cols) { return cols / chunk_cols(f) * staged_pitch(f) * 16; }
constexpr int64_t staged_x_max_bytes = 48 * 1024;  // the default dynamic shared-memory limit

// A warp's loads for one chunk of its rows: the weights, and the q8 scale / q4 scale and bias bits.
template <WeightFormat F, int R>
struct RowsLoad {
  uint4 w[R];
  uint16_t scale[R], bias[R];
};

template <WeightFormat F, int R>
__device__ __forceinline__ void load_rows(RowsLoad<F, R>& l, const DeviceJob& m, int r0, int rows, int chunk) {
  const int64_t stride = row_bytes(F, m.cols);
  const int groups = groups_per_row(F, m.cols);
#pragma unroll
  for (int j = 0; j < R; ++j) {
    const int64_t r = r0 + min(j, rows - 1);  // rows past the matrix re-read its last row, never stored
    l.w[j] = __ldg(reinterpret_cast<const uint4*>(static_cast<const char*>(m.data) + r * stride) + chunk);
    l.scale[j] = __ldg(static_cast<const uint16_t*>(m.scales) + r * groups + chunk / 2);
    l.bias[j] = F == WeightFormat::q4 ? __ldg(static_cast<const uint16_t*>(m.biases) + r * groups + chunk / 2) : 0;
  }
}

// acc[j] += row j's chunk · x chunk, walking the chunk word by word so only 8 x values are live.
template <WeightFormat F, int R>
__device__ __forceinline__ void staged_chunk(const RowsLoad<F, R>& l, const float4* xc, float (&acc)[R]) {
  float d[R];
#pragma unroll
  for (int j = 0; j < R; ++j) d[j] = 0.f;
  float xsum = 0.f;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if constexpr (F == WeightFormat::q4) {
      const float4 a = xc[2 * k], c = xc[2 * k + 1];
      const float xv[8] = {a.x, a.y, a.z, a.w, c.x, c.y, c.z, c.w};
      xsum += ((xv[0] + xv[1]) + (xv[2] + xv[3])) + ((xv[4] + xv[5]) + (xv[6] + xv[7]));
#pragma unroll
      for (int j = 0; j < R; ++j) {
        const uint32_t w = k == 0 ? l.w[j].x : k == 1 ? l.w[j].y : k == 2 ? l.w[j].z : l.w[j].w;
        // Even elements in the low nibble of each byte, odd ones in the high nibble.
        const uint32_t lo = w & 0x0F0F0F0Fu, hi = (w >> 4) & 0x0F0F0F0Fu;
#pragma unroll
        for (int n = 0; n < 4; ++n) {
          d[j] = fmaf(nibble_as_affine_float(lo, n), xv[2 * n], d[j]);
          d[j] = fmaf(nibble_as_affine_float(hi, n), xv[2 * n + 1], d[j]);
        }
      }
    } else {
      const float4 a = xc[k];
      const float xv[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
      for (int j = 0; j < R; ++j) {
        const uint32_t u = (k == 0 ? l.w[j].x : k == 1 ? l.w[j].y : k == 2 ? l.w[j].z : l.w[j].w) ^ 0x80808080u;  // b → b + 128
#pragma unroll
        for (int n = 0; n < 4; ++n) d[j] = fmaf(byte_as_biased_float(u, n) - (8388608.f + 128.f), xv[n], d[j]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < R; ++j) {
    if constexpr (F == WeightFormat::q4)
      acc[j] += q4_affine_sum(d[j], xsum, l.scale[j], l.bias[j]);
    else
      acc[j] += __half2float(__ushort_as_half(l.scale[j])) * d[j];
  }
}

// grid: x = every job's row tiles (staged_warps · staged_rows rows each), z = tokens (strided).
// 4 blocks per SM requested: ≤ 64 registers, so 32 warps' loads are in flight per SM (lab v23).
template <WeightFormat F>
__global__ void __launch_bounds__(32 * staged_warps, 4) matmul_staged_kernel(const __grid_constant__ JobTable table) {
  extern __shared__ float4 x_staged[];
  constexpr int R = staged_rows;
  const int j = job_of_block(table, blockIdx.x);
  const DeviceJob& m = table.jobs[j];
  const int lane = threadIdx.x & 31;
  const int r0 = ((blockIdx.x - table.tile_start[j]) * staged_warps + threadIdx.x / 32) * R;
  const bool active = r0 < m.rows;
  const int rows = active ? min(R, m.rows - r0) : 1;
  const int n_chunks = m.cols / chunk_cols(F), iters = (n_chunks + 31) / 32;
  constexpr int per4 = chunk_cols(F) / 4;
  for (int64_t t = blockIdx.z; t < m.n_tokens; t += gridDim.z) {
    const float* x = m.x + t * m.cols;
    RowsLoad<F, R> l;
    if (active) load_rows<F, R>(l, m, r0, rows, min(lane, n_chunks - 1));  // in flight while x is staged
    __syncthreads();  // the previous token's x is no longer read
    for (int f = threadIdx.x; f < m.cols / 4; f += blockDim.x)
      x_staged[(f / per4) * staged_pitch(F) + f % per4] = __ldg(reinterpret_cast<const float4*>(x) + f);
    __syncthreads();
    if (!active) continue;
    float acc[R];
#pragma unroll
    for (int k = 0; k < R; ++k) acc[k] = 0.f;
    for (int it = 0; it < iters; ++it) {
      const int chunk = it * 32 + lane;
      if (it > 0) load_rows<F, R>(l, m, r0, rows, min(chunk, n_chunks - 1));
      if (chunk < n_chunks) staged_chunk<F, R>(l, x_staged + chunk * staged_pitch(F), acc);
    }
#pragma unroll
    for (int k = 0; k < R; ++k) acc[k] = warp_sum(acc[k]);
    if (lane < rows) {
      float v = acc[0];
#pragma unroll
      for (int k = 1; k < R; ++k) v = lane == k ? acc[k] : v;
      m.y[t * m.rows + r0 + lane] = v;
    }
  }
}

// --- direct and plain paths (lab v11): 4 warps per block, R rows per warp ------------------------------

constexpr int direct_warps = 4;
// Rows per warp and chunks in flight per lane (lab v11: bf16/f32 R2U1, q8 R2U2, q4 R8U2).
template <WeightFormat F> __host__ __device__ constexpr int direct_rows() { return F == WeightFormat::q4 ? 8 : 2; }
template <WeightFormat F> __host__ __device__ constexpr int direct_unroll() { return F == WeightFormat::q8 || F == WeightFormat::q4 ? 2 : 1; }

// Warps sharing a row tile: enough that each lane issues all its loads at once where a matrix has few
// row tiles or very long rows. Where many tiles fill the GPU anyway, splitting only adds the partial-sum
// exchange: the lab's bf16 all-experts launch of a Qwen3.5-397B layer ([1024, 4096] and [4096, 1024]
// jobs) ran at 3446 GB/s split (v12) and 4011 unsplit (v10); the q_proj [16384, 4096] at 3739 and 3949.
template <WeightFormat F>
int direct_splits(int64_t rows, int64_t cols) {
  if (rows >= 1024 && cols <= 8192) return 1;
  const int64_t runs = (cols / chunk_cols(F) + 32 * direct_unroll<F>() - 1) / (32 * direct_unroll<F>());
  return runs >= 4 ? 4 : runs >= 2 ? 2 : 1;
}

// One row's contribution from one 16-byte chunk against the lane's x chunk, one fused chain per row.
template <WeightFormat F, int N>
__device__ __forceinline__ float direct_chunk(uint4 p, uint16_t scale, uint16_t bias, const float (&xv)[N], float xsum) {
  const uint32_t w[4] = {p.x, p.y, p.z, p.w};
  float d = 0.f;
  if constexpr (F == WeightFormat::f32) {
#pragma unroll
    for (int k = 0; k < 4; ++k) d = fmaf(__uint_as_float(w[k]), xv[k], d);
    return d;
  } else if constexpr (F == WeightFormat::bf16) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      d = fmaf(__uint_as_float(w[k] << 16), xv[2 * k], d);
      d = fmaf(__uint_as_float(w[k] & 0xffff0000u), xv[2 * k + 1], d);
    }
    return d;
  } else if constexpr (F == WeightFormat::q8) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t u = w[k] ^ 0x80808080u;
#pragma unroll
      for (int b = 0; b < 4; ++b) d = fmaf(byte_as_biased_float(u, b) - (8388608.f + 128.f), xv[4 * k + b], d);
    }
    return __half2float(__ushort_as_half(scale)) * d;
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t lo = w[k] & 0x0F0F0F0Fu, hi = (w[k] >> 4) & 0x0F0F0F0Fu;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        d = fmaf(nibble_as_affine_float(lo, j), xv[8 * k + 2 * j], d);
        d = fmaf(nibble_as_affine_float(hi, j), xv[8 * k + 2 * j + 1], d);
      }
    }
    return q4_affine_sum(d, xsum, scale, bias);
  }
}

// Rows r0 .. r0 + R − 1 of one token; this warp is split `split` of `n_split` over the chunks. Every
// warp of the block calls it (it synchronizes the block when n_split > 1). partial: [warps][R].
template <WeightFormat F, int R, int U>
__device__ void rows_direct(const DeviceJob& m, int r0, int split, int n_split, const float* __restrict__ x, float* __restrict__ y,
                            float (*partial)[R]) {
  constexpr int per_chunk = chunk_cols(F);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const bool active = r0 < m.rows;
  const int n_chunks = m.cols / per_chunk, rows = active ? min(R, m.rows - r0) : 1;
  const int64_t stride = row_bytes(F, m.cols);
  const int groups = groups_per_row(F, m.cols);
  const char* data = static_cast<const char*>(m.data) + (active ? r0 * stride : 0);
  const uint16_t* scales = static_cast<const uint16_t*>(m.scales) + (active ? int64_t(r0) * groups : 0);
  const uint16_t* biases = static_cast<const uint16_t*>(m.biases) + (active ? int64_t(r0) * groups : 0);
  float acc[R];
#pragma unroll
  for (int j = 0; j < R; ++j) acc[j] = 0.f;
  const int step = 32 * n_split;
  for (int i0 = active ? split * 32 + lane : n_chunks; i0 < n_chunks; i0 += step * U) {
    // All U·R loads first (clamped, so none sits behind a branch), then the arithmetic (lab v8).
    uint4 w[U][R];
    uint16_t sc[U][R], bi[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = min(i0 + step * u, n_chunks - 1);
#pragma unroll
      for (int j = 0; j < R; ++j) {
        const int jj = min(j, rows - 1);
        w[u][j] = __ldg(reinterpret_cast<const uint4*>(data + jj * stride) + i);
        sc[u][j] = F == WeightFormat::q8 || F == WeightFormat::q4 ? __ldg(scales + int64_t(jj) * groups + i / 2) : 0;
        bi[u][j] = F == WeightFormat::q4 ? __ldg(biases + int64_t(jj) * groups + i / 2) : 0;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = i0 + step * u;
      if (i >= n_chunks) break;
      float xv[per_chunk];
#pragma unroll
      for (int k = 0; k < per_chunk / 4; ++k) {
        const float4 v = __ldg(reinterpret_cast<const float4*>(x) + int64_t(i) * (per_chunk / 4) + k);
        xv[4 * k] = v.x, xv[4 * k + 1] = v.y, xv[4 * k + 2] = v.z, xv[4 * k + 3] = v.w;
      }
      float xsum = 0.f;
      if constexpr (F == WeightFormat::q4) {
#pragma unroll
        for (int k = 0; k < per_chunk; ++k) xsum += xv[k];
      }
#pragma unroll
      for (int j = 0; j < R; ++j) acc[j] += direct_chunk<F>(w[u][j], sc[u][j], bi[u][j], xv, xsum);
    }
  }
#pragma unroll
  for (int j = 0; j < R; ++j) acc[j] = warp_sum(acc[j]);
  if (n_split == 1) {
    if (active && lane < rows) {
      float v = acc[0];
#pragma unroll
      for (int j = 1; j < R; ++j) v = lane == j ? acc[j] : v;
      y[r0 + lane] = v;
    }
    return;
  }
  __syncthreads();  // partial may still be read for the previous token
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < R; ++j) partial[warp][j] = acc[j];
  }
  __syncthreads();
  if (active && split == 0 && lane < rows) {
    float v = 0.f;
    for (int s = 0; s < n_split; ++s) v += partial[warp + s][lane];  // a fixed order
    y[r0 + lane] = v;
  }
}

template <WeightFormat F, int R>
__device__ void rows_plain(const DeviceJob& m, int r0, const float* __restrict__ x, float* __restrict__ y) {
  const int lane = threadIdx.x & 31;
  const int r_end = min(r0 + R, m.rows);
  for (int r = r0; r < r_end; ++r) {
    float acc = 0.f;
    for (int c = lane; c < m.cols; c += 32) acc += weight_at(F, m.cols, m.data, m.scales, m.biases, r, c) * x[c];
    acc = warp_sum(acc);
    if (lane == 0) y[r] = acc;
  }
}

// grid: x = every job's row tiles (direct_warps / n_split tiles of R rows per block), z = tokens (strided).
template <WeightFormat F>
__global__ void __launch_bounds__(32 * direct_warps) matmul_direct_kernel(const __grid_constant__ JobTable table) {
  constexpr int R = direct_rows<F>(), U = direct_unroll<F>();
  __shared__ float partial[direct_warps][R];
  const int j = job_of_block(table, blockIdx.x);
  const DeviceJob& m = table.jobs[j];
  const int warp = threadIdx.x >> 5, n_split = m.n_split, tiles = direct_warps / n_split;
  const int r0 = ((blockIdx.x - table.tile_start[j]) * tiles + warp / n_split) * R;
  for (int64_t t = blockIdx.z; t < m.n_tokens; t += gridDim.z) {
    const float* x = m.x + t * m.cols;
    float* y = m.y + t * m.rows;
    if (m.path == Path::direct)
      rows_direct<F, R, U>(m, r0, warp % n_split, n_split, x, y, partial);
    else if (r0 < m.rows)
      rows_plain<F, R>(m, r0, x, y);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The path of one job, from its own format, shape and pointers alone.
Path path_of(const MatmulJob& job) {
  const WeightView& w = job.w;
  const bool vectors = w.cols > 0 && w.cols % chunk_cols(w.format) == 0 && aligned16(w.data) && aligned16(job.x);
  if (!vectors) return Path::plain;
  if ((w.format == WeightFormat::q8 || w.format == WeightFormat::q4) && staged_x_bytes(w.format, w.cols) <= staged_x_max_bytes)
    return Path::staged_x;
  return Path::direct;
}

template <WeightFormat F>
int rows_per_block(Path path, int n_split) {
  return path == Path::staged_x ? staged_warps * staged_rows : direct_warps / n_split * direct_rows<F>();
}

// Launches every job of format F on `path` (direct and plain share a kernel), 40 jobs per launch.
template <WeightFormat F>
void launch_path(const MatmulJob* jobs, int64_t n_jobs, bool staged, cudaStream_t stream) {
  JobTable table;
  int n = 0;
  int64_t max_tokens = 0, max_cols = 0;
  auto launch = [&] {
    if (n == 0) return;
    table.n_jobs = n;
    const dim3 grid(unsigned(table.tile_start[n]), 1, unsigned(std::min<int64_t>(max_tokens, 65535)));
    if constexpr (F == WeightFormat::q8 || F == WeightFormat::q4) {
      if (staged) {
        matmul_staged_kernel<F><<<grid, 32 * staged_warps, size_t(staged_x_bytes(F, max_cols)), stream>>>(table);
        MF_CUDA_CHECK_LAUNCH();
        n = 0, max_tokens = 0, max_cols = 0;
        return;
      }
    }
    matmul_direct_kernel<F><<<grid, 32 * direct_warps, 0, stream>>>(table);
    MF_CUDA_CHECK_LAUNCH();
    n = 0, max_tokens = 0, max_cols = 0;
  };
  table.tile_start[0] = 0;
  for (int64_t i = 0; i < n_jobs; ++i) {
    const MatmulJob& job = jobs[i];
    const WeightView& w = job.w;
    if (w.format != F || job.n_tokens <= 0 || w.rows <= 0) continue;
    const Path path = path_of(job);
    if ((path == Path::staged_x) != staged) continue;
    const int n_split = path == Path::direct ? direct_splits<F>(w.rows, w.cols) : 1;
    const int64_t tiles = (w.rows + rows_per_block<F>(path, n_split) - 1) / rows_per_block<F>(path, n_split);
    if (n > 0 && int64_t(table.tile_start[n]) + tiles > INT_MAX) launch();
    table.jobs[n] = {w.data, w.scales, w.biases, job.x, job.y, int(w.rows), int(w.cols), job.n_tokens, path, int8_t(n_split)};
    table.tile_start[n + 1] = int(table.tile_start[n] + tiles);
    ++n;
    max_tokens = std::max(max_tokens, job.n_tokens);
    max_cols = std::max(max_cols, w.cols);
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
    if (w.rows > INT_MAX / 2 || w.cols > INT_MAX / 2) {  // row and column indices are 32-bit in the kernels
      std::fprintf(stderr, "%s:%d: matmul: weight [%lld, %lld] is too large\n", __FILE__, __LINE__, (long long)w.rows, (long long)w.cols);
      std::abort();
    }
  }
  // Per format, one launch (per 40 jobs) for each path present.
  launch_path<WeightFormat::f32>(jobs, n_jobs, false, stream);
  launch_path<WeightFormat::bf16>(jobs, n_jobs, false, stream);
  launch_path<WeightFormat::q8>(jobs, n_jobs, true, stream);
  launch_path<WeightFormat::q8>(jobs, n_jobs, false, stream);
  launch_path<WeightFormat::q4>(jobs, n_jobs, true, stream);
  launch_path<WeightFormat::q4>(jobs, n_jobs, false, stream);
}

}  // namespace moeflux::cuda
