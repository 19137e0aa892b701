// Jinja values: constructors, Python truthiness/equality/str/repr, JSON in and json.dumps out.
#include "tokenizer/jinja_value.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>

namespace moeflux::jinja {

Value Value::undefined(std::string name) {
  Value v;
  v.string = std::move(name);
  return v;
}
Value Value::none() {
  Value v;
  v.kind = Kind::none;
  return v;
}
Value Value::from_bool(bool b) {
  Value v;
  v.kind = Kind::boolean;
  v.boolean = b;
  return v;
}
Value Value::from_int(int64_t i) {
  Value v;
  v.kind = Kind::integer;
  v.integer = i;
  return v;
}
Value Value::from_double(double d) {
  Value v;
  v.kind = Kind::floating;
  v.floating = d;
  return v;
}
Value Value::from_string(std::string s) {
  Value v;
  v.kind = Kind::string;
  v.string = std::move(s);
  return v;
}
Value Value::from_list(List l) {
  Value v;
  v.kind = Kind::list;
  v.list = std::make_shared<List>(std::move(l));
  return v;
}
Value Value::new_dict() {
  Value v;
  v.kind = Kind::dict;
  v.dict = std::make_shared<Dict>();
  return v;
}
Value Value::from_function(Function f) {
  Value v;
  v.kind = Kind::function;
  v.function = std::make_shared<Function>(std::move(f));
  return v;
}

double Value::as_double() const {
  switch (kind) {
    case Kind::boolean: return boolean ? 1.0 : 0.0;
    case Kind::integer: return double(integer);
    case Kind::floating: return floating;
    default: return 0.0;
  }
}

bool Value::truthy() const {
  switch (kind) {
    case Kind::undefined:
    case Kind::none: return false;
    case Kind::boolean: return boolean;
    case Kind::integer: return integer != 0;
    case Kind::floating: return floating != 0.0;
    case Kind::string: return !string.empty();
    case Kind::list: return !list->empty();
    case Kind::dict: return is_namespace || !dict->items.empty();
    case Kind::function: return true;
  }
  return false;
}

const char* Value::type_name() const {
  switch (kind) {
    case Kind::undefined: return "undefined";
    case Kind::none: return "none";
    case Kind::boolean: return "bool";
    case Kind::integer: return "int";
    case Kind::floating: return "float";
    case Kind::string: return "string";
    case Kind::list: return "list";
    case Kind::dict: return is_namespace ? "namespace" : "dict";
    case Kind::function: return "function";
  }
  return "?";
}

const Value* Dict::find(const std::string& key) const {
  for (const auto& [k, v] : items)
    if (k == key) return &v;
  return nullptr;
}

void Dict::set(const std::string& key, Value v) {
  for (auto& [k, old] : items)
    if (k == key) {
      old = std::move(v);
      return;
    }
  items.emplace_back(key, std::move(v));
}

Value CallArgs::get(size_t i, const std::string& name, Value fallback) const {
  if (i < positional.size()) return positional[i];
  for (const auto& [k, v] : keyword)
    if (k == name) return v;
  return fallback;
}

bool values_equal(const Value& a, const Value& b) {
  using K = Value::Kind;
  if (a.is_number() && b.is_number()) {
    if (a.kind != K::floating && b.kind != K::floating) {
      const int64_t x = a.kind == K::boolean ? a.boolean : a.integer;
      const int64_t y = b.kind == K::boolean ? b.boolean : b.integer;
      return x == y;
    }
    return a.as_double() == b.as_double();
  }
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case K::undefined:
    case K::none: return true;
    case K::string: return a.string == b.string;
    case K::list:
      if (a.list->size() != b.list->size()) return false;
      for (size_t i = 0; i < a.list->size(); ++i)
        if (!values_equal((*a.list)[i], (*b.list)[i])) return false;
      return true;
    case K::dict:
      if (a.dict == b.dict) return true;
      if (a.is_namespace || b.is_namespace) return false;
      if (a.dict->items.size() != b.dict->items.size()) return false;
      for (const auto& [k, v] : a.dict->items) {
        const Value* o = b.dict->find(k);
        if (!o || !values_equal(v, *o)) return false;
      }
      return true;
    case K::function: return a.function == b.function;
    default: return false;
  }
}

std::string python_float(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  // Shortest round-trip digits in scientific form, then Python's repr layout: fixed notation for
  // decimal exponents in [-4, 16), scientific otherwise (float_repr_style 'short').
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), d, std::chars_format::scientific);
  std::string sci(buf, end);
  const size_t e = sci.find('e');
  std::string mantissa = sci.substr(0, e);
  const int exponent = std::stoi(sci.substr(e + 1));
  const bool negative = mantissa[0] == '-';
  if (negative) mantissa.erase(0, 1);
  std::string digits;
  for (char c : mantissa)
    if (c != '.') digits += c;
  std::string out;
  if (exponent >= -4 && exponent < 16) {
    if (exponent < 0) {
      out = "0." + std::string(size_t(-exponent - 1), '0') + digits;
    } else if (size_t(exponent) + 1 >= digits.size()) {
      out = digits + std::string(size_t(exponent) + 1 - digits.size(), '0') + ".0";
    } else {
      out = digits.substr(0, size_t(exponent) + 1) + "." + digits.substr(size_t(exponent) + 1);
    }
  } else {
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char exp_buf[16];
    std::snprintf(exp_buf, sizeof(exp_buf), "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
    out += exp_buf;
  }
  return negative ? "-" + out : out;
}

namespace {

std::string python_string_repr(const std::string& s) {
  const bool has_single = s.find('\'') != std::string::npos;
  const bool has_double = s.find('"') != std::string::npos;
  const char quote = has_single && !has_double ? '"' : '\'';
  std::string out(1, quote);
  for (unsigned char c : s) {
    if (c == quote || c == '\\') {
      out += '\\';
      out += char(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02x", c);
      out += buf;
    } else {
      out += char(c);
    }
  }
  out += quote;
  return out;
}

}  // namespace

std::string to_repr(const Value& v) {
  if (v.is_string()) return python_string_repr(v.string);
  return to_str(v);
}

std::string to_str(const Value& v) {
  using K = Value::Kind;
  switch (v.kind) {
    case K::undefined: return "";
    case K::none: return "None";
    case K::boolean: return v.boolean ? "True" : "False";
    case K::integer: return std::to_string(v.integer);
    case K::floating: return python_float(v.floating);
    case K::string: return v.string;
    case K::list: {
      std::string out = "[";
      for (size_t i = 0; i < v.list->size(); ++i) {
        if (i) out += ", ";
        out += to_repr((*v.list)[i]);
      }
      return out + "]";
    }
    case K::dict: {
      if (v.is_namespace) return "<Namespace>";
      std::string out = "{";
      bool first = true;
      for (const auto& [k, x] : v.dict->items) {
        if (!first) out += ", ";
        first = false;
        out += python_string_repr(k) + ": " + to_repr(x);
      }
      return out + "}";
    }
    case K::function: return "<function>";
  }
  return "";
}

Value from_json(const nlohmann::ordered_json& j) {
  switch (j.type()) {
    case nlohmann::json::value_t::null: return Value::none();
    case nlohmann::json::value_t::boolean: return Value::from_bool(j.get<bool>());
    case nlohmann::json::value_t::number_integer: return Value::from_int(j.get<int64_t>());
    case nlohmann::json::value_t::number_unsigned: return Value::from_int(int64_t(j.get<uint64_t>()));
    case nlohmann::json::value_t::number_float: return Value::from_double(j.get<double>());
    case nlohmann::json::value_t::string: return Value::from_string(j.get<std::string>());
    case nlohmann::json::value_t::array: {
      List l;
      l.reserve(j.size());
      for (const auto& x : j) l.push_back(from_json(x));
      return Value::from_list(std::move(l));
    }
    case nlohmann::json::value_t::object: {
      Value d = Value::new_dict();
      for (const auto& [k, x] : j.items()) d.dict->items.emplace_back(k, from_json(x));
      return d;
    }
    default: return Value::none();
  }
}

namespace {

// json.dumps string escaping with ensure_ascii=False: only '"', '\\' and control characters.
void dump_json_string(const std::string& s, std::string& out) {
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += char(c);
        }
    }
  }
  out += '"';
}

Status dump_json(const Value& v, int indent, bool sort_keys, int depth, std::string& out) {
  using K = Value::Kind;
  auto newline = [&](int d) {
    if (indent < 0) return;
    out += '\n';
    out.append(size_t(indent) * size_t(d), ' ');
  };
  const char* item_sep = indent < 0 ? ", " : ",";
  switch (v.kind) {
    case K::none: out += "null"; return Status::ok();
    case K::boolean: out += v.boolean ? "true" : "false"; return Status::ok();
    case K::integer: out += std::to_string(v.integer); return Status::ok();
    case K::floating:
      if (std::isnan(v.floating)) out += "NaN";
      else if (std::isinf(v.floating)) out += v.floating > 0 ? "Infinity" : "-Infinity";
      else out += python_float(v.floating);
      return Status::ok();
    case K::string: dump_json_string(v.string, out); return Status::ok();
    case K::list:
      if (v.list->empty()) {
        out += "[]";
        return Status::ok();
      }
      out += '[';
      for (size_t i = 0; i < v.list->size(); ++i) {
        if (i) out += item_sep;
        newline(depth + 1);
        MF_TRY(dump_json((*v.list)[i], indent, sort_keys, depth + 1, out));
      }
      newline(depth);
      out += ']';
      return Status::ok();
    case K::dict: {
      if (v.is_namespace) return make_error(ErrorCode::invalid_argument, "tojson: a namespace is not JSON serializable");
      if (v.dict->items.empty()) {
        out += "{}";
        return Status::ok();
      }
      std::vector<const std::pair<std::string, Value>*> items;
      for (const auto& item : v.dict->items) items.push_back(&item);
      if (sort_keys)
        std::stable_sort(items.begin(), items.end(), [](auto* a, auto* b) { return a->first < b->first; });
      out += '{';
      for (size_t i = 0; i < items.size(); ++i) {
        if (i) out += item_sep;
        newline(depth + 1);
        dump_json_string(items[i]->first, out);
        out += ": ";
        MF_TRY(dump_json(items[i]->second, indent, sort_keys, depth + 1, out));
      }
      newline(depth);
      out += '}';
      return Status::ok();
    }
    case K::undefined:
      return make_error(ErrorCode::invalid_argument, "tojson: undefined value '{}' is not JSON serializable", v.string);
    case K::function: return make_error(ErrorCode::invalid_argument, "tojson: a function is not JSON serializable");
  }
  return Status::ok();
}

}  // namespace

Result<std::string> to_json_text(const Value& v, int indent, bool sort_keys) {
  std::string out;
  MF_TRY(dump_json(v, indent, sort_keys, 0, out));
  return out;
}

}  // namespace moeflux::jinja
