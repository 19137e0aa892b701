// The host sampler's cost per token at real vocabulary sizes (Qwen3's 151936, Qwen3.5's 248320) for the
// settings people run: Qwen3's recommended temperature 0.6 / top-k 20 / top-p 0.95, a nucleus alone,
// temperature alone, greedy. A decode step waits for it, so it adds to every sampled token. The logits
// are N(0, 2.5) with 20 tokens raised by 12: a few likely tokens over a long tail, and a wide nucleus at
// top-p 0.9 (a flatter row than most real ones: the prefix sort has to grow). Results go to
// docs/BENCHMARKS.md.
#include <benchmark/benchmark.h>

#include <random>
#include <string>
#include <vector>

#include "sampling/sampler.hpp"

namespace moeflux {
namespace {

std::vector<float> next_token_row(int64_t n_vocab) {
  std::mt19937 rng(1);
  std::normal_distribution<float> dist(0.0f, 2.5f);
  std::vector<float> logits(static_cast<size_t>(n_vocab));
  for (auto& v : logits) v = dist(rng);
  for (int i = 0; i < 20; ++i) logits[rng() % n_vocab] += 12.0f;
  return logits;
}

void sample(benchmark::State& state, int64_t n_vocab, SamplerParams params) {
  const std::vector<float> logits = next_token_row(n_vocab);
  params.seed = 1;
  auto sampler = Sampler::create(params, n_vocab);
  if (!sampler) return state.SkipWithError(sampler.status().to_string().c_str());
  for (auto _ : state) benchmark::DoNotOptimize(sampler->sample(logits.data()));
}

void register_all() {
  struct Setting {
    const char* name;
    float temperature, top_p;
    int top_k;
  };
  // t1.5_topp0.9: a flat row's nucleus (~10^5 tokens at this spread).
  const Setting settings[] = {{"t0.6_topk20_topp0.95", 0.6f, 0.95f, 20}, {"t0.7_topp0.9", 0.7f, 0.9f, 0},
                              {"t1.5_topp0.9", 1.5f, 0.9f, 0},           {"t1.0", 1.0f, 1.0f, 0},
                              {"greedy", 0.0f, 1.0f, 0}};
  for (int64_t n_vocab : {151936, 248320})
    for (const Setting& s : settings) {
      SamplerParams p;
      p.temperature = s.temperature, p.top_p = s.top_p, p.top_k = s.top_k;
      const std::string name = "Sample/vocab:" + std::to_string(n_vocab) + "/" + s.name;
      benchmark::RegisterBenchmark(name.c_str(), sample, n_vocab, p)->Unit(benchmark::kMicrosecond);
    }
}

const bool registered = (register_all(), true);

}  // namespace
}  // namespace moeflux

BENCHMARK_MAIN();
