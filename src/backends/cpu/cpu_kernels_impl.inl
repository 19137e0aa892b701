// The ISA-independent body of the CPU kernel tables, included by kernels_<isa>.cpp inside an anonymous
// namespace after a type V that supplies the vector operations (V::L lanes of fp32) and after the
// file's target pragma, so each inclusion compiles for its own instruction set.
// Owns the tiling of matmul (rows × tokens) and the per-format decoders. See cpu_kernels.hpp for the
// determinism contract these loops keep.
//
// Needs from V: L, reg, ireg, RP/TP (prefill tile: rows × tokens), zero, load, set1, add, mul, fmadd, hsum,
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

constexpr CpuKernels kernel_table(const char* isa) {
  return {isa, &prepare_q4_activations, &matmul_rows, &dot, &sum_squares, &axpy};
}
