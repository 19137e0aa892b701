// The kernels of moe.cuh.
#include <cfloat>
#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_common.cuh"
#include "backends/cuda/matvec.cuh"
#include "backends/cuda/moe.cuh"
#include "backends/cuda/topk.cuh"

namespace moeflux::cuda {
namespace {

// ---- routers ---------------------------------------------------------------------------------------

constexpr int router_threads = 256;

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

// One token's softmax top-k by one warp: the choices in order in chosen[0 .. k), their weights in
// chosen_w, as router_softmax_topk defines them. Lane l takes experts l, l + 32, … in that order for the
// max, the exps and its part of the sum; the parts are added by a fixed shuffle tree (within 1e-6 of the
// host's expert-by-expert sum). The k best are then taken in k rounds, each the warp's largest key below
// the last round's (keys are distinct, so nothing needs marking): no block-wide step at all. p [E] is
// shared scratch. Above 1024 experts only: softmax_topk_regs below does the same in registers.
__device__ void softmax_topk_warp(const float* logits, int n_expert, int k, bool normalize, float* p, int* chosen, float* chosen_w) {
  const int lane = threadIdx.x & 31;
  float m = -FLT_MAX;
  for (int e = lane; e < n_expert; e += 32) m = fmaxf(m, logits[e]);
  m = warp_max(m);
  float part = 0.f;
  for (int e = lane; e < n_expert; e += 32) part += p[e] = expf(logits[e] - m);
  const float sum = warp_sum(part);
  for (int e = lane; e < n_expert; e += 32) p[e] /= sum;
  __syncwarp();
  unsigned long long last = ~0ull;
  float selected = 0.f;
  for (int j = 0; j < k; ++j) {
    unsigned long long best = 0;
    for (int e = lane; e < n_expert; e += 32) {
      const unsigned long long key = rank_key(p[e], e);
      if (key < last && key > best) best = key;
    }
    for (int o = 16; o > 0; o >>= 1) {
      const unsigned long long other = __shfl_xor_sync(0xffffffffu, best, o);
      best = other > best ? other : best;
    }
    last = best;
    const int e = int(0xffffffffu - unsigned(best & 0xffffffffu));
    const float pe = __uint_as_float(unsigned(best >> 32));
    selected += pe;
    if (lane == 0) chosen[j] = e, chosen_w[j] = pe;
  }
  __syncwarp();
  if (normalize)
    for (int j = lane; j < k; j += 32) chosen_w[j] /= selected;  // k may exceed the lanes (up to max_router_k)
}

// One warp per token. Shared (PL = 0 only): p [E].
template <int PL>
__global__ void softmax_topk_kernel(const float* __restrict__ logits, int n_expert, int k, bool normalize, int32_t* ids,
                                    float* weights) {
  dependent_launch_begin();
  extern __shared__ float p[];
  __shared__ int chosen[max_router_k];
  __shared__ float chosen_w[max_router_k];
  if constexpr (PL == 0)
    softmax_topk_warp(logits + size_t(blockIdx.x) * n_expert, n_expert, k, normalize, p, chosen, chosen_w);
  else
    softmax_topk_regs<PL>(logits + size_t(blockIdx.x) * n_expert, n_expert, k, normalize, chosen, chosen_w);
  __syncwarp();
  for (int j = threadIdx.x; j < k; j += 32) {
    ids[size_t(blockIdx.x) * k + j] = chosen[j];
    weights[size_t(blockIdx.x) * k + j] = chosen_w[j];
  }
}

// One block per token. Shared: s [E], c [E] floats, taken [E] bools.
__global__ void sigmoid_grouped_topk_kernel(const float* __restrict__ logits, const float* __restrict__ bias, int n_expert,
                                            int n_group, int topk_group, int k, bool normalize, float scaling, int32_t* ids,
                                            float* weights) {
  dependent_launch_begin();
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

constexpr int moe_warps = 8;
constexpr int max_moe_k = 64;
// gate/up: rows per warp (each a gate row and its up row) and chunks in flight per lane (U 2: 0–15%
// slower on the three families' layers, matmul_bench --moe, H100).
constexpr int gate_up_rows = 2, gate_up_unroll = 1;
// down + combine: output rows per warp, and the most chunks of a row a lane holds (lanes_per_expert).
// Up to 6 lets Qwen3-30B's q4 down (24 chunks a row) run its 8 experts in one pass at 4 lanes each (its
// router + experts 22.4 → 20.6 µs against at most 4: two passes at 8 lanes), while Qwen3.5's and
// DeepSeek-V3's wider rows keep 8 and 16 lanes (at most 8 gave them 4 and 8: 8–17% slower; matmul_bench
// --moe, H100, session 13).
constexpr int down_rows = 2, down_chunks = 6;

struct Parts {
  uintptr_t data, scales, biases;
};

// Row r of one matrix of a blob: its bytes, and its scales' and biases' rows.
template <WeightFormat F>
struct Row {
  const uint8_t* data;
  const uint16_t* scales;
  const uint16_t* biases;
  __device__ __forceinline__ Row(const uint8_t* blob, const Parts& p, int r, int cols)
      : data(blob + p.data + int64_t(r) * row_bytes(F, cols)),
        scales(reinterpret_cast<const uint16_t*>(blob + p.scales) + int64_t(r) * groups_per_row(F, cols)),
        biases(reinterpret_cast<const uint16_t*>(blob + p.biases) + int64_t(r) * groups_per_row(F, cols)) {}
  __device__ __forceinline__ Chunk chunk(int i) const { return load_chunk<F, true>(data, scales, biases, i); }  // read once a token
};

// Through L2 (ld.cg): down_combine reads the ids and the table before its dependent-launch wait, where
// this SM's L1 may still hold lines from an earlier step.
__device__ __forceinline__ const uint8_t* blob_of(const void* const* table, const int32_t* ids, int j) {
  const auto blob = __ldcg(reinterpret_cast<const unsigned long long*>(table) + __ldcg(ids + j));
  if (!blob) __trap();  // the caller guarantees every chosen expert is in the table
  return reinterpret_cast<const uint8_t*>(blob);
}

// The most table entries gate_up_kernel reads into shared memory before its wait (Qwen3.5-397B's 512).
constexpr int max_preload_table = 512;

// grid: x = tiles of moe_warps · gate_up_rows rows of I, y = expert slot j.
// h[j, r] = silu(gate_r · x) · (up_r · x). x is staged once per block; a lane's first loads are in flight
// while it is. With n_table entries (1 … max_preload_table) the block reads the whole table into shared
// memory before its dependent-launch wait, so that after the wait its blob is one L2 round trip away (the
// id), not two (--layer 45.3 → 44.8 µs, H100). The table is safe to read that early: no kernel writes it
// (the expert store's copies do, in stream order before this launch, and a copy between two kernels ends
// before the second starts), as down_combine_kernel's early reads rely on too.
template <WeightFormat F, int R, int U>
__global__ void __launch_bounds__(32 * moe_warps) gate_up_kernel(const void* const* table, int n_table, const int32_t* ids, Parts gate,
                                                                 Parts up, const float* __restrict__ x, int I, int H, float* __restrict__ h) {
  __shared__ unsigned long long preloaded[max_preload_table];
  for (int e = threadIdx.x; e < n_table; e += blockDim.x) preloaded[e] = __ldcg(reinterpret_cast<const unsigned long long*>(table) + e);
  if (n_table > 0) __syncthreads();
  const unsigned long long entered = wait_trace_now();
  dependent_launch_begin();
  wait_trace_mark(0, entered);
  extern __shared__ float4 xs[];
  const int j = blockIdx.y, lane = threadIdx.x & 31;
  const int r0 = (blockIdx.x * moe_warps + (threadIdx.x >> 5)) * R;
  const bool active = r0 < I;
  const int rows = active ? min(R, I - r0) : 1, n_chunks = H / chunk_cols(F);
  const int id = n_table > 0 ? __ldcg(ids + j) : 0;
  if (n_table > 0 && unsigned(id) >= unsigned(n_table)) __trap();  // the router's ids are below n_expert
  const uint8_t* blob = n_table > 0 ? reinterpret_cast<const uint8_t*>(preloaded[id]) : blob_of(table, ids, j);
  if (!blob) __trap();  // the caller guarantees every chosen expert is in the table
  wait_trace_mark(1);
  Chunk c[U][2 * R];  // gate rows, then up rows
  const auto load = [&](int i0) {
#pragma unroll
    for (int v = 0; v < U; ++v) {
      const int i = min(i0 + 32 * v, n_chunks - 1);
#pragma unroll
      for (int q = 0; q < R; ++q) {
        const int r = r0 + min(q, rows - 1);  // rows past the matrix re-read its last row, never stored
        c[v][q] = Row<F>(blob, gate, r, H).chunk(i);
        c[v][R + q] = Row<F>(blob, up, r, H).chunk(i);
      }
    }
  };
  if (active) load(lane);
  stage_chunked<F, 4>(x, H, xs);
  __syncthreads();
  wait_trace_mark(2);
  if (!active) return;
  float acc[2 * R];
#pragma unroll
  for (int q = 0; q < 2 * R; ++q) acc[q] = 0.f;
  for (int i0 = lane; i0 < n_chunks; i0 += 32 * U) {
    if (i0 != lane) load(i0);
#pragma unroll
    for (int v = 0; v < U; ++v) {
      const int i = i0 + 32 * v;
      if (i < n_chunks) chunk_dots<F, 2 * R>(c[v], xs + i * staged_pitch(F), acc);
    }
    if (i0 == lane) wait_trace_mark(3);
  }
  wait_trace_mark(4);
#pragma unroll
  for (int q = 0; q < R; ++q) {
    const float gv = warp_sum(acc[q]), uv = warp_sum(acc[R + q]);
    if (lane == 0 && q < rows) h[size_t(j) * I + r0 + q] = swiglu_of(gv, uv);
  }
  wait_trace_mark(5);
}

// grid: x = tiles of moe_warps · down_rows rows of H. A warp takes down_rows output rows over every
// expert: groups of G lanes take one expert each (32 / G experts per pass), then for each row r
//   y[r] = (y[r] when accumulating, else 0) + Σ_j w[j] · (down_j · h[j])_r,  j in order.
// Shared: every expert's h staged (while the first pass's loads are in flight), then the warps' dots.
// The first pass's weights are asked for before the dependent-launch wait: the ids and the table were
// written before the kernel launched (by the router, whose completion the gate/up kernel before this one
// waited for before letting this one launch), and only h comes from the kernel just before.
template <WeightFormat F, int R, int C>
__global__ void __launch_bounds__(32 * moe_warps)
    down_combine_kernel(const void* const* table, const int32_t* ids, const float* __restrict__ w, int k, Parts down,
                        const float* __restrict__ h, int I, int H, int G, bool accumulate, float* __restrict__ y) {
  extern __shared__ float4 hs[];
  __shared__ float dots[moe_warps][R][max_moe_k];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int r0 = (blockIdx.x * moe_warps + warp) * R;
  const bool active = r0 < H;
  const int rows = active ? min(R, H - r0) : 1;
  const int n_chunks = I / chunk_cols(F), per_expert = n_chunks * staged_pitch(F);
  const int per_pass = 32 / G, slot = lane / G, g_lane = lane % G;
  Chunk c[C][R];
  const auto load = [&](const uint8_t* blob, int i0) {
#pragma unroll
    for (int m = 0; m < C; ++m) {
      const int i = min(i0 + G * m, n_chunks - 1);
#pragma unroll
      for (int q = 0; q < R; ++q) c[m][q] = Row<F>(blob, down, r0 + min(q, rows - 1), I).chunk(i);
    }
  };
  const uint8_t* blob = active && slot < k ? blob_of(table, ids, slot) : nullptr;
  if (blob) load(blob, g_lane);
  // The router's weights too, written with the ids: lane l holds w[l] and w[l + 32], passed by shuffles
  // in the combine (after the wait every warp read the same few bytes there).
  const float w_lo = lane < k ? __ldcg(w + lane) : 0.f, w_hi = lane + 32 < k ? __ldcg(w + lane + 32) : 0.f;
  const unsigned long long entered = wait_trace_now();
  dependent_launch_begin();
  wait_trace_mark(0, entered);
  stage_chunked<F, 4>(h, k * I, hs);  // the experts' rows are contiguous, and so are their staged chunks
  __syncthreads();
  wait_trace_mark(1);
  if (!active) return;
  for (int j0 = 0; j0 < k; j0 += per_pass) {
    const int j = j0 + slot;
    float acc[R];
#pragma unroll
    for (int q = 0; q < R; ++q) acc[q] = 0.f;
    if (j < k) {
      if (j0 > 0) blob = blob_of(table, ids, j);
      const float4* hj = hs + j * per_expert;
      for (int i0 = g_lane; i0 < n_chunks; i0 += G * C) {
        if (j0 > 0 || i0 != g_lane) load(blob, i0);
#pragma unroll
        for (int m = 0; m < C; ++m) {
          const int i = i0 + G * m;
          if (i < n_chunks) chunk_dots<F, R>(c[m], hj + i * staged_pitch(F), acc);
        }
      }
    }
#pragma unroll
    for (int q = 0; q < R; ++q) {
      for (int o = G / 2; o > 0; o >>= 1) acc[q] += __shfl_xor_sync(0xffffffffu, acc[q], o);
      if (g_lane == 0 && j < k) dots[warp][q][j] = acc[q];
    }
  }
  __syncwarp();
  wait_trace_mark(2);
  float acc = lane < rows && accumulate ? y[r0 + lane] : 0.f;
  for (int j = 0; j < k; ++j) {
    const float wj = __shfl_sync(0xffffffffu, j < 32 ? w_lo : w_hi, j & 31);
    if (lane < rows) acc += wj * dots[warp][lane][j];
  }
  if (lane < rows) y[r0 + lane] = acc;
  wait_trace_mark(3);
}

Parts parts_of(const WeightView& v) {
  return {reinterpret_cast<uintptr_t>(v.data), reinterpret_cast<uintptr_t>(v.scales), reinterpret_cast<uintptr_t>(v.biases)};
}

// Rows are read in 16-byte chunks: they must start 16-byte aligned (blobs sit at 256-byte aligned
// slots, so the part's offset decides).
bool fits(const WeightView& v) {
  return v.cols % chunk_cols(v.format) == 0 && (reinterpret_cast<uintptr_t>(v.data) & 15u) == 0;
}

// Lanes per expert in down_combine, from the layout alone (never from k: a token's experts run in groups
// when the GPU cannot hold them all, and each expert's sum must be the same in any group): enough that a
// lane holds at most down_chunks chunks of a row, 4 to 32.
int lanes_per_expert(int n_chunks) {
  int g = 4;
  while (g < 32 && (n_chunks + g - 1) / g > down_chunks) g *= 2;
  return g;
}

// Shared memory beyond the default 48 KiB (dynamic `bytes` plus the kernel's static `fixed`) must be asked
// for, per kernel.
template <typename Kernel>
void allow_shared(Kernel kernel, size_t bytes, size_t fixed = 0) {
  if (bytes + fixed > 48 * 1024) MF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

// MOEFLUX_CUDA_PRELOAD_TABLE=0 (a developer's switch, read once): gate/up looks its blob up after the wait.
bool preload_table_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("MOEFLUX_CUDA_PRELOAD_TABLE");
    return !(e && e[0] == '0');
  }();
  return on;
}

template <WeightFormat F>
void launch_gate_up(const ExpertLayout& l, const void* const* table, const int32_t* ids, int k, const float* x, float* h,
                    cudaStream_t stream) {
  constexpr int R = gate_up_rows, U = gate_up_unroll;
  constexpr int rows_per_block = moe_warps * R;
  const int I = int(l.gate.rows), H = int(l.gate.cols);
  const dim3 grid(unsigned((I + rows_per_block - 1) / rows_per_block), unsigned(k));
  const size_t shared = size_t(staged_bytes(F, H));
  allow_shared(gate_up_kernel<F, R, U>, shared);
  const int n_table = l.n_table > 0 && l.n_table <= max_preload_table && preload_table_enabled() ? int(l.n_table) : 0;
  launch(gate_up_kernel<F, R, U>, grid, 32 * moe_warps, shared, stream, table, n_table, ids, parts_of(l.gate), parts_of(l.up), x, I, H, h);
  MF_CUDA_CHECK_LAUNCH();
}

constexpr size_t down_dots_bytes = sizeof(float) * moe_warps * down_rows * max_moe_k;

template <WeightFormat F>
void launch_down(const ExpertLayout& l, const void* const* table, const int32_t* ids, const float* weights, int k, const float* h,
                 bool accumulate, float* y, cudaStream_t stream) {
  constexpr int R = down_rows, C = down_chunks;
  const int H = int(l.down.rows), I = int(l.down.cols);
  constexpr int rows_per_block = moe_warps * R;
  const size_t per_expert = size_t(staged_bytes(F, I));
  // As many experts per launch as their h fit in a block's shared memory (moe_decode checked that one
  // does); each launch continues the last one's sums, which the accumulate contract makes the same bits.
  const int fit = int(std::min<size_t>(size_t(k), (size_t(device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>()) - down_dots_bytes) / per_expert));
  const int G = lanes_per_expert(I / chunk_cols(F));
  for (int j0 = 0; j0 < k; j0 += fit) {
    const int n = std::min(fit, k - j0);
    const unsigned blocks = unsigned((H + rows_per_block - 1) / rows_per_block);
    const size_t shared = spread_shared(size_t(n) * per_expert + down_dots_bytes, blocks, spread_down) - down_dots_bytes;
    allow_shared(down_combine_kernel<F, R, C>, shared, down_dots_bytes);
    launch(down_combine_kernel<F, R, C>, blocks, 32 * moe_warps, shared, stream, table,
           ids + j0, weights + j0, n, parts_of(l.down), h + size_t(j0) * I, I, H, G, accumulate || j0 > 0, y);
    MF_CUDA_CHECK_LAUNCH();
  }
}

[[noreturn]] void unsupported(const char* what) {
  std::fprintf(stderr, "%s:%d: moe_decode: %s\n", __FILE__, __LINE__, what);
  std::abort();
}

}  // namespace

// Shared memory of the routers' kernels: the softmax one's scores (when they do not fit in a warp's
// registers), the grouped one's scores, biased scores and flags; at most router_shared_max.
constexpr size_t router_shared_max = 44 * 1024;
size_t softmax_router_shared(int64_t n_expert) { return size_t(n_expert) * sizeof(float); }
size_t grouped_router_shared(int64_t n_expert) { return size_t(n_expert) * (2 * sizeof(float) + sizeof(bool)); }

bool routes_on_device(int64_t n_expert, int64_t k, int64_t n_group) {
  if (k < 1 || k > max_router_k || k > n_expert) return false;
  if (n_group == 0) return softmax_router_shared(n_expert) <= router_shared_max;
  return n_group <= 64 && grouped_router_shared(n_expert) <= router_shared_max;
}

void router_softmax_topk(const float* logits, int64_t n_tokens, int64_t n_expert, int64_t k, bool normalize, int32_t* ids,
                         float* weights, cudaStream_t stream) {
  if (n_tokens <= 0) return;
  if (!routes_on_device(n_expert, k, 0)) unsupported("router k outside [1, 64], above n_expert, or more than 11264 experts");
  const size_t shared = softmax_router_shared(n_expert);
  const auto go = [&](auto kernel, size_t bytes) {
    launch(kernel, unsigned(n_tokens), 32, bytes, stream, logits, int(n_expert), int(k), normalize, ids, weights);
  };
  switch (router_lane_experts(n_expert)) {
    case 4: go(softmax_topk_kernel<4>, 0); break;
    case 8: go(softmax_topk_kernel<8>, 0); break;
    case 16: go(softmax_topk_kernel<16>, 0); break;
    case 32: go(softmax_topk_kernel<32>, 0); break;
    default: go(softmax_topk_kernel<0>, shared); break;
  }
  MF_CUDA_CHECK_LAUNCH();
}

void router_sigmoid_grouped_topk(const float* logits, const float* bias, int64_t n_tokens, int64_t n_expert, int64_t n_group,
                                 int64_t topk_group, int64_t k, bool normalize, float scaling, int32_t* ids, float* weights,
                                 cudaStream_t stream) {
  if (n_tokens <= 0) return;
  if (n_group < 1 || !routes_on_device(n_expert, k, n_group))
    unsupported("grouped router: k outside [1, 64], more than 64 groups or more than 5006 experts");
  const size_t shared = grouped_router_shared(n_expert);
  launch(sigmoid_grouped_topk_kernel, unsigned(n_tokens), router_threads, shared, stream,
         logits, bias, int(n_expert), int(n_group), int(topk_group), int(k), normalize, scaling, ids, weights);
  MF_CUDA_CHECK_LAUNCH();
}

namespace {

void check_layout(const ExpertLayout& l, int64_t k) {
  if (k > max_moe_k) unsupported("more than 64 experts per token");
  if (l.gate.format != l.up.format) unsupported("gate_proj and up_proj in different formats");
  if (!fits(l.gate) || !fits(l.up) || !fits(l.down)) unsupported("expert matrices not 16-byte aligned or cols not a multiple of the chunk");
  // x (hidden) and at least one expert's h (intermediate) are staged whole in shared memory.
  const size_t shared_max = size_t(device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>());
  if (size_t(staged_bytes(l.gate.format, l.gate.cols)) > shared_max ||
      size_t(staged_bytes(l.down.format, l.down.cols)) + down_dots_bytes > shared_max)
    unsupported("hidden or intermediate size too large for shared memory");
}

}  // namespace

void moe_decode(const ExpertLayout& l, const void* const* table, const int32_t* ids, const float* weights, int64_t k, const float* x,
                float* h, float* part, float* y, bool accumulate, cudaStream_t stream) {
  (void)part;  // the down products are combined in registers
  if (k <= 0) return;
  check_layout(l, k);
  with_format(l.gate.format, [&](auto f) { launch_gate_up<decltype(f)::value>(l, table, ids, int(k), x, h, stream); });
  with_format(l.down.format, [&](auto f) { launch_down<decltype(f)::value>(l, table, ids, weights, int(k), h, accumulate, y, stream); });
}

}  // namespace moeflux::cuda
