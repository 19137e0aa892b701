// The op-test harness: every op of every backend under test against the CPU reference backend on fresh
// random inputs, one small case per op over several shapes, each assertion with its tolerance and why.
// Also the determinism guarantees of the optimized CPU backend (thread count, weight address).
// A new backend (CUDA) joins by adding an entry to backends_under_test() with its upload/download.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "backends/backend.hpp"
#include "backends/cpu/cpu_kernels.hpp"
#include "core/thread_pool.hpp"
#include "quant/quantize.hpp"

namespace moeflux {
namespace {

// --- Backends under test -------------------------------------------------------------------------

struct BackendUnderTest {
  std::string label;
  std::function<std::unique_ptr<Backend>()> make;
  // Moves bytes between host memory and memory from the backend's alloc_activations. Host backends copy.
  std::function<void(void* backend_dst, const void* host_src, size_t bytes)> upload =
      [](void* d, const void* s, size_t n) { if (n) std::memcpy(d, s, n); };  // empty jobs pass null
  std::function<void(void* host_dst, const void* backend_src, size_t bytes)> download =
      [](void* d, const void* s, size_t n) { if (n) std::memcpy(d, s, n); };
};

std::vector<BackendUnderTest> backends_under_test() {
  std::vector<BackendUnderTest> list;
  list.push_back({"cpu_default_4threads", [] { return make_cpu_backend(4); }});
  // Every table this machine runs, so the ISA a user's CPU picks is tested wherever it exists.
  if (const CpuKernels* k = cpu_kernels_avx512())
    list.push_back({"cpu_avx512_3threads", [k] { return make_cpu_backend_with_kernels(*k, 3); }});
  if (const CpuKernels* k = cpu_kernels_avx2())
    list.push_back({"cpu_avx2_3threads", [k] { return make_cpu_backend_with_kernels(*k, 3); }});
  list.push_back({"cpu_scalar_2threads", [] { return make_cpu_backend_with_kernels(cpu_kernels_scalar(), 2); }});
  return list;
}

// A buffer in the backend's memory, filled from and read back to host vectors.
class DeviceBuffer {
 public:
  DeviceBuffer(const BackendUnderTest& but, Backend& be, size_t bytes)
      : but_(but), be_(be), bytes_(bytes), p_(be.alloc_activations((bytes + 3) / 4)) {}
  ~DeviceBuffer() { be_.free_activations(p_); }
  template <typename T>
  DeviceBuffer(const BackendUnderTest& but, Backend& be, const std::vector<T>& host) : DeviceBuffer(but, be, host.size() * sizeof(T)) {
    if (bytes_) but_.upload(p_, host.data(), bytes_);
  }
  float* f() { return p_; }
  void* raw() { return p_; }
  std::vector<float> read() const {
    std::vector<float> out(bytes_ / 4);
    but_.download(out.data(), p_, bytes_);
    return out;
  }

 private:
  const BackendUnderTest& but_;
  Backend& be_;
  size_t bytes_;
  float* p_;
};

std::vector<float> gaussian(size_t n, std::mt19937& rng, float sigma = 1.0f) {
  std::normal_distribution<float> dist(0.0f, sigma);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// Reports the first few elements outside their tolerance and how many there were.
struct Mismatches {
  int count = 0;
  std::string first;
  void check(bool ok, size_t i, double got, double want, double tol) {
    if (ok) return;
    if (count++ < 3) first += "\n  [" + std::to_string(i) + "] got " + std::to_string(got) + " want " + std::to_string(want) + " tol " + std::to_string(tol);
  }
};

class BackendOps : public ::testing::TestWithParam<BackendUnderTest> {
 protected:
  void SetUp() override { be_ = GetParam().make(); }
  const BackendUnderTest& but() const { return GetParam(); }
  std::unique_ptr<Backend> ref_ = make_reference_backend();
  std::unique_ptr<Backend> be_;
  std::mt19937 rng_{12345};
};

// --- matmul ----------------------------------------------------------------------------------------

struct MatmulShape { int64_t rows, cols, n_tokens; };

// Copies a quantized matrix into the backend's memory and returns a view of it there.
struct DeviceWeight {
  DeviceWeight(const BackendUnderTest& but, Backend& be, const QuantizedMatrix& m)
      : data(but, be, m.data), scales(but, be, m.scales), biases(but, be, m.biases),
        view{m.format, m.rows, m.cols, data.raw(), m.scales.empty() ? nullptr : scales.raw(),
             m.biases.empty() ? nullptr : biases.raw()} {}
  DeviceBuffer data, scales, biases;
  WeightView view;
};

// y [T, rows] against the reference's y_ref for y = x · mᵀ, x: [T, cols].
void expect_matmul_close(const QuantizedMatrix& m, const std::vector<float>& x, int64_t n_tokens,
                         const std::vector<float>& y, const std::vector<float>& y_ref) {
  std::vector<float> row(size_t(m.cols));
  Mismatches bad;
  for (int64_t r = 0; r < m.rows; ++r) {
    dequantize_row(m.view(), r, row.data());
    for (int64_t t = 0; t < n_tokens; ++t) {
      double abs_sum = 0;
      for (int64_t c = 0; c < m.cols; ++c) abs_sum += std::fabs(double(row[c]) * x[t * m.cols + c]);
      // Both sides sum the same exactly-decoded products in fp32 in different orders; the error of
      // each is ~√n·2^-24·Σ|w·x| in practice (≤ n·2^-24·Σ|w·x| in the worst case). 2e-5·Σ|w·x| is ~5×
      // the typical difference at n = 4096 and far below any real decode or indexing bug (O(Σ|w·x|/n)).
      const double tol = 2e-5 * abs_sum + 1e-30;
      const size_t i = size_t(t * m.rows + r);
      bad.check(std::fabs(double(y[i]) - y_ref[i]) <= tol, i, y[i], y_ref[i], tol);
    }
  }
  EXPECT_EQ(bad.count, 0) << bad.first;
}

TEST_P(BackendOps, MatmulMatchesReference) {
  const std::vector<MatmulShape> shapes = {
      {1, 64, 1},   {7, 128, 3},   {33, 256, 17},  {1000, 4096, 1}, {257, 1024, 17}, {64, 4160, 5},
      {5, 1536, 1}, {96, 2048, 7}, {1000, 512, 3}, {1, 4096, 17},
  };
  for (WeightFormat format : {WeightFormat::f32, WeightFormat::bf16, WeightFormat::q8, WeightFormat::q4}) {
    std::vector<MatmulShape> all = shapes;
    if (weight_format_group(format) == 1) all.push_back({9, 100, 3});  // a column tail past the last vector
    for (const auto& s : all) {
      SCOPED_TRACE(std::string(weight_format_name(format)) + " rows=" + std::to_string(s.rows) + " cols=" +
                   std::to_string(s.cols) + " T=" + std::to_string(s.n_tokens));
      const auto w = gaussian(size_t(s.rows * s.cols), rng_, 0.05f);
      const auto x = gaussian(size_t(s.n_tokens * s.cols), rng_);
      const QuantizedMatrix m = quantize_matrix(w.data(), s.rows, s.cols, format);
      std::vector<float> y_ref(size_t(s.n_tokens * s.rows));
      ref_->matmul(m.view(), x.data(), y_ref.data(), s.n_tokens);

      DeviceWeight dw(but(), *be_, m);
      DeviceBuffer dx(but(), *be_, x), dy(but(), *be_, y_ref.size() * 4);
      be_->matmul(dw.view, dx.f(), dy.f(), s.n_tokens);
      const auto y = dy.read();

      expect_matmul_close(m, x, s.n_tokens, y, y_ref);
    }
  }
}

// Jobs of mixed formats, shapes and token counts, some sharing their input (gate and up of an expert)
// and one empty: each job's y is bit-identical to matmul alone on the same backend, and within the
// matmul tolerance of the reference.
TEST_P(BackendOps, MatmulManyMatchesMatmulAndReference) {
  struct Case { WeightFormat format; int64_t rows, cols, n_tokens; int x_from; };  // x_from: job whose x to share, or -1
  const std::vector<Case> cases = {
      {WeightFormat::q4, 96, 2048, 1, -1}, {WeightFormat::q4, 96, 2048, 1, 0},   {WeightFormat::q4, 2048, 768, 1, -1},
      {WeightFormat::q8, 33, 256, 17, -1}, {WeightFormat::bf16, 1000, 512, 3, -1}, {WeightFormat::f32, 7, 128, 3, -1},
      {WeightFormat::q4, 257, 1024, 17, -1}, {WeightFormat::q4, 64, 1024, 17, 6}, {WeightFormat::q8, 5, 1536, 0, -1},
      {WeightFormat::bf16, 1, 64, 1, -1},   {WeightFormat::q4, 3000, 4096, 1, -1}, {WeightFormat::f32, 9, 100, 2, -1},
  };
  std::vector<QuantizedMatrix> mats;
  std::vector<std::vector<float>> xs;
  std::vector<std::unique_ptr<DeviceWeight>> dws;
  std::vector<std::unique_ptr<DeviceBuffer>> dxs, dys_one, dys_many;
  std::vector<MatmulJob> jobs;
  for (const Case& c : cases) {
    const auto w = gaussian(size_t(c.rows * c.cols), rng_, 0.05f);
    mats.push_back(quantize_matrix(w.data(), c.rows, c.cols, c.format));
    xs.push_back(c.x_from >= 0 ? xs[size_t(c.x_from)] : gaussian(size_t(c.n_tokens * c.cols), rng_));
    dws.push_back(std::make_unique<DeviceWeight>(but(), *be_, mats.back()));
    dxs.push_back(std::make_unique<DeviceBuffer>(but(), *be_, xs.back()));
    const size_t y_bytes = size_t(c.n_tokens * c.rows) * 4;
    dys_one.push_back(std::make_unique<DeviceBuffer>(but(), *be_, y_bytes));
    dys_many.push_back(std::make_unique<DeviceBuffer>(but(), *be_, y_bytes));
    const float* x = c.x_from >= 0 ? jobs[size_t(c.x_from)].x : dxs.back()->f();
    jobs.push_back({dws.back()->view, x, dys_many.back()->f(), c.n_tokens});
  }
  be_->matmul_many(jobs.data(), int64_t(jobs.size()));
  for (size_t j = 0; j < cases.size(); ++j) {
    const Case& c = cases[j];
    SCOPED_TRACE("job " + std::to_string(j) + " " + weight_format_name(c.format) + " rows=" + std::to_string(c.rows) +
                 " cols=" + std::to_string(c.cols) + " T=" + std::to_string(c.n_tokens));
    be_->matmul(jobs[j].w, jobs[j].x, dys_one[j]->f(), c.n_tokens);
    const auto y_one = dys_one[j]->read(), y_many = dys_many[j]->read();
    // Bit-identical; an empty job has no bytes (and null data, which memcmp may not see).
    EXPECT_TRUE(y_one.empty() || std::memcmp(y_one.data(), y_many.data(), y_one.size() * 4) == 0) << "matmul_many differs from matmul";
    std::vector<float> y_ref(y_one.size());
    ref_->matmul(mats[j].view(), xs[j].data(), y_ref.data(), c.n_tokens);
    expect_matmul_close(mats[j], xs[j], c.n_tokens, y_many, y_ref);
  }
}

// --- small ops -------------------------------------------------------------------------------------

TEST_P(BackendOps, EmbedRowsMatchesReference) {
  for (WeightFormat format : {WeightFormat::f32, WeightFormat::bf16, WeightFormat::q8, WeightFormat::q4}) {
    for (int64_t n_tokens : {1, 3, 17}) {
      const int64_t rows = 50, cols = 256;
      const auto w = gaussian(size_t(rows * cols), rng_);
      const QuantizedMatrix m = quantize_matrix(w.data(), rows, cols, format);
      std::vector<int32_t> ids(static_cast<size_t>(n_tokens));
      for (auto& id : ids) id = int32_t(rng_() % rows);
      ids[0] = int32_t(rows - 1);
      std::vector<float> out_ref(size_t(n_tokens * cols));
      ref_->embed_rows(m.view(), ids.data(), n_tokens, out_ref.data());
      DeviceWeight dw(but(), *be_, m);
      DeviceBuffer dout(but(), *be_, out_ref.size() * 4);
      be_->embed_rows(dw.view, ids.data(), n_tokens, dout.f());
      // Decoding is exact arithmetic (see dequantize_row), so any correct backend is bit-identical.
      EXPECT_EQ(dout.read(), out_ref) << weight_format_name(format) << " T=" << n_tokens;
    }
  }
}

TEST_P(BackendOps, RmsNormMatchesReference) {
  for (int64_t dim : {64, 1000, 4096}) {
    for (int64_t n_rows : {1, 3, 17}) {
      for (bool in_place : {false, true}) {
        const auto x = gaussian(size_t(n_rows * dim), rng_, 3.0f);
        const auto weight = gaussian(size_t(dim), rng_);
        std::vector<float> out_ref(x.size());
        ref_->rms_norm(x.data(), weight.data(), 1e-6f, n_rows, dim, out_ref.data());
        DeviceBuffer dx(but(), *be_, x), dw(but(), *be_, weight), dout(but(), *be_, x.size() * 4);
        float* out = in_place ? dx.f() : dout.f();
        be_->rms_norm(dx.f(), dw.f(), 1e-6f, n_rows, dim, out);
        const auto got = in_place ? dx.read() : dout.read();
        Mismatches bad;
        for (size_t i = 0; i < got.size(); ++i) {
          // Only Σx² is reordered (relative error ~√dim·2^-24); it enters through rsqrt, halving it.
          const double tol = 1e-5 * std::fabs(out_ref[i]) + 1e-7;
          bad.check(std::fabs(got[i] - out_ref[i]) <= tol, i, got[i], out_ref[i], tol);
        }
        EXPECT_EQ(bad.count, 0) << "dim=" << dim << " rows=" << n_rows << " in_place=" << in_place << bad.first;
      }
    }
  }
}

TEST_P(BackendOps, RopeNeoxMatchesReference) {
  struct Case { int64_t n_tokens, n_heads, head_dim, rot_dim; };
  for (const Case& c : {Case{1, 4, 64, 64}, Case{3, 8, 128, 128}, Case{17, 2, 128, 32}, Case{5, 3, 256, 64}}) {
    const auto x = gaussian(size_t(c.n_tokens * c.n_heads * c.head_dim), rng_);
    std::vector<int32_t> positions(size_t(c.n_tokens));
    for (auto& p : positions) p = int32_t(rng_() % 100000);
    std::vector<float> inv_freq(size_t(c.rot_dim / 2));
    for (size_t i = 0; i < inv_freq.size(); ++i) inv_freq[i] = std::pow(1e6f, -2.0f * float(i) / float(c.rot_dim));
    auto x_ref = x;
    ref_->rope_neox(x_ref.data(), c.n_tokens, c.n_heads, c.head_dim, c.rot_dim, positions.data(), inv_freq.data());
    DeviceBuffer dx(but(), *be_, x);
    be_->rope_neox(dx.f(), c.n_tokens, c.n_heads, c.head_dim, c.rot_dim, positions.data(), inv_freq.data());
    const auto got = dx.read();
    Mismatches bad;
    for (size_t i = 0; i < got.size(); ++i) {
      // The fp32 angle is the same expression on both sides; cos/sin implementations may differ by a
      // few ulp (GPU libm), so each output may move by ~4·2^-24 of |x0| + |x1| ≤ 2·max|x|.
      const double tol = 1e-6 * 8.0 + 1e-6 * std::fabs(x_ref[i]);
      bad.check(std::fabs(got[i] - x_ref[i]) <= tol, i, got[i], x_ref[i], tol);
    }
    EXPECT_EQ(bad.count, 0) << "T=" << c.n_tokens << " rot_dim=" << c.rot_dim << bad.first;
    // Dims past rot_dim pass through untouched.
    for (int64_t t = 0; t < c.n_tokens * c.n_heads; ++t)
      for (int64_t d = c.rot_dim; d < c.head_dim; ++d) ASSERT_EQ(got[t * c.head_dim + d], x[t * c.head_dim + d]);
  }
}

TEST_P(BackendOps, AttentionMatchesReference) {
  struct Case { int64_t n_tokens, n_past, n_head, n_head_kv, head_dim; };
  for (const Case& c : {Case{1, 0, 4, 4, 64}, Case{1, 37, 8, 2, 128}, Case{3, 5, 8, 4, 64}, Case{17, 40, 4, 1, 128},
                        Case{17, 0, 16, 4, 64}}) {
    const int64_t n_ctx = c.n_past + c.n_tokens;
    const auto q = gaussian(size_t(c.n_tokens * c.n_head * c.head_dim), rng_);
    const auto k = gaussian(size_t(n_ctx * c.n_head_kv * c.head_dim), rng_);
    const auto v = gaussian(size_t(n_ctx * c.n_head_kv * c.head_dim), rng_);
    const float scale = 1.0f / std::sqrt(float(c.head_dim));
    std::vector<float> out_ref(q.size());
    ref_->attention(q.data(), k.data(), v.data(), c.n_tokens, c.n_past, c.n_head, c.n_head_kv, c.head_dim, scale,
                    out_ref.data());
    DeviceBuffer dq(but(), *be_, q), dk(but(), *be_, k), dv(but(), *be_, v), dout(but(), *be_, q.size() * 4);
    be_->attention(dq.f(), dk.f(), dv.f(), c.n_tokens, c.n_past, c.n_head, c.n_head_kv, c.head_dim, scale, dout.f());
    const auto got = dout.read();
    const float v_max = std::fabs(*std::max_element(v.begin(), v.end(), [](float a, float b) { return std::fabs(a) < std::fabs(b); }));
    Mismatches bad;
    for (size_t i = 0; i < got.size(); ++i) {
      // The output is a convex combination of values: score and softmax rounding (~1e-6 relative in
      // each probability) move it by ~1e-6·max|v|. A wrong mask, head mapping or scale moves it by O(1).
      const double tol = 1e-5 * v_max;
      bad.check(std::fabs(got[i] - out_ref[i]) <= tol, i, got[i], out_ref[i], tol);
    }
    EXPECT_EQ(bad.count, 0) << "T=" << c.n_tokens << " n_past=" << c.n_past << " gqa=" << c.n_head / c.n_head_kv << bad.first;
  }
}

TEST_P(BackendOps, RouterSoftmaxTopkMatchesReference) {
  struct Case { int64_t n_tokens, n_expert, k; };
  for (const Case& c : {Case{1, 8, 2}, Case{3, 64, 8}, Case{17, 128, 8}, Case{5, 512, 10}, Case{2, 16, 1}}) {
    for (bool normalize : {false, true}) {
      const auto logits = gaussian(size_t(c.n_tokens * c.n_expert), rng_, 2.0f);
      std::vector<int32_t> ids_ref(size_t(c.n_tokens * c.k)), ids(ids_ref.size());
      std::vector<float> w_ref(ids_ref.size()), w(ids_ref.size());
      ref_->router_softmax_topk(logits.data(), c.n_tokens, c.n_expert, c.k, normalize, ids_ref.data(), w_ref.data());
      DeviceBuffer dl(but(), *be_, logits);
      be_->router_softmax_topk(dl.f(), c.n_tokens, c.n_expert, c.k, normalize, ids.data(), w.data());
      for (int64_t t = 0; t < c.n_tokens; ++t) {
        for (int64_t i = 0; i < c.k; ++i) {
          const size_t at = size_t(t * c.k + i);
          // Weights are softmax outputs (≤ 1): a few ulp of exp and of the sums, 1e-6 absolute.
          EXPECT_NEAR(w[at], w_ref[at], 1e-6) << "t=" << t << " i=" << i;
          // Ids must agree, except where the reference's neighbours are so close (within that
          // tolerance) that another correct rounding may order them the other way.
          const bool near_tie = (i > 0 && w_ref[at - 1] - w_ref[at] < 1e-6) || (i + 1 < c.k && w_ref[at] - w_ref[at + 1] < 1e-6);
          if (!near_tie) {
            EXPECT_EQ(ids[at], ids_ref[at]) << "t=" << t << " i=" << i;
          }
        }
      }
      int near_ties = 0;
      for (size_t i = 0; i < ids.size(); ++i) near_ties += ids[i] != ids_ref[i];
      EXPECT_LE(near_ties, 2) << "n_expert=" << c.n_expert << " normalize=" << normalize;
    }
  }
}

TEST_P(BackendOps, RouterBreaksExactTiesByLowerId) {
  // Experts 5, 2 and 9 share the top logit, 7 and 1 the next one: order 2, 5, 9, 1, 7.
  std::vector<float> logits(12, -1.0f);
  logits[5] = logits[2] = logits[9] = 3.0f;
  logits[7] = logits[1] = 2.0f;
  std::vector<int32_t> ids(5);
  std::vector<float> w(5);
  DeviceBuffer dl(but(), *be_, logits);
  be_->router_softmax_topk(dl.f(), 1, 12, 5, true, ids.data(), w.data());
  EXPECT_EQ(ids, (std::vector<int32_t>{2, 5, 9, 1, 7}));
  EXPECT_EQ(w[0], w[1]);
  EXPECT_NEAR(w[0] * 3 + w[3] * 2, 1.0, 1e-6);  // renormalized over the 5 selected
}

TEST_P(BackendOps, SwigluMatchesReference) {
  for (int64_t n : {1, 7, 1000, 100000}) {
    for (int alias : {0, 1, 2}) {  // out separate, out == gate, out == up
      const auto gate = gaussian(size_t(n), rng_, 4.0f), up = gaussian(size_t(n), rng_);
      std::vector<float> out_ref(static_cast<size_t>(n));
      ref_->swiglu(gate.data(), up.data(), out_ref.data(), n);
      DeviceBuffer dg(but(), *be_, gate), du(but(), *be_, up), dout(but(), *be_, size_t(n) * 4);
      DeviceBuffer& out = alias == 0 ? dout : alias == 1 ? dg : du;
      be_->swiglu(dg.f(), du.f(), out.f(), n);
      const auto got = out.read();
      Mismatches bad;
      for (int64_t i = 0; i < n; ++i) {
        // exp and the division may differ by a few ulp between implementations: 1e-6 relative.
        const double tol = 1e-6 * std::fabs(out_ref[i]) + 1e-30;
        bad.check(std::fabs(got[i] - out_ref[i]) <= tol, size_t(i), got[i], out_ref[i], tol);
      }
      EXPECT_EQ(bad.count, 0) << "n=" << n << " alias=" << alias << bad.first;
    }
  }
}

TEST_P(BackendOps, AxpyMatchesReference) {
  for (int64_t n : {1, 7, 1000, 100000}) {
    const auto acc = gaussian(size_t(n), rng_), x = gaussian(size_t(n), rng_);
    const float a = 0.37f;
    auto acc_ref = acc;
    ref_->axpy(acc_ref.data(), x.data(), a, n);
    DeviceBuffer dacc(but(), *be_, acc), dx(but(), *be_, x);
    be_->axpy(dacc.f(), dx.f(), a, n);
    const auto got = dacc.read();
    Mismatches bad;
    for (int64_t i = 0; i < n; ++i) {
      // fma rounds once where the reference rounds twice: ≤ one rounding of a·x, 2^-24·|a·x|, apart.
      const double tol = 0x1p-23 * (std::fabs(a * x[i]) + std::fabs(acc[i])) + 1e-30;
      bad.check(std::fabs(got[i] - acc_ref[i]) <= tol, size_t(i), got[i], acc_ref[i], tol);
    }
    EXPECT_EQ(bad.count, 0) << "n=" << n << bad.first;
  }
}

TEST_P(BackendOps, GatherRowsMatchesReference) {
  for (int64_t dim : {1, 64, 4096}) {
    const int64_t n_src = 40, n_rows = 17;
    const auto src = gaussian(size_t(n_src * dim), rng_);
    std::vector<int32_t> rows(static_cast<size_t>(n_rows));
    for (auto& r : rows) r = int32_t(rng_() % n_src);
    std::vector<float> dst_ref(size_t(n_rows * dim));
    ref_->gather_rows(src.data(), rows.data(), n_rows, dim, dst_ref.data());
    DeviceBuffer dsrc(but(), *be_, src), ddst(but(), *be_, dst_ref.size() * 4);
    be_->gather_rows(dsrc.f(), rows.data(), n_rows, dim, ddst.f());
    EXPECT_EQ(ddst.read(), dst_ref) << "dim=" << dim;  // a copy: exact
  }
}

INSTANTIATE_TEST_SUITE_P(All, BackendOps, ::testing::ValuesIn(backends_under_test()),
                         [](const ::testing::TestParamInfo<BackendUnderTest>& info) { return info.param.label; });

// --- Determinism of the optimized CPU backend -------------------------------------------------------

struct HostWeight {  // a quantized matrix placed at a chosen byte offset from a 64-byte boundary
  HostWeight(const QuantizedMatrix& m, size_t offset) {
    auto place = [&](const std::vector<uint8_t>& part, std::vector<uint8_t>& storage) -> const void* {
      if (part.empty()) return nullptr;
      storage.assign(part.size() + offset + 64, 0);
      uint8_t* base = storage.data();
      base += (64 - reinterpret_cast<uintptr_t>(base) % 64) % 64 + offset;
      std::memcpy(base, part.data(), part.size());
      return base;
    };
    view = {m.format, m.rows, m.cols, place(m.data, data), place(m.scales, scales), place(m.biases, biases)};
  }
  std::vector<uint8_t> data, scales, biases;
  WeightView view;
};

TEST(CpuBackendDeterminism, MatmulBitIdenticalAcrossThreadCountsAndAddresses) {
  std::mt19937 rng(7);
  std::vector<std::pair<std::string, const CpuKernels*>> tables = {{"scalar", &cpu_kernels_scalar()},
                                                                     {"avx2", cpu_kernels_avx2()},
                                                                     {"avx512", cpu_kernels_avx512()}};
  for (const auto& [isa, kernels] : tables) {
    if (kernels == nullptr) continue;
    auto one = make_cpu_backend_with_kernels(*kernels, 1);
    auto four = make_cpu_backend_with_kernels(*kernels, 4);
    for (WeightFormat format : {WeightFormat::f32, WeightFormat::bf16, WeightFormat::q8, WeightFormat::q4}) {
      for (int64_t n_tokens : {1, 17}) {
        const int64_t rows = 1001, cols = 1024;
        const auto w = gaussian(size_t(rows * cols), rng, 0.05f);
        const auto x = gaussian(size_t(n_tokens * cols), rng);
        const QuantizedMatrix m = quantize_matrix(w.data(), rows, cols, format);
        // 36 bytes keeps every element naturally aligned but moves the rows off vector and cache-line
        // boundaries.
        const HostWeight aligned(m, 0), shifted(m, 36);
        std::vector<float> y1(size_t(n_tokens * rows)), y4(y1.size()), y_moved(y1.size());
        one->matmul(aligned.view, x.data(), y1.data(), n_tokens);
        four->matmul(aligned.view, x.data(), y4.data(), n_tokens);
        four->matmul(shifted.view, x.data(), y_moved.data(), n_tokens);
        EXPECT_EQ(std::memcmp(y1.data(), y4.data(), y1.size() * 4), 0) << isa << " " << weight_format_name(format) << " T=" << n_tokens << ": 1 vs 4 threads";
        EXPECT_EQ(std::memcmp(y4.data(), y_moved.data(), y1.size() * 4), 0) << isa << " " << weight_format_name(format) << " T=" << n_tokens << ": weight moved";
      }
    }
  }
}

}  // namespace
}  // namespace moeflux

// --- The thread pool the CPU backend runs on ---------------------------------------------------------

namespace moeflux {
namespace {

// Every task runs exactly once, for loops of every size, back to back (the caller often finishes a loop
// before a worker wakes: stale workers must not claim tasks of the next loop) and with more threads
// than cores (workers get descheduled mid-loop).
TEST(ThreadPoolTest, EveryTaskRunsOnceAcrossManyLoops) {
  for (int n_threads : {2, 3, 8}) {
    ThreadPool pool(n_threads);
    std::vector<std::atomic<int>> hits(64);
    for (int loop = 0; loop < 20000; ++loop) {
      const int64_t n_tasks = 1 + loop % 64;
      pool.parallel_for(n_tasks, [&](int64_t t) { hits[size_t(t)].fetch_add(1, std::memory_order_relaxed); });
      for (int64_t t = 0; t < n_tasks; ++t) ASSERT_EQ(hits[size_t(t)].exchange(0), 1) << n_threads << " threads, loop " << loop << ", task " << t;
    }
  }
}

}  // namespace
}  // namespace moeflux
