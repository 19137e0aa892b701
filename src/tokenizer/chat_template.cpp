// ChatTemplate: the Jinja subset plus the globals transformers adds for chat templates.
#include "tokenizer/chat_template.hpp"

#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "tokenizer/jinja_eval.hpp"
#include "tokenizer/jinja_parser.hpp"

namespace moeflux {

Result<ChatTemplate> ChatTemplate::parse(std::string_view source) {
  MF_ASSIGN_OR_RETURN(jinja::Body body, jinja::parse_template(source));
  ChatTemplate t;
  t.body_ = std::make_shared<const jinja::Body>(std::move(body));
  return t;
}

Result<std::string> ChatTemplate::render(const nlohmann::ordered_json& context) const {
  if (!context.is_object())
    return make_error(ErrorCode::invalid_argument, "chat template context must be a JSON object, got {}",
                      context.type_name());
  jinja::Value globals = jinja::from_json(context);
  globals.dict->set("raise_exception", jinja::Value::from_function([](jinja::CallArgs& args) -> Result<jinja::Value> {
    return make_error(ErrorCode::invalid_argument, "the chat template raised an exception: {}",
                      jinja::to_str(args.get(0, "message")));
  }));
  // transformers: datetime.now().strftime(format), local time.
  globals.dict->set("strftime_now", jinja::Value::from_function([](jinja::CallArgs& args) -> Result<jinja::Value> {
    const jinja::Value format = args.get(0, "format");
    if (!format.is_string()) return make_error(ErrorCode::invalid_argument, "strftime_now() needs a format string");
    const std::time_t now = std::time(nullptr);
    std::tm local{};
    localtime_r(&now, &local);
    char buf[512];
    const size_t n = std::strftime(buf, sizeof(buf), format.string.c_str(), &local);
    return jinja::Value::from_string(std::string(buf, n));
  }));
  return jinja::render_template(*body_, globals);
}

Result<std::string> render_chat(const std::string& tmpl, const nlohmann::ordered_json& conversation,
                                const std::string& bos, const std::string& eos) {
  if (!conversation.is_object() || !conversation.contains("messages"))
    return make_error(ErrorCode::invalid_argument, "conversation must be a JSON object with \"messages\"");
  MF_ASSIGN_OR_RETURN(ChatTemplate parsed, ChatTemplate::parse(tmpl));
  nlohmann::ordered_json context = conversation;
  if (!context.contains("tools")) context["tools"] = nullptr;
  if (!context.contains("documents")) context["documents"] = nullptr;
  if (!context.contains("add_generation_prompt")) context["add_generation_prompt"] = false;
  if (!bos.empty()) context["bos_token"] = bos;
  if (!eos.empty()) context["eos_token"] = eos;
  return parsed.render(context);
}

namespace {

Result<std::string> read_text(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return make_error(ErrorCode::io, "cannot open {}", path.string());
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

std::string token_string(const nlohmann::ordered_json& config, const char* key) {
  if (!config.contains(key)) return "";
  const auto& t = config[key];
  if (t.is_string()) return t.get<std::string>();
  if (t.is_object() && t.contains("content") && t["content"].is_string()) return t["content"].get<std::string>();
  return "";
}

}  // namespace

Result<ChatTemplateConfig> load_chat_template_config(const std::string& tokenizer_dir) {
  const std::filesystem::path dir(tokenizer_dir);
  ChatTemplateConfig out;
  nlohmann::ordered_json config = nlohmann::ordered_json::object();
  if (std::filesystem::exists(dir / "tokenizer_config.json")) {
    MF_ASSIGN_OR_RETURN(std::string text, read_text(dir / "tokenizer_config.json"));
    config = nlohmann::ordered_json::parse(text, nullptr, false);
    if (config.is_discarded() || !config.is_object())
      return make_error(ErrorCode::format, "{}: not a JSON object", (dir / "tokenizer_config.json").string());
    out.bos_token = token_string(config, "bos_token");
    out.eos_token = token_string(config, "eos_token");
  }
  if (std::filesystem::exists(dir / "chat_template.jinja")) {
    MF_ASSIGN_OR_RETURN(out.source, read_text(dir / "chat_template.jinja"));
    return out;
  }
  if (!config.contains("chat_template"))
    return make_error(ErrorCode::format, "{}: no chat_template.jinja and no \"chat_template\" in tokenizer_config.json",
                      tokenizer_dir);
  const auto& t = config["chat_template"];
  if (t.is_string()) {
    out.source = t.get<std::string>();
    return out;
  }
  if (t.is_array())
    for (const auto& named : t)
      if (named.is_object() && named.value("name", "") == "default" && named.contains("template") &&
          named["template"].is_string()) {
        out.source = named["template"].get<std::string>();
        return out;
      }
  return make_error(ErrorCode::format, "{}: \"chat_template\" is neither a string nor a list with a \"default\" entry",
                    tokenizer_dir);
}

}  // namespace moeflux
