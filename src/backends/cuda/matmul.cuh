// CUDA matmul and matmul_many (Backend::matmul, Backend::matmul_many): y = x · Wᵀ for a table of jobs,
// one launch per format and path (per 40 jobs), a flat grid over every job's row tiles; the table is the
// kernel's parameter, so a launch copies nothing to the device first. Each job takes one of three paths,
// chosen from its own format, shape and alignment (dev/cuda_matvec lab versions; docs/BENCHMARKS.md
// "CUDA kernel lab" for the measurements):
//   staged_x (q8, q4 with x ≤ 48 KiB, i.e. cols ≤ ~9800): x copied once per block into shared memory,
//            8 warps × 1–4 rows (the fewest whose blocks are all resident at once), each lane one 16-byte chunk
//            of each of its rows per step, all loads issued first (v23).
//   direct   (f32, bf16; q8/q4 with longer rows): the lane's x chunk read through L1, R rows per warp
//            (f32/bf16 2, q8 2, q4 8), loads of U chunks issued first; a row's chunks split across up to
//            4 warps where the matrix has < 1024 rows or > 8192 columns (v11; unsplit as v8/v10 otherwise).
//   plain    (rows or x not 16-byte aligned, cols not a multiple of a chunk): one row at a time.
// Exact dequantization: q8 and bf16 weights are exact in fp32; q4 nibbles are read as 2 + q/64 (exact) and
// the group sum recovered as (64·s)·Σ(2 + q/64)·x + (b − 128·s)·Σx, which costs about 20× the rounding of
// fp32 dot products (lab: ≤ 9e-7·Σ|w·x|). Jobs of ≥ gemm_min_tokens tokens
// in bf16/q8/q4 (cols a multiple of 64) run on the tensor cores instead (gemm.cuh); smaller batches run the
// matvec once per token (grid z), re-reading the weights from L2. Every job's y depends only on its own
// (w, x) and its path, so matmul_many is bit-identical to matmul. Reference: ReferenceBackend::matmul; tolerance 2e-5·Σ|w·x|
// (op test).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "backends/backend.hpp"

namespace moeflux::cuda {

// Backend::swiglu_matmul for one token in one launch: y = w · silu(gate)·up, the products formed by
// every block as it stages its x (swiglu's arithmetic), the matmul the one matmul_jobs runs (q8 / q4 on
// the staged path: the same bits as the ops in turn). job.x must be gate; gate is not written. False,
// having launched nothing, where that does not apply.
bool glu_matmul_job(const float* gate, const float* up, const MatmulJob& job, cudaStream_t stream);

// jobs: host array; their weights, x and y are device memory. Empty jobs are skipped.
void matmul_jobs(const MatmulJob* jobs, int64_t n_jobs, cudaStream_t stream);

// One decode token's add_rms_norm_matmul into a softmax router's logits [router.rows] followed by its
// top-k (router_softmax_topk's ids and weights), as one launch on sm_90+ (a cluster: the router's rows
// spread over its blocks, the top-k in the first). False, having launched nothing, where that does not
// apply (an older GPU, a router not in bf16 or over more than 1024 experts, buffers that overlap): the
// caller composes the ops.
bool norm_route_topk(const float* x, const float* y, const float* weight, float eps, int64_t dim, float* x_out, float* h,
                     const WeightView& router, float* logits, int64_t k, bool normalize, int32_t* ids, float* weights,
                     cudaStream_t stream);

// Backend::add_rms_norm_matmul for one token in one launch: x_out = x + y (y may be null: then x_out is
// not written), h = rms_norm(x_out)·weight with rms_norm's arithmetic (the same bits), then the jobs,
// every one reading h, on the staged path (any format). Every block normalizes x itself; block 0 writes
// x_out and h. False, having launched nothing, where that does not apply (more than one token, jobs that
// do not all read h in one format, overlapping buffers, a row too wide): the caller composes the ops.
bool norm_matmul_jobs(const float* x, const float* y, const float* weight, float eps, int64_t dim, float* x_out, float* h,
                      const MatmulJob* jobs, int64_t n_jobs, cudaStream_t stream);

}  // namespace moeflux::cuda
