#include "generate.hpp"

#include <fstream>

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "core/timer.hpp"
#include "core/units.hpp"
#include "runtime/model.hpp"
#include "runtime/session.hpp"
#include "runtime/token_picker.hpp"
#include "sampling/generation_config.hpp"
#include "tokenizer/chat_template.hpp"
#include "tokenizer/tokenizer.hpp"

namespace moeflux::cli {

void SamplingFlags::add_to(CLI::App* app) {
  const std::string pack = "; default: the pack's generation_config.json, else ";
  temperature_ = app->add_option("--temp,--temperature", params.temperature, "sampling temperature (0 = greedy" + pack + "0.7)");
  top_k_ = app->add_option("--top-k", params.top_k, "keep the k most likely tokens (0 = off" + pack + "50)");
  top_p_ = app->add_option("--top-p", params.top_p, "nucleus: keep the smallest set with this much probability (1 = off" + pack + "0.9)");
  min_p_ = app->add_option("--min-p", params.min_p, "drop tokens below this fraction of the top probability (0 = off" + pack + "off)");
  repetition_ = app->add_option("--repeat-penalty", params.repetition_penalty, "repetition penalty (1 = off" + pack + "off)");
  app->add_option("--presence-penalty", params.presence_penalty, "presence penalty (0 = off)")->capture_default_str();
  app->add_option("--frequency-penalty", params.frequency_penalty, "frequency penalty (0 = off)")->capture_default_str();
  app->add_option("--repeat-last-n", params.penalty_last_n, "tokens of history the penalties see (-1 = all)")->capture_default_str();
  app->add_option("--seed", params.seed, "random seed (0 = random, printed at the end)");
  app->add_option("--stop", stop, "stop when this text appears (repeatable)");
}

std::vector<std::string> SamplingFlags::apply_generation_config(const std::string& tokenizer_dir) {
  from_config.clear();
  auto config = load_generation_config(tokenizer_dir);
  if (!config) return {config.status().message() + "; sampling uses the CLI's defaults"};
  const auto given = [](const CLI::Option* o) { return o != nullptr && o->count() > 0; };
  const KeepSettings keep{given(temperature_), given(top_k_), given(top_p_), given(min_p_), given(repetition_)};
  from_config = moeflux::apply_generation_config(*config, params, keep);
  return {};
}

std::string SamplingFlags::describe() const {
  std::string s = params.temperature == 0.0f ? std::string("greedy") : fmt::format("temperature {}", params.temperature);
  if (params.temperature != 0.0f) {
    if (params.top_k > 0) s += fmt::format(", top-k {}", params.top_k);
    if (params.top_p < 1.0f) s += fmt::format(", top-p {}", params.top_p);
    if (params.min_p > 0.0f) s += fmt::format(", min-p {}", params.min_p);
  }
  if (params.repetition_penalty != 1.0f) s += fmt::format(", repetition penalty {}", params.repetition_penalty);
  if (!from_config.empty()) s += fmt::format(" ({} from generation_config.json)", fmt::join(from_config, ", "));
  return s;
}

std::set<int32_t> end_of_sequence_ids(const Tokenizer& tokenizer, const std::string& tokenizer_dir) {
  std::set<int32_t> ids;
  if (auto eos = tokenizer.eos_id()) ids.insert(*eos);
  std::ifstream in(tokenizer_dir + "/generation_config.json");
  if (in) {
    const auto j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (j.is_object() && j.contains("eos_token_id")) {
      const auto& e = j["eos_token_id"];
      if (e.is_number_integer()) ids.insert(e.get<int32_t>());
      if (e.is_array())
        for (const auto& v : e)
          if (v.is_number_integer()) ids.insert(v.get<int32_t>());
    }
  }
  return ids;
}

Result<std::string> render_pack_chat(const std::string& tokenizer_dir, const nlohmann::ordered_json& conversation) {
  MF_ASSIGN_OR_RETURN(ChatTemplateConfig config, load_chat_template_config(tokenizer_dir));
  return render_chat(config.source, conversation, config.bos_token, config.eos_token);
}

namespace {

ExpertStoreStats difference(const ExpertStoreStats& a, const ExpertStoreStats& b) {
  ExpertStoreStats d = a;
  d.hits -= b.hits;
  d.misses -= b.misses;
  d.bytes_read -= b.bytes_read;
  d.reads -= b.reads;
  d.wait_seconds -= b.wait_seconds;
  d.prefetches -= b.prefetches;
  d.evictions -= b.evictions;
  return d;
}

}  // namespace

Result<GenerateStats> generate(Session& session, Sampler& sampler, const Tokenizer& tokenizer,
                               const std::vector<int32_t>& prompt, const GenerateOptions& options,
                               const std::function<void(const std::string&)>& on_text) {
  GenerateStats stats;
  ExpertStore& store = session.model().experts();
  const ExpertStoreStats start = store.stats();
  Timer timer;
  if (!prompt.empty()) {
    MF_TRY(session.eval_prompt(prompt));
    for (int32_t t : prompt) sampler.accept(t);
  }
  if (!session.has_logits()) return make_error(ErrorCode::invalid_argument, "generate: no prompt and no logits to continue from");
  stats.prompt_tokens = int64_t(prompt.size());
  stats.prefill_seconds = timer.seconds();
  const ExpertStoreStats after_prefill = store.stats();
  stats.prefill_experts = difference(after_prefill, start);

  MF_ASSIGN_OR_RETURN(StopStrings stops, StopStrings::create(options.stop_strings));
  StreamingDecoder decoder(tokenizer, options.skip_special);
  TokenPicker picker;
  timer.reset();
  stats.stop_reason = "length";
  while (stats.generated_tokens < options.max_tokens) {
    if (options.cancel && options.cancel->load()) {
      stats.stop_reason = "cancelled";
      break;
    }
    const int32_t token = picker.next(session, sampler);
    sampler.accept(token);
    stats.tokens.push_back(token);
    ++stats.generated_tokens;
    if (options.eos_ids.count(token)) {
      stats.stop_reason = "eos";
      break;
    }
    const StopStrings::Emit emit = stops.feed(decoder.next(token));
    if (!emit.text.empty()) on_text(emit.text);
    if (emit.stopped) {
      stats.stop_reason = "stop string";
      break;
    }
    if (session.n_past() >= session.n_ctx()) {
      stats.stop_reason = "context full";
      break;
    }
    // The last token is evaluated too, so a session continues from a complete state.
    MF_TRY(session.eval_token(token));
    ++stats.evaluated;
  }
  if (stats.stop_reason != "stop string") {
    const std::string rest = stops.feed(decoder.flush()).text + stops.flush();
    if (!rest.empty()) on_text(rest);
  }
  stats.decode_seconds = timer.seconds();
  stats.decode_experts = difference(store.stats(), after_prefill);
  return stats;
}

std::string generation_report(const GenerateStats& s) {
  auto rate = [](int64_t n, double seconds) { return seconds > 0 ? double(n) / seconds : 0.0; };
  const auto& d = s.decode_experts;
  const uint64_t uses = d.hits + d.misses;
  return fmt::format(
      "prefill {} tokens in {:.2f} s ({:.1f} tok/s) · decode {} tokens in {:.2f} s ({:.2f} tok/s) · stop: {}\n"
      "experts while decoding: hit rate {:.1f}% ({} of {}), read {} per token, waited {:.2f} s",
      s.prompt_tokens, s.prefill_seconds, rate(s.prompt_tokens, s.prefill_seconds), s.generated_tokens, s.decode_seconds,
      rate(s.generated_tokens, s.decode_seconds), s.stop_reason, uses ? 100.0 * double(d.hits) / double(uses) : 0.0, d.hits, uses,
      format_bytes(s.generated_tokens ? double(d.bytes_read) / double(s.generated_tokens) : 0.0), d.wait_seconds);
}

}  // namespace moeflux::cli
