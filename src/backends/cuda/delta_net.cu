// The kernels of delta_net.cuh.
#include <algorithm>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/delta_net.cuh"
#include "backends/cuda/device_common.cuh"

namespace moeflux::cuda {
namespace {

// m = state ++ x, [hist + T, channels]; thread c reads and rewrites only column c.
__global__ void causal_conv1d_silu_kernel(const float* __restrict__ x, float* __restrict__ conv_state, const float* __restrict__ weight,
                                          int64_t n_tokens, int64_t channels, int64_t kernel, float* __restrict__ out) {
  dependent_launch_begin();
  const int64_t hist = kernel - 1;
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < channels; c += int64_t(gridDim.x) * blockDim.x) {
    auto m = [&](int64_t i) { return i < hist ? conv_state[i * channels + c] : x[(i - hist) * channels + c]; };
    for (int64_t t = 0; t < n_tokens; ++t) {
      float sum = 0.f;
      for (int64_t j = 0; j < kernel; ++j) sum += weight[c * kernel + j] * m(t + j);
      out[t * channels + c] = sum / (1.0f + expf(-sum));
    }
    // The new state is m's last hist rows; row i reads row T + i ≥ i, so ascending i reads before it writes.
    for (int64_t i = 0; i < hist; ++i) conv_state[i * channels + c] = m(n_tokens + i);
  }
}

__global__ void gated_delta_gates_kernel(const float* __restrict__ a, const float* __restrict__ b, const float* __restrict__ a_log,
                                         const float* __restrict__ dt_bias, int64_t n, int64_t n_heads, float* __restrict__ g,
                                         float* __restrict__ beta) {
  dependent_launch_begin();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t h = i % n_heads;
    const float x = a[i] + dt_bias[h];
    const float softplus = x > 20.0f ? x : log1pf(expf(x));
    g[i] = -expf(a_log[h]) * softplus;
    beta[i] = 1.0f / (1.0f + expf(-b[i]));
  }
}

// --- gated_delta_rule, token by token ------------------------------------------------------------
//
// Columns of the state are independent, so block (column tile, value head) holds columns c0 … c0 + 31
// of S [k_dim, v_dim] in registers: lane = column, warp w rows w, w + 8, … (RPT of them, k_dim ≤ 8·RPT).
// Per token one reduction across the 8 warps (shared memory, double-buffered so one barrier suffices)
// gives Sᵀk and Sᵀq of the raw q, k, together with Σq², Σk², q·k: the l2 norms cost no extra pass.
// As the CPU backend: the decay multiplies Sᵀk and Sᵀq instead of S before the update,
//   u = e^g Sᵀk̂,  δ = β (v − u),  out = e^g Sᵀq̂ + (k̂·q̂) δ,  S ← e^g S + k̂ δ.
constexpr int recurrent_warps = 8;

struct DeltaArgs {
  const float* q;
  const float* k;
  const float* v;
  int64_t stride;
  const float* g;
  const float* beta;
  float* state;
  int64_t n_tokens, n_k_heads, n_v_heads, ratio, k_dim, v_dim;
  float q_scale;
  float* out;
};

template <int RPT>
__global__ void __launch_bounds__(32 * recurrent_warps) gated_delta_recurrent_kernel(DeltaArgs a) {
  dependent_launch_begin();
  __shared__ float2 partial[2][recurrent_warps][32];  // per warp and column: (Σ S k, Σ S q) over its rows
  __shared__ float3 norms[2][recurrent_warps];        // per warp: (Σ q², Σ k², Σ q·k) over its rows
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t h = blockIdx.y, j = h / a.ratio, col = int64_t(blockIdx.x) * 32 + lane;
  const bool col_ok = col < a.v_dim;
  float* state = a.state + h * a.k_dim * a.v_dim;
  float s[RPT];
  for (int r = 0; r < RPT; ++r) {
    const int64_t i = warp + recurrent_warps * r;
    s[r] = col_ok && i < a.k_dim ? state[i * a.v_dim + col] : 0.f;
  }
  // The next token's inputs are loaded while the current one computes.
  float q_next[RPT], k_next[RPT], v_next = 0.f, g_next = 0.f, beta_next = 0.f;
  auto load = [&](int64_t t) {
    const float* qt = a.q + t * a.stride + j * a.k_dim;
    const float* kt = a.k + t * a.stride + j * a.k_dim;
    for (int r = 0; r < RPT; ++r) {
      const int64_t i = warp + recurrent_warps * r;
      q_next[r] = i < a.k_dim ? qt[i] : 0.f;
      k_next[r] = i < a.k_dim ? kt[i] : 0.f;
    }
    v_next = col_ok ? a.v[t * a.stride + h * a.v_dim + col] : 0.f;
    g_next = a.g[t * a.n_v_heads + h];
    beta_next = a.beta[t * a.n_v_heads + h];
  };
  if (a.n_tokens > 0) load(0);
  for (int64_t t = 0; t < a.n_tokens; ++t) {
    float qr[RPT], kr[RPT];
    for (int r = 0; r < RPT; ++r) qr[r] = q_next[r], kr[r] = k_next[r];
    const float vt = v_next, gt = g_next, bt = beta_next;
    if (t + 1 < a.n_tokens) load(t + 1);
    float su = 0.f, sq = 0.f, qq = 0.f, kk = 0.f, qk = 0.f;
    for (int r = 0; r < RPT; ++r) {
      su = fmaf(s[r], kr[r], su);
      sq = fmaf(s[r], qr[r], sq);
      qq = fmaf(qr[r], qr[r], qq);
      kk = fmaf(kr[r], kr[r], kk);
      qk = fmaf(qr[r], kr[r], qk);
    }
    const int buf = int(t & 1);
    partial[buf][warp][lane] = make_float2(su, sq);
    if (lane == 0) norms[buf][warp] = make_float3(qq, kk, qk);
    __syncthreads();  // a buffer is rewritten two tokens later, after the next token's barrier
    float u = 0.f, p = 0.f, q2 = 0.f, k2 = 0.f, qk_all = 0.f;
    for (int w = 0; w < recurrent_warps; ++w) {
      const float2 x = partial[buf][w][lane];
      const float3 n = norms[buf][w];
      u += x.x, p += x.y, q2 += n.x, k2 += n.y, qk_all += n.z;
    }
    const float inv_q = a.q_scale / sqrtf(q2 + 1e-6f), inv_k = 1.0f / sqrtf(k2 + 1e-6f);
    const float decay = expf(gt);
    const float delta = bt * (vt - decay * u * inv_k);
    if (warp == 0 && col_ok) a.out[(t * a.n_v_heads + h) * a.v_dim + col] = decay * p * inv_q + qk_all * inv_q * inv_k * delta;
    const float k_delta = inv_k * delta;
    for (int r = 0; r < RPT; ++r) s[r] = fmaf(decay, s[r], kr[r] * k_delta);
  }
  for (int r = 0; r < RPT; ++r) {
    const int64_t i = warp + recurrent_warps * r;
    if (col_ok && i < a.k_dim) state[i * a.v_dim + col] = s[r];
  }
}

// --- gated_delta_rule, chunked (WY) form ----------------------------------------------------------
//
// The equations of one chunk of n ≤ 64 tokens (transformers' torch_chunk_gated_delta_rule; the CPU
// backend's gated_delta_chunk): G = cumsum(g), D_ij = e^(G_i − G_j) for j ≤ i,
//   A = strictly_lower(diag(β) K̂K̂ᵀ ⊙ D),  T = (I + A)⁻¹,  U = T (β⊙V),  W = T (β⊙e^G⊙K̂),
//   V_new = U − W S,  O = (e^G⊙Q̂) S + tril(Q̂K̂ᵀ ⊙ D) V_new,  S ← e^(G_last) S + (e^(G_last − G)⊙K̂)ᵀ V_new.
// Everything but the last two lines is independent of the state: the prepare kernel computes it for
// every (chunk, value head) of a pass at once, into a scratch unit; the state kernel then walks the
// chunks in order, one block per (32 state columns, value head), state tile in shared memory. Rows of
// a partial chunk past n are zeros (G repeats G_last), which leaves every product unchanged.
constexpr int chunk_tokens = 64;
constexpr int chunk_threads = 256;
constexpr int transposed_pitch = chunk_tokens + 4;  // [dim][64] operands: 16-byte rows, stores spread over banks

// One scratch unit per (chunk, value head): U [64, v_dim], W [64, k_dim], Pᵀ [64, 64] (Pᵀ[j][i] =
// tril(Q̂K̂ᵀ ⊙ D)_ij), G [64], q_scale/‖q‖ [64], 1/‖k‖ [64].
inline int64_t chunk_unit_floats(int64_t k_dim, int64_t v_dim) {
  return chunk_tokens * (v_dim + k_dim + chunk_tokens + 3);
}

struct ChunkArgs {
  DeltaArgs d;
  int64_t t_begin;      // first token of the pass
  float* units;         // [chunks of the pass, n_v_heads] units
  int64_t unit_floats;
};

struct ChunkUnit {
  float *u, *w, *pt, *g, *inv_q, *inv_k;
};

__device__ __forceinline__ ChunkUnit chunk_unit(const ChunkArgs& a, int64_t chunk, int64_t h) {
  float* base = a.units + (chunk * a.d.n_v_heads + h) * a.unit_floats;
  ChunkUnit unit;
  unit.u = base;
  unit.w = unit.u + chunk_tokens * a.d.v_dim;
  unit.pt = unit.w + chunk_tokens * a.d.k_dim;
  unit.g = unit.pt + chunk_tokens * chunk_tokens;
  unit.inv_q = unit.g + chunk_tokens;
  unit.inv_k = unit.inv_q + chunk_tokens;
  return unit;
}

// q̂ [64, DKP + 4] shares its space with β⊙V [64, v_dim], staged once q̂ is used.
template <int DKP>
size_t chunk_prepare_shared_floats(int64_t v_dim) {
  return chunk_tokens * (DKP + 4) + chunk_tokens * std::max<int64_t>(DKP + 4, v_dim) + chunk_tokens * (chunk_tokens + 1) +
         chunk_tokens * transposed_pitch + 3 * chunk_tokens;
}

// Block (chunk of the pass, value head). DKP: k_dim rounded up to a multiple of 32 (zeros past k_dim).
template <int DKP>
__global__ void __launch_bounds__(chunk_threads) gated_delta_chunk_prepare_kernel(ChunkArgs a) {
  dependent_launch_begin();
  constexpr int kp = DKP + 4, n_warps = chunk_threads / 32;
  extern __shared__ float4 shared4[];
  const DeltaArgs& d = a.d;
  float* kh = reinterpret_cast<float*>(shared4);  // [64, kp] k̂
  float* qh = kh + chunk_tokens * kp;             // [64, kp] q̂ (times q_scale), later β⊙V [64, v_dim]
  float* bv = qh;
  float* am = qh + chunk_tokens * (kp > d.v_dim ? kp : d.v_dim);  // [64, 65] −A
  float* tt = am + chunk_tokens * (chunk_tokens + 1);  // [64, transposed_pitch] Tᵀ
  float* cum = tt + chunk_tokens * transposed_pitch;   // [64] G
  float* exp_cum = cum + chunk_tokens;                 // [64] e^G
  float* bet = exp_cum + chunk_tokens;                 // [64] β
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t chunk = blockIdx.x, h = blockIdx.y, j = h / d.ratio;
  const int64_t t0 = a.t_begin + chunk * chunk_tokens;
  const int n = int(d.n_tokens - t0 < chunk_tokens ? d.n_tokens - t0 : chunk_tokens);
  const ChunkUnit unit = chunk_unit(a, chunk, h);

  // q̂, k̂: a warp per token, 8 tokens a warp, every load issued before the first is used.
  {
    constexpr int rows_per_warp = chunk_tokens / n_warps, per_lane = DKP / 32;
    float qv[rows_per_warp][per_lane], kv[rows_per_warp][per_lane];
#pragma unroll
    for (int rr = 0; rr < rows_per_warp; ++rr) {
      const int i = warp + n_warps * rr;
#pragma unroll
      for (int e = 0; e < per_lane; ++e) {
        const int64_t c = lane + 32 * e;
        const bool ok = i < n && c < d.k_dim;
        qv[rr][e] = ok ? d.q[(t0 + i) * d.stride + j * d.k_dim + c] : 0.f;
        kv[rr][e] = ok ? d.k[(t0 + i) * d.stride + j * d.k_dim + c] : 0.f;
      }
    }
#pragma unroll
    for (int rr = 0; rr < rows_per_warp; ++rr) {
      const int i = warp + n_warps * rr;
      float qq = 0.f, kk = 0.f;
#pragma unroll
      for (int e = 0; e < per_lane; ++e) qq = fmaf(qv[rr][e], qv[rr][e], qq), kk = fmaf(kv[rr][e], kv[rr][e], kk);
      const float inv_q = d.q_scale / sqrtf(warp_sum(qq) + 1e-6f), inv_k = 1.0f / sqrtf(warp_sum(kk) + 1e-6f);
#pragma unroll
      for (int e = 0; e < per_lane; ++e) {
        qh[i * kp + lane + 32 * e] = qv[rr][e] * inv_q;
        kh[i * kp + lane + 32 * e] = kv[rr][e] * inv_k;
      }
      if (lane == 0) unit.inv_q[i] = inv_q, unit.inv_k[i] = inv_k;
    }
  }
  if (tid < chunk_tokens) {
    bet[tid] = tid < n ? d.beta[(t0 + tid) * d.n_v_heads + h] : 0.f;
    exp_cum[tid] = tid < n ? d.g[(t0 + tid) * d.n_v_heads + h] : 0.f;  // g, until the sum below
  }
  __syncthreads();
  if (tid == 0) {
    float acc = 0.f;  // in token order, as the CPU backend
    for (int i = 0; i < chunk_tokens; ++i) cum[i] = acc += exp_cum[i];
  }
  __syncthreads();
  if (tid < chunk_tokens) {
    exp_cum[tid] = expf(cum[tid]);
    unit.g[tid] = cum[tid];
  }
  __syncthreads();

  // K̂K̂ᵀ and Q̂K̂ᵀ: thread (ti, tj) computes rows ti + 16·r, columns tj + 16·c (r, c < 4), so the 8
  // lanes of a 16-byte load phase read 8 different rows, 4 banks apart.
  {
    const int ti = tid >> 4, tj = tid & 15;
    float kk[4][4] = {}, qk[4][4] = {};
    for (int c4 = 0; c4 < DKP; c4 += 4) {
      float4 ki[4], qi[4], kj[4];
      for (int r = 0; r < 4; ++r) {
        ki[r] = *reinterpret_cast<const float4*>(kh + (ti + 16 * r) * kp + c4);
        qi[r] = *reinterpret_cast<const float4*>(qh + (ti + 16 * r) * kp + c4);
        kj[r] = *reinterpret_cast<const float4*>(kh + (tj + 16 * r) * kp + c4);
      }
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c) {
          kk[r][c] = fmaf(ki[r].x, kj[c].x, fmaf(ki[r].y, kj[c].y, fmaf(ki[r].z, kj[c].z, fmaf(ki[r].w, kj[c].w, kk[r][c]))));
          qk[r][c] = fmaf(qi[r].x, kj[c].x, fmaf(qi[r].y, kj[c].y, fmaf(qi[r].z, kj[c].z, fmaf(qi[r].w, kj[c].w, qk[r][c]))));
        }
    }
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < 4; ++c) {
        const int i = ti + 16 * r, jj = tj + 16 * c;
        const float decay = jj <= i ? expf(cum[i] - cum[jj]) : 0.f;
        am[i * (chunk_tokens + 1) + jj] = jj < i ? -(bet[i] * kk[r][c] * decay) : 0.f;
        unit.pt[jj * chunk_tokens + i] = qk[r][c] * decay;  // zero above the diagonal
      }
  }
  __syncthreads();

  // β⊙V over q̂, which the products above were the last to read.
  {
    constexpr int batch = 8;  // loads in flight per thread
    const int total = chunk_tokens * int(d.v_dim), dv = int(d.v_dim);
    for (int b0 = 0; b0 < total; b0 += batch * chunk_threads) {
      float x[batch];
#pragma unroll
      for (int u = 0; u < batch; ++u) {
        const int idx = b0 + u * chunk_threads + tid, i = idx / dv, c = idx - i * dv;
        x[u] = idx < total && i < n ? d.v[(t0 + i) * d.stride + h * d.v_dim + c] : 0.f;
      }
#pragma unroll
      for (int u = 0; u < batch; ++u) {
        const int idx = b0 + u * chunk_threads + tid, i = idx / dv;
        if (idx < total) bv[idx] = bet[i] * x[u];
      }
    }
  }

  // T = (I + A)⁻¹ by forward substitution, T_i = e_i − Σ_{j<i} A_ij T_j, column by column: 4 lanes
  // per column share the sum; a column's rows are written and read by one warp only.
  {
    const int part = lane & 3, c = tid >> 2;
    for (int i = n + part; i < chunk_tokens; i += 4) tt[c * transposed_pitch + i] = c == i ? 1.f : 0.f;  // padding rows: e_i
    if (part == 0) tt[c * transposed_pitch] = c == 0 ? 1.f : 0.f;
    for (int i = 1; i < n; ++i) {
      __syncwarp();
      float sum = 0.f;
      for (int jj = c + part; jj < i; jj += 4) sum = fmaf(am[i * (chunk_tokens + 1) + jj], tt[c * transposed_pitch + jj], sum);
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      if (part == 0) tt[c * transposed_pitch + i] = c < i ? sum : c == i ? 1.f : 0.f;
    }
  }
  __syncthreads();

  // U = T (β⊙V) and W = T (β⊙e^G⊙K̂): thread per output column, all 64 rows in registers.
  for (int64_t col = tid; col < d.v_dim + d.k_dim; col += chunk_threads) {
    float acc[chunk_tokens] = {};
    for (int kk = 0; kk < n; ++kk) {
      const float x = col < d.v_dim ? bv[kk * d.v_dim + col] : bet[kk] * exp_cum[kk] * kh[kk * kp + (col - d.v_dim)];
      const float4* t_col = reinterpret_cast<const float4*>(tt + kk * transposed_pitch);  // T[·][kk]
      for (int m4 = 0; m4 < chunk_tokens / 4; ++m4) {
        const float4 tv = t_col[m4];
        acc[4 * m4] = fmaf(tv.x, x, acc[4 * m4]);
        acc[4 * m4 + 1] = fmaf(tv.y, x, acc[4 * m4 + 1]);
        acc[4 * m4 + 2] = fmaf(tv.z, x, acc[4 * m4 + 2]);
        acc[4 * m4 + 3] = fmaf(tv.w, x, acc[4 * m4 + 3]);
      }
    }
    if (col < d.v_dim)
      for (int m = 0; m < chunk_tokens; ++m) unit.u[m * d.v_dim + col] = acc[m];
    else
      for (int m = 0; m < chunk_tokens; ++m) unit.w[m * d.k_dim + (col - d.v_dim)] = acc[m];
  }
}

// acc[r] = fmaf(m[r], s, acc[r]) for r < 8: eight consecutive floats of shared memory (16-byte aligned,
// two float4 loads) times one scalar — the state kernel's inner step, rows 8w … 8w + 7 of a warp.
__device__ __forceinline__ void fma8(float (&acc)[8], const float* m, float s) {
  const float4 a = *reinterpret_cast<const float4*>(m), b = *reinterpret_cast<const float4*>(m + 4);
  acc[0] = fmaf(a.x, s, acc[0]), acc[1] = fmaf(a.y, s, acc[1]), acc[2] = fmaf(a.z, s, acc[2]), acc[3] = fmaf(a.w, s, acc[3]);
  acc[4] = fmaf(b.x, s, acc[4]), acc[5] = fmaf(b.y, s, acc[5]), acc[6] = fmaf(b.z, s, acc[6]), acc[7] = fmaf(b.w, s, acc[7]);
}

template <int DKP>
constexpr size_t chunk_state_shared_floats() {
  return DKP * 32 + 2 * DKP * transposed_pitch + chunk_tokens * DKP + chunk_tokens * chunk_tokens + chunk_tokens * 32 + 2 * chunk_tokens;
}

// Block (32 state columns, value head), the chunks of the pass in order. n_chunks: chunks of the pass.
template <int DKP>
__global__ void __launch_bounds__(chunk_threads) gated_delta_chunk_state_kernel(ChunkArgs a, int64_t n_chunks) {
  dependent_launch_begin();
  constexpr int n_warps = chunk_threads / 32, rows_update = DKP / n_warps;
  extern __shared__ float4 shared4[];
  float* st = reinterpret_cast<float*>(shared4);  // [DKP, 32] state tile
  float* wt = st + DKP * 32;                      // [DKP, transposed_pitch] Wᵀ
  float* qgt = wt + DKP * transposed_pitch;       // [DKP, transposed_pitch] (e^G⊙Q̂)ᵀ
  float* kd = qgt + DKP * transposed_pitch;       // [64, DKP] e^(G_last − G)⊙K̂
  float* pt = kd + chunk_tokens * DKP;            // [64, 64] Pᵀ
  float* vn = pt + chunk_tokens * chunk_tokens;   // [64, 32] U, then V_new
  float* exp_cum = vn + chunk_tokens * 32;        // [64] e^G
  float* exp_rest = exp_cum + chunk_tokens;       // [64] e^(G_last − G)
  const DeltaArgs& d = a.d;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t h = blockIdx.y, j = h / d.ratio, c0 = int64_t(blockIdx.x) * 32, col = c0 + lane;
  const bool col_ok = col < d.v_dim;
  float* state = d.state + h * d.k_dim * d.v_dim;
  {
    constexpr int per_thread = DKP * 32 / chunk_threads;
    float sv[per_thread];
#pragma unroll
    for (int u = 0; u < per_thread; ++u) {
      const int idx = tid + u * chunk_threads, i = idx / 32;
      const int64_t c = c0 + idx % 32;
      sv[u] = i < d.k_dim && c < d.v_dim ? state[i * d.v_dim + c] : 0.f;
    }
#pragma unroll
    for (int u = 0; u < per_thread; ++u) st[tid + u * chunk_threads] = sv[u];
  }
  for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
    const int64_t t0 = a.t_begin + chunk * chunk_tokens;
    const int n = int(d.n_tokens - t0 < chunk_tokens ? d.n_tokens - t0 : chunk_tokens);
    const ChunkUnit unit = chunk_unit(a, chunk, h);
    __syncthreads();  // the previous chunk is done with every array
    if (tid < chunk_tokens) {
      exp_cum[tid] = expf(unit.g[tid]);
      exp_rest[tid] = expf(unit.g[chunk_tokens - 1] - unit.g[tid]);
    }
    __syncthreads();
    // Every load of a batch is issued before the first store, so their latencies overlap.
    constexpr int batch = 8;
    static_assert(chunk_tokens * DKP % (batch * chunk_threads) == 0, "whole batches");
    for (int b0 = 0; b0 < chunk_tokens * DKP; b0 += batch * chunk_threads) {
      float qv[batch], kv[batch], wv[batch], iq[batch], ik[batch];
#pragma unroll
      for (int u = 0; u < batch; ++u) {
        const int idx = b0 + u * chunk_threads + tid, i = idx / DKP, c = idx % DKP;
        const bool ok = i < n && c < d.k_dim;
        const int64_t at = (t0 + i) * d.stride + j * d.k_dim + c;
        qv[u] = ok ? d.q[at] : 0.f;
        kv[u] = ok ? d.k[at] : 0.f;
        wv[u] = ok ? unit.w[i * d.k_dim + c] : 0.f;
        iq[u] = unit.inv_q[i];
        ik[u] = unit.inv_k[i];
      }
#pragma unroll
      for (int u = 0; u < batch; ++u) {
        const int idx = b0 + u * chunk_threads + tid, i = idx / DKP, c = idx % DKP;
        qgt[c * transposed_pitch + i] = exp_cum[i] * (qv[u] * iq[u]);
        wt[c * transposed_pitch + i] = wv[u];
        kd[i * DKP + c] = exp_rest[i] * (kv[u] * ik[u]);
      }
    }
    {
      constexpr int p_per_thread = chunk_tokens * chunk_tokens / chunk_threads, u_per_thread = chunk_tokens * 32 / chunk_threads;
      float pv[p_per_thread], uv[u_per_thread];
#pragma unroll
      for (int u = 0; u < p_per_thread; ++u) pv[u] = unit.pt[tid + u * chunk_threads];
#pragma unroll
      for (int u = 0; u < u_per_thread; ++u) {
        const int idx = tid + u * chunk_threads;
        const int64_t c = c0 + idx % 32;
        uv[u] = c < d.v_dim ? unit.u[(idx / 32) * d.v_dim + c] : 0.f;
      }
#pragma unroll
      for (int u = 0; u < p_per_thread; ++u) pt[tid + u * chunk_threads] = pv[u];
#pragma unroll
      for (int u = 0; u < u_per_thread; ++u) vn[tid + u * chunk_threads] = uv[u];
    }
    __syncthreads();

    // V_new = U − W S: lane = column, warp w rows 8w … 8w + 7.
    {
      float acc[8] = {};
#pragma unroll 4
      for (int c = 0; c < DKP; ++c) {
        const float sv = st[c * 32 + lane];
        fma8(acc, wt + c * transposed_pitch + 8 * warp, sv);
      }
      for (int r = 0; r < 8; ++r) vn[(8 * warp + r) * 32 + lane] -= acc[r];
    }
    __syncthreads();

    // O = (e^G⊙Q̂) S + P V_new, same layout.
    {
      float acc[8] = {};
#pragma unroll 4
      for (int c = 0; c < DKP; ++c) {
        const float sv = st[c * 32 + lane];
        fma8(acc, qgt + c * transposed_pitch + 8 * warp, sv);
      }
#pragma unroll 4
      for (int jj = 0; jj < n; ++jj) {
        const float vv = vn[jj * 32 + lane];
        fma8(acc, pt + jj * chunk_tokens + 8 * warp, vv);
      }
      for (int r = 0; r < 8; ++r) {
        const int i = 8 * warp + r;
        if (i < n && col_ok) d.out[((t0 + i) * d.n_v_heads + h) * d.v_dim + col] = acc[r];
      }
    }
    __syncthreads();  // S was read by every warp above; each thread now rewrites its own entries

    // S ← e^(G_last) S + (e^(G_last − G)⊙K̂)ᵀ V_new: lane = column, warp w rows rows_update·w + r.
    {
      float acc[rows_update] = {};
#pragma unroll 2
      for (int i = 0; i < n; ++i) {
        const float vv = vn[i * 32 + lane];
        for (int r4 = 0; r4 < rows_update; r4 += 4) {
          const float4 kv = *reinterpret_cast<const float4*>(kd + i * DKP + rows_update * warp + r4);
          acc[r4] = fmaf(kv.x, vv, acc[r4]), acc[r4 + 1] = fmaf(kv.y, vv, acc[r4 + 1]);
          acc[r4 + 2] = fmaf(kv.z, vv, acc[r4 + 2]), acc[r4 + 3] = fmaf(kv.w, vv, acc[r4 + 3]);
        }
      }
      const float decay = exp_cum[chunk_tokens - 1];
      for (int r = 0; r < rows_update; ++r) {
        float& sv = st[(rows_update * warp + r) * 32 + lane];
        sv = fmaf(decay, sv, acc[r]);
      }
    }
  }
  __syncthreads();
  for (int idx = tid; idx < DKP * 32; idx += chunk_threads) {
    const int64_t i = idx / 32, c = c0 + idx % 32;
    if (i < d.k_dim && c < d.v_dim) state[i * d.v_dim + c] = st[idx];
  }
}

}  // namespace

void causal_conv1d_silu(const float* x, float* conv_state, const float* weight, int64_t n_tokens, int64_t channels,
                        int64_t kernel, float* out, cudaStream_t stream) {
  if (channels <= 0 || n_tokens < 0) return;
  launch(causal_conv1d_silu_kernel, grid_for(channels, 128), 128, 0, stream, x, conv_state, weight, n_tokens, channels, kernel, out);
  MF_CUDA_CHECK_LAUNCH();
}

void gated_delta_gates(const float* a, const float* b, const float* a_log, const float* dt_bias, int64_t n_tokens,
                       int64_t n_heads, float* g, float* beta, cudaStream_t stream) {
  const int64_t n = n_tokens * n_heads;
  if (n <= 0) return;
  launch(gated_delta_gates_kernel, grid_for(n, 256), 256, 0, stream, a, b, a_log, dt_bias, n, n_heads, g, beta);
  MF_CUDA_CHECK_LAUNCH();
}

namespace {

template <int RPT>
void launch_recurrent(const DeltaArgs& a, cudaStream_t stream) {
  const dim3 grid{unsigned((a.v_dim + 31) / 32), unsigned(a.n_v_heads)};
  launch(gated_delta_recurrent_kernel<RPT>, grid, 32 * recurrent_warps, 0, stream, a);
  MF_CUDA_CHECK_LAUNCH();
}

// Scratch bounded by passes of at most this many bytes of chunk units: a chunk of Qwen3.5-397B's 64
// heads takes 5.3 MB, so a pass holds 12 chunks (768 tokens).
constexpr size_t chunk_pass_bytes = size_t(64) << 20;

template <int DKP>
bool run_chunked(const DeltaArgs& d, cudaStream_t stream) {
  int device = 0, shared_max = 0;
  MF_CUDA_CHECK(cudaGetDevice(&device));
  MF_CUDA_CHECK(cudaDeviceGetAttribute(&shared_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const size_t shared_prepare = chunk_prepare_shared_floats<DKP>(d.v_dim) * sizeof(float);
  const size_t shared_state = chunk_state_shared_floats<DKP>() * sizeof(float);
  if (std::max(shared_prepare, shared_state) > size_t(shared_max)) return false;
  MF_CUDA_CHECK(cudaFuncSetAttribute(gated_delta_chunk_prepare_kernel<DKP>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared_prepare)));
  MF_CUDA_CHECK(cudaFuncSetAttribute(gated_delta_chunk_state_kernel<DKP>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared_state)));
  ChunkArgs a{d, 0, nullptr, (chunk_unit_floats(d.k_dim, d.v_dim) + 3) / 4 * 4};
  const int64_t n_chunks = (d.n_tokens + chunk_tokens - 1) / chunk_tokens;
  const size_t chunk_bytes = size_t(a.unit_floats * d.n_v_heads) * sizeof(float);
  const int64_t pass_chunks = std::clamp<int64_t>(int64_t(chunk_pass_bytes / chunk_bytes), 1, n_chunks);
  a.units = static_cast<float*>(stream_scratch(stream, size_t(pass_chunks) * chunk_bytes));
  for (int64_t c = 0; c < n_chunks; c += pass_chunks) {
    const int64_t chunks = std::min(pass_chunks, n_chunks - c);
    a.t_begin = c * chunk_tokens;
    launch(gated_delta_chunk_prepare_kernel<DKP>, dim3{unsigned(chunks), unsigned(d.n_v_heads)}, chunk_threads, shared_prepare, stream, a);
    MF_CUDA_CHECK_LAUNCH();
    launch(gated_delta_chunk_state_kernel<DKP>, dim3{unsigned((d.v_dim + 31) / 32), unsigned(d.n_v_heads)}, chunk_threads, shared_state, stream, a, chunks);
    MF_CUDA_CHECK_LAUNCH();
  }
  return true;
}

}  // namespace

void gated_delta_rule(const float* q, const float* k, const float* v, int64_t stride, const float* g, const float* beta,
                      float* state, int64_t n_tokens, int64_t n_k_heads, int64_t n_v_heads, int64_t k_dim, int64_t v_dim,
                      float q_scale, float* out, cudaStream_t stream, int64_t chunked_min_tokens) {
  if (n_v_heads <= 0 || n_tokens <= 0) return;
  if (n_k_heads <= 0 || n_v_heads % n_k_heads != 0 || k_dim <= 0 || k_dim > 256 || v_dim <= 0) {
    std::fprintf(stderr, "%s:%d: gated_delta_rule: heads %lld/%lld, k_dim %lld (at most 256), v_dim %lld\n", __FILE__, __LINE__,
                 (long long)n_k_heads, (long long)n_v_heads, (long long)k_dim, (long long)v_dim);
    std::abort();
  }
  const DeltaArgs d{q, k, v, stride, g, beta, state, n_tokens, n_k_heads, n_v_heads, n_v_heads / n_k_heads, k_dim, v_dim, q_scale, out};
  if (n_tokens >= chunked_min_tokens) {
    const bool ran = k_dim <= 32 ? run_chunked<32>(d, stream) : k_dim <= 64 ? run_chunked<64>(d, stream)
                   : k_dim <= 128 ? run_chunked<128>(d, stream) : false;
    if (ran) return;
  }
  if (k_dim <= 32) return launch_recurrent<4>(d, stream);
  if (k_dim <= 64) return launch_recurrent<8>(d, stream);
  if (k_dim <= 128) return launch_recurrent<16>(d, stream);
  launch_recurrent<32>(d, stream);
}

}  // namespace moeflux::cuda
