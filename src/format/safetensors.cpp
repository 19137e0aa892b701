// safetensors parsing and checkpoint-directory scanning (format: github.com/huggingface/safetensors,
// "8-byte little-endian header size, JSON header, byte buffer").
#include "format/safetensors.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>

#include <nlohmann/json.hpp>

#include "core/half.hpp"

namespace moeflux {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// A real header is a few MB at most (the 671B checkpoints' largest shard header is ~100 KB); the
// bound stops a corrupt length from allocating gigabytes before the JSON parser sees garbage.
constexpr uint64_t max_header_bytes = 100ull << 20;

struct DtypeInfo {
  const char* name;
  SafetensorsDtype dtype;
  size_t size;
};

constexpr DtypeInfo dtype_table[] = {
    {"BOOL", SafetensorsDtype::boolean, 1}, {"U8", SafetensorsDtype::u8, 1},   {"I8", SafetensorsDtype::i8, 1},
    {"U16", SafetensorsDtype::u16, 2},      {"I16", SafetensorsDtype::i16, 2}, {"F16", SafetensorsDtype::f16, 2},
    {"BF16", SafetensorsDtype::bf16, 2},    {"U32", SafetensorsDtype::u32, 4}, {"I32", SafetensorsDtype::i32, 4},
    {"F32", SafetensorsDtype::f32, 4},      {"U64", SafetensorsDtype::u64, 8}, {"I64", SafetensorsDtype::i64, 8},
    {"F64", SafetensorsDtype::f64, 8},      {"F8_E4M3", SafetensorsDtype::f8_e4m3, 1},
    {"F8_E5M2", SafetensorsDtype::f8_e5m2, 1},
};

const DtypeInfo* find_dtype(const std::string& name) {
  for (const auto& d : dtype_table)
    if (name == d.name) return &d;
  return nullptr;
}

std::string shape_string(const std::vector<int64_t>& shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

// Parses one header entry; `where` is "<path>: tensor <name>".
Result<SafetensorsTensor> parse_entry(const std::string& name, const json& entry, const std::string& where,
                                      uint64_t data_start, uint64_t data_bytes) {
  if (!entry.is_object()) return make_error(ErrorCode::format, "{}: header entry is not an object", where);
  if (!entry.contains("dtype") || !entry["dtype"].is_string())
    return make_error(ErrorCode::format, "{}: header entry has no \"dtype\" string", where);
  const std::string dtype_name = entry["dtype"].get<std::string>();
  const DtypeInfo* info = find_dtype(dtype_name);
  if (!info) return make_error(ErrorCode::format, "{}: unknown dtype \"{}\"", where, dtype_name);

  SafetensorsTensor t;
  t.name = name;
  t.dtype = info->dtype;
  if (!entry.contains("shape") || !entry["shape"].is_array())
    return make_error(ErrorCode::format, "{}: header entry has no \"shape\" array", where);
  uint64_t elements = 1;
  for (const auto& d : entry["shape"]) {
    if (!d.is_number_unsigned()) return make_error(ErrorCode::format, "{}: shape {} has a non-integer or negative dimension", where, entry["shape"].dump());
    const uint64_t v = d.get<uint64_t>();
    // Any real dimension is far below 2^40; the bound keeps the product from overflowing.
    if (v > (1ull << 40) || (v != 0 && elements > (1ull << 62) / v))
      return make_error(ErrorCode::format, "{}: shape {} is too large", where, entry["shape"].dump());
    elements *= v;
    t.shape.push_back(int64_t(v));
  }
  if (!entry.contains("data_offsets") || !entry["data_offsets"].is_array() || entry["data_offsets"].size() != 2 ||
      !entry["data_offsets"][0].is_number_unsigned() || !entry["data_offsets"][1].is_number_unsigned())
    return make_error(ErrorCode::format, "{}: \"data_offsets\" must be two non-negative integers", where);
  const uint64_t begin = entry["data_offsets"][0].get<uint64_t>();
  const uint64_t end = entry["data_offsets"][1].get<uint64_t>();
  if (begin > end) return make_error(ErrorCode::format, "{}: data_offsets [{}, {}] are out of order", where, begin, end);
  if (end > data_bytes)
    return make_error(ErrorCode::format, "{}: data_offsets [{}, {}] end past the data section ({} bytes; file truncated?)", where,
                      begin, end, data_bytes);
  const uint64_t expected = elements * info->size;
  if (end - begin != expected)
    return make_error(ErrorCode::format, "{}: data_offsets [{}, {}] span {} bytes, expected {} for {} {}", where, begin, end,
                      end - begin, expected, dtype_name, shape_string(t.shape));
  t.offset = data_start + begin;
  t.bytes = expected;
  return t;
}

}  // namespace

const char* safetensors_dtype_name(SafetensorsDtype dtype) {
  for (const auto& d : dtype_table)
    if (d.dtype == dtype) return d.name;
  return "?";
}

size_t safetensors_dtype_size(SafetensorsDtype dtype) {
  for (const auto& d : dtype_table)
    if (d.dtype == dtype) return d.size;
  return 0;
}

bool safetensors_dtype_is_float_readable(SafetensorsDtype dtype) {
  return dtype == SafetensorsDtype::bf16 || dtype == SafetensorsDtype::f16 || dtype == SafetensorsDtype::f32 ||
         dtype == SafetensorsDtype::f8_e4m3;
}

namespace {

// Every e4m3fn value: exponent field e, mantissa m → (1 + m/8)·2^(e−7), subnormal (e = 0) m·2^−9.
const std::array<float, 256>& f8_e4m3_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int bits = 0; bits < 256; ++bits) {
      const int exponent = (bits >> 3) & 15, mantissa = bits & 7;
      float v = exponent == 0 ? std::ldexp(float(mantissa), -9) : std::ldexp(1.0f + float(mantissa) / 8.0f, exponent - 7);
      if (f8_e4m3_is_nan(uint8_t(bits))) v = std::numeric_limits<float>::quiet_NaN();
      t[size_t(bits)] = (bits & 0x80) ? -v : v;
    }
    return t;
  }();
  return table;
}

}  // namespace

float f8_e4m3_to_f32(uint8_t bits) { return f8_e4m3_table()[bits]; }

void decode_to_f32(SafetensorsDtype dtype, const uint8_t* src, size_t count, float* out) {
  // memcpy per element: the data section starts at 8 + header length, so nothing is aligned.
  switch (dtype) {
    case SafetensorsDtype::bf16:
      for (size_t i = 0; i < count; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        out[i] = bf16_to_f32(h);
      }
      break;
    case SafetensorsDtype::f16:
      for (size_t i = 0; i < count; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        out[i] = f16_to_f32(h);
      }
      break;
    case SafetensorsDtype::f32: std::memcpy(out, src, count * 4); break;
    case SafetensorsDtype::f8_e4m3: {
      const std::array<float, 256>& table = f8_e4m3_table();
      for (size_t i = 0; i < count; ++i) out[i] = table[src[i]];
      break;
    }
    default: MF_CHECK_MSG(false, "decode_to_f32 on dtype {}", safetensors_dtype_name(dtype));
  }
}

int64_t SafetensorsTensor::elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

Result<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  SafetensorsFile f;
  MF_ASSIGN_OR_RETURN(f.file_, MappedFile::open(path));
  const uint64_t size = f.file_.size();
  if (size < 8) return make_error(ErrorCode::format, "{}: {} bytes, too short for a safetensors file (truncated?)", path, size);
  uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) header_bytes = header_bytes << 8 | f.file_.data()[i];
  if (header_bytes > max_header_bytes || header_bytes > size - 8)
    return make_error(ErrorCode::format, "{}: header length {} exceeds {} (file is {} bytes; truncated or not a safetensors file)",
                      path, header_bytes, std::min<uint64_t>(max_header_bytes, size - 8), size);
  json header;
  try {
    header = json::parse(f.file_.data() + 8, f.file_.data() + 8 + header_bytes);
  } catch (const json::exception& e) {
    return make_error(ErrorCode::format, "{}: header is not valid JSON: {}", path, e.what());
  }
  if (!header.is_object()) return make_error(ErrorCode::format, "{}: header is not a JSON object", path);

  const uint64_t data_start = 8 + header_bytes;
  const uint64_t data_bytes = size - data_start;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    MF_ASSIGN_OR_RETURN(SafetensorsTensor t, parse_entry(name, entry, fmt::format("{}: tensor {}", path, name), data_start, data_bytes));
    f.tensors_.push_back(std::move(t));
  }
  std::sort(f.tensors_.begin(), f.tensors_.end(), [](const auto& a, const auto& b) { return a.offset < b.offset; });
  for (size_t i = 0; i + 1 < f.tensors_.size(); ++i) {
    const auto& a = f.tensors_[i];
    const auto& b = f.tensors_[i + 1];
    if (a.offset + a.bytes > b.offset && b.bytes > 0 && a.bytes > 0)
      return make_error(ErrorCode::format, "{}: tensors {} and {} overlap (data_offsets [{}, {}) and [{}, {}))", path, a.name, b.name,
                        a.offset - data_start, a.offset + a.bytes - data_start, b.offset - data_start, b.offset + b.bytes - data_start);
  }
  for (size_t i = 0; i < f.tensors_.size(); ++i) f.by_name_[f.tensors_[i].name] = i;
  return f;
}

const SafetensorsTensor* SafetensorsFile::find(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

Result<std::span<const uint8_t>> SafetensorsFile::raw(const std::string& name) const {
  const SafetensorsTensor* t = find(name);
  if (!t) return make_error(ErrorCode::format, "{}: no tensor {}", path(), name);
  return raw(*t);
}

Status SafetensorsFile::to_f32(const std::string& name, float* out) const {
  const SafetensorsTensor* t = find(name);
  if (!t) return make_error(ErrorCode::format, "{}: no tensor {}", path(), name);
  return to_f32(*t, 0, t->elements(), out);
}

Status SafetensorsFile::to_f32(const SafetensorsTensor& t, int64_t first, int64_t count, float* out) const {
  if (!safetensors_dtype_is_float_readable(t.dtype))
    return make_error(ErrorCode::unsupported, "{}: tensor {} has dtype {}; only BF16, F16, F32 and F8_E4M3 can be converted", path(), t.name,
                      safetensors_dtype_name(t.dtype));
  MF_CHECK_MSG(first >= 0 && count >= 0 && first + count <= t.elements(), "range [{}, +{}) of {} elements", first, count, t.elements());
  const size_t element = safetensors_dtype_size(t.dtype);
  decode_to_f32(t.dtype, file_.data() + t.offset + size_t(first) * element, size_t(count), out);
  return Status::ok();
}

const SafetensorsTensor* CheckpointIndex::find(const std::string& name) const {
  auto it = tensor_shard.find(name);
  if (it == tensor_shard.end()) return nullptr;
  for (const auto& t : shards[it->second].tensors)
    if (t.name == name) return &t;
  return nullptr;
}

Result<CheckpointIndex> scan_checkpoint_dir(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return make_error(ErrorCode::io, "{} is not a directory", dir);
  CheckpointIndex index;
  const std::string index_path = dir + "/model.safetensors.index.json";
  std::vector<std::string> shard_names;
  std::map<std::string, std::string> weight_map;  // from the index, checked against the headers
  const bool has_index = fs::exists(index_path, ec);
  if (has_index) {
    MF_ASSIGN_OR_RETURN(std::string text, read_text_file(index_path));
    json j;
    try {
      j = json::parse(text);
    } catch (const json::exception& e) {
      return make_error(ErrorCode::format, "{} is not valid JSON: {}", index_path, e.what());
    }
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      return make_error(ErrorCode::format, "{} has no \"weight_map\" object", index_path);
    for (const auto& [name, file] : j["weight_map"].items()) {
      if (!file.is_string()) return make_error(ErrorCode::format, "{}: weight_map entry {} is not a file name", index_path, name);
      const std::string f = file.get<std::string>();
      if (f.empty() || f.find('/') != std::string::npos)
        return make_error(ErrorCode::format, "{}: weight_map entry {} names \"{}\", expected a file in the directory", index_path, name, f);
      weight_map[name] = f;
      if (std::find(shard_names.begin(), shard_names.end(), f) == shard_names.end()) shard_names.push_back(f);
    }
    std::sort(shard_names.begin(), shard_names.end());
  } else {
    for (const auto& entry : fs::directory_iterator(dir, ec))
      if (entry.path().extension() == ".safetensors") shard_names.push_back(entry.path().filename().string());
    if (ec) return make_error(ErrorCode::io, "cannot list {}: {}", dir, ec.message());
    std::sort(shard_names.begin(), shard_names.end());
  }
  if (shard_names.empty())
    return make_error(ErrorCode::format, "{}: no *.safetensors files (and no model.safetensors.index.json)", dir);

  for (const auto& name : shard_names) {
    CheckpointShard shard;
    shard.path = dir + "/" + name;
    {
      MF_ASSIGN_OR_RETURN(SafetensorsFile file, SafetensorsFile::open(shard.path));
      shard.tensors = file.tensors();
    }
    const size_t shard_id = index.shards.size();
    for (const auto& t : shard.tensors) {
      shard.tensor_bytes += t.bytes;
      auto [it, inserted] = index.tensor_shard.emplace(t.name, shard_id);
      if (!inserted)
        return make_error(ErrorCode::format, "{}: tensor {} is in two shards: {} and {}", dir, t.name,
                          shard_names[it->second], name);
    }
    index.tensor_bytes += shard.tensor_bytes;
    index.shards.push_back(std::move(shard));
  }
  for (const auto& [name, file] : weight_map) {
    auto it = index.tensor_shard.find(name);
    if (it == index.tensor_shard.end() || shard_names[it->second] != file)
      return make_error(ErrorCode::format, "{}: the index places tensor {} in {}, but {}", dir, name, file,
                        it == index.tensor_shard.end() ? std::string("no shard holds it")
                                                        : "it is in " + shard_names[it->second]);
  }
  return index;
}

}  // namespace moeflux
