// The weight-chunk arithmetic shared by the matrix-vector kernels (matmul.cu, moe.cu): every format is
// read in 16-byte chunks of a row (f32 4 columns, bf16 8, q8 16, q4 32; a q8/q4 scale group is two
// chunks), decoded with exact float tricks and multiplied into fp32 sums. Included by .cu files only.
#pragma once

#include "backends/cuda/device_common.cuh"

namespace moeflux::cuda {

// Columns covered by one 16-byte chunk of weights.
__host__ __device__ constexpr int chunk_cols(WeightFormat f) {
  return f == WeightFormat::f32 ? 4 : f == WeightFormat::bf16 ? 8 : f == WeightFormat::q8 ? 16 : 32;
}
__host__ __device__ constexpr int64_t row_bytes(WeightFormat f, int64_t cols) {
  return f == WeightFormat::f32 ? cols * 4 : f == WeightFormat::bf16 ? cols * 2 : f == WeightFormat::q8 ? cols : cols / 2;
}
// Scale groups per row (q8: 32 columns, q4: 64); a chunk is half a group in both.
__host__ __device__ constexpr int groups_per_row(WeightFormat f, int cols) { return f == WeightFormat::q8 ? cols / 32 : cols / 64; }

// A vector staged in shared memory for chunked reads: each chunk's float4s padded to an odd count, so
// the 8 lanes of a 128-bit shared-memory phase, each reading its own chunk, hit different banks.
__host__ __device__ constexpr int staged_pitch(WeightFormat f) { return chunk_cols(f) / 4 + 1; }
__host__ __device__ constexpr int64_t staged_bytes(WeightFormat f, int64_t cols) { return cols / chunk_cols(f) * staged_pitch(f) * 16; }
// Where float4 i of the vector sits in the staged layout.
template <WeightFormat F>
__device__ __forceinline__ int staged_at(int i) { return (i / (chunk_cols(F) / 4)) * staged_pitch(F) + i % (chunk_cols(F) / 4); }

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

// One 16-byte chunk of a row with its q8 scale / q4 scale and bias bits.
struct Chunk {
  uint4 w;
  uint16_t scale, bias;
};

// A weight read: through the read-only path, or as a stream (Stream: ld.global.cs, evict first from the L1
// and the L2) for weights a launch reads once (a decode token's experts), so that the L2 keeps what kernels
// hand each other.
template <bool Stream, typename T>
__device__ __forceinline__ T load_weight(const T* p) {
  if constexpr (Stream)
    return __ldcs(p);
  else
    return __ldg(p);
}

// Chunk i of the row at `row` (its scales and biases rows at `scales`, `biases`).
template <WeightFormat F, bool Stream = false>
__device__ __forceinline__ Chunk load_chunk(const uint8_t* row, const uint16_t* scales, const uint16_t* biases, int i) {
  Chunk c;
  c.w = load_weight<Stream>(reinterpret_cast<const uint4*>(row) + i);
  c.scale = F == WeightFormat::q8 || F == WeightFormat::q4 ? load_weight<Stream>(scales + i / 2) : 0;
  c.bias = F == WeightFormat::q4 ? load_weight<Stream>(biases + i / 2) : 0;
  return c;
}

// acc[n] += chunk c[n]'s contribution to its row's dot product with x, whose chunk is the float4s at xc
// (staged): N chunks of N rows at the same columns share each read of x (and q4's Σx).
template <WeightFormat F, int N>
__device__ __forceinline__ void chunk_dots(const Chunk (&c)[N], const float4* xc, float (&acc)[N]) {
  float d[N];
#pragma unroll
  for (int n = 0; n < N; ++n) d[n] = 0.f;
  if constexpr (F == WeightFormat::f32) {
    const float4 a = xc[0];
#pragma unroll
    for (int n = 0; n < N; ++n)
      acc[n] += fmaf(__uint_as_float(c[n].w.w), a.w,
                     fmaf(__uint_as_float(c[n].w.z), a.z, fmaf(__uint_as_float(c[n].w.y), a.y, __uint_as_float(c[n].w.x) * a.x)));
  } else if constexpr (F == WeightFormat::bf16) {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const float4 a = xc[k];
#pragma unroll
      for (int n = 0; n < N; ++n) {
        const uint32_t w0 = k == 0 ? c[n].w.x : c[n].w.z, w1 = k == 0 ? c[n].w.y : c[n].w.w;
        d[n] = fmaf(__uint_as_float(w0 << 16), a.x, d[n]);
        d[n] = fmaf(__uint_as_float(w0 & 0xffff0000u), a.y, d[n]);
        d[n] = fmaf(__uint_as_float(w1 << 16), a.z, d[n]);
        d[n] = fmaf(__uint_as_float(w1 & 0xffff0000u), a.w, d[n]);
      }
    }
#pragma unroll
    for (int n = 0; n < N; ++n) acc[n] += d[n];
  } else if constexpr (F == WeightFormat::q8) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float4 a = xc[k];
      const float xv[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
      for (int n = 0; n < N; ++n) {
        const uint32_t u = (k == 0 ? c[n].w.x : k == 1 ? c[n].w.y : k == 2 ? c[n].w.z : c[n].w.w) ^ 0x80808080u;  // b → b + 128
#pragma unroll
        for (int b = 0; b < 4; ++b) d[n] = fmaf(byte_as_biased_float(u, b) - (8388608.f + 128.f), xv[b], d[n]);
      }
    }
#pragma unroll
    for (int n = 0; n < N; ++n) acc[n] += __half2float(__ushort_as_half(c[n].scale)) * d[n];
  } else {
    float xsum = 0.f;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float4 a = xc[2 * k], b = xc[2 * k + 1];
      const float xv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
      xsum += ((xv[0] + xv[1]) + (xv[2] + xv[3])) + ((xv[4] + xv[5]) + (xv[6] + xv[7]));
#pragma unroll
      for (int n = 0; n < N; ++n) {
        const uint32_t w = k == 0 ? c[n].w.x : k == 1 ? c[n].w.y : k == 2 ? c[n].w.z : c[n].w.w;
        // Even elements in the low nibble of each byte, odd ones in the high nibble.
        const uint32_t lo = w & 0x0F0F0F0Fu, hi = (w >> 4) & 0x0F0F0F0Fu;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          d[n] = fmaf(nibble_as_affine_float(lo, b), xv[2 * b], d[n]);
          d[n] = fmaf(nibble_as_affine_float(hi, b), xv[2 * b + 1], d[n]);
        }
      }
    }
#pragma unroll
    for (int n = 0; n < N; ++n) acc[n] += q4_affine_sum(d[n], xsum, c[n].scale, c[n].bias);
  }
}

// Copies n floats (n a multiple of chunk_cols(F); src 16-byte aligned) into shared memory in the staged
// layout, a thread's loads issued Batch at a time before their stores (one L2 round trip per Batch, not
// per float4; each costs 4 registers, which a kernel holding its first weights in flight meanwhile may
// not have to spare). The caller synchronizes before reading.
template <WeightFormat F, int Batch>
__device__ __forceinline__ void stage_chunked(const float* __restrict__ src, int n, float4* dst) {
  constexpr int batch = Batch;
  const int n4 = n / 4;
  for (int f0 = threadIdx.x; f0 < n4; f0 += batch * blockDim.x) {
    float4 v[batch];
#pragma unroll
    for (int b = 0; b < batch; ++b) {
      const int f = f0 + b * int(blockDim.x);
      if (f < n4) v[b] = __ldg(reinterpret_cast<const float4*>(src) + f);
    }
#pragma unroll
    for (int b = 0; b < batch; ++b) {
      const int f = f0 + b * int(blockDim.x);
      if (f < n4) dst[staged_at<F>(f)] = v[b];
    }
  }
}

}  // namespace moeflux::cuda
