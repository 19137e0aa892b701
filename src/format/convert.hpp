// Hugging Face checkpoint (config.json + safetensors shards) → moeflux pack, one shard at a time.
// Owns: checking the checkpoint against the family's tensor declarations, the per-role format choice,
// assembling expert blobs. Does not own the pack layout (pack.hpp) or the formats' math (quant/).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/status.hpp"
#include "quant/weight_format.hpp"

namespace moeflux {

struct ConvertProgress {
  int shard = 0;  // 1-based shard being read
  int n_shards = 0;
  size_t tensors_done = 0;  // checkpoint tensors converted (or skipped) so far
  size_t tensors_total = 0;
  uint64_t bytes_done = 0;  // checkpoint bytes read so far
  uint64_t bytes_total = 0;
  double seconds = 0;
  bool finished = false;  // the last call, after the pack is complete
};

struct ConvertOptions {
  std::string hf_dir;
  std::string pack_dir;
  WeightFormat expert_format = WeightFormat::bf16;  // every routed expert matrix (must fit its group)
  WeightFormat dense_format = WeightFormat::bf16;   // resident matrices and the embedding (bf16 fallback)
  bool overwrite = false;                           // replace an existing pack at pack_dir
  // Progress and warnings on stderr (a `\r`-updated line on a terminal, periodic lines otherwise).
  // Off: silent; warnings still land in ConvertSummary.
  bool progress = true;
  // When set, receives progress instead of the stderr printer (called often; keep it cheap).
  std::function<void(const ConvertProgress&)> on_progress;
  int n_threads = 0;  // quantization threads, 0 = every hardware thread
};

struct ConvertSummary {
  std::string model_type;
  size_t resident_tensors = 0;
  size_t checkpoint_tensors = 0;           // tensors read from the checkpoint (resident + expert)
  size_t fp8_tensors = 0;                  // of those, F8_E4M3 ones dequantized with their _scale_inv block scales
  uint64_t resident_bytes = 0;             // size of resident.bin
  int64_t n_expert = 0;
  size_t n_expert_layers = 0;
  uint64_t expert_blob_bytes = 0;          // meaningful bytes of one expert
  uint64_t expert_stride = 0;              // bytes between experts in a layer file
  uint64_t expert_file_bytes = 0;          // all expert files together
  uint64_t source_bytes = 0;               // checkpoint tensor bytes read
  double seconds = 0;
  std::vector<std::string> fallback_tensors;  // matrices stored bf16 because their cols don't fit the group
  std::vector<std::string> extra_tensors;     // checkpoint tensors the family does not declare (skipped)
  std::vector<std::string> tokenizer_files;   // copied into tokenizer/
};

// Converts options.hf_dir into a pack at options.pack_dir. On any error nothing is left at pack_dir
// (the pack is written to "<pack_dir>.partial" and renamed at the end). summary may be null.
Status convert_checkpoint(const ConvertOptions& options, ConvertSummary* summary = nullptr);

// The tokenizer-related files convert copies when the checkpoint has them.
const std::vector<std::string>& tokenizer_file_names();

}  // namespace moeflux
