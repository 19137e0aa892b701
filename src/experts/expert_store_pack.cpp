// ExpertStore::open for a Pack: turns the manifest's expert layout into an ExpertSource.
// Kept apart from expert_store.cpp so the store and its tests do not need the pack reader to link.
#include "experts/expert_store.hpp"
#include "format/pack.hpp"

namespace moeflux {

Result<std::unique_ptr<ExpertStore>> ExpertStore::open(const Pack& pack, const ExpertStoreOptions& options) {
  const Manifest& manifest = pack.manifest();
  ExpertSource source;
  source.n_expert = manifest.n_expert;
  source.expert_bytes = manifest.expert_bytes;
  source.expert_stride = manifest.expert_stride;
  source.layers.reserve(manifest.expert_layers.size());
  for (const ExpertLayerFile& layer : manifest.expert_layers)
    source.layers.push_back({layer.layer, pack.expert_file_path(layer.layer), layer.hashes});
  auto store = open(source, options);
  if (!store.is_ok()) return store.status().with_context("pack " + pack.dir());
  return store;
}

}  // namespace moeflux
