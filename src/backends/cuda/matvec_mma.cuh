// Matrix-vector products of q8/q4 weights on the tensor cores (mma.sync m16n8k16, fp16 in, fp32
// accumulate), for one token at a time: the decode step's projections. Included by .cu files only.
//
// Why: the fp32 kernels (matvec.cuh) spend ~4 instructions per weight turning bytes and nibbles into
// floats and multiplying them, which held them to 36–74% of the memory's speed (docs/BENCHMARKS.md). Here
// a weight costs ~0.6 (q4) or ~1.2 (q8) instructions and 16 rows × 16 columns go through one mma.
//
// Exact products, as the prefill path (gemm.cuh): each weight enters as the integer it stores, scaled by
// 2^-24 — a q4 nibble masked in place is an fp16 subnormal q·2^-24 (its odd columns' nibbles sit 4 bits
// higher, 16q·2^-24, so their x is staged divided by 16), a q8 byte b+128 placed in a half's low byte then
// less 128·2^-24 is b·2^-24, both exact — and x as three fp16 parts whose sum is x·2^k, k chosen per scale
// group (32 columns for q8, 64 for q4) so that the group's largest |x| sits just under 2^15. Three parts
// hold 33 significant bits: every x within 2^16 of its group's largest is held exactly, smaller ones to
// 2^-40 of that largest (where fp32 sums of the group's products round at 2^-24 of it anyway). The mma
// adds each part's products separately (an output column per part and group), and the group's result
// comes back as Σ s·2^(24−k)·part sums (+ b·Σx for q4: Σx in fp32 of the unscaled x): the reference's
// products, summed in another order (ReferenceBackend::matmul; the op tests' tolerance).
//
// The layout. A step is 4 chunks of 16 bytes of a row (q4 128 columns, q8 64: two scale groups); in a
// warp's 16 × 16 tile, lane (g, c) = (lane / 4, lane % 4) holds rows g and g + 8 and loads chunk c of the
// step for both. An mma's 16 k slots are the 4 slots of each of the quad's lanes, and a lane's slots are
// filled from its own chunk — the k order within an mma is free, as long as x's fragment (B) holds the
// same columns: x is staged in fragment order, so a lane's B for a chunk is 16-byte shared loads. B's 8
// output columns n are (group, part): n = 0..2 the three parts of the step's first group (lanes c = 0, 1),
// 3..5 those of its second (c = 2, 3), 6..7 unused (zeros); lanes whose (n, c) do not match load zeros.
#pragma once

#include "backends/cuda/device_common.cuh"
#include "backends/cuda/matvec.cuh"

namespace moeflux::cuda {

// Columns of one step (4 chunks, 2 scale groups) and of one scale group.
__host__ __device__ constexpr int mma_step_cols(WeightFormat f) { return 4 * chunk_cols(f); }
__host__ __device__ constexpr int mma_group_cols(WeightFormat f) { return f == WeightFormat::q4 ? 64 : 32; }

// Staged x: three fp16 parts, each `cols` halves in fragment order plus 16 bytes (so that the three
// parts' loads of one phase fall in distinct banks), then a float2 {2^(24−k), Σx} per scale group.
__host__ __device__ constexpr int64_t mma_part_pitch(int64_t cols) { return cols / 8 + 1; }  // in uint4
__host__ __device__ constexpr int64_t mma_x_bytes(WeightFormat f, int64_t cols) {
  return 3 * mma_part_pitch(cols) * 16 + cols / mma_group_cols(f) * 8;
}

// x·2^k for 2 values as three fp16 pairs hi + mid + lo (each difference exact in fp32).
__device__ __forceinline__ void split_x3(float a, float b, uint32_t& hi, uint32_t& mid, uint32_t& lo) {
  const __half2 h = __floats2half2_rn(a, b);
  const float2 hf = __half22float2(h);
  const float ra = a - hf.x, rb = b - hf.y;
  const __half2 m = __floats2half2_rn(ra, rb);
  const float2 mf = __half22float2(m);
  const __half2 l = __floats2half2_rn(ra - mf.x, rb - mf.y);
  hi = *reinterpret_cast<const uint32_t*>(&h);
  mid = *reinterpret_cast<const uint32_t*>(&m);
  lo = *reinterpret_cast<const uint32_t*>(&l);
}

// Stages x [cols] (cols a multiple of mma_step_cols(F), 16-byte aligned) for the kernels below: a thread
// per 8 columns, the group's largest |x| and Σx by shuffles within the group's lanes (a fixed order, the
// same bits in every lane). The caller synchronizes before reading. Every thread of the block calls it.
template <WeightFormat F>
__device__ __forceinline__ void stage_x_parts(const float* __restrict__ x, int cols, uint4* parts, float2* groups) {
  constexpr int lanes = mma_group_cols(F) / 8;  // threads per group: q4 8, q8 4
  const int n_words = cols / 8;
  const int64_t pitch = mma_part_pitch(cols);
  for (int i0 = 0; i0 < n_words; i0 += blockDim.x) {  // uniform trip count: the shuffles see whole groups
    const int i = i0 + int(threadIdx.x);
    const bool on = i < n_words;
    float4 a = make_float4(0.f, 0.f, 0.f, 0.f), b = a;
    if (on) a = __ldg(reinterpret_cast<const float4*>(x) + 2 * i), b = __ldg(reinterpret_cast<const float4*>(x) + 2 * i + 1);
    float amax = fmaxf(fmaxf(fmaxf(fabsf(a.x), fabsf(a.y)), fmaxf(fabsf(a.z), fabsf(a.w))),
                       fmaxf(fmaxf(fabsf(b.x), fabsf(b.y)), fmaxf(fabsf(b.z), fabsf(b.w))));
    float sum = ((a.x + a.y) + (a.z + a.w)) + ((b.x + b.y) + (b.z + b.w));
#pragma unroll
    for (int o = 1; o < lanes; o <<= 1) {
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      sum += __shfl_xor_sync(0xffffffffu, sum, o);
    }
    if (!on) continue;
    // |x|·2^k < 2^15 for the group; k kept within ±100 so that 2^k and 2^(24−k) are normal floats (a
    // group below 2^-85 loses bits under 2^-149·2^100 — nothing a float sum of such products would keep).
    int e = 0;
    frexpf(amax, &e);  // amax < 2^e
    if (!isfinite(amax)) e = 0;
    const int k = max(-100, min(100, 15 - e));
    const float up = ldexpf(1.f, k);
    uint32_t h[4], m[4], l[4];
    if constexpr (F == WeightFormat::q4) {
      // Fragment order [x0, x4, x1/16, x5/16, x2, x6, x3/16, x7/16]: a word's nibbles as the mask leaves them.
      const float up16 = ldexpf(1.f, k - 4);
      split_x3(a.x * up, b.x * up, h[0], m[0], l[0]);
      split_x3(a.y * up16, b.y * up16, h[1], m[1], l[1]);
      split_x3(a.z * up, b.z * up, h[2], m[2], l[2]);
      split_x3(a.w * up16, b.w * up16, h[3], m[3], l[3]);
    } else {
      split_x3(a.x * up, a.y * up, h[0], m[0], l[0]);
      split_x3(a.z * up, a.w * up, h[1], m[1], l[1]);
      split_x3(b.x * up, b.y * up, h[2], m[2], l[2]);
      split_x3(b.z * up, b.w * up, h[3], m[3], l[3]);
    }
    parts[i] = make_uint4(h[0], h[1], h[2], h[3]);
    parts[pitch + i] = make_uint4(m[0], m[1], m[2], m[3]);
    parts[2 * pitch + i] = make_uint4(l[0], l[1], l[2], l[3]);
    if (i % lanes == 0) groups[i / lanes] = make_float2(ldexpf(1.f, 24 - k), sum);
  }
}

// d += a · b over one 16 × 8 tile and 16 k slots (fp16 in, fp32 accumulate).
__device__ __forceinline__ void mma_f16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One step's weights for a lane: its chunk of rows g and g + 8, their scale pairs (the step's two
// groups) and, for q4, bias pairs.
struct MmaStep {
  uint4 wa, wb;
  uint32_t sa, sb;  // scales of rows g, g + 8: the first group's in the low half
  uint32_t ba, bb;  // q4 biases, likewise
};

// Step s of the rows at row_a / row_b (their scale and bias rows at sc_*, bi_*; q4 biases loaded by the
// lane that adds them, c = 3).
template <WeightFormat F>
__device__ __forceinline__ MmaStep load_mma_step(const uint8_t* row_a, const uint8_t* row_b, const uint16_t* sc_a, const uint16_t* sc_b,
                                                 const uint16_t* bi_a, const uint16_t* bi_b, int s, int c) {
  MmaStep st;
  st.wa = __ldg(reinterpret_cast<const uint4*>(row_a) + 4 * s + c);
  st.wb = __ldg(reinterpret_cast<const uint4*>(row_b) + 4 * s + c);
  st.sa = __ldg(reinterpret_cast<const uint32_t*>(sc_a) + s);
  st.sb = __ldg(reinterpret_cast<const uint32_t*>(sc_b) + s);
  st.ba = st.bb = 0;
  if (F == WeightFormat::q4 && c == 3) st.ba = __ldg(reinterpret_cast<const uint32_t*>(bi_a) + s), st.bb = __ldg(reinterpret_cast<const uint32_t*>(bi_b) + s);
  return st;
}

// acc_a / acc_b (rows g, g + 8; this lane's share) += step s of the dot products with the staged x.
// b_part: the part this lane feeds into B (its n = g), or −1 where it feeds zeros.
template <WeightFormat F>
__device__ __forceinline__ void mma_step(const MmaStep& st, const uint4* parts, const float2* groups, int64_t pitch, int s, int c,
                                         int b_part, float& acc_a, float& acc_b) {
  // Two accumulators, tiles alternating: the tensor cores truncate each sum to the largest term's
  // precision, so shorter chains of sums err less where one huge x dominates a group.
  float d[4] = {0.f, 0.f, 0.f, 0.f}, e[4] = {0.f, 0.f, 0.f, 0.f};
  const uint32_t wa[4] = {st.wa.x, st.wa.y, st.wa.z, st.wa.w}, wb[4] = {st.wb.x, st.wb.y, st.wb.z, st.wb.w};
  constexpr int words = F == WeightFormat::q4 ? 4 : 2;  // staged 8-column words per chunk
  const uint4* xb = parts + (b_part < 0 ? 0 : b_part) * pitch + (4 * s + c) * words;
#pragma unroll
  for (int i = 0; i < words; ++i) {
    const uint4 b = b_part >= 0 ? xb[i] : make_uint4(0u, 0u, 0u, 0u);
    if constexpr (F == WeightFormat::q4) {
      // Weight word i (8 nibbles) feeds tiles 2i (nibbles 0, 4 | 1, 5) and 2i + 1 (2, 6 | 3, 7).
      const uint32_t a = wa[i], bw = wb[i], a8 = a >> 8, b8 = bw >> 8;
      mma_f16(d, a & 0x000F000Fu, bw & 0x000F000Fu, a & 0x00F000F0u, bw & 0x00F000F0u, b.x, b.y);
      mma_f16(e, a8 & 0x000F000Fu, b8 & 0x000F000Fu, a8 & 0x00F000F0u, b8 & 0x00F000F0u, b.z, b.w);
    } else {
      // Weight words 2i and 2i + 1 (4 bytes each) feed one tile each: bytes 0, 1 | 2, 3.
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t ua = wa[2 * i + h] ^ 0x80808080u, ub = wb[2 * i + h] ^ 0x80808080u;  // b + 128
        const auto sub = [](uint32_t v) {  // (b + 128)·2^-24 − 128·2^-24, exact in fp16's subnormals
          const uint32_t off = 0x00800080u;
          const __half2 r = __hsub2(*reinterpret_cast<const __half2*>(&v), *reinterpret_cast<const __half2*>(&off));
          return *reinterpret_cast<const uint32_t*>(&r);
        };
        mma_f16(h == 0 ? d : e, sub(__byte_perm(ua, 0, 0x4140)), sub(__byte_perm(ub, 0, 0x4140)), sub(__byte_perm(ua, 0, 0x4342)),
                sub(__byte_perm(ub, 0, 0x4342)), h == 0 ? b.x : b.z, h == 0 ? b.y : b.w);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) d[i] += e[i];
  // d: rows g (d0, d1) and g + 8 (d2, d3) at n = 2c, 2c + 1; n < 3 the first group, 3..5 the second.
  const float4 gs = reinterpret_cast<const float4*>(groups)[s];  // {2^(24−k), Σx} of the step's two groups
  float s0a, s1a, s0b, s1b;
  if constexpr (F == WeightFormat::q4) {
    s0a = __uint_as_float(st.sa << 16), s1a = __uint_as_float(st.sa & 0xffff0000u);
    s0b = __uint_as_float(st.sb << 16), s1b = __uint_as_float(st.sb & 0xffff0000u);
  } else {
    s0a = __half2float(__ushort_as_half(uint16_t(st.sa))), s1a = __half2float(__ushort_as_half(uint16_t(st.sa >> 16)));
    s0b = __half2float(__ushort_as_half(uint16_t(st.sb))), s1b = __half2float(__ushort_as_half(uint16_t(st.sb >> 16)));
  }
  const float k0a = (c == 2 ? s1a * gs.z : s0a * gs.x), k1a = (c == 0 ? s0a * gs.x : s1a * gs.z);
  const float k0b = (c == 2 ? s1b * gs.z : s0b * gs.x), k1b = (c == 0 ? s0b * gs.x : s1b * gs.z);
  acc_a = fmaf(k1a, d[1], fmaf(k0a, d[0], acc_a));
  acc_b = fmaf(k1b, d[3], fmaf(k0b, d[2], acc_b));
  if (F == WeightFormat::q4 && c == 3) {  // this lane's n (6, 7) carry nothing: it adds the biases' b·Σx
    acc_a = fmaf(__uint_as_float(st.ba & 0xffff0000u), gs.w, fmaf(__uint_as_float(st.ba << 16), gs.y, acc_a));
    acc_b = fmaf(__uint_as_float(st.bb & 0xffff0000u), gs.w, fmaf(__uint_as_float(st.bb << 16), gs.y, acc_b));
  }
}

}  // namespace moeflux::cuda
