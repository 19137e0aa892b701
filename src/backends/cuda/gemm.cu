// The tensor-core path of gemm.cuh. First each distinct x of a launch is split into its three bf16 parts
// once (prepare_kernel: a warp per token and 64 columns, with the columns' Σx). Then a block computes a
// tile of TM tokens (64, or 32 for jobs of ≤ 32 tokens) × 128 weight rows, 64 columns per step: while the
// tensor cores work on the current step, the next step's x parts are copied to a second shared buffer
// (cp.async: they need no decoding) and every thread loads its share of the next step's weights (32
// columns of one row) into registers, then writes them to shared memory decoded to integers; ldmatrix
// feeds eight warps (2 × 4 of 32 tokens × 32 rows, or 1 × 8 of 32 × 16). 128 rows per block halve the
// re-reads of x (from L2) that 64 cost. Two blocks per SM (≤ 128 registers; x through registers too cost
// the q8/q4 kernels of 64-token tiles ~200 bytes of spill a thread, and 25–40% of their speed).
#include <algorithm>
#include <climits>
#include <cstdlib>
#include <vector>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_common.cuh"
#include "backends/cuda/gemm.cuh"
#include "backends/cuda/matvec.cuh"

namespace moeflux::cuda {
namespace {

constexpr int tile_n = 128;         // weight rows per block
constexpr int tile_k = 64;          // columns per step: one q4 group, two q8 groups
constexpr int gemm_threads = 256;   // 8 warps in 2 × 4, each 32 tokens × 32 rows (or 1 × 8 of 32 × 16)
constexpr int pitch = tile_k + 8;   // bf16 per shared row (144 bytes): ldmatrix's 8 rows hit distinct banks

struct GemmJob {
  const void* data;
  const void* scales;
  const void* biases;
  const uint16_t* x;      // x prepared: three bf16 parts [3][n_tokens, cols] (prepare_kernel)
  const float* x_sum;     // [n_tokens, cols / 64] Σx of each token's step (q4)
  float* y;               // [n_tokens, rows]
  int rows, cols, n_tokens;
  int n_tiles;            // row tiles of tile_n
};

// One distinct input of a launch to prepare: x [n_tokens, cols] into its parts at `parts` and the sums of
// its steps at `sum`.
struct PrepareJob {
  const float* x;
  uint16_t* parts;
  float* sum;
  int n_tokens, cols;
};

constexpr int max_gemm_jobs = 40;
using GemmTable = LaunchTable<GemmJob, max_gemm_jobs>;
static_assert(sizeof(GemmTable) <= 4096, "kernel parameters are limited to 4 KiB");
constexpr int max_prepare_jobs = 64;
using PrepareTable = LaunchTable<PrepareJob, max_prepare_jobs>;
static_assert(sizeof(PrepareTable) <= 4096, "kernel parameters are limited to 4 KiB");
constexpr int prepare_warps = 8;  // a warp per (token, step of 64 columns)

__device__ __forceinline__ uint32_t shared_address(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(p)));
}

// d += a · b for one 16 × 8 tile over 16 columns (bf16 in, fp32 accumulate).
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t bf16x2_bits(__nv_bfloat162 v) { return *reinterpret_cast<uint32_t*>(&v); }

// (v0, v1) as three bf16 pairs whose sums are v0 and v1 exactly: each part is its remainder rounded to
// bf16, and the remainders are exact in fp32.
__device__ __forceinline__ void split3(float v0, float v1, uint32_t& hi, uint32_t& mid, uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(v0, v1);
  const float2 hf = __bfloat1622float2(h);
  const float r0 = v0 - hf.x, r1 = v1 - hf.y;
  const __nv_bfloat162 m = __floats2bfloat162_rn(r0, r1);
  const float2 mf = __bfloat1622float2(m);
  const __nv_bfloat162 l = __floats2bfloat162_rn(r0 - mf.x, r1 - mf.y);
  hi = bf16x2_bits(h), mid = bf16x2_bits(m), lo = bf16x2_bits(l);
}

// Byte k of w (a q4 byte: two nibbles, low first) as the bf16 pair (low, high) of its integers: bf16
// 0x4300 | q is 128 + q (q < 128); 128 comes off both halves exactly.
__device__ __forceinline__ uint32_t nibbles_as_bf16x2(uint32_t w, int k) {
  const uint32_t b = (w >> (8 * k)) & 0xFFu;
  const uint32_t biased = ((b & 0x0Fu) | ((b & 0xF0u) << 12)) | 0x43004300u;
  return bf16x2_bits(__hsub2(*reinterpret_cast<const __nv_bfloat162*>(&biased), __floats2bfloat162_rn(128.f, 128.f)));
}

// Bytes 2k and 2k + 1 of w (int8) as a bf16 pair, exactly (through fp32: 2^23 + 128 + b − (2^23 + 128)).
__device__ __forceinline__ uint32_t bytes_as_bf16x2(uint32_t w, int k) {
  const uint32_t u = w ^ 0x80808080u;
  const float f0 = byte_as_biased_float(u, 2 * k) - (8388608.f + 128.f);
  const float f1 = byte_as_biased_float(u, 2 * k + 1) - (8388608.f + 128.f);
  return bf16x2_bits(__floats2bfloat162_rn(f0, f1));
}

// Each warp takes one token's 64 columns of a step, two per lane: the three parts and Σx (a fixed tree:
// the same sums whatever the batch). Prepared once per distinct x of a launch, not once per block of rows.
__global__ void __launch_bounds__(32 * prepare_warps) prepare_kernel(const __grid_constant__ PrepareTable table) {
  const int j = job_of_block(table, blockIdx.x);
  const PrepareJob& m = table.jobs[j];
  const int steps = m.cols / tile_k, lane = threadIdx.x & 31;
  const int64_t unit = int64_t(blockIdx.x - table.block_start[j]) * prepare_warps + (threadIdx.x >> 5);
  dependent_launch_begin();
  if (unit >= int64_t(m.n_tokens) * steps) return;
  const int64_t t = unit / steps, col = (unit % steps) * tile_k + 2 * lane;
  const float2 v = *reinterpret_cast<const float2*>(m.x + t * m.cols + col);
  const int64_t plane = int64_t(m.n_tokens) * m.cols, at = t * m.cols + col;
  uint32_t* parts = reinterpret_cast<uint32_t*>(m.parts);
  uint32_t hi, mid, lo;
  split3(v.x, v.y, hi, mid, lo);
  parts[at / 2] = hi, parts[(plane + at) / 2] = mid, parts[(2 * plane + at) / 2] = lo;
  const float sum = warp_sum(v.x + v.y);
  if (lane == 0) m.sum[unit] = sum;
}

// One step's share of a thread, loaded ahead into registers: 32 columns of one weight row (bf16 4 chunks,
// q8 2, q4 1) and that row's scale(s) and bias, and q4's Σx of one token.
struct Ahead {
  float x_sum;
  uint4 w[4];
  float scale, bias;
};

// Thread tid stages weight row tid/2, columns 32·(tid%2) .. + 31, and (q4) token tid/2's Σx.
template <WeightFormat F, int TM>
__device__ __forceinline__ void load_ahead(Ahead& a, const GemmJob& m, int t0, int n0, int k0) {
  const int tid = threadIdx.x, half = tid & 1;
  const int col = k0 + 32 * half;
  if constexpr (F == WeightFormat::q4) {
    if (tid < 2 * TM && half == 0) {
      const int t = min(t0 + (tid >> 1), m.n_tokens - 1);  // tokens past the batch re-read its last (never stored)
      a.x_sum = m.x_sum[int64_t(t) * (m.cols / tile_k) + k0 / tile_k];
    }
  }
  const int r = min(n0 + (tid >> 1), m.rows - 1);  // likewise rows past the matrix
  if constexpr (F == WeightFormat::bf16) {
    const uint4* w = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(m.data) + int64_t(r) * m.cols + col);
#pragma unroll
    for (int i = 0; i < 4; ++i) a.w[i] = __ldg(w + i);
  } else if constexpr (F == WeightFormat::q8) {
    const uint4* w = reinterpret_cast<const uint4*>(static_cast<const int8_t*>(m.data) + int64_t(r) * m.cols + col);
    a.w[0] = __ldg(w), a.w[1] = __ldg(w + 1);
    a.scale = __half2float(__ushort_as_half(__ldg(static_cast<const uint16_t*>(m.scales) + int64_t(r) * (m.cols / 32) + col / 32)));
  } else {
    const uint4* w = reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(m.data) + int64_t(r) * (m.cols / 2) + col / 2);
    a.w[0] = __ldg(w);
    const int64_t g = int64_t(r) * (m.cols / 64) + k0 / 64;
    a.scale = bf16_bits_to_float(__ldg(static_cast<const uint16_t*>(m.scales) + g));
    a.bias = bf16_bits_to_float(__ldg(static_cast<const uint16_t*>(m.biases) + g));
  }
}

// A block's shared memory (dynamic: over 48 KiB at 64 tokens).
template <int TM>
struct Shared {
  alignas(16) uint16_t a[2][3][TM][pitch];  // x of the step and of the next (in flight), three bf16 parts
  alignas(16) uint16_t b[tile_n][pitch];    // weights of the step as bf16 (q8/q4: their integers)
  float scale[2][tile_n];                   // q8: the step's two groups; q4: [0]
  float bias[tile_n];                       // q4
  float xsum[TM];                           // q4: Σx of the step's group per token
};

// Copies the x parts of the step at column k0 into buffer buf: TM tokens × 64 columns × 3 parts in
// 16-byte pieces spread over the block, then commits them as one group.
template <int TM>
__device__ __forceinline__ void issue_x(Shared<TM>& s, const GemmJob& m, int t0, int k0, int buf) {
  constexpr int pieces = 3 * TM * (tile_k / 8);
  static_assert(pieces % gemm_threads == 0, "every thread copies as many pieces");
  const int64_t plane = int64_t(m.n_tokens) * m.cols;
#pragma unroll
  for (int k = 0; k < pieces / gemm_threads; ++k) {
    const int i = int(threadIdx.x) + k * gemm_threads;
    const int p = i / (TM * (tile_k / 8)), rest = i % (TM * (tile_k / 8)), row = rest / (tile_k / 8), c = 8 * (rest % (tile_k / 8));
    const int t = min(t0 + row, m.n_tokens - 1);  // tokens past the batch re-read its last (never stored)
    cp_async16(&s.a[buf][p][row][c], m.x + p * plane + int64_t(t) * m.cols + k0 + c);
  }
  cp_async_commit();
}

template <WeightFormat F, int TM>
__device__ __forceinline__ void store_ahead(const Ahead& a, Shared<TM>& s) {
  const int tid = threadIdx.x, row = tid >> 1, c0 = 32 * (tid & 1);
  if constexpr (F == WeightFormat::q4) {
    if (tid < 2 * TM && (tid & 1) == 0) s.xsum[row] = a.x_sum;
  }
  if constexpr (F == WeightFormat::bf16) {
#pragma unroll
    for (int i = 0; i < 4; ++i) *reinterpret_cast<uint4*>(&s.b[row][c0 + 8 * i]) = a.w[i];
  } else if constexpr (F == WeightFormat::q8) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint32_t w[4] = {a.w[i].x, a.w[i].y, a.w[i].z, a.w[i].w};
      uint32_t o[8];
#pragma unroll
      for (int k = 0; k < 4; ++k) o[2 * k] = bytes_as_bf16x2(w[k], 0), o[2 * k + 1] = bytes_as_bf16x2(w[k], 1);
      *reinterpret_cast<uint4*>(&s.b[row][c0 + 16 * i]) = make_uint4(o[0], o[1], o[2], o[3]);
      *reinterpret_cast<uint4*>(&s.b[row][c0 + 16 * i + 8]) = make_uint4(o[4], o[5], o[6], o[7]);
    }
    s.scale[tid & 1][row] = a.scale;
  } else {
    const uint32_t w[4] = {a.w[0].x, a.w[0].y, a.w[0].z, a.w[0].w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint4 o = make_uint4(nibbles_as_bf16x2(w[k], 0), nibbles_as_bf16x2(w[k], 1), nibbles_as_bf16x2(w[k], 2),
                                 nibbles_as_bf16x2(w[k], 3));
      *reinterpret_cast<uint4*>(&s.b[row][c0 + 8 * k]) = o;
    }
    if ((tid & 1) == 0) s.scale[0][row] = a.scale, s.bias[row] = a.bias;
  }
}

// Where element c of a warp's mma fragment (mi, ni) sits: its token within the warp's tokens wm + …,
// and its weight row within the warp's rows wn + … (m16n8k16's accumulator layout).
__device__ __forceinline__ int fragment_token(int wm, int mi, int lane, int c) { return wm + 16 * mi + (lane >> 2) + 8 * (c >> 1); }
__device__ __forceinline__ int fragment_row(int wn, int ni, int lane, int c) { return wn + 8 * ni + 2 * (lane & 3) + (c & 1); }

// grid.x: every job's tiles (row tiles fastest, so neighbouring blocks share a token tile). An element's
// sum takes the same steps, parts and folds in the same order whatever TM and the batch.
template <WeightFormat F, int TM>
__global__ void __launch_bounds__(gemm_threads, 2) gemm_kernel(const __grid_constant__ GemmTable table) {
  constexpr int NI = TM == 64 ? 4 : 2;  // 8-row tiles per warp
  extern __shared__ float4 shared4[];
  Shared<TM>& s = *reinterpret_cast<Shared<TM>*>(shared4);
  const int j = job_of_block(table, blockIdx.x);
  const GemmJob& m = table.jobs[j];
  const int local = blockIdx.x - table.block_start[j];
  const int n0 = (local % m.n_tiles) * tile_n, t0 = (local / m.n_tiles) * TM;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = TM == 64 ? (warp >> 2) * 32 : 0, wn = TM == 64 ? (warp & 3) * 32 : warp * 16;  // the warp's tokens, rows

  float y[2][NI][4] = {}, p[2][NI][4] = {};  // [token tile][row tile][fragment]: the sums, the group's sums

  // A group's sums into y, scaled by each row's scale (and q4's bias · each token's Σx).
  const auto fold = [&](int group) {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int n = fragment_row(wn, ni, lane, c), t = fragment_token(wm, mi, lane, c);
          if constexpr (F == WeightFormat::q8)
            y[mi][ni][c] = fmaf(s.scale[group][n], p[mi][ni][c], y[mi][ni][c]);
          else
            y[mi][ni][c] += fmaf(s.scale[0][n], p[mi][ni][c], s.bias[n] * s.xsum[t]);
          p[mi][ni][c] = 0.f;
        }
  };

  dependent_launch_begin();
  Ahead ahead;
  load_ahead<F, TM>(ahead, m, t0, n0, 0);
  issue_x(s, m, t0, 0, 0);
  const int n_steps = m.cols / tile_k;
  for (int step = 0, buf = 0; step < n_steps; ++step, buf ^= 1) {
    __syncthreads();  // the previous step's tiles are no longer read
    store_ahead<F, TM>(ahead, s);
    if (step + 1 < n_steps)
      issue_x(s, m, t0, (step + 1) * tile_k, buf ^ 1);  // into the buffer the previous step read
    else
      cp_async_commit();  // an empty group: the wait below always leaves the newest one in flight
    cp_async_wait<1>();   // this step's x has landed
    __syncthreads();
    if (step + 1 < n_steps) load_ahead<F, TM>(ahead, m, t0, n0, (step + 1) * tile_k);  // in flight meanwhile
#pragma unroll
    for (int ks = 0; ks < tile_k / 16; ++ks) {
      uint32_t b[NI][2];
#pragma unroll
      for (int np = 0; np < NI / 2; ++np) {
        uint32_t r[4];
        ldmatrix_x4(r, &s.b[wn + 16 * np + (lane & 7) + 8 * (lane >> 4)][16 * ks + 8 * ((lane >> 3) & 1)]);
        b[2 * np][0] = r[0], b[2 * np][1] = r[1], b[2 * np + 1][0] = r[2], b[2 * np + 1][1] = r[3];
      }
      // Part by part (few live fragments): each sum still takes hi, mid, lo of this step in that order.
#pragma unroll
      for (int part = 0; part < 3; ++part) {
        uint32_t a[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) ldmatrix_x4(a[mi], &s.a[buf][part][wm + 16 * mi + (lane & 15)][16 * ks + 8 * (lane >> 4)]);
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int ni = 0; ni < NI; ++ni) mma_bf16(F == WeightFormat::bf16 ? y[mi][ni] : p[mi][ni], a[mi], b[ni][0], b[ni][1]);
      }
      if constexpr (F == WeightFormat::q8) {
        if (ks % 2 == 1) fold(ks / 2);
      } else if constexpr (F == WeightFormat::q4) {
        if (ks == 3) fold(0);
      }
    }
  }

#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int t = t0 + fragment_token(wm, mi, lane, c), n = n0 + fragment_row(wn, ni, lane, c);
        if (t < m.n_tokens && n < m.rows) m.y[int64_t(t) * m.rows + n] = y[mi][ni][c];
      }
}

// Tokens from which a job takes this path: gemm_min_tokens, or MOEFLUX_CUDA_GEMM (0: never).
int64_t min_tokens() {
  static const int64_t n = [] {
    const char* env = std::getenv("MOEFLUX_CUDA_GEMM");
    if (!env || !*env) return gemm_min_tokens;
    const long long v = std::atoll(env);
    return v <= 0 ? int64_t(INT64_MAX) : int64_t(v);
  }();
  return n;
}

// Token tile of a job: 32 where the batch fits one, else 64.
int token_tile(int64_t n_tokens) { return n_tokens <= 32 ? 32 : 64; }

// Where a job's x was prepared.
struct Prepared {
  const uint16_t* x;
  const float* sum;
};

template <WeightFormat F, int TM>
void launch_format(const MatmulJob* jobs, int64_t n_jobs, const std::vector<Prepared>& prepared, cudaStream_t stream) {
  GemmTable table;
  int n = 0;
  const auto flush = [&] {
    if (n == 0) return;
    table.n_jobs = n;
    MF_CUDA_CHECK(cudaFuncSetAttribute(gemm_kernel<F, TM>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(sizeof(Shared<TM>))));
    launch(gemm_kernel<F, TM>, dim3(unsigned(table.block_start[n])), dim3(gemm_threads), sizeof(Shared<TM>), stream, table);
    MF_CUDA_CHECK_LAUNCH();
    n = 0;
  };
  table.block_start[0] = 0;
  for (int64_t i = 0; i < n_jobs; ++i) {
    const MatmulJob& job = jobs[i];
    if (job.w.format != F || !gemm_takes(job) || token_tile(job.n_tokens) != TM) continue;
    const int64_t n_tiles = (job.w.rows + tile_n - 1) / tile_n, m_tiles = (job.n_tokens + TM - 1) / TM;
    const int64_t blocks = n_tiles * m_tiles;
    if (blocks > INT_MAX) {
      std::fprintf(stderr, "%s:%d: matmul: %lld tokens × [%lld, %lld] is too large for one launch\n", __FILE__, __LINE__,
                   (long long)job.n_tokens, (long long)job.w.rows, (long long)job.w.cols);
      std::abort();
    }
    if (n > 0 && int64_t(table.block_start[n]) + blocks > INT_MAX) flush();
    const Prepared& x = prepared[size_t(i)];
    table.jobs[n] = {job.w.data, job.w.scales, job.w.biases, x.x, x.sum, job.y, int(job.w.rows), int(job.w.cols),
                     int(job.n_tokens), int(n_tiles)};
    table.block_start[n + 1] = int(table.block_start[n] + blocks);
    if (++n == max_gemm_jobs) flush();
  }
  flush();
}

// Prepares each distinct x of the jobs that take this path (gate and up of an expert share theirs) in
// the stream's scratch memory; prepared[i] says where job i's is.
void prepare_inputs(const MatmulJob* jobs, int64_t n_jobs, std::vector<Prepared>& prepared, cudaStream_t stream) {
  struct Input {
    const float* x;
    int64_t n_tokens, cols;
    size_t at;  // bytes into the scratch
  };
  const auto align = [](size_t b) { return (b + 255) / 256 * 256; };
  const auto parts_bytes = [&](const Input& in) { return align(size_t(in.n_tokens) * size_t(in.cols) * 2 * 3); };
  const auto sum_bytes = [&](const Input& in) { return align(size_t(in.n_tokens) * size_t(in.cols / tile_k) * 4); };
  std::vector<Input> inputs;
  std::vector<int> input_of(size_t(n_jobs), -1);
  size_t bytes = 0;
  for (int64_t i = 0; i < n_jobs; ++i) {
    const MatmulJob& job = jobs[i];
    if (!gemm_takes(job)) continue;
    int found = -1;
    for (size_t k = 0; k < inputs.size() && found < 0; ++k)
      if (inputs[k].x == job.x && inputs[k].n_tokens == job.n_tokens && inputs[k].cols == job.w.cols) found = int(k);
    if (found < 0) {
      found = int(inputs.size());
      inputs.push_back({job.x, job.n_tokens, job.w.cols, bytes});
      bytes += parts_bytes(inputs.back()) + sum_bytes(inputs.back());
    }
    input_of[size_t(i)] = found;
  }
  prepared.assign(size_t(n_jobs), Prepared{});
  if (inputs.empty()) return;
  char* scratch = static_cast<char*>(stream_scratch(stream, bytes));
  PrepareTable table;
  int n = 0;
  const auto flush = [&] {
    if (n == 0) return;
    table.n_jobs = n;
    launch(prepare_kernel, dim3(unsigned(table.block_start[n])), dim3(32 * prepare_warps), 0, stream, table);
    MF_CUDA_CHECK_LAUNCH();
    n = 0;
  };
  table.block_start[0] = 0;
  std::vector<Prepared> where(inputs.size());
  for (size_t k = 0; k < inputs.size(); ++k) {
    const Input& in = inputs[k];
    uint16_t* parts = reinterpret_cast<uint16_t*>(scratch + in.at);
    float* sum = reinterpret_cast<float*>(scratch + in.at + parts_bytes(in));
    where[k] = {parts, sum};
    const int64_t blocks = (in.n_tokens * (in.cols / tile_k) + prepare_warps - 1) / prepare_warps;
    if (n > 0 && int64_t(table.block_start[n]) + blocks > INT_MAX) flush();
    table.jobs[n] = {in.x, parts, sum, int(in.n_tokens), int(in.cols)};
    table.block_start[n + 1] = int(table.block_start[n] + blocks);
    if (++n == max_prepare_jobs) flush();
  }
  flush();
  for (int64_t i = 0; i < n_jobs; ++i)
    if (input_of[size_t(i)] >= 0) prepared[size_t(i)] = where[size_t(input_of[size_t(i)])];
}

}  // namespace

bool gemm_takes(const MatmulJob& job) {
  const WeightView& w = job.w;
  const bool format = w.format == WeightFormat::bf16 || w.format == WeightFormat::q8 || w.format == WeightFormat::q4;
  return format && job.n_tokens <= INT_MAX && w.rows > 0 && w.cols > 0 &&
         w.cols % tile_k == 0 && aligned16(w.data) && aligned16(job.x) && job.n_tokens >= min_tokens();
}

void gemm_jobs(const MatmulJob* jobs, int64_t n_jobs, cudaStream_t stream) {
  // Decode steps (one token) never take this path: no allocation or scan beyond this on theirs.
  if (std::none_of(jobs, jobs + n_jobs, gemm_takes)) return;
  std::vector<Prepared> prepared;
  prepare_inputs(jobs, n_jobs, prepared, stream);
  launch_format<WeightFormat::bf16, 64>(jobs, n_jobs, prepared, stream);
  launch_format<WeightFormat::bf16, 32>(jobs, n_jobs, prepared, stream);
  launch_format<WeightFormat::q8, 64>(jobs, n_jobs, prepared, stream);
  launch_format<WeightFormat::q8, 32>(jobs, n_jobs, prepared, stream);
  launch_format<WeightFormat::q4, 64>(jobs, n_jobs, prepared, stream);
  launch_format<WeightFormat::q4, 32>(jobs, n_jobs, prepared, stream);
}

}  // namespace moeflux::cuda
