// Text in, text out through the CLI on the bundled demo model: tokenize/decode, template, run (greedy
// is deterministic and stops at EOS or -n), perplexity, and bad arguments.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "test_checkpoint.hpp"

namespace moeflux {
namespace {

namespace fs = std::filesystem;

const std::string demo = std::string(MOEFLUX_FIXTURE_DIR) + "/../../models/demo";

class CliText : public testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = testing::TempDir() + "moeflux_cli_text_" + std::to_string(::getpid());
    fs::create_directories(dir_);
    const auto r = test::run_cli("convert '" + demo + "' '" + dir_ + "/pack' --quant q8 --force --quiet", dir_);
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  static void TearDownTestSuite() { fs::remove_all(dir_); }
  static std::string pack() { return dir_ + "/pack"; }
  static std::string dir_;
};
std::string CliText::dir_;

TEST_F(CliText, TokenizeAndDecodeRoundTrip) {
  auto r = test::run_cli("tokenize --tokenizer '" + pack() + "/tokenizer' --text 'A fortune: <|im_end|> ok'", dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto ids = nlohmann::json::parse(r.out).get<std::vector<int>>();
  ASSERT_FALSE(ids.empty());
  // The special token written in the text is recognized as its single id (2 in the demo vocab).
  EXPECT_NE(std::find(ids.begin(), ids.end(), 2), ids.end()) << r.out;
  std::string list;
  for (int id : ids) {
    if (!list.empty()) list += ',';
    list += std::to_string(id);
  }
  r = test::run_cli("tokenize --tokenizer '" + pack() + "/tokenizer' --decode " + list, dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "A fortune: <|im_end|> ok\n");
  r = test::run_cli("tokenize --tokenizer '" + pack() + "/tokenizer' --decode 1,99999", dir_);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("outside the vocabulary"), std::string::npos) << r.err;
}

TEST_F(CliText, TemplateRendersTheModelsChatMl) {
  const std::string conv = dir_ + "/conv.json";
  std::ofstream(conv) << R"({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                             "add_generation_prompt": true})";
  const auto r = test::run_cli("template --tokenizer '" + pack() + "/tokenizer' --conversation '" + conv + "'", dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
  std::ofstream(conv) << R"({"no_messages": []})";
  EXPECT_NE(test::run_cli("template --tokenizer '" + pack() + "/tokenizer' --conversation '" + conv + "'", dir_).exit_code, 0);
}

TEST_F(CliText, GreedyRunIsDeterministicAndReportsSpeed) {
  const std::string cmd = "run --model '" + pack() + "' --chat --prompt 'Tell me a fortune about food.' -n 24 --temp 0 --threads 2";
  const auto a = test::run_cli(cmd, dir_), b = test::run_cli(cmd, dir_);
  ASSERT_EQ(a.exit_code, 0) << a.err;
  ASSERT_EQ(b.exit_code, 0) << b.err;
  EXPECT_GT(a.out.size(), 1u);
  EXPECT_EQ(a.out, b.out);
  EXPECT_NE(a.err.find("decode"), std::string::npos) << a.err;
  EXPECT_NE(a.err.find("tok/s"), std::string::npos) << a.err;
  EXPECT_NE(a.err.find("hit rate"), std::string::npos) << a.err;
  // A stop string that the greedy reply contains ends it before that text is printed.
  const std::string first_word = a.out.substr(0, a.out.find_first_of(" \n", 1));
  if (first_word.size() > 1) {
    const auto c = test::run_cli(cmd + " --stop '" + first_word.substr(1) + "'", dir_);
    ASSERT_EQ(c.exit_code, 0) << c.err;
    EXPECT_EQ(c.out.find(first_word.substr(1)), std::string::npos) << c.out;
    EXPECT_NE(c.err.find("stop: stop string"), std::string::npos) << c.err;
  }
}

// Sampling settings the command line leaves unset come from the pack's generation_config.json (the
// model authors' recommendation) and the report names them; a flag overrides the file; a malformed field
// warns and the CLI's defaults apply.
TEST_F(CliText, SamplingDefaultsComeFromTheGenerationConfig) {
  // The demo checkpoint with another generation_config.json (its other files linked), converted: a pack
  // records its files' sizes, so the file is not edited in place.
  const std::string model = dir_ + "/model_generation_config", copy = dir_ + "/pack_generation_config";
  fs::remove_all(model);
  fs::create_directories(model);
  for (const auto& e : fs::directory_iterator(demo))
    if (e.path().filename() != "generation_config.json") fs::create_symlink(fs::absolute(e.path()), model + "/" + e.path().filename().string());
  const std::string config = model + "/generation_config.json";
  const auto pack_with = [&](const std::string& json) {
    std::ofstream(config, std::ios::trunc) << json;
    const auto r = test::run_cli("convert '" + model + "' '" + copy + "' --quant q8 --force --quiet", dir_);
    ASSERT_EQ(r.exit_code, 0) << r.err;
  };
  const std::string cmd = "run --model '" + copy + "' --chat --prompt 'Tell me a fortune about food.' -n 12 --threads 2 --seed 5";
  pack_with(R"({"eos_token_id": 2, "do_sample": false, "temperature": 0.6})");
  const auto greedy = test::run_cli(cmd, dir_), explicit_greedy = test::run_cli(cmd + " --temp 0", dir_);
  ASSERT_EQ(greedy.exit_code, 0) << greedy.err;
  ASSERT_EQ(explicit_greedy.exit_code, 0) << explicit_greedy.err;
  EXPECT_EQ(greedy.out, explicit_greedy.out);  // do_sample false decodes greedily, whatever the temperature
  EXPECT_NE(greedy.err.find("sampling: greedy (temperature from generation_config.json)"), std::string::npos) << greedy.err;
  EXPECT_NE(explicit_greedy.err.find("sampling: greedy\n"), std::string::npos) << explicit_greedy.err;

  pack_with(R"({"eos_token_id": 2, "temperature": 0.6, "top_k": 20, "top_p": 0.95})");
  const auto sampled = test::run_cli(cmd + " --top-k 5", dir_);
  ASSERT_EQ(sampled.exit_code, 0) << sampled.err;
  EXPECT_NE(sampled.err.find("sampling: temperature 0.6, top-k 5, top-p 0.95 (temperature, top-p from generation_config.json)"),
            std::string::npos)
      << sampled.err;

  pack_with(R"({"eos_token_id": 2, "temperature": "hot", "top_k": 2.5})");
  const auto malformed = test::run_cli(cmd, dir_);
  ASSERT_EQ(malformed.exit_code, 0) << malformed.err;
  EXPECT_NE(malformed.err.find("warning: " + copy + "/tokenizer/generation_config.json: temperature is \"hot\" (not a number), top_k is 2.5 (not an integer); sampling uses the CLI's defaults"),
            std::string::npos)
      << malformed.err;
  EXPECT_NE(malformed.err.find("sampling: temperature 0.7, top-k 50, top-p 0.9\n"), std::string::npos) << malformed.err;
  fs::remove_all(copy);
  fs::remove_all(model);
}

TEST_F(CliText, PerplexityOfHeldOutText) {
  const std::string text = dir_ + "/text.txt";
  std::ifstream in(demo + "/held_out.txt");
  std::string held((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::ofstream(text) << held.substr(0, 4000);
  const auto r = test::run_cli("perplexity --model '" + pack() + "' --file '" + text + "' --window 128 --stride 64 --threads 2", dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const double ppl = std::stod(r.out.substr(r.out.find("perplexity ") + 11));
  // The demo model's held-out perplexity is ~52 (models/demo/README.md); a short slice with short
  // windows lands in the same range, far below the vocabulary size a broken model would approach.
  EXPECT_GT(ppl, 10.0);
  EXPECT_LT(ppl, 200.0);
}

TEST_F(CliText, ChatKeepsTheConversationInTheSession) {
  const std::string input = dir_ + "/chat_input.txt";
  std::ofstream(input) << "Tell me a fortune about food.\nAnother one, please.\n/exit\n";
  const auto r = test::run_cli("chat --model '" + pack() + "' --temp 0 -n 16 --threads 2 < '" + input + "'", dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // One report line per turn: "(prefill N new of M conversation tokens · …)".
  std::vector<std::pair<long, long>> turns;
  for (size_t pos = r.err.find("(prefill "); pos != std::string::npos; pos = r.err.find("(prefill ", pos + 1)) {
    long fresh = 0, total = 0;
    ASSERT_EQ(std::sscanf(r.err.c_str() + pos, "(prefill %ld new of %ld", &fresh, &total), 2);
    turns.push_back({fresh, total});
  }
  ASSERT_EQ(turns.size(), 2u) << r.err;
  EXPECT_EQ(turns[0].first, turns[0].second);  // the first turn evaluates everything
  // The second turn evaluates only what the template added after the first reply, not the history.
  EXPECT_LT(turns[1].first, turns[1].second - turns[0].second) << r.err;
  EXPECT_GT(turns[1].first, 0);
}

TEST_F(CliText, BadArgumentsFailWithUsage) {
  auto r = test::run_cli("run --model '" + pack() + "'", dir_);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE((r.out + r.err).find("--prompt"), std::string::npos);
  r = test::run_cli("run --model '" + pack() + "' --prompt hi --top-p 2", dir_);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("top_p"), std::string::npos) << r.err;
  r = test::run_cli("tokenize --tokenizer '" + pack() + "/tokenizer'", dir_);
  EXPECT_NE(r.exit_code, 0);
  r = test::run_cli("perplexity --model '" + pack() + "' --file /nonexistent.txt", dir_);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("/nonexistent.txt"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace moeflux
