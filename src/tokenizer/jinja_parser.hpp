// The Jinja subset's syntax: lexing a template (with trim_blocks/lstrip_blocks and "-" whitespace
// control applied at lex time, as Jinja does) and parsing it into an AST of statements and expressions.
// Does not own evaluation (jinja_eval.hpp).
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/status.hpp"
#include "tokenizer/jinja_value.hpp"

namespace moeflux::jinja {

struct Expr;
struct Stmt;
using ExprPtr = std::unique_ptr<Expr>;
using StmtPtr = std::unique_ptr<Stmt>;
using Body = std::vector<StmtPtr>;

struct Location {
  int line = 1;    // 1-based
  int column = 1;  // 1-based, in bytes
};

struct Expr {
  enum class Kind {
    literal,     // value
    name,        // name
    list,        // children: items
    dict,        // children: key0, value0, key1, value1, ...
    getattr,     // children[0].name
    getitem,     // children[0][children[1]]
    slice,       // children[0][children[1]:children[2]:children[3]] (null = omitted)
    call,        // children[0](children[1..], kwargs)
    filter,      // children[0] | name(children[1..], kwargs)
    test,        // children[0] is [not] name(children[1..])
    not_,        // not children[0]
    negate,      // -children[0]
    plus,        // +children[0]
    binary,      // children[0] op children[1]; op in + - * / // % ** ~
    compare,     // children[0] ops[0] children[1] ops[1] ...; ops in == != < <= > >= in notin
    and_,        // children[0] and children[1]
    or_,         // children[0] or children[1]
    conditional  // children[0] if children[1] else children[2] (null: undefined)
  };
  Kind kind = Kind::literal;
  Location where;
  Value value;
  std::string name;  // name, attribute, filter/test name, binary operator
  std::vector<std::string> ops;
  std::vector<ExprPtr> children;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  bool negated = false;  // "is not"
};

struct Stmt {
  enum class Kind {
    text,       // text
    output,     // {{ expr }}
    if_,        // branches; else_body
    for_,       // for targets in expr [if filter]: body; else_body
    set,        // set targets[0] (or name.attr when attr is set) = expr
    set_block,  // set targets[0]: body rendered to a string
    macro,      // macro name(params): body
    break_,
    continue_,
    scope       // body rendered in place ({% generation %})
  };
  Kind kind = Kind::text;
  Location where;
  std::string text;
  ExprPtr expr;
  ExprPtr filter;
  std::vector<std::pair<ExprPtr, Body>> branches;
  Body body;
  Body else_body;
  std::vector<std::string> targets;
  std::string name;
  std::string attr;
  std::vector<std::pair<std::string, ExprPtr>> params;  // macro parameters, default may be null
};

struct LexOptions {
  bool trim_blocks = true;    // transformers' apply_chat_template sets both
  bool lstrip_blocks = true;
  bool keep_trailing_newline = false;  // Jinja's default
};

// Parses a template. Errors: ErrorCode::format for syntax errors, ErrorCode::unsupported for valid
// Jinja outside the subset; both name the construct and "line L, column C".
Result<Body> parse_template(std::string_view source, const LexOptions& options = {});

}  // namespace moeflux::jinja
