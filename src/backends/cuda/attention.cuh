// CUDA causal softmax attention over a KV cache (Backend::attention, any AttentionLayout: GQA, MLA's
// expanded and latent forms). Three kernels:
//  - decode: one token over plain heads of 128 or 256 dims (k_dim = v_dim, groups up to 64 or 32), a
//    block per (KV head, split of keys), the group's q rows in each warp's registers and each warp's
//    keys read straight into them in chunks of 4 (no shared tiles; the next chunk in flight while one
//    is used). Short of ~100 rounds of chunks the splits of a KV head are one cluster (16 blocks where
//    the GPU places that, sm_90 on) that merges its partials through the blocks' shared memory; else,
//    and before sm_90, the splits merge through the L2 as the tiled kernel's do. With the q/k norms
//    (attention_qk_norm_rope) it takes them too, as the tiled kernel does. Bytes moved: K and V of
//    every key once, q and out once (plus the partials twice without a cluster). attention_lab --short
//    (H100, µs, against the tiled kernel): Qwen3-30B heads 600 keys 7.4 (9.5), 2048 10.7 (14.9), 8192
//    19.6 (28.7); Qwen3.5-397B 600 keys 13.4 (19.7), 8192 47.4 (58.1).
//  - tiled (the rest): one block per (KV head, tile of up to 32 query rows, slice of keys). A row is
//    a (token, query head) pair of the KV head, so the tile is the GQA group of a decode token, a few
//    prefill tokens, or a slice of MLA's heads. Tiles of 32 keys are copied from device memory once per
//    block into shared memory (cp.async, double-buffered: the next tile loads while this one is used;
//    in the latent layout the value tile is the key tile's prefix, not read again), and each warp's
//    rows read them there: scores with each lane on 4 keys × its warp's rows, then an online softmax
//    per row in registers and the weighted sum with each lane on 4-float column groups. When the (row
//    tile, KV head) blocks alone do not fill one wave of resident blocks (decode), the keys are split
//    across blocks (flash-decoding): each writes its unnormalized sum and (max, sum of exponentials)
//    to a scratch buffer (stream_scratch, device_common.cuh: n_split · T · n_head · (v_dim + 2)
//    floats, n_split ≤ 256) and the last block of each (row tile, KV head) to finish merges them (a
//    counter per block column, stream_counters), or a combine kernel where that does not fit.
//    Before its dependent-launch wait a block loads its first K/V tile when every key in it is from an
//    earlier step (below n_past), so those bytes arrive while the q/k/v kernel before it finishes.
//    Needs 16-byte aligned q, caches and out, k_dim, v_dim and strides multiples of 4, v_dim ≤ 1024 and
//    (rows · k_dim + 64 · (k_dim + v_dim) + padding) floats of shared memory for ≥ 4 rows (222 KiB for
//    MLA's 32 rows of 576: Hopper's 227 KiB opt-in; fewer rows on smaller GPUs).
//  - simple: one block per (query head, token), 4 warps taking every 4th key, merged at the end. Used
//    for other shapes.
// Bytes moved (tiled): K and V of the visible keys once per (KV head, row tile), q and out once, plus
// the partials twice when split. On an H200 (attention_lab, docs/BENCHMARKS.md "CUDA attention and
// delta rule") decode at 32K keys reads the cache at 1691 GB/s (Qwen3-30B, 40% of the copy bandwidth)
// and 1063 GB/s (Qwen3.5-397B, 25%); MLA's latent decode is fp32-arithmetic bound (128 heads × 1088
// multiply-adds per 2.3 KB key row: ~17 TFLOP/s). 36–117× the simple kernel at 8K–32K keys.
// Reference: ReferenceBackend::attention; tolerance 1e-5·max|v| (op test): scores round differently
// (q pre-scaled by scale·log2 e, exp2) and sums run in another order, ~1e-7 relative measured.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "backends/backend.hpp"

namespace moeflux::cuda {

// Which kernel runs: automatic picks the decode kernel for one token over heads it takes, else the tiled
// kernel where its requirements hold; the others are for labs and tests (tiled and decode still fall back
// where they cannot run).
enum class AttentionPath { automatic, simple, tiled, decode };

// The tiled kernel's shape, for labs: rows per warp (1, 2 or 4), warps per block (1 … 8), how many
// waves of resident blocks a split decode aims at, and key tiles per split (instead of the waves; for
// the decode kernel, rounds of chunks per split); 0 keeps the measured choice.
struct AttentionTuning {
  int rows_per_warp = 0, warps = 0, waves = 0, split_tiles = 0;
  int cluster = 0;  // the decode kernel's splits as one cluster of this many blocks (≤ 16), −1 never, 0 its choice
};

void attention(const float* q, const float* k_cache, const float* v_cache, int64_t n_tokens, int64_t n_past,
               const AttentionLayout& layout, float scale, float* out, cudaStream_t stream,
               AttentionPath path = AttentionPath::automatic, const AttentionTuning& tuning = {});

// Backend::qk_norm_rope_attention for one token: q [n_head, k_dim] and the new key (k_cache's row
// n_past) normalized per head (q_norm, k_norm) and rotated over the first 2·half dims at `position` as
// qk_norm_rope does it (the same bits), inside the attention kernel: each warp takes its q rows in
// registers (the decode kernel, or the tiled kernel as its block stages them); the one warp whose keys
// hold the new one takes that key, writes it back to the cache and uses it. q is left as it was. False,
// having launched nothing, where neither kernel would run that step alone (more than one token, the
// latent layout, a group wider than a row tile, a head wider than 256 or a rotary half not a multiple of
// 32): the caller composes qk_norm_rope and attention.
struct QkNormRope {
  const float* q_norm;
  const float* k_norm;
  float eps;
  int half;
  float position;
  const float* inv_freq;  // [half], host memory: the values go into the kernel's parameters
};
bool attention_qk_norm_rope(const float* q, float* k_cache, const float* v_cache, int64_t n_past, const AttentionLayout& layout, float scale,
                            float* out, const QkNormRope& qk, cudaStream_t stream);

// Whether the tiled kernel's alignment and shape requirements hold (shared memory is checked at launch).
bool attention_tiled_supported(const float* q, const float* k_cache, const float* v_cache, const AttentionLayout& layout,
                               const float* out);

}  // namespace moeflux::cuda
