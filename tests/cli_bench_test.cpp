// `moeflux bench` end to end on a fixture pack: the JSON report a user scripts against (cold then warm
// runs, every expert tier's counters, the measured rates and the bound), and --device errors.
#include <gtest/gtest.h>

#include <filesystem>

#include <nlohmann/json.hpp>

#include "backends/backend.hpp"
#include "test_checkpoint.hpp"

namespace moeflux {
namespace {

namespace fs = std::filesystem;

class CliBench : public testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::TempDir() + "moeflux_cli_bench_" + std::to_string(::getpid());
    fs::create_directories(dir_);
    const std::string fixture = std::string(MOEFLUX_FIXTURE_DIR) + "/parity/untied_sparse_step";
    const auto r = test::run_cli("convert '" + fixture + "' '" + dir_ + "/pack' --quant q4 --force --quiet", dir_);
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  void TearDown() override { fs::remove_all(dir_); }

  nlohmann::json bench(const std::string& flags) {
    const auto r = test::run_cli("bench --model '" + dir_ + "/pack' --threads 2 --json " + flags, dir_);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return nlohmann::json::parse(r.out);
  }

  std::string dir_;
};

TEST_F(CliBench, ReportsColdAndWarmRunsWithTierCountersAndTheBound) {
  // A host cache larger than every expert: the first run reads them all, the second reads none.
  const auto j = bench("--prompt-tokens 12 --gen-tokens 5 --expert-cache 1G --io page-cache");
  EXPECT_EQ(j["device"], "cpu");
  ASSERT_EQ(j["runs"].size(), 2u);
  EXPECT_EQ(j["runs"][0]["caches"], "cold");
  EXPECT_EQ(j["runs"][1]["caches"], "warm");
  EXPECT_GT(j["rates_bytes_per_s"]["storage"].get<double>(), 0.0);
  const int64_t uses_per_token = j["n_expert_used"].get<int64_t>() * j["n_moe_layers"].get<int64_t>();
  for (const auto& run : j["runs"]) {
    EXPECT_EQ(run["prefill"]["tokens"], 12);
    const auto& decode = run["decode"];
    EXPECT_EQ(decode["tokens"], 5);
    ASSERT_EQ(decode["tiers"].size(), 1u);  // the CPU has the host tier only
    const auto& host = decode["tiers"][0];
    EXPECT_EQ(host["tier"], "host");
    // Every decode token acquires K experts in every MoE layer, each a hit or a miss.
    EXPECT_EQ(host["hits"].get<int64_t>() + host["misses"].get<int64_t>(), 5 * uses_per_token);
    EXPECT_EQ(host["bytes_moved"].get<uint64_t>(), host["transfers"].get<uint64_t>() * j["expert_bytes"].get<uint64_t>());
  }
  // The bound counts the session's cache a decode token reads: every position it attends (the 12-token
  // prompt and, on average over the 5 tokens, 3 more) and the recurrent state read and written. On the CPU
  // its compute part is the weights and that cache at the host memory read rate measured in the run.
  const double memory_rate = j["rates_bytes_per_s"]["host_memory_read"].get<double>();
  EXPECT_GT(memory_rate, 0.0);
  EXPECT_GT(j["cache_bytes_per_token"].get<uint64_t>(), 0u);
  for (const auto& run : j["runs"]) {
    const auto& decode = run["decode"];
    const uint64_t cache_read = decode["cache_read_bytes_per_token"].get<uint64_t>();
    EXPECT_EQ(cache_read, 15 * j["cache_bytes_per_token"].get<uint64_t>() + 2 * j["state_fixed_bytes"].get<uint64_t>());
    const double bytes = double(decode["active_bytes_per_token"].get<uint64_t>() + cache_read);
    // One division each side: equal to a few ulp.
    EXPECT_NEAR(decode["bound"]["compute_seconds"].get<double>(), bytes / memory_rate, 1e-12 * bytes / memory_rate);
  }
  const auto& warm = j["runs"][1]["decode"];
  EXPECT_EQ(warm["tiers"][0]["misses"], 0);
  EXPECT_EQ(warm["tiers"][0]["bytes_moved"], 0);
  // Warm, nothing is read: no storage part in the bound.
  EXPECT_EQ(warm["bound"]["storage_seconds"].get<double>(), 0.0);
  const auto& cold = j["runs"][0]["prefill"]["tiers"][0];
  EXPECT_GT(cold["misses"].get<int64_t>(), 0);
}

// Sampled decoding (as `run` picks tokens) is timed when asked for, and the report says how tokens were picked.
TEST_F(CliBench, DecodesBySamplingWhenGivenATemperature) {
  const auto greedy = bench("--prompt-tokens 6 --gen-tokens 4 --runs 1 --no-probe");
  EXPECT_EQ(greedy["sampling"]["greedy"], true);
  const auto sampled = bench("--prompt-tokens 6 --gen-tokens 4 --runs 1 --no-probe --temp 0.7 --top-k 20 --top-p 0.9");
  EXPECT_EQ(sampled["sampling"]["greedy"], false);
  EXPECT_EQ(sampled["sampling"]["top_k"], 20);
  EXPECT_FLOAT_EQ(sampled["sampling"]["temperature"].get<float>(), 0.7f);
  EXPECT_EQ(sampled["runs"][0]["decode"]["tokens"], 4);
  const auto r = test::run_cli("bench --model '" + dir_ + "/pack' --temp 0.7 --top-p 0", dir_);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("top_p"), std::string::npos) << r.err;
}

TEST_F(CliBench, BadArgumentsAreClearErrors) {
  auto r = test::run_cli("bench --model '" + dir_ + "/pack' --gen-tokens 0", dir_);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("--gen-tokens 0"), std::string::npos) << r.err;
  r = test::run_cli("bench --model '" + dir_ + "/pack' --device tpu", dir_);
  EXPECT_NE(r.exit_code, 0);
  r = test::run_cli("bench --model '" + dir_ + "/pack' --gpu-cache 4G", dir_);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("--device cuda"), std::string::npos) << r.err;
  if (cuda_device_count() == 0) {
    r = test::run_cli("bench --model '" + dir_ + "/pack' --device cuda", dir_);
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.err.find("device cuda"), std::string::npos) << r.err;
  }
}

}  // namespace
}  // namespace moeflux
