// Normalizers and pre-tokenizers after Hugging Face tokenizers (normalizers/, pre_tokenizers/):
// the JSON spellings are theirs, the regex engine is PCRE2 and Unicode tables come from utf8proc.
#include "tokenizer/text_pipeline.hpp"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <cstdlib>

#include <nlohmann/json.hpp>

#include "tokenizer/utf8.hpp"

namespace moeflux::tokenizer_detail {

using nlohmann::json;

namespace {

// GPT-2's pattern, which ByteLevel applies itself when use_regex is true
// (tokenizers/src/pre_tokenizers/byte_level.rs).
constexpr const char* gpt2_pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

pcre2_code* as_code(void* p) { return static_cast<pcre2_code*>(p); }

std::string type_of(const json& spec) {
  if (!spec.is_object() || !spec.contains("type") || !spec["type"].is_string()) return {};
  return spec["type"].get<std::string>();
}

bool flag(const json& spec, const char* key, bool fallback) {
  auto it = spec.find(key);
  return it != spec.end() && it->is_boolean() ? it->get<bool>() : fallback;
}

// A Split/Replace pattern: {"Regex": "..."} or {"String": "..."}.
Result<std::unique_ptr<Regex>> parse_pattern(const json& spec, const std::string& where) {
  auto it = spec.find("pattern");
  if (it == spec.end() || !it->is_object()) return make_error(ErrorCode::format, "{}: missing \"pattern\"", where);
  if (it->contains("Regex") && (*it)["Regex"].is_string()) return Regex::compile((*it)["Regex"].get<std::string>(), false);
  if (it->contains("String") && (*it)["String"].is_string()) return Regex::compile((*it)["String"].get<std::string>(), true);
  return make_error(ErrorCode::format, "{}: pattern {} is neither Regex nor String", where, it->dump());
}

}  // namespace

// ---- Regex ---------------------------------------------------------------------------------------

Result<std::unique_ptr<Regex>> Regex::compile(const std::string& pattern, bool literal) {
  int error = 0;
  PCRE2_SIZE error_offset = 0;
  const uint32_t options = PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK | (literal ? PCRE2_LITERAL : 0);
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), options, &error,
                                   &error_offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error, message, sizeof(message));
    return make_error(ErrorCode::format, "regex /{}/: {} at offset {}", pattern, reinterpret_cast<char*>(message),
                      error_offset);
  }
  // JIT is an optimization only: a library built without it still matches, through the interpreter.
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
  std::unique_ptr<Regex> regex(new Regex());
  regex->code_ = code;
  return regex;
}

Regex::~Regex() { pcre2_code_free(as_code(code_)); }

std::vector<Regex::Match> Regex::find_all(std::string_view text) const {
  std::vector<Match> matches;
  pcre2_match_data* data = pcre2_match_data_create(1, nullptr);
  MF_CHECK(data != nullptr);
  const auto subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t start = 0;
  while (start <= text.size()) {
    const int rc = pcre2_match(as_code(code_), subject, text.size(), start, PCRE2_NO_UTF_CHECK, data, nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    MF_CHECK_MSG(rc > 0, "pcre2_match failed with {}", rc);
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(data);
    const size_t begin = ovector[0], end = ovector[1];
    if (end > begin) matches.push_back({begin, end});
    if (end > start) {
      start = end;
    } else {  // an empty match: step over one character so the scan moves on
      if (start >= text.size()) break;
      start += utf8::next(text, start).length;
    }
  }
  pcre2_match_data_free(data);
  return matches;
}

// ---- Normalizer ----------------------------------------------------------------------------------

Result<std::unique_ptr<Normalizer>> Normalizer::parse(const json& spec) {
  auto n = std::make_unique<Normalizer>();
  const std::string type = type_of(spec);
  if (type == "NFC") {
    n->kind_ = Kind::nfc;
  } else if (type == "NFD") {
    n->kind_ = Kind::nfd;
  } else if (type == "NFKC") {
    n->kind_ = Kind::nfkc;
  } else if (type == "NFKD") {
    n->kind_ = Kind::nfkd;
  } else if (type == "Lowercase") {
    n->kind_ = Kind::lowercase;
  } else if (type == "Prepend" && spec.contains("prepend") && spec["prepend"].is_string()) {
    n->kind_ = Kind::prepend;
    n->argument_ = spec["prepend"].get<std::string>();
  } else if (type == "Replace" && spec.contains("content") && spec["content"].is_string() &&
             spec.contains("pattern") && spec["pattern"].contains("String")) {
    n->kind_ = Kind::replace;
    n->argument_ = spec["pattern"]["String"].get<std::string>();
    n->replacement_ = spec["content"].get<std::string>();
  } else if (type == "Sequence" && spec.contains("normalizers") && spec["normalizers"].is_array()) {
    n->kind_ = Kind::sequence;
    for (const json& child : spec["normalizers"]) {
      MF_ASSIGN_OR_RETURN(auto parsed, parse(child));
      n->children_.push_back(std::move(parsed));
    }
  } else {
    return make_error(ErrorCode::unsupported, "normalizer {}: not supported (NFC, NFD, NFKC, NFKD, Lowercase, "
                      "Prepend, Replace with a String pattern, Sequence)", type.empty() ? spec.dump() : type);
  }
  return n;
}

void Normalizer::apply(std::string& text) const {
  const auto map = [&](int options) {
    utf8proc_uint8_t* out = nullptr;
    const utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(text.data()),
                                            static_cast<utf8proc_ssize_t>(text.size()), &out,
                                            static_cast<utf8proc_option_t>(options));
    // The tokenizer validated the UTF-8, so the only failure left is memory.
    MF_CHECK_MSG(n >= 0, "utf8proc_map: {}", utf8proc_errmsg(n));
    text.assign(reinterpret_cast<const char*>(out), static_cast<size_t>(n));
    std::free(out);
  };
  switch (kind_) {
    case Kind::nfc: map(UTF8PROC_STABLE | UTF8PROC_COMPOSE); break;
    case Kind::nfd: map(UTF8PROC_STABLE | UTF8PROC_DECOMPOSE); break;
    case Kind::nfkc: map(UTF8PROC_STABLE | UTF8PROC_COMPOSE | UTF8PROC_COMPAT); break;
    case Kind::nfkd: map(UTF8PROC_STABLE | UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT); break;
    case Kind::lowercase: {
      std::string lowered;
      lowered.reserve(text.size());
      for (size_t pos = 0; pos < text.size();) {
        utf8proc_int32_t cp = 0;
        const auto n = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(text.data()) + pos,
                                        static_cast<utf8proc_ssize_t>(text.size() - pos), &cp);
        MF_CHECK(n > 0);
        utf8::append_code_point(lowered, static_cast<char32_t>(utf8proc_tolower(cp)));
        pos += static_cast<size_t>(n);
      }
      text = std::move(lowered);
      break;
    }
    case Kind::prepend:
      if (!text.empty()) text.insert(0, argument_);
      break;
    case Kind::replace: {
      if (argument_.empty()) break;
      std::string replaced;
      size_t pos = 0;
      for (size_t hit; (hit = text.find(argument_, pos)) != std::string::npos; pos = hit + argument_.size()) {
        replaced.append(text, pos, hit - pos).append(replacement_);
      }
      replaced.append(text, pos, std::string::npos);
      text = std::move(replaced);
      break;
    }
    case Kind::sequence:
      for (const auto& child : children_) child->apply(text);
      break;
  }
}

// ---- PreTokenizer --------------------------------------------------------------------------------

Result<std::unique_ptr<PreTokenizer>> PreTokenizer::parse(const json& spec) {
  auto p = std::make_unique<PreTokenizer>();
  const std::string type = type_of(spec);
  if (type == "Split") {
    p->kind_ = Kind::split;
    MF_ASSIGN_OR_RETURN(p->regex_, parse_pattern(spec, "pre_tokenizer Split"));
    const std::string behavior = spec.value("behavior", std::string("Isolated"));
    if (behavior == "Isolated") {
      p->behavior_ = Behavior::isolated;
    } else if (behavior == "Removed") {
      p->behavior_ = Behavior::removed;
    } else if (behavior == "MergedWithPrevious") {
      p->behavior_ = Behavior::merged_with_previous;
    } else if (behavior == "MergedWithNext") {
      p->behavior_ = Behavior::merged_with_next;
    } else if (behavior == "Contiguous") {
      p->behavior_ = Behavior::contiguous;
    } else {
      return make_error(ErrorCode::unsupported, "pre_tokenizer Split: behavior {} not supported", behavior);
    }
    p->invert_ = flag(spec, "invert", false);
  } else if (type == "ByteLevel") {
    p->kind_ = Kind::byte_level;
    p->add_prefix_space_ = flag(spec, "add_prefix_space", true);
    if (flag(spec, "use_regex", true)) {
      MF_ASSIGN_OR_RETURN(p->regex_, Regex::compile(gpt2_pattern, false));
    }
  } else if (type == "Sequence" && spec.contains("pretokenizers") && spec["pretokenizers"].is_array()) {
    p->kind_ = Kind::sequence;
    for (const json& child : spec["pretokenizers"]) {
      MF_ASSIGN_OR_RETURN(auto parsed, parse(child));
      p->children_.push_back(std::move(parsed));
    }
  } else {
    return make_error(ErrorCode::unsupported, "pre_tokenizer {}: not supported (Split, ByteLevel, Sequence)",
                      type.empty() ? spec.dump() : type);
  }
  return p;
}

bool PreTokenizer::is_byte_level() const {
  if (kind_ == Kind::byte_level) return true;
  for (const auto& child : children_) {
    if (child->is_byte_level()) return true;
  }
  return false;
}

void PreTokenizer::split_piece(std::string_view piece, std::vector<std::string>& out) const {
  // Segments alternate between text the regex matched and the gaps between matches.
  struct Segment {
    size_t begin, end;
    bool matched;
  };
  std::vector<Segment> segments;
  size_t last = 0;
  for (const Regex::Match& m : regex_->find_all(piece)) {
    if (m.begin > last) segments.push_back({last, m.begin, false});
    segments.push_back({m.begin, m.end, true});
    last = m.end;
  }
  if (last < piece.size()) segments.push_back({last, piece.size(), false});
  // invert: what the regex matched is the content and the gaps are the delimiters.
  const auto is_delimiter = [&](const Segment& s) { return s.matched != invert_; };

  std::string pending;  // merged_with_next: delimiters waiting for the next piece
  for (size_t i = 0; i < segments.size(); ++i) {
    const Segment& s = segments[i];
    std::string_view text = piece.substr(s.begin, s.end - s.begin);
    if (!is_delimiter(s)) {
      out.emplace_back(pending).append(text);
      pending.clear();
      continue;
    }
    switch (behavior_) {
      case Behavior::isolated: out.emplace_back(text); break;
      case Behavior::removed: break;
      case Behavior::merged_with_previous:
        if (i > 0 && !out.empty() && !is_delimiter(segments[i - 1])) {
          out.back().append(text);
        } else {
          out.emplace_back(text);
        }
        break;
      case Behavior::merged_with_next: pending.append(text); break;
      case Behavior::contiguous:
        if (i > 0 && is_delimiter(segments[i - 1]) && !out.empty()) {
          out.back().append(text);
        } else {
          out.emplace_back(text);
        }
        break;
    }
  }
  if (!pending.empty()) out.push_back(std::move(pending));
}

void PreTokenizer::apply(std::vector<std::string>& pieces) const {
  switch (kind_) {
    case Kind::sequence:
      for (const auto& child : children_) child->apply(pieces);
      return;
    case Kind::split: {
      std::vector<std::string> out;
      out.reserve(pieces.size());
      for (const std::string& piece : pieces) split_piece(piece, out);
      pieces = std::move(out);
      return;
    }
    case Kind::byte_level: {
      // Byte-to-char mapping happens in the model; here only the prefix space and GPT-2 split.
      std::vector<std::string> out;
      out.reserve(pieces.size());
      for (std::string& piece : pieces) {
        if (add_prefix_space_ && !piece.starts_with(' ')) piece.insert(0, 1, ' ');
        if (!regex_) {
          out.push_back(std::move(piece));
          continue;
        }
        // Split with Isolated behaviour, as byte_level.rs does: gaps between matches are kept.
        size_t last = 0;
        for (const Regex::Match& m : regex_->find_all(piece)) {
          if (m.begin > last) out.emplace_back(piece.substr(last, m.begin - last));
          out.emplace_back(piece.substr(m.begin, m.end - m.begin));
          last = m.end;
        }
        if (last < piece.size()) out.emplace_back(piece.substr(last));
      }
      pieces = std::move(out);
      return;
    }
  }
}

}  // namespace moeflux::tokenizer_detail
