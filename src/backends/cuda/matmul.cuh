// CUDA matmul and matmul_many (Backend::matmul, Backend::matmul_many): y = x · Wᵀ for a table of jobs in
// one launch per 40 jobs. Each warp computes R rows of one token with the lab's v6 dot products
// (dev/cuda_matvec, docs/BENCHMARKS.md "CUDA kernel lab"): 16-byte weight loads, the lane's x chunk held
// in registers and applied to R rows, q4 factored as Σ s·Σq·x + b·Σx; one launch per format present. T > 1 runs the same dot products
// once per token (grid z), re-reading the weights from L2: correct, not yet a prefill kernel.
// Rows whose bytes are not 16-byte aligned (f32/bf16 with cols not a multiple of 4/8, odd pointers) take
// a plain warp-per-row loop. Every job's y depends only on its own (w, x), so matmul_many is
// bit-identical to matmul. Reference: ReferenceBackend::matmul; tolerance 2e-5·Σ|w·x| (op test).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "backends/backend.hpp"

namespace moeflux::cuda {

// jobs: host array; their weights, x and y are device memory. Empty jobs are skipped.
void matmul_jobs(const MatmulJob* jobs, int64_t n_jobs, cudaStream_t stream);

}  // namespace moeflux::cuda
