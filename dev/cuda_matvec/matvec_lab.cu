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
// Build: nvcc -O3 -std=c++17 -arch=sm_90 -o matvec_lab dev/cuda_matvec/matvec_lab.cu
// Run:   ./matvec_lab            (prints one table; see docs/BENCHMARKS.md "CUDA kernel lab")
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
  size_t bytes() const {
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

// ---- host side ----------------------------------------------------------------------------------------

struct HostMatrix {
  Format format;
  int rows, cols;
  std::vector<uint8_t> data, scales, biases;
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

HostMatrix random_matrix(Format f, int rows, int cols, std::mt19937& rng) {
  HostMatrix h{f, rows, cols, {}, {}, {}};
  std::uniform_int_distribution<int> byte(0, 255);
  std::normal_distribution<float> normal(0.f, 1.f / std::sqrt(float(cols)));
  if (f == BF16) {
    h.data.resize(size_t(rows) * cols * 2);
    for (size_t i = 0; i < h.data.size() / 2; ++i) {
      const uint16_t v = float_to_bf16(normal(rng));
      std::memcpy(h.data.data() + 2 * i, &v, 2);
    }
  } else if (f == Q8) {
    h.data.resize(size_t(rows) * cols);
    for (auto& b : h.data) b = uint8_t(byte(rng));
    h.scales.resize(size_t(rows) * (cols / 32) * 2);
    for (size_t i = 0; i < h.scales.size() / 2; ++i) {
      const __half v = __float2half(std::fabs(normal(rng)) / 64.f);
      std::memcpy(h.scales.data() + 2 * i, &v, 2);
    }
  } else {
    h.data.resize(size_t(rows) * cols / 2);
    for (auto& b : h.data) b = uint8_t(byte(rng));
    h.scales.resize(size_t(rows) * (cols / 64) * 2);
    h.biases.resize(h.scales.size());
    for (size_t i = 0; i < h.scales.size() / 2; ++i) {
      const uint16_t s = float_to_bf16(std::fabs(normal(rng)) / 8.f), b = float_to_bf16(normal(rng));
      std::memcpy(h.scales.data() + 2 * i, &s, 2);
      std::memcpy(h.biases.data() + 2 * i, &b, 2);
    }
  }
  return h;
}

double host_row_dot(const HostMatrix& h, int r, const std::vector<float>& x) {
  double acc = 0;
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
      w = double(q) * bf16_to_float(s) + bf16_to_float(b);
    }
    acc += w * x[c];
  }
  return acc;
}

struct DeviceMatrix {
  Matrix m;
  std::vector<void*> owned;
  explicit DeviceMatrix(const HostMatrix& h) {
    m.format = h.format;
    m.rows = h.rows;
    m.cols = h.cols;
    auto up = [&](const std::vector<uint8_t>& v) -> const void* {
      if (v.empty()) return nullptr;
      void* p;
      CHECK(cudaMalloc(&p, v.size()));
      CHECK(cudaMemcpy(p, v.data(), v.size(), cudaMemcpyHostToDevice));
      owned.push_back(p);
      return p;
    };
    m.data = up(h.data);
    m.scales = up(h.scales);
    m.biases = up(h.biases);
  }
  ~DeviceMatrix() {
    for (void* p : owned) cudaFree(p);
  }
};

template <typename Launch>
float median_ms(Launch&& launch, int reps = 30) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  launch();  // warm-up
  CHECK(cudaDeviceSynchronize());
  std::vector<float> t;
  for (int i = 0; i < reps; ++i) {
    CHECK(cudaEventRecord(a));
    launch();
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  return t[t.size() / 2];
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

template <Format F>
void launch_v(int version, const Matrix& m, const float* x, float* y, cudaStream_t s = 0) {
  const int blocks = (m.rows + v2_rows_per_block - 1) / v2_rows_per_block, shared = m.cols * 4;
  if (version == 1) {
    matvec_v1<F><<<(m.rows + 7) / 8, 256, 0, s>>>(m, x, y);
  } else if (version == 2) {
    allow_shared(matvec_v2<F, false>, shared);
    matvec_v2<F, false><<<blocks, 32 * v2_rows_per_block, shared, s>>>(m, x, y);
  } else if (version == 4) {
    allow_shared(matvec_v2<F, true>, shared);
    matvec_v2<F, true><<<blocks, 32 * v2_rows_per_block, shared, s>>>(m, x, y);
  } else {
    const int rows_per_block = v6_warps * v6_rows<F>();
    matvec_v6<F><<<(m.rows + rows_per_block - 1) / rows_per_block, 32 * v6_warps, 0, s>>>(m, x, y);
  }
}

void launch(Format f, int version, const Matrix& m, const float* x, float* y) {
  switch (f) {
    case BF16: launch_v<BF16>(version, m, x, y); break;
    case Q8: launch_v<Q8>(version, m, x, y); break;
    case Q4: launch_v<Q4>(version, m, x, y); break;
  }
}

int main() {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, %.1f GiB\n", prop.name, prop.multiProcessorCount, double(prop.totalGlobalMem) / (1 << 30));

  // Bandwidth bounds: device-to-device copy (bytes read + written per second) and a read-only kernel.
  const size_t big = size_t(1) << 30;
  void *src, *dst;
  float* sink;
  CHECK(cudaMalloc(&src, big));
  CHECK(cudaMalloc(&dst, big));
  CHECK(cudaMalloc(&sink, 4));
  CHECK(cudaMemset(src, 1, big));
  const float copy_ms = median_ms([&] { CHECK(cudaMemcpyAsync(dst, src, big, cudaMemcpyDeviceToDevice)); }, 10);
  const double copy_gbs = 2.0 * double(big) / (copy_ms * 1e-3) / 1e9;
  const float read_ms = median_ms([&] { read_sum<<<prop.multiProcessorCount * 8, 512>>>(static_cast<const uint4*>(src), big / 16, sink); }, 10);
  const double read_gbs = double(big) / (read_ms * 1e-3) / 1e9;
  std::printf("device-to-device copy: %.0f GB/s (read + write); read-only kernel: %.0f GB/s\n", copy_gbs, read_gbs);
  CHECK(cudaFree(dst));

  std::mt19937 rng(7);
  struct Shape { const char* what; int rows, cols; };
  const Shape shapes[] = {
      {"expert gate Qwen3-30B [768, 2048]", 768, 2048},       {"expert down Qwen3.5-397B [4096, 1024]", 4096, 1024},
      {"expert gate DeepSeek-V3 [2048, 7168]", 2048, 7168},   {"attn q_proj Qwen3.5-397B [16384, 4096]", 16384, 4096},
      {"attn o_proj DeepSeek-V3 [7168, 16384]", 7168, 16384}, {"head Qwen3-30B [151936, 2048]", 151936, 2048},
      {"head Qwen3.5 [248320, 4096]", 248320, 4096},
  };
  std::printf("\n| shape | format | MB | v1 GB/s | v2 GB/s | v4 GB/s | v6 GB/s | v6 %% of copy | v6 %% of read | max rel err |\n|---|---|---|---|---|---|---|---|---|---|\n");
  for (const Shape& sh : shapes)
    for (Format f : {BF16, Q8, Q4}) {
      const HostMatrix h = random_matrix(f, sh.rows, sh.cols, rng);
      DeviceMatrix d(h);
      std::vector<float> x(size_t(sh.cols));
      std::normal_distribution<float> n01(0.f, 1.f);
      for (auto& v : x) v = n01(rng);
      float *dx, *dy;
      CHECK(cudaMalloc(&dx, x.size() * 4));
      CHECK(cudaMalloc(&dy, size_t(sh.rows) * 4));
      CHECK(cudaMemcpy(dx, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
      double gbs[7] = {0, 0, 0, 0, 0, 0, 0}, worst = 0;
      for (int v : {1, 2, 4, 6}) {
        const float ms = median_ms([&] { launch(f, v, d.m, dx, dy); });
        CHECK(cudaGetLastError());
        gbs[v] = double(d.m.bytes()) / (ms * 1e-3) / 1e9;
        std::vector<float> y(size_t(sh.rows));
        CHECK(cudaMemcpy(y.data(), dy, y.size() * 4, cudaMemcpyDeviceToHost));
        for (int r = 0; r < sh.rows; r += std::max(1, sh.rows / 64)) {
          double ref = host_row_dot(h, r, x), scale = 0;
          for (int c = 0; c < sh.cols; ++c) scale += std::fabs(x[c]);
          worst = std::max(worst, std::fabs(y[r] - ref) / (scale * 1e-2 + std::fabs(ref)));
        }
      }
      std::printf("| %s | %s | %.1f | %.0f | %.0f | %.0f | %.0f | %.0f%% | %.0f%% | %.1e |\n", sh.what, format_name(f),
                  double(d.m.bytes()) / 1e6, gbs[1], gbs[2], gbs[4], gbs[6], 100 * gbs[6] / copy_gbs, 100 * gbs[6] / read_gbs, worst);
      CHECK(cudaFree(dx));
      CHECK(cudaFree(dy));
    }

  // v3: the K experts of one layer, gate + up + down each, in one launch (x per expert; a decode step).
  std::printf("\n| all-experts launch | format | MB | v3 GB/s | v5 GB/s | v7 GB/s | v7 %% of copy | v7 vs 3K single v6 launches |\n|---|---|---|---|---|---|---|---|\n");
  struct ExpertShape { const char* what; int k, inter, hidden; };
  for (const ExpertShape& es : {ExpertShape{"Qwen3-30B-A3B, 8 experts", 8, 768, 2048}, ExpertShape{"Qwen3.5-397B, 10 experts", 10, 1024, 4096},
                                ExpertShape{"DeepSeek-V3, 8 experts", 8, 2048, 7168}})
    for (Format f : {BF16, Q8, Q4}) {
      std::vector<HostMatrix> hosts;
      std::vector<std::unique_ptr<DeviceMatrix>> devs;
      std::vector<Job> jobs;
      float *dx, *dy;
      const int max_cols = std::max(es.inter, es.hidden);
      CHECK(cudaMalloc(&dx, size_t(3 * es.k) * max_cols * 4));
      CHECK(cudaMalloc(&dy, size_t(3 * es.k) * max_cols * 4));
      std::vector<float> xs_host(size_t(3 * es.k) * max_cols);
      std::normal_distribution<float> n01(0.f, 1.f);
      for (auto& v : xs_host) v = n01(rng);
      CHECK(cudaMemcpy(dx, xs_host.data(), xs_host.size() * 4, cudaMemcpyHostToDevice));
      size_t bytes = 0;
      int max_rows = 0;
      for (int e = 0; e < es.k; ++e)
        for (int p = 0; p < 3; ++p) {
          const int rows = p < 2 ? es.inter : es.hidden, cols = p < 2 ? es.hidden : es.inter;
          hosts.push_back(random_matrix(f, rows, cols, rng));
          devs.push_back(std::make_unique<DeviceMatrix>(hosts.back()));
          const size_t slot = size_t(3 * e + p) * max_cols;
          jobs.push_back({devs.back()->m, dx + slot, dy + slot});
          bytes += devs.back()->m.bytes();
          max_rows = std::max(max_rows, rows);
        }
      Job* djobs;
      CHECK(cudaMalloc(&djobs, jobs.size() * sizeof(Job)));
      CHECK(cudaMemcpy(djobs, jobs.data(), jobs.size() * sizeof(Job), cudaMemcpyHostToDevice));
      const dim3 grid((max_rows + v2_rows_per_block - 1) / v2_rows_per_block, unsigned(jobs.size()));
      const int shared = max_cols * 4;
      auto one_launch = [&](bool magic) {
        const int threads = 32 * v2_rows_per_block;
        switch (f) {
          case BF16: magic ? matvec_v3<BF16, true><<<grid, threads, shared>>>(djobs) : matvec_v3<BF16, false><<<grid, threads, shared>>>(djobs); break;
          case Q8: magic ? matvec_v3<Q8, true><<<grid, threads, shared>>>(djobs) : matvec_v3<Q8, false><<<grid, threads, shared>>>(djobs); break;
          case Q4: magic ? matvec_v3<Q4, true><<<grid, threads, shared>>>(djobs) : matvec_v3<Q4, false><<<grid, threads, shared>>>(djobs); break;
        }
      };
      allow_shared(matvec_v3<BF16, true>, shared), allow_shared(matvec_v3<BF16, false>, shared);
      allow_shared(matvec_v3<Q8, true>, shared), allow_shared(matvec_v3<Q8, false>, shared);
      allow_shared(matvec_v3<Q4, true>, shared), allow_shared(matvec_v3<Q4, false>, shared);
      const float ms3 = median_ms([&] { one_launch(false); });
      const float ms5 = median_ms([&] { one_launch(true); });
      const int rows_per_block = v6_warps * (f == BF16 ? v6_rows<BF16>() : f == Q8 ? v6_rows<Q8>() : v6_rows<Q4>());
      const dim3 grid7((max_rows + rows_per_block - 1) / rows_per_block, unsigned(jobs.size()));
      const float ms7 = median_ms([&] {
        switch (f) {
          case BF16: matvec_v7<BF16><<<grid7, 32 * v6_warps>>>(djobs); break;
          case Q8: matvec_v7<Q8><<<grid7, 32 * v6_warps>>>(djobs); break;
          case Q4: matvec_v7<Q4><<<grid7, 32 * v6_warps>>>(djobs); break;
        }
      });
      CHECK(cudaGetLastError());
      // v7 against the host reference on the last job.
      {
        const Job& last = jobs.back();
        const size_t slot = size_t(jobs.size() - 1) * max_cols;
        std::vector<float> xh(xs_host.begin() + int64_t(slot), xs_host.begin() + int64_t(slot) + last.m.cols), yh(size_t(last.m.rows));
        CHECK(cudaMemcpy(yh.data(), last.y, yh.size() * 4, cudaMemcpyDeviceToHost));
        for (int r = 0; r < last.m.rows; r += std::max(1, last.m.rows / 16))
          if (std::fabs(yh[size_t(r)] - host_row_dot(hosts.back(), r, xh)) > 1e-3 * (1 + std::fabs(yh[size_t(r)])))
            std::printf("v7 mismatch at row %d\n", r);
      }
      const float ms_single = median_ms([&] {
        for (const Job& j : jobs) launch(f, 6, j.m, j.x, j.y);
      });
      const double gbs3 = double(bytes) / (ms3 * 1e-3) / 1e9, gbs5 = double(bytes) / (ms5 * 1e-3) / 1e9,
                   gbs7 = double(bytes) / (ms7 * 1e-3) / 1e9;
      std::printf("| %s | %s | %.1f | %.0f | %.0f | %.0f | %.0f%% | %.2fx |\n", es.what, format_name(f), double(bytes) / 1e6, gbs3, gbs5,
                  gbs7, 100 * gbs7 / copy_gbs, double(ms_single) / double(ms7));
      CHECK(cudaFree(djobs));
      CHECK(cudaFree(dx));
      CHECK(cudaFree(dy));
    }
  CHECK(cudaFree(src));
  return 0;
}
