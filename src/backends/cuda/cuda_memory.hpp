// Copies between host memory and CUDA device memory (for example a CUDA backend's activations), for
// tests and tools that fill or read device buffers. Host-only declarations; without CUDA in the build
// they abort (nothing can hold device memory then).
#pragma once

#include <cstddef>

namespace moeflux {

// Synchronous copies on the default stream, ordered after the work a CUDA backend has queued.
void cuda_copy_to_device(void* device_dst, const void* host_src, size_t bytes);
void cuda_copy_to_host(void* host_dst, const void* device_src, size_t bytes);

}  // namespace moeflux
