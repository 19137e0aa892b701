// Sliding-window perplexity against the transformers reference logits of a parity fixture.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>

#include <nlohmann/json.hpp>

#include "format/convert.hpp"
#include "npy.hpp"
#include "runtime/model.hpp"
#include "runtime/perplexity.hpp"

namespace moeflux {
namespace {

class Perplexity : public testing::Test {
 protected:
  void SetUp() override {
    const std::string fixture = std::string(MOEFLUX_FIXTURE_DIR) + "/parity/wide_mha";
    pack_ = testing::TempDir() + "moeflux_ppl_" + std::to_string(::getpid());
    ConvertOptions o;
    o.hf_dir = fixture;
    o.pack_dir = pack_;
    o.overwrite = true;
    o.progress = false;
    ASSERT_TRUE(convert_checkpoint(o).is_ok());
    ModelOptions mo;
    mo.pack_dir = pack_;
    mo.n_threads = 2;
    auto m = Model::open(mo);
    ASSERT_TRUE(m.is_ok()) << m.status().to_string();
    model_ = std::move(m).value();
    std::ifstream in(fixture + "/tokens.json");
    tokens_ = nlohmann::json::parse(in).get<std::vector<int32_t>>();
    reference_ = test::read_npy_f32(fixture + "/logits.npy");
  }

  // Mean NLL of tokens[1..] from the reference's full-context logits, in double.
  double reference_mean_nll() const {
    const int64_t V = reference_.shape[1];
    double sum = 0;
    for (size_t t = 0; t + 1 < tokens_.size(); ++t) {
      const float* z = reference_.data.data() + int64_t(t) * V;
      double m = z[0], s = 0;
      for (int64_t i = 1; i < V; ++i) m = std::max(m, double(z[i]));
      for (int64_t i = 0; i < V; ++i) s += std::exp(double(z[i]) - m);
      sum += std::log(s) + m - double(z[tokens_[t + 1]]);
    }
    return sum / double(tokens_.size() - 1);
  }

  std::string pack_;
  std::unique_ptr<Model> model_;
  std::vector<int32_t> tokens_;
  test::NpyArray reference_;
};

TEST_F(Perplexity, OneWindowMatchesTheReferenceLogits) {
  auto r = compute_perplexity(*model_, tokens_, int64_t(tokens_.size()), int64_t(tokens_.size()));
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ(r->scored_tokens, int64_t(tokens_.size()) - 1);
  EXPECT_EQ(r->windows, 1);
  // Logits agree to ~1e-6 relative (parity test), so the mean NLL agrees far inside 1e-4.
  EXPECT_NEAR(r->mean_nll, reference_mean_nll(), 1e-4 * reference_mean_nll());
  EXPECT_NEAR(r->perplexity, std::exp(r->mean_nll), 1e-9 * r->perplexity);
}

TEST_F(Perplexity, SlidingWindowsScoreEveryTargetOnceWithLessContext) {
  auto full = compute_perplexity(*model_, tokens_, 64, 64);
  auto slid = compute_perplexity(*model_, tokens_, 8, 4);
  auto disjoint = compute_perplexity(*model_, tokens_, 8, 8);
  ASSERT_TRUE(full.is_ok() && slid.is_ok() && disjoint.is_ok());
  EXPECT_EQ(slid->scored_tokens, int64_t(tokens_.size()) - 1);
  EXPECT_EQ(slid->windows, 7);  // windows begin at 0, 4, …, 24; the one at 24 reaches the end
  // Disjoint windows cannot score the first token of each window: 4 windows of 8 → 28 targets.
  EXPECT_EQ(disjoint->scored_tokens, int64_t(tokens_.size()) - 4);
  // Less context changes the numbers (a random model still uses its context).
  EXPECT_NE(slid->mean_nll, full->mean_nll);
}

TEST_F(Perplexity, RefusesBadWindows) {
  EXPECT_EQ(compute_perplexity(*model_, tokens_, 1, 1).status().code(), ErrorCode::invalid_argument);
  EXPECT_EQ(compute_perplexity(*model_, tokens_, 8, 9).status().code(), ErrorCode::invalid_argument);
  EXPECT_EQ(compute_perplexity(*model_, std::vector<int32_t>{5}, 8, 4).status().code(), ErrorCode::invalid_argument);
}

}  // namespace
}  // namespace moeflux
