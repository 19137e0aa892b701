#include "model_flags.hpp"

#include <cstdio>

namespace moeflux::cli {

void ModelFlags::add_to(CLI::App* app) {
  app->add_option("--model,-m", pack_dir, "pack directory (from `moeflux convert`)")->required();
  app->add_option("--device", device, "where the model runs: cpu, or cuda (dense weights on the GPU, experts through a GPU cache)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  app->add_option("--gpu", gpu, "CUDA device index (with --device cuda)")->check(CLI::NonNegativeNumber);
  app->add_option("--gpu-cache", gpu_cache,
                  "GPU memory for cached experts, e.g. 20G, or auto: grow while 2 GiB of the device stay free (with --device cuda)")
      ->capture_default_str();
  app->add_flag("--preload-experts", preload_experts,
                "with --device cuda: load every expert onto the GPU at open (fails if they do not fit in --gpu-cache); decoding then "
                "never waits for an expert");
  app->add_option("--threads,-t", n_threads, "compute threads (0 = all cores)")->check(CLI::NonNegativeNumber);
  app->add_option("--expert-cache", expert_cache, "host memory for cached experts, e.g. 8G (0 = none); pinned with --device cuda");
  app->add_option("--io", io, "expert reads: direct (O_DIRECT) or page-cache")->check(CLI::IsMember({"direct", "page-cache"}));
  app->add_option("--io-threads", io_threads, "expert reader threads")->check(CLI::PositiveNumber);
  app->add_flag("--reference", reference, "use the plain single-threaded reference ops (slow; for checking)");
  app->add_flag("--no-verify", skip_verify, "skip hashing resident.bin at open");
  app->add_flag("--verify-experts", verify_experts, "check every expert read from storage against its hash in the manifest");
}

Result<ModelOptions> ModelFlags::options() const {
  ModelOptions o;
  o.pack_dir = pack_dir;
  MF_ASSIGN_OR_RETURN(o.device, parse_device(device));
  o.gpu = gpu;
  if (gpu_cache != "auto") {
    MF_ASSIGN_OR_RETURN(o.gpu_cache.budget_bytes, parse_bytes(gpu_cache));
    if (o.gpu_cache.budget_bytes == 0)
      return make_error(ErrorCode::invalid_argument, "--gpu-cache 0: the GPU cache must hold at least the experts of one layer (or use auto)");
  }
  o.gpu_cache.preload = preload_experts;
  if (o.device != Device::cuda && (gpu != 0 || gpu_cache != "auto" || preload_experts))
    return make_error(ErrorCode::invalid_argument, "--gpu, --gpu-cache and --preload-experts apply to --device cuda");
  if (o.device == Device::cuda && reference) return make_error(ErrorCode::invalid_argument, "--reference runs on the CPU (not with --device cuda)");
  o.n_threads = n_threads;
  o.reference_backend = reference;
  o.verify_resident_hash = !skip_verify;
  MF_ASSIGN_OR_RETURN(o.experts.cache_bytes, parse_bytes(expert_cache));
  o.experts.io_mode = io == "direct" ? IoMode::direct : IoMode::page_cache;
  o.experts.n_readers = io_threads;
  o.experts.verify_hashes = verify_experts;
  return o;
}

Result<uint64_t> parse_bytes(const std::string& text) {
  if (text.empty()) return make_error(ErrorCode::invalid_argument, "empty byte size");
  size_t used = 0;
  double value = 0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    return make_error(ErrorCode::invalid_argument, "byte size \"{}\" is not a number", text);
  }
  std::string suffix = text.substr(used);
  if (!suffix.empty() && (suffix.back() == 'B' || suffix.back() == 'b')) suffix.pop_back();
  if (!suffix.empty() && (suffix.back() == 'i')) suffix.pop_back();
  double scale = 1;
  if (suffix == "K" || suffix == "k") scale = 1024.0;
  else if (suffix == "M" || suffix == "m") scale = 1024.0 * 1024;
  else if (suffix == "G" || suffix == "g") scale = 1024.0 * 1024 * 1024;
  else if (suffix == "T" || suffix == "t") scale = 1024.0 * 1024 * 1024 * 1024;
  else if (!suffix.empty()) return make_error(ErrorCode::invalid_argument, "byte size \"{}\": unknown suffix \"{}\" (K, M, G, T)", text, suffix);
  if (value < 0) return make_error(ErrorCode::invalid_argument, "byte size \"{}\" is negative", text);
  return uint64_t(value * scale);
}

Result<std::vector<int32_t>> parse_token_list(const std::string& text) {
  std::vector<int32_t> tokens;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find(',', pos);
    if (end == std::string::npos) end = text.size();
    const std::string item = text.substr(pos, end - pos);
    size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (item.empty() || used != item.size() || v < INT32_MIN || v > INT32_MAX)
      return make_error(ErrorCode::invalid_argument, "token list: \"{}\" is not a token id", item);
    tokens.push_back(int32_t(v));
    pos = end + 1;
  }
  if (tokens.empty()) return make_error(ErrorCode::invalid_argument, "token list is empty");
  return tokens;
}

std::string expert_report(const ExpertStoreStats& s, double seconds) {
  const uint64_t total = s.hits + s.misses;
  return fmt::format("experts: {} uses, {} hits ({:.1f}%), {} misses; read {} in {} reads ({}/s); waited {:.3f} s; cache holds {} experts ({})",
                     total, s.hits, total ? 100.0 * double(s.hits) / double(total) : 0.0, s.misses, format_bytes(double(s.bytes_read)),
                     s.reads, format_bytes(seconds > 0 ? double(s.bytes_read) / seconds : 0.0), s.wait_seconds, s.cached_experts,
                     format_bytes(double(s.cached_bytes)));
}

std::string expert_tiers_report(ExpertStore& top, double seconds) {
  std::string out;
  for (ExpertStore* tier = &top; tier; tier = tier->lower_tier()) {
    if (!out.empty()) out += "\n";
    if (top.lower_tier()) out += fmt::format("[{}] ", tier->tier_name());
    out += expert_report(tier->stats(), seconds);
  }
  return out;
}

int report_error(const char* command, const Status& status) {
  std::fprintf(stderr, "moeflux %s: %s\n", command, status.to_string().c_str());
  return 1;
}

}  // namespace moeflux::cli
