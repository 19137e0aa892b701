// `moeflux bench`: prefill and decode speed of a pack on this machine, with the expert store's counters
// for each phase and the bytes-per-token bound they are judged against (DESIGN.md, "Performance").
// Owns the measurement loop and its report (text or one JSON object); not the model or the store.
#include <algorithm>
#include <cstdio>
#include <random>

#include "commands.hpp"
#include "core/timer.hpp"
#include "format/pack.hpp"
#include "model_flags.hpp"
#include "models/model_family.hpp"
#include "runtime/session.hpp"

namespace moeflux::cli {
namespace {

using nlohmann::json;

struct BenchArgs {
  ModelFlags model;
  int n_prompt = 64;
  int n_gen = 32;
  int n_runs = 1;
  uint64_t seed = 1;
  bool json_output = false;
};

struct PhaseResult {
  int64_t n_tokens = 0;
  double seconds = 0;
  ExpertStoreStats experts;
  ForwardProfile profile;  // wall time per part of the forward pass
};

// Seconds per part: the graph's parts, the rest ("other": embedding, norms, residuals, output head), and
// of the routed experts the time spent waiting for expert reads.
std::vector<std::pair<std::string, double>> time_split(const PhaseResult& p) {
  std::vector<std::pair<std::string, double>> parts;
  double accounted = 0;
  for (int i = 0; i < ForwardProfile::n_parts; ++i) {
    if (p.profile.seconds[i] <= 0) continue;
    parts.emplace_back(ForwardProfile::name(i), p.profile.seconds[i]);
    accounted += p.profile.seconds[i];
  }
  parts.emplace_back("other", std::max(0.0, p.seconds - accounted));
  parts.emplace_back("expert_io_wait", p.experts.wait_seconds);
  return parts;
}

std::string split_report(const PhaseResult& p) {
  std::string out;
  for (const auto& [name, seconds] : time_split(p))
    out += fmt::format("{}{} {:.2f} ms/token ({:.0f}%)", out.empty() ? "" : ", ", name, 1e3 * seconds / double(p.n_tokens),
                       100.0 * seconds / p.seconds);
  return out;
}

json phase_json(const PhaseResult& p) {
  const uint64_t uses = p.experts.hits + p.experts.misses;
  return {{"tokens", p.n_tokens},
          {"seconds", p.seconds},
          {"tok_per_s", p.seconds > 0 ? double(p.n_tokens) / p.seconds : 0.0},
          {"ms_per_token", p.n_tokens > 0 ? 1e3 * p.seconds / double(p.n_tokens) : 0.0},
          {"expert_hits", p.experts.hits},
          {"expert_misses", p.experts.misses},
          {"expert_hit_rate", uses ? double(p.experts.hits) / double(uses) : 0.0},
          {"expert_bytes_read", p.experts.bytes_read},
          {"expert_bytes_read_per_token", p.n_tokens > 0 ? double(p.experts.bytes_read) / double(p.n_tokens) : 0.0},
          {"expert_reads", p.experts.reads},
          {"expert_wait_seconds", p.experts.wait_seconds},
          {"storage_gb_per_s", p.seconds > 0 ? double(p.experts.bytes_read) / p.seconds / 1e9 : 0.0},
          {"cached_experts", p.experts.cached_experts},
          {"cached_bytes", p.experts.cached_bytes},
          {"time_split_seconds", [&] {
             json split = json::object();
             for (const auto& [name, seconds] : time_split(p)) split[name] = seconds;
             return split;
           }()}};
}

int32_t argmax(const float* v, int64_t n) { return int32_t(std::max_element(v, v + n) - v); }

int run_bench(const BenchArgs& a) {
  if (a.n_prompt < 1 || a.n_gen < 1 || a.n_runs < 1)
    return report_error("bench", make_error(ErrorCode::invalid_argument, "--prompt {}, --gen {}, --runs {}: each must be at least 1",
                                            a.n_prompt, a.n_gen, a.n_runs));
  auto options = a.model.options();
  if (!options) return report_error("bench", options.status());
  Timer open_timer;
  auto model_result = Model::open(*options);
  if (!model_result) return report_error("bench", model_result.status());
  Model& model = **model_result;
  const double open_seconds = open_timer.seconds();

  // The bound: per decode token every resident weight is read once, except the embedding table, of
  // which one row is looked up (when tied it is also the output head and is read whole), plus K experts
  // in every MoE layer.
  const Manifest& m = model.pack().manifest();
  const int64_t n_expert_used = m.hparams.value("n_expert_used", int64_t(0));
  const uint64_t n_moe_layers = m.expert_layers.size();
  const uint64_t resident_bytes = model.pack().resident_bytes();
  uint64_t embedding_bytes = 0;
  if (!m.hparams.value("tie_word_embeddings", false))
    if (const PackTensor* t = m.find_tensor("model.embed_tokens.weight"))
      embedding_bytes = t->data.bytes + t->scales.bytes + t->biases.bytes;
  const uint64_t resident_read = resident_bytes - embedding_bytes;
  const uint64_t expert_bytes_per_token = uint64_t(n_expert_used) * m.expert_bytes * n_moe_layers;
  const uint64_t bound_bytes = resident_read + expert_bytes_per_token;

  SessionOptions so;
  so.n_ctx = int64_t(a.n_prompt) + a.n_gen;
  auto session_result = Session::create(model, so);
  if (!session_result) return report_error("bench", session_result.status());
  Session& session = **session_result;
  // The session's cache: bytes per position (KV or MLA latent rows) and fixed bytes (recurrent state).
  uint64_t cache_bytes_per_token = 0, state_fixed_bytes = 0;
  for (const auto& b : session.state_buffers()) {
    cache_bytes_per_token += b.floats_per_position * sizeof(float);
    state_fixed_bytes += b.fixed_floats * sizeof(float);
  }

  // The same prompt every run, so a second run with a cache that holds every expert is the warm case.
  std::mt19937_64 rng(a.seed);
  std::uniform_int_distribution<int32_t> token_dist(0, int32_t(model.n_vocab() - 1));
  std::vector<int32_t> prompt(size_t(a.n_prompt));
  for (auto& t : prompt) t = token_dist(rng);

  ExpertStore& store = model.experts();
  ForwardProfile& profile = model.graph().profile;
  profile.enabled = true;
  json runs = json::array();
  std::vector<std::pair<PhaseResult, PhaseResult>> results;
  for (int r = 0; r < a.n_runs; ++r) {
    session.reset();
    PhaseResult prefill, decode;
    store.reset_stats();
    profile.reset();
    Timer timer;
    Status s = session.eval_prompt(prompt);
    if (!s.is_ok()) return report_error("bench", s.with_context("prefill"));
    prefill.seconds = timer.seconds();
    prefill.n_tokens = a.n_prompt;
    prefill.experts = store.stats();
    prefill.profile = profile;

    store.reset_stats();
    profile.reset();
    timer.reset();
    for (int i = 0; i < a.n_gen; ++i) {
      s = session.eval_token(argmax(session.logits(), model.n_vocab()));
      if (!s.is_ok()) return report_error("bench", s.with_context(fmt::format("decode token {}", i)));
    }
    decode.seconds = timer.seconds();
    decode.n_tokens = a.n_gen;
    decode.experts = store.stats();
    decode.profile = profile;

    json dj = phase_json(decode);
    const double tok_s = dj["tok_per_s"].get<double>();
    dj["bound_bytes_per_token"] = bound_bytes;
    dj["effective_gb_per_s"] = double(bound_bytes) * tok_s / 1e9;
    runs.push_back({{"run", r + 1}, {"prefill", phase_json(prefill)}, {"decode", dj}});
    results.emplace_back(prefill, decode);
  }

  const ModelOptions& o = *options;
  if (a.json_output) {
    json out = {{"pack", o.pack_dir},
                {"model_type", model.model_type()},
                {"threads", o.n_threads},
                {"expert_cache_bytes", o.experts.cache_bytes},
                {"io", o.experts.io_mode == IoMode::direct ? "direct" : "page-cache"},
                {"io_threads", o.experts.n_readers},
                {"open_seconds", open_seconds},
                {"prompt_tokens", a.n_prompt},
                {"gen_tokens", a.n_gen},
                {"resident_bytes", resident_bytes},
                {"resident_read_bytes_per_token", resident_read},
                {"n_expert_used", n_expert_used},
                {"n_moe_layers", n_moe_layers},
                {"expert_bytes", m.expert_bytes},
                {"expert_stride", m.expert_stride},
                {"expert_bytes_per_token", expert_bytes_per_token},
                {"bound_bytes_per_token", bound_bytes},
                {"cache_bytes_per_token", cache_bytes_per_token},
                {"state_fixed_bytes", state_fixed_bytes},
                {"runs", runs}};
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }

  std::printf("pack %s (%s), opened in %.2f s; threads %d, expert cache %s, io %s × %d readers\n", o.pack_dir.c_str(),
              model.model_type().c_str(), open_seconds, o.n_threads, format_bytes(double(o.experts.cache_bytes)).c_str(),
              o.experts.io_mode == IoMode::direct ? "direct" : "page-cache", o.experts.n_readers);
  std::printf("bytes per decode token (bound): %s = resident %s (of %s; the embedding is a row lookup) + %lld × %s × %llu MoE layers\n",
              format_bytes(double(bound_bytes)).c_str(), format_bytes(double(resident_read)).c_str(),
              format_bytes(double(resident_bytes)).c_str(), (long long)n_expert_used, format_bytes(double(m.expert_bytes)).c_str(),
              (unsigned long long)n_moe_layers);
  std::printf("session cache: %s per token (fp32) + %s of recurrent state\n", format_bytes(double(cache_bytes_per_token)).c_str(),
              format_bytes(double(state_fixed_bytes)).c_str());
  for (size_t r = 0; r < results.size(); ++r) {
    const auto& [prefill, decode] = results[r];
    const double prefill_tok_s = double(prefill.n_tokens) / prefill.seconds;
    const double decode_tok_s = double(decode.n_tokens) / decode.seconds;
    std::printf("run %zu\n", r + 1);
    std::printf("  prefill  %d tokens in %.2f s: %.2f tok/s\n", a.n_prompt, prefill.seconds, prefill_tok_s);
    std::printf("    %s\n", expert_report(prefill.experts, prefill.seconds).c_str());
    std::printf("    time: %s\n", split_report(prefill).c_str());
    std::printf("  decode   %d tokens in %.2f s: %.2f tok/s, %.1f ms/token; effective %.2f GB/s of the bound's bytes\n", a.n_gen,
                decode.seconds, decode_tok_s, 1e3 / decode_tok_s, double(bound_bytes) * decode_tok_s / 1e9);
    std::printf("    %s\n", expert_report(decode.experts, decode.seconds).c_str());
    std::printf("    expert bytes read per token %s\n", format_bytes(double(decode.experts.bytes_read) / double(decode.n_tokens)).c_str());
    std::printf("    time: %s\n", split_report(decode).c_str());
  }
  return 0;
}

}  // namespace

void register_bench(CLI::App& app, Action& action) {
  auto args = std::make_shared<BenchArgs>();
  auto* sub = app.add_subcommand("bench", "measure prefill and decode speed, expert-store counters and bytes per token");
  args->model.add_to(sub);
  sub->add_option("--prompt", args->n_prompt, "prompt tokens (random ids)");
  sub->add_option("--gen", args->n_gen, "tokens decoded greedily after the prompt");
  sub->add_option("--runs", args->n_runs, "repetitions over one model and store (a later run sees a warm cache)");
  sub->add_option("--seed", args->seed, "seed of the random prompt");
  sub->add_flag("--json", args->json_output, "print one JSON object instead of text");
  sub->callback([args, &action] { action = [args] { return run_bench(*args); }; });
}

}  // namespace moeflux::cli
