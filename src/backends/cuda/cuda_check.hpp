// CUDA error checks for the CUDA backend: a failed runtime call or kernel launch is a driver failure,
// which aborts with file, line and the statement (STYLE.md habit 7). Host-only; included by .cu and .cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>

namespace moeflux::cuda {

[[noreturn]] inline void cuda_failed(const char* file, int line, const char* statement, cudaError_t error) {
  std::fprintf(stderr, "%s:%d: CUDA call failed: %s: %s\n", file, line, statement, cudaGetErrorString(error));
  std::abort();
}

}  // namespace moeflux::cuda

#define MF_CUDA_CHECK(call)                                                                \
  do {                                                                                     \
    const cudaError_t mf_cuda_error_ = (call);                                             \
    if (mf_cuda_error_ != cudaSuccess) ::moeflux::cuda::cuda_failed(__FILE__, __LINE__, #call, mf_cuda_error_); \
  } while (0)

// After a kernel launch: a bad configuration shows up here, not at the next synchronization.
#define MF_CUDA_CHECK_LAUNCH() MF_CUDA_CHECK(cudaGetLastError())
