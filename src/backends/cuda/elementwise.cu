// The kernels of elementwise.cuh: grid-stride loops over elements (or rows × columns).
#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_common.cuh"
#include "backends/cuda/elementwise.cuh"
#include "sampling/draw_weight.hpp"

namespace moeflux::cuda {
namespace {

constexpr int threads = 256;

__device__ __forceinline__ int64_t first_index() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t grid_stride() { return int64_t(gridDim.x) * blockDim.x; }

// grid.y = token (strided).
__global__ void embed_rows_kernel(WeightView w, const int32_t* __restrict__ ids, int64_t n_tokens, float* __restrict__ out) {
  dependent_launch_begin();
  for (int64_t t = blockIdx.y; t < n_tokens; t += gridDim.y)
    for (int64_t c = first_index(); c < w.cols; c += grid_stride())
      out[t * w.cols + c] = weight_at(w.format, w.cols, w.data, w.scales, w.biases, ids[t], c);
}

__global__ void swiglu_kernel(const float* gate, const float* up, float* out, int64_t n) {
  dependent_launch_begin();
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const float g = gate[i], u = up[i];  // both read before the write: out may alias either
    out[i] = swiglu_of(g, u);
  }
}

__global__ void axpy_kernel(float* acc, const float* __restrict__ x, float a, int64_t n) {
  dependent_launch_begin();
  for (int64_t i = first_index(); i < n; i += grid_stride()) acc[i] += a * x[i];
}

__global__ void fill_kernel(float* x, float value, int64_t n) {
  dependent_launch_begin();
  for (int64_t i = first_index(); i < n; i += grid_stride()) x[i] = value;
}

// grid.y = destination row (strided); src_stride 0 repeats one row.
__global__ void copy_rows_kernel(const float* __restrict__ src, int64_t src_stride, const int32_t* __restrict__ rows,
                                 float* __restrict__ dst, int64_t dst_stride, int64_t n_rows, int64_t dim) {
  dependent_launch_begin();
  for (int64_t r = blockIdx.y; r < n_rows; r += gridDim.y) {
    const float* s = src + (rows ? int64_t(rows[r]) : r) * src_stride;
    for (int64_t i = first_index(); i < dim; i += grid_stride()) dst[r * dst_stride + i] = s[i];
  }
}

__global__ void sigmoid_mul_kernel(float* x, const float* __restrict__ gate, int64_t n_rows, int64_t dim, bool per_row) {
  dependent_launch_begin();
  for (int64_t r = blockIdx.y; r < n_rows; r += gridDim.y)
    for (int64_t i = first_index(); i < dim; i += grid_stride()) {
      const float g = per_row ? gate[r] : gate[r * dim + i];
      x[r * dim + i] *= 1.0f / (1.0f + expf(-g));
    }
}

// grid.y = destination (strided): its terms added in order, each as axpy_kernel computes acc += a · x.
__global__ void scatter_add_rows_kernel(float* dst, const float* __restrict__ src, const int32_t* __restrict__ targets,
                                        const int32_t* __restrict__ start, const int32_t* __restrict__ order,
                                        const float* __restrict__ weights, int64_t n_targets, int64_t dim) {
  dependent_launch_begin();
  for (int64_t t = blockIdx.y; t < n_targets; t += gridDim.y) {
    float* out = dst + int64_t(targets[t]) * dim;
    const int j0 = start[t], j1 = start[t + 1];
    for (int64_t i = first_index(); i < dim; i += grid_stride()) {
      float acc = out[i];
      for (int j = j0; j < j1; ++j) {
        const float a = weights[j];
        acc += a * src[int64_t(order[j]) * dim + i];
      }
      out[i] = acc;
    }
  }
}

// Blocks over columns (x) and rows (y) for a [n_rows, dim] loop.
dim3 rows_grid(int64_t n_rows, int64_t dim) {
  const int64_t x = (dim + threads - 1) / threads;
  return dim3(unsigned(x < 1 ? 1 : x > 4096 ? 4096 : x), unsigned(n_rows > 65535 ? 65535 : n_rows));
}

}  // namespace

void embed_rows(const WeightView& w, const int32_t* ids, int64_t n_tokens, float* out, cudaStream_t stream) {
  if (n_tokens <= 0 || w.cols <= 0) return;
  launch(embed_rows_kernel, rows_grid(n_tokens, w.cols), threads, 0, stream, w, ids, n_tokens, out);
  MF_CUDA_CHECK_LAUNCH();
}

void swiglu(const float* gate, const float* up, float* out, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  launch(swiglu_kernel, grid_for(n, threads), threads, 0, stream, gate, up, out, n);
  MF_CUDA_CHECK_LAUNCH();
}

void axpy(float* acc, const float* x, float a, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  launch(axpy_kernel, grid_for(n, threads), threads, 0, stream, acc, x, a, n);
  MF_CUDA_CHECK_LAUNCH();
}

void fill(float* x, float value, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  launch(fill_kernel, grid_for(n, threads), threads, 0, stream, x, value, n);
  MF_CUDA_CHECK_LAUNCH();
}

namespace {
// The host sampler's order as an unsigned key (sampler.cpp's descending_key): larger for a larger value,
// NaN lowest, −0 as +0.
__device__ __forceinline__ unsigned descending_key(float v) {
  if (v != v) return 0;
  unsigned u = __float_as_uint(v);
  if (u == 0x80000000u) u = 0;
  return u ^ (unsigned(int(u) >> 31) | 0x80000000u);
}

// argmax's key: the value's order above the complement of its index (ties to the lowest index).
__device__ __forceinline__ unsigned long long argmax_key_of(float v, uint32_t i) {
  return (static_cast<unsigned long long>(descending_key(v)) << 32) | (0xFFFFFFFFu - i);
}

// Blocks of a grid-stride pass over n values (~8 a thread), at most 4 an SM.
unsigned pass_blocks(int64_t n) {
  const int64_t per_block = int64_t(threads) * 8;
  return unsigned(std::min<int64_t>((n + per_block - 1) / per_block, 4 * device_attribute<cudaDevAttrMultiProcessorCount>()));
}

__global__ void argmax_kernel(const float* __restrict__ x, int64_t n, unsigned long long* key) {
  dependent_launch_begin();
  unsigned long long best = 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float v = x[i];
    if (v == v) best = max(best, argmax_key_of(v, uint32_t(i)));  // NaN is never chosen
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) best = max(best, __shfl_xor_sync(0xffffffffu, best, o));
  if ((threadIdx.x & 31) == 0 && best != 0) atomicMax(key, best);
}
}  // namespace

namespace {
constexpr int top_shift = 32 - 11;
static_assert(top_bins == 1 << 11);

__global__ void top_hist_kernel(const float* __restrict__ x, int64_t n, float temperature, unsigned* __restrict__ hist) {
  dependent_launch_begin();
  __shared__ unsigned counts[top_bins];
  for (int b = threadIdx.x; b < top_bins; b += blockDim.x) counts[b] = 0;
  __syncthreads();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    atomicAdd(&counts[descending_key(x[i] / temperature) >> top_shift], 1u);
  __syncthreads();
  for (int b = threadIdx.x; b < top_bins; b += blockDim.x)
    if (counts[b]) atomicAdd(hist + b, counts[b]);
}

// One thread: the highest bin whose count with those above reaches k, into hist[top_bins] (a spare slot).
__global__ void top_cut_kernel(unsigned* hist, int64_t k) {
  dependent_launch_begin();
  if (threadIdx.x != 0) return;
  int64_t above = 0;
  int b = top_bins - 1;
  while (b > 0 && above + hist[b] < k) above += hist[b--];
  hist[top_bins] = unsigned(b);
}

__global__ void top_collect_kernel(const float* __restrict__ x, int64_t n, float temperature, const unsigned* __restrict__ hist,
                                   unsigned* __restrict__ out, int64_t capacity) {
  dependent_launch_begin();
  const unsigned cut = hist[top_bins];
  int32_t* ids = reinterpret_cast<int32_t*>(out + 4);
  float* z = reinterpret_cast<float*>(out + 4 + capacity);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float v = x[i] / temperature;
    if ((descending_key(v) >> top_shift) < cut) continue;
    const unsigned at = atomicAdd(out, 1u);
    if (at < capacity) ids[at] = int32_t(i), z[at] = v;
  }
}
}  // namespace

void top_candidates(const float* x, int64_t n, float temperature, int64_t k, unsigned* hist, unsigned* out, int64_t capacity,
                    cudaStream_t stream) {
  if (n <= 0) return;
  const unsigned blocks = pass_blocks(n);
  launch(top_hist_kernel, blocks, threads, 0, stream, x, n, temperature, hist);
  MF_CUDA_CHECK_LAUNCH();
  launch(top_cut_kernel, 1, 32, 0, stream, hist, k);
  MF_CUDA_CHECK_LAUNCH();
  launch(top_collect_kernel, blocks, threads, 0, stream, x, n, temperature, static_cast<const unsigned*>(hist), out, capacity);
  MF_CUDA_CHECK_LAUNCH();
}

namespace {
__global__ void gather_kernel(const float* __restrict__ x, const int32_t* __restrict__ ids, int64_t count, float* __restrict__ out) {
  dependent_launch_begin();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) out[i] = x[ids[i]];
}
}  // namespace

void gather(const float* x, const int32_t* ids, int64_t count, float* out, cudaStream_t stream) {
  if (count <= 0) return;
  launch(gather_kernel, pass_blocks(count), threads, 0, stream, x, ids, count, out);
  MF_CUDA_CHECK_LAUNCH();
}

namespace {
// In global memory, not __constant__: the lanes of a warp index it by their own values, which constant
// memory would serve one address at a time.
__device__ const double draw_exp2_32[32] = {MF_DRAW_EXP2_32};

// draw_weight.hpp's arithmetic as the device rounds it: the _rn intrinsics are never fused into an FMA.
struct DeviceWeightOps {
  __device__ static double exp2_32(int j) { return draw_exp2_32[j]; }
  __host__ __device__ static double mul(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dmul_rn(a, b);
#else
    return a * b;
#endif
  }
  __host__ __device__ static double add(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dadd_rn(a, b);
#else
    return a + b;
#endif
  }
  __device__ static int round_to_int(double v) { return __double2int_rn(v); }
  __device__ static uint64_t to_u64(double v) { return __double2ull_rz(v); }
  __device__ static double from_bits(uint64_t b) { return __longlong_as_double(static_cast<long long>(b)); }
  __device__ static uint64_t to_bits(double v) { return static_cast<uint64_t>(__double_as_longlong(v)); }
  __device__ static double from_u64(uint64_t v) { return __ull2double_rn(v); }
};

// A token's weight in the draw: 0 below min-p's cut (kept: !(z < cut), as the host's filter keeps it).
__device__ __forceinline__ uint64_t kept_weight(float x, float temperature, float z_max, float cut) {
  const float z = x / temperature;
  return z < cut ? 0 : draw_weight_with<DeviceWeightOps>(z - z_max);
}

__device__ __forceinline__ float draw_z_max(const float* x, const unsigned long long* max_key, float temperature) {
  return x[argmax_index(*max_key)] / temperature;
}

// Block b: the kept weights of ids [b · draw_chunk, …) summed as their high and low 32-bit halves (each
// sum exact in 64 bits), into mass[2b], mass[2b + 1].
__global__ void draw_mass_kernel(const float* __restrict__ x, int64_t n, float temperature, float log_min_p,
                                 const unsigned long long* max_key, unsigned long long* __restrict__ mass) {
  dependent_launch_begin();
  __shared__ unsigned long long partial[2][threads / 32];
  const float z_max = draw_z_max(x, max_key, temperature), cut = z_max + log_min_p;
  const int64_t begin = int64_t(blockIdx.x) * draw_chunk, end = min(n, begin + draw_chunk);
  unsigned long long hi = 0, lo = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const uint64_t w = kept_weight(x[i], temperature, z_max, cut);
    hi += w >> 32, lo += w & 0xFFFFFFFFu;
  }
  for (int o = 16; o > 0; o >>= 1) hi += __shfl_xor_sync(0xffffffffu, hi, o), lo += __shfl_xor_sync(0xffffffffu, lo, o);
  if ((threadIdx.x & 31) == 0) partial[0][threadIdx.x >> 5] = hi, partial[1][threadIdx.x >> 5] = lo;
  __syncthreads();
  if (threadIdx.x == 0) {
    hi = lo = 0;
    for (int w = 0; w < threads / 32; ++w) hi += partial[0][w], lo += partial[1][w];
    mass[2 * blockIdx.x] = hi, mass[2 * blockIdx.x + 1] = lo;
  }
}

__device__ __forceinline__ DrawMass mass_of(unsigned long long hi, unsigned long long lo) { return (DrawMass(hi) << 32) + lo; }

// The warp's inclusive prefix of one 128-bit mass a lane.
__device__ DrawMass warp_prefix(DrawMass m) {
  const int lane = threadIdx.x & 31;
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long h = __shfl_up_sync(0xffffffffu, static_cast<unsigned long long>(m >> 64), o);
    const unsigned long long l = __shfl_up_sync(0xffffffffu, static_cast<unsigned long long>(m), o);
    if (lane >= o) m += (DrawMass(h) << 64) + l;
  }
  return m;
}

// The lane whose span holds the target: the first lane whose inclusive prefix exceeds it (every lane
// gets it, with the prefix before that lane's span).
__device__ int find_lane(DrawMass inclusive, DrawMass mine, DrawMass target, DrawMass* before) {
  const unsigned past = __ballot_sync(0xffffffffu, inclusive > target);
  const int at = past ? __ffs(past) - 1 : 31;
  const DrawMass exclusive = inclusive - mine;
  const unsigned long long h = __shfl_sync(0xffffffffu, static_cast<unsigned long long>(exclusive >> 64), at);
  const unsigned long long l = __shfl_sync(0xffffffffu, static_cast<unsigned long long>(exclusive), at);
  *before = (DrawMass(h) << 64) + l;
  return at;
}

// One block: warp 0 finds the total, the target and the chunk holding it (lanes over contiguous spans of
// chunks), then every thread weighs draw_find_per ids of that chunk and the block's prefix sums find the
// thread whose ids hold the target, which walks them: as Sampler::draw walks the kept ids in id order.
constexpr int draw_find_per = draw_chunk / threads;
static_assert(draw_chunk % threads == 0, "draw_find's threads share a chunk evenly");
__global__ void __launch_bounds__(threads) draw_find_kernel(const float* __restrict__ x, int64_t n, float temperature, float log_min_p,
                                                            const unsigned long long* max_key, const unsigned long long* __restrict__ mass,
                                                            uint64_t bits, int32_t* out) {
  dependent_launch_begin();
  __shared__ int chunk;
  __shared__ DrawMass chunk_before, target, warp_mass[threads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float z_max = draw_z_max(x, max_key, temperature), cut = z_max + log_min_p;
  if (threadIdx.x == 0) *out = -1;  // unless a thread finds the id below (a broken sum: the row, then)
  if (!isfinite(z_max)) return;
  if (warp == 0) {
    const int n_blocks = int((n + draw_chunk - 1) / draw_chunk), per_lane = (n_blocks + 31) / 32;
    const int b0 = min(n_blocks, lane * per_lane), b1 = min(n_blocks, b0 + per_lane);
    DrawMass mine = 0;
    for (int b = b0; b < b1; ++b) mine += mass_of(mass[2 * b], mass[2 * b + 1]);
    const DrawMass inclusive = warp_prefix(mine);
    const DrawMass total = (DrawMass(__shfl_sync(0xffffffffu, static_cast<unsigned long long>(inclusive >> 64), 31)) << 64) +
                           __shfl_sync(0xffffffffu, static_cast<unsigned long long>(inclusive), 31);
    const DrawMass t = draw_target(bits, total);  // < total: the largest token weighs 2^62
    DrawMass cumulative;
    const int at = find_lane(inclusive, mine, t, &cumulative);
    if (lane == at) {
      int found = b1 - 1;
      for (int b = b0; b < b1; ++b) {
        const DrawMass m = mass_of(mass[2 * b], mass[2 * b + 1]);
        if (cumulative + m > t) {
          found = b;
          break;
        }
        cumulative += m;
      }
      chunk = found, chunk_before = cumulative, target = t;
    }
  }
  __syncthreads();
  // The chunk's ids, draw_find_per a thread in id order; the block's exclusive prefix of their weights.
  const int64_t i0 = int64_t(chunk) * draw_chunk + threadIdx.x * draw_find_per, i1 = min(n, i0 + draw_find_per);
  DrawMass own = 0;
  for (int64_t i = i0; i < i1; ++i) own += kept_weight(x[i], temperature, z_max, cut);
  const DrawMass in_warp = warp_prefix(own);
  if (lane == 31) warp_mass[warp] = in_warp;
  __syncthreads();
  DrawMass before = chunk_before + in_warp - own;
  for (int w = 0; w < warp; ++w) before += warp_mass[w];
  const DrawMass goal = target;
  if (before <= goal && before + own > goal)
    for (int64_t i = i0; i < i1; ++i)
      if ((before += kept_weight(x[i], temperature, z_max, cut)) > goal) {
        *out = int32_t(i);
        break;
      }
}
}  // namespace

void draw_mass(const float* x, int64_t n, float temperature, float log_min_p, const unsigned long long* max_key, unsigned long long* mass,
               cudaStream_t stream) {
  if (n <= 0) return;
  launch(draw_mass_kernel, unsigned(draw_blocks(n)), threads, 0, stream, x, n, temperature, log_min_p, max_key, mass);
  MF_CUDA_CHECK_LAUNCH();
}

void draw_find(const float* x, int64_t n, float temperature, float log_min_p, const unsigned long long* max_key,
               const unsigned long long* mass, uint64_t bits, int32_t* out, cudaStream_t stream) {
  if (n <= 0) return;
  launch(draw_find_kernel, 1, threads, 0, stream, x, n, temperature, log_min_p, max_key, mass, bits, out);
  MF_CUDA_CHECK_LAUNCH();
}

namespace {
// The ordered draw's selects (draw_ordered): the first token in the sampler's order whose cumulative count
// or weight exceeds a target, by a radix select over argmax_key_of(z, id) — z's order above the id's
// complement, so higher z first, ties to the lower id, every key distinct — a digit a level, from the top:
// 11, 11 and 10 bits of z's key, then 11, 11 and 10 of the id's.
constexpr int select_bins = 2048;
constexpr int select_levels = 6;
__device__ __forceinline__ int select_shift(int level) {
  return level == 0 ? 53 : level == 1 ? 42 : level == 2 ? 32 : level == 3 ? 21 : level == 4 ? 10 : 0;
}
__device__ __forceinline__ int select_width(int level) { return level == 2 || level == 5 ? 10 : 11; }
}  // namespace

// The selects' steps, one after the other: top-k's last token (by count), the nucleus's edge (by weight),
// the drawn token (by weight); each step's first level picked from level 0's bins (the same row).
enum OrderedStep : int { step_start = 0, step_top_k, step_edge, step_draw, step_done };

struct OrderedDrawBuffer {
  // A level's bins: count[d] tokens of digit d (of any weight: top-k counts them all), their weight
  // lo[d] + 2^64 · hi[d], the sum of their ids id_sum[d] (the id itself when the count is 1).
  struct Bins {
    unsigned long long lo[select_bins], hi[select_bins], count[select_bins], id_sum[select_bins];
  };
  // Level 0's sums over the row, in 32-bit halves as draw_mass_kernel's: every weight and those at or
  // above min-p's cut.
  unsigned long long total_hi, total_lo, kept_hi, kept_lo;
  unsigned arrived;  // blocks done with this launch
  int step;          // OrderedStep
  int level;
  unsigned long long prefix;        // the key's digits above this level, fixed by the levels before
  unsigned long long before_count;  // tokens ahead of the prefix's group in the order
  DrawMass before;                  // and their weight
  DrawMass target;                  // a count (top-k's step) or a weight
  DrawMass limit;                   // the weight of the kept prefix so far: the row's, top-k's, the nucleus's
  Bins first;  // level 0's, kept for every step's first level
  Bins next;   // a later level's, zeroed once read
};
static_assert(sizeof(OrderedDrawBuffer) <= ordered_draw_buffer_bytes, "elementwise.cuh's size of the ordered draw's buffer");

namespace {
// One launch a level: each block bins its draw_chunk ids whose key matches the prefix in shared memory and
// adds its bins to the level's; the last block to arrive picks the digit holding the step's target and
// either fixes it (the next launch bins the next digit of that group) or, with one token in it, has found
// the step's token and sets up the next step, whose first level it picks from the bins kept, until the drawn
// token is written to *out. Launches after that return at once.
__global__ void __launch_bounds__(threads) ordered_draw_kernel(const float* __restrict__ x, int64_t n, float temperature, int64_t top_k,
                                                               float top_p, float log_min_p, const unsigned long long* max_key,
                                                               uint64_t bits, OrderedDrawBuffer* buffer, int32_t* out) {
  dependent_launch_begin();
  __shared__ unsigned long long bin_lo[select_bins], bin_ids[select_bins];  // ids: count << 40 | Σ id, then the counts
  __shared__ unsigned bin_hi[select_bins];
  __shared__ unsigned long long partial[4][threads / 32];
  __shared__ int last, digit;
  __shared__ DrawMass digit_before;
  __shared__ unsigned long long digit_before_count;
  OrderedDrawBuffer& b = *buffer;
  if (b.step == step_done) return;
  const int level = b.level;
  const unsigned long long prefix = b.prefix;
  const float z_max = draw_z_max(x, max_key, temperature), cut = z_max + log_min_p;
  if (!isfinite(z_max)) {
    if (blockIdx.x == 0 && threadIdx.x == 0) b.step = step_done, *out = -1;
    return;
  }
  for (int d = threadIdx.x; d < select_bins; d += blockDim.x) bin_lo[d] = 0, bin_ids[d] = 0, bin_hi[d] = 0;
  __syncthreads();
  const int shift = select_shift(level), width = select_width(level);
  unsigned long long total_hi = 0, total_lo = 0, kept_hi = 0, kept_lo = 0;
  const int64_t begin = int64_t(blockIdx.x) * draw_chunk, end = min(n, begin + draw_chunk);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float z = x[i] / temperature;
    const unsigned long long key = argmax_key_of(z, uint32_t(i));
    if (level > 0 && key >> (shift + width) != prefix) continue;
    const uint64_t w = draw_weight_with<DeviceWeightOps>(z - z_max);
    const int d = int(key >> shift) & ((1 << width) - 1);
    if (w != 0) {
      if (level == 0) {
        total_hi += w >> 32, total_lo += w & 0xFFFFFFFFu;
        if (!(z < cut)) kept_hi += w >> 32, kept_lo += w & 0xFFFFFFFFu;
      }
      const unsigned long long old = atomicAdd(&bin_lo[d], static_cast<unsigned long long>(w));
      if (old + w < old) atomicAdd(&bin_hi[d], 1u);
    }
    atomicAdd(&bin_ids[d], (1ull << 40) + static_cast<unsigned long long>(i));
  }
  if (level == 0) {
    for (int o = 16; o > 0; o >>= 1) {
      total_hi += __shfl_xor_sync(0xffffffffu, total_hi, o), total_lo += __shfl_xor_sync(0xffffffffu, total_lo, o);
      kept_hi += __shfl_xor_sync(0xffffffffu, kept_hi, o), kept_lo += __shfl_xor_sync(0xffffffffu, kept_lo, o);
    }
    if ((threadIdx.x & 31) == 0) {
      const int w = threadIdx.x >> 5;
      partial[0][w] = total_hi, partial[1][w] = total_lo, partial[2][w] = kept_hi, partial[3][w] = kept_lo;
    }
  }
  __syncthreads();
  if (level == 0 && threadIdx.x < 4) {
    unsigned long long sum = 0;
    for (int w = 0; w < threads / 32; ++w) sum += partial[threadIdx.x][w];
    atomicAdd(threadIdx.x == 0 ? &b.total_hi : threadIdx.x == 1 ? &b.total_lo : threadIdx.x == 2 ? &b.kept_hi : &b.kept_lo, sum);
  }
  OrderedDrawBuffer::Bins& bins = level == 0 ? b.first : b.next;
  for (int d = threadIdx.x; d < select_bins; d += blockDim.x) {
    const unsigned long long ids = bin_ids[d];
    if (ids == 0) continue;
    const unsigned long long lo = bin_lo[d], old = lo ? atomicAdd(&bins.lo[d], lo) : 0;
    const unsigned long long hi = bin_hi[d] + (old + lo < old ? 1u : 0u);
    if (hi) atomicAdd(&bins.hi[d], hi);
    atomicAdd(&bins.count[d], ids >> 40);
    atomicAdd(&bins.id_sum[d], ids & ((1ull << 40) - 1));
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&b.arrived, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();

  // The last block: digits, level by level, while one launch's bins decide them.
  const DrawMass kept = mass_of(__ldcg(&b.kept_hi), __ldcg(&b.kept_lo));
  int step = b.step, at = level;
  unsigned long long fixed = prefix, before_count = b.before_count;
  DrawMass before = b.before, target = b.target, limit = b.limit;
  // The next step's target, from the kept prefix's weight: top-k's last token is the k-th (k − 1 before it);
  // the nucleus ends at the first token whose cumulative weight reaches top_p's share (> it − 1); the draw
  // walks to floor(u · the kept weight), min-p's cut applied (min-p keeps a prefix of the order too, so the
  // kept tokens' weight is the least of the three prefixes').
  auto begin_step = [&](int next) {
    step = next, at = 0, fixed = 0, before_count = 0, before = 0;
    if (next == step_top_k) {
      target = DrawMass(top_k - 1);
    } else if (next == step_edge) {
      const DrawMass wanted = top_p_mass_with<DeviceWeightOps>(top_p, limit);
      target = wanted == 0 ? 0 : wanted - 1;
    } else {
      target = draw_target(bits, limit < kept ? limit : kept);
    }
  };
  const bool top_k_on = top_k > 0 && top_k < n;
  if (step == step_start) {
    limit = mass_of(__ldcg(&b.total_hi), __ldcg(&b.total_lo));
    begin_step(top_k_on ? step_top_k : top_p < 1.0f ? step_edge : step_draw);
  }
  const auto bin_mass = [&](int d) { return (DrawMass(bin_hi[d]) << 64) + bin_lo[d]; };  // from the shared copy
  for (;;) {
    OrderedDrawBuffer::Bins& g = at == 0 ? b.first : b.next;
    for (int d = threadIdx.x; d < select_bins; d += blockDim.x)
      bin_lo[d] = __ldcg(&g.lo[d]), bin_hi[d] = unsigned(__ldcg(&g.hi[d])), bin_ids[d] = __ldcg(&g.count[d]);
    __syncthreads();
    if (threadIdx.x < 32) {
      // Lane l sums digits [top − 63, top] from the highest down; the lane whose span crosses the target
      // (by count in top-k's step, else by weight) walks it.
      constexpr int per_lane = select_bins / 32;
      const bool by_count = step == step_top_k;
      const int lane = threadIdx.x, top = select_bins - 1 - lane * per_lane;
      DrawMass mass = 0;
      unsigned long long count = 0;
#pragma unroll 8
      for (int k = 0; k < per_lane; ++k) mass += bin_mass(top - k), count += bin_ids[top - k];
      const DrawMass mass_ahead = warp_prefix(mass) - mass;
      const DrawMass count_ahead = warp_prefix(DrawMass(count)) - count;
      DrawMass ahead;  // find_lane's sum ahead of the found span, of the measure searched; the walk keeps both
      const int found_lane = find_lane((by_count ? before_count + count_ahead + count : before + mass_ahead + mass), by_count ? DrawMass(count) : mass,
                                       target, &ahead);
      if (lane == found_lane) {
        DrawMass m_before = before + mass_ahead, c_before = before_count + count_ahead;
        int found = -1;
        for (int k = 0; k < per_lane; ++k) {
          const DrawMass m = bin_mass(top - k);
          const unsigned long long c = bin_ids[top - k];
          if ((by_count ? c_before + c : m_before + m) > target) {
            found = top - k;
            break;
          }
          m_before += m, c_before += c;
        }
        digit = found, digit_before = m_before, digit_before_count = (unsigned long long)c_before;
      }
    }
    __syncthreads();
    const int d = digit;
    if (d < 0) {  // past every bin: a broken sum; the caller samples the row
      if (threadIdx.x == 0) b.step = step_done, *out = -1;
      return;
    }
    before = digit_before, before_count = digit_before_count;
    const unsigned long long count = bin_ids[d], id_sum = __ldcg(&g.id_sum[d]);
    const DrawMass through = before + bin_mass(d);
    __syncthreads();
    if (at > 0)
      for (int e = threadIdx.x; e < select_bins; e += blockDim.x) g.lo[e] = 0, g.hi[e] = 0, g.count[e] = 0, g.id_sum[e] = 0;
    if (count > 1 && at < select_levels - 1) {
      fixed = (fixed << select_width(at)) | unsigned(d);
      ++at;
      break;
    }
    if (step == step_draw) {
      if (threadIdx.x == 0) *out = int32_t(id_sum);
      step = step_done;
      break;
    }
    limit = through < limit ? through : limit;
    begin_step(step == step_top_k && top_p < 1.0f ? step_edge : step_draw);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    b.step = step, b.level = at, b.prefix = fixed, b.before_count = before_count, b.before = before, b.target = target, b.limit = limit;
    b.arrived = 0;
  }
}

// The window's tokens of a penalized copy of the row: the sampler's penalized(), the same rounded fp32
// operations (sampler.cpp is built without contraction into FMA).
__global__ void penalize_kernel(const float* __restrict__ x, float* __restrict__ row, const int32_t* __restrict__ ids,
                                const int32_t* __restrict__ counts, int64_t n_ids, float repetition, float presence, float frequency) {
  dependent_launch_begin();
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n_ids; j += int64_t(gridDim.x) * blockDim.x) {
    float logit = x[ids[j]];
    if (repetition != 1.0f) logit = logit > 0 ? __fdiv_rn(logit, repetition) : __fmul_rn(logit, repetition);
    if (presence != 0.0f || frequency != 0.0f) logit = __fsub_rn(logit, __fadd_rn(presence, __fmul_rn(frequency, float(counts[j]))));
    row[ids[j]] = logit;
  }
}
}  // namespace

void draw_ordered(const float* x, int64_t n, float temperature, int64_t top_k, float top_p, float log_min_p, const unsigned long long* max_key,
                  OrderedDrawBuffer* buffer, uint64_t bits, int32_t* out, cudaStream_t stream) {
  if (n <= 0) return;
  MF_CUDA_CHECK(cudaMemsetAsync(buffer, 0, sizeof(OrderedDrawBuffer), stream));
  // The first launch bins level 0 for every step; each step then needs at most five more (its first level
  // is picked from level 0's bins).
  const int steps = (top_k > 0 && top_k < n ? 1 : 0) + (top_p < 1.0f ? 1 : 0) + 1;
  for (int l = 0; l < 1 + steps * (select_levels - 1); ++l) {
    launch(ordered_draw_kernel, unsigned(draw_blocks(n)), threads, 0, stream, x, n, temperature, top_k, top_p, log_min_p, max_key, bits, buffer,
           out);
    MF_CUDA_CHECK_LAUNCH();
  }
}

void penalize(const float* x, float* row, int64_t n, const int32_t* ids, const int32_t* counts, int64_t n_ids, float repetition, float presence,
              float frequency, cudaStream_t stream) {
  if (n <= 0) return;
  MF_CUDA_CHECK(cudaMemcpyAsync(row, x, size_t(n) * sizeof(float), cudaMemcpyDeviceToDevice, stream));
  if (n_ids <= 0) return;
  launch(penalize_kernel, grid_for(n_ids, threads), threads, 0, stream, x, row, ids, counts, n_ids, repetition, presence, frequency);
  MF_CUDA_CHECK_LAUNCH();
}

void argmax_key(const float* x, int64_t n, unsigned long long* key, cudaStream_t stream) {
  if (n <= 0) return;
  launch(argmax_kernel, pass_blocks(n), threads, 0, stream, x, n, key);
  MF_CUDA_CHECK_LAUNCH();
}

void gather_rows(const float* src, const int32_t* rows, int64_t n_rows, int64_t dim, float* dst, cudaStream_t stream) {
  if (n_rows <= 0 || dim <= 0) return;
  launch(copy_rows_kernel, rows_grid(n_rows, dim), threads, 0, stream, src, dim, rows, dst, dim, n_rows, dim);
  MF_CUDA_CHECK_LAUNCH();
}

void copy_rows(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t n_rows, int64_t dim, cudaStream_t stream) {
  if (n_rows <= 0 || dim <= 0) return;
  launch(copy_rows_kernel, rows_grid(n_rows, dim), threads, 0, stream, src, src_stride, nullptr, dst, dst_stride, n_rows, dim);
  MF_CUDA_CHECK_LAUNCH();
}

void sigmoid_mul(float* x, const float* gate, int64_t n_rows, int64_t dim, bool per_row, cudaStream_t stream) {
  if (n_rows <= 0 || dim <= 0) return;
  launch(sigmoid_mul_kernel, rows_grid(n_rows, dim), threads, 0, stream, x, gate, n_rows, dim, per_row);
  MF_CUDA_CHECK_LAUNCH();
}

void scatter_add_rows(float* dst, const float* src, const int32_t* targets, const int32_t* start, const int32_t* order,
                      const float* weights, int64_t n_targets, int64_t dim, cudaStream_t stream) {
  if (n_targets <= 0 || dim <= 0) return;
  launch(scatter_add_rows_kernel, rows_grid(n_targets, dim), threads, 0, stream, dst, src, targets, start, order, weights,
         n_targets, dim);
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace moeflux::cuda
