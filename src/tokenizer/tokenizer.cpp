// Tokenizer after Hugging Face tokenizers (tokenizer/added_vocabulary.rs, models/bpe/, decoders/,
// processors/template.rs): same JSON, same merge order. Strings are kept in two arenas (vocab text,
// decoded bytes) indexed by id; merges are a hash map from a pair of ids to (rank, merged id), so
// loading allocates per token, never per merge, and encoding never builds strings for merges.
#include "tokenizer/tokenizer.hpp"

#include <algorithm>
#include <array>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <functional>
#include <queue>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "tokenizer/text_pipeline.hpp"
#include "tokenizer/utf8.hpp"

namespace moeflux {

namespace fs = std::filesystem;
using nlohmann::json;
using tokenizer_detail::Normalizer;
using tokenizer_detail::PreTokenizer;

namespace {

// GPT-2's bytes_to_unicode(): printable bytes stand for themselves, the other 68 are moved to
// U+0100.. so every byte is a visible character ("Ġ" is the space, "Ċ" the newline).
std::array<char32_t, 256> byte_to_code_point() {
  std::array<char32_t, 256> table{};
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    table[b] = printable ? static_cast<char32_t>(b) : next++;
  }
  return table;
}

struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool single_word = false;  // only as a whole word: no word character just before or after
  bool lstrip = false;       // swallows the whitespace on its left
  bool rstrip = false;       // swallows the whitespace on its right
  bool normalized = false;
  bool special = false;
};

// Per-token decoder steps; every step tokenizers ships that looks at one token at a time.
enum class DecodeStep { byte_level, byte_fallback, fuse, replace };

bool is_ascii_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }
// single_word boundaries: letters, digits, '_' and any non-ASCII byte count as word characters.
bool is_word_byte(char c) {
  const auto u = static_cast<unsigned char>(c);
  return u >= 0x80 || std::isalnum(u) || c == '_';
}

Result<std::string> read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return make_error(ErrorCode::io, "{}: cannot open", path.string());
  std::string text(static_cast<size_t>(in.tellg()), '\0');
  in.seekg(0);
  if (!in.read(text.data(), static_cast<std::streamsize>(text.size()))) {
    return make_error(ErrorCode::io, "{}: read failed", path.string());
  }
  return text;
}

// model.vocab and model.merges, captured while parsing instead of kept in the JSON tree: the tree
// would allocate a node per entry (half a second for Qwen3's 151k + 151k, measured).
struct RawModel {
  struct Span {
    uint32_t begin, length;
  };
  std::string arena;                                     // every vocab and merge string, back to back
  std::vector<std::pair<Span, int64_t>> vocab;           // token text, id (-1: not an integer)
  std::vector<std::pair<Span, Span>> merges;             // left, right (length ~0u: malformed)
  std::vector<std::string> malformed_merges;             // as written, for the error
  std::string_view text(Span s) const { return std::string_view(arena).substr(s.begin, s.length); }
  Span add(std::string_view text) {
    const Span span{static_cast<uint32_t>(arena.size()), static_cast<uint32_t>(text.size())};
    arena.append(text);
    return span;
  }
};

Result<json> parse_tokenizer_json(const fs::path& path, RawModel& raw) {
  MF_ASSIGN_OR_RETURN(std::string text, read_file(path));
  raw.arena.reserve(text.size() / 2);
  // The parser callback sees each event with the number of open containers (depth); returning
  // false drops the value from the tree. Keys at depth 1 and 2 say where we are.
  std::string key1, key2, key3;
  bool in_vocab = false, in_merges = false;
  std::vector<std::string> pair;  // the strings of a ["a", "b"] merge
  using Event = json::parse_event_t;
  const auto callback = [&](int depth, Event event, json& value) -> bool {
    if (event == Event::key) {
      if (depth == 1) key1 = value.get<std::string>();
      if (depth == 2) key2 = value.get<std::string>();
      if (depth == 3) key3 = value.get<std::string>();
      // A vocab key must not enter the tree either: the tree inserts keys before their values.
      return !(in_vocab && depth == 3);
    }
    if (depth == 2 && key1 == "model") {
      if (event == Event::object_start && key2 == "vocab") in_vocab = true;
      if (event == Event::array_start && key2 == "merges") in_merges = true;
      if (event == Event::object_end || event == Event::array_end || event == Event::value) {
        in_vocab = in_merges = false;
      }
      return true;
    }
    if (in_vocab && depth == 3 && event == Event::value) {
      raw.vocab.emplace_back(raw.add(key3), value.is_number_integer() ? value.get<int64_t>() : -1);
      return false;
    }
    if (in_merges && depth == 3) {
      if (event == Event::value && value.is_string()) {  // "a b"
        const std::string& merge = value.get_ref<const std::string&>();
        const size_t space = merge.find(' ');
        if (space == std::string::npos || merge.find(' ', space + 1) != std::string::npos) {
          raw.malformed_merges.push_back(merge);
          raw.merges.push_back({{0, ~0u}, {0, ~0u}});
        } else {
          const auto left = raw.add(std::string_view(merge).substr(0, space));
          raw.merges.emplace_back(left, raw.add(std::string_view(merge).substr(space + 1)));
        }
        return false;
      }
      if (event == Event::array_start) {
        pair.clear();
        return true;
      }
      if (event == Event::array_end) {
        if (pair.size() == 2) {
          const auto left = raw.add(pair[0]);
          raw.merges.emplace_back(left, raw.add(pair[1]));
        } else {
          raw.malformed_merges.push_back(value.dump());
          raw.merges.push_back({{0, ~0u}, {0, ~0u}});
        }
        return false;
      }
      if (event == Event::value) {  // neither a string nor an array
        raw.malformed_merges.push_back(value.dump());
        raw.merges.push_back({{0, ~0u}, {0, ~0u}});
        return false;
      }
    }
    if (in_merges && depth == 4 && event == Event::value) {
      pair.push_back(value.is_string() ? value.get<std::string>() : value.dump());
      if (!value.is_string()) pair.push_back({});  // makes the pair malformed
      return false;
    }
    return true;
  };
  try {
    return json::parse(text, callback);
  } catch (const json::exception& e) {
    return make_error(ErrorCode::format, "{}: bad JSON: {}", path.string(), e.what());
  }
}

Result<json> parse_json(const fs::path& path) {
  MF_ASSIGN_OR_RETURN(std::string text, read_file(path));
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    return make_error(ErrorCode::format, "{}: bad JSON: {}", path.string(), e.what());
  }
}

}  // namespace

struct Tokenizer::Impl {
  // Vocab text per id (model vocab, then added tokens), in one arena.
  std::string text_arena;
  std::vector<uint32_t> text_begin, text_length;  // [n_id]
  // Model vocab, text -> id: open addressing over ids, the text read back from text_arena. A
  // node-based map spent a third of the load in cache misses (perf, Qwen3).
  struct VocabSlot {
    uint32_t hash_high;  // upper bits of the hash: most mismatches never touch the text
    int32_t id;          // -1: empty
  };
  std::vector<VocabSlot> vocab_slots;  // [power of two >= 2 * vocab entries]
  std::unordered_map<std::string_view, int32_t> added;   // added tokens: content -> id
  std::vector<uint8_t> special;  // [n_id] 1 for special added tokens
  std::vector<uint8_t> present;  // [n_id] 0 for holes in the id range

  // What each id decodes to, as bytes, in one arena.
  std::string bytes_arena;
  std::vector<uint32_t> bytes_begin, bytes_length;  // [n_id]

  // (left id << 32 | right id) -> rank and merged id.
  struct Merge {
    int32_t rank;
    int32_t id;
  };
  std::unordered_map<uint64_t, Merge> merges;

  bool byte_level = false;
  bool byte_fallback = false;
  bool ignore_merges = false;
  bool fuse_unk = false;
  int32_t unk_id = -1;
  std::array<std::string, 256> byte_text;  // byte -> its byte-level character, UTF-8
  std::array<int32_t, 256> byte_id{};      // byte -> id of its byte-level character, -1 if absent
  std::array<int32_t, 256> fallback_id{};  // byte -> id of "<0xNN>", -1 if absent

  std::vector<AddedToken> added_tokens;
  std::array<std::vector<uint32_t>, 256> added_by_first_byte;  // indices into added_tokens

  std::unique_ptr<Normalizer> normalizer;
  std::unique_ptr<PreTokenizer> pre_tokenizer;

  std::vector<int32_t> special_prefix, special_suffix;  // what add_special puts around the ids
  std::optional<int32_t> bos, eos, pad;

  std::string_view text_of(int32_t id) const {
    return std::string_view(text_arena).substr(text_begin[id], text_length[id]);
  }
  void vocab_index(size_t n_entries) {
    size_t capacity = 16;
    while (capacity < 2 * n_entries) capacity *= 2;
    vocab_slots.assign(capacity, {0, -1});
    for (size_t id = 0; id < present.size(); ++id) {
      if (!present[id]) continue;
      const size_t h = std::hash<std::string_view>()(text_of(static_cast<int32_t>(id)));
      size_t i = h & (vocab_slots.size() - 1);
      while (vocab_slots[i].id >= 0) i = (i + 1) & (vocab_slots.size() - 1);
      vocab_slots[i] = {static_cast<uint32_t>(h >> 32), static_cast<int32_t>(id)};
    }
  }
  std::optional<int32_t> vocab_find(std::string_view text) const {
    const size_t h = std::hash<std::string_view>()(text);
    for (size_t i = h & (vocab_slots.size() - 1);; i = (i + 1) & (vocab_slots.size() - 1)) {
      const VocabSlot& slot = vocab_slots[i];
      if (slot.id < 0) return std::nullopt;
      if (slot.hash_high == static_cast<uint32_t>(h >> 32) && text_of(slot.id) == text) return slot.id;
    }
  }
  std::optional<int32_t> lookup(std::string_view text) const {
    if (auto it = added.find(text); it != added.end()) return it->second;
    return vocab_find(text);
  }
  void encode_word(std::string_view word, std::vector<int32_t>& ids) const;
  void encode_segment(std::string_view segment, std::vector<int32_t>& ids) const;
};

namespace {

using Impl = Tokenizer::Impl;

Status parse_model(const json& model, const RawModel& raw, Impl& t) {
  if (!model.is_object()) return make_error(ErrorCode::format, "tokenizer.json: \"model\" missing");
  const std::string type = model.value("type", std::string("BPE"));
  if (type != "BPE") return make_error(ErrorCode::unsupported, "model type {}: not supported (BPE)", type);
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (model.contains(key) && model[key].is_string() && !model[key].get<std::string>().empty()) {
      return make_error(ErrorCode::unsupported, "BPE {} \"{}\": not supported", key, model[key].get<std::string>());
    }
  }
  if (model.contains("dropout") && model["dropout"].is_number() && model["dropout"].get<double>() > 0) {
    return make_error(ErrorCode::unsupported, "BPE dropout: not supported");
  }
  t.byte_fallback = model.value("byte_fallback", false);
  t.ignore_merges = model.value("ignore_merges", false);
  t.fuse_unk = model.value("fuse_unk", false);

  if (!model.contains("vocab") || !model["vocab"].is_object()) {
    return make_error(ErrorCode::format, "BPE model: \"vocab\" missing or not an object");
  }
  int64_t max_id = -1;
  for (const auto& [span, id] : raw.vocab) {
    if (id < 0 || id >= INT32_MAX) {
      return make_error(ErrorCode::format, "vocab token \"{}\": id is not a non-negative 32-bit integer", raw.text(span));
    }
    max_id = std::max(max_id, id);
  }
  size_t n_bytes = 0;
  for (const auto& entry : raw.vocab) n_bytes += entry.first.length;
  t.text_arena.reserve(n_bytes + (1 << 16));  // and room for the added tokens
  t.text_begin.assign(max_id + 1, 0);
  t.text_length.assign(max_id + 1, 0);
  t.present.assign(max_id + 1, 0);
  for (const auto& [span, id] : raw.vocab) {
    t.text_begin[id] = static_cast<uint32_t>(t.text_arena.size());
    t.text_length[id] = span.length;
    t.text_arena.append(raw.text(span));
    t.present[id] = 1;
  }
  t.vocab_index(raw.vocab.size());

  if (model.contains("unk_token") && model["unk_token"].is_string()) {
    const std::string unk = model["unk_token"].get<std::string>();
    const auto id = t.vocab_find(unk);
    if (!id) return make_error(ErrorCode::format, "BPE unk_token \"{}\" is not in the vocab", unk);
    t.unk_id = *id;
  }

  if (!model.contains("merges") || !model["merges"].is_array()) {
    return make_error(ErrorCode::format, "BPE model: \"merges\" missing or not an array");
  }
  t.merges.reserve(raw.merges.size());
  std::string joined;  // reused: the merged token's text
  size_t n_malformed = 0;
  for (size_t rank = 0; rank < raw.merges.size(); ++rank) {
    const auto& [left_span, right_span] = raw.merges[rank];
    if (left_span.length == ~0u) {
      return make_error(ErrorCode::format, "merge {} {}: expected \"a b\" or [\"a\", \"b\"]", rank,
                        raw.malformed_merges[n_malformed]);
    }
    const std::string_view left = raw.text(left_span), right = raw.text(right_span);
    joined.assign(left).append(right);
    int32_t ids[3];
    const std::string_view parts[3] = {left, right, joined};
    for (int k = 0; k < 3; ++k) {
      const auto id = t.vocab_find(parts[k]);
      if (!id) {
        return make_error(ErrorCode::format, "merge {} (\"{}\", \"{}\"): token \"{}\" is not in the vocab", rank, left,
                          right, parts[k]);
      }
      ids[k] = *id;
    }
    const uint64_t key = (uint64_t(uint32_t(ids[0])) << 32) | uint32_t(ids[1]);
    // A repeated pair keeps its last rank, as tokenizers' HashMap collect does.
    t.merges[key] = {static_cast<int32_t>(rank), ids[2]};
  }
  return Status::ok();
}

Status parse_added_tokens(const json& root, Impl& t) {
  auto it = root.find("added_tokens");
  if (it == root.end() || it->is_null()) return Status::ok();
  if (!it->is_array()) return make_error(ErrorCode::format, "tokenizer.json: \"added_tokens\" is not an array");
  for (const json& spec : *it) {
    if (!spec.is_object() || !spec.contains("id") || !spec["id"].is_number_integer() || !spec.contains("content") ||
        !spec["content"].is_string() || spec["id"].get<int64_t>() < 0 || spec["id"].get<int64_t>() >= INT32_MAX) {
      return make_error(ErrorCode::format, "added token {}: needs an integer \"id\" and a string \"content\"",
                        spec.dump());
    }
    AddedToken token;
    token.id = static_cast<int32_t>(spec["id"].get<int64_t>());
    token.content = spec["content"].get<std::string>();
    token.single_word = spec.value("single_word", false);
    token.lstrip = spec.value("lstrip", false);
    token.rstrip = spec.value("rstrip", false);
    token.normalized = spec.value("normalized", false);
    token.special = spec.value("special", false);
    if (token.content.empty()) return make_error(ErrorCode::format, "added token {}: empty content", token.id);
    t.added_tokens.push_back(std::move(token));
  }
  for (uint32_t i = 0; i < t.added_tokens.size(); ++i) {
    const AddedToken& token = t.added_tokens[i];
    if (static_cast<size_t>(token.id) >= t.present.size()) {
      t.text_begin.resize(token.id + 1, 0);
      t.text_length.resize(token.id + 1, 0);
      t.present.resize(token.id + 1, 0);
    }
    // An added token may restate a vocab entry (same text, same id); its text then stays the vocab's.
    if (!t.present[token.id]) {
      t.text_begin[token.id] = static_cast<uint32_t>(t.text_arena.size());
      t.text_length[token.id] = static_cast<uint32_t>(token.content.size());
      t.text_arena.append(token.content);
      t.present[token.id] = 1;
    }
    t.added[std::string_view(t.added_tokens[i].content)] = token.id;
    t.added_by_first_byte[static_cast<unsigned char>(token.content[0])].push_back(i);
  }
  t.special.assign(t.present.size(), 0);
  for (const AddedToken& token : t.added_tokens) t.special[token.id] = token.special ? 1 : 0;
  return Status::ok();
}

// The decoder, applied to each token on its own, gives the bytes of every id once at load.
Status build_decoded_bytes(const json& root, Impl& t) {
  std::vector<DecodeStep> steps;
  std::vector<std::pair<std::string, std::string>> replacements;  // for DecodeStep::replace, in order
  std::function<Status(const json&)> add = [&](const json& spec) -> Status {
    if (spec.is_null()) return Status::ok();
    const std::string type = spec.is_object() ? spec.value("type", std::string()) : std::string();
    if (type == "ByteLevel") {
      steps.push_back(DecodeStep::byte_level);
    } else if (type == "ByteFallback") {
      steps.push_back(DecodeStep::byte_fallback);
    } else if (type == "Fuse") {
      steps.push_back(DecodeStep::fuse);
    } else if (type == "Replace" && spec.contains("pattern") && spec["pattern"].contains("String") &&
               spec.contains("content")) {
      steps.push_back(DecodeStep::replace);
      replacements.emplace_back(spec["pattern"]["String"].get<std::string>(), spec["content"].get<std::string>());
    } else if (type == "Sequence" && spec.contains("decoders") && spec["decoders"].is_array()) {
      for (const json& child : spec["decoders"]) MF_TRY(add(child));
    } else {
      return make_error(ErrorCode::unsupported, "decoder {}: not supported (ByteLevel, ByteFallback, Fuse, Replace "
                        "with a String pattern, Sequence)", type.empty() ? spec.dump() : type);
    }
    return Status::ok();
  };
  if (root.contains("decoder")) MF_TRY(add(root["decoder"]));

  std::array<int16_t, 324> code_point_to_byte{};  // the byte-level alphabet is U+0021..U+0143
  code_point_to_byte.fill(-1);
  const auto table = byte_to_code_point();
  for (int b = 0; b < 256; ++b) code_point_to_byte[table[b]] = static_cast<int16_t>(b);

  const size_t n = t.present.size();
  t.bytes_begin.assign(n, 0);
  t.bytes_length.assign(n, 0);
  t.bytes_arena.reserve(t.text_arena.size());
  std::string token, decoded;
  for (size_t id = 0; id < n; ++id) {
    if (!t.present[id]) continue;
    token.assign(t.text_arena, t.text_begin[id], t.text_length[id]);
    size_t replace_index = 0;
    for (DecodeStep step : steps) {
      switch (step) {
        case DecodeStep::byte_level: {
          // Every character must be in the byte alphabet; otherwise the token stays as it is
          // (decoders/byte_level.rs: added tokens like "<｜end▁of▁sentence｜>").
          decoded.clear();
          bool all_mapped = true;
          for (size_t pos = 0; pos < token.size() && all_mapped;) {
            const utf8::Char c = utf8::next(token, pos);
            char32_t cp = 0;
            if (c.scan == utf8::Scan::valid) {
              const auto* s = reinterpret_cast<const unsigned char*>(token.data() + pos);
              cp = c.length == 1   ? s[0]
                   : c.length == 2 ? ((s[0] & 0x1F) << 6) | (s[1] & 0x3F)
                   : c.length == 3 ? ((s[0] & 0x0F) << 12) | ((s[1] & 0x3F) << 6) | (s[2] & 0x3F)
                                   : ((s[0] & 0x07) << 18) | ((s[1] & 0x3F) << 12) | ((s[2] & 0x3F) << 6) | (s[3] & 0x3F);
            }
            if (c.scan != utf8::Scan::valid || cp >= code_point_to_byte.size() || code_point_to_byte[cp] < 0) {
              all_mapped = false;
            } else {
              decoded.push_back(static_cast<char>(code_point_to_byte[cp]));
            }
            pos += c.length;
          }
          if (all_mapped) token.swap(decoded);
          break;
        }
        case DecodeStep::byte_fallback:
          if (token.size() == 6 && token.starts_with("<0x") && token.ends_with(">") && std::isxdigit(token[3]) &&
              std::isxdigit(token[4])) {
            token.assign(1, static_cast<char>(std::stoi(token.substr(3, 2), nullptr, 16)));
          }
          break;
        case DecodeStep::fuse: break;  // decoding concatenates anyway
        case DecodeStep::replace: {
          const auto& [from, to] = replacements[replace_index++];
          for (size_t hit = 0; !from.empty() && (hit = token.find(from, hit)) != std::string::npos; hit += to.size()) {
            token.replace(hit, from.size(), to);
          }
          break;
        }
      }
    }
    t.bytes_begin[id] = static_cast<uint32_t>(t.bytes_arena.size());
    t.bytes_length[id] = static_cast<uint32_t>(token.size());
    t.bytes_arena.append(token);
  }
  return Status::ok();
}

// TemplateProcessing's "single" template (or BERT/RoBERTa's cls/sep) -> ids around the sequence.
Status parse_post_processor(const json& spec, Impl& t) {
  if (spec.is_null()) return Status::ok();
  const std::string type = spec.is_object() ? spec.value("type", std::string()) : std::string();
  if (type == "ByteLevel") return Status::ok();  // only adjusts offsets
  if (type == "Sequence" && spec.contains("processors") && spec["processors"].is_array()) {
    for (const json& child : spec["processors"]) MF_TRY(parse_post_processor(child, t));
    return Status::ok();
  }
  if (type == "BertProcessing" || type == "RobertaProcessing") {
    for (const char* key : {"cls", "sep"}) {
      if (!spec.contains(key) || !spec[key].is_array() || spec[key].size() != 2 || !spec[key][1].is_number_integer()) {
        return make_error(ErrorCode::format, "post_processor {}: \"{}\" must be [token, id]", type, key);
      }
    }
    t.special_prefix.push_back(spec["cls"][1].get<int32_t>());
    t.special_suffix.push_back(spec["sep"][1].get<int32_t>());
    return Status::ok();
  }
  if (type == "TemplateProcessing") {
    if (!spec.contains("single") || !spec["single"].is_array()) {
      return make_error(ErrorCode::format, "post_processor TemplateProcessing: \"single\" missing");
    }
    bool after_sequence = false;
    for (const json& item : spec["single"]) {
      if (item.contains("Sequence")) {
        after_sequence = true;
      } else if (item.contains("SpecialToken") && item["SpecialToken"].contains("id")) {
        const std::string name = item["SpecialToken"]["id"].get<std::string>();
        const json* ids = nullptr;
        if (spec.contains("special_tokens") && spec["special_tokens"].contains(name)) {
          ids = &spec["special_tokens"][name]["ids"];
        }
        if (ids == nullptr || !ids->is_array()) {
          return make_error(ErrorCode::format, "post_processor TemplateProcessing: special token \"{}\" has no ids", name);
        }
        for (const json& id : *ids) (after_sequence ? t.special_suffix : t.special_prefix).push_back(id.get<int32_t>());
      } else {
        return make_error(ErrorCode::format, "post_processor TemplateProcessing: item {} not understood", item.dump());
      }
    }
    return Status::ok();
  }
  return make_error(ErrorCode::unsupported, "post_processor {}: not supported (TemplateProcessing, ByteLevel, "
                    "BertProcessing, RobertaProcessing, Sequence)", type.empty() ? spec.dump() : type);
}

// bos_token and friends: "text", {"content": "text", ...} or null.
std::optional<int32_t> config_token(const json& config, const char* key, const Impl& t) {
  auto it = config.find(key);
  if (it == config.end()) return std::nullopt;
  std::string text;
  if (it->is_string()) {
    text = it->get<std::string>();
  } else if (it->is_object() && it->contains("content") && (*it)["content"].is_string()) {
    text = (*it)["content"].get<std::string>();
  } else {
    return std::nullopt;
  }
  return t.lookup(text);
}

}  // namespace

void Tokenizer::Impl::encode_word(std::string_view word, std::vector<int32_t>& ids) const {
  if (word.empty()) return;
  if (ignore_merges) {
    std::string text;
    if (byte_level) {
      for (unsigned char b : word) text += byte_text[b];
    } else {
      text.assign(word);
    }
    if (const auto id = vocab_find(text)) {
      ids.push_back(*id);
      return;
    }
  }
  // Symbols form a linked list over the word; a merge absorbs the right symbol into the left.
  struct Symbol {
    int32_t id;
    int32_t prev, next;
    uint32_t length;  // bytes of the word it covers; 0 once merged away
  };
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  const auto push = [&](int32_t id, uint32_t length) {
    if (fuse_unk && id == unk_id && !symbols.empty() && symbols.back().id == unk_id) {
      symbols.back().length += length;
      return;
    }
    const auto index = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, index - 1, -1, length});
    if (index > 0) symbols[index - 1].next = index;
  };
  const auto push_unknown = [&](std::string_view bytes) {
    if (byte_fallback) {
      bool all = true;
      for (unsigned char b : bytes) all = all && fallback_id[b] >= 0;
      if (all) {
        for (unsigned char b : bytes) push(fallback_id[b], 1);
        return;
      }
    }
    if (unk_id >= 0) push(unk_id, static_cast<uint32_t>(bytes.size()));
    // With neither, tokenizers drops the character; so do we.
  };
  if (byte_level) {
    for (size_t i = 0; i < word.size(); ++i) {
      const auto b = static_cast<unsigned char>(word[i]);
      if (byte_id[b] >= 0) {
        push(byte_id[b], 1);
      } else {
        push_unknown(word.substr(i, 1));
      }
    }
  } else {
    for (size_t pos = 0; pos < word.size();) {
      const size_t length = utf8::next(word, pos).length;
      const std::string_view c = word.substr(pos, length);
      if (const auto id = vocab_find(c)) {
        push(*id, static_cast<uint32_t>(length));
      } else {
        push_unknown(c);
      }
      pos += length;
    }
  }

  // Lowest rank first, leftmost among equals (models/bpe/word.rs).
  struct Candidate {
    int32_t rank, pos, id;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> queue;
  const auto find_merge = [&](int32_t left, int32_t right) -> const Merge* {
    auto it = merges.find((uint64_t(uint32_t(left)) << 32) | uint32_t(right));
    return it == merges.end() ? nullptr : &it->second;
  };
  const auto consider = [&](int32_t pos) {
    if (pos < 0 || symbols[pos].next < 0) return;
    if (const Merge* m = find_merge(symbols[pos].id, symbols[symbols[pos].next].id)) queue.push({m->rank, pos, m->id});
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(symbols.size()); ++i) consider(i);
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (left.length == 0 || left.next < 0) continue;
    const Merge* m = find_merge(left.id, symbols[left.next].id);
    if (m == nullptr || m->id != top.id) continue;  // stale: one side changed since it was queued
    Symbol& right = symbols[left.next];
    left.id = top.id;
    left.length += right.length;
    left.next = right.next;
    right.length = 0;
    if (left.next >= 0) symbols[left.next].prev = top.pos;
    consider(left.prev);
    consider(top.pos);
  }
  for (const Symbol& s : symbols) {
    if (s.length > 0) ids.push_back(s.id);
  }
}

void Tokenizer::Impl::encode_segment(std::string_view segment, std::vector<int32_t>& ids) const {
  if (segment.empty()) return;
  std::vector<std::string> pieces(1, std::string(segment));
  if (normalizer) normalizer->apply(pieces[0]);
  if (pre_tokenizer) pre_tokenizer->apply(pieces);
  for (const std::string& piece : pieces) encode_word(piece, ids);
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

Result<std::unique_ptr<Tokenizer>> Tokenizer::load(const std::string& dir_or_file) {
  std::error_code ec;
  const fs::path given(dir_or_file);
  const fs::path file = fs::is_directory(given, ec) ? given / "tokenizer.json" : given;
  if (!fs::exists(file, ec)) return make_error(ErrorCode::io, "{}: no such file", file.string());
  RawModel raw;
  MF_ASSIGN_OR_RETURN(json root, parse_tokenizer_json(file, raw));
  if (!root.is_object()) return make_error(ErrorCode::format, "{}: not a JSON object", file.string());

  auto t = std::make_unique<Impl>();
  const auto in_file = [&](Status s) { return s.with_context(file.string()); };
  static const json null_json;  // stands for an absent section, without copying a present one
  const auto section = [&](const char* key) -> const json& { return root.contains(key) ? root[key] : null_json; };
  if (auto s = parse_model(section("model"), raw, *t); !s) return in_file(s);
  if (auto s = parse_added_tokens(root, *t); !s) return in_file(s);
  if (root.contains("normalizer") && !root["normalizer"].is_null()) {
    auto n = Normalizer::parse(root["normalizer"]);
    if (!n) return in_file(n.status());
    t->normalizer = std::move(n).value();
  }
  if (root.contains("pre_tokenizer") && !root["pre_tokenizer"].is_null()) {
    auto p = PreTokenizer::parse(root["pre_tokenizer"]);
    if (!p) return in_file(p.status());
    t->pre_tokenizer = std::move(p).value();
    t->byte_level = t->pre_tokenizer->is_byte_level();
  }
  const auto table = byte_to_code_point();
  for (int b = 0; b < 256; ++b) {
    utf8::append_code_point(t->byte_text[b], table[b]);
    t->byte_id[b] = t->vocab_find(t->byte_text[b]).value_or(-1);
    t->fallback_id[b] = t->vocab_find(fmt::format("<0x{:02X}>", b)).value_or(-1);
  }
  if (auto s = build_decoded_bytes(root, *t); !s) return in_file(s);
  if (auto s = parse_post_processor(section("post_processor"), *t); !s) {
    return in_file(s);
  }
  for (int32_t id : t->special_prefix) {
    if (id < 0 || static_cast<size_t>(id) >= t->present.size()) {
      return make_error(ErrorCode::format, "{}: post_processor adds id {}, outside the vocab", file.string(), id);
    }
  }

  const fs::path config_file = file.parent_path() / "tokenizer_config.json";
  if (fs::exists(config_file, ec)) {
    MF_ASSIGN_OR_RETURN(json config, parse_json(config_file));
    if (!config.is_object()) return make_error(ErrorCode::format, "{}: not a JSON object", config_file.string());
    t->bos = config_token(config, "bos_token", *t);
    t->eos = config_token(config, "eos_token", *t);
    t->pad = config_token(config, "pad_token", *t);
    // transformers' Llama-style tokenizers rebuild the post-processor from these two flags
    // (LlamaTokenizerFast.update_post_processor): DeepSeek-V3 gets its BOS this way.
    const bool has_bos_flag = config.contains("add_bos_token") && config["add_bos_token"].is_boolean();
    const bool has_eos_flag = config.contains("add_eos_token") && config["add_eos_token"].is_boolean();
    if (has_bos_flag || has_eos_flag) {
      t->special_prefix.clear();
      t->special_suffix.clear();
      if (has_bos_flag && config["add_bos_token"].get<bool>() && t->bos) t->special_prefix.push_back(*t->bos);
      if (has_eos_flag && config["add_eos_token"].get<bool>() && t->eos) t->special_suffix.push_back(*t->eos);
    }
  }
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(t)));
}

Result<std::vector<int32_t>> Tokenizer::encode(std::string_view text, bool add_special) const {
  const Impl& t = *impl_;
  if (!utf8::is_valid(text)) return make_error(ErrorCode::invalid_argument, "text to encode is not valid UTF-8");
  std::vector<int32_t> ids;
  if (add_special) ids = t.special_prefix;

  // Added tokens first, leftmost-longest over the raw text (added_vocabulary.rs). Tokens marked
  // normalized are matched on the raw text too: exact while the normalizer leaves them unchanged,
  // as NFC does for every added token of Qwen3 and DeepSeek-V3.
  size_t segment_begin = 0;
  for (size_t pos = 0; pos < text.size();) {
    const AddedToken* best = nullptr;
    for (uint32_t index : t.added_by_first_byte[static_cast<unsigned char>(text[pos])]) {
      const AddedToken& token = t.added_tokens[index];
      if ((best == nullptr || token.content.size() > best->content.size()) &&
          text.substr(pos).starts_with(token.content)) {
        best = &token;
      }
    }
    if (best != nullptr && best->single_word) {
      const size_t end = pos + best->content.size();
      if ((pos > 0 && is_word_byte(text[pos - 1])) || (end < text.size() && is_word_byte(text[end]))) best = nullptr;
    }
    if (best == nullptr) {
      ++pos;
      continue;
    }
    size_t segment_end = pos, next = pos + best->content.size();
    if (best->lstrip) {
      while (segment_end > segment_begin && is_ascii_space(text[segment_end - 1])) --segment_end;
    }
    if (best->rstrip) {
      while (next < text.size() && is_ascii_space(text[next])) ++next;
    }
    t.encode_segment(text.substr(segment_begin, segment_end - segment_begin), ids);
    ids.push_back(best->id);
    segment_begin = pos = next;
  }
  t.encode_segment(text.substr(segment_begin), ids);

  if (add_special) ids.insert(ids.end(), t.special_suffix.begin(), t.special_suffix.end());
  return ids;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  std::string bytes;
  for (int32_t id : ids) {
    if (skip_special && is_special(id)) continue;
    bytes.append(token_bytes(id));
  }
  std::string text;
  text.reserve(bytes.size());
  utf8::append_lossy(text, bytes);
  return text;
}

std::string Tokenizer::normalize(std::string_view text) const {
  std::string out(text);
  if (impl_->normalizer && utf8::is_valid(out)) impl_->normalizer->apply(out);
  return out;
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->present.size()); }

std::optional<int32_t> Tokenizer::token_id(std::string_view token) const { return impl_->lookup(token); }

std::string_view Tokenizer::token_bytes(int32_t id) const {
  const Impl& t = *impl_;
  if (id < 0 || static_cast<size_t>(id) >= t.present.size() || !t.present[id]) return {};
  return std::string_view(t.bytes_arena).substr(t.bytes_begin[id], t.bytes_length[id]);
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < impl_->special.size() && impl_->special[id];
}

std::optional<int32_t> Tokenizer::bos_id() const { return impl_->bos; }
std::optional<int32_t> Tokenizer::eos_id() const { return impl_->eos; }
std::optional<int32_t> Tokenizer::pad_id() const { return impl_->pad; }

std::string StreamingDecoder::next(int32_t id) {
  if (skip_special_ && tokenizer_.is_special(id)) return {};
  pending_.append(tokenizer_.token_bytes(id));
  // Emit everything up to a trailing, still-possible character; ill-formed bytes become U+FFFD
  // exactly where decode's lossy conversion puts them.
  std::string out;
  size_t pos = 0;
  while (pos < pending_.size()) {
    const utf8::Char c = utf8::next(pending_, pos);
    if (c.scan == utf8::Scan::truncated) break;
    if (c.scan == utf8::Scan::valid) {
      out.append(pending_, pos, c.length);
    } else {
      out.append(utf8::replacement_character);
    }
    pos += c.length;
  }
  pending_.erase(0, pos);
  return out;
}

std::string StreamingDecoder::flush() {
  std::string out;
  utf8::append_lossy(out, pending_);
  pending_.clear();
  return out;
}

}  // namespace moeflux
