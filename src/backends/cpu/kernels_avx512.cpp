// The AVX-512F kernel table (16 fp32 lanes). Compiled for that target by pragma inside this file only;
// cpu_kernels_avx512() checks the CPU (and the OS's saving of the zmm state) before handing it out.
#include "backends/cpu/cpu_kernels.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
// GCC 12's avx512fintrin.h builds "undefined" vectors as `__m512 __Y = __Y;`, which -Wuninitialized
// reports at every use; the warning says nothing about this file.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace moeflux {
namespace {

struct V {
  static constexpr int L = 16;
  static constexpr int RP = 4, TP = 6;  // prefill tile: 24 accumulators + 4 weights + 1 activation of 32 zmm
  static constexpr int GR = 6, GV = 4;  // small-gemm tile: 24 accumulators + 4 of B + 1 broadcast
  using reg = __m512;
  using ireg = __m512i;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static reg set1(float v) { return _mm512_set1_ps(v); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  // Fixed tree: halves, then the AVX2 tree on the 8-lane sum.
  static float hsum(reg v) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static reg load_bf16(const uint16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static reg load_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static float f16(uint16_t h) { return _cvtsh_ss(h); }
  static ireg load_words(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static reg low_nibble(ireg w) { return _mm512_cvtepi32_ps(_mm512_and_si512(w, _mm512_set1_epi32(0xf))); }
  static ireg shift_nibble(ireg w) { return _mm512_srli_epi32(w, 4); }
  // Lanes 0–7 take group g's value, lanes 8–15 group g + 1's.
  static reg q4_scales(const uint16_t* bf16) {
    const __m256i lo = _mm256_set1_epi32(int32_t(uint32_t(bf16[0]) << 16));
    const __m256i hi = _mm256_set1_epi32(int32_t(uint32_t(bf16[1]) << 16));
    return _mm512_castsi512_ps(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
  }
};

#include "backends/cpu/cpu_kernels_impl.inl"

constexpr CpuKernels table = kernel_table("avx512");

}  // namespace
}  // namespace moeflux

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace moeflux {
const CpuKernels* cpu_kernels_avx512() {
  __builtin_cpu_init();
  const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
                  __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok ? &table : nullptr;
}
}  // namespace moeflux

#else
namespace moeflux {
const CpuKernels* cpu_kernels_avx512() { return nullptr; }
}  // namespace moeflux
#endif
