// Device helpers shared by the CUDA backend's kernels: warp/block sums and the exact decode of one weight
// of each format (quant/weight_format.hpp). Included by .cu files only.
// Also: warp_max, cp.async helpers and the per-stream scratch buffer (stream_scratch).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <utility>
#include <cstdint>
#include <mutex>
#include <type_traits>
#include <vector>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/wait_trace.hpp"
#include "quant/weight_format.hpp"

namespace moeflux::cuda {

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Σ v over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the sum.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // partial may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < n_warps; ++w) total += partial[w];
  return total;
}

// SwiGLU's product silu(g)·u, the one expression every kernel forming it uses (swiglu, the experts'
// gate/up, the staged matmul's swiglu input), so that each gives the same bits.
__device__ __forceinline__ float swiglu_of(float g, float u) { return g / (1.0f + expf(-g)) * u; }

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// max v over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float block_max(float v) {
  __shared__ float partial[32];
  v = warp_max(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  __syncthreads();  // partial may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  float m = partial[0];
  for (int w = 1; w < n_warps; ++w) m = fmaxf(m, partial[w]);
  return m;
}

// Asynchronous 16-byte copies from device to shared memory (sm_80+): issued, grouped by commit, and
// waited for until at most N groups of this thread remain in flight. A barrier must follow the wait
// before other threads read what this thread copied.
__device__ __forceinline__ void cp_async16(void* shared_dst, const void* global_src) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(global_src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ float bf16_bits_to_float(uint16_t h) { return __uint_as_float(uint32_t(h) << 16); }

// Element (row, col) of a weight matrix as fp32, with the arithmetic of dequantize_row (quantize.cpp):
// q8 one multiply, q4 a multiply then an add, each rounded (no fused multiply-add), so bit-identical.
__device__ __forceinline__ float weight_at(WeightFormat format, int64_t cols, const void* data, const void* scales,
                                           const void* biases, int64_t row, int64_t col) {
  switch (format) {
    case WeightFormat::f32:
      return static_cast<const float*>(data)[row * cols + col];
    case WeightFormat::bf16:
      return bf16_bits_to_float(static_cast<const uint16_t*>(data)[row * cols + col]);
    case WeightFormat::q8: {
      const float scale = __half2float(static_cast<const __half*>(scales)[row * (cols / q8_group) + col / q8_group]);
      return __fmul_rn(float(static_cast<const int8_t*>(data)[row * cols + col]), scale);
    }
    case WeightFormat::q4: {
      const uint32_t word = static_cast<const uint32_t*>(data)[row * (cols / 8) + col / 8];
      const int64_t g = row * (cols / q4_group) + col / q4_group;
      const float scale = bf16_bits_to_float(static_cast<const uint16_t*>(scales)[g]);
      const float bias = bf16_bits_to_float(static_cast<const uint16_t*>(biases)[g]);
      return __fadd_rn(__fmul_rn(float((word >> (4 * (col % 8))) & 15u), scale), bias);
    }
  }
  return 0.f;
}

// Programmatic dependent launch (sm_90+): a kernel started by launch() below may be scheduled while the
// kernel before it on the stream is still running, so its launch latency hides behind that kernel's last
// wave. Every kernel launched so must call dependent_launch_begin() before its first read or write of
// memory another kernel may touch (it waits until the previous kernel has finished and its writes are
// visible); it also lets the next kernel be scheduled. Reads of memory no kernel writes (the weights) may
// come before it. Elsewhere (older GPUs, plain <<<>>> launches) it does nothing.
//
// With MOEFLUX_CUDA_WAIT_TRACE (a developer's build option, CMake's of the same name) thread 0 of every
// block also records when it reached the wait and when the wait let it go (wait_trace.hpp): in a chain of
// dependent launches the first release of a launch is when the one before it finished, so the releases
// show what each kernel costs where it sits in the chain, without the events that break the chain.
#ifdef MOEFLUX_CUDA_WAIT_TRACE
namespace {
__constant__ WaitTrace* wait_trace_buffer;
// Each .cu file has its own copy of the symbol: each registers its own setter.
const int wait_trace_registered = register_wait_trace_setter(
    [](WaitTrace* buffer) { MF_CUDA_CHECK(cudaMemcpyToSymbol(wait_trace_buffer, &buffer, sizeof buffer)); });
__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
// The block's record, from its wait on (~0u: none).
__device__ __forceinline__ unsigned& wait_trace_slot() {
  __shared__ unsigned slot;
  return slot;
}
}  // namespace
#endif

// A kernel's own points in its block's record (thread 0's clock; at = 0 takes now): nothing without the
// probe, or before the block's dependent_launch_begin.
// (sm_90+, as the wait: elsewhere the block's record slot is never set.)
__device__ __forceinline__ unsigned long long wait_trace_now() {
#if defined(MOEFLUX_CUDA_WAIT_TRACE) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return threadIdx.x == 0 ? global_ns() : 0;
#else
  return 0;
#endif
}
__device__ __forceinline__ void wait_trace_mark(int k, unsigned long long at = 0) {
#if defined(MOEFLUX_CUDA_WAIT_TRACE) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (threadIdx.x == 0 && wait_trace_buffer && wait_trace_slot() < wait_trace_buffer->capacity) {
    WaitRecord& record = wait_trace_buffer->records[wait_trace_slot()];
    record.marks[k] = at ? at : global_ns();
    if (!at) record.clock_mark = clock64();
  }
#endif
}

__device__ __forceinline__ void dependent_launch_begin() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#ifdef MOEFLUX_CUDA_WAIT_TRACE
  const bool first = threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0;
  WaitTrace* const trace = first ? wait_trace_buffer : nullptr;
  const unsigned long long arrive = trace ? global_ns() : 0;
#endif
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#ifdef MOEFLUX_CUDA_WAIT_TRACE
  if (trace) {
    const unsigned long long release = global_ns();
    unsigned long long grid;
    unsigned sm;
    asm volatile("mov.u64 %0, %%gridid;" : "=l"(grid));
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    const unsigned i = atomicAdd(&trace->n, 1u);
    wait_trace_slot() = i;
    if (i < trace->capacity)
      trace->records[i] = {grid, arrive, release, blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z), sm, {}, (unsigned long long)clock64(), 0};
  } else if (first) {
    wait_trace_slot() = ~0u;
  }
#endif
  asm volatile("griddepcontrol.launch_dependents;\n" :::);
#endif
}

// Whether launch() asks for programmatic dependent launch on the current device: compute capability 9.0
// or newer, unless MOEFLUX_CUDA_PDL=0 (a developer's switch for comparisons).
inline bool dependent_launch_enabled() {
  static int state[64] = {};  // per device: 0 unknown, 1 no, 2 yes
  int device = 0;
  MF_CUDA_CHECK(cudaGetDevice(&device));
  int& s = state[device & 63];
  if (s == 0) {
    int major = 0;
    MF_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    const char* env = std::getenv("MOEFLUX_CUDA_PDL");
    s = major >= 9 && !(env && env[0] == '0') ? 2 : 1;
  }
  return s == 2;
}

// kernel<<<grid, block, shared, stream>>>(args…) with programmatic dependent launch where enabled, as a
// grid of clusters of `cluster` blocks where that is more than one (Hopper's thread block clusters:
// co-scheduled on one GPC, each block able to read the others' shared memory); the kernel must call
// dependent_launch_begin() (above).
template <typename... Params, typename... Args>
void launch_clustered(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared, cudaStream_t stream, dim3 cluster, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  cudaLaunchAttribute attribute[2];
  config.attrs = attribute;
  if (cluster.x * cluster.y * cluster.z > 1) {
    attribute[config.numAttrs].id = cudaLaunchAttributeClusterDimension;
    attribute[config.numAttrs].val.clusterDim.x = cluster.x, attribute[config.numAttrs].val.clusterDim.y = cluster.y;
    attribute[config.numAttrs++].val.clusterDim.z = cluster.z;
  }
  if (dependent_launch_enabled()) {
    attribute[config.numAttrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[config.numAttrs++].val.programmaticStreamSerializationAllowed = 1;
  }
  MF_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared, cudaStream_t stream, Args&&... args) {
  launch_clustered(kernel, grid, block, shared, stream, dim3{1, 1, 1}, std::forward<Args>(args)...);
}

// A table of jobs passed by value as a kernel's parameter (≤ 4 KiB, __grid_constant__: read in place, no
// copy before the launch), the grid a flat run of every job's blocks: job j owns blocks block_start[j] ..
// block_start[j + 1] − 1.
template <typename Job, int N>
struct LaunchTable {
  Job jobs[N];
  int block_start[N + 1];
  int n_jobs;
};

// The job of block b (a uniform scan of at most N entries).
template <typename Job, int N>
__device__ __forceinline__ int job_of_block(const LaunchTable<Job, N>& t, int b) {
  int j = 0;
  while (j + 1 < t.n_jobs && b >= t.block_start[j + 1]) ++j;
  return j;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// fn(std::integral_constant<WeightFormat, f>{}): a kernel template instantiated for the format at hand.
template <typename Fn>
void with_format(WeightFormat f, Fn&& fn) {
  switch (f) {
    case WeightFormat::f32: return fn(std::integral_constant<WeightFormat, WeightFormat::f32>{});
    case WeightFormat::bf16: return fn(std::integral_constant<WeightFormat, WeightFormat::bf16>{});
    case WeightFormat::q8: return fn(std::integral_constant<WeightFormat, WeightFormat::q8>{});
    case WeightFormat::q4: return fn(std::integral_constant<WeightFormat, WeightFormat::q4>{});
  }
}

// rms_norm's vectorized arithmetic (norm_rope.cu), shared with the matmul that normalizes its own input
// (matmul.cu) so that both give the same bits: rms_norm_threads(n4) threads, thread t taking float4s
// t, t + threads, … (at most 4) in that order, each adding sum_sq4 of its float4s to its partial sum; the
// partials added by block_sum; out = v · inv_rms · w per element.
inline int rms_norm_threads(int n4) { return std::min(1024, (std::max((n4 + 3) / 4, std::min(n4, 256)) + 31) / 32 * 32); }
__device__ __forceinline__ float sum_sq4(float4 v) { return v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w; }
__device__ __forceinline__ float4 rms_scaled4(float4 v, float inv_rms, float4 w) {
  return make_float4(v.x * inv_rms * w.x, v.y * inv_rms * w.y, v.z * inv_rms * w.z, v.w * inv_rms * w.w);
}

// An attribute of the current device, asked once per device and attribute (they do not change while a
// process runs; a race only asks twice). Host-only.
template <cudaDeviceAttr Attribute>
int device_attribute() {
  static int values[64] = {};  // per device; 0: not asked yet
  int device = 0;
  MF_CUDA_CHECK(cudaGetDevice(&device));
  int& v = values[device & 63];
  if (v == 0) MF_CUDA_CHECK(cudaDeviceGetAttribute(&v, Attribute, device));
  return v;
}

// Dynamic shared memory for a launch of `blocks` blocks that each need `bytes`, where the developer's switch
// MOEFLUX_CUDA_SPREAD (read once; a mask: 1 a decode token's attention splits, 2 down + combine) names
// the launch and it has no more blocks than the GPU has SMs: enough that no two of its blocks can share an
// SM (half the opt-in maximum, and a little). Off by default: on the H100 (session 19, decode tok/s in one
// run) both on took Qwen3-30B dims from 394-397 to 402-405 (matmul_bench --layer: 49.4 -> 48.4 µs a layer)
// but Qwen3.5-35B dims from 312-326 to 292-308, and neither alone was measured clear of the noise there.
// The caller raises the kernel's dynamic shared memory limit to the result. Host-only.
constexpr int spread_attention = 1, spread_down = 2;
inline size_t spread_shared(size_t bytes, int64_t blocks, int which) {
  static const int mask = [] {
    const char* e = std::getenv("MOEFLUX_CUDA_SPREAD");
    return e ? std::atoi(e) : 0;
  }();
  if (!(mask & which) || blocks > device_attribute<cudaDevAttrMultiProcessorCount>()) return bytes;
  return std::max(bytes, size_t(device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>()) / 2 + 1024);
}

// Grid size for n elements at `threads` per block, a grid-stride loop covering the rest.
inline unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return unsigned(blocks < 1 ? 1 : blocks > 65535 * 16 ? 65535 * 16 : blocks);
}

// Device memory for an op's temporaries (attention's split partials, the delta rule's chunk matrices),
// at least `bytes`, 256-byte aligned, valid for kernels queued on `stream` until the next call for that
// stream. One grow-only buffer per (device, stream), kept for the life of the process: ops on one stream
// run in order, so they share it. Growing waits for the stream (its queued kernels may use the old buffer)
// and then frees and allocates — except while the stream is being recorded into a graph, where nothing may
// wait: the old buffer is then kept (ops recorded before still name it) and freed at a later growth
// outside a recording. Host-only.
inline void* stream_scratch(cudaStream_t stream, size_t bytes) {
  struct Buffer {
    int device;
    cudaStream_t stream;
    void* data;
    size_t bytes;
  };
  static std::mutex mutex;
  static std::vector<Buffer> buffers;  // one per (device, stream) seen; a handful in any process
  static std::vector<Buffer> retired;  // replaced while recording; freed once their stream has drained
  int device = 0;
  MF_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  Buffer* found = nullptr;
  for (Buffer& b : buffers)
    if (b.device == device && b.stream == stream) found = &b;
  if (!found) found = &buffers.emplace_back(Buffer{device, stream, nullptr, 0});
  if (found->bytes < bytes) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    MF_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    if (capture != cudaStreamCaptureStatusNone) {
      if (found->data) retired.push_back(*found);
    } else {
      if (found->data || !retired.empty()) MF_CUDA_CHECK(cudaStreamSynchronize(stream));
      if (found->data) MF_CUDA_CHECK(cudaFree(found->data));
      for (auto it = retired.begin(); it != retired.end();) {
        if (it->device == device && it->stream == stream) {
          MF_CUDA_CHECK(cudaFree(it->data));
          it = retired.erase(it);
        } else {
          ++it;
        }
      }
    }
    const size_t grown = std::max(bytes, found->bytes + found->bytes / 2);  // fewer regrowths as contexts lengthen
    found->data = nullptr;
    found->bytes = 0;
    MF_CUDA_CHECK(cudaMalloc(&found->data, grown));
    found->bytes = grown;
  }
  return found->data;
}

// Counters for kernels whose last block to finish does a job's last step (attention's split combine):
// stream_counter_slots zeroed unsigneds per (device, stream), for the life of the process; nullptr when
// first asked for while the stream records a graph (the caller then does without). A kernel that
// counts its blocks in puts its counter back to 0 in that last block, so the next launch finds it zeroed.
// Ops on one stream run in order, so they share them. Host-only.
constexpr int stream_counter_slots = 4096;
inline unsigned* stream_counters(cudaStream_t stream) {
  struct Buffer {
    int device;
    cudaStream_t stream;
    unsigned* data;
  };
  static std::mutex mutex;
  static std::vector<Buffer> buffers;
  int device = 0;
  MF_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  for (const Buffer& b : buffers)
    if (b.device == device && b.stream == stream) return b.data;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  MF_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return nullptr;  // the zeroing would run only if the graph did
  unsigned* data = nullptr;
  MF_CUDA_CHECK(cudaMalloc(&data, stream_counter_slots * sizeof(unsigned)));
  MF_CUDA_CHECK(cudaMemsetAsync(data, 0, stream_counter_slots * sizeof(unsigned), stream));  // before any kernel on the stream
  buffers.push_back({device, stream, data});
  return data;
}

}  // namespace moeflux::cuda
