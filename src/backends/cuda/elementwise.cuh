// CUDA elementwise and copy ops: embed_rows, swiglu, axpy, fill, gather_rows, copy_rows, sigmoid_mul,
// scatter_add_rows
// (Backend's, same contracts). References: ReferenceBackend's. embed_rows, fill, gather_rows and
// copy_rows are exact; swiglu and sigmoid_mul use expf and an IEEE division (≤ 2 ulp from the host's
// exp: 1e-6 relative in the op tests); axpy and scatter_add_rows may fuse
// their multiply-add (one rounding of a·x apart; the two alike, so scatter_add_rows is bit-identical to axpy calls).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "quant/weight_format.hpp"

namespace moeflux::cuda {

// ids [n_tokens]: a device copy of the caller's ids, already checked against w.rows.
void embed_rows(const WeightView& w, const int32_t* ids, int64_t n_tokens, float* out, cudaStream_t stream);
void swiglu(const float* gate, const float* up, float* out, int64_t n, cudaStream_t stream);
void axpy(float* acc, const float* x, float a, int64_t n, cudaStream_t stream);
void fill(float* x, float value, int64_t n, cudaStream_t stream);
// rows [n_rows]: a device copy of the caller's row indices.
void gather_rows(const float* src, const int32_t* rows, int64_t n_rows, int64_t dim, float* dst, cudaStream_t stream);
void copy_rows(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t n_rows, int64_t dim, cudaStream_t stream);
void sigmoid_mul(float* x, const float* gate, int64_t n_rows, int64_t dim, bool per_row, cudaStream_t stream);
// Backend::scatter_add_rows with its rows grouped by destination: destination row targets[i] receives
// weights[j]·src[order[j]] for j = start[i] .. start[i + 1] − 1 in that order (the caller keeps each
// destination's rows in the order given), as axpy computes each term. Device arrays.
void scatter_add_rows(float* dst, const float* src, const int32_t* targets, const int32_t* start, const int32_t* order,
                      const float* weights, int64_t n_targets, int64_t dim, cudaStream_t stream);

// Backend::argmax's search (n < 2^32): *key, zeroed by the caller, becomes the largest key of x's
// non-NaN values — a value's order-preserving bits above the complement of its index, so the largest
// value at its lowest index among equals (−0 counting as +0) — and stays 0 when every value is NaN.
void argmax_key(const float* x, int64_t n, unsigned long long* key, cudaStream_t stream);
// Backend::top_candidates' selection on the device (n < 2^31): hist [top_bins] zeroed and out (count,
// then ids [capacity], then z [capacity]; count zeroed) by the caller; leaves in out the count of ids at or
// above the histogram bin of the k-th best z = x / temperature and, up to capacity, those ids and z.
constexpr int top_bins = 2048;  // the order-preserving key's top 11 bits
void top_candidates(const float* x, int64_t n, float temperature, int64_t k, unsigned* hist, unsigned* out, int64_t capacity,
                    cudaStream_t stream);
// out[i] = x[ids[i]] for i < count (ids on the device, each in x's range).
void gather(const float* x, const int32_t* ids, int64_t count, float* out, cudaStream_t stream);
__host__ __device__ inline int64_t argmax_index(unsigned long long key) { return key == 0 ? 0 : int64_t(0xFFFFFFFFu - uint32_t(key)); }
// Backend::draw_token in id order (no top-k, no top-p) on the device (n ≤ 2^22), in two passes. max_key: argmax_key's result
// for x, so z_max = x[its index] / temperature. draw_mass: the kept weights (z ≥ z_max + log_min_p) of
// ids [b · draw_chunk, …) summed as their high and low 32-bit halves into mass[2b], mass[2b + 1].
// draw_find (after it): *out becomes the id drawn with those weights in id order, or −1 when z_max is not
// finite.
constexpr int64_t draw_chunk = 2048;  // ids a block sums
inline int64_t draw_blocks(int64_t n) { return (n + draw_chunk - 1) / draw_chunk; }
void draw_mass(const float* x, int64_t n, float temperature, float log_min_p, const unsigned long long* max_key, unsigned long long* mass,
               cudaStream_t stream);
void draw_find(const float* x, int64_t n, float temperature, float log_min_p, const unsigned long long* max_key,
               const unsigned long long* mass, uint64_t bits, int32_t* out, cudaStream_t stream);

// Backend::draw_token in the sampler's order (top-k, top-p, or both; n ≤ 2^22): top-k's last token (the k-th,
// by count), the nucleus's edge (the first token whose cumulative weight reaches top_p_mass of the kept
// weight), then the drawn token (past draw_target of the kept weight, min-p's cut applied), each by a radix
// select over argmax's 64-bit key of z (11, 11, 10 bits of z's order, then of the id), a launch a level.
// top_k: 0 or ≥ n = off. max_key: argmax_key's result for x. *out becomes the id, or −1 when z_max is not
// finite. buffer: ordered_draw_buffer_bytes of device memory (zeroed here). Without top-k and top-p the
// sampler walks the row in id order: draw_mass and draw_find.
struct OrderedDrawBuffer;
constexpr size_t ordered_draw_buffer_bytes = 160 + 2 * 4 * 8 * 2048;
void draw_ordered(const float* x, int64_t n, float temperature, int64_t top_k, float top_p, float log_min_p, const unsigned long long* max_key,
                  OrderedDrawBuffer* buffer, uint64_t bits, int32_t* out, cudaStream_t stream);
// row = x with the window's tokens ids[j] penalized (Sampler's penalized(x[ids[j]], counts[j]): the repetition
// penalty, then presence + frequency · count subtracted, in the same fp32 operations). ids distinct, on the
// device, as counts.
void penalize(const float* x, float* row, int64_t n, const int32_t* ids, const int32_t* counts, int64_t n_ids, float repetition, float presence,
              float frequency, cudaStream_t stream);
}  // namespace moeflux::cuda
