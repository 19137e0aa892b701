// The CUDA backend: every op of backend.hpp on one CUDA stream owned by the backend, over device memory
// (activations from cudaMalloc; weights, norm and conv weights, states and caches the caller placed on the
// device). Pointers the contract calls host memory (positions, inv_freq, token ids, gather row indices,
// the grouped router's bias and the routers' outputs) are host memory. The kernels live in the
// .cu/.cuh pairs beside this file; this file owns the stream and the staging of small host arrays. The
// routers' host forms rank on the GPU (the kernels of the _device forms) and copy the ids and weights back;
// shapes those kernels do not take copy the logits and run the CPU's routing code (router_ops.hpp).
// Compiled always: without CUDA in the build (no MOEFLUX_HAVE_CUDA) only the factory's fallbacks remain.
#include "backends/backend.hpp"
#include "backends/cuda/cuda_memory.hpp"

#ifdef MOEFLUX_HAVE_CUDA

#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "backends/cpu/router_ops.hpp"
#include "backends/cuda/attention.cuh"
#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/delta_net.cuh"
#include "backends/cuda/elementwise.cuh"
#include "backends/cuda/matmul.cuh"
#include "backends/cuda/moe.cuh"
#include "backends/cuda/norm_rope.cuh"
#include "backends/cuda/wait_trace.hpp"
#include "core/status.hpp"

namespace moeflux {
namespace {

class CudaBackend;

// MOEFLUX_CUDA_OP_TIMES=1 (a developer's switch): every op waits for its kernels and adds its GPU time
// (events around it) to a table printed to stderr when the backend goes; off, an op pays one branch.
// MOEFLUX_CUDA_TRACE=FILE (another): nothing waits; each op records the host's time and an event as it
// starts, and FILE gets a CSV of (op, host µs, GPU µs) on one clock when the backend goes: where the GPU
// reaches an op just after the host queued it, the GPU was waiting for the host.
class OpTimer {
 public:
  OpTimer(CudaBackend& be, const char* op);
  ~OpTimer();
  OpTimer(const OpTimer&) = delete;
  OpTimer& operator=(const OpTimer&) = delete;

 private:
  CudaBackend* be_ = nullptr;  // null when timing is off
  const char* op_;
};

// MOEFLUX_CUDA_FUSE_NORM=0 composes add_rms_norm_matmul from its ops, MOEFLUX_CUDA_FUSE_QK=0
// qk_norm_rope_attention, MOEFLUX_CUDA_FUSE_GLU=0 swiglu_matmul (developers' switches for comparisons,
// read once, like MOEFLUX_CUDA_PDL).
struct FuseSwitches {
  bool norm, qk, glu;
};
const FuseSwitches& fuse_switches() {
  static const FuseSwitches switches = [] {
    const auto on = [](const char* name) {
      const char* v = std::getenv(name);
      return !(v && v[0] == '0');
    };
    return FuseSwitches{on("MOEFLUX_CUDA_FUSE_NORM"), on("MOEFLUX_CUDA_FUSE_QK"), on("MOEFLUX_CUDA_FUSE_GLU")};
  }();
  return switches;
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, cudaStream_t stream) : device_(device), stream_(stream) {
    const char* times = std::getenv("MOEFLUX_CUDA_OP_TIMES");
    timing_ = times && *times && *times != '0';
    const char* graph_times = std::getenv("MOEFLUX_CUDA_GRAPH_TIMES");
    graph_times_ = graph_times && *graph_times && *graph_times != '0';
    if (const char* trace = std::getenv("MOEFLUX_CUDA_TRACE"); trace && *trace) trace_path_ = trace;
    if (timing_ || graph_times_) {
      MF_CUDA_CHECK(cudaEventCreate(&time_start_));
      MF_CUDA_CHECK(cudaEventCreate(&time_stop_));
    }
  }
  ~CudaBackend() override {
    if (timing_) {
      std::fprintf(stderr, "moeflux: CUDA op times (GPU time between events around each op, summed):\n");
      double total = 0;
      for (const auto& [op, t] : op_times_) total += t.first;
      for (const auto& [op, t] : op_times_)
        std::fprintf(stderr, "  %-36s %9lld calls %10.3f ms %7.2f us/call %5.1f%%\n", op.c_str(), (long long)t.second, t.first,
                     1e3 * t.first / double(t.second), 100.0 * t.first / total);
    }
    cudaSetDevice(device_);
    cudaStreamSynchronize(stream_);
    write_trace();
    if (time_start_) cudaEventDestroy(time_start_);
    if (time_stop_) cudaEventDestroy(time_stop_);
    if (scratch_) cudaFree(scratch_);
    if (route_device_) cudaFree(route_device_);
    if (route_host_) cudaFreeHost(route_host_);
    if (argmax_key_) cudaFree(argmax_key_);
    if (argmax_host_) cudaFreeHost(argmax_host_);
    if (top_device_) cudaFree(top_device_);
    if (top_host_) cudaFreeHost(top_host_);
    if (draw_key_) cudaFree(draw_key_);
    if (draw_host_) cudaFreeHost(draw_host_);
    if (draw_row_) cudaFree(draw_row_);
    if (draw_window_) cudaFree(draw_window_);
    if (draw_window_host_) cudaFreeHost(draw_window_host_);
    for (int i = 0; i < 2; ++i) {
      if (bounce_[i]) cudaFreeHost(bounce_[i]);
      if (bounce_done_[i]) cudaEventDestroy(bounce_done_[i]);
    }
    if (ring_host_) cudaFreeHost(ring_host_);
    if (ring_device_) cudaFree(ring_device_);
    if (graph_exec_) cudaGraphExecDestroy(graph_exec_);
    if (graph_out_) cudaFreeHost(graph_out_);
    for (void* p : weights_) cudaFree(p);
    cudaStreamDestroy(stream_);
  }
  const char* name() const override { return "cuda"; }
  bool host_memory() const override { return false; }
  int device() const { return device_; }
  cudaStream_t stream() const { return stream_; }

  const void* upload_weights(const void* host, size_t bytes) override {
    bind();
    void* p = nullptr;
    if (cudaMalloc(&p, std::max<size_t>(bytes, 1)) != cudaSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    weights_.push_back(p);
    // Pageable source: in chunks, so a multi-GiB mapping is not pinned at once by the driver's staging.
    constexpr size_t chunk = size_t(256) << 20;
    for (size_t at = 0; at < bytes; at += chunk)
      MF_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(p) + at, static_cast<const char*>(host) + at, std::min(chunk, bytes - at),
                                    cudaMemcpyHostToDevice, stream_));
    MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return p;
  }

  void copy_to_host(void* host_dst, const void* src, size_t bytes) override {
    if (!bytes) return;
    const OpTimer timer(*this, "copy_to_host");
    bind();
    if (recording_) {
      // Into pinned memory by the graph, then to host_dst once it has run. More than begin_graph set
      // aside fails the recording (the step then runs op by op).
      if (graph_out_at_ + bytes > graph_out_bytes_) {
        record_failed_ = true;
        return;
      }
      MF_CUDA_CHECK(cudaMemcpyAsync(graph_out_ + graph_out_at_, src, bytes, cudaMemcpyDeviceToHost, stream_));
      deferred_.push_back({host_dst, graph_out_at_, bytes});
      graph_out_at_ += (bytes + 15) / 16 * 16;
      return;
    }
    if (bytes < bounce_min_bytes) {
      MF_CUDA_CHECK(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
      MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
      return;
    }
    // Larger copies (a decode step's logits) land in pinned memory at the link's rate, then move on the
    // host: into pageable memory the driver stages the copy itself, far slower, while the GPU waits for the
    // next step. Two buffers: the host copies one chunk out while the next one arrives.
    if (!bounce_[0])
      for (int i = 0; i < 2; ++i) {
        MF_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&bounce_[i]), bounce_bytes, cudaHostAllocDefault));
        MF_CUDA_CHECK(cudaEventCreateWithFlags(&bounce_done_[i], cudaEventDisableTiming));
      }
    const auto chunk_at = [&](size_t c) { return c * bounce_bytes; };
    const auto chunk_bytes = [&](size_t c) { return std::min(bounce_bytes, bytes - chunk_at(c)); };
    const auto fetch = [&](size_t c) {  // chunk c into buffer c % 2, which the host has emptied
      MF_CUDA_CHECK(cudaMemcpyAsync(bounce_[c & 1], static_cast<const char*>(src) + chunk_at(c), chunk_bytes(c), cudaMemcpyDeviceToHost,
                                    stream_));
      MF_CUDA_CHECK(cudaEventRecord(bounce_done_[c & 1], stream_));
    };
    const size_t n_chunks = (bytes + bounce_bytes - 1) / bounce_bytes;
    fetch(0);
    for (size_t c = 0; c < n_chunks; ++c) {
      if (c + 1 < n_chunks) fetch(c + 1);
      const int b = int(c & 1);
      MF_CUDA_CHECK(cudaEventSynchronize(bounce_done_[b]));
      std::memcpy(static_cast<char*>(host_dst) + chunk_at(c), bounce_[b], chunk_bytes(c));
    }
  }

  void copy_from_host(void* dst, const void* host_src, size_t bytes) override {
    if (!bytes) return;
    MF_CHECK_MSG(!recording_, "copy_from_host while a graph records");
    bind();
    MF_CUDA_CHECK(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, stream_));
    MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  int64_t argmax(const float* x, int64_t n) override {
    if (n <= 0 || n >= (int64_t(1) << 32) || recording_) return -1;
    const OpTimer timer(*this, "argmax");
    bind();
    if (!argmax_key_) {
      MF_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&argmax_key_), sizeof(unsigned long long)));
      MF_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&argmax_host_), sizeof(unsigned long long), cudaHostAllocDefault));
    }
    MF_CUDA_CHECK(cudaMemsetAsync(argmax_key_, 0, sizeof(unsigned long long), stream_));
    cuda::argmax_key(x, n, argmax_key_, stream_);
    MF_CUDA_CHECK(cudaMemcpyAsync(argmax_host_, argmax_key_, sizeof(unsigned long long), cudaMemcpyDeviceToHost, stream_));
    MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return cuda::argmax_index(*argmax_host_);
  }

  int64_t top_candidates(const float* x, int64_t n, float temperature, int64_t k, int32_t* ids, float* z, int64_t capacity,
                         const int32_t* gather, int64_t n_gather, float* gathered) override {
    if (n <= 0 || n > INT32_MAX || k <= 0 || capacity <= 0 || capacity > max_top_candidates || !(temperature > 0.0f) || recording_ ||
        n_gather < 0 || n_gather > max_top_candidates)
      return -1;
    for (int64_t i = 0; i < n_gather; ++i)
      MF_CHECK_MSG(gather[i] >= 0 && gather[i] < n, "top_candidates: gathered id {} outside [0, {})", gather[i], n);
    const OpTimer timer(*this, "top_candidates");
    bind();
    // Device: the histogram (+ the cut), the output (count, ids, z), the gathered ids and values. Host
    // (pinned): the output, the gathered ids on their way up and their values on their way down.
    const size_t hist_bytes = (cuda::top_bins + 1) * sizeof(unsigned), out_bytes = (4 + 2 * size_t(max_top_candidates)) * sizeof(unsigned),
                 gather_bytes = 2 * size_t(max_top_candidates) * sizeof(unsigned);
    if (!top_device_) {
      MF_CUDA_CHECK(cudaMalloc(&top_device_, hist_bytes + 16 + out_bytes + gather_bytes));
      MF_CUDA_CHECK(cudaHostAlloc(&top_host_, out_bytes + gather_bytes, cudaHostAllocDefault));
    }
    unsigned* hist = static_cast<unsigned*>(top_device_);
    unsigned* out = hist + cuda::top_bins + 1 + 3;  // 16-byte aligned: 2052 unsigneds in
    int32_t* gather_ids = reinterpret_cast<int32_t*>(out + 4 + 2 * max_top_candidates);
    float* gather_values = reinterpret_cast<float*>(gather_ids + max_top_candidates);
    unsigned* host = static_cast<unsigned*>(top_host_);
    int32_t* host_gather_ids = reinterpret_cast<int32_t*>(host + 4 + 2 * max_top_candidates);
    float* host_gather_values = reinterpret_cast<float*>(host_gather_ids + max_top_candidates);
    if (n_gather > 0) {
      std::memcpy(host_gather_ids, gather, size_t(n_gather) * sizeof(int32_t));
      MF_CUDA_CHECK(cudaMemcpyAsync(gather_ids, host_gather_ids, size_t(n_gather) * sizeof(int32_t), cudaMemcpyHostToDevice, stream_));
      cuda::gather(x, gather_ids, n_gather, gather_values, stream_);
      MF_CUDA_CHECK(cudaMemcpyAsync(host_gather_values, gather_values, size_t(n_gather) * sizeof(float), cudaMemcpyDeviceToHost, stream_));
    }
    MF_CUDA_CHECK(cudaMemsetAsync(top_device_, 0, hist_bytes + 3 * sizeof(unsigned) + 4 * sizeof(unsigned), stream_));
    cuda::top_candidates(x, n, temperature, k, hist, out, capacity, stream_);
    // The count and, past it, as many candidates as fit: one copy of what capacity sets aside.
    const size_t copied = (4 + 2 * size_t(capacity)) * sizeof(unsigned);
    MF_CUDA_CHECK(cudaMemcpyAsync(host, out, copied, cudaMemcpyDeviceToHost, stream_));
    MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
    const int64_t count = host[0];
    if (count > capacity) return -1;
    std::memcpy(ids, host + 4, size_t(count) * sizeof(int32_t));
    std::memcpy(z, host + 4 + capacity, size_t(count) * sizeof(float));
    if (n_gather > 0) std::memcpy(gathered, host_gather_values, size_t(n_gather) * sizeof(float));
    return count;
  }

  int64_t draw_token(const float* x, int64_t n, const DeviceDraw& draw, uint64_t bits) override {
    if (n <= 0 || n > max_draw_vocab || !(draw.temperature >= 0.0f) || draw.n_penalized > n || recording_) return -1;
    const OpTimer timer(*this, "draw_token");
    bind();
    ensure_draw_buffers(n, draw.n_penalized);
    const float* row = x;
    if (draw.n_penalized > 0) {
      // A penalized copy of the row: the window's ids and counts go up through pinned memory (free: the last
      // call waited for its copy).
      std::memcpy(draw_window_host_, draw.penalized_ids, size_t(draw.n_penalized) * sizeof(int32_t));
      std::memcpy(draw_window_host_ + draw.n_penalized, draw.penalized_counts, size_t(draw.n_penalized) * sizeof(int32_t));
      MF_CUDA_CHECK(cudaMemcpyAsync(draw_window_, draw_window_host_, 2 * size_t(draw.n_penalized) * sizeof(int32_t), cudaMemcpyHostToDevice, stream_));
      cuda::penalize(x, draw_row_, n, draw_window_, draw_window_ + draw.n_penalized, draw.n_penalized, draw.repetition_penalty,
                     draw.presence_penalty, draw.frequency_penalty, stream_);
      row = draw_row_;
    }
    MF_CUDA_CHECK(cudaMemsetAsync(draw_key_, 0, sizeof(unsigned long long), stream_));
    cuda::argmax_key(row, n, draw_key_, stream_);
    if (draw.temperature == 0.0f) {  // greedy with a penalty: the key's index
      MF_CUDA_CHECK(cudaMemcpyAsync(draw_host_, draw_key_, sizeof(unsigned long long), cudaMemcpyDeviceToHost, stream_));
      MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
      return cuda::argmax_index(*draw_host_);
    }
    if (draw.in_order(n)) {
      cuda::draw_ordered(row, n, draw.temperature, draw.top_k, draw.top_p, draw.log_min_p, draw_key_, draw_ordered_, bits, draw_out_, stream_);
    } else {
      cuda::draw_mass(row, n, draw.temperature, draw.log_min_p, draw_key_, draw_mass_, stream_);
      cuda::draw_find(row, n, draw.temperature, draw.log_min_p, draw_key_, draw_mass_, bits, draw_out_, stream_);
    }
    MF_CUDA_CHECK(cudaMemcpyAsync(draw_host_, draw_out_, sizeof(int32_t), cudaMemcpyDeviceToHost, stream_));
    MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return *reinterpret_cast<const int32_t*>(draw_host_);
  }

  // draw_token's buffers: on the device argmax's key, the blocks' sums, the drawn id and the ordered draw's
  // selects (for rows of up to max_draw_vocab), then the penalized row and the window (grown to the largest
  // asked for); the key's or id's and the window's pinned ways.
  void ensure_draw_buffers(int64_t n, int64_t n_window) {
    if (!draw_key_) {
      const size_t words = 2 + 2 * size_t(cuda::draw_blocks(max_draw_vocab));  // even: the ordered draw's buffer stays 16-byte aligned
      void* device = nullptr;
      MF_CUDA_CHECK(cudaMalloc(&device, sizeof(unsigned long long) * words + cuda::ordered_draw_buffer_bytes));
      MF_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&draw_host_), sizeof(unsigned long long), cudaHostAllocDefault));
      draw_key_ = static_cast<unsigned long long*>(device);
      draw_mass_ = draw_key_ + 1;
      draw_out_ = reinterpret_cast<int32_t*>(draw_key_ + words - 1);
      draw_ordered_ = reinterpret_cast<cuda::OrderedDrawBuffer*>(draw_key_ + words);
    }
    if (n_window == 0) return;
    if (n > draw_row_size_) {
      if (draw_row_) MF_CUDA_CHECK(cudaFree(draw_row_));
      draw_row_ = nullptr;
      MF_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&draw_row_), size_t(n) * sizeof(float)));
      draw_row_size_ = n;
    }
    if (n_window > draw_window_size_) {
      if (draw_window_) MF_CUDA_CHECK(cudaFree(draw_window_));
      if (draw_window_host_) MF_CUDA_CHECK(cudaFreeHost(draw_window_host_));
      draw_window_ = nullptr, draw_window_host_ = nullptr;
      const int64_t size = std::max<int64_t>(n_window, 1024);
      MF_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&draw_window_), 2 * size_t(size) * sizeof(int32_t)));
      MF_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&draw_window_host_), 2 * size_t(size) * sizeof(int32_t), cudaHostAllocDefault));
      draw_window_size_ = size;
    }
  }

  void trace_mark(const char* what) override {
    if (!trace_path_.empty() && !recording_) trace_op(what);
  }

  void synchronize() override {
    MF_CHECK_MSG(!recording_, "synchronize while a graph records");
    bind();
    MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  bool begin_graph() override {
    MF_CHECK_MSG(!recording_, "begin_graph while a graph records");
    bind();
    ensure_ring();
    // Room for a whole step's stagings without wrapping (a one-token step stages a few KiB).
    if (ring_at_ > ring_bytes / 2) {
      MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
      ring_at_ = 0;
      ++ring_epoch_;
    }
    // Pinned room for the results a step copies out (a row of logits of the largest vocabularies).
    if (graph_out_bytes_ < graph_out_min_bytes) {
      if (graph_out_) MF_CUDA_CHECK(cudaFreeHost(graph_out_));
      graph_out_bytes_ = graph_out_min_bytes;
      MF_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&graph_out_), graph_out_bytes_, cudaHostAllocDefault));
    }
    if (cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    recording_ = true;
    record_start_ = std::chrono::steady_clock::now();
    record_failed_ = false;
    graph_out_at_ = 0;
    deferred_.clear();
    return true;
  }

  Status end_graph(bool run) override {
    MF_CHECK_MSG(recording_, "end_graph without begin_graph");
    bind();
    recording_ = false;
    const auto t1 = std::chrono::steady_clock::now();
    cudaGraph_t graph = nullptr;
    const cudaError_t ended = cudaStreamEndCapture(stream_, &graph);
    // Stagings made while recording were copied only if the graph runs: the memo must not offer them.
    const auto discard = [this] { ++ring_epoch_; };
    if (ended != cudaSuccess || !graph || record_failed_) {
      cudaGetLastError();
      if (graph) cudaGraphDestroy(graph);
      discard();
      return make_error(ErrorCode::internal, "recording the step as a CUDA graph failed: {}",
                        record_failed_ ? "results larger than the graph's output buffer" : cudaGetErrorString(ended));
    }
    if (!run) {
      cudaGraphDestroy(graph);
      discard();
      return Status::ok();
    }
    // The same kernels with other arguments (a new position, another context length) update the last
    // graph in place; anything else builds it anew.
    if (graph_exec_) {
      cudaGraphExecUpdateResultInfo info{};
      if (cudaGraphExecUpdate(graph_exec_, graph, &info) != cudaSuccess) {
        cudaGetLastError();
        cudaGraphExecDestroy(graph_exec_);
        graph_exec_ = nullptr;
      }
    }
    if (!graph_exec_ && cudaGraphInstantiate(&graph_exec_, graph, 0) != cudaSuccess) {
      cudaGetLastError();
      graph_exec_ = nullptr;
      cudaGraphDestroy(graph);
      discard();
      return make_error(ErrorCode::internal, "instantiating the step's CUDA graph failed");
    }
    cudaGraphDestroy(graph);
    const auto t2 = std::chrono::steady_clock::now();
    if (graph_times_) MF_CUDA_CHECK(cudaEventRecord(time_start_, stream_));
    MF_CUDA_CHECK(cudaGraphLaunch(graph_exec_, stream_));
    if (graph_times_) MF_CUDA_CHECK(cudaEventRecord(time_stop_, stream_));
    MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
    const auto t3 = std::chrono::steady_clock::now();
    if (graph_times_) time_graph(t1 - record_start_, t2 - t1, t3 - t2);
    for (const DeferredCopy& c : deferred_) std::memcpy(c.host_dst, graph_out_ + c.at, c.bytes);
    deferred_.clear();
    return Status::ok();
  }

  float* alloc_activations(size_t n_floats) override {
    bind();
    void* p = nullptr;
    if (n_floats > SIZE_MAX / sizeof(float) || cudaMalloc(&p, std::max<size_t>(n_floats, 1) * sizeof(float)) != cudaSuccess) {
      cudaGetLastError();  // an out-of-memory result is the caller's to report, not a sticky error
      return nullptr;
    }
    return static_cast<float*>(p);
  }
  void free_activations(float* p) override {
    bind();
    if (p) MF_CUDA_CHECK(cudaFree(p));
  }

  void matmul(const WeightView& w, const float* x, float* y, int64_t n_tokens) override {
    const OpTimer timer(*this, "matmul");
    MF_CHECK(n_tokens >= 0);
    bind();
    const MatmulJob job{w, x, y, n_tokens};
    cuda::matmul_jobs(&job, 1, stream_);
  }

  void matmul_many(const MatmulJob* jobs, int64_t n_jobs) override {
    const OpTimer timer(*this, "matmul_many");
    bind();
    cuda::matmul_jobs(jobs, n_jobs, stream_);
  }

  void add_rms_norm_matmul(const float* x, const float* y, const float* weight, float eps, int64_t n_rows, int64_t dim, float* x_out,
                           float* h, const MatmulJob* jobs, int64_t n_jobs) override {
    {
      const OpTimer timer(*this, "add_rms_norm_matmul");
      bind();
      if (n_rows == 1 && fuse_switches().norm &&
          cuda::norm_matmul_jobs(x, y, weight, eps, dim, x_out, h, jobs, n_jobs, stream_))
        return;
      // Composed, with x + y written straight to x_out (no copy of x first).
      if (y)
        cuda::add_rms_norm_to(x, y, x_out, weight, eps, n_rows, dim, h, stream_);
      else
        cuda::rms_norm(x, weight, eps, n_rows, dim, h, stream_);
    }
    matmul_many(jobs, n_jobs);
  }

  void swiglu_matmul(float* gate, const float* up, const WeightView& w, float* y, int64_t n_tokens) override {
    if (n_tokens == 1 && fuse_switches().glu) {
      const OpTimer timer(*this, "swiglu_matmul");
      bind();
      if (cuda::glu_matmul_job(gate, up, MatmulJob{w, gate, y, 1}, stream_)) return;
    }
    Backend::swiglu_matmul(gate, up, w, y, n_tokens);
  }

  void embed_rows(const WeightView& w, const int32_t* ids, int64_t n_tokens, float* out) override {
    const OpTimer timer(*this, "embed_rows");
    for (int64_t t = 0; t < n_tokens; ++t) MF_CHECK_MSG(ids[t] >= 0 && ids[t] < w.rows, "token id {} outside [0, {})", ids[t], w.rows);
    bind();
    const auto* d_ids = static_cast<const int32_t*>(stage({{ids, size_t(n_tokens) * 4}})[0]);
    cuda::embed_rows(w, d_ids, n_tokens, out, stream_);
  }

  void rms_norm(const float* x, const float* weight, float eps, int64_t n_rows, int64_t dim, float* out) override {
    const OpTimer timer(*this, "rms_norm");
    bind();
    cuda::rms_norm(x, weight, eps, n_rows, dim, out, stream_);
  }

  void gated_rms_norm(const float* x, const float* weight, float eps, int64_t n_rows, int64_t dim, const float* gate, float* out) override {
    {
      const OpTimer timer(*this, "gated_rms_norm");
      bind();
      if (cuda::gated_rms_norm(x, weight, eps, n_rows, dim, gate, out, stream_)) return;
    }
    Backend::gated_rms_norm(x, weight, eps, n_rows, dim, gate, out);
  }

  void add_rms_norm(float* x, const float* y, const float* weight, float eps, int64_t n_rows, int64_t dim, float* out) override {
    const OpTimer timer(*this, "add_rms_norm");
    bind();
    cuda::add_rms_norm(x, y, weight, eps, n_rows, dim, out, stream_);
  }

  void rope_neox(float* x, int64_t n_tokens, int64_t n_heads, int64_t head_dim, int64_t rot_dim, const int32_t* positions,
                 const float* inv_freq, float scale, int64_t row_stride) override {
    const OpTimer timer(*this, "rope_neox");
    MF_CHECK(rot_dim % 2 == 0 && rot_dim <= head_dim);
    if (n_tokens <= 0 || rot_dim == 0) return;
    bind();
    const auto d = stage({{positions, size_t(n_tokens) * 4}, {inv_freq, size_t(rot_dim / 2) * 4}});
    cuda::rope_neox(x, n_tokens, n_heads, head_dim, rot_dim, static_cast<const int32_t*>(d[0]), static_cast<const float*>(d[1]), scale,
                    row_stride == 0 ? n_heads * head_dim : row_stride, stream_);
  }

  void qk_norm_rope(float* q, float* k, int64_t n_tokens, int64_t n_head, int64_t n_head_kv, int64_t head_dim, int64_t rot_dim,
                    const float* q_norm, const float* k_norm, float eps, const int32_t* positions, const float* inv_freq) override {
    const OpTimer timer(*this, "qk_norm_rope");
    MF_CHECK(rot_dim % 2 == 0 && rot_dim <= head_dim);
    if (n_tokens <= 0) return;
    bind();
    const auto d = stage({{positions, size_t(n_tokens) * 4}, {inv_freq, size_t(rot_dim / 2) * 4}});
    cuda::qk_norm_rope(q, k, n_tokens, n_head, n_head_kv, head_dim, rot_dim, q_norm, k_norm, eps, static_cast<const int32_t*>(d[0]),
                       static_cast<const float*>(d[1]), 1.0f, stream_);
  }

  void qk_norm_rope_attention(float* q, float* k_cache, const float* v_cache, int64_t n_tokens, int64_t n_past,
                              const AttentionLayout& layout, float scale, float* out, int64_t rot_dim, const float* q_norm,
                              const float* k_norm, float eps, const int32_t* positions, const float* inv_freq) override {
    if (n_tokens == 1 && fuse_switches().qk) {
      const OpTimer timer(*this, "qk_norm_rope_attention");
      MF_CHECK(rot_dim % 2 == 0 && rot_dim <= layout.k_dim && layout.n_head_kv > 0 && layout.n_head % layout.n_head_kv == 0);
      bind();
      const cuda::QkNormRope qk{q_norm, k_norm, eps, int(rot_dim / 2), float(positions[0]), inv_freq};
      if (cuda::attention_qk_norm_rope(q, k_cache, v_cache, n_past, layout, scale, out, qk, stream_)) return;
    }
    Backend::qk_norm_rope_attention(q, k_cache, v_cache, n_tokens, n_past, layout, scale, out, rot_dim, q_norm, k_norm, eps, positions,
                                    inv_freq);
  }

  void attention(const float* q, const float* k_cache, const float* v_cache, int64_t n_tokens, int64_t n_past,
                 const AttentionLayout& layout, float scale, float* out) override {
    const OpTimer timer(*this, "attention");
    MF_CHECK(layout.n_head_kv > 0 && layout.n_head % layout.n_head_kv == 0);
    bind();
    cuda::attention(q, k_cache, v_cache, n_tokens, n_past, layout, scale, out, stream_);
  }

  // On the GPU with the kernels a decode token's routing uses (router_*_device's contract: the device's
  // exp), then the [T, k] ids and weights to the host in one copy: a prompt's routing waits for one small
  // copy, not for T rows of top-k on the host while the GPU idles. Shapes those kernels do not take rank
  // on the host, with the CPU backends' code.
  void router_softmax_topk(const float* logits, int64_t n_tokens, int64_t n_expert, int64_t k, bool normalize, int32_t* ids,
                           float* weights) override {
    const OpTimer timer(*this, "router_softmax_topk");
    MF_CHECK(k > 0 && k <= n_expert);
    if (n_tokens <= 0) return;
    if (!cuda::routes_on_device(n_expert, k, 0)) {
      const float* host = logits_to_host(logits, n_tokens * n_expert);
      for (int64_t t = 0; t < n_tokens; ++t) cpu::softmax_topk_row(host + t * n_expert, n_expert, k, normalize, ids + t * k, weights + t * k);
      return;
    }
    bind();
    const auto [d_ids, d_weights] = route_buffers(n_tokens * k);
    cuda::router_softmax_topk(logits, n_tokens, n_expert, k, normalize, d_ids, d_weights, stream_);
    routes_to_host(n_tokens * k, ids, weights);
  }

  void router_sigmoid_grouped_topk(const float* logits, const float* bias, int64_t n_tokens, int64_t n_expert, int64_t n_group,
                                   int64_t topk_group, int64_t k, bool normalize, float scaling, int32_t* ids, float* weights) override {
    const OpTimer timer(*this, "router_sigmoid_grouped_topk");
    MF_CHECK(k > 0 && k <= n_expert && n_group > 0 && n_expert % n_group == 0 && topk_group > 0 && topk_group <= n_group);
    if (n_tokens <= 0) return;
    if (!cuda::routes_on_device(n_expert, k, n_group)) {
      const float* host = logits_to_host(logits, n_tokens * n_expert);
      for (int64_t t = 0; t < n_tokens; ++t)
        cpu::sigmoid_grouped_topk_row(host + t * n_expert, bias, n_expert, n_group, topk_group, k, normalize, scaling, ids + t * k,
                                      weights + t * k);
      return;
    }
    bind();
    const auto* d_bias = bias ? static_cast<const float*>(stage({{bias, size_t(n_expert) * sizeof(float)}})[0]) : nullptr;
    const auto [d_ids, d_weights] = route_buffers(n_tokens * k);
    cuda::router_sigmoid_grouped_topk(logits, d_bias, n_tokens, n_expert, n_group, topk_group, k, normalize, scaling, d_ids, d_weights,
                                      stream_);
    routes_to_host(n_tokens * k, ids, weights);
  }

  void router_softmax_topk_device(const float* logits, int64_t n_tokens, int64_t n_expert, int64_t k, bool normalize, int32_t* ids,
                                  float* weights) override {
    const OpTimer timer(*this, "router_softmax_topk_device");
    bind();
    cuda::router_softmax_topk(logits, n_tokens, n_expert, k, normalize, ids, weights, stream_);
  }

  void router_sigmoid_grouped_topk_device(const float* logits, const float* bias, int64_t n_tokens, int64_t n_expert, int64_t n_group,
                                          int64_t topk_group, int64_t k, bool normalize, float scaling, int32_t* ids,
                                          float* weights) override {
    const OpTimer timer(*this, "router_sigmoid_grouped_topk_device");
    MF_CHECK(k > 0 && k <= n_expert && n_group > 0 && n_expert % n_group == 0 && topk_group > 0 && topk_group <= n_group);
    bind();
    cuda::router_sigmoid_grouped_topk(logits, bias, n_tokens, n_expert, n_group, topk_group, k, normalize, scaling, ids, weights, stream_);
  }

  void add_rms_norm_route_device(const float* x, const float* y, const float* weight, float eps, int64_t dim, float* x_out, float* h,
                                 const WeightView& router, float* logits, int64_t k, bool normalize, int32_t* ids,
                                 float* weights) override {
    {
      const OpTimer timer(*this, "add_rms_norm_route_device");
      bind();
      if (fuse_switches().norm && cuda::norm_route_topk(x, y, weight, eps, dim, x_out, h, router, logits, k, normalize, ids, weights, stream_))
        return;
    }
    Backend::add_rms_norm_route_device(x, y, weight, eps, dim, x_out, h, router, logits, k, normalize, ids, weights);
  }

  void moe_decode(const ExpertLayout& layout, const void* const* table, const int32_t* ids, const float* weights, int64_t k,
                  const float* x, float* h, float* part, float* y, bool accumulate) override {
    const OpTimer timer(*this, "moe_decode");
    bind();
    cuda::moe_decode(layout, table, ids, weights, k, x, h, part, y, accumulate, stream_);
  }

  void swiglu(const float* gate, const float* up, float* out, int64_t n) override {
    const OpTimer timer(*this, "swiglu");
    bind();
    cuda::swiglu(gate, up, out, n, stream_);
  }

  void axpy(float* acc, const float* x, float a, int64_t n) override {
    const OpTimer timer(*this, "axpy");
    bind();
    cuda::axpy(acc, x, a, n, stream_);
  }

  void fill(float* x, float value, int64_t n) override {
    const OpTimer timer(*this, "fill");
    bind();
    cuda::fill(x, value, n, stream_);
  }

  void gather_rows(const float* src, const int32_t* rows, int64_t n_rows, int64_t dim, float* dst) override {
    const OpTimer timer(*this, "gather_rows");
    if (n_rows <= 0) return;
    bind();
    const auto* d_rows = static_cast<const int32_t*>(stage({{rows, size_t(n_rows) * 4}})[0]);
    cuda::gather_rows(src, d_rows, n_rows, dim, dst, stream_);
  }

  void scatter_add_rows(float* dst, const float* src, const int32_t* rows, const float* weights, int64_t n_rows,
                        int64_t dim) override {
    const OpTimer timer(*this, "scatter_add_rows");
    if (n_rows <= 0 || dim <= 0) return;
    bind();
    // Group the terms by destination, each destination's in the order given: a counting sort by row (rows
    // are token indices of a batch), a stable sort where they spread wider.
    MF_CHECK_MSG(n_rows < INT32_MAX, "scatter_add_rows: {} rows", n_rows);
    scatter_order_.resize(size_t(n_rows));
    const auto [lo, hi] = std::minmax_element(rows, rows + n_rows);
    MF_CHECK_MSG(*lo >= 0, "scatter_add_rows: destination row {}", *lo);
    if (int64_t(*hi) < 4 * n_rows + 4096) {
      scatter_start_.assign(size_t(*hi) + 2, 0);
      for (int64_t r = 0; r < n_rows; ++r) ++scatter_start_[size_t(rows[r]) + 1];
      for (size_t i = 1; i < scatter_start_.size(); ++i) scatter_start_[i] += scatter_start_[i - 1];
      for (int64_t r = 0; r < n_rows; ++r) scatter_order_[size_t(scatter_start_[size_t(rows[r])]++)] = int32_t(r);
    } else {
      for (int64_t r = 0; r < n_rows; ++r) scatter_order_[size_t(r)] = int32_t(r);
      std::stable_sort(scatter_order_.begin(), scatter_order_.end(), [&](int32_t a, int32_t b) { return rows[a] < rows[b]; });
    }
    scatter_targets_.clear();
    scatter_start_.clear();
    scatter_weights_.resize(size_t(n_rows));
    for (int64_t j = 0; j < n_rows; ++j) {
      const int32_t r = scatter_order_[size_t(j)];
      if (j == 0 || rows[r] != scatter_targets_.back()) {
        scatter_targets_.push_back(rows[r]);
        scatter_start_.push_back(int32_t(j));
      }
      scatter_weights_[size_t(j)] = weights[r];
    }
    scatter_start_.push_back(int32_t(n_rows));
    const int64_t n_targets = int64_t(scatter_targets_.size());
    const auto d = stage({{scatter_targets_.data(), size_t(n_targets) * 4},
                          {scatter_start_.data(), size_t(n_targets + 1) * 4},
                          {scatter_order_.data(), size_t(n_rows) * 4},
                          {scatter_weights_.data(), size_t(n_rows) * 4}});
    cuda::scatter_add_rows(dst, src, static_cast<const int32_t*>(d[0]), static_cast<const int32_t*>(d[1]),
                           static_cast<const int32_t*>(d[2]), static_cast<const float*>(d[3]), n_targets, dim, stream_);
  }

  void copy_rows(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t n_rows, int64_t dim) override {
    const OpTimer timer(*this, "copy_rows");
    bind();
    cuda::copy_rows(src, src_stride, dst, dst_stride, n_rows, dim, stream_);
  }

  void sigmoid_mul(float* x, const float* gate, int64_t n_rows, int64_t dim, bool per_row) override {
    const OpTimer timer(*this, "sigmoid_mul");
    bind();
    cuda::sigmoid_mul(x, gate, n_rows, dim, per_row, stream_);
  }

  void causal_conv1d_silu(const float* x, float* conv_state, const float* weight, int64_t n_tokens, int64_t channels, int64_t kernel,
                          float* out) override {
    const OpTimer timer(*this, "causal_conv1d_silu");
    MF_CHECK(kernel >= 1);
    bind();
    cuda::causal_conv1d_silu(x, conv_state, weight, n_tokens, channels, kernel, out, stream_);
  }

  void gated_delta_gates(const float* a, const float* b, const float* a_log, const float* dt_bias, int64_t n_tokens, int64_t n_heads,
                         float* g, float* beta) override {
    const OpTimer timer(*this, "gated_delta_gates");
    bind();
    cuda::gated_delta_gates(a, b, a_log, dt_bias, n_tokens, n_heads, g, beta, stream_);
  }

  void gated_delta_rule(const float* q, const float* k, const float* v, int64_t stride, const float* g, const float* beta, float* state,
                        int64_t n_tokens, int64_t n_k_heads, int64_t n_v_heads, int64_t k_dim, int64_t v_dim, float q_scale,
                        float* out) override {
    const OpTimer timer(*this, "gated_delta_rule");
    MF_CHECK(n_k_heads > 0 && n_v_heads % n_k_heads == 0);
    bind();
    cuda::gated_delta_rule(q, k, v, stride, g, beta, state, n_tokens, n_k_heads, n_v_heads, k_dim, v_dim, q_scale, out, stream_);
  }

 private:
  struct HostPart {
    const void* data;
    size_t bytes;
  };

  // Every op runs on this backend's device (two backends on two GPUs may share a host thread).
  void bind() { MF_CUDA_CHECK(cudaSetDevice(device_)); }

  // Copies small host arrays into device memory in stream order and returns their device addresses
  // (16-byte aligned). They go through a ring of pinned host bytes with a device twin, so the host never
  // waits for the queue; when the ring is full the queue is drained once and it starts over. While a
  // graph records, the ring never wraps (begin_graph leaves room for a step), so what the recorded
  // copies read stays in place until the graph has run.
  //
  // Every layer of a step stages the same small arrays (positions and inv_freq for rotary, the row
  // pattern of a gather): a staging whose bytes equal one of the last few still in the ring (the ring has
  // not started over since) reuses its device copy instead of queueing another copy.
  std::vector<void*> stage(std::initializer_list<HostPart> parts) {
    size_t total = 0;
    for (const HostPart& p : parts) total += (p.bytes + 15) / 16 * 16;
    if (total > ring_bytes / 4) {
      MF_CHECK_MSG(!recording_, "a staging of {} bytes while a graph records", total);
      return stage_pageable(parts, total);
    }
    ensure_ring();
    packed_.assign(total, 0);
    {
      size_t at = 0;
      for (const HostPart& p : parts) {
        if (p.bytes) std::memcpy(packed_.data() + at, p.data, p.bytes);
        at += (p.bytes + 15) / 16 * 16;
      }
    }
    size_t where = SIZE_MAX;
    if (total <= memo_max_bytes)
      for (const Memo& m : memo_)
        if (m.epoch == ring_epoch_ && m.bytes == total && std::memcmp(ring_host_ + m.at, packed_.data(), total) == 0) where = m.at;
    if (where == SIZE_MAX) {
      if (ring_at_ + total > ring_bytes) {
        MF_CHECK_MSG(!recording_, "the staging ring ran out while a graph records");
        MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
        ring_at_ = 0;
        ++ring_epoch_;
      }
      where = ring_at_;
      ring_at_ += total;
      if (total) {
        std::memcpy(ring_host_ + where, packed_.data(), total);
        MF_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(ring_device_) + where, ring_host_ + where, total, cudaMemcpyHostToDevice, stream_));
      }
      if (total <= memo_max_bytes) memo_[memo_next_++ % memo_.size()] = {ring_epoch_, where, total};
    }
    std::vector<void*> out;
    size_t at = 0;
    for (const HostPart& p : parts) {
      out.push_back(static_cast<char*>(ring_device_) + where + at);
      at += (p.bytes + 15) / 16 * 16;
    }
    return out;
  }

  void ensure_ring() {
    if (ring_host_) return;
    MF_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&ring_host_), ring_bytes, cudaHostAllocDefault));
    MF_CUDA_CHECK(cudaMalloc(&ring_device_, ring_bytes));
  }

  // Large stagings: from pageable memory into a growing device buffer, after the queue drains.
  std::vector<void*> stage_pageable(std::initializer_list<HostPart> parts, size_t total) {
    MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
    if (total > scratch_bytes_) {
      if (scratch_) MF_CUDA_CHECK(cudaFree(scratch_));
      scratch_bytes_ = total;
      MF_CUDA_CHECK(cudaMalloc(&scratch_, scratch_bytes_));
    }
    std::vector<void*> device;
    size_t at = 0;
    for (const HostPart& p : parts) {
      if (p.bytes) MF_CUDA_CHECK(cudaMemcpy(static_cast<char*>(scratch_) + at, p.data, p.bytes, cudaMemcpyHostToDevice));
      device.push_back(static_cast<char*>(scratch_) + at);
      at += (p.bytes + 15) / 16 * 16;
    }
    return device;
  }

  // Device ids [n] then weights [n] for the routers' host forms, and their pinned landing place; grown as
  // needed (n ints and n floats each).
  std::pair<int32_t*, float*> route_buffers(int64_t n) {
    const size_t bytes = size_t(n) * 8;
    if (bytes > route_bytes_) {
      if (route_device_) MF_CUDA_CHECK(cudaFree(route_device_));
      if (route_host_) MF_CUDA_CHECK(cudaFreeHost(route_host_));
      route_device_ = route_host_ = nullptr;
      route_bytes_ = 0;
      MF_CUDA_CHECK(cudaMalloc(&route_device_, bytes));
      MF_CUDA_CHECK(cudaHostAlloc(&route_host_, bytes, cudaHostAllocDefault));
      route_bytes_ = bytes;
    }
    return {static_cast<int32_t*>(route_device_), reinterpret_cast<float*>(static_cast<char*>(route_device_) + size_t(n) * 4)};
  }
  void routes_to_host(int64_t n, int32_t* ids, float* weights) {
    MF_CUDA_CHECK(cudaMemcpyAsync(route_host_, route_device_, size_t(n) * 8, cudaMemcpyDeviceToHost, stream_));
    MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
    std::memcpy(ids, route_host_, size_t(n) * 4);
    std::memcpy(weights, static_cast<const char*>(route_host_) + size_t(n) * 4, size_t(n) * 4);
  }

  // The router's logits [n] on the host, after every op queued before; valid until the next call.
  const float* logits_to_host(const float* logits, int64_t n) {
    bind();
    logits_host_.resize(size_t(n));
    if (n > 0) MF_CUDA_CHECK(cudaMemcpyAsync(logits_host_.data(), logits, size_t(n) * 4, cudaMemcpyDeviceToHost, stream_));
    MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return logits_host_.data();
  }

  static constexpr size_t ring_bytes = size_t(8) << 20;

  friend class OpTimer;
  bool timing_ = false;
  // MOEFLUX_CUDA_TRACE: the ops' starts; the first is an anchor recorded on an idle stream, so that its
  // event and host time are the same instant.
  struct TracePoint {
    const char* op;
    std::chrono::steady_clock::time_point host;
    cudaEvent_t event;
  };
  std::string trace_path_;
  std::vector<TracePoint> trace_;

  void trace_op(const char* op) {
    if (trace_.empty()) {
      MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
      trace_.push_back({"anchor", {}, nullptr});
      MF_CUDA_CHECK(cudaEventCreate(&trace_.back().event));
      MF_CUDA_CHECK(cudaEventRecord(trace_.back().event, stream_));
      trace_.back().host = std::chrono::steady_clock::now();
    }
    TracePoint p{op, std::chrono::steady_clock::now(), nullptr};
    MF_CUDA_CHECK(cudaEventCreate(&p.event));
    MF_CUDA_CHECK(cudaEventRecord(p.event, stream_));
    trace_.push_back(p);
  }

  void write_trace() {
    if (trace_.empty()) return;
    std::FILE* f = std::fopen(trace_path_.c_str(), "w");
    if (f) std::fprintf(f, "op,host_us,gpu_us\n");
    for (const TracePoint& p : trace_) {
      float ms = 0;
      if (cudaEventElapsedTime(&ms, trace_.front().event, p.event) != cudaSuccess) ms = -1;
      const double host_us = std::chrono::duration<double, std::micro>(p.host - trace_.front().host).count();
      if (f) std::fprintf(f, "%s,%.1f,%.1f\n", p.op, host_us, 1e3 * double(ms));
    }
    for (const TracePoint& p : trace_) cudaEventDestroy(p.event);  // the anchor last read above
    if (f) std::fclose(f);
    else std::fprintf(stderr, "moeflux: cannot write the CUDA trace to %s\n", trace_path_.c_str());
    trace_.clear();
  }
  cudaEvent_t time_start_ = nullptr, time_stop_ = nullptr;
  std::map<std::string, std::pair<double, int64_t>> op_times_;  // op → (ms, calls)

  int device_;
  cudaStream_t stream_;
  void* scratch_ = nullptr;       // device bytes for large staged host arrays
  size_t scratch_bytes_ = 0;
  char* ring_host_ = nullptr;     // [ring_bytes] pinned
  void* ring_device_ = nullptr;   // [ring_bytes] device
  size_t ring_at_ = 0;            // next free byte of the ring
  uint64_t ring_epoch_ = 0;       // times the ring started over
  struct Memo {
    uint64_t epoch = UINT64_MAX;
    size_t at = 0, bytes = 0;
  };
  static constexpr size_t memo_max_bytes = 4096;
  std::array<Memo, 8> memo_{};    // the last small stagings, reusable while their epoch is current
  size_t memo_next_ = 0;
  std::vector<char> packed_;      // the staging being made, packed as in the ring

  // Graphs (begin_graph / end_graph).
  struct DeferredCopy {
    void* host_dst;
    size_t at, bytes;  // in graph_out_
  };
  static constexpr size_t graph_out_min_bytes = size_t(4) << 20;
  bool recording_ = false;
  // MOEFLUX_CUDA_GRAPH_TIMES=1 (a developer's switch): for each recorded step, the host's recording, update
  // and launch-to-finish times and the GPU time of the graph itself (events around its launch); means to
  // stderr every 32 steps.
  bool graph_times_ = false;
  std::chrono::steady_clock::time_point record_start_;
  double graph_ms_[4] = {};  // record, update, launch to finish, the graph on the GPU
  int64_t graph_steps_ = 0;

  void time_graph(std::chrono::steady_clock::duration record, std::chrono::steady_clock::duration update,
                  std::chrono::steady_clock::duration run) {
    using ms = std::chrono::duration<double, std::milli>;
    float gpu = 0;
    MF_CUDA_CHECK(cudaEventElapsedTime(&gpu, time_start_, time_stop_));
    graph_ms_[0] += ms(record).count();
    graph_ms_[1] += ms(update).count();
    graph_ms_[2] += ms(run).count();
    graph_ms_[3] += gpu;
    if (++graph_steps_ % 32 == 0) {
      const double n = double(graph_steps_);
      std::fprintf(stderr, "moeflux: graph step means: record %.3f ms, update %.3f ms, launch to finish %.3f ms; on the GPU %.3f ms\n",
                   graph_ms_[0] / n, graph_ms_[1] / n, graph_ms_[2] / n, graph_ms_[3] / n);
    }
  }
  std::vector<int32_t> scatter_order_, scatter_targets_, scatter_start_;  // scatter_add_rows' grouping
  std::vector<float> scatter_weights_;
  bool record_failed_ = false;    // the recording cannot be run (end_graph says so)
  cudaGraphExec_t graph_exec_ = nullptr;
  char* graph_out_ = nullptr;     // pinned: device results the recorded step copies out
  size_t graph_out_bytes_ = 0, graph_out_at_ = 0;
  std::vector<DeferredCopy> deferred_;
  std::vector<float> logits_host_;  // [T, n_expert] of the last router call ranked on the host
  // copy_to_host's pinned buffers for copies of bounce_min_bytes or more, made at the first.
  static constexpr size_t bounce_min_bytes = size_t(64) << 10, bounce_bytes = size_t(4) << 20;
  char* bounce_[2] = {nullptr, nullptr};
  cudaEvent_t bounce_done_[2] = {nullptr, nullptr};
  void* route_device_ = nullptr;    // route_buffers
  void* route_host_ = nullptr;      // pinned
  size_t route_bytes_ = 0;
  unsigned long long* argmax_key_ = nullptr;   // argmax's result on the device
  unsigned long long* argmax_host_ = nullptr;  // and its pinned landing place
  // top_candidates: the histogram (+ the cut), the output (count, ids, z) and the gathered ids and values
  // on the device, their pinned host side; sized for max_top_candidates at the first call.
  static constexpr int64_t max_top_candidates = 8192;
  void* top_device_ = nullptr;
  void* top_host_ = nullptr;
  // draw_token (ensure_draw_buffers), for rows of up to max_draw_vocab (2048 blocks' sums).
  static constexpr int64_t max_draw_vocab = int64_t(1) << 22;
  unsigned long long* draw_key_ = nullptr;  // device: the key, then the sums, then the id, then the ordered draw's buffer
  unsigned long long* draw_mass_ = nullptr;
  int32_t* draw_out_ = nullptr;
  cuda::OrderedDrawBuffer* draw_ordered_ = nullptr;
  unsigned long long* draw_host_ = nullptr;  // pinned: the key or the id
  float* draw_row_ = nullptr;     // the penalized row, draw_row_size_ floats
  int64_t draw_row_size_ = 0;
  int32_t* draw_window_ = nullptr;       // the window's ids, then its counts: 2 · draw_window_size_
  int32_t* draw_window_host_ = nullptr;  // pinned
  int64_t draw_window_size_ = 0;
  std::vector<void*> weights_;      // upload_weights' device copies
};

OpTimer::OpTimer(CudaBackend& be, const char* op) : be_(be.timing_ && !be.recording_ ? &be : nullptr), op_(op) {
  if (!be.trace_path_.empty() && !be.recording_) be.trace_op(op);
  if (be_) MF_CUDA_CHECK(cudaEventRecord(be_->time_start_, be_->stream_));
}

OpTimer::~OpTimer() {
  if (!be_) return;
  MF_CUDA_CHECK(cudaEventRecord(be_->time_stop_, be_->stream_));
  MF_CUDA_CHECK(cudaEventSynchronize(be_->time_stop_));
  float ms = 0;
  MF_CUDA_CHECK(cudaEventElapsedTime(&ms, be_->time_start_, be_->time_stop_));
  auto& t = be_->op_times_[op_];
  t.first += ms;
  ++t.second;
}

}  // namespace

namespace cuda {

bool stream_of(Backend& backend, int* device, cudaStream_t* stream) {
  auto* cuda = dynamic_cast<CudaBackend*>(&backend);
  if (!cuda) return false;
  *device = cuda->device();
  *stream = cuda->stream();
  return true;
}

namespace {
std::vector<void (*)(WaitTrace*)>& wait_trace_setters() {
  static std::vector<void (*)(WaitTrace*)> setters;
  return setters;
}
}  // namespace

int register_wait_trace_setter(void (*set)(WaitTrace*)) {
  wait_trace_setters().push_back(set);
  return int(wait_trace_setters().size());
}

bool enable_wait_trace(WaitTrace* device_buffer) {
  for (auto* set : wait_trace_setters()) set(device_buffer);
  return !wait_trace_setters().empty();
}

}  // namespace cuda

bool built_with_cuda() { return true; }

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver or no GPU: not an error of this process
    return 0;
  }
  return n;
}

std::unique_ptr<Backend> make_cuda_backend(int device) {
  if (device < 0 || device >= cuda_device_count()) return nullptr;
  if (cudaSetDevice(device) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  cudaStream_t stream = nullptr;
  // A blocking stream: the default stream (cuda_copy_to_device/host, plain cudaMemcpy) waits for its work.
  if (cudaStreamCreate(&stream) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  return std::make_unique<CudaBackend>(device, stream);
}

void cuda_copy_to_device(void* device_dst, const void* host_src, size_t bytes) {
  if (bytes) MF_CUDA_CHECK(cudaMemcpy(device_dst, host_src, bytes, cudaMemcpyHostToDevice));
}

void cuda_copy_to_host(void* host_dst, const void* device_src, size_t bytes) {
  if (bytes) MF_CUDA_CHECK(cudaMemcpy(host_dst, device_src, bytes, cudaMemcpyDeviceToHost));
}

}  // namespace moeflux

#else  // no CUDA in this build

#include "core/status.hpp"

namespace moeflux {

bool built_with_cuda() { return false; }
int cuda_device_count() { return 0; }
std::unique_ptr<Backend> make_cuda_backend(int) { return nullptr; }
void cuda_copy_to_device(void*, const void*, size_t) { MF_CHECK_MSG(false, "moeflux was built without CUDA"); }
void cuda_copy_to_host(void*, const void*, size_t) { MF_CHECK_MSG(false, "moeflux was built without CUDA"); }

}  // namespace moeflux

#endif
