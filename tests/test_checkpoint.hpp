// Test helper: writes safetensors files and tiny random qwen3_moe checkpoints (config.json + shards)
// for the format, convert and model tests. Owns nothing the product uses; lives in the test binary.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/status.hpp"

namespace moeflux::test {

struct TestTensor {
  std::string name;
  std::string dtype;           // "BF16" or "F32" (any safetensors dtype name is written as given)
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;  // little-endian element data, prod(shape) × dtype size
};

// Writes a valid .safetensors file holding tensors in the given order (no metadata).
Status write_safetensors(const std::string& path, const std::vector<TestTensor>& tensors);

struct TinyCheckpointOptions {
  int64_t hidden = 64;
  int64_t layers = 3;
  int64_t heads = 4;
  int64_t kv_heads = 2;
  int64_t head_dim = 32;
  int64_t n_expert = 8;
  int64_t top_k = 2;
  int64_t moe_intermediate = 64;
  int64_t intermediate = 128;
  int64_t vocab = 300;
  std::vector<int64_t> mlp_only_layers = {};
  bool tied = false;
  bool norm_topk_prob = true;
  bool fused_experts = false;  // {prefix}.gate_up_proj [E, 2I, H] and {prefix}.down_proj [E, H, I]
  int n_shards = 1;            // > 1 writes model-0000i-of-0000n.safetensors + model.safetensors.index.json
  uint64_t seed = 1;
};

struct TinyCheckpoint {
  nlohmann::json config;
  // Every tensor written, in the per-expert form (also when the files hold the fused form), so tests
  // can compare a pack against the source whichever layout the checkpoint used.
  std::vector<TestTensor> tensors;
  const TestTensor* find(const std::string& name) const;
};

// Creates dir (if needed) and writes config.json and the shard(s). Values: bf16 of a uniform random
// in [-0.1, 0.1] (norm weights 1 ± 0.1), deterministic for a given seed. Expert values of a given
// seed are identical in the per-expert and fused forms.
Result<TinyCheckpoint> make_tiny_qwen3_moe_checkpoint(const std::string& dir, const TinyCheckpointOptions& options = {});

// Runs the built `moeflux` binary with args (shell-quoted by the caller); stdout and stderr go through
// files in scratch_dir.
struct CliResult {
  int exit_code = -1;
  std::string out, err;
};
CliResult run_cli(const std::string& args, const std::string& scratch_dir);

}  // namespace moeflux::test
