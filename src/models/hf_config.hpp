// Reading Hugging Face config.json values for the families: typed lookups with explicit defaults (a
// present key of the wrong type is an error, never silently replaced) and the rotary parameters,
// which transformers 5 moved from top-level keys into "rope_parameters".
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "core/status.hpp"

namespace moeflux {

template <typename T>
Result<T> config_value(const nlohmann::json& c, const char* key, T fallback) {
  if (!c.contains(key) || c[key].is_null()) return fallback;
  try {
    return c[key].get<T>();
  } catch (const nlohmann::json::exception&) {
    return make_error(ErrorCode::format, "config.json: \"{}\" has the wrong type ({})", key, c[key].dump());
  }
}

template <typename T>
Result<T> config_required(const nlohmann::json& c, const char* key) {
  if (!c.contains(key) || c[key].is_null()) return make_error(ErrorCode::format, "config.json: \"{}\" is missing", key);
  return config_value<T>(c, key, T{});
}

struct RopeConfig {
  double theta = 10000.0;
  std::string type = "default";
  double partial_rotary_factor = 1.0;
};

// rope_parameters (transformers 5) or rope_theta / rope_scaling / partial_rotary_factor (4.x).
inline Result<RopeConfig> read_rope_config(const nlohmann::json& c, double default_theta, double default_partial = 1.0) {
  RopeConfig r;
  r.theta = default_theta;
  r.partial_rotary_factor = default_partial;
  const nlohmann::json* rope = c.contains("rope_parameters") && c["rope_parameters"].is_object() ? &c["rope_parameters"] : nullptr;
  MF_ASSIGN_OR_RETURN(r.theta, config_value<double>(c, "rope_theta", r.theta));
  MF_ASSIGN_OR_RETURN(r.partial_rotary_factor, config_value<double>(c, "partial_rotary_factor", r.partial_rotary_factor));
  if (rope) {
    MF_ASSIGN_OR_RETURN(r.theta, config_value<double>(*rope, "rope_theta", r.theta));
    MF_ASSIGN_OR_RETURN(r.partial_rotary_factor, config_value<double>(*rope, "partial_rotary_factor", r.partial_rotary_factor));
    MF_ASSIGN_OR_RETURN(r.type, config_value<std::string>(*rope, "type", r.type));
    MF_ASSIGN_OR_RETURN(r.type, config_value<std::string>(*rope, "rope_type", r.type));
  } else if (c.contains("rope_scaling") && c["rope_scaling"].is_object()) {
    MF_ASSIGN_OR_RETURN(r.type, config_value<std::string>(c["rope_scaling"], "type", r.type));
    MF_ASSIGN_OR_RETURN(r.type, config_value<std::string>(c["rope_scaling"], "rope_type", r.type));
  }
  return r;
}

}  // namespace moeflux
