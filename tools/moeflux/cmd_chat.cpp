// `moeflux chat`: interactive multi-turn chat with the model's own template. The conversation's
// tokens stay in the session: each turn evaluates only what the template adds (the longest common
// token prefix is kept, the rest rewound exactly). Ctrl-C stops a reply; at the prompt it quits.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <iostream>

#include "commands.hpp"
#include "generate.hpp"
#include "model_flags.hpp"
#include "runtime/session.hpp"
#include "tokenizer/tokenizer.hpp"

namespace moeflux::cli {
namespace {

// Signal handlers can only reach process-wide state; this flag is the CLI's, never the library's.
std::atomic<bool> interrupted{false};
void on_interrupt(int) { interrupted.store(true); }

struct ChatArgs {
  ModelFlags model;
  SamplingFlags sampling;
  std::string system;
  int64_t n_tokens = 1024;
  int64_t n_ctx = 8192;
};

int run_chat(ChatArgs& a) {
  auto options = a.model.options();
  if (!options) return report_error("chat", options.status());
  auto model = Model::open(*options);
  if (!model) return report_error("chat", model.status());
  const std::string tokenizer_dir = a.model.pack_dir + "/tokenizer";
  auto tokenizer = Tokenizer::load(tokenizer_dir);
  if (!tokenizer) return report_error("chat", tokenizer.status().with_context("the pack's tokenizer"));
  auto session = Session::create(**model, SessionOptions{a.n_ctx, 512});
  if (!session) return report_error("chat", session.status());
  for (const std::string& warning : a.sampling.apply_generation_config(tokenizer_dir)) std::fprintf(stderr, "warning: %s\n", warning.c_str());
  auto sampler = Sampler::create(a.sampling.params, (*model)->n_vocab());
  if (!sampler) return report_error("chat", sampler.status().with_context("sampling " + a.sampling.describe()));

  struct sigaction sa {};
  sa.sa_handler = on_interrupt;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: Ctrl-C at the prompt interrupts the read
  sigaction(SIGINT, &sa, nullptr);

  GenerateOptions g;
  g.max_tokens = a.n_tokens;
  g.stop_strings = a.sampling.stop;
  g.eos_ids = end_of_sequence_ids(**tokenizer, tokenizer_dir);
  g.cancel = &interrupted;

  nlohmann::ordered_json messages = nlohmann::ordered_json::array();
  if (!a.system.empty()) messages.push_back({{"role", "system"}, {"content", a.system}});
  std::vector<int32_t> in_session;  // the tokens the session holds, in order
  const bool tty = isatty(fileno(stdin));
  std::fprintf(stderr, "moeflux chat: %s · sampling %s · /reset clears the conversation, /exit or Ctrl-D quits, Ctrl-C stops a reply\n",
               a.model.pack_dir.c_str(), a.sampling.describe().c_str());
  for (;;) {
    if (tty) std::fputs("\n> ", stdout);
    std::fflush(stdout);
    std::string line;
    interrupted.store(false);
    if (!std::getline(std::cin, line)) break;  // EOF, or Ctrl-C at the prompt
    if (line.empty()) continue;
    if (line == "/exit" || line == "/quit") break;
    if (line == "/reset") {
      messages = nlohmann::ordered_json::array();
      if (!a.system.empty()) messages.push_back({{"role", "system"}, {"content", a.system}});
      (*session)->reset();
      in_session.clear();
      std::fputs("(conversation cleared)\n", stdout);
      continue;
    }
    messages.push_back({{"role", "user"}, {"content", line}});
    auto rendered = render_pack_chat(tokenizer_dir, nlohmann::ordered_json{{"messages", messages}, {"add_generation_prompt", true}});
    if (!rendered) return report_error("chat", rendered.status());
    auto tokens = (*tokenizer)->encode(*rendered, /*add_special=*/false);
    if (!tokens) return report_error("chat", tokens.status());
    // Keep what the session already holds of this rendering; evaluate only the rest.
    size_t common = 0;
    while (common < in_session.size() && common < tokens->size() && in_session[common] == (*tokens)[common]) ++common;
    if (common == tokens->size() && common > 0) --common;  // something must be evaluated to get logits
    // A recurrent state goes back only to a snapshot (the end of an earlier prompt): from there on the
    // tokens are evaluated again.
    auto rewound = (*session)->rewind(int64_t(common));
    if (!rewound) return report_error("chat", rewound.status());
    common = size_t(*rewound);
    in_session.resize(common);
    const std::vector<int32_t> fresh(tokens->begin() + int64_t(common), tokens->end());
    std::string reply;
    auto stats = generate(**session, *sampler, **tokenizer, fresh, g, [&reply](const std::string& piece) {
      reply += piece;
      std::fputs(piece.c_str(), stdout);
      std::fflush(stdout);
    });
    if (!stats) return report_error("chat", stats.status());
    in_session.insert(in_session.end(), fresh.begin(), fresh.end());
    in_session.insert(in_session.end(), stats->tokens.begin(), stats->tokens.begin() + int64_t(stats->evaluated));
    if (stats->stop_reason == "cancelled") std::fputs(" [stopped]", stdout);
    std::fputs("\n", stdout);
    messages.push_back({{"role", "assistant"}, {"content", reply}});
    std::fprintf(stderr, "(prefill %lld new of %zu conversation tokens · %lld tokens at %.2f tok/s)\n", (long long)stats->prompt_tokens,
                 tokens->size(), (long long)stats->generated_tokens,
                 stats->decode_seconds > 0 ? double(stats->generated_tokens) / stats->decode_seconds : 0.0);
  }
  return 0;
}

}  // namespace

void register_chat(CLI::App& app, Action& action) {
  auto args = std::make_shared<ChatArgs>();
  auto* sub = app.add_subcommand("chat", "interactive multi-turn chat with the model's chat template");
  args->model.add_to(sub);
  sub->add_option("--system", args->system, "system message");
  sub->add_option("-n,--n-predict", args->n_tokens, "most tokens per reply")->capture_default_str()->check(CLI::PositiveNumber);
  sub->add_option("--ctx", args->n_ctx, "context length (positions)")->capture_default_str()->check(CLI::PositiveNumber);
  args->sampling.add_to(sub);
  sub->callback([args, &action] { action = [args] { return run_chat(*args); }; });
}

}  // namespace moeflux::cli
