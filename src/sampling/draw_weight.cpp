// The host's draw weight (draw_weight.hpp). CMake builds this file with -ffp-contract=off: a compiler
// allowed to fuse a multiply and an add into an FMA would round differently from the GPU's kernels.
#include "sampling/draw_weight.hpp"

#include <cmath>
#include <cstring>

namespace moeflux {

namespace {
struct HostOps {
  static double mul(double a, double b) { return a * b; }
  static double add(double a, double b) { return a + b; }
  static int round_to_int(double v) { return static_cast<int>(std::nearbyint(v)); }  // ties to even
  static uint64_t to_u64(double v) { return static_cast<uint64_t>(v); }              // truncation
  static double exp2_32(int j) {
    static constexpr double table[32] = {MF_DRAW_EXP2_32};
    return table[j];
  }
  static double from_bits(uint64_t b) {
    double v;
    std::memcpy(&v, &b, sizeof v);
    return v;
  }
  static uint64_t to_bits(double v) {
    uint64_t b;
    std::memcpy(&b, &v, sizeof b);
    return b;
  }
  static double from_u64(uint64_t v) { return static_cast<double>(v); }  // to nearest, ties to even
};
}  // namespace

uint64_t draw_weight(float d) { return draw_weight_with<HostOps>(d); }

DrawMass top_p_mass(float top_p, DrawMass total) { return top_p_mass_with<HostOps>(top_p, total); }

void draw_weights(const float* z, const int32_t* ids, int64_t n, float z_max, uint64_t* out) {
  for (int64_t i = 0; i < n; ++i) out[ids[i]] = draw_weight_with<HostOps>(z[ids[i]] - z_max);
}

}  // namespace moeflux
