// `moeflux run`: generate text from a prompt, streamed as it is produced, then report speed and
// expert-cache behaviour.
#include <csignal>
#include <cstdio>

#include "commands.hpp"
#include "generate.hpp"
#include "model_flags.hpp"
#include "runtime/session.hpp"
#include "tokenizer/chat_template.hpp"
#include "tokenizer/tokenizer.hpp"

namespace moeflux::cli {
namespace {

struct RunArgs {
  ModelFlags model;
  SamplingFlags sampling;
  std::string prompt;
  int64_t n_tokens = 256;
  int64_t n_ctx = 4096;
  bool chat = false;
  bool show_special = false;
};

int run_run(RunArgs& a) {
  auto options = a.model.options();
  if (!options) return report_error("run", options.status());
  auto model = Model::open(*options);
  if (!model) return report_error("run", model.status());
  const std::string tokenizer_dir = a.model.pack_dir + "/tokenizer";
  auto tokenizer = Tokenizer::load(tokenizer_dir);
  if (!tokenizer) return report_error("run", tokenizer.status().with_context("the pack's tokenizer"));

  std::string text = a.prompt;
  if (a.chat) {
    auto rendered = render_pack_chat(tokenizer_dir, nlohmann::ordered_json{{"messages", {{{"role", "user"}, {"content", a.prompt}}}},
                                                                   {"add_generation_prompt", true}});
    if (!rendered) return report_error("run", rendered.status());
    text = *rendered;
  }
  auto prompt = (*tokenizer)->encode(text, /*add_special=*/!a.chat);
  if (!prompt) return report_error("run", prompt.status());
  if (prompt->empty()) return report_error("run", Status(ErrorCode::invalid_argument, "the prompt is empty"));
  auto session = Session::create(**model, SessionOptions{a.n_ctx, 512});
  if (!session) return report_error("run", session.status());
  for (const std::string& warning : a.sampling.apply_generation_config(tokenizer_dir)) std::fprintf(stderr, "warning: %s\n", warning.c_str());
  auto sampler = Sampler::create(a.sampling.params, (*model)->n_vocab());
  if (!sampler) return report_error("run", sampler.status().with_context("sampling " + a.sampling.describe()));

  GenerateOptions g;
  g.max_tokens = a.n_tokens;
  g.stop_strings = a.sampling.stop;
  g.eos_ids = end_of_sequence_ids(**tokenizer, tokenizer_dir);
  g.skip_special = !a.show_special;
  if (!a.chat) {
    std::fputs(a.prompt.c_str(), stdout);
    std::fflush(stdout);
  }
  auto stats = generate(**session, *sampler, **tokenizer, *prompt, g, [](const std::string& piece) {
    std::fputs(piece.c_str(), stdout);
    std::fflush(stdout);
  });
  std::fputs("\n", stdout);
  if (!stats) return report_error("run", stats.status());
  std::fprintf(stderr, "\n%s\nsampling: %s\nseed %llu\n", generation_report(*stats).c_str(), a.sampling.describe().c_str(),
               (unsigned long long)sampler->seed());
  return 0;
}

}  // namespace

void register_run(CLI::App& app, Action& action) {
  auto args = std::make_shared<RunArgs>();
  auto* sub = app.add_subcommand("run", "generate text from a prompt, streamed as it is produced");
  args->model.add_to(sub);
  sub->add_option("--prompt,-p", args->prompt, "the prompt text")->required();
  sub->add_option("-n,--n-predict", args->n_tokens, "most tokens to generate")->capture_default_str()->check(CLI::PositiveNumber);
  sub->add_option("--ctx", args->n_ctx, "context length (positions)")->capture_default_str()->check(CLI::PositiveNumber);
  sub->add_flag("--chat", args->chat, "wrap the prompt as one user turn with the model's chat template");
  sub->add_flag("--show-special", args->show_special, "print special tokens too");
  args->sampling.add_to(sub);
  sub->callback([args, &action] { action = [args] { return run_run(*args); }; });
}

}  // namespace moeflux::cli
