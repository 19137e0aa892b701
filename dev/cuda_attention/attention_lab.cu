// Kernel lab (issue 6): attention and the gated delta rule on an NVIDIA GPU, the shipped kernels
// (src/backends/cuda/attention.cu, delta_net.cu) against the versions they replaced, at real model
// shapes, each timed with device events (median of batches, inputs rotated through more memory than
// the L2 holds where a call's bytes would fit in it) and reported against the measured device copy
// bandwidth. Versions:
//   attention  v1  one block per (query head, token) (cuda::AttentionPath::simple, still the fallback)
//              v2  tiled: one block per (KV head, row tile, key split), K/V tiles in shared memory,
//                  split partials merged by a combine kernel (cuda::AttentionPath::tiled)
//              v3  decode: one token, q rows and keys in each warp's registers, splits as one cluster
//                  merged through shared memory (cuda::AttentionPath::decode; the --short sweep)
//   delta rule v1  one block per value head, the state in shared memory, tokens in order (copied below)
//              v2  token by token, block per (32 state columns, value head), state in registers
//              v3  chunked (WY) form, 64-token chunks: prepare kernel + state kernel
// Last, a sweep of the tiled kernel's shape (cuda::AttentionTuning) at 32K-key decode and 512-token
// prefill.
// Outputs of each new version are compared with v1's (already checked against the CPU reference by
// the op tests). Build: ninja -C build attention_lab. Run: build/dev/attention_lab (one table per op), or
// build/dev/attention_lab --short for the short-context decode sweep alone (v2's key tiles per split, v3's
// rounds of chunks per split and cluster sizes), --long [n_past] for the decode kernel at 1K-32K keys.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#include "backends/backend.hpp"
#include "backends/cuda/attention.cuh"
#include "backends/cuda/delta_net.cuh"

#define CHECK(call)                                                                                   \
  do {                                                                                                \
    cudaError_t e_ = (call);                                                                          \
    if (e_ != cudaSuccess) {                                                                          \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_));     \
      std::exit(1);                                                                                   \
    }                                                                                                 \
  } while (0)

using moeflux::AttentionLayout;
namespace cuda = moeflux::cuda;

namespace {

// Uniform in [lo, hi) from a hash of the index: fresh random data without host traffic.
__global__ void fill_uniform(float* x, size_t n, uint32_t seed, float lo, float hi) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 0x9E3779B1u ^ seed * 0x85EBCA77u ^ uint32_t(i >> 32) * 0xC2B2AE3Du;
    h ^= h >> 15, h *= 0x2C1B3C6Du, h ^= h >> 12, h *= 0x297A2D39u, h ^= h >> 15;
    x[i] = lo + (hi - lo) * float(h >> 8) * (1.0f / 16777216.0f);
  }
}

float* device_random(size_t n, uint32_t seed, float lo = -1.7f, float hi = 1.7f) {
  float* p = nullptr;
  CHECK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(float)));
  fill_uniform<<<1024, 256>>>(p, n, seed, lo, hi);
  CHECK(cudaGetLastError());
  return p;
}

std::vector<float> to_host(const float* d, size_t n) {
  std::vector<float> h(n);
  CHECK(cudaMemcpy(h.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost));
  return h;
}

// Median over batches of the mean time of one call, in microseconds; batches sized to ≥ 2 ms.
double time_us(const std::function<void(int)>& call) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  call(0);
  CHECK(cudaDeviceSynchronize());
  CHECK(cudaEventRecord(a));
  call(1);
  CHECK(cudaEventRecord(b));
  CHECK(cudaEventSynchronize(b));
  float ms = 0;
  CHECK(cudaEventElapsedTime(&ms, a, b));
  const int reps = std::clamp(int(2.0 / std::max(ms, 1e-3f)), 3, 200);
  std::vector<double> batch;
  int it = 2;
  for (int k = 0; k < 5; ++k) {
    CHECK(cudaEventRecord(a));
    for (int r = 0; r < reps; ++r) call(it++);
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    CHECK(cudaEventElapsedTime(&ms, a, b));
    batch.push_back(1000.0 * ms / reps);
  }
  CHECK(cudaGetLastError());
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  std::sort(batch.begin(), batch.end());
  return batch[batch.size() / 2];
}

double copy_bandwidth_gbs() {
  const size_t bytes = size_t(1) << 30;
  float *src = device_random(bytes / 4, 1), *dst = nullptr;
  CHECK(cudaMalloc(&dst, bytes));
  const double us = time_us([&](int) { CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice)); });
  CHECK(cudaFree(src));
  CHECK(cudaFree(dst));
  return 2.0 * bytes / us / 1e3;  // read + write
}

__global__ void empty_kernel() {}

double max_abs(const std::vector<float>& x) {
  double m = 0;
  for (float v : x) m = std::max(m, double(std::fabs(v)));
  return m;
}

double max_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::isnan(a[i] - b[i]) ? INFINITY : double(std::fabs(a[i] - b[i])));
  return m;
}

// --- attention ------------------------------------------------------------------------------------

struct AttentionModel {
  const char* name;
  AttentionLayout layout;
  bool latent;
};

void attention_table(double copy_gbs) {
  const AttentionModel models[] = {
      {"Qwen3-30B-A3B", AttentionLayout::gqa(32, 4, 128), false},
      {"Qwen3.5-397B", AttentionLayout::gqa(32, 2, 256), false},
      {"DeepSeek-V3 latent", {128, 1, 576, 512, 576, 576}, true},
  };
  struct Shape { int64_t n_tokens, n_past; };
  const Shape shapes[] = {{1, 32}, {1, 64}, {1, 128}, {1, 256}, {1, 1024}, {1, 8192}, {1, 32768}, {4, 8192}, {512, 0}};
  std::printf("\nattention (v1 simple, v2 tiled; KV bytes: keys read once per KV head; max|v2 - v1| / max|v|)\n");
  std::printf("%-20s %6s %6s %10s %10s %8s %10s %8s %10s\n", "model", "T", "n_past", "v1 us", "v2 us", "speedup", "v2 GB/s",
              "% copy", "diff");
  for (const AttentionModel& m : models) {
    const AttentionLayout& l = m.layout;
    const int64_t ctx_max = 32768 + 512;
    const size_t k_floats = size_t(ctx_max * l.k_stride), v_floats = m.latent ? 0 : size_t(ctx_max * l.v_stride);
    // Copies of the cache to rotate through, so that a small context is not served from the L2.
    const int copies = 4;
    float* k = device_random(k_floats * copies, 11);
    float* v = m.latent ? k : device_random(v_floats * copies, 12);
    for (const Shape& s : shapes) {
      const int64_t n_keys = s.n_past + s.n_tokens;
      const size_t q_floats = size_t(s.n_tokens * l.n_head * l.k_dim), o_floats = size_t(s.n_tokens * l.n_head * l.v_dim);
      float* q = device_random(q_floats, 13, -0.6f, 0.6f);
      float *o1 = nullptr, *o2 = nullptr;
      CHECK(cudaMalloc(&o1, o_floats * 4));
      CHECK(cudaMalloc(&o2, o_floats * 4));
      const float scale = 1.0f / std::sqrt(float(l.k_dim));
      auto run = [&](cuda::AttentionPath path, float* out, int it) {
        float* kk = k + size_t(it % copies) * k_floats;
        float* vv = m.latent ? kk : v + size_t(it % copies) * v_floats;
        cuda::attention(q, kk, vv, s.n_tokens, s.n_past, l, scale, out, nullptr, path);
      };
      const double us1 = time_us([&](int it) { run(cuda::AttentionPath::simple, o1, it); });
      const double us2 = time_us([&](int it) { run(cuda::AttentionPath::tiled, o2, it); });
      run(cuda::AttentionPath::simple, o1, 0);
      run(cuda::AttentionPath::tiled, o2, 0);
      CHECK(cudaDeviceSynchronize());
      const auto h1 = to_host(o1, o_floats), h2 = to_host(o2, o_floats);
      const double kv_bytes = double(n_keys) * l.n_head_kv * (l.k_dim + (m.latent ? 0 : l.v_dim)) * 4;
      const double gbs = kv_bytes / us2 / 1e3;
      std::printf("%-20s %6lld %6lld %10.1f %10.1f %7.1fx %10.0f %7.0f%% %10.2e\n", m.name, (long long)s.n_tokens, (long long)s.n_past,
                  us1, us2, us1 / us2, gbs, 100.0 * gbs / copy_gbs, max_diff(h1, h2) / 1.7);
      CHECK(cudaFree(q));
      CHECK(cudaFree(o1));
      CHECK(cudaFree(o2));
    }
    CHECK(cudaFree(k));
    if (!m.latent) CHECK(cudaFree(v));
  }
}

// The tiled kernel's shape (rows per warp × warps, waves of splits) swept at a few shapes; every
// variant's output is checked against v1 like the default's.
void attention_sweep(double copy_gbs) {
  const AttentionModel models[] = {
      {"Qwen3-30B-A3B", AttentionLayout::gqa(32, 4, 128), false},
      {"Qwen3.5-397B", AttentionLayout::gqa(32, 2, 256), false},
      {"DeepSeek-V3 latent", {128, 1, 576, 512, 576, 576}, true},
  };
  struct Shape { int64_t n_tokens, n_past; };
  std::printf("\ntiled attention shapes (rows per warp x warps, waves; 0 = default): us, GB/s, %% copy, diff to v1\n");
  for (const AttentionModel& m : models) {
    const AttentionLayout& l = m.layout;
    const int64_t ctx = 32768 + 512;
    float* k = device_random(size_t(ctx * l.k_stride), 31);
    float* v = m.latent ? k : device_random(size_t(ctx * l.v_stride), 32);
    for (const Shape& s : {Shape{1, 32768}, Shape{512, 0}}) {
      const int64_t n_keys = s.n_past + s.n_tokens;
      const size_t q_floats = size_t(s.n_tokens * l.n_head * l.k_dim), o_floats = size_t(s.n_tokens * l.n_head * l.v_dim);
      float* q = device_random(q_floats, 33, -0.6f, 0.6f);
      float *o1 = nullptr, *o2 = nullptr;
      CHECK(cudaMalloc(&o1, o_floats * 4));
      CHECK(cudaMalloc(&o2, o_floats * 4));
      const float scale = 1.0f / std::sqrt(float(l.k_dim));
      cuda::attention(q, k, v, s.n_tokens, s.n_past, l, scale, o1, nullptr, cuda::AttentionPath::simple);
      CHECK(cudaDeviceSynchronize());
      const auto h1 = to_host(o1, o_floats);
      std::printf("%-20s T=%lld n_past=%lld:", m.name, (long long)s.n_tokens, (long long)s.n_past);
      struct Variant { int rw, warps, waves; };
      std::vector<Variant> variants = {{0, 0, 0}};
      for (int rw : {1, 2, 4})
        for (int warps : {2, 4, 8})
          for (int waves : {1, 2})
            if (rw * warps >= 4 && (s.n_tokens == 1 || waves == 1)) variants.push_back({rw, warps, waves});
      double best = 1e30;
      Variant best_v{};
      for (const Variant& var : variants) {
        const cuda::AttentionTuning tuning{var.rw, var.warps, var.waves};
        const double us = time_us([&](int) {
          cuda::attention(q, k, v, s.n_tokens, s.n_past, l, scale, o2, nullptr, cuda::AttentionPath::tiled, tuning);
        });
        CHECK(cudaDeviceSynchronize());
        const double diff = max_diff(h1, to_host(o2, o_floats)) / 1.7;
        std::printf(" [%dx%d,%d] %.1f%s", var.rw, var.warps, var.waves, us, diff > 1e-5 ? "(WRONG)" : "");
        if (us < best) best = us, best_v = var;
      }
      const double best_gbs = double(n_keys) * l.n_head_kv * (l.k_dim + (m.latent ? 0 : l.v_dim)) * 4 / best / 1e3;
      std::printf("\n    best [%dx%d,%d] %.1f us, %.0f GB/s (%.0f%% copy)\n", best_v.rw, best_v.warps, best_v.waves, best, best_gbs,
                  100.0 * best_gbs / copy_gbs);
      CHECK(cudaFree(q));
      CHECK(cudaFree(o1));
      CHECK(cudaFree(o2));
    }
    CHECK(cudaFree(k));
    if (!m.latent) CHECK(cudaFree(v));
  }
}

// One decode token's query over a cache (n_past earlier keys), with v1's output to check others against:
// q, v1's output o1 and a second output o2 on the device, v1's result on the host.
struct DecodeQuery {
  size_t o_floats;
  float scale;
  float *q = nullptr, *o1 = nullptr, *o2 = nullptr;
  std::vector<float> reference;
  DecodeQuery(const AttentionLayout& l, const float* k, const float* v, int64_t n_past, uint32_t seed)
      : o_floats(size_t(l.n_head * l.v_dim)), scale(1.0f / std::sqrt(float(l.k_dim))) {
    q = device_random(size_t(l.n_head * l.k_dim), seed, -0.6f, 0.6f);
    CHECK(cudaMalloc(&o1, o_floats * 4));
    CHECK(cudaMalloc(&o2, o_floats * 4));
    cuda::attention(q, k, v, 1, n_past, l, scale, o1, nullptr, cuda::AttentionPath::simple);
    CHECK(cudaDeviceSynchronize());
    reference = to_host(o1, o_floats);
  }
  ~DecodeQuery() {
    CHECK(cudaFree(q));
    CHECK(cudaFree(o1));
    CHECK(cudaFree(o2));
  }
  DecodeQuery(const DecodeQuery&) = delete;
  DecodeQuery& operator=(const DecodeQuery&) = delete;
};

// Decode over short and middling contexts (the bench's 512-768 keys, to 8K), where a call sits near its fixed cost: the
// tiled kernel's key tiles per split block (AttentionTuning::split_tiles; 0 = one wave of blocks, one
// tile each here) and its shape, over 32 copies of the cache (more than the L2 holds, as a step's 48
// layers are). µs per call; every variant is checked against v1.
void attention_short_sweep() {
  const AttentionModel models[] = {
      {"Qwen3-30B-A3B", AttentionLayout::gqa(32, 4, 128), false},
      {"Qwen3.5-397B", AttentionLayout::gqa(32, 2, 256), false},
      {"DeepSeek-V3 latent", {128, 1, 576, 512, 576, 576}, true},
  };
  std::printf("\nshort decode (rows per warp x warps, key tiles per split; 0 = the default): us, diff to v1\n");
  for (const AttentionModel& m : models) {
    const AttentionLayout& l = m.layout;
    const int64_t ctx = 8192 + 64;
    const int copies = 32;
    const size_t k_floats = size_t(ctx * l.k_stride), v_floats = m.latent ? k_floats : size_t(ctx * l.v_stride);
    float* k = device_random(k_floats * copies, 41);
    float* v = m.latent ? k : device_random(v_floats * copies, 42);
    for (int64_t n_past : {128, 600, 1100, 1500, 2048, 4096, 8192}) {
      const DecodeQuery d(l, k, v, n_past, 43);
      const size_t o_floats = d.o_floats;
      const float scale = d.scale;
      float *const q = d.q, *const o2 = d.o2;
      const std::vector<float>& h1 = d.reference;
      // One path and tuning: µs a call, and " (WRONG)" where the output is off v1's.
      const auto measure = [&](cuda::AttentionPath path, const cuda::AttentionTuning& tuning) {
        const double us = time_us([&](int it) {
          cuda::attention(q, k + size_t(it % copies) * k_floats, v + size_t(it % copies) * v_floats, 1, n_past, l, scale, o2, nullptr, path,
                          tuning);
        });
        cuda::attention(q, k, v, 1, n_past, l, scale, o2, nullptr, path, tuning);
        CHECK(cudaDeviceSynchronize());
        const double diff = max_diff(h1, to_host(o2, o_floats)) / 1.7;
        return std::pair{us, diff > 1e-5 ? "(WRONG)" : ""};
      };
      std::printf("%-16s n_past=%lld:", m.name, (long long)n_past);
      for (int split_tiles : {0, 1, 2, 3, 4, 6, 8, 12}) {
        const auto [us, wrong] = measure(cuda::AttentionPath::tiled, {0, 0, 0, split_tiles});
        std::printf(" [0x0,%d] %.1f%s", split_tiles, us, wrong);
      }
      if (!m.latent) {  // the decode kernel (cuda::AttentionPath::decode), rounds of chunks per split
        std::printf("\n%-16s decode kernel [rounds a split, cluster]:", "");
        for (auto [split_rounds, cluster] : {std::pair{0, 0}, {0, -1}, {0, 4}, {0, 8}, {0, 16}, {1, -1}, {2, -1}, {4, -1}, {8, -1}}) {
          cuda::AttentionTuning tuning{0, 0, 0, split_rounds};
          tuning.cluster = cluster;
          const auto [us, wrong] = measure(cuda::AttentionPath::decode, tuning);
          std::printf(" [%d,%d] %.1f%s", split_rounds, cluster, us, wrong);
        }
      }
      std::printf("\n");
      std::fflush(stdout);
    }
    CHECK(cudaFree(k));
    if (!m.latent) CHECK(cudaFree(v));
  }
}

// Decode over long contexts (1K to 32K keys), where a call's KV bytes should set its time: the decode
// kernel's default split against fixed rounds of chunks a split (AttentionTuning::split_tiles), the cache
// rotated through 512 MB so that no call is served from the L2. µs a call and % of the copy rate
// (KV bytes: every key and value read once).
void attention_long_sweep(double copy_gbs, int64_t only = 0) {
  const AttentionModel models[] = {
      {"Qwen3-30B-A3B", AttentionLayout::gqa(32, 4, 128), false},
      {"Qwen3.5-397B", AttentionLayout::gqa(32, 2, 256), false},
  };
  std::printf("\nlong decode (the decode kernel; [rounds of chunks a split] us, %% copy; 0 = the kernel's choice)\n");
  for (const AttentionModel& m : models) {
    const AttentionLayout& l = m.layout;
    const size_t pool = size_t(512) << 20, pool_floats = pool / 4;
    float* k = device_random(pool_floats, 51);
    float* v = device_random(pool_floats, 52);
    for (int64_t n_past : {1024, 2048, 4096, 8192, 16384, 32767}) {
      if (only && n_past != only) continue;
      const int64_t n_keys = n_past + 1;
      const size_t k_floats = size_t(n_keys * l.k_stride), v_floats = size_t(n_keys * l.v_stride);
      const int copies = int(std::max<size_t>(1, pool_floats / std::max(k_floats, v_floats)));
      const DecodeQuery d(l, k, v, n_past, 53);
      const size_t o_floats = d.o_floats;
      const float scale = d.scale;
      float *const q = d.q, *const o2 = d.o2;
      const std::vector<float>& h1 = d.reference;
      const double kv_bytes = double(n_keys) * l.n_head_kv * (l.k_dim + l.v_dim) * 4;
      std::printf("%-16s n_past=%-6lld (%d copies):", m.name, (long long)n_past, copies);
      // [rounds of chunks a split]: 0 = the kernel's choice.
      for (int split_rounds : {0, 4, 8, 16, 32}) {
        const cuda::AttentionTuning tuning{0, 0, 0, split_rounds};
        const double us = time_us([&](int it) {
          cuda::attention(q, k + size_t(it % copies) * k_floats, v + size_t(it % copies) * v_floats, 1, n_past, l, scale, o2, nullptr,
                          cuda::AttentionPath::decode, tuning);
        });
        cuda::attention(q, k, v, 1, n_past, l, scale, o2, nullptr, cuda::AttentionPath::decode, tuning);
        CHECK(cudaDeviceSynchronize());
        const double diff = max_diff(h1, to_host(o2, o_floats)) / 1.7;
        std::printf(" [%d] %.1f %.0f%%%s", split_rounds, us, 100.0 * kv_bytes / us / 1e3 / copy_gbs, diff > 1e-5 ? "(WRONG)" : "");
      }
      std::printf("\n");
      std::fflush(stdout);
    }
    CHECK(cudaFree(k));
    CHECK(cudaFree(v));
  }
}

// --- gated delta rule -----------------------------------------------------------------------------

// v1: the kernel this lab's v2/v3 replaced (one block per value head, state in shared memory).
__global__ void delta_v1_kernel(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                                int64_t stride, const float* __restrict__ g, const float* __restrict__ beta,
                                float* __restrict__ state, int64_t n_tokens, int64_t n_v_heads, int64_t ratio, int64_t k_dim,
                                int64_t v_dim, float q_scale, float* __restrict__ out) {
  extern __shared__ float shared[];
  float* S = shared;
  float* qs = shared + k_dim * v_dim;
  float* ks = qs + k_dim;
  const int64_t h = blockIdx.x, j = h / ratio, c = threadIdx.x;
  const bool column = c < v_dim;
  float* state_h = state + h * k_dim * v_dim;
  if (column)
    for (int64_t i = 0; i < k_dim; ++i) S[i * v_dim + c] = state_h[i * v_dim + c];
  for (int64_t t = 0; t < n_tokens; ++t) {
    for (int64_t i = threadIdx.x; i < k_dim; i += blockDim.x) {
      qs[i] = q[t * stride + j * k_dim + i];
      ks[i] = k[t * stride + j * k_dim + i];
    }
    __syncthreads();
    if (column) {
      float sum_q = 0.f, sum_k = 0.f;
      for (int64_t i = 0; i < k_dim; ++i) sum_q += qs[i] * qs[i], sum_k += ks[i] * ks[i];
      const float inv_q = 1.0f / sqrtf(sum_q + 1e-6f), inv_k = 1.0f / sqrtf(sum_k + 1e-6f);
      const float decay = expf(g[t * n_v_heads + h]), b = beta[t * n_v_heads + h];
      float u = 0.f;
      for (int64_t i = 0; i < k_dim; ++i) {
        const float s = S[i * v_dim + c] * decay;
        S[i * v_dim + c] = s;
        u += s * (ks[i] * inv_k);
      }
      u = b * (v[t * stride + h * v_dim + c] - u);
      float o = 0.f;
      for (int64_t i = 0; i < k_dim; ++i) {
        const float s = S[i * v_dim + c] + (ks[i] * inv_k) * u;
        S[i * v_dim + c] = s;
        o += s * (qs[i] * inv_q * q_scale);
      }
      out[(t * n_v_heads + h) * v_dim + c] = o;
    }
    __syncthreads();
  }
  if (column)
    for (int64_t i = 0; i < k_dim; ++i) state_h[i * v_dim + c] = S[i * v_dim + c];
}

void delta_table(double copy_gbs) {
  // Qwen3.5-397B-A17B's linear-attention layer: 16 key heads, 64 value heads, 128 × 128 states.
  const int64_t nk = 16, nv = 64, dk = 128, dv = 128, stride = 2 * nk * dk + nv * dv, t_max = 2048;
  const size_t state_floats = size_t(nv * dk * dv);
  const int states = 16;  // 64 MiB of states to rotate through: one layer's 4 MiB would sit in the L2
  float* state0 = device_random(state_floats, 21, -0.5f, 0.5f);
  float* state = device_random(state_floats * states, 25, -0.5f, 0.5f);
  float* qkv = device_random(size_t(t_max * stride), 22);
  float* g = device_random(size_t(t_max * nv), 23, -1.0f, -0.01f);
  float* beta = device_random(size_t(t_max * nv), 24, 0.05f, 0.95f);
  float* out[3];
  for (float*& o : out) CHECK(cudaMalloc(&o, size_t(t_max * nv * dv) * 4));
  const float q_scale = 1.0f / std::sqrt(float(dk));
  const size_t shared_v1 = size_t(dk * dv + 2 * dk) * 4;
  CHECK(cudaFuncSetAttribute(delta_v1_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared_v1)));
  auto run = [&](int version, int64_t n_tokens, float* st, float* o) {
    if (version == 0) {
      delta_v1_kernel<<<unsigned(nv), unsigned(dv), shared_v1>>>(qkv, qkv + nk * dk, qkv + 2 * nk * dk, stride, g, beta, st, n_tokens, nv,
                                                                 nv / nk, dk, dv, q_scale, o);
    } else {
      cuda::gated_delta_rule(qkv, qkv + nk * dk, qkv + 2 * nk * dk, stride, g, beta, st, n_tokens, nk, nv, dk, dv, q_scale, o, nullptr,
                             version == 1 ? INT64_MAX : 1);
    }
  };
  std::printf("\ngated delta rule, Qwen3.5-397B layer (64 value heads, 128 x 128 fp32 states: 4 MiB read + 4 MiB written)\n");
  std::printf("%6s %10s %10s %10s %8s %10s %8s %12s %12s\n", "T", "v1 us", "v2 us", "v3 us", "best", "v2 GB/s", "% copy", "|v2-v1|",
              "|v3-v1|");
  // 2048 tokens take three passes of the chunked form's scratch (12 chunks of 64 heads each).
  for (int64_t n_tokens : {1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 256, 512, 2048}) {
    double us[3];
    std::vector<float> o[3], s_after[3];
    for (int version = 0; version < 3; ++version) {
      us[version] = time_us([&](int it) { run(version, n_tokens, state + size_t(it % states) * state_floats, out[version]); });
      CHECK(cudaMemcpy(state, state0, state_floats * 4, cudaMemcpyDeviceToDevice));
      run(version, n_tokens, state, out[version]);
      CHECK(cudaDeviceSynchronize());
      o[version] = to_host(out[version], size_t(n_tokens * nv * dv));
      s_after[version] = to_host(state, state_floats);
    }
    const double state_bytes = 2.0 * state_floats * 4;
    const int best = us[0] <= std::min(us[1], us[2]) ? 1 : us[1] <= us[2] ? 2 : 3;
    const double gbs = state_bytes / us[1] / 1e3;
    auto rel = [&](int a) {
      return std::max(max_diff(o[a], o[0]) / (1 + max_abs(o[0])), max_diff(s_after[a], s_after[0]) / (1 + max_abs(s_after[0])));
    };
    std::printf("%6lld %10.1f %10.1f %10.1f %7s%d %10.0f %7.0f%% %12.2e %12.2e\n", (long long)n_tokens, us[0], us[1], us[2], "v", best, gbs,
                100.0 * gbs / copy_gbs, rel(1), rel(2));
  }
  CHECK(cudaFree(state0));
  CHECK(cudaFree(state));
  CHECK(cudaFree(qkv));
  CHECK(cudaFree(g));
  CHECK(cudaFree(beta));
  for (float* o : out) CHECK(cudaFree(o));
}

}  // namespace

int main(int argc, char** argv) {
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const double copy_gbs = copy_bandwidth_gbs();
  // The floor of a call timed this way: back-to-back launches of a kernel that does nothing.
  const double empty_us = time_us([](int) { empty_kernel<<<1, 32>>>(); });
  std::printf("%s, %d SMs, L2 %d MiB; device copy bandwidth %.0f GB/s (read + write, 1 GiB cudaMemcpy); empty launch %.1f us\n",
              prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20, copy_gbs, empty_us);
  if (argc > 1 && std::strcmp(argv[1], "--short") == 0) {  // the short-context decode sweep alone
    attention_short_sweep();
    return 0;
  }
  if (argc > 1 && std::strcmp(argv[1], "--long") == 0) {  // the long-context decode sweep alone
    attention_long_sweep(copy_gbs, argc > 2 ? std::atoll(argv[2]) : 0);
    return 0;
  }
  attention_table(copy_gbs);
  delta_table(copy_gbs);
  attention_sweep(copy_gbs);
  return 0;
}
