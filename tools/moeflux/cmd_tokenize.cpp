// `moeflux tokenize`: text → token ids (a JSON array) or, with --decode, ids → text, with a model's own
// tokenizer files. By default no BOS/EOS is added but special tokens written in the text are
// recognized, as Hugging Face's encode(text, add_special_tokens=False) does.
#include <cstdio>
#include <fstream>

#include "commands.hpp"
#include "model_flags.hpp"
#include "tokenizer/tokenizer.hpp"

namespace moeflux::cli {
namespace {

struct TokenizeArgs {
  std::string tokenizer, text, file, decode;
  bool add_special = false;
  bool skip_special = false;
};

int run_tokenize(const TokenizeArgs& a) {
  auto tokenizer = Tokenizer::load(a.tokenizer);
  if (!tokenizer) return report_error("tokenize", tokenizer.status());
  if (!a.decode.empty()) {
    auto ids = parse_token_list(a.decode);
    if (!ids) return report_error("tokenize", ids.status());
    for (int32_t id : *ids)
      if (id < 0 || id >= (*tokenizer)->vocab_size())
        return report_error("tokenize", make_error(ErrorCode::invalid_argument, "token id {} is outside the vocabulary [0, {})", id,
                                                   (*tokenizer)->vocab_size()));
    const std::string text = (*tokenizer)->decode(*ids, a.skip_special);
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fputs("\n", stdout);
    return 0;
  }
  std::string text = a.text;
  if (!a.file.empty()) {
    std::ifstream in(a.file, std::ios::binary);
    if (!in) return report_error("tokenize", make_error(ErrorCode::io, "cannot open {}", a.file));
    text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  auto ids = (*tokenizer)->encode(text, a.add_special);
  if (!ids) return report_error("tokenize", ids.status());
  std::string out = "[";
  for (size_t i = 0; i < ids->size(); ++i) out += (i ? ", " : "") + std::to_string((*ids)[i]);
  out += "]\n";
  std::fputs(out.c_str(), stdout);
  return 0;
}

}  // namespace

void register_tokenize(CLI::App& app, Action& action) {
  auto args = std::make_shared<TokenizeArgs>();
  auto* sub = app.add_subcommand("tokenize", "text to token ids (JSON array), or ids to text with --decode");
  sub->add_option("--tokenizer", args->tokenizer, "tokenizer directory (tokenizer.json + tokenizer_config.json), a tokenizer.json, or a pack's tokenizer/ folder")->required();
  auto* text = sub->add_option("--text", args->text, "text to encode");
  auto* file = sub->add_option("--file", args->file, "file whose contents to encode");
  auto* decode = sub->add_option("--decode", args->decode, "comma-separated ids to decode");
  text->excludes(file)->excludes(decode);
  file->excludes(decode);
  sub->add_flag("--add-special", args->add_special, "apply the tokenizer's post-processor (BOS/EOS as it defines)");
  sub->add_flag("--skip-special", args->skip_special, "with --decode: leave out special tokens");
  sub->callback([args, sub, &action] {
    if (args->text.empty() && args->file.empty() && args->decode.empty() && sub->count("--text") == 0)
      throw CLI::ValidationError("tokenize", "one of --text, --file or --decode is required");
    action = [args] { return run_tokenize(*args); };
  });
}

}  // namespace moeflux::cli
