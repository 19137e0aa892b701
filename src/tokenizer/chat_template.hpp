// A model's own chat template (tokenizer_config.json "chat_template" or chat_template.jinja), parsed
// once and rendered as transformers' apply_chat_template(..., tokenize=False) renders it. Owns the
// chat-specific globals (raise_exception, strftime_now, bos/eos tokens). Does not own tokenization.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "core/status.hpp"

namespace moeflux {

namespace jinja {
struct Stmt;
}

class ChatTemplate {
 public:
  // Parses with trim_blocks and lstrip_blocks on, as transformers does. Errors: ErrorCode::format
  // (syntax) or ErrorCode::unsupported (Jinja outside the subset), naming "line L, column C".
  static Result<ChatTemplate> parse(std::string_view source);

  // context: the template's variables. Key order matters for tojson, so this takes ordered_json
  // (an nlohmann::json converts implicitly, with its keys sorted). A template's raise_exception(msg)
  // comes back as ErrorCode::invalid_argument whose message contains msg.
  Result<std::string> render(const nlohmann::ordered_json& context) const;

 private:
  std::shared_ptr<const std::vector<std::unique_ptr<jinja::Stmt>>> body_;
};

// Renders tmpl for conversation {"messages": [...], "tools": [...], "add_generation_prompt": true,
// ...extra kwargs such as "enable_thinking"} with the variables transformers passes: tools and
// documents default to none, add_generation_prompt to false; bos_token/eos_token are left undefined
// when empty (transformers omits unset special tokens).
Result<std::string> render_chat(const std::string& tmpl, const nlohmann::ordered_json& conversation,
                                const std::string& bos, const std::string& eos);

// What a tokenizer directory says about chat: the template (chat_template.jinja, else
// tokenizer_config.json "chat_template", a string or the "default" of a list of {name, template}) and
// the bos/eos token strings (plain strings or AddedToken objects; empty when null or absent).
struct ChatTemplateConfig {
  std::string source;
  std::string bos_token;
  std::string eos_token;
};
Result<ChatTemplateConfig> load_chat_template_config(const std::string& tokenizer_dir);

}  // namespace moeflux
