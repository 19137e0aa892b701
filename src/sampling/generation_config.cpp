#include "sampling/generation_config.hpp"

#include <filesystem>
#include <fstream>
#include <vector>

#include <nlohmann/json.hpp>

namespace moeflux {

Result<GenerationConfig> load_generation_config(const std::string& dir) {
  const std::string path = dir + "/generation_config.json";
  GenerationConfig config;
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return config;
  std::ifstream in(path);
  if (!in) return make_error(ErrorCode::io, "{}: cannot be read", path);
  const auto j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return make_error(ErrorCode::format, "{}: not a JSON object", path);
  std::vector<std::string> bad;
  const auto number = [&](const char* key, std::optional<float>& out) {
    if (!j.contains(key) || j[key].is_null()) return;
    if (j[key].is_number()) out = j[key].get<float>();
    else bad.push_back(fmt::format("{} is {} (not a number)", key, j[key].dump()));
  };
  number("temperature", config.temperature);
  number("top_p", config.top_p);
  number("min_p", config.min_p);
  number("repetition_penalty", config.repetition_penalty);
  if (j.contains("top_k") && !j["top_k"].is_null()) {
    if (j["top_k"].is_number_integer()) config.top_k = j["top_k"].get<int>();
    else bad.push_back(fmt::format("top_k is {} (not an integer)", j["top_k"].dump()));
  }
  if (j.contains("do_sample") && !j["do_sample"].is_null()) {
    if (j["do_sample"].is_boolean()) config.do_sample = j["do_sample"].get<bool>();
    else bad.push_back(fmt::format("do_sample is {} (not true or false)", j["do_sample"].dump()));
  }
  if (!bad.empty()) return make_error(ErrorCode::format, "{}: {}", path, fmt::join(bad, ", "));
  return config;
}

std::vector<std::string> apply_generation_config(const GenerationConfig& c, SamplerParams& params, const KeepSettings& keep) {
  std::vector<std::string> set;
  const auto take = [&](const auto& value, bool kept, auto& into, const char* name) {
    if (!value || kept) return;
    into = *value;
    set.push_back(name);
  };
  // do_sample false: greedy, as generate() decodes it, whatever the temperature says.
  const std::optional<float> temperature = c.do_sample && !*c.do_sample ? std::optional<float>(0.0f) : c.temperature;
  take(temperature, keep.temperature, params.temperature, "temperature");
  take(c.top_k, keep.top_k, params.top_k, "top-k");
  take(c.top_p, keep.top_p, params.top_p, "top-p");
  take(c.min_p, keep.min_p, params.min_p, "min-p");
  take(c.repetition_penalty, keep.repetition_penalty, params.repetition_penalty, "repetition penalty");
  return set;
}

}  // namespace moeflux
