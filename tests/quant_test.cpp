// Round-trip tests of the reference quantizers (quant/quantize.hpp): per-element error bounds derived
// from each format's definition, the q4 nibble order on a hand-built row, constant groups, and the
// relative RMS error of q8 vs q4 on Gaussian data.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "core/half.hpp"
#include "quant/quantize.hpp"

namespace moeflux {
namespace {

std::vector<float> gaussian(size_t n, uint32_t seed, float sigma = 1.0f, float mean = 0.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(mean, sigma);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

std::vector<float> dequantize(const QuantizedMatrix& m) {
  std::vector<float> out(size_t(m.rows * m.cols));
  for (int64_t r = 0; r < m.rows; ++r) dequantize_row(m.view(), r, out.data() + r * m.cols);
  return out;
}

TEST(Quant, PartSizesMatchTheLayout) {
  const auto q4 = quantize_matrix(gaussian(3 * 128, 1).data(), 3, 128, WeightFormat::q4);
  EXPECT_EQ(q4.data.size(), 3u * 128 / 2);
  EXPECT_EQ(q4.scales.size(), 3u * 2 * 2);
  EXPECT_EQ(q4.biases.size(), 3u * 2 * 2);
  const auto q8 = quantize_matrix(gaussian(3 * 128, 1).data(), 3, 128, WeightFormat::q8);
  EXPECT_EQ(q8.data.size(), 3u * 128);
  EXPECT_EQ(q8.scales.size(), 3u * 4 * 2);
  EXPECT_TRUE(q8.biases.empty());
}

TEST(Quant, F32AndBf16RoundTripExactly) {
  const int64_t rows = 5, cols = 37;
  auto w = gaussian(size_t(rows * cols), 2, 3.0f);
  const auto f32 = dequantize(quantize_matrix(w.data(), rows, cols, WeightFormat::f32));
  EXPECT_EQ(std::memcmp(f32.data(), w.data(), w.size() * 4), 0);
  // Inputs that bf16 represents exactly must come back bit for bit.
  for (auto& x : w) x = round_to_bf16(x);
  const auto bf16 = dequantize(quantize_matrix(w.data(), rows, cols, WeightFormat::bf16));
  EXPECT_EQ(std::memcmp(bf16.data(), w.data(), w.size() * 4), 0);
}

TEST(Quant, Bf16RoundsToNearest) {
  // 1 + 2^-8 is halfway between the bf16 neighbours 1 and 1 + 2^-7: ties go to even (1).
  // 1 + 3·2^-9 is nearer 1 + 2^-7.
  const float w[2] = {1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-9f};
  const auto out = dequantize(quantize_matrix(w, 1, 2, WeightFormat::bf16));
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], 1.0f + 0x1p-7f);
}

TEST(Quant, Q8ErrorWithinHalfAStep) {
  const int64_t rows = 7, cols = 256;
  auto w = gaussian(size_t(rows * cols), 3, 0.05f);
  w[5] = 40.0f;  // one group with a large outlier (a large scale)
  const auto m = quantize_matrix(w.data(), rows, cols, WeightFormat::q8);
  const auto out = dequantize(m);
  const auto* scales = reinterpret_cast<const uint16_t*>(m.scales.data());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t g = c / q8_group;
      const float scale = f16_to_f32(scales[r * (cols / q8_group) + g]);
      float amax = 0.0f;
      for (int64_t i = 0; i < q8_group; ++i) amax = std::max(amax, std::fabs(w[r * cols + g * q8_group + i]));
      // Rounding to the grid costs ≤ scale/2. The fp16 scale is amax/127 rounded (relative error ≤ 2^-11),
      // so the clamp at ±127 can cost up to amax − 127·scale ≤ 2^-11·amax more. The decode q·scale is exact.
      const float bound = scale / 2 + 0x1p-11f * amax + 1e-7f * amax;
      EXPECT_LE(std::fabs(out[r * cols + c] - w[r * cols + c]), bound) << "r=" << r << " c=" << c;
    }
  }
}

TEST(Quant, Q4ErrorWithinHalfAStep) {
  const int64_t rows = 5, cols = 320;
  auto w = gaussian(size_t(rows * cols), 4, 0.7f, 0.3f);
  w[70] = -9.0f;
  const auto m = quantize_matrix(w.data(), rows, cols, WeightFormat::q4);
  const auto out = dequantize(m);
  const auto* scales = reinterpret_cast<const uint16_t*>(m.scales.data());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t g = c / q4_group;
      const float* group = w.data() + r * cols + g * q4_group;
      const float lo = *std::min_element(group, group + q4_group);
      const float hi = *std::max_element(group, group + q4_group);
      const float scale = bf16_to_f32(scales[r * (cols / q4_group) + g]);
      // Rounding to the grid costs ≤ scale/2. The bf16 bias differs from lo by ≤ 2^-9·|lo| and 15·scale
      // from hi − lo by ≤ 2^-9·(hi − lo), which the clamps at 0 and 15 can add. fp32 arithmetic adds ~1e-7.
      const float bound = scale / 2 + 0x1p-9f * (hi - lo) + 0x1p-9f * std::fabs(lo) + 1e-6f * (std::fabs(lo) + std::fabs(hi));
      EXPECT_LE(std::fabs(out[r * cols + c] - w[r * cols + c]), bound) << "r=" << r << " c=" << c;
    }
  }
}

TEST(Quant, Q4NibbleOrderIsLowNibbleFirst) {
  // A hand-built row of one group: element i holds the value i % 16, so with scale 1 and bias 0 the
  // word w must read 0x(8w+7)…(8w+1)(8w) in nibbles, element 8w + j in bits 4j..4j+3.
  std::vector<float> w(q4_group);
  for (int64_t i = 0; i < q4_group; ++i) w[i] = float(i % 16);
  const auto m = quantize_matrix(w.data(), 1, q4_group, WeightFormat::q4);
  EXPECT_EQ(bf16_to_f32(reinterpret_cast<const uint16_t*>(m.scales.data())[0]), 1.0f);
  EXPECT_EQ(bf16_to_f32(reinterpret_cast<const uint16_t*>(m.biases.data())[0]), 0.0f);
  const auto* words = reinterpret_cast<const uint32_t*>(m.data.data());
  EXPECT_EQ(words[0], 0x76543210u);
  EXPECT_EQ(words[1], 0xfedcba98u);
  EXPECT_EQ(words[2], 0x76543210u);

  // And decoding a hand-written word: nibbles 1..8 from the low end, scale 2, bias −1.
  std::vector<uint32_t> data(q4_group / 8, 0);
  data[0] = 0x87654321u;
  const uint16_t scale = f32_to_bf16(2.0f), bias = f32_to_bf16(-1.0f);
  const WeightView view{WeightFormat::q4, 1, q4_group, data.data(), &scale, &bias};
  std::vector<float> out(q4_group);
  dequantize_row(view, 0, out.data());
  for (int j = 0; j < 8; ++j) EXPECT_EQ(out[j], float(j + 1) * 2.0f - 1.0f) << j;
  EXPECT_EQ(out[8], -1.0f);
}

TEST(Quant, ConstantGroupsDecodeExactly) {
  // A constant group has scale 0 (q8 only when the constant is 0) and must decode to the constant.
  std::vector<float> w(2 * q4_group);
  std::fill(w.begin(), w.begin() + q4_group, 0.75f);
  std::fill(w.begin() + q4_group, w.end(), -3.0f);
  const auto q4 = dequantize(quantize_matrix(w.data(), 1, int64_t(w.size()), WeightFormat::q4));
  for (size_t i = 0; i < w.size(); ++i) EXPECT_EQ(q4[i], w[i]) << i;
  std::vector<float> zeros(q8_group, 0.0f);
  const auto q8 = dequantize(quantize_matrix(zeros.data(), 1, q8_group, WeightFormat::q8));
  for (float v : q8) EXPECT_EQ(v, 0.0f);
  // A constant non-zero q8 group is exact too: q = ±127 and scale = c/127 rounded to fp16, so
  // 127 · scale may differ from c only by the fp16 rounding of the scale (≤ 2^-11 relative).
  std::vector<float> c(q8_group, 0.5f);
  const auto q8c = dequantize(quantize_matrix(c.data(), 1, q8_group, WeightFormat::q8));
  for (float v : q8c) EXPECT_NEAR(v, 0.5f, 0.5f * 0x1p-11f);
}

TEST(Quant, RelativeRmsErrorQ8FarBelowQ4) {
  const int64_t rows = 64, cols = 512;
  const auto w = gaussian(size_t(rows * cols), 5);
  auto rel_rms = [&](WeightFormat f) {
    const auto out = dequantize(quantize_matrix(w.data(), rows, cols, f));
    double err = 0, ref = 0;
    for (size_t i = 0; i < w.size(); ++i) {
      err += double(out[i] - w[i]) * (out[i] - w[i]);
      ref += double(w[i]) * w[i];
    }
    return std::sqrt(err / ref);
  };
  const double q8 = rel_rms(WeightFormat::q8), q4 = rel_rms(WeightFormat::q4);
  // Uniform rounding error has RMS step/√12. q8 on Gaussian groups of 32: step ≈ 2·2.1σ/254 → ≈ 0.5%;
  // q4 on groups of 64: step ≈ 4.6σ/15 → ≈ 9%. Bounds at ~2× those, and q8 at least 10× better.
  EXPECT_LT(q8, 0.01);
  EXPECT_LT(q4, 0.15);
  EXPECT_LT(q8 * 10, q4);
}

TEST(QuantDeathTest, RejectsColsNotAMultipleOfTheGroup) {
  const std::vector<float> w(48, 1.0f);
  EXPECT_DEATH(quantize_matrix(w.data(), 1, 48, WeightFormat::q4), "cols");
}

}  // namespace
}  // namespace moeflux
