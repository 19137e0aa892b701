// Samplers (src/sampling/sampler.hpp): each step against a hand-computed or brute-force reference,
// seeded determinism, the draw's statistics, parameter validation, and StopStrings.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "sampling/draw_weight.hpp"
#include "sampling/generation_config.hpp"
#include "sampling/sampler.hpp"

namespace moeflux {
namespace {

Sampler make_sampler(const SamplerParams& params, int64_t n_vocab) {
  auto sampler = Sampler::create(params, n_vocab);
  EXPECT_TRUE(sampler.is_ok()) << sampler.status().to_string();
  return std::move(sampler).value();
}

std::vector<float> log_of(const std::vector<double>& probs) {
  std::vector<float> logits;
  for (double p : probs) logits.push_back(static_cast<float>(std::log(p)));
  return logits;
}

// Tokens drawn in n draws.
std::set<int32_t> drawn(Sampler& sampler, const std::vector<float>& logits, int n) {
  std::set<int32_t> seen;
  for (int i = 0; i < n; ++i) seen.insert(sampler.sample(logits.data()));
  return seen;
}

// Random logits [n] with a spread like a real next-token row.
std::vector<float> random_logits(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<float> logits(n);
  for (auto& l : logits) l = static_cast<float>(static_cast<double>(rng() >> 11) * 0x1.0p-53 * 12.0 - 6.0);
  return logits;
}

// z = logit / temperature (fp32, as the sampler divides) and the ids in the sampler's order: higher z
// first, ties to the lower id.
std::vector<float> scaled(const std::vector<float>& logits, float temperature) {
  std::vector<float> z(logits);
  for (auto& v : z) v /= temperature;
  return z;
}
std::vector<int32_t> sampler_order(const std::vector<float>& z) {
  std::vector<int32_t> order(z.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return z[a] != z[b] ? z[a] > z[b] : a < b; });
  return order;
}

TEST(Sampler, GreedyPicksArgmaxWithTiesToTheLowestId) {
  SamplerParams params;
  params.temperature = 0;
  Sampler sampler = make_sampler(params, 5);
  const std::vector<float> logits = {1.0f, 3.0f, -2.0f, 3.0f, 2.9f};
  EXPECT_EQ(sampler.sample(logits.data()), 1);
  const std::vector<float> all_equal(5, 0.5f);
  EXPECT_EQ(sampler.sample(all_equal.data()), 0);
}

// argmax_first (greedy's choice, vectorized) against std::max_element: every length around the 16-float
// lanes, the maximum at the start, in the body, in the tail, tied; NaN never chosen; −∞ everywhere.
TEST(ArgmaxFirst, FirstLargestIndexAtEveryLengthAndPosition) {
  std::mt19937_64 rng(7);
  for (int64_t n : {1, 2, 15, 16, 17, 31, 32, 33, 100, 151936}) {
    std::vector<float> v = random_logits(n, rng());
    for (int64_t at : {int64_t(0), n / 2, n - 1}) {
      std::vector<float> w = v;
      w[size_t(at)] = 7.0f;  // above every random logit
      EXPECT_EQ(argmax_first(w.data(), n), at) << "n=" << n;
      if (at + 1 < n) {
        w[size_t(n - 1)] = 7.0f;  // a tie later on: the first still wins
        EXPECT_EQ(argmax_first(w.data(), n), at) << "n=" << n;
      }
    }
    EXPECT_EQ(argmax_first(v.data(), n), std::max_element(v.begin(), v.end()) - v.begin()) << "n=" << n;
  }
  const float nan = std::nanf(""), inf = INFINITY;
  const std::vector<float> with_nan = {nan, 1.0f, nan, 2.0f, 2.0f, nan};
  EXPECT_EQ(argmax_first(with_nan.data(), 6), 3);
  const std::vector<float> all_nan(40, nan);
  EXPECT_EQ(argmax_first(all_nan.data(), 40), 0);
  const std::vector<float> minus_inf(40, -inf);
  EXPECT_EQ(argmax_first(minus_inf.data(), 40), 0);
  std::vector<float> plus_inf(40, 1.0f);
  plus_inf[33] = inf;
  EXPECT_EQ(argmax_first(plus_inf.data(), 40), 33);
  EXPECT_EQ(argmax_first(nullptr, 0), 0);
}

TEST(Sampler, GreedyAppliesPenaltiesBeforeTheArgmax) {
  SamplerParams params;
  params.temperature = 0;
  params.repetition_penalty = 2.0f;
  Sampler sampler = make_sampler(params, 4);
  const std::vector<float> logits = {1.0f, 3.0f, 2.0f, 0.0f};
  EXPECT_EQ(sampler.sample(logits.data()), 1);
  sampler.accept(1);  // 3 / 2 = 1.5 < 2
  EXPECT_EQ(sampler.sample(logits.data()), 2);
}

TEST(Sampler, SmallTemperatureTendsToGreedy) {
  // At T = 1e-3 a logit gap of 0.1 is a probability ratio of e^-100: the argmax every time.
  SamplerParams params;
  params.temperature = 1e-3f;
  params.seed = 7;
  Sampler sampler = make_sampler(params, 4);
  const std::vector<float> logits = {0.3f, 1.0f, 0.9f, -5.0f};
  EXPECT_EQ(drawn(sampler, logits, 2000), std::set<int32_t>{1});
}

TEST(Sampler, TopKOneEqualsGreedy) {
  SamplerParams greedy_params;
  greedy_params.temperature = 0;
  Sampler greedy = make_sampler(greedy_params, 1000);
  SamplerParams params;
  params.top_k = 1;
  params.temperature = 5.0f;  // flat enough that anything but top-k = 1 would wander
  for (uint64_t seed = 1; seed <= 20; ++seed) {
    params.seed = seed;
    Sampler sampler = make_sampler(params, 1000);
    std::vector<float> logits = random_logits(1000, seed);
    if (seed % 2 == 0) logits[900] = logits[17] = 7.0f;  // a tie: the lower id wins in both
    EXPECT_EQ(sampler.sample(logits.data()), greedy.sample(logits.data())) << "seed " << seed;
  }
}

TEST(Sampler, TopKKeepsTheKLargest) {
  SamplerParams params;
  params.top_k = 2;
  params.seed = 3;
  Sampler sampler = make_sampler(params, 4);
  const std::vector<float> logits = log_of({0.1, 0.4, 0.2, 0.3});
  EXPECT_EQ(drawn(sampler, logits, 2000), (std::set<int32_t>{1, 3}));
}

TEST(Sampler, TopPKeepsTheSmallestSetHoldingTheMass) {
  // Probabilities by token: 0.25, 0.10, 0.50, 0.15. By rank: 0.50 (2), 0.75 (+0), 0.90 (+3), 1.0 (+1).
  // Thresholds sit away from the cumulative sums so float rounding cannot move a boundary.
  const std::vector<float> logits = log_of({0.25, 0.10, 0.50, 0.15});
  const std::vector<std::pair<float, std::set<int32_t>>> cases = {
      {0.4f, {2}}, {0.7f, {2, 0}}, {0.8f, {2, 0, 3}}, {0.95f, {2, 0, 3, 1}}};
  for (const auto& [top_p, expected] : cases) {
    SamplerParams params;
    params.top_p = top_p;
    params.seed = 11;
    Sampler sampler = make_sampler(params, 4);
    // 3000 draws: a kept token of probability ≥ 0.1/0.95 is missed with probability < 1e-100.
    EXPECT_EQ(drawn(sampler, logits, 3000), expected) << "top_p " << top_p;
  }
}

// The nucleus and min-p sets by brute force: a full sort in double.
std::set<int32_t> reference_kept(const std::vector<float>& logits, float temperature, float top_p, float min_p) {
  const int64_t n = static_cast<int64_t>(logits.size());
  std::vector<int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    return logits[a] != logits[b] ? logits[a] > logits[b] : a < b;
  });
  const double max_z = logits[order[0]] / temperature;
  std::vector<double> weight(n);
  double total = 0;
  for (int64_t i = 0; i < n; ++i) total += weight[i] = std::exp(logits[order[i]] / temperature - max_z);
  std::set<int32_t> kept;
  double cumulative = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (weight[i] < min_p * weight[0]) break;
    kept.insert(order[i]);
    cumulative += weight[i];
    if (cumulative >= top_p * total) break;
  }
  return kept;
}

TEST(Sampler, TopPAndMinPOverA152kVocabularyMatchAFullSort) {
  // 152k near-uniform logits put the 0.9 nucleus at ~10^5 tokens: the prefix sort has to grow many
  // times. Tokens within float rounding of the nucleus edge could differ; a draw landing exactly there
  // has probability ~1e-5 per draw, so every one of 50 draws must be in the reference set.
  const int64_t n = 152064;
  const std::vector<float> logits = random_logits(n, 5);
  for (const auto& [top_p, min_p] : {std::pair{0.9f, 0.0f}, std::pair{0.3f, 0.0f}, std::pair{1.0f, 0.5f},
                                     std::pair{0.9f, 0.2f}}) {
    SamplerParams params;
    params.temperature = 1.5f;
    params.top_p = top_p;
    params.min_p = min_p;
    params.seed = 13;
    Sampler sampler = make_sampler(params, n);
    const std::set<int32_t> kept = reference_kept(logits, params.temperature, top_p, min_p);
    ASSERT_GT(kept.size(), 100u);
    for (int i = 0; i < 50; ++i) {
      const int32_t token = sampler.sample(logits.data());
      ASSERT_TRUE(kept.count(token)) << "top_p " << top_p << " min_p " << min_p << ": token " << token;
    }
  }
}

// Top-k over a vocabulary past the sampler's selection shortcut, the logits rounded to few values so
// that the k-th is tied with many: the same tokens as a full sort in the documented order (higher
// logit first, ties to the lower id), the documented weights (draw_weight) and target (draw_target),
// draw by draw.
TEST(Sampler, TopKOverA152kVocabularyDrawsAsAFullSort) {
  const int64_t n = 152064;
  std::vector<float> logits = random_logits(n, 21);
  for (auto& l : logits) l = std::round(l * 4.0f) / 4.0f;  // 49 distinct values: ~3100 tokens each
  logits[77] = -0.0f, logits[78] = 0.0f;
  for (int top_k : {1, 40, 5000}) {
    SamplerParams params;
    params.temperature = 0.8f;
    params.top_k = top_k;
    params.seed = 29;
    Sampler sampler = make_sampler(params, n);
    const std::vector<float> z = scaled(logits, params.temperature);
    std::vector<int32_t> order = sampler_order(z);
    order.resize(size_t(top_k));
    std::mt19937_64 rng(params.seed);
    for (int draw = 0; draw < 20; ++draw) {
      DrawMass total = 0;
      for (int32_t id : order) total += draw_weight(z[id] - z[order[0]]);
      const DrawMass target = draw_target(rng() >> 11, total);
      DrawMass cumulative = 0;
      int32_t expected = -1;
      for (int32_t id : order)
        if ((cumulative += draw_weight(z[id] - z[order[0]])) > target) {
          expected = id;
          break;
        }
      ASSERT_EQ(sampler.sample(logits.data()), expected) << "top_k " << top_k << ", draw " << draw;
    }
  }
}

// Sampling from the top-k candidates alone (selected where the logits are, in any order, any superset)
// draws the tokens sampling the whole row does, draw by draw, whatever follows top-k.
TEST(Sampler, CandidatesDrawAsTheWholeRow) {
  for (int64_t n : {int64_t(152064), int64_t(12)}) {
    std::vector<float> logits = random_logits(n, 31);
    for (size_t i = 0; i < logits.size(); i += 3) logits[i] = std::round(logits[i] * 8.0f) / 8.0f;  // ties
    for (const auto& [top_k, top_p, min_p] : {std::tuple{1, 1.0f, 0.0f}, std::tuple{20, 0.95f, 0.0f}, std::tuple{1000, 0.5f, 0.0f},
                                              std::tuple{40, 1.0f, 0.3f}, std::tuple{20, 1.0f, 0.0f}}) {
      SamplerParams params;
      params.temperature = 0.6f, params.top_k = top_k, params.top_p = top_p, params.min_p = min_p, params.seed = 37;
      Sampler whole = make_sampler(params, n), sparse = make_sampler(params, n);
      ASSERT_EQ(sparse.candidate_k(), top_k);
      std::vector<float> z(logits);
      for (auto& v : z) v /= params.temperature;
      std::vector<int32_t> order(static_cast<size_t>(n));
      std::iota(order.begin(), order.end(), 0);
      std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return z[a] != z[b] ? z[a] > z[b] : a < b; });
      for (int extra : {0, 300}) {  // exactly the k best, or a superset
        const int64_t count = std::min<int64_t>(n, top_k + extra);
        std::vector<int32_t> ids(order.begin(), order.begin() + count);
        std::shuffle(ids.begin(), ids.end(), std::mt19937_64(extra + 1));
        std::vector<float> cz;
        for (int32_t id : ids) cz.push_back(z[id]);
        whole.reset(), sparse.reset();
        for (int draw = 0; draw < 30; ++draw)
          ASSERT_EQ(sparse.sample_candidates(ids.data(), cz.data(), count), whole.sample(logits.data()))
              << "n " << n << " top_k " << top_k << " top_p " << top_p << " min_p " << min_p << " extra " << extra << " draw " << draw;
      }
    }
  }
  SamplerParams no_top_k, greedy;
  no_top_k.temperature = 0.7f, greedy.temperature = 0.0f;
  EXPECT_EQ(make_sampler(no_top_k, 100).candidate_k(), 0);  // top-p alone needs the whole row
  EXPECT_EQ(make_sampler(greedy, 100).candidate_k(), 0);    // greedy without a penalty: the argmax serves it
}

// With penalties, the top candidate_k() of the unpenalized row plus the window's tokens (with their raw
// logits) draw what sampling the penalized row draws, draw by draw: penalties that push the best tokens
// down (so tokens past the top k come in) and ones that lift window tokens up, greedy included.
TEST(Sampler, PenalizedCandidatesDrawAsTheWholeRow) {
  const int64_t n = 152064;
  std::vector<float> logits = random_logits(n, 43);
  for (size_t i = 0; i < logits.size(); i += 3) logits[i] = std::round(logits[i] * 8.0f) / 8.0f;  // ties
  std::vector<int32_t> by_logit(static_cast<size_t>(n));
  std::iota(by_logit.begin(), by_logit.end(), 0);
  std::sort(by_logit.begin(), by_logit.end(), [&](int32_t a, int32_t b) { return logits[a] != logits[b] ? logits[a] > logits[b] : a < b; });
  struct Case { const char* what; float temperature; int top_k; float top_p, min_p, repetition, presence, frequency; int last_n; };
  const Case cases[] = {
      {"repetition 1.3", 0.6f, 20, 0.95f, 0.0f, 1.3f, 0.0f, 0.0f, 64},
      {"presence 1.5", 0.7f, 20, 1.0f, 0.0f, 1.0f, 1.5f, 0.0f, 64},
      {"frequency 0.5, min-p, whole history", 0.8f, 40, 1.0f, 0.2f, 1.0f, 0.0f, 0.5f, -1},
      {"repetition 0.5 lifts", 0.6f, 20, 0.9f, 0.0f, 0.5f, 0.0f, 0.0f, 8},
      {"presence -2 lifts", 1.0f, 5, 1.0f, 0.0f, 1.0f, -2.0f, 0.0f, 64},
      {"greedy, presence 3", 0.0f, 0, 1.0f, 0.0f, 1.0f, 3.0f, 0.0f, 64},
      {"greedy, repetition 0.2 lifts", 0.0f, 0, 1.0f, 0.0f, 0.2f, 0.0f, 0.0f, 64},
  };
  for (const Case& c : cases) {
    SamplerParams params;
    params.temperature = c.temperature, params.top_k = c.top_k, params.top_p = c.top_p, params.min_p = c.min_p, params.seed = 41;
    params.repetition_penalty = c.repetition, params.presence_penalty = c.presence, params.frequency_penalty = c.frequency;
    params.penalty_last_n = c.last_n;
    Sampler whole = make_sampler(params, n), sparse = make_sampler(params, n);
    // A history that makes penalties reorder the top: the best tokens where they push down, tokens just
    // under the top where they lift (lifting keeps the order among lifted tokens); some far down the row.
    const bool lifts = c.repetition < 1.0f || c.presence < 0.0f;
    for (int i = 0; i < 12; ++i) whole.accept(by_logit[size_t(i + (lifts ? 30 : 0))]), sparse.accept(by_logit[size_t(i + (lifts ? 30 : 0))]);
    for (int i = 0; i < 3; ++i) whole.accept(by_logit[size_t(5000 + i)]), sparse.accept(by_logit[size_t(5000 + i)]);
    const float t = c.temperature > 0 ? c.temperature : 1.0f;
    std::vector<float> z(logits);
    for (auto& v : z) v /= t;
    bool moved = false;
    for (int draw = 0; draw < 40; ++draw) {
      const int64_t k = sparse.candidate_k();
      ASSERT_EQ(k, std::max(c.top_k, 1) + int64_t(sparse.penalty_ids().size())) << c.what;
      // What a device sends: the k best unpenalized z (the row sorted by logit is sorted by z too), shuffled.
      std::vector<int32_t> ids(by_logit.begin(), by_logit.begin() + k);
      std::shuffle(ids.begin(), ids.end(), std::mt19937_64(draw));
      std::vector<float> cz;
      for (int32_t id : ids) cz.push_back(z[size_t(id)]);
      std::vector<float> raw;
      for (int32_t id : sparse.penalty_ids()) raw.push_back(logits[size_t(id)]);
      const int32_t got = sparse.sample_candidates(ids.data(), cz.data(), k, raw.data()), want = whole.sample(logits.data());
      ASSERT_EQ(got, want) << c.what << ", draw " << draw;
      moved |= got != by_logit[0];
      whole.accept(want), sparse.accept(got);
    }
    EXPECT_TRUE(moved) << c.what << ": the penalties never moved the pick off the best logit, so the case tests nothing";
  }
}

TEST(Sampler, MinPCutsRelativeToTheLargestProbabilityAfterTemperature) {
  // Probabilities 0.5, 0.25, 0.15, 0.10: ratios to the largest 1, 0.5, 0.3, 0.2.
  const std::vector<float> logits = log_of({0.5, 0.25, 0.15, 0.10});
  SamplerParams params;
  params.seed = 17;
  params.min_p = 0.25f;  // keeps ratios ≥ 0.25
  Sampler sampler = make_sampler(params, 4);
  EXPECT_EQ(drawn(sampler, logits, 3000), (std::set<int32_t>{0, 1, 2}));
  params.min_p = 0.6f;
  sampler = make_sampler(params, 4);
  EXPECT_EQ(drawn(sampler, logits, 3000), std::set<int32_t>{0});
  // T = 2 takes square roots of the ratios: 1, 0.71, 0.55, 0.45. min_p 0.5 now keeps three tokens.
  params.min_p = 0.5f;
  params.temperature = 2.0f;
  sampler = make_sampler(params, 4);
  EXPECT_EQ(drawn(sampler, logits, 3000), (std::set<int32_t>{0, 1, 2}));
}

TEST(Sampler, RepetitionPenaltyDividesPositiveMultipliesNegativeOncePerToken) {
  SamplerParams params;
  params.repetition_penalty = 2.0f;
  Sampler sampler = make_sampler(params, 5);
  for (int32_t t : {0, 0, 0, 1, 3}) sampler.accept(t);
  std::vector<float> logits = {3.0f, -1.5f, 4.0f, 0.0f, 1.0f};
  sampler.apply_penalties(logits.data());
  // 3 / 2 (three occurrences, penalized once); -1.5 · 2; 4 untouched; 0 stays 0; 1 untouched.
  EXPECT_EQ(logits, (std::vector<float>{1.5f, -3.0f, 4.0f, 0.0f, 1.0f}));
}

TEST(Sampler, PresenceAndFrequencyPenaltiesSubtractAsOpenAIDefines) {
  SamplerParams params;
  params.presence_penalty = 0.5f;
  params.frequency_penalty = 0.25f;
  Sampler sampler = make_sampler(params, 4);
  for (int32_t t : {0, 0, 0, 2}) sampler.accept(t);
  std::vector<float> logits = {1.0f, 1.0f, 1.0f, 1.0f};
  sampler.apply_penalties(logits.data());
  // token 0: 1 - 0.5 - 3·0.25; token 2: 1 - 0.5 - 0.25.
  EXPECT_EQ(logits, (std::vector<float>{-0.25f, 1.0f, 0.25f, 1.0f}));
}

TEST(Sampler, PenaltiesCombineInOrderOverTheLastNTokens) {
  SamplerParams params;
  params.repetition_penalty = 2.0f;
  params.frequency_penalty = 1.0f;
  params.penalty_last_n = 3;
  Sampler sampler = make_sampler(params, 4);
  for (int32_t t : {1, 1, 0, 0, 2}) sampler.accept(t);  // window: 0, 0, 2
  std::vector<float> logits = {3.0f, 3.0f, -1.0f, 3.0f};
  sampler.apply_penalties(logits.data());
  // token 0: 3 / 2 - 2; token 1 left the window; token 2: -1 · 2 - 1.
  EXPECT_EQ(logits, (std::vector<float>{-0.5f, 3.0f, -3.0f, 3.0f}));

  params.penalty_last_n = 0;  // off
  sampler = make_sampler(params, 4);
  sampler.accept(0);
  logits = {3.0f, 3.0f, -1.0f, 3.0f};
  sampler.apply_penalties(logits.data());
  EXPECT_EQ(logits, (std::vector<float>{3.0f, 3.0f, -1.0f, 3.0f}));

  params.penalty_last_n = -1;  // the whole history
  sampler = make_sampler(params, 4);
  for (int i = 0; i < 100; ++i) sampler.accept(3);
  sampler.accept(1);
  logits = {3.0f, 3.0f, -1.0f, 300.0f};
  sampler.apply_penalties(logits.data());
  EXPECT_EQ(logits, (std::vector<float>{3.0f, 0.5f, -1.0f, 50.0f}));
}

TEST(Sampler, SameSeedRepeatsDifferentSeedDiffers) {
  const std::vector<float> logits = random_logits(1000, 1);
  auto sequence = [&](Sampler& sampler) {
    std::vector<int32_t> tokens;
    for (int i = 0; i < 200; ++i) tokens.push_back(sampler.sample(logits.data()));
    return tokens;
  };
  SamplerParams params;
  params.temperature = 3.0f;
  params.seed = 42;
  Sampler a = make_sampler(params, 1000);
  Sampler b = make_sampler(params, 1000);
  const std::vector<int32_t> first = sequence(a);
  EXPECT_EQ(first, sequence(b));
  a.reset();
  EXPECT_EQ(first, sequence(a));
  EXPECT_EQ(a.seed(), 42u);
  params.seed = 43;
  Sampler c = make_sampler(params, 1000);
  // 200 draws over ~1000 plausible tokens: two streams agreeing everywhere is not a coincidence.
  EXPECT_NE(first, sequence(c));

  params.seed = 0;
  Sampler d = make_sampler(params, 1000);
  Sampler e = make_sampler(params, 1000);
  EXPECT_NE(d.seed(), 0u);
  EXPECT_NE(d.seed(), e.seed());  // two 64-bit draws from std::random_device
  params.seed = d.seed();  // the reported seed replays the run
  Sampler replay = make_sampler(params, 1000);
  EXPECT_EQ(sequence(d), sequence(replay));
}

TEST(Sampler, DrawsMatchAKnownDistribution) {
  // 20k draws; each count is Binomial(N, p) with standard deviation sqrt(N p (1 - p)) (≤ 69 here).
  // 4 standard deviations: a correct sampler fails one cell with probability ~6e-5, while a sampler off
  // by 0.02 in any probability (400 draws) fails.
  constexpr int kDraws = 20000;
  auto check = [&](const SamplerParams& params, const std::vector<float>& logits, const std::vector<double>& p) {
    Sampler sampler = make_sampler(params, static_cast<int64_t>(logits.size()));
    std::vector<int> counts(logits.size(), 0);
    for (int i = 0; i < kDraws; ++i) ++counts[sampler.sample(logits.data())];
    for (size_t t = 0; t < p.size(); ++t) {
      const double sd = std::sqrt(kDraws * p[t] * (1 - p[t]));
      EXPECT_NEAR(counts[t], kDraws * p[t], 4 * sd + 1e-9) << "token " << t;
    }
  };
  const std::vector<float> logits = log_of({0.1, 0.2, 0.3, 0.4});
  SamplerParams params;
  params.seed = 2024;
  check(params, logits, {0.1, 0.2, 0.3, 0.4});
  // T = 2: p ∝ sqrt(p).
  params.temperature = 2.0f;
  const double s = std::sqrt(0.1) + std::sqrt(0.2) + std::sqrt(0.3) + std::sqrt(0.4);
  check(params, logits, {std::sqrt(0.1) / s, std::sqrt(0.2) / s, std::sqrt(0.3) / s, std::sqrt(0.4) / s});
  // top-k 2 renormalizes the two survivors: 0.3 / 0.7, 0.4 / 0.7.
  params.temperature = 1.0f;
  params.top_k = 2;
  check(params, logits, {0.0, 0.0, 3.0 / 7, 4.0 / 7});
}

// The draw's weight is exp(d) · 2^62, floored: within 1e-15 of it relative (the Taylor polynomial's
// ~2e-16 and a few roundings; libm's exp is the reference), exactly 2^62 at 0, 0 where e^d · 2^62 < 1,
// for NaN and −inf, and never larger at a smaller d.
TEST(DrawWeight, IsExpTimesTwoToThe62Floored) {
  const double one = std::ldexp(1.0, draw_weight_bits);
  EXPECT_EQ(draw_weight(0.0f), uint64_t(1) << draw_weight_bits);
  EXPECT_EQ(draw_weight(-0.0f), uint64_t(1) << draw_weight_bits);
  EXPECT_EQ(draw_weight(std::numeric_limits<float>::quiet_NaN()), 0u);
  EXPECT_EQ(draw_weight(-std::numeric_limits<float>::infinity()), 0u);
  EXPECT_EQ(draw_weight(-43.5f), 0u);
  EXPECT_EQ(draw_weight(-1000.0f), 0u);
  std::mt19937_64 rng(5);
  uint64_t last = uint64_t(1) << draw_weight_bits;
  for (int i = 0; i <= 200000; ++i) {
    const float d = -43.0f * float(i) / 200000.0f;  // 0 down to −43, decreasing
    const uint64_t w = draw_weight(d);
    const double want = std::exp(double(d)) * one;
    ASSERT_LE(std::fabs(double(w) - want), want * 1e-15 + 1.0) << "d " << d;
    ASSERT_LE(w, last) << "d " << d << ": larger than at a larger d";
    last = w;
  }
  for (int i = 0; i < 100000; ++i) {  // random points, the reduction's every interval
    const float d = -static_cast<float>(static_cast<double>(rng() >> 11) * 0x1.0p-53 * 42.9);
    const double want = std::exp(double(d)) * one;
    ASSERT_LE(std::fabs(double(draw_weight(d)) - want), want * 1e-15 + 1.0) << "d " << d;
  }
}

// The draw's target is floor(bits · 2^-53 · mass), exactly: against the product taken whole where it fits
// 128 bits, at the ends of the bits' range and at the largest masses.
TEST(DrawWeight, TargetIsTheFlooredProduct) {
  std::mt19937_64 rng(9);
  for (int i = 0; i < 10000; ++i) {
    const uint64_t bits = rng() >> 11;
    const DrawMass mass = (DrawMass(rng() >> 34) << 44) | (rng() >> 20);  // < 2^74: bits · mass < 2^127
    EXPECT_TRUE(draw_target(bits, mass) == (DrawMass(bits) * mass) >> 53) << i;
  }
  const DrawMass big = (DrawMass(1) << 93) - 1;
  EXPECT_TRUE(draw_target(0, big) == 0);
  EXPECT_TRUE(draw_target(uint64_t(1) << 52, big) == big >> 1);           // u = 1/2
  EXPECT_TRUE(draw_target((uint64_t(1) << 53) - 1, big) < big);           // u < 1: the target is below the mass
  EXPECT_TRUE(draw_target((uint64_t(1) << 53) - 1, big) >= big - (big >> 52));
}

// top_p_mass, the integer steps a GPU runs alike, is the compiler's static_cast<DrawMass>(double(top_p) ·
// double(total)): totals from below 2^53 (exact) to 2^93 (a row's largest), the halfway cases of the
// rounding to a double (ties to even, the lowest dropped bit alone deciding), top_p at its ends.
TEST(DrawWeight, TopPMassIsTheDoubleProduct) {
  auto reference = [](float top_p, DrawMass total) { return static_cast<DrawMass>(static_cast<double>(top_p) * static_cast<double>(total)); };
  std::mt19937_64 rng(13);
  std::vector<DrawMass> totals;
  for (int bits = 40; bits <= 93; ++bits)
    for (int i = 0; i < 300; ++i) {
      const DrawMass r = (DrawMass(rng()) << 64) | rng();
      totals.push_back(r >> (128 - bits));
    }
  for (int shift = 0; shift <= 40; shift += 5)
    for (const uint64_t top : {(uint64_t(1) << 63) | (uint64_t(1) << 10), (uint64_t(1) << 63) | (uint64_t(3) << 10), ~uint64_t(0)}) {
      totals.push_back(DrawMass(top) << shift);                                   // ties: the even side
      if (shift > 0) totals.push_back((DrawMass(top) << shift) | 1);              // just past a tie
      if (shift > 0) totals.push_back((DrawMass(top) << shift) - 1);              // just below
    }
  totals.push_back(DrawMass(1) << draw_weight_bits);
  for (const float top_p : {0.9f, 0.5f, 0.95f, 0.999999f, 1.0f, 1e-30f, 0.123456f})
    for (const DrawMass total : totals)
      ASSERT_TRUE(top_p_mass(top_p, total) == reference(top_p, total))
          << "top_p " << top_p << ", total " << double(total) << ": " << double(top_p_mass(top_p, total)) << " against " << double(reference(top_p, total));
}

// What a device is handed to draw (Sampler::device_draw): the settings as sample() applies them — a top-k at
// or past the vocabulary off, min-p as its log, −inf when off — and the penalty window as its distinct tokens
// with how often each occurs, for every setting but plain greedy (argmax needs none of it).
TEST(Sampler, DeviceDrawCarriesTheSettingsAndTheWindow) {
  const int64_t n = 1000;
  SamplerParams params;
  params.temperature = 0.7f, params.top_k = 40, params.top_p = 0.9f, params.min_p = 0.05f;
  params.repetition_penalty = 1.2f, params.presence_penalty = 0.5f, params.frequency_penalty = 0.1f, params.penalty_last_n = 6;
  Sampler sampler = make_sampler(params, n);
  for (int32_t t : {9, 3, 9, 500, 3, 9, 7, 3}) sampler.accept(t);  // the window: the last 6, {9, 500, 3, 9, 7, 3}
  Sampler::DeviceDraw draw;
  ASSERT_TRUE(sampler.device_draw(&draw));
  EXPECT_EQ(draw.temperature, 0.7f);
  EXPECT_EQ(draw.top_k, 40);
  EXPECT_EQ(draw.top_p, 0.9f);
  EXPECT_EQ(draw.log_min_p, std::log(0.05f));
  EXPECT_EQ(draw.repetition_penalty, 1.2f);
  EXPECT_EQ(draw.presence_penalty, 0.5f);
  EXPECT_EQ(draw.frequency_penalty, 0.1f);
  std::map<int32_t, int32_t> window;
  for (int64_t j = 0; j < draw.n_penalized; ++j) EXPECT_TRUE(window.emplace(draw.penalized_ids[j], draw.penalized_counts[j]).second);
  EXPECT_EQ(window, (std::map<int32_t, int32_t>{{9, 2}, {500, 1}, {3, 2}, {7, 1}}));
  EXPECT_TRUE(draw.in_order(n));

  SamplerParams plain;  // temperature alone: id order, no window, no cut
  plain.temperature = 1.0f, plain.top_k = int(n);
  Sampler free = make_sampler(plain, n);
  free.accept(5);
  ASSERT_TRUE(free.device_draw(&draw));
  EXPECT_EQ(draw.top_k, 0) << "a top-k of the whole vocabulary keeps every token";
  EXPECT_EQ(draw.n_penalized, 0);
  EXPECT_EQ(draw.log_min_p, -std::numeric_limits<float>::infinity());
  EXPECT_FALSE(draw.in_order(n));

  SamplerParams greedy;
  greedy.temperature = 0.0f;
  Sampler argmax = make_sampler(greedy, n);
  EXPECT_FALSE(argmax.device_draw(&draw)) << "plain greedy is argmax";
  greedy.repetition_penalty = 1.5f;
  Sampler penalized = make_sampler(greedy, n);
  penalized.accept(4);
  ASSERT_TRUE(penalized.device_draw(&draw)) << "greedy with a penalty: the penalized row's argmax";
  EXPECT_EQ(draw.temperature, 0.0f);
  ASSERT_EQ(draw.n_penalized, 1);
  EXPECT_EQ(draw.penalized_ids[0], 4);
}

// sample(logits, bits) with the bits draw_bits() took draws what sample(logits) draws from the stream:
// what a caller relies on when a device draw falls back to the row (TokenPicker).
TEST(Sampler, GivenBitsDrawAsTheStream) {
  const int64_t n = 152064;
  std::vector<float> logits = random_logits(n, 41);
  for (const auto& [temperature, top_k, top_p, min_p] :
       {std::tuple{1.0f, 0, 1.0f, 0.0f}, std::tuple{0.7f, 0, 1.0f, 0.05f}, std::tuple{0.6f, 20, 0.95f, 0.0f}, std::tuple{1.5f, 0, 0.9f, 0.0f}}) {
    SamplerParams params;
    params.temperature = temperature, params.top_k = top_k, params.top_p = top_p, params.min_p = min_p, params.seed = 77;
    Sampler a = make_sampler(params, n), b = make_sampler(params, n);
    Sampler::DeviceDraw draw;
    EXPECT_TRUE(b.device_draw(&draw)) << "temperature " << temperature;
    for (int i = 0; i < 30; ++i) {
      const uint64_t bits = b.draw_bits();
      ASSERT_EQ(a.sample(logits.data()), b.sample(logits.data(), bits)) << "temperature " << temperature << ", draw " << i;
    }
  }
}

// Top-p over flat rows, whose nucleus is past the sorted prefix (the sampler then finds it and draws by
// weighted bins of the keys, sorting neither): the tokens of a full sort with the documented weights,
// nucleus, min-p cut and target, draw by draw — ties by the thousand included.
TEST(Sampler, TopPOfAFlatRowDrawsAsAFullSort) {
  const int64_t n = 152064;
  std::vector<float> rounded = random_logits(n, 61);
  for (auto& l : rounded) l = std::round(l * 8.0f) / 8.0f;  // 97 values: ~1600 tokens each
  for (const auto& logits : {random_logits(n, 60), rounded})
    for (const auto& [top_p, min_p] : {std::pair{0.9f, 0.0f}, std::pair{0.5f, 0.0f}, std::pair{0.99f, 0.0f}, std::pair{0.9f, 0.2f}}) {
      SamplerParams params;
      params.temperature = 1.5f, params.top_p = top_p, params.min_p = min_p, params.seed = 17;
      Sampler sampler = make_sampler(params, n);
      const std::vector<float> z = scaled(logits, params.temperature);
      const std::vector<int32_t> order = sampler_order(z);
      const float z0 = z[size_t(order[0])];
      DrawMass total = 0;
      for (int32_t id : order) total += draw_weight(z[size_t(id)] - z0);
      const DrawMass wanted = static_cast<DrawMass>(static_cast<double>(top_p) * static_cast<double>(total));
      std::vector<int32_t> kept;
      DrawMass cumulative = 0;
      for (int32_t id : order) {
        kept.push_back(id);
        if ((cumulative += draw_weight(z[size_t(id)] - z0)) >= wanted) break;
      }
      ASSERT_GT(kept.size(), 4096u) << "top_p " << top_p << ": the nucleus is not past the sorted prefix";
      if (min_p > 0.0f) {
        const float threshold = z0 + std::log(min_p);
        while (kept.size() > 1 && z[size_t(kept.back())] < threshold) kept.pop_back();
      }
      DrawMass kept_total = 0;
      for (int32_t id : kept) kept_total += draw_weight(z[size_t(id)] - z0);
      std::mt19937_64 rng(params.seed);
      for (int draw = 0; draw < 20; ++draw) {
        const DrawMass target = draw_target(rng() >> 11, kept_total);
        DrawMass walked = 0;
        int32_t expected = -1;
        for (int32_t id : kept)
          if ((walked += draw_weight(z[size_t(id)] - z0)) > target) {
            expected = id;
            break;
          }
        ASSERT_EQ(sampler.sample(logits.data()), expected) << "top_p " << top_p << ", min_p " << min_p << ", draw " << draw;
      }
    }
}

TEST(Sampler, RejectsInvalidParametersNamingTheField) {
  auto rejects = [](SamplerParams params, const std::string& field, int64_t n_vocab = 10) {
    auto sampler = Sampler::create(params, n_vocab);
    ASSERT_FALSE(sampler.is_ok()) << field;
    EXPECT_EQ(sampler.status().code(), ErrorCode::invalid_argument);
    EXPECT_NE(sampler.status().message().find(field), std::string::npos) << sampler.status().message();
  };
  SamplerParams p;
  rejects(p, "n_vocab", 0);
  p = {}, p.temperature = -0.1f, rejects(p, "temperature");
  p = {}, p.temperature = INFINITY, rejects(p, "temperature");
  p = {}, p.top_k = -1, rejects(p, "top_k");
  p = {}, p.top_p = 0.0f, rejects(p, "top_p");
  p = {}, p.top_p = 1.01f, rejects(p, "top_p");
  p = {}, p.top_p = NAN, rejects(p, "top_p");
  p = {}, p.min_p = -0.01f, rejects(p, "min_p");
  p = {}, p.min_p = 1.5f, rejects(p, "min_p");
  p = {}, p.repetition_penalty = 0.0f, rejects(p, "repetition_penalty");
  p = {}, p.presence_penalty = NAN, rejects(p, "presence_penalty");
  p = {}, p.frequency_penalty = -INFINITY, rejects(p, "frequency_penalty");
  p = {}, p.penalty_last_n = -2, rejects(p, "penalty_last_n");
  auto message = Sampler::create([] { SamplerParams q; q.top_p = 2.0f; return q; }(), 10).status().message();
  EXPECT_EQ(message, "sampler parameter top_p = 2: must be in (0, 1] (1 = off)");
}

// ---------------------------------------------------------------------------------------------------

StopStrings make_stops(std::vector<std::string> stops) {
  auto result = StopStrings::create(std::move(stops));
  EXPECT_TRUE(result.is_ok()) << result.status().to_string();
  return std::move(result).value();
}

TEST(SamplerStopStrings, StopAcrossPieceBoundariesReleasesOnlyTheTextBefore) {
  StopStrings stops = make_stops({"</end>"});
  std::string shown;
  auto feed = [&](std::string_view piece) {
    StopStrings::Emit emit = stops.feed(piece);
    shown += emit.text;
    return emit;
  };
  EXPECT_EQ(feed("Hello <").text, "Hello ");  // "<" could start the stop string
  EXPECT_EQ(feed("b").text, "<b");           // "<b" cannot
  EXPECT_EQ(feed("> world</").text, "> world");
  EXPECT_EQ(feed("en").text, "");
  const StopStrings::Emit last = feed("d>tail");
  EXPECT_TRUE(last.stopped);
  EXPECT_TRUE(stops.stopped());
  EXPECT_EQ(stops.matched_index(), 0);
  EXPECT_EQ(shown, "Hello <b> world");
  EXPECT_TRUE(feed("more").stopped);
  EXPECT_EQ(shown, "Hello <b> world");
}

TEST(SamplerStopStrings, OverlappingPrefixHoldsBackOnlyWhatCanStillMatch) {
  StopStrings stops = make_stops({"aab"});
  EXPECT_EQ(stops.feed("a").text, "");
  EXPECT_EQ(stops.feed("a").text, "");
  EXPECT_EQ(stops.feed("a").text, "a");  // "aaa": only the last "aa" can still become "aab"
  const StopStrings::Emit emit = stops.feed("b");
  EXPECT_TRUE(emit.stopped);
  EXPECT_EQ(emit.text, "");

  stops = make_stops({"abab"});
  std::string shown;
  for (char c : std::string("xababac")) shown += stops.feed(std::string(1, c)).text;
  EXPECT_TRUE(stops.stopped());
  EXPECT_EQ(shown, "x");
}

TEST(SamplerStopStrings, SeveralStopStringsAndFlush) {
  StopStrings stops = make_stops({"\n\nUser:", "<|im_end|>", "###"});
  std::string shown;
  shown += stops.feed("answer is 4.\n").text;
  shown += stops.feed("\nUs").text;
  EXPECT_EQ(shown, "answer is 4.");
  shown += stops.feed("ually ##").text;  // breaks "\n\nUser:"; "##" may start "###"
  EXPECT_EQ(shown, "answer is 4.\n\nUsually ");
  shown += stops.feed("# x").text;
  EXPECT_TRUE(stops.stopped());
  EXPECT_EQ(stops.matched_index(), 2);
  EXPECT_EQ(shown, "answer is 4.\n\nUsually ");

  // Two stop strings complete in one piece: the one starting first wins.
  stops = make_stops({"cd", "abcde"});
  EXPECT_EQ(stops.feed("xxabcdef").text, "xxab");
  EXPECT_EQ(stops.matched_index(), 0);

  // No stop: the held tail comes back from flush().
  stops = make_stops({"<|im_end|>"});
  EXPECT_EQ(stops.feed("done <|im").text, "done ");
  EXPECT_FALSE(stops.stopped());
  EXPECT_EQ(stops.flush(), "<|im");
  EXPECT_EQ(stops.matched_index(), -1);

  EXPECT_EQ(StopStrings::create({"ok", ""}).status().code(), ErrorCode::invalid_argument);
  // No stop strings at all: everything passes straight through.
  stops = make_stops({});
  EXPECT_EQ(stops.feed("abc").text, "abc");
}

// A checkpoint's generation_config.json: the settings it names, nothing where it is absent, and an error
// naming the file and every field of the wrong type (the caller then keeps its own settings).
TEST(GenerationConfig, ReadsTheSettingsItNamesAndRejectsWrongTypes) {
  const std::string dir = testing::TempDir() + "moeflux_generation_config_" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  const auto write = [&](const std::string& json) { std::ofstream(dir + "/generation_config.json", std::ios::trunc) << json; };
  auto none = load_generation_config(dir);
  ASSERT_TRUE(none.is_ok());
  EXPECT_TRUE(none->empty());

  write(R"({"bos_token_id": 151643, "do_sample": true, "eos_token_id": [151645, 151643], "temperature": 0.6, "top_k": 20, "top_p": 0.95})");
  auto qwen3 = load_generation_config(dir);
  ASSERT_TRUE(qwen3.is_ok()) << qwen3.status().to_string();
  SamplerParams params;  // temperature 1, no top-k / top-p
  params.min_p = 0.1f;
  apply_generation_config(*qwen3, params);
  EXPECT_EQ(params.temperature, 0.6f);
  EXPECT_EQ(params.top_k, 20);
  EXPECT_EQ(params.top_p, 0.95f);
  EXPECT_EQ(params.min_p, 0.1f);  // not named: kept
  SamplerParams mine;
  mine.top_k = 5;
  KeepSettings keep;
  keep.top_k = true;
  apply_generation_config(*qwen3, mine, keep);
  EXPECT_EQ(mine.top_k, 5);
  EXPECT_EQ(mine.temperature, 0.6f);

  write(R"({"do_sample": false, "temperature": 0.6})");  // greedy, as generate() decodes it
  auto greedy = load_generation_config(dir);
  ASSERT_TRUE(greedy.is_ok());
  SamplerParams g;
  apply_generation_config(*greedy, g);
  EXPECT_EQ(g.temperature, 0.0f);

  write(R"({"temperature": "hot", "top_k": 2.5, "do_sample": 1})");
  auto bad = load_generation_config(dir);
  ASSERT_FALSE(bad.is_ok());
  EXPECT_EQ(bad.status().code(), ErrorCode::format);
  for (const char* what : {"generation_config.json", "temperature is \"hot\"", "top_k is 2.5", "do_sample is 1"})
    EXPECT_NE(bad.status().message().find(what), std::string::npos) << bad.status().message();
  write("[1, 2]");
  EXPECT_FALSE(load_generation_config(dir).is_ok());
  std::filesystem::remove_all(dir);
}


}  // namespace
}  // namespace moeflux
