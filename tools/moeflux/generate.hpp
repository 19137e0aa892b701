// Text generation for the CLI: the loop that samples, streams detokenized text, stops on end-of-
// sequence tokens, stop strings, a token limit or a cancel flag, and counts what it did.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "core/status.hpp"
#include "experts/expert_store.hpp"
#include "sampling/sampler.hpp"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

namespace moeflux {
class Session;
class Tokenizer;
}  // namespace moeflux

namespace moeflux::cli {

// Sampling flags shared by run and chat. Settings not given on the command line come from the pack's
// generation_config.json where it names them (do_sample, temperature, top_k, top_p, min_p,
// repetition_penalty: the model authors' recommendation, as transformers' generate() takes it), else
// from the CLI's defaults: temperature 0.7 and top-p 0.9 (the common chat setting) and top-k 50 (what
// generate() uses where the file does not name top_k, as DeepSeek-V3's does not; it also keeps sampled
// decoding on a GPU's candidate path, Session::top_candidates).
struct SamplingFlags {
  SamplerParams params{0.7f, 50, 0.9f, 0.0f, 1.0f, 0.0f, 0.0f, 64, 0};
  std::vector<std::string> stop;
  void add_to(CLI::App* app);
  // Fills the settings the command line left unset from tokenizer_dir/generation_config.json. Returns
  // warnings (a malformed file is not fatal: the CLI's defaults then apply); `from_config` lists the
  // settings taken from the file.
  std::vector<std::string> apply_generation_config(const std::string& tokenizer_dir);
  std::vector<std::string> from_config;
  // "temperature 0.6, top-k 20, top-p 0.95 (top-k, top-p from generation_config.json)", or "greedy …".
  std::string describe() const;

 private:
  CLI::Option *temperature_ = nullptr, *top_k_ = nullptr, *top_p_ = nullptr, *min_p_ = nullptr, *repetition_ = nullptr;
};

// Token ids that end a generation: the tokenizer's EOS plus generation_config.json's eos_token_id.
std::set<int32_t> end_of_sequence_ids(const Tokenizer& tokenizer, const std::string& tokenizer_dir);

struct GenerateOptions {
  int64_t max_tokens = 256;
  std::vector<std::string> stop_strings;
  std::set<int32_t> eos_ids;
  bool skip_special = true;                   // special tokens are not printed
  const std::atomic<bool>* cancel = nullptr;  // set (e.g. by Ctrl-C) to stop after the current token
};

struct GenerateStats {
  int64_t prompt_tokens = 0, generated_tokens = 0;
  double prefill_seconds = 0, decode_seconds = 0;
  ExpertStoreStats prefill_experts, decode_experts;
  std::string stop_reason;  // "eos", "stop string", "length", "cancelled", "context full"
  std::vector<int32_t> tokens;  // generated, including an ending EOS token
  size_t evaluated = 0;         // leading tokens of `tokens` that were evaluated into the session
};

// Evaluates prompt (may be empty when the session already holds logits), then generates, passing
// every piece of printable text to on_text as soon as it is complete.
Result<GenerateStats> generate(Session& session, Sampler& sampler, const Tokenizer& tokenizer,
                               const std::vector<int32_t>& prompt, const GenerateOptions& options,
                               const std::function<void(const std::string&)>& on_text);

// Renders a conversation ({"messages": [...], "tools": [...], "add_generation_prompt": bool, ...}) with
// the chat template of a tokenizer directory (chat_template.jinja or tokenizer_config.json's) and its
// bos/eos token strings. Key order matters to tojson, hence ordered_json.
Result<std::string> render_pack_chat(const std::string& tokenizer_dir, const nlohmann::ordered_json& conversation);

// "prefill 12 tokens 0.05 s (240.0 tok/s) · decode 64 tokens 1.20 s (53.3 tok/s) · experts: …"
std::string generation_report(const GenerateStats& stats);

}  // namespace moeflux::cli
