// The kernels of moe.cuh.
#include <cfloat>
#include <cstdio>
#include <cstdlib>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_common.cuh"
#include "backends/cuda/moe.cuh"

namespace moeflux::cuda {
namespace {

// ---- routers ---------------------------------------------------------------------------------------

constexpr int router_threads = 256;
constexpr int max_router_k = 64;

// The better of two (score, id) candidates: higher score, then lower id; id −1 is "none".
__device__ __forceinline__ bool better(float a, int ia, float b, int ib) {
  if (ib < 0) return ia >= 0;
  if (ia < 0) return false;
  return a > b || (a == b && ia < ib);
}

// The block's best candidate among every thread's (score, id); every thread gets it.
__device__ void block_best(float* score, int* id) {
  __shared__ float s_score[32];
  __shared__ int s_id[32];
  float v = *score;
  int i = *id;
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (better(ov, oi, v, i)) v = ov, i = oi;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) s_score[warp] = v, s_id[warp] = i;
  __syncthreads();
  v = s_score[0], i = s_id[0];
  for (int w = 1; w < n_warps; ++w)
    if (better(s_score[w], s_id[w], v, i)) v = s_score[w], i = s_id[w];
  *score = v, *id = i;
}

__device__ float block_max(float v) {
  __shared__ float partial[32];
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  float m = partial[0];
  for (int w = 1; w < n_warps; ++w) m = fmaxf(m, partial[w]);
  return m;
}

// k rounds of the block's best unchosen score; chosen scores are marked with id −1 in `taken`.
__device__ void top_k(const float* score, bool* taken, int n, int k, int* chosen) {
  for (int j = 0; j < k; ++j) {
    float best = -FLT_MAX;
    int best_id = -1;
    for (int e = threadIdx.x; e < n; e += blockDim.x)
      if (!taken[e] && better(score[e], e, best, best_id)) best = score[e], best_id = e;
    block_best(&best, &best_id);
    if (threadIdx.x == 0) {
      chosen[j] = best_id;
      taken[best_id] = true;
    }
    __syncthreads();
  }
}

// One block per token. Shared: p [E] floats, taken [E] bools.
__global__ void softmax_topk_kernel(const float* __restrict__ logits, int n_expert, int k, bool normalize, int32_t* ids,
                                    float* weights) {
  extern __shared__ float shared[];
  float* p = shared;
  bool* taken = reinterpret_cast<bool*>(p + n_expert);
  __shared__ int chosen[max_router_k];
  const float* l = logits + size_t(blockIdx.x) * n_expert;
  float m = -FLT_MAX;
  for (int e = threadIdx.x; e < n_expert; e += blockDim.x) m = fmaxf(m, l[e]);
  m = block_max(m);
  for (int e = threadIdx.x; e < n_expert; e += blockDim.x) {
    p[e] = expf(l[e] - m);
    taken[e] = false;
  }
  // The sum in the host's order (expert by expert), so the probabilities match it as closely as expf allows.
  __shared__ float sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float acc = 0.f;
    for (int e = 0; e < n_expert; ++e) acc += p[e];
    sum = acc;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < n_expert; e += blockDim.x) p[e] /= sum;
  __syncthreads();
  top_k(p, taken, n_expert, k, chosen);
  if (threadIdx.x == 0) {
    float selected = 0.f;
    for (int j = 0; j < k; ++j) selected += p[chosen[j]];
    for (int j = 0; j < k; ++j) {
      ids[size_t(blockIdx.x) * k + j] = chosen[j];
      weights[size_t(blockIdx.x) * k + j] = normalize ? p[chosen[j]] / selected : p[chosen[j]];
    }
  }
}

// One block per token. Shared: s [E], c [E] floats, taken [E] bools.
__global__ void sigmoid_grouped_topk_kernel(const float* __restrict__ logits, const float* __restrict__ bias, int n_expert,
                                            int n_group, int topk_group, int k, bool normalize, float scaling, int32_t* ids,
                                            float* weights) {
  extern __shared__ float shared[];
  float* s = shared;
  float* c = s + n_expert;
  bool* taken = reinterpret_cast<bool*>(c + n_expert);
  __shared__ int chosen[max_router_k];
  __shared__ float group_score[64];
  __shared__ bool kept[64];
  const float* l = logits + size_t(blockIdx.x) * n_expert;
  for (int e = threadIdx.x; e < n_expert; e += blockDim.x) {
    s[e] = 1.0f / (1.0f + expf(-l[e]));
    c[e] = s[e] + (bias ? bias[e] : 0.0f);
    taken[e] = false;
  }
  __syncthreads();
  if (n_group > 1) {
    const int per_group = n_expert / n_group;
    if (threadIdx.x < n_group) {
      const float* cg = c + threadIdx.x * per_group;
      float top1 = -INFINITY, top2 = -INFINITY;
      for (int i = 0; i < per_group; ++i) {
        if (cg[i] > top1) {
          top2 = top1;
          top1 = cg[i];
        } else if (cg[i] > top2) {
          top2 = cg[i];
        }
      }
      group_score[threadIdx.x] = per_group >= 2 ? top1 + top2 : top1;
      kept[threadIdx.x] = false;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      // The stable order of the host: score descending, then group ascending.
      for (int j = 0; j < topk_group; ++j) {
        int best = -1;
        for (int g = 0; g < n_group; ++g)
          if (!kept[g] && (best < 0 || group_score[g] > group_score[best])) best = g;
        kept[best] = true;
      }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < n_expert; e += blockDim.x)
      if (!kept[e / per_group]) c[e] = 0.0f;
    __syncthreads();
  }
  top_k(c, taken, n_expert, k, chosen);
  if (threadIdx.x == 0) {
    float sum = 0.f;
    for (int j = 0; j < k; ++j) sum += s[chosen[j]];
    for (int j = 0; j < k; ++j) {
      const float w = s[chosen[j]];
      ids[size_t(blockIdx.x) * k + j] = chosen[j];
      weights[size_t(blockIdx.x) * k + j] = (normalize ? w / (sum + 1e-20f) : w) * scaling;
    }
  }
}

// ---- experts ---------------------------------------------------------------------------------------

constexpr int warps_per_block = 4;
template <WeightFormat F> __host__ __device__ constexpr int rows_per_warp() {
  return F == WeightFormat::q4 ? 8 : F == WeightFormat::q8 ? 4 : 2;
}
__host__ __device__ constexpr int chunk_cols(WeightFormat f) {
  return f == WeightFormat::f32 ? 4 : f == WeightFormat::bf16 ? 8 : f == WeightFormat::q8 ? 16 : 32;
}

struct Matrix {
  const uint8_t* data;
  const uint8_t* scales;
  const uint8_t* biases;
};

__device__ __forceinline__ Matrix matrix_at(const uint8_t* blob, uintptr_t data, uintptr_t scales, uintptr_t biases) {
  return {blob + data, blob + scales, blob + biases};
}

__device__ __forceinline__ float byte_as_biased_float(uint32_t w, int k) {
  return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7540u + unsigned(k)));
}

// The lane's share of row r's dot product over 16-byte chunk i (xv: the chunk's x, xsum: its sum for q4).
template <WeightFormat F>
__device__ __forceinline__ float chunk_dot(const Matrix& m, int cols, int r, int i, const float* xv, float xsum) {
  if constexpr (F == WeightFormat::f32) {
    const float4 w = __ldg(reinterpret_cast<const float4*>(m.data + size_t(r) * cols * 4) + i);
    return w.x * xv[0] + w.y * xv[1] + w.z * xv[2] + w.w * xv[3];
  } else if constexpr (F == WeightFormat::bf16) {
    const uint4 p = __ldg(reinterpret_cast<const uint4*>(m.data + size_t(r) * cols * 2) + i);
    const uint32_t w[4] = {p.x, p.y, p.z, p.w};
    float d = 0.f;
#pragma unroll
    for (int k = 0; k < 4; ++k) d += __uint_as_float(w[k] << 16) * xv[2 * k] + __uint_as_float(w[k] & 0xffff0000u) * xv[2 * k + 1];
    return d;
  } else if constexpr (F == WeightFormat::q8) {
    const uint4 p = __ldg(reinterpret_cast<const uint4*>(m.data + size_t(r) * cols) + i);
    const uint32_t w[4] = {p.x, p.y, p.z, p.w};
    const float sc = __half2float(__ldg(reinterpret_cast<const __half*>(m.scales) + size_t(r) * (cols / 32) + i / 2));
    float d = 0.f;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t u = w[k] ^ 0x80808080u;
      constexpr float bias = 8388608.f + 128.f;
#pragma unroll
      for (int b = 0; b < 4; ++b) d += (byte_as_biased_float(u, b) - bias) * xv[4 * k + b];
    }
    return sc * d;
  } else {
    const uint4 p = __ldg(reinterpret_cast<const uint4*>(m.data + size_t(r) * cols / 2) + i);
    const uint32_t w[4] = {p.x, p.y, p.z, p.w};
    const size_t g = size_t(r) * (cols / 64) + i / 2;
    const float sc = bf16_bits_to_float(__ldg(reinterpret_cast<const unsigned short*>(m.scales) + g));
    const float bi = bf16_bits_to_float(__ldg(reinterpret_cast<const unsigned short*>(m.biases) + g));
    float qx = 0.f;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t lo = w[k] & 0x0F0F0F0Fu, hi = (w[k] >> 4) & 0x0F0F0F0Fu;
      constexpr float bias = 8388608.f;
#pragma unroll
      for (int b = 0; b < 4; ++b)
        qx += (byte_as_biased_float(lo, b) - bias) * xv[8 * k + 2 * b] + (byte_as_biased_float(hi, b) - bias) * xv[8 * k + 2 * b + 1];
    }
    return sc * qx + bi * xsum;
  }
}

// Copies n floats (n a multiple of 4, 16-byte aligned) into the block's shared memory.
__device__ __forceinline__ void stage_vector(const float* __restrict__ src, int n, float* dst) {
  for (int i = threadIdx.x; i < n / 4; i += blockDim.x) reinterpret_cast<float4*>(dst)[i] = __ldg(reinterpret_cast<const float4*>(src) + i);
  __syncthreads();
}

// The lane's x chunk i from the block's staged copy (lab v23: each lane reading its own x from global
// memory costs more cache traffic than the weights).
template <WeightFormat F>
__device__ __forceinline__ void load_chunk(const float* x, int i, float* xv, float* xsum) {
  constexpr int n = chunk_cols(F);
#pragma unroll
  for (int k = 0; k < n / 4; ++k) {
    const float4 v = reinterpret_cast<const float4*>(x)[i * (n / 4) + k];
    xv[4 * k] = v.x, xv[4 * k + 1] = v.y, xv[4 * k + 2] = v.z, xv[4 * k + 3] = v.w;
  }
  *xsum = 0.f;
  if constexpr (F == WeightFormat::q4) {
#pragma unroll
    for (int k = 0; k < n; ++k) *xsum += xv[k];
  }
}

struct Parts {
  uintptr_t data, scales, biases;
};

__device__ __forceinline__ const uint8_t* blob_of(const void* const* table, const int32_t* ids, int j) {
  const void* blob = table[ids[j]];
  if (!blob) __trap();  // the caller guarantees every chosen expert is in the table
  return static_cast<const uint8_t*>(blob);
}

// grid: x = row blocks of I, y = expert slot j. h[j, r] = silu(gate_r · x) · (up_r · x).
template <WeightFormat F>
__global__ void __launch_bounds__(32 * warps_per_block)
    gate_up_kernel(const void* const* table, const int32_t* ids, Parts gate, Parts up, const float* __restrict__ x, int I, int H,
                   float* __restrict__ h) {
  constexpr int R = rows_per_warp<F>();
  extern __shared__ float4 staged[];
  float* xs = reinterpret_cast<float*>(staged);
  stage_vector(x, H, xs);
  const int j = blockIdx.y;
  const int r0 = (blockIdx.x * warps_per_block + threadIdx.x / 32) * R;
  if (r0 >= I) return;
  const uint8_t* blob = blob_of(table, ids, j);
  const Matrix g = matrix_at(blob, gate.data, gate.scales, gate.biases), u = matrix_at(blob, up.data, up.scales, up.biases);
  const int lane = threadIdx.x & 31, rows = min(R, I - r0), n_chunks = H / chunk_cols(F);
  float ag[R], au[R];
#pragma unroll
  for (int q = 0; q < R; ++q) ag[q] = 0.f, au[q] = 0.f;
  for (int i = lane; i < n_chunks; i += 32) {
    float xv[chunk_cols(F)], xsum;
    load_chunk<F>(xs, i, xv, &xsum);
#pragma unroll
    for (int q = 0; q < R; ++q) {
      if (q >= rows) break;
      ag[q] += chunk_dot<F>(g, H, r0 + q, i, xv, xsum);
      au[q] += chunk_dot<F>(u, H, r0 + q, i, xv, xsum);
    }
  }
#pragma unroll
  for (int q = 0; q < R; ++q) {
    const float gv = warp_sum(ag[q]), uv = warp_sum(au[q]);
    if (lane == 0 && q < rows) h[size_t(j) * I + r0 + q] = gv / (1.0f + expf(-gv)) * uv;
  }
}

// grid: x = row blocks of H, y = expert slot j. part[j, r] = down_r · h[j].
template <WeightFormat F>
__global__ void __launch_bounds__(32 * warps_per_block)
    down_kernel(const void* const* table, const int32_t* ids, Parts down, const float* __restrict__ h, int I, int H,
                float* __restrict__ part) {
  constexpr int R = rows_per_warp<F>();
  extern __shared__ float4 staged[];
  float* hj = reinterpret_cast<float*>(staged);
  const int j = blockIdx.y;
  stage_vector(h + size_t(j) * I, I, hj);
  const int r0 = (blockIdx.x * warps_per_block + threadIdx.x / 32) * R;
  if (r0 >= H) return;
  const Matrix d = matrix_at(blob_of(table, ids, j), down.data, down.scales, down.biases);
  const int lane = threadIdx.x & 31, rows = min(R, H - r0), n_chunks = I / chunk_cols(F);
  float acc[R];
#pragma unroll
  for (int q = 0; q < R; ++q) acc[q] = 0.f;
  for (int i = lane; i < n_chunks; i += 32) {
    float xv[chunk_cols(F)], xsum;
    load_chunk<F>(hj, i, xv, &xsum);
#pragma unroll
    for (int q = 0; q < R; ++q) {
      if (q >= rows) break;
      acc[q] += chunk_dot<F>(d, I, r0 + q, i, xv, xsum);
    }
  }
#pragma unroll
  for (int q = 0; q < R; ++q) {
    const float v = warp_sum(acc[q]);
    if (lane == 0 && q < rows) part[size_t(j) * H + r0 + q] = v;
  }
}

// y[r] = (y[r] when accumulating, else 0) + Σ_j w[j] · part[j, r], j in order.
__global__ void combine_kernel(const float* __restrict__ part, const float* __restrict__ w, int k, int H, bool accumulate,
                               float* __restrict__ y) {
  for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < H; r += gridDim.x * blockDim.x) {
    float acc = accumulate ? y[r] : 0.f;
    for (int j = 0; j < k; ++j) acc += w[j] * part[size_t(j) * H + r];
    y[r] = acc;
  }
}

Parts parts_of(const WeightView& v) {
  return {reinterpret_cast<uintptr_t>(v.data), reinterpret_cast<uintptr_t>(v.scales), reinterpret_cast<uintptr_t>(v.biases)};
}

// The v6 dot products read 16-byte chunks of each row: rows must start 16-byte aligned (blobs sit at
// 256-byte aligned slots, so the part's offset decides).
bool fits(const WeightView& v) {
  return v.cols % chunk_cols(v.format) == 0 && (reinterpret_cast<uintptr_t>(v.data) & 15u) == 0;
}

template <WeightFormat F>
void launch_gate_up(const ExpertLayout& l, const void* const* table, const int32_t* ids, int k, const float* x, float* h,
                    cudaStream_t stream) {
  constexpr int rows_per_block = warps_per_block * rows_per_warp<F>();
  const int I = int(l.gate.rows), H = int(l.gate.cols);
  const dim3 grid(unsigned((I + rows_per_block - 1) / rows_per_block), unsigned(k));
  gate_up_kernel<F><<<grid, 32 * warps_per_block, size_t(H) * sizeof(float), stream>>>(table, ids, parts_of(l.gate), parts_of(l.up), x,
                                                                                       I, H, h);
  MF_CUDA_CHECK_LAUNCH();
}

template <WeightFormat F>
void launch_down(const ExpertLayout& l, const void* const* table, const int32_t* ids, int k, const float* h, float* part,
                 cudaStream_t stream) {
  constexpr int rows_per_block = warps_per_block * rows_per_warp<F>();
  const int H = int(l.down.rows), I = int(l.down.cols);
  const dim3 grid(unsigned((H + rows_per_block - 1) / rows_per_block), unsigned(k));
  down_kernel<F><<<grid, 32 * warps_per_block, size_t(I) * sizeof(float), stream>>>(table, ids, parts_of(l.down), h, I, H, part);
  MF_CUDA_CHECK_LAUNCH();
}

[[noreturn]] void unsupported(const char* what) {
  std::fprintf(stderr, "%s:%d: moe_decode: %s\n", __FILE__, __LINE__, what);
  std::abort();
}

}  // namespace

void router_softmax_topk(const float* logits, int64_t n_tokens, int64_t n_expert, int64_t k, bool normalize, int32_t* ids,
                         float* weights, cudaStream_t stream) {
  if (n_tokens <= 0) return;
  if (k < 1 || k > max_router_k || k > n_expert) unsupported("router k outside [1, 64] or above n_expert");
  const size_t shared = size_t(n_expert) * (sizeof(float) + sizeof(bool));
  softmax_topk_kernel<<<unsigned(n_tokens), router_threads, shared, stream>>>(logits, int(n_expert), int(k), normalize, ids, weights);
  MF_CUDA_CHECK_LAUNCH();
}

void router_sigmoid_grouped_topk(const float* logits, const float* bias, int64_t n_tokens, int64_t n_expert, int64_t n_group,
                                 int64_t topk_group, int64_t k, bool normalize, float scaling, int32_t* ids, float* weights,
                                 cudaStream_t stream) {
  if (n_tokens <= 0) return;
  if (k < 1 || k > max_router_k || k > n_expert || n_group > 64) unsupported("grouped router: k outside [1, 64] or more than 64 groups");
  const size_t shared = size_t(n_expert) * (2 * sizeof(float) + sizeof(bool));
  sigmoid_grouped_topk_kernel<<<unsigned(n_tokens), router_threads, shared, stream>>>(
      logits, bias, int(n_expert), int(n_group), int(topk_group), int(k), normalize, scaling, ids, weights);
  MF_CUDA_CHECK_LAUNCH();
}

void moe_decode(const ExpertLayout& l, const void* const* table, const int32_t* ids, const float* weights, int64_t k, const float* x,
                float* h, float* part, float* y, bool accumulate, cudaStream_t stream) {
  if (k <= 0) return;
  if (l.gate.format != l.up.format) unsupported("gate_proj and up_proj in different formats");
  if (!fits(l.gate) || !fits(l.up) || !fits(l.down)) unsupported("expert matrices not 16-byte aligned or cols not a multiple of the chunk");
  // x (hidden) and one expert's h (intermediate) are staged whole in shared memory.
  if (l.gate.cols * 4 > 48 * 1024 || l.down.cols * 4 > 48 * 1024) unsupported("hidden or intermediate size above 12288");
  switch (l.gate.format) {
    case WeightFormat::f32: launch_gate_up<WeightFormat::f32>(l, table, ids, int(k), x, h, stream); break;
    case WeightFormat::bf16: launch_gate_up<WeightFormat::bf16>(l, table, ids, int(k), x, h, stream); break;
    case WeightFormat::q8: launch_gate_up<WeightFormat::q8>(l, table, ids, int(k), x, h, stream); break;
    case WeightFormat::q4: launch_gate_up<WeightFormat::q4>(l, table, ids, int(k), x, h, stream); break;
  }
  switch (l.down.format) {
    case WeightFormat::f32: launch_down<WeightFormat::f32>(l, table, ids, int(k), h, part, stream); break;
    case WeightFormat::bf16: launch_down<WeightFormat::bf16>(l, table, ids, int(k), h, part, stream); break;
    case WeightFormat::q8: launch_down<WeightFormat::q8>(l, table, ids, int(k), h, part, stream); break;
    case WeightFormat::q4: launch_down<WeightFormat::q4>(l, table, ids, int(k), h, part, stream); break;
  }
  const int H = int(l.down.rows);
  combine_kernel<<<grid_for(H, 256), 256, 0, stream>>>(part, weights, int(k), H, accumulate, y);
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace moeflux::cuda
