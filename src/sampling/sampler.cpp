// Sampler and StopStrings (see sampler.hpp for the semantics and the order of the steps).
#include "sampling/sampler.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace moeflux {

namespace {

// Higher logit first, ties to the lower id: the one order every selection and draw uses.
struct LogitDescending {
  const float* logits;
  bool operator()(int32_t a, int32_t b) const {
    return logits[a] != logits[b] ? logits[a] > logits[b] : a < b;
  }
};

// The order of LogitDescending as an unsigned key: larger for a larger value, −0 equal to +0, NaN below
// everything (the comparator never ranks a NaN above a number). Branch-free in the sign, which is a coin
// toss per logit (a branch on it cost ~5 ns a logit in mispredictions).
uint32_t descending_key(float v) {
  if (v != v) return 0;
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  if (u == 0x80000000u) u = 0;
  return u ^ (uint32_t(int32_t(u) >> 31) | 0x80000000u);
}

// std::nth_element(first, first + m, last, descending) in effect — [first, first + m) holds the m best
// candidates of [first, last), in some order — by a histogram of the keys' top bits: the candidates in
// the bin holding the m-th and those above go first, and only they are ordered by the comparator. Two
// plain passes (~0.3 ms at 152k candidates on the project's CPU machine) instead of nth_element's
// compare-and-branch over every candidate (~1.6 ms).
template <typename Descending>
void select_best(int32_t* first, int32_t* last, int64_t m, const float* logits, const Descending& descending) {
  const int64_t n = last - first;
  if (m <= 0 || m >= n) return;
  if (n < 4096) return std::nth_element(first, first + m, last, descending);
  constexpr int bits = 11, bins = 1 << bits;
  int64_t count[bins] = {};
  for (int64_t i = 0; i < n; ++i) ++count[descending_key(logits[first[i]]) >> (32 - bits)];
  int64_t above = 0;
  int bin = bins - 1;
  while (above + count[bin] < m) above += count[bin--];
  int32_t* end = std::partition(first, last, [&](int32_t id) { return int(descending_key(logits[id]) >> (32 - bits)) >= bin; });
  std::nth_element(first, first + m, end, descending);
}

// top-p sorts a prefix of this many candidates first and grows it by kTopPGrowth while the prefix
// holds less than top_p of the mass: with a peaked next-token distribution the first round suffices.
constexpr int64_t kTopPFirstPrefix = 256;
constexpr int64_t kTopPGrowth = 4;
// A nucleus past a sorted prefix of this many (a flat row) is found by weighted bins of the keys instead
// (Sampler::first_past): no sort of the nucleus at all.
constexpr int64_t kTopPSortMax = 1024;

Status invalid(const char* field, const std::string& range, const std::string& value) {
  return make_error(ErrorCode::invalid_argument, "sampler parameter {} = {}: must be {}", field, value, range);
}

}  // namespace

int64_t argmax_first(const float* v, int64_t n) {
  // One pass in 16 independent lanes (vector registers), each keeping its largest value and where it
  // first saw it; then the lanes' best, ties to the lower index, and the tail. −∞ everywhere or NaN
  // everywhere leave no lane set: the first −∞, else 0.
  constexpr int lanes = 16;
  float m[lanes];
  int32_t at[lanes];
  for (int j = 0; j < lanes; ++j) m[j] = -std::numeric_limits<float>::infinity(), at[j] = -1;
  int64_t i = 0;
  if (n <= int64_t(std::numeric_limits<int32_t>::max()))
    for (; i + lanes <= n; i += lanes)
      for (int j = 0; j < lanes; ++j) {
        const bool above = v[i + j] > m[j];
        m[j] = above ? v[i + j] : m[j];
        at[j] = above ? int32_t(i + j) : at[j];
      }
  float best = -std::numeric_limits<float>::infinity();
  int64_t best_at = -1;
  for (int j = 0; j < lanes; ++j)
    if (at[j] >= 0 && (m[j] > best || (m[j] == best && at[j] < best_at))) best = m[j], best_at = at[j];
  for (; i < n; ++i)
    if (v[i] > best) best = v[i], best_at = i;
  if (best_at >= 0) return best_at;
  for (int64_t k = 0; k < n; ++k)
    if (v[k] == best) return k;
  return 0;
}

Result<Sampler> Sampler::create(const SamplerParams& p, int64_t n_vocab) {
  if (n_vocab <= 0 || n_vocab > std::numeric_limits<int32_t>::max())
    return make_error(ErrorCode::invalid_argument, "sampler n_vocab = {}: must be in [1, 2^31 - 1]", n_vocab);
  if (!std::isfinite(p.temperature) || p.temperature < 0)
    return invalid("temperature", "finite and >= 0 (0 = greedy)", fmt::format("{}", p.temperature));
  if (p.top_k < 0) return invalid("top_k", ">= 0 (0 = off)", fmt::format("{}", p.top_k));
  if (!(p.top_p > 0 && p.top_p <= 1))
    return invalid("top_p", "in (0, 1] (1 = off)", fmt::format("{}", p.top_p));
  if (!(p.min_p >= 0 && p.min_p <= 1))
    return invalid("min_p", "in [0, 1] (0 = off)", fmt::format("{}", p.min_p));
  if (!std::isfinite(p.repetition_penalty) || p.repetition_penalty <= 0)
    return invalid("repetition_penalty", "finite and > 0 (1 = off)", fmt::format("{}", p.repetition_penalty));
  if (!std::isfinite(p.presence_penalty))
    return invalid("presence_penalty", "finite (0 = off)", fmt::format("{}", p.presence_penalty));
  if (!std::isfinite(p.frequency_penalty))
    return invalid("frequency_penalty", "finite (0 = off)", fmt::format("{}", p.frequency_penalty));
  if (p.penalty_last_n < -1)
    return invalid("penalty_last_n", ">= -1 (-1 = whole history, 0 = off)", fmt::format("{}", p.penalty_last_n));
  uint64_t seed = p.seed;
  if (seed == 0) {
    std::random_device device;
    while (seed == 0) seed = (uint64_t{device()} << 32) ^ device();
  }
  return Sampler(p, n_vocab, seed);
}

Sampler::Sampler(const SamplerParams& params, int64_t n_vocab, uint64_t seed)
    : params_(params), n_vocab_(n_vocab), seed_(seed), rng_(seed) {}

void Sampler::accept(int32_t token) {
  MF_CHECK_MSG(token >= 0 && token < n_vocab_, "token {} outside the vocabulary [0, {})", token, n_vocab_);
  if (params_.penalty_last_n == 0) return;
  penalty_ids_current_ = false;
  history_.push_back(token);
  if (params_.penalty_last_n > 0 && static_cast<int64_t>(history_.size()) > params_.penalty_last_n)
    history_.pop_front();
}

void Sampler::reset() {
  history_.clear();
  penalty_ids_current_ = false;
  rng_.seed(seed_);
}

bool Sampler::device_draw(DeviceDraw* out) {
  if (picks_argmax()) return false;
  *out = DeviceDraw{};
  out->temperature = params_.temperature;
  out->top_k = params_.top_k > 0 && params_.top_k < n_vocab_ ? params_.top_k : 0;
  out->top_p = params_.top_p;
  if (params_.min_p > 0.0f) out->log_min_p = std::log(params_.min_p);
  const std::vector<int32_t>& window = penalty_ids();
  out->penalized_ids = window.data(), out->penalized_counts = penalty_id_counts_.data();
  out->n_penalized = static_cast<int64_t>(window.size());
  out->repetition_penalty = params_.repetition_penalty;
  out->presence_penalty = params_.presence_penalty, out->frequency_penalty = params_.frequency_penalty;
  return true;
}

float Sampler::penalized(float logit, int32_t count) const {
  if (params_.repetition_penalty != 1.0f) logit = logit > 0 ? logit / params_.repetition_penalty : logit * params_.repetition_penalty;
  if (params_.presence_penalty != 0.0f || params_.frequency_penalty != 0.0f)
    logit -= params_.presence_penalty + params_.frequency_penalty * static_cast<float>(count);
  return logit;
}

void Sampler::apply_penalties(float* logits) {
  if (!penalizes() || history_.empty()) return;
  if (penalty_counts_.empty()) penalty_counts_.assign(n_vocab_, 0);
  for (int32_t t : history_) ++penalty_counts_[t];
  for (int32_t t : history_) {
    const int32_t count = penalty_counts_[t];
    if (count == 0) continue;  // this token was already penalized: once per distinct token
    logits[t] = penalized(logits[t], count);
    penalty_counts_[t] = 0;
  }
}

const std::vector<int32_t>& Sampler::penalty_ids() {
  if (penalty_ids_current_) return penalty_ids_;
  penalty_ids_current_ = true;
  penalty_ids_.clear();
  penalty_id_counts_.clear();
  if (!penalizes() || history_.empty()) return penalty_ids_;
  if (penalty_counts_.empty()) penalty_counts_.assign(n_vocab_, 0);
  for (int32_t t : history_)
    if (penalty_counts_[t]++ == 0) penalty_ids_.push_back(t);
  for (int32_t t : penalty_ids_) penalty_id_counts_.push_back(penalty_counts_[t]), penalty_counts_[t] = 0;
  return penalty_ids_;
}

int64_t Sampler::candidate_k() {
  const bool greedy = params_.temperature == 0.0f;
  if (greedy ? !penalizes() : params_.top_k < 1 || params_.top_k > max_candidate_top_k) return 0;
  return (greedy ? 1 : params_.top_k) + static_cast<int64_t>(penalty_ids().size());
}

void Sampler::fill_weights(int64_t n_kept, float max_logit) {
  if (weights_filled_ && weights_max_ == max_logit) return;
  draw_weights(logits_.data(), ids_.data(), n_kept, max_logit, weights_.data());
  weights_filled_ = true;
  weights_max_ = max_logit;
}

int32_t Sampler::draw(int64_t n_kept, bool in_order) {
  // Weights relative to the largest kept logit (the largest logit always survives the earlier steps, so
  // the weights top-p took are these), summed exactly.
  float max_logit = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n_kept; ++i) max_logit = std::max(max_logit, logits_[ids_[i]]);
  fill_weights(n_kept, max_logit);
  DrawMass total = 0;
  for (int64_t i = 0; i < n_kept; ++i) total += weights_[ids_[i]];
  const uint64_t bits = bits_given_ ? given_bits_ : draw_bits();
  bits_given_ = false;
  const DrawMass target = draw_target(bits, total);  // < total: the largest kept token weighs 2^62
  if (in_order) return first_past(ids_.data(), n_kept, target);
  DrawMass cumulative = 0;
  for (int64_t i = 0; i < n_kept; ++i) {
    cumulative += weights_[ids_[i]];
    if (cumulative > target) return ids_[i];
  }
  MF_CHECK_MSG(false, "sampler: the draw passed every candidate (target {} of {})", double(target), double(total));
  return ids_[0];
}

int32_t Sampler::first_past(int32_t* ids, int64_t n, DrawMass target) {
  // The group [lo, hi) shares the key's bits above `shift`; `before` is the weight of every candidate
  // ahead of it in the order. Each level's bins (11, 11, then 10 bits of the key) find the one holding the
  // crossing and narrow the group to it; the last few are sorted and walked.
  const LogitDescending descending{logits_.data()};
  constexpr int shifts[3] = {21, 10, 0};
  constexpr uint32_t masks[3] = {0x7FF, 0x7FF, 0x3FF};
  bin_mass_.resize(0x800);
  DrawMass before = 0;
  int64_t lo = 0, hi = n;
  for (int level = 0; level < 3 && hi - lo > 256; ++level) {
    const int shift = shifts[level];
    const uint32_t mask = masks[level];
    std::fill(bin_mass_.begin(), bin_mass_.end(), DrawMass(0));
    for (int64_t k = lo; k < hi; ++k) bin_mass_[(descending_key(logits_[ids[k]]) >> shift) & mask] += weights_[ids[k]];
    uint32_t b = mask;
    while (b > 0 && before + bin_mass_[b] <= target) before += bin_mass_[b--];
    hi = std::partition(ids + lo, ids + hi, [&](int32_t id) { return ((descending_key(logits_[id]) >> shift) & mask) == b; }) - ids;
  }
  std::sort(ids + lo, ids + hi, descending);
  for (int64_t k = lo; k < hi; ++k)
    if ((before += weights_[ids[k]]) > target) return ids[k];
  MF_CHECK_MSG(false, "sampler: no candidate past the target {} (a broken sum)", double(target));
  return ids[lo];
}

int32_t Sampler::sample(const float* logits, uint64_t bits) {
  bits_given_ = params_.temperature > 0.0f, given_bits_ = bits;
  const int32_t token = sample(logits);
  bits_given_ = false;
  return token;
}

int32_t Sampler::sample(const float* logits) {
  const int64_t n = n_vocab_;
  reserve();
  weights_filled_ = false;
  std::copy(logits, logits + n, logits_.begin());
  apply_penalties(logits_.data());

  if (params_.temperature == 0.0f) return static_cast<int32_t>(argmax_first(logits_.data(), n));  // ties: the lowest id

  for (int64_t i = 0; i < n; ++i) logits_[i] /= params_.temperature;
  for (int64_t i = 0; i < n; ++i) ids_[i] = static_cast<int32_t>(i);
  const float max_logit = logits_[argmax_first(logits_.data(), n)];  // NaN or −∞ when no value is finite
  MF_CHECK_MSG(std::isfinite(max_logit), "sampler: no finite logit among {} (largest {})", n, max_logit);
  return pick(n, max_logit);
}

void Sampler::reserve() {
  if (!logits_.empty()) return;
  logits_.resize(n_vocab_);
  ids_.resize(n_vocab_);
  weights_.resize(n_vocab_);
}

int32_t Sampler::sample_candidates(const int32_t* ids, const float* z, int64_t count, const float* penalty_logits) {
  const bool greedy = params_.temperature == 0.0f;
  const int64_t wanted = std::min<int64_t>(greedy ? 1 : params_.top_k, n_vocab_);
  const bool served = candidate_k() > 0;  // and penalty_ids_ is the window the caller's penalty_logits follow
  MF_CHECK_MSG(served && count >= wanted && count <= n_vocab_,
               "sample_candidates: {} candidates for top-k {} (the sampler {} from candidates)", count, params_.top_k,
               served ? "samples" : "does not sample");
  MF_CHECK_MSG(penalty_ids_.empty() || penalty_logits, "sample_candidates: the raw logits of {} penalized tokens are missing",
               penalty_ids_.size());
  reserve();
  weights_filled_ = false;
  const bool windowed = !penalty_ids_.empty();
  if (windowed) {
    if (penalty_counts_.empty()) penalty_counts_.assign(n_vocab_, 0);
    for (int32_t t : history_) ++penalty_counts_[t];
  }
  // The candidates outside the window keep the z they came with; the window's tokens take the penalized
  // z of their raw logits, the arithmetic sample() runs on the row.
  int64_t n = 0;
  for (int64_t i = 0; i < count; ++i) {
    MF_CHECK_MSG(ids[i] >= 0 && ids[i] < n_vocab_, "sample_candidates: id {} outside the vocabulary [0, {})", ids[i], n_vocab_);
    if (windowed && penalty_counts_[ids[i]] != 0) continue;
    logits_[ids[i]] = z[i];
    ids_[n++] = ids[i];
  }
  for (size_t j = 0; j < penalty_ids_.size(); ++j) {
    const int32_t t = penalty_ids_[j];
    const float logit = penalized(penalty_logits[j], penalty_counts_[t]);
    logits_[t] = greedy ? logit : logit / params_.temperature;
    ids_[n++] = t;
  }
  if (windowed)
    for (int32_t t : history_) penalty_counts_[t] = 0;
  std::sort(ids_.begin(), ids_.begin() + n);  // id order, as sample() starts
  if (greedy) {
    // argmax_first over the candidates: the first (lowest id) of the largest, NaN never chosen, 0 when every
    // value is NaN (a device selects NaNs last, so then the whole row is NaN).
    int64_t best = -1;
    for (int64_t i = 0; i < n; ++i)
      if (logits_[ids_[i]] == logits_[ids_[i]] && (best < 0 || logits_[ids_[i]] > logits_[ids_[best]])) best = i;
    return best < 0 ? 0 : ids_[best];
  }
  float max_logit = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) max_logit = std::max(max_logit, logits_[ids_[i]]);
  MF_CHECK_MSG(std::isfinite(max_logit), "sampler: no finite logit among {} candidates (largest {})", n, max_logit);
  return pick(n, max_logit);
}

int32_t Sampler::pick(int64_t n, float max_logit) {
  const LogitDescending descending{logits_.data()};
  int64_t n_kept = n;
  bool sorted = false;    // ids_[0, n_kept) in descending order (else in id order, or a set: in_order)
  bool in_order = false;  // drawn in descending order without being sorted (a flat row's nucleus)
  if (params_.top_k > 0 && params_.top_k < n_vocab_) {
    n_kept = std::min<int64_t>(params_.top_k, n);
    select_best(ids_.data(), ids_.data() + n, n_kept, logits_.data(), descending);
    std::sort(ids_.begin(), ids_.begin() + n_kept, descending);
    sorted = true;
  }

  if (params_.top_p < 1.0f) {
    fill_weights(n_kept, max_logit);
    DrawMass total = 0;
    for (int64_t i = 0; i < n_kept; ++i) total += weights_[ids_[i]];
    const DrawMass wanted = top_p_mass(params_.top_p, total);
    DrawMass cumulative = 0;
    int64_t n_sorted = sorted ? n_kept : 0;
    int64_t prefix = sorted ? n_kept : std::min(n_kept, kTopPFirstPrefix);
    int64_t i = 0;
    bool flat = false;
    for (;;) {
      if (n_sorted < prefix) {
        // Bring the next-largest candidates into [n_sorted, prefix) and sort only them.
        if (prefix < n_kept)
          select_best(ids_.data() + n_sorted, ids_.data() + n_kept, prefix - n_sorted, logits_.data(), descending);
        std::sort(ids_.begin() + n_sorted, ids_.begin() + prefix, descending);
        n_sorted = prefix;
      }
      for (; i < n_sorted; ++i) {
        cumulative += weights_[ids_[i]];
        if (cumulative >= wanted) break;
      }
      if (i < n_sorted || n_sorted == n_kept) break;
      if (prefix >= kTopPSortMax) {
        flat = true;
        break;
      }
      prefix = std::min(n_kept, prefix * kTopPGrowth);
    }
    if (flat) {
      // The nucleus ends at the first candidate whose cumulative weight reaches wanted (> wanted − 1:
      // wanted is above the sorted prefix's weight, so above 2^62), found by weighted bins; it is the
      // candidates at or before that one in the order, drawn in the order too (unsorted here).
      const int32_t edge = first_past(ids_.data(), n_kept, wanted - 1);
      n_kept = std::partition(ids_.begin(), ids_.begin() + n_kept, [&](int32_t id) { return !descending(edge, id); }) - ids_.begin();
      in_order = true;
    } else {
      n_kept = std::min(n_kept, i + 1);
      sorted = true;
    }
  }

  if (params_.min_p > 0.0f) {
    // p_i ≥ min_p · p_max  ⇔  z_i ≥ z_max + log(min_p); the most likely token always survives the
    // earlier steps, so z_max is max_logit.
    const float threshold = max_logit + std::log(params_.min_p);
    if (sorted) {
      while (n_kept > 1 && logits_[ids_[n_kept - 1]] < threshold) --n_kept;
    } else {
      // remove_if keeps the survivors in id order (or as a set).
      n_kept = std::remove_if(ids_.begin(), ids_.begin() + n_kept,
                              [&](int32_t id) { return logits_[id] < threshold; }) -
               ids_.begin();
    }
  }
  return draw(n_kept, in_order);
}

// ---------------------------------------------------------------------------------------------------

Result<StopStrings> StopStrings::create(std::vector<std::string> stop_strings) {
  for (size_t i = 0; i < stop_strings.size(); ++i)
    if (stop_strings[i].empty())
      return make_error(ErrorCode::invalid_argument, "stop string {} is empty: must be at least one byte", i);
  return StopStrings(std::move(stop_strings));
}

StopStrings::Emit StopStrings::feed(std::string_view piece) {
  Emit out;
  if (stopped_) {
    out.stopped = true;
    return out;
  }
  held_.append(piece);

  // held_ = (a tail that matched no stop string) + piece: a stop string can only be in it.
  // The match that ends first wins (earliest start on a tie), so the outcome does not depend on how
  // the text was cut into pieces.
  size_t stop_at = std::string::npos;
  size_t stop_end = std::string::npos;
  for (size_t s = 0; s < stop_strings_.size(); ++s) {
    const size_t at = held_.find(stop_strings_[s]);
    if (at == std::string::npos) continue;
    const size_t end = at + stop_strings_[s].size();
    if (end < stop_end || (end == stop_end && at < stop_at)) {
      stop_at = at;
      stop_end = end;
      matched_index_ = static_cast<int>(s);
    }
  }
  if (stop_at != std::string::npos) {
    out.text = held_.substr(0, stop_at);
    out.stopped = stopped_ = true;
    held_.clear();
    return out;
  }

  // Hold back the longest tail of held_ that is a proper prefix of some stop string.
  size_t keep = 0;
  for (const std::string& stop : stop_strings_) {
    for (size_t len = std::min(held_.size(), stop.size() - 1); len > keep; --len) {
      if (std::string_view(held_).substr(held_.size() - len) == std::string_view(stop).substr(0, len)) {
        keep = len;
        break;
      }
    }
  }
  out.text = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

std::string StopStrings::flush() {
  std::string out;
  out.swap(held_);
  return out;
}

void StopStrings::reset() {
  held_.clear();
  stopped_ = false;
  matched_index_ = -1;
}

}  // namespace moeflux
