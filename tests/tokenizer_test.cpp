// Tokenizer tests. Three kinds: a tiny hand-made tokenizer.json (merge order, flags, errors); the
// real Qwen3 and DeepSeek-V3 files fetched by scripts/fetch-tokenizers.sh (round trips, special
// tokens, streaming, vocab facts); and ids from Hugging Face tokenizers in
// tests/fixtures/tokenizer/<model>.json, written by scripts/make_tokenizer_fixtures.py.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "tokenizer/tokenizer.hpp"
#include "tokenizer/utf8.hpp"

namespace moeflux {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::string tokenizer_root() {
  if (const char* env = std::getenv("MOEFLUX_TOKENIZER_DIR")) return env;
#ifdef MOEFLUX_TOKENIZER_DIR
  return MOEFLUX_TOKENIZER_DIR;
#else
  return "tokenizers";
#endif
}

json read_json(const fs::path& path) {
  std::ifstream in(path);
  return json::parse(in);
}

std::vector<std::pair<std::string, std::string>> test_strings() {
  std::vector<std::pair<std::string, std::string>> out;
  // The parsed document must outlive the loop: a range-for over a member of a temporary dangles.
  const json doc = read_json(fs::path(MOEFLUX_FIXTURE_DIR) / "tokenizer" / "strings.json");
  for (const json& s : doc["strings"]) {
    out.emplace_back(s["name"].get<std::string>(), s["text"].get<std::string>());
  }
  return out;
}

// Loads a real tokenizer once per process, printing the load time (a measurement, not asserted).
const Tokenizer* real_tokenizer(const std::string& model) {
  static std::map<std::string, std::unique_ptr<Tokenizer>> loaded;
  if (auto it = loaded.find(model); it != loaded.end()) return it->second.get();
  const fs::path dir = fs::path(tokenizer_root()) / model;
  if (!fs::exists(dir / "tokenizer.json")) return nullptr;
  const auto start = std::chrono::steady_clock::now();
  auto t = Tokenizer::load(dir.string());
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  EXPECT_TRUE(t.is_ok()) << t.status().to_string();
  if (!t.is_ok()) return nullptr;
  std::printf("[ load     ] %s tokenizer: %.1f ms, %d ids\n", model.c_str(), ms, (*t)->vocab_size());
  return (loaded[model] = std::move(t).value()).get();
}

#define REAL_TOKENIZER_OR_SKIP(var, model)                                                              \
  const Tokenizer* var = real_tokenizer(model);                                                         \
  if (var == nullptr) {                                                                                 \
    GTEST_SKIP() << model << " tokenizer files not in " << tokenizer_root()                             \
                 << ": run scripts/fetch-tokenizers.sh " << tokenizer_root()                            \
                 << " (or set MOEFLUX_TOKENIZER_DIR)";                                                  \
  }

std::vector<int32_t> encode_ok(const Tokenizer& t, std::string_view text, bool add_special = false) {
  auto ids = t.encode(text, add_special);
  EXPECT_TRUE(ids.is_ok()) << ids.status().to_string();
  return ids.is_ok() ? ids.value() : std::vector<int32_t>{};
}

// ---- a tiny byte-level BPE, written here so every expectation can be checked by hand ------------

// Vocab: the byte characters a, b, c, Ġ (space), then merges "a b" (rank 0) -> "ab",
// "Ġ a" (rank 1) -> "Ġa", "ab c" (rank 2) -> "abc", "b c" (rank 3) -> "bc".
json tiny_tokenizer_json() {
  json vocab = {{"a", 0}, {"b", 1}, {"c", 2}, {"Ġ", 3}, {"ab", 4}, {"Ġa", 5}, {"abc", 6}, {"bc", 7}};
  return {
      {"version", "1.0"},
      {"added_tokens",
       json::array({{{"id", 8}, {"content", "<s>"}, {"special", true}, {"lstrip", false}, {"rstrip", false},
                     {"single_word", false}, {"normalized", false}},
                    {{"id", 9}, {"content", "<ss>"}, {"special", true}, {"lstrip", false}, {"rstrip", true},
                     {"single_word", false}, {"normalized", false}},
                    {{"id", 10}, {"content", "cc"}, {"special", false}, {"lstrip", false}, {"rstrip", false},
                     {"single_word", true}, {"normalized", true}}})},
      {"normalizer", {{"type", "Sequence"}, {"normalizers", json::array({{{"type", "NFC"}}})}}},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         json::array({{{"type", "Split"}, {"pattern", {{"Regex", R"( ?\p{L}+|\s+)"}}}, {"behavior", "Isolated"},
                       {"invert", false}},
                      {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}})}}},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single", json::array({{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})},
        {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {8}}, {"tokens", {"<s>"}}}}}}}},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array({"a b", "Ġ a", "ab c", "b c"})}}},
  };
}

class TinyTokenizer : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / fmt::format("moeflux_tok_{}", ::testing::UnitTest::GetInstance()->random_seed());
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  // Writes text as tokenizer.json and loads it.
  Result<std::unique_ptr<Tokenizer>> load_text(const std::string& text) {
    std::ofstream(dir_ / "tokenizer.json") << text;
    return Tokenizer::load(dir_.string());
  }
  Result<std::unique_ptr<Tokenizer>> load(const json& spec) { return load_text(spec.dump()); }
  fs::path dir_;
};

TEST_F(TinyTokenizer, MergesByRankNotByPosition) {
  auto t = load(tiny_tokenizer_json());
  ASSERT_TRUE(t.is_ok()) << t.status().to_string();
  // "abc": a+b (rank 0) before b+c (rank 3), then ab+c (rank 2) -> one token.
  EXPECT_EQ(encode_ok(**t, "abc"), (std::vector<int32_t>{6}));
  // "bc" alone: only rank 3 applies.
  EXPECT_EQ(encode_ok(**t, "bc"), (std::vector<int32_t>{7}));
  // " abc" is one pre-token: Ġ+a (rank 1) beats nothing lower than a+b (rank 0): a+b first, so
  // Ġ stays alone and "abc" forms.
  EXPECT_EQ(encode_ok(**t, " abc"), (std::vector<int32_t>{3, 6}));
  EXPECT_EQ(encode_ok(**t, " a"), (std::vector<int32_t>{5}));
  EXPECT_EQ((*t)->decode(std::vector<int32_t>{3, 6}, false), " abc");
}

TEST_F(TinyTokenizer, AddedTokensAndTheirFlags) {
  auto t = load(tiny_tokenizer_json());
  ASSERT_TRUE(t.is_ok()) << t.status().to_string();
  // Longest match: "<ss>" wins over "<s>"; rstrip swallows the spaces after it.
  EXPECT_EQ(encode_ok(**t, "a<ss>   b<s>c"), (std::vector<int32_t>{0, 9, 1, 8, 2}));
  // single_word: "cc" only between non-word characters.
  EXPECT_EQ(encode_ok(**t, "a cc"), (std::vector<int32_t>{0, 3, 10}));
  EXPECT_EQ(encode_ok(**t, "acc"), (std::vector<int32_t>{0, 2, 2}));
  // The template adds <s>; skip_special drops it on decode, and only it.
  EXPECT_EQ(encode_ok(**t, "ab", true), (std::vector<int32_t>{8, 4}));
  EXPECT_EQ((*t)->decode(std::vector<int32_t>{8, 4, 10}, true), "abcc");
  EXPECT_EQ((*t)->decode(std::vector<int32_t>{8, 4, 10}, false), "<s>abcc");
}

TEST_F(TinyTokenizer, RefusesInvalidUtf8Input) {
  auto t = load(tiny_tokenizer_json());
  ASSERT_TRUE(t.is_ok());
  auto ids = (*t)->encode("a\xC3(", false);
  ASSERT_FALSE(ids.is_ok());
  EXPECT_EQ(ids.status().code(), ErrorCode::invalid_argument);
}

TEST_F(TinyTokenizer, MalformedFilesGiveTypedErrorsNamingTheCulprit) {
  struct Case {
    std::string name;
    std::string text;
    ErrorCode code;
    std::string culprit;  // must appear in the message
  };
  std::vector<Case> cases;
  cases.push_back({"bad json", R"({"model": {"type": "BPE", "vocab": {)", ErrorCode::format, "bad JSON"});
  json j = tiny_tokenizer_json();
  j["model"]["type"] = "WordPiece";
  cases.push_back({"unknown model", j.dump(), ErrorCode::unsupported, "WordPiece"});
  j = tiny_tokenizer_json();
  j["pre_tokenizer"]["pretokenizers"][0]["type"] = "Punctuationish";
  cases.push_back({"unknown pre-tokenizer", j.dump(), ErrorCode::unsupported, "Punctuationish"});
  j = tiny_tokenizer_json();
  j["normalizer"]["normalizers"][0]["type"] = "Frobnicate";
  cases.push_back({"unknown normalizer", j.dump(), ErrorCode::unsupported, "Frobnicate"});
  j = tiny_tokenizer_json();
  j["model"]["merges"].push_back("a zz");
  cases.push_back({"merge of an unknown token", j.dump(), ErrorCode::format, "\"zz\" is not in the vocab"});
  j = tiny_tokenizer_json();
  j["model"]["merges"].push_back("c c");  // "cc" is an added token, not a vocab entry
  cases.push_back({"merge result not in vocab", j.dump(), ErrorCode::format, "\"cc\" is not in the vocab"});
  j = tiny_tokenizer_json();
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
  cases.push_back({"bad regex", j.dump(), ErrorCode::format, "(unclosed"});
  j = tiny_tokenizer_json();
  j["decoder"]["type"] = "WordPieceDecoder";
  cases.push_back({"unknown decoder", j.dump(), ErrorCode::unsupported, "WordPieceDecoder"});
  for (const Case& c : cases) {
    auto t = load_text(c.text);
    ASSERT_FALSE(t.is_ok()) << c.name;
    EXPECT_EQ(t.status().code(), c.code) << c.name << ": " << t.status().to_string();
    EXPECT_NE(t.status().message().find(c.culprit), std::string::npos) << c.name << ": " << t.status().to_string();
  }
  auto missing = Tokenizer::load((dir_ / "nowhere").string());
  ASSERT_FALSE(missing.is_ok());
  EXPECT_EQ(missing.status().code(), ErrorCode::io);
}

// ---- the real tokenizers -------------------------------------------------------------------------

class RealTokenizer : public ::testing::TestWithParam<std::string> {};

TEST_P(RealTokenizer, RoundTripsEveryTestString) {
  REAL_TOKENIZER_OR_SKIP(t, GetParam());
  for (const auto& [name, text] : test_strings()) {
    const std::vector<int32_t> ids = encode_ok(*t, text);
    // decode gives back the normalized text (NFC for Qwen3, unchanged for DeepSeek-V3).
    EXPECT_EQ(t->decode(ids, false), t->normalize(text)) << name;
    if (!text.empty()) {
      EXPECT_FALSE(ids.empty()) << name;
    }
  }
}

TEST_P(RealTokenizer, StreamingDecoderYieldsDecodeOfAllInCompleteCharacters) {
  REAL_TOKENIZER_OR_SKIP(t, GetParam());
  auto strings = test_strings();
  strings.emplace_back("emoji_dense", "👨‍👩‍👧‍👦🇯🇵🏳️‍🌈😀🙏🏽 漢字かなカナ한글 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠀋𡈽");
  size_t chunks_inside_characters = 0;  // ids that completed no character: the case streaming exists for
  for (const auto& [name, text] : strings) {
    for (bool skip_special : {false, true}) {
      const std::vector<int32_t> ids = encode_ok(*t, text);
      StreamingDecoder stream(*t, skip_special);
      std::string joined;
      for (int32_t id : ids) {
        const std::string chunk = stream.next(id);
        EXPECT_TRUE(utf8::is_valid(chunk)) << name << ": id " << id << " gave invalid UTF-8";
        if (chunk.empty() && !t->token_bytes(id).empty()) ++chunks_inside_characters;
        joined += chunk;
      }
      const std::string rest = stream.flush();
      EXPECT_TRUE(rest.empty()) << name << ": complete text left bytes behind";
      joined += rest;
      EXPECT_EQ(joined, t->decode(ids, skip_special)) << name;
    }
  }
  EXPECT_GT(chunks_inside_characters, 0u) << "no token split a character: the test shows nothing";
}

TEST_P(RealTokenizer, StreamingDecoderReplacesBrokenBytesLikeDecode) {
  REAL_TOKENIZER_OR_SKIP(t, GetParam());
  // Byte tokens on their own: an emoji's first two bytes, then 'A', then a lone continuation byte,
  // then the start of a character left unfinished at the end.
  const auto byte_token = [&](unsigned char b) {
    // The byte-level alphabet has one token per byte: the id whose bytes are exactly b.
    for (int32_t id = 0; id < t->vocab_size(); ++id) {
      if (t->token_bytes(id) == std::string_view(reinterpret_cast<const char*>(&b), 1)) return id;
    }
    ADD_FAILURE() << "no token for byte " << int(b);
    return 0;
  };
  const std::vector<int32_t> ids = {byte_token(0xF0), byte_token(0x9F), byte_token('A'), byte_token(0x80),
                                    byte_token(0xE4), byte_token(0xB8)};
  StreamingDecoder stream(*t, false);
  std::string joined;
  for (int32_t id : ids) {
    const std::string chunk = stream.next(id);
    EXPECT_TRUE(utf8::is_valid(chunk));
    joined += chunk;
  }
  joined += stream.flush();
  EXPECT_EQ(joined, t->decode(ids, false));
  EXPECT_EQ(joined, "\xEF\xBF\xBD" "A" "\xEF\xBF\xBD" "\xEF\xBF\xBD");
}

TEST_P(RealTokenizer, SpecialTokensInTextMapToTheirOwnIds) {
  REAL_TOKENIZER_OR_SKIP(t, GetParam());
  const bool qwen = GetParam() == "qwen3";
  const std::string open = qwen ? "<|im_start|>" : "<｜begin▁of▁sentence｜>";
  const std::string close = qwen ? "<|im_end|>" : "<｜end▁of▁sentence｜>";
  const auto open_id = t->token_id(open), close_id = t->token_id(close);
  ASSERT_TRUE(open_id && close_id);
  const std::vector<int32_t> ids = encode_ok(*t, open + "user\nhi" + close + "\n" + open);
  ASSERT_GE(ids.size(), 4u);
  EXPECT_EQ(ids.front(), *open_id);
  EXPECT_EQ(ids.back(), *open_id);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), *close_id), 1);
  EXPECT_TRUE(t->is_special(*open_id));
  EXPECT_EQ(t->decode(ids, true), "user\nhi\n");
}

INSTANTIATE_TEST_SUITE_P(Models, RealTokenizer, ::testing::Values("qwen3", "deepseek_v3"));

// Facts read in Qwen3's tokenizer.json (added_tokens, vocab) and tokenizer_config.json.
TEST(QwenTokenizer, VocabFacts) {
  REAL_TOKENIZER_OR_SKIP(t, "qwen3");
  EXPECT_EQ(t->token_id("<|endoftext|>"), 151643);
  EXPECT_EQ(t->token_id("<|im_start|>"), 151644);
  EXPECT_EQ(t->token_id("<|im_end|>"), 151645);
  EXPECT_EQ(t->vocab_size(), 151669);  // 151643 BPE tokens + 26 added (151643..151668)
  EXPECT_EQ(t->eos_id(), 151645);      // eos_token "<|im_end|>"
  EXPECT_EQ(t->pad_id(), 151643);      // pad_token "<|endoftext|>"
  EXPECT_FALSE(t->bos_id().has_value());  // bos_token null
  EXPECT_FALSE(t->is_special(*t->token_id("<think>")));  // an added token, special: false
  // Whole words that are vocab entries come out as one id; digits are split one by one.
  EXPECT_EQ(encode_ok(*t, "hello world"), (std::vector<int32_t>{*t->token_id("hello"), *t->token_id("Ġworld")}));
  std::vector<int32_t> digits;
  for (char c : std::string("1234567")) digits.push_back(*t->token_id(std::string(1, c)));
  EXPECT_EQ(encode_ok(*t, "1234567"), digits);
  // Qwen3's post-processor is ByteLevel: add_special adds nothing.
  EXPECT_EQ(encode_ok(*t, "hello", true), encode_ok(*t, "hello", false));
}

// Facts read in DeepSeek-V3's tokenizer.json and tokenizer_config.json.
TEST(DeepSeekTokenizer, VocabFacts) {
  REAL_TOKENIZER_OR_SKIP(t, "deepseek_v3");
  EXPECT_EQ(t->token_id("<｜begin▁of▁sentence｜>"), 0);
  EXPECT_EQ(t->token_id("<｜end▁of▁sentence｜>"), 1);
  EXPECT_EQ(t->bos_id(), 0);
  EXPECT_EQ(t->eos_id(), 1);
  EXPECT_EQ(t->vocab_size(), 128815);  // 128000 BPE tokens, added tokens up to id 128814
  // add_bos_token: true -> BOS first with add_special, nothing at the end.
  const std::vector<int32_t> plain = encode_ok(*t, "hello"), special = encode_ok(*t, "hello", true);
  ASSERT_EQ(special.size(), plain.size() + 1);
  EXPECT_EQ(special.front(), 0);
  // \p{N}{1,3}: digits go in groups of three.
  EXPECT_EQ(encode_ok(*t, "1234567"),
            (std::vector<int32_t>{*t->token_id("123"), *t->token_id("456"), *t->token_id("7")}));
}

// ---- ids from Hugging Face tokenizers ------------------------------------------------------------

TEST_P(RealTokenizer, MatchesHuggingFaceFixture) {
  const fs::path fixture = fs::path(MOEFLUX_FIXTURE_DIR) / "tokenizer" / (GetParam() + ".json");
  if (!fs::exists(fixture)) {
    GTEST_SKIP() << fixture << " absent: run scripts/make_tokenizer_fixtures.py on a machine with "
                 << "`tokenizers` (see the script's header)";
  }
  REAL_TOKENIZER_OR_SKIP(t, GetParam());
  const json expected = read_json(fixture);
  for (const json& c : expected["cases"]) {
    const std::string name = c["name"], text = c["text"];
    EXPECT_EQ(encode_ok(*t, text, false), c["ids"].get<std::vector<int32_t>>()) << name;
    const auto with_special = c["ids_add_special"].get<std::vector<int32_t>>();
    EXPECT_EQ(encode_ok(*t, text, true), with_special) << name;
    EXPECT_EQ(t->decode(with_special, false), c["decoded"].get<std::string>()) << name;
    EXPECT_EQ(t->decode(with_special, true), c["decoded_skip_special"].get<std::string>()) << name;
  }
}

}  // namespace
}  // namespace moeflux
