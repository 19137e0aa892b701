// The shipped CUDA matmul (src/backends/cuda/matmul.cu, cuda::matmul_jobs) timed at the lab's shapes, so
// the engine's numbers sit next to the lab's versions: matrix-vector products one matrix per call, and all
// K experts of a layer (gate, up, down) in one call, with launches back to back over rotating copies of the
// weights (each call reads from device memory, not from the L2 left warm by the previous one). GB/s are
// weight bytes (data + scales + biases) per second against the measured device-to-device copy.
// Build: with the project (CMake target matmul_bench, when CUDA is on). Run: ./build/dev/matmul_bench, or
// ./build/dev/matmul_bench --batches for the batch table alone (with MOEFLUX_CUDA_GEMM=0 to compare), --moe
// for one decode token's routed experts (router top-k + moe_decode) alone, --layer for a decode step's
// chain of ops at Qwen3-30B's dimensions, each op left out in turn; --layer-trace for that chain's kernels
// one by one, when built with MOEFLUX_CUDA_WAIT_TRACE (each launch from the wait's release to the next's).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/attention.cuh"
#include "backends/cuda/matmul.cuh"
#include "backends/cuda/moe.cuh"
#include "backends/cuda/wait_trace.hpp"

namespace {

using moeflux::MatmulJob;
using moeflux::WeightFormat;
using moeflux::WeightView;

// Random bytes (splitmix64); bf16 and the scales get a fixed exponent so that no value is NaN or huge.
void fill_random(std::vector<uint8_t>& v, uint64_t seed) {
  for (size_t i = 0; i < v.size(); i += 8) {
    uint64_t z = (seed += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    std::memcpy(v.data() + i, &z, std::min<size_t>(8, v.size() - i));
  }
}
void tame_16bit(std::vector<uint8_t>& v) {
  for (size_t i = 1; i < v.size(); i += 2) v[i] = uint8_t((v[i] & 0x80) | 0x3C);  // |value| in [2^-7, 2^-6) (bf16)
}

// n copies of one random [rows, cols] matrix in device memory.
struct Copies {
  std::vector<WeightView> views;
  std::vector<void*> owned;
  size_t bytes = 0;
  Copies(WeightFormat f, int64_t rows, int64_t cols, int n, uint64_t seed) {
    const auto parts = moeflux::weight_part_bytes(f, rows, cols);
    bytes = parts.total();
    std::vector<uint8_t> data(parts.data), scales(parts.scales), biases(parts.biases);
    fill_random(data, seed), fill_random(scales, seed + 1), fill_random(biases, seed + 2);
    if (f == WeightFormat::bf16) tame_16bit(data);
    if (f == WeightFormat::f32)
      for (size_t i = 3; i < data.size(); i += 4) data[i] = uint8_t((data[i] & 0x80) | 0x3C);
    for (auto* v : {&scales, &biases})
      for (size_t i = 1; i < v->size(); i += 2) (*v)[i] = uint8_t(f == WeightFormat::q8 ? 0x1C : 0x3C);  // fp16 / bf16, small
    auto up = [&](const std::vector<uint8_t>& v) -> void* {
      if (v.empty()) return nullptr;
      void* p;
      MF_CUDA_CHECK(cudaMalloc(&p, v.size()));
      MF_CUDA_CHECK(cudaMemcpy(p, v.data(), v.size(), cudaMemcpyHostToDevice));
      owned.push_back(p);
      return p;
    };
    for (int i = 0; i < n; ++i) views.push_back({f, rows, cols, up(data), up(scales), up(biases)});
  }
  ~Copies() {
    for (void* p : owned) cudaFree(p);
  }
};

int copies_for(size_t bytes) { return int(std::min<size_t>(256, (size_t(320) << 20) / bytes + 1)); }

// ms per call of call(k), k = 0, 1, …, over `reps` calls back to back.
template <typename Call>
float ms_per_call(Call&& call, int reps = 40) {
  for (int k = 0; k < 3; ++k) call(k);
  cudaEvent_t a, b;
  MF_CUDA_CHECK(cudaEventCreate(&a));
  MF_CUDA_CHECK(cudaEventCreate(&b));
  MF_CUDA_CHECK(cudaEventRecord(a));
  for (int k = 0; k < reps; ++k) call(k);
  MF_CUDA_CHECK(cudaEventRecord(b));
  MF_CUDA_CHECK(cudaEventSynchronize(b));
  float ms;
  MF_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
  MF_CUDA_CHECK(cudaEventDestroy(a));
  MF_CUDA_CHECK(cudaEventDestroy(b));
  return ms / float(reps);
}

}  // namespace

// Batches of tokens (prefill): the engine's matmul at T tokens, as TFLOP/s (2·rows·cols·T per call) and
// µs per call. Which path runs is the engine's choice; MOEFLUX_CUDA_GEMM=0 keeps the matrix-vector kernels.
void batch_table(float* x, float* y) {
  std::printf("\n| batch (engine%s) | format | T=1 | 4 | 8 | 16 | 32 | 64 | 256 | 512 |\n|---|---|---|---|---|---|---|---|---|---|\n",
              std::getenv("MOEFLUX_CUDA_GEMM") && std::getenv("MOEFLUX_CUDA_GEMM")[0] == '0' ? ", matrix-vector only" : "");
  struct Shape { const char* what; int64_t rows, cols; };
  const Shape shapes[] = {{"expert gate Qwen3-30B [768, 2048]", 768, 2048}, {"expert down Qwen3-30B [2048, 768]", 2048, 768},
                          {"attn q_proj Qwen3-30B [4096, 2048]", 4096, 2048}, {"attn q_proj Qwen3.5-397B [16384, 4096]", 16384, 4096}};
  uint64_t seed = 99;
  for (const Shape& s : shapes)
    for (WeightFormat f : {WeightFormat::bf16, WeightFormat::q8, WeightFormat::q4}) {
      const size_t bytes = moeflux::weight_part_bytes(f, s.rows, s.cols).total();
      Copies c(f, s.rows, s.cols, std::min(copies_for(bytes), 16), seed += 7);
      std::printf("| %s | %s |", s.what, moeflux::weight_format_name(f));
      for (int64_t T : {1, 4, 8, 16, 32, 64, 256, 512}) {
        const float ms = ms_per_call([&](int i) {
          const MatmulJob job{c.views[size_t(i) % c.views.size()], x, y, T};
          moeflux::cuda::matmul_jobs(&job, 1, nullptr);
        }, 20);
        std::printf(" %.1f TF/s %.0f µs |", 2.0 * double(s.rows * s.cols * T) / (ms * 1e-3) / 1e12, double(ms) * 1e3);
      }
      std::printf("\n");
      std::fflush(stdout);
    }
}

// `count` random expert blobs of format f laid out as a pack's (gate, up, down parts at 256-byte
// offsets), `copies` times over in device memory; scales and biases small and finite (q8 fp16, q4 bf16),
// bf16 data tamed likewise.
struct ExpertBlobs {
  moeflux::ExpertLayout layout;
  size_t blob = 0;    // bytes a blob
  size_t active = 0;  // weight bytes of one expert (data, scales, biases)
  int count = 0;
  uint8_t* device = nullptr;
  ExpertBlobs(WeightFormat f, int count_, int copies, int64_t inter, int64_t hidden, uint64_t seed) : count(count_) {
    const auto gate = moeflux::weight_part_bytes(f, inter, hidden), down = moeflux::weight_part_bytes(f, hidden, inter);
    const auto align = [](size_t b) { return (b + 255) / 256 * 256; };
    const auto place = [&](WeightView& v, const moeflux::WeightPartBytes& p, int64_t rows, int64_t cols) {
      const auto offset = [](size_t o) { return reinterpret_cast<const void*>(uintptr_t(o)); };
      v.format = f, v.rows = rows, v.cols = cols;
      v.data = offset(blob), blob += align(p.data);
      v.scales = p.scales ? offset(blob) : nullptr, blob += align(p.scales);
      v.biases = p.biases ? offset(blob) : nullptr, blob += align(p.biases);
    };
    place(layout.gate, gate, inter, hidden), place(layout.up, gate, inter, hidden), place(layout.down, down, hidden, inter);
    active = 2 * gate.total() + down.total();
    std::vector<uint8_t> bytes(blob * size_t(count));
    fill_random(bytes, seed);
    for (int e = 0; e < count; ++e)
      for (const WeightView* v : {&layout.gate, &layout.up, &layout.down}) {
        const auto p = moeflux::weight_part_bytes(f, v->rows, v->cols);
        uint8_t* b = bytes.data() + size_t(e) * blob;
        for (auto [off, len] : {std::pair{uintptr_t(v->scales), p.scales}, std::pair{uintptr_t(v->biases), p.biases}})
          for (size_t i = 1; i < len; i += 2) b[off + i] = uint8_t((b[off + i] & 0x80) | (f == WeightFormat::q8 ? 0x1C : 0x3C));
        if (f == WeightFormat::bf16)
          for (size_t i = 1; i < p.data; i += 2) b[uintptr_t(v->data) + i] = uint8_t((b[uintptr_t(v->data) + i] & 0x80) | 0x3C);
      }
    MF_CUDA_CHECK(cudaMalloc(&device, bytes.size() * size_t(copies)));
    for (int c = 0; c < copies; ++c) MF_CUDA_CHECK(cudaMemcpy(device + bytes.size() * size_t(c), bytes.data(), bytes.size(), cudaMemcpyHostToDevice));
  }
  ExpertBlobs(const ExpertBlobs&) = delete;  // owns `device`
  ExpertBlobs& operator=(const ExpertBlobs&) = delete;
  ~ExpertBlobs() { cudaFree(device); }
  const uint8_t* at(int copy, int e) const { return device + blob * (size_t(copy) * size_t(count) + size_t(e)); }
};

// Device memory holding host values.
template <typename T>
T* upload(const std::vector<T>& v) {
  T* p;
  MF_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p), v.size() * sizeof(T)));
  MF_CUDA_CHECK(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return p;
}

// One decode token's routed experts as the engine runs them (router top-k on the device, then
// cuda::moe_decode: gate/up + SwiGLU, down + ordered combine), over rotating copies of each expert blob,
// µs per token and weight bytes per second. The logits are random and fixed, so the same k experts are
// chosen each call.
void moe_table(float* x, float* y, double copy_gbs) {
  std::printf("\n| routed experts of one token: router top-k + moe_decode (engine) | MB | bf16 µs | q8 µs | q4 µs | bf16 / q8 / q4 %% of copy |\n"
              "|---|---|---|---|---|---|\n");
  struct Layer { const char* what; int k, n_expert; int64_t inter, hidden; };
  uint64_t seed = 555;
  for (const Layer& l : {Layer{"Qwen3-30B-A3B, 8 of 128", 8, 128, 768, 2048}, Layer{"Qwen3.5-397B, 10 of 512", 10, 512, 1024, 4096},
                         Layer{"DeepSeek-V3, 8 of 256", 8, 256, 2048, 7168}}) {
    double us[3], pct[3], mb = 0;
    int fi = 0;
    for (WeightFormat f : {WeightFormat::bf16, WeightFormat::q8, WeightFormat::q4}) {
      const size_t active = size_t(l.k) * (2 * moeflux::weight_part_bytes(f, l.inter, l.hidden).total() +
                                           moeflux::weight_part_bytes(f, l.hidden, l.inter).total());
      const int n = copies_for(active);
      const ExpertBlobs blobs(f, l.k, n, l.inter, l.hidden, seed += 7);
      std::vector<uint8_t> lb(size_t(l.n_expert) * 4);
      fill_random(lb, seed += 7);
      std::vector<float> logits(size_t(l.n_expert));
      for (size_t i = 0; i < logits.size(); ++i) logits[i] = float(lb[4 * i]) / 64.f;
      std::vector<int> order(logits.size());
      for (size_t i = 0; i < order.size(); ++i) order[i] = int(i);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return logits[size_t(a)] > logits[size_t(b)]; });
      // n copies; copy c's table maps expert ids to its blobs (only the chosen ids are ever read).
      std::vector<const void*> tables(size_t(n) * size_t(l.n_expert), nullptr);
      for (int c = 0; c < n; ++c)
        for (int j = 0; j < l.k; ++j) tables[size_t(c * l.n_expert + order[size_t(j)])] = blobs.at(c, j);
      const void** d_tables = upload(tables);
      float* d_logits = upload(logits);
      float *d_weights, *h;
      int32_t* d_ids;
      MF_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&d_ids), 64 * 4));
      MF_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&d_weights), 64 * 4));
      MF_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&h), size_t(l.k) * size_t(l.inter) * 4));
      moeflux::ExpertLayout layout = blobs.layout;
      layout.n_table = l.n_expert;  // as the engine names it
      const float ms = ms_per_call([&](int i) {
        moeflux::cuda::router_softmax_topk(d_logits, 1, l.n_expert, l.k, true, d_ids, d_weights, nullptr);
        moeflux::cuda::moe_decode(layout, d_tables + size_t(i % n) * size_t(l.n_expert), d_ids, d_weights, l.k, x, h, nullptr, y, false,
                                  nullptr);
      }, 200);
      MF_CUDA_CHECK(cudaGetLastError());
      us[fi] = double(ms) * 1e3;
      pct[fi++] = 100.0 * double(active) / (ms * 1e-3) / 1e9 / copy_gbs;
      mb = double(active) / 1e6;
      for (void* p : {static_cast<void*>(d_tables), static_cast<void*>(d_logits), static_cast<void*>(d_ids), static_cast<void*>(d_weights),
                      static_cast<void*>(h)})
        MF_CUDA_CHECK(cudaFree(p));
    }
    std::printf("| %s | %.1f (q4) | %.1f | %.1f | %.1f | %.0f%% / %.0f%% / %.0f%% |\n", l.what, mb, us[0], us[1], us[2], pct[0], pct[1], pct[2]);
    std::fflush(stdout);
  }
}

// One decode step's chain at Qwen3-30B-A3B's dimensions as the engine launches it (48 layers: norm +
// q/k/v, q/k norms + rotary + attention over 600 cached keys, o_proj, norm + router, top-k, routed
// experts; dense q8, router bf16, experts q4 as the bench's synthetic pack), each layer its own weights
// and cache (the experts from four sets of 128, so every step reads from device memory, not the L2).
// Then the step with each op left out, and each op alone 48 times: what an op costs where it sits in
// the chain, apart from the trace's per-op events. µs a layer (median of 7 runs of 20 steps).
// A chain of L layers' launches recorded by the wait probe (wait_trace.hpp): per launch of a layer, the
// means over the layers between the first and last of when its first block was let go to when the next
// launch's was (what the kernel costs where it sits in the chain: the next waits for all of it), how long
// before that its first block had reached the wait (launched early), and the spread of its blocks'
// releases (blocks that found no room until others left).
void wait_trace_table(const std::vector<moeflux::cuda::WaitRecord>& records, int L, const char* const* names, int n_names) {
  struct Launch {
    unsigned long long grid, first_arrive = ~0ull, first_release = ~0ull, last_release = 0;
    int blocks = 0, early = 0;
  };
  std::vector<Launch> launches;
  std::vector<moeflux::cuda::WaitRecord> r = records;
  std::sort(r.begin(), r.end(), [](const auto& a, const auto& b) { return a.grid < b.grid; });
  for (const auto& rec : r) {
    if (launches.empty() || launches.back().grid != rec.grid) launches.push_back({rec.grid});
    Launch& l = launches.back();
    l.blocks++;
    l.first_arrive = std::min(l.first_arrive, rec.arrive);
    l.first_release = std::min(l.first_release, rec.release);
    l.last_release = std::max(l.last_release, rec.release);
  }
  for (auto& l : launches)
    for (const auto& rec : r)
      if (rec.grid == l.grid && rec.arrive + 500 < l.first_release) l.early++;
  if (launches.size() % size_t(L) != 0) {
    std::printf("wait trace: %zu launches for %d layers\n", launches.size(), L);
    return;
  }
  const int per = int(launches.size()) / L;
  // One launch fewer than named: the router's top-k ran inside the norm + router launch.
  std::vector<const char*> fused;
  if (per == n_names - 1) {
    for (int i = 0; i < n_names; ++i)
      if (std::strcmp(names[i], "top-k") != 0) fused.push_back(std::strcmp(names[i], "norm + router") == 0 ? "norm + router + top-k" : names[i]);
    names = fused.data(), n_names = int(fused.size());
  }
  std::printf("\n| launch of a layer (wait trace, %d layers; means of layers 2 … %d) | blocks | µs to the next release | first block waited µs | blocks early | release spread µs |\n|---|---|---|---|---|---|\n",
              L, L - 1);
  double total = 0;
  for (int p = 0; p < per; ++p) {
    double dur = 0, waited = 0, spread = 0, early = 0;
    int n = 0;
    for (int l = 1; l + 1 < L; ++l) {
      const Launch& a = launches[size_t(l * per + p)];
      const Launch& b = launches[size_t(l * per + p + 1)];
      dur += double(b.first_release - a.first_release) * 1e-3;
      waited += double(a.first_release - a.first_arrive) * 1e-3;
      spread += double(a.last_release - a.first_release) * 1e-3;
      early += a.early;
      ++n;
    }
    total += dur / n;
    std::printf("| %s | %d | %.2f | %.2f | %.0f | %.2f |\n", p < n_names ? names[p] : "?", launches[size_t(per + p)].blocks, dur / n,
                waited / n, early / n, spread / n);
  }
  std::printf("| layer | | %.2f | | | |\n", total);
  // Launches whose kernel marks points of its own (wait_trace_mark): each point's time after the launch's
  // first release, mean and latest over its blocks (means over the layers as above).
  constexpr int M = moeflux::cuda::wait_marks;
  for (int p = 0; p < per; ++p) {
    double mean[M] = {}, latest[M] = {}, count[M] = {}, layers[M] = {};
    for (int l = 1; l + 1 < L; ++l) {
      const Launch& a = launches[size_t(l * per + p)];
      double lmax[M];
      std::fill(lmax, lmax + M, -1e300);  // mark 0 (entering the kernel) is mostly before the release
      for (const auto& rec : r) {
        if (rec.grid != a.grid) continue;
        for (int k = 0; k < M; ++k) {
          if (!rec.marks[k]) continue;
          const double t = (double(rec.marks[k]) - double(a.first_release)) * 1e-3;
          mean[k] += t, count[k] += 1, lmax[k] = std::max(lmax[k], t);
        }
      }
      for (int k = 0; k < M; ++k)
        if (lmax[k] > -1e300) latest[k] += lmax[k], layers[k] += 1;
    }
    if (count[0] + count[1] == 0) continue;
    double cycles = 0, ns = 0;  // the SM clock from the wait to a block's last mark, over every marked block
    for (const auto& rec : r)
      for (int k = M - 1; k >= 1; --k)
        if (rec.marks[k] && rec.clock_mark) {
          cycles += double(rec.clock_mark - rec.clock_release), ns += double(rec.marks[k] - rec.release);
          break;
        }
    if (ns > 0) std::printf("SM clock over the marks: %.2f GHz\n", cycles / ns);
    std::printf("%s: marks after the first release, µs (mean over blocks / latest):", p < n_names ? names[p] : "?");
    for (int k = 0; k < M; ++k)
      if (count[k] > 0) std::printf("  %d: %.2f / %.2f (%.0f blocks)", k, mean[k] / count[k], latest[k] / layers[k], count[k] / (L - 2));
    std::printf("\n");
  }
  std::fflush(stdout);
}

void layer_table(double copy_gbs, bool trace_only, unsigned trace_mask) {
  constexpr int L = 48, E = 128, K = 8, sets = 4;
  constexpr int64_t H = 2048, Q = 4096, KV = 512, I = 768, ctx = 1024, n_past = 600;
  const auto layout = moeflux::AttentionLayout::gqa(32, 4, 128);
  Copies qkv_q(WeightFormat::q8, Q, H, L, 11), qkv_k(WeightFormat::q8, KV, H, L, 12), qkv_v(WeightFormat::q8, KV, H, L, 13);
  Copies o_proj(WeightFormat::q8, H, Q, L, 14), router(WeightFormat::bf16, E, H, L, 15);
  ExpertBlobs experts(WeightFormat::q4, E, sets, I, H, 16);
  experts.layout.n_table = E;  // as the engine names it
  std::vector<const void*> tables(size_t(sets) * E);
  for (int c = 0; c < sets; ++c)
    for (int e = 0; e < E; ++e) tables[size_t(c * E + e)] = experts.at(c, e);
  const void** d_tables = upload(tables);
  std::vector<uint8_t> rb(size_t(ctx * KV * 2 * L) * 4 + size_t(8 * H) * 4);
  fill_random(rb, 17);
  std::vector<float> host(rb.size() / 4);
  for (size_t i = 0; i < host.size(); ++i) host[i] = (float(rb[4 * i]) - 127.5f) / 128.f;  // in (−1, 1)
  float* kv = upload(host);  // [L][K rows, V rows] of ctx · KV, then 8 vectors of H
  float* vec = kv + size_t(ctx * KV * 2 * L);
  float *x0 = vec, *x1 = vec + H, *y = vec + 2 * H, *norm_w = vec + 3 * H, *qk_w = vec + 4 * H, *inv_freq = vec + 5 * H;
  float *q, *attn, *h, *logits, *weights, *hbuf;
  int32_t* ids;
  for (auto [p, n] : {std::pair{&q, Q}, {&attn, Q}, {&h, H}, {&logits, int64_t(E)}, {&weights, int64_t(64)}, {&hbuf, K * I}})
    MF_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(p), size_t(n) * 4));
  MF_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&ids), 64 * 4));
  MF_CUDA_CHECK(cudaMemset(ids, 0, 64 * 4));
  MF_CUDA_CHECK(cudaMemset(weights, 0, 64 * 4));
  const float* inv_freq_host = host.data() + (inv_freq - kv);  // the fused kernel takes them by value
  const moeflux::cuda::QkNormRope qk{qk_w, qk_w + 128, 1e-6f, 64, float(n_past), inv_freq_host};
  enum Op { qkv, attention, o, route, topk, moe, n_ops };
  const char* names[n_ops] = {"norm + q/k/v", "attention (q/k norm, rotary)", "o_proj", "norm + router", "router top-k", "experts (gate/up, down)"};
  // mask: the ops that run.
  const auto step = [&](unsigned mask) {
    for (int l = 0; l < L; ++l) {
      float* k_cache = kv + size_t(l) * ctx * KV * 2;
      float* v_cache = k_cache + ctx * KV;
      if (mask & 1u << qkv) {
        const MatmulJob jobs[] = {{qkv_q.views[size_t(l)], h, q, 1}, {qkv_k.views[size_t(l)], h, k_cache + n_past * KV, 1},
                                  {qkv_v.views[size_t(l)], h, v_cache + n_past * KV, 1}};
        if (!moeflux::cuda::norm_matmul_jobs(x0, y, norm_w, 1e-6f, H, x1, h, jobs, 3, nullptr)) std::abort();
      }
      if (mask & 1u << attention)
        if (!moeflux::cuda::attention_qk_norm_rope(q, k_cache, v_cache, n_past, layout, 0.088f, attn, qk, nullptr)) std::abort();
      if (mask & 1u << o) {
        const MatmulJob job{o_proj.views[size_t(l)], attn, y, 1};
        moeflux::cuda::matmul_jobs(&job, 1, nullptr);
      }
      // Both: one launch where the engine's add_rms_norm_route_device takes one (MOEFLUX_CUDA_FUSE_ROUTE=0: two).
      const bool both = (mask & 1u << route) && (mask & 1u << topk);
      if (!both || !moeflux::cuda::norm_route_topk(x1, y, norm_w, 1e-6f, H, x0, h, router.views[size_t(l)], logits, K, true, ids, weights,
                                                    nullptr)) {
        if (mask & 1u << route) {
          const MatmulJob job{router.views[size_t(l)], h, logits, 1};
          if (!moeflux::cuda::norm_matmul_jobs(x1, y, norm_w, 1e-6f, H, x0, h, &job, 1, nullptr)) std::abort();
        }
        if (mask & 1u << topk) moeflux::cuda::router_softmax_topk(logits, 1, E, K, true, ids, weights, nullptr);
      }
      if (mask & 1u << moe)
        moeflux::cuda::moe_decode(experts.layout, d_tables + size_t(l % sets) * E, ids, weights, K, h, hbuf, nullptr, y, false, nullptr);
    }
  };
  const auto us_per_layer = [&](unsigned mask) {
    std::vector<float> runs;
    for (int r = 0; r < 7; ++r) runs.push_back(ms_per_call([&](int) { step(mask); }, 20) * 1e3f / L);
    std::sort(runs.begin(), runs.end());
    return double(runs[3]);
  };
  const unsigned all = (1u << n_ops) - 1;
  if (trace_only) {
    constexpr unsigned capacity = 1u << 18;
    const size_t bytes = sizeof(moeflux::cuda::WaitTrace) + sizeof(moeflux::cuda::WaitRecord) * capacity;
    moeflux::cuda::WaitTrace* trace;
    MF_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&trace), bytes));
    const unsigned head[2] = {0, capacity};
    const unsigned mask = trace_mask ? trace_mask & all : all;
    const char* op_launches[n_ops][2] = {{"norm + q/k/v"}, {"attention"}, {"o_proj"}, {"norm + router"}, {"top-k"}, {"gate/up", "down + combine"}};
    std::vector<const char*> launch_names;
    for (int op = 0; op < n_ops; ++op)
      for (const char* name : op_launches[op])
        if (name && (mask & 1u << op)) launch_names.push_back(name);
    for (int run = 0; run < 3; ++run) {
      for (int warm = 0; warm < 5; ++warm) step(mask);
      MF_CUDA_CHECK(cudaDeviceSynchronize());
      MF_CUDA_CHECK(cudaMemcpy(trace, head, sizeof head, cudaMemcpyHostToDevice));
      if (!moeflux::cuda::enable_wait_trace(trace)) {
        std::printf("--layer-trace: this build has no wait probe (configure with -DMOEFLUX_CUDA_WAIT_TRACE=ON)\n");
        std::exit(1);
      }
      step(mask);
      MF_CUDA_CHECK(cudaDeviceSynchronize());
      moeflux::cuda::enable_wait_trace(nullptr);
      unsigned n = 0;
      MF_CUDA_CHECK(cudaMemcpy(&n, trace, sizeof n, cudaMemcpyDeviceToHost));
      std::vector<moeflux::cuda::WaitRecord> records(std::min(n, capacity));
      MF_CUDA_CHECK(cudaMemcpy(records.data(), reinterpret_cast<char*>(trace) + offsetof(moeflux::cuda::WaitTrace, records),
                               records.size() * sizeof(moeflux::cuda::WaitRecord), cudaMemcpyDeviceToHost));
      if (n > capacity) std::printf("wait trace: %u records, %u kept\n", n, capacity);
      wait_trace_table(records, L, launch_names.data(), int(launch_names.size()));
    }
    MF_CUDA_CHECK(cudaFree(trace));
    return;
  }
  const double full = us_per_layer(all);
  const double bytes = double(qkv_q.bytes + qkv_k.bytes + qkv_v.bytes + o_proj.bytes + router.bytes + K * experts.active);
  std::printf("\n| decode layer chain, Qwen3-30B-A3B dims (engine) | µs a layer | without it: µs (saves) | alone ×48: µs |\n|---|---|---|---|\n");
  std::printf("| whole layer (%.1f MB of weights: %.1f µs at the copy rate) | %.1f | | |\n", bytes / 1e6, bytes / copy_gbs / 1e3, full);
  for (int op = 0; op < n_ops; ++op) {
    const double without = us_per_layer(all & ~(1u << op)), alone = us_per_layer(1u << op);
    std::printf("| %s | | %.1f (%.1f) | %.1f |\n", names[op], without, full - without, alone);
    std::fflush(stdout);
  }
  MF_CUDA_CHECK(cudaGetLastError());
  for (void* p : {static_cast<void*>(d_tables), static_cast<void*>(kv), static_cast<void*>(q), static_cast<void*>(attn), static_cast<void*>(h),
                  static_cast<void*>(logits), static_cast<void*>(weights), static_cast<void*>(hbuf), static_cast<void*>(ids)})
    MF_CUDA_CHECK(cudaFree(p));
}

int main(int argc, char** argv) {
  const bool batches_only = argc > 1 && std::strcmp(argv[1], "--batches") == 0;
  const bool moe_only = argc > 1 && std::strcmp(argv[1], "--moe") == 0;
  cudaDeviceProp prop;
  MF_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  const size_t big = size_t(1) << 30;
  void *src, *dst;
  MF_CUDA_CHECK(cudaMalloc(&src, big));
  MF_CUDA_CHECK(cudaMalloc(&dst, big));
  const float copy_ms = ms_per_call([&](int) { MF_CUDA_CHECK(cudaMemcpyAsync(dst, src, big, cudaMemcpyDeviceToDevice)); }, 10);
  const double copy_gbs = 2.0 * double(big) / (copy_ms * 1e-3) / 1e9;
  MF_CUDA_CHECK(cudaFree(src));
  MF_CUDA_CHECK(cudaFree(dst));
  std::printf("device: %s; device-to-device copy %.0f GB/s (read + write)\n", prop.name, copy_gbs);

  float *x, *y;
  MF_CUDA_CHECK(cudaMalloc(&x, size_t(64) << 20));
  MF_CUDA_CHECK(cudaMalloc(&y, size_t(64) << 20));
  MF_CUDA_CHECK(cudaMemset(x, 0x3c, size_t(64) << 20));  // 0.0115 everywhere: finite, nonzero

  if (argc == 5 && std::strcmp(argv[1], "--one") == 0) {  // --one ROWS COLS FORMAT: one matrix-vector shape (for ncu)
    const int64_t rows = std::atoll(argv[2]), cols = std::atoll(argv[3]);
    WeightFormat f = WeightFormat::q4;
    for (WeightFormat g : {WeightFormat::f32, WeightFormat::bf16, WeightFormat::q8, WeightFormat::q4})
      if (std::strcmp(argv[4], moeflux::weight_format_name(g)) == 0) f = g;
    const size_t bytes = moeflux::weight_part_bytes(f, rows, cols).total();
    Copies c(f, rows, cols, copies_for(bytes), 3);
    const float ms = ms_per_call([&](int i) {
      const MatmulJob job{c.views[size_t(i) % c.views.size()], x, y, 1};
      moeflux::cuda::matmul_jobs(&job, 1, nullptr);
    }, 100);
    std::printf("[%lld, %lld] %s: %.2f us, %.0f GB/s, %.0f%% of copy\n", (long long)rows, (long long)cols, moeflux::weight_format_name(f),
                double(ms) * 1e3, double(bytes) / (ms * 1e-3) / 1e9, 100.0 * double(bytes) / (ms * 1e-3) / 1e9 / copy_gbs);
    return 0;
  }
  if (argc > 1 && (std::strcmp(argv[1], "--layer") == 0 || std::strcmp(argv[1], "--layer-trace") == 0)) {
    // --layer-trace [MASK]: the ops of the mask alone (1 q/k/v, 2 attention, 4 o_proj, 8 router, 16 top-k, 32 experts).
    layer_table(copy_gbs, std::strcmp(argv[1], "--layer-trace") == 0, argc > 2 ? unsigned(std::atoi(argv[2])) : 0u);
    MF_CUDA_CHECK(cudaFree(x));
    MF_CUDA_CHECK(cudaFree(y));
    return 0;
  }
  if (moe_only) {
    moe_table(x, y, copy_gbs);
    MF_CUDA_CHECK(cudaFree(x));
    MF_CUDA_CHECK(cudaFree(y));
    return 0;
  }
  if (batches_only) {
    batch_table(x, y);
    MF_CUDA_CHECK(cudaFree(x));
    MF_CUDA_CHECK(cudaFree(y));
    return 0;
  }
  std::printf("\n| matrix-vector (engine) | MB | bf16 GB/s | q8 GB/s | q4 GB/s | bf16 / q8 / q4 %% of copy |\n|---|---|---|---|---|---|\n");
  struct Shape { const char* what; int64_t rows, cols; };
  const Shape shapes[] = {
      {"expert gate Qwen3-30B [768, 2048]", 768, 2048},       {"expert down Qwen3.5-397B [4096, 1024]", 4096, 1024},
      {"expert gate DeepSeek-V3 [2048, 7168]", 2048, 7168},   {"attn q_proj Qwen3.5-397B [16384, 4096]", 16384, 4096},
      {"attn o_proj DeepSeek-V3 [7168, 16384]", 7168, 16384}, {"head Qwen3-30B [151936, 2048]", 151936, 2048},
      {"head Qwen3.5 [248320, 4096]", 248320, 4096},
  };
  uint64_t seed = 1;
  for (const Shape& s : shapes) {
    double gbs[3];
    size_t q4_bytes = 0;
    int k = 0;
    for (WeightFormat f : {WeightFormat::bf16, WeightFormat::q8, WeightFormat::q4}) {
      const size_t bytes = moeflux::weight_part_bytes(f, s.rows, s.cols).total();
      Copies c(f, s.rows, s.cols, copies_for(bytes), seed += 7);
      const float ms = ms_per_call([&](int i) {
        const MatmulJob job{c.views[size_t(i) % c.views.size()], x, y, 1};
        moeflux::cuda::matmul_jobs(&job, 1, nullptr);
      });
      gbs[k++] = double(bytes) / (ms * 1e-3) / 1e9;
      q4_bytes = bytes;
    }
    std::printf("| %s | %.1f (q4) | %.0f | %.0f | %.0f | %.0f%% / %.0f%% / %.0f%% |\n", s.what, double(q4_bytes) / 1e6, gbs[0], gbs[1], gbs[2],
                100 * gbs[0] / copy_gbs, 100 * gbs[1] / copy_gbs, 100 * gbs[2] / copy_gbs);
    std::fflush(stdout);
  }

  std::printf("\n| all experts of a layer, one matmul_many (engine) | MB (q4) | bf16 GB/s | q8 GB/s | q4 GB/s | bf16 / q8 / q4 %% of copy |\n|---|---|---|---|---|---|\n");
  struct Layer { const char* what; int k; int64_t inter, hidden; };
  for (const Layer& l : {Layer{"Qwen3-30B-A3B, 8 experts", 8, 768, 2048}, Layer{"Qwen3.5-397B, 10 experts", 10, 1024, 4096},
                         Layer{"DeepSeek-V3, 8 experts", 8, 2048, 7168}}) {
    double gbs[3];
    size_t q4_bytes = 0;
    int k = 0;
    for (WeightFormat f : {WeightFormat::bf16, WeightFormat::q8, WeightFormat::q4}) {
      const size_t gate = moeflux::weight_part_bytes(f, l.inter, l.hidden).total(), down = moeflux::weight_part_bytes(f, l.hidden, l.inter).total();
      const size_t bytes = size_t(l.k) * (2 * gate + down);
      const int n = copies_for(bytes);
      Copies gates(f, l.inter, l.hidden, n * l.k * 2, seed += 7), downs(f, l.hidden, l.inter, n * l.k, seed += 7);
      const int64_t slot = std::max(l.inter, l.hidden);
      const float ms = ms_per_call([&](int i) {
        std::vector<MatmulJob> jobs;
        const int layer = i % n;
        for (int e = 0; e < l.k; ++e) {
          const int64_t j = int64_t(jobs.size());
          jobs.push_back({gates.views[size_t((layer * l.k + e) * 2)], x + j * slot, y + j * slot, 1});
          jobs.push_back({gates.views[size_t((layer * l.k + e) * 2 + 1)], x + (j + 1) * slot, y + (j + 1) * slot, 1});
          jobs.push_back({downs.views[size_t(layer * l.k + e)], x + (j + 2) * slot, y + (j + 2) * slot, 1});
        }
        moeflux::cuda::matmul_jobs(jobs.data(), int64_t(jobs.size()), nullptr);
      });
      gbs[k++] = double(bytes) / (ms * 1e-3) / 1e9;
      q4_bytes = bytes;
    }
    std::printf("| %s | %.1f | %.0f | %.0f | %.0f | %.0f%% / %.0f%% / %.0f%% |\n", l.what, double(q4_bytes) / 1e6, gbs[0], gbs[1], gbs[2],
                100 * gbs[0] / copy_gbs, 100 * gbs[1] / copy_gbs, 100 * gbs[2] / copy_gbs);
    std::fflush(stdout);
  }
  MF_CUDA_CHECK(cudaFree(x));
  MF_CUDA_CHECK(cudaFree(y));
  return 0;
}
