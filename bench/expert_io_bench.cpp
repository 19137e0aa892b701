// Expert I/O throughput of the host expert store: random whole-expert reads at realistic blob sizes,
// K = 8 experts per iteration with no cache (so Time is the wait for one decode layer's experts),
// O_DIRECT vs the page cache (warm and cold), 1/4/8 reader threads. Writes one scratch file
// (MOEFLUX_BENCH_FILE_GB, default 4 GiB) in MOEFLUX_BENCH_DIR (default /var/tmp), removed at exit.
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include "core/aligned_buffer.hpp"
#include "experts/expert_store.hpp"

namespace moeflux {
namespace {

// Experts one decode step reads per layer (Qwen3 MoE routes 8 of 128).
constexpr int experts_per_layer = 8;

enum class Mode : int { direct = 0, page_cache_warm = 1, page_cache_cold = 2 };
const char* mode_name(Mode m) {
  return m == Mode::direct ? "direct" : m == Mode::page_cache_warm ? "page_cache_warm" : "page_cache_cold";
}

struct ScratchFile {
  std::string path;
  uint64_t bytes = 0;
};

// Fills the file with non-zero bytes (so no file system can elide them) and syncs it, so O_DIRECT
// reads hit the disk rather than waiting on writeback.
bool write_scratch(const ScratchFile& f) {
  const int fd = ::open(f.path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) return false;
  constexpr size_t chunk = 64 << 20;
  AlignedBuffer buf(chunk);
  std::mt19937_64 rng(7);
  for (size_t i = 0; i < chunk / 8; ++i) buf.as<uint64_t>()[i] = rng();
  for (uint64_t done = 0; done < f.bytes; done += chunk) {
    if (::write(fd, buf.data(), chunk) != ssize_t(chunk)) return ::close(fd), false;
  }
  ::fsync(fd);
  ::close(fd);
  return true;
}

void drop_page_cache(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return;
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

// Warms the whole file into the page cache with large sequential reads.
void warm_page_cache(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return;
  AlignedBuffer buf(64 << 20);
  while (::read(fd, buf.data(), buf.size()) > 0) {
  }
  ::close(fd);
}

void bm_expert_reads(benchmark::State& state, const ScratchFile* file) {
  const uint64_t blob_bytes = uint64_t(state.range(0));
  const Mode mode = Mode(state.range(1));
  const int n_readers = int(state.range(2));
  ExpertSource source;
  source.expert_bytes = blob_bytes;
  source.expert_stride = align_up(blob_bytes, 4096);
  source.n_expert = int64_t(file->bytes / source.expert_stride);
  source.layers.push_back({0, file->path, {}});
  ExpertStoreOptions options;
  options.cache_bytes = 0;  // every acquire reads: this measures storage, not the cache
  options.n_readers = n_readers;
  options.io_mode = mode == Mode::direct ? IoMode::direct : IoMode::page_cache;
  auto store = ExpertStore::open(source, options);
  if (!store.is_ok()) {
    state.SkipWithError(store.status().to_string().c_str());
    return;
  }
  if (mode == Mode::page_cache_warm) warm_page_cache(file->path);
  if (mode == Mode::page_cache_cold) drop_page_cache(file->path);
  std::mt19937 rng(42);
  std::uniform_int_distribution<int32_t> pick(0, int32_t(source.n_expert - 1));
  int32_t experts[experts_per_layer];
  const void* blobs[experts_per_layer];
  for (auto _ : state) {
    if (mode == Mode::page_cache_cold) {
      state.PauseTiming();
      drop_page_cache(file->path);
      state.ResumeTiming();
    }
    for (auto& e : experts) e = pick(rng);
    const Status s = (*store)->acquire(0, experts, experts_per_layer, blobs);
    if (!s.is_ok()) {
      state.SkipWithError(s.to_string().c_str());
      break;
    }
    benchmark::DoNotOptimize(blobs[0]);
    (*store)->release(0, experts, experts_per_layer);
  }
  const ExpertStoreStats stats = (*store)->stats();
  state.SetBytesProcessed(int64_t(stats.bytes_read));
  state.SetLabel(mode_name(mode));
}

}  // namespace
}  // namespace moeflux

int main(int argc, char** argv) {
  using namespace moeflux;
  const char* dir = std::getenv("MOEFLUX_BENCH_DIR");
  const char* gib = std::getenv("MOEFLUX_BENCH_FILE_GB");
  ScratchFile file;
  file.path = std::string(dir ? dir : "/var/tmp") + "/moeflux_expert_io_bench_" + std::to_string(::getpid()) + ".bin";
  file.bytes = uint64_t(gib ? std::atof(gib) : 4.0) * (uint64_t(1) << 30);
  file.bytes = file.bytes / (64 << 20) * (64 << 20);
  std::fprintf(stderr, "writing %s (%.1f GiB)...\n", file.path.c_str(), double(file.bytes) / double(1 << 30));
  if (!write_scratch(file)) {
    std::fprintf(stderr, "cannot write %s\n", file.path.c_str());
    std::filesystem::remove(file.path);
    return 1;
  }
  // q4 (4 bits + bf16 scale and bias per 64 = 0.5625 B per weight) expert blobs, 3 matrices each:
  // Qwen3-30B-A3B 3 × 2048 × 768 → 2.65 MB; Qwen3.5-397B as flash-moe streams it → 7.08 MB;
  // Qwen3-235B-A22B 3 × 4096 × 1536 → 10.6 MB.
  for (int64_t blob : {int64_t(2654208), int64_t(7077888), int64_t(10616832)}) {
    for (int mode = 0; mode < 3; ++mode) {
      for (int readers : {1, 4, 8}) {
        benchmark::RegisterBenchmark("expert_reads", bm_expert_reads, &file)
            ->Args({blob, mode, readers})
            ->ArgNames({"blob", "mode", "readers"})
            ->UseRealTime()
            ->Unit(benchmark::kMillisecond)
            ->MinTime(1.0);
      }
    }
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  std::filesystem::remove(file.path);
  return 0;
}
