// `moeflux perplexity`: sliding-window perplexity of a text file under a pack's model.
#include <cstdio>
#include <fstream>

#include "commands.hpp"
#include "model_flags.hpp"
#include "runtime/perplexity.hpp"
#include "tokenizer/tokenizer.hpp"

namespace moeflux::cli {
namespace {

struct PerplexityArgs {
  ModelFlags model;
  std::string file;
  int64_t window = 512;
  int64_t stride = 256;
};

int run_perplexity(const PerplexityArgs& a) {
  std::ifstream in(a.file, std::ios::binary);
  if (!in) return report_error("perplexity", make_error(ErrorCode::io, "cannot open {}", a.file));
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto options = a.model.options();
  if (!options) return report_error("perplexity", options.status());
  auto model = Model::open(*options);
  if (!model) return report_error("perplexity", model.status());
  auto tokenizer = Tokenizer::load(a.model.pack_dir + "/tokenizer");
  if (!tokenizer) return report_error("perplexity", tokenizer.status().with_context("the pack's tokenizer"));
  auto tokens = (*tokenizer)->encode(text, /*add_special=*/true);
  if (!tokens) return report_error("perplexity", tokens.status());
  const bool tty = isatty(fileno(stderr));
  auto r = compute_perplexity(**model, *tokens, a.window, a.stride, [tty](int64_t done, int64_t total) {
    if (tty) std::fprintf(stderr, "\r%lld / %lld tokens scored", (long long)done, (long long)total);
  });
  if (tty) std::fputs("\n", stderr);
  if (!r) return report_error("perplexity", r.status());
  std::printf("perplexity %.4f (mean NLL %.5f nats) over %lld tokens of %s in %lld windows of %lld, stride %lld; %.1f s (%.1f tok/s)\n",
              r->perplexity, r->mean_nll, (long long)r->scored_tokens, a.file.c_str(), (long long)r->windows, (long long)a.window,
              (long long)a.stride, r->seconds, double(r->windows) * double(a.window) / r->seconds);
  return 0;
}

}  // namespace

void register_perplexity(CLI::App& app, Action& action) {
  auto args = std::make_shared<PerplexityArgs>();
  auto* sub = app.add_subcommand("perplexity", "sliding-window perplexity of a text file");
  args->model.add_to(sub);
  sub->add_option("--file,-f", args->file, "text file")->required();
  sub->add_option("--window", args->window, "tokens per window (the context each prediction sees at most)")->capture_default_str();
  sub->add_option("--stride", args->stride, "tokens between window starts; each window scores only new targets")->capture_default_str();
  sub->callback([args, &action] { action = [args] { return run_perplexity(*args); }; });
}

}  // namespace moeflux::cli
