#include "quant/weight_format.hpp"

namespace moeflux {

const char* weight_format_name(WeightFormat format) {
  switch (format) {
    case WeightFormat::f32: return "f32";
    case WeightFormat::bf16: return "bf16";
    case WeightFormat::q8: return "q8";
    case WeightFormat::q4: return "q4";
  }
  return "?";
}

std::optional<WeightFormat> parse_weight_format(std::string_view name) {
  if (name == "f32") return WeightFormat::f32;
  if (name == "bf16") return WeightFormat::bf16;
  if (name == "q8") return WeightFormat::q8;
  if (name == "q4") return WeightFormat::q4;
  return std::nullopt;
}

int64_t weight_format_group(WeightFormat format) {
  switch (format) {
    case WeightFormat::q8: return q8_group;
    case WeightFormat::q4: return q4_group;
    default: return 1;
  }
}

bool weight_format_fits(WeightFormat format, int64_t cols) { return cols > 0 && cols % weight_format_group(format) == 0; }

WeightPartBytes weight_part_bytes(WeightFormat format, int64_t rows, int64_t cols) {
  WeightPartBytes b;
  const size_t n = size_t(rows) * size_t(cols);
  switch (format) {
    case WeightFormat::f32: b.data = n * 4; break;
    case WeightFormat::bf16: b.data = n * 2; break;
    case WeightFormat::q8:
      b.data = n;
      b.scales = size_t(rows) * size_t(cols / q8_group) * 2;
      break;
    case WeightFormat::q4:
      b.data = n / 2;
      b.scales = size_t(rows) * size_t(cols / q4_group) * 2;
      b.biases = b.scales;
      break;
  }
  return b;
}

}  // namespace moeflux
