// The table of supported model families.
#include "models/model_family.hpp"

#include <array>
#include <chrono>

#include "backends/backend.hpp"

namespace moeflux {

const ModelFamily& qwen3_moe_family();
const ModelFamily& qwen3_next_family();
const ModelFamily& qwen3_5_moe_family();
const ModelFamily& qwen3_5_moe_text_family();
const ModelFamily& deepseek_v3_family();

std::string ExpertDecls::expert_prefix(int layer) const {
  std::string s = expert_prefix_template;
  const std::string key = "{layer}";
  const auto pos = s.find(key);
  if (pos != std::string::npos) s.replace(pos, key.size(), std::to_string(layer));
  return s;
}

namespace {
int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

ProfileScope::ProfileScope(ForwardProfile& profile, ForwardProfile::Part part)
    : profile_(profile.enabled ? &profile : nullptr), part_(part) {
  if (!profile_) return;
  if (profile_->backend) profile_->backend->synchronize();
  start_ns_ = now_ns();
}

ProfileScope::~ProfileScope() {
  if (!profile_) return;
  if (profile_->backend) profile_->backend->synchronize();
  profile_->seconds[part_] += double(now_ns() - start_ns_) * 1e-9;
}

Result<const ModelFamily*> find_model_family(const std::string& model_type) {
  const std::array<const ModelFamily*, 5> families = {&qwen3_moe_family(), &qwen3_next_family(), &qwen3_5_moe_family(),
                                                      &qwen3_5_moe_text_family(), &deepseek_v3_family()};
  std::string known;
  for (const ModelFamily* f : families) {
    if (model_type == f->model_type()) return f;
    known += known.empty() ? f->model_type() : std::string(", ") + f->model_type();
  }
  return make_error(ErrorCode::unsupported, "model_type \"{}\" is not supported (supported: {})", model_type, known);
}

}  // namespace moeflux
