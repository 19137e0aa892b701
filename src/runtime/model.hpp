// A loaded model: the pack (resident weights mapped), the compute backend, the expert store and the
// family's forward graph. Immutable after open; sessions (runtime/session.hpp) hold all mutable state,
// so several sessions may share one model (one at a time per thread of compute).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "core/status.hpp"
#include "backends/cuda/cuda_experts.hpp"
#include "experts/expert_store.hpp"

namespace moeflux {

class Backend;
class ModelGraph;
class Pack;

enum class Device : uint8_t {
  cpu,   // the optimized CPU backend (or the reference one, with reference_backend)
  cuda,  // the CUDA backend: dense weights on the GPU, experts through the GPU cache
};

// "cpu" / "cuda" → Device; anything else: invalid_argument naming the choices.
Result<Device> parse_device(const std::string& name);

struct ModelOptions {
  std::string pack_dir;
  Device device = Device::cpu;
  int gpu = 0;                       // CUDA device index (device cuda)
  int n_threads = 0;                 // compute threads; 0 = all cores
  bool reference_backend = false;    // plain single-threaded reference ops (tests, debugging)
  bool verify_resident_hash = true;  // hash resident.bin at open
  ExpertStoreOptions experts;        // the host tier (its cache_bytes: host memory for experts)
  GpuExpertCacheOptions gpu_cache;   // the GPU tier (device cuda)
};

class Model {
 public:
  static Result<std::unique_ptr<Model>> open(const ModelOptions& options);
  ~Model();

  const Pack& pack() const { return *pack_; }
  Backend& backend() { return *backend_; }
  // The top tier of the expert store (the GPU cache on CUDA, whose lower_tier() is the host store).
  ExpertStore& experts() { return *experts_; }
  ModelGraph& graph() { return *graph_; }
  const std::string& model_type() const;
  int64_t n_vocab() const { return n_vocab_; }
  int64_t max_context() const { return max_context_; }
  // Identifies the weights: XXH3 over model_type, hparams and every pack file's hash. A saved state
  // carries it, so a state is only loaded into the model that made it.
  uint64_t fingerprint() const { return fingerprint_; }

 private:
  Model();
  Status open_cuda(const ModelOptions& options);
  std::unique_ptr<Pack> pack_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<ExpertStore> experts_;
  std::unique_ptr<ModelGraph> graph_;
  int64_t n_vocab_ = 0;
  int64_t max_context_ = 0;
  uint64_t fingerprint_ = 0;
};

}  // namespace moeflux
