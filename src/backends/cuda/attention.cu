// The kernels of attention.cuh: the simple kernel (one block per query head and token), the tiled
// kernel (one block per KV head, tile of query rows and slice of keys) and the combine of split partials.
#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include <cooperative_groups.h>

#include "backends/cuda/attention.cuh"
#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_common.cuh"

namespace moeflux::cuda {
namespace {

namespace cg = cooperative_groups;

// --- The simple kernel ------------------------------------------------------------------------------

constexpr int attention_warps = 4;

// Shared memory: q [k_dim], then each warp's weighted value sum [attention_warps, v_dim].
__global__ void __launch_bounds__(32 * attention_warps)
    attention_kernel(const float* __restrict__ q, const float* __restrict__ k_cache, const float* __restrict__ v_cache,
                     int64_t n_past, AttentionLayout l, int64_t group, float scale, float* __restrict__ out) {
  dependent_launch_begin();
  extern __shared__ float shared[];
  __shared__ float warp_max_s[attention_warps], warp_sum_p[attention_warps];
  const int64_t h = blockIdx.x, t = blockIdx.y, kv = h / group;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* qs = shared;
  float* acc = shared + l.k_dim + warp * l.v_dim;
  const float* qh = q + (t * l.n_head + h) * l.k_dim;
  for (int64_t d = threadIdx.x; d < l.k_dim; d += blockDim.x) qs[d] = qh[d];
  for (int64_t d = lane; d < l.v_dim; d += 32) acc[d] = 0.f;
  __syncthreads();
  const int64_t n_keys = n_past + t + 1;
  float m = -INFINITY, sum = 0.f;
  for (int64_t j = warp; j < n_keys; j += attention_warps) {
    const float* kj = k_cache + j * l.k_stride + kv * l.k_dim;
    float dot = 0.f;
    for (int64_t d = lane; d < l.k_dim; d += 32) dot += qs[d] * kj[d];
    const float s = warp_sum(dot) * scale;
    const float m_new = fmaxf(m, s);
    const float correction = expf(m - m_new), p = expf(s - m_new);  // expf(−inf) = 0 on the first key
    sum = sum * correction + p;
    const float* vj = v_cache + j * l.v_stride + kv * l.v_dim;
    for (int64_t d = lane; d < l.v_dim; d += 32) acc[d] = acc[d] * correction + p * vj[d];
    m = m_new;
  }
  if (lane == 0) warp_max_s[warp] = m, warp_sum_p[warp] = sum;
  __syncthreads();
  float m_all = -INFINITY;
  for (int w = 0; w < attention_warps; ++w) m_all = fmaxf(m_all, warp_max_s[w]);
  float weight[attention_warps], total = 0.f;
  for (int w = 0; w < attention_warps; ++w) {
    weight[w] = warp_max_s[w] == -INFINITY ? 0.f : expf(warp_max_s[w] - m_all);  // a warp that saw no key weighs 0
    total += warp_sum_p[w] * weight[w];
  }
  float* oh = out + (t * l.n_head + h) * l.v_dim;
  for (int64_t d = threadIdx.x; d < l.v_dim; d += blockDim.x) {
    float o = 0.f;
    for (int w = 0; w < attention_warps; ++w) o += shared[l.k_dim + w * l.v_dim + d] * weight[w];
    oh[d] = o / total;
  }
}

void attention_simple(const float* q, const float* k_cache, const float* v_cache, int64_t n_tokens, int64_t n_past,
                      const AttentionLayout& layout, float scale, float* out, cudaStream_t stream) {
  const size_t shared = size_t(layout.k_dim + attention_warps * layout.v_dim) * sizeof(float);
  if (shared > 48 * 1024) MF_CUDA_CHECK(cudaFuncSetAttribute(attention_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared)));
  // Tokens beyond grid.y's 65535 go in further launches, each a later slice of queries.
  for (int64_t t0 = 0; t0 < n_tokens; t0 += 65535) {
    const dim3 grid(unsigned(layout.n_head), unsigned(std::min<int64_t>(n_tokens - t0, 65535)));
    launch(attention_kernel, grid, 32 * attention_warps, shared, stream, q + t0 * layout.n_head * layout.k_dim, k_cache, v_cache,
           n_past + t0, layout, layout.n_head / layout.n_head_kv, scale, out + t0 * layout.n_head * layout.v_dim);
    MF_CUDA_CHECK_LAUNCH();
  }
}

// --- The tiled kernel -------------------------------------------------------------------------------
//
// The query rows of KV head kv are its (token, head) pairs, row = t·group + (h − kv·group), so a tile
// of rows is the GQA group of one token or of a few tokens (prefill), or a slice of MLA's 128 heads. A
// block takes rows (= warps · RW) of them and the keys of one split, tile_keys at a time: each tile of
// K (and V) is copied to shared memory once (cp.async, two buffers) and every row of the block reads it
// there. Warp w owns rows w·RW … w·RW + RW − 1 throughout: for the scores lane (kg, dp) takes keys
// 4·kg … 4·kg + 3 over the float4 columns ≡ dp (mod 4) (key rows padded so that 16-byte reads of 8
// lanes hit distinct banks) and the 4 lanes of a key group sum up; for the weighted sum lane i takes
// value columns 4·(i + 32·c), c < VPL. The online softmax state (max, sum) is per row, replicated
// across the warp's lanes, in base 2 (q is pre-scaled by scale·log2 e).

constexpr int tile_keys = 32;
constexpr int max_rotary_half = 128;  // 32 · max_lane_dims / 2
constexpr int tiled_threads_max = 256;

struct TiledArgs {
  const float* q;
  const float* k_cache;
  const float* v_cache;  // == k_cache in the latent layout: the value tile is the key tile's prefix
  float* k_cache_out;    // k_cache, where the new key is written back (q_norm set)
  AttentionLayout l;
  int64_t n_past, group;
  int64_t rows_per_kv;     // n_tokens · group
  int64_t n_row_tiles;     // per KV head
  int64_t keys_per_split;  // a multiple of tile_keys
  int64_t rows_out;        // n_tokens · n_head: rows of out, and of each split's partials
  int k_pitch, v_pitch;    // floats per key row of the shared K and V tiles
  bool latent;
  float q_scale;           // scale · log2 e
  float* out;              // the result, when there is one split
  float* part_o;           // else [n_split, rows_out, v_dim] unnormalized sums
  float* part_ml;          // and  [n_split, rows_out, 2] (max, sum) in base 2
  unsigned* counters;      // with partials: a zeroed counter per block column (blockIdx.x); the last split
                           // of a column to finish combines its rows (else attention_combine_kernel does)
  // A decode token's q/k head norms and rotary, taken here (attention_qk_norm_rope) where q_norm is set:
  // each warp normalizes and rotates its q rows in registers, and warp 0 of the block whose keys hold the
  // new one (position n_past: one row tile per KV head, so one block) that key, writing it back to the
  // cache for later steps and into its shared tile.
  const float* q_norm;
  const float* k_norm;
  float eps, position;
  int half;
  // The rotary frequencies by value, in the kernel's parameters (read from the constant bank): a load
  // from device memory before the wait took a decode block ~2 µs while q/k/v streamed its weights, so
  // that most blocks reached the wait only after q/k/v had finished (the wait probe, session 21).
  float inv_freq[max_rotary_half];
  int cluster;  // the decode kernel: its splits are a cluster of this many blocks (else 0)
};

// qk_norm_rope_kernel's arithmetic (norm_rope.cu) on one head row held by a warp in registers, lane l
// holding dims l, l + 32, … (dim ≤ 32 · N, half a multiple of 32, so that both dims of each rotary pair
// sit in the same lane): rms_norm with weight w(m) (dim l + 32·m's), then rotary over the first 2·half
// dims with the lane's cos/sin, then × post_scale.
constexpr int max_lane_dims = 8;
template <int N, typename Weight>
__device__ __forceinline__ void norm_rope_lanes(float (&v)[N], int per, Weight w, const TiledArgs& a, const float (&c)[N / 2],
                                                const float (&sn)[N / 2], float post_scale) {
  const int dim = 32 * per, pairs = a.half / 32;
  float sum_sq = 0.f;
#pragma unroll
  for (int m = 0; m < N; ++m)
    if (m < per) sum_sq += v[m] * v[m];
  sum_sq = warp_sum(sum_sq);
  const float inv_rms = 1.0f / sqrtf(sum_sq / float(dim) + a.eps);
#pragma unroll
  for (int m = 0; m < N; ++m)
    if (m < per) v[m] = v[m] * inv_rms * w(m);
  // Dim m's partner is dim m + pairs of the lane: a constant in each case below, so that v stays in
  // registers (indexed by the runtime count, v and k_new went to the stack, 96 bytes a thread; the layer
  // chain of matmul_bench --layer 49.2 -> 48.6 µs).
  const auto rotate = [&](auto n_pairs) {
    constexpr int P = decltype(n_pairs)::value;
#pragma unroll
    for (int m = 0; m < P; ++m) {
      const float x0 = v[m], x1 = v[m + P];
      v[m] = x0 * c[m] - x1 * sn[m];
      v[m + P] = x1 * c[m] + x0 * sn[m];
    }
  };
  static_assert(N == 4 || N == 8, "rotate's cases");
  switch (pairs) {  // at most per / 2 (the callers check 2·half ≤ dim)
    case 0: break;
    case 1: rotate(std::integral_constant<int, 1>{}); break;
    case 2: rotate(std::integral_constant<int, 2>{}); break;
    case 3: rotate(std::integral_constant<int, N == 8 ? 3 : 2>{}); break;
    default: rotate(std::integral_constant<int, N / 2>{}); break;
  }
  if (post_scale != 1.f) {
#pragma unroll
    for (int m = 0; m < N; ++m) v[m] *= post_scale;
  }
}

// The lane's rotary cos/sin for norm_rope_lanes: pair i (dims lane + 32·i and its partner) at a.position.
template <int H>
__device__ __forceinline__ void rotary_lanes(const TiledArgs& a, float (&c)[H], float (&sn)[H]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < H; ++i) {
    const float angle = i < a.half / 32 ? a.position * a.inv_freq[lane + 32 * i] : 0.f;  // fp32, as the reference
    c[i] = cosf(angle), sn[i] = sinf(angle);
  }
}

constexpr int max_splits = 256;  // a warp's combine weights (combine_row)
constexpr int max_cluster = 16;  // the decode kernel's splits as one cluster (past 8, Hopper's non-portable sizes)

// out[row] = Σ_s e^(m_s − M) o_s / Σ_s e^(m_s − M) l_s over the split partials, M = max_s m_s; a split
// that saw no key of the row (m = −inf) weighs 0. By one warp (lanes over the splits, then over float4
// columns, each in split order), w: n_split floats of shared memory for the warp. The partials are read
// past L1 (__ldcg): other blocks wrote them during this kernel when the last split combines. Each read is
// a round trip to the L2, which is most of a short decode's combine: a lane's (m, l) pair is read once,
// its column's partials B at a time, all in flight before the first is added, and (Early) the first batch
// goes out with the (m, l) read (neither depends on the other). Decode's one row a warp takes B = 16, Early
// (19 splits: two round trips after the count, where 8 without Early took four); the forms with more rows
// a warp keep 8, late, whose registers it would raise past 128.
template <int B, bool Early>
__device__ void combine_row(const float* __restrict__ part_o, const float* __restrict__ part_ml, int n_split, int64_t rows_out,
                            int64_t v_dim, int64_t row, float* __restrict__ out, float* w) {
  const int lane = threadIdx.x & 31;
  const int64_t v4 = v_dim / 4;
  const float4* po = reinterpret_cast<const float4*>(part_o) + row * v4;
  float4 p[B];
  const auto load_batch = [&](int64_t c, int s0) {
#pragma unroll
    for (int i = 0; i < B; ++i)
      if (s0 + i < n_split) p[i] = __ldcg(po + (s0 + i) * rows_out * v4 + c);
  };
  if (Early && lane < v4) load_batch(lane, 0);
  // Splits 0 … 31 (a decode's usual count) from the one read; any past them read again for the weights.
  const auto ml_at = [&](int s) { return __ldcg(reinterpret_cast<const float2*>(part_ml) + s * rows_out + row); };
  const float2 first = lane < n_split ? ml_at(lane) : make_float2(-INFINITY, 0.f);
  float m_max = first.x;
  for (int s = lane + 32; s < n_split; s += 32) m_max = fmaxf(m_max, ml_at(s).x);
  m_max = warp_max(m_max);
  float total = 0.f;
  for (int s = lane; s < n_split; s += 32) {
    const float2 ml = s == lane ? first : ml_at(s);
    const float ws = ml.x == -INFINITY ? 0.f : exp2f(ml.x - m_max);
    w[s] = ws;
    total = fmaf(ws, ml.y, total);
  }
  const float inv_total = 1.f / warp_sum(total);
  __syncwarp();
  for (int64_t c = lane; c < v4; c += 32) {
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s0 = 0; s0 < n_split; s0 += B) {
      if (!Early || c != lane || s0 != 0) load_batch(c, s0);
#pragma unroll
      for (int i = 0; i < B; ++i) {
        if (s0 + i >= n_split) break;
        const float ws = w[s0 + i];
        o.x = fmaf(ws, p[i].x, o.x), o.y = fmaf(ws, p[i].y, o.y), o.z = fmaf(ws, p[i].z, o.z), o.w = fmaf(ws, p[i].w, o.w);
      }
    }
    reinterpret_cast<float4*>(out + row * v_dim)[c] = make_float4(o.x * inv_total, o.y * inv_total, o.z * inv_total, o.w * inv_total);
  }
  __syncwarp();  // w is reused by the warp's next row
}

// The split count, by every thread of the block after it wrote its partials: publishes them (fence, then
// the count) and tells whether this block is the last split of its block column (blockIdx.x) to finish;
// that one's later reads are ordered after the count.
__device__ __forceinline__ bool last_split_to_finish(unsigned* counters) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counters + blockIdx.x, 1u) == gridDim.y - 1;
  __syncthreads();
  wait_trace_mark(4);
  if (last) __threadfence();
  return last;
}

template <int RW, int VPL>
__global__ void __launch_bounds__(tiled_threads_max) attention_tiled_kernel(const __grid_constant__ TiledArgs a) {
  const unsigned long long entered = wait_trace_now();
  extern __shared__ float4 shared4[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  const int rows = n_warps * RW;
  const int64_t row_tile = blockIdx.x % a.n_row_tiles, kv = blockIdx.x / a.n_row_tiles, split = blockIdx.y;
  const int64_t row0 = row_tile * rows;
  const int64_t k4 = a.l.k_dim / 4, v4 = a.l.v_dim / 4, kp4 = a.k_pitch / 4, vp4 = a.v_pitch / 4;
  float4* qs = shared4;                                  // [rows, k_dim], pre-scaled
  // Two buffers of [K tile [tile_keys, k_pitch], V tile [tile_keys, v_pitch] (none when latent)]: one
  // is read while cp.async fills the other with the next tile.
  float4* tiles = qs + rows * k4;
  const int tile4 = tile_keys * int(kp4) + (a.latent ? 0 : tile_keys * int(vp4));

  const int k4i = int(k4), v4i = int(v4);
  // Keys of this block: its split, up to the last key its last row sees (causal).
  const int64_t last_row = (row0 + rows < a.rows_per_kv ? row0 + rows : a.rows_per_kv) - 1;
  const int64_t key_begin = split * a.keys_per_split;
  const int64_t rows_key_end = a.n_past + last_row / a.group + 1;
  const int64_t key_end = key_begin + a.keys_per_split < rows_key_end ? key_begin + a.keys_per_split : rows_key_end;
  int64_t row_key_end[RW];  // keys [0, row_key_end) are visible to the row; 0 for rows past the end
  for (int r = 0; r < RW; ++r) {
    const int64_t row = row0 + warp * RW + r;
    row_key_end[r] = row < a.rows_per_kv ? a.n_past + row / a.group + 1 : 0;
  }
  const bool warp_busy = row0 + warp * RW < a.rows_per_kv;

  float m[RW], l[RW], acc[RW][VPL][4];
  for (int r = 0; r < RW; ++r) {
    m[r] = -INFINITY, l[r] = 0.f;
    for (int c = 0; c < VPL; ++c) acc[r][c][0] = acc[r][c][1] = acc[r][c][2] = acc[r][c][3] = 0.f;
  }
  const float4* k_base = reinterpret_cast<const float4*>(a.k_cache) + kv * k4;
  const float4* v_base = reinterpret_cast<const float4*>(a.v_cache) + kv * v4;
  const int64_t k_stride4 = a.l.k_stride / 4, v_stride4 = a.l.v_stride / 4;

  // Tile loads: element i = j·dim4 + c of a tile goes to the thread i mod blockDim; a thread walks its
  // elements by fixed steps instead of dividing (the division cost as much as the copies).
  auto issue_rows = [&](float4* dst, int pitch4, const float4* src, int64_t stride4, int dim4, int nk) {
    const int j_step = int(blockDim.x) / dim4, c_step = int(blockDim.x) - j_step * dim4;
    int j = int(threadIdx.x) / dim4, c = int(threadIdx.x) - j * dim4;
    while (j < nk) {
      cp_async16(dst + j * pitch4 + c, src + j * stride4 + c);
      j += j_step, c += c_step;
      if (c >= dim4) c -= dim4, ++j;
    }
  };
  auto issue = [&](int64_t kb, int buf) {
    const int nk = key_end - kb < tile_keys ? int(key_end - kb) : tile_keys;
    float4* kd = tiles + buf * tile4;
    issue_rows(kd, int(kp4), k_base + kb * k_stride4, k_stride4, k4i, nk);
    if (!a.latent) issue_rows(kd + tile_keys * kp4, int(vp4), v_base + kb * v_stride4, v_stride4, v4i, nk);
  };
  // Before the dependent-launch wait, what no kernel of this step writes: the first tile when all its
  // keys are from earlier steps (below n_past; this step's q/k/v kernel writes key n_past on), and the
  // rotary angles (inv_freq is in the parameters).
  const bool early = key_begin < key_end && key_begin + tile_keys <= a.n_past;
  if (early) issue(key_begin, 0);
  float cos_a[max_lane_dims / 2], sin_a[max_lane_dims / 2];
  if (a.q_norm) rotary_lanes(a, cos_a, sin_a);
  dependent_launch_begin();
  wait_trace_mark(0, entered);
  if (!early && key_begin < key_end) issue(key_begin, 0);
  cp_async_commit();
  for (int i = threadIdx.x; i < (a.q_norm ? 0 : rows * k4i); i += blockDim.x) {
    const int r = i / k4i, c = i - r * k4i;
    const int64_t row = row0 + r;
    float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
    if (row < a.rows_per_kv) {
      const int64_t t = row / a.group, h = kv * a.group + row % a.group;
      x = reinterpret_cast<const float4*>(a.q + (t * a.l.n_head + h) * a.l.k_dim)[c];
      x.x *= a.q_scale, x.y *= a.q_scale, x.z *= a.q_scale, x.w *= a.q_scale;
    }
    qs[i] = x;
  }
  // With the norms here (instead of the staging above): each warp normalizes and rotates its own q rows
  // from registers (then scales them, as the staging scales the q that qk_norm_rope wrote), while the
  // first key tile loads; and warp 0 of the block whose keys hold the new one that key, written back to
  // the cache now and into the shared tile when it arrives.
  const bool new_key_here = a.k_norm && key_begin <= a.n_past && a.n_past < key_end;
  float k_new[max_lane_dims];
  if (a.q_norm) {
    const int per = k4i * 4 / 32;
    // The new key's loads go out with the q rows' (both were written by the q/k/v kernel just before).
    float* cached = a.k_cache_out + a.n_past * a.l.k_stride + kv * a.l.k_dim;
    if (new_key_here && warp == 0) {
#pragma unroll
      for (int m = 0; m < max_lane_dims; ++m) k_new[m] = m < per ? cached[lane + 32 * m] : 0.f;
    }
    for (int r = 0; r < RW; ++r) {
      const int64_t row = row0 + warp * RW + r;
      float v[max_lane_dims] = {};  // rows past the last stay 0, as the staging above leaves them
      if (row < a.rows_per_kv) {
        const float* src = a.q + ((row / a.group) * a.l.n_head + kv * a.group + row % a.group) * a.l.k_dim;
#pragma unroll
        for (int m = 0; m < max_lane_dims; ++m) v[m] = m < per ? src[lane + 32 * m] : 0.f;
        norm_rope_lanes(v, per, [&](int m) { return a.q_norm[lane + 32 * m]; }, a, cos_a, sin_a, a.q_scale);
      }
      float* dst = reinterpret_cast<float*>(qs + (warp * RW + r) * k4i);
#pragma unroll
      for (int m = 0; m < max_lane_dims; ++m)
        if (m < per) dst[lane + 32 * m] = v[m];
    }
    if (new_key_here && warp == 0) {
      norm_rope_lanes(k_new, per, [&](int m) { return a.k_norm[lane + 32 * m]; }, a, cos_a, sin_a, 1.f);
#pragma unroll
      for (int m = 0; m < max_lane_dims; ++m)
        if (m < per) cached[lane + 32 * m] = k_new[m];
    }
  }

  wait_trace_mark(1);
  int buf = 0;
  for (int64_t kb = key_begin; kb < key_end; kb += tile_keys, buf ^= 1) {
    const int nk = key_end - kb < tile_keys ? int(key_end - kb) : tile_keys;
    if (kb + tile_keys < key_end) issue(kb + tile_keys, buf ^ 1);
    cp_async_commit();  // possibly empty: the wait below counts groups
    cp_async_wait<1>();
    __syncthreads();    // this tile (and, the first time, qs) is in shared memory for every thread
    if (kb == key_begin) wait_trace_mark(2);
    if (new_key_here && kb <= a.n_past && a.n_past < kb + nk) {  // the tile may hold it raw or half written back
      if (warp == 0) {
        float* row = reinterpret_cast<float*>(tiles + buf * tile4 + (a.n_past - kb) * kp4);
#pragma unroll
        for (int m = 0; m < max_lane_dims; ++m)
          if (m < k4i / 8) row[lane + 32 * m] = k_new[m];
      }
      __syncthreads();
    }
    const float4* ks = tiles + buf * tile4;
    const float4* vs = a.latent ? ks : ks + tile_keys * kp4;
    if (warp_busy) {
      // Scores of the warp's rows: lane (kg, dp) = (lane / 4, lane % 4) takes keys 4·kg … 4·kg + 3 over
      // the float4 columns ≡ dp (mod 4), then the 4 lanes of a key group add up. Each 16-byte K read
      // serves RW rows and each q read 4 keys. Lanes past nk read stale rows; they are masked.
      const int kg = lane >> 2, dp = lane & 3;
      float s[RW][4];
      for (int r = 0; r < RW; ++r) s[r][0] = s[r][1] = s[r][2] = s[r][3] = 0.f;
      const float4* q_rows = qs + warp * RW * k4i;
      for (int c = dp; c < k4i; c += 4) {
        float4 kk[4];
        for (int k = 0; k < 4; ++k) kk[k] = ks[(4 * kg + k) * kp4 + c];
        for (int r = 0; r < RW; ++r) {
          const float4 qq = q_rows[r * k4i + c];
          for (int k = 0; k < 4; ++k) s[r][k] = fmaf(qq.x, kk[k].x, fmaf(qq.y, kk[k].y, fmaf(qq.z, kk[k].z, fmaf(qq.w, kk[k].w, s[r][k]))));
        }
      }
      float p[RW][4];
      for (int r = 0; r < RW; ++r) {
        float row_max = -INFINITY;
        for (int k = 0; k < 4; ++k) {
          s[r][k] += __shfl_xor_sync(0xffffffffu, s[r][k], 1);
          s[r][k] += __shfl_xor_sync(0xffffffffu, s[r][k], 2);
          const int j = 4 * kg + k;
          s[r][k] = j < nk && kb + j < row_key_end[r] ? s[r][k] : -INFINITY;
          row_max = fmaxf(row_max, s[r][k]);
        }
        const float m_new = fmaxf(m[r], warp_max(row_max));
        float correction = 1.f, p_sum = 0.f;
        for (int k = 0; k < 4; ++k) p[r][k] = 0.f;
        if (m_new != -INFINITY) {  // uniform across the warp: no key of this row seen yet otherwise
          for (int k = 0; k < 4; ++k) p_sum += p[r][k] = exp2f(s[r][k] - m_new);
          correction = exp2f(m[r] - m_new);  // 0 when m was −inf
        }
        l[r] = l[r] * correction + warp_sum(dp == 0 ? p_sum : 0.f);  // each key's p is held by its group's 4 lanes
        m[r] = m_new;
        for (int c = 0; c < VPL; ++c)
          for (int e = 0; e < 4; ++e) acc[r][c][e] *= correction;
      }
      // Weighted sum: lane i takes value columns 4·(i + 32·c); key j's p comes from lane 4·(j / 4).
      const auto add_key = [&](int j, const float (&pj)[RW]) {
        const float4* v_row = vs + j * vp4;
        for (int c = 0; c < VPL; ++c) {
          const int col = lane + 32 * c;
          if (col < v4i) {
            const float4 vv = v_row[col];
            for (int r = 0; r < RW; ++r) {
              acc[r][c][0] = fmaf(pj[r], vv.x, acc[r][c][0]);
              acc[r][c][1] = fmaf(pj[r], vv.y, acc[r][c][1]);
              acc[r][c][2] = fmaf(pj[r], vv.z, acc[r][c][2]);
              acc[r][c][3] = fmaf(pj[r], vv.w, acc[r][c][3]);
            }
          }
        }
      };
      if (nk == tile_keys) {
        // A whole tile (every tile but a split's last): no key to stop at, so each group's p and value
        // rows are asked for ahead of their multiply-adds (the same additions in the same order).
#pragma unroll 1
        for (int jg = 0; jg < tile_keys / 4; ++jg) {
          float pj[4][RW];
#pragma unroll
          for (int k = 0; k < 4; ++k)
            for (int r = 0; r < RW; ++r) pj[k][r] = __shfl_sync(0xffffffffu, p[r][k], 4 * jg);
#pragma unroll
          for (int k = 0; k < 4; ++k) add_key(4 * jg + k, pj[k]);
        }
      } else {
        for (int jg = 0; 4 * jg < nk; ++jg)
          for (int k = 0; k < 4; ++k) {
            float pj[RW];
            for (int r = 0; r < RW; ++r) pj[r] = __shfl_sync(0xffffffffu, p[r][k], 4 * jg);
            const int j = 4 * jg + k;
            if (j >= nk) break;  // uniform; a stale row times p = 0 could still be NaN
            add_key(j, pj);
          }
      }
    }
    __syncthreads();  // the buffer is refilled by the next iteration's issue
  }

  wait_trace_mark(3);
  for (int r = 0; r < RW; ++r) {
    const int64_t row = row0 + warp * RW + r;
    if (row >= a.rows_per_kv) break;
    const int64_t t = row / a.group, h = kv * a.group + row % a.group, orow = t * a.l.n_head + h;
    const bool direct = a.part_o == nullptr;
    const float inv = direct ? 1.f / l[r] : 1.f;  // direct: one split, which holds key 0, so l ≥ 1
    float4* o = reinterpret_cast<float4*>(direct ? a.out + orow * a.l.v_dim : a.part_o + (split * a.rows_out + orow) * a.l.v_dim);
    for (int c = 0; c < VPL; ++c) {
      const int col = lane + 32 * c;
      if (col < v4) o[col] = make_float4(acc[r][c][0] * inv, acc[r][c][1] * inv, acc[r][c][2] * inv, acc[r][c][3] * inv);
    }
    if (!direct && lane == 0) reinterpret_cast<float2*>(a.part_ml)[split * a.rows_out + orow] = make_float2(m[r], l[r]);
  }
  if (a.part_o && a.counters) {
    // The last split of this block column to finish combines the column's rows.
    if (!last_split_to_finish(a.counters)) return;
    float* w = reinterpret_cast<float*>(tiles) + warp * int(gridDim.y);  // the tiles are no longer read
    for (int r = 0; r < RW; ++r) {
      const int64_t row = row0 + warp * RW + r;
      if (row >= a.rows_per_kv) break;
      const int64_t orow = (row / a.group) * a.l.n_head + kv * a.group + row % a.group;
      combine_row<RW == 1 ? 16 : 8, RW == 1>(a.part_o, a.part_ml, int(gridDim.y), a.rows_out, a.l.v_dim, orow, a.out, w);
    }
    if (threadIdx.x == 0) a.counters[blockIdx.x] = 0;  // for the next launch
#ifdef MOEFLUX_CUDA_WAIT_TRACE
    __syncthreads();
    wait_trace_mark(5);
#endif
  }
}

// combine_row for every output row, a warp per row.
constexpr int combine_warps = 4;
__global__ void __launch_bounds__(32 * combine_warps)
    attention_combine_kernel(const float* __restrict__ part_o, const float* __restrict__ part_ml, int n_split, int64_t rows_out,
                             int64_t v_dim, float* __restrict__ out) {
  dependent_launch_begin();
  __shared__ float w[combine_warps][max_splits];
  const int warp = threadIdx.x >> 5;
  const int64_t row = int64_t(blockIdx.x) * combine_warps + warp;
  if (row < rows_out) combine_row<16, true>(part_o, part_ml, n_split, rows_out, v_dim, row, out, w[warp]);
}

// --- The decode kernel ------------------------------------------------------------------------------
//
// One token over a cache of plain heads (k_dim = v_dim = 32·KP, KP 4 or 8), the keys read straight into
// registers: the tiled kernel's shared tiles are read by every warp of the block (each of a decode
// group's 8 rows re-reads all of them), and its per-tile chain of shared loads, shuffles and weighted
// sums took ~7,400 cycles a tile in the layer chain (the wait probe, session 21). Here a block takes (KV
// head, split of keys) with its warps in row groups × key groups: warp (g, j) holds the group's query
// rows g·R … g·R + R − 1 in registers, lane l holding dims l + 32·m (m < KP), as norm_rope_lanes wants,
// and takes chunks of C keys (chunk i of key group j: keys key_begin + (i·KG + j)·C …), each key's K and V
// rows loaded with the same layout — the first chunk before the dependent-launch wait when all its keys
// are from earlier steps. Each lane's partial dot products (C keys × R rows) are summed across the warp
// by a transposing butterfly (each step keeps half the values and adds the partner's), after which lane
// l holds one score, of (key, row) index l >> (5 − log2(C·R)); the online softmax runs on those, and the
// weighted sum reads the probabilities and corrections back from a few floats of shared memory. The
// block's key groups merge through shared memory (as splits merge: max, rescaled sums), then the split
// partials as in the tiled kernel (its last block combines). q's norm and rotary, and the new key's, are
// norm_rope_lanes, with the weights in registers from before the wait.
// The transposing butterfly over a warp: lane l's n values s[0 … n) (n a power of two ≤ 32) summed over
// the warp so that lane l ends with the sum of value index l >> (5 − log2 n) in s[0]: at each step a lane
// keeps the half of its values its bit o names (the upper when set) and adds the partner's same half;
// once one value is left the remaining steps add plainly.
template <int N, int O>
__device__ __forceinline__ void transpose_sum(float* s, int lane) {
  if constexpr (O > 0) {
    if constexpr (N > 1) {
      const bool upper = (lane & O) != 0;
#pragma unroll
      for (int j = 0; j < N / 2; ++j) {
        const float keep = upper ? s[j + N / 2] : s[j], send = upper ? s[j] : s[j + N / 2];
        s[j] = keep + __shfl_xor_sync(0xffffffffu, send, O);
      }
      transpose_sum<N / 2, O / 2>(s, lane);
    } else {
      s[0] += __shfl_xor_sync(0xffffffffu, s[0], O);
      transpose_sum<1, O / 2>(s, lane);
    }
  }
}

// A float (float2) of block `rank`'s shared memory in this cluster at the shared address `at` of this
// block's copy (mapa + ld.shared::cluster; volatile keeps them after the cluster barrier, and in order,
// but each is only waited for where its value is used).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ float ld_cluster_float(unsigned at, int rank) {
  unsigned remote;
  float v;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(at), "r"(rank));
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote));
  return v;
}
__device__ __forceinline__ float2 ld_cluster_float2(unsigned at, int rank) {
  unsigned remote;
  float2 v;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(at), "r"(rank));
  asm volatile("ld.shared::cluster.v2.f32 {%0, %1}, [%2];" : "=f"(v.x), "=f"(v.y) : "r"(remote));
  return v;
}
#endif

template <int KP, int R, int C>
__global__ void __launch_bounds__(256) attention_decode_kernel(const __grid_constant__ TiledArgs a) {
  constexpr int V = C * R, LV = V == 32 ? 5 : V == 16 ? 4 : 3, LC = C == 8 ? 3 : C == 4 ? 2 : 1;
  static_assert((V == 8 || V == 16 || V == 32) && (C == 2 || C == 4 || C == 8), "the butterfly's shapes");
  constexpr int D = 32 * KP;
  const unsigned long long entered = wait_trace_now();
  extern __shared__ float4 shared4[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  const int n_rg = int((a.group + R - 1) / R), n_kg = n_warps / n_rg;
  const int rg = warp % n_rg, kgi = warp / n_rg;
  const int64_t kv = blockIdx.x, split = blockIdx.y;
  const int64_t key_begin = split * a.keys_per_split;
  const int64_t key_end = key_begin + a.keys_per_split < a.n_past + 1 ? key_begin + a.keys_per_split : a.n_past + 1;
  const int64_t k_stride = a.l.k_stride, v_stride = a.l.v_stride;
  const float* k_base = a.k_cache + kv * D + lane;
  const float* v_base = a.v_cache + kv * D + lane;
  // Shared memory: the merge's [n_warps, R, D] sums and [n_warps, R] (max, sum), then per warp V
  // probabilities and R corrections.
  float* merge_o = reinterpret_cast<float*>(shared4);
  float2* merge_ml = reinterpret_cast<float2*>(merge_o + n_warps * R * D);
  float* p_buf = reinterpret_cast<float*>(merge_ml + n_warps * R) + warp * (V + R);
  float* c_buf = p_buf + V;
  // In a cluster, the block's merged partials: [group, D] sums and [group] (max, sum).
  float* cluster_o = reinterpret_cast<float*>(merge_ml + n_warps * R) + n_warps * (V + R);
  float2* cluster_ml = reinterpret_cast<float2*>(cluster_o + a.group * D);

  float kc[C][KP], vc[C][KP];
  const auto load = [&](int64_t k0, float (&kd)[C][KP], float (&vd)[C][KP]) {
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const bool in = k0 + c < key_end;
#pragma unroll
      for (int m = 0; m < KP; ++m) {
        kd[c][m] = in ? k_base[(k0 + c) * k_stride + 32 * m] : 0.f;
        vd[c][m] = in ? v_base[(k0 + c) * v_stride + 32 * m] : 0.f;
      }
    }
  };
  // Before the wait, what no kernel of this step writes: the first chunk when its keys are all below
  // n_past, the norms' weights and the rotary angles (inv_freq is in the parameters).
  const int64_t first = key_begin + int64_t(kgi) * C, chunk_step = int64_t(n_kg) * C;
  const bool early = first + C <= a.n_past;
  if (early) load(first, kc, vc);

  float qw[KP], kw[KP], cos_a[KP / 2], sin_a[KP / 2];
  if (a.q_norm) {
#pragma unroll
    for (int m = 0; m < KP; ++m) qw[m] = a.q_norm[lane + 32 * m], kw[m] = a.k_norm[lane + 32 * m];
    rotary_lanes(a, cos_a, sin_a);
  }
  dependent_launch_begin();
  wait_trace_mark(0, entered);
  if (!early && first < key_end) load(first, kc, vc);
  // The warp's q rows (0 past the group), normalized and rotated here with the norms set, then scaled.
  float q[R][KP];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t row = int64_t(rg) * R + r;
    const float* src = a.q + (kv * a.group + row) * D + lane;
#pragma unroll
    for (int m = 0; m < KP; ++m) q[r][m] = row < a.group ? src[32 * m] : 0.f;
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (a.q_norm) {
      if (int64_t(rg) * R + r < a.group) norm_rope_lanes(q[r], KP, [&](int m) { return qw[m]; }, a, cos_a, sin_a, a.q_scale);
    } else {
#pragma unroll
      for (int m = 0; m < KP; ++m) q[r][m] *= a.q_scale;
    }
  }
  wait_trace_mark(1);

  // Lane l's (key, row) after the butterfly, and the online softmax state of that row.
  const int idx = lane >> (5 - LV), my_c = idx / R;
  float m_row = -INFINITY, l_row = 0.f, acc[R][KP];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < KP; ++m) acc[r][m] = 0.f;

  for (int64_t k0 = first; k0 < key_end; k0 += chunk_step) {
    // The next chunk's rows on their way while this one is used (in L1 instead, prefetched before the
    // wait: attention_lab at 8192 keys 20.6 -> 24.5 µs).
    float kn[C][KP], vn[C][KP];
    const bool more = k0 + chunk_step < key_end;
    if (more) load(k0 + chunk_step, kn, vn);
    if (a.k_norm && k0 <= a.n_past && a.n_past < k0 + C) {
      // The new key (raw from the q/k/v kernel, loaded after the wait): normalized and rotated, written
      // back to the cache for later steps.
#pragma unroll
      for (int c = 0; c < C; ++c)
        if (k0 + c == a.n_past) {
          norm_rope_lanes(kc[c], KP, [&](int m) { return kw[m]; }, a, cos_a, sin_a, 1.f);
          float* cached = a.k_cache_out + a.n_past * k_stride + kv * D + lane;
#pragma unroll
          for (int m = 0; m < KP; ++m) cached[32 * m] = kc[c][m];
        }
    }
    // Scores: the lane's partial dot products, then the transposing butterfly.
    float s[V];
#pragma unroll
    for (int c = 0; c < C; ++c)
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float d = 0.f;
#pragma unroll
        for (int m = 0; m < KP; ++m) d = fmaf(q[r][m], kc[c][m], d);
        s[c * R + r] = d;
      }
    transpose_sum<V, 16>(s, lane);
    const float score = k0 + my_c < key_end ? s[0] : -INFINITY;
    // The row's max and sum over the chunk's keys: the lanes of one row differ in their top LC bits.
    float chunk_max = score;
#pragma unroll
    for (int o = 16; o > (16 >> LC); o >>= 1) chunk_max = fmaxf(chunk_max, __shfl_xor_sync(0xffffffffu, chunk_max, o));
    const float m_new = fmaxf(m_row, chunk_max);  // > −inf: a chunk holds at least one key below key_end
    const float p = exp2f(score - m_new), correction = exp2f(m_row - m_new);  // 0 for −inf
    float p_sum = p;
#pragma unroll
    for (int o = 16; o > (16 >> LC); o >>= 1) p_sum += __shfl_xor_sync(0xffffffffu, p_sum, o);
    l_row = l_row * correction + p_sum;
    m_row = m_new;
    p_buf[idx] = p;
    if (my_c == 0) c_buf[idx] = correction;
    __syncwarp();
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float cr = c_buf[r];
#pragma unroll
      for (int m = 0; m < KP; ++m) acc[r][m] *= cr;
    }
#pragma unroll
    for (int c = 0; c < C; ++c)
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float pc = p_buf[c * R + r];
#pragma unroll
        for (int m = 0; m < KP; ++m) acc[r][m] = fmaf(pc, vc[c][m], acc[r][m]);
      }
    __syncwarp();  // p_buf is rewritten by the next chunk
    if (more) {
#pragma unroll
      for (int c = 0; c < C; ++c)
#pragma unroll
        for (int m = 0; m < KP; ++m) kc[c][m] = kn[c][m], vc[c][m] = vn[c][m];
    }
  }
  wait_trace_mark(3);

  // The block's key groups merge: row r of row group g is in warps g, g + n_rg, … (a warp that had no
  // key weighs 0).
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < KP; ++m) merge_o[(warp * R + r) * D + lane + 32 * m] = acc[r][m];
  if (my_c == 0) merge_ml[warp * R + idx] = make_float2(m_row, l_row);
  __syncthreads();
  // Warp w merges rows w, w + n_warps, …, lane l dims l + 32·m as the warps hold them: the weights once
  // a row, every sum's shared loads in flight together.
  const bool direct = gridDim.y == 1;
  constexpr int max_kg = 8;
  for (int row = warp; row < a.group; row += n_warps) {
    const int g = row / R, r = row - g * R;
    float2 ml[max_kg];
    float m_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < max_kg; ++j)
      if (j < n_kg) ml[j] = merge_ml[(j * n_rg + g) * R + r], m_max = fmaxf(m_max, ml[j].x);
    float wt[max_kg], l_sum = 0.f;
#pragma unroll
    for (int j = 0; j < max_kg; ++j)
      if (j < n_kg) {
        wt[j] = ml[j].x == -INFINITY ? 0.f : exp2f(ml[j].x - m_max);
        l_sum = fmaf(wt[j], ml[j].y, l_sum);
      }
    const int64_t orow = kv * a.group + row;
#pragma unroll
    for (int m = 0; m < KP; ++m) {
      const int d = lane + 32 * m;
      float o = 0.f;
#pragma unroll
      for (int j = 0; j < max_kg; ++j)
        if (j < n_kg) o = fmaf(wt[j], merge_o[((j * n_rg + g) * R + r) * D + d], o);
      if (direct) {
        a.out[orow * D + d] = o / l_sum;  // one split, which holds key 0: l_sum ≥ 1
      } else if (a.cluster) {
        cluster_o[row * D + d] = o;
      } else {
        a.part_o[(split * a.rows_out + orow) * D + d] = o;
      }
    }
    if (lane == 0 && !direct) {
      if (a.cluster) cluster_ml[row] = make_float2(m_max, l_sum);
      else reinterpret_cast<float2*>(a.part_ml)[split * a.rows_out + orow] = make_float2(m_max, l_sum);
    }
  }
  wait_trace_mark(2);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (a.cluster) {
    // The splits of this KV head are one cluster: its blocks combine the partials from each other's shared
    // memory, each block a slice of the (row, dim) elements, and wait for each other before leaving (a
    // block's shared memory goes with it). sm_90 on: the host asks for clusters only there.
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    wait_trace_mark(4);
    // Units of 32 dims (a row's dims 32·m …) spread over the blocks' warps: unit split + n·warp, ….
    const int n = a.cluster;
    for (int u = int(split) + n * warp; u < a.group * KP; u += n * n_warps) {
      const int row = u / KP, e = row * D + 32 * (u - row * KP) + lane;
      // Every block's (max, sum) and sum of this element asked for before any is used.
      float2 ml[max_cluster];
      float ov[max_cluster];
      const unsigned ml_at = unsigned(__cvta_generic_to_shared(cluster_ml + row)), o_at = unsigned(__cvta_generic_to_shared(cluster_o + e));
#pragma unroll
      for (int j = 0; j < max_cluster; ++j)
        if (j < n) ml[j] = ld_cluster_float2(ml_at, j), ov[j] = ld_cluster_float(o_at, j);
      float m_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < max_cluster; ++j)
        if (j < n) m_max = fmaxf(m_max, ml[j].x);
      if (u == int(split)) wait_trace_mark(6);
      float o = 0.f, l_sum = 0.f;
#pragma unroll
      for (int j = 0; j < max_cluster; ++j)
        if (j < n) {
          const float wt = ml[j].x == -INFINITY ? 0.f : exp2f(ml[j].x - m_max);
          o = fmaf(wt, ov[j], o);
          l_sum = fmaf(wt, ml[j].y, l_sum);
        }
      a.out[(kv * a.group + row) * D + (e - row * D)] = o / l_sum;
    }
    wait_trace_mark(5);
    cluster.sync();
    wait_trace_mark(7);
    return;
  }
#endif
  if (a.part_o && a.counters) {
    if (!last_split_to_finish(a.counters)) return;
    float* w = merge_o + warp * int(gridDim.y);  // the merge is done with its shared memory
    for (int64_t row = warp; row < a.group; row += n_warps)
      combine_row<16, true>(a.part_o, a.part_ml, int(gridDim.y), a.rows_out, D, kv * a.group + row, a.out, w);
    if (threadIdx.x == 0) a.counters[blockIdx.x] = 0;  // for the next launch
#ifdef MOEFLUX_CUDA_WAIT_TRACE
    __syncthreads();
    wait_trace_mark(5);
#endif
  }
}

// Whether the last split combines in the attention kernel (else a combine kernel follows), unless
// MOEFLUX_CUDA_FUSE_COMBINE=0 (a developer's switch for comparisons).
bool combine_in_kernel() {
  static const bool on = [] {
    const char* env = std::getenv("MOEFLUX_CUDA_FUSE_COMBINE");
    return !(env && env[0] == '0');
  }();
  return on;
}

// A key row's pitch in shared memory: ≡ 4 (mod 32) floats, so lanes reading 16 bytes each from 8
// consecutive rows (one phase of a 16-byte shared load) hit 8 distinct groups of 4 banks.
int key_pitch(int64_t dim) { return int(dim + (36 - dim % 32) % 32); }

// Keys per split for about n_split splits (or `units` units a split, where a lab asks), whole units
// (a tile or a round of chunks) each; returns the splits that makes.
int64_t split_keys(TiledArgs& a, int64_t n_keys, int64_t n_split, int64_t unit, int units) {
  if (units > 0) n_split = std::clamp<int64_t>((n_keys + units * unit - 1) / (units * unit), 1, max_splits);
  a.keys_per_split = ((n_keys + n_split - 1) / n_split + unit - 1) / unit * unit;
  return (n_keys + a.keys_per_split - 1) / a.keys_per_split;
}

// The split partials in the stream's scratch: [n_split, rows_out, v_dim] sums, then [n_split, rows_out]
// (max, sum) pairs.
void split_partials(TiledArgs& a, int64_t n_split, cudaStream_t stream) {
  const size_t part_o_floats = size_t(n_split * a.rows_out * a.l.v_dim);
  float* scratch = static_cast<float*>(stream_scratch(stream, (part_o_floats + size_t(n_split * a.rows_out * 2)) * sizeof(float)));
  a.part_o = scratch;
  a.part_ml = scratch + part_o_floats;
}

// The combine kernel after a split launch whose blocks do not combine themselves (no counters).
void combine_after(const TiledArgs& a, int64_t n_split, float* out, cudaStream_t stream) {
  if (n_split <= 1 || a.counters) return;
  launch(attention_combine_kernel, unsigned((a.rows_out + combine_warps - 1) / combine_warps), 32 * combine_warps, 0, stream, a.part_o,
         a.part_ml, int(n_split), a.rows_out, a.l.v_dim, out);
  MF_CUDA_CHECK_LAUNCH();
}

// Splits the keys when the (row tile, KV head) blocks alone would not fill one wave of resident blocks
// (decode): as many splits as fill it, each at least one key tile. Then launches the kernel, and the
// combine when split.
template <int RW, int VPL>
void launch_tiled(TiledArgs a, int warps, size_t shared, int n_sm, int waves, int split_tiles, int64_t n_keys, float* out,
                  cudaStream_t stream) {
  const auto kernel = attention_tiled_kernel<RW, VPL>;
  if (shared > 48 * 1024) MF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared)));
  int resident = 0;
  MF_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, 32 * warps, shared));
  const int64_t blocks = a.n_row_tiles * a.l.n_head_kv, wave = int64_t(std::max(resident, 1)) * n_sm * waves;
  const int64_t n_tiles = (n_keys + tile_keys - 1) / tile_keys;
  int64_t n_split = 1;
  if (blocks < wave) n_split = std::min<int64_t>({wave / blocks, n_tiles, int64_t(max_splits)});
  // Past 40 splits of one tile each, two tiles a split: a row's combine reads its partials 16 at a time,
  // a round trip to the L2 each, and there a tile more a block costs less than the third and fourth
  // (attention_lab --short, H100, µs, one tile -> two: Qwen3-30B 1500 keys 12.7 -> 12.5, 2048 keys 15.9 ->
  // 13.9; Qwen3.5-397B 30.3 -> 26.3, 38.4 -> 31.6; at 1100 keys, 35 splits, 11.5 -> 12.1 and 25.6 -> 25.5,
  // and at 600 keys one tile is best, 9.5 against 11.3).
  if (n_split > 40 && (n_tiles + n_split - 1) / n_split == 1) n_split = (n_tiles + 1) / 2;
  n_split = split_keys(a, n_keys, n_split, tile_keys, split_tiles);
  a.out = out;
  if (n_split > 1) {
    split_partials(a, n_split, stream);
    // The combine in the kernel's last split where a counter per block column and the warps' weights (in
    // the freed tiles) fit.
    const int64_t tile_floats = 2 * tile_keys * (a.k_pitch + (a.latent ? 0 : a.v_pitch));
    if (blocks <= stream_counter_slots && warps * n_split <= tile_floats && combine_in_kernel()) a.counters = stream_counters(stream);
  }
  const size_t launch_shared = spread_shared(shared, blocks * n_split, spread_attention);
  if (launch_shared > std::max(shared, size_t(48 * 1024)))
    MF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(launch_shared)));
  launch(kernel, dim3{unsigned(blocks), unsigned(n_split)}, 32 * warps, launch_shared, stream, a);
  MF_CUDA_CHECK_LAUNCH();
  combine_after(a, n_split, out, stream);
}

// The decode kernel's shapes: heads of 128 dims take 8 rows a warp in chunks of 4 keys (4 rows in chunks
// of 8 for groups of up to 4), heads of 256 dims 4 rows in chunks of 4; a group of up to 8 warps' rows.
bool decode_supported(const AttentionLayout& l, int64_t group) {
  const int rows = l.k_dim == 128 && group > 4 ? 8 : 4;
  return (l.k_dim == 128 || l.k_dim == 256) && l.v_dim == l.k_dim && group <= 8 * rows;
}

// The largest cluster of the decode kernel's blocks (16, 8 or 0) that the device can place once: 16 is
// beyond the portable size (a GPC may hold fewer SMs on some parts), and before sm_90 there are none.
// Asked once a kernel; also lets the kernel take non-portable sizes.
template <typename Kernel>
int decode_cluster_limit(Kernel kernel, int threads, size_t shared) {
  static std::mutex mutex;  // sessions on other host threads may launch too
  static std::map<std::tuple<int, const void*, size_t>, int> known;
  int device = 0;
  MF_CUDA_CHECK(cudaGetDevice(&device));
  const auto key = std::make_tuple(device, reinterpret_cast<const void*>(kernel), shared);
  std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = known.find(key); it != known.end()) return it->second;
  int limit = 0;
  if (device_attribute<cudaDevAttrComputeCapabilityMajor>() >= 9) {
    if (shared > 48 * 1024) MF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared)));
    MF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    for (const int size : {16, 8}) {
      cudaLaunchConfig_t config = {};
      config.gridDim = dim3{1, unsigned(size)};
      config.blockDim = dim3{unsigned(threads)};
      config.dynamicSmemBytes = shared;
      cudaLaunchAttribute attribute;
      attribute.id = cudaLaunchAttributeClusterDimension;
      attribute.val.clusterDim.x = 1, attribute.val.clusterDim.y = unsigned(size), attribute.val.clusterDim.z = 1;
      config.attrs = &attribute;
      config.numAttrs = 1;
      int clusters = 0;
      if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) == cudaSuccess && clusters > 0) {
        limit = size;
        break;
      }
      (void)cudaGetLastError();  // a size the device cannot place is an answer, not an error
    }
  }
  known.emplace(key, limit);
  return limit;
}

// Splits each KV head's keys across blocks and launches: up to 6 rounds of chunks a split, the splits
// as one cluster of up to 16 blocks (each a sixteenth of the keys); past that, or without clusters,
// ~2.8·√rounds splits merged through the L2, or split_rounds rounds each (a lab's choice, as `cluster`).
template <int KP, int R, int C>
void launch_decode(TiledArgs a, int n_sm, int split_rounds, int cluster, float* out, cudaStream_t stream) {
  const auto kernel = attention_decode_kernel<KP, R, C>;
  const int n_rg = int((a.group + R - 1) / R), n_kg = std::max(1, 8 / n_rg), warps = n_rg * n_kg;
  const int64_t n_keys = a.n_past + 1, round = int64_t(n_kg) * C, n_rounds = (n_keys + round - 1) / round;
  // The splits as one cluster (combined through each other's shared memory, without the partials'
  // round trips to the L2 and the count): alone (attention_lab --short) a cluster of 16 was up to 2 µs
  // slower than the L2's splits at Qwen3-30B's heads, but in the layer chain, where each round trip waits
  // behind the next launch's weights, 16 took matmul_bench --layer from 48.2-48.3 to 45.3-45.5 µs, and
  // before its merge was a warp a row decode at 1800 keys from 368-372 to 389-391 tok/s (H100, session
  // 22); up to 6 rounds a split.
  // MOEFLUX_CUDA_ATTN_CLUSTER (a developer's switch: a size, or -1 for none) or the lab's tuning overrides.
  static const int cluster_env = [] {
    const char* e = std::getenv("MOEFLUX_CUDA_ATTN_CLUSTER");
    return e ? std::atoi(e) : 0;
  }();
  if (cluster == 0) cluster = split_rounds > 0 ? -1 : cluster_env;
  if (cluster == 0) cluster = n_rounds <= 6 * max_cluster ? max_cluster : -1;
  cluster = cluster > 0 ? int(std::min<int64_t>({int64_t(cluster), int64_t(max_cluster), n_rounds})) : 0;
  const size_t shared_plain = size_t(warps) * (R * 32 * KP + 2 * R + C * R + R) * sizeof(float);
  const size_t shared_cluster = shared_plain + size_t(a.group) * (32 * KP + 2) * sizeof(float);
  cluster = std::min(cluster, decode_cluster_limit(kernel, 32 * warps, shared_cluster));
  if (cluster < 2) cluster = 0;
  const size_t shared = cluster ? shared_cluster : shared_plain;
  if (shared > 48 * 1024) MF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared)));
  if (cluster) {
    // Splits of whole chunks (a split's keys need not fill its rounds).
    a.keys_per_split = ((n_keys + cluster - 1) / cluster + C - 1) / C * C;
    a.cluster = int((n_keys + a.keys_per_split - 1) / a.keys_per_split);
    a.out = out;
    if (a.cluster >= 2) {
      launch_clustered(kernel, dim3{unsigned(a.l.n_head_kv), unsigned(a.cluster)}, 32 * warps, shared, stream,
                       dim3{1, unsigned(a.cluster), 1}, a);
      MF_CUDA_CHECK_LAUNCH();
      return;
    }
    a.cluster = 0;
  }
  int resident = 0;
  MF_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, 32 * warps, shared));
  const int64_t blocks = a.l.n_head_kv, wave = int64_t(std::max(resident, 1)) * n_sm;
  // A split's chain grows with its rounds and the combine with the splits: ~2.8·√rounds splits
  // (attention_lab --short, H100: the best of 1 … 8 rounds a split over 128 … 8192 keys, Qwen3-30B's and
  // Qwen3.5-397B's heads, lay within 10% of it), at most a wave.
  int64_t n_split = std::llround(2.8 * std::sqrt(double(n_rounds)));
  n_split = std::clamp<int64_t>(n_split, 1, std::min<int64_t>({blocks < wave ? wave / blocks : 1, n_rounds, int64_t(max_splits)}));
  n_split = split_keys(a, n_keys, n_split, round, split_rounds);
  a.out = out;
  if (n_split > 1) {
    split_partials(a, n_split, stream);
    if (blocks <= stream_counter_slots && combine_in_kernel()) a.counters = stream_counters(stream);  // w fits: 8·256 floats
  }
  launch(kernel, dim3{unsigned(blocks), unsigned(n_split)}, 32 * warps, shared, stream, a);
  MF_CUDA_CHECK_LAUNCH();
  combine_after(a, n_split, out, stream);
}

template <int RW>
void launch_tiled_rw(const TiledArgs& a, int vpl, int warps, size_t shared, int n_sm, int waves, int split_tiles, int64_t n_keys,
                     float* out, cudaStream_t stream) {
  switch (vpl) {
    case 1: return launch_tiled<RW, 1>(a, warps, shared, n_sm, waves, split_tiles, n_keys, out, stream);
    case 2: return launch_tiled<RW, 2>(a, warps, shared, n_sm, waves, split_tiles, n_keys, out, stream);
    case 4: return launch_tiled<RW, 4>(a, warps, shared, n_sm, waves, split_tiles, n_keys, out, stream);
    default: return launch_tiled<RW, 8>(a, warps, shared, n_sm, waves, split_tiles, n_keys, out, stream);
  }
}

}  // namespace

bool attention_tiled_supported(const float* q, const float* k_cache, const float* v_cache, const AttentionLayout& l, const float* out) {
  return l.k_dim % 4 == 0 && l.v_dim % 4 == 0 && l.k_stride % 4 == 0 && l.v_stride % 4 == 0 && l.v_dim <= 1024 && aligned16(q) &&
         aligned16(k_cache) && aligned16(v_cache) && aligned16(out);
}

namespace {

// attention(), or with qk (one token) the tiled kernel normalizing and rotating q and the new key itself;
// false, having launched nothing, where that cannot run.
bool run_attention(const float* q, const float* k_cache, const float* v_cache, int64_t n_tokens, int64_t n_past,
                   const AttentionLayout& layout, float scale, float* out, cudaStream_t stream, AttentionPath path,
                   const AttentionTuning& tuning, const QkNormRope* qk, float* k_cache_out) {
  if (n_tokens <= 0 || layout.n_head <= 0) return true;
  if (layout.n_head_kv <= 0 || layout.n_head % layout.n_head_kv != 0) {
    std::fprintf(stderr, "%s:%d: attention: n_head %lld is not a multiple of n_head_kv %lld\n", __FILE__, __LINE__,
                 (long long)layout.n_head, (long long)layout.n_head_kv);
    std::abort();
  }
  // The latent layout: each value row is the prefix of its key row, so the key tile serves as both.
  const bool latent = v_cache == k_cache && layout.v_stride == layout.k_stride && layout.v_dim <= layout.k_dim &&
                      (layout.n_head_kv == 1 || layout.v_dim == layout.k_dim);
  // The decode or tiled kernel for every supported shape, a decode step over a few keys too: alone the simple
  // kernel's one launch was faster there (attention_lab, H200: 9.0 against 11.0 µs at 33 keys, 14.8
  // against 11.1 at 65), but the tiled one takes the q/k norms and rotary as well (one kernel fewer),
  // and fused and composed must give the same bits.
  const bool simple = path == AttentionPath::simple || !attention_tiled_supported(q, k_cache, v_cache, layout, out);
  // A head in a warp's registers, each rotary pair within a lane (norm_rope_lanes).
  if (qk && (n_tokens != 1 || simple || latent || layout.k_dim % 32 != 0 || layout.k_dim > 32 * max_lane_dims || qk->half % 32 != 0 ||
             2 * int64_t(qk->half) > layout.k_dim))
    return false;
  if (simple) {
    attention_simple(q, k_cache, v_cache, n_tokens, n_past, layout, scale, out, stream);
    return true;
  }

  int device = 0, n_sm = 0, shared_max = 0;
  MF_CUDA_CHECK(cudaGetDevice(&device));
  MF_CUDA_CHECK(cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, device));
  const int64_t group = layout.n_head / layout.n_head_kv;
  TiledArgs a{};
  a.q = q, a.k_cache = k_cache, a.v_cache = v_cache, a.l = layout, a.n_past = n_past;
  a.group = group;
  a.rows_per_kv = n_tokens * group;
  a.rows_out = n_tokens * layout.n_head;
  a.latent = latent;
  a.q_scale = scale * 1.4426950408889634f;
  if (qk) {
    a.q_norm = qk->q_norm, a.k_norm = qk->k_norm;
    std::copy(qk->inv_freq, qk->inv_freq + std::min(qk->half, max_rotary_half), a.inv_freq);
    a.eps = qk->eps, a.position = qk->position, a.half = qk->half;
    a.k_cache_out = k_cache_out;
  }
  // One token over plain heads: the decode kernel (both with the norms and without, so that fused and
  // composed give the same bits).
  if (n_tokens == 1 && !latent && (path == AttentionPath::automatic || path == AttentionPath::decode) && decode_supported(layout, group)) {
    if (layout.k_dim == 256) launch_decode<8, 4, 4>(a, n_sm, tuning.split_tiles, tuning.cluster, out, stream);
    else if (group > 4) launch_decode<4, 8, 4>(a, n_sm, tuning.split_tiles, tuning.cluster, out, stream);
    else launch_decode<4, 4, 8>(a, n_sm, tuning.split_tiles, tuning.cluster, out, stream);
    return true;
  }
  MF_CUDA_CHECK(cudaDeviceGetAttribute(&shared_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));

  a.k_pitch = key_pitch(layout.k_dim);
  a.v_pitch = latent ? a.k_pitch : key_pitch(layout.v_dim);

  // Rows per warp and warps per block: enough rows to share each K/V tile among (the GQA group, or 32
  // rows), and no more warps than rows need; smaller when shared memory is short (consumer GPUs, MLA).
  // A decode token's group of up to 8 takes a warp per row: each warp's chain of dependent steps per
  // tile (scores, softmax, weighted sum) is then one row long (Qwen3-30B decode at 512 keys +3.7%
  // against 2 rows in 4 warps, H100, session 14).
  int rw = a.rows_per_kv <= 8 ? 1 : a.rows_per_kv <= 16 ? 2 : 4;
  int warps = a.rows_per_kv <= 4 ? 4 : 8;
  if (tuning.rows_per_warp == 1 || tuning.rows_per_warp == 2 || tuning.rows_per_warp == 4) rw = tuning.rows_per_warp;
  if (tuning.warps >= 1 && tuning.warps <= tiled_threads_max / 32) warps = tuning.warps;
  auto shared_for = [&](int rows) {
    return size_t(rows * layout.k_dim + 2 * tile_keys * (a.k_pitch + (latent ? 0 : a.v_pitch))) * sizeof(float);
  };
  while (shared_for(rw * warps) > size_t(shared_max) && rw * warps > 4) rw > 1 ? void(rw /= 2) : void(warps /= 2);
  const size_t shared = shared_for(rw * warps);
  const int rows = rw * warps;
  a.n_row_tiles = (a.rows_per_kv + rows - 1) / rows;
  if (qk && (shared > size_t(shared_max) || a.n_row_tiles != 1)) return false;  // one block per (KV head, split) holds the new key
  if (shared > size_t(shared_max)) {
    attention_simple(q, k_cache, v_cache, n_tokens, n_past, layout, scale, out, stream);
    return true;
  }

  const int64_t v4 = layout.v_dim / 4, vpl_needed = (v4 + 31) / 32;
  const int vpl = vpl_needed <= 1 ? 1 : vpl_needed <= 2 ? 2 : vpl_needed <= 4 ? 4 : 8;
  const int64_t n_keys = n_past + n_tokens;
  const int waves = tuning.waves >= 1 ? tuning.waves : 1;
  switch (rw) {
    case 1: launch_tiled_rw<1>(a, vpl, warps, shared, n_sm, waves, tuning.split_tiles, n_keys, out, stream); break;
    case 2: launch_tiled_rw<2>(a, vpl, warps, shared, n_sm, waves, tuning.split_tiles, n_keys, out, stream); break;
    default: launch_tiled_rw<4>(a, vpl, warps, shared, n_sm, waves, tuning.split_tiles, n_keys, out, stream); break;
  }
  return true;
}

}  // namespace

void attention(const float* q, const float* k_cache, const float* v_cache, int64_t n_tokens, int64_t n_past,
               const AttentionLayout& layout, float scale, float* out, cudaStream_t stream, AttentionPath path,
               const AttentionTuning& tuning) {
  run_attention(q, k_cache, v_cache, n_tokens, n_past, layout, scale, out, stream, path, tuning, nullptr, nullptr);
}

bool attention_qk_norm_rope(const float* q, float* k_cache, const float* v_cache, int64_t n_past, const AttentionLayout& layout, float scale,
                            float* out, const QkNormRope& qk, cudaStream_t stream) {
  return run_attention(q, k_cache, v_cache, 1, n_past, layout, scale, out, stream, AttentionPath::automatic, {}, &qk, k_cache);
}

}  // namespace moeflux::cuda
