// `moeflux template`: renders a conversation file with a tokenizer's own chat template.
#include <cstdio>
#include <fstream>

#include "commands.hpp"
#include "generate.hpp"
#include "model_flags.hpp"

namespace moeflux::cli {
namespace {

struct TemplateArgs {
  std::string tokenizer, conversation;
};

int run_template(const TemplateArgs& a) {
  std::ifstream in(a.conversation);
  if (!in) return report_error("template", make_error(ErrorCode::io, "cannot open {}", a.conversation));
  const auto conversation = nlohmann::ordered_json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (conversation.is_discarded() || !conversation.is_object() || !conversation.contains("messages") ||
      !conversation["messages"].is_array())
    return report_error("template", make_error(ErrorCode::format, "{}: expected a JSON object with a \"messages\" array", a.conversation));
  auto rendered = render_pack_chat(a.tokenizer, conversation);
  if (!rendered) return report_error("template", rendered.status());
  std::fwrite(rendered->data(), 1, rendered->size(), stdout);
  return 0;
}

}  // namespace

void register_template(CLI::App& app, Action& action) {
  auto args = std::make_shared<TemplateArgs>();
  auto* sub = app.add_subcommand("template", "render a conversation with a tokenizer's chat template");
  sub->add_option("--tokenizer", args->tokenizer, "tokenizer directory holding tokenizer_config.json (or a pack's tokenizer/)")->required();
  sub->add_option("--conversation", args->conversation,
                  "JSON file {\"messages\": [...], \"tools\": [...], \"add_generation_prompt\": true, ...}")->required();
  sub->callback([args, &action] { action = [args] { return run_template(*args); }; });
}

}  // namespace moeflux::cli
