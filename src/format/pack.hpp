// The pack: moeflux's on-disk model layout (docs/FORMAT.md is the specification).
//   manifest.json            format version, model_type, hparams, tensor table, expert layout, hashes
//   resident.bin             every non-expert tensor, each part 4 KiB aligned; memory-mapped at open
//   experts/layer_NNN.bin    expert e of that layer at e × expert_stride (stride a multiple of 4096)
//   tokenizer/…              the checkpoint's tokenizer files, copied
// Owns: the manifest model, PackWriter (used by convert and the synthetic-pack generator) and Pack
// (the reader). Does not own expert I/O (experts/) or the meaning of hparams (models/).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/mapped_file.hpp"
#include "core/status.hpp"
#include "quant/weight_format.hpp"

namespace moeflux {

inline constexpr int pack_format_version = 1;
inline constexpr uint64_t pack_alignment = 4096;

struct TensorPart {
  uint64_t offset = 0;  // bytes from the start of the file (resident) or of the expert blob (experts)
  uint64_t bytes = 0;
};

// A resident tensor. Matrices are [rows, cols]; norms are 1-D f32.
struct PackTensor {
  std::string name;
  WeightFormat format = WeightFormat::f32;
  std::vector<int64_t> shape;
  TensorPart data, scales, biases;
};

// One matrix inside every expert blob of every expert layer (all expert layers share one layout).
struct ExpertMatrix {
  std::string part;  // gate_proj, up_proj, down_proj
  WeightFormat format = WeightFormat::bf16;
  int64_t rows = 0;
  int64_t cols = 0;
  TensorPart data, scales, biases;  // offsets within the blob
};

struct ExpertLayerFile {
  int layer = 0;
  std::string file;              // relative to the pack directory
  std::vector<uint64_t> hashes;  // XXH3-64 of each expert's blob (expert_bytes long), by expert id
};

struct PackFileEntry {
  std::string path;  // relative to the pack directory
  uint64_t bytes = 0;
  uint64_t xxh3 = 0;  // XXH3-64 of the whole file
};

struct Manifest {
  int format_version = pack_format_version;
  std::string model_type;
  nlohmann::json hparams;        // normalized by the family (models/)
  nlohmann::json source_config;  // the checkpoint's config.json, verbatim
  WeightFormat dense_format = WeightFormat::bf16;
  WeightFormat expert_format = WeightFormat::bf16;
  std::vector<PackTensor> tensors;
  int64_t n_expert = 0;
  uint64_t expert_bytes = 0;   // meaningful bytes of one expert blob
  uint64_t expert_stride = 0;  // distance between blobs; multiple of pack_alignment
  std::vector<ExpertMatrix> expert_matrices;
  std::vector<ExpertLayerFile> expert_layers;
  std::vector<PackFileEntry> files;
  std::vector<std::string> tokenizer_files;  // relative paths under tokenizer/

  nlohmann::json to_json() const;
  static Result<Manifest> from_json(const nlohmann::json& j);

  const PackTensor* find_tensor(const std::string& name) const;
  const ExpertLayerFile* find_expert_layer(int layer) const;
};

// Expert blob layout for a set of matrices in one format: parts back to back, each 64-byte aligned.
// Fills offsets in `matrices`, returns the blob's meaningful byte count.
uint64_t layout_expert_blob(std::vector<ExpertMatrix>& matrices);

// Writes a pack into "<dir>.partial" and renames it to <dir> in finish(); a writer destroyed before
// finish() removes the partial directory, so a failed conversion leaves nothing that looks like a pack.
class PackWriter {
 public:
  static Result<std::unique_ptr<PackWriter>> create(const std::string& dir, bool overwrite);
  ~PackWriter();

  // Appends one resident tensor (parts as the format defines; unused parts empty).
  Status add_resident(const std::string& name, WeightFormat format, const std::vector<int64_t>& shape,
                      const void* data, size_t data_bytes, const void* scales = nullptr, size_t scales_bytes = 0,
                      const void* biases = nullptr, size_t biases_bytes = 0);

  // Sets the expert layout: matrices get offsets, stride is computed. Call before write_expert.
  Status set_expert_layout(int64_t n_expert, std::vector<ExpertMatrix> matrices, const std::vector<int>& layers);
  // Writes expert `expert` of `layer`; blob is expert_bytes long (from the layout).
  Status write_expert(int layer, int64_t expert, const void* blob);
  const std::vector<ExpertMatrix>& expert_matrices() const { return manifest_.expert_matrices; }
  uint64_t expert_bytes() const { return manifest_.expert_bytes; }

  Status add_file(const std::string& source_path, const std::string& relative_dest);  // tokenizer files

  // Checks that every expert of every layer was written, hashes files, writes manifest.json, renames.
  Status finish(const std::string& model_type, const nlohmann::json& hparams, const nlohmann::json& source_config,
                WeightFormat dense_format, WeightFormat expert_format);

  const std::string& partial_dir() const { return partial_dir_; }

 private:
  PackWriter() = default;
  struct LayerFile;
  std::string dir_, partial_dir_;
  int resident_fd_ = -1;
  uint64_t resident_size_ = 0;
  Manifest manifest_;
  std::vector<std::unique_ptr<LayerFile>> layer_files_;
  bool finished_ = false;
};

struct PackOpenOptions {
  bool verify_resident_hash = true;  // hash resident.bin at open (reads it once; catches corruption)
};

// A pack opened for reading: manifest parsed and checked, resident.bin mapped.
class Pack {
 public:
  static Result<std::unique_ptr<Pack>> open(const std::string& dir, const PackOpenOptions& options = {});

  const Manifest& manifest() const { return manifest_; }
  const std::string& dir() const { return dir_; }
  const nlohmann::json& hparams() const { return manifest_.hparams; }

  // A resident tensor as a WeightView for the compute backend — over the mapping, or over the backend's
  // copy of resident.bin once bind_resident has named one — or a format error naming the missing tensor
  // or the shape it has instead of the expected one (expected_shape empty: no check).
  Result<WeightView> resident(const std::string& name, const std::vector<int64_t>& expected_shape = {}) const;
  // A 1-D f32 tensor (norm weights), for the compute backend likewise.
  Result<const float*> resident_f32(const std::string& name, int64_t expected_size) const;
  Result<const float*> resident_f32(const std::string& name, const std::vector<int64_t>& expected_shape) const;
  // The same over the host mapping whatever is bound: for values the host reads (load-time transforms,
  // arguments a backend contract calls host memory).
  Result<WeightView> resident_host(const std::string& name, const std::vector<int64_t>& expected_shape = {}) const;
  Result<const float*> resident_f32_host(const std::string& name, int64_t expected_size) const;

  // resident.bin's bytes in host memory (the mapping), and where the compute backend reads them: after
  // bind_resident(copy), resident() views point into `copy` at the same offsets (a device copy made with
  // Backend::upload_weights). Bind before building a graph; the copy must outlive every view.
  const uint8_t* resident_data() const { return resident_.data(); }
  void bind_resident(const uint8_t* copy) { bound_ = copy; }

  std::string expert_file_path(int layer) const;  // absolute path of experts/layer_NNN.bin
  // View of matrix `index` of an expert blob that lives at `blob` (anywhere in memory).
  WeightView expert_view(const void* blob, size_t index) const;

  uint64_t resident_bytes() const { return resident_.size(); }

 private:
  std::string dir_;
  Manifest manifest_;
  Result<WeightView> view(const uint8_t* base, const std::string& name, const std::vector<int64_t>& expected_shape) const;
  Result<const float*> view_f32(const uint8_t* base, const std::string& name, const std::vector<int64_t>& expected_shape) const;

  MappedFile resident_;
  const uint8_t* bound_ = nullptr;  // the backend's copy of resident.bin, or null: the mapping
};

// XXH3-64 of a file's whole content, read in large chunks.
Result<uint64_t> hash_file(const std::string& path);
uint64_t hash_bytes(const void* data, size_t bytes);

}  // namespace moeflux
