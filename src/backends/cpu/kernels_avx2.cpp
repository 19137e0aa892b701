// The AVX2+FMA+F16C kernel table (8 fp32 lanes). Compiled for that target by pragma inside this file
// only, so the binary still runs on any x86-64; cpu_kernels_avx2() checks the CPU before handing it out.
#include "backends/cpu/cpu_kernels.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace moeflux {
namespace {

struct V {
  static constexpr int L = 8;
  static constexpr int RP = 3, TP = 4;  // prefill tile: 12 accumulators + 3 weights + 1 activation = 16 ymm
  static constexpr int GR = 6, GV = 2;  // small-gemm tile: 12 accumulators + 2 of B + 1 broadcast
  using reg = __m256;
  using ireg = __m256i;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static reg set1(float v) { return _mm256_set1_ps(v); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  // Fixed tree: (l0+l4, l1+l5, l2+l6, l3+l7), then pairs (0+2, 1+3), then 0+1.
  static float hsum(reg v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static reg load_bf16(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static reg load_i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static float f16(uint16_t h) { return _cvtsh_ss(h); }
  static ireg load_words(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static reg low_nibble(ireg w) { return _mm256_cvtepi32_ps(_mm256_and_si256(w, _mm256_set1_epi32(0xf))); }
  static ireg shift_nibble(ireg w) { return _mm256_srli_epi32(w, 4); }
  static reg q4_scales(const uint16_t* bf16) {
    return _mm256_castsi256_ps(_mm256_set1_epi32(int32_t(uint32_t(bf16[0]) << 16)));
  }
};

#include "backends/cpu/cpu_kernels_impl.inl"

constexpr CpuKernels table = kernel_table("avx2");

}  // namespace
}  // namespace moeflux

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace moeflux {
const CpuKernels* cpu_kernels_avx2() {
  __builtin_cpu_init();
  const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok ? &table : nullptr;
}
}  // namespace moeflux

#else
namespace moeflux {
const CpuKernels* cpu_kernels_avx2() { return nullptr; }
}  // namespace moeflux
#endif
