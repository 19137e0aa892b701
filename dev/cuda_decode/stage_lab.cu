// Kernel lab (issue 6): what one dependent stage of a decode step costs on the GPU, apart from its bytes.
// A decode layer is a chain of ~12 dependent stages (norm, q/k/v, head norms and rotary, attention, o_proj,
// norm, router, top-k, gate/up, down + combine), each needing what every block of the stage before wrote.
// Here each stage does only that: every block reads the whole vector v [D] the previous stage wrote (as
// the hidden state passes from op to op), sums it, and writes its share of the next vector. The chain of
// N stages runs as
//   v1  N kernels, plain launches
//   v2  N kernels with programmatic dependent launch (sm_90; the engine's launches)
//   v3  v2 recorded once as a CUDA graph and replayed
//   v4  one persistent kernel (cooperative launch, every block resident) with a grid barrier per stage:
//       one counter and a generation, fences around them (the textbook form)
//   v5  v4 with a counter per stage, arrival by a release add and the wait by acquire loads (no fences,
//       no reset, one round trip fewer)
// at B blocks of 256 threads, and prints µs per stage (median of the repeats). v1 and v2 are also timed
// "queued": behind a kernel that holds the stream until the host has queued every launch, so the GPU's
// own cost per stage shows apart from the host's cost of launching (also printed, per launch). All
// versions compute the same bits (each stage's arithmetic is the same code in the same order); the lab
// checks that they do.
// Standalone: nvcc only. Build: with the project (CMake target stage_lab, when CUDA is on).
// Run: ./build/dev/stage_lab [stages=480] [repeats=20]
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define CHECK(call)                                                                              \
  do {                                                                                           \
    const cudaError_t e_ = (call);                                                               \
    if (e_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

namespace {

constexpr int threads = 256;
constexpr int dim = 2048;  // Qwen3-30B-A3B's hidden size

// One stage's work for block b of n: Σ src (every element, read through L2: other blocks wrote it), then
// dst[i] = src[i]·0.5 + Σ·2^-12 for the block's share of i.
__device__ __forceinline__ void stage(const float* src, float* dst, int b, int n) {
  __shared__ float partial[threads / 32];
  float s = 0.f;
  for (int i = threadIdx.x; i < dim; i += threads) s += __ldcg(src + i);
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = s;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < threads / 32; ++w) total += partial[w];
  __syncthreads();  // partial is reused by the next stage
  const int per = (dim + n - 1) / n;
  for (int i = b * per + int(threadIdx.x); i < min(dim, (b + 1) * per); i += threads) dst[i] = __ldcg(src + i) * 0.5f + total * 0x1p-12f;
}

__global__ void stage_kernel(const float* src, float* dst) { stage(src, dst, blockIdx.x, gridDim.x); }

// Dependent launch's wait and trigger exist from sm_90; older GPUs run the launches in plain order.
__global__ void stage_kernel_pdl(const float* src, float* dst) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;\n" :::);
#endif
  stage(src, dst, blockIdx.x, gridDim.x);
}

// Every block of the grid arrives before any leaves (all resident: cooperative launch). count returns
// to zero each time; gen counts the barriers passed.
__device__ __forceinline__ void grid_barrier(unsigned* count, volatile unsigned* gen) {
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned mine = *gen;
    __threadfence();
    if (atomicAdd(count, 1u) == gridDim.x - 1) {
      *count = 0u;
      __threadfence();
      atomicAdd(const_cast<unsigned*>(gen), 1u);
    } else {
      while (*gen == mine) {
      }
    }
    __threadfence();
  }
  __syncthreads();
}

// v5's barrier: counter (zero before the launch) counts this stage's arrivals.
__device__ __forceinline__ void stage_barrier(unsigned* counter) {
  __syncthreads();
  if (threadIdx.x == 0) {
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;\n" ::"l"(counter) : "memory");
    unsigned seen = 0;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(seen) : "l"(counter) : "memory");
    } while (seen < gridDim.x);
  }
  __syncthreads();
}

__global__ void persistent_flags_kernel(float* a, float* b, int n_stages, unsigned* counters) {
  for (int s = 0; s < n_stages; ++s) {
    stage(s % 2 ? b : a, s % 2 ? a : b, blockIdx.x, gridDim.x);
    stage_barrier(counters + s);
  }
}

__global__ void persistent_kernel(float* a, float* b, int n_stages, unsigned* count, unsigned* gen) {
  for (int s = 0; s < n_stages; ++s) {
    stage(s % 2 ? b : a, s % 2 ? a : b, blockIdx.x, gridDim.x);
    grid_barrier(count, gen);
  }
}

// Holds the stream until the host sets *open.
__global__ void gate_kernel(volatile int* open) {
  while (*open == 0) {
  }
}

void launch_pdl(int blocks, const float* src, float* dst, cudaStream_t stream) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(unsigned(blocks));
  config.blockDim = dim3(threads);
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  CHECK(cudaLaunchKernelEx(&config, stage_kernel_pdl, src, dst));
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const int n_stages = argc > 1 ? std::max(2, std::atoi(argv[1])) & ~1 : 480;  // even: the result lands in a
  const int repeats = argc > 2 ? std::max(1, std::atoi(argv[2])) : 20;
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs; %d stages of a %d-float vector, %d repeats\n", prop.name, prop.multiProcessorCount, n_stages, dim,
              repeats);
  std::vector<float> init(dim);
  for (int i = 0; i < dim; ++i) init[size_t(i)] = float((i * 37) % 101) / 101.f - 0.5f;
  float *a = nullptr, *b = nullptr;
  unsigned* sync = nullptr;
  CHECK(cudaMalloc(&a, dim * sizeof(float)));
  CHECK(cudaMalloc(&b, dim * sizeof(float)));
  CHECK(cudaMalloc(&sync, 2 * sizeof(unsigned)));
  unsigned* counters = nullptr;  // v5: one per stage
  CHECK(cudaMalloc(&counters, size_t(n_stages) * sizeof(unsigned)));
  CHECK(cudaMemset(sync, 0, 2 * sizeof(unsigned)));
  cudaStream_t stream;
  CHECK(cudaStreamCreate(&stream));
  cudaEvent_t t0, t1;
  CHECK(cudaEventCreate(&t0));
  CHECK(cudaEventCreate(&t1));
  int per_sm = 0, per_sm_flags = 0;
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, persistent_kernel, threads, 0));
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm_flags, persistent_flags_kernel, threads, 0));
  per_sm = std::min(per_sm, per_sm_flags);

  int* open = nullptr;
  CHECK(cudaHostAlloc(reinterpret_cast<void**>(&open), sizeof(int), cudaHostAllocMapped));
  int* open_device = nullptr;
  CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&open_device), open, 0));
  std::printf("\n| blocks | plain launches | dependent launch | the same queued first: plain / dependent | host µs per launch: plain / dependent | graph replay | persistent, grid barrier | persistent, per-stage release/acquire |\n|---|---|---|---|---|---|---|---|\n");
  for (int blocks : {32, prop.multiProcessorCount, 2 * prop.multiProcessorCount}) {
    double us[5] = {}, queued[2] = {}, host_us[2] = {};
    std::vector<float> result[5];
    for (int version = 0; version < 5; ++version) {
      if (version >= 3 && blocks > per_sm * prop.multiProcessorCount) continue;
      cudaGraphExec_t exec = nullptr;
      if (version == 2) {
        cudaGraph_t graph;
        CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed));
        for (int s = 0; s < n_stages; ++s) launch_pdl(blocks, s % 2 ? b : a, s % 2 ? a : b, stream);
        CHECK(cudaStreamEndCapture(stream, &graph));
        CHECK(cudaGraphInstantiate(&exec, graph, 0));
        CHECK(cudaGraphDestroy(graph));
      }
      std::vector<double> times;
      for (int r = 0; r < repeats + 1; ++r) {  // the first run warms up
        CHECK(cudaMemcpyAsync(a, init.data(), dim * sizeof(float), cudaMemcpyHostToDevice, stream));
        if (version == 4) CHECK(cudaMemsetAsync(counters, 0, size_t(n_stages) * sizeof(unsigned), stream));
        CHECK(cudaEventRecord(t0, stream));
        if (version == 0) {
          for (int s = 0; s < n_stages; ++s) stage_kernel<<<blocks, threads, 0, stream>>>(s % 2 ? b : a, s % 2 ? a : b);
        } else if (version == 1) {
          for (int s = 0; s < n_stages; ++s) launch_pdl(blocks, s % 2 ? b : a, s % 2 ? a : b, stream);
        } else if (version == 2) {
          CHECK(cudaGraphLaunch(exec, stream));
        } else if (version == 3) {
          int n = n_stages;
          unsigned *count = sync, *gen = sync + 1;
          void* args[] = {&a, &b, &n, &count, &gen};
          CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(persistent_kernel), dim3(unsigned(blocks)), dim3(threads), args, 0, stream));
        } else {
          int n = n_stages;
          void* args[] = {&a, &b, &n, &counters};
          CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(persistent_flags_kernel), dim3(unsigned(blocks)), dim3(threads), args, 0,
                                            stream));
        }
        CHECK(cudaGetLastError());
        CHECK(cudaEventRecord(t1, stream));
        CHECK(cudaEventSynchronize(t1));
        float ms = 0.f;
        CHECK(cudaEventElapsedTime(&ms, t0, t1));
        if (r > 0) times.push_back(1e3 * double(ms) / n_stages);
      }
      if (exec) CHECK(cudaGraphExecDestroy(exec));
      us[version] = median(times);
      if (version < 2) {  // queued behind the gate: the GPU's time alone, and the host's per launch
        std::vector<double> gpu, host;
        for (int r = 0; r < repeats + 1; ++r) {
          CHECK(cudaMemcpyAsync(a, init.data(), dim * sizeof(float), cudaMemcpyHostToDevice, stream));
          *reinterpret_cast<volatile int*>(open) = 0;
          gate_kernel<<<1, 32, 0, stream>>>(open_device);
          CHECK(cudaEventRecord(t0, stream));
          const auto h0 = std::chrono::steady_clock::now();
          for (int s = 0; s < n_stages; ++s) {
            if (version == 0)
              stage_kernel<<<blocks, threads, 0, stream>>>(s % 2 ? b : a, s % 2 ? a : b);
            else
              launch_pdl(blocks, s % 2 ? b : a, s % 2 ? a : b, stream);
          }
          const auto h1 = std::chrono::steady_clock::now();
          CHECK(cudaEventRecord(t1, stream));
          *reinterpret_cast<volatile int*>(open) = 1;
          CHECK(cudaEventSynchronize(t1));
          float ms = 0.f;
          CHECK(cudaEventElapsedTime(&ms, t0, t1));
          if (r > 0) {
            gpu.push_back(1e3 * double(ms) / n_stages);
            host.push_back(std::chrono::duration<double, std::micro>(h1 - h0).count() / n_stages);
          }
        }
        queued[version] = median(gpu);
        host_us[version] = median(host);
      }
      result[version].resize(dim);
      CHECK(cudaMemcpy(result[version].data(), a, dim * sizeof(float), cudaMemcpyDeviceToHost));
    }
    bool same = true;
    for (int version = 1; version < 5; ++version)
      if (!result[version].empty() && std::memcmp(result[version].data(), result[0].data(), dim * sizeof(float)) != 0) same = false;
    std::printf("| %d | %.2f µs | %.2f µs | %.2f / %.2f µs | %.2f / %.2f | %.2f µs | ", blocks, us[0], us[1], queued[0], queued[1], host_us[0],
                host_us[1], us[2]);
    for (int version = 3; version < 5; ++version) {
      if (result[version].empty())
        std::printf("(not all resident) |");
      else
        std::printf(" %.2f µs |", us[version]);
    }
    std::printf("%s\n", same ? "" : "  RESULTS DIFFER");
    if (!same) return 1;
  }
  return 0;
}
