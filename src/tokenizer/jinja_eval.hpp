// Evaluation of a parsed Jinja template: scopes, control flow, operators, and the builtin filters,
// tests, methods (str/dict) and globals (namespace, range, dict) that chat templates use.
// Does not own parsing (jinja_parser.hpp) nor the chat-specific globals (chat_template.cpp).
#pragma once

#include <string>

#include "core/status.hpp"
#include "tokenizer/jinja_parser.hpp"
#include "tokenizer/jinja_value.hpp"

namespace moeflux::jinja {

// Renders body with globals (a dict Value: variables and functions). Errors name "line L, column C".
Result<std::string> render_template(const Body& body, const Value& globals);

}  // namespace moeflux::jinja
