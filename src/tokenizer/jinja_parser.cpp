// Lexer and recursive-descent parser of the Jinja subset. Precedence follows Jinja's parser.py:
// conditional < or < and < not < comparisons < + - < ~ < * / // % < ** < unary; filters, tests,
// subscripts and calls bind to the primary.
#include "tokenizer/jinja_parser.hpp"

#include <algorithm>
#include <cstring>
#include <initializer_list>

namespace moeflux::jinja {
namespace {

struct Token {
  enum class Type { name, string, integer, floating, op, end };
  Type type = Type::end;
  std::string text;  // name, operator, or the unescaped string
  int64_t integer = 0;
  double floating = 0.0;
  Location where;
};

struct Piece {
  enum class Kind { text, variable, block };
  Kind kind = Kind::text;
  std::string text;
  std::vector<Token> tokens;  // ends with a Type::end token at the tag's close
  Location where;
};

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }
bool is_name_start(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
bool is_digit(char c) { return c >= '0' && c <= '9'; }

void append_utf8(uint32_t cp, std::string& out) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

class Lexer {
 public:
  Lexer(std::string_view source, const LexOptions& options) : src_(source), options_(options) {
    line_starts_.push_back(0);
    for (size_t i = 0; i < src_.size(); ++i)
      if (src_[i] == '\n') line_starts_.push_back(i + 1);
  }

  Location where(size_t offset) const {
    auto it = std::upper_bound(line_starts_.begin(), line_starts_.end(), offset);
    const size_t line = size_t(it - line_starts_.begin());
    return {int(line), int(offset - line_starts_[line - 1] + 1)};
  }

  Result<std::vector<Piece>> run() {
    std::vector<Piece> pieces;
    size_t pos = 0;
    const size_t n = src_.size();
    while (pos < n) {
      const size_t tag = next_tag(pos);
      const bool line_starting = pos == 0 || src_[pos - 1] == '\n';
      std::string text(src_.substr(pos, (tag == std::string_view::npos ? n : tag) - pos));
      char kind = 0;
      size_t inner = 0;
      if (tag != std::string_view::npos) {
        kind = src_[tag + 1];
        inner = tag + 2;
        const char modifier = inner < n ? src_[inner] : 0;
        if (modifier == '-') {
          while (!text.empty() && is_space(text.back())) text.pop_back();
        } else if (kind != '{' && options_.lstrip_blocks && modifier != '+') {
          // lstrip_blocks: spaces and tabs between a line start and a block or comment tag go.
          const size_t newline = text.rfind('\n');
          const size_t line_pos = newline == std::string::npos ? 0 : newline + 1;
          if ((line_pos > 0 || line_starting) &&
              text.find_first_not_of(" \t", line_pos) == std::string::npos)
            text.resize(line_pos);
        }
        if (modifier == '-' || modifier == '+') ++inner;
      }
      if (!text.empty()) {
        Piece p;
        p.kind = Piece::Kind::text;
        p.text = std::move(text);
        p.where = where(pos);
        pieces.push_back(std::move(p));
      }
      if (tag == std::string_view::npos) break;

      char close_modifier = 0;
      if (kind == '#') {
        const size_t close = src_.find("#}", inner);
        if (close == std::string_view::npos)
          return make_error(ErrorCode::format, "line {}, column {}: comment '{{#' is never closed", where(tag).line,
                            where(tag).column);
        if (close > inner && (src_[close - 1] == '-' || src_[close - 1] == '+')) close_modifier = src_[close - 1];
        pos = close + 2;
      } else {
        Piece p;
        p.kind = kind == '{' ? Piece::Kind::variable : Piece::Kind::block;
        p.where = where(tag);
        pos = inner;
        MF_TRY(tokenize(pos, kind == '{' ? "}}" : "%}", p.where, p.tokens, close_modifier));
        if (p.kind == Piece::Kind::block && p.tokens.size() == 2 && p.tokens[0].type == Token::Type::name &&
            p.tokens[0].text == "raw") {
          MF_TRY(after_close(pos, '%', close_modifier));
          MF_TRY(read_raw(pos, p.where, pieces, close_modifier));
        } else {
          pieces.push_back(std::move(p));
        }
      }
      MF_TRY(after_close(pos, kind, close_modifier));
    }
    return pieces;
  }

 private:
  size_t next_tag(size_t pos) const {
    for (size_t i = src_.find('{', pos); i != std::string_view::npos; i = src_.find('{', i + 1)) {
      if (i + 1 < src_.size() && (src_[i + 1] == '{' || src_[i + 1] == '%' || src_[i + 1] == '#')) return i;
    }
    return std::string_view::npos;
  }

  // After "-}}", "-%}" or "-#}" all whitespace goes; after "%}"/"#}" trim_blocks drops one newline.
  Status after_close(size_t& pos, char kind, char close_modifier) {
    if (close_modifier == '-') {
      while (pos < src_.size() && is_space(src_[pos])) ++pos;
    } else if (kind != '{' && options_.trim_blocks && close_modifier != '+') {
      if (pos < src_.size() && src_[pos] == '\n') ++pos;
      else if (pos + 1 < src_.size() && src_[pos] == '\r' && src_[pos + 1] == '\n') pos += 2;
    }
    return Status::ok();
  }

  // {% raw %}...{% endraw %}: the text in between is output verbatim.
  Status read_raw(size_t& pos, Location opened, std::vector<Piece>& pieces, char& close_modifier) {
    for (size_t at = src_.find("{%", pos); at != std::string_view::npos; at = src_.find("{%", at + 2)) {
      size_t i = at + 2;
      const bool strip_before = i < src_.size() && src_[i] == '-';
      if (i < src_.size() && (src_[i] == '-' || src_[i] == '+')) ++i;
      while (i < src_.size() && is_space(src_[i])) ++i;
      if (src_.substr(i, 6) != "endraw") continue;
      i += 6;
      while (i < src_.size() && is_space(src_[i])) ++i;
      close_modifier = 0;
      if (i < src_.size() && (src_[i] == '-' || src_[i] == '+')) close_modifier = src_[i++];
      if (src_.substr(i, 2) != "%}") continue;
      Piece p;
      p.kind = Piece::Kind::text;
      p.text = std::string(src_.substr(pos, at - pos));
      if (strip_before)
        while (!p.text.empty() && is_space(p.text.back())) p.text.pop_back();
      p.where = where(pos);
      if (!p.text.empty()) pieces.push_back(std::move(p));
      pos = i + 2;
      return Status::ok();
    }
    return make_error(ErrorCode::format, "line {}, column {}: {{% raw %}} is never closed by {{% endraw %}}",
                      opened.line, opened.column);
  }

  Status tokenize(size_t& pos, std::string_view close, Location opened, std::vector<Token>& out,
                  char& close_modifier) {
    const size_t n = src_.size();
    close_modifier = 0;
    while (true) {
      while (pos < n && is_space(src_[pos])) ++pos;
      if (pos >= n)
        return make_error(ErrorCode::format, "line {}, column {}: tag is never closed by '{}'", opened.line,
                          opened.column, close);
      Token t;
      t.where = where(pos);
      if (src_.substr(pos, close.size()) == close) {
        pos += close.size();
        out.push_back(t);
        return Status::ok();
      }
      const char c = src_[pos];
      if ((c == '-' || c == '+') && src_.substr(pos + 1, close.size()) == close) {
        close_modifier = c;
        pos += 1 + close.size();
        out.push_back(t);
        return Status::ok();
      }
      if (is_name_start(c)) {
        size_t e = pos;
        while (e < n && (is_name_start(src_[e]) || is_digit(src_[e]))) ++e;
        t.type = Token::Type::name;
        t.text = std::string(src_.substr(pos, e - pos));
        pos = e;
      } else if (is_digit(c)) {
        size_t e = pos;
        while (e < n && (is_digit(src_[e]) || src_[e] == '_')) ++e;
        bool is_float = false;
        if (e + 1 < n && src_[e] == '.' && is_digit(src_[e + 1])) {
          is_float = true;
          ++e;
          while (e < n && is_digit(src_[e])) ++e;
        }
        if (e < n && (src_[e] == 'e' || src_[e] == 'E')) {
          size_t x = e + 1;
          if (x < n && (src_[x] == '+' || src_[x] == '-')) ++x;
          if (x < n && is_digit(src_[x])) {
            is_float = true;
            e = x;
            while (e < n && is_digit(src_[e])) ++e;
          }
        }
        std::string digits;
        for (char d : src_.substr(pos, e - pos))
          if (d != '_') digits += d;
        if (is_float) {
          t.type = Token::Type::floating;
          t.floating = std::strtod(digits.c_str(), nullptr);
        } else {
          t.type = Token::Type::integer;
          errno = 0;
          t.integer = std::strtoll(digits.c_str(), nullptr, 10);
          if (errno == ERANGE)
            return make_error(ErrorCode::unsupported, "line {}, column {}: integer literal {} does not fit 64 bits",
                              t.where.line, t.where.column, digits);
        }
        pos = e;
      } else if (c == '\'' || c == '"') {
        MF_TRY(read_string(pos, t));
      } else {
        static const char* const two[] = {"//", "**", "==", "!=", "<=", ">="};
        bool matched = false;
        for (const char* op : two)
          if (src_.substr(pos, 2) == op) {
            t.text = op;
            matched = true;
          }
        if (!matched) {
          if (!std::strchr("+-*/%~<>=()[]{},.:|", c))
            return make_error(ErrorCode::format, "line {}, column {}: unexpected character '{}' in tag",
                              t.where.line, t.where.column, c);
          t.text = std::string(1, c);
        }
        t.type = Token::Type::op;
        pos += t.text.size();
      }
      out.push_back(std::move(t));
    }
  }

  // Python string escapes, as Jinja unescapes literals.
  Status read_string(size_t& pos, Token& t) {
    const char quote = src_[pos];
    size_t i = pos + 1;
    std::string out;
    while (true) {
      if (i >= src_.size())
        return make_error(ErrorCode::format, "line {}, column {}: string literal is never closed", t.where.line,
                          t.where.column);
      const char c = src_[i];
      if (c == quote) break;
      if (c != '\\') {
        out += c;
        ++i;
        continue;
      }
      if (i + 1 >= src_.size()) continue;
      const char e = src_[i + 1];
      i += 2;
      switch (e) {
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        case '\\': out += '\\'; break;
        case '\'': out += '\''; break;
        case '"': out += '"'; break;
        case 'a': out += '\a'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'v': out += '\v'; break;
        case '0': out += '\0'; break;
        case '\n': break;
        case 'x':
        case 'u':
        case 'U': {
          const size_t len = e == 'x' ? 2 : e == 'u' ? 4 : 8;
          const std::string hex(src_.substr(i, len));
          if (hex.size() != len || hex.find_first_not_of("0123456789abcdefABCDEF") != std::string::npos)
            return make_error(ErrorCode::format, "line {}, column {}: bad \\{} escape in string literal",
                              t.where.line, t.where.column, e);
          append_utf8(uint32_t(std::stoul(hex, nullptr, 16)), out);
          i += len;
          break;
        }
        default:  // Python keeps unknown escapes verbatim
          out += '\\';
          out += e;
      }
    }
    pos = i + 1;
    t.type = Token::Type::string;
    t.text = std::move(out);
    return Status::ok();
  }

  std::string_view src_;
  LexOptions options_;
  std::vector<size_t> line_starts_;
};

ExprPtr make_expr(Expr::Kind kind, Location where) {
  auto e = std::make_unique<Expr>();
  e->kind = kind;
  e->where = where;
  return e;
}

class Parser {
 public:
  explicit Parser(std::vector<Piece> pieces) : pieces_(std::move(pieces)) {}

  Result<Body> parse_all() {
    std::string stop;
    MF_ASSIGN_OR_RETURN(Body body, parse_body({}, stop, {}));
    return body;
  }

 private:
  // Parses statements until a block tag named in stops (left unconsumed; its name goes to stop).
  Result<Body> parse_body(std::initializer_list<const char*> stops, std::string& stop, Location opened,
                          const char* opener = "") {
    Body body;
    while (pi_ < pieces_.size()) {
      Piece& p = pieces_[pi_];
      if (p.kind == Piece::Kind::text) {
        auto s = std::make_unique<Stmt>();
        s->kind = Stmt::Kind::text;
        s->text = std::move(p.text);
        s->where = p.where;
        body.push_back(std::move(s));
        ++pi_;
        continue;
      }
      begin(p);
      if (p.kind == Piece::Kind::variable) {
        auto s = std::make_unique<Stmt>();
        s->kind = Stmt::Kind::output;
        s->where = p.where;
        MF_ASSIGN_OR_RETURN(s->expr, parse_expression());
        MF_TRY(expect_end());
        body.push_back(std::move(s));
        ++pi_;
        continue;
      }
      const Token& head = peek();
      if (head.type != Token::Type::name) return error(head, "expected a statement name after '{%'");
      for (const char* name : stops)
        if (head.text == name) {
          stop = head.text;
          return body;
        }
      MF_ASSIGN_OR_RETURN(StmtPtr s, parse_statement());
      body.push_back(std::move(s));
    }
    if (stops.size() != 0)
      return make_error(ErrorCode::format, "line {}, column {}: '{{% {} %}}' is never closed by '{{% {} %}}'",
                        opened.line, opened.column, opener, *(stops.end() - 1));
    return body;
  }

  Result<StmtPtr> parse_statement() {
    const Token head = next();
    auto s = std::make_unique<Stmt>();
    s->where = head.where;
    const std::string& name = head.text;
    std::string stop;
    if (name == "if") {
      s->kind = Stmt::Kind::if_;
      MF_ASSIGN_OR_RETURN(ExprPtr cond, parse_expression());
      MF_TRY(expect_end());
      ++pi_;
      while (true) {
        MF_ASSIGN_OR_RETURN(Body body, parse_body({"elif", "else", "endif"}, stop, head.where, "if"));
        s->branches.emplace_back(std::move(cond), std::move(body));
        begin(pieces_[pi_]);
        next();
        if (stop == "elif") {
          MF_ASSIGN_OR_RETURN(cond, parse_expression());
          MF_TRY(expect_end());
          ++pi_;
          continue;
        }
        MF_TRY(expect_end());
        ++pi_;
        if (stop == "else") {
          MF_ASSIGN_OR_RETURN(s->else_body, parse_body({"endif"}, stop, head.where, "if"));
          begin(pieces_[pi_]);
          next();
          MF_TRY(expect_end());
          ++pi_;
        }
        return s;
      }
    }
    if (name == "for") {
      s->kind = Stmt::Kind::for_;
      const bool paren = accept_op("(");
      do {
        const Token& t = next();
        if (t.type != Token::Type::name) return error(t, "expected a loop variable name");
        s->targets.push_back(t.text);
      } while (accept_op(","));
      if (paren && !accept_op(")")) return error(peek(), "expected ')' after the loop variables");
      if (!accept_name("in")) return error(peek(), "expected 'in' in for loop");
      MF_ASSIGN_OR_RETURN(s->expr, parse_expression(false));
      if (accept_name("if")) {
        MF_ASSIGN_OR_RETURN(s->filter, parse_expression());
      }
      if (peek().type == Token::Type::name && peek().text == "recursive")
        return unsupported(peek(), "recursive for loops");
      MF_TRY(expect_end());
      ++pi_;
      MF_ASSIGN_OR_RETURN(s->body, parse_body({"else", "endfor"}, stop, head.where, "for"));
      begin(pieces_[pi_]);
      next();
      MF_TRY(expect_end());
      ++pi_;
      if (stop == "else") {
        MF_ASSIGN_OR_RETURN(s->else_body, parse_body({"endfor"}, stop, head.where, "for"));
        begin(pieces_[pi_]);
        next();
        MF_TRY(expect_end());
        ++pi_;
      }
      return s;
    }
    if (name == "set") {
      const Token& target = next();
      if (target.type != Token::Type::name) return error(target, "expected a variable name after 'set'");
      s->targets.push_back(target.text);
      if (accept_op(".")) {
        const Token& attr = next();
        if (attr.type != Token::Type::name) return error(attr, "expected an attribute name");
        s->attr = attr.text;
      }
      if (peek().type == Token::Type::op && peek().text == ",")
        return unsupported(peek(), "'set' with several targets");
      if (accept_op("=")) {
        s->kind = Stmt::Kind::set;
        MF_ASSIGN_OR_RETURN(s->expr, parse_expression());
        MF_TRY(expect_end());
        ++pi_;
        return s;
      }
      if (peek().type != Token::Type::end) return unsupported(peek(), "'set' block with filters");
      if (!s->attr.empty()) return unsupported(target, "'set' block on a namespace attribute");
      s->kind = Stmt::Kind::set_block;
      ++pi_;
      MF_ASSIGN_OR_RETURN(s->body, parse_body({"endset"}, stop, head.where, "set"));
      begin(pieces_[pi_]);
      next();
      MF_TRY(expect_end());
      ++pi_;
      return s;
    }
    if (name == "macro") {
      s->kind = Stmt::Kind::macro;
      const Token& macro_name = next();
      if (macro_name.type != Token::Type::name) return error(macro_name, "expected a macro name");
      s->name = macro_name.text;
      if (!accept_op("(")) return error(peek(), "expected '(' after the macro name");
      while (!accept_op(")")) {
        if (!s->params.empty() && !accept_op(",")) return error(peek(), "expected ',' between macro parameters");
        if (accept_op(")")) break;
        const Token& param = next();
        if (param.type != Token::Type::name) return error(param, "expected a parameter name");
        ExprPtr fallback;
        if (accept_op("=")) {
          MF_ASSIGN_OR_RETURN(fallback, parse_expression());
        }
        s->params.emplace_back(param.text, std::move(fallback));
      }
      MF_TRY(expect_end());
      ++pi_;
      MF_ASSIGN_OR_RETURN(s->body, parse_body({"endmacro"}, stop, head.where, "macro"));
      begin(pieces_[pi_]);
      next();
      if (peek().type == Token::Type::name) next();  // {% endmacro name %}
      MF_TRY(expect_end());
      ++pi_;
      return s;
    }
    if (name == "break" || name == "continue") {
      s->kind = name == "break" ? Stmt::Kind::break_ : Stmt::Kind::continue_;
      MF_TRY(expect_end());
      ++pi_;
      return s;
    }
    if (name == "generation") {  // transformers' AssistantTracker: renders its body unchanged
      s->kind = Stmt::Kind::scope;
      MF_TRY(expect_end());
      ++pi_;
      MF_ASSIGN_OR_RETURN(s->body, parse_body({"endgeneration"}, stop, head.where, "generation"));
      begin(pieces_[pi_]);
      next();
      MF_TRY(expect_end());
      ++pi_;
      return s;
    }
    static const char* const unsupported_tags[] = {"call",  "filter", "include", "import", "from", "extends",
                                                    "block", "with",   "do",      "autoescape", "trans"};
    for (const char* tag : unsupported_tags)
      if (name == tag) return unsupported(head, "the '{% " + name + " %}' statement");
    return error(head, "unexpected '" + name + "' tag");
  }

  // Expressions -------------------------------------------------------------------------------------

  Result<ExprPtr> parse_expression(bool with_conditional = true) {
    MF_ASSIGN_OR_RETURN(ExprPtr e, parse_or());
    while (with_conditional && peek().type == Token::Type::name && peek().text == "if") {
      auto c = make_expr(Expr::Kind::conditional, next().where);
      MF_ASSIGN_OR_RETURN(ExprPtr cond, parse_or());
      ExprPtr otherwise;
      if (accept_name("else")) {
        MF_ASSIGN_OR_RETURN(otherwise, parse_expression());
      }
      c->children.push_back(std::move(e));
      c->children.push_back(std::move(cond));
      c->children.push_back(std::move(otherwise));
      e = std::move(c);
    }
    return e;
  }

  Result<ExprPtr> parse_or() {
    MF_ASSIGN_OR_RETURN(ExprPtr e, parse_and());
    while (peek().type == Token::Type::name && peek().text == "or") {
      auto o = make_expr(Expr::Kind::or_, next().where);
      MF_ASSIGN_OR_RETURN(ExprPtr r, parse_and());
      o->children.push_back(std::move(e));
      o->children.push_back(std::move(r));
      e = std::move(o);
    }
    return e;
  }

  Result<ExprPtr> parse_and() {
    MF_ASSIGN_OR_RETURN(ExprPtr e, parse_not());
    while (peek().type == Token::Type::name && peek().text == "and") {
      auto o = make_expr(Expr::Kind::and_, next().where);
      MF_ASSIGN_OR_RETURN(ExprPtr r, parse_not());
      o->children.push_back(std::move(e));
      o->children.push_back(std::move(r));
      e = std::move(o);
    }
    return e;
  }

  Result<ExprPtr> parse_not() {
    if (peek().type == Token::Type::name && peek().text == "not") {
      auto n = make_expr(Expr::Kind::not_, next().where);
      MF_ASSIGN_OR_RETURN(ExprPtr inner, parse_not());
      n->children.push_back(std::move(inner));
      return n;
    }
    return parse_compare();
  }

  Result<ExprPtr> parse_compare() {
    const Location where = peek().where;
    MF_ASSIGN_OR_RETURN(ExprPtr first, parse_binary(0));
    auto c = make_expr(Expr::Kind::compare, where);
    c->children.push_back(std::move(first));
    while (true) {
      const Token& t = peek();
      std::string op;
      if (t.type == Token::Type::op &&
          (t.text == "==" || t.text == "!=" || t.text == "<" || t.text == "<=" || t.text == ">" || t.text == ">=")) {
        op = t.text;
        next();
      } else if (t.type == Token::Type::name && t.text == "in") {
        op = "in";
        next();
      } else if (t.type == Token::Type::name && t.text == "not" && peek(1).type == Token::Type::name &&
                 peek(1).text == "in") {
        op = "notin";
        next();
        next();
      } else {
        break;
      }
      MF_ASSIGN_OR_RETURN(ExprPtr r, parse_binary(0));
      c->ops.push_back(op);
      c->children.push_back(std::move(r));
    }
    if (c->ops.empty()) return std::move(c->children[0]);
    return c;
  }

  // Levels: 0 "+ -", 1 "~", 2 "* / // %", 3 "**".
  Result<ExprPtr> parse_binary(int level) {
    static const std::vector<std::vector<std::string>> levels = {{"+", "-"}, {"~"}, {"*", "/", "//", "%"}, {"**"}};
    if (level == 4) return parse_unary(true);
    MF_ASSIGN_OR_RETURN(ExprPtr e, parse_binary(level + 1));
    while (true) {
      const Token& t = peek();
      if (t.type != Token::Type::op) break;
      const auto& ops = levels[size_t(level)];
      if (std::find(ops.begin(), ops.end(), t.text) == ops.end()) break;
      auto b = make_expr(Expr::Kind::binary, t.where);
      b->name = t.text;
      next();
      MF_ASSIGN_OR_RETURN(ExprPtr r, parse_binary(level + 1));
      b->children.push_back(std::move(e));
      b->children.push_back(std::move(r));
      e = std::move(b);
    }
    return e;
  }

  Result<ExprPtr> parse_unary(bool with_filter) {
    const Token& t = peek();
    ExprPtr e;
    if (t.type == Token::Type::op && (t.text == "-" || t.text == "+")) {
      e = make_expr(t.text == "-" ? Expr::Kind::negate : Expr::Kind::plus, t.where);
      next();
      MF_ASSIGN_OR_RETURN(ExprPtr inner, parse_unary(false));
      e->children.push_back(std::move(inner));
    } else {
      MF_ASSIGN_OR_RETURN(e, parse_primary());
    }
    MF_ASSIGN_OR_RETURN(e, parse_postfix(std::move(e)));
    if (with_filter) {
      MF_ASSIGN_OR_RETURN(e, parse_filters_and_tests(std::move(e)));
    }
    return e;
  }

  Result<ExprPtr> parse_primary() {
    const Token t = next();
    switch (t.type) {
      case Token::Type::name: {
        auto e = make_expr(Expr::Kind::literal, t.where);
        if (t.text == "true" || t.text == "True") e->value = Value::from_bool(true);
        else if (t.text == "false" || t.text == "False") e->value = Value::from_bool(false);
        else if (t.text == "none" || t.text == "None") e->value = Value::none();
        else {
          e->kind = Expr::Kind::name;
          e->name = t.text;
        }
        return e;
      }
      case Token::Type::string: {
        std::string s = t.text;
        while (peek().type == Token::Type::string) s += next().text;  // "a" "b" is "ab"
        auto e = make_expr(Expr::Kind::literal, t.where);
        e->value = Value::from_string(std::move(s));
        return e;
      }
      case Token::Type::integer: {
        auto e = make_expr(Expr::Kind::literal, t.where);
        e->value = Value::from_int(t.integer);
        return e;
      }
      case Token::Type::floating: {
        auto e = make_expr(Expr::Kind::literal, t.where);
        e->value = Value::from_double(t.floating);
        return e;
      }
      case Token::Type::op:
        if (t.text == "(") {
          if (accept_op(")")) return make_expr(Expr::Kind::list, t.where);  // () is an empty tuple
          MF_ASSIGN_OR_RETURN(ExprPtr e, parse_expression());
          if (peek().type == Token::Type::op && peek().text == ",") {  // a tuple: a list to us
            auto l = make_expr(Expr::Kind::list, t.where);
            l->children.push_back(std::move(e));
            while (accept_op(",")) {
              if (peek().type == Token::Type::op && peek().text == ")") break;
              MF_ASSIGN_OR_RETURN(ExprPtr item, parse_expression());
              l->children.push_back(std::move(item));
            }
            e = std::move(l);
          }
          if (!accept_op(")")) return error(peek(), "expected ')'");
          return e;
        }
        if (t.text == "[") {
          auto l = make_expr(Expr::Kind::list, t.where);
          while (!accept_op("]")) {
            if (!l->children.empty() && !accept_op(",")) return error(peek(), "expected ',' or ']' in list");
            if (accept_op("]")) break;
            MF_ASSIGN_OR_RETURN(ExprPtr item, parse_expression());
            l->children.push_back(std::move(item));
          }
          return l;
        }
        if (t.text == "{") {
          auto d = make_expr(Expr::Kind::dict, t.where);
          while (!accept_op("}")) {
            if (!d->children.empty() && !accept_op(",")) return error(peek(), "expected ',' or '}' in dict");
            if (accept_op("}")) break;
            MF_ASSIGN_OR_RETURN(ExprPtr key, parse_expression());
            if (!accept_op(":")) return error(peek(), "expected ':' in dict literal");
            MF_ASSIGN_OR_RETURN(ExprPtr value, parse_expression());
            d->children.push_back(std::move(key));
            d->children.push_back(std::move(value));
          }
          return d;
        }
        return error(t, "unexpected '" + t.text + "'");
      case Token::Type::end: return error(t, "unexpected end of tag, expected an expression");
    }
    return error(t, "unexpected token");
  }

  Result<ExprPtr> parse_postfix(ExprPtr e) {
    while (true) {
      const Token& t = peek();
      if (t.type != Token::Type::op) return e;
      if (t.text == ".") {
        next();
        const Token& attr = next();
        if (attr.type == Token::Type::name) {
          auto g = make_expr(Expr::Kind::getattr, attr.where);
          g->name = attr.text;
          g->children.push_back(std::move(e));
          e = std::move(g);
        } else if (attr.type == Token::Type::integer) {  // x.0 is x[0]
          auto g = make_expr(Expr::Kind::getitem, attr.where);
          auto index = make_expr(Expr::Kind::literal, attr.where);
          index->value = Value::from_int(attr.integer);
          g->children.push_back(std::move(e));
          g->children.push_back(std::move(index));
          e = std::move(g);
        } else {
          return error(attr, "expected an attribute name after '.'");
        }
      } else if (t.text == "[") {
        MF_ASSIGN_OR_RETURN(e, parse_subscript(std::move(e)));
      } else if (t.text == "(") {
        MF_ASSIGN_OR_RETURN(e, parse_call(std::move(e), Expr::Kind::call, ""));
      } else {
        return e;
      }
    }
  }

  Result<ExprPtr> parse_subscript(ExprPtr target) {
    const Location where = next().where;  // '['
    auto is_op = [&](const char* op) { return peek().type == Token::Type::op && peek().text == op; };
    ExprPtr parts[3];
    int n_colons = 0;
    if (!is_op(":")) {
      MF_ASSIGN_OR_RETURN(parts[0], parse_expression());
    }
    while (n_colons < 2 && accept_op(":")) {
      ++n_colons;
      if (!is_op(":") && !is_op("]")) {
        MF_ASSIGN_OR_RETURN(parts[n_colons], parse_expression());
      }
    }
    if (is_op(",")) return unsupported(peek(), "tuple subscripts");
    if (!accept_op("]")) return error(peek(), "expected ']'");
    auto e = make_expr(n_colons ? Expr::Kind::slice : Expr::Kind::getitem, where);
    e->children.push_back(std::move(target));
    e->children.push_back(std::move(parts[0]));
    if (n_colons) {
      e->children.push_back(std::move(parts[1]));
      e->children.push_back(std::move(parts[2]));
    }
    return e;
  }

  // Consumes "(args)" and builds a call/filter/test with target as children[0].
  Result<ExprPtr> parse_call(ExprPtr target, Expr::Kind kind, const std::string& name) {
    const Location where = next().where;  // '('
    auto e = make_expr(kind, where);
    e->name = name;
    e->children.push_back(std::move(target));
    bool first = true;
    while (!accept_op(")")) {
      if (!first && !accept_op(",")) return error(peek(), "expected ',' or ')' in argument list");
      first = false;
      if (accept_op(")")) break;
      if (peek().type == Token::Type::op && (peek().text == "*" || peek().text == "**"))
        return unsupported(peek(), "*args/**kwargs in calls");
      if (peek().type == Token::Type::name && peek(1).type == Token::Type::op && peek(1).text == "=") {
        const std::string key = next().text;
        next();
        MF_ASSIGN_OR_RETURN(ExprPtr value, parse_expression());
        e->kwargs.emplace_back(key, std::move(value));
      } else {
        if (!e->kwargs.empty()) return error(peek(), "positional argument after keyword argument");
        MF_ASSIGN_OR_RETURN(ExprPtr value, parse_expression());
        e->children.push_back(std::move(value));
      }
    }
    return e;
  }

  Result<ExprPtr> parse_filters_and_tests(ExprPtr e) {
    while (true) {
      const Token& t = peek();
      if (t.type == Token::Type::op && t.text == "|") {
        next();
        const Token name = next();
        if (name.type != Token::Type::name) return error(name, "expected a filter name after '|'");
        if (peek().type == Token::Type::op && peek().text == "(") {
          MF_ASSIGN_OR_RETURN(e, parse_call(std::move(e), Expr::Kind::filter, name.text));
          e->where = name.where;
        } else {
          auto f = make_expr(Expr::Kind::filter, name.where);
          f->name = name.text;
          f->children.push_back(std::move(e));
          e = std::move(f);
        }
      } else if (t.type == Token::Type::name && t.text == "is") {
        next();
        const bool negated = accept_name("not");
        const Token name = next();
        if (name.type != Token::Type::name) return error(name, "expected a test name after 'is'");
        const Token& a = peek();
        if (a.type == Token::Type::op && a.text == "(") {
          MF_ASSIGN_OR_RETURN(e, parse_call(std::move(e), Expr::Kind::test, name.text));
          e->where = name.where;
        } else {
          auto test = make_expr(Expr::Kind::test, name.where);
          test->name = name.text;
          test->children.push_back(std::move(e));
          const bool takes_argument =
              (a.type == Token::Type::name && a.text != "else" && a.text != "or" && a.text != "and" &&
               a.text != "if" && a.text != "in" && a.text != "not" && a.text != "is") ||
              a.type == Token::Type::string || a.type == Token::Type::integer || a.type == Token::Type::floating ||
              (a.type == Token::Type::op && (a.text == "[" || a.text == "{"));
          if (takes_argument) {  // "is equalto 'x'", "is divisibleby 3"
            MF_ASSIGN_OR_RETURN(ExprPtr arg, parse_primary());
            MF_ASSIGN_OR_RETURN(arg, parse_postfix(std::move(arg)));
            test->children.push_back(std::move(arg));
          }
          e = std::move(test);
        }
        e->negated = negated;
      } else if (t.type == Token::Type::op && t.text == "(") {
        MF_ASSIGN_OR_RETURN(e, parse_call(std::move(e), Expr::Kind::call, ""));
      } else {
        return e;
      }
    }
  }

  // Tokens of the current tag ---------------------------------------------------------------------

  void begin(const Piece& p) {
    tokens_ = &p.tokens;
    ti_ = 0;
  }
  const Token& peek(size_t ahead = 0) const {
    const size_t i = std::min(ti_ + ahead, tokens_->size() - 1);
    return (*tokens_)[i];
  }
  const Token& next() {
    const Token& t = peek();
    if (ti_ + 1 < tokens_->size()) ++ti_;
    return t;
  }
  bool accept_op(const char* op) {
    if (peek().type == Token::Type::op && peek().text == op) {
      next();
      return true;
    }
    return false;
  }
  bool accept_name(const char* name) {
    if (peek().type == Token::Type::name && peek().text == name) {
      next();
      return true;
    }
    return false;
  }
  Status expect_end() {
    if (peek().type == Token::Type::end) return Status::ok();
    const Token& t = peek();
    return make_error(ErrorCode::format, "line {}, column {}: unexpected '{}', expected the end of the tag",
                      t.where.line, t.where.column, t.type == Token::Type::string ? "'" + t.text + "'" : t.text);
  }
  Status error(const Token& t, const std::string& what) const {
    return make_error(ErrorCode::format, "line {}, column {}: {}", t.where.line, t.where.column, what);
  }
  Status unsupported(const Token& t, const std::string& what) const {
    return make_error(ErrorCode::unsupported, "line {}, column {}: {} is not supported by this Jinja subset",
                      t.where.line, t.where.column, what);
  }

  std::vector<Piece> pieces_;
  size_t pi_ = 0;
  const std::vector<Token>* tokens_ = nullptr;
  size_t ti_ = 0;
};

}  // namespace

Result<Body> parse_template(std::string_view source, const LexOptions& options) {
  // Jinja drops one trailing newline of the source unless keep_trailing_newline.
  if (!options.keep_trailing_newline && !source.empty() && source.back() == '\n') {
    source.remove_suffix(1);
    if (!source.empty() && source.back() == '\r') source.remove_suffix(1);
  }
  Lexer lexer(source, options);
  MF_ASSIGN_OR_RETURN(std::vector<Piece> pieces, lexer.run());
  Parser parser(std::move(pieces));
  return parser.parse_all();
}

}  // namespace moeflux::jinja
