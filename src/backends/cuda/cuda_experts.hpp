// The GPU tier of the expert store and the pinned host memory under it. Host-only declarations, no
// CUDA types: without CUDA in the build the factories fail with a clear error.
//
// Tiers (DESIGN.md §expert cache): storage → host store (reader threads, pinned blob buffers, its own
// byte budget) → GPU cache (fixed device slots of one expert each, a byte budget, LRU) → kernels. A GPU
// miss acquires the expert from the host store (which reads it from storage if it must), copies it into
// a free or evicted slot on a copy stream of its own, and makes the compute stream wait for the copy:
// every acquired expert is on the device before any kernel reads it, so results never depend on what
// was cached.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/status.hpp"
#include "experts/expert_store.hpp"

namespace moeflux {

class Backend;

struct GpuExpertCacheOptions {
  // Device bytes for expert slots. 0: derived from free memory — slots are added (in chunks) while the
  // device keeps at least `headroom_bytes` free after the chunk, so sessions made later still get their
  // KV caches and scratch.
  uint64_t budget_bytes = 0;
  uint64_t headroom_bytes = uint64_t(2) << 30;
  // At open, bring every expert onto the device (ExpertStore::preload): decode then never waits for one
  // (and may run as CUDA graphs, SessionOptions::graphs). An error at open when they do not fit.
  bool preload = false;
};

// The GPU tier over `host` (which it owns and reports as lower_tier()), for experts of expert_bytes in
// `layers` (n_expert each); it keeps the device table of ExpertStore::expert_table.
// `backend` must be a CUDA backend: its device and compute stream are used. Errors: not a CUDA backend,
// a budget below one expert, an unknown policy (the host store's options().policy is used).
Result<std::unique_ptr<ExpertStore>> make_gpu_expert_cache(Backend& backend, std::unique_ptr<ExpertStore> host,
                                                           uint64_t expert_bytes, int64_t n_expert, const std::vector<int>& layers,
                                                           const GpuExpertCacheOptions& options);

// Pinned (page-locked) host memory for the host store's blob buffers, on the current device's context:
// blocks of one size are carved from 256 MiB slabs and kept on a free list (pinning is slow; the store
// asks for buffers of one size). Null without CUDA.
std::shared_ptr<HostAllocator> make_pinned_host_allocator();

// Free and total memory of a CUDA device; false without CUDA or without that device.
bool cuda_memory_info(int device, uint64_t* free_bytes, uint64_t* total_bytes);

// Measured rates of a CUDA device's links, bytes per second (medians of several timed copies):
// device_copy counts the bytes read plus written by a 512 MiB device-to-device copy (the rate a kernel
// that streams its operands can approach); host_to_device copies 256 MiB from pinned host memory.
struct CudaLinkRates {
  double device_copy = 0;
  double host_to_device = 0;
};
// Needs ~1.3 GiB of free device memory and 256 MiB of pinned host memory; false when it cannot run.
bool measure_cuda_link_rates(int device, CudaLinkRates* rates);

}  // namespace moeflux
