// Kernel benchmarks of the optimized CPU backend: the machine's streaming read bandwidth, the decode
// matvec (n_tokens = 1) in GB/s of weight bytes for expert and output-head shapes in bf16/q8/q4,
// prefill matmul GFLOP/s, and Gated DeltaNet's ops (decode in GB/s of state, prefill in tokens/s).
// Owns no kernel; results go to docs/BENCHMARKS.md ("CPU kernels").
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <unistd.h>
#include <vector>

#include "backends/backend.hpp"
#include "backends/cpu/cpu_kernels.hpp"
#include "core/aligned_buffer.hpp"
#include "core/thread_pool.hpp"
#include "quant/quantize.hpp"

namespace moeflux {
namespace {

// Rotating over four times the last-level cache in distinct weight copies makes every matvec read from
// DRAM. The L3 size comes from the OS (32 MiB on the development machine, 300 MiB on the GPU machine's
// Xeon), with 32 MiB as the floor when the OS does not say.
size_t rotation_bytes() {
  const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
  return 4 * std::max<size_t>(l3 > 0 ? size_t(l3) : 0, size_t(32) << 20);
}

int all_threads() { return int(std::max(1u, std::thread::hardware_concurrency())); }

// One weight matrix placed in a single 4 KiB-aligned allocation (data, then scales, then biases).
struct PlacedWeight {
  AlignedBuffer storage;
  WeightView view;
};

// A block of at most 1024 random rows, quantized once and repeated to fill every copy, so that a 150k-row
// output head and 60 expert copies cost seconds, not minutes, to make; the bytes moved are the same.
QuantizedMatrix make_block(WeightFormat format, int64_t rows, int64_t cols) {
  const int64_t block_rows = std::min<int64_t>(rows, 1024);
  std::mt19937 rng(1);
  std::normal_distribution<float> dist(0.0f, 0.05f);
  std::vector<float> w(static_cast<size_t>(block_rows * cols));
  for (auto& v : w) v = dist(rng);
  return quantize_matrix(w.data(), block_rows, cols, format);
}

PlacedWeight place_weight(const QuantizedMatrix& block, int64_t rows) {
  const WeightPartBytes bytes = weight_part_bytes(block.format, rows, block.cols);
  PlacedWeight p;
  if (!p.storage.allocate(bytes.total())) std::abort();
  auto* base = p.storage.as<uint8_t>();
  auto fill = [&](const std::vector<uint8_t>& part, uint8_t* dst, size_t total) -> const void* {
    if (total == 0) return nullptr;
    for (size_t off = 0; off < total; off += part.size()) std::memcpy(dst + off, part.data(), std::min(part.size(), total - off));
    return dst;
  };
  p.view = {block.format, rows, block.cols, fill(block.data, base, bytes.data),
            fill(block.scales, base + bytes.data, bytes.scales), fill(block.biases, base + bytes.data + bytes.scales, bytes.biases)};
  return p;
}

void matvec(benchmark::State& state, WeightFormat format, int64_t rows, int64_t cols, int n_threads) {
  const size_t bytes = weight_part_bytes(format, rows, cols).total();
  const size_t n_copies = std::max<size_t>(1, (rotation_bytes() + bytes - 1) / bytes);
  const QuantizedMatrix block = make_block(format, rows, cols);
  std::vector<PlacedWeight> copies;
  for (size_t i = 0; i < n_copies; ++i) copies.push_back(place_weight(block, rows));
  auto backend = make_cpu_backend(n_threads);
  std::vector<float> x(static_cast<size_t>(cols), 0.5f), y(static_cast<size_t>(rows));
  size_t next = 0;
  for (auto _ : state) {
    backend->matmul(copies[next].view, x.data(), y.data(), 1);
    benchmark::DoNotOptimize(y.data());
    next = (next + 1) % n_copies;
  }
  state.counters["GB/s"] = benchmark::Counter(double(bytes) * double(state.iterations()) / 1e9, benchmark::Counter::kIsRate);
  state.counters["weight_MB"] = double(bytes) / 1e6;
}

void prefill(benchmark::State& state, WeightFormat format, int64_t rows, int64_t cols, int64_t n_tokens, int n_threads) {
  const PlacedWeight w = place_weight(make_block(format, rows, cols), rows);
  auto backend = make_cpu_backend(n_threads);
  std::vector<float> x(size_t(n_tokens * cols), 0.5f), y(size_t(n_tokens * rows));
  for (auto _ : state) {
    backend->matmul(w.view, x.data(), y.data(), n_tokens);
    benchmark::DoNotOptimize(y.data());
  }
  const double flops = 2.0 * double(rows) * double(cols) * double(n_tokens);
  state.counters["GFLOP/s"] = benchmark::Counter(flops * double(state.iterations()) / 1e9, benchmark::Counter::kIsRate);
}

// Gated DeltaNet at Qwen3.5-397B's sizes: 16 key heads, 64 value heads, k_dim = v_dim = 128, one
// [T, 2·16·128 + 64·128] q/k/v buffer as the model passes it.
struct GatedDeltaShape {
  static constexpr int64_t n_k_heads = 16, n_v_heads = 64, k_dim = 128, v_dim = 128;
  static constexpr int64_t stride = 2 * n_k_heads * k_dim + n_v_heads * v_dim;
  static constexpr int64_t state_floats = n_v_heads * k_dim * v_dim;  // 4 MiB per layer
};

struct GatedDeltaInputs {
  std::vector<float> qkv, g, beta;  // [T, stride], [T, n_v_heads] ×2
  explicit GatedDeltaInputs(int64_t n_tokens) {
    using S = GatedDeltaShape;
    std::mt19937 rng(3);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    qkv.resize(size_t(n_tokens * S::stride));
    for (auto& x : qkv) x = normal(rng);
    for (int64_t i = 0; i < n_tokens * S::n_v_heads; ++i) {
      g.push_back(-0.3f * std::exp(0.5f * normal(rng)));
      beta.push_back(1.0f / (1.0f + std::exp(-normal(rng))));
    }
  }
};

// The path gated_delta_rule is made to take, whatever the default crossover (CpuBackendTuning).
enum class GatedDeltaPath { recurrent, chunked };

CpuBackendTuning gated_delta_tuning(GatedDeltaPath path) {
  CpuBackendTuning tuning;
  tuning.gated_delta_chunk_min_tokens = path == GatedDeltaPath::chunked ? 1 : INT64_MAX;
  return tuning;
}

// One decode step (T = 1) of one layer. A step reads and writes the layer's whole state (64 heads ×
// 64 KiB); rotating over layers' states four times the last-level cache makes it come from DRAM, as in
// a model of 45 such layers. GB/s counts the state read plus the state written.
void gated_delta_decode(benchmark::State& state, GatedDeltaPath path) {
  using S = GatedDeltaShape;
  const size_t state_bytes = size_t(S::state_floats) * 4;
  const size_t n_layers = std::max<size_t>(1, (rotation_bytes() + state_bytes - 1) / state_bytes);
  std::vector<std::vector<float>> states(n_layers, std::vector<float>(size_t(S::state_floats), 0.01f));
  const GatedDeltaInputs in(1);
  std::vector<float> out(size_t(S::n_v_heads * S::v_dim));
  auto backend = make_cpu_backend_with_kernels(cpu_kernels_best(), all_threads(), gated_delta_tuning(path));
  const float* q = in.qkv.data();
  size_t next = 0;
  for (auto _ : state) {
    backend->gated_delta_rule(q, q + S::n_k_heads * S::k_dim, q + 2 * S::n_k_heads * S::k_dim, S::stride, in.g.data(), in.beta.data(),
                              states[next].data(), 1, S::n_k_heads, S::n_v_heads, S::k_dim, S::v_dim, 0.088f, out.data());
    benchmark::DoNotOptimize(out.data());
    next = (next + 1) % n_layers;
  }
  state.counters["GB/s"] = benchmark::Counter(2.0 * double(state_bytes) * double(state.iterations()) / 1e9, benchmark::Counter::kIsRate);
}

// One layer over a prompt of n_tokens (the state stays in cache: compute-bound).
void gated_delta_prefill(benchmark::State& state, int64_t n_tokens, GatedDeltaPath path) {
  using S = GatedDeltaShape;
  auto backend = make_cpu_backend_with_kernels(cpu_kernels_best(), all_threads(), gated_delta_tuning(path));
  const GatedDeltaInputs in(n_tokens);
  std::vector<float> layer_state(size_t(S::state_floats), 0.0f), out(size_t(n_tokens * S::n_v_heads * S::v_dim));
  const float* q = in.qkv.data();
  for (auto _ : state) {
    backend->gated_delta_rule(q, q + S::n_k_heads * S::k_dim, q + 2 * S::n_k_heads * S::k_dim, S::stride, in.g.data(), in.beta.data(),
                              layer_state.data(), n_tokens, S::n_k_heads, S::n_v_heads, S::k_dim, S::v_dim, 0.088f, out.data());
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["tok/s"] = benchmark::Counter(double(n_tokens) * double(state.iterations()), benchmark::Counter::kIsRate);
}

// The short convolution before Qwen3.5-397B's Gated DeltaNet: 12288 channels (q, k, v), kernel 4.
void causal_conv1d(benchmark::State& state, int64_t n_tokens) {
  const int64_t channels = 12288, kernel = 4;
  std::vector<float> x(size_t(n_tokens * channels), 0.5f), weight(size_t(channels * kernel), 0.25f);
  std::vector<float> conv_state(size_t((kernel - 1) * channels), 0.0f), out(x.size());
  auto backend = make_cpu_backend(all_threads());
  for (auto _ : state) {
    backend->causal_conv1d_silu(x.data(), conv_state.data(), weight.data(), n_tokens, channels, kernel, out.data());
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["tok/s"] = benchmark::Counter(double(n_tokens) * double(state.iterations()), benchmark::Counter::kIsRate);
}

// Every thread sums its share of a buffer far larger than any cache, as 64-bit integers with independent
// chains, so the loop is limited by memory, not by an add's latency.
void memory_read_bandwidth(benchmark::State& state, int n_threads) {
  const size_t bytes = size_t(1) << 30;
  AlignedBuffer buffer(bytes);
  std::memset(buffer.data(), 1, bytes);
  ThreadPool pool(n_threads);
  const auto* words = buffer.as<uint64_t>();
  const int64_t n_words = int64_t(bytes / 8);
  std::vector<uint64_t> sums(size_t(pool.size()) * 4, 0);
  for (auto _ : state) {
    pool.parallel_for(pool.size(), [&](int64_t task) {
      const int64_t begin = n_words * task / pool.size(), end = n_words * (task + 1) / pool.size();
      uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (int64_t i = begin; i + 4 <= end; i += 4) {
        s0 += words[i];
        s1 += words[i + 1];
        s2 += words[i + 2];
        s3 += words[i + 3];
      }
      sums[size_t(task)] = s0 + s1 + s2 + s3;
    });
    benchmark::DoNotOptimize(sums.data());
  }
  state.counters["GB/s"] = benchmark::Counter(double(bytes) * double(state.iterations()) / 1e9, benchmark::Counter::kIsRate);
}

// The cost of one pool dispatch: a parallel_for of pool.size() trivial tasks, as in the many small ops of
// a decode step. Reported as ns per dispatch (the benchmark's time).
void pool_dispatch(benchmark::State& state, int n_threads) {
  ThreadPool pool(n_threads);
  std::vector<int64_t> hits(size_t(pool.size()) * 16, 0);
  for (auto _ : state) {
    pool.parallel_for(pool.size(), [&](int64_t task) { ++hits[size_t(task) * 16]; });
  }
  benchmark::DoNotOptimize(hits.data());
}

void register_all() {
  benchmark::AddCustomContext("cpu_kernels", cpu_kernels_best().isa);
  for (int threads : {all_threads(), 1}) {
    benchmark::RegisterBenchmark(("MemoryReadBandwidth/threads:" + std::to_string(threads)).c_str(), memory_read_bandwidth, threads)
        ->UseRealTime()->Unit(benchmark::kMillisecond);
  }
  for (int threads : {all_threads(), 1}) {
    benchmark::RegisterBenchmark(("PoolDispatch/threads:" + std::to_string(threads)).c_str(), pool_dispatch, threads)
        ->UseRealTime()->Unit(benchmark::kNanosecond);
  }
  struct Shape { int64_t rows, cols; };
  const Shape shapes[] = {{1024, 4096}, {4096, 1024}, {1536, 4096}, {4096, 1536}, {151936, 4096}};
  for (int threads : {all_threads(), 1}) {
    for (const Shape& s : shapes) {
      for (WeightFormat f : {WeightFormat::bf16, WeightFormat::q8, WeightFormat::q4}) {
        const std::string name = std::string("Matvec/") + weight_format_name(f) + "/" + std::to_string(s.rows) + "x" +
                                 std::to_string(s.cols) + "/threads:" + std::to_string(threads);
        benchmark::RegisterBenchmark(name.c_str(), matvec, f, s.rows, s.cols, threads)->UseRealTime()->Unit(benchmark::kMicrosecond);
      }
    }
  }
  const std::string threads_suffix = "/threads:" + std::to_string(all_threads());
  const std::pair<GatedDeltaPath, const char*> paths[] = {{GatedDeltaPath::recurrent, "recurrent"}, {GatedDeltaPath::chunked, "chunked"}};
  for (const auto& [path, path_name] : paths) {
    benchmark::RegisterBenchmark((std::string("GatedDeltaRule/decode/") + path_name + threads_suffix).c_str(), gated_delta_decode, path)
        ->UseRealTime()->Unit(benchmark::kMicrosecond);
  }
  for (int64_t n_tokens : {8, 32, 128, 512}) {
    for (const auto& [path, path_name] : paths) {
      const std::string name = "GatedDeltaRule/prefill/tokens:" + std::to_string(n_tokens) + "/" + path_name + threads_suffix;
      benchmark::RegisterBenchmark(name.c_str(), gated_delta_prefill, n_tokens, path)->UseRealTime()->Unit(benchmark::kMillisecond);
    }
  }
  for (int64_t n_tokens : {1, 512}) {
    benchmark::RegisterBenchmark(("CausalConv1dSilu/12288ch/tokens:" + std::to_string(n_tokens) + threads_suffix).c_str(), causal_conv1d,
                                 n_tokens)->UseRealTime()->Unit(benchmark::kMicrosecond);
  }
  for (int64_t n_tokens : {32, 128}) {
    for (WeightFormat f : {WeightFormat::bf16, WeightFormat::q8, WeightFormat::q4}) {
      const std::string name = std::string("Prefill/") + weight_format_name(f) + "/1536x4096/tokens:" + std::to_string(n_tokens) +
                               "/threads:" + std::to_string(all_threads());
      benchmark::RegisterBenchmark(name.c_str(), prefill, f, 1536, 4096, n_tokens, all_threads())->UseRealTime()->Unit(benchmark::kMillisecond);
    }
  }
}

}  // namespace
}  // namespace moeflux

int main(int argc, char** argv) {
  moeflux::register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
