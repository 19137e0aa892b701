// `moeflux logits` end to end: the .npy it writes matches the transformers reference, and bad
// arguments or token ids give usage or a message and a non-zero exit.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "npy.hpp"
#include "test_checkpoint.hpp"

namespace moeflux {
namespace {

namespace fs = std::filesystem;

class CliLogits : public testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::TempDir() + "moeflux_cli_logits_" + std::to_string(::getpid());
    fs::create_directories(dir_);
    fixture_ = std::string(MOEFLUX_FIXTURE_DIR) + "/parity/untied_sparse_step";
    const auto r = test::run_cli("convert '" + fixture_ + "' '" + dir_ + "/pack' --quant bf16 --force --quiet", dir_);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    std::ifstream in(fixture_ + "/tokens.json");
    for (int t : nlohmann::json::parse(in)) {
      if (!tokens_.empty()) tokens_ += ',';
      tokens_ += std::to_string(t);
    }
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string dir_, fixture_, tokens_;
};

TEST_F(CliLogits, WritesEveryPositionMatchingTheReference) {
  for (const char* mode : {"", " --one-by-one"}) {
    const auto r = test::run_cli("logits --model '" + dir_ + "/pack' --tokens " + tokens_ + " --out '" + dir_ + "/out.npy' --threads 2" + mode, dir_);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.err.find("experts:"), std::string::npos) << "the expert-store report is printed";
    const auto ours = test::read_npy_f32(dir_ + "/out.npy");
    const auto ref = test::read_npy_f32(fixture_ + "/logits.npy");
    ASSERT_EQ(ours.shape, ref.shape);
    float worst = 0, scale = 0;
    for (size_t i = 0; i < ref.data.size(); ++i) {
      worst = std::max(worst, std::fabs(ours.data[i] - ref.data[i]));
      scale = std::max(scale, std::fabs(ref.data[i]));
    }
    // The parity bound of the model tests, over the whole array.
    EXPECT_LE(worst, 2e-3f * scale) << mode;
  }
}

TEST_F(CliLogits, BadArgumentsPrintUsageAndFail) {
  auto r = test::run_cli("logits", dir_);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE((r.out + r.err).find("--model"), std::string::npos) << r.out << r.err;

  r = test::run_cli("logits --model '" + dir_ + "/pack' --tokens 1,x,3 --out '" + dir_ + "/o.npy'", dir_);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("\"x\" is not a token id"), std::string::npos) << r.err;

  r = test::run_cli("logits --model '" + dir_ + "/pack' --tokens 1,997 --out '" + dir_ + "/o.npy'", dir_);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("token id 997 is outside the vocabulary [0, 997)"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir_ + "/o.npy"));

  r = test::run_cli("logits --model '" + dir_ + "/missing' --tokens 1 --out '" + dir_ + "/o.npy'", dir_);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("missing"), std::string::npos) << r.err;

  r = test::run_cli("no-such-command", dir_);
  EXPECT_NE(r.exit_code, 0);
}

}  // namespace
}  // namespace moeflux
