// The table of SIMD kernels the optimized CPU backend dispatches to, one table per instruction set
// (scalar, AVX2+FMA+F16C, AVX-512F), chosen once at run time. Owns the kernel signatures and the
// contract they share; the threading and the op semantics live in cpu_backend.cpp.
//
// Determinism contract (every table): each output element is reduced in an order fixed by the shape
// alone — lane l of one vector accumulator takes the products of columns ≡ l (mod lanes) in column
// order, the lanes are summed by a fixed tree, and a scalar column tail is added last. Rows and tokens
// are tiled only to reuse loaded data, never to split a reduction, so the thread count, the row
// chunking and the addresses of the weights do not change a single bit. Tables differ from one
// another (a different lane count is a different order), so results depend on the ISA picked.
#pragma once

#include <cstdint>
#include <memory>

#include "backends/backend.hpp"
#include "quant/weight_format.hpp"

namespace moeflux {

struct CpuKernels {
  const char* isa;  // "scalar", "avx2", "avx512"

  // Rearranges activations for the q4 matmul so that the k-th nibble of a vector of packed words meets
  // the activations it multiplies in one contiguous load, and appends each token's sums over groups of
  // 64 (for the factored decode). x: [n_tokens, cols]; x_q4: [n_tokens, cols] rearranged, then
  // [n_tokens, cols/64] group sums: q4_prepared_floats(n_tokens, cols) floats.
  void (*prepare_q4_activations)(const float* x, int64_t n_tokens, int64_t cols, float* x_q4);

  // y[t, r] = Σ_c W[r, c] · x[t, c] for rows [row_begin, row_end) and every token. For q4, x is the
  // output of prepare_q4_activations. x: [n_tokens, w.cols]; y: [n_tokens, w.rows].
  // Matches ReferenceBackend::matmul. bf16, q8, and q4 with n_tokens > 1 decode each weight exactly
  // (q·scale and q·scale + bias are exact in fp32), so only the summation order differs:
  // |Δ| ≲ 1e-6 · Σ_c |W[r,c] · x[t,c]| typically. q4 with n_tokens = 1 sums s·Σq·x + b·Σx per group of
  // 64 (one FMA per weight instead of two); its products q·x are exact but the partial sums carry the
  // group's offset b, which the reference cancels per weight: |Δ| ≲ 1e-6 · Σ_c (|q·s·x| + |b·x|)
  // typically, within the same test bound 2e-5 · Σ_c |W·x| (see backend_ops_test.cpp).
  void (*matmul_rows)(const WeightView& w, const float* x, float* y, int64_t n_tokens, int64_t row_begin,
                      int64_t row_end);

  // Σ a[i]·b[i] and Σ a[i]² in the fixed lane order above. Match a left-to-right fp32 loop within
  // ~n · 2^-24 · Σ|terms|.
  float (*dot)(const float* a, const float* b, int64_t n);
  float (*sum_squares)(const float* a, int64_t n);

  // acc[i] = fma(a, x[i], acc[i]). Matches acc[i] += a·x[i] within one rounding per element.
  void (*axpy)(float* acc, const float* x, float a, int64_t n);
};

inline int64_t q4_prepared_floats(int64_t n_tokens, int64_t cols) { return n_tokens * (cols + cols / 64); }

// Each returns null when the running CPU (or the compiler) lacks the instruction set.
const CpuKernels* cpu_kernels_avx512();
const CpuKernels* cpu_kernels_avx2();
const CpuKernels& cpu_kernels_scalar();

// The widest table this CPU runs (what make_cpu_backend uses).
const CpuKernels& cpu_kernels_best();

// make_cpu_backend with a chosen table, so tests and benchmarks can exercise each ISA on one machine.
std::unique_ptr<Backend> make_cpu_backend_with_kernels(const CpuKernels& kernels, int n_threads);

}  // namespace moeflux
