// A tokenizer built from Hugging Face tokenizer.json (+ tokenizer_config.json): added/special
// tokens, normalizers, pre-tokenizers, a byte-level BPE model, the post-processor's BOS/EOS and the
// decoder, plus a streaming decoder that never emits half a UTF-8 character. Owns the vocab and
// merges; knows nothing of chat templates or sampling.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.hpp"

namespace moeflux {

class Tokenizer {
 public:
  // dir_or_file: a directory holding tokenizer.json (and optionally tokenizer_config.json), or the
  // path of a tokenizer.json whose directory may hold tokenizer_config.json.
  static Result<std::unique_ptr<Tokenizer>> load(const std::string& dir_or_file);
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Fails (invalid_argument) only on text that is not valid UTF-8. add_special: add what the
  // post-processor adds (TemplateProcessing), or BOS/EOS as tokenizer_config.json's
  // add_bos_token/add_eos_token say when they are given (transformers' Llama-style behaviour).
  Result<std::vector<int32_t>> encode(std::string_view text, bool add_special) const;
  // Unknown ids are skipped; bytes that do not form UTF-8 become U+FFFD (like tokenizers' decode).
  std::string decode(std::span<const int32_t> ids, bool skip_special) const;
  // The normalizer alone (NFC for Qwen3): what decode(encode(text)) gives back for plain text.
  std::string normalize(std::string_view text) const;

  // One past the largest id, added tokens included.
  int32_t vocab_size() const;
  // Id of a token as written in the vocab (byte-level alphabet, "Ġhello") or an added token.
  std::optional<int32_t> token_id(std::string_view token) const;
  // The raw bytes id decodes to (not UTF-8 checked); empty for an unknown id.
  std::string_view token_bytes(int32_t id) const;
  bool is_special(int32_t id) const;

  // From tokenizer_config.json (bos_token / eos_token / pad_token); absent when not set.
  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> eos_id() const;
  std::optional<int32_t> pad_id() const;

  struct Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Feeds ids one at a time and returns only complete UTF-8 text. The concatenation of every
// next() and the final flush() equals Tokenizer::decode of all the ids.
class StreamingDecoder {
 public:
  StreamingDecoder(const Tokenizer& tokenizer, bool skip_special)
      : tokenizer_(tokenizer), skip_special_(skip_special) {}
  // The text that became complete with this id (often empty inside a multi-byte character).
  std::string next(int32_t id);
  // What is left: an unfinished character becomes U+FFFD. The decoder is then empty.
  std::string flush();

 private:
  const Tokenizer& tokenizer_;
  bool skip_special_;
  std::string pending_;  // bytes of a character not yet complete (at most 3)
};

}  // namespace moeflux
