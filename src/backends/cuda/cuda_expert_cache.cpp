// The GPU expert tier (cuda_experts.hpp): device slots of one expert each under a CachePolicy, fed from
// the host store through pinned blob buffers and a copy stream of its own. Compiled always; without
// CUDA in the build (no MOEFLUX_HAVE_CUDA) only the factories' errors remain.
#include "backends/cuda/cuda_experts.hpp"

#ifdef MOEFLUX_HAVE_CUDA

#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "backends/backend.hpp"
#include "backends/cuda/cuda_check.hpp"
#include "core/timer.hpp"

namespace moeflux {

namespace cuda {
bool stream_of(Backend& backend, int* device, cudaStream_t* stream);  // cuda_backend.cpp
}

namespace {

// Slots are allocated in chunks as the cache fills: a model whose experts fit takes only what it uses.
constexpr uint64_t chunk_target_bytes = uint64_t(512) << 20;
constexpr uint64_t slot_alignment = 256;

class GpuExpertCache final : public ExpertStore {
 public:
  GpuExpertCache(int device, cudaStream_t compute, std::unique_ptr<ExpertStore> host, uint64_t expert_bytes, int64_t n_expert,
                 std::vector<int> layers, const GpuExpertCacheOptions& options, std::unique_ptr<CachePolicy> policy)
      : device_(device), compute_(compute), host_(std::move(host)), expert_bytes_(expert_bytes), n_expert_(n_expert),
        layers_(std::move(layers)), n_layers_(layers_.empty() ? 0 : *std::max_element(layers_.begin(), layers_.end()) + 1),
        slot_bytes_(std::max<uint64_t>(1, (expert_bytes + slot_alignment - 1) / slot_alignment) * slot_alignment), options_(options), policy_(std::move(policy)) {
    max_slots_ = options_.budget_bytes ? options_.budget_bytes / slot_bytes_ : UINT64_MAX;
    bind();
    MF_CUDA_CHECK(cudaStreamCreateWithFlags(&copy_, cudaStreamNonBlocking));
    MF_CUDA_CHECK(cudaEventCreateWithFlags(&compute_done_, cudaEventDisableTiming));
    MF_CUDA_CHECK(cudaEventCreateWithFlags(&copied_, cudaEventDisableTiming));
    const size_t entries = size_t(n_layers_) * size_t(n_expert_);
    MF_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&table_), std::max<size_t>(entries, 1) * sizeof(void*)));
    MF_CUDA_CHECK(cudaMemset(table_, 0, std::max<size_t>(entries, 1) * sizeof(void*)));
    MF_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&mirror_), std::max<size_t>(entries, 1) * sizeof(void*), cudaHostAllocDefault));
    std::fill(mirror_, mirror_ + entries, nullptr);
    held_.assign(size_t(n_layers_), 0);
  }

  ~GpuExpertCache() override {
    bind();
    cudaStreamSynchronize(compute_);
    cudaStreamSynchronize(copy_);
    for (const Slot& s : slots_)
      MF_CHECK_MSG(s.pins == 0, "GPU expert cache destroyed while layer {} expert {} is acquired", int(s.key >> 32), int(s.key & 0xffffffffu));
    for (void* c : chunks_) cudaFree(c);
    cudaFree(table_);
    cudaFreeHost(mirror_);
    cudaEventDestroy(compute_done_);
    cudaEventDestroy(copied_);
    cudaStreamDestroy(copy_);
  }

  Status acquire(int layer, const int32_t* experts, int n, const void** blobs) override {
    std::lock_guard lock(mutex_);
    if (n < 0 || n > max_acquire())
      return make_error(ErrorCode::invalid_argument, "GPU expert cache: {} experts in one acquire (at most {})", n, max_acquire());
    const Timer timer;
    misses_.clear();
    for (int i = 0; i < n; ++i) {
      const uint64_t key = expert_key(layer, experts[i]);
      const auto it = index_.find(key);
      if (it != index_.end()) {
        Slot& slot = slots_[it->second];
        ++slot.pins;
        // A repeat within this call of an expert it is bringing in is neither a hit nor a new miss.
        if (!pending(it->second)) {
          policy_->on_hit(key);
          ++stats_.hits;
        }
        blobs[i] = slot.data;
        continue;
      }
      size_t s = 0;
      if (!take_slot(&s)) {
        // The slots this call claimed were never filled: out of the cache, then this call's pins back.
        for (const Miss& m : misses_) drop(m.slot);
        misses_.clear();
        unpin(layer, experts, i);
        flush_table();
        return make_error(ErrorCode::out_of_memory,
                          "GPU expert cache: no free slot for layer {} expert {} ({} slots of {} bytes, all in use)", layer,
                          experts[i], slots_.size(), slot_bytes_);
      }
      Slot& slot = slots_[s];
      slot.key = key;
      slot.pins = 1;
      slot.valid = true;
      index_[key] = s;
      set_entry(key, slot.data);
      policy_->on_insert(key);
      ++stats_.misses;
      ++stats_.cached_experts;
      stats_.cached_bytes += slot_bytes_;
      misses_.push_back({i, s});
      blobs[i] = slot.data;
    }
    if (!misses_.empty()) {
      const Status s = fill(layer, experts);
      if (!s.is_ok()) {
        // The slots this call claimed hold nothing: out of the cache, then every pin of this call back.
        for (const Miss& m : misses_) drop(m.slot);
        unpin(layer, experts, n);
        misses_.clear();
        flush_table();
        stats_.wait_seconds += timer.seconds();
        return s;
      }
      misses_.clear();
    }
    flush_table();
    stats_.wait_seconds += timer.seconds();
    return Status::ok();
  }

  void release(int layer, const int32_t* experts, int n) override {
    std::lock_guard lock(mutex_);
    unpin(layer, experts, n);
  }

  void prefetch(int layer, const int32_t* experts, int n) override {
    // Into host memory only: a device slot is taken when the expert is acquired.
    std::vector<int32_t> absent;
    {
      std::lock_guard lock(mutex_);
      for (int i = 0; i < n; ++i)
        if (!index_.count(expert_key(layer, experts[i]))) absent.push_back(experts[i]);
    }
    if (!absent.empty()) host_->prefetch(layer, absent.data(), int(absent.size()));
  }

  int max_acquire() const override {
    const uint64_t slots = std::min<uint64_t>(max_slots_.load(), uint64_t(host_->max_acquire()));
    return int(std::max<uint64_t>(slots, 1));
  }

  ExpertStoreStats stats() const override {
    std::lock_guard lock(mutex_);
    ExpertStoreStats s = stats_;
    s.buffer_bytes = uint64_t(chunks_bytes_);
    return s;
  }

  void reset_stats() override {
    std::lock_guard lock(mutex_);
    const uint64_t cached = stats_.cached_experts, bytes = stats_.cached_bytes;
    stats_ = {};
    stats_.cached_experts = cached;
    stats_.cached_bytes = bytes;
  }

  const void* const* expert_table(int layer) override {
    return layer >= 0 && layer < n_layers_ ? table_ + size_t(layer) * size_t(n_expert_) : nullptr;
  }

  bool holds_layer(int layer) override {
    std::lock_guard lock(mutex_);
    return layer >= 0 && layer < n_layers_ && held_[size_t(layer)] == n_expert_;
  }

  bool holds_everything() override {
    std::lock_guard lock(mutex_);
    for (int layer : layers_)
      if (held_[size_t(layer)] != n_expert_) return false;
    return true;
  }

  Status preload() override {
    // Room for every expert first: within the budget, and (auto budget) while the device keeps its headroom.
    const uint64_t needed = uint64_t(layers_.size()) * uint64_t(n_expert_);
    {
      std::lock_guard lock(mutex_);
      while (uint64_t(slots_.size()) < needed && grow(needed)) {
      }
      if (uint64_t(slots_.size()) < needed)
        return make_error(ErrorCode::out_of_memory, "GPU expert cache: {} experts of {} bytes do not fit ({} slots: budget {})", needed,
                          slot_bytes_, slots_.size(),
                          options_.budget_bytes ? fmt::format("{} bytes", options_.budget_bytes) : std::string("free memory"));
    }
    std::vector<int32_t> ids;
    std::vector<const void*> blobs;
    const int group = max_acquire();
    for (int layer : layers_)
      for (int64_t e0 = 0; e0 < n_expert_; e0 += group) {
        const int n = int(std::min<int64_t>(group, n_expert_ - e0));
        ids.resize(size_t(n));
        blobs.resize(size_t(n));
        for (int i = 0; i < n; ++i) ids[size_t(i)] = int32_t(e0 + i);
        MF_TRY(acquire(layer, ids.data(), n, blobs.data()));
        release(layer, ids.data(), n);
      }
    return Status::ok();
  }

  void record_held_uses(int layer, int n) override {
    std::lock_guard lock(mutex_);
    stats_.hits += uint64_t(n);
  }

  const ExpertStoreOptions& options() const override { return host_->options(); }
  const char* tier_name() const override { return "gpu"; }
  ExpertStore* lower_tier() override { return host_.get(); }

 private:
  struct Slot {
    void* data = nullptr;  // [slot_bytes_] device memory
    uint64_t key = 0;
    int pins = 0;
    bool valid = false;    // holds `key` (or is being filled with it)
  };
  struct Miss {
    int index;    // in the acquire's experts
    size_t slot;
  };

  void bind() { MF_CUDA_CHECK(cudaSetDevice(device_)); }

  bool pending(size_t slot) const {
    for (const Miss& m : misses_)
      if (m.slot == slot) return true;
    return false;
  }

  // The device table's entry for `key` becomes `blob` (in the host mirror; flush_table sends the rows).
  // The first change of an acquire waits for the compute stream, so no queued copy of the mirror and no
  // kernel reading the table or an evicted slot is still pending when the mirror changes.
  void set_entry(uint64_t key, void* blob) {
    const int layer = int(key >> 32);
    const int64_t expert = int64_t(key & 0xffffffffu);
    if (layer >= n_layers_ || expert >= n_expert_) return;
    if (!table_dirty_) {
      bind();
      MF_CUDA_CHECK(cudaStreamSynchronize(compute_));
      table_dirty_ = true;
    }
    void*& entry = mirror_[size_t(layer) * size_t(n_expert_) + size_t(expert)];
    if ((entry != nullptr) != (blob != nullptr)) held_[size_t(layer)] += blob ? 1 : -1;
    entry = blob;
    dirty_layers_.push_back(layer);
  }

  // Sends the changed rows of the table, in stream order before the kernels that read them.
  void flush_table() {
    if (!table_dirty_) return;
    std::sort(dirty_layers_.begin(), dirty_layers_.end());
    dirty_layers_.erase(std::unique(dirty_layers_.begin(), dirty_layers_.end()), dirty_layers_.end());
    bind();
    for (int layer : dirty_layers_) {
      const size_t at = size_t(layer) * size_t(n_expert_);
      MF_CUDA_CHECK(cudaMemcpyAsync(table_ + at, mirror_ + at, size_t(n_expert_) * sizeof(void*), cudaMemcpyHostToDevice, compute_));
    }
    dirty_layers_.clear();
    table_dirty_ = false;
  }

  // A slot for a new expert: a never-used one, a new chunk's, or the policy's victim among those unpinned.
  bool take_slot(size_t* out) {
    if (!free_.empty()) {
      *out = free_.back();
      free_.pop_back();
      return true;
    }
    if (grow()) return take_slot(out);
    uint64_t key = 0;
    if (!policy_->choose_victim([this](uint64_t k) { return slots_[index_.at(k)].pins == 0; }, &key)) return false;
    const size_t s = index_.at(key);
    ++stats_.evictions;
    drop(s);
    free_.pop_back();  // drop() put it there
    *out = s;
    return true;
  }

  // Forgets the slot's expert and returns the slot to the free list.
  void drop(size_t s) {
    Slot& slot = slots_[s];
    if (!slot.valid) return;
    policy_->on_erase(slot.key);
    index_.erase(slot.key);
    set_entry(slot.key, nullptr);
    slot.valid = false;
    slot.pins = 0;
    --stats_.cached_experts;
    stats_.cached_bytes -= slot_bytes_;
    free_.push_back(s);
  }

  // Adds a chunk of slots within the budget (or, without one, while the device keeps its headroom), and
  // none past `limit` slots in all (preload: exactly the experts, not the rest of a last chunk).
  bool grow(uint64_t limit = UINT64_MAX) {
    const uint64_t cap = std::min<uint64_t>(max_slots_, limit);
    if (uint64_t(slots_.size()) >= cap) return false;
    uint64_t n = std::max<uint64_t>(1, chunk_target_bytes / slot_bytes_);
    n = std::min<uint64_t>(n, cap - uint64_t(slots_.size()));
    if (options_.budget_bytes == 0) {
      size_t free_bytes = 0, total = 0;
      MF_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total));
      const uint64_t room = free_bytes > options_.headroom_bytes ? free_bytes - options_.headroom_bytes : 0;
      n = std::min<uint64_t>(n, room / slot_bytes_);
      if (n == 0) {
        max_slots_ = slots_.size();  // the device is as full as it should get: from now on, evict
        return false;
      }
    }
    void* chunk = nullptr;
    bind();
    if (cudaMalloc(&chunk, n * slot_bytes_) != cudaSuccess) {
      cudaGetLastError();
      max_slots_ = slots_.size();
      return false;
    }
    chunks_.push_back(chunk);
    chunks_bytes_ += n * slot_bytes_;
    for (uint64_t i = 0; i < n; ++i) {
      slots_.push_back({static_cast<char*>(chunk) + i * slot_bytes_, 0, 0, false});
      free_.push_back(slots_.size() - 1);
    }
    std::reverse(free_.end() - ptrdiff_t(n), free_.end());  // lowest address first
    return true;
  }

  // Brings this acquire's misses from the host tier into their slots, in one batch: the host store reads
  // whatever it lacks in parallel, the copies queue on the copy stream after every kernel queued before
  // (a slot may still be read by one), and the compute stream waits for them.
  Status fill(int layer, const int32_t* experts) {
    miss_ids_.clear();
    for (const Miss& m : misses_) miss_ids_.push_back(experts[m.index]);
    host_blobs_.assign(miss_ids_.size(), nullptr);
    MF_TRY(host_->acquire(layer, miss_ids_.data(), int(miss_ids_.size()), host_blobs_.data()));
    bind();
    MF_CUDA_CHECK(cudaEventRecord(compute_done_, compute_));
    MF_CUDA_CHECK(cudaStreamWaitEvent(copy_, compute_done_, 0));
    for (size_t i = 0; i < misses_.size(); ++i)
      MF_CUDA_CHECK(cudaMemcpyAsync(slots_[misses_[i].slot].data, host_blobs_[i], expert_bytes_, cudaMemcpyHostToDevice, copy_));
    MF_CUDA_CHECK(cudaEventRecord(copied_, copy_));
    MF_CUDA_CHECK(cudaStreamWaitEvent(compute_, copied_, 0));
    // The host buffers go back once the copies have read them.
    MF_CUDA_CHECK(cudaEventSynchronize(copied_));
    host_->release(layer, miss_ids_.data(), int(miss_ids_.size()));
    stats_.reads += misses_.size();
    stats_.bytes_read += misses_.size() * expert_bytes_;
    return Status::ok();
  }

  void unpin(int layer, const int32_t* experts, int n) {
    for (int i = 0; i < n; ++i) {
      const auto it = index_.find(expert_key(layer, experts[i]));
      if (it != index_.end() && slots_[it->second].pins > 0) --slots_[it->second].pins;
    }
  }

  const int device_;
  const cudaStream_t compute_;
  const std::unique_ptr<ExpertStore> host_;
  const uint64_t expert_bytes_;
  const int64_t n_expert_;
  const std::vector<int> layers_;  // the layers with experts
  const int n_layers_;             // highest expert layer + 1
  const uint64_t slot_bytes_;
  const GpuExpertCacheOptions options_;
  const std::unique_ptr<CachePolicy> policy_;
  std::atomic<uint64_t> max_slots_{0};  // lowered when the device runs out (read by max_acquire unlocked)
  cudaStream_t copy_ = nullptr;
  cudaEvent_t compute_done_ = nullptr, copied_ = nullptr;

  mutable std::mutex mutex_;
  std::vector<void*> chunks_;
  uint64_t chunks_bytes_ = 0;
  std::vector<Slot> slots_;
  std::vector<size_t> free_;                     // slots holding nothing
  std::unordered_map<uint64_t, size_t> index_;   // expert_key → slot
  ExpertStoreStats stats_;
  std::vector<Miss> misses_;                     // of the acquire in progress
  std::vector<int32_t> miss_ids_;
  std::vector<const void*> host_blobs_;
  void** table_ = nullptr;        // [n_layers, n_expert] device: each expert's slot or null
  void** mirror_ = nullptr;       // the same, pinned host: what the table is being set to
  std::vector<int64_t> held_;     // [n_layers] experts of the layer in the table
  std::vector<int> dirty_layers_;  // rows of the mirror not yet sent
  bool table_dirty_ = false;
};

// Fixed-size pinned blocks carved from slabs; other sizes go straight to cudaHostAlloc.
class PinnedAllocator final : public HostAllocator {
 public:
  ~PinnedAllocator() override {
    for (void* s : slabs_) cudaFreeHost(s);
    for (void* s : singles_) cudaFreeHost(s);
  }

  void* allocate(size_t bytes) override {
    std::lock_guard lock(mutex_);
    if (block_ == 0) block_ = (bytes + 4095) / 4096 * 4096;
    if (bytes > block_) return pin(bytes, &singles_);
    if (!free_.empty()) {
      void* p = free_.back();
      free_.pop_back();
      return p;
    }
    const size_t per_slab = std::max<size_t>(1, slab_bytes / block_);
    char* slab = static_cast<char*>(pin(per_slab * block_, &slabs_));
    if (!slab) return nullptr;
    for (size_t i = per_slab; i-- > 1;) free_.push_back(slab + i * block_);
    return slab;
  }

  void deallocate(void* p) override {
    std::lock_guard lock(mutex_);
    const auto it = std::find(singles_.begin(), singles_.end(), p);
    if (it != singles_.end()) {
      cudaFreeHost(p);
      singles_.erase(it);
      return;
    }
    free_.push_back(p);
  }

 private:
  static constexpr size_t slab_bytes = size_t(256) << 20;

  static void* pin(size_t bytes, std::vector<void*>* owner) {
    void* p = nullptr;
    if (cudaHostAlloc(&p, bytes, cudaHostAllocPortable) != cudaSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    owner->push_back(p);
    return p;
  }

  std::mutex mutex_;
  size_t block_ = 0;
  std::vector<void*> slabs_, singles_, free_;
};

}  // namespace

Result<std::unique_ptr<ExpertStore>> make_gpu_expert_cache(Backend& backend, std::unique_ptr<ExpertStore> host, uint64_t expert_bytes,
                                                           int64_t n_expert, const std::vector<int>& layers,
                                                           const GpuExpertCacheOptions& options) {
  int device = 0;
  cudaStream_t stream = nullptr;
  if (!cuda::stream_of(backend, &device, &stream))
    return make_error(ErrorCode::invalid_argument, "the GPU expert cache needs the CUDA backend, not {}", backend.name());
  const uint64_t slot = (expert_bytes + slot_alignment - 1) / slot_alignment * slot_alignment;
  if (options.budget_bytes != 0 && options.budget_bytes < slot)
    return make_error(ErrorCode::invalid_argument, "GPU expert cache of {} bytes holds no expert ({} bytes each)", options.budget_bytes, slot);
  MF_ASSIGN_OR_RETURN(auto policy, make_cache_policy(host->options().policy));
  return std::unique_ptr<ExpertStore>(
      new GpuExpertCache(device, stream, std::move(host), expert_bytes, n_expert, layers, options, std::move(policy)));
}

std::shared_ptr<HostAllocator> make_pinned_host_allocator() { return std::make_shared<PinnedAllocator>(); }

bool cuda_memory_info(int device, uint64_t* free_bytes, uint64_t* total_bytes) {
  int current = 0;
  if (cudaGetDevice(&current) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  size_t f = 0, t = 0;
  const bool ok = cudaMemGetInfo(&f, &t) == cudaSuccess;
  if (!ok) cudaGetLastError();
  cudaSetDevice(current);
  *free_bytes = f;
  *total_bytes = t;
  return ok;
}

bool measure_cuda_link_rates(int device, CudaLinkRates* rates) {
  constexpr size_t copy_bytes = size_t(512) << 20, h2d_bytes = size_t(256) << 20;
  constexpr int repeats = 7;
  int current = 0;
  if (cudaGetDevice(&current) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  void *a = nullptr, *b = nullptr, *host = nullptr;
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  bool ok = cudaMalloc(&a, copy_bytes) == cudaSuccess && cudaMalloc(&b, copy_bytes) == cudaSuccess &&
            cudaHostAlloc(&host, h2d_bytes, cudaHostAllocDefault) == cudaSuccess && cudaStreamCreate(&stream) == cudaSuccess &&
            cudaEventCreate(&start) == cudaSuccess && cudaEventCreate(&stop) == cudaSuccess;
  auto median_seconds = [&](auto&& copy) {
    std::vector<float> ms;
    copy();  // warm-up
    for (int i = 0; i < repeats && ok; ++i) {
      float t = 0;
      ok = cudaEventRecord(start, stream) == cudaSuccess && (copy(), true) && cudaEventRecord(stop, stream) == cudaSuccess &&
           cudaEventSynchronize(stop) == cudaSuccess && cudaEventElapsedTime(&t, start, stop) == cudaSuccess;
      ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    return ms.empty() ? 0.0 : double(ms[ms.size() / 2]) * 1e-3;
  };
  if (ok) {
    std::memset(host, 1, h2d_bytes);
    const double d2d = median_seconds([&] { cudaMemcpyAsync(b, a, copy_bytes, cudaMemcpyDeviceToDevice, stream); });
    const double h2d = median_seconds([&] { cudaMemcpyAsync(a, host, h2d_bytes, cudaMemcpyHostToDevice, stream); });
    ok = ok && d2d > 0 && h2d > 0;
    if (ok) {
      rates->device_copy = 2.0 * double(copy_bytes) / d2d;
      rates->host_to_device = double(h2d_bytes) / h2d;
    }
  }
  if (!ok) cudaGetLastError();
  if (start) cudaEventDestroy(start);
  if (stop) cudaEventDestroy(stop);
  if (stream) cudaStreamDestroy(stream);
  if (host) cudaFreeHost(host);
  if (a) cudaFree(a);
  if (b) cudaFree(b);
  cudaSetDevice(current);
  return ok;
}

}  // namespace moeflux

#else  // no CUDA in this build

namespace moeflux {

Result<std::unique_ptr<ExpertStore>> make_gpu_expert_cache(Backend&, std::unique_ptr<ExpertStore>, uint64_t, int64_t, const std::vector<int>&,
                                                           const GpuExpertCacheOptions&) {
  return make_error(ErrorCode::unsupported, "moeflux was built without CUDA: no GPU expert cache");
}
std::shared_ptr<HostAllocator> make_pinned_host_allocator() { return nullptr; }
bool cuda_memory_info(int, uint64_t*, uint64_t*) { return false; }
bool measure_cuda_link_rates(int, CudaLinkRates*) { return false; }

}  // namespace moeflux

#endif
