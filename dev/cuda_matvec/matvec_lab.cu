// Kernel lab (issue 6): quantized matrix-vector products on an NVIDIA GPU in moeflux's pack formats,
// in numbered versions, each checked against a host reference and timed against the device's measured
// memory bandwidth. Standalone: nvcc only, no project code (the formats are docs/FORMAT.md §5):
//   bf16: uint16 data[rows, cols]
//   q8  : int8 data[rows, cols], fp16 scales[rows, cols/32]; w = q · scale
//   q4  : uint32 data[rows, cols/8] (element 8w + j in bits 4j..4j+3), bf16 scales and biases
//         [rows, cols/64]; w = nibble · scale + bias
// Versions:
//   v1  one warp per row, 32-bit loads, x read through the read-only cache
//   v2  one warp per row, 128-bit loads (q4: 32 nibbles = half a group per lane per step), x staged in
//       shared memory once per block, 8 rows per block
//   v3  v2 over a table of jobs (the K experts of a layer, three matrices each) in one launch
//   v4  v2 with exact integer→float conversion by exponent bias: a byte q placed in the mantissa of
//       2^23 (one byte_perm) is the float 2^23 + q, so one subtraction yields q exactly — instead of
//       shift, mask and the slow int→float convert per weight
//   v5  v3 with v4's conversion
//   v6  R rows per warp, no shared memory: each lane loads its x chunk once (128-bit loads through L1)
//       and applies it to R rows' weights, the chunk's Σx (q4's bias term) computed once for the R rows.
//       v2's per-block staging of x cost as many bytes as a q4 block's weights.
//   v7  v6 over the table of jobs (all experts of a layer in one launch)
//   v8  v6 with every load of an iteration issued before the first use (R rows, U chunks per lane)
//   v9  v8 with q4 nibbles read as 2 + q/64 (one byte_perm, no subtraction)
//   v10 all-experts launch as a flat grid over every job's row tiles, the table as the kernel parameter
//   v11 v8/v9 with one fused multiply-add chain per row, columns split across S warps for short rows
//   v12 v10 with v11's rows
//   v13 x staged once per block in shared memory (padded chunks), first loads issued before the copy
//   v14 v10 with v13's rows
//   v15 weights, x and scales streamed through shared memory by cp.async, P stages deep
//   v16 v10 with v15's tiles
//   v17 q4 on the tensor cores: mma.sync m16n8k16 bf16, x split exactly into three bf16 parts
//   v18 v10 with v17's tiles
//   v19 v17 with fewer instructions (16 + q nibbles, 8-byte scale loads, shuffle-reduced Σx)
//   v20 v10 with v19's tiles
//   v21 v19 with the next group quad prefetched and columns split across warps
//   v22 v10 with v21's tiles (per-job splits)
//   v23 v13 walking each chunk word by word (8 live x values), __launch_bounds__ for 4+ blocks per SM
//   v24 v10 with v23's rows
//   v25 q4 on the integer tensor cores (m16n8k32 u8 x s8), x as four exact signed bytes per group
//   v26 v10 with v25's tiles (per-job splits)
//   v27 v25 with x's fragments made by a kernel of their own, read from global memory with the weights
//   v25r v25 with a blocks-per-SM bound and the most column splits whose blocks are all resident at once
//   read: read_sum over the matrix's bytes (no product): the ceiling at that size
// The engine ships v23/v24 for q8 and q4 (x ≤ 48 KiB) and v11/v12 otherwise (src/backends/cuda/matmul.cu).
// GB/s are weight bytes per second in launches back to back over rotating copies of the weights (more
// than 320 MB in all, so no launch finds its weights in the 50–60 MB L2); errors are max |y − ref| / Σ|w·x|
// over sampled rows against a double-precision host reference (the op test's measure; tolerance 2e-5).
// Build: nvcc -O3 -std=c++17 -arch=sm_90 -o matvec_lab dev/cuda_matvec/matvec_lab.cu  (or CMake: build/dev/matvec_lab)
// Run:   ./matvec_lab                       every shape, format and version; one table each for
//                                           matrix-vector products and the all-experts launch
//        ./matvec_lab --old                 also v1, v2, v4
//        LAB_FORMAT=q4 ./matvec_lab         one format's rows
//        ./matvec_lab --only SHAPE FMT VER  one case, for ncu (e.g. --only q_proj q4 "v13 R4W8")
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#define CHECK(call)                                                                                   \
  do {                                                                                                \
    cudaError_t e_ = (call);                                                                          \
    if (e_ != cudaSuccess) {                                                                          \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_));    \
      std::exit(1);                                                                                   \
    }                                                                                                 \
  } while (0)

enum Format { BF16, Q8, Q4 };
const char* format_name(Format f) { return f == BF16 ? "bf16" : f == Q8 ? "q8" : "q4"; }

struct Matrix {  // device pointers
  Format format;
  int rows = 0, cols = 0;
  const void* data = nullptr;
  const void* scales = nullptr;
  const void* biases = nullptr;
  __host__ __device__ size_t bytes() const {
    switch (format) {
      case BF16: return size_t(rows) * cols * 2;
      case Q8: return size_t(rows) * cols + size_t(rows) * (cols / 32) * 2;
      case Q4: return size_t(rows) * cols / 2 + size_t(rows) * (cols / 64) * 4;
    }
    return 0;
  }
};

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---- v1: one warp per row, 32-bit words --------------------------------------------------------------

template <Format F>
__device__ float row_dot_v1(const Matrix& m, int r, const float* __restrict__ x) {
  const int lane = threadIdx.x & 31;
  float acc = 0.f;
  if constexpr (F == BF16) {
    const uint32_t* w = static_cast<const uint32_t*>(m.data) + size_t(r) * m.cols / 2;
    for (int i = lane; i < m.cols / 2; i += 32) {
      const uint32_t p = __ldg(w + i);
      acc += __uint_as_float(p << 16) * __ldg(x + 2 * i) + __uint_as_float(p & 0xffff0000u) * __ldg(x + 2 * i + 1);
    }
  } else if constexpr (F == Q8) {
    const uint32_t* w = static_cast<const uint32_t*>(m.data) + size_t(r) * m.cols / 4;
    const __half* s = static_cast<const __half*>(m.scales) + size_t(r) * (m.cols / 32);
    for (int i = lane; i < m.cols / 4; i += 32) {
      const uint32_t p = __ldg(w + i);
      const float sc = __half2float(s[i / 8]);
      float d = 0.f;
      for (int j = 0; j < 4; ++j) d += float(int8_t(p >> (8 * j))) * __ldg(x + 4 * i + j);
      acc += sc * d;
    }
  } else {
    const uint32_t* w = static_cast<const uint32_t*>(m.data) + size_t(r) * m.cols / 8;
    const __nv_bfloat16* s = static_cast<const __nv_bfloat16*>(m.scales) + size_t(r) * (m.cols / 64);
    const __nv_bfloat16* b = static_cast<const __nv_bfloat16*>(m.biases) + size_t(r) * (m.cols / 64);
    for (int i = lane; i < m.cols / 8; i += 32) {
      const uint32_t p = __ldg(w + i);
      float qx = 0.f, sx = 0.f;
      for (int j = 0; j < 8; ++j) {
        const float xv = __ldg(x + 8 * i + j);
        qx += float((p >> (4 * j)) & 15u) * xv;
        sx += xv;
      }
      acc += __bfloat162float(s[i / 8]) * qx + __bfloat162float(b[i / 8]) * sx;
    }
  }
  return warp_sum(acc);
}

template <Format F>
__global__ void matvec_v1(Matrix m, const float* __restrict__ x, float* __restrict__ y) {
  const int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (r >= m.rows) return;
  const float v = row_dot_v1<F>(m, r, x);
  if ((threadIdx.x & 31) == 0) y[r] = v;
}

// ---- v2: one warp per row, 128-bit loads, x in shared memory -----------------------------------------

// Byte k of w as the float 2^23 + byte (exact), via the exponent-bias trick.
__device__ __forceinline__ float byte_as_biased_float(uint32_t w, int k) {
  return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7540u + unsigned(k)));
}

template <Format F, bool Magic>
__device__ float row_dot_v2(const Matrix& m, int r, const float* __restrict__ xs) {
  const int lane = threadIdx.x & 31;
  float acc = 0.f;
  if constexpr (F == BF16) {  // 8 weights per 16 bytes
    const uint4* w = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(m.data) + size_t(r) * m.cols);
    for (int i = lane; i < m.cols / 8; i += 32) {
      const uint4 p = __ldg(w + i);
      const float4 x0 = reinterpret_cast<const float4*>(xs)[2 * i], x1 = reinterpret_cast<const float4*>(xs)[2 * i + 1];
      acc += __uint_as_float(p.x << 16) * x0.x + __uint_as_float(p.x & 0xffff0000u) * x0.y +
             __uint_as_float(p.y << 16) * x0.z + __uint_as_float(p.y & 0xffff0000u) * x0.w +
             __uint_as_float(p.z << 16) * x1.x + __uint_as_float(p.z & 0xffff0000u) * x1.y +
             __uint_as_float(p.w << 16) * x1.z + __uint_as_float(p.w & 0xffff0000u) * x1.w;
    }
  } else if constexpr (F == Q8) {  // 16 weights per 16 bytes: half a group
    const uint4* w = reinterpret_cast<const uint4*>(static_cast<const int8_t*>(m.data) + size_t(r) * m.cols);
    const __half* s = static_cast<const __half*>(m.scales) + size_t(r) * (m.cols / 32);
    for (int i = lane; i < m.cols / 16; i += 32) {
      const uint4 p = __ldg(w + i);
      const uint32_t words[4] = {p.x, p.y, p.z, p.w};
      const float4* xv = reinterpret_cast<const float4*>(xs) + 4 * i;
      float d = 0.f;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float4 xx = xv[k];
        if constexpr (Magic) {
          const uint32_t u = words[k] ^ 0x80808080u;  // signed byte b → unsigned b + 128
          constexpr float bias = 8388608.f + 128.f;
          d += (byte_as_biased_float(u, 0) - bias) * xx.x + (byte_as_biased_float(u, 1) - bias) * xx.y +
               (byte_as_biased_float(u, 2) - bias) * xx.z + (byte_as_biased_float(u, 3) - bias) * xx.w;
        } else {
          d += float(int8_t(words[k])) * xx.x + float(int8_t(words[k] >> 8)) * xx.y + float(int8_t(words[k] >> 16)) * xx.z +
               float(int8_t(words[k] >> 24)) * xx.w;
        }
      }
      acc += __half2float(__ldg(s + i / 2)) * d;
    }
  } else {  // 32 nibbles per 16 bytes: half a group, one scale and bias
    const uint4* w = reinterpret_cast<const uint4*>(static_cast<const uint32_t*>(m.data) + size_t(r) * m.cols / 8);
    const __nv_bfloat16* s = static_cast<const __nv_bfloat16*>(m.scales) + size_t(r) * (m.cols / 64);
    const __nv_bfloat16* b = static_cast<const __nv_bfloat16*>(m.biases) + size_t(r) * (m.cols / 64);
    for (int i = lane; i < m.cols / 32; i += 32) {
      const uint4 p = __ldg(w + i);
      const uint32_t words[4] = {p.x, p.y, p.z, p.w};
      const float4* xv = reinterpret_cast<const float4*>(xs) + 8 * i;
      float qx = 0.f, sx = 0.f;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float4 a = xv[2 * k], c = xv[2 * k + 1];
        const uint32_t q = words[k];
        if constexpr (Magic) {
          // Even elements in the low nibble of each byte, odd ones in the high nibble.
          const uint32_t lo = q & 0x0F0F0F0Fu, hi = (q >> 4) & 0x0F0F0F0Fu;
          constexpr float bias = 8388608.f;
          qx += (byte_as_biased_float(lo, 0) - bias) * a.x + (byte_as_biased_float(hi, 0) - bias) * a.y +
                (byte_as_biased_float(lo, 1) - bias) * a.z + (byte_as_biased_float(hi, 1) - bias) * a.w +
                (byte_as_biased_float(lo, 2) - bias) * c.x + (byte_as_biased_float(hi, 2) - bias) * c.y +
                (byte_as_biased_float(lo, 3) - bias) * c.z + (byte_as_biased_float(hi, 3) - bias) * c.w;
        } else {
          qx += float(q & 15u) * a.x + float((q >> 4) & 15u) * a.y + float((q >> 8) & 15u) * a.z + float((q >> 12) & 15u) * a.w +
                float((q >> 16) & 15u) * c.x + float((q >> 20) & 15u) * c.y + float((q >> 24) & 15u) * c.z + float(q >> 28) * c.w;
        }
        sx += (a.x + a.y) + (a.z + a.w) + (c.x + c.y) + (c.z + c.w);
      }
      acc += __bfloat162float(__ldg(s + i / 2)) * qx + __bfloat162float(__ldg(b + i / 2)) * sx;
    }
  }
  return warp_sum(acc);
}

constexpr int v2_rows_per_block = 8;

template <Format F, bool Magic>
__global__ void matvec_v2(Matrix m, const float* __restrict__ x, float* __restrict__ y) {
  extern __shared__ float xs[];
  for (int i = threadIdx.x; i < m.cols / 4; i += blockDim.x) reinterpret_cast<float4*>(xs)[i] = reinterpret_cast<const float4*>(x)[i];
  __syncthreads();
  const int r = blockIdx.x * v2_rows_per_block + threadIdx.x / 32;
  if (r >= m.rows) return;
  const float v = row_dot_v2<F, Magic>(m, r, xs);
  if ((threadIdx.x & 31) == 0) y[r] = v;
}

// ---- v6: R rows per warp, x chunk in registers -------------------------------------------------------

template <Format F, int R>
__device__ void rows_dot_v6(const Matrix& m, int r0, const float* __restrict__ x, float* __restrict__ y) {
  const int lane = threadIdx.x & 31;
  float acc[R];
#pragma unroll
  for (int j = 0; j < R; ++j) acc[j] = 0.f;
  const int rows = min(R, m.rows - r0);
  // A 16-byte chunk of weights covers 8 (bf16), 16 (q8) or 32 (q4) columns.
  constexpr int per_chunk = F == BF16 ? 8 : F == Q8 ? 16 : 32;
  const int n_chunks = m.cols / per_chunk;
  for (int i = lane; i < n_chunks; i += 32) {
    float xv[per_chunk];
#pragma unroll
    for (int k = 0; k < per_chunk / 4; ++k) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(x) + i * (per_chunk / 4) + k);
      xv[4 * k] = v.x, xv[4 * k + 1] = v.y, xv[4 * k + 2] = v.z, xv[4 * k + 3] = v.w;
    }
    float xsum = 0.f;
    if constexpr (F == Q4) {
#pragma unroll
      for (int k = 0; k < per_chunk; ++k) xsum += xv[k];
    }
#pragma unroll
    for (int j = 0; j < R; ++j) {
      if (j >= rows) break;
      const int r = r0 + j;
      if constexpr (F == BF16) {
        const uint4 p = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(m.data) + size_t(r) * m.cols) + i);
        const uint32_t w[4] = {p.x, p.y, p.z, p.w};
        float d = 0.f;
#pragma unroll
        for (int k = 0; k < 4; ++k) d += __uint_as_float(w[k] << 16) * xv[2 * k] + __uint_as_float(w[k] & 0xffff0000u) * xv[2 * k + 1];
        acc[j] += d;
      } else if constexpr (F == Q8) {
        const uint4 p = __ldg(reinterpret_cast<const uint4*>(static_cast<const int8_t*>(m.data) + size_t(r) * m.cols) + i);
        const uint32_t w[4] = {p.x, p.y, p.z, p.w};
        const float sc = __half2float(__ldg(static_cast<const __half*>(m.scales) + size_t(r) * (m.cols / 32) + i / 2));
        float d = 0.f;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const uint32_t u = w[k] ^ 0x80808080u;
          constexpr float bias = 8388608.f + 128.f;
#pragma unroll
          for (int b = 0; b < 4; ++b) d += (byte_as_biased_float(u, b) - bias) * xv[4 * k + b];
        }
        acc[j] += sc * d;
      } else {
        const uint4 p = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint32_t*>(m.data) + size_t(r) * m.cols / 8) + i);
        const uint32_t w[4] = {p.x, p.y, p.z, p.w};
        const size_t g = size_t(r) * (m.cols / 64) + i / 2;
        const float sc = __bfloat162float(__ldg(static_cast<const __nv_bfloat16*>(m.scales) + g));
        const float bi = __bfloat162float(__ldg(static_cast<const __nv_bfloat16*>(m.biases) + g));
        float qx = 0.f;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
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

constexpr int v6_warps = 4;
template <Format F> __host__ __device__ constexpr int v6_rows() { return F == BF16 ? 2 : F == Q8 ? 4 : 8; }

template <Format F>
__global__ void matvec_v6(Matrix m, const float* __restrict__ x, float* __restrict__ y) {
  constexpr int R = v6_rows<F>();
  const int r0 = (blockIdx.x * v6_warps + threadIdx.x / 32) * R;
  if (r0 >= m.rows) return;
  rows_dot_v6<F, R>(m, r0, x, y);
}

// ---- v3: a table of jobs in one launch (blockIdx.y = job) --------------------------------------------

struct Job {
  Matrix m;
  const float* x;
  float* y;
};

template <Format F, bool Magic>
__global__ void matvec_v3(const Job* __restrict__ jobs) {
  extern __shared__ float xs[];
  const Job& j = jobs[blockIdx.y];
  if (blockIdx.x * v2_rows_per_block >= j.m.rows) return;
  for (int i = threadIdx.x; i < j.m.cols / 4; i += blockDim.x) reinterpret_cast<float4*>(xs)[i] = reinterpret_cast<const float4*>(j.x)[i];
  __syncthreads();
  const int r = blockIdx.x * v2_rows_per_block + threadIdx.x / 32;
  if (r >= j.m.rows) return;
  const float v = row_dot_v2<F, Magic>(j.m, r, xs);
  if ((threadIdx.x & 31) == 0) j.y[r] = v;
}

template <Format F>
__global__ void matvec_v7(const Job* __restrict__ jobs) {
  constexpr int R = v6_rows<F>();
  const Job& j = jobs[blockIdx.y];
  const int r0 = (blockIdx.x * v6_warps + threadIdx.x / 32) * R;
  if (r0 >= j.m.rows) return;
  rows_dot_v6<F, R>(j.m, r0, j.x, j.y);
}

// ---- v8: v6 with every load of an iteration issued before the first use -------------------------------
// v6 guarded each row with `if (j >= rows) break`, so its R weight loads sat behind R branches and each
// waited for the previous row's arithmetic: one 16-byte load in flight per lane. v8 clamps the row index
// instead (rows past the matrix re-read its last row and are not stored), so the R·U loads of an iteration
// (U chunks per lane, 32·U chunks per warp apart) and their scales are all issued before any is used.
// v9 is v8 with q4's nibble read as the float 2 + q/64 (one byte_perm puts the nibble in mantissa bits
// 16..19 of 2.0f; no subtraction): Σ(2 + q/64)·x = 2·Σx + Σq·x/64, so one chunk's contribution
// s·Σq·x + b·Σx becomes (64·s)·Σf·x + (b − 128·s)·Σx. One instruction per weight less than v8's exact
// 2^23 + q − 2^23; the 2·Σx it carries costs ~20× the rounding of the exact form (still ~1e-6 relative).

__host__ __device__ constexpr int chunk_cols(Format f) { return f == BF16 ? 8 : f == Q8 ? 16 : 32; }

// Nibble k (0..3) of a word of nibbles masked to 0x0F0F0F0F, as the float 2 + q/64 (exact).
__device__ __forceinline__ float nibble_as_affine_float(uint32_t w, int k) {
  return __uint_as_float(__byte_perm(w, 0x40000000u, 0x7054u | (unsigned(k) << 8)));
}

// One row's contribution from one 16-byte chunk of weights (w) against the lane's x chunk (xv).
// sc, bi: the chunk's raw scale and bias bits (q8: fp16 scale; q4: bf16 scale and bias).
template <Format F, bool Affine, int N>
__device__ __forceinline__ float chunk_dot(uint4 p, uint16_t sc, uint16_t bi, const float (&xv)[N], float xsum) {
  const uint32_t w[4] = {p.x, p.y, p.z, p.w};
  if constexpr (F == BF16) {
    float d = 0.f;
#pragma unroll
    for (int k = 0; k < 4; ++k) d += __uint_as_float(w[k] << 16) * xv[2 * k] + __uint_as_float(w[k] & 0xffff0000u) * xv[2 * k + 1];
    return d;
  } else if constexpr (F == Q8) {
    float d = 0.f;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t u = w[k] ^ 0x80808080u;  // signed byte b → unsigned b + 128
      constexpr float bias = 8388608.f + 128.f;
#pragma unroll
      for (int b = 0; b < 4; ++b) d += (byte_as_biased_float(u, b) - bias) * xv[4 * k + b];
    }
    return __half2float(__ushort_as_half(sc)) * d;
  } else {
    const float s = __uint_as_float(uint32_t(sc) << 16), b = __uint_as_float(uint32_t(bi) << 16);
    float d = 0.f;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      // Even elements in the low nibble of each byte, odd ones in the high nibble.
      const uint32_t lo = w[k] & 0x0F0F0F0Fu, hi = (w[k] >> 4) & 0x0F0F0F0Fu;
      if constexpr (Affine) {
#pragma unroll
        for (int j = 0; j < 4; ++j) d += nibble_as_affine_float(lo, j) * xv[8 * k + 2 * j] + nibble_as_affine_float(hi, j) * xv[8 * k + 2 * j + 1];
      } else {
        constexpr float bias = 8388608.f;
#pragma unroll
        for (int j = 0; j < 4; ++j)
          d += (byte_as_biased_float(lo, j) - bias) * xv[8 * k + 2 * j] + (byte_as_biased_float(hi, j) - bias) * xv[8 * k + 2 * j + 1];
      }
    }
    if constexpr (Affine) return (64.f * s) * d + fmaf(-128.f, s, b) * xsum;
    return s * d + b * xsum;
  }
}

template <Format F, int R, int U, bool Affine>
__device__ void rows_dot_v8(const Matrix& m, int r0, const float* __restrict__ x, float* __restrict__ y) {
  constexpr int per_chunk = chunk_cols(F);
  const int lane = threadIdx.x & 31;
  const int n_chunks = m.cols / per_chunk;
  const int rows = min(R, m.rows - r0);
  const size_t row_bytes = F == BF16 ? size_t(m.cols) * 2 : F == Q8 ? size_t(m.cols) : size_t(m.cols) / 2;
  const int groups = F == Q8 ? m.cols / 32 : m.cols / 64;  // scales per row; a chunk is half a group
  const char* data = static_cast<const char*>(m.data);
  const uint16_t* scales = static_cast<const uint16_t*>(m.scales);
  const uint16_t* biases = static_cast<const uint16_t*>(m.biases);
  float acc[R];
#pragma unroll
  for (int j = 0; j < R; ++j) acc[j] = 0.f;
  for (int i0 = lane; i0 < n_chunks; i0 += 32 * U) {
    uint4 w[U][R];
    uint16_t sc[U][R], bi[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = min(i0 + 32 * u, n_chunks - 1);
#pragma unroll
      for (int j = 0; j < R; ++j) {
        const int r = r0 + min(j, rows - 1);
        w[u][j] = __ldg(reinterpret_cast<const uint4*>(data + size_t(r) * row_bytes) + i);
        sc[u][j] = F == BF16 ? 0 : __ldg(scales + size_t(r) * groups + i / 2);
        bi[u][j] = F == Q4 ? __ldg(biases + size_t(r) * groups + i / 2) : 0;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = i0 + 32 * u;
      if (i >= n_chunks) break;
      float xv[per_chunk];
#pragma unroll
      for (int k = 0; k < per_chunk / 4; ++k) {
        const float4 v = __ldg(reinterpret_cast<const float4*>(x) + i * (per_chunk / 4) + k);
        xv[4 * k] = v.x, xv[4 * k + 1] = v.y, xv[4 * k + 2] = v.z, xv[4 * k + 3] = v.w;
      }
      float xsum = 0.f;
      if constexpr (F == Q4) {
#pragma unroll
        for (int k = 0; k < per_chunk; ++k) xsum += xv[k];
      }
#pragma unroll
      for (int j = 0; j < R; ++j) acc[j] += chunk_dot<F, Affine>(w[u][j], sc[u][j], bi[u][j], xv, xsum);
    }
  }
#pragma unroll
  for (int j = 0; j < R; ++j) {
    const float v = warp_sum(acc[j]);
    if (lane == 0 && j < rows) y[r0 + j] = v;
  }
}

constexpr int v8_warps = 4;

template <Format F, int R, int U, bool Affine>
__global__ void __launch_bounds__(32 * v8_warps) matvec_v8(Matrix m, const float* __restrict__ x, float* __restrict__ y) {
  const int r0 = (blockIdx.x * v8_warps + threadIdx.x / 32) * R;
  if (r0 >= m.rows) return;
  rows_dot_v8<F, R, U, Affine>(m, r0, x, y);
}

// ---- v10: all experts of a layer in one launch, a flat grid over every job's row tiles -----------------
// v7 launched max_row_tiles × n_jobs blocks (gate/up tiles idle while down's ran) and read its job table
// from device memory, which the engine would have to copy there per launch. v10 passes the table as the
// kernel's parameter (≤ 4 KiB, __grid_constant__: read in place from the parameter bank), numbers every
// job's row tiles consecutively, and each block finds its job by scanning the table's tile prefix.
constexpr int v10_max_jobs = 40;
struct FlatTable {
  Job jobs[v10_max_jobs];
  int tile_start[v10_max_jobs + 1];  // job j owns blocks tile_start[j] .. tile_start[j+1] − 1
  int n_jobs;
};

template <Format F, int R, int U, bool Affine>
__global__ void __launch_bounds__(32 * v8_warps) matvec_v10(const __grid_constant__ FlatTable t) {
  const int b = blockIdx.x;
  int j = 0;
  while (j + 1 < t.n_jobs && b >= t.tile_start[j + 1]) ++j;
  const Job& job = t.jobs[j];
  const int r0 = ((b - t.tile_start[j]) * v8_warps + threadIdx.x / 32) * R;
  if (r0 >= job.m.rows) return;
  rows_dot_v8<F, R, U, Affine>(job.m, r0, job.x, job.y);
}

// ---- v11: v8/v9 with single fused multiply-add chains, and columns split across warps ------------------
// v8/v9's SASS (cuobjdump on the H200) showed `d += a·x0 + b·x1` compiled as FMUL + FFMA + FADD: three
// floating-point instructions per two weights instead of two. v11 writes each row's sum as one chain of
// fmaf. And on small matrices (a single expert: 96 row tiles) each warp walked its row's chunks one
// DRAM round trip after another; v11 lets S warps of a block share a tile of R rows, each taking every
// S-th run of 32 chunks, their sums added in a fixed order through shared memory (S ∈ {1, 2, 4}, a
// property of the job alone, so the result does not depend on what else is in the launch).

template <Format F, bool Affine, int N>
__device__ __forceinline__ float chunk_dot_fma(uint4 p, uint16_t sc, uint16_t bi, const float (&xv)[N], float xsum) {
  const uint32_t w[4] = {p.x, p.y, p.z, p.w};
  float d = 0.f;
  if constexpr (F == BF16) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      d = fmaf(__uint_as_float(w[k] << 16), xv[2 * k], d);
      d = fmaf(__uint_as_float(w[k] & 0xffff0000u), xv[2 * k + 1], d);
    }
    return d;
  } else if constexpr (F == Q8) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t u = w[k] ^ 0x80808080u;  // signed byte b → unsigned b + 128
      constexpr float bias = 8388608.f + 128.f;
#pragma unroll
      for (int b = 0; b < 4; ++b) d = fmaf(byte_as_biased_float(u, b) - bias, xv[4 * k + b], d);
    }
    return __half2float(__ushort_as_half(sc)) * d;
  } else {
    const float s = __uint_as_float(uint32_t(sc) << 16), b = __uint_as_float(uint32_t(bi) << 16);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t lo = w[k] & 0x0F0F0F0Fu, hi = (w[k] >> 4) & 0x0F0F0F0Fu;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if constexpr (Affine) {
          d = fmaf(nibble_as_affine_float(lo, j), xv[8 * k + 2 * j], d);
          d = fmaf(nibble_as_affine_float(hi, j), xv[8 * k + 2 * j + 1], d);
        } else {
          constexpr float bias = 8388608.f;
          d = fmaf(byte_as_biased_float(lo, j) - bias, xv[8 * k + 2 * j], d);
          d = fmaf(byte_as_biased_float(hi, j) - bias, xv[8 * k + 2 * j + 1], d);
        }
      }
    }
    if constexpr (Affine) return fmaf(64.f * s, d, fmaf(-128.f, s, b) * xsum);
    return fmaf(s, d, b * xsum);
  }
}

constexpr int v11_warps = 4;

// Rows r0 .. r0 + R − 1; this warp is split `split` of `n_split` over the columns. partial: shared
// [v11_warps][R]. Every warp of the block must call it (it synchronizes the block when n_split > 1).
template <Format F, int R, int U, bool Affine>
__device__ void rows_dot_v11(const Matrix& m, int r0, int split, int n_split, const float* __restrict__ x, float* __restrict__ y,
                             float (*partial)[R]) {
  constexpr int per_chunk = chunk_cols(F);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const bool active = r0 < m.rows;
  const int n_chunks = m.cols / per_chunk;
  const int rows = active ? min(R, m.rows - r0) : 1;
  const size_t row_bytes = F == BF16 ? size_t(m.cols) * 2 : F == Q8 ? size_t(m.cols) : size_t(m.cols) / 2;
  const int groups = F == Q8 ? m.cols / 32 : m.cols / 64;
  const char* data = static_cast<const char*>(m.data) + (active ? size_t(r0) * row_bytes : 0);
  const uint16_t* scales = static_cast<const uint16_t*>(m.scales) + (active ? size_t(r0) * groups : 0);
  const uint16_t* biases = static_cast<const uint16_t*>(m.biases) + (active ? size_t(r0) * groups : 0);
  float acc[R];
#pragma unroll
  for (int j = 0; j < R; ++j) acc[j] = 0.f;
  const int step = 32 * n_split;
  for (int i0 = active ? split * 32 + lane : n_chunks; i0 < n_chunks; i0 += step * U) {
    uint4 w[U][R];
    uint16_t sc[U][R], bi[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = min(i0 + step * u, n_chunks - 1);
#pragma unroll
      for (int j = 0; j < R; ++j) {
        const int jj = min(j, rows - 1);
        w[u][j] = __ldg(reinterpret_cast<const uint4*>(data + size_t(jj) * row_bytes) + i);
        sc[u][j] = F == BF16 ? 0 : __ldg(scales + jj * groups + i / 2);
        bi[u][j] = F == Q4 ? __ldg(biases + jj * groups + i / 2) : 0;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = i0 + step * u;
      if (i >= n_chunks) break;
      float xv[per_chunk];
#pragma unroll
      for (int k = 0; k < per_chunk / 4; ++k) {
        const float4 v = __ldg(reinterpret_cast<const float4*>(x) + i * (per_chunk / 4) + k);
        xv[4 * k] = v.x, xv[4 * k + 1] = v.y, xv[4 * k + 2] = v.z, xv[4 * k + 3] = v.w;
      }
      float xsum = 0.f;
      if constexpr (F == Q4) {
#pragma unroll
        for (int k = 0; k < per_chunk; ++k) xsum += xv[k];
      }
#pragma unroll
      for (int j = 0; j < R; ++j) acc[j] += chunk_dot_fma<F, Affine>(w[u][j], sc[u][j], bi[u][j], xv, xsum);
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
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < R; ++j) partial[warp][j] = acc[j];
  }
  __syncthreads();
  if (active && split == 0 && lane < rows) {
    float v = 0.f;
    for (int s = 0; s < n_split; ++s) v += partial[warp + s][lane];
    y[r0 + lane] = v;
  }
}

// Splits of the columns for a matrix: enough that each warp's lanes issue all their loads at once where
// the rows are short, at most the block's warps.
template <Format F, int U>
__host__ __device__ int v11_splits(int cols) {
  const int runs = (cols / chunk_cols(F) + 32 * U - 1) / (32 * U);  // runs of 32·U chunks per row
  return runs >= 4 ? 4 : runs >= 2 ? 2 : 1;
}

template <Format F, int R, int U, bool Affine>
__global__ void __launch_bounds__(32 * v11_warps) matvec_v11(Matrix m, int n_split, const float* __restrict__ x, float* __restrict__ y) {
  __shared__ float partial[v11_warps][R];
  const int warp = threadIdx.x >> 5, tiles = v11_warps / n_split;
  const int r0 = (blockIdx.x * tiles + warp / n_split) * R;
  rows_dot_v11<F, R, U, Affine>(m, r0, warp % n_split, n_split, x, y, partial);
}

// v12: v10's flat all-experts grid with v11's rows (each job's column split from its own shape).
struct FlatTable11 {
  Job jobs[v10_max_jobs];
  int tile_start[v10_max_jobs + 1];
  int8_t n_split[v10_max_jobs];
  int n_jobs;
};

template <Format F, int R, int U, bool Affine>
__global__ void __launch_bounds__(32 * v11_warps) matvec_v12(const __grid_constant__ FlatTable11 t) {
  __shared__ float partial[v11_warps][R];
  const int b = blockIdx.x;
  int j = 0;
  while (j + 1 < t.n_jobs && b >= t.tile_start[j + 1]) ++j;
  const Job& job = t.jobs[j];
  const int n_split = t.n_split[j], warp = threadIdx.x >> 5, tiles = v11_warps / n_split;
  const int r0 = ((b - t.tile_start[j]) * tiles + warp / n_split) * R;
  rows_dot_v11<F, R, U, Affine>(job.m, r0, warp % n_split, n_split, job.x, job.y, partial);
}

// ---- v13: x staged in shared memory, weights prefetched one iteration ahead ---------------------------
// v11 took fewer instructions than v9 and ran no faster on q4: not instruction-bound. The x loads were the
// cost. Each lane reads its own chunk's x (q4: 128 contiguous bytes, 8 float4 loads), so one warp-wide
// float4 load of x touches 32 different 128-byte lines: 32 L1 wavefronts where a coalesced load takes 4 —
// 256 wavefronts per iteration against 32 for the R = 8 rows of weights (q8: 64 per 16; bf16 16 per
// 32·R/4). v13 copies x once per block into shared memory with coalesced loads, each chunk's float4s
// padded to an odd count so the 8 lanes of a 128-bit shared-memory phase hit different banks, and
// issues the first iteration's weight loads before that copy (their latency covers it). With Prefetch,
// each iteration also issues the next iteration's weight loads before its arithmetic (two register
// buffers), so a warp always has loads in flight.

template <Format F> __host__ __device__ constexpr int x_pitch() { return chunk_cols(F) / 4 + 1; }  // float4s per padded chunk

template <Format F, int R>
struct RowsLoad {
  uint4 w[R];
  uint16_t sc[R], bi[R];
};

template <Format F, int R>
__device__ __forceinline__ void load_rows(RowsLoad<F, R>& b, const char* data, const uint16_t* scales, const uint16_t* biases,
                                          size_t row_bytes, int groups, int rows, int i) {
#pragma unroll
  for (int j = 0; j < R; ++j) {
    const int jj = min(j, rows - 1);
    b.w[j] = __ldg(reinterpret_cast<const uint4*>(data + size_t(jj) * row_bytes) + i);
    b.sc[j] = F == BF16 ? 0 : __ldg(scales + jj * groups + i / 2);
    b.bi[j] = F == Q4 ? __ldg(biases + jj * groups + i / 2) : 0;
  }
}

template <Format F, int R, bool Affine>
__device__ __forceinline__ void compute_rows(const RowsLoad<F, R>& b, const float4* xs, int i, float (&acc)[R]) {
  constexpr int per_chunk = chunk_cols(F);
  float xv[per_chunk];
#pragma unroll
  for (int k = 0; k < per_chunk / 4; ++k) {
    const float4 v = xs[i * x_pitch<F>() + k];
    xv[4 * k] = v.x, xv[4 * k + 1] = v.y, xv[4 * k + 2] = v.z, xv[4 * k + 3] = v.w;
  }
  float xsum = 0.f;
  if constexpr (F == Q4) {
#pragma unroll
    for (int k = 0; k < per_chunk; ++k) xsum += xv[k];
  }
#pragma unroll
  for (int j = 0; j < R; ++j) acc[j] += chunk_dot_fma<F, Affine>(b.w[j], b.sc[j], b.bi[j], xv, xsum);
}

// Copies x [cols] into shared memory as padded chunks (every thread of the block takes part).
template <Format F>
__device__ __forceinline__ void stage_x(const float* __restrict__ x, int cols, float4* xs) {
  constexpr int per = chunk_cols(F) / 4;
  const int n = cols / 4;
  for (int f = threadIdx.x; f < n; f += blockDim.x) xs[(f / per) * x_pitch<F>() + f % per] = __ldg(reinterpret_cast<const float4*>(x) + f);
}

// Rows r0 .. r0 + R − 1 of one token; x already staged in xs. Warps past the matrix return at once.
template <Format F, int R, bool Prefetch, bool Affine>
__device__ void rows_dot_v13(const Matrix& m, int r0, const float4* xs, float* __restrict__ y, RowsLoad<F, R>& first) {
  const int lane = threadIdx.x & 31;
  const int n_chunks = m.cols / chunk_cols(F);
  const int rows = min(R, m.rows - r0);
  const size_t row_bytes = F == BF16 ? size_t(m.cols) * 2 : F == Q8 ? size_t(m.cols) : size_t(m.cols) / 2;
  const int groups = F == Q8 ? m.cols / 32 : m.cols / 64;
  const char* data = static_cast<const char*>(m.data) + size_t(r0) * row_bytes;
  const uint16_t* scales = static_cast<const uint16_t*>(m.scales) + size_t(r0) * groups;
  const uint16_t* biases = static_cast<const uint16_t*>(m.biases) + size_t(r0) * groups;
  float acc[R];
#pragma unroll
  for (int j = 0; j < R; ++j) acc[j] = 0.f;
  const int iters = (n_chunks + 31) / 32;  // the same for every lane; a lane past the end computes nothing
  if constexpr (Prefetch) {
    RowsLoad<F, R> second;
    for (int it = 0; it < iters; it += 2) {
      if (it + 1 < iters) load_rows<F, R>(second, data, scales, biases, row_bytes, groups, rows, min((it + 1) * 32 + lane, n_chunks - 1));
      if (it * 32 + lane < n_chunks) compute_rows<F, R, Affine>(first, xs, it * 32 + lane, acc);
      if (it + 1 >= iters) break;
      if (it + 2 < iters) load_rows<F, R>(first, data, scales, biases, row_bytes, groups, rows, min((it + 2) * 32 + lane, n_chunks - 1));
      if ((it + 1) * 32 + lane < n_chunks) compute_rows<F, R, Affine>(second, xs, (it + 1) * 32 + lane, acc);
    }
  } else {
    for (int it = 0; it < iters; ++it) {
      if (it > 0) load_rows<F, R>(first, data, scales, biases, row_bytes, groups, rows, min(it * 32 + lane, n_chunks - 1));
      if (it * 32 + lane < n_chunks) compute_rows<F, R, Affine>(first, xs, it * 32 + lane, acc);
    }
  }
#pragma unroll
  for (int j = 0; j < R; ++j) acc[j] = warp_sum(acc[j]);
  if (lane < rows) {
    float v = acc[0];
#pragma unroll
    for (int j = 1; j < R; ++j) v = lane == j ? acc[j] : v;
    y[r0 + lane] = v;
  }
}

// The first iteration's loads (before x is staged, so that their latency covers the copy).
template <Format F, int R>
__device__ __forceinline__ void load_first(const Matrix& m, int r0, RowsLoad<F, R>& first) {
  const int n_chunks = m.cols / chunk_cols(F);
  const size_t row_bytes = F == BF16 ? size_t(m.cols) * 2 : F == Q8 ? size_t(m.cols) : size_t(m.cols) / 2;
  const int groups = F == Q8 ? m.cols / 32 : m.cols / 64;
  load_rows<F, R>(first, static_cast<const char*>(m.data) + size_t(r0) * row_bytes, static_cast<const uint16_t*>(m.scales) + size_t(r0) * groups,
                  static_cast<const uint16_t*>(m.biases) + size_t(r0) * groups, row_bytes, groups, min(R, m.rows - r0),
                  min(int(threadIdx.x & 31), n_chunks - 1));
}

template <Format F, int R, int W, bool Prefetch, bool Affine>
__global__ void __launch_bounds__(32 * W) matvec_v13(Matrix m, const float* __restrict__ x, float* __restrict__ y) {
  extern __shared__ float4 x_staged[];
  const int r0 = (blockIdx.x * W + threadIdx.x / 32) * R;
  RowsLoad<F, R> first;
  if (r0 < m.rows) load_first<F, R>(m, r0, first);
  stage_x<F>(x, m.cols, x_staged);
  __syncthreads();
  if (r0 < m.rows) rows_dot_v13<F, R, Prefetch, Affine>(m, r0, x_staged, y, first);
}

// v14: v10's flat all-experts grid with v13's rows.
template <Format F, int R, int W, bool Prefetch, bool Affine>
__global__ void __launch_bounds__(32 * W) matvec_v14(const __grid_constant__ FlatTable t) {
  extern __shared__ float4 x_staged[];
  const int b = blockIdx.x;
  int j = 0;
  while (j + 1 < t.n_jobs && b >= t.tile_start[j + 1]) ++j;
  const Job& job = t.jobs[j];
  const int r0 = ((b - t.tile_start[j]) * W + threadIdx.x / 32) * R;
  RowsLoad<F, R> first;
  if (r0 < job.m.rows) load_first<F, R>(job.m, r0, first);
  stage_x<F>(job.x, job.m.cols, x_staged);
  __syncthreads();
  if (r0 < job.m.rows) rows_dot_v13<F, R, Prefetch, Affine>(job.m, r0, x_staged, job.y, first);
}

// ---- v15: weights streamed through shared memory by cp.async, P stages deep ---------------------------
// v13 was latency-bound: the bytes a warp has in flight sit in its registers (4 per 16 bytes, plus
// scales), so an SM held ~32 KB of loads where ~4.2 TB/s × ~1.5 µs / 132 SMs ≈ 48 KB are needed. v15
// copies each stage — BR = W·R rows × 32 chunks of weights, the stage's x slice (padded as in v13) and its
// scales and biases — global → shared with cp.async, which holds no registers, and keeps P − 1 stages in
// flight per block while the block computes on the oldest. The block's warps then read weights (one
// row's 32 chunks: 512 contiguous bytes, conflict-free), x and scales from shared memory. Needs 16-byte
// aligned rows and x, and an even number of scale groups per row (4-byte copies of scale pairs).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(unsigned(__cvta_generic_to_shared(smem))), "l"(gmem));
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(unsigned(__cvta_generic_to_shared(smem))), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

constexpr int v15_chunks = 32;  // chunks per row per stage (one per lane)

template <Format F, int BR>
struct StageLayout {
  static constexpr int w_bytes = BR * v15_chunks * 16;
  static constexpr int x_bytes = v15_chunks * x_pitch<F>() * 16;
  static constexpr int groups = v15_chunks / 2;                      // scale groups per row per stage
  static constexpr int s_bytes = F == BF16 ? 0 : BR * groups * 2;   // u16 [BR][groups]
  static constexpr int b_bytes = F == Q4 ? BR * groups * 2 : 0;
  static constexpr int bytes = (w_bytes + x_bytes + s_bytes + b_bytes + 15) / 16 * 16;
};

template <Format F, int R, int W, int P>
__host__ __device__ constexpr int v15_shared_bytes() { return P * StageLayout<F, W * R>::bytes; }

// Rows r_tile .. r_tile + W·R − 1 of one token.
template <Format F, int R, int W, int P, bool Affine>
__device__ void tile_dot_v15(const Matrix& m, int r_tile, const float* __restrict__ x, float* __restrict__ y, char* smem) {
  constexpr int BR = W * R, KS = v15_chunks, per4 = chunk_cols(F) / 4;
  using L = StageLayout<F, BR>;
  const int n_chunks = m.cols / chunk_cols(F), n_stages = (n_chunks + KS - 1) / KS;
  const size_t row_bytes = F == BF16 ? size_t(m.cols) * 2 : F == Q8 ? size_t(m.cols) : size_t(m.cols) / 2;
  const int groups = F == Q8 ? m.cols / 32 : m.cols / 64;
  const char* data = static_cast<const char*>(m.data);
  const uint16_t* scales = static_cast<const uint16_t*>(m.scales);
  const uint16_t* biases = static_cast<const uint16_t*>(m.biases);
  auto issue = [&](int s) {
    char* buf = smem + (s % P) * L::bytes;
    for (int p = threadIdx.x; p < BR * KS; p += 32 * W) {
      const int row = min(r_tile + p / KS, m.rows - 1), chunk = min(s * KS + p % KS, n_chunks - 1);
      cp_async16(buf + p * 16, data + size_t(row) * row_bytes + size_t(chunk) * 16);
    }
    for (int p = threadIdx.x; p < KS * per4; p += 32 * W) {
      const int c = p / per4, chunk = min(s * KS + c, n_chunks - 1);
      cp_async16(buf + L::w_bytes + (c * x_pitch<F>() + p % per4) * 16, x + size_t(chunk) * chunk_cols(F) + 4 * (p % per4));
    }
    if constexpr (F != BF16) {
      for (int p = threadIdx.x; p < BR * L::groups / 2; p += 32 * W) {
        const int row = min(r_tile + p / (L::groups / 2), m.rows - 1), g = min(s * L::groups + 2 * (p % (L::groups / 2)), groups - 2);
        cp_async4(buf + L::w_bytes + L::x_bytes + p * 4, scales + size_t(row) * groups + g);
        if constexpr (F == Q4) cp_async4(buf + L::w_bytes + L::x_bytes + L::s_bytes + p * 4, biases + size_t(row) * groups + g);
      }
    }
  };
#pragma unroll
  for (int s = 0; s < P - 1; ++s) {
    if (s < n_stages) issue(s);
    cp_async_commit();  // empty groups keep the count uniform
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float acc[R];
#pragma unroll
  for (int j = 0; j < R; ++j) acc[j] = 0.f;
  for (int s = 0; s < n_stages; ++s) {
    if (s + P - 1 < n_stages) issue(s + P - 1);
    cp_async_commit();
    cp_async_wait<P - 1>();
    __syncthreads();
    const char* buf = smem + (s % P) * L::bytes;
    if (s * KS + lane < n_chunks) {
      const float4* xs = reinterpret_cast<const float4*>(buf + L::w_bytes);
      float xv[chunk_cols(F)];
#pragma unroll
      for (int k = 0; k < per4; ++k) {
        const float4 v = xs[lane * x_pitch<F>() + k];
        xv[4 * k] = v.x, xv[4 * k + 1] = v.y, xv[4 * k + 2] = v.z, xv[4 * k + 3] = v.w;
      }
      float xsum = 0.f;
      if constexpr (F == Q4) {
#pragma unroll
        for (int k = 0; k < chunk_cols(F); ++k) xsum += xv[k];
      }
      const uint4* ws = reinterpret_cast<const uint4*>(buf);
      const uint16_t* ss = reinterpret_cast<const uint16_t*>(buf + L::w_bytes + L::x_bytes);
      const uint16_t* bs = reinterpret_cast<const uint16_t*>(buf + L::w_bytes + L::x_bytes + L::s_bytes);
#pragma unroll
      for (int j = 0; j < R; ++j) {
        const int row = warp * R + j;
        const uint16_t sc = F == BF16 ? 0 : ss[row * L::groups + lane / 2];
        const uint16_t bi = F == Q4 ? bs[row * L::groups + lane / 2] : 0;
        acc[j] += chunk_dot_fma<F, Affine>(ws[row * KS + lane], sc, bi, xv, xsum);
      }
    }
    __syncthreads();  // the buffer is refilled next iteration
  }
#pragma unroll
  for (int j = 0; j < R; ++j) acc[j] = warp_sum(acc[j]);
  const int r0 = r_tile + warp * R;
  if (lane < R && r0 + lane < m.rows) {
    float v = acc[0];
#pragma unroll
    for (int j = 1; j < R; ++j) v = lane == j ? acc[j] : v;
    y[r0 + lane] = v;
  }
}

template <Format F, int R, int W, int P, bool Affine>
__global__ void __launch_bounds__(32 * W) matvec_v15(Matrix m, const float* __restrict__ x, float* __restrict__ y) {
  extern __shared__ uint4 stages15[];
  tile_dot_v15<F, R, W, P, Affine>(m, blockIdx.x * W * R, x, y, reinterpret_cast<char*>(stages15));
}

// v16: v10's flat all-experts grid with v15's tiles.
template <Format F, int R, int W, int P, bool Affine>
__global__ void __launch_bounds__(32 * W) matvec_v16(const __grid_constant__ FlatTable t) {
  extern __shared__ uint4 stages16[];
  const int b = blockIdx.x;
  int j = 0;
  while (j + 1 < t.n_jobs && b >= t.tile_start[j + 1]) ++j;
  const Job& job = t.jobs[j];
  tile_dot_v15<F, R, W, P, Affine>(job.m, (b - t.tile_start[j]) * W * R, job.x, job.y, reinterpret_cast<char*>(stages16));
}

// ---- v17: q4 on the tensor cores (mma.sync m16n8k16, bf16 in, fp32 out) for T = 1 --------------------
// v13 and v15 left q4 at 50–74%: with its ~4 instructions per weight (a byte_perm and an FFMA per weight,
// masks, shifts, Σx, addresses) the arithmetic took about as long as the memory traffic, and the two
// overlapped only in part. v17 moves the products to the tensor cores. A warp computes 16·MT rows; per
// group of 64 columns each thread loads 8 bytes of rows gid and gid + 8 (gid = lane/4, tid = lane%4: the
// mma fragment owner) and turns each word into four bf16x2 A registers with one shift and one LOP3 each:
// nibbles j and j + 4 sit at bits 4j and 4j + 16, so ((w >> 4j) & 0x000F000F) | 0x43004300 is the pair
// (128 + q_j, 128 + q_j+4) exactly, and one bf16x2 subtraction of 128 leaves q exactly. The k order inside
// an mma is free as long as A and B agree, so k slots (2tid, 2tid+1, 2tid+8, 2tid+9) of k-step (wi, h)
// hold nibbles (2h, 2h+4, 2h+1, 2h+5) of word 2tid + wi. B is x split exactly into three bf16 parts
// (hi + mid + lo = x: 8 + 8 + 8 significant bits), in N columns 0, 1, 2 (3..7 zero), precomputed once per
// block into shared memory in fragment order. Every product q·part is exact in fp32; each group's 4
// mma accumulate in fp32 from zero, then acc += scale·(D0 + D1 + D2) in fp32 and the tid-0 lane adds
// bias·Σx_group. Tolerance: the op test's 2e-5·Σ|w·x| (tensor-core fp32 accumulation over 64 exact terms).

__device__ __forceinline__ uint32_t nibble_pair_bf16(uint32_t w, int j) {
  const uint32_t v = ((w >> (4 * j)) & 0x000F000Fu) | 0x43004300u;  // (128 + q_j, 128 + q_{j+4}) as bf16x2
  uint32_t out;
  // v·1 − 128 (fma: sm_80; a bf16x2 sub needs sm_90).
  asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(out) : "r"(v), "r"(0x3F803F80u), "r"(0xC300C300u));
  return out;
}

__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// x split into three bf16 parts, each part packed as the B fragments of the group's four k-steps:
// uint2 frag[group][wi][h][part][tid]; and Σx per group. Bytes: n_groups · (2·2·3·4·8 + 4).
__host__ __device__ constexpr int v17_frag_bytes_per_group() { return 2 * 2 * 3 * 4 * 8; }

__device__ void stage_x_fragments(const float* __restrict__ x, int n_groups, uint2* frag, float* xsum) {
  for (int e = threadIdx.x; e < n_groups * 16; e += blockDim.x) {
    const int g = e / 16, wi = (e / 8) % 2, h = (e / 4) % 2, tid = e % 4;
    const int c = g * 64 + (2 * tid + wi) * 8 + 2 * h;
    const float v[4] = {__ldg(x + c), __ldg(x + c + 4), __ldg(x + c + 1), __ldg(x + c + 5)};
    float r[4];
    uint32_t p[3][2];
#pragma unroll
    for (int k = 0; k < 4; ++k) r[k] = v[k];
#pragma unroll
    for (int part = 0; part < 3; ++part) {
      float t[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        t[k] = __bfloat162float(__float2bfloat16_rn(r[k]));
        r[k] -= t[k];  // exact: the remainder of a round-to-nearest
      }
      p[part][0] = pack_bf16(t[0], t[1]);
      p[part][1] = pack_bf16(t[2], t[3]);
    }
#pragma unroll
    for (int part = 0; part < 3; ++part) frag[((g * 2 + wi) * 2 + h) * 12 + part * 4 + tid] = make_uint2(p[part][0], p[part][1]);
  }
  for (int g = threadIdx.x; g < n_groups; g += blockDim.x) {
    float s = 0.f;
    for (int c = 0; c < 64; ++c) s += __ldg(x + g * 64 + c);
    xsum[g] = s;
  }
}

// Rows r0 .. r0 + 16·MT − 1 of one token, G groups per iteration; frag/xsum staged by the block.
template <int MT, int G>
struct Q4MmaLoad {
  uint2 w[MT][G][2];          // rows gid, gid + 8 of each m-tile: words 2tid, 2tid+1 of the group
  uint16_t s[MT][G][2], b[MT][G][2];
};

template <int MT, int G>
__device__ __forceinline__ void q4_mma_load(Q4MmaLoad<MT, G>& L, const Matrix& m, int r0, int g0, int n_groups) {
  const int lane = threadIdx.x & 31, gid = lane >> 2, tid = lane & 3;
  const uint2* data = static_cast<const uint2*>(m.data);  // a row is n_groups · 4 uint2
  const uint16_t* scales = static_cast<const uint16_t*>(m.scales);
  const uint16_t* biases = static_cast<const uint16_t*>(m.biases);
#pragma unroll
  for (int t = 0; t < MT; ++t)
#pragma unroll
    for (int u = 0; u < G; ++u) {
      const int g = min(g0 + u, n_groups - 1);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = min(r0 + 16 * t + gid + 8 * half, m.rows - 1);
        L.w[t][u][half] = __ldg(data + (size_t(row) * n_groups + g) * 4 + tid);
        L.s[t][u][half] = __ldg(scales + size_t(row) * n_groups + g);
        L.b[t][u][half] = __ldg(biases + size_t(row) * n_groups + g);
      }
    }
}

template <int MT, int G>
__device__ __forceinline__ void q4_mma_compute(const Q4MmaLoad<MT, G>& L, int g0, int n_groups, const uint2* frag, const float* xsum,
                                               float (&acc)[MT][2]) {
  const int lane = threadIdx.x & 31, gid = lane >> 2, tid = lane & 3;
#pragma unroll
  for (int u = 0; u < G; ++u) {
    const int g = g0 + u;
    if (g >= n_groups) break;
    uint2 bf[2][2];
#pragma unroll
    for (int wi = 0; wi < 2; ++wi)
#pragma unroll
      for (int h = 0; h < 2; ++h) bf[wi][h] = gid < 3 ? frag[((g * 2 + wi) * 2 + h) * 12 + gid * 4 + tid] : make_uint2(0u, 0u);
    const float xs = tid == 0 ? xsum[g] : 0.f;
#pragma unroll
    for (int t = 0; t < MT; ++t) {
      float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int wi = 0; wi < 2; ++wi) {
        const uint32_t w0 = wi == 0 ? L.w[t][u][0].x : L.w[t][u][0].y, w1 = wi == 0 ? L.w[t][u][1].x : L.w[t][u][1].y;
#pragma unroll
        for (int h = 0; h < 2; ++h)
          mma_bf16_16816(d, nibble_pair_bf16(w0, 2 * h), nibble_pair_bf16(w1, 2 * h), nibble_pair_bf16(w0, 2 * h + 1),
                         nibble_pair_bf16(w1, 2 * h + 1), bf[wi][h].x, bf[wi][h].y);
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float s = __uint_as_float(uint32_t(L.s[t][u][half]) << 16), b = __uint_as_float(uint32_t(L.b[t][u][half]) << 16);
        acc[t][half] = fmaf(s, d[2 * half] + d[2 * half + 1], fmaf(b, xs, acc[t][half]));
      }
    }
  }
}

template <int MT, int G>
__device__ void q4_mma_rows(const Matrix& m, int r0, const uint2* frag, const float* xsum, float* __restrict__ y, Q4MmaLoad<MT, G>& first) {
  const int lane = threadIdx.x & 31, gid = lane >> 2, tid = lane & 3;
  const int n_groups = m.cols / 64;
  float acc[MT][2];
#pragma unroll
  for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = 0.f;
  for (int g0 = 0; g0 < n_groups; g0 += G) {
    if (g0 > 0) q4_mma_load<MT, G>(first, m, r0, g0, n_groups);
    q4_mma_compute<MT, G>(first, g0, n_groups, frag, xsum, acc);
  }
#pragma unroll
  for (int t = 0; t < MT; ++t)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float v = acc[t][half];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      const int row = r0 + 16 * t + gid + 8 * half;
      if (tid == 0 && row < m.rows) y[row] = v;
    }
}

template <int MT, int G, int W>
__global__ void __launch_bounds__(32 * W) matvec_v17(Matrix m, const float* __restrict__ x, float* __restrict__ y) {
  extern __shared__ uint2 frag17[];
  const int n_groups = m.cols / 64;
  float* xsum = reinterpret_cast<float*>(frag17 + n_groups * (v17_frag_bytes_per_group() / 8));
  const int r0 = (blockIdx.x * W + threadIdx.x / 32) * 16 * MT;
  Q4MmaLoad<MT, G> first;
  if (r0 < m.rows) q4_mma_load<MT, G>(first, m, r0, 0, n_groups);
  stage_x_fragments(x, n_groups, frag17, xsum);
  __syncthreads();
  if (r0 < m.rows) q4_mma_rows<MT, G>(m, r0, frag17, xsum, y, first);
}

// v18: v10's flat all-experts grid with v17's tiles (q4 only).
template <int MT, int G, int W>
__global__ void __launch_bounds__(32 * W) matvec_v18(const __grid_constant__ FlatTable t) {
  extern __shared__ uint2 frag18[];
  const int b = blockIdx.x;
  int j = 0;
  while (j + 1 < t.n_jobs && b >= t.tile_start[j + 1]) ++j;
  const Job& job = t.jobs[j];
  const int n_groups = job.m.cols / 64;
  float* xsum = reinterpret_cast<float*>(frag18 + n_groups * (v17_frag_bytes_per_group() / 8));
  const int r0 = ((b - t.tile_start[j]) * W + threadIdx.x / 32) * 16 * MT;
  Q4MmaLoad<MT, G> first;
  if (r0 < job.m.rows) q4_mma_load<MT, G>(first, job.m, r0, 0, n_groups);
  stage_x_fragments(job.x, n_groups, frag18, xsum);
  __syncthreads();
  if (r0 < job.m.rows) q4_mma_rows<MT, G>(job.m, r0, frag18, xsum, job.y, first);
}

// ---- v19: v17 with its overheads cut -----------------------------------------------------------------
// v17's SASS (M2G4W4) had 32 HMMA among ~1,300 instructions per iteration: 164 loads with their 64-bit
// address arithmetic (IMAD/IADD3/LEA ×400), two HADD2 per bf16x2 subtraction, and a staging loop whose
// per-group Σx walked 64 serial loads. v19: per-thread row pointers advanced by one offset; scales and
// biases of 4 consecutive groups in one 8-byte load (needs cols % 256 == 0 and 8-byte aligned arrays);
// nibbles placed in bf16 mantissa bits 3..6 of 16.0 (0x4180), giving 16 + q exactly with one shift and
// one LOP3 and no subtraction (the 16·Σx it adds is removed through the bias: s·D + (b − 16·s)·Σx, about
// 2× the rounding of exact q where 128 + q would cost ~17×); staging with float2 loads and Σx reduced
// across the 16 lanes of a group by shuffles.

// Nibbles j and j + 4 of w as the bf16x2 pair (16 + q_j, 16 + q_{j+4}), exact.
__device__ __forceinline__ uint32_t nibble_pair_bf16_16(uint32_t w, int j) {
  const uint32_t v = j == 0 ? w << 3 : w >> (4 * j - 3);
  return (v & 0x00780078u) | 0x41804180u;
}

__device__ void stage_x_fragments_v19(const float* __restrict__ x, int n_groups, uint2* frag, float* xsum) {
  const int n = n_groups * 16, rounds = (n + blockDim.x - 1) / blockDim.x;
  for (int k = 0; k < rounds; ++k) {
    const int e = k * blockDim.x + threadIdx.x;  // e = g·16 + wi·8 + h·4 + tid: a group's entries are 16 lanes
    float v[4] = {0.f, 0.f, 0.f, 0.f};
    if (e < n) {
      const int g = e / 16, wi = (e / 8) % 2, h = (e / 4) % 2, tid = e % 4;
      const int c = g * 64 + (2 * tid + wi) * 8 + 2 * h;
      const float2 a = __ldg(reinterpret_cast<const float2*>(x + c)), b = __ldg(reinterpret_cast<const float2*>(x + c + 4));
      v[0] = a.x, v[1] = b.x, v[2] = a.y, v[3] = b.y;
      float r[4] = {v[0], v[1], v[2], v[3]};
      uint2 p[3];
#pragma unroll
      for (int part = 0; part < 3; ++part) {
        float t[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          t[q] = __bfloat162float(__float2bfloat16_rn(r[q]));
          r[q] -= t[q];
        }
        p[part] = make_uint2(pack_bf16(t[0], t[1]), pack_bf16(t[2], t[3]));
      }
#pragma unroll
      for (int part = 0; part < 3; ++part) frag[((g * 2 + wi) * 2 + h) * 12 + part * 4 + tid] = p[part];
    }
    float s = (v[0] + v[2]) + (v[1] + v[3]);
#pragma unroll
    for (int o = 1; o < 16; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (e < n && e % 16 == 0) xsum[e / 16] = s;
  }
}

template <int MT>
struct Q4MmaRows {
  const uint2* w[MT][2];  // row gid (+8) of m-tile t, at this thread's 8 bytes of group 0
  const uint2* s[MT][2];  // 4 scales (4 biases) of groups 4k .. 4k + 3
  const uint2* b[MT][2];
};

template <int MT>
struct Q4MmaLoad19 {
  uint2 w[MT][4][2];  // [m-tile][group of 4][row half]
  uint2 s[MT][2], b[MT][2];
};

template <int MT>
__device__ __forceinline__ void q4_mma_load19(Q4MmaLoad19<MT>& L, const Q4MmaRows<MT>& P, int g0) {
#pragma unroll
  for (int t = 0; t < MT; ++t)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
#pragma unroll
      for (int u = 0; u < 4; ++u) L.w[t][u][half] = __ldg(P.w[t][half] + (g0 + u) * 4);
      L.s[t][half] = __ldg(P.s[t][half] + g0 / 4);
      L.b[t][half] = __ldg(P.b[t][half] + g0 / 4);
    }
}

__device__ __forceinline__ float bf16_lo(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t v) { return __uint_as_float(v & 0xffff0000u); }

template <int MT>
__device__ __forceinline__ void q4_mma_compute19(const Q4MmaLoad19<MT>& L, int g0, const uint2* frag, const float* xsum, float (&acc)[MT][2]) {
  const int lane = threadIdx.x & 31, gid = lane >> 2, tid = lane & 3;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int g = g0 + u;
    uint2 bf[2][2];
#pragma unroll
    for (int wi = 0; wi < 2; ++wi)
#pragma unroll
      for (int h = 0; h < 2; ++h) bf[wi][h] = gid < 3 ? frag[((g * 2 + wi) * 2 + h) * 12 + gid * 4 + tid] : make_uint2(0u, 0u);
    const float xs = tid == 0 ? xsum[g] : 0.f;
#pragma unroll
    for (int t = 0; t < MT; ++t) {
      float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int wi = 0; wi < 2; ++wi) {
        const uint32_t w0 = wi == 0 ? L.w[t][u][0].x : L.w[t][u][0].y, w1 = wi == 0 ? L.w[t][u][1].x : L.w[t][u][1].y;
#pragma unroll
        for (int h = 0; h < 2; ++h)
          mma_bf16_16816(d, nibble_pair_bf16_16(w0, 2 * h), nibble_pair_bf16_16(w1, 2 * h), nibble_pair_bf16_16(w0, 2 * h + 1),
                         nibble_pair_bf16_16(w1, 2 * h + 1), bf[wi][h].x, bf[wi][h].y);
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const uint32_t sw = u < 2 ? L.s[t][half].x : L.s[t][half].y, bw = u < 2 ? L.b[t][half].x : L.b[t][half].y;
        const float s = (u & 1) ? bf16_hi(sw) : bf16_lo(sw), b = (u & 1) ? bf16_hi(bw) : bf16_lo(bw);
        acc[t][half] = fmaf(s, d[2 * half] + d[2 * half + 1], fmaf(fmaf(-16.f, s, b), xs, acc[t][half]));
      }
    }
  }
}

template <int MT>
__device__ __forceinline__ void q4_mma_pointers19(Q4MmaRows<MT>& P, const Matrix& m, int r0) {
  const int lane = threadIdx.x & 31, gid = lane >> 2, tid = lane & 3;
  const int n_groups = m.cols / 64;
#pragma unroll
  for (int t = 0; t < MT; ++t)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = min(r0 + 16 * t + gid + 8 * half, m.rows - 1);
      P.w[t][half] = static_cast<const uint2*>(m.data) + size_t(row) * n_groups * 4 + tid;
      P.s[t][half] = reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(m.scales) + size_t(row) * n_groups);
      P.b[t][half] = reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(m.biases) + size_t(row) * n_groups);
    }
}

// Rows r0 .. r0 + 16·MT − 1; L holds the loads of groups 0..3, issued before x was staged.
template <int MT>
__device__ void q4_mma_rows19(const Matrix& m, int r0, const Q4MmaRows<MT>& P, Q4MmaLoad19<MT>& L, const uint2* frag, const float* xsum,
                              float* __restrict__ y) {
  const int lane = threadIdx.x & 31, gid = lane >> 2, tid = lane & 3;
  const int n_groups = m.cols / 64;
  float acc[MT][2];
#pragma unroll
  for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = 0.f;
  for (int g0 = 0; g0 < n_groups; g0 += 4) {
    if (g0 > 0) q4_mma_load19<MT>(L, P, g0);
    q4_mma_compute19<MT>(L, g0, frag, xsum, acc);
  }
#pragma unroll
  for (int t = 0; t < MT; ++t)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float v = acc[t][half];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      const int row = r0 + 16 * t + gid + 8 * half;
      if (tid == 0 && row < m.rows) y[row] = v;
    }
}

// The warp's first loads, then the block stages x, then every warp runs its rows.
template <int MT, int W>
__device__ void q4_mma_tile19(const Matrix& m, int r0, const float* __restrict__ x, float* __restrict__ y, uint2* frag) {
  const int n_groups = m.cols / 64;
  float* xsum = reinterpret_cast<float*>(frag + n_groups * (v17_frag_bytes_per_group() / 8));
  Q4MmaRows<MT> P;
  Q4MmaLoad19<MT> L;
  const bool active = r0 < m.rows;
  if (active) {
    q4_mma_pointers19<MT>(P, m, r0);
    q4_mma_load19<MT>(L, P, 0);
  }
  stage_x_fragments_v19(x, n_groups, frag, xsum);
  __syncthreads();
  if (active) q4_mma_rows19<MT>(m, r0, P, L, frag, xsum, y);
}

template <int MT, int W>
__global__ void __launch_bounds__(32 * W) matvec_v19(Matrix m, const float* __restrict__ x, float* __restrict__ y) {
  extern __shared__ uint2 frag19[];
  q4_mma_tile19<MT, W>(m, (blockIdx.x * W + threadIdx.x / 32) * 16 * MT, x, y, frag19);
}

template <int MT, int W>
__global__ void __launch_bounds__(32 * W) matvec_v20(const __grid_constant__ FlatTable t) {
  extern __shared__ uint2 frag20[];
  const int b = blockIdx.x;
  int j = 0;
  while (j + 1 < t.n_jobs && b >= t.tile_start[j + 1]) ++j;
  const Job& job = t.jobs[j];
  q4_mma_tile19<MT, W>(job.m, ((b - t.tile_start[j]) * W + threadIdx.x / 32) * 16 * MT, job.x, job.y, frag20);
}

// ---- v21: v19 with the next group quad prefetched and the columns split across warps -----------------
// v19 reached 75% on the big output head and ~30% on attention shapes. Two causes, both visible in the
// numbers: a warp's loads are in flight only between iterations (issue, wait, compute, issue …), and the
// attention shapes give too few warps (16384 rows / 32 rows per warp = 512 warps, ~4 per SM) to cover
// the latency. v21 loads quad k + 1 (4 groups of every row) into a second register buffer before
// computing quad k, and lets S warps of a block share an m-tile, warp s taking quads s, s + S, … and their
// sums added in a fixed order through shared memory. S ∈ {1, 2, 4} comes from the job's own shape.

template <int MT>
__device__ __forceinline__ void q4_mma_pointers21(Q4MmaRows<MT>& P, const Matrix& m, int r0) { q4_mma_pointers19<MT>(P, m, r0); }

template <int MT>
__device__ void q4_mma_rows21(const Matrix& m, int r0, int split, int n_split, const uint2* frag, const float* xsum, float* __restrict__ y,
                              float* partial) {
  const int lane = threadIdx.x & 31, gid = lane >> 2, tid = lane & 3, warp = threadIdx.x >> 5;
  const int n_quads = m.cols / 256;
  float acc[MT][2];
#pragma unroll
  for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = 0.f;
  const bool active = r0 < m.rows;
  if (active) {
    Q4MmaRows<MT> P;
    q4_mma_pointers19<MT>(P, m, r0);
    Q4MmaLoad19<MT> A, B;
    int q = split;
    if (q < n_quads) q4_mma_load19<MT>(A, P, 4 * q);
    while (q < n_quads) {
      const int q1 = q + n_split;
      if (q1 < n_quads) q4_mma_load19<MT>(B, P, 4 * q1);
      q4_mma_compute19<MT>(A, 4 * q, frag, xsum, acc);
      if (q1 >= n_quads) break;
      const int q2 = q1 + n_split;
      if (q2 < n_quads) q4_mma_load19<MT>(A, P, 4 * q2);
      q4_mma_compute19<MT>(B, 4 * q1, frag, xsum, acc);
      q = q2;
    }
  }
#pragma unroll
  for (int t = 0; t < MT; ++t)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      acc[t][half] += __shfl_xor_sync(0xffffffffu, acc[t][half], 1);
      acc[t][half] += __shfl_xor_sync(0xffffffffu, acc[t][half], 2);
    }
  if (n_split == 1) {
#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = r0 + 16 * t + gid + 8 * half;
        if (active && tid == 0 && row < m.rows) y[row] = acc[t][half];
      }
    return;
  }
  if (tid == 0) {
#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
      for (int half = 0; half < 2; ++half) partial[(warp * MT + t) * 16 + gid + 8 * half] = acc[t][half];
  }
  __syncthreads();
  if (active && split == 0) {
    for (int i = lane; i < 16 * MT; i += 32) {
      float v = 0.f;
      for (int s = 0; s < n_split; ++s) v += partial[((warp + s) * MT) * 16 + i];
      if (r0 + i < m.rows) y[r0 + i] = v;
    }
  }
}

// Column splits for a q4 matrix: enough warps to cover the memory latency (≥ 16 per SM on a 132-SM
// part) where the rows are few, at most 4 and at most the number of quads.
__host__ __device__ inline int v21_splits(int rows, int cols, int MT) {
  const int tiles = (rows + 16 * MT - 1) / (16 * MT), quads = cols / 256;
  int s = 1;
  while (s < 4 && 2 * s <= quads && tiles * s < 132 * 16) s *= 2;
  return s;
}

template <int MT, int W>
__device__ void q4_mma_tile21(const Matrix& m, int block_in_job, int n_split, const float* __restrict__ x, float* __restrict__ y, uint2* frag,
                              float* partial) {
  const int n_groups = m.cols / 64, warp = threadIdx.x >> 5, tiles = W / n_split;
  float* xsum = reinterpret_cast<float*>(frag + n_groups * (v17_frag_bytes_per_group() / 8));
  stage_x_fragments_v19(x, n_groups, frag, xsum);
  __syncthreads();
  const int r0 = (block_in_job * tiles + warp / n_split) * 16 * MT;
  q4_mma_rows21<MT>(m, r0, warp % n_split, n_split, frag, xsum, y, partial);
}

template <int MT, int W>
__global__ void __launch_bounds__(32 * W) matvec_v21(Matrix m, int n_split, const float* __restrict__ x, float* __restrict__ y) {
  extern __shared__ uint2 frag21[];
  __shared__ float partial[W * MT * 16];
  q4_mma_tile21<MT, W>(m, blockIdx.x, n_split, x, y, frag21, partial);
}

template <int MT, int W>
__global__ void __launch_bounds__(32 * W) matvec_v22(const __grid_constant__ FlatTable11 t) {
  extern __shared__ uint2 frag22[];
  __shared__ float partial[W * MT * 16];
  const int b = blockIdx.x;
  int j = 0;
  while (j + 1 < t.n_jobs && b >= t.tile_start[j + 1]) ++j;
  const Job& job = t.jobs[j];
  q4_mma_tile21<MT, W>(job.m, b - t.tile_start[j], t.n_split[j], job.x, job.y, frag22, partial);
}

// ---- v23: v13 with a quarter of the x registers, at twice the occupancy -------------------------------
// ncu on v13 (q4, attention q_proj): 96 registers, so 2 blocks of 8 warps per SM (25% occupancy), 3.7
// warps per scheduler, half the issue slots idle, the warps waiting on their loads; DRAM at 43%. Most
// of the registers were the lane's 32 x values (a q4 chunk), live across the R rows. v23 walks a chunk
// word by word (8 columns for q4, 4 for q8): two (one) float4 of x from shared memory per word, applied
// to the R rows' word, so only 8 x values are live; and __launch_bounds__ asks for MinBlocks blocks per
// SM (≤ 64 registers at 8 warps × 4 blocks), doubling the warps — and the bytes — in flight.

template <Format F, int R, bool Affine>
__device__ __forceinline__ void compute_rows23(const RowsLoad<F, R>& b, const float4* xs, int i, float (&acc)[R]) {
  const float4* xc = xs + i * x_pitch<F>();
  float d[R];
#pragma unroll
  for (int j = 0; j < R; ++j) d[j] = 0.f;
  float xsum = 0.f;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if constexpr (F == Q4) {
      const float4 a = xc[2 * k], c = xc[2 * k + 1];
      const float xv[8] = {a.x, a.y, a.z, a.w, c.x, c.y, c.z, c.w};
      xsum += ((xv[0] + xv[1]) + (xv[2] + xv[3])) + ((xv[4] + xv[5]) + (xv[6] + xv[7]));
#pragma unroll
      for (int j = 0; j < R; ++j) {
        const uint32_t w = k == 0 ? b.w[j].x : k == 1 ? b.w[j].y : k == 2 ? b.w[j].z : b.w[j].w;
        const uint32_t lo = w & 0x0F0F0F0Fu, hi = (w >> 4) & 0x0F0F0F0Fu;
#pragma unroll
        for (int n = 0; n < 4; ++n) {
          if constexpr (Affine) {
            d[j] = fmaf(nibble_as_affine_float(lo, n), xv[2 * n], d[j]);
            d[j] = fmaf(nibble_as_affine_float(hi, n), xv[2 * n + 1], d[j]);
          } else {
            d[j] = fmaf(byte_as_biased_float(lo, n) - 8388608.f, xv[2 * n], d[j]);
            d[j] = fmaf(byte_as_biased_float(hi, n) - 8388608.f, xv[2 * n + 1], d[j]);
          }
        }
      }
    } else if constexpr (F == Q8) {
      const float4 a = xc[k];
      const float xv[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
      for (int j = 0; j < R; ++j) {
        const uint32_t w = k == 0 ? b.w[j].x : k == 1 ? b.w[j].y : k == 2 ? b.w[j].z : b.w[j].w;
        const uint32_t u = w ^ 0x80808080u;
#pragma unroll
        for (int n = 0; n < 4; ++n) d[j] = fmaf(byte_as_biased_float(u, n) - (8388608.f + 128.f), xv[n], d[j]);
      }
    } else {
      const float4 a = xc[k / 2];
      const float x0 = k % 2 ? a.z : a.x, x1 = k % 2 ? a.w : a.y;
#pragma unroll
      for (int j = 0; j < R; ++j) {
        const uint32_t w = k == 0 ? b.w[j].x : k == 1 ? b.w[j].y : k == 2 ? b.w[j].z : b.w[j].w;
        d[j] = fmaf(__uint_as_float(w << 16), x0, d[j]);
        d[j] = fmaf(__uint_as_float(w & 0xffff0000u), x1, d[j]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < R; ++j) {
    if constexpr (F == Q4) {
      const float s = __uint_as_float(uint32_t(b.sc[j]) << 16), bb = __uint_as_float(uint32_t(b.bi[j]) << 16);
      if constexpr (Affine)
        acc[j] += fmaf(64.f * s, d[j], fmaf(-128.f, s, bb) * xsum);
      else
        acc[j] += fmaf(s, d[j], bb * xsum);
    } else if constexpr (F == Q8) {
      acc[j] += __half2float(__ushort_as_half(b.sc[j])) * d[j];
    } else {
      acc[j] += d[j];
    }
  }
}

template <Format F, int R, bool Affine>
__device__ void rows_dot_v23(const Matrix& m, int r0, const float4* xs, float* __restrict__ y, RowsLoad<F, R>& L) {
  const int lane = threadIdx.x & 31;
  const int n_chunks = m.cols / chunk_cols(F);
  const int rows = min(R, m.rows - r0);
  const size_t row_bytes = F == BF16 ? size_t(m.cols) * 2 : F == Q8 ? size_t(m.cols) : size_t(m.cols) / 2;
  const int groups = F == Q8 ? m.cols / 32 : m.cols / 64;
  const char* data = static_cast<const char*>(m.data) + size_t(r0) * row_bytes;
  const uint16_t* scales = static_cast<const uint16_t*>(m.scales) + size_t(r0) * groups;
  const uint16_t* biases = static_cast<const uint16_t*>(m.biases) + size_t(r0) * groups;
  float acc[R];
#pragma unroll
  for (int j = 0; j < R; ++j) acc[j] = 0.f;
  const int iters = (n_chunks + 31) / 32;
  for (int it = 0; it < iters; ++it) {
    if (it > 0) load_rows<F, R>(L, data, scales, biases, row_bytes, groups, rows, min(it * 32 + lane, n_chunks - 1));
    if (it * 32 + lane < n_chunks) compute_rows23<F, R, Affine>(L, xs, it * 32 + lane, acc);
  }
#pragma unroll
  for (int j = 0; j < R; ++j) acc[j] = warp_sum(acc[j]);
  if (lane < rows) {
    float v = acc[0];
#pragma unroll
    for (int j = 1; j < R; ++j) v = lane == j ? acc[j] : v;
    y[r0 + lane] = v;
  }
}

template <Format F, int R, int W, int MinBlocks, bool Affine>
__global__ void __launch_bounds__(32 * W, MinBlocks) matvec_v23(Matrix m, const float* __restrict__ x, float* __restrict__ y) {
  extern __shared__ float4 x_staged23[];
  const int r0 = (blockIdx.x * W + threadIdx.x / 32) * R;
  RowsLoad<F, R> first;
  if (r0 < m.rows) load_first<F, R>(m, r0, first);
  stage_x<F>(x, m.cols, x_staged23);
  __syncthreads();
  if (r0 < m.rows) rows_dot_v23<F, R, Affine>(m, r0, x_staged23, y, first);
}

template <Format F, int R, int W, int MinBlocks, bool Affine>
__global__ void __launch_bounds__(32 * W, MinBlocks) matvec_v24(const __grid_constant__ FlatTable t) {
  extern __shared__ float4 x_staged24[];
  const int b = blockIdx.x;
  int j = 0;
  while (j + 1 < t.n_jobs && b >= t.tile_start[j + 1]) ++j;
  const Job& job = t.jobs[j];
  const int r0 = ((b - t.tile_start[j]) * W + threadIdx.x / 32) * R;
  RowsLoad<F, R> first;
  if (r0 < job.m.rows) load_first<F, R>(job.m, r0, first);
  stage_x<F>(job.x, job.m.cols, x_staged24);
  __syncthreads();
  if (r0 < job.m.rows) rows_dot_v23<F, R, Affine>(job.m, r0, x_staged24, job.y, first);
}

// ---- v25: q4 on the integer tensor cores (mma.sync m16n8k32 u8 × s8 → s32), exact sums ---------------
// v17–v21 decoded nibbles to bf16 and tied the k order to the scale groups (8-byte loads). v25 keeps the
// pack's bytes as they are: a lane loads 16 bytes (32 columns) of rows g and g + 8, w & 0x0F0F0F0F gives
// the even columns as bytes q and w & 0xF0F0F0F0 the odd ones as 16·q, each an A register of an integer
// MMA as is (k order within an MMA is free as long as B follows it). x of each 64-column group becomes
// integers m = rint(x·2^k) (k from the group's largest |x|: |m| < 2^30, so the only rounding is below
// 2^-30 of the group's largest |x|), written as four signed bytes (m + 0x808080) ^ 0x808080; B's eight
// columns are the four bytes of the two groups a 128-column super-chunk holds (lanes t = 0, 1 read
// group A, t = 2, 3 group B; B is zero where a lane's group is not its column's), so the 16-byte loads
// need no regrouping. The four MMAs of a super-chunk sum q·byte exactly in int32; each lane then forms
// its two bytes' sum (16·lo + hi)·256 + (16·lo + hi), converts it once, scales by s·2^(…) and adds
// b·Σx (one lane per group). ~0.8 thread instructions a weight against the staged kernel's ~4.8.
constexpr int v25_cols = 128;  // a super-chunk

__device__ __forceinline__ void mma_u8s8(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Shared memory of v25 for `cols` columns: 32 zero bytes, then per super-chunk 16 × 32 bytes of B
// fragments (lane type t, byte p: 8 words) and 4 float2 (per lane type: the scale factor, Σx or 0).
__host__ __device__ constexpr size_t v25_shared_bytes(int cols) { return 32 + size_t(cols / v25_cols) * (512 + 32); }

// Super-chunk c of x (lane l's float4 v: columns 4l … 4l + 3 of it; group A = lanes 0–15) into B
// fragments at frag (512 bytes a super-chunk) and its scale factors and Σx at fx (4 float2).
__device__ __forceinline__ void v25_stage_one(float4 v, int c, uint32_t* frag, float2* fx) {
  const int lane = threadIdx.x & 31;
  uint32_t mx = max(max(__float_as_uint(v.x) & 0x7fffffffu, __float_as_uint(v.y) & 0x7fffffffu),
                    max(__float_as_uint(v.z) & 0x7fffffffu, __float_as_uint(v.w) & 0x7fffffffu));
  float sum = (v.x + v.y) + (v.z + v.w);
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) {
    mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    sum += __shfl_xor_sync(0xffffffffu, sum, o);
  }
  const int eb = int(mx >> 23);             // the group's largest biased exponent
  const int k = min(156 - eb, 127);          // |x|·2^k < 2^30
  const float up = __int_as_float((127 + k) << 23);
  uint32_t u[4];
  u[0] = uint32_t(__float2int_rn(v.x * up) + 0x808080) ^ 0x808080u;
  u[1] = uint32_t(__float2int_rn(v.y * up) + 0x808080) ^ 0x808080u;
  u[2] = uint32_t(__float2int_rn(v.z * up) + 0x808080) ^ 0x808080u;
  u[3] = uint32_t(__float2int_rn(v.w * up) + 0x808080) ^ 0x808080u;
  uint32_t n[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) n[i] = __shfl_xor_sync(0xffffffffu, u[i], 1);
  // Lane 8t + 2wi holds columns 32t + 8wi + 0..3, its odd neighbour + 4..7: the even lane builds the
  // even columns' words (par 0), the odd lane the odd ones'.
  const bool odd = lane & 1;
  const uint32_t a = odd ? n[1] : u[0], b = odd ? n[3] : u[2], cc = odd ? u[1] : n[0], d = odd ? u[3] : n[2];
  const int t = lane >> 3, wi = (lane >> 1) & 3, i = (wi >> 1) + 2 * int(odd), j = wi & 1;
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const unsigned byte = 3u - unsigned(p), sel = byte | ((byte + 4u) << 4);
    frag[((c * 4 + t) * 4 + p) * 8 + i * 2 + j] = __byte_perm(__byte_perm(a, b, sel), __byte_perm(cc, d, sel), 0x5410);
  }
  if ((lane & 15) == 0) {
    const float hi = eb == 255 ? __int_as_float(0x7fc00000) : __int_as_float((127 + 12 - k) << 23);
    fx[c * 4 + 2 * (lane >> 4)] = make_float2(hi, sum);
    fx[c * 4 + 2 * (lane >> 4) + 1] = make_float2(hi * (1.f / 65536.f), 0.f);
  }
}

// Every super-chunk of x (global, cols floats): warp w takes w, w + W, …, four loads in flight at once.
__device__ __forceinline__ void v25_stage(const float* __restrict__ x, int cols, uint4* zero, uint32_t* frag, float2* fx) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5, n_super = cols / v25_cols;
  if (threadIdx.x < 2) zero[threadIdx.x] = make_uint4(0, 0, 0, 0);
  for (int c0 = warp; c0 < n_super; c0 += 4 * n_warps) {
    float4 v[4];
#pragma unroll
    for (int q = 0; q < 4; ++q)
      if (c0 + q * n_warps < n_super) v[q] = __ldg(reinterpret_cast<const float4*>(x) + (c0 + q * n_warps) * 32 + lane);
#pragma unroll
    for (int q = 0; q < 4; ++q)
      if (c0 + q * n_warps < n_super) v25_stage_one(v[q], c0 + q * n_warps, frag, fx);
  }
}

// One super-chunk of rows g and g + 8 (A, B: the lane's 16 bytes of each) against x's fragments f0, f1
// and its factors f (scale factor, Σx or 0), with the rows' scale and bias words (sel picks the lane's
// group's half): four MMAs, then each lane's two bytes' sums into its partial row sums.
__device__ __forceinline__ void v25_super_chunk(uint4 A, uint4 B, uint4 f0, uint4 f1, float2 f, uint32_t sa, uint32_t sb, uint32_t ba,
                                                uint32_t bb, unsigned sel, float& acc_a, float& acc_b) {
  int lo[4] = {0, 0, 0, 0}, hi[4] = {0, 0, 0, 0};
  mma_u8s8(lo, A.x & 0x0F0F0F0Fu, B.x & 0x0F0F0F0Fu, A.y & 0x0F0F0F0Fu, B.y & 0x0F0F0F0Fu, f0.x, f0.y);
  mma_u8s8(lo, A.z & 0x0F0F0F0Fu, B.z & 0x0F0F0F0Fu, A.w & 0x0F0F0F0Fu, B.w & 0x0F0F0F0Fu, f0.z, f0.w);
  mma_u8s8(hi, A.x & 0xF0F0F0F0u, B.x & 0xF0F0F0F0u, A.y & 0xF0F0F0F0u, B.y & 0xF0F0F0F0u, f1.x, f1.y);
  mma_u8s8(hi, A.z & 0xF0F0F0F0u, B.z & 0xF0F0F0F0u, A.w & 0xF0F0F0F0u, B.w & 0xF0F0F0F0u, f1.z, f1.w);
  const int va = (16 * lo[0] + hi[0]) * 256 + (16 * lo[1] + hi[1]);
  const int vb = (16 * lo[2] + hi[2]) * 256 + (16 * lo[3] + hi[3]);
  const float s_a = __uint_as_float(__byte_perm(sa, 0, sel)), b_a = __uint_as_float(__byte_perm(ba, 0, sel));
  const float s_b = __uint_as_float(__byte_perm(sb, 0, sel)), b_b = __uint_as_float(__byte_perm(bb, 0, sel));
  acc_a = fmaf(float(va) * f.x, s_a, fmaf(b_a, f.y, acc_a));
  acc_b = fmaf(float(vb) * f.x, s_b, fmaf(b_b, f.y, acc_b));
}

// The tile's row sums: the four lanes of a row added, then (n_split > 1) the tile's warps in order.
__device__ __forceinline__ void v25_store(float acc_a, float acc_b, int r0, int rows, bool active, int n_split, float* __restrict__ y,
                                          float* partial) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3, split = warp % n_split;
  acc_a += __shfl_xor_sync(0xffffffffu, acc_a, 1);
  acc_a += __shfl_xor_sync(0xffffffffu, acc_a, 2);
  acc_b += __shfl_xor_sync(0xffffffffu, acc_b, 1);
  acc_b += __shfl_xor_sync(0xffffffffu, acc_b, 2);
  if (n_split == 1) {
    if (active && t == 0) {
      if (r0 + g < rows) y[r0 + g] = acc_a;
      if (r0 + g + 8 < rows) y[r0 + g + 8] = acc_b;
    }
    return;
  }
  if (t == 0) partial[warp * 16 + g] = acc_a, partial[warp * 16 + g + 8] = acc_b;
  __syncthreads();
  if (active && split == 0 && lane < 16) {
    float v = 0.f;
    for (int s = 0; s < n_split; ++s) v += partial[(warp + s) * 16 + lane];
    if (r0 + lane < rows) y[r0 + lane] = v;
  }
}

template <int P>
struct V25Load {
  uint4 wa[P], wb[P];
  uint32_t sa[P], sb[P], ba[P], bb[P];
};

template <int P>
__device__ __forceinline__ void v25_load(V25Load<P>& L, int u, const uint8_t* ra, const uint8_t* rb, const uint32_t* sa, const uint32_t* sb,
                                         const uint32_t* ba, const uint32_t* bb, int c) {
  L.wa[u] = __ldg(reinterpret_cast<const uint4*>(ra) + c * 4);
  L.wb[u] = __ldg(reinterpret_cast<const uint4*>(rb) + c * 4);
  L.sa[u] = __ldg(sa + c);
  L.sb[u] = __ldg(sb + c);
  L.ba[u] = __ldg(ba + c);
  L.bb[u] = __ldg(bb + c);
}

// Ablation (lab only): 0 = the product; 1 = no staging of x (fragments left as shared memory holds them);
// 2 = the loads alone (no staging, no MMA: each lane folds its words into one value).
template <int W, int P, int Ablate = 0>
__device__ void v25_tile(const Matrix& m, int block_in_job, int n_split, const float* __restrict__ x, float* __restrict__ y, uint4* smem,
                         float* partial) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int n_super = m.cols / v25_cols, split = warp % n_split;
  const int r0 = (block_in_job * (W / n_split) + warp / n_split) * 16;
  const bool active = r0 < m.rows;
  const int ra = min(r0 + g, m.rows - 1), rb = min(r0 + g + 8, m.rows - 1);
  const int half_groups = m.cols / 128;  // uint32 words of scales per row
  const uint8_t* wa = static_cast<const uint8_t*>(m.data) + size_t(ra) * (m.cols / 2) + 16 * t;
  const uint8_t* wb = static_cast<const uint8_t*>(m.data) + size_t(rb) * (m.cols / 2) + 16 * t;
  const uint32_t* sa = static_cast<const uint32_t*>(m.scales) + size_t(ra) * half_groups;
  const uint32_t* sb = static_cast<const uint32_t*>(m.scales) + size_t(rb) * half_groups;
  const uint32_t* ba = static_cast<const uint32_t*>(m.biases) + size_t(ra) * half_groups;
  const uint32_t* bb = static_cast<const uint32_t*>(m.biases) + size_t(rb) * half_groups;
  V25Load<P> L;
  if (active) {
#pragma unroll
    for (int u = 0; u < P; ++u) v25_load<P>(L, u, wa, wb, sa, sb, ba, bb, min(split + u * n_split, n_super - 1));
  }
  uint4* zero = smem;
  uint32_t* frag = reinterpret_cast<uint32_t*>(smem + 2);
  float2* fx = reinterpret_cast<float2*>(frag + n_super * 128);
  if (Ablate == 0) v25_stage(x, m.cols, zero, frag, fx);
  __syncthreads();
  float acc_a = 0.f, acc_b = 0.f;
  const bool on = (g >> 2) == (t >> 1);
  const unsigned sel = t < 2 ? 0x1044u : 0x3244u;
  if (active) {
    for (int c0 = split; c0 < n_super; c0 += P * n_split) {
#pragma unroll
      for (int u = 0; u < P; ++u) {
        const int c = c0 + u * n_split;
        if (Ablate == 2) {
          if (c < n_super) {
            const uint4 A = L.wa[u], B = L.wb[u];
            acc_a += __uint_as_float((A.x ^ A.y ^ A.z ^ A.w ^ L.sa[u] ^ L.ba[u]) & 0x3fffffffu);
            acc_b += __uint_as_float((B.x ^ B.y ^ B.z ^ B.w ^ L.sb[u] ^ L.bb[u]) & 0x3fffffffu);
          }
        } else if (c < n_super) {
          const uint4* fr = on ? reinterpret_cast<const uint4*>(frag + ((c * 4 + t) * 4 + (g & 3)) * 8) : zero;
          v25_super_chunk(L.wa[u], L.wb[u], fr[0], fr[1], fx[c * 4 + t], L.sa[u], L.sb[u], L.ba[u], L.bb[u], sel, acc_a, acc_b);
        }
        const int cn = c + P * n_split;
        if (cn < n_super) v25_load<P>(L, u, wa, wb, sa, sb, ba, bb, cn);
      }
    }
  }
  v25_store(acc_a, acc_b, r0, m.rows, active, n_split, y, partial);
}

template <int W, int P, int MinBlocks = 1, int Ablate = 0>
__global__ void __launch_bounds__(32 * W, MinBlocks) matvec_v25(Matrix m, int n_split, const float* __restrict__ x, float* __restrict__ y) {
  extern __shared__ uint4 smem25[];
  __shared__ float partial[W * 16];
  v25_tile<W, P, Ablate>(m, blockIdx.x, n_split, x, y, smem25, partial);
}

template <int W, int P, int MinBlocks = 1>
__global__ void __launch_bounds__(32 * W, MinBlocks) matvec_v26(const __grid_constant__ FlatTable11 t) {
  extern __shared__ uint4 smem26[];
  __shared__ float partial[W * 16];
  const int b = blockIdx.x;
  int j = 0;
  while (j + 1 < t.n_jobs && b >= t.tile_start[j + 1]) ++j;
  const Job& job = t.jobs[j];
  v25_tile<W, P>(job.m, b - t.tile_start[j], t.n_split[j], job.x, job.y, smem26, partial);
}


// ---- v27: v25 with x's fragments made once by a kernel of their own and read from global memory --------
// (with the weights, into the same registers: no shared memory, no barrier). Measures v25's main loop
// without the per-block staging; the launch pays both kernels.
__global__ void v27_prep(const float* __restrict__ x, int cols, uint4* zero, uint32_t* frag, float2* fx) {
  const int c = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (blockIdx.x == 0 && threadIdx.x < 2) zero[threadIdx.x] = make_uint4(0, 0, 0, 0);
  if (c < cols / v25_cols) v25_stage_one(__ldg(reinterpret_cast<const float4*>(x) + c * 32 + (threadIdx.x & 31)), c, frag, fx);
}

template <int P>
struct V27Load {
  uint4 wa[P], wb[P], f0[P], f1[P];
  float2 f[P];
  uint32_t sa[P], sb[P], ba[P], bb[P];
};

template <int W, int P>
__global__ void __launch_bounds__(32 * W) matvec_v27(Matrix m, int n_split, const uint4* __restrict__ frags, float* __restrict__ y) {
  __shared__ float partial[W * 16];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int n_super = m.cols / v25_cols, split = warp % n_split;
  const int r0 = (blockIdx.x * (W / n_split) + warp / n_split) * 16;
  const bool active = r0 < m.rows;
  const int ra = min(r0 + g, m.rows - 1), rb = min(r0 + g + 8, m.rows - 1);
  const int half_groups = m.cols / 128;
  const uint4* wa = reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(m.data) + size_t(ra) * (m.cols / 2) + 16 * t);
  const uint4* wb = reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(m.data) + size_t(rb) * (m.cols / 2) + 16 * t);
  const uint32_t* sa = static_cast<const uint32_t*>(m.scales) + size_t(ra) * half_groups;
  const uint32_t* sb = static_cast<const uint32_t*>(m.scales) + size_t(rb) * half_groups;
  const uint32_t* ba = static_cast<const uint32_t*>(m.biases) + size_t(ra) * half_groups;
  const uint32_t* bb = static_cast<const uint32_t*>(m.biases) + size_t(rb) * half_groups;
  const bool on = (g >> 2) == (t >> 1);
  // frags: 2 zero uint4, then 32 uint4 a super-chunk, then 4 float2 a super-chunk
  const uint4* fr_base = on ? frags + 2 + (t * 4 + (g & 3)) * 2 : frags;
  const int fr_step = on ? 32 : 0;
  const float2* fxs = reinterpret_cast<const float2*>(frags + 2 + size_t(n_super) * 32) + t;
  V27Load<P> L;
  const auto load = [&](int u, int c) {
    L.wa[u] = __ldg(wa + c * 4);
    L.wb[u] = __ldg(wb + c * 4);
    L.sa[u] = __ldg(sa + c);
    L.sb[u] = __ldg(sb + c);
    L.ba[u] = __ldg(ba + c);
    L.bb[u] = __ldg(bb + c);
    L.f0[u] = __ldg(fr_base + c * fr_step);
    L.f1[u] = __ldg(fr_base + c * fr_step + 1);
    L.f[u] = __ldg(fxs + c * 4);
  };
  float acc_a = 0.f, acc_b = 0.f;
  const unsigned sel = t < 2 ? 0x1044u : 0x3244u;
  if (active) {
#pragma unroll
    for (int u = 0; u < P; ++u) load(u, min(split + u * n_split, n_super - 1));
    for (int c0 = split; c0 < n_super; c0 += P * n_split) {
#pragma unroll
      for (int u = 0; u < P; ++u) {
        const int c = c0 + u * n_split;
        if (c < n_super) {
          v25_super_chunk(L.wa[u], L.wb[u], L.f0[u], L.f1[u], L.f[u], L.sa[u], L.sb[u], L.ba[u], L.bb[u], sel, acc_a, acc_b);
        }
        const int cn = c + P * n_split;
        if (cn < n_super) load(u, cn);
      }
    }
  }
  v25_store(acc_a, acc_b, r0, m.rows, active, n_split, y, partial);
}

// Column splits for v25: warps sharing a 16-row tile until there are ~16 warps an SM or each would get
// fewer than 2·P super-chunks.
__host__ __device__ inline int v25_splits(int rows, int cols, int P, int W) {
  const int tiles = (rows + 15) / 16, supers = cols / v25_cols;
  int s = 1;
  while (s < W && supers / (2 * s) >= 2 * P && tiles * s < 132 * 16) s *= 2;
  return s;
}

// ---- v28: q4 tiles of whole rows copied to shared memory by the TMA (cp.async.bulk), x in registers ----
// A block (one an SM, a grid-stride walk over tiles of TR consecutive rows) keeps P tiles in flight: thread
// 0 asks for each tile's data, scales and biases as three bulk copies that complete on the stage's
// mbarrier, so the bytes in flight cost no registers and ~no instructions. A row is S spans of 1024
// columns; warp (span s, row group g) holds x's 32 columns 32·lane … of span s in registers (loaded once)
// and takes rows g, g + RG, … of each tile: a 16-byte shared load a lane per row and span, q4's nibbles as
// 2 + q/64 (v9), one warp sum per (row, span), the spans added in order through shared memory.
constexpr int v28_span = 1024;
__host__ __device__ constexpr int v28_row_bytes(int cols) { return cols / 2 + cols / 16; }  // data, scales, biases

__device__ __forceinline__ float v28_nibble(uint32_t w, int k) { return __uint_as_float(__byte_perm(w, 0x40000000u, 0x7054u | (unsigned(k) << 8))); }

// (sm_90's bulk copies and mbarrier transactions: the other architectures of the build get empty bodies;
// the lab runs v28 on an H100.)
__device__ __forceinline__ void v28_wait(uint32_t bar, uint32_t phase) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n .reg .pred p;\n"
      "V28_WAIT_%=:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra V28_WAIT_%=;\n}\n" ::"r"(bar),
      "r"(phase)
      : "memory");
#endif
}

__device__ __forceinline__ void v28_copy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst), "l"(src), "r"(bytes),
               "r"(bar)
               : "memory");
#endif
}

template <int P>
__global__ void __launch_bounds__(512, 1) matvec_v28(Matrix m, int TR, int S, int RG, const float* __restrict__ x, float* __restrict__ y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) uint8_t smem28[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, s = warp % S, g = warp / S;
  const int cols = m.cols, half = cols / 2, groups = cols / 64;
  const size_t stage_bytes = size_t(TR) * v28_row_bytes(cols);
  float* part = reinterpret_cast<float*>(smem28 + P * stage_bytes);  // [TR][S]
  uint64_t* bars = reinterpret_cast<uint64_t*>(part + TR * S + (TR * S & 1));
  const uint32_t smem_at = uint32_t(__cvta_generic_to_shared(smem28)), bar_at = uint32_t(__cvta_generic_to_shared(bars));
  const int n_tiles = (m.rows + TR - 1) / TR;
  const auto issue = [&](int tile, int stage) {
    const int r0 = tile * TR, n = min(TR, m.rows - r0);
    const uint32_t d = smem_at + uint32_t(stage * stage_bytes), bar = bar_at + 8u * unsigned(stage);
    const uint32_t db = uint32_t(n * half), sb = uint32_t((n * groups * 2 + 15) & ~15);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(db + 2 * sb) : "memory");
    v28_copy(d, static_cast<const uint8_t*>(m.data) + size_t(r0) * half, db, bar);
    v28_copy(d + uint32_t(TR * half), static_cast<const uint8_t*>(m.scales) + size_t(r0) * groups * 2, sb, bar);
    v28_copy(d + uint32_t(TR * half + TR * groups * 2), static_cast<const uint8_t*>(m.biases) + size_t(r0) * groups * 2, sb, bar);
  };
  if (threadIdx.x == 0) {
    for (int p = 0; p < P; ++p) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(bar_at + 8u * unsigned(p)) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    for (int p = 0; p < P; ++p)
      if (int(blockIdx.x) + p * int(gridDim.x) < n_tiles) issue(int(blockIdx.x) + p * int(gridDim.x), p);
  }
  // x: this lane's 32 columns of span s, and their sum (q4's bias term).
  const bool on = warp < S * RG && s * v28_span + 32 * lane < cols;
  float xv[32];
  float xsum = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float4 v = on ? __ldg(reinterpret_cast<const float4*>(x + s * v28_span + 32 * lane) + i) : make_float4(0.f, 0.f, 0.f, 0.f);
    xv[4 * i] = v.x, xv[4 * i + 1] = v.y, xv[4 * i + 2] = v.z, xv[4 * i + 3] = v.w;
    xsum += (v.x + v.y) + (v.z + v.w);
  }
  __syncthreads();  // the barriers' init before anyone waits on them
  int i = 0;
  for (int tile = blockIdx.x; tile < n_tiles; tile += gridDim.x, ++i) {
    const int stage = i % P, r0 = tile * TR, n = min(TR, m.rows - r0);
    v28_wait(bar_at + 8u * unsigned(stage), unsigned(i / P) & 1u);
    const uint8_t* base = smem28 + stage * stage_bytes;
    const uint16_t* sc = reinterpret_cast<const uint16_t*>(base + TR * half);
    const uint16_t* bi = reinterpret_cast<const uint16_t*>(base + TR * half + TR * groups * 2);
    if (warp < S * RG) {
      for (int r = g; r < n; r += RG) {
        float acc = 0.f;
        if (on) {
          const uint4 w = *reinterpret_cast<const uint4*>(base + size_t(r) * half + s * (v28_span / 2) + 16 * lane);
          const uint32_t words[4] = {w.x, w.y, w.z, w.w};
          float f[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const uint32_t lo = words[k] & 0x0F0F0F0Fu, hi = (words[k] >> 4) & 0x0F0F0F0Fu;
            float a = v28_nibble(lo, 0) * xv[8 * k];
            a = fmaf(v28_nibble(hi, 0), xv[8 * k + 1], a);
            a = fmaf(v28_nibble(lo, 1), xv[8 * k + 2], a);
            a = fmaf(v28_nibble(hi, 1), xv[8 * k + 3], a);
            a = fmaf(v28_nibble(lo, 2), xv[8 * k + 4], a);
            a = fmaf(v28_nibble(hi, 2), xv[8 * k + 5], a);
            a = fmaf(v28_nibble(lo, 3), xv[8 * k + 6], a);
            f[k] = fmaf(v28_nibble(hi, 3), xv[8 * k + 7], a);
          }
          const int grp = r * groups + s * (v28_span / 64) + lane / 2;
          const float scale = __uint_as_float(uint32_t(sc[grp]) << 16), bias = __uint_as_float(uint32_t(bi[grp]) << 16);
          acc = fmaf(64.f * scale, (f[0] + f[1]) + (f[2] + f[3]), fmaf(-128.f, scale, bias) * xsum);
        }
        acc = warp_sum(acc);
        if (lane == 0) {
          if (S == 1)
            y[r0 + r] = acc;
          else
            part[r * S + s] = acc;
        }
      }
    }
    __syncthreads();  // the stage is read, and the spans' sums are in part
    if (S > 1 && int(threadIdx.x) < n) {
      float sum = 0.f;
      for (int k = 0; k < S; ++k) sum += part[threadIdx.x * S + k];
      y[r0 + threadIdx.x] = sum;
    }
    if (threadIdx.x == 0 && tile + P * int(gridDim.x) < n_tiles) {
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // the generic reads before the copy's writes
      issue(tile + P * int(gridDim.x), stage);
    }
    if (S > 1) __syncthreads();  // part is read before the next tile writes it
  }
#endif
}

// ---- host side ----------------------------------------------------------------------------------------

struct HostMatrix {
  Format format;
  int rows, cols;
  std::vector<uint8_t> data, scales, biases;
  size_t bytes() const { return data.size() + scales.size() + biases.size(); }
};

float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Random bytes fast enough for gigabytes (the output heads): splitmix64.
void fill_random(std::vector<uint8_t>& v, uint64_t& state) {
  size_t i = 0;
  for (; i + 8 <= v.size(); i += 8) {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    std::memcpy(v.data() + i, &z, 8);
  }
  for (; i < v.size(); ++i) v[i] = uint8_t(state++ * 0x9e3779b97f4a7c15ull >> 56);
}

HostMatrix random_matrix(Format f, int rows, int cols, std::mt19937& rng) {
  HostMatrix h{f, rows, cols, {}, {}, {}};
  uint64_t state = rng();
  std::normal_distribution<float> normal(0.f, 1.f / std::sqrt(float(cols)));
  if (f == BF16) {
    // Random sign and mantissa, exponent fixed (|w| in [2^-7, 2^-6)): no zeros, no NaNs.
    h.data.resize(size_t(rows) * cols * 2);
    fill_random(h.data, state);
    for (size_t i = 1; i < h.data.size(); i += 2) h.data[i] = uint8_t((h.data[i] & 0x80) | 0x3C);
  } else if (f == Q8) {
    h.data.resize(size_t(rows) * cols);
    fill_random(h.data, state);
    h.scales.resize(size_t(rows) * (cols / 32) * 2);
    for (size_t i = 0; i < h.scales.size() / 2; ++i) {
      const __half v = __float2half(std::fabs(normal(rng)) / 64.f + 1e-4f);
      std::memcpy(h.scales.data() + 2 * i, &v, 2);
    }
  } else {
    h.data.resize(size_t(rows) * cols / 2);
    fill_random(h.data, state);
    h.scales.resize(size_t(rows) * (cols / 64) * 2);
    h.biases.resize(h.scales.size());
    for (size_t i = 0; i < h.scales.size() / 2; ++i) {
      const float s = std::fabs(normal(rng)) / 8.f + 1e-4f;
      const uint16_t sb = float_to_bf16(s), bb = float_to_bf16(-7.5f * s + normal(rng) / 8.f);  // MLX-like: bias ≈ −7.5·scale
      std::memcpy(h.scales.data() + 2 * i, &sb, 2);
      std::memcpy(h.biases.data() + 2 * i, &bb, 2);
    }
  }
  return h;
}

// Row r of W times x in double, and Σ|w·x| (the op test's error scale).
void host_row_dot(const HostMatrix& h, int r, const float* x, double* dot, double* abs_sum) {
  double acc = 0, abs_acc = 0;
  for (int c = 0; c < h.cols; ++c) {
    double w;
    if (h.format == BF16) {
      uint16_t v;
      std::memcpy(&v, h.data.data() + (size_t(r) * h.cols + c) * 2, 2);
      w = bf16_to_float(v);
    } else if (h.format == Q8) {
      __half s;
      std::memcpy(&s, h.scales.data() + (size_t(r) * (h.cols / 32) + c / 32) * 2, 2);
      w = double(int8_t(h.data[size_t(r) * h.cols + c])) * double(__half2float(s));
    } else {
      const uint8_t byte = h.data[(size_t(r) * h.cols + c) / 2];
      const int q = (c & 1) ? byte >> 4 : byte & 15;
      uint16_t s, b;
      std::memcpy(&s, h.scales.data() + (size_t(r) * (h.cols / 64) + c / 64) * 2, 2);
      std::memcpy(&b, h.biases.data() + (size_t(r) * (h.cols / 64) + c / 64) * 2, 2);
      w = double(float(q) * bf16_to_float(s) + bf16_to_float(b));  // as the reference: fp32 multiply, then add
    }
    acc += w * x[c];
    abs_acc += std::fabs(w * x[c]);
  }
  *dot = acc;
  *abs_sum = abs_acc;
}

// n_copies copies of one host matrix in one device allocation: launches rotate over them so that each
// reads its weights from device memory, not from the L2 cache left warm by the previous launch
// (the H200's L2 is 60 MB; a decode step never finds its weights there).
struct DeviceCopies {
  std::vector<Matrix> copies;
  void* arena = nullptr;
  DeviceCopies(const HostMatrix& h, int n_copies) {
    const size_t d = (h.data.size() + 255) & ~size_t(255), s = (h.scales.size() + 255) & ~size_t(255), stride = d + 2 * s;
    CHECK(cudaMalloc(&arena, stride * n_copies));
    for (int i = 0; i < n_copies; ++i) {
      char* base = static_cast<char*>(arena) + stride * i;
      CHECK(cudaMemcpy(base, h.data.data(), h.data.size(), cudaMemcpyHostToDevice));
      if (!h.scales.empty()) CHECK(cudaMemcpy(base + d, h.scales.data(), h.scales.size(), cudaMemcpyHostToDevice));
      if (!h.biases.empty()) CHECK(cudaMemcpy(base + d + s, h.biases.data(), h.biases.size(), cudaMemcpyHostToDevice));
      Matrix m;
      m.format = h.format, m.rows = h.rows, m.cols = h.cols;
      m.data = base;
      m.scales = h.scales.empty() ? nullptr : base + d;
      m.biases = h.biases.empty() ? nullptr : base + d + s;
      copies.push_back(m);
    }
  }
  ~DeviceCopies() { cudaFree(arena); }
};

int copies_for(size_t bytes) { return int(std::min<size_t>(256, std::max<size_t>(1, (size_t(320) << 20) / bytes + 1))); }

// Times launch(k) for k = 0, 1, 2, … (the caller rotates its data by k). Two figures, in ms per launch:
// `single`, the median of launches timed one at a time (each pays the launch latency), and `stream`,
// `reps` launches back to back in the stream over one pair of events (as a decode step runs them).
struct Timing { float single, stream; };
template <typename Launch>
Timing time_launches(Launch&& launch, int reps = 40) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  for (int k = 0; k < 3; ++k) launch(k);  // warm-up
  CHECK(cudaDeviceSynchronize());
  std::vector<float> t;
  for (int i = 0; i < reps; ++i) {
    CHECK(cudaEventRecord(a));
    launch(i);
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  CHECK(cudaEventRecord(a));
  for (int i = 0; i < reps; ++i) launch(reps + i);
  CHECK(cudaEventRecord(b));
  CHECK(cudaEventSynchronize(b));
  float total;
  CHECK(cudaEventElapsedTime(&total, a, b));
  CHECK(cudaGetLastError());
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  return {t[t.size() / 2], total / float(reps)};
}

__global__ void read_sum(const uint4* __restrict__ p, size_t n, float* out) {
  float acc = 0.f;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const uint4 v = __ldg(p + i);
    acc += __uint_as_float(v.x) + __uint_as_float(v.y) + __uint_as_float(v.z) + __uint_as_float(v.w);
  }
  acc = warp_sum(acc);
  if ((threadIdx.x & 31) == 0 && acc == 12345.f) *out = acc;  // keeps the loads alive
}

// Dynamic shared memory beyond the default 48 KiB must be opted into per kernel.
template <typename Kernel>
void allow_shared(Kernel k, int bytes) {
  if (bytes > 48 * 1024) CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

// A flat table of jobs, job j owning blocks_of(its matrix) consecutive blocks; *max_cols (if given) gets
// the widest job's columns.
template <typename Blocks>
FlatTable flat_table(const std::vector<Job>& jobs, Blocks blocks_of, int* max_cols = nullptr) {
  FlatTable t;
  t.n_jobs = int(jobs.size());
  t.tile_start[0] = 0;
  if (max_cols) *max_cols = 0;
  for (int j = 0; j < t.n_jobs; ++j) {
    t.jobs[j] = jobs[size_t(j)];
    t.tile_start[j + 1] = t.tile_start[j] + int(blocks_of(jobs[size_t(j)].m));
    if (max_cols) *max_cols = std::max(*max_cols, jobs[size_t(j)].m.cols);
  }
  return t;
}

// A flat table of jobs whose blocks are W / n_split warps of rows_per_warp rows, n_split per job from
// splits(matrix); *max_cols gets the widest job's columns.
template <typename Splits>
FlatTable11 split_table(const std::vector<Job>& jobs, Splits splits, int W, int rows_per_warp, int* max_cols) {
  FlatTable11 t;
  t.n_jobs = int(jobs.size());
  t.tile_start[0] = 0;
  *max_cols = 0;
  for (int j = 0; j < t.n_jobs; ++j) {
    const Matrix& m = jobs[size_t(j)].m;
    t.jobs[j] = jobs[size_t(j)];
    t.n_split[j] = int8_t(splits(m));
    const int rows_per_block = W / t.n_split[j] * rows_per_warp;
    t.tile_start[j + 1] = t.tile_start[j] + (m.rows + rows_per_block - 1) / rows_per_block;
    *max_cols = std::max(*max_cols, m.cols);
  }
  return t;
}

// A kernel version for one format: its name and how to launch it on one matrix.
using LaunchFn = void (*)(const Matrix&, const float*, float*);
struct Variant { std::string name; LaunchFn launch; };

template <Format F, int Version>
void launch_old(const Matrix& m, const float* x, float* y) {
  const int blocks = (m.rows + v2_rows_per_block - 1) / v2_rows_per_block, shared = m.cols * 4;
  if constexpr (Version == 1) {
    matvec_v1<F><<<(m.rows + 7) / 8, 256>>>(m, x, y);
  } else if constexpr (Version == 2 || Version == 4) {
    allow_shared(matvec_v2<F, Version == 4>, shared);
    matvec_v2<F, Version == 4><<<blocks, 32 * v2_rows_per_block, shared>>>(m, x, y);
  } else {
    const int rows_per_block = v6_warps * v6_rows<F>();
    matvec_v6<F><<<(m.rows + rows_per_block - 1) / rows_per_block, 32 * v6_warps>>>(m, x, y);
  }
}

template <Format F, int R, int U, bool Affine>
void launch_v8(const Matrix& m, const float* x, float* y) {
  constexpr int rows_per_block = v8_warps * R;
  matvec_v8<F, R, U, Affine><<<(m.rows + rows_per_block - 1) / rows_per_block, 32 * v8_warps>>>(m, x, y);
}

template <Format F, int R, int U, bool Affine>
void launch_v11(const Matrix& m, const float* x, float* y) {
  const int n_split = v11_splits<F, U>(m.cols), rows_per_block = v11_warps / n_split * R;
  matvec_v11<F, R, U, Affine><<<(m.rows + rows_per_block - 1) / rows_per_block, 32 * v11_warps>>>(m, n_split, x, y);
}

template <Format F>
size_t x_shared_bytes(int cols) { return size_t(cols / chunk_cols(F)) * x_pitch<F>() * 16; }

template <Format F, int R, int W, bool Prefetch, bool Affine>
void launch_v13(const Matrix& m, const float* x, float* y) {
  const size_t shared = x_shared_bytes<F>(m.cols);
  allow_shared(matvec_v13<F, R, W, Prefetch, Affine>, int(shared));
  matvec_v13<F, R, W, Prefetch, Affine><<<(m.rows + W * R - 1) / (W * R), 32 * W, shared>>>(m, x, y);
}

template <Format F, int R, int W, int P, bool Affine>
void launch_v15(const Matrix& m, const float* x, float* y) {
  constexpr int shared = v15_shared_bytes<F, R, W, P>();
  allow_shared(matvec_v15<F, R, W, P, Affine>, shared);
  matvec_v15<F, R, W, P, Affine><<<(m.rows + W * R - 1) / (W * R), 32 * W, shared>>>(m, x, y);
}

size_t v17_shared_bytes(int cols) { return size_t(cols / 64) * (v17_frag_bytes_per_group() + 4); }

template <int MT, int G, int W>
void launch_v17(const Matrix& m, const float* x, float* y) {
  const size_t shared = v17_shared_bytes(m.cols);
  allow_shared(matvec_v17<MT, G, W>, int(shared));
  matvec_v17<MT, G, W><<<(m.rows + W * 16 * MT - 1) / (W * 16 * MT), 32 * W, shared>>>(m, x, y);
}

template <int MT, int W>
void launch_v19(const Matrix& m, const float* x, float* y) {
  const size_t shared = v17_shared_bytes(m.cols);
  allow_shared(matvec_v19<MT, W>, int(shared));
  matvec_v19<MT, W><<<(m.rows + W * 16 * MT - 1) / (W * 16 * MT), 32 * W, shared>>>(m, x, y);
}

template <int MT, int W>
void launch_v21(const Matrix& m, const float* x, float* y) {
  const size_t shared = v17_shared_bytes(m.cols);
  allow_shared(matvec_v21<MT, W>, int(shared));
  const int n_split = v21_splits(m.rows, m.cols, MT), rows_per_block = W / n_split * 16 * MT;
  matvec_v21<MT, W><<<(m.rows + rows_per_block - 1) / rows_per_block, 32 * W, shared>>>(m, n_split, x, y);
}

template <Format F, int R, int W, int MinBlocks, bool Affine>
void launch_v23(const Matrix& m, const float* x, float* y) {
  const size_t shared = x_shared_bytes<F>(m.cols);
  allow_shared(matvec_v23<F, R, W, MinBlocks, Affine>, int(shared));
  matvec_v23<F, R, W, MinBlocks, Affine><<<(m.rows + W * R - 1) / (W * R), 32 * W, shared>>>(m, x, y);
}


template <int W, int P>
void launch_v25(const Matrix& m, const float* x, float* y) {
  const size_t shared = v25_shared_bytes(m.cols);
  allow_shared(matvec_v25<W, P>, int(shared));
  const int n_split = v25_splits(m.rows, m.cols, P, W), rows_per_block = W / n_split * 16;
  matvec_v25<W, P><<<(m.rows + rows_per_block - 1) / rows_per_block, 32 * W, shared>>>(m, n_split, x, y);
}

// v25 with MinBlocks in the launch bounds and the most warps a tile whose blocks are all resident at once
// (one wave), at most W and leaving each warp at least P super-chunks.
template <int W, int P, int MinBlocks, int Ablate = 0>
void launch_v25r(const Matrix& m, const float* x, float* y) {
  const size_t shared = v25_shared_bytes(m.cols);
  allow_shared(matvec_v25<W, P, MinBlocks, Ablate>, int(shared));
  int per_sm = 0;
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, matvec_v25<W, P, MinBlocks, Ablate>, 32 * W, shared));
  const int tiles = (m.rows + 15) / 16, supers = m.cols / v25_cols, resident = per_sm * 132;
  int n_split = 1;
  while (2 * n_split <= W && supers / (2 * n_split) >= P && (tiles + W / (2 * n_split) - 1) / (W / (2 * n_split)) <= resident) n_split *= 2;
  const int rows_per_block = W / n_split * 16;
  matvec_v25<W, P, MinBlocks, Ablate><<<(m.rows + rows_per_block - 1) / rows_per_block, 32 * W, shared>>>(m, n_split, x, y);
}

template <int W, int P>
void launch_v26(const std::vector<Job>& jobs, const Job*) {
  int max_cols;
  const FlatTable11 t = split_table(jobs, [](const Matrix& m) { return v25_splits(m.rows, m.cols, P, W); }, W, 16, &max_cols);
  const size_t shared = v25_shared_bytes(max_cols);
  allow_shared(matvec_v26<W, P>, int(shared));
  matvec_v26<W, P><<<unsigned(t.tile_start[t.n_jobs]), 32 * W, shared>>>(t);
}

// v27's fragment buffer (2 MB: up to 2^19 columns), made once.
uint4* v27_frags() {
  static uint4* p = nullptr;
  if (!p) CHECK(cudaMalloc(&p, size_t(2) << 20));
  return p;
}

template <int W, int P>
void launch_v27(const Matrix& m, const float* x, float* y) {
  uint4* f = v27_frags();
  const int n_super = m.cols / v25_cols;
  v27_prep<<<(n_super + 7) / 8, 256>>>(x, m.cols, f, reinterpret_cast<uint32_t*>(f + 2), reinterpret_cast<float2*>(f + 2 + size_t(n_super) * 32));
  const int n_split = v25_splits(m.rows, m.cols, P, W), rows_per_block = W / n_split * 16;
  matvec_v27<W, P><<<(m.rows + rows_per_block - 1) / rows_per_block, 32 * W>>>(m, n_split, f, y);
}

// v28's shape: spans S of 1024 columns (cols a multiple of 1024, at most 16 spans), row groups RG (S · RG ≤ 16
// warps), tiles of TR rows (~36 KB, a multiple of RG), P stages; one block an SM.
template <int P>
void launch_v28(const Matrix& m, const float* x, float* y) {
  const int S = m.cols / v28_span, RG = std::max(1, 16 / S);
  int TR = 4;
  while (TR * 2 * v28_row_bytes(m.cols) <= 36 * 1024 && TR < 64) TR *= 2;
  TR = std::max(TR, RG);
  const size_t shared = size_t(P) * TR * v28_row_bytes(m.cols) + size_t(TR * S + 2) * 4 + 8 * P + 8;
  allow_shared(matvec_v28<P>, int(shared));
  const int n_tiles = (m.rows + TR - 1) / TR;
  matvec_v28<P><<<std::min(n_tiles, 132), 32 * S * RG, shared>>>(m, TR, S, RG, x, y);
}

// Every job's bytes read in one launch (no product): the all-experts launch's ceiling at its size. A flat
// grid: job j owns blocks tile_start[j] …, each reading one 32 KiB piece of the job's span (its data,
// scales and biases as DeviceCopies lays them out, from data on).
constexpr int read_piece = 32 * 1024;
__global__ void read_table(const __grid_constant__ FlatTable t, float* out) {
  int j = 0;
  while (j + 1 < t.n_jobs && int(blockIdx.x) >= t.tile_start[j + 1]) ++j;
  const uint4* p = static_cast<const uint4*>(t.jobs[j].m.data);
  const size_t n = t.jobs[j].m.bytes() / 16, first = size_t(blockIdx.x - t.tile_start[j]) * (read_piece / 16);
  float acc = 0.f;
#pragma unroll 4
  for (size_t i = first + threadIdx.x; i < min(n, first + read_piece / 16); i += blockDim.x) {
    const uint4 v = __ldg(p + i);
    acc += __uint_as_float(v.x) + __uint_as_float(v.y) + __uint_as_float(v.z) + __uint_as_float(v.w);
  }
  acc = warp_sum(acc);
  if ((threadIdx.x & 31) == 0 && acc == 12345.f) *out = acc;
}

// The bytes of the matrix read by read_sum (no product): the memory-bound ceiling at this size.
void launch_read(const Matrix& m, const float*, float* y) {
  read_sum<<<132 * 4, 512>>>(static_cast<const uint4*>(m.data), m.bytes() / 16, y);
}

// The versions timed per format (R rows per warp, U chunks in flight per lane). --old adds v1, v2, v4.
std::vector<Variant> variants(Format f, bool old) {
  std::vector<Variant> v;
  switch (f) {
    case BF16:
      if (old) v = {{"v1", launch_old<BF16, 1>}, {"v2", launch_old<BF16, 2>}, {"v4", launch_old<BF16, 4>}};
      v.push_back({"v6", launch_old<BF16, 6>});
      v.push_back({"v8 R2U1", launch_v8<BF16, 2, 1, false>});
      v.push_back({"v8 R4U1", launch_v8<BF16, 4, 1, false>});
      v.push_back({"v11 R2U1", launch_v11<BF16, 2, 1, false>});
      v.push_back({"v13 R4W4", launch_v13<BF16, 4, 4, false, false>});
      v.push_back({"v15 R4W8P4", launch_v15<BF16, 4, 8, 4, false>});
      v.push_back({"v23 R4W8B4", launch_v23<BF16, 4, 8, 4, false>});
      v.push_back({"v23 R2W8B6", launch_v23<BF16, 2, 8, 6, false>});
      break;
    case Q8:
      if (old) v = {{"v1", launch_old<Q8, 1>}, {"v2", launch_old<Q8, 2>}, {"v4", launch_old<Q8, 4>}};
      v.push_back({"v6", launch_old<Q8, 6>});
      v.push_back({"v8 R2U2", launch_v8<Q8, 2, 2, false>});
      v.push_back({"v8 R4U1", launch_v8<Q8, 4, 1, false>});
      v.push_back({"v11 R2U2", launch_v11<Q8, 2, 2, false>});
      v.push_back({"v11 R4U2", launch_v11<Q8, 4, 2, false>});
      v.push_back({"v13 R4W4", launch_v13<Q8, 4, 4, false, false>});
      v.push_back({"v13 R4W8", launch_v13<Q8, 4, 8, false, false>});
      v.push_back({"v15 R4W8P4", launch_v15<Q8, 4, 8, 4, false>});
      v.push_back({"v23 R4W8B4", launch_v23<Q8, 4, 8, 4, false>});
      v.push_back({"v23 R4W4B8", launch_v23<Q8, 4, 4, 8, false>});
      v.push_back({"v23 R8W8B3", launch_v23<Q8, 8, 8, 3, false>});
      v.push_back({"v23 R2W8B6", launch_v23<Q8, 2, 8, 6, false>});
      break;
    case Q4:
      if (old) v = {{"v1", launch_old<Q4, 1>}, {"v2", launch_old<Q4, 2>}, {"v4", launch_old<Q4, 4>}};
      v.push_back({"v6", launch_old<Q4, 6>});
      v.push_back({"v8 R8U1", launch_v8<Q4, 8, 1, false>});
      v.push_back({"v9 R8U2", launch_v8<Q4, 8, 2, true>});
      v.push_back({"v11 R8U2", launch_v11<Q4, 8, 2, true>});
      v.push_back({"v13 R4W4", launch_v13<Q4, 4, 4, false, true>});
      v.push_back({"v13 R4W8", launch_v13<Q4, 4, 8, false, true>});
      v.push_back({"v15 R4W8P4", launch_v15<Q4, 4, 8, 4, true>});
      v.push_back({"v15x R4W8P4", launch_v15<Q4, 4, 8, 4, false>});
      v.push_back({"v19 M2W4", launch_v19<2, 4>});
      v.push_back({"v21 M1W8", launch_v21<1, 8>});
      v.push_back({"v23 R4W8B4", launch_v23<Q4, 4, 8, 4, true>});
      v.push_back({"v23x R4W8B4", launch_v23<Q4, 4, 8, 4, false>});
      v.push_back({"v23 R4W4B8", launch_v23<Q4, 4, 4, 8, true>});
      v.push_back({"v23 R8W8B3", launch_v23<Q4, 8, 8, 3, true>});
      v.push_back({"v23 R2W8B6", launch_v23<Q4, 2, 8, 6, true>});
      v.push_back({"read", launch_read});
      v.push_back({"v28 P3", launch_v28<3>});
      v.push_back({"v28 P4", launch_v28<4>});
      v.push_back({"v28 P6", launch_v28<6>});
      v.push_back({"v25 W8P2", launch_v25<8, 2>});
      v.push_back({"v25r W8P2B4", launch_v25r<8, 2, 4>});
      v.push_back({"v25r W8P3B4", launch_v25r<8, 3, 4>});
      v.push_back({"v25r W8P2B3", launch_v25r<8, 2, 3>});
      v.push_back({"v25r W16P2B2", launch_v25r<16, 2, 2>});
      v.push_back({"v25r W4P2B8", launch_v25r<4, 2, 8>});
      v.push_back({"read v25r W8P2B3 nostage", launch_v25r<8, 2, 3, 1>});
      v.push_back({"read v25r W8P2B3 loads", launch_v25r<8, 2, 3, 2>});
      v.push_back({"read v25r W8P4B3 loads", launch_v25r<8, 4, 3, 2>});
      v.push_back({"read v25r W8P8B2 loads", launch_v25r<8, 8, 2, 2>});
      break;
  }
  return v;
}

// The all-experts launch: v7 (device job table, grid = max row tiles × jobs) and v10 (flat grid,
// table as the kernel parameter) with v8/v9's dot products.
using TableLaunchFn = void (*)(const std::vector<Job>&, const Job*);
struct TableVariant { std::string name; TableLaunchFn launch; };

template <Format F>
void launch_v7(const std::vector<Job>& jobs, const Job* djobs) {
  constexpr int R = v6_rows<F>();
  int max_rows = 0;
  for (const Job& j : jobs) max_rows = std::max(max_rows, j.m.rows);
  const dim3 grid((max_rows + v6_warps * R - 1) / (v6_warps * R), unsigned(jobs.size()));
  matvec_v7<F><<<grid, 32 * v6_warps>>>(djobs);
}

template <Format F, int R, int U, bool Affine>
void launch_v10(const std::vector<Job>& jobs, const Job*) {
  const FlatTable t = flat_table(jobs, [](const Matrix& m) { return (m.rows + v8_warps * R - 1) / (v8_warps * R); });
  matvec_v10<F, R, U, Affine><<<unsigned(t.tile_start[t.n_jobs]), 32 * v8_warps>>>(t);
}

template <Format F, int R, int U, bool Affine>
void launch_v12(const std::vector<Job>& jobs, const Job*) {
  int max_cols;
  const FlatTable11 t = split_table(jobs, [](const Matrix& m) { return v11_splits<F, U>(m.cols); }, v11_warps, R, &max_cols);
  matvec_v12<F, R, U, Affine><<<unsigned(t.tile_start[t.n_jobs]), 32 * v11_warps>>>(t);
}

template <Format F, int R, int W, bool Prefetch, bool Affine>
void launch_v14(const std::vector<Job>& jobs, const Job*) {
  int max_cols;
  const FlatTable t = flat_table(jobs, [](const Matrix& m) { return (m.rows + W * R - 1) / (W * R); }, &max_cols);
  const size_t shared = x_shared_bytes<F>(max_cols);
  allow_shared(matvec_v14<F, R, W, Prefetch, Affine>, int(shared));
  matvec_v14<F, R, W, Prefetch, Affine><<<unsigned(t.tile_start[t.n_jobs]), 32 * W, shared>>>(t);
}

template <Format F, int R, int W, int P, bool Affine>
void launch_v16(const std::vector<Job>& jobs, const Job*) {
  const FlatTable t = flat_table(jobs, [](const Matrix& m) { return (m.rows + W * R - 1) / (W * R); });
  constexpr int shared = v15_shared_bytes<F, R, W, P>();
  allow_shared(matvec_v16<F, R, W, P, Affine>, shared);
  matvec_v16<F, R, W, P, Affine><<<unsigned(t.tile_start[t.n_jobs]), 32 * W, shared>>>(t);
}

template <int MT, int G, int W>
void launch_v18(const std::vector<Job>& jobs, const Job*) {
  int max_cols;
  const FlatTable t = flat_table(jobs, [](const Matrix& m) { return (m.rows + W * 16 * MT - 1) / (W * 16 * MT); }, &max_cols);
  const size_t shared = v17_shared_bytes(max_cols);
  allow_shared(matvec_v18<MT, G, W>, int(shared));
  matvec_v18<MT, G, W><<<unsigned(t.tile_start[t.n_jobs]), 32 * W, shared>>>(t);
}

template <int MT, int W>
void launch_v20(const std::vector<Job>& jobs, const Job*) {
  int max_cols;
  const FlatTable t = flat_table(jobs, [](const Matrix& m) { return (m.rows + W * 16 * MT - 1) / (W * 16 * MT); }, &max_cols);
  const size_t shared = v17_shared_bytes(max_cols);
  allow_shared(matvec_v20<MT, W>, int(shared));
  matvec_v20<MT, W><<<unsigned(t.tile_start[t.n_jobs]), 32 * W, shared>>>(t);
}

template <int MT, int W>
void launch_v22(const std::vector<Job>& jobs, const Job*) {
  int max_cols;
  const FlatTable11 t = split_table(jobs, [](const Matrix& m) { return v21_splits(m.rows, m.cols, MT); }, W, 16 * MT, &max_cols);
  const size_t shared = v17_shared_bytes(max_cols);
  allow_shared(matvec_v22<MT, W>, int(shared));
  matvec_v22<MT, W><<<unsigned(t.tile_start[t.n_jobs]), 32 * W, shared>>>(t);
}

template <Format F, int R, int W, int MinBlocks, bool Affine>
void launch_v24(const std::vector<Job>& jobs, const Job*) {
  int max_cols;
  const FlatTable t = flat_table(jobs, [](const Matrix& m) { return (m.rows + W * R - 1) / (W * R); }, &max_cols);
  const size_t shared = x_shared_bytes<F>(max_cols);
  allow_shared(matvec_v24<F, R, W, MinBlocks, Affine>, int(shared));
  matvec_v24<F, R, W, MinBlocks, Affine><<<unsigned(t.tile_start[t.n_jobs]), 32 * W, shared>>>(t);
}

void launch_read_table(const std::vector<Job>& jobs, const Job*) {
  const FlatTable t = flat_table(jobs, [](const Matrix& m) { return (m.bytes() + read_piece - 1) / read_piece; });
  read_table<<<unsigned(t.tile_start[t.n_jobs]), 256>>>(t, jobs[0].y);
}

std::vector<TableVariant> table_variants(Format f) {
  switch (f) {
    case BF16: return {{"v7", launch_v7<BF16>}, {"v10 R2U2", launch_v10<BF16, 2, 2, false>}, {"v12 R2U1", launch_v12<BF16, 2, 1, false>}, {"v14 R4W4", launch_v14<BF16, 4, 4, false, false>}, {"v16 R4W4P4", launch_v16<BF16, 4, 4, 4, false>}, {"v16 R4W8P4", launch_v16<BF16, 4, 8, 4, false>}, {"v24 R4W8B4", launch_v24<BF16, 4, 8, 4, false>}, {"v24 R2W8B6", launch_v24<BF16, 2, 8, 6, false>}};
    case Q8: return {{"v7", launch_v7<Q8>}, {"v10 R4U1", launch_v10<Q8, 4, 1, false>}, {"v12 R4U2", launch_v12<Q8, 4, 2, false>}, {"v14 R4W4", launch_v14<Q8, 4, 4, false, false>}, {"v24 R4W8B4", launch_v24<Q8, 4, 8, 4, false>}, {"v24 R4W4B8", launch_v24<Q8, 4, 4, 8, false>}, {"v24 R2W8B6", launch_v24<Q8, 2, 8, 6, false>}, {"v24 R8W8B3", launch_v24<Q8, 8, 8, 3, false>}};
    case Q4: return {{"read", launch_read_table}, {"v7", launch_v7<Q4>}, {"v10 R8U1", launch_v10<Q4, 8, 1, true>}, {"v12 R8U1", launch_v12<Q4, 8, 1, true>}, {"v14 R4W4", launch_v14<Q4, 4, 4, false, true>}, {"v16 R4W8P4", launch_v16<Q4, 4, 8, 4, true>}, {"v18 M1G8W4", launch_v18<1, 8, 4>}, {"v22 M2W4", launch_v22<2, 4>}, {"v24 R4W8B4", launch_v24<Q4, 4, 8, 4, true>}, {"v24 R4W4B8", launch_v24<Q4, 4, 4, 8, true>}, {"v24 R2W8B6", launch_v24<Q4, 2, 8, 6, true>}, {"v24 R8W8B3", launch_v24<Q4, 8, 8, 3, true>}, {"v26 W8P2", launch_v26<8, 2>}, {"v26 W8P4", launch_v26<8, 4>}, {"v26 W4P4", launch_v26<4, 4>}};
  }
  return {};
}

// Max over sampled rows of |y − ref| / Σ|w·x| (the op test's measure; its tolerance is 2e-5).
double sampled_error(const HostMatrix& h, const float* x, const float* y, int samples) {
  double worst = 0;
  for (int r = 0; r < h.rows; r += std::max(1, h.rows / samples)) {
    double ref, scale;
    host_row_dot(h, r, x, &ref, &scale);
    worst = std::max(worst, std::fabs(double(y[r]) - ref) / scale);
  }
  double ref, scale;  // the last row: the clamped tail of v8's tiles
  host_row_dot(h, h.rows - 1, x, &ref, &scale);
  return std::max(worst, std::fabs(double(y[h.rows - 1]) - ref) / scale);
}

int main(int argc, char** argv) {
  const bool old = argc > 1 && std::strcmp(argv[1], "--old") == 0;
  // --only SHAPE FORMAT VERSION: that one case, for a profiler (e.g. ncu) to look at.
  const bool only = argc > 4 && std::strcmp(argv[1], "--only") == 0;
  const char* fmt_only = std::getenv("LAB_FORMAT");  // one format's rows only (bf16, q8, q4)
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, %.1f GiB, L2 %d MB\n", prop.name, prop.multiProcessorCount, double(prop.totalGlobalMem) / (1 << 30),
              prop.l2CacheSize >> 20);

  // Bandwidth bounds: device-to-device copy (bytes read + written per second) and a read-only kernel.
  const size_t big = size_t(1) << 30;
  void *src, *dst;
  float* sink;
  CHECK(cudaMalloc(&src, big));
  CHECK(cudaMalloc(&dst, big));
  CHECK(cudaMalloc(&sink, 4));
  CHECK(cudaMemset(src, 1, big));
  const Timing copy = time_launches([&](int) { CHECK(cudaMemcpyAsync(dst, src, big, cudaMemcpyDeviceToDevice)); }, 10);
  const double copy_gbs = 2.0 * double(big) / (copy.single * 1e-3) / 1e9;
  const Timing read = time_launches([&](int) { read_sum<<<prop.multiProcessorCount * 8, 512>>>(static_cast<const uint4*>(src), big / 16, sink); }, 10);
  const double read_gbs = double(big) / (read.single * 1e-3) / 1e9;
  std::printf("device-to-device copy: %.0f GB/s (read + write); read-only kernel: %.0f GB/s\n", copy_gbs, read_gbs);
  CHECK(cudaFree(dst));
  CHECK(cudaFree(src));

  std::mt19937 rng(7);
  struct Shape { const char* what; int rows, cols; };
  const Shape shapes[] = {
      {"expert gate Qwen3-30B [768, 2048]", 768, 2048},       {"expert down Qwen3.5-397B [4096, 1024]", 4096, 1024},
      {"expert gate DeepSeek-V3 [2048, 7168]", 2048, 7168},   {"attn q_proj Qwen3.5-397B [16384, 4096]", 16384, 4096},
      {"attn o_proj DeepSeek-V3 [7168, 16384]", 7168, 16384}, {"head Qwen3-30B [151936, 2048]", 151936, 2048},
      {"head Qwen3.5 [248320, 4096]", 248320, 4096},
  };
  // Per shape and format: each version's GB/s of weight bytes (data + scales + biases) in back-to-back
  // launches over rotating copies, and the max error of any version against the host reference.
  std::printf("\n(matrix-vector: GB/s per version, launches back to back; 'single' = best version timed one launch at a time)\n");
  for (const Shape& sh : shapes)
    for (Format f : {BF16, Q8, Q4}) {
      if (only && (std::strstr(sh.what, argv[2]) == nullptr || std::strcmp(format_name(f), argv[3]) != 0)) continue;
      if (fmt_only && std::strcmp(format_name(f), fmt_only) != 0) continue;
      const HostMatrix h = random_matrix(f, sh.rows, sh.cols, rng);
      const int n_copies = copies_for(h.bytes());
      DeviceCopies d(h, n_copies);
      std::vector<float> x(size_t(sh.cols));
      std::normal_distribution<float> n01(0.f, 1.f);
      for (auto& v : x) v = n01(rng);
      float *dx, *dy;
      CHECK(cudaMalloc(&dx, x.size() * 4));
      CHECK(cudaMalloc(&dy, size_t(sh.rows) * 4));
      CHECK(cudaMemcpy(dx, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
      std::string line = std::string("| ") + sh.what + " | " + format_name(f) + " | " + std::to_string(h.bytes() / 100000 / 10.0).substr(0, 6) + " |";
      double worst = 0, best = 0, best_single = 0;
      std::string best_name;
      for (const Variant& v : variants(f, old)) {
        if (only && v.name != argv[4]) continue;
        CHECK(cudaMemset(dy, 0xff, size_t(sh.rows) * 4));  // NaN: a row left unwritten fails the check
        v.launch(d.copies[0], dx, dy);
        if (v.name.rfind("read", 0) == 0) {  // a ceiling or an ablation: no product to check
          const Timing t = time_launches([&](int k) { v.launch(d.copies[size_t(k % n_copies)], dx, dy); });
          char cell[96];
          std::snprintf(cell, sizeof cell, " %s %.0f |", v.name.c_str(), double(h.bytes()) / (t.stream * 1e-3) / 1e9);
          line += cell;
          continue;
        }
        CHECK(cudaGetLastError());
        std::vector<float> y(size_t(sh.rows));
        CHECK(cudaMemcpy(y.data(), dy, y.size() * 4, cudaMemcpyDeviceToHost));
        for (float val : y)
          if (!(val == val)) { std::printf("%s %s %s: unwritten row\n", sh.what, format_name(f), v.name.c_str()); break; }
        const double err = sampled_error(h, x.data(), y.data(), 48);
        worst = std::max(worst, err);
        if (!(err < 2e-5)) std::printf("%s %s %s: error %.2e over the op test's tolerance\n", sh.what, format_name(f), v.name.c_str(), err);
        const Timing t = time_launches([&](int k) { v.launch(d.copies[size_t(k % n_copies)], dx, dy); });
        const double gbs = double(h.bytes()) / (t.stream * 1e-3) / 1e9;
        char cell[64];
        std::snprintf(cell, sizeof cell, " %s %.0f |", v.name.c_str(), gbs);
        line += cell;
        if (gbs > best) best = gbs, best_name = v.name, best_single = double(h.bytes()) / (t.single * 1e-3) / 1e9;
      }
      char tail[160];
      std::snprintf(tail, sizeof tail, " best %s %.0f (%.0f%% of copy; single %.0f) | err %.1e |", best_name.c_str(), best, 100 * best / copy_gbs,
                    best_single, worst);
      std::printf("%s%s\n", line.c_str(), tail);
      std::fflush(stdout);
      CHECK(cudaFree(dx));
      CHECK(cudaFree(dy));
    }

  if (only) return 0;
  // All K experts of one layer, gate + up + down each, in one launch (x per expert; a decode step).
  std::printf("\n(all-experts launch: GB/s per version, back to back over rotating layers; 'single' = best version one launch at a time)\n");
  struct ExpertShape { const char* what; int k, inter, hidden; };
  for (const ExpertShape& es : {ExpertShape{"Qwen3-30B-A3B, 8 experts", 8, 768, 2048}, ExpertShape{"Qwen3.5-397B, 10 experts", 10, 1024, 4096},
                                ExpertShape{"DeepSeek-V3, 8 experts", 8, 2048, 7168}})
    for (Format f : {BF16, Q8, Q4}) {
      if (fmt_only && std::strcmp(format_name(f), fmt_only) != 0) continue;
      std::vector<HostMatrix> hosts;
      size_t bytes = 0;
      for (int e = 0; e < es.k; ++e)
        for (int p = 0; p < 3; ++p) {
          const int rows = p < 2 ? es.inter : es.hidden, cols = p < 2 ? es.hidden : es.inter;
          hosts.push_back(random_matrix(f, rows, cols, rng));
          bytes += hosts.back().bytes();
        }
      const int n_layers = copies_for(bytes);
      std::vector<std::unique_ptr<DeviceCopies>> devs;
      for (const HostMatrix& h : hosts) devs.push_back(std::make_unique<DeviceCopies>(h, n_layers));
      const int max_cols = std::max(es.inter, es.hidden);
      float *dx, *dy;
      CHECK(cudaMalloc(&dx, size_t(3 * es.k) * max_cols * 4));
      CHECK(cudaMalloc(&dy, size_t(3 * es.k) * max_cols * 4));
      std::vector<float> xs_host(size_t(3 * es.k) * max_cols);
      std::normal_distribution<float> n01(0.f, 1.f);
      for (auto& v : xs_host) v = n01(rng);
      CHECK(cudaMemcpy(dx, xs_host.data(), xs_host.size() * 4, cudaMemcpyHostToDevice));
      std::vector<std::vector<Job>> layers(static_cast<size_t>(n_layers));
      std::vector<Job*> djobs(static_cast<size_t>(n_layers));
      for (int l = 0; l < n_layers; ++l) {
        for (size_t i = 0; i < hosts.size(); ++i) layers[size_t(l)].push_back({devs[i]->copies[size_t(l)], dx + i * max_cols, dy + i * max_cols});
        CHECK(cudaMalloc(&djobs[size_t(l)], hosts.size() * sizeof(Job)));
        CHECK(cudaMemcpy(djobs[size_t(l)], layers[size_t(l)].data(), hosts.size() * sizeof(Job), cudaMemcpyHostToDevice));
      }
      char head[128];
      std::snprintf(head, sizeof head, "| %s | %s | %.1f | %d |", es.what, format_name(f), double(bytes) / 1e6, n_layers);
      std::string line = head;
      double worst = 0, best = 0, best_single = 0;
      std::string best_name;
      for (const TableVariant& v : table_variants(f)) {
        CHECK(cudaMemset(dy, 0xff, size_t(3 * es.k) * max_cols * 4));
        v.launch(layers[0], djobs[0]);
        CHECK(cudaGetLastError());
        if (v.name == "read") {  // the ceiling: no product to check
          const Timing t = time_launches([&](int k) { v.launch(layers[size_t(k % n_layers)], djobs[size_t(k % n_layers)]); });
          char cell[64];
          std::snprintf(cell, sizeof cell, " read %.0f |", double(bytes) / (t.stream * 1e-3) / 1e9);
          line += cell;
          continue;
        }
        std::vector<float> yh(size_t(3 * es.k) * max_cols);
        CHECK(cudaMemcpy(yh.data(), dy, yh.size() * 4, cudaMemcpyDeviceToHost));
        for (size_t i = 0; i < hosts.size(); ++i) {
          const float* y = yh.data() + i * max_cols;
          for (int r = 0; r < hosts[i].rows; ++r)
            if (!(y[r] == y[r])) { std::printf("%s %s %s: job %zu row %d unwritten\n", es.what, format_name(f), v.name.c_str(), i, r); break; }
          worst = std::max(worst, sampled_error(hosts[i], xs_host.data() + i * max_cols, y, 4));
        }
        const Timing t = time_launches([&](int k) { v.launch(layers[size_t(k % n_layers)], djobs[size_t(k % n_layers)]); });
        const double gbs = double(bytes) / (t.stream * 1e-3) / 1e9;
        char cell[64];
        std::snprintf(cell, sizeof cell, " %s %.0f |", v.name.c_str(), gbs);
        line += cell;
        if (gbs > best) best = gbs, best_name = v.name, best_single = double(bytes) / (t.single * 1e-3) / 1e9;
      }
      char tail[160];
      std::snprintf(tail, sizeof tail, " best %s %.0f (%.0f%% of copy; single %.0f) | err %.1e |", best_name.c_str(), best, 100 * best / copy_gbs,
                    best_single, worst);
      std::printf("%s%s\n", line.c_str(), tail);
      std::fflush(stdout);
      for (Job* p : djobs) CHECK(cudaFree(p));
      CHECK(cudaFree(dx));
      CHECK(cudaFree(dy));
    }
  return 0;
}
