// The values a chat template computes with: Jinja's undefined and none, Python-like scalars, shared
// lists and insertion-ordered dicts, callables. Owns conversion from/to JSON and Python's str()/repr()
// and json.dumps() spellings. Does not own evaluation (jinja_eval.cpp).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/status.hpp"

namespace moeflux::jinja {

struct Value;
struct Dict;
struct CallArgs;
using List = std::vector<Value>;
// A builtin (filter-free function, bound method) or a macro; errors carry no location (the caller adds it).
using Function = std::function<Result<Value>(CallArgs& args)>;

struct Value {
  // undefined: a missing variable/key (prints "", false, iterates empty; attribute access on it fails).
  // none: Python None (prints "None").
  enum class Kind { undefined, none, boolean, integer, floating, string, list, dict, function };
  Kind kind = Kind::undefined;
  bool boolean = false;
  int64_t integer = 0;
  double floating = 0.0;
  std::string string;             // the string, or for undefined the name that was missing
  std::shared_ptr<List> list;     // shared: Python reference semantics
  std::shared_ptr<Dict> dict;     // also a namespace() object when is_namespace
  std::shared_ptr<Function> function;
  bool is_namespace = false;

  static Value undefined(std::string name = {});
  static Value none();
  static Value from_bool(bool b);
  static Value from_int(int64_t i);
  static Value from_double(double d);
  static Value from_string(std::string s);
  static Value from_list(List l);
  static Value new_dict();
  static Value from_function(Function f);

  bool is_undefined() const { return kind == Kind::undefined; }
  bool is_none() const { return kind == Kind::none; }
  bool is_string() const { return kind == Kind::string; }
  bool is_list() const { return kind == Kind::list; }
  bool is_dict() const { return kind == Kind::dict; }
  bool is_number() const { return kind == Kind::integer || kind == Kind::floating || kind == Kind::boolean; }
  bool is_callable() const { return kind == Kind::function; }
  double as_double() const;
  // Python truthiness.
  bool truthy() const;
  const char* type_name() const;
};

// Insertion-ordered, as Python dicts are (tojson must keep the caller's key order).
struct Dict {
  std::vector<std::pair<std::string, Value>> items;
  const Value* find(const std::string& key) const;
  void set(const std::string& key, Value v);
};

struct CallArgs {
  std::vector<Value> positional;
  std::vector<std::pair<std::string, Value>> keyword;
  // The argument at position i or named name, or fallback; also marks it as consumed.
  Value get(size_t i, const std::string& name, Value fallback = Value::undefined()) const;
};

// Python ==, with 1 == 1.0 == True and deep list/dict comparison.
bool values_equal(const Value& a, const Value& b);
// Python str(): None, True, 1.5, ['a', 1], {'k': 'v'}; undefined prints "".
std::string to_str(const Value& v);
// Python repr(): strings quoted.
std::string to_repr(const Value& v);
// Python's repr of a float: shortest round trip, "1.0", "1e-05", "1e+16".
std::string python_float(double d);

Value from_json(const nlohmann::ordered_json& j);
// json.dumps(v, ensure_ascii=False, indent=indent, sort_keys=sort_keys) as transformers' tojson calls it;
// indent < 0 means None (separators ", " and ": ").
Result<std::string> to_json_text(const Value& v, int indent, bool sort_keys);

}  // namespace moeflux::jinja
