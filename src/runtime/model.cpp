#include "runtime/model.hpp"

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

Result<std::unique_ptr<Model>> Model::open(const ModelOptions& options) {
  auto model = std::unique_ptr<Model>(new Model());
  PackOpenOptions pack_options;
  pack_options.verify_resident_hash = options.verify_resident_hash;
  MF_ASSIGN_OR_RETURN(model->pack_, Pack::open(options.pack_dir, pack_options));
  const Manifest& m = model->pack_->manifest();
  MF_ASSIGN_OR_RETURN(const ModelFamily* family, find_model_family(m.model_type));
  model->backend_ = options.reference_backend ? make_reference_backend() : make_cpu_backend(options.n_threads);
  MF_ASSIGN_OR_RETURN(model->experts_, ExpertStore::open(*model->pack_, options.experts));
  MF_ASSIGN_OR_RETURN(model->graph_, family->build(*model->pack_, *model->backend_, *model->experts_));
  model->n_vocab_ = m.hparams.value("vocab_size", int64_t(0));
  model->max_context_ = m.hparams.value("max_position_embeddings", int64_t(0));

  std::string id = m.model_type + "\n" + m.hparams.dump() + "\n";
  for (const auto& f : m.files) id += f.path + ":" + std::to_string(f.xxh3) + "\n";
  model->fingerprint_ = hash_bytes(id.data(), id.size());
  return model;
}

}  // namespace moeflux
