// Token samplers: penalties, temperature, top-k, top-p, min-p and a seeded draw over one row of logits,
// plus StopStrings, which cuts generated text at a stop string. Owns no model state and no tokenizer:
// the caller hands in logits [n_vocab] f32 and decoded text pieces.
#pragma once

#include <cstdint>
#include <deque>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.hpp"
#include "sampling/draw_weight.hpp"

namespace moeflux {

// What each field does, in the order Sampler::sample applies them (the order of Hugging Face
// transformers' generate: logits processors, then the warpers temperature → top-k → top-p → min-p):
//
//  1. repetition_penalty (CTRL, Keskar et al. 2019; transformers RepetitionPenaltyLogitsProcessor,
//     llama.cpp penalties): for each distinct token in the window, once however often it occurs,
//     logit > 0 → logit / penalty, else logit · penalty. 1 = off; > 1 discourages repeats.
//  2. presence_penalty, frequency_penalty (OpenAI): logit −= presence · [count > 0] + frequency · count,
//     count = occurrences in the window. 0 = off. Applied after the repetition penalty, as llama.cpp does.
//     The window is the last penalty_last_n accepted tokens (-1 = all of them, 0 = none: penalties off).
//  3. temperature: z = logit / temperature. 0 = greedy: argmax of the penalized logits, ties to the lowest
//     token id; steps 4-7 are skipped.
//  4. top_k: keep the k largest z (ties to the lowest id). 0 = off.
//  5. top_p (nucleus, Holtzman et al. 2019; TopPLogitsWarper): with the kept tokens renormalized and sorted
//     by probability, keep the smallest prefix whose mass is ≥ top_p (at least one token). 1 = off.
//  6. min_p (Nguyen et al. 2024; MinPLogitsWarper): keep tokens whose probability is ≥ min_p · the largest
//     probability, probabilities taken after temperature (the ratio is the same before or after the
//     renormalizations of steps 4-5). 0 = off.
//  7. draw one token from softmax(z) over the kept tokens.
struct SamplerParams {
  float temperature = 1.0f;         // ≥ 0, finite; 0 = greedy
  int top_k = 0;                    // ≥ 0; 0 = off
  float top_p = 1.0f;               // (0, 1]; 1 = off
  float min_p = 0.0f;               // [0, 1]; 0 = off
  float repetition_penalty = 1.0f;  // > 0, finite; 1 = off
  float presence_penalty = 0.0f;    // finite; 0 = off (OpenAI allows [-2, 2]; we do not narrow it)
  float frequency_penalty = 0.0f;   // finite; 0 = off
  int penalty_last_n = 64;          // ≥ -1; -1 = whole history, 0 = penalties off
  uint64_t seed = 0;                // 0 = drawn from std::random_device; Sampler::seed() reports it
};

// The first index of the largest value of v[0, n) (ties to the lowest index; NaNs are never chosen, and
// 0 is returned when every value is NaN or n is 0): greedy decoding's choice. One vectorized pass: a 152k
// vocabulary took ~30 µs on the project's CPU machine against 110–190 µs for std::max_element's
// compare-and-branch chain, which runs in series with every decode step.
int64_t argmax_first(const float* v, int64_t n);

// One sampler per generation stream. Not thread-safe; two samplers share nothing.
//
// Reproducibility: the random stream is std::mt19937_64 (its output sequence is fixed by the C++
// standard), and a draw takes its top 53 bits as the uniform u = bits · 2^-53 rather than using
// std::uniform_real_distribution, whose output differs between standard libraries. Candidates are
// drawn in a canonical order (token id order, or descending probability with ties to the lower id
// once top-k/top-p sort them).
//
// Weights (draw_weight.hpp): a candidate weighs exp(z − z_max) as an integer in units of 2^-62 of the
// largest (floor; e^-43 of it or less weighs 0: such a token had a chance below 2^-62 relative to the
// most likely one), by moeflux's own exp; totals, top-p's cumulative mass (≥ top_p · total, the product
// taken in double: top_p_mass) and the draw (the first token in the order whose cumulative weight exceeds
// floor(u · total)) are exact integer sums. So the result depends on no summation order: the same seed and
// logits give the same tokens on every platform, and a GPU that sums the row in its own order draws the
// token this class draws (Backend::draw_token).
//
// Cost per call: one copy of the logits [n_vocab] f32 and O(n_vocab) passes; top-k selects with a
// histogram of keys; top-p sorts a prefix of the candidates (256, then 1024) while it holds less than the
// requested mass, and past that finds the nucleus's edge and the drawn token by weighted bins of the keys
// (first_past), so no row is fully sorted. No allocation after the first call.
class Sampler {
 public:
  // invalid_argument naming the field and its allowed range for a bad parameter or n_vocab ≤ 0.
  static Result<Sampler> create(const SamplerParams& params, int64_t n_vocab);

  // logits: [n_vocab] f32, not modified. Returns a token id in [0, n_vocab). Does not call accept().
  int32_t sample(const float* logits);
  // sample() with the draw's 53 random bits given (from draw_bits()) instead of taken from the stream at
  // the draw: for a caller that drew them for a device first (device_draw) and fell back to the row.
  int32_t sample(const float* logits, uint64_t bits);
  // The next 53 bits of the random stream, as the next draw would take them (advances the stream).
  uint64_t draw_bits() { return rng_() >> 11; }

  // What a device needs to draw this sampler's token where the logits are, without copying them: set for
  // every setting but plain greedy (which is argmax: Session::greedy_token) — any draw with temperature > 0
  // (top-k, top-p, min-p, penalties) and greedy with a penalty; then Backend::draw_token(x, draw, bits)
  // returns the token sample(x, bits) does (bits unused when greedy). The penalty window's arrays
  // point into the sampler: valid until the next accept() or reset().
  using DeviceDraw = moeflux::DeviceDraw;
  bool device_draw(DeviceDraw* out);

  // Steps 1-2 alone, in place on logits [n_vocab] f32: what sample() does before temperature. For callers
  // that report penalized log-probabilities, and for tests.
  void apply_penalties(float* logits);
  // Appends a token to the penalty history (prompt tokens too, if the caller wants them penalized).
  // token must be in [0, n_vocab): a bad id is a broken invariant and aborts.
  void accept(int32_t token);
  // Clears the history and restarts the random stream from seed(): a reset sampler repeats itself.
  void reset();
  // The seed in use: params.seed, or the one drawn from std::random_device when that was 0.
  uint64_t seed() const { return seed_; }

  const SamplerParams& params() const { return params_; }
  int64_t n_vocab() const { return n_vocab_; }
  // Whether any penalty can change the logits (a window and a penalty that is not off).
  bool penalizes() const {
    return params_.penalty_last_n != 0 &&
           (params_.repetition_penalty != 1.0f || params_.presence_penalty != 0.0f || params_.frequency_penalty != 0.0f);
  }
  // Whether sample() is the plain argmax of the logits (temperature 0, no penalty that could change
  // them): the caller may then take Session::greedy_token(), which needs no copy of the logits.
  bool picks_argmax() const { return params_.temperature == 0.0f && !penalizes(); }
  // For a caller that selects candidates where the logits are (a GPU): how many of the best z of the
  // unpenalized row — z = logit / temperature (the logit itself at temperature 0), higher first, ties to
  // the lower id — hold, with the penalty window's tokens (penalty_ids()), every token sample() could
  // return: top_k (1 when greedy) plus the window's distinct tokens, the only logits a penalty changes (a
  // token outside the window that makes the penalized top k has fewer than k others above it there, and
  // only window tokens can have moved past it). 0 where sample() needs the whole row: temperature > 0
  // without 1 ≤ top_k ≤ max_candidate_top_k, or greedy without a penalty (Session::greedy_token serves
  // that). Then sample_candidates() returns the token sample() would on the whole row, draw for draw.
  static constexpr int max_candidate_top_k = 1024;
  int64_t candidate_k();
  // The window's distinct tokens in the order sample_candidates() takes their raw logits (empty without a
  // penalty); worked out once per window. Valid until the next accept() or reset().
  const std::vector<int32_t>& penalty_ids();
  // ids [count] distinct, each with z as candidate_k() defines it (divided in fp32, as sample() does), at
  // least the candidate_k() best of the unpenalized row among them; penalty_logits: the raw logits of
  // penalty_ids(), in its order (null when it is empty). Window tokens among ids take their penalized z
  // from these. Requires candidate_k() > 0.
  int32_t sample_candidates(const int32_t* ids, const float* z, int64_t count, const float* penalty_logits = nullptr);

 private:
  Sampler(const SamplerParams& params, int64_t n_vocab, uint64_t seed);

  void reserve();                  // logits_, ids_, weights_ at n_vocab
  // Steps 1-2 for one logit of a token with `count` occurrences in the window (count ≥ 1).
  float penalized(float logit, int32_t count) const;
  // Steps 4-7 over ids_[0, n) (in id order), whose scaled logits are in logits_, the largest max_logit.
  int32_t pick(int64_t n, float max_logit);
  // From ids_[0, n_kept) by their weights (the class comment's Weights), walked as they lie, or (in_order)
  // in the order higher z first, ties to the lower id, without sorting them (first_past).
  int32_t draw(int64_t n_kept, bool in_order = false);
  // Of ids[0, n) (weights filled), the first in that order whose cumulative weight exceeds target, by
  // weighted bins of the order's keys; permutes ids.
  int32_t first_past(int32_t* ids, int64_t n, DrawMass target);
  // weights_[id] = draw_weight(logits_[id] − max_logit) for ids_[0, n_kept), once per sample(): top-p and
  // the draw read the same values instead of taking the exponential again in each pass.
  void fill_weights(int64_t n_kept, float max_logit);

  SamplerParams params_;
  int64_t n_vocab_ = 0;
  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
  std::deque<int32_t> history_;  // accepted tokens, at most penalty_last_n of them unless it is -1

  // Scratch, sized n_vocab on the first sample() and reused.
  std::vector<float> logits_;              // [n_vocab] f32: penalized, then divided by temperature
  std::vector<int32_t> ids_;               // [n_vocab] candidate token ids
  std::vector<int32_t> penalty_counts_;    // [n_vocab] occurrences in the window; all zero between calls
  std::vector<int32_t> penalty_ids_;       // penalty_ids(), of the window as it is when penalty_ids_current_
  std::vector<int32_t> penalty_id_counts_;  // how often each of penalty_ids_ occurs in the window
  std::vector<uint64_t> weights_;          // [n_vocab], fill_weights
  std::vector<DrawMass> bin_mass_;         // first_past's bins
  bool bits_given_ = false;                // sample(logits, bits): the draw takes given_bits_
  uint64_t given_bits_ = 0;
  bool penalty_ids_current_ = false;
  bool weights_filled_ = false;            // for this sample() call's candidates (a superset of those kept)
  float weights_max_ = 0.0f;               // the max_logit they were taken against
};

// Watches decoded text for stop strings. feed() returns the text that is safe to show: it holds back
// the longest tail that could still grow into a stop string, so a caller printing what feed() returns
// never prints part of a stop string. When a stop string appears (possibly spread over several pieces),
// the text before it is released, the stop string and everything after it are dropped, and stopped()
// becomes true. With several stop strings, the one whose match ends first wins (the earlier start if two
// end at the same byte), which is what feeding the text one byte at a time would give. Works on bytes: a multi-byte UTF-8 character split over pieces is held and
// released whole only if the caller's pieces keep it whole.
class StopStrings {
 public:
  // invalid_argument for an empty stop string (it would stop before the first byte).
  static Result<StopStrings> create(std::vector<std::string> stop_strings);

  struct Emit {
    std::string text;      // safe to show now
    bool stopped = false;  // a stop string has appeared; later feeds return nothing
  };
  Emit feed(std::string_view piece);
  // End of generation without a stop: releases the held-back text.
  std::string flush();
  bool stopped() const { return stopped_; }
  // Index in the create() list of the stop string that matched; -1 while not stopped.
  int matched_index() const { return matched_index_; }
  // Clears the held text and the stopped state.
  void reset();

 private:
  explicit StopStrings(std::vector<std::string> stop_strings) : stop_strings_(std::move(stop_strings)) {}

  std::vector<std::string> stop_strings_;
  std::string held_;  // shorter than the longest stop string: a tail that is a prefix of one of them
  bool stopped_ = false;
  int matched_index_ = -1;
};

}  // namespace moeflux
