// Kernel benchmarks of the optimized CPU backend: the machine's streaming read bandwidth, the decode
// matvec (n_tokens = 1) in GB/s of weight bytes for expert and output-head shapes in bf16/q8/q4, and
// prefill matmul GFLOP/s. Owns no kernel; results go to docs/BENCHMARKS.md ("CPU kernels").
#include <benchmark/benchmark.h>

#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
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
