// Tensor-core matrix products for batches of tokens (prefill, and experts that several tokens chose):
// y = x · Wᵀ for the jobs of a matmul_many whose own shape qualifies (gemm_takes): bf16, q8 or q4
// weights, cols a multiple of 64, at least gemm_min_tokens tokens, 16-byte aligned weights and x.
//
// Precision: the weights enter the tensor cores (mma.sync m16n8k16, fp32 accumulate) as values the
// inputs hold exactly — bf16 weights as they are, q8 bytes and q4 nibbles as the integers they store, in
// fp16 — and x as parts: with bf16 weights three bf16 parts whose sum is x exactly (8 + 8 + 8 significant
// bits cover fp32's 24), so every product is exact; with q8/q4 two fp16 parts of x·2^-e, e per token and
// 64 columns so that |x·2^-e| < 1, which hold x to within 2^-22 of that maximum (two mma instead of
// three: the tensor cores are this kernel's limit). Scales come in per group in fp32: q8 y += s·Σq·x per
// 32 columns; q4 y += s·Σq·x + b·Σx per 64 (Σx of the group summed once per token). Each y element
// takes the same steps in the same order whatever the launch and the batch, so a token's result does not
// depend on the tokens beside it. Reference: ReferenceBackend::matmul; tolerance as the matrix-vector
// path (op test: 2e-5 · Σ|w·x|; these kernels' error is of the q4 matrix-vector kernels' order).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "backends/backend.hpp"

namespace moeflux::cuda {

// Fewer tokens than this run the matrix-vector kernels (one weight read per token; docs/BENCHMARKS.md
// "Tensor-core prefill" has the crossover).
constexpr int64_t gemm_min_tokens = 8;

// Whether the job takes the tensor-core path: decided from the job alone. MOEFLUX_CUDA_GEMM=N (a
// developer's switch for comparisons) moves the threshold to N tokens; 0 sends every job to the
// matrix-vector kernels.
bool gemm_takes(const MatmulJob& job);

// Runs the jobs that gemm_takes, skipping the others (their weights, x and y are device memory).
void gemm_jobs(const MatmulJob* jobs, int64_t n_jobs, cudaStream_t stream);

}  // namespace moeflux::cuda
