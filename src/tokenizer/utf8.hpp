// UTF-8 scanning shared by the tokenizer and its streaming decoder: validation, and the lossy
// conversion Hugging Face `tokenizers` applies to decoded bytes (Rust String::from_utf8_lossy).
// Owns no state; does not normalize (normalizer.hpp does).
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace moeflux::utf8 {

enum class Scan {
  valid,      // a complete, well-formed character of `length` bytes
  invalid,    // `length` bytes that can never start a character: one U+FFFD replaces them
  truncated,  // the text ends after `length` bytes that are a correct prefix of a character
};

struct Char {
  Scan scan;
  size_t length;  // >= 1
};

// Reads the character at text[pos] (pos < text.size()). An ill-formed sequence reports its
// "maximal subpart" (Unicode 15, section 3.9), which is what from_utf8_lossy replaces.
Char next(std::string_view text, size_t pos);

bool is_valid(std::string_view text);

// Appends text to out with each ill-formed subpart (truncated tail included) replaced by U+FFFD.
void append_lossy(std::string& out, std::string_view text);

// Encodes one code point (< 0x110000) as UTF-8.
void append_code_point(std::string& out, char32_t cp);

inline constexpr std::string_view replacement_character = "\xEF\xBF\xBD";

}  // namespace moeflux::utf8
