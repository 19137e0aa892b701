// Reference quantization and dequantization of the weight formats (layouts in weight_format.hpp).
// These are the definitions every optimized kernel must match.
#pragma once

#include <cstdint>
#include <vector>

#include "quant/weight_format.hpp"

namespace moeflux {

// A matrix in one weight format with its parts in owned byte vectors.
struct QuantizedMatrix {
  WeightFormat format = WeightFormat::f32;
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<uint8_t> data;
  std::vector<uint8_t> scales;
  std::vector<uint8_t> biases;

  WeightView view() const {
    return {format, rows, cols, data.data(), scales.empty() ? nullptr : scales.data(),
            biases.empty() ? nullptr : biases.data()};
  }
};

// Encodes fp32 values w[rows, cols] into format. Requires weight_format_fits(format, cols).
//   bf16: round to nearest even.
//   q8:   per group of 32, scale = fp16(max|w| / 127); q = clamp(round(w / scale), −127, 127) (scale 0 → q 0).
//   q4:   per group of 64, lo = min w, hi = max w; scale = bf16((hi − lo) / 15), bias = bf16(lo);
//         q = clamp(round((w − bias) / scale), 0, 15) (scale 0 → q 0).
QuantizedMatrix quantize_matrix(const float* w, int64_t rows, int64_t cols, WeightFormat format);

// Decodes row `row` of a weight matrix to fp32. out: [w.cols]
void dequantize_row(const WeightView& w, int64_t row, float* out);

}  // namespace moeflux
