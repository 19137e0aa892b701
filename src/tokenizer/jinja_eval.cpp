// The evaluator. Semantics follow Jinja 3 with default Undefined, as transformers renders chat
// templates (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loopcontrols): a missing
// key/attribute is undefined, only an attribute *of* undefined is an error; for-loop bodies get their
// own scope, so {% set %} inside a loop does not leak out (templates use namespace() for that).
#include "tokenizer/jinja_eval.hpp"

#include <algorithm>
#include <cmath>
#include <ctime>

namespace moeflux::jinja {
namespace {

using K = Value::Kind;

// One string per code point (strings index, slice, iterate and measure by code points, as in Python).
std::vector<std::string> code_points(const std::string& s) {
  std::vector<std::string> out;
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
    len = std::min(len, s.size() - i);
    out.emplace_back(s.substr(i, len));
    i += len;
  }
  return out;
}

std::string join_strings(const std::vector<std::string>& parts, size_t begin, size_t end) {
  std::string out;
  for (size_t i = begin; i < end; ++i) out += parts[i];
  return out;
}

bool is_int(const Value& v) { return v.kind == K::integer || v.kind == K::boolean; }
int64_t as_int(const Value& v) { return v.kind == K::boolean ? int64_t(v.boolean) : v.integer; }

const std::string kWhitespace = " \t\n\r\v\f";

std::string strip_chars(const std::string& s, const Value& chars, bool left, bool right) {
  const std::vector<std::string> cps = code_points(s);
  std::vector<std::string> set;
  if (chars.is_string()) set = code_points(chars.string);
  auto strippable = [&](const std::string& cp) {
    if (chars.is_string()) return std::find(set.begin(), set.end(), cp) != set.end();
    return cp.size() == 1 && kWhitespace.find(cp[0]) != std::string::npos;
  };
  size_t b = 0, e = cps.size();
  if (left)
    while (b < e && strippable(cps[b])) ++b;
  if (right)
    while (e > b && strippable(cps[e - 1])) --e;
  return join_strings(cps, b, e);
}

std::string ascii_case(std::string s, bool upper) {
  for (char& c : s) c = char(upper ? std::toupper(static_cast<unsigned char>(c)) : std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string capitalize(const std::string& s) {
  std::string out = ascii_case(s, false);
  if (!out.empty()) out[0] = char(std::toupper(static_cast<unsigned char>(out[0])));
  return out;
}

std::string title(const std::string& s) {
  std::string out = s;
  bool start = true;
  for (char& c : out) {
    const bool alpha = std::isalpha(static_cast<unsigned char>(c));
    c = char(alpha && start ? std::toupper(static_cast<unsigned char>(c)) : std::tolower(static_cast<unsigned char>(c)));
    start = !alpha;
  }
  return out;
}

std::string replace_all(const std::string& s, const std::string& from, const std::string& to, int64_t count) {
  if (from.empty()) return s;
  std::string out;
  size_t pos = 0;
  for (int64_t done = 0; count < 0 || done < count; ++done) {
    const size_t at = s.find(from, pos);
    if (at == std::string::npos) break;
    out += s.substr(pos, at - pos) + to;
    pos = at + from.size();
  }
  return out + s.substr(pos);
}

Value split(const std::string& s, const Value& sep, int64_t maxsplit) {
  List parts;
  if (!sep.is_string()) {  // runs of whitespace, no empty parts
    size_t i = 0;
    while (true) {
      while (i < s.size() && kWhitespace.find(s[i]) != std::string::npos) ++i;
      if (i >= s.size()) break;
      if (maxsplit >= 0 && int64_t(parts.size()) == maxsplit) {
        size_t e = s.size();
        while (e > i && kWhitespace.find(s[e - 1]) != std::string::npos) --e;
        parts.push_back(Value::from_string(s.substr(i, e - i)));
        break;
      }
      size_t e = i;
      while (e < s.size() && kWhitespace.find(s[e]) == std::string::npos) ++e;
      parts.push_back(Value::from_string(s.substr(i, e - i)));
      i = e;
    }
    return Value::from_list(std::move(parts));
  }
  size_t pos = 0;
  while (maxsplit < 0 || int64_t(parts.size()) < maxsplit) {
    const size_t at = s.find(sep.string, pos);
    if (at == std::string::npos) break;
    parts.push_back(Value::from_string(s.substr(pos, at - pos)));
    pos = at + sep.string.size();
  }
  parts.push_back(Value::from_string(s.substr(pos)));
  return Value::from_list(std::move(parts));
}

// Python slice bounds for length n.
std::vector<int64_t> slice_indices(int64_t n, const Value& start, const Value& stop, const Value& step_v) {
  const int64_t step = step_v.is_none() || step_v.is_undefined() ? 1 : as_int(step_v);
  auto clamp = [&](const Value& v, int64_t fallback) {
    if (v.is_none() || v.is_undefined()) return fallback;
    int64_t i = as_int(v);
    if (i < 0) i += n;
    if (step > 0) return std::clamp<int64_t>(i, 0, n);
    return std::clamp<int64_t>(i, -1, n - 1);
  };
  std::vector<int64_t> out;
  if (step > 0) {
    for (int64_t i = clamp(start, 0), e = clamp(stop, n); i < e; i += step) out.push_back(i);
  } else {
    for (int64_t i = clamp(start, n - 1), e = clamp(stop, -1); i > e; i += step) out.push_back(i);
  }
  return out;
}

Status type_error(const std::string& what) { return Status(ErrorCode::invalid_argument, what); }

class Evaluator {
 public:
  // Top-level {% set %} writes a copy, never the caller's globals.
  explicit Evaluator(const Value& globals) { frames_.push_back(std::make_shared<Dict>(*globals.dict)); }

  Status render(const Body& body, std::string& out) {
    MF_ASSIGN_OR_RETURN(Flow flow, exec(body, out));
    (void)flow;
    return Status::ok();
  }

 private:
  enum class Flow { normal, break_, continue_ };

  static Status located(const Location& where, const Status& s) {
    return Status(s.code(), fmt::format("line {}, column {}: {}", where.line, where.column, s.message()));
  }

  Value lookup(const std::string& name) const {
    for (auto it = frames_.rbegin(); it != frames_.rend(); ++it)
      if (const Value* v = (*it)->find(name)) return *v;
    if (name == "namespace" || name == "range" || name == "dict") return builtin_global(name);
    return Value::undefined(name);
  }

  Result<Flow> exec(const Body& body, std::string& out) {
    for (const StmtPtr& s : body) {
      MF_ASSIGN_OR_RETURN(Flow flow, exec_one(*s, out));
      if (flow != Flow::normal) return flow;
    }
    return Flow::normal;
  }

  Result<Flow> exec_one(const Stmt& s, std::string& out) {
    switch (s.kind) {
      case Stmt::Kind::text: out += s.text; return Flow::normal;
      case Stmt::Kind::output: {
        MF_ASSIGN_OR_RETURN(Value v, eval(*s.expr));
        out += to_str(v);
        return Flow::normal;
      }
      case Stmt::Kind::if_:
        for (const auto& [cond, body] : s.branches) {
          MF_ASSIGN_OR_RETURN(Value c, eval(*cond));
          if (c.truthy()) return exec(body, out);
        }
        return exec(s.else_body, out);
      case Stmt::Kind::for_: return exec_for(s, out);
      case Stmt::Kind::set: {
        MF_ASSIGN_OR_RETURN(Value v, eval(*s.expr));
        if (s.attr.empty()) {
          frames_.back()->set(s.targets[0], std::move(v));
          return Flow::normal;
        }
        Value target = lookup(s.targets[0]);
        if (target.kind != K::dict || !target.is_namespace)
          return located(s.where, type_error(fmt::format("cannot set attribute '{}' on '{}' ({}): only namespace() "
                                                         "objects take attribute assignment",
                                                         s.attr, s.targets[0], target.type_name())));
        target.dict->set(s.attr, std::move(v));
        return Flow::normal;
      }
      case Stmt::Kind::set_block: {
        std::string captured;
        MF_ASSIGN_OR_RETURN(Flow flow, exec(s.body, captured));
        (void)flow;
        frames_.back()->set(s.targets[0], Value::from_string(std::move(captured)));
        return Flow::normal;
      }
      case Stmt::Kind::macro: frames_.back()->set(s.name, make_macro(s)); return Flow::normal;
      case Stmt::Kind::break_: return Flow::break_;
      case Stmt::Kind::continue_: return Flow::continue_;
      case Stmt::Kind::scope: return exec(s.body, out);
    }
    return Flow::normal;
  }

  Result<List> iterate(const Value& v, const Location& where) {
    switch (v.kind) {
      case K::undefined: return List{};
      case K::list: return *v.list;
      case K::dict: {
        if (v.is_namespace) break;
        List keys;
        for (const auto& [k, x] : v.dict->items) keys.push_back(Value::from_string(k));
        return keys;
      }
      case K::string: {
        List chars;
        for (auto& cp : code_points(v.string)) chars.push_back(Value::from_string(std::move(cp)));
        return chars;
      }
      default: break;
    }
    return located(where, type_error(fmt::format("cannot iterate over a value of type {}", v.type_name())));
  }

  Status bind_targets(const Stmt& s, const Value& item, Dict& frame) {
    if (s.targets.size() == 1) {
      frame.set(s.targets[0], item);
      return Status::ok();
    }
    if (!item.is_list() || item.list->size() != s.targets.size())
      return located(s.where, type_error(fmt::format("cannot unpack a {} into {} loop variables", item.type_name(),
                                                     s.targets.size())));
    for (size_t i = 0; i < s.targets.size(); ++i) frame.set(s.targets[i], (*item.list)[i]);
    return Status::ok();
  }

  Result<Flow> exec_for(const Stmt& s, std::string& out) {
    MF_ASSIGN_OR_RETURN(Value iterable, eval(*s.expr));
    MF_ASSIGN_OR_RETURN(List items, iterate(iterable, s.expr->where));
    frames_.push_back(std::make_shared<Dict>());
    Dict& frame = *frames_.back();
    struct PopFrame {
      std::vector<std::shared_ptr<Dict>>& frames;
      ~PopFrame() { frames.pop_back(); }
    } pop{frames_};
    if (s.filter) {  // "for x in xs if cond": the loop (and loop.length) sees only the kept items
      List kept;
      for (const Value& item : items) {
        MF_TRY(bind_targets(s, item, frame));
        MF_ASSIGN_OR_RETURN(Value keep, eval(*s.filter));
        if (keep.truthy()) kept.push_back(item);
      }
      items = std::move(kept);
    }
    if (items.empty()) {
      MF_ASSIGN_OR_RETURN(Flow flow, exec(s.else_body, out));
      (void)flow;
      return Flow::normal;
    }
    const int64_t n = int64_t(items.size());
    for (int64_t i = 0; i < n; ++i) {
      MF_TRY(bind_targets(s, items[size_t(i)], frame));
      Value loop = Value::new_dict();
      Dict& l = *loop.dict;
      l.set("index", Value::from_int(i + 1));
      l.set("index0", Value::from_int(i));
      l.set("revindex", Value::from_int(n - i));
      l.set("revindex0", Value::from_int(n - i - 1));
      l.set("first", Value::from_bool(i == 0));
      l.set("last", Value::from_bool(i == n - 1));
      l.set("length", Value::from_int(n));
      l.set("depth", Value::from_int(1));
      l.set("depth0", Value::from_int(0));
      l.set("previtem", i > 0 ? items[size_t(i - 1)] : Value::undefined("previtem"));
      l.set("nextitem", i + 1 < n ? items[size_t(i + 1)] : Value::undefined("nextitem"));
      l.set("cycle", Value::from_function([i](CallArgs& args) -> Result<Value> {
              if (args.positional.empty()) return type_error("loop.cycle() needs at least one argument");
              return args.positional[size_t(i) % args.positional.size()];
            }));
      frame.set("loop", loop);
      MF_ASSIGN_OR_RETURN(Flow flow, exec(s.body, out));
      if (flow == Flow::break_) break;
    }
    return Flow::normal;
  }

  Value make_macro(const Stmt& s) {
    const Stmt* macro = &s;
    return Value::from_function([this, macro](CallArgs& args) -> Result<Value> {
      auto params = std::make_shared<Dict>();
      if (args.positional.size() > macro->params.size())
        return type_error(fmt::format("macro '{}' takes {} arguments, got {}", macro->name, macro->params.size(),
                                      args.positional.size()));
      for (size_t i = 0; i < macro->params.size(); ++i) {
        const auto& [name, fallback] = macro->params[i];
        Value v = args.get(i, name);
        if (v.is_undefined() && fallback) {
          MF_ASSIGN_OR_RETURN(v, eval(*fallback));
        }
        params->set(name, std::move(v));
      }
      for (const auto& [k, v] : args.keyword) {
        const bool known = std::any_of(macro->params.begin(), macro->params.end(),
                                       [&](const auto& p) { return p.first == k; });
        if (!known) return type_error(fmt::format("macro '{}' has no parameter '{}'", macro->name, k));
      }
      // A macro sees the globals and its parameters, not the caller's locals.
      std::vector<std::shared_ptr<Dict>> saved = std::move(frames_);
      frames_ = {saved.front(), params};
      std::string out;
      auto flow = exec(macro->body, out);
      frames_ = std::move(saved);
      if (!flow.is_ok()) return flow.status();
      return Value::from_string(std::move(out));
    });
  }

  static Value builtin_global(const std::string& name) {
    if (name == "namespace" || name == "dict") {
      const bool is_namespace = name == "namespace";
      return Value::from_function([is_namespace](CallArgs& args) -> Result<Value> {
        Value d = Value::new_dict();
        d.is_namespace = is_namespace;
        for (const Value& p : args.positional) {
          if (!p.is_dict()) return type_error("namespace()/dict() take a dict or keyword arguments");
          for (const auto& [k, v] : p.dict->items) d.dict->set(k, v);
        }
        for (const auto& [k, v] : args.keyword) d.dict->set(k, v);
        return d;
      });
    }
    return Value::from_function([](CallArgs& args) -> Result<Value> {  // range
      for (const Value& a : args.positional)
        if (!is_int(a)) return type_error("range() takes integers");
      int64_t start = 0, stop = 0, step = 1;
      if (args.positional.size() == 1) stop = as_int(args.positional[0]);
      else if (args.positional.size() >= 2) {
        start = as_int(args.positional[0]);
        stop = as_int(args.positional[1]);
        if (args.positional.size() >= 3) step = as_int(args.positional[2]);
      }
      if (step == 0) return type_error("range() step must not be zero");
      List out;
      for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
        out.push_back(Value::from_int(i));
        if (out.size() > 100'000'000) return type_error("range() too long");
      }
      return Value::from_list(std::move(out));
    });
  }

  // Expressions -------------------------------------------------------------------------------------

  Result<Value> eval(const Expr& e) {
    switch (e.kind) {
      case Expr::Kind::literal: return e.value;
      case Expr::Kind::name: return lookup(e.name);
      case Expr::Kind::list: {
        List items;
        for (const auto& c : e.children) {
          MF_ASSIGN_OR_RETURN(Value v, eval(*c));
          items.push_back(std::move(v));
        }
        return Value::from_list(std::move(items));
      }
      case Expr::Kind::dict: {
        Value d = Value::new_dict();
        for (size_t i = 0; i + 1 < e.children.size(); i += 2) {
          MF_ASSIGN_OR_RETURN(Value k, eval(*e.children[i]));
          MF_ASSIGN_OR_RETURN(Value v, eval(*e.children[i + 1]));
          if (!k.is_string()) return located(e.where, Status(ErrorCode::unsupported, "dict keys must be strings"));
          d.dict->set(k.string, std::move(v));
        }
        return d;
      }
      case Expr::Kind::getattr: {
        MF_ASSIGN_OR_RETURN(Value obj, eval(*e.children[0]));
        auto r = get_attr(obj, e.name);
        if (!r.is_ok()) return located(e.where, r.status());
        return r;
      }
      case Expr::Kind::getitem: {
        MF_ASSIGN_OR_RETURN(Value obj, eval(*e.children[0]));
        MF_ASSIGN_OR_RETURN(Value key, eval(*e.children[1]));
        auto r = get_item(obj, key);
        if (!r.is_ok()) return located(e.where, r.status());
        return r;
      }
      case Expr::Kind::slice: return eval_slice(e);
      case Expr::Kind::call: {
        MF_ASSIGN_OR_RETURN(Value callee, eval(*e.children[0]));
        MF_ASSIGN_OR_RETURN(CallArgs args, eval_args(e));
        if (!callee.is_callable()) {
          const std::string what = e.children[0]->kind == Expr::Kind::name      ? e.children[0]->name
                                   : e.children[0]->kind == Expr::Kind::getattr ? e.children[0]->name
                                                                                : "expression";
          return located(e.where, Status(callee.is_undefined() ? ErrorCode::unsupported : ErrorCode::invalid_argument,
                                         fmt::format("'{}' is {}, not a function this Jinja subset knows", what,
                                                     callee.type_name())));
        }
        auto r = (*callee.function)(args);
        if (!r.is_ok() && r.status().message().rfind("line ", 0) != 0) return located(e.where, r.status());
        return r;
      }
      case Expr::Kind::filter: {
        MF_ASSIGN_OR_RETURN(Value input, eval(*e.children[0]));
        MF_ASSIGN_OR_RETURN(CallArgs args, eval_args(e));
        auto r = apply_filter(e.name, input, args);
        if (!r.is_ok()) return located(e.where, r.status());
        return r;
      }
      case Expr::Kind::test: {
        MF_ASSIGN_OR_RETURN(Value input, eval(*e.children[0]));
        MF_ASSIGN_OR_RETURN(CallArgs args, eval_args(e));
        auto r = apply_test(e.name, input, args);
        if (!r.is_ok()) return located(e.where, r.status());
        return Value::from_bool(r.value() != e.negated);
      }
      case Expr::Kind::not_: {
        MF_ASSIGN_OR_RETURN(Value v, eval(*e.children[0]));
        return Value::from_bool(!v.truthy());
      }
      case Expr::Kind::negate:
      case Expr::Kind::plus: {
        MF_ASSIGN_OR_RETURN(Value v, eval(*e.children[0]));
        if (!v.is_number())
          return located(e.where, type_error(fmt::format("bad operand type for unary {}: {}",
                                                         e.kind == Expr::Kind::negate ? "-" : "+", v.type_name())));
        if (e.kind == Expr::Kind::plus) return is_int(v) ? Value::from_int(as_int(v)) : v;
        return is_int(v) ? Value::from_int(-as_int(v)) : Value::from_double(-v.floating);
      }
      case Expr::Kind::binary: {
        MF_ASSIGN_OR_RETURN(Value a, eval(*e.children[0]));
        MF_ASSIGN_OR_RETURN(Value b, eval(*e.children[1]));
        auto r = binary(e.name, a, b);
        if (!r.is_ok()) return located(e.where, r.status());
        return r;
      }
      case Expr::Kind::compare: {
        MF_ASSIGN_OR_RETURN(Value left, eval(*e.children[0]));
        for (size_t i = 0; i < e.ops.size(); ++i) {
          MF_ASSIGN_OR_RETURN(Value right, eval(*e.children[i + 1]));
          auto r = compare(e.ops[i], left, right);
          if (!r.is_ok()) return located(e.where, r.status());
          if (!r.value()) return Value::from_bool(false);
          left = std::move(right);
        }
        return Value::from_bool(true);
      }
      case Expr::Kind::and_: {
        MF_ASSIGN_OR_RETURN(Value a, eval(*e.children[0]));
        if (!a.truthy()) return a;
        return eval(*e.children[1]);
      }
      case Expr::Kind::or_: {
        MF_ASSIGN_OR_RETURN(Value a, eval(*e.children[0]));
        if (a.truthy()) return a;
        return eval(*e.children[1]);
      }
      case Expr::Kind::conditional: {
        MF_ASSIGN_OR_RETURN(Value c, eval(*e.children[1]));
        if (c.truthy()) return eval(*e.children[0]);
        if (e.children[2]) return eval(*e.children[2]);
        return Value::undefined();
      }
    }
    return Value::undefined();
  }

  Result<CallArgs> eval_args(const Expr& e) {
    CallArgs args;
    for (size_t i = 1; i < e.children.size(); ++i) {
      MF_ASSIGN_OR_RETURN(Value v, eval(*e.children[i]));
      args.positional.push_back(std::move(v));
    }
    for (const auto& [k, x] : e.kwargs) {
      MF_ASSIGN_OR_RETURN(Value v, eval(*x));
      args.keyword.emplace_back(k, std::move(v));
    }
    return args;
  }

  Result<Value> eval_slice(const Expr& e) {
    MF_ASSIGN_OR_RETURN(Value obj, eval(*e.children[0]));
    Value bounds[3];
    for (int i = 0; i < 3; ++i) {
      if (!e.children[size_t(i) + 1]) {
        bounds[i] = Value::none();
        continue;
      }
      MF_ASSIGN_OR_RETURN(bounds[i], eval(*e.children[size_t(i) + 1]));
      if (!bounds[i].is_none() && !is_int(bounds[i]))
        return located(e.where, type_error(fmt::format("slice bounds must be integers, not {}", bounds[i].type_name())));
    }
    if ((bounds[2].kind == K::integer || bounds[2].kind == K::boolean) && as_int(bounds[2]) == 0)
      return located(e.where, type_error("slice step cannot be zero"));
    if (obj.is_list()) {
      List out;
      for (int64_t i : slice_indices(int64_t(obj.list->size()), bounds[0], bounds[1], bounds[2]))
        out.push_back((*obj.list)[size_t(i)]);
      return Value::from_list(std::move(out));
    }
    if (obj.is_string()) {
      const auto cps = code_points(obj.string);
      std::string out;
      for (int64_t i : slice_indices(int64_t(cps.size()), bounds[0], bounds[1], bounds[2])) out += cps[size_t(i)];
      return Value::from_string(std::move(out));
    }
    if (obj.is_undefined())
      return located(e.where, type_error(fmt::format("cannot slice undefined value '{}'", obj.string)));
    return located(e.where, type_error(fmt::format("cannot slice a value of type {}", obj.type_name())));
  }

  // Jinja's getattr: Python attribute (methods) first, then the item.
  Result<Value> get_attr(const Value& obj, const std::string& name) {
    if (obj.is_undefined())
      return Status(ErrorCode::invalid_argument, fmt::format("'{}' is undefined (reading its attribute '{}')",
                                                             obj.string.empty() ? "value" : obj.string, name));
    if (obj.is_dict()) {
      if (!obj.is_namespace && (name == "get" || name == "items" || name == "keys" || name == "values"))
        return bound_method(obj, name);
      if (const Value* v = obj.dict->find(name)) return *v;
      return Value::undefined(name);
    }
    if (obj.is_string()) {
      static const char* const methods[] = {"startswith", "endswith", "strip", "lstrip", "rstrip", "split",
                                            "replace",    "upper",    "lower", "title",  "capitalize", "format",
                                            "join"};
      for (const char* m : methods)
        if (name == m) return bound_method(obj, name);
    }
    return Value::undefined(name);
  }

  // Jinja's getitem: the item first, then the attribute.
  Result<Value> get_item(const Value& obj, const Value& key) {
    if (obj.is_undefined())
      return Status(ErrorCode::invalid_argument,
                    fmt::format("'{}' is undefined (reading its item {})", obj.string.empty() ? "value" : obj.string,
                                to_repr(key)));
    if (obj.is_dict() && key.is_string()) {
      if (const Value* v = obj.dict->find(key.string)) return *v;
      return get_attr(obj, key.string);
    }
    if ((obj.is_list() || obj.is_string()) && is_int(key)) {
      std::vector<std::string> cps;
      if (obj.is_string()) cps = code_points(obj.string);
      const int64_t n = obj.is_list() ? int64_t(obj.list->size()) : int64_t(cps.size());
      int64_t i = as_int(key);
      if (i < 0) i += n;
      if (i < 0 || i >= n) return Value::undefined();
      if (obj.is_list()) return (*obj.list)[size_t(i)];
      return Value::from_string(cps[size_t(i)]);
    }
    if (key.is_string()) return get_attr(obj, key.string);
    return Value::undefined();
  }

  Value bound_method(const Value& self, const std::string& name) {
    return Value::from_function([this, self, name](CallArgs& args) { return call_method(self, name, args); });
  }

  Result<Value> call_method(const Value& self, const std::string& name, CallArgs& args) {
    if (self.is_dict()) {
      const Dict& d = *self.dict;
      if (name == "get") {
        const Value key = args.get(0, "key");
        if (!key.is_string()) return Value::none();
        if (const Value* v = d.find(key.string)) return *v;
        return args.get(1, "default", Value::none());
      }
      List out;
      for (const auto& [k, v] : d.items) {
        if (name == "items") out.push_back(Value::from_list({Value::from_string(k), v}));
        else if (name == "keys") out.push_back(Value::from_string(k));
        else out.push_back(v);
      }
      return Value::from_list(std::move(out));
    }
    const std::string& s = self.string;
    auto string_arg = [&](size_t i, const char* arg_name) -> Result<std::string> {
      const Value v = args.get(i, arg_name);
      if (!v.is_string())
        return type_error(fmt::format("str.{}() expects a string argument, got {}", name, v.type_name()));
      return v.string;
    };
    if (name == "startswith" || name == "endswith") {
      const Value arg = args.get(0, "prefix");
      List candidates = arg.is_list() ? *arg.list : List{arg};
      for (const Value& c : candidates) {
        if (!c.is_string()) return type_error(fmt::format("str.{}() expects strings, got {}", name, c.type_name()));
        const std::string& x = c.string;
        const bool hit = x.size() <= s.size() &&
                         (name == "startswith" ? s.compare(0, x.size(), x) == 0 : s.compare(s.size() - x.size(), x.size(), x) == 0);
        if (hit) return Value::from_bool(true);
      }
      return Value::from_bool(false);
    }
    if (name == "strip" || name == "lstrip" || name == "rstrip")
      return Value::from_string(strip_chars(s, args.get(0, "chars"), name != "rstrip", name != "lstrip"));
    if (name == "split") {
      const Value maxsplit = args.get(1, "maxsplit", Value::from_int(-1));
      const Value sep = args.get(0, "sep");
      if (sep.is_string() && sep.string.empty()) return type_error("str.split(): empty separator");
      return split(s, sep, is_int(maxsplit) ? as_int(maxsplit) : -1);
    }
    if (name == "replace") {
      MF_ASSIGN_OR_RETURN(std::string from, string_arg(0, "old"));
      MF_ASSIGN_OR_RETURN(std::string to, string_arg(1, "new"));
      const Value count = args.get(2, "count", Value::from_int(-1));
      return Value::from_string(replace_all(s, from, to, is_int(count) ? as_int(count) : -1));
    }
    if (name == "upper" || name == "lower") return Value::from_string(ascii_case(s, name == "upper"));
    if (name == "title") return Value::from_string(title(s));
    if (name == "capitalize") return Value::from_string(capitalize(s));
    if (name == "join") {
      MF_ASSIGN_OR_RETURN(List items, iterate(args.get(0, "iterable"), {}));
      std::string out;
      for (size_t i = 0; i < items.size(); ++i) {
        if (!items[i].is_string()) return type_error(fmt::format("str.join(): item {} is {}, not a string", i, items[i].type_name()));
        if (i) out += s;
        out += items[i].string;
      }
      return Value::from_string(std::move(out));
    }
    if (name == "format") {  // "{}" and "{0}" fields; format specs are not supported
      std::string out;
      size_t auto_index = 0;
      for (size_t i = 0; i < s.size(); ++i) {
        if (s[i] == '{' && i + 1 < s.size() && s[i + 1] == '{') {
          out += '{';
          ++i;
        } else if (s[i] == '}' && i + 1 < s.size() && s[i + 1] == '}') {
          out += '}';
          ++i;
        } else if (s[i] == '{') {
          const size_t close = s.find('}', i);
          if (close == std::string::npos) return type_error("str.format(): unmatched '{'");
          const std::string field = s.substr(i + 1, close - i - 1);
          Value v;
          if (field.empty()) v = args.get(auto_index++, "");
          else if (std::all_of(field.begin(), field.end(), ::isdigit)) v = args.get(std::stoul(field), "");
          else if (field.find_first_of(":!.[") == std::string::npos) v = args.get(SIZE_MAX, field);
          else return Status(ErrorCode::unsupported, fmt::format("str.format(): field '{{{}}}' is not supported", field));
          out += to_str(v);
          i = close;
        } else {
          out += s[i];
        }
      }
      return Value::from_string(std::move(out));
    }
    return Status(ErrorCode::unsupported, fmt::format("method '{}' is not supported", name));
  }

  Result<Value> binary(const std::string& op, const Value& a, const Value& b) {
    if (op == "~") return Value::from_string(to_str(a) + to_str(b));
    if (a.is_undefined() || b.is_undefined())
      return type_error(fmt::format("'{}' is undefined (operand of '{}')",
                                    a.is_undefined() ? a.string : b.string, op));
    if (a.is_number() && b.is_number()) {
      const bool ints = is_int(a) && is_int(b);
      const int64_t x = as_int(a), y = as_int(b);
      const double fx = a.as_double(), fy = b.as_double();
      if (op == "+") return ints ? Value::from_int(x + y) : Value::from_double(fx + fy);
      if (op == "-") return ints ? Value::from_int(x - y) : Value::from_double(fx - fy);
      if (op == "*") return ints ? Value::from_int(x * y) : Value::from_double(fx * fy);
      if (op == "/") {
        if (fy == 0) return type_error("division by zero");
        return Value::from_double(fx / fy);
      }
      if (op == "//" || op == "%") {
        if (fy == 0) return type_error("division by zero");
        if (ints) {
          int64_t q = x / y, r = x % y;
          if (r != 0 && ((r < 0) != (y < 0))) {
            --q;
            r += y;
          }
          return Value::from_int(op == "//" ? q : r);
        }
        const double q = std::floor(fx / fy);
        return Value::from_double(op == "//" ? q : fx - q * fy);
      }
      if (op == "**") {
        if (ints && y >= 0) {
          int64_t r = 1;
          for (int64_t i = 0; i < y; ++i) r *= x;
          return Value::from_int(r);
        }
        return Value::from_double(std::pow(fx, fy));
      }
    }
    if (op == "+" && a.is_string() && b.is_string()) return Value::from_string(a.string + b.string);
    if (op == "+" && a.is_list() && b.is_list()) {
      List out = *a.list;
      out.insert(out.end(), b.list->begin(), b.list->end());
      return Value::from_list(std::move(out));
    }
    if (op == "*" && (a.is_string() || a.is_list()) && is_int(b)) {
      const int64_t n = as_int(b);
      if (a.is_string()) {
        std::string out;
        for (int64_t i = 0; i < n; ++i) out += a.string;
        return Value::from_string(std::move(out));
      }
      List out;
      for (int64_t i = 0; i < n; ++i) out.insert(out.end(), a.list->begin(), a.list->end());
      return Value::from_list(std::move(out));
    }
    return type_error(fmt::format("unsupported operand types for {}: {} and {}", op, a.type_name(), b.type_name()));
  }

  Result<bool> compare(const std::string& op, const Value& a, const Value& b) {
    if (op == "==") return values_equal(a, b);
    if (op == "!=") return !values_equal(a, b);
    if (op == "in" || op == "notin") {
      bool found = false;
      if (b.is_string()) {
        if (!a.is_string()) return type_error(fmt::format("'in <string>' requires a string, not {}", a.type_name()));
        found = b.string.find(a.string) != std::string::npos;
      } else if (b.is_list()) {
        found = std::any_of(b.list->begin(), b.list->end(), [&](const Value& x) { return values_equal(a, x); });
      } else if (b.is_dict()) {
        found = a.is_string() && b.dict->find(a.string) != nullptr;
      } else if (!b.is_undefined()) {
        return type_error(fmt::format("'in' needs a string, list or dict on the right, not {}", b.type_name()));
      }
      return op == "in" ? found : !found;
    }
    int order = 0;
    if (a.is_number() && b.is_number()) {
      order = a.as_double() < b.as_double() ? -1 : a.as_double() > b.as_double() ? 1 : 0;
    } else if (a.is_string() && b.is_string()) {
      order = a.string.compare(b.string);
    } else {
      return type_error(fmt::format("'{}' not supported between {} and {}", op, a.type_name(), b.type_name()));
    }
    if (op == "<") return order < 0;
    if (op == "<=") return order <= 0;
    if (op == ">") return order > 0;
    return order >= 0;
  }

  // Filters -----------------------------------------------------------------------------------------

  Result<Value> attribute_path(const Value& obj, const Value& path) {
    if (!path.is_string()) return get_item(obj, path);
    Value v = obj;
    size_t pos = 0;
    while (true) {
      const size_t dot = path.string.find('.', pos);
      const std::string part = path.string.substr(pos, dot == std::string::npos ? std::string::npos : dot - pos);
      Value key = !part.empty() && std::all_of(part.begin(), part.end(), ::isdigit)
                      ? Value::from_int(std::stoll(part))
                      : Value::from_string(part);
      if (v.is_undefined()) return v;
      MF_ASSIGN_OR_RETURN(v, get_item(v, key));
      if (dot == std::string::npos) return v;
      pos = dot + 1;
    }
  }

  Result<Value> apply_filter(const std::string& name, const Value& input, CallArgs& args) {
    if (name == "safe") return input;
    if (name == "default" || name == "d") {
      const bool boolean = args.get(1, "boolean", Value::from_bool(false)).truthy();
      if (input.is_undefined() || (boolean && !input.truthy())) return args.get(0, "default_value", Value::from_string(""));
      return input;
    }
    if (name == "tojson") {
      const Value indent = args.get(0, "indent", Value::none());
      if (!indent.is_none() && !is_int(indent)) return type_error("tojson: indent must be an integer");
      MF_ASSIGN_OR_RETURN(std::string text, to_json_text(input, indent.is_none() ? -1 : int(as_int(indent)),
                                                         args.get(SIZE_MAX, "sort_keys").truthy()));
      return Value::from_string(std::move(text));
    }
    if (name == "length" || name == "count") {
      if (input.is_string()) return Value::from_int(int64_t(code_points(input.string).size()));
      if (input.is_list()) return Value::from_int(int64_t(input.list->size()));
      if (input.is_dict()) return Value::from_int(int64_t(input.dict->items.size()));
      if (input.is_undefined()) return Value::from_int(0);
      return type_error(fmt::format("length: a {} has no length", input.type_name()));
    }
    if (name == "string") return Value::from_string(to_str(input));
    if (name == "trim") return Value::from_string(strip_chars(to_str(input), args.get(0, "chars"), true, true));
    if (name == "upper" || name == "lower") return Value::from_string(ascii_case(to_str(input), name == "upper"));
    if (name == "capitalize") return Value::from_string(capitalize(to_str(input)));
    if (name == "title") return Value::from_string(title(to_str(input)));
    if (name == "replace") {
      const Value from = args.get(0, "old"), to = args.get(1, "new"), count = args.get(2, "count", Value::none());
      if (!from.is_string() || !to.is_string()) return type_error("replace: old and new must be strings");
      return Value::from_string(replace_all(to_str(input), from.string, to.string, is_int(count) ? as_int(count) : -1));
    }
    if (name == "int") {
      const Value fallback = args.get(0, "default", Value::from_int(0));
      if (is_int(input)) return Value::from_int(as_int(input));
      if (input.kind == K::floating) return Value::from_int(int64_t(input.floating));
      if (input.is_string()) {
        try {
          size_t used = 0;
          const double d = std::stod(input.string, &used);
          if (used == input.string.size()) return Value::from_int(int64_t(d));
        } catch (...) {
        }
      }
      return fallback;
    }
    if (name == "float") {
      if (input.is_number()) return Value::from_double(input.as_double());
      if (input.is_string()) {
        try {
          size_t used = 0;
          const double d = std::stod(input.string, &used);
          if (used == input.string.size()) return Value::from_double(d);
        } catch (...) {
        }
      }
      return args.get(0, "default", Value::from_double(0.0));
    }
    if (name == "abs") {
      if (is_int(input)) return Value::from_int(std::abs(as_int(input)));
      if (input.kind == K::floating) return Value::from_double(std::fabs(input.floating));
      return type_error(fmt::format("abs: a {} is not a number", input.type_name()));
    }
    if (name == "items") {
      if (input.is_undefined()) return Value::from_list({});
      if (!input.is_dict()) return type_error(fmt::format("items: a {} is not a mapping", input.type_name()));
      CallArgs none;
      return call_method(input, "items", none);
    }
    // The rest work on sequences.
    MF_ASSIGN_OR_RETURN(List items, iterate(input, {}));
    if (name == "list") return Value::from_list(std::move(items));
    if (name == "first") return items.empty() ? Value::undefined("first") : items.front();
    if (name == "last") return items.empty() ? Value::undefined("last") : items.back();
    if (name == "reverse") {
      std::reverse(items.begin(), items.end());
      if (input.is_string()) return Value::from_string(join_strings([&] {
        std::vector<std::string> s;
        for (auto& v : items) s.push_back(v.string);
        return s;
      }(), 0, items.size()));
      return Value::from_list(std::move(items));
    }
    if (name == "join") {
      const Value sep = args.get(0, "d", Value::from_string(""));
      const Value attribute = args.get(1, "attribute");
      std::string out;
      for (size_t i = 0; i < items.size(); ++i) {
        if (i) out += to_str(sep);
        Value v = items[i];
        if (!attribute.is_undefined()) {
          MF_ASSIGN_OR_RETURN(v, attribute_path(v, attribute));
        }
        out += to_str(v);
      }
      return Value::from_string(std::move(out));
    }
    if (name == "map") {
      List out;
      const Value attribute = args.get(SIZE_MAX, "attribute");
      if (!attribute.is_undefined()) {
        const Value fallback = args.get(SIZE_MAX, "default");
        for (const Value& item : items) {
          MF_ASSIGN_OR_RETURN(Value v, attribute_path(item, attribute));
          out.push_back(v.is_undefined() && !fallback.is_undefined() ? fallback : v);
        }
        return Value::from_list(std::move(out));
      }
      if (args.positional.empty() || !args.positional[0].is_string())
        return type_error("map: expects attribute=... or a filter name");
      CallArgs rest;
      rest.positional.assign(args.positional.begin() + 1, args.positional.end());
      rest.keyword = args.keyword;
      for (const Value& item : items) {
        MF_ASSIGN_OR_RETURN(Value v, apply_filter(args.positional[0].string, item, rest));
        out.push_back(std::move(v));
      }
      return Value::from_list(std::move(out));
    }
    if (name == "selectattr" || name == "rejectattr" || name == "select" || name == "reject") {
      const bool by_attribute = name == "selectattr" || name == "rejectattr";
      const bool keep_when = name == "selectattr" || name == "select";
      const size_t test_at = by_attribute ? 1 : 0;
      CallArgs test_args;
      if (args.positional.size() > test_at + 1)
        test_args.positional.assign(args.positional.begin() + long(test_at) + 1, args.positional.end());
      List out;
      for (const Value& item : items) {
        Value subject = item;
        if (by_attribute) {
          if (args.positional.empty()) return type_error(fmt::format("{}: missing the attribute name", name));
          MF_ASSIGN_OR_RETURN(subject, attribute_path(item, args.positional[0]));
        }
        bool passed = subject.truthy();
        if (args.positional.size() > test_at) {
          if (!args.positional[test_at].is_string()) return type_error(fmt::format("{}: the test name must be a string", name));
          MF_ASSIGN_OR_RETURN(passed, apply_test(args.positional[test_at].string, subject, test_args));
        }
        if (passed == keep_when) out.push_back(item);
      }
      return Value::from_list(std::move(out));
    }
    if (name == "unique") {
      List out;
      for (const Value& item : items)
        if (std::none_of(out.begin(), out.end(), [&](const Value& x) { return values_equal(x, item); }))
          out.push_back(item);
      return Value::from_list(std::move(out));
    }
    return Status(ErrorCode::unsupported, fmt::format("filter '{}' is not supported by this Jinja subset", name));
  }

  Result<bool> apply_test(const std::string& name, const Value& v, CallArgs& args) {
    if (name == "defined") return !v.is_undefined();
    if (name == "undefined") return v.is_undefined();
    if (name == "none") return v.is_none();
    if (name == "string") return v.is_string();
    if (name == "mapping") return v.is_dict() && !v.is_namespace;
    if (name == "iterable") return v.is_list() || v.is_string() || (v.is_dict() && !v.is_namespace) || v.is_undefined();
    if (name == "sequence") return v.is_list() || v.is_string() || (v.is_dict() && !v.is_namespace);
    if (name == "number") return v.is_number();
    if (name == "integer") return v.kind == K::integer;
    if (name == "float") return v.kind == K::floating;
    if (name == "boolean") return v.kind == K::boolean;
    if (name == "true") return v.kind == K::boolean && v.boolean;
    if (name == "false") return v.kind == K::boolean && !v.boolean;
    if (name == "callable") return v.is_callable();
    if (name == "lower" || name == "upper") return v.is_string() && ascii_case(v.string, name == "upper") == v.string;
    if (name == "odd" || name == "even" || name == "divisibleby") {
      if (!is_int(v)) return type_error(fmt::format("test '{}' needs an integer, got {}", name, v.type_name()));
      if (name == "divisibleby") {
        const Value d = args.get(0, "num");
        if (!is_int(d) || as_int(d) == 0) return type_error("divisibleby: needs a non-zero integer");
        return as_int(v) % as_int(d) == 0;
      }
      return (as_int(v) % 2 != 0) == (name == "odd");
    }
    static const std::pair<const char*, const char*> comparisons[] = {
        {"equalto", "=="}, {"eq", "=="}, {"==", "=="}, {"sameas", "=="}, {"ne", "!="}, {"!=", "!="},
        {"lt", "<"},       {"<", "<"},   {"le", "<="}, {"<=", "<="},     {"gt", ">"},  {">", ">"},
        {"ge", ">="},      {">=", ">="}, {"in", "in"}};
    for (const auto& [test, op] : comparisons)
      if (name == test) return compare(op, v, args.get(0, "other"));
    return Status(ErrorCode::unsupported, fmt::format("test '{}' is not supported by this Jinja subset", name));
  }

  std::vector<std::shared_ptr<Dict>> frames_;  // [0]: globals; then one per for loop / macro call
};

}  // namespace

Result<std::string> render_template(const Body& body, const Value& globals) {
  MF_CHECK(globals.is_dict());
  Evaluator evaluator(globals);
  std::string out;
  MF_TRY(evaluator.render(body, out));
  return out;
}

}  // namespace moeflux::jinja
