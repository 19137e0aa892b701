// `moeflux logits`: float32 logits for every position of a token list, as a NumPy .npy [T, vocab].
#include <cstdio>
#include <fstream>

#include "commands.hpp"
#include "core/timer.hpp"
#include "model_flags.hpp"
#include "runtime/session.hpp"

namespace moeflux::cli {
namespace {

struct LogitsArgs {
  ModelFlags model;
  std::string tokens;
  std::string out;
  bool one_by_one = false;
};

Status write_npy(const std::string& path, const std::vector<float>& data, int64_t rows, int64_t cols) {
  std::string header = fmt::format("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}", rows, cols);
  // NumPy format 1.0: magic, version, u16 header length; header padded with spaces to a multiple of 64, ending in \n.
  const size_t preamble = 10;
  header.append(63 - (preamble + header.size()) % 64, ' ');
  header.push_back('\n');
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return make_error(ErrorCode::io, "cannot create {}", path);
  const uint16_t len = uint16_t(header.size());
  out.write("\x93NUMPY\x01\x00", 8);
  out.write(reinterpret_cast<const char*>(&len), 2);
  out.write(header.data(), std::streamsize(header.size()));
  out.write(reinterpret_cast<const char*>(data.data()), std::streamsize(data.size() * sizeof(float)));
  out.close();
  if (!out) return make_error(ErrorCode::io, "cannot write {}", path);
  return Status::ok();
}

int run_logits(const LogitsArgs& a) {
  auto tokens = parse_token_list(a.tokens);
  if (!tokens) return report_error("logits", tokens.status());
  auto options = a.model.options();
  if (!options) return report_error("logits", options.status());
  auto model = Model::open(*options);
  if (!model) return report_error("logits", model.status());
  SessionOptions so;
  so.n_ctx = int64_t(tokens->size());
  auto session = Session::create(**model, so);
  if (!session) return report_error("logits", session.status());
  const int64_t T = int64_t(tokens->size()), V = (*model)->n_vocab();
  std::vector<float> logits(size_t(T * V));
  Timer timer;
  if (a.one_by_one) {
    for (int64_t t = 0; t < T; ++t) {
      const Status s = (*session)->eval_token((*tokens)[size_t(t)]);
      if (!s.is_ok()) return report_error("logits", s);
      std::copy((*session)->logits(), (*session)->logits() + V, logits.begin() + t * V);
    }
  } else {
    const Status s = (*session)->eval_prompt(*tokens, logits.data());
    if (!s.is_ok()) return report_error("logits", s);
  }
  const double seconds = timer.seconds();
  const Status s = write_npy(a.out, logits, T, V);
  if (!s.is_ok()) return report_error("logits", s);
  std::fprintf(stderr, "%lld tokens in %.3f s (%.1f tok/s), logits [%lld, %lld] → %s\n%s\n", (long long)T, seconds,
               double(T) / seconds, (long long)T, (long long)V, a.out.c_str(),
               expert_tiers_report((*model)->experts(), seconds).c_str());
  return 0;
}

}  // namespace

void register_logits(CLI::App& app, Action& action) {
  auto args = std::make_shared<LogitsArgs>();
  auto* sub = app.add_subcommand("logits", "write float32 logits for every position of a token list to a .npy file [T, vocab]");
  args->model.add_to(sub);
  sub->add_option("--tokens", args->tokens, "comma-separated token ids, e.g. 1,2,3")->required();
  sub->add_option("--out,-o", args->out, "output .npy file")->required();
  sub->add_flag("--one-by-one", args->one_by_one, "evaluate token by token (eval_token) instead of one batched prompt");
  sub->callback([args, &action] { action = [args] { return run_logits(*args); }; });
}

}  // namespace moeflux::cli
