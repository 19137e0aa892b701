// The shipped CUDA matmul (src/backends/cuda/matmul.cu, cuda::matmul_jobs) timed at the lab's shapes, so
// the engine's numbers sit next to the lab's versions: matrix-vector products one matrix per call, and all
// K experts of a layer (gate, up, down) in one call, with launches back to back over rotating copies of the
// weights (each call reads from device memory, not from the L2 left warm by the previous one). GB/s are
// weight bytes (data + scales + biases) per second against the measured device-to-device copy.
// Build: with the project (CMake target matmul_bench, when CUDA is on). Run: ./build/dev/matmul_bench, or
// ./build/dev/matmul_bench --batches for the batch table alone (with MOEFLUX_CUDA_GEMM=0 to compare).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/matmul.cuh"

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

int main(int argc, char** argv) {
  const bool batches_only = argc > 1 && std::strcmp(argv[1], "--batches") == 0;
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
