// UTF-8 scanning after Unicode 15, table 3-7 (well-formed byte sequences).
#include "tokenizer/utf8.hpp"

namespace moeflux::utf8 {

Char next(std::string_view text, size_t pos) {
  const auto byte = [&](size_t i) { return static_cast<unsigned char>(text[i]); };
  const unsigned char b0 = byte(pos);
  if (b0 < 0x80) return {Scan::valid, 1};
  size_t n = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // range of the first continuation byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    n = 2;
  } else if (b0 == 0xE0) {
    n = 3, lo = 0xA0;
  } else if ((b0 >= 0xE1 && b0 <= 0xEC) || b0 == 0xEE || b0 == 0xEF) {
    n = 3;
  } else if (b0 == 0xED) {
    n = 3, hi = 0x9F;  // excludes the surrogates U+D800..U+DFFF
  } else if (b0 == 0xF0) {
    n = 4, lo = 0x90;
  } else if (b0 >= 0xF1 && b0 <= 0xF3) {
    n = 4;
  } else if (b0 == 0xF4) {
    n = 4, hi = 0x8F;  // nothing above U+10FFFF
  } else {
    return {Scan::invalid, 1};
  }
  for (size_t k = 1; k < n; ++k) {
    if (pos + k >= text.size()) return {Scan::truncated, k};
    const unsigned char b = byte(pos + k);
    const unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
    if (b < l || b > h) return {Scan::invalid, k};
  }
  return {Scan::valid, n};
}

bool is_valid(std::string_view text) {
  for (size_t pos = 0; pos < text.size();) {
    const Char c = next(text, pos);
    if (c.scan != Scan::valid) return false;
    pos += c.length;
  }
  return true;
}

void append_lossy(std::string& out, std::string_view text) {
  for (size_t pos = 0; pos < text.size();) {
    const Char c = next(text, pos);
    if (c.scan == Scan::valid) {
      out.append(text.substr(pos, c.length));
    } else {
      out.append(replacement_character);
    }
    pos += c.length;
  }
}

void append_code_point(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

}  // namespace moeflux::utf8
