// The op-test harness: every op of every backend under test against the CPU reference backend on fresh
// random inputs, one small case per op over several shapes, each assertion with its tolerance and why.
// Also the determinism guarantees of the optimized CPU backend (thread count, weight address).
// A backend joins by adding an entry to backends_under_test() with its upload/download; the CUDA backend
// does where a GPU is present (its device memory filled and read through cudaMemcpy).
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "backends/backend.hpp"
#include "backends/cpu/cpu_kernels.hpp"
#include "backends/cuda/cuda_memory.hpp"
#include "core/half.hpp"
#include "core/thread_pool.hpp"
#include "quant/quantize.hpp"
#include "sampling/sampler.hpp"

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

void PrintTo(const BackendUnderTest& but, std::ostream* os) { *os << but.label; }  // in failure messages

std::vector<BackendUnderTest> backends_under_test() {
  std::vector<BackendUnderTest> list;
  list.push_back({"cpu_default_4threads", [] { return make_cpu_backend(4); }});
  // Every table this machine runs, so the ISA a user's CPU picks is tested wherever it exists.
  if (const CpuKernels* k = cpu_kernels_avx512())
    list.push_back({"cpu_avx512_3threads", [k] { return make_cpu_backend_with_kernels(*k, 3); }});
  if (const CpuKernels* k = cpu_kernels_avx2())
    list.push_back({"cpu_avx2_3threads", [k] { return make_cpu_backend_with_kernels(*k, 3); }});
  list.push_back({"cpu_scalar_2threads", [] { return make_cpu_backend_with_kernels(cpu_kernels_scalar(), 2); }});
  // The CUDA backend on the first GPU, where the build has CUDA and the machine a GPU.
  if (cuda_device_count() > 0) {
    BackendUnderTest cuda{"cuda", [] { return make_cuda_backend(0); }};
    cuda.upload = [](void* d, const void* s, size_t n) { cuda_copy_to_device(d, s, n); };
    cuda.download = [](void* d, const void* s, size_t n) { cuda_copy_to_host(d, s, n); };
    list.push_back(std::move(cuda));
  }
  return list;
}

// Says, once per test run (not while tests are only listed), that the CUDA entry is missing.
class CudaPresence : public ::testing::Environment {
 public:
  void SetUp() override {
    if (cuda_device_count() == 0) std::printf("no CUDA GPU (or a build without CUDA): the cuda backend's op tests were not run\n");
  }
};
[[maybe_unused]] ::testing::Environment* const cuda_presence = ::testing::AddGlobalTestEnvironment(new CudaPresence);

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

struct GatedDeltaCase;  // the gated-delta op tests' cases, below

class BackendOps : public ::testing::TestWithParam<BackendUnderTest> {
 protected:
  void SetUp() override { be_ = GetParam().make(); }
  const BackendUnderTest& but() const { return GetParam(); }
  // Defined with the gated-delta cases below.
  void check_gated_delta_case(const GatedDeltaCase& c);

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

// Σ over the q4 groups of row r of |s|·Σ|q·x| + |b|·Σ|x|: the size of the two sums the q4 kernels keep
// per group (s·Σq·x + b·Σx), whose rounding is what they add to the reference's.
double q4_affine_magnitude(const QuantizedMatrix& m, int64_t r, const float* x) {
  const int64_t groups = m.cols / 64;
  double total = 0;
  for (int64_t g = 0; g < groups; ++g) {
    uint16_t sb, bb;
    std::memcpy(&sb, m.scales.data() + 2 * (r * groups + g), 2);
    std::memcpy(&bb, m.biases.data() + 2 * (r * groups + g), 2);
    double qx = 0, ax = 0;
    for (int64_t c = g * 64; c < (g + 1) * 64; ++c) {
      const int q = (m.data[size_t((r * m.cols + c) / 2)] >> (4 * (c % 2))) & 15;
      qx += std::fabs(double(q) * x[c]);
      ax += std::fabs(double(x[c]));
    }
    total += std::fabs(double(bf16_to_f32(sb))) * qx + std::fabs(double(bf16_to_f32(bb))) * ax;
  }
  return total;
}

// y [T, rows] against the reference's y_ref for y = x · mᵀ, x: [T, cols].
void expect_matmul_close(const QuantizedMatrix& m, const std::vector<float>& x, int64_t n_tokens,
                         const std::vector<float>& y, const std::vector<float>& y_ref, double affine_tol = 0x1p-20) {
  std::vector<float> row(size_t(m.cols));
  Mismatches bad;
  for (int64_t r = 0; r < m.rows; ++r) {
    dequantize_row(m.view(), r, row.data());
    for (int64_t t = 0; t < n_tokens; ++t) {
      double abs_sum = 0, affine = 0;
      for (int64_t c = 0; c < m.cols; ++c) abs_sum += std::fabs(double(row[c]) * x[t * m.cols + c]);
      if (m.format == WeightFormat::q4) affine = q4_affine_magnitude(m, r, x.data() + t * m.cols);
      // Both sides sum the same exactly-decoded products in fp32 in different orders; the error of
      // each is ~√n·2^-24·Σ|w·x| in practice (≤ n·2^-24·Σ|w·x| in the worst case). The CUDA q4 kernels
      // sum (2 + q/64)·x and remove 2·Σx per group, ~20× that rounding (≤ 9e-7·Σ|w·x| in the lab).
      // 2e-5·Σ|w·x| is ~5× the typical fp32 difference at n = 4096, above the q4 kernels' error and far
      // below any real decode or indexing bug (O(Σ|w·x|/n)). The q4 kernels sum s·Σq·x and b·Σx per
      // group apart: where a weight near zero meets a huge x those two cancel, and their own roundings
      // (a few 2^-24 of each) count — 2^-20 of their magnitudes by default (measured: ≤ 0.08 at ~1e5 on
      // an H100, the batch path); the caller may allow more (affine_tol) where it says why.
      const double tol = 2e-5 * abs_sum + affine_tol * affine + 1e-30;
      const size_t i = size_t(t * m.rows + r);
      bad.check(std::fabs(double(y[i]) - y_ref[i]) <= tol, i, y[i], y_ref[i], tol);
    }
  }
  EXPECT_EQ(bad.count, 0) << bad.first;
}

TEST_P(BackendOps, MatmulMatchesReference) {
  // {37, 12288, 2}: rows long enough that the CUDA q8/q4 kernels read x directly rather than staging it
  // in shared memory (x > 48 KiB), with the columns split across warps; {1100, 2048, 2}: enough rows that
  // the CUDA f32/bf16 kernel does not split them.
  const std::vector<MatmulShape> shapes = {
      {1, 64, 1},   {7, 128, 3},   {33, 256, 17},  {1000, 4096, 1}, {257, 1024, 17}, {64, 4160, 5},
      {5, 1536, 1}, {96, 2048, 7}, {1000, 512, 3}, {1, 4096, 17},   {37, 12288, 2},  {1100, 2048, 2},
      // Batches (CUDA: the tensor-core path from 8 tokens): partial tiles of tokens and of rows, one
      // whole tile, the smallest batch, a long row.
      {130, 768, 70}, {64, 2048, 8},  {200, 4096, 129}, {128, 64, 64},  {3, 12288, 9},
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

// A weight whose rows sit off 16-byte boundaries (a pack's tensor at an odd offset): the CUDA kernels'
// vector loads do not apply, and the plain path must give the same products.
TEST_P(BackendOps, MatmulUnalignedWeightMatchesReference) {
  for (WeightFormat format : {WeightFormat::bf16, WeightFormat::q8, WeightFormat::q4}) {
    const int64_t rows = 37, cols = 512, n_tokens = 3;
    SCOPED_TRACE(weight_format_name(format));
    const auto w = gaussian(size_t(rows * cols), rng_, 0.05f);
    const auto x = gaussian(size_t(n_tokens * cols), rng_);
    const QuantizedMatrix m = quantize_matrix(w.data(), rows, cols, format);
    std::vector<float> y_ref(size_t(n_tokens * rows));
    ref_->matmul(m.view(), x.data(), y_ref.data(), n_tokens);
    // 8 bytes keeps every element naturally aligned (q4 words are 4 bytes) but not the 16-byte chunks.
    constexpr size_t shift = 8;
    DeviceBuffer data(but(), *be_, m.data.size() + shift);
    but().upload(static_cast<char*>(data.raw()) + shift, m.data.data(), m.data.size());
    DeviceBuffer scales(but(), *be_, m.scales), biases(but(), *be_, m.biases);
    const WeightView view{format, rows, cols, static_cast<char*>(data.raw()) + shift, m.scales.empty() ? nullptr : scales.raw(),
                          m.biases.empty() ? nullptr : biases.raw()};
    DeviceBuffer dx(but(), *be_, x), dy(but(), *be_, y_ref.size() * 4);
    be_->matmul(view, dx.f(), dy.f(), n_tokens);
    expect_matmul_close(m, x, n_tokens, dy.read(), y_ref);
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
      {WeightFormat::q4, 40, 12288, 2, -1}, {WeightFormat::q8, 40, 12288, 1, -1}, {WeightFormat::bf16, 130, 768, 70, -1},
      {WeightFormat::q8, 200, 1024, 9, -1},  {WeightFormat::q4, 65, 768, 70, 14},
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

// A launch of many waves (jobs × tokens past three times what the GPU holds at once): the CUDA backend
// then gives each row tile one warp that walks its sum's splits in turn; every job's y stays bit-identical
// to matmul alone (on an H100 one wave: split tiles) and within the matmul tolerance of the reference.
TEST_P(BackendOps, MatmulManyOfManyWavesMatchesMatmulAlone) {
  for (WeightFormat format : {WeightFormat::q8, WeightFormat::q4}) {
    SCOPED_TRACE(weight_format_name(format));
    const int64_t rows = 2048, cols = 7168, n_tokens = 4;  // DeepSeek-V3's expert gate; fewer tokens than a GEMM takes
    std::vector<QuantizedMatrix> mats;
    std::vector<std::vector<float>> xs;
    std::vector<std::unique_ptr<DeviceWeight>> dws;
    std::vector<std::unique_ptr<DeviceBuffer>> dxs, dys;
    std::vector<MatmulJob> jobs;
    for (int j = 0; j < 4; ++j) {  // H100: 4 × 512 split blocks of 4 rows, against 3 × 528 resident
      const auto w = gaussian(size_t(rows * cols), rng_, 0.05f);
      mats.push_back(quantize_matrix(w.data(), rows, cols, format));
      xs.push_back(gaussian(size_t(n_tokens * cols), rng_));
      dws.push_back(std::make_unique<DeviceWeight>(but(), *be_, mats.back()));
      dxs.push_back(std::make_unique<DeviceBuffer>(but(), *be_, xs.back()));
      dys.push_back(std::make_unique<DeviceBuffer>(but(), *be_, size_t(n_tokens * rows) * 4));
      jobs.push_back({dws.back()->view, dxs.back()->f(), dys.back()->f(), n_tokens});
    }
    be_->matmul_many(jobs.data(), int64_t(jobs.size()));
    for (size_t j = 0; j < jobs.size(); ++j) {
      DeviceBuffer alone(but(), *be_, size_t(n_tokens * rows) * 4);
      be_->matmul(jobs[j].w, jobs[j].x, alone.f(), n_tokens);  // one job: two waves' worth of tiles, split
      const auto y_alone = alone.read(), y_many = dys[j]->read();
      EXPECT_EQ(std::memcmp(y_alone.data(), y_many.data(), y_alone.size() * 4), 0) << "job " << j << ": differs from matmul alone";
      std::vector<float> y_ref(size_t(n_tokens * rows));
      ref_->matmul(mats[j].view(), xs[j].data(), y_ref.data(), n_tokens);
      expect_matmul_close(mats[j], xs[j], n_tokens, y_many, y_ref);
    }
  }
}

// Inputs spanning twelve decades within one row (past fp16's range), and a huge input on a column of zero
// weights beside ordinary ones: the batch path must hold every product to the reference's precision, not
// to the precision of the largest input near it (which a shared scale would). The matrix-vector path is
// held to the same bound but for q4's affine term: its fp32 kernels sum (2 + q/64)·x and take 2·Σx back
// out per group, intermediate sums ~2·64/q̄ times the affine magnitudes, so where a near-zero q4 weight
// meets 1e6 their roundings reach ~2^-19 of those magnitudes (measured 0.67 at 3.5e5 on an H100, where
// 2^-20 allowed 0.33); 2^-17 for it.
TEST_P(BackendOps, MatmulBatchOfWideRangeInputsMatchesReference) {
  for (WeightFormat format : {WeightFormat::bf16, WeightFormat::q8, WeightFormat::q4}) {
    const int64_t rows = 80, cols = 512, n_tokens = 40;
    SCOPED_TRACE(weight_format_name(format));
    auto w = gaussian(size_t(rows * cols), rng_, 0.05f);
    for (int64_t r = 0; r < rows; ++r) w[size_t(r * cols + 70)] = 0.f;  // column 70: zero in every row
    auto x = gaussian(size_t(n_tokens * cols), rng_);
    for (int64_t t = 0; t < n_tokens; ++t)
      for (int64_t c = 0; c < cols; ++c)
        if (t >= 20) x[size_t(t * cols + c)] *= std::pow(10.f, float(int(rng_() % 13) - 6));  // 1e-6 .. 1e6
    for (int64_t t = 0; t < 20; ++t) x[size_t(t * cols + 70)] = 1e6f;  // the rest of these rows ~1
    for (int64_t c = 0; c < cols; ++c) x[size_t(23 * cols + c)] = 0.f;  // a zero row
    const QuantizedMatrix m = quantize_matrix(w.data(), rows, cols, format);
    DeviceWeight dw(but(), *be_, m);
    // The whole batch (CUDA: the tensor-core batch path), and 5 tokens of each kind alone (the
    // matrix-vector path: fewer than 8 tokens, cuda::gemm_min_tokens).
    for (const auto& [first, count] : {std::pair<int64_t, int64_t>{0, n_tokens}, {0, 5}, {20, 5}}) {
      SCOPED_TRACE("tokens " + std::to_string(first) + ".." + std::to_string(first + count - 1));
      const std::vector<float> xs(x.begin() + first * cols, x.begin() + (first + count) * cols);
      std::vector<float> y_ref(size_t(count * rows));
      ref_->matmul(m.view(), xs.data(), y_ref.data(), count);
      DeviceBuffer dx(but(), *be_, xs), dy(but(), *be_, y_ref.size() * 4);
      be_->matmul(dw.view, dx.f(), dy.f(), count);
      expect_matmul_close(m, xs, count, dy.read(), y_ref, count < 8 ? 0x1p-17 : 0x1p-20);
    }
  }
}

// Within one path a token's products do not depend on the batch it came in: the first tokens of a batch
// give the same bits as a batch of only those tokens. On CUDA both batches here take the tensor-core path
// (≥ 8 tokens); fewer tokens take the matrix-vector path, which sums in another order (held to the
// reference's tolerance only), so an expert's output for a token may differ in the last bits with the
// number of tokens that chose it, as in any batched engine.
TEST_P(BackendOps, MatmulRowsDoNotDependOnTheBatch) {
  for (WeightFormat format : {WeightFormat::bf16, WeightFormat::q8, WeightFormat::q4}) {
    const int64_t rows = 96, cols = 1024, n_tokens = 70, first = 20;
    SCOPED_TRACE(weight_format_name(format));
    const auto w = gaussian(size_t(rows * cols), rng_, 0.05f);
    const auto x = gaussian(size_t(n_tokens * cols), rng_);
    const QuantizedMatrix m = quantize_matrix(w.data(), rows, cols, format);
    DeviceWeight dw(but(), *be_, m);
    DeviceBuffer dx(but(), *be_, x), dy_all(but(), *be_, size_t(n_tokens * rows) * 4), dy_first(but(), *be_, size_t(first * rows) * 4);
    be_->matmul(dw.view, dx.f(), dy_all.f(), n_tokens);
    be_->matmul(dw.view, dx.f(), dy_first.f(), first);
    const auto all = dy_all.read(), part = dy_first.read();
    EXPECT_EQ(std::memcmp(all.data(), part.data(), part.size() * 4), 0) << "the first tokens' rows changed with the batch";
    std::vector<float> y_ref(all.size());
    ref_->matmul(m.view(), x.data(), y_ref.data(), n_tokens);
    expect_matmul_close(m, x, n_tokens, all, y_ref);
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
  for (int64_t dim : {64, 1000, 4096, 4100}) {
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

// x += y then RMSNorm: the same as axpy then rms_norm on this backend (bit for bit: the same float
// operations), and the reference's within rms_norm's tolerance.
TEST_P(BackendOps, AddRmsNormMatchesAxpyThenRmsNorm) {
  // y one float past an aligned address too: the sum must not depend on where y sits.
  for (int64_t dim : {64, 1000, 4096, 4100}) {
    for (int64_t n_rows : {1, 5}) {
      const int64_t y_at = dim == 4096 ? 1 : 0;
      const auto x = gaussian(size_t(n_rows * dim), rng_, 3.0f), y = gaussian(size_t(n_rows * dim), rng_, 2.0f);
      const auto weight = gaussian(size_t(dim), rng_);
      std::vector<float> x_ref = x, out_ref(x.size()), y_placed(static_cast<size_t>(y_at), 0.0f);
      y_placed.insert(y_placed.end(), y.begin(), y.end());
      ref_->add_rms_norm(x_ref.data(), y.data(), weight.data(), 1e-6f, n_rows, dim, out_ref.data());
      DeviceBuffer dx(but(), *be_, x), dy(but(), *be_, y_placed), dw(but(), *be_, weight), dout(but(), *be_, x.size() * 4);
      be_->add_rms_norm(dx.f(), dy.f() + y_at, dw.f(), 1e-6f, n_rows, dim, dout.f());
      DeviceBuffer dx2(but(), *be_, x), dout2(but(), *be_, x.size() * 4);
      be_->axpy(dx2.f(), dy.f() + y_at, 1.0f, n_rows * dim);
      be_->rms_norm(dx2.f(), dw.f(), 1e-6f, n_rows, dim, dout2.f());
      const auto got_x = dx.read(), got = dout.read();
      EXPECT_EQ(got_x, dx2.read()) << "dim=" << dim;
      EXPECT_EQ(got, dout2.read()) << "dim=" << dim;
      EXPECT_EQ(got_x, x_ref) << "dim=" << dim;  // one float addition per element, exact everywhere
      Mismatches bad;
      for (size_t i = 0; i < got.size(); ++i) {
        const double tol = 1e-5 * std::fabs(out_ref[i]) + 1e-7;  // rms_norm's: only Σx² is reordered
        bad.check(std::fabs(got[i] - out_ref[i]) <= tol, i, got[i], out_ref[i], tol);
      }
      EXPECT_EQ(bad.count, 0) << "dim=" << dim << " rows=" << n_rows << bad.first;
    }
  }
}

// A norm with the matmuls that read it, as one op (a GPU normalizes a decode token inside the matmul's
// blocks): x_out and h to the bit as add_rms_norm (or rms_norm) writes them, x untouched, and each job's
// output as matmul_many gives it on h — to the bit where the format's one-token path is the same (q8,
// q4), else within the matmul's tolerance against the reference on that h (a GPU may take bf16 and f32
// rows through its staged kernel there instead of the direct one). Cases a GPU composes too: three
// tokens, a row wider than one block normalizes (7168), jobs in two formats. And a q4 width (5760) whose x
// and norm weight staged together fit the plain staged kernel's shared memory but not the norm launch's
// at 4 rows a warp (its block sum's partials too), with enough rows (6144) that a GPU takes 4 rows a
// warp: it must then read the weight after the sum, not fail to launch.
TEST_P(BackendOps, AddRmsNormMatmulMatchesTheOpsInTurn) {
  struct Job { WeightFormat f; int64_t rows; };
  struct Case { int64_t dim, n_rows; bool add; std::vector<Job> jobs; };
  const std::vector<Case> cases = {
      {2048, 1, true, {{WeightFormat::q8, 4096}, {WeightFormat::q8, 512}, {WeightFormat::q8, 512}}},
      {2048, 1, true, {{WeightFormat::bf16, 128}}},
      {2048, 1, false, {{WeightFormat::q4, 768}, {WeightFormat::q4, 768}}},
      {128, 1, true, {{WeightFormat::f32, 7}}},
      {4096, 1, true, {{WeightFormat::q4, 300}}},
      {7168, 1, true, {{WeightFormat::q8, 64}}},
      {2048, 3, true, {{WeightFormat::q8, 100}}},
      {2048, 1, true, {{WeightFormat::q8, 64}, {WeightFormat::bf16, 32}}},
      {5760, 1, true, {{WeightFormat::q4, 6144}}},
  };
  const float eps = 1e-6f;
  for (const Case& c : cases) {
    SCOPED_TRACE("dim " + std::to_string(c.dim) + " rows " + std::to_string(c.n_rows) + (c.add ? " with y" : " without y"));
    const size_t n = size_t(c.n_rows * c.dim);
    const auto x = gaussian(n, rng_, 3.0f), y = gaussian(n, rng_, 2.0f), weight = gaussian(size_t(c.dim), rng_);
    DeviceBuffer dx(but(), *be_, x), dy(but(), *be_, y), dw(but(), *be_, weight), dx_out(but(), *be_, n * 4), dh(but(), *be_, n * 4);
    DeviceBuffer dx2(but(), *be_, x), dh2(but(), *be_, n * 4);
    std::vector<QuantizedMatrix> mats;
    std::vector<std::unique_ptr<DeviceWeight>> dws;
    std::vector<std::unique_ptr<DeviceBuffer>> out_fused, out_turn;
    std::vector<MatmulJob> fused, turn;
    for (const Job& j : c.jobs) {
      const auto w = gaussian(size_t(j.rows * c.dim), rng_, 0.05f);
      mats.push_back(quantize_matrix(w.data(), j.rows, c.dim, j.f));
      dws.push_back(std::make_unique<DeviceWeight>(but(), *be_, mats.back()));
      out_fused.push_back(std::make_unique<DeviceBuffer>(but(), *be_, size_t(c.n_rows * j.rows) * 4));
      out_turn.push_back(std::make_unique<DeviceBuffer>(but(), *be_, size_t(c.n_rows * j.rows) * 4));
      fused.push_back({dws.back()->view, dh.f(), out_fused.back()->f(), c.n_rows});
      turn.push_back({dws.back()->view, dh2.f(), out_turn.back()->f(), c.n_rows});
    }
    // Without y the residual stays where it is: x_out may be x.
    be_->add_rms_norm_matmul(dx.f(), c.add ? dy.f() : nullptr, dw.f(), eps, c.n_rows, c.dim, c.add ? dx_out.f() : dx.f(), dh.f(), fused.data(),
                             int64_t(fused.size()));
    if (c.add)
      be_->add_rms_norm(dx2.f(), dy.f(), dw.f(), eps, c.n_rows, c.dim, dh2.f());
    else
      be_->rms_norm(dx2.f(), dw.f(), eps, c.n_rows, c.dim, dh2.f());
    be_->matmul_many(turn.data(), int64_t(turn.size()));
    const auto h = dh.read();
    EXPECT_EQ(h, dh2.read());
    EXPECT_EQ(dx.read(), x);
    if (c.add) {
      EXPECT_EQ(dx_out.read(), dx2.read());
    }
    for (size_t j = 0; j < c.jobs.size(); ++j) {
      const auto got = out_fused[j]->read();
      if (c.jobs[j].f == WeightFormat::q8 || c.jobs[j].f == WeightFormat::q4) {
        EXPECT_EQ(got, out_turn[j]->read()) << "job " << j;
      } else {
        std::vector<float> y_ref(got.size());
        ref_->matmul(mats[j].view(), h.data(), y_ref.data(), c.n_rows);
        expect_matmul_close(mats[j], h, c.n_rows, got, y_ref);
      }
    }
  }
}

// swiglu_matmul against swiglu then matmul: y to the bit where a GPU fuses (one q8 / q4 token, the
// shared experts' and dense MLPs' down projections) and where it composes (several tokens, bf16).
TEST_P(BackendOps, SwigluMatmulMatchesTheOpsInTurn) {
  struct Case { WeightFormat f; int64_t rows, cols, n_tokens; };
  for (const Case& c : {Case{WeightFormat::q8, 2048, 512, 1}, Case{WeightFormat::q4, 4096, 1024, 1}, Case{WeightFormat::q8, 7168, 2048, 1},
                        Case{WeightFormat::q4, 300, 512, 3}, Case{WeightFormat::bf16, 256, 512, 1}}) {
    SCOPED_TRACE("format " + std::to_string(int(c.f)) + " [" + std::to_string(c.rows) + ", " + std::to_string(c.cols) + "] T=" +
                 std::to_string(c.n_tokens));
    const size_t n = size_t(c.n_tokens * c.cols);
    // Gates span silu's both tails (−12 … 12), up around 1.
    const auto gate = gaussian(n, rng_, 4.0f), up = gaussian(n, rng_, 1.0f);
    const auto w = gaussian(size_t(c.rows * c.cols), rng_, 0.05f);
    const QuantizedMatrix m = quantize_matrix(w.data(), c.rows, c.cols, c.f);
    DeviceWeight dw(but(), *be_, m);
    DeviceBuffer dg1(but(), *be_, gate), du(but(), *be_, up), dy1(but(), *be_, size_t(c.n_tokens * c.rows) * 4);
    DeviceBuffer dg2(but(), *be_, gate), dy2(but(), *be_, size_t(c.n_tokens * c.rows) * 4);
    be_->swiglu_matmul(dg1.f(), du.f(), dw.view, dy1.f(), c.n_tokens);
    be_->swiglu(dg2.f(), du.f(), dg2.f(), int64_t(n));
    be_->matmul(dw.view, dg2.f(), dy2.f(), c.n_tokens);
    EXPECT_EQ(dy1.read(), dy2.read());
    EXPECT_EQ(du.read(), up) << "up changed";
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

// Qwen3's q/k head norms and rotary in one op: the reference's four ops (rms_norm on q and k heads, then
// rope_neox on both) within their tolerances.
TEST_P(BackendOps, QkNormRopeMatchesReference) {
  struct Case { int64_t n_tokens, n_head, n_head_kv, head_dim, rot_dim; };
  for (const Case& c : {Case{1, 32, 4, 128, 128}, Case{3, 8, 2, 64, 32}, Case{5, 4, 4, 256, 64}, Case{2, 6, 3, 96, 0}}) {
    const auto q = gaussian(size_t(c.n_tokens * c.n_head * c.head_dim), rng_, 3.0f);
    const auto k = gaussian(size_t(c.n_tokens * c.n_head_kv * c.head_dim), rng_, 3.0f);
    const auto q_norm = gaussian(size_t(c.head_dim), rng_), k_norm = gaussian(size_t(c.head_dim), rng_);
    std::vector<int32_t> positions(size_t(c.n_tokens));
    for (auto& p : positions) p = int32_t(rng_() % 100000);
    std::vector<float> inv_freq(size_t(c.rot_dim / 2));
    for (size_t i = 0; i < inv_freq.size(); ++i) inv_freq[i] = std::pow(1e6f, -2.0f * float(i) / float(std::max<int64_t>(c.rot_dim, 1)));
    auto q_ref = q, k_ref = k;
    ref_->qk_norm_rope(q_ref.data(), k_ref.data(), c.n_tokens, c.n_head, c.n_head_kv, c.head_dim, c.rot_dim, q_norm.data(), k_norm.data(),
                       1e-6f, positions.data(), inv_freq.data());
    DeviceBuffer dq(but(), *be_, q), dk(but(), *be_, k), dqn(but(), *be_, q_norm), dkn(but(), *be_, k_norm);
    be_->qk_norm_rope(dq.f(), dk.f(), c.n_tokens, c.n_head, c.n_head_kv, c.head_dim, c.rot_dim, dqn.f(), dkn.f(), 1e-6f, positions.data(),
                      inv_freq.data());
    for (const auto& [got, want] : {std::pair{dq.read(), q_ref}, std::pair{dk.read(), k_ref}}) {
      Mismatches bad;
      for (size_t row = 0; row < got.size() / size_t(c.head_dim); ++row) {
        double head_max = 0;
        for (int64_t d = 0; d < c.head_dim; ++d) head_max = std::max(head_max, double(std::fabs(want[row * c.head_dim + d])));
        for (int64_t d = 0; d < c.head_dim; ++d) {
          const size_t i = row * size_t(c.head_dim) + size_t(d);
          // The norm's 1e-5 relative (Σx² reordered) carried through a rotation mixing two dims, plus
          // rope's few ulp of cos/sin: 2 · 1e-5 of the head's largest output, and an absolute floor.
          const double tol = 2e-5 * head_max + 1e-6;
          bad.check(std::fabs(got[i] - want[i]) <= tol, i, got[i], want[i], tol);
        }
      }
      EXPECT_EQ(bad.count, 0) << "T=" << c.n_tokens << " head_dim=" << c.head_dim << " rot_dim=" << c.rot_dim << bad.first;
    }
  }
}

// qk_norm_rope and attention as one op (a GPU takes a decode token's head norms and rotary inside the
// attention kernel): out and the new key rows in the cache to the bit as the two ops in turn leave them,
// the rest of the cache untouched. Decode steps over 100, 700 and 2000 keys (one block holds the new key;
// a GPU's splits of a KV head then form one cluster, of 4 rounds of key chunks each at 2000), a partial
// rotary, Qwen3.5's wider heads (a group of 8; Qwen3.5-397B's 16 over 1000 keys, which a GPU splits
// through the L2), a group of 16 narrow heads, 20 keys (less than one round of chunks: no split); and
// steps a GPU composes: three tokens of 64-dim heads.
TEST_P(BackendOps, QkNormRopeAttentionMatchesTheOpsInTurn) {
  struct Case { int64_t n_tokens, n_past, n_head, n_head_kv, head_dim, rot_dim; };
  for (const Case& c : {Case{1, 99, 32, 4, 128, 128}, Case{1, 699, 32, 4, 128, 128}, Case{1, 1999, 32, 4, 128, 128},
                        Case{1, 300, 16, 2, 256, 64}, Case{1, 1000, 32, 2, 256, 64}, Case{1, 500, 64, 4, 128, 128},
                        Case{1, 19, 32, 4, 128, 128}, Case{3, 200, 8, 2, 64, 32}}) {
    SCOPED_TRACE("T=" + std::to_string(c.n_tokens) + " past=" + std::to_string(c.n_past) + " head_dim=" + std::to_string(c.head_dim));
    const int64_t kv_dim = c.n_head_kv * c.head_dim, n_ctx = c.n_past + c.n_tokens;
    const auto q = gaussian(size_t(c.n_tokens * c.n_head * c.head_dim), rng_, 3.0f);
    // Earlier keys as a model leaves them (normalized: unit-scale), the batch's raw (larger).
    auto k_cache = gaussian(size_t(n_ctx * kv_dim), rng_, 1.0f);
    for (size_t i = size_t(c.n_past * kv_dim); i < k_cache.size(); ++i) k_cache[i] *= 3.0f;
    const auto v_cache = gaussian(size_t(n_ctx * kv_dim), rng_, 1.0f);
    const auto q_norm = gaussian(size_t(c.head_dim), rng_), k_norm = gaussian(size_t(c.head_dim), rng_);
    std::vector<int32_t> positions(size_t(c.n_tokens));
    for (int64_t t = 0; t < c.n_tokens; ++t) positions[size_t(t)] = int32_t(c.n_past + t);
    std::vector<float> inv_freq(size_t(c.rot_dim / 2));
    for (size_t i = 0; i < inv_freq.size(); ++i) inv_freq[i] = std::pow(1e6f, -2.0f * float(i) / float(c.rot_dim));
    const AttentionLayout layout = AttentionLayout::gqa(c.n_head, c.n_head_kv, c.head_dim);
    const float scale = 1.0f / std::sqrt(float(c.head_dim));
    const size_t out_bytes = size_t(c.n_tokens * c.n_head * c.head_dim) * 4;
    DeviceBuffer dqn(but(), *be_, q_norm), dkn(but(), *be_, k_norm), dv(but(), *be_, v_cache);
    DeviceBuffer dq1(but(), *be_, q), dk1(but(), *be_, k_cache), dout1(but(), *be_, out_bytes);
    be_->qk_norm_rope_attention(dq1.f(), dk1.f(), dv.f(), c.n_tokens, c.n_past, layout, scale, dout1.f(), c.rot_dim, dqn.f(), dkn.f(), 1e-6f,
                                positions.data(), inv_freq.data());
    DeviceBuffer dq2(but(), *be_, q), dk2(but(), *be_, k_cache), dout2(but(), *be_, out_bytes);
    be_->qk_norm_rope(dq2.f(), dk2.f() + c.n_past * kv_dim, c.n_tokens, c.n_head, c.n_head_kv, c.head_dim, c.rot_dim, dqn.f(), dkn.f(), 1e-6f,
                      positions.data(), inv_freq.data());
    be_->attention(dq2.f(), dk2.f(), dv.f(), c.n_tokens, c.n_past, layout, scale, dout2.f());
    const auto k1 = dk1.read();
    EXPECT_EQ(dout1.read(), dout2.read());
    EXPECT_EQ(k1, dk2.read());
    EXPECT_TRUE(std::equal(k_cache.begin(), k_cache.begin() + c.n_past * kv_dim, k1.begin())) << "earlier keys changed";
  }
}

// Qwen3.5's gated norm of the delta rule's output (a GPU takes it in one kernel): to the bit what rms_norm
// then swiglu leave, in place as the model calls it and into another buffer, over 128-wide heads (the
// model's) and rows of other widths (a GPU's wider blocks, and a width not a multiple of 4, which a GPU
// composes from the two ops).
TEST_P(BackendOps, GatedRmsNormMatchesTheOpsInTurn) {
  for (const auto& [n_rows, dim] : {std::pair<int64_t, int64_t>{32, 128}, {3, 2048}, {5, 36}, {4, 6}}) {
    SCOPED_TRACE("rows=" + std::to_string(n_rows) + " dim=" + std::to_string(dim));
    const auto x = gaussian(size_t(n_rows * dim), rng_, 2.0f), gate = gaussian(size_t(n_rows * dim), rng_, 3.0f);
    const auto weight = gaussian(size_t(dim), rng_);
    const size_t bytes = size_t(n_rows * dim) * 4;
    DeviceBuffer dw(but(), *be_, weight), dg(but(), *be_, gate);
    DeviceBuffer in_place(but(), *be_, x), dx(but(), *be_, x), dout(but(), *be_, bytes), composed(but(), *be_, x);
    be_->gated_rms_norm(in_place.f(), dw.f(), 1e-6f, n_rows, dim, dg.f(), in_place.f());
    be_->gated_rms_norm(dx.f(), dw.f(), 1e-6f, n_rows, dim, dg.f(), dout.f());
    be_->rms_norm(composed.f(), dw.f(), 1e-6f, n_rows, dim, composed.f());
    be_->swiglu(dg.f(), composed.f(), composed.f(), n_rows * dim);
    const auto want = composed.read();
    EXPECT_EQ(in_place.read(), want);
    EXPECT_EQ(dout.read(), want);
    EXPECT_EQ(dx.read(), x) << "x changed when out is another buffer";
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
    const AttentionLayout layout = AttentionLayout::gqa(c.n_head, c.n_head_kv, c.head_dim);
    ref_->attention(q.data(), k.data(), v.data(), c.n_tokens, c.n_past, layout, scale, out_ref.data());
    DeviceBuffer dq(but(), *be_, q), dk(but(), *be_, k), dv(but(), *be_, v), dout(but(), *be_, q.size() * 4);
    be_->attention(dq.f(), dk.f(), dv.f(), c.n_tokens, c.n_past, layout, scale, dout.f());
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

// Layouts beyond plain GQA: MLA's expanded form (keys wider than values, one KV head per query head)
// and its latent form (one KV head whose value is the first v_dim floats of its key row).
TEST_P(BackendOps, AttentionWithOtherLayoutsMatchesReference) {
  struct Case { int64_t n_tokens, n_past; AttentionLayout layout; bool latent; };
  for (const Case& c : {Case{5, 3, {4, 4, 24, 16, 4 * 24, 4 * 16}, false}, Case{1, 20, {8, 1, 40, 32, 40, 40}, true},
                        Case{6, 9, {8, 1, 40, 32, 40, 40}, true}, Case{2, 4, {4, 2, 16, 16, 48, 40}, false}}) {
    const AttentionLayout& l = c.layout;
    const int64_t n_ctx = c.n_past + c.n_tokens;
    const auto q = gaussian(size_t(c.n_tokens * l.n_head * l.k_dim), rng_);
    const auto k = gaussian(size_t(n_ctx * l.k_stride), rng_);
    const auto v = c.latent ? k : gaussian(size_t(n_ctx * l.v_stride), rng_);
    const float scale = 0.3f;
    std::vector<float> out_ref(size_t(c.n_tokens * l.n_head * l.v_dim));
    ref_->attention(q.data(), k.data(), v.data(), c.n_tokens, c.n_past, l, scale, out_ref.data());
    DeviceBuffer dq(but(), *be_, q), dk(but(), *be_, k), dout(but(), *be_, out_ref.size() * 4);
    DeviceBuffer dv(but(), *be_, v);
    be_->attention(dq.f(), dk.f(), c.latent ? dk.f() : dv.f(), c.n_tokens, c.n_past, l, scale, dout.f());
    const auto got = dout.read();
    Mismatches bad;
    for (size_t i = 0; i < got.size(); ++i) {
      // As above: a convex combination of values (gaussian, |v| ≲ 5), rounding ~1e-6 relative.
      const double tol = 5e-5;
      bad.check(std::fabs(got[i] - out_ref[i]) <= tol, i, got[i], out_ref[i], tol);
    }
    EXPECT_EQ(bad.count, 0) << "k_dim " << l.k_dim << " v_dim " << l.v_dim << " latent " << c.latent << bad.first;
  }
}

// YaRN's attention factor scales the rotated dims; a row stride lets rope run on a slice of each row
// (MLA's rope dims after the nope dims of each head).
TEST_P(BackendOps, RopeWithScaleAndStrideMatchesReference) {
  const int64_t T = 4, heads = 3, head_dim = 8, stride = 40;  // each row: 3 heads of 8 inside 40 floats
  const auto x = gaussian(size_t(T * stride), rng_);
  std::vector<int32_t> positions = {0, 7, 300, 4095};
  std::vector<float> inv_freq = {1.0f, 0.1f, 0.01f, 0.001f};
  auto x_ref = x;
  ref_->rope_neox(x_ref.data() + 5, T, heads, head_dim, head_dim, positions.data(), inv_freq.data(), 1.25f, stride);
  DeviceBuffer dx(but(), *be_, x);
  be_->rope_neox(dx.f() + 5, T, heads, head_dim, head_dim, positions.data(), inv_freq.data(), 1.25f, stride);
  const auto got = dx.read();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < stride; ++i) {
      const size_t at = size_t(t * stride + i);
      const bool rotated = i >= 5 && i < 5 + heads * head_dim;
      if (!rotated) {
        EXPECT_EQ(got[at], x[at]) << "t " << t << " i " << i;  // outside the heads: untouched
        continue;
      }
      // The rotation with scale 1.25 changes the norm of each pair by exactly that factor.
      EXPECT_NEAR(got[at], x_ref[at], 1e-5 * (1 + std::fabs(x_ref[at]))) << "t " << t << " i " << i;
    }
  // Position 0 does not rotate: the rotated dims are just scaled.
  for (int64_t i = 5; i < 5 + heads * head_dim; ++i) EXPECT_NEAR(x_ref[size_t(i)], 1.25f * x[size_t(i)], 1e-6f);
}

// DeepSeek-V3's noaux_tc routing on a case worked by hand: 8 experts in 4 groups of 2, keep 2 groups,
// choose 2 experts. The bias steers the choice but never the weights; a lone high expert in a group
// whose pair sum is low is masked out.
TEST_P(BackendOps, RouterSigmoidGroupedTopkFollowsNoauxTc) {
  auto logit = [](float p) { return std::log(p / (1 - p)); };  // sigmoid⁻¹
  // sigmoid scores by expert:    g0: 0.9 0.1   g1: 0.6 0.5   g2: 0.55 0.55   g3: 0.3 0.2
  const std::vector<float> probs = {0.9f, 0.1f, 0.6f, 0.5f, 0.55f, 0.55f, 0.3f, 0.2f};
  std::vector<float> logits;
  for (float p : probs) logits.push_back(logit(p));
  // Choice scores (s + bias): g0 0.9 + 0.1 = 1.0; g1 0.6 + 0.45 = 1.05 (the bias on expert 3); g2 0.55 +
  // 0.55 = 1.1; g3 0.3 + 0.9 = 1.2 (expert 7 lifted by 0.7). Kept: g3 and g2 — g0 is dropped although
  // its expert 0 has the highest score of all.
  const std::vector<float> bias = {0.0f, 0.0f, 0.0f, -0.05f, 0.0f, 0.0f, 0.0f, 0.7f};
  std::vector<int32_t> ids(2);
  std::vector<float> w(2);
  DeviceBuffer dl(but(), *be_, logits);
  be_->router_sigmoid_grouped_topk(dl.f(), bias.data(), 1, 8, 4, 2, 2, true, 2.5f, ids.data(), w.data());
  // Among g3 and g2: 0.9 (e7), 0.55 (e4), 0.55 (e5), 0.3 (e6) → e7 then e4 (tie: lower id).
  EXPECT_EQ(ids, (std::vector<int32_t>{7, 4}));
  // Weights from the unbiased sigmoid scores 0.2 and 0.55, normalized, times 2.5.
  EXPECT_NEAR(w[0], 0.2f / 0.75f * 2.5f, 1e-6f);
  EXPECT_NEAR(w[1], 0.55f / 0.75f * 2.5f, 1e-6f);

  // Masked experts score 0 (transformers' masked_fill(…, 0.0)): with every kept choice score negative,
  // a masked expert can be chosen.
  const std::vector<float> negative = {-2.0f, -2.0f, -2.0f, -2.0f, -2.0f, -2.0f, -2.0f, -1.5f};
  be_->router_sigmoid_grouped_topk(dl.f(), negative.data(), 1, 8, 4, 1, 1, false, 1.0f, ids.data(), w.data());
  EXPECT_EQ(ids[0], 0);  // every kept score is below 0; the masked experts tie at 0 and expert 0 wins by id
  EXPECT_NEAR(w[0], 0.9f, 1e-6f);

  // Against the reference on random inputs, DeepSeek-V3's shape (256 experts, 8 groups, top-4 groups, k 8).
  for (int64_t T : {1, 5}) {
    const auto l = gaussian(size_t(T * 256), rng_, 2.0f);
    const auto b = gaussian(256, rng_, 0.1f);
    std::vector<int32_t> ids_ref(size_t(T * 8)), got_ids(ids_ref.size());
    std::vector<float> w_ref(ids_ref.size()), got_w(ids_ref.size());
    ref_->router_sigmoid_grouped_topk(l.data(), b.data(), T, 256, 8, 4, 8, true, 2.5f, ids_ref.data(), w_ref.data());
    DeviceBuffer d(but(), *be_, l);
    be_->router_sigmoid_grouped_topk(d.f(), b.data(), T, 256, 8, 4, 8, true, 2.5f, got_ids.data(), got_w.data());
    EXPECT_EQ(got_ids, ids_ref);
    // Weights are normalized sigmoid scores (≤ 1) times 2.5: a few ulp of a device's expf and sums, scaled.
    for (size_t i = 0; i < w_ref.size(); ++i) EXPECT_NEAR(got_w[i], w_ref[i], 1e-6f * 2.5f);
  }
}

TEST_P(BackendOps, RouterSoftmaxTopkMatchesReference) {
  struct Case { int64_t n_tokens, n_expert, k; };
  // 300 tokens: a prompt's batch (a GPU backend ranks it on the device); k 70 > 64: a GPU backend's host fallback.
  for (const Case& c : {Case{1, 8, 2}, Case{3, 64, 8}, Case{17, 128, 8}, Case{5, 512, 10}, Case{2, 16, 1}, Case{300, 128, 8},
                        Case{2, 100, 70}}) {
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

// copy_from_host / copy_to_host move bytes unchanged at every size: a few floats, a decode step's logits
// (152k floats: a GPU backend's pinned bounce path), and several bounce buffers' worth with an odd tail.
TEST_P(BackendOps, HostCopiesRoundTrip) {
  for (size_t n : {size_t(3), size_t(151936), size_t(2'500'001)}) {
    const auto src = gaussian(n, rng_);
    DeviceBuffer d(but(), *be_, n * 4);
    be_->copy_from_host(d.f(), src.data(), n * 4);
    std::vector<float> back(n + 1, -7.0f);  // one float past the end: must stay untouched
    be_->copy_to_host(back.data(), d.f(), n * 4);
    EXPECT_EQ(std::memcmp(back.data(), src.data(), n * 4), 0) << "n=" << n;
    EXPECT_EQ(back[n], -7.0f) << "n=" << n;
  }
}

// Greedy decoding's pick where the logits are: argmax_first's answer on every input — ties to the lowest
// index, −0 equal to +0, NaN never chosen (0 when every value is NaN), infinities — at vocabulary sizes.
TEST_P(BackendOps, ArgmaxMatchesArgmaxFirst) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  std::vector<std::pair<std::string, std::vector<float>>> cases;
  for (size_t n : {size_t(1), size_t(5), size_t(151936), size_t(248323)}) cases.push_back({"gaussian " + std::to_string(n), gaussian(n, rng_)});
  auto tie = gaussian(151936, rng_);
  tie[100'000] = tie[7'000] = tie[120'000] = 50.0f;
  cases.push_back({"three equal maxima", tie});
  std::vector<float> zeros(1000, -1.0f);
  zeros[3] = -0.0f, zeros[5] = 0.0f;
  cases.push_back({"-0 before +0", zeros});
  auto with_nan = gaussian(151936, rng_);
  for (size_t i = 0; i < with_nan.size(); i += 97) with_nan[i] = nan;
  cases.push_back({"NaNs among values", with_nan});
  cases.push_back({"all NaN", std::vector<float>(777, nan)});
  cases.push_back({"all -inf", std::vector<float>(777, -inf)});
  auto with_inf = gaussian(5000, rng_);
  with_inf[4000] = inf, with_inf[4500] = inf;
  cases.push_back({"+inf twice", with_inf});
  for (const auto& [what, v] : cases) {
    DeviceBuffer d(but(), *be_, v);
    EXPECT_EQ(be_->argmax(d.f(), int64_t(v.size())), argmax_first(v.data(), int64_t(v.size()))) << what;
  }
}

// A top-k sampler's candidates where the logits are: distinct ids, each with z = logit / temperature to the
// bit (the host sampler's division), holding the k best (ties at the cut by the lower id) — with many
// values tied at the cut, with NaNs, and with k past the vocabulary; −1 only where not offered.
TEST_P(BackendOps, TopCandidatesHoldTheKBest) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), temperature = 0.7f;
  auto rounded = gaussian(151936, rng_, 3.0f);
  for (auto& v : rounded) v = std::round(v * 4.0f) / 4.0f;  // ~50 values: thousands tied at a cut
  auto with_nan = gaussian(151936, rng_, 3.0f);
  for (size_t i = 0; i < with_nan.size(); i += 101) with_nan[i] = nan;
  const std::vector<std::pair<std::string, std::vector<float>>> rows = {
      {"gaussian", gaussian(151936, rng_, 3.0f)}, {"rounded", rounded}, {"NaNs", with_nan}, {"short", gaussian(12, rng_)}};
  for (const auto& [what, x] : rows) {
    const int64_t n = int64_t(x.size());
    std::vector<float> z(x);
    for (auto& v : z) v /= temperature;
    std::vector<int32_t> order;
    for (int32_t i = 0; i < n; ++i)
      if (z[size_t(i)] == z[size_t(i)]) order.push_back(i);
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return z[a] != z[b] ? z[a] > z[b] : a < b; });
    DeviceBuffer d(but(), *be_, x);
    for (int64_t k : {1, 20, 1000}) {
      const int64_t capacity = 8192;
      std::vector<int32_t> ids(capacity);
      std::vector<float> cz(capacity);
      // With the raw values of a penalty window to gather (repeated ids, NaNs among them: x[id] as it is).
      std::vector<int32_t> window;
      for (int64_t i = 0; i < 70; ++i) window.push_back(int32_t((i * 2203 + k) % n));
      window.push_back(window.front());
      std::vector<float> gathered(window.size());
      const int64_t count = be_->top_candidates(d.f(), n, temperature, k, ids.data(), cz.data(), capacity, window.data(),
                                                int64_t(window.size()), gathered.data());
      if (count < 0) {
        EXPECT_TRUE(be_->host_memory()) << "a device backend offers top_candidates";
        continue;
      }
      const int64_t wanted = std::min<int64_t>(k, int64_t(order.size()));
      ASSERT_GE(count, wanted) << what << " k " << k;
      std::set<int32_t> got;
      for (int64_t i = 0; i < count; ++i) {
        ASSERT_TRUE(ids[size_t(i)] >= 0 && ids[size_t(i)] < n) << what;
        EXPECT_TRUE(got.insert(ids[size_t(i)]).second) << what << ": id " << ids[size_t(i)] << " twice";
        const float want = x[size_t(ids[size_t(i)])] / temperature;
        if (want == want) {
          EXPECT_EQ(std::memcmp(&cz[size_t(i)], &want, sizeof(float)), 0) << what << ": z of " << ids[size_t(i)];
        }
      }
      for (int64_t r = 0; r < wanted; ++r) EXPECT_TRUE(got.count(order[size_t(r)])) << what << " k " << k << ": best #" << r << " missing";
      // A prefix of the order: every id whose z is above the lowest z returned (top-p walks it).
      float lowest = std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < count; ++i)
        if (cz[size_t(i)] == cz[size_t(i)]) lowest = std::min(lowest, cz[size_t(i)]);
      for (int32_t id : order) {
        if (z[size_t(id)] > lowest) {
          ASSERT_TRUE(got.count(id)) << what << " k " << k << ": id " << id << " above the lowest candidate missing";
        }
      }
      for (size_t i = 0; i < window.size(); ++i)
        EXPECT_EQ(std::memcmp(&gathered[i], &x[size_t(window[i])], sizeof(float)), 0) << what << ": gathered x[" << window[i] << "]";
    }
  }
}

// A draw over the whole row where the logits are (Sampler::device_draw): the token the host sampler draws
// on the same row with the same random bits, draw for draw — rows with ties (thousands of tokens on one
// value), NaNs, a flat and a peaked shape, a short one; temperature alone and with min-p (drawn in id
// order), top-p (a nucleus of a few tokens or most of a flat row; a share so small it rounds to no weight),
// top-k (1, 20, 40, 5000; past the row's length: off), both, and penalties over a window that holds the
// peaked row's best tokens, greedy too; and −1 for a row with no finite z (the host reports that).
TEST_P(BackendOps, DrawTokenDrawsAsTheSamplerOnTheRow) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  auto rounded = gaussian(151936, rng_, 3.0f);
  for (auto& v : rounded) v = std::round(v * 4.0f) / 4.0f;
  auto with_nan = gaussian(151936, rng_, 3.0f);
  for (size_t i = 0; i < with_nan.size(); i += 101) with_nan[i] = nan;
  auto peaked = gaussian(248320, rng_, 2.0f);
  for (size_t i = 0; i < peaked.size(); i += 9973) peaked[i] += 25.0f;
  const std::vector<std::pair<std::string, std::vector<float>>> rows = {{"gaussian", gaussian(151936, rng_, 3.0f)},
                                                                        {"flat", gaussian(151936, rng_, 0.05f)},
                                                                        {"rounded", rounded},
                                                                        {"NaNs", with_nan},
                                                                        {"peaked", peaked},
                                                                        {"short", gaussian(12, rng_)}};
  struct Setting {
    float temperature;
    int top_k;
    float top_p, min_p;
    float repetition = 1.0f, presence = 0.0f, frequency = 0.0f;
  };
  const std::vector<Setting> settings = {
      {0.6f, 0, 1.0f, 0.0f},    {1.0f, 0, 1.0f, 0.05f},     {1.7f, 0, 1.0f, 0.0f},                       // id order
      {1.0f, 0, 0.9f, 0.0f},    {0.6f, 0, 0.5f, 0.05f},     {1.7f, 0, 0.995f, 0.0f}, {1.0f, 0, 1e-30f, 0.0f},  // top-p
      {1.0f, 20, 1.0f, 0.0f},   {0.6f, 40, 0.95f, 0.0f},    {1.7f, 5000, 0.9f, 0.05f}, {1.0f, 1, 1.0f, 0.0f},
      {0.5f, 5000, 1.0f, 0.0f},  // the peaked row's 5000th token weighs 0 (50 below its best)
      {1.0f, 1 << 20, 1.0f, 0.0f},                                                                            // top-k
      {1.0f, 0, 1.0f, 0.0f, 1.3f}, {0.7f, 20, 0.95f, 0.0f, 1.0f, 1.5f, 0.25f}, {1.2f, 0, 0.9f, 0.02f, 1.1f, 0.5f},  // penalties
      {0.0f, 0, 1.0f, 0.0f, 1.5f}, {0.0f, 0, 1.0f, 0.0f, 1.0f, 30.0f, 1.0f}};  // greedy, penalized
  std::mt19937_64 bits_rng(3);
  for (const auto& [what, x] : rows) {
    const int64_t n = int64_t(x.size());
    DeviceBuffer d(but(), *be_, x);
    for (const Setting& setting : settings) {
      SamplerParams params;
      params.temperature = setting.temperature, params.top_k = setting.top_k, params.top_p = setting.top_p, params.min_p = setting.min_p;
      params.repetition_penalty = setting.repetition, params.presence_penalty = setting.presence, params.frequency_penalty = setting.frequency;
      params.penalty_last_n = 256, params.seed = 1;
      auto sampler = Sampler::create(params, n);
      ASSERT_TRUE(sampler);
      // A window of 256 with repeats: the peaked row's best tokens (multiples of 9973) and others.
      for (int64_t i = 0; i < 256; ++i) sampler->accept(int32_t(i % 3 == 0 ? (i * 9973) % n : (i * 7919 + i / 5) % n));
      const std::string where = what + ", temperature " + std::to_string(setting.temperature) + ", top_k " + std::to_string(setting.top_k) +
                                ", top_p " + std::to_string(setting.top_p) + ", min_p " + std::to_string(setting.min_p) + ", penalties " +
                                std::to_string(setting.repetition) + " " + std::to_string(setting.presence) + " " + std::to_string(setting.frequency);
      for (int i = 0; i < 6; ++i) {
        Sampler::DeviceDraw draw;
        ASSERT_TRUE(sampler->device_draw(&draw)) << where;
        const uint64_t bits = bits_rng() >> 11;
        const int64_t token = be_->draw_token(d.f(), n, draw, bits);
        if (token < 0) {
          ASSERT_TRUE(be_->host_memory()) << "a device backend offers draw_token";
          return;
        }
        ASSERT_EQ(token, sampler->sample(x.data(), bits)) << where << ", draw " << i;
      }
    }
  }
  // No finite z: NaNs only, an infinite largest value, −inf everywhere.
  std::vector<float> with_inf = gaussian(1000, rng_);
  with_inf[17] = std::numeric_limits<float>::infinity();
  for (const auto& row : {std::vector<float>(1000, nan), with_inf, std::vector<float>(1000, -std::numeric_limits<float>::infinity())}) {
    DeviceBuffer none(but(), *be_, row);
    for (const auto& [top_k, top_p] : {std::pair{0, 1.0f}, std::pair{0, 0.9f}, std::pair{20, 1.0f}}) {
      DeviceDraw draw;
      draw.top_k = top_k, draw.top_p = top_p;
      EXPECT_EQ(be_->draw_token(none.f(), 1000, draw, 12345), -1) << "top_k " << top_k << ", top_p " << top_p;
    }
  }
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

// The weighted combine of expert rows: bit-identical to the same backend's axpy calls in the same order
// (a destination named several times, out of order), and within axpy's bound of the reference.
TEST_P(BackendOps, ScatterAddRowsMatchesAxpyCalls) {
  // Destinations few (rows of a batch) and spread wide (another grouping on CUDA).
  for (const auto& [dim, n_dst] : {std::pair<int64_t, int64_t>{1, 9}, {100, 9}, {2048, 9}, {1, 300000}}) {
    const int64_t n_rows = 40;
    const auto dst = gaussian(size_t(n_dst * dim), rng_), src = gaussian(size_t(n_rows * dim), rng_);
    std::vector<int32_t> rows(static_cast<size_t>(n_rows));
    std::vector<float> weights(static_cast<size_t>(n_rows));
    for (int64_t r = 0; r < n_rows; ++r) {
      rows[size_t(r)] = int32_t(rng_() % (n_dst - 1));  // the last row receives nothing and must stay
      weights[size_t(r)] = 0.1f + float(rng_() % 1000) / 1000.f;
    }
    DeviceBuffer dsrc(but(), *be_, src), fused(but(), *be_, dst), calls(but(), *be_, dst);
    be_->scatter_add_rows(fused.f(), dsrc.f(), rows.data(), weights.data(), n_rows, dim);
    for (int64_t r = 0; r < n_rows; ++r) be_->axpy(calls.f() + rows[size_t(r)] * dim, dsrc.f() + r * dim, weights[size_t(r)], dim);
    const auto got = fused.read(), want = calls.read();
    EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * 4), 0) << "dim=" << dim << ": differs from axpy calls";
    auto ref = dst;
    ref_->scatter_add_rows(ref.data(), src.data(), rows.data(), weights.data(), n_rows, dim);
    std::vector<double> magnitude(ref.size());  // |dst| + Σ|w·src| per element
    for (size_t i = 0; i < ref.size(); ++i) magnitude[i] = std::fabs(double(dst[i]));
    for (int64_t r = 0; r < n_rows; ++r)
      for (int64_t i = 0; i < dim; ++i)
        magnitude[size_t(rows[size_t(r)] * dim + i)] += std::fabs(double(weights[size_t(r)]) * src[size_t(r * dim + i)]);
    Mismatches bad;
    for (size_t i = 0; i < ref.size(); ++i) {
      // Each term may fuse its multiply-add (axpy's bound: one rounding of a·x, ≤ 2^-24 of the magnitude,
      // apart per term, carried through the later additions): with ≤ 16 terms a row, 2^-20 of it.
      const double tol = 0x1p-20 * magnitude[i] + 1e-30;
      bad.check(std::fabs(got[i] - ref[i]) <= tol, i, got[i], ref[i], tol);
    }
    EXPECT_EQ(bad.count, 0) << "dim=" << dim << bad.first;
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

TEST_P(BackendOps, SigmoidMulMatchesReference) {
  for (int64_t dim : {1, 7, 128, 4096}) {
    for (int64_t n_rows : {1, 3, 17}) {
      for (bool per_row : {false, true}) {
        const auto x = gaussian(size_t(n_rows * dim), rng_);
        const auto gate = gaussian(size_t(per_row ? n_rows : n_rows * dim), rng_, 4.0f);
        auto x_ref = x;
        ref_->sigmoid_mul(x_ref.data(), gate.data(), n_rows, dim, per_row);
        DeviceBuffer dx(but(), *be_, x), dg(but(), *be_, gate);
        be_->sigmoid_mul(dx.f(), dg.f(), n_rows, dim, per_row);
        const auto got = dx.read();
        Mismatches bad;
        for (size_t i = 0; i < got.size(); ++i) {
          // exp and the division may differ by a few ulp between implementations: 1e-6 relative. A gate
          // taken from the wrong row or element is off by O(|x|).
          const double tol = 1e-6 * std::fabs(x_ref[i]) + 1e-30;
          bad.check(std::fabs(got[i] - x_ref[i]) <= tol, i, got[i], x_ref[i], tol);
        }
        EXPECT_EQ(bad.count, 0) << "dim=" << dim << " rows=" << n_rows << " per_row=" << per_row << bad.first;
      }
    }
  }
}

// Consecutive calls carry the rolling state, including calls shorter than the kernel's history.
TEST_P(BackendOps, CausalConv1dSiluMatchesReference) {
  struct Case { int64_t channels, kernel; std::vector<int64_t> calls; };  // calls: tokens of each call, in order
  for (const Case& c : {Case{8192, 4, {17, 1, 1, 2, 5}}, Case{300, 4, {1, 1, 1, 1, 3}}, Case{7, 3, {2, 1, 40}},
                        Case{1000, 2, {1, 9}}, Case{12288, 4, {1}}, Case{64, 1, {3, 1}}}) {
    const int64_t hist = c.kernel - 1;
    const auto weight = gaussian(size_t(c.channels * c.kernel), rng_, 0.5f);
    std::vector<float> state_ref = gaussian(size_t(hist * c.channels), rng_);  // mid-sequence: non-zero
    DeviceBuffer dw(but(), *be_, weight), dstate(but(), *be_, state_ref);
    for (size_t call = 0; call < c.calls.size(); ++call) {
      const int64_t n_tokens = c.calls[call];
      SCOPED_TRACE("channels=" + std::to_string(c.channels) + " kernel=" + std::to_string(c.kernel) + " call " +
                   std::to_string(call) + " T=" + std::to_string(n_tokens));
      const auto x = gaussian(size_t(n_tokens * c.channels), rng_, 2.0f);
      std::vector<float> out_ref(x.size());
      ref_->causal_conv1d_silu(x.data(), state_ref.data(), weight.data(), n_tokens, c.channels, c.kernel, out_ref.data());
      DeviceBuffer dx(but(), *be_, x), dout(but(), *be_, x.size() * 4);
      be_->causal_conv1d_silu(dx.f(), dstate.f(), dw.f(), n_tokens, c.channels, c.kernel, dout.f());
      const auto got = dout.read();
      Mismatches bad;
      for (size_t i = 0; i < got.size(); ++i) {
        // A sum of `kernel` products (fma or another order: ~kernel·2^-24 of Σ|w·m|, Σ|w·m| ≲ 10 here),
        // then SiLU's exp (a few ulp; the CPU backend's polynomial exp measures ≤ 2.2e-7 relative):
        // 1e-6·(1 + |out|). A wrong tap or state row moves it by O(1).
        const double tol = 1e-6 * (1.0 + std::fabs(out_ref[i]));
        bad.check(std::fabs(got[i] - out_ref[i]) <= tol, i, got[i], out_ref[i], tol);
      }
      EXPECT_EQ(bad.count, 0) << bad.first;
      EXPECT_EQ(dstate.read(), state_ref);  // the state is copied inputs: exact
    }
  }
}

TEST_P(BackendOps, GatedDeltaGatesMatchesReference) {
  for (int64_t n_heads : {1, 32, 64}) {
    for (int64_t n_tokens : {1, 17}) {
      auto a = gaussian(size_t(n_tokens * n_heads), rng_, 3.0f);
      a[0] = 25.0f;  // softplus's linear branch (x > 20)
      const auto b = gaussian(size_t(n_tokens * n_heads), rng_, 3.0f);
      std::vector<float> a_log(static_cast<size_t>(n_heads)), dt_bias(static_cast<size_t>(n_heads));
      std::uniform_real_distribution<float> uniform(1.0f, 16.0f);
      for (auto& x : a_log) x = std::log(uniform(rng_));  // Qwen3-Next's A_log init: log U(1, 16)
      for (auto& x : dt_bias) x = uniform(rng_) / 4.0f - 2.0f;
      std::vector<float> g_ref(a.size()), beta_ref(a.size());
      ref_->gated_delta_gates(a.data(), b.data(), a_log.data(), dt_bias.data(), n_tokens, n_heads, g_ref.data(), beta_ref.data());
      DeviceBuffer da(but(), *be_, a), db(but(), *be_, b), dal(but(), *be_, a_log), ddt(but(), *be_, dt_bias);
      DeviceBuffer dg(but(), *be_, a.size() * 4), dbeta(but(), *be_, a.size() * 4);
      be_->gated_delta_gates(da.f(), db.f(), dal.f(), ddt.f(), n_tokens, n_heads, dg.f(), dbeta.f());
      const auto g = dg.read(), beta = dbeta.read();
      Mismatches bad;
      for (size_t i = 0; i < g.size(); ++i) {
        // exp, log1p and the division may differ by a few ulp between implementations: 1e-6 relative.
        const double tol_g = 1e-6 * std::fabs(g_ref[i]) + 1e-30, tol_beta = 1e-6 * beta_ref[i] + 1e-30;
        bad.check(std::fabs(g[i] - g_ref[i]) <= tol_g, i, g[i], g_ref[i], tol_g);
        bad.check(std::fabs(beta[i] - beta_ref[i]) <= tol_beta, i, beta[i], beta_ref[i], tol_beta);
      }
      EXPECT_EQ(bad.count, 0) << "heads=" << n_heads << " T=" << n_tokens << bad.first;
    }
  }
}

// --- Gated DeltaNet --------------------------------------------------------------------------------

// A sequence of calls of gated_delta_rule on one layer's state. Inputs come as the model passes them:
// one [T, stride] row per token holding q at 0, k at n_k_heads·k_dim and v at 2·n_k_heads·k_dim, then
// `pad` unused floats.
struct GatedDeltaCase {
  int64_t n_k_heads, n_v_heads, k_dim, v_dim, pad;
  std::vector<int64_t> calls;  // tokens of each call, in order
  bool zero_state;             // start of a sequence, or a state carried from earlier tokens
  float key_similarity = 0.0f;  // keys of a head share a direction: k̂_i·k̂_j ≈ this (real keys do)
  float decay_scale = 1.0f;     // times the log decay: small makes a slow head, whose chunk solve is hardest
  std::string label() const {
    std::string s = "nk=" + std::to_string(n_k_heads) + " nv=" + std::to_string(n_v_heads) + " dk=" + std::to_string(k_dim) +
                    " dv=" + std::to_string(v_dim) + " pad=" + std::to_string(pad) + " calls=";
    for (int64_t t : calls) s += std::to_string(t) + ",";
    return s + (zero_state ? " zero state" : " carried state") + " key similarity " + std::to_string(key_similarity) +
           " decay scale " + std::to_string(decay_scale);
  }
  int64_t stride() const { return 2 * n_k_heads * k_dim + n_v_heads * v_dim + pad; }
};

struct GatedDeltaInputs {
  std::vector<float> qkv;      // [T, stride]
  std::vector<float> g, beta;  // [T, n_v_heads]
};

// Activations like the model's: q, k of any scale (they are normalized), v ~ N(0, 1); the log decay as
// the gates make it, −softplus(·)·exp(A_log), mostly between −1 and 0 with a tail to −8 (times
// decay_scale); β = sigmoid(·).
GatedDeltaInputs gated_delta_inputs(const GatedDeltaCase& c, int64_t n_tokens, std::mt19937& rng) {
  GatedDeltaInputs in{gaussian(size_t(n_tokens * c.stride()), rng, 1.0f), {}, {}};
  std::normal_distribution<float> normal(0.0f, 1.0f);
  if (c.key_similarity > 0) {
    // k = √s·m + √(1 − s)·noise with one random unit-variance direction m per key head.
    const auto common = gaussian(size_t(c.n_k_heads * c.k_dim), rng);
    const float a = std::sqrt(c.key_similarity), b = std::sqrt(1.0f - c.key_similarity);
    for (int64_t t = 0; t < n_tokens; ++t)
      for (int64_t i = 0; i < c.n_k_heads * c.k_dim; ++i) {
        float& k = in.qkv[size_t(t * c.stride() + c.n_k_heads * c.k_dim + i)];
        k = a * common[size_t(i)] + b * k;
      }
  }
  for (int64_t i = 0; i < n_tokens * c.n_v_heads; ++i) {
    const float x = normal(rng);
    const float softplus = std::log1p(std::exp(x));
    const float floor = -8.0f * std::max(1.0f, c.decay_scale);
    in.g.push_back(std::max(floor, -softplus * std::exp(-1.0f + 0.5f * normal(rng)) * c.decay_scale));
    in.beta.push_back(1.0f / (1.0f + std::exp(-1.5f * normal(rng))));
  }
  return in;
}

struct GatedDeltaRun {
  std::vector<std::vector<float>> outs, states;  // after each call: [T, n_v_heads, v_dim], [n_v_heads, k_dim, v_dim]
};

// Runs the case's calls on a host backend (the reference, or a CPU backend with chosen tuning).
GatedDeltaRun run_gated_delta(Backend& be, const GatedDeltaCase& c, const std::vector<GatedDeltaInputs>& inputs,
                              const std::vector<float>& state0) {
  GatedDeltaRun run;
  std::vector<float> state = state0;
  const float q_scale = 1.0f / std::sqrt(float(c.k_dim));
  for (size_t call = 0; call < c.calls.size(); ++call) {
    const int64_t n_tokens = c.calls[call];
    const GatedDeltaInputs& in = inputs[call];
    std::vector<float> out(size_t(n_tokens * c.n_v_heads * c.v_dim));
    const float* q = in.qkv.data();
    be.gated_delta_rule(q, q + c.n_k_heads * c.k_dim, q + 2 * c.n_k_heads * c.k_dim, c.stride(), in.g.data(), in.beta.data(),
                        state.data(), n_tokens, c.n_k_heads, c.n_v_heads, c.k_dim, c.v_dim, q_scale, out.data());
    run.outs.push_back(out);
    run.states.push_back(state);
  }
  return run;
}

// Largest |got − want| / (1 + |want|) over two runs' outputs and states.
struct GatedDeltaError { double out = 0, state = 0; };
GatedDeltaError gated_delta_error(const GatedDeltaRun& got, const GatedDeltaRun& want) {
  GatedDeltaError e;
  auto worst = [](const std::vector<float>& a, const std::vector<float>& b, double& max) {
    EXPECT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
      const double d = std::fabs(double(a[i]) - b[i]) / (1.0 + std::fabs(b[i]));
      max = std::isnan(d) ? INFINITY : std::max(max, d);
    }
  };
  for (size_t i = 0; i < want.outs.size(); ++i) {
    worst(got.outs[i], want.outs[i], e.out);
    worst(got.states[i], want.states[i], e.state);
  }
  return e;
}

const std::vector<GatedDeltaCase>& gated_delta_cases() {
  static const std::vector<GatedDeltaCase> cases = {
      {2, 2, 32, 32, 0, {1}, true},                      // decode from an empty state
      {2, 4, 64, 48, 5, {1, 1, 1, 1, 1}, false},         // decode steps, ratio 2, dk ≠ dv, padded rows
      {1, 4, 16, 40, 0, {200}, false},                   // prefill over 3 chunk boundaries + a partial chunk, ratio 4
      {2, 8, 128, 128, 3, {200, 1, 1}, true},            // the real head size, prefill then decode, ratio 4
      {3, 6, 24, 20, 1, {64, 65, 1, 7}, false},          // exactly one chunk, one past it; columns past the last vector
      {1, 2, 128, 128, 0, {3, 130}, false},              // short prefill, then long
      // Keys of a head nearly parallel and decays slow: the hardest case for the chunked form's
      // triangular solve (entries of A near β) and the largest state.
      {2, 4, 128, 128, 0, {200}, false, 0.9f},
      {2, 4, 128, 128, 0, {200}, false, 0.99f, 0.01f},
      {2, 4, 128, 128, 0, {130, 1}, false, 0.999f, 0.001f},
      // Decays down to e^-160 per token: the state underflows to zero within a few tokens.
      {2, 4, 64, 32, 0, {50, 1, 1}, false, 0.0f, 20.0f},
  };
  return cases;
}

// Largest |Δ| / (1 + |reference|) measured over these cases (scalar and AVX2 tables, and the scalar
// table built with 16 lanes as AVX-512 has):
//   the recurrence:    outputs 3.3e-7, states 1.5e-6;
//   the chunked form:  outputs 3.8e-7, states 1.4e-6.
// Both are fp32 reorderings of sums of k_dim (or chunk) products compounded over up to 200 tokens; the
// largest come with slow decays (the state grows) and near-parallel keys. The chunked form's triangular
// solve showed no growth beyond that. The bounds are ~5× those; a wrong head mapping, gate, decay or
// chunk boundary is off by 1e-3 or more.
constexpr double gated_delta_out_tolerance = 2e-6;
constexpr double gated_delta_state_tolerance = 1e-5;

// One case on the backend under test against the reference: its calls in order on one state carried
// from call to call, outputs and states within the gated-delta tolerances.
void BackendOps::check_gated_delta_case(const GatedDeltaCase& c) {
  SCOPED_TRACE(c.label());
  std::vector<GatedDeltaInputs> inputs;
  for (int64_t n_tokens : c.calls) inputs.push_back(gated_delta_inputs(c, n_tokens, rng_));
  const size_t state_floats = size_t(c.n_v_heads * c.k_dim * c.v_dim);
  const std::vector<float> state0 = c.zero_state ? std::vector<float>(state_floats, 0.0f) : gaussian(state_floats, rng_, 0.5f);
  const GatedDeltaRun want = run_gated_delta(*ref_, c, inputs, state0);

  GatedDeltaRun got;
  DeviceBuffer dstate(but(), *be_, state0);
  const float q_scale = 1.0f / std::sqrt(float(c.k_dim));
  for (size_t call = 0; call < c.calls.size(); ++call) {
    const int64_t n_tokens = c.calls[call];
    DeviceBuffer dqkv(but(), *be_, inputs[call].qkv), dg(but(), *be_, inputs[call].g), dbeta(but(), *be_, inputs[call].beta);
    DeviceBuffer dout(but(), *be_, size_t(n_tokens * c.n_v_heads * c.v_dim) * 4);
    const float* q = dqkv.f();
    be_->gated_delta_rule(q, q + c.n_k_heads * c.k_dim, q + 2 * c.n_k_heads * c.k_dim, c.stride(), dg.f(), dbeta.f(), dstate.f(),
                          n_tokens, c.n_k_heads, c.n_v_heads, c.k_dim, c.v_dim, q_scale, dout.f());
    got.outs.push_back(dout.read());
    got.states.push_back(dstate.read());
  }
  const GatedDeltaError e = gated_delta_error(got, want);
  EXPECT_LE(e.out, gated_delta_out_tolerance) << "outputs";
  EXPECT_LE(e.state, gated_delta_state_tolerance) << "state";
}

TEST_P(BackendOps, GatedDeltaRuleMatchesReference) {
  for (const GatedDeltaCase& c : gated_delta_cases()) check_gated_delta_case(c);
}

// Long contexts with few query rows: the CUDA backend splits the keys across blocks (flash-decoding)
// when a context's (KV head, row tile) blocks cannot fill the GPU, which holds for every case here
// (≤ 8 KV heads, ≤ 4 row tiles each, ≥ 700 keys): GQA at decode and with a few tokens, MLA's latent
// layout at its real widths (576/512) with 128 and 16 heads, and prefill rows crossing row tiles.
TEST_P(BackendOps, AttentionOverLongContextsMatchesReference) {
  struct Case { int64_t n_tokens, n_past; AttentionLayout layout; bool latent; };
  const std::vector<Case> cases = {
      {1, 3000, AttentionLayout::gqa(8, 2, 128), false},      // Qwen3-30B's group of 4, one decode token
      {1, 5000, AttentionLayout::gqa(16, 1, 64), false},      // group 16, a split's last tile partial
      {3, 2000, AttentionLayout::gqa(8, 4, 64), false},       // several tokens: each split masks causally
      {40, 700, AttentionLayout::gqa(4, 1, 128), false},      // prefill: 160 rows over five row tiles
      {1, 2200, AttentionLayout::gqa(4, 4, 256), false},      // no grouping, Qwen3.5's head_dim
      {1, 2500, AttentionLayout::gqa(32, 2, 256), false},     // Qwen3.5-397B's group of 16 wide heads
      {1, 1800, AttentionLayout::gqa(64, 4, 128), false},     // Qwen3-235B's group of 16
      {1, 1500, {128, 1, 576, 512, 576, 576}, true},          // DeepSeek-V3's latent decode, all heads
      {2, 2500, {16, 1, 576, 512, 576, 576}, true},           // latent, two tokens
  };
  for (const Case& c : cases) {
    const AttentionLayout& l = c.layout;
    const int64_t n_ctx = c.n_past + c.n_tokens;
    const auto q = gaussian(size_t(c.n_tokens * l.n_head * l.k_dim), rng_);
    const auto k = gaussian(size_t(n_ctx * l.k_stride), rng_);
    const auto v = c.latent ? k : gaussian(size_t(n_ctx * l.v_stride), rng_);
    // Scores of a few units, as trained models have: a flat softmax over thousands of keys would hide
    // a wrong split merge as well as the right one.
    const float scale = 3.0f / std::sqrt(float(l.k_dim));
    std::vector<float> out_ref(size_t(c.n_tokens * l.n_head * l.v_dim));
    ref_->attention(q.data(), k.data(), v.data(), c.n_tokens, c.n_past, l, scale, out_ref.data());
    DeviceBuffer dq(but(), *be_, q), dk(but(), *be_, k), dout(but(), *be_, out_ref.size() * 4);
    DeviceBuffer dv(but(), *be_, v);
    be_->attention(dq.f(), dk.f(), c.latent ? dk.f() : dv.f(), c.n_tokens, c.n_past, l, scale, dout.f());
    const auto got = dout.read();
    const float v_max = std::fabs(*std::max_element(v.begin(), v.end(), [](float a, float b) { return std::fabs(a) < std::fabs(b); }));
    Mismatches bad;
    for (size_t i = 0; i < got.size(); ++i) {
      // A convex combination of values, as above: rounding of scores and of sums over up to 5000 keys
      // stays ~1e-6·max|v|; a split merged with a wrong weight or a missed key tile is off by ≥ 1e-3.
      const double tol = 1e-5 * v_max;
      bad.check(std::fabs(got[i] - out_ref[i]) <= tol, i, got[i], out_ref[i], tol);
    }
    EXPECT_EQ(bad.count, 0) << "T=" << c.n_tokens << " n_past=" << c.n_past << " heads " << l.n_head << "/" << l.n_head_kv
                            << " k_dim " << l.k_dim << " v_dim " << l.v_dim << " latent " << c.latent << bad.first;
  }
}

// Token counts around the chunk size (64) in one sequence whose state carries from call to call: a
// single token, one short of a chunk, exactly one, one past, several chunks and a partial one, at
// Qwen3.5's head size. The CUDA backend runs the chunked form from 128 tokens on
// (cuda::gated_delta_chunked_min_tokens) and token by token below, so both forms and the passage
// between them are covered (attention_lab also checks the chunked form alone at 1 … 2048 tokens).
TEST_P(BackendOps, GatedDeltaRuleAcrossChunkBoundariesMatchesReference) {
  const std::vector<GatedDeltaCase> cases = {
      {2, 4, 128, 128, 0, {1, 63, 64, 65, 200, 1}, false},
      {2, 4, 128, 128, 7, {129, 128, 127}, true, 0.9f},  // near-parallel keys, padded rows
      {1, 2, 64, 96, 0, {100, 1, 31}, false},             // other widths: k_dim 64, v_dim three column tiles
  };
  // The tolerances of GatedDeltaRuleMatchesReference: both forms are fp32 reorderings of the same sums.
  for (const GatedDeltaCase& c : cases) check_gated_delta_case(c);
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

// MOEFLUX_CUDA_TRACE=FILE (a developer's switch, read when a CUDA backend is made): when the backend goes,
// FILE gets a row per op in queue order after an anchor, with the host's and the GPU's times on one clock.
TEST(CudaTrace, WritesARowPerOpOnOneClock) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA GPU";
  const std::string path = ::testing::TempDir() + "moeflux_cuda_trace.csv";
  std::remove(path.c_str());
  ::setenv("MOEFLUX_CUDA_TRACE", path.c_str(), 1);
  {
    auto be = make_cuda_backend(0);
    ::unsetenv("MOEFLUX_CUDA_TRACE");
    float* x = be->alloc_activations(1 << 20);
    for (int i = 0; i < 5; ++i) be->fill(x, float(i), 1 << 20);
    be->synchronize();
    be->free_activations(x);
  }
  std::ifstream in(path);
  ASSERT_TRUE(in) << path;
  std::string line;
  std::getline(in, line);
  EXPECT_EQ(line, "op,host_us,gpu_us");
  std::vector<std::string> ops;
  std::vector<double> host, gpu;
  while (std::getline(in, line)) {
    const size_t a = line.find(','), b = line.rfind(',');
    ASSERT_TRUE(a != std::string::npos && b > a) << line;
    ops.push_back(line.substr(0, a));
    host.push_back(std::stod(line.substr(a + 1, b - a - 1)));
    gpu.push_back(std::stod(line.substr(b + 1)));
  }
  ASSERT_EQ(ops, (std::vector<std::string>{"anchor", "fill", "fill", "fill", "fill", "fill"}));
  for (size_t i = 1; i < ops.size(); ++i) {
    EXPECT_GE(gpu[i], gpu[i - 1]) << "row " << i;  // one stream: the GPU reaches the ops in order
    EXPECT_GE(host[i], host[i - 1]) << "row " << i;
    // The GPU reaches an op after the host queued it; the clocks are aligned at the anchor to within the
    // host's time to record one event (a few µs; 50 allowed for a loaded machine).
    EXPECT_GE(gpu[i], host[i] - 50.0) << "row " << i;
  }
  std::remove(path.c_str());
}

// --- device routing and moe_decode (a GPU decodes one token without a host round trip) ------------

// The device routers write ids and weights to backend memory; they must choose as the host routers do.
// Expert counts cover each form of the CUDA softmax router: 4, 8, 16 and 32 experts a lane in registers
// (61 and 1000: a partly filled last column), and the shared-memory form beyond 1024; k 40 and 64 choose
// more experts than a warp has lanes (each weight renormalized).
TEST_P(BackendOps, DeviceRoutersMatchHostRouters) {
  for (const auto& [T, E, k] : {std::tuple<int64_t, int64_t, int64_t>{1, 128, 8}, {3, 512, 10}, {2, 64, 4}, {2, 61, 6}, {2, 256, 8},
                                {1, 1000, 16}, {2, 1500, 8}, {2, 256, 40}, {1, 1500, 64}}) {
    const auto logits = gaussian(size_t(T * E), rng_, 2.0f);
    std::vector<int32_t> ids_ref(size_t(T * k));
    std::vector<float> w_ref(ids_ref.size());
    ref_->router_softmax_topk(logits.data(), T, E, k, true, ids_ref.data(), w_ref.data());
    DeviceBuffer dl(but(), *be_, logits), di(but(), *be_, size_t(T * k) * 4), dw(but(), *be_, size_t(T * k) * 4);
    be_->router_softmax_topk_device(dl.f(), T, E, k, true, reinterpret_cast<int32_t*>(di.raw()), dw.f());
    const auto got_w = dw.read(), got_raw = di.read();
    std::vector<int32_t> got_ids(got_raw.size());
    std::memcpy(got_ids.data(), got_raw.data(), got_ids.size() * 4);
    // Random gaussian logits have no near ties at these sizes (checked by the host test's tie count).
    EXPECT_EQ(got_ids, ids_ref) << "E=" << E;
    for (size_t i = 0; i < w_ref.size(); ++i) EXPECT_NEAR(got_w[i], w_ref[i], 1e-6f);  // softmax outputs ≤ 1
  }
  // DeepSeek-V3's grouped sigmoid router: 256 experts, 8 groups, top-4 groups, k 8, bias in backend memory.
  for (int64_t T : {1, 4}) {
    const auto l = gaussian(size_t(T * 256), rng_, 2.0f);
    const auto b = gaussian(256, rng_, 0.1f);
    std::vector<int32_t> ids_ref(size_t(T * 8));
    std::vector<float> w_ref(ids_ref.size());
    ref_->router_sigmoid_grouped_topk(l.data(), b.data(), T, 256, 8, 4, 8, true, 2.5f, ids_ref.data(), w_ref.data());
    DeviceBuffer dl(but(), *be_, l), db(but(), *be_, b), di(but(), *be_, size_t(T * 8) * 4), dw(but(), *be_, size_t(T * 8) * 4);
    be_->router_sigmoid_grouped_topk_device(dl.f(), db.f(), T, 256, 8, 4, 8, true, 2.5f, reinterpret_cast<int32_t*>(di.raw()), dw.f());
    const auto got_w = dw.read(), got_raw = di.read();
    std::vector<int32_t> got_ids(got_raw.size());
    std::memcpy(got_ids.data(), got_raw.data(), got_ids.size() * 4);
    EXPECT_EQ(got_ids, ids_ref);
    for (size_t i = 0; i < w_ref.size(); ++i) EXPECT_NEAR(got_w[i], w_ref[i], 1e-6f * 2.5f);
  }
}

// A decode token's norm, router and top-k as one op against the ops in turn on the same backend: x_out
// and h to the bit, the logits as a matmul of h (the fused form may sum a row in another order), the same
// experts and their weights within the routers' 1e-6. Cases: Qwen3-30B's router (128 experts, a GPU's
// warp a row), 256 experts (two rows a warp), a partial lane column (61), no residual (y null), and
// Qwen3.5-397B's 512 experts over 4096 columns (more than a GPU fuses: the ops in turn).
TEST_P(BackendOps, NormRouteMatchesTheOpsInTurn) {
  struct Case { int64_t dim, n_expert, k; bool add; };
  const float eps = 1e-6f;
  for (const Case& c : {Case{2048, 128, 8, true}, Case{2048, 256, 8, true}, Case{4096, 512, 10, true}, Case{512, 61, 6, true},
                        Case{2048, 128, 8, false}}) {
    SCOPED_TRACE("dim " + std::to_string(c.dim) + " experts " + std::to_string(c.n_expert));
    const size_t n = size_t(c.dim);
    const auto x = gaussian(n, rng_, 3.0f), y = gaussian(n, rng_, 2.0f), weight = gaussian(n, rng_);
    const auto w = gaussian(size_t(c.n_expert * c.dim), rng_, 0.05f);
    const QuantizedMatrix router = quantize_matrix(w.data(), c.n_expert, c.dim, WeightFormat::bf16);
    DeviceWeight dr(but(), *be_, router);
    DeviceBuffer dx(but(), *be_, x), dy(but(), *be_, y), dw(but(), *be_, weight);
    DeviceBuffer dx_out(but(), *be_, n * 4), dh(but(), *be_, n * 4), dl(but(), *be_, size_t(c.n_expert) * 4);
    DeviceBuffer di(but(), *be_, size_t(c.k) * 4), dwt(but(), *be_, size_t(c.k) * 4);
    be_->add_rms_norm_route_device(dx.f(), c.add ? dy.f() : nullptr, dw.f(), eps, c.dim, c.add ? dx_out.f() : dx.f(), dh.f(), dr.view,
                                   dl.f(), c.k, true, reinterpret_cast<int32_t*>(di.raw()), dwt.f());
    DeviceBuffer dx_out2(but(), *be_, n * 4), dh2(but(), *be_, n * 4), dl2(but(), *be_, size_t(c.n_expert) * 4);
    DeviceBuffer di2(but(), *be_, size_t(c.k) * 4), dwt2(but(), *be_, size_t(c.k) * 4);
    const MatmulJob job{dr.view, dh2.f(), dl2.f(), 1};
    be_->add_rms_norm_matmul(dx.f(), c.add ? dy.f() : nullptr, dw.f(), eps, 1, c.dim, c.add ? dx_out2.f() : dx.f(), dh2.f(), &job, 1);
    be_->router_softmax_topk_device(dl2.f(), 1, c.n_expert, c.k, true, reinterpret_cast<int32_t*>(di2.raw()), dwt2.f());
    const auto h = dh.read();
    EXPECT_EQ(h, dh2.read());
    if (c.add) {
      EXPECT_EQ(dx_out.read(), dx_out2.read());
    }
    const auto logits = dl.read();
    std::vector<float> logits_ref(logits.size());
    ref_->matmul(router.view(), h.data(), logits_ref.data(), 1);
    expect_matmul_close(router, h, 1, logits, logits_ref);
    // Random gaussian logits have no near ties at these sizes (as in DeviceRoutersMatchHostRouters).
    EXPECT_EQ(di.read(), di2.read());
    const auto got_w = dwt.read(), turn_w = dwt2.read();
    for (size_t i = 0; i < got_w.size(); ++i) EXPECT_NEAR(got_w[i], turn_w[i], 1e-6f);  // softmax outputs ≤ 1
  }
}

// moe_decode against the reference's expert-by-expert loop, with blobs laid out as a pack lays them (gate,
// up, down, each part 64-byte aligned) at scattered table entries, in every expert format; the second
// shape has Qwen3.5-397B's 10 experts × 1024 intermediate (a GPU stages all their h at once), the third
// more intermediate than a GPU block holds for 10 experts (it runs them in groups).
TEST_P(BackendOps, MoeDecodeMatchesReference) {
  struct Shape { int64_t k, I, H; };
  const int64_t E = 12;
  for (const Shape& shape : {Shape{4, 128, 256}, Shape{10, 1024, 128}, Shape{10, 6144, 64}})
  for (WeightFormat f : {WeightFormat::bf16, WeightFormat::q8, WeightFormat::q4}) {
    const int64_t k = shape.k, I = shape.I, H = shape.H;
    // One blob per expert: gate [I, H], up [I, H], down [H, I].
    std::vector<std::vector<uint8_t>> blobs;
    ExpertLayout layout;
    WeightView* views[] = {&layout.gate, &layout.up, &layout.down};
    for (int64_t e = 0; e < E; ++e) {
      std::vector<uint8_t> blob;
      for (int m = 0; m < 3; ++m) {
        const int64_t rows = m < 2 ? I : H, cols = m < 2 ? H : I;
        const auto w = gaussian(size_t(rows * cols), rng_, 0.05f);
        const QuantizedMatrix q = quantize_matrix(w.data(), rows, cols, f);
        auto place = [&](const std::vector<uint8_t>& part) -> const void* {
          if (part.empty()) return nullptr;
          blob.resize((blob.size() + 63) / 64 * 64);
          const size_t at = blob.size();
          blob.insert(blob.end(), part.begin(), part.end());
          return reinterpret_cast<const void*>(uintptr_t(at));
        };
        const void* d = place(q.data);
        const void* sc = place(q.scales);
        const void* bi = place(q.biases);
        *views[m] = {f, rows, cols, d, sc, bi};
      }
      blobs.push_back(std::move(blob));
    }
    layout.n_table = E;
    std::vector<std::unique_ptr<DeviceBuffer>> device_blobs;
    std::vector<const void*> host_table(static_cast<size_t>(E)), device_table(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) {
      device_blobs.push_back(std::make_unique<DeviceBuffer>(but(), *be_, blobs[size_t(e)]));
      host_table[size_t(e)] = blobs[size_t(e)].data();
      device_table[size_t(e)] = device_blobs.back()->raw();
    }
    const std::vector<int32_t> order = {7, 2, 11, 0, 5, 9, 1, 3, 10, 4};
    const std::vector<int32_t> ids(order.begin(), order.begin() + k);
    std::vector<float> weights;
    for (int64_t j = 0; j < k; ++j) weights.push_back(float(k - j) / float(k * (k + 1) / 2));
    const auto x = gaussian(size_t(H), rng_);
    std::vector<float> h_ref(static_cast<size_t>(k * I)), part_ref(static_cast<size_t>(k * H)), y_ref(static_cast<size_t>(H));
    ref_->moe_decode(layout, host_table.data(), ids.data(), weights.data(), k, x.data(), h_ref.data(), part_ref.data(), y_ref.data());

    DeviceBuffer dt(but(), *be_, device_table), di(but(), *be_, ids), dw(but(), *be_, weights), dx(but(), *be_, x);
    DeviceBuffer dh(but(), *be_, size_t(k * I) * 4), dp(but(), *be_, size_t(k * H) * 4), dy(but(), *be_, size_t(H) * 4);
    be_->moe_decode(layout, static_cast<const void* const*>(dt.raw()), static_cast<const int32_t*>(di.raw()), dw.f(), k, dx.f(), dh.f(),
                    dp.f(), dy.f());
    const auto y = dy.read();
    // fp32 sums in another order through two matmuls and a SwiGLU: 1e-5 of the output's scale. A GPU reads
    // q4 weights as 2 + q/64 and removes 2·Σx per group (docs/BENCHMARKS.md, "CUDA kernel lab"): that
    // cancellation costs up to ~30× the rounding of an exact decode, 1.5e-5 of the scale at k = 10,
    // I = 1024; 4e-5 for q4.
    float scale = 0;
    for (float v : y_ref) scale = std::max(scale, std::fabs(v));
    const float tol = (f == WeightFormat::q4 ? 4e-5f : 1e-5f) * scale;
    Mismatches bad;
    for (size_t i = 0; i < y.size(); ++i) bad.check(std::fabs(y[i] - y_ref[i]) <= tol, i, y[i], y_ref[i], tol);
    EXPECT_EQ(bad.count, 0) << weight_format_name(f) << " k=" << k << " I=" << I << bad.first;
    // Where the blobs sit does not matter: the same experts at other table entries give the same bits.
    DeviceBuffer dt2(but(), *be_, std::vector<const void*>{device_table.rbegin(), device_table.rend()});
    std::vector<int32_t> moved;
    for (int32_t id : ids) moved.push_back(int32_t(E - 1 - id));
    DeviceBuffer di2(but(), *be_, moved), dy2(but(), *be_, size_t(H) * 4);
    be_->moe_decode(layout, static_cast<const void* const*>(dt2.raw()), static_cast<const int32_t*>(di2.raw()), dw.f(), k, dx.f(), dh.f(),
                    dp.f(), dy2.f());
    EXPECT_EQ(dy2.read(), y) << weight_format_name(f);
    // In two groups, the second continuing the first's sum: the same bits as one call. The calls above
    // name the table's size (a GPU reads it whole before the ids are in); these do not.
    DeviceBuffer dy3(but(), *be_, size_t(H) * 4);
    const auto* table = static_cast<const void* const*>(dt.raw());
    const auto* id = static_cast<const int32_t*>(di.raw());
    ExpertLayout unsized = layout;
    unsized.n_table = 0;
    be_->moe_decode(unsized, table, id, dw.f(), 1, dx.f(), dh.f(), dp.f(), dy3.f());
    be_->moe_decode(unsized, table, id + 1, dw.f() + 1, k - 1, dx.f(), dh.f(), dp.f(), dy3.f(), /*accumulate=*/true);
    EXPECT_EQ(dy3.read(), y) << weight_format_name(f);

  }
}

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

// --- The two paths of the CPU backend's gated_delta_rule ------------------------------------------

std::vector<std::pair<std::string, const CpuKernels*>> every_table() {
  std::vector<std::pair<std::string, const CpuKernels*>> tables = {{"scalar", &cpu_kernels_scalar()}};
  if (const CpuKernels* k = cpu_kernels_avx2()) tables.push_back({"avx2", k});
  if (const CpuKernels* k = cpu_kernels_avx512()) tables.push_back({"avx512", k});
  return tables;
}

CpuBackendTuning gated_delta_path(bool chunked) {
  CpuBackendTuning tuning;
  tuning.gated_delta_chunk_min_tokens = chunked ? 1 : INT64_MAX;  // chunked: even single tokens
  return tuning;
}

// Both paths, forced, on every table against the reference (the op test above sees only the path the
// default crossover picks).
TEST(CpuGatedDelta, BothPathsMatchReference) {
  std::mt19937 rng(11);
  auto ref = make_reference_backend();
  for (const auto& [isa, kernels] : every_table()) {
    for (bool chunked : {false, true}) {
      auto be = make_cpu_backend_with_kernels(*kernels, 3, gated_delta_path(chunked));
      for (const GatedDeltaCase& c : gated_delta_cases()) {
        SCOPED_TRACE(isa + (chunked ? " chunked " : " recurrent ") + c.label());
        std::vector<GatedDeltaInputs> inputs;
        for (int64_t n_tokens : c.calls) inputs.push_back(gated_delta_inputs(c, n_tokens, rng));
        const auto state0 = c.zero_state ? std::vector<float>(size_t(c.n_v_heads * c.k_dim * c.v_dim), 0.0f)
                                         : gaussian(size_t(c.n_v_heads * c.k_dim * c.v_dim), rng, 0.5f);
        const GatedDeltaError e = gated_delta_error(run_gated_delta(*be, c, inputs, state0), run_gated_delta(*ref, c, inputs, state0));
        EXPECT_LE(e.out, gated_delta_out_tolerance) << "outputs";
        EXPECT_LE(e.state, gated_delta_state_tolerance) << "state";
      }
    }
  }
}

// One prefill call of 200 tokens against 200 decode calls of one token, on the real head size: each
// path over the whole prompt (the recurrence carries decays as a scalar between tokens of a call; the
// chunked form solves per chunk) against the decode path.
TEST(CpuGatedDelta, PrefillMatchesTokenByToken) {
  std::mt19937 rng(5);
  const GatedDeltaCase prefill{2, 4, 128, 128, 0, {200}, false};
  GatedDeltaCase decode = prefill;
  decode.calls.assign(200, 1);
  const GatedDeltaInputs in = gated_delta_inputs(prefill, 200, rng);
  std::vector<GatedDeltaInputs> steps;
  for (int64_t t = 0; t < 200; ++t) {
    const int64_t s = prefill.stride(), nv = prefill.n_v_heads;
    steps.push_back({std::vector<float>(in.qkv.begin() + t * s, in.qkv.begin() + (t + 1) * s),
                     std::vector<float>(in.g.begin() + t * nv, in.g.begin() + (t + 1) * nv),
                     std::vector<float>(in.beta.begin() + t * nv, in.beta.begin() + (t + 1) * nv)});
  }
  const auto state0 = gaussian(size_t(prefill.n_v_heads * prefill.k_dim * prefill.v_dim), rng, 0.5f);
  for (const auto& [isa, kernels] : every_table()) {
    const GatedDeltaRun by_token = run_gated_delta(*make_cpu_backend_with_kernels(*kernels, 2), decode, steps, state0);
    GatedDeltaRun by_token_joined;  // the 200 outputs as one [200, nv, dv] block, and the last state
    by_token_joined.outs.emplace_back();
    for (const auto& o : by_token.outs) by_token_joined.outs[0].insert(by_token_joined.outs[0].end(), o.begin(), o.end());
    by_token_joined.states.push_back(by_token.states.back());
    for (bool chunked : {false, true}) {
      SCOPED_TRACE(isa + (chunked ? " chunked" : " recurrent"));
      auto be = make_cpu_backend_with_kernels(*kernels, 2, gated_delta_path(chunked));
      const GatedDeltaError e = gated_delta_error(run_gated_delta(*be, prefill, {in}, state0), by_token_joined);
      // Measured 5e-8 (outputs) and 1.3e-7 (states) apart, each path being that close to the reference;
      // held to the reference bounds.
      EXPECT_LE(e.out, gated_delta_out_tolerance);
      EXPECT_LE(e.state, gated_delta_state_tolerance);
    }
  }
}

// Value heads are the only split: 1 and 4 threads give the same bits, on both paths.
TEST(CpuGatedDelta, BitIdenticalAcrossThreadCounts) {
  std::mt19937 rng(9);
  const GatedDeltaCase c{2, 8, 128, 128, 0, {200, 1}, false};
  std::vector<GatedDeltaInputs> inputs;
  for (int64_t n_tokens : c.calls) inputs.push_back(gated_delta_inputs(c, n_tokens, rng));
  const auto state0 = gaussian(size_t(c.n_v_heads * c.k_dim * c.v_dim), rng, 0.5f);
  for (const auto& [isa, kernels] : every_table()) {
    for (bool chunked : {false, true}) {
      const GatedDeltaRun one = run_gated_delta(*make_cpu_backend_with_kernels(*kernels, 1, gated_delta_path(chunked)), c, inputs, state0);
      const GatedDeltaRun four = run_gated_delta(*make_cpu_backend_with_kernels(*kernels, 4, gated_delta_path(chunked)), c, inputs, state0);
      for (size_t call = 0; call < c.calls.size(); ++call) {
        EXPECT_EQ(one.outs[call], four.outs[call]) << isa << (chunked ? " chunked" : " recurrent") << " call " << call;
        EXPECT_EQ(one.states[call], four.states[call]) << isa << (chunked ? " chunked" : " recurrent") << " call " << call;
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
