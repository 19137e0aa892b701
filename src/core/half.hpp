// bf16 and IEEE fp16 <-> fp32 conversions, bit-exact and portable (no ISA assumptions).
// Owns: the scalar conversions every format and kernel builds on.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace moeflux {

inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even, as torch's .to(bfloat16) does; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);
  uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t((bits + rounding) >> 16);
}

inline float round_to_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

float f16_to_f32_slow(uint16_t h);
uint16_t f32_to_f16_slow(float f);

inline float f16_to_f32(uint16_t h) { return f16_to_f32_slow(h); }
inline uint16_t f32_to_f16(float f) { return f32_to_f16_slow(f); }

}  // namespace moeflux
