// The sampler's draw weights and sums, defined so that a GPU computes the same bits as the host in any
// order (sampler.hpp, "Weights"): a token's weight is exp(z − z_max) as an integer in units of 2^-62
// (floor; the largest token weighs exactly 2^62, one below e^-42.98 of it weighs 0), and every total,
// cumulative sum and draw target is exact integer arithmetic. exp is moeflux's own — Cody-Waite
// reduction by ln 2/32, a table of 2^(j/32) and a degree-6 Taylor polynomial, ~3e-16 relative — written
// once as a template over the arithmetic (Ops: mul, add, to nearest int, truncation to uint64, a double
// from its bits, the table) so that the host (plain double operations in a translation unit built
// without contraction into FMA) and a CUDA kernel (the _rn intrinsics, which are never contracted) run
// the very same rounded operations.
#pragma once

#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define MF_HOST_DEVICE __host__ __device__
#else
#define MF_HOST_DEVICE
#endif

namespace moeflux {

// The weight of the largest token: 2^62 (a weight is at most this; sums are held in 128 bits).
inline constexpr int draw_weight_bits = 62;

// 2^(j/32) for j < 32, correctly rounded (each side builds its table from this list: Ops::exp2_32).
#define MF_DRAW_EXP2_32                                                                          \
  0x1.0000000000000p+0, 0x1.059b0d3158574p+0, 0x1.0b5586cf9890fp+0, 0x1.11301d0125b51p+0,        \
      0x1.172b83c7d517bp+0, 0x1.1d4873168b9aap+0, 0x1.2387a6e756238p+0, 0x1.29e9df51fdee1p+0,    \
      0x1.306fe0a31b715p+0, 0x1.371a7373aa9cbp+0, 0x1.3dea64c123422p+0, 0x1.44e086061892dp+0,    \
      0x1.4bfdad5362a27p+0, 0x1.5342b569d4f82p+0, 0x1.5ab07dd485429p+0, 0x1.6247eb03a5585p+0,    \
      0x1.6a09e667f3bcdp+0, 0x1.71f75e8ec5f74p+0, 0x1.7a11473eb0187p+0, 0x1.82589994cce13p+0,    \
      0x1.8ace5422aa0dbp+0, 0x1.93737b0cdc5e5p+0, 0x1.9c49182a3f090p+0, 0x1.a5503b23e255dp+0,    \
      0x1.ae89f995ad3adp+0, 0x1.b7f76f2fb5e47p+0, 0x1.c199bdd85529cp+0, 0x1.cb720dcef9069p+0,    \
      0x1.d5818dcfba487p+0, 0x1.dfc97337b9b5fp+0, 0x1.ea4afa2a490dap+0, 0x1.f50765b6e4540p+0

template <typename Ops>
MF_HOST_DEVICE inline uint64_t draw_weight_with(float d) {
  // d = z − z_max ≤ 0 (an fp32 subtraction by the caller); NaN, −inf and anything at which
  // e^d · 2^62 < 1 weigh 0.
  const double x = static_cast<double>(d);
  if (!(x >= -43.0)) return 0;
  if (x >= 0.0) return uint64_t(1) << draw_weight_bits;
  // x = (32k + j)·ln 2/32 + r, |r| ≤ ln 2/64; e^x = 2^k · 2^(j/32) · e^r.
  const double inv_ln2_32 = 46.166241308446828, ln2_32_hi = 0x1.62e42fee00000p-6, ln2_32_lo = 0x1.a39ef35793c76p-38;
  const int m = Ops::round_to_int(Ops::mul(x, inv_ln2_32));  // −1985 … 0
  const double md = static_cast<double>(m);
  // ln2_32_hi has 21 trailing zero bits: m · ln2_32_hi is exact, so r = x − m·ln 2/32 to ~2^-80.
  const double r = Ops::add(Ops::add(x, -Ops::mul(md, ln2_32_hi)), -Ops::mul(md, ln2_32_lo));
  // e^r = Σ r^i / i!, i ≤ 6 (the first term left out is below 2e-18 at |r| ≤ 0.011), by Horner.
  double p = 1.0 / 720;
  p = Ops::add(Ops::mul(p, r), 1.0 / 120);
  p = Ops::add(Ops::mul(p, r), 1.0 / 24);
  p = Ops::add(Ops::mul(p, r), 1.0 / 6);
  p = Ops::add(Ops::mul(p, r), 1.0 / 2);
  p = Ops::add(Ops::mul(p, r), 1.0);
  p = Ops::add(Ops::mul(p, r), 1.0);
  const int k = m >> 5, j = m & 31;  // floor division: k ≤ 0, 0 ≤ j < 32
  // 2^(j/32) · p below 2, then an exact scaling by 2^(62 + k) (62 + k ≥ 0), then truncated.
  return Ops::to_u64(Ops::mul(Ops::mul(Ops::exp2_32(j), p), Ops::from_bits(uint64_t(1023 + draw_weight_bits + k) << 52)));
}

// The host's weight (draw_weight.cpp, built with -ffp-contract=off).
uint64_t draw_weight(float d);
// out[ids[i]] = draw_weight(z[ids[i]] − z_max) for i < n: the sampler's pass, one call.
void draw_weights(const float* z, const int32_t* ids, int64_t n, float z_max, uint64_t* out);

#if defined(__SIZEOF_INT128__)
__extension__ typedef unsigned __int128 DrawMass;  // a sum of weights
#else
#error "the sampler's exact sums need a 128-bit integer type (GCC and Clang have one)"
#endif

// top_p's share of a total, as the sampler defines it (sampler.hpp): static_cast<DrawMass>(double(top_p) ·
// double(total)) — the total rounded to the nearest double (ties to even), the product rounded, the result
// truncated — written out in integer steps and Ops (mul; from_u64, a uint64 rounded to nearest; to_u64,
// truncation; from_bits, to_bits) so that the host and a GPU compute it alike without a 128-bit float
// conversion of their own.
MF_HOST_DEVICE inline int draw_bit_width(uint64_t v) {
#if defined(__CUDA_ARCH__)
  return 64 - __clzll(static_cast<long long>(v));
#else
  return v == 0 ? 0 : 64 - __builtin_clzll(v);
#endif
}

template <typename Ops>
MF_HOST_DEVICE inline DrawMass top_p_mass_with(float top_p, DrawMass total) {
  const uint64_t hi = uint64_t(total >> 64), lo = uint64_t(total);
  double t;
  if (hi == 0) {
    t = Ops::from_u64(lo);
  } else {
    // The top 64 bits, with every bit below them folded into the lowest (a sticky bit below the rounding
    // position, 10 bits further up), rounded once, then scaled by 2^shift exactly.
    const int shift = draw_bit_width(hi);
    const uint64_t dropped = shift == 64 ? lo : lo & ((uint64_t(1) << shift) - 1);
    const uint64_t top = uint64_t(total >> shift) | uint64_t(dropped != 0);
    t = Ops::mul(Ops::from_u64(top), Ops::from_bits(uint64_t(1023 + shift) << 52));
  }
  const double p = Ops::mul(static_cast<double>(top_p), t);
  if (p < 18446744073709551616.0) return Ops::to_u64(p);  // below 2^64
  // An integer: its 53-bit significand shifted left by the exponent less 52 (at least 12).
  const uint64_t b = Ops::to_bits(p);
  const int e = int((b >> 52) & 0x7FF) - 1023;
  return DrawMass((b & ((uint64_t(1) << 52) - 1)) | (uint64_t(1) << 52)) << (e - 52);
}

// The host's top_p_mass (draw_weight.cpp).
DrawMass top_p_mass(float top_p, DrawMass total);

// A sampler's draw as a device runs it where the logits are (Sampler::device_draw fills it,
// Backend::draw_token runs it): the sampler's steps over the whole row, with its random bits.
struct DeviceDraw {
  float temperature = 1.0f;  // > 0: z = logit / temperature in fp32; 0: greedy (the penalized row's argmax)
  int64_t top_k = 0;         // 0 (or at least the row's length) = off
  float top_p = 1.0f;        // 1 = off
  float log_min_p = -std::numeric_limits<float>::infinity();  // std::log(min_p), −inf when off: the cut is z_max + log_min_p in fp32
  // The penalties (steps 1-2): the window's distinct tokens and their counts in it, none when n_penalized is 0.
  const int32_t* penalized_ids = nullptr;
  const int32_t* penalized_counts = nullptr;
  int64_t n_penalized = 0;
  float repetition_penalty = 1.0f, presence_penalty = 0.0f, frequency_penalty = 0.0f;
  // Over a row of n: without top-k and top-p the sampler walks the kept tokens in id order, else in its order
  // (higher z first).
  bool in_order(int64_t n) const { return (top_k > 0 && top_k < n) || top_p < 1.0f; }
};

// floor(u · mass) for u = bits · 2^-53 (bits: 53 random bits): the draw's target, exact (mass < 2^93:
// up to 2^31 weights of at most 2^62).
MF_HOST_DEVICE inline DrawMass draw_target(uint64_t bits, DrawMass mass) {
  const uint64_t lo = uint64_t(mass), hi = uint64_t(mass >> 64);
  return ((DrawMass(bits) * hi) << 11) + ((DrawMass(bits) * lo) >> 53);
}

}  // namespace moeflux
