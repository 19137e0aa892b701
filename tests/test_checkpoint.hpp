// Test helper: writes safetensors files and tiny random qwen3_moe checkpoints (config.json + shards,
// bf16 or FP8 block-quantized) for the format, convert and model tests. Owns nothing the product uses;
// lives in the test binary.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
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

// A [rows, cols] BF16 or F32 matrix block-quantized as DeepSeek-V3 publishes it: F8_E4M3 values (the
// nearest to w / s) and "<name>_scale_inv" [ceil(rows / block[0]), ceil(cols / block[1])] of dtype
// scale_dtype ("F32" or "BF16") holding each block's s = max|w| / 448 (1 for an all-zero block).
std::pair<TestTensor, TestTensor> quantize_fp8(const TestTensor& t, const std::vector<int64_t>& block,
                                               const std::string& scale_dtype = "F32");

// A tensor's values as f32: BF16, F16 and F32 decoded; F8_E4M3 times its block scale, `scale` being
// its "<name>_scale_inv" and block the weight_block_size (one f32 multiply, as the converter does).
std::vector<float> tensor_values(const TestTensor& t, const TestTensor* scale = nullptr, const std::vector<int64_t>& block = {});

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
  // Non-empty: FP8 as DeepSeek-V3 publishes it. Every *_proj matrix (attention, dense MLP, experts) is
  // written F8_E4M3 with "<name>_scale_inv" (quantize_fp8, in fp8_scale_dtype), and config.json gets
  // quantization_config {"quant_method": "fp8", "weight_block_size": fp8_block}; norms, routers, the
  // embedding and lm_head stay BF16. The scales of layer 0 are written after every other tensor and
  // those of the last layer before every other tensor, so with several shards they lie in other shards
  // than their weights; the rest follow their weights. Fused experts are written without scales (no
  // published checkpoint has fused FP8 experts; convert refuses them).
  std::vector<int64_t> fp8_block = {};
  std::string fp8_scale_dtype = "F32";
};

struct TinyCheckpoint {
  nlohmann::json config;
  // Every tensor written, in the per-expert form (also when the files hold the fused form), so tests
  // can compare a pack against the source whichever layout the checkpoint used; FP8 scales included.
  std::vector<TestTensor> tensors;
  const TestTensor* find(const std::string& name) const;
  // The values of tensor `name` as f32 (an FP8 one dequantized with its scales); empty if absent.
  std::vector<float> values(const std::string& name) const;
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
