// Reading Hugging Face .safetensors files (one memory-mapped file, header validated at open) and
// checkpoint directories (index json or every *.safetensors file). Owns: the header parser and the
// bf16/f16/f32/f8_e4m3 → f32 element decode. Does not own what the tensors mean (models/) or conversion
// (convert, which also applies an FP8 tensor's block scales).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/mapped_file.hpp"
#include "core/status.hpp"

namespace moeflux {

// Every dtype the safetensors format defines. f16, bf16, f32 and f8_e4m3 can be read as float; f8_e5m2
// is known but refused (no checkpoint we read uses it).
enum class SafetensorsDtype : uint8_t { boolean, u8, i8, u16, i16, f16, bf16, u32, i32, f32, u64, i64, f64, f8_e4m3, f8_e5m2 };

const char* safetensors_dtype_name(SafetensorsDtype dtype);  // as spelled in the header ("BF16")
size_t safetensors_dtype_size(SafetensorsDtype dtype);       // bytes per element
bool safetensors_dtype_is_float_readable(SafetensorsDtype dtype);

// Decodes count elements of a float-readable dtype (src may be unaligned) to f32. f8_e4m3 gives the
// stored element values: a block-quantized checkpoint's weight is that times its `_scale_inv` block scale.
void decode_to_f32(SafetensorsDtype dtype, const uint8_t* src, size_t count, float* out);

// float8 e4m3fn (1 sign, 4 exponent bits of bias 7, 3 mantissa bits; no infinities; S.1111.111 is
// NaN; largest finite 448), as PyTorch's torch.float8_e4m3fn and safetensors' F8_E4M3.
float f8_e4m3_to_f32(uint8_t bits);
inline bool f8_e4m3_is_nan(uint8_t bits) { return (bits & 0x7f) == 0x7f; }

struct SafetensorsTensor {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::f32;
  std::vector<int64_t> shape;
  uint64_t offset = 0;  // from the start of the file (header skipped)
  uint64_t bytes = 0;
  int64_t elements() const;
};

// One .safetensors file: 8-byte little-endian header length, JSON header, data section.
class SafetensorsFile {
 public:
  // Maps the file and validates the header: every error names the file (and the tensor).
  static Result<SafetensorsFile> open(const std::string& path);

  const std::string& path() const { return file_.path(); }
  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }  // in data-offset order
  const SafetensorsTensor* find(const std::string& name) const;

  // Raw bytes of a tensor inside the mapping.
  Result<std::span<const uint8_t>> raw(const std::string& name) const;
  std::span<const uint8_t> raw(const SafetensorsTensor& t) const { return {file_.data() + t.offset, size_t(t.bytes)}; }

  // Whole tensor to f32; out holds elements() floats. Unsupported for dtypes that are not float-readable.
  Status to_f32(const std::string& name, float* out) const;
  // Elements [first, first + count) of the flattened tensor to f32.
  Status to_f32(const SafetensorsTensor& t, int64_t first, int64_t count, float* out) const;

  uint64_t file_bytes() const { return file_.size(); }

 private:
  MappedFile file_;
  std::vector<SafetensorsTensor> tensors_;
  std::unordered_map<std::string, size_t> by_name_;
};

// The shards of a checkpoint directory and where each tensor lives, built from every shard's header.
struct CheckpointShard {
  std::string path;
  std::vector<SafetensorsTensor> tensors;  // header entries (offsets within this shard)
  uint64_t tensor_bytes = 0;
};

struct CheckpointIndex {
  std::vector<CheckpointShard> shards;                   // index order, or file names sorted
  std::unordered_map<std::string, size_t> tensor_shard;  // tensor name → shard index
  uint64_t tensor_bytes = 0;
  size_t tensor_count() const { return tensor_shard.size(); }
  const SafetensorsTensor* find(const std::string& name) const;
};

// Reads dir/model.safetensors.index.json (weight_map) when present, else takes every *.safetensors
// file. Validates every shard's header; a tensor found in two shards, or listed by the index in a
// shard that does not hold it, is a format error.
Result<CheckpointIndex> scan_checkpoint_dir(const std::string& dir);

}  // namespace moeflux
