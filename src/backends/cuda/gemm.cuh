// Tensor-core matrix products for batches of tokens (prefill, and experts that several tokens chose):
// y = x · Wᵀ for the jobs of a matmul_many whose own shape qualifies (gemm_takes): bf16, q8 or q4
// weights, cols a multiple of 64, at least gemm_min_tokens tokens, 16-byte aligned weights and x.
//
// Exact products: the weights enter the tensor cores (mma.sync m16n8k16, bf16 in, fp32 accumulate) as
// values bf16 holds exactly — bf16 weights as they are, q8 bytes and q4 nibbles as the integers they
// store — and each x as three bf16 parts whose sum is x exactly (8 + 8 + 8 significant bits cover fp32's
// 24; split once per distinct x of a launch), so every product w·x is exact and only the order of the
// fp32 additions differs from the reference. (Two fp16 parts of x scaled per 64 columns were tried: they
// held small inputs only to the precision of the largest one beside them, which failed the reference's
// bound where a huge input met a zero weight.) Scales come in per group in fp32: q8 y += s·Σq·x per 32
// columns; q4 y += s·Σq·x + b·Σx per 64 (Σx of the group summed once per token). Within this path each y
// element takes the same steps in the same order whatever the launch, the tile and the batch; jobs below
// gemm_min_tokens take the matrix-vector kernels, which sum in another order. Reference:
// ReferenceBackend::matmul; tolerance as the matrix-vector path (op test: 2e-5 · Σ|w·x|).
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
