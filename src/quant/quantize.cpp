// Reference quantization (fp32 → bf16/q8/q4) and dequantization of one row, exactly as quantize.hpp
// states. Owns the definitions every optimized kernel is tested against; does not own any kernel.
#include "quant/quantize.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/half.hpp"
#include "core/status.hpp"

namespace moeflux {
namespace {

// Rounding of w/scale to the integer grid: round half to even (the default FP environment), the same
// tie rule as the bf16 conversion. Only quantization depends on it; decoding does not.
inline float round_to_grid(float v) { return std::nearbyint(v); }

void quantize_q8(const float* w, int64_t rows, int64_t cols, QuantizedMatrix& m) {
  const int64_t n_groups = cols / q8_group;
  auto* data = reinterpret_cast<int8_t*>(m.data.data());         // [rows, cols]
  auto* scales = reinterpret_cast<uint16_t*>(m.scales.data());   // fp16 [rows, cols/32]
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < n_groups; ++g) {
      const float* src = w + r * cols + g * q8_group;
      float amax = 0.0f;
      for (int64_t i = 0; i < q8_group; ++i) amax = std::max(amax, std::fabs(src[i]));
      const uint16_t scale_bits = f32_to_f16(amax / 127.0f);
      const float scale = f16_to_f32(scale_bits);
      MF_CHECK_MSG(std::isfinite(scale), "q8: group max {} overflows the fp16 scale", amax);
      scales[r * n_groups + g] = scale_bits;
      int8_t* dst = data + r * cols + g * q8_group;
      for (int64_t i = 0; i < q8_group; ++i) {
        const float q = scale == 0.0f ? 0.0f : std::clamp(round_to_grid(src[i] / scale), -127.0f, 127.0f);
        dst[i] = int8_t(q);
      }
    }
  }
}

void quantize_q4(const float* w, int64_t rows, int64_t cols, QuantizedMatrix& m) {
  const int64_t n_groups = cols / q4_group;
  auto* data = reinterpret_cast<uint32_t*>(m.data.data());       // [rows, cols/8]
  auto* scales = reinterpret_cast<uint16_t*>(m.scales.data());   // bf16 [rows, cols/64]
  auto* biases = reinterpret_cast<uint16_t*>(m.biases.data());   // bf16 [rows, cols/64]
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < n_groups; ++g) {
      const float* src = w + r * cols + g * q4_group;
      float lo = src[0], hi = src[0];
      for (int64_t i = 1; i < q4_group; ++i) {
        lo = std::min(lo, src[i]);
        hi = std::max(hi, src[i]);
      }
      const uint16_t scale_bits = f32_to_bf16((hi - lo) / 15.0f);
      const uint16_t bias_bits = f32_to_bf16(lo);
      const float scale = bf16_to_f32(scale_bits);
      const float bias = bf16_to_f32(bias_bits);
      MF_CHECK_MSG(std::isfinite(scale) && std::isfinite(bias), "q4: group range [{}, {}] is not finite", lo, hi);
      scales[r * n_groups + g] = scale_bits;
      biases[r * n_groups + g] = bias_bits;
      uint32_t* dst = data + (r * cols + g * q4_group) / 8;
      for (int64_t word = 0; word < q4_group / 8; ++word) {
        uint32_t packed = 0;
        for (int j = 0; j < 8; ++j) {
          const float v = src[word * 8 + j];
          const float q = scale == 0.0f ? 0.0f : std::clamp(round_to_grid((v - bias) / scale), 0.0f, 15.0f);
          packed |= uint32_t(q) << (4 * j);  // element 8·word + j in bits 4j..4j+3: low nibble first
        }
        dst[word] = packed;
      }
    }
  }
}

}  // namespace

QuantizedMatrix quantize_matrix(const float* w, int64_t rows, int64_t cols, WeightFormat format) {
  MF_CHECK(rows >= 0);
  MF_CHECK_MSG(weight_format_fits(format, cols), "{}: cols {} is not a positive multiple of {}",
               weight_format_name(format), cols, weight_format_group(format));
  QuantizedMatrix m;
  m.format = format;
  m.rows = rows;
  m.cols = cols;
  const WeightPartBytes bytes = weight_part_bytes(format, rows, cols);
  m.data.resize(bytes.data);
  m.scales.resize(bytes.scales);
  m.biases.resize(bytes.biases);
  switch (format) {
    case WeightFormat::f32:
      if (bytes.data) std::memcpy(m.data.data(), w, bytes.data);
      break;
    case WeightFormat::bf16: {
      auto* dst = reinterpret_cast<uint16_t*>(m.data.data());
      for (int64_t i = 0; i < rows * cols; ++i) dst[i] = f32_to_bf16(w[i]);
      break;
    }
    case WeightFormat::q8: quantize_q8(w, rows, cols, m); break;
    case WeightFormat::q4: quantize_q4(w, rows, cols, m); break;
  }
  return m;
}

// value = q · scale (q8) and q · scale + bias (q4): the products are exact in fp32 (≤ 8-bit integer times
// an 11-bit fp16 or 8-bit bf16 significand), so a kernel that forms them with or without FMA decodes the
// same bits as this function.
void dequantize_row(const WeightView& w, int64_t row, float* out) {
  MF_CHECK(row >= 0 && row < w.rows);
  MF_CHECK(w.data != nullptr);
  MF_CHECK(weight_format_fits(w.format, w.cols));
  const int64_t cols = w.cols;
  switch (w.format) {
    case WeightFormat::f32:
      std::memcpy(out, static_cast<const float*>(w.data) + row * cols, size_t(cols) * 4);
      break;
    case WeightFormat::bf16: {
      const uint16_t* src = static_cast<const uint16_t*>(w.data) + row * cols;
      for (int64_t c = 0; c < cols; ++c) out[c] = bf16_to_f32(src[c]);
      break;
    }
    case WeightFormat::q8: {
      MF_CHECK(w.scales != nullptr);
      const int64_t n_groups = cols / q8_group;
      const int8_t* src = static_cast<const int8_t*>(w.data) + row * cols;
      const uint16_t* scales = static_cast<const uint16_t*>(w.scales) + row * n_groups;
      for (int64_t g = 0; g < n_groups; ++g) {
        const float scale = f16_to_f32(scales[g]);
        for (int64_t i = 0; i < q8_group; ++i) out[g * q8_group + i] = float(src[g * q8_group + i]) * scale;
      }
      break;
    }
    case WeightFormat::q4: {
      MF_CHECK(w.scales != nullptr && w.biases != nullptr);
      const int64_t n_groups = cols / q4_group;
      const uint32_t* src = static_cast<const uint32_t*>(w.data) + row * (cols / 8);
      const uint16_t* scales = static_cast<const uint16_t*>(w.scales) + row * n_groups;
      const uint16_t* biases = static_cast<const uint16_t*>(w.biases) + row * n_groups;
      for (int64_t g = 0; g < n_groups; ++g) {
        const float scale = bf16_to_f32(scales[g]);
        const float bias = bf16_to_f32(biases[g]);
        for (int64_t word = 0; word < q4_group / 8; ++word) {
          const uint32_t packed = src[g * (q4_group / 8) + word];
          for (int j = 0; j < 8; ++j) {
            const float q = float((packed >> (4 * j)) & 0xfu);
            out[g * q4_group + word * 8 + j] = q * scale + bias;
          }
        }
      }
      break;
    }
  }
}

}  // namespace moeflux
