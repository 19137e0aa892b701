#include "runtime/model.hpp"

#include <algorithm>

#include "backends/backend.hpp"
#include "format/pack.hpp"
#include "models/model_family.hpp"

namespace moeflux {

Model::Model() = default;

Model::~Model() {
  // The graph refers to the store, the backend and the pack: release in reverse order of building.
  graph_.reset();
  experts_.reset();
  backend_.reset();
  pack_.reset();
}

const std::string& Model::model_type() const { return pack_->manifest().model_type; }

Result<Device> parse_device(const std::string& name) {
  if (name == "cpu") return Device::cpu;
  if (name == "cuda") return Device::cuda;
  return make_error(ErrorCode::invalid_argument, "device \"{}\" (choices: cpu, cuda)", name);
}

// The CUDA backend on options.gpu, resident.bin copied to the device and bound, the host store on pinned
// buffers under the GPU cache.
Status Model::open_cuda(const ModelOptions& options) {
  const int n_gpus = cuda_device_count();
  if (n_gpus == 0)
    return make_error(ErrorCode::unsupported, "device cuda: {}",
                      built_with_cuda() ? "no CUDA GPU is available (no driver or no device)" : "this moeflux was built without CUDA");
  backend_ = make_cuda_backend(options.gpu);
  if (!backend_) return make_error(ErrorCode::invalid_argument, "CUDA device {} does not exist ({} available)", options.gpu, n_gpus);
  const void* resident = backend_->upload_weights(pack_->resident_data(), pack_->resident_bytes());
  if (!resident) {
    uint64_t free_bytes = 0, total = 0;
    cuda_memory_info(options.gpu, &free_bytes, &total);
    return make_error(ErrorCode::out_of_memory, "the dense weights ({} MiB) do not fit in GPU {} ({} MiB free of {} MiB)",
                      pack_->resident_bytes() >> 20, options.gpu, free_bytes >> 20, total >> 20);
  }
  pack_->bind_resident(static_cast<const uint8_t*>(resident));
  ExpertStoreOptions host_options = options.experts;
  if (!host_options.allocator) host_options.allocator = make_pinned_host_allocator();
  MF_ASSIGN_OR_RETURN(auto host, ExpertStore::open(*pack_, host_options));
  const Manifest& m = pack_->manifest();
  std::vector<int> layers;
  for (const ExpertLayerFile& l : m.expert_layers) layers.push_back(l.layer);
  MF_ASSIGN_OR_RETURN(experts_, make_gpu_expert_cache(*backend_, std::move(host), m.expert_bytes, m.n_expert, layers, options.gpu_cache));
  if (options.gpu_cache.preload) MF_TRY(experts_->preload().with_context("preloading the experts onto the GPU"));
  return Status::ok();
}

Result<std::unique_ptr<Model>> Model::open(const ModelOptions& options) {
  auto model = std::unique_ptr<Model>(new Model());
  PackOpenOptions pack_options;
  pack_options.verify_resident_hash = options.verify_resident_hash;
  MF_ASSIGN_OR_RETURN(model->pack_, Pack::open(options.pack_dir, pack_options));
  const Manifest& m = model->pack_->manifest();
  MF_ASSIGN_OR_RETURN(const ModelFamily* family, find_model_family(m.model_type));
  if (options.device == Device::cuda) {
    MF_TRY(model->open_cuda(options));
  } else {
    model->backend_ = options.reference_backend ? make_reference_backend() : make_cpu_backend(options.n_threads);
    MF_ASSIGN_OR_RETURN(model->experts_, ExpertStore::open(*model->pack_, options.experts));
  }
  MF_ASSIGN_OR_RETURN(model->graph_, family->build(*model->pack_, *model->backend_, *model->experts_));
  model->graph_->profile.backend = model->backend_.get();
  model->n_vocab_ = m.hparams.value("vocab_size", int64_t(0));
  model->max_context_ = m.hparams.value("max_position_embeddings", int64_t(0));

  std::string id = m.model_type + "\n" + m.hparams.dump() + "\n";
  for (const auto& f : m.files) id += f.path + ":" + std::to_string(f.xxh3) + "\n";
  model->fingerprint_ = hash_bytes(id.data(), id.size());
  return model;
}

}  // namespace moeflux
