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

// One value head of Backend::gated_delta_rule for a run of tokens, its queries and keys already
// normalized (cpu_backend.cpp owns the op, its reference and its tolerance).
struct GatedDeltaHead {
  const float* q;       // [n_tokens, k_dim] l2-normalized queries times q_scale
  const float* k;       // [n_tokens, k_dim] l2-normalized keys
  const float* v;       // token t's values at v + t·v_stride: [v_dim]
  int64_t v_stride;
  const float* g;       // token t's log decay at g[t·gate_stride]
  const float* beta;    // token t's write strength at beta[t·gate_stride]
  int64_t gate_stride;
  float* state;         // [k_dim, v_dim], carried in and out
  float* out;           // token t's output at out + t·out_stride: [v_dim]
  int64_t out_stride;
  int64_t n_tokens, k_dim, v_dim;
};

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

  // x[i] = x[i] · sigmoid(x[i]) with a vectorized polynomial exp (impl.inl): within a few ulp of
  // x / (1 + std::exp(−x)) (≤ 2.2e-7 relative measured).
  void (*silu)(float* x, int64_t n);

  // One value head of the gated delta rule over head.n_tokens tokens, token by token (the recurrence of
  // backend.hpp), in place on head.state. Columns of the state are independent, so it runs blocks of
  // columns through every token while the block stays in L1. Decays are carried as one scalar per block
  // between tokens of a call (impl.inl), so T calls of one token and one call of T tokens round
  // differently. scratch: gated_delta_recurrent_scratch_floats(k_dim, n_tokens) floats.
  void (*gated_delta_recurrent)(const GatedDeltaHead& head, float* scratch);

  // The same for one chunk of at most gated_delta_chunk_tokens tokens in the chunked (WY) form, which
  // equals the recurrence algebraically and turns it into small matrix products (impl.inl has the
  // equations). scratch: gated_delta_chunk_scratch_floats(head.n_tokens, k_dim, v_dim) floats.
  void (*gated_delta_chunk)(const GatedDeltaHead& head, float* scratch);
};

// Tokens per chunk of the chunked form: transformers' chunk size. The work per token grows with it
// (3·k_dim·v_dim multiply-adds, as in the recurrence, plus ~chunk/2·(3·k_dim + 2·v_dim)).
constexpr int64_t gated_delta_chunk_tokens = 64;

// Columns of the state a recurrent block holds, at most (4 vectors of the widest table).
constexpr int64_t gated_delta_recurrent_block_columns = 64;

inline int64_t gated_delta_recurrent_scratch_floats(int64_t k_dim, int64_t n_tokens) {
  return k_dim * gated_delta_recurrent_block_columns + 2 * n_tokens;
}

inline int64_t gated_delta_chunk_scratch_floats(int64_t n_tokens, int64_t k_dim, int64_t v_dim) {
  return 3 * n_tokens + 2 * k_dim * n_tokens + 3 * n_tokens * n_tokens + 2 * n_tokens * (k_dim + v_dim);
}

inline int64_t q4_prepared_floats(int64_t n_tokens, int64_t cols) { return n_tokens * (cols + cols / 64); }

// Each returns null when the running CPU (or the compiler) lacks the instruction set.
const CpuKernels* cpu_kernels_avx512();
const CpuKernels* cpu_kernels_avx2();
const CpuKernels& cpu_kernels_scalar();

// The widest table this CPU runs (what make_cpu_backend uses).
const CpuKernels& cpu_kernels_best();

// Choices of the optimized CPU backend that tests and benchmarks may override; the defaults are measured.
struct CpuBackendTuning {
  // gated_delta_rule runs the chunked form from this many tokens on, the recurrence below. Never, by
  // default: on a 2-core Zen 4 (AVX2), Qwen3.5-397B's 64 heads, the recurrence took 0.42/0.78/4.2/28 ms
  // for 2/8/64/512 tokens and the chunked form 0.47/0.95/7.3/44 ms. On a CPU the recurrence does only
  // the chunked form's irreducible 3·k_dim·v_dim multiply-adds per token, on a state block held in L1;
  // kernels_bench's GatedDeltaRule/prefill compares both on other machines.
  int64_t gated_delta_chunk_min_tokens = INT64_MAX;
};

// make_cpu_backend with a chosen table, so tests and benchmarks can exercise each ISA on one machine.
std::unique_ptr<Backend> make_cpu_backend_with_kernels(const CpuKernels& kernels, int n_threads,
                                                       const CpuBackendTuning& tuning = {});

}  // namespace moeflux
