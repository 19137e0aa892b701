// The portable kernel table: the same tiled loops as the SIMD tables over an 8-lane "vector" of plain
// floats, for CPUs without AVX2 (and other architectures). Also owns cpu_kernels_best(), the run-time
// choice among the tables.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "backends/cpu/cpu_kernels.hpp"
#include "core/half.hpp"

namespace moeflux {
namespace {

struct V {
  static constexpr int L = 8;
  static constexpr int RP = 2, TP = 2;
  static constexpr int GR = 2, GV = 2;
  struct reg { float v[8]; };
  struct ireg { uint32_t v[8]; };
  static reg zero() { return {}; }
  static reg load(const float* p) { reg r; std::memcpy(r.v, p, sizeof r.v); return r; }
  static void store(float* p, reg v) { std::memcpy(p, v.v, sizeof v.v); }
  static reg set1(float a) { reg r; for (float& x : r.v) x = a; return r; }
  static reg add(reg a, reg b) { for (int i = 0; i < L; ++i) a.v[i] += b.v[i]; return a; }
  static reg mul(reg a, reg b) { for (int i = 0; i < L; ++i) a.v[i] *= b.v[i]; return a; }
  // fma rounds once, like the SIMD tables; the decoded weight products it forms are exact either way.
  static reg fmadd(reg a, reg b, reg c) { for (int i = 0; i < L; ++i) c.v[i] = __builtin_fmaf(a.v[i], b.v[i], c.v[i]); return c; }
  static float hsum(reg v) {
    for (int w = L / 2; w >= 1; w /= 2)
      for (int i = 0; i < w; ++i) v.v[i] += v.v[i + w];
    return v.v[0];
  }
  static reg load_bf16(const uint16_t* p) { reg r; for (int i = 0; i < L; ++i) r.v[i] = bf16_to_f32(p[i]); return r; }
  static reg load_i8(const int8_t* p) { reg r; for (int i = 0; i < L; ++i) r.v[i] = float(p[i]); return r; }
  static float f16(uint16_t h) { return f16_to_f32(h); }
  static ireg load_words(const uint32_t* p) { ireg r; std::memcpy(r.v, p, sizeof r.v); return r; }
  static reg low_nibble(ireg w) { reg r; for (int i = 0; i < L; ++i) r.v[i] = float(w.v[i] & 0xfu); return r; }
  static ireg shift_nibble(ireg w) { for (auto& x : w.v) x >>= 4; return w; }
  static reg q4_scales(const uint16_t* bf16) { return set1(bf16_to_f32(bf16[0])); }
};

#include "backends/cpu/cpu_kernels_impl.inl"

constexpr CpuKernels table = kernel_table("scalar");

}  // namespace

const CpuKernels& cpu_kernels_scalar() { return table; }

const CpuKernels& cpu_kernels_best() {
  if (const CpuKernels* k = cpu_kernels_avx512()) return *k;
  if (const CpuKernels* k = cpu_kernels_avx2()) return *k;
  return table;
}

}  // namespace moeflux
