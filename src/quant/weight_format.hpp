// Weight formats of a 2-D weight matrix [rows = out_features, cols = in_features], row-major, and the
// byte layout of each. The exact layouts are specified in docs/FORMAT.md; this header is their code.
//   f32 : float    data[rows, cols]
//   bf16: uint16   data[rows, cols]                       value = bf16(data)
//   q8  : int8     data[rows, cols];  fp16 scales[rows, cols/32]
//                  value = data * scale                   (symmetric, groups of 32 along cols)
//   q4  : uint32   data[rows, cols/8] (eight 4-bit values per word, element 8w+j in bits 4j..4j+3,
//                  low nibble first — the MLX layout); bf16 scales[rows, cols/64], bf16 biases[rows, cols/64]
//                  value = nibble * scale + bias          (affine, groups of 64 along cols)
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace moeflux {

enum class WeightFormat : uint8_t { f32, bf16, q8, q4 };

inline constexpr int64_t q8_group = 32;
inline constexpr int64_t q4_group = 64;

const char* weight_format_name(WeightFormat format);
std::optional<WeightFormat> parse_weight_format(std::string_view name);

// Group size along cols (1 for the unquantized formats).
int64_t weight_format_group(WeightFormat format);
// True when a [rows, cols] matrix can be stored in this format (cols divisible by the group).
bool weight_format_fits(WeightFormat format, int64_t cols);

// Bytes of each part of a [rows, cols] matrix; parts that a format does not have are 0.
struct WeightPartBytes {
  size_t data = 0;
  size_t scales = 0;
  size_t biases = 0;
  size_t total() const { return data + scales + biases; }
};
WeightPartBytes weight_part_bytes(WeightFormat format, int64_t rows, int64_t cols);

// A weight matrix in memory the backend can read. Pointers not used by the format are null.
struct WeightView {
  WeightFormat format = WeightFormat::f32;
  int64_t rows = 0;
  int64_t cols = 0;
  const void* data = nullptr;
  const void* scales = nullptr;
  const void* biases = nullptr;

  size_t bytes() const { return weight_part_bytes(format, rows, cols).total(); }
};

}  // namespace moeflux
