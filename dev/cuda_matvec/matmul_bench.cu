// The shipped CUDA matmul (src/backends/cuda/matmul.cu, cuda::matmul_jobs) timed at the lab's shapes, so
// the engine's numbers sit next to the lab's versions: matrix-vector products one matrix per call, and all
// K experts of a layer (gate, up, down) in one call, with launches back to back over rotating copies of the
// weights (each call reads from device memory, not from the L2 left warm by the previous one). GB/s are
// weight bytes (data + scales + biases) per second against the measured device-to-device copy.
// Build: with the project (CMake target matmul_bench, when CUDA is on). Run: ./build/dev/matmul_bench, or
// ./build/dev/matmul_bench --batches for the batch table alone (with MOEFLUX_CUDA_GEMM=0 to compare), --moe
// for one decode token's routed experts (router top-k + moe_decode) alone.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/matmul.cuh"
#include "backends/cuda/moe.cuh"

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

// One decode token's routed experts as the engine runs them (router top-k on the device, then
// cuda::moe_decode: gate/up + SwiGLU, down + ordered combine), over rotating copies of each expert blob
// laid out as a pack's (gate, up, down parts at 256-byte offsets), µs per token and weight bytes per
// second. The logits are random and fixed, so the same k experts are chosen each call.
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
      const auto gate = moeflux::weight_part_bytes(f, l.inter, l.hidden), down = moeflux::weight_part_bytes(f, l.hidden, l.inter);
      const auto align = [](size_t b) { return (b + 255) / 256 * 256; };
      moeflux::ExpertLayout layout;
      size_t at = 0;
      const auto place = [&](WeightView& v, const moeflux::WeightPartBytes& p, int64_t rows, int64_t cols) {
        const auto offset = [](size_t o) { return reinterpret_cast<const void*>(uintptr_t(o)); };
        v.format = f, v.rows = rows, v.cols = cols;
        v.data = offset(at), at += align(p.data);
        v.scales = p.scales ? offset(at) : nullptr, at += align(p.scales);
        v.biases = p.biases ? offset(at) : nullptr, at += align(p.biases);
      };
      place(layout.gate, gate, l.inter, l.hidden), place(layout.up, gate, l.inter, l.hidden), place(layout.down, down, l.hidden, l.inter);
      const size_t blob = at, active = size_t(l.k) * (2 * gate.total() + down.total());
      const int n = copies_for(active);
      std::vector<uint8_t> bytes(blob * size_t(l.k));
      fill_random(bytes, seed += 7);
      // Scales and biases small and finite (q8 fp16, q4 bf16); bf16 data tamed likewise.
      for (int e = 0; e < l.k; ++e)
        for (const WeightView* v : {&layout.gate, &layout.up, &layout.down}) {
          const auto p = moeflux::weight_part_bytes(f, v->rows, v->cols);
          uint8_t* b = bytes.data() + size_t(e) * blob;
          for (auto [off, len] : {std::pair{uintptr_t(v->scales), p.scales}, std::pair{uintptr_t(v->biases), p.biases}})
            for (size_t i = 1; i < len; i += 2) b[off + i] = uint8_t((b[off + i] & 0x80) | (f == WeightFormat::q8 ? 0x1C : 0x3C));
          if (f == WeightFormat::bf16)
            for (size_t i = 1; i < p.data; i += 2) b[uintptr_t(v->data) + i] = uint8_t((b[uintptr_t(v->data) + i] & 0x80) | 0x3C);
        }
      // n copies; copy c's table maps expert ids to its blobs (only the chosen ids are ever read).
      uint8_t* d_blobs;
      MF_CUDA_CHECK(cudaMalloc(&d_blobs, bytes.size() * size_t(n)));
      for (int c = 0; c < n; ++c) MF_CUDA_CHECK(cudaMemcpy(d_blobs + bytes.size() * size_t(c), bytes.data(), bytes.size(), cudaMemcpyHostToDevice));
      std::vector<float> logits(size_t(l.n_expert));
      std::vector<uint8_t> lb(logits.size() * 4);
      fill_random(lb, seed += 7);
      for (size_t i = 0; i < logits.size(); ++i) logits[i] = float(lb[4 * i]) / 64.f;
      std::vector<int> order(logits.size());
      for (size_t i = 0; i < order.size(); ++i) order[i] = int(i);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return logits[size_t(a)] > logits[size_t(b)]; });
      std::vector<const void*> tables(size_t(n) * size_t(l.n_expert), nullptr);
      for (int c = 0; c < n; ++c)
        for (int j = 0; j < l.k; ++j)
          tables[size_t(c * l.n_expert + order[size_t(j)])] = d_blobs + bytes.size() * size_t(c) + blob * size_t(j);
      const void** d_tables;
      float *d_logits, *d_weights, *h;
      int32_t* d_ids;
      MF_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&d_tables), tables.size() * sizeof(void*)));
      MF_CUDA_CHECK(cudaMemcpy(d_tables, tables.data(), tables.size() * sizeof(void*), cudaMemcpyHostToDevice));
      MF_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&d_logits), logits.size() * 4));
      MF_CUDA_CHECK(cudaMemcpy(d_logits, logits.data(), logits.size() * 4, cudaMemcpyHostToDevice));
      MF_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&d_ids), 64 * 4));
      MF_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&d_weights), 64 * 4));
      MF_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&h), size_t(l.k) * size_t(l.inter) * 4));
      const float ms = ms_per_call([&](int i) {
        moeflux::cuda::router_softmax_topk(d_logits, 1, l.n_expert, l.k, true, d_ids, d_weights, nullptr);
        moeflux::cuda::moe_decode(layout, d_tables + size_t(i % n) * size_t(l.n_expert), d_ids, d_weights, l.k, x, h, nullptr, y, false,
                                  nullptr);
      }, 200);
      MF_CUDA_CHECK(cudaGetLastError());
      us[fi] = double(ms) * 1e3;
      pct[fi++] = 100.0 * double(active) / (ms * 1e-3) / 1e9 / copy_gbs;
      mb = double(active) / 1e6;
      for (void* p : {static_cast<void*>(d_blobs), static_cast<void*>(d_tables), static_cast<void*>(d_logits), static_cast<void*>(d_ids),
                      static_cast<void*>(d_weights), static_cast<void*>(h)})
        MF_CUDA_CHECK(cudaFree(p));
    }
    std::printf("| %s | %.1f (q4) | %.1f | %.1f | %.1f | %.0f%% / %.0f%% / %.0f%% |\n", l.what, mb, us[0], us[1], us[2], pct[0], pct[1], pct[2]);
    std::fflush(stdout);
  }
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
