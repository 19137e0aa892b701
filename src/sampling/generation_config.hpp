// The sampling settings a checkpoint's generation_config.json recommends: what transformers' generate()
// uses for the model unless told otherwise (Qwen3: temperature 0.6, top-k 20, top-p 0.95).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "core/status.hpp"
#include "sampling/sampler.hpp"

namespace moeflux {

// Each setting present only where the file names it.
struct GenerationConfig {
  std::optional<bool> do_sample;  // false: greedy, whatever the temperature says
  std::optional<float> temperature, top_p, min_p, repetition_penalty;
  std::optional<int> top_k;

  bool empty() const { return !do_sample && !temperature && !top_p && !min_p && !repetition_penalty && !top_k; }
};

// dir/generation_config.json (a pack keeps it in its tokenizer/ directory): an empty config when the file
// is absent; a format error naming the file and every field of the wrong type when it is not a JSON
// object or a field is not what generate() takes (a number; an integer top_k; a boolean do_sample).
Result<GenerationConfig> load_generation_config(const std::string& dir);

// The settings the config names, into params (do_sample false: temperature 0). Fields of params the
// caller set itself are kept where `keep` says so. Returns the settings it set ("temperature", "top-k",
// "top-p", "min-p", "repetition penalty"), in that order.
struct KeepSettings {
  bool temperature = false, top_k = false, top_p = false, min_p = false, repetition_penalty = false;
};
std::vector<std::string> apply_generation_config(const GenerationConfig& config, SamplerParams& params, const KeepSettings& keep = {});

}  // namespace moeflux
