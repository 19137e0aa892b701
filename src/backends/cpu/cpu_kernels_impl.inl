// The ISA-independent body of the CPU kernel tables, included by kernels_<isa>.cpp inside an anonymous
// namespace after a type V that supplies the vector operations (V::L lanes of fp32) and after the
// file's target pragma, so each inclusion compiles for its own instruction set.
// Owns the tiling of matmul (rows × tokens) and the per-format decoders. See cpu_kernels.hpp for the
// determinism contract these loops keep.
//
// Needs from V: L, reg, ireg, RP/TP (prefill tile: rows × tokens), GR/GV (small-gemm tile: rows ×
// vectors), zero, load, set1, add, mul, fmadd, hsum,
// load_bf16, load_i8 (to fp32), f16 (scalar fp16 → fp32), load_words, low_nibble (ireg → fp32 reg),
// shift_nibble (ireg >> 4), q4_scales (one value per group of 8 lanes, from bf16).

using reg = V::reg;
using ireg = V::ireg;

inline float bf16_value(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

// --- Decoders: for one row, block b yields Dec::subs vectors of V::L exactly decoded weights, which
// multiply x[b·block + s·L … + L − 1] (for q4: the prepared activations). Columns past n_blocks·block
// are the scalar tail.

struct DecF32 {
  static constexpr int decode_rows = 4;
  static constexpr int block = V::L, subs = 1;
  const float* data;  // [rows, cols]
  int64_t cols, n_blocks;
  struct Blk { const float* p; };
  DecF32(const WeightView& w) : data(static_cast<const float*>(w.data)), cols(w.cols), n_blocks(w.cols / V::L) {}
  Blk load(int64_t r, int64_t b) const { return {data + r * cols + b * block}; }
  reg sub(Blk& st, int) const { return V::load(st.p); }
  float tail(int64_t r, const float* x) const {
    float sum = 0.0f;
    for (int64_t c = n_blocks * block; c < cols; ++c) sum += data[r * cols + c] * x[c];
    return sum;
  }
};

struct DecBf16 {
  static constexpr int decode_rows = 4;
  static constexpr int block = V::L, subs = 1;
  const uint16_t* data;  // bf16 [rows, cols]
  int64_t cols, n_blocks;
  struct Blk { const uint16_t* p; };
  DecBf16(const WeightView& w) : data(static_cast<const uint16_t*>(w.data)), cols(w.cols), n_blocks(w.cols / V::L) {}
  Blk load(int64_t r, int64_t b) const { return {data + r * cols + b * block}; }
  reg sub(Blk& st, int) const { return V::load_bf16(st.p); }
  float tail(int64_t r, const float* x) const {
    float sum = 0.0f;
    for (int64_t c = n_blocks * block; c < cols; ++c) sum += bf16_value(data[r * cols + c]) * x[c];
    return sum;
  }
};

// q8: one block is one group of 32; q · scale is exact in fp32, so the decoded weight equals the
// reference's. Every q8 shape has cols % 32 == 0: there is no tail.
struct DecQ8 {
  static constexpr int decode_rows = 4;
  static constexpr int block = 32, subs = 32 / V::L;
  const int8_t* data;      // [rows, cols]
  const uint16_t* scales;  // fp16 [rows, cols/32]
  int64_t cols, n_blocks;
  struct Blk { const int8_t* p; reg scale; };
  DecQ8(const WeightView& w)
      : data(static_cast<const int8_t*>(w.data)), scales(static_cast<const uint16_t*>(w.scales)), cols(w.cols),
        n_blocks(w.cols / 32) {}
  Blk load(int64_t r, int64_t b) const { return {data + r * cols + b * 32, V::set1(V::f16(scales[r * n_blocks + b]))}; }
  reg sub(Blk& st, int s) const { return V::mul(V::load_i8(st.p + s * V::L), st.scale); }
  float tail(int64_t, const float*) const { return 0.0f; }
};

// q4: one block is V::L packed words (V::L / 8 groups of 64). Nibble s of word l is element 8l + s of the
// block; prepare_q4_activations stores x in that order, so sub s meets x[block + s·L …] contiguously.
// nibble · scale + bias is exact in fp32 (a 4-bit integer times a bf16 significand, plus a bf16 bias of
// similar magnitude), so FMA decodes the reference's value. An odd last group (V::L = 16) is the tail,
// with its activations left in natural order.
struct DecQ4 {
  // Two rows at a time in decode: four rows' (words, scale, bias) + accumulators fill all 16 ymm and
  // measured no faster.
  static constexpr int decode_rows = 2;
  static constexpr int block = 8 * V::L, subs = 8;
  static constexpr int64_t groups_per_block = V::L / 8;
  const uint32_t* data;    // [rows, cols/8]
  const uint16_t* scales;  // bf16 [rows, cols/64]
  const uint16_t* biases;  // bf16 [rows, cols/64]
  int64_t cols, n_groups, n_blocks;
  struct Blk { ireg words; reg scale, bias; };
  DecQ4(const WeightView& w)
      : data(static_cast<const uint32_t*>(w.data)), scales(static_cast<const uint16_t*>(w.scales)),
        biases(static_cast<const uint16_t*>(w.biases)), cols(w.cols), n_groups(w.cols / 64),
        n_blocks(w.cols / 64 / groups_per_block) {}
  Blk load(int64_t r, int64_t b) const {
    const int64_t g = r * n_groups + b * groups_per_block;
    return {V::load_words(data + r * (cols / 8) + b * V::L), V::q4_scales(scales + g), V::q4_scales(biases + g)};
  }
  reg sub(Blk& st, int) const {
    const reg w = V::fmadd(V::low_nibble(st.words), st.scale, st.bias);
    st.words = V::shift_nibble(st.words);
    return w;
  }
  float tail(int64_t r, const float* x) const {
    float sum = 0.0f;
    for (int64_t g = n_blocks * groups_per_block; g < n_groups; ++g) {
      const float scale = bf16_value(scales[r * n_groups + g]), bias = bf16_value(biases[r * n_groups + g]);
      for (int64_t i = 0; i < 64; ++i) {
        const uint32_t word = data[r * (cols / 8) + g * 8 + i / 8];
        const float q = float((word >> (4 * (i % 8))) & 0xfu);
        sum += (q * scale + bias) * x[g * 64 + i];
      }
    }
    return sum;
  }
};

void prepare_q4_activations(const float* x, int64_t n_tokens, int64_t cols, float* x_q4) {
  constexpr int64_t block = 8 * V::L;
  const int64_t n_blocked = cols / 64 / (V::L / 8) * block;
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* src = x + t * cols;
    float* dst = x_q4 + t * cols;
    for (int64_t base = 0; base < n_blocked; base += block)
      for (int64_t s = 0; s < 8; ++s)
        for (int64_t l = 0; l < V::L; ++l) dst[base + s * V::L + l] = src[base + 8 * l + s];
    for (int64_t c = n_blocked; c < cols; ++c) dst[c] = src[c];
    // Group sums for the factored decode: in double, left to right, rounded once.
    float* sums = x_q4 + n_tokens * cols + t * (cols / 64);
    for (int64_t g = 0; g < cols / 64; ++g) {
      double sum = 0.0;
      for (int64_t i = 0; i < 64; ++i) sum += double(src[g * 64 + i]);
      sums[g] = float(sum);
    }
  }
}

// q4 decode (one token), factored: Σ_c w·x = Σ_g s_g·Σ_{i∈g} q_i·x_i + Σ_g b_g·X_g with X_g = Σ_{i∈g} x_i
// from prepare_q4_activations, so each weight costs one convert and one FMA. Order (shape-only): per
// block of L/8 groups, lane l sums nibbles s = 0,2,4,6 and s = 1,3,5,7 in two chains, adds them, and
// accumulates the block scaled by its group's scale into one vector per row (hsum'd by the fixed tree);
// a tail group (L = 16, odd group count) adds its s·Σq·x left to right; the bias part is a lane-ordered
// dot of the row's biases with X (groups ≡ l mod L in lane l), then its scalar tail.
template <int R>
inline void q4_matvec_tile(const WeightView& w, const float* xq, float* y, int64_t r0) {
  constexpr int64_t groups_per_block = V::L / 8;
  const int64_t cols = w.cols, n_groups = cols / 64, n_blocks = n_groups / groups_per_block;
  const auto* data = static_cast<const uint32_t*>(w.data);
  const auto* scales = static_cast<const uint16_t*>(w.scales);
  const auto* biases = static_cast<const uint16_t*>(w.biases);
  const float* xsum = xq + cols;
  reg acc[R];
  for (int i = 0; i < R; ++i) acc[i] = V::zero();
  for (int64_t b = 0; b < n_blocks; ++b) {
    const float* xb = xq + b * 8 * V::L;
    ireg words[R];
    reg even[R], odd[R];
    for (int i = 0; i < R; ++i) words[i] = V::load_words(data + (r0 + i) * (cols / 8) + b * V::L);
    {
      const reg x0 = V::load(xb), x1 = V::load(xb + V::L);
      for (int i = 0; i < R; ++i) {
        even[i] = V::mul(V::low_nibble(words[i]), x0);
        words[i] = V::shift_nibble(words[i]);
        odd[i] = V::mul(V::low_nibble(words[i]), x1);
        words[i] = V::shift_nibble(words[i]);
      }
    }
    for (int s = 2; s < 8; s += 2) {
      const reg x0 = V::load(xb + s * V::L), x1 = V::load(xb + (s + 1) * V::L);
      for (int i = 0; i < R; ++i) {
        even[i] = V::fmadd(V::low_nibble(words[i]), x0, even[i]);
        words[i] = V::shift_nibble(words[i]);
        odd[i] = V::fmadd(V::low_nibble(words[i]), x1, odd[i]);
        words[i] = V::shift_nibble(words[i]);
      }
    }
    for (int i = 0; i < R; ++i)
      acc[i] = V::fmadd(V::add(even[i], odd[i]), V::q4_scales(scales + (r0 + i) * n_groups + b * groups_per_block), acc[i]);
  }
  for (int i = 0; i < R; ++i) {
    const int64_t r = r0 + i;
    float sum = V::hsum(acc[i]);
    for (int64_t g = n_blocks * groups_per_block; g < n_groups; ++g) {
      float qx = 0.0f;
      for (int64_t k = 0; k < 64; ++k) {
        const uint32_t word = data[r * (cols / 8) + g * 8 + k / 8];
        qx += float((word >> (4 * (k % 8))) & 0xfu) * xq[g * 64 + k];
      }
      sum += bf16_value(scales[r * n_groups + g]) * qx;
    }
    reg bacc = V::zero();
    int64_t g = 0;
    for (; g + V::L <= n_groups; g += V::L) bacc = V::fmadd(V::load_bf16(biases + r * n_groups + g), V::load(xsum + g), bacc);
    float bsum = V::hsum(bacc);
    for (; g < n_groups; ++g) bsum += bf16_value(biases[r * n_groups + g]) * xsum[g];
    y[r] = sum + bsum;
  }
}

void q4_matvec_rows(const WeightView& w, const float* xq, float* y, int64_t r_begin, int64_t r_end) {
  int64_t r = r_begin;
  for (; r + 2 <= r_end; r += 2) q4_matvec_tile<2>(w, xq, y, r);
  for (; r < r_end; ++r) q4_matvec_tile<1>(w, xq, y, r);
}

// --- The tile: R rows × T tokens with one accumulator each; every weight vector decoded once serves T
// tokens, every activation vector loaded once serves R rows.
template <class Dec, int R, int T>
inline void matmul_tile(const Dec& d, const float* x, float* y, int64_t rows, int64_t r0, int64_t t0) {
  const int64_t cols = d.cols;
  reg acc[R][T];
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < T; ++t) acc[i][t] = V::zero();
  for (int64_t b = 0; b < d.n_blocks; ++b) {
    typename Dec::Blk st[R];
    for (int i = 0; i < R; ++i) st[i] = d.load(r0 + i, b);
    for (int s = 0; s < Dec::subs; ++s) {
      reg wv[R];
      for (int i = 0; i < R; ++i) wv[i] = d.sub(st[i], s);
      for (int t = 0; t < T; ++t) {
        const reg xv = V::load(x + (t0 + t) * cols + b * Dec::block + s * V::L);
        for (int i = 0; i < R; ++i) acc[i][t] = V::fmadd(wv[i], xv, acc[i][t]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < T; ++t)
      y[(t0 + t) * rows + r0 + i] = V::hsum(acc[i][t]) + d.tail(r0 + i, x + (t0 + t) * cols);
}

template <class Dec, int R, int T>
inline void matmul_tile_rows(const Dec& d, const float* x, float* y, int64_t rows, int64_t r_begin, int64_t r_end,
                             int64_t t0) {
  int64_t r = r_begin;
  for (; r + R <= r_end; r += R) matmul_tile<Dec, R, T>(d, x, y, rows, r, t0);
  for (; r < r_end; ++r) matmul_tile<Dec, 1, T>(d, x, y, rows, r, t0);
}

// Decode (one token): rows four at a time, four independent accumulation chains, weights streamed once.
// Prefill: the rows are cut into blocks of about 256 KiB of weights that stay in L2 while every token
// tile passes over them, so each weight byte comes from memory once per call.
template <class Dec>
void matmul_rows_dec(const WeightView& w, const float* x, float* y, int64_t n_tokens, int64_t r_begin, int64_t r_end) {
  const Dec d(w);
  if (n_tokens == 1) {
    matmul_tile_rows<Dec, Dec::decode_rows, 1>(d, x, y, w.rows, r_begin, r_end, 0);
    return;
  }
  const int64_t row_bytes = int64_t(w.bytes() / size_t(w.rows));
  const int64_t rows_per_block = (256 * 1024 / row_bytes / V::RP + 1) * V::RP;
  for (int64_t rb = r_begin; rb < r_end; rb += rows_per_block) {
    const int64_t re = rb + rows_per_block < r_end ? rb + rows_per_block : r_end;
    int64_t t = 0;
    for (; t + V::TP <= n_tokens; t += V::TP) matmul_tile_rows<Dec, V::RP, V::TP>(d, x, y, w.rows, rb, re, t);
    for (; t < n_tokens; ++t) matmul_tile_rows<Dec, V::RP, 1>(d, x, y, w.rows, rb, re, t);
  }
}

void matmul_rows(const WeightView& w, const float* x, float* y, int64_t n_tokens, int64_t r_begin, int64_t r_end) {
  switch (w.format) {
    case WeightFormat::f32: matmul_rows_dec<DecF32>(w, x, y, n_tokens, r_begin, r_end); break;
    case WeightFormat::bf16: matmul_rows_dec<DecBf16>(w, x, y, n_tokens, r_begin, r_end); break;
    case WeightFormat::q8: matmul_rows_dec<DecQ8>(w, x, y, n_tokens, r_begin, r_end); break;
    case WeightFormat::q4:
      if (n_tokens == 1) {
        q4_matvec_rows(w, x, y, r_begin, r_end);
      } else {
        matmul_rows_dec<DecQ4>(w, x, y, n_tokens, r_begin, r_end);
      }
      break;
  }
}

// --- Small vector kernels, in the same fixed lane order.
float dot(const float* a, const float* b, int64_t n) {
  reg acc = V::zero();
  int64_t i = 0;
  for (; i + V::L <= n; i += V::L) acc = V::fmadd(V::load(a + i), V::load(b + i), acc);
  float sum = V::hsum(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

float sum_squares(const float* a, int64_t n) { return dot(a, a, n); }

void axpy(float* acc, const float* x, float a, int64_t n) {
  const reg av = V::set1(a);
  int64_t i = 0;
  for (; i + V::L <= n; i += V::L) V::store(acc + i, V::fmadd(av, V::load(x + i), V::load(acc + i)));
  for (; i < n; ++i) acc[i] = __builtin_fmaf(a, x[i], acc[i]);
}

// exp(x) as Cephes' expf computes it, in plain operations the compiler vectorizes: x = n·ln2 + r with n
// = round(x·log2e) (by the 1.5·2^23 shift), ln2 split in two for an exact reduction, a degree-6
// polynomial on |r| ≤ ln2/2, and 2^n from the exponent bits. Relative error ~1e-7 (Cephes' bound) for
// x ∈ [−87.3, 88.3], the range the caller clamps x to (2^n stays a normal number).
inline float exp_clamped(float x) {
  const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

// x[i] = x[i] / (1 + exp(−x[i])). The clamp gets a loop of its own: fused with the rest, the compiler
// turns it into branches and vectorizes nothing. Past the clamp the result is x or ~0 anyway.
void silu(float* x, int64_t n) {
  constexpr int64_t block = 64;
  float neg[block];
  for (int64_t b = 0; b < n; b += block) {
    const int64_t m = n - b < block ? n - b : block;
    for (int64_t i = 0; i < m; ++i) {
      const float v = -x[b + i];
      neg[i] = v < -87.3f ? -87.3f : v > 88.3f ? 88.3f : v;
    }
    for (int64_t i = 0; i < m; ++i) x[b + i] = x[b + i] / (1.0f + exp_clamped(neg[i]));
  }
}

// --- Gated DeltaNet: one value head (cpu_backend.cpp's gated_delta_rule has the math).

// NB vectors of state columns through every token. blk: the block, row i at blk + i·ld (the state in
// place, or a packed copy). Per token: u = Sᵀk̂ and p = Sᵀq̂ from the old state, δ = β(v − e^g·u),
// out = e^g·p + (k̂·q̂)·δ (= S_newᵀq̂), S ← e^g·S + k̂ ⊗ δ. Each sum over the k_dim rows is one chain per
// column in row order.
//
// The block holds P = S / scale: each token's decay goes into the scalar `scale`, so the update is one
// fma per element (P += k̂ ⊗ δ/scale) instead of two, and the update of token t shares its pass with the
// sums of token t + 1. The last token's pass, or one where the scale leaves [2^-64, 2^64] (a strong
// decay; it would otherwise underflow), writes S itself: S = scale·P + k̂ ⊗ δ. So a call of one token
// reads the state once and writes it once.
template <int NB>
inline void gated_delta_recurrent_block(const GatedDeltaHead& h, const float* decay, const float* kq_all, int64_t c0, float* blk,
                                        int64_t ld) {
  const int64_t dk = h.k_dim;
  reg u[NB], p[NB];  // Pᵀk̂, Pᵀq̂ of the current token
  for (int j = 0; j < NB; ++j) u[j] = p[j] = V::zero();
  for (int64_t i = 0; i < dk; ++i) {
    const reg ki = V::set1(h.k[i]), qi = V::set1(h.q[i]);
    for (int j = 0; j < NB; ++j) {
      const reg sv = V::load(blk + i * ld + j * V::L);
      u[j] = V::fmadd(sv, ki, u[j]);
      p[j] = V::fmadd(sv, qi, p[j]);
    }
  }
  float scale = 1.0f;  // S = scale · P
  for (int64_t t = 0; t < h.n_tokens; ++t) {
    const float* k = h.k + t * dk;
    const float* q = h.q + t * dk;
    const float new_scale = scale * decay[t];  // e^g · scale
    const reg beta = V::set1(h.beta[t * h.gate_stride]), minus_decayed = V::set1(-new_scale);
    const reg kq = V::set1(kq_all[t]), decayed = V::set1(new_scale);
    const float* v = h.v + t * h.v_stride + c0;
    float* o = h.out + t * h.out_stride + c0;
    reg delta[NB];
    for (int j = 0; j < NB; ++j) {
      delta[j] = V::mul(beta, V::fmadd(minus_decayed, u[j], V::load(v + j * V::L)));
      V::store(o + j * V::L, V::fmadd(decayed, p[j], V::mul(kq, delta[j])));
    }
    if (t + 1 == h.n_tokens) {
      for (int64_t i = 0; i < dk; ++i) {
        const reg ki = V::set1(k[i]);
        for (int j = 0; j < NB; ++j) {
          float* sp = blk + i * ld + j * V::L;
          V::store(sp, V::fmadd(decayed, V::load(sp), V::mul(ki, delta[j])));
        }
      }
      break;
    }
    const float* k_next = k + dk;
    const float* q_next = q + dk;
    for (int j = 0; j < NB; ++j) u[j] = p[j] = V::zero();
    if (!(new_scale >= 0x1p-64f && new_scale <= 0x1p64f)) {
      for (int64_t i = 0; i < dk; ++i) {
        const reg ki = V::set1(k[i]), kn = V::set1(k_next[i]), qn = V::set1(q_next[i]);
        for (int j = 0; j < NB; ++j) {
          float* sp = blk + i * ld + j * V::L;
          const reg sv = V::fmadd(decayed, V::load(sp), V::mul(ki, delta[j]));
          V::store(sp, sv);
          u[j] = V::fmadd(sv, kn, u[j]);
          p[j] = V::fmadd(sv, qn, p[j]);
        }
      }
      scale = 1.0f;
    } else {
      const reg inv = V::set1(1.0f / new_scale);
      for (int j = 0; j < NB; ++j) delta[j] = V::mul(delta[j], inv);
      for (int64_t i = 0; i < dk; ++i) {
        const reg ki = V::set1(k[i]), kn = V::set1(k_next[i]), qn = V::set1(q_next[i]);
        for (int j = 0; j < NB; ++j) {
          float* sp = blk + i * ld + j * V::L;
          const reg sv = V::fmadd(ki, delta[j], V::load(sp));
          V::store(sp, sv);
          u[j] = V::fmadd(sv, kn, u[j]);
          p[j] = V::fmadd(sv, qn, p[j]);
        }
      }
      scale = new_scale;
    }
  }
}

// Columns [c0, c0 + NB·L): in place for one token (one pass each way is all it does); for more, on a
// packed copy, since rows of the state v_dim floats apart map a block onto few L1 sets.
template <int NB>
inline void gated_delta_recurrent_columns(const GatedDeltaHead& h, const float* decay, const float* kq, int64_t c0,
                                          float* scratch) {
  constexpr int64_t W = NB * V::L;
  float* s = h.state + c0;
  if (h.n_tokens == 1) return gated_delta_recurrent_block<NB>(h, decay, kq, c0, s, h.v_dim);
  for (int64_t i = 0; i < h.k_dim; ++i)
    for (int j = 0; j < NB; ++j) V::store(scratch + i * W + j * V::L, V::load(s + i * h.v_dim + j * V::L));
  gated_delta_recurrent_block<NB>(h, decay, kq, c0, scratch, W);
  for (int64_t i = 0; i < h.k_dim; ++i)
    for (int j = 0; j < NB; ++j) V::store(s + i * h.v_dim + j * V::L, V::load(scratch + i * W + j * V::L));
}

// Columns [c0, v_dim) one at a time (v_dim not a multiple of L), the state decayed token by token.
inline void gated_delta_recurrent_tail(const GatedDeltaHead& h, const float* decay_all, const float* kq_all, int64_t c0) {
  const int64_t dk = h.k_dim, dv = h.v_dim;
  for (int64_t t = 0; t < h.n_tokens; ++t) {
    const float* q = h.q + t * dk;
    const float* k = h.k + t * dk;
    const float decay = decay_all[t], b = h.beta[t * h.gate_stride], kq = kq_all[t];
    for (int64_t c = c0; c < dv; ++c) {
      float u = 0.0f, p = 0.0f;
      for (int64_t i = 0; i < dk; ++i) {
        u += h.state[i * dv + c] * k[i];
        p += h.state[i * dv + c] * q[i];
      }
      const float delta = b * (h.v[t * h.v_stride + c] - decay * u);
      h.out[t * h.out_stride + c] = decay * p + kq * delta;
      for (int64_t i = 0; i < dk; ++i) h.state[i * dv + c] = decay * h.state[i * dv + c] + k[i] * delta;
    }
  }
}

// Four vectors of columns at a time: 8 accumulation chains, and a k_dim × 4L block of the state (16 KiB
// at k_dim 128 with AVX2) stays in L1 across tokens.
void gated_delta_recurrent(const GatedDeltaHead& h, float* scratch) {
  constexpr int NB = 4;
  static_assert(NB * V::L <= gated_delta_recurrent_block_columns);
  float* decay = scratch + h.k_dim * gated_delta_recurrent_block_columns;  // [T] e^g
  float* kq = decay + h.n_tokens;                                           // [T] k̂·q̂
  for (int64_t t = 0; t < h.n_tokens; ++t) {
    decay[t] = std::exp(h.g[t * h.gate_stride]);
    kq[t] = dot(h.k + t * h.k_dim, h.q + t * h.k_dim, h.k_dim);
  }
  int64_t c = 0;
  for (; c + NB * V::L <= h.v_dim; c += NB * V::L) gated_delta_recurrent_columns<NB>(h, decay, kq, c, scratch);
  for (; c + V::L <= h.v_dim; c += V::L) gated_delta_recurrent_columns<1>(h, decay, kq, c, scratch);
  if (c < h.v_dim) gated_delta_recurrent_tail(h, decay, kq, c);
}

// A small matrix product for the chunked form, all operands in L1/L2:
//   C[m, n] = (accumulate ? c_scale · C[m, n] : 0) + row_scale[m] · Σ_k A(m, k) · B[k, n],  A(m, k) = a[m·a_rs + k·a_cs]
// for m < M, n < N, k < K. a_lower: A(m, k) = 0 for k > m (stored as zeros), so a tile of rows [m0, m1)
// sums k < m1 only. c_lower: only columns n ≤ m are wanted; tiles wholly right of the diagonal are
// skipped (others may write there). Each element is one chain over k in order; whether a column takes
// the vector or the scalar path depends on N alone, so results depend only on the shapes.
struct Gemm {
  int64_t M, N, K;
  const float* a;
  int64_t a_rs, a_cs;
  const float* b;  // [K, ldb]
  int64_t ldb;
  float* c;        // [M, ldc]
  int64_t ldc;
  bool accumulate = false;
  float c_scale = 1.0f;
  const float* row_scale = nullptr;  // [M], or null for 1
  bool a_lower = false, c_lower = false;
};

template <int MR, int NV>
inline void gemm_tile(const Gemm& g, int64_t m0, int64_t n0, int64_t k_end) {
  reg acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = V::zero();
  const float* a = g.a + m0 * g.a_rs;
  for (int64_t k = 0; k < k_end; ++k) {
    reg bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = V::load(g.b + k * g.ldb + n0 + v * V::L);
    for (int m = 0; m < MR; ++m) {
      const reg av = V::set1(a[m * g.a_rs + k * g.a_cs]);
      for (int v = 0; v < NV; ++v) acc[m][v] = V::fmadd(av, bv[v], acc[m][v]);
    }
  }
  const reg c_scale = V::set1(g.c_scale);
  for (int m = 0; m < MR; ++m) {
    const reg scale = V::set1(g.row_scale ? g.row_scale[m0 + m] : 1.0f);
    float* cm = g.c + (m0 + m) * g.ldc + n0;
    for (int v = 0; v < NV; ++v) {
      reg* out = &acc[m][v];
      *out = g.accumulate ? V::fmadd(scale, *out, V::mul(c_scale, V::load(cm + v * V::L))) : V::mul(scale, *out);
      V::store(cm + v * V::L, *out);
    }
  }
}

template <int MR, int NV>
inline void gemm_tile_rows(const Gemm& g, int64_t rows, int64_t m0, int64_t n0, int64_t k_end) {
  if constexpr (MR > 1) {
    if (rows < MR) return gemm_tile_rows<MR - 1, NV>(g, rows, m0, n0, k_end);
  }
  gemm_tile<MR, NV>(g, m0, n0, k_end);
}

void gemm(const Gemm& g) {
  constexpr int64_t MR = V::GR, W = V::GV * V::L;
  for (int64_t m0 = 0; m0 < g.M; m0 += MR) {
    const int64_t m1 = m0 + MR < g.M ? m0 + MR : g.M;
    const int64_t k_end = g.a_lower && m1 < g.K ? m1 : g.K;
    const int64_t n_end = g.c_lower && m1 < g.N ? m1 : g.N;
    int64_t n0 = 0;
    for (; n0 < n_end && n0 + W <= g.N; n0 += W) gemm_tile_rows<V::GR, V::GV>(g, m1 - m0, m0, n0, k_end);
    for (; n0 < n_end && n0 + V::L <= g.N; n0 += V::L) gemm_tile_rows<V::GR, 1>(g, m1 - m0, m0, n0, k_end);
    for (int64_t m = m0; m < m1; ++m) {
      const float scale = g.row_scale ? g.row_scale[m] : 1.0f;
      for (int64_t n = n0; n < n_end; ++n) {
        float sum = 0.0f;
        for (int64_t k = 0; k < k_end; ++k) sum += g.a[m * g.a_rs + k * g.a_cs] * g.b[k * g.ldb + n];
        float& cmn = g.c[m * g.ldc + n];
        cmn = g.accumulate ? g.c_scale * cmn + scale * sum : scale * sum;
      }
    }
  }
}

// One chunk of n tokens with incoming state S [dk, dv] (transformers' torch_chunk_gated_delta_rule):
// G = cumsum(g), D_ij = exp(G_i − G_j) for j ≤ i, A = strictly_lower(diag(β) K̂K̂ᵀ ⊙ D),
// T = (I + A)⁻¹, U = T(β⊙V), W = T(β⊙e^G⊙K̂), V_new = U − W S,
// O = (e^G⊙Q̂) S + tril(Q̂K̂ᵀ ⊙ D) V_new,  S ← e^{G_last} S + (e^{G_last − G}⊙K̂)ᵀ V_new.
// Every exponent is ≤ 0, so nothing overflows however strong the decay.
void gated_delta_chunk(const GatedDeltaHead& h, float* scratch) {
  const int64_t n = h.n_tokens, dk = h.k_dim, dv = h.v_dim, w = dv + dk;
  float* cum = scratch;            // [n] G
  float* exp_cum = cum + n;        // [n] e^G
  float* exp_rest = exp_cum + n;   // [n] e^{G_last − G}
  float* kt = exp_rest + n;        // [dk, n] K̂ᵀ
  float* kk = kt + dk * n;         // [n, n] K̂K̂ᵀ, then −A
  float* qk = kk + n * n;          // [n, n] Q̂K̂ᵀ, then P = tril(Q̂K̂ᵀ ⊙ D)
  float* tri = qk + n * n;         // [n, n] T, zeros above the diagonal
  float* rhs = tri + n * n;        // [n, dv + dk] [β⊙V | −β⊙e^G⊙K̂]
  float* x = rhs + n * w;          // [n, dv + dk] T·rhs = [U | −W], then [V_new | −W]
  float* kd = x + n * w;           // [n, dk] e^{G_last − G}⊙K̂
  float* S = h.state;

  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) cum[i] = acc += h.g[i * h.gate_stride];
  for (int64_t i = 0; i < n; ++i) {
    exp_cum[i] = std::exp(cum[i]);
    exp_rest[i] = std::exp(cum[n - 1] - cum[i]);
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < dk; ++d) kt[d * n + i] = h.k[i * dk + d];
  gemm({.M = n, .N = n, .K = dk, .a = h.k, .a_rs = dk, .a_cs = 1, .b = kt, .ldb = n, .c = kk, .ldc = n, .c_lower = true});
  gemm({.M = n, .N = n, .K = dk, .a = h.q, .a_rs = dk, .a_cs = 1, .b = kt, .ldb = n, .c = qk, .ldc = n, .c_lower = true});
  for (int64_t i = 0; i < n; ++i) {
    const float beta = h.beta[i * h.gate_stride];
    for (int64_t j = 0; j <= i; ++j) {
      const float decay = std::exp(cum[i] - cum[j]);
      kk[i * n + j] = j < i ? -(beta * kk[i * n + j] * decay) : 0.0f;
      qk[i * n + j] *= decay;
    }
    for (int64_t j = i + 1; j < n; ++j) qk[i * n + j] = 0.0f;
  }
  // Forward substitution, row by row: T_i = e_i − Σ_{j<i} A_ij T_j. Columns ≥ i of the sum are zero (T_j
  // is zero right of j); the product runs to the next vector boundary, then row i is set past column i.
  for (int64_t i = 0; i < n; ++i) {
    float* ti = tri + i * n;
    if (i > 0) {
      const int64_t cols = (i + V::L - 1) / V::L * V::L < n ? (i + V::L - 1) / V::L * V::L : n;
      gemm({.M = 1, .N = cols, .K = i, .a = kk + i * n, .a_rs = 0, .a_cs = 1, .b = tri, .ldb = n, .c = ti, .ldc = n});
    }
    ti[i] = 1.0f;
    for (int64_t c = i + 1; c < n; ++c) ti[c] = 0.0f;
  }
  for (int64_t i = 0; i < n; ++i) {
    const float beta = h.beta[i * h.gate_stride], beta_key = -beta * exp_cum[i];
    const float* v = h.v + i * h.v_stride;
    for (int64_t c = 0; c < dv; ++c) rhs[i * w + c] = beta * v[c];
    for (int64_t d = 0; d < dk; ++d) rhs[i * w + dv + d] = beta_key * h.k[i * dk + d];
  }
  gemm({.M = n, .N = w, .K = n, .a = tri, .a_rs = n, .a_cs = 1, .b = rhs, .ldb = w, .c = x, .ldc = w, .a_lower = true});
  // V_new = U + (−W) S, in place over U.
  gemm({.M = n, .N = dv, .K = dk, .a = x + dv, .a_rs = w, .a_cs = 1, .b = S, .ldb = dv, .c = x, .ldc = w, .accumulate = true});
  gemm({.M = n, .N = dv, .K = dk, .a = h.q, .a_rs = dk, .a_cs = 1, .b = S, .ldb = dv, .c = h.out, .ldc = h.out_stride,
        .row_scale = exp_cum});
  gemm({.M = n, .N = dv, .K = n, .a = qk, .a_rs = n, .a_cs = 1, .b = x, .ldb = w, .c = h.out, .ldc = h.out_stride,
        .accumulate = true, .a_lower = true});
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < dk; ++d) kd[i * dk + d] = exp_rest[i] * h.k[i * dk + d];
  gemm({.M = dk, .N = dv, .K = n, .a = kd, .a_rs = 1, .a_cs = dk, .b = x, .ldb = w, .c = S, .ldc = dv, .accumulate = true,
        .c_scale = exp_cum[n - 1]});
}

constexpr CpuKernels kernel_table(const char* isa) {
  return {isa, &prepare_q4_activations, &matmul_rows, &dot, &sum_squares, &axpy, &silu, &gated_delta_recurrent, &gated_delta_chunk};
}
