// The matmul kernels of matmul.cuh: two paths per format, chosen per job from its own shape and alignment
// (so a job's result does not depend on what else is in the launch), each a flat grid over the row tiles
// of every job in a table passed as the kernel's parameter.
#include <cooperative_groups.h>

#include <algorithm>
#include <climits>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_common.cuh"
#include "backends/cuda/gemm.cuh"
#include "backends/cuda/matmul.cuh"
#include "backends/cuda/matvec.cuh"
#include "backends/cuda/topk.cuh"

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
  int8_t n_split;  // warps sharing a row tile, each taking every n_split-th run of chunks
  int8_t n_virtual;  // staged path, one warp a tile (n_split 1): the splits its row sums keep (staged_splits)
};

// The input of a launch that normalizes it itself (norm_matmul_jobs): every job's x is one token's
// h = rms_norm(x + y)·weight, which every block computes as rms_norm does (the same bits); block 0 also
// writes h, and x + y to x_out, for the kernels after it.
struct NormIn {
  const float* x;
  const float* y;  // or null: h = rms_norm(x)·weight
  const float* weight;
  float* x_out;    // written when y is given
  float* h;
  float eps;
  int dim, threads;  // threads: rms_norm_threads(dim / 4), at most a block's
  // The weight copied into shared memory before the dependent-launch wait (stage_norm_weight), after the
  // staged x: the launcher reserved dim floats more.
  bool weight_early;
};

constexpr int max_jobs_per_launch = 40;
using JobTable = LaunchTable<DeviceJob, max_jobs_per_launch>;
static_assert(sizeof(JobTable) <= 4096, "kernel parameters are limited to 4 KiB");

// --- staged_x path (lab v23): 8 warps per block, x in shared memory -------------------------------------
// A job's rows go in tiles of R rows (R per launch, staged_rows_for: the fewest whose blocks are all
// resident at once; a row's sum does not depend on R); the n_split warps of a tile (per job, from its own width) take
// every n_split-th run of 32 chunks and add their sums in a fixed order.

constexpr int staged_warps = 8;
__host__ __device__ constexpr int64_t staged_x_bytes(WeightFormat f, int64_t cols) { return staged_bytes(f, cols); }
// The default shared-memory limit, less the kernel's own partial sums (static, up to 4 rows per warp), and
// with a norm staged (stage_normed) less block_sum's 32 partials too.
constexpr int64_t staged_x_max_bytes = 48 * 1024 - sizeof(float) * staged_warps * 4;
constexpr int64_t staged_norm_max_bytes = staged_x_max_bytes - sizeof(float) * 32;

// Warps sharing a row tile on the staged path: each lane then holds at most ~2 chunks of a row.
int staged_splits(WeightFormat f, int64_t cols) {
  const int64_t runs = cols / chunk_cols(f) / 64;
  return runs >= 8 ? 8 : runs >= 4 ? 4 : runs >= 2 ? 2 : 1;
}

// Blocks of the staged kernel for a [rows, ·] job at n_split warps per tile and R rows per warp.
int64_t staged_blocks(int64_t rows, int n_split, int r) {
  const int64_t per_block = staged_warps / n_split * r;
  return (rows + per_block - 1) / per_block;
}

// Rows a warp in a whole launch (launch_path): at 4 the q4 kernel's walk state spilled 60 bytes.
constexpr int whole_rows = 2;

// Staged blocks resident at once: 4 an SM (the kernel's bounds).
int64_t staged_resident_blocks() { return 4 * int64_t(device_attribute<cudaDevAttrMultiProcessorCount>()); }

// Rows per warp for a launch of blocks[i] blocks at 1 << i rows: the fewest rows (the most warps over the
// rows) whose blocks are all resident at once — 4 per SM at 1 or 2 rows (the kernel's bounds) — so that
// no block waits for another to finish before issuing its loads; 4 where none fits (a large matrix: the
// most work per block). Decode's q/k/v of Qwen3-30B ([5120, 2048] q8) take 4 (320 blocks), its o_proj 2 (512).
int staged_rows_for(const int64_t (&blocks)[3]) {
  const int64_t resident = staged_resident_blocks();
  for (int r = 0; r < 3; ++r)
    if (blocks[r] <= resident) return 1 << r;
  return 4;
}

// Chunk `chunk` of rows r0 .. r0 + R − 1 (rows past the matrix re-read its last row, never stored).
template <WeightFormat F, int R>
__device__ __forceinline__ void load_rows(Chunk (&c)[R], const DeviceJob& m, int r0, int rows, int chunk) {
  const int64_t stride = row_bytes(F, m.cols);
  const int groups = groups_per_row(F, m.cols);
#pragma unroll
  for (int q = 0; q < R; ++q) {
    const int64_t r = r0 + min(q, rows - 1);
    c[q] = load_chunk<F>(static_cast<const uint8_t*>(m.data) + r * stride, static_cast<const uint16_t*>(m.scales) + r * groups,
                         static_cast<const uint16_t*>(m.biases) + r * groups, chunk);
  }
}

// The shared memory the norm's early weight (below) takes beyond the staged x: the launchers add it.
inline size_t norm_weight_bytes(const NormIn& n) { return n.weight_early ? size_t(n.dim) * sizeof(float) : 0; }

// The norm's weight into shared memory after the staged x (one cp.async group of this thread's float4s,
// those stage_normed rescales), issued before the dependent-launch wait: no kernel writes a weight, and
// after the block's Σ(x + y)² it is then a shared read away, not a round trip to memory.
template <WeightFormat F>
__device__ __forceinline__ float4* norm_weight_staged(const NormIn& n, float4* x_staged) {
  return x_staged + staged_bytes(F, n.dim) / 16;
}
template <WeightFormat F>
__device__ __forceinline__ void stage_norm_weight(const NormIn& n, float4* x_staged) {
  if (!n.weight_early) return;
  float4* dst = norm_weight_staged<F>(n, x_staged);
  const int n4 = n.dim / 4, t = threadIdx.x;
  if (t < n.threads) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int i = t + q * n.threads;
      if (i >= n4) break;
      cp_async16(dst + i, reinterpret_cast<const float4*>(n.weight) + i);
    }
  }
  cp_async_commit();
}

// Stages h = rms_norm(x + y)·weight (NormIn) in the staged layout: x + y first, then, after the block's
// Σ(x + y)², each thread rescales the float4s it staged itself. writer: also store h and x + y.
template <WeightFormat F>
__device__ __forceinline__ void stage_normed(const NormIn& n, float4* dst, bool writer) {
  const int n4 = n.dim / 4, t = threadIdx.x;
  float sum_sq = 0.f;
  if (t < n.threads) {
#pragma unroll 2  // two x (+ y) loads in flight: all four spilled the weights in flight (session 14)
    for (int q = 0; q < 4; ++q) {
      const int i = t + q * n.threads;
      if (i >= n4) break;
      float4 v = reinterpret_cast<const float4*>(n.x)[i];
      if (n.y) {
        const float4 a = reinterpret_cast<const float4*>(n.y)[i];
        v.x += a.x, v.y += a.y, v.z += a.z, v.w += a.w;
        if (writer) reinterpret_cast<float4*>(n.x_out)[i] = v;
      }
      sum_sq += sum_sq4(v);
      dst[staged_at<F>(i)] = v;
    }
  }
  sum_sq = block_sum(sum_sq);
  const float inv_rms = 1.0f / sqrtf(sum_sq / float(n.dim) + n.eps);
  const float4* weight = reinterpret_cast<const float4*>(n.weight);
  if (n.weight_early) {
    cp_async_wait<0>();  // this thread's own copies: no barrier needed
    weight = norm_weight_staged<F>(n, dst);
  }
  if (t < n.threads) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int i = t + q * n.threads;
      if (i >= n4) break;
      const float4 o = rms_scaled4(dst[staged_at<F>(i)], inv_rms, weight[i]);
      dst[staged_at<F>(i)] = o;
      if (writer) reinterpret_cast<float4*>(n.h)[i] = o;
    }
  }
}

// What the staged kernel stages as x: the job's x, rms_norm(x + y)·weight (NormIn), or swiglu(gate, up).
constexpr int stage_plain = 0, stage_norm = 1, stage_glu = 2;

// Stages x = silu(gate)·up, n floats, with swiglu_kernel's arithmetic (elementwise.cu: the same bits).
template <WeightFormat F>
__device__ __forceinline__ void stage_swiglu(const float* __restrict__ gate, const float* __restrict__ up, int n, float4* dst) {
  for (int f = threadIdx.x; f < n / 4; f += blockDim.x) {
    const float4 g = reinterpret_cast<const float4*>(gate)[f], u = reinterpret_cast<const float4*>(up)[f];
    dst[staged_at<F>(f)] = make_float4(swiglu_of(g.x, u.x), swiglu_of(g.y, u.y), swiglu_of(g.z, u.z), swiglu_of(g.w, u.w));
  }
}

// grid: x = every job's row tiles, z = tokens (strided). 4 blocks per SM requested: ≤ 64 registers, so
// 32 warps' loads are in flight per SM (lab v23); each lane loads two chunks per row at once. At 4 rows
// a warp, 3 blocks (≤ 80 registers): in 64 the 8 chunks in flight through the staging of x spilled
// (q4 128–168 bytes, q8 16–48), and those loads then had to land before x could be staged (Qwen3.5-35B
// decode +2.4%, Qwen3-30B +1.2%, H100, session 14). Mode stage_norm: one token whose x every job
// shares, normalized while staged (stage_normed); stage_glu: one token's x = swiglu(gate, up), formed
// while staged (stage_swiglu). Whole (a launch of many waves, launch_path): one warp a tile walks every
// one of its row sums' n_virtual splits in turn, each summed as the split's own warp would and added in
// the same order: the bits of the split tiles without their shared-memory exchange.
template <WeightFormat F, int R, int Mode, bool Whole = false>
__global__ void __launch_bounds__(32 * staged_warps, R == 4 ? 3 : 4)
    matmul_staged_kernel(const __grid_constant__ JobTable table, const NormIn norm) {
  extern __shared__ float4 x_staged[];
  __shared__ float partial[staged_warps][R];
  constexpr int U = 2;
  const int j = job_of_block(table, blockIdx.x);
  const DeviceJob& m = table.jobs[j];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n_split = m.n_split, split = warp % n_split;
  const int r0 = ((blockIdx.x - table.block_start[j]) * (staged_warps / n_split) + warp / n_split) * R;
  const bool active = r0 < m.rows;
  const int rows = active ? min(R, m.rows - r0) : 1;
  const int n_chunks = m.cols / chunk_cols(F), step = 32 * n_split;
  const int first = split * 32 + lane;
  for (int64_t t = blockIdx.z; t < m.n_tokens; t += gridDim.z) {
    const float* x = m.x + t * m.cols;
    Chunk c[U][R];
    const auto load = [&](int i0) {
#pragma unroll
      for (int u = 0; u < U; ++u) load_rows<F, R>(c[u], m, r0, rows, min(i0 + u * step, n_chunks - 1));
    };
    // Whole: the runs of 32 chunks in the order the warp takes them — split 0's (0, V, 2V, …), then split
    // 1's (1, V + 1, …) — for the loads (lv, lrun) and the sums (cv, crun).
    const int n_virtual = Whole ? m.n_virtual : 1, runs = (n_chunks + 31) / 32;
    int lv = 0, lrun = 0;
    const auto load_whole = [&] {
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (lv < n_virtual) {
          load_rows<F, R>(c[u], m, r0, rows, min(lrun * 32 + lane, n_chunks - 1));
          if ((lrun += n_virtual) >= runs) lrun = ++lv;
        }
    };
    if (active) {  // in flight while x is staged
      if constexpr (Whole)
        load_whole();
      else
        load(first);
    }
    if constexpr (Mode == stage_norm) stage_norm_weight<F>(norm, x_staged);  // one token
    if (t == blockIdx.z) dependent_launch_begin();  // the weights need no wait, x does
    __syncthreads();  // the previous token's x and partial sums are no longer read
    if constexpr (Mode == stage_norm)
      stage_normed<F>(norm, x_staged, blockIdx.x == 0);
    else if constexpr (Mode == stage_glu)
      stage_swiglu<F>(norm.x, norm.y, m.cols, x_staged);
    else
      stage_chunked<F, 1>(x, m.cols, x_staged);  // four at a time spilled the chunks in flight (session 14)
    __syncthreads();
    float acc[R];
#pragma unroll
    for (int q = 0; q < R; ++q) acc[q] = 0.f;
    if constexpr (Whole) {
      float total = 0.f;  // lane q < R: row q's sum (one register, not R: the q4 form spilled 108 bytes)
      if (active) {
        int cv = 0, crun = 0;
        for (bool first_round = true; cv < n_virtual; first_round = false) {
          if (!first_round) load_whole();
#pragma unroll
          for (int u = 0; u < U; ++u)
            if (cv < n_virtual) {
              if (crun * 32 + lane < n_chunks) chunk_dots<F, R>(c[u], x_staged + (crun * 32 + lane) * staged_pitch(F), acc);
              if ((crun += n_virtual) >= runs) {  // split cv's sum is whole: add it as the split warps' exchange does
#pragma unroll
                for (int q = 0; q < R; ++q) {
                  const float split_sum = warp_sum(acc[q]);
                  if (lane == q) total += split_sum;
                  acc[q] = 0.f;
                }
                crun = ++cv;
              }
            }
        }
      }
#pragma unroll
      for (int q = 0; q < R; ++q) acc[q] = total;  // read by lane q alone below
    } else {
      if (active) {
        for (int i0 = first; i0 < n_chunks; i0 += U * step) {
          if (i0 != first) load(i0);
#pragma unroll
          for (int u = 0; u < U; ++u)
            if (i0 + u * step < n_chunks) chunk_dots<F, R>(c[u], x_staged + (i0 + u * step) * staged_pitch(F), acc);
        }
      }
#pragma unroll
      for (int q = 0; q < R; ++q) acc[q] = warp_sum(acc[q]);
    }
    if (n_split > 1) {
      if (lane == 0) {
#pragma unroll
        for (int q = 0; q < R; ++q) partial[warp][q] = acc[q];
      }
      __syncthreads();
      if (split == 0 && lane < R) {
        float v = 0.f;
        for (int sp = 0; sp < n_split; ++sp) v += partial[warp + sp][lane];  // a fixed order
#pragma unroll
        for (int q = 0; q < R; ++q) acc[q] = lane == q ? v : acc[q];
      }
    }
    if (active && split == 0 && lane < rows) {
      float v = acc[0];
#pragma unroll
      for (int q = 1; q < R; ++q) v = lane == q ? acc[q] : v;
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
  dependent_launch_begin();
  constexpr int R = direct_rows<F>(), U = direct_unroll<F>();
  __shared__ float partial[direct_warps][R];
  const int j = job_of_block(table, blockIdx.x);
  const DeviceJob& m = table.jobs[j];
  const int warp = threadIdx.x >> 5, n_split = m.n_split, tiles = direct_warps / n_split;
  const int r0 = ((blockIdx.x - table.block_start[j]) * tiles + warp / n_split) * R;
  for (int64_t t = blockIdx.z; t < m.n_tokens; t += gridDim.z) {
    const float* x = m.x + t * m.cols;
    float* y = m.y + t * m.rows;
    if (m.path == Path::direct)
      rows_direct<F, R, U>(m, r0, warp % n_split, n_split, x, y, partial);
    else if (r0 < m.rows)
      rows_plain<F, R>(m, r0, x, y);
  }
}

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
int rows_per_block(Path path, int n_split, int staged_rows) {
  return path == Path::staged_x ? staged_warps / n_split * staged_rows : direct_warps / n_split * direct_rows<F>();
}

template <WeightFormat F, int Mode>
void launch_staged(int rows, dim3 grid, size_t shared, cudaStream_t stream, const JobTable& table, const NormIn& norm, bool whole = false) {
  if constexpr (Mode == stage_plain) {
    if (whole) {  // launch_path sets whole_rows a warp for it
      launch(matmul_staged_kernel<F, whole_rows, Mode, true>, grid, 32 * staged_warps, shared, stream, table, norm);
      MF_CUDA_CHECK_LAUNCH();
      return;
    }
  }
  if (rows == 4)
    launch(matmul_staged_kernel<F, 4, Mode>, grid, 32 * staged_warps, shared, stream, table, norm);
  else if (rows == 2)
    launch(matmul_staged_kernel<F, 2, Mode>, grid, 32 * staged_warps, shared, stream, table, norm);
  else
    launch(matmul_staged_kernel<F, 1, Mode>, grid, 32 * staged_warps, shared, stream, table, norm);
  MF_CUDA_CHECK_LAUNCH();
}

// Launches every job of format F on `path` (direct and plain share a kernel), 40 jobs per launch. With
// norm (norm_matmul_jobs checked the jobs): every job of format F on the staged path, in one launch.
// glu (glu_matmul_job checked the job; staged is true): x staged as swiglu(norm->x, norm->y).
template <WeightFormat F>
void launch_path(const MatmulJob* jobs, int64_t n_jobs, bool staged, cudaStream_t stream, const NormIn* norm = nullptr,
                 bool glu = false) {
  const auto takes = [&](const MatmulJob& job) {
    if (norm && !glu) return job.w.format == F;
    return job.w.format == F && job.n_tokens > 0 && job.w.rows > 0 && !gemm_takes(job) && (path_of(job) == Path::staged_x) == staged;
  };
  // Staged rows per tile: the fewest whose blocks all fit on the GPU at once (4 per SM), else 4. A plain
  // launch of more than three waves even at 4 rows takes a warp a tile (whole, whole_rows a warp) with
  // the same bits: its split tiles' exchange is then cost (all experts of a layer, H100, session 18:
  // DeepSeek-V3's q8 at 14.5 waves 79 → 93% of the copy rate, its q4 at 7.3 67 → 71%; Qwen3.5-397B's q8
  // at 7.3 73 → 82%, its q4 at 4.8 59 → 58%). Fewer waves keep their splits: Qwen3-30B's q8 at 2.4 lost
  // 2% whole, and q_proj [16384, 4096] q8 in two split waves runs at 88%, in one unsplit wave 78%.
  int staged_rows = 4;
  bool whole = false;
  if (staged || norm) {
    int64_t blocks[3] = {0, 0, 0};  // at 1, 2, 4 rows per tile
    for (int64_t i = 0; i < n_jobs; ++i)
      if (takes(jobs[i]))
        for (int r = 0; r < 3; ++r)
          blocks[r] += staged_blocks(jobs[i].w.rows, staged_splits(F, jobs[i].w.cols), 1 << r) * std::min<int64_t>(jobs[i].n_tokens, 65535);
    staged_rows = staged_rows_for(blocks);
    whole = !norm && blocks[2] > 3 * staged_resident_blocks();
    if (whole) staged_rows = whole_rows;
  }
  JobTable table;
  int n = 0;
  int64_t max_tokens = 0, max_cols = 0;
  auto flush = [&] {
    if (n == 0) return;
    table.n_jobs = n;
    const dim3 grid(unsigned(table.block_start[n]), 1, unsigned(std::min<int64_t>(max_tokens, 65535)));
    const size_t shared = size_t(staged_x_bytes(F, max_cols)) + (norm && !glu ? norm_weight_bytes(*norm) : 0);
    if (norm && !glu) {
      launch_staged<F, stage_norm>(staged_rows, grid, shared, stream, table, *norm);
      n = 0, max_tokens = 0, max_cols = 0;
      return;
    }
    if constexpr (F == WeightFormat::q8 || F == WeightFormat::q4) {
      if (staged) {
        if (glu)
          launch_staged<F, stage_glu>(staged_rows, grid, shared, stream, table, *norm);
        else
          launch_staged<F, stage_plain>(staged_rows, grid, shared, stream, table, NormIn{}, whole);
        n = 0, max_tokens = 0, max_cols = 0;
        return;
      }
    }
    launch(matmul_direct_kernel<F>, grid, 32 * direct_warps, 0, stream, table);
    MF_CUDA_CHECK_LAUNCH();
    n = 0, max_tokens = 0, max_cols = 0;
  };
  table.block_start[0] = 0;
  for (int64_t i = 0; i < n_jobs; ++i) {
    const MatmulJob& job = jobs[i];
    if (!takes(job)) continue;
    const WeightView& w = job.w;
    const Path path = norm && !glu ? Path::staged_x : path_of(job);
    const int n_virtual = path == Path::staged_x ? staged_splits(F, w.cols) : 1;
    const int n_split = path == Path::direct ? direct_splits<F>(w.rows, w.cols) : path == Path::staged_x && !whole ? n_virtual : 1;
    const int per_block = rows_per_block<F>(path, n_split, staged_rows);
    const int64_t tiles = (w.rows + per_block - 1) / per_block;
    if (n > 0 && int64_t(table.block_start[n]) + tiles > INT_MAX) flush();
    table.jobs[n] = {w.data, w.scales, w.biases, job.x, job.y, int(w.rows), int(w.cols), job.n_tokens, path, int8_t(n_split), int8_t(n_virtual)};
    table.block_start[n + 1] = int(table.block_start[n] + tiles);
    ++n;
    max_tokens = std::max(max_tokens, job.n_tokens);
    max_cols = std::max(max_cols, w.cols);
    if (n == max_jobs_per_launch) flush();
  }
  flush();
}

}  // namespace

namespace {

// Whether a fused norm's buffers suit a launch whose blocks each read x and y (and weight) while block 0
// writes x_out and h: 16-byte aligned, and h and x_out clear of what is read. y null: no residual.
bool norm_buffers_apart(const float* x, const float* y, const float* weight, int64_t dim, const float* x_out, const float* h) {
  for (const void* p : {static_cast<const void*>(x), static_cast<const void*>(weight), static_cast<const void*>(h)})
    if (!aligned16(p)) return false;
  const auto apart = [dim](const float* a, const float* b) { return a == nullptr || b == nullptr || a + dim <= b || b + dim <= a; };
  if (!apart(h, x) || !apart(h, y)) return false;
  return !y || (aligned16(y) && aligned16(x_out) && apart(x_out, x) && apart(x_out, y) && apart(x_out, h));
}

// ---- a decode token's norm, softmax router and top-k in one launch (sm_90+) --------------------------
//
// add_rms_norm_matmul into the router's logits, then router_softmax_topk, as one cluster of route_blocks
// blocks: each block normalizes x as the staged kernel does (stage_normed, the same bits; block 0 writes
// x_out and h), each warp takes router rows (a lane's route_chunks chunks of its first row asked for
// before the dependent-launch wait), each row's sum goes to `logits` and into block 0's shared memory, and
// after the cluster's barrier block 0's first warp ranks them with the router kernel's arithmetic
// (softmax_topk_regs). The top-k's launch, and its read of the logits through the L2, are gone.
constexpr int route_blocks = 8, route_warps = 16, route_chunks = 8;

struct RouteArgs {
  const uint8_t* router;  // bf16 [n_expert, cols]
  int n_expert, cols, k;
  bool normalize;
  float* logits;
  int32_t* ids;
  float* weights;
};

template <int PL>
__global__ void __launch_bounds__(32 * route_warps, 1) norm_route_kernel(const NormIn norm, const RouteArgs a) {
  constexpr WeightFormat F = WeightFormat::bf16;
  extern __shared__ float4 x_staged[];
  __shared__ float logits_s[32 * PL];  // block 0's: every row's sum
  __shared__ int chosen[max_router_k];
  __shared__ float chosen_w[max_router_k];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, rank = int(blockIdx.x);
  const int n_chunks = a.cols / chunk_cols(F), per_pass = route_blocks * route_warps;
  const int64_t stride = row_bytes(F, a.cols);
  int r = rank * route_warps + warp;
  // A row's chunks are one load a lane (the launcher's limit on cols): the first row's before the wait.
  Chunk c[route_chunks];
  const auto load = [&](int row) {
#pragma unroll
    for (int m = 0; m < route_chunks; ++m) c[m] = load_chunk<F>(a.router + row * stride, nullptr, nullptr, min(lane + 32 * m, n_chunks - 1));
  };
  if (r < a.n_expert) load(r);
  stage_norm_weight<F>(norm, x_staged);
  const unsigned long long entered = wait_trace_now();
  dependent_launch_begin();
  wait_trace_mark(0, entered);
  stage_normed<F>(norm, x_staged, rank == 0);
  __syncthreads();
  wait_trace_mark(1);
  const unsigned logits_at = static_cast<unsigned>(__cvta_generic_to_shared(logits_s));
  for (int first = r; r < a.n_expert; r += per_pass) {
    if (r != first) load(r);
    float acc[1] = {0.f};
#pragma unroll
    for (int m = 0; m < route_chunks; ++m) {
      const Chunk one[1] = {c[m]};
      if (lane + 32 * m < n_chunks) chunk_dots<F, 1>(one, x_staged + (lane + 32 * m) * staged_pitch(F), acc);
    }
    const float v = warp_sum(acc[0]);
    if (lane == 0) {
      a.logits[r] = v;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      unsigned remote;
      asm volatile("mapa.shared::cluster.u32 %0, %1, 0;" : "=r"(remote) : "r"(logits_at + 4u * unsigned(r)));
      asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(remote), "f"(v) : "memory");
#endif
    }
  }
  wait_trace_mark(2);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();  // block 0 has every sum (release / acquire)
#endif
  wait_trace_mark(3);
  if (rank != 0 || warp != 0) return;
  softmax_topk_regs<PL>(logits_s, a.n_expert, a.k, a.normalize, chosen, chosen_w);
  __syncwarp();
  wait_trace_mark(4);
  for (int j = lane; j < a.k; j += 32) a.ids[j] = chosen[j], a.weights[j] = chosen_w[j];
}

// MOEFLUX_CUDA_NORM_EARLY=0 (a developer's switch, read once): the fused norms read their weight after
// the block's sum of squares, from memory.
bool norm_weight_early() {
  static const bool on = [] {
    const char* e = std::getenv("MOEFLUX_CUDA_NORM_EARLY");
    return !(e && e[0] == '0');
  }();
  return on;
}

// MOEFLUX_CUDA_FUSE_ROUTE=0 (a developer's switch, read once) composes norm_route_topk from its ops.
bool fuse_route_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("MOEFLUX_CUDA_FUSE_ROUTE");
    return !(e && e[0] == '0');
  }();
  return on;
}

}  // namespace

bool norm_route_topk(const float* x, const float* y, const float* weight, float eps, int64_t dim, float* x_out, float* h,
                     const WeightView& router, float* logits, int64_t k, bool normalize, int32_t* ids, float* weights,
                     cudaStream_t stream) {
  // Hopper's clusters; a bf16 router (as packs store them) over h, small enough that a lane's loads of a row
  // are one round and a warp takes at most two rows (Qwen3-30B-A3B's 128 experts × 2048 is what was
  // measured; 8 blocks reading a larger router, in more rounds, may lose to the staged kernel's many);
  // buffers apart as norm_matmul_jobs asks.
  const int64_t n_expert = router.rows;
  if (!fuse_route_enabled() || device_attribute<cudaDevAttrComputeCapabilityMajor>() < 9 || router.format != WeightFormat::bf16 ||
      router.cols != dim || dim <= 0 || dim % chunk_cols(WeightFormat::bf16) != 0 ||
      dim > 32 * route_chunks * chunk_cols(WeightFormat::bf16) || !aligned16(router.data) || k < 1 || k > max_router_k ||
      k > n_expert || n_expert > 2 * route_blocks * route_warps)
    return false;
  const int threads = rms_norm_threads(int(dim / 4));
  if (threads > 32 * route_warps || !norm_buffers_apart(x, y, weight, dim, x_out, h)) return false;
  // The logits are written while other blocks still read x and y.
  for (const float* v : {x, y, static_cast<const float*>(x_out), static_cast<const float*>(h)})
    if (v && !(logits + n_expert <= v || v + dim <= logits)) return false;
  const NormIn norm{x, y, weight, x_out, h, eps, int(dim), threads, norm_weight_early()};
  const RouteArgs args{static_cast<const uint8_t*>(router.data), int(n_expert), int(dim), int(k), normalize, logits, ids, weights};
  const size_t shared = size_t(staged_x_bytes(WeightFormat::bf16, dim)) + norm_weight_bytes(norm);
  const auto go = [&](auto kernel) {
    if (shared > 48 * 1024) MF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared)));
    launch_clustered(kernel, route_blocks, 32 * route_warps, shared, stream, dim3{route_blocks, 1, 1}, norm, args);
  };
  if (router_lane_experts(n_expert) == 4)
    go(norm_route_kernel<4>);
  else
    go(norm_route_kernel<8>);
  MF_CUDA_CHECK_LAUNCH();
  return true;
}

bool norm_matmul_jobs(const float* x, const float* y, const float* weight, float eps, int64_t dim, float* x_out, float* h,
                      const MatmulJob* jobs, int64_t n_jobs, cudaStream_t stream) {
  // One token, a row rms_norm's vectorized kernel normalizes with at most one block's threads, buffers
  // that do not overlap (blocks read x and y while block 0 writes x_out and h), and jobs that all read
  // h in one format, with rows the staged kernel takes, at most one launch's worth.
  if (dim <= 0 || dim % 4 != 0 || n_jobs <= 0 || n_jobs > max_jobs_per_launch) return false;
  const int threads = rms_norm_threads(int(std::min<int64_t>(dim / 4, INT_MAX / 4)));
  if (threads > 32 * staged_warps || !norm_buffers_apart(x, y, weight, dim, x_out, h)) return false;
  const auto apart = [dim](const float* a, const float* b) { return a == nullptr || b == nullptr || a + dim <= b || b + dim <= a; };
  const WeightFormat f = jobs[0].w.format;
  for (int64_t i = 0; i < n_jobs; ++i) {
    const MatmulJob& j = jobs[i];
    const WeightView& w = j.w;
    if (j.n_tokens != 1 || j.x != h || w.cols != dim || w.format != f || w.rows <= 0 || w.rows > INT_MAX / 2 || !aligned16(w.data) ||
        !aligned16(j.y) || !weight_format_fits(f, w.cols) || staged_x_bytes(f, w.cols) > staged_norm_max_bytes)
      return false;
    if (!apart(j.y, x) || !apart(j.y, y) || !apart(j.y, h) || (y && !apart(j.y, x_out))) return false;
  }
  // The weight early where it fits beside x in the staged kernel's shared memory.
  const bool early = norm_weight_early() && staged_x_bytes(f, dim) + dim * 4 <= staged_norm_max_bytes;
  const NormIn norm{x, y, weight, x_out, h, eps, int(dim), threads, early};
  with_format(f, [&](auto format) { launch_path<decltype(format)::value>(jobs, n_jobs, true, stream, &norm); });
  return true;
}

bool glu_matmul_job(const float* gate, const float* up, const MatmulJob& job, cudaStream_t stream) {
  // One token whose matmul the staged path takes anyway (q8 / q4: so the bits are those of swiglu and
  // matmul in turn), and buffers apart (blocks read gate and up while others write y).
  const WeightView& w = job.w;
  if (w.format != WeightFormat::q8 && w.format != WeightFormat::q4) return false;
  if (job.n_tokens != 1 || job.x != gate || !up || !aligned16(up) || w.rows <= 0 || path_of(job) != Path::staged_x || gemm_takes(job))
    return false;
  const auto apart = [&](const float* a, const float* b) { return a + w.cols <= b || b + w.cols <= a; };
  if (!apart(gate, up)) return false;
  const auto clear = [&](const float* v) { return v + w.cols <= job.y || job.y + w.rows <= v; };
  if (!clear(gate) || !clear(up)) return false;
  const NormIn in{gate, up, nullptr, nullptr, nullptr, 0.f, int(w.cols), 0, false};
  with_format(w.format, [&](auto format) {
    if constexpr (decltype(format)::value == WeightFormat::q8 || decltype(format)::value == WeightFormat::q4)
      launch_path<decltype(format)::value>(&job, 1, true, stream, &in, true);
  });
  return true;
}

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
  // Batches on the tensor cores where the job qualifies; per format, one launch (per 40 jobs) for each
  // matrix-vector path present.
  gemm_jobs(jobs, n_jobs, stream);
  launch_path<WeightFormat::f32>(jobs, n_jobs, false, stream);
  launch_path<WeightFormat::bf16>(jobs, n_jobs, false, stream);
  launch_path<WeightFormat::q8>(jobs, n_jobs, true, stream);
  launch_path<WeightFormat::q8>(jobs, n_jobs, false, stream);
  launch_path<WeightFormat::q4>(jobs, n_jobs, true, stream);
  launch_path<WeightFormat::q4>(jobs, n_jobs, false, stream);
}

}  // namespace moeflux::cuda
