// The text stages before the BPE model, built from tokenizer.json: normalizers (utf8proc) and
// pre-tokenizers (PCRE2 splits, ByteLevel). Owns the compiled regexes; does not know the vocab.
// Input is valid UTF-8 (the tokenizer checks it once); pieces stay raw bytes, the byte-to-char
// mapping of ByteLevel is applied by the model when it looks a piece up.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "core/status.hpp"

namespace moeflux::tokenizer_detail {

// A PCRE2 pattern compiled in UTF + UCP mode (JIT when the library has it), so \p{L}, \s and \w
// follow Unicode like the Oniguruma/Rust regexes Hugging Face uses.
class Regex {
 public:
  static Result<std::unique_ptr<Regex>> compile(const std::string& pattern, bool literal);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  struct Match {
    size_t begin, end;  // byte offsets
  };
  // All non-overlapping matches, left to right. Thread-safe: scratch is allocated per call.
  std::vector<Match> find_all(std::string_view text) const;

 private:
  Regex() = default;
  void* code_ = nullptr;  // pcre2_code_8*
};

class Normalizer {
 public:
  static Result<std::unique_ptr<Normalizer>> parse(const nlohmann::json& spec);
  // Rewrites text in place.
  void apply(std::string& text) const;

 private:
  enum class Kind { nfc, nfd, nfkc, nfkd, lowercase, prepend, replace, sequence };
  Kind kind_ = Kind::sequence;
  std::string argument_;      // prepend: the prefix; replace: the literal pattern
  std::string replacement_;   // replace: what replaces it
  std::vector<std::unique_ptr<Normalizer>> children_;  // sequence
};

class PreTokenizer {
 public:
  static Result<std::unique_ptr<PreTokenizer>> parse(const nlohmann::json& spec);
  // Splits each piece further, in order; empty pieces are dropped.
  void apply(std::vector<std::string>& pieces) const;
  // True when a ByteLevel step is present: the model then works on the byte-to-char alphabet.
  bool is_byte_level() const;

 private:
  enum class Kind { split, byte_level, sequence };
  // How a Split keeps the matched delimiters (tokenizers' SplitDelimiterBehavior).
  enum class Behavior { isolated, removed, merged_with_previous, merged_with_next, contiguous };
  void split_piece(std::string_view piece, std::vector<std::string>& out) const;

  Kind kind_ = Kind::sequence;
  std::unique_ptr<Regex> regex_;  // split; byte_level with use_regex (the GPT-2 pattern)
  Behavior behavior_ = Behavior::isolated;
  bool invert_ = false;
  bool add_prefix_space_ = false;  // byte_level
  std::vector<std::unique_ptr<PreTokenizer>> children_;  // sequence
};

}  // namespace moeflux::tokenizer_detail
