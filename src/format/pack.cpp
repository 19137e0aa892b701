// Pack reading and writing; the format is specified in docs/FORMAT.md.
#include "format/pack.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <xxhash.h>

#include "core/aligned_buffer.hpp"

namespace moeflux {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::string hex64(uint64_t v) { return fmt::format("{:016x}", v); }

Result<uint64_t> parse_hex64(const json& j, const std::string& what) {
  if (!j.is_string() || j.get<std::string>().size() != 16)
    return make_error(ErrorCode::format, "manifest: {} must be a 16-digit hex string", what);
  const std::string s = j.get<std::string>();
  uint64_t v = 0;
  for (char c : s) {
    int d;
    if (c >= '0' && c <= '9') d = c - '0';
    else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
    else return make_error(ErrorCode::format, "manifest: {} is not hex: {}", what, s);
    v = v << 4 | uint64_t(d);
  }
  return v;
}

json part_to_json(const TensorPart& p) { return json{{"offset", p.offset}, {"bytes", p.bytes}}; }

void parts_to_json(json& j, WeightFormat format, const TensorPart& data, const TensorPart& scales, const TensorPart& biases) {
  j["data"] = part_to_json(data);
  if (format == WeightFormat::q8 || format == WeightFormat::q4) j["scales"] = part_to_json(scales);
  if (format == WeightFormat::q4) j["biases"] = part_to_json(biases);
}

// Reads a field with a type check; errors name the field path.
template <typename T>
Result<T> field(const json& j, const char* key, const std::string& where) {
  if (!j.is_object() || !j.contains(key)) return make_error(ErrorCode::format, "manifest: {} has no \"{}\"", where, key);
  try {
    return j.at(key).get<T>();
  } catch (const json::exception& e) {
    return make_error(ErrorCode::format, "manifest: {}.{} has the wrong type ({})", where, key, e.what());
  }
}

Result<TensorPart> part_from_json(const json& j, const char* key, const std::string& where) {
  if (!j.contains(key)) return make_error(ErrorCode::format, "manifest: {} has no \"{}\" part", where, key);
  TensorPart p;
  MF_ASSIGN_OR_RETURN(p.offset, field<uint64_t>(j.at(key), "offset", where + "." + key));
  MF_ASSIGN_OR_RETURN(p.bytes, field<uint64_t>(j.at(key), "bytes", where + "." + key));
  return p;
}

Result<WeightFormat> format_from_json(const json& j, const char* key, const std::string& where) {
  MF_ASSIGN_OR_RETURN(std::string name, field<std::string>(j, key, where));
  auto f = parse_weight_format(name);
  if (!f) return make_error(ErrorCode::format, "manifest: {}.{}: unknown weight format \"{}\"", where, key, name);
  return *f;
}

// Reads data/scales/biases parts as the format requires and checks their sizes against the shape.
Status parts_from_json(const json& j, WeightFormat format, int64_t rows, int64_t cols, const std::string& where,
                       TensorPart* data, TensorPart* scales, TensorPart* biases) {
  const WeightPartBytes expected = weight_part_bytes(format, rows, cols);
  MF_ASSIGN_OR_RETURN(*data, part_from_json(j, "data", where));
  if (data->bytes != expected.data)
    return make_error(ErrorCode::format, "manifest: {}: data is {} bytes, expected {} for {} [{}, {}]", where, data->bytes,
                      expected.data, weight_format_name(format), rows, cols);
  if (expected.scales) {
    MF_ASSIGN_OR_RETURN(*scales, part_from_json(j, "scales", where));
    if (scales->bytes != expected.scales)
      return make_error(ErrorCode::format, "manifest: {}: scales are {} bytes, expected {}", where, scales->bytes, expected.scales);
  }
  if (expected.biases) {
    MF_ASSIGN_OR_RETURN(*biases, part_from_json(j, "biases", where));
    if (biases->bytes != expected.biases)
      return make_error(ErrorCode::format, "manifest: {}: biases are {} bytes, expected {}", where, biases->bytes, expected.biases);
  }
  return Status::ok();
}

// rows/cols of a tensor as a matrix: 1-D tensors are one row.
// A tensor as a matrix: the last dim is the columns, the leading dims (none: 1) multiply into rows.
void matrix_dims(const std::vector<int64_t>& shape, int64_t* rows, int64_t* cols) {
  *rows = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) *rows *= shape[i];
  *cols = shape.empty() ? 0 : shape.back();
}

Status write_all(int fd, const void* data, size_t bytes, uint64_t offset, const std::string& path) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  while (bytes > 0) {
    const ssize_t n = ::pwrite(fd, p, bytes, off_t(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return make_error(ErrorCode::io, "cannot write {}: {}", path, std::strerror(errno));
    }
    p += n;
    bytes -= size_t(n);
    offset += uint64_t(n);
  }
  return Status::ok();
}

}  // namespace

uint64_t hash_bytes(const void* data, size_t bytes) { return XXH3_64bits(data, bytes); }

Result<uint64_t> hash_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return make_error(ErrorCode::io, "cannot open {}: {}", path, std::strerror(errno));
  XXH3_state_t* state = XXH3_createState();
  XXH3_64bits_reset(state);
  AlignedBuffer buffer(8 << 20);
  Status status;
  for (;;) {
    const ssize_t n = ::read(fd, buffer.data(), buffer.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      status = make_error(ErrorCode::io, "cannot read {}: {}", path, std::strerror(errno));
      break;
    }
    if (n == 0) break;
    XXH3_64bits_update(state, buffer.data(), size_t(n));
  }
  const uint64_t h = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  ::close(fd);
  if (!status.is_ok()) return status;
  return h;
}

// ---------------------------------------------------------------------------------------------------
// Manifest

json Manifest::to_json() const {
  json j;
  j["format"] = "moeflux-pack";
  j["format_version"] = format_version;
  j["model_type"] = model_type;
  j["hparams"] = hparams;
  j["source_config"] = source_config;
  j["quant"] = {{"dense", weight_format_name(dense_format)}, {"experts", weight_format_name(expert_format)}};
  json tensors_json = json::array();
  for (const auto& t : tensors) {
    json tj{{"name", t.name}, {"format", weight_format_name(t.format)}, {"shape", t.shape}};
    parts_to_json(tj, t.format, t.data, t.scales, t.biases);
    tensors_json.push_back(std::move(tj));
  }
  j["tensors"] = std::move(tensors_json);
  json experts{{"n_expert", n_expert}, {"expert_bytes", expert_bytes}, {"stride", expert_stride}};
  json matrices = json::array();
  for (const auto& m : expert_matrices) {
    json mj{{"part", m.part}, {"format", weight_format_name(m.format)}, {"rows", m.rows}, {"cols", m.cols}};
    parts_to_json(mj, m.format, m.data, m.scales, m.biases);
    matrices.push_back(std::move(mj));
  }
  experts["matrices"] = std::move(matrices);
  json layers = json::array();
  for (const auto& l : expert_layers) {
    json hashes = json::array();
    for (uint64_t h : l.hashes) hashes.push_back(hex64(h));
    layers.push_back({{"layer", l.layer}, {"file", l.file}, {"hashes", std::move(hashes)}});
  }
  experts["layers"] = std::move(layers);
  j["experts"] = std::move(experts);
  json files_json = json::array();
  for (const auto& f : files) files_json.push_back({{"path", f.path}, {"bytes", f.bytes}, {"xxh3", hex64(f.xxh3)}});
  j["files"] = std::move(files_json);
  j["tokenizer_files"] = tokenizer_files;
  return j;
}

Result<Manifest> Manifest::from_json(const json& j) {
  Manifest m;
  MF_ASSIGN_OR_RETURN(std::string magic, field<std::string>(j, "format", "manifest"));
  if (magic != "moeflux-pack") return make_error(ErrorCode::format, "manifest: format is \"{}\", expected \"moeflux-pack\"", magic);
  MF_ASSIGN_OR_RETURN(m.format_version, field<int>(j, "format_version", "manifest"));
  if (m.format_version != pack_format_version)
    return make_error(ErrorCode::unsupported, "pack format version {} (this build reads version {}); reconvert the model",
                      m.format_version, pack_format_version);
  MF_ASSIGN_OR_RETURN(m.model_type, field<std::string>(j, "model_type", "manifest"));
  if (!j.contains("hparams") || !j["hparams"].is_object()) return make_error(ErrorCode::format, "manifest: no \"hparams\" object");
  m.hparams = j["hparams"];
  m.source_config = j.value("source_config", json::object());
  if (!j.contains("quant")) return make_error(ErrorCode::format, "manifest: no \"quant\"");
  MF_ASSIGN_OR_RETURN(m.dense_format, format_from_json(j["quant"], "dense", "quant"));
  MF_ASSIGN_OR_RETURN(m.expert_format, format_from_json(j["quant"], "experts", "quant"));

  MF_ASSIGN_OR_RETURN(json tensors, field<json>(j, "tensors", "manifest"));
  if (!tensors.is_array()) return make_error(ErrorCode::format, "manifest: \"tensors\" is not an array");
  for (size_t i = 0; i < tensors.size(); ++i) {
    const json& tj = tensors[i];
    PackTensor t;
    MF_ASSIGN_OR_RETURN(t.name, field<std::string>(tj, "name", fmt::format("tensors[{}]", i)));
    MF_ASSIGN_OR_RETURN(t.format, format_from_json(tj, "format", t.name));
    MF_ASSIGN_OR_RETURN(t.shape, field<std::vector<int64_t>>(tj, "shape", t.name));
    if (t.shape.empty() || t.shape.size() > 4 || std::any_of(t.shape.begin(), t.shape.end(), [](int64_t d) { return d <= 0; }))
      return make_error(ErrorCode::format, "manifest: tensor {} has an invalid shape", t.name);
    int64_t rows, cols;
    matrix_dims(t.shape, &rows, &cols);
    MF_TRY(parts_from_json(tj, t.format, rows, cols, t.name, &t.data, &t.scales, &t.biases));
    m.tensors.push_back(std::move(t));
  }

  MF_ASSIGN_OR_RETURN(json experts, field<json>(j, "experts", "manifest"));
  MF_ASSIGN_OR_RETURN(m.n_expert, field<int64_t>(experts, "n_expert", "experts"));
  MF_ASSIGN_OR_RETURN(m.expert_bytes, field<uint64_t>(experts, "expert_bytes", "experts"));
  MF_ASSIGN_OR_RETURN(m.expert_stride, field<uint64_t>(experts, "stride", "experts"));
  MF_ASSIGN_OR_RETURN(json matrices, field<json>(experts, "matrices", "experts"));
  for (size_t i = 0; i < matrices.size(); ++i) {
    const json& mj = matrices[i];
    ExpertMatrix em;
    const std::string where = fmt::format("experts.matrices[{}]", i);
    MF_ASSIGN_OR_RETURN(em.part, field<std::string>(mj, "part", where));
    MF_ASSIGN_OR_RETURN(em.format, format_from_json(mj, "format", where));
    MF_ASSIGN_OR_RETURN(em.rows, field<int64_t>(mj, "rows", where));
    MF_ASSIGN_OR_RETURN(em.cols, field<int64_t>(mj, "cols", where));
    if (em.rows <= 0 || em.cols <= 0) return make_error(ErrorCode::format, "manifest: {} has an invalid shape", where);
    MF_TRY(parts_from_json(mj, em.format, em.rows, em.cols, where, &em.data, &em.scales, &em.biases));
    for (const TensorPart* p : {&em.data, &em.scales, &em.biases})
      if (p->offset + p->bytes > m.expert_bytes)
        return make_error(ErrorCode::format, "manifest: {} ({}) ends at byte {}, past the expert blob of {} bytes", where,
                          em.part, p->offset + p->bytes, m.expert_bytes);
    m.expert_matrices.push_back(std::move(em));
  }
  MF_ASSIGN_OR_RETURN(json layers, field<json>(experts, "layers", "experts"));
  for (size_t i = 0; i < layers.size(); ++i) {
    ExpertLayerFile lf;
    const std::string where = fmt::format("experts.layers[{}]", i);
    MF_ASSIGN_OR_RETURN(lf.layer, field<int>(layers[i], "layer", where));
    MF_ASSIGN_OR_RETURN(lf.file, field<std::string>(layers[i], "file", where));
    MF_ASSIGN_OR_RETURN(json hashes, field<json>(layers[i], "hashes", where));
    if (!hashes.is_array() || int64_t(hashes.size()) != m.n_expert)
      return make_error(ErrorCode::format, "manifest: {} has {} hashes, expected {}", where, hashes.is_array() ? hashes.size() : 0,
                        m.n_expert);
    for (const auto& h : hashes) {
      MF_ASSIGN_OR_RETURN(uint64_t v, parse_hex64(h, where + ".hashes"));
      lf.hashes.push_back(v);
    }
    m.expert_layers.push_back(std::move(lf));
  }
  if (!m.expert_layers.empty()) {
    if (m.n_expert <= 0 || m.expert_bytes == 0 || m.expert_stride < m.expert_bytes || m.expert_stride % pack_alignment != 0)
      return make_error(ErrorCode::format, "manifest: expert layout invalid (n_expert {}, expert_bytes {}, stride {}; stride must be a multiple of {} and ≥ expert_bytes)",
                        m.n_expert, m.expert_bytes, m.expert_stride, pack_alignment);
  }

  MF_ASSIGN_OR_RETURN(json files, field<json>(j, "files", "manifest"));
  for (size_t i = 0; i < files.size(); ++i) {
    PackFileEntry f;
    const std::string where = fmt::format("files[{}]", i);
    MF_ASSIGN_OR_RETURN(f.path, field<std::string>(files[i], "path", where));
    MF_ASSIGN_OR_RETURN(f.bytes, field<uint64_t>(files[i], "bytes", where));
    if (!files[i].contains("xxh3")) return make_error(ErrorCode::format, "manifest: {} has no xxh3", where);
    MF_ASSIGN_OR_RETURN(f.xxh3, parse_hex64(files[i]["xxh3"], where + ".xxh3"));
    if (f.path.empty() || f.path.find("..") != std::string::npos || f.path[0] == '/')
      return make_error(ErrorCode::format, "manifest: {} has an unsafe path \"{}\"", where, f.path);
    m.files.push_back(std::move(f));
  }
  m.tokenizer_files = j.value("tokenizer_files", std::vector<std::string>{});
  return m;
}

const PackTensor* Manifest::find_tensor(const std::string& name) const {
  for (const auto& t : tensors)
    if (t.name == name) return &t;
  return nullptr;
}

const ExpertLayerFile* Manifest::find_expert_layer(int layer) const {
  for (const auto& l : expert_layers)
    if (l.layer == layer) return &l;
  return nullptr;
}

uint64_t layout_expert_blob(std::vector<ExpertMatrix>& matrices) {
  // 64-byte alignment keeps every part aligned for vector loads wherever the blob lands.
  uint64_t offset = 0;
  auto place = [&](TensorPart& p, size_t bytes) {
    p.offset = bytes ? offset : 0;
    p.bytes = bytes;
    offset = align_up(offset + bytes, 64);
  };
  for (auto& m : matrices) {
    const WeightPartBytes b = weight_part_bytes(m.format, m.rows, m.cols);
    place(m.data, b.data);
    place(m.scales, b.scales);
    place(m.biases, b.biases);
  }
  return offset;
}

// ---------------------------------------------------------------------------------------------------
// PackWriter

struct PackWriter::LayerFile {
  int layer = 0;
  std::string relative_path;
  int fd = -1;
  std::vector<bool> written;
  std::vector<uint64_t> hashes;
};

Result<std::unique_ptr<PackWriter>> PackWriter::create(const std::string& dir, bool overwrite) {
  std::error_code ec;
  if (fs::exists(dir, ec) && !overwrite)
    return make_error(ErrorCode::invalid_argument, "{} already exists (use --force to replace it)", dir);
  auto w = std::unique_ptr<PackWriter>(new PackWriter());
  w->dir_ = dir;
  w->partial_dir_ = dir + ".partial";
  fs::remove_all(w->partial_dir_, ec);
  if (!fs::create_directories(w->partial_dir_ + "/experts", ec) || ec)
    return make_error(ErrorCode::io, "cannot create {}: {}", w->partial_dir_, ec.message());
  const std::string resident = w->partial_dir_ + "/resident.bin";
  w->resident_fd_ = ::open(resident.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (w->resident_fd_ < 0) return make_error(ErrorCode::io, "cannot create {}: {}", resident, std::strerror(errno));
  return w;
}

PackWriter::~PackWriter() {
  if (resident_fd_ >= 0) ::close(resident_fd_);
  for (auto& lf : layer_files_)
    if (lf->fd >= 0) ::close(lf->fd);
  if (!finished_ && !partial_dir_.empty()) {
    std::error_code ec;
    fs::remove_all(partial_dir_, ec);
  }
}

Status PackWriter::add_resident(const std::string& name, WeightFormat format, const std::vector<int64_t>& shape,
                                const void* data, size_t data_bytes, const void* scales, size_t scales_bytes,
                                const void* biases, size_t biases_bytes) {
  if (manifest_.find_tensor(name)) return make_error(ErrorCode::internal, "tensor {} added twice", name);
  int64_t rows, cols;
  matrix_dims(shape, &rows, &cols);
  const WeightPartBytes expected = weight_part_bytes(format, rows, cols);
  if (expected.data != data_bytes || expected.scales != scales_bytes || expected.biases != biases_bytes)
    return make_error(ErrorCode::internal, "tensor {}: parts of {}/{}/{} bytes, expected {}/{}/{} for {}", name, data_bytes,
                      scales_bytes, biases_bytes, expected.data, expected.scales, expected.biases, weight_format_name(format));
  PackTensor t;
  t.name = name;
  t.format = format;
  t.shape = shape;
  const std::string path = partial_dir_ + "/resident.bin";
  auto put = [&](TensorPart& part, const void* p, size_t bytes) -> Status {
    if (bytes == 0) return Status::ok();
    part.offset = align_up(resident_size_, pack_alignment);
    part.bytes = bytes;
    MF_TRY(write_all(resident_fd_, p, bytes, part.offset, path));
    resident_size_ = part.offset + bytes;
    return Status::ok();
  };
  MF_TRY(put(t.data, data, data_bytes));
  MF_TRY(put(t.scales, scales, scales_bytes));
  MF_TRY(put(t.biases, biases, biases_bytes));
  manifest_.tensors.push_back(std::move(t));
  return Status::ok();
}

Status PackWriter::set_expert_layout(int64_t n_expert, std::vector<ExpertMatrix> matrices, const std::vector<int>& layers) {
  if (!layer_files_.empty()) return make_error(ErrorCode::internal, "expert layout set twice");
  manifest_.n_expert = n_expert;
  manifest_.expert_bytes = layout_expert_blob(matrices);
  manifest_.expert_stride = align_up(manifest_.expert_bytes, pack_alignment);
  manifest_.expert_matrices = std::move(matrices);
  for (int layer : layers) {
    auto lf = std::make_unique<LayerFile>();
    lf->layer = layer;
    lf->relative_path = fmt::format("experts/layer_{:03d}.bin", layer);
    const std::string path = partial_dir_ + "/" + lf->relative_path;
    lf->fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (lf->fd < 0) return make_error(ErrorCode::io, "cannot create {}: {}", path, std::strerror(errno));
    // Full size up front: blobs are written in any order and the padding reads as zeros.
    if (::ftruncate(lf->fd, off_t(manifest_.expert_stride * uint64_t(n_expert))) != 0)
      return make_error(ErrorCode::io, "cannot size {}: {}", path, std::strerror(errno));
    lf->written.assign(size_t(n_expert), false);
    lf->hashes.assign(size_t(n_expert), 0);
    layer_files_.push_back(std::move(lf));
  }
  return Status::ok();
}

Status PackWriter::write_expert(int layer, int64_t expert, const void* blob) {
  for (auto& lf : layer_files_) {
    if (lf->layer != layer) continue;
    if (expert < 0 || expert >= manifest_.n_expert)
      return make_error(ErrorCode::internal, "expert {} of layer {} out of range [0, {})", expert, layer, manifest_.n_expert);
    if (lf->written[size_t(expert)]) return make_error(ErrorCode::format, "expert {} of layer {} appears twice", expert, layer);
    MF_TRY(write_all(lf->fd, blob, manifest_.expert_bytes, uint64_t(expert) * manifest_.expert_stride,
                     partial_dir_ + "/" + lf->relative_path));
    lf->written[size_t(expert)] = true;
    lf->hashes[size_t(expert)] = hash_bytes(blob, manifest_.expert_bytes);
    return Status::ok();
  }
  return make_error(ErrorCode::internal, "layer {} has no expert file", layer);
}

Status PackWriter::add_file(const std::string& source_path, const std::string& relative_dest) {
  std::error_code ec;
  const fs::path dest = fs::path(partial_dir_) / "tokenizer" / relative_dest;
  fs::create_directories(dest.parent_path(), ec);
  if (!fs::copy_file(source_path, dest, fs::copy_options::overwrite_existing, ec) || ec)
    return make_error(ErrorCode::io, "cannot copy {} into the pack: {}", source_path, ec.message());
  manifest_.tokenizer_files.push_back(relative_dest);
  return Status::ok();
}

Status PackWriter::finish(const std::string& model_type, const json& hparams, const json& source_config,
                          WeightFormat dense_format, WeightFormat expert_format) {
  for (auto& lf : layer_files_) {
    for (int64_t e = 0; e < manifest_.n_expert; ++e)
      if (!lf->written[size_t(e)])
        return make_error(ErrorCode::format, "expert {} of layer {} was never written (missing from the checkpoint)", e, lf->layer);
    if (::fsync(lf->fd) != 0 || ::close(lf->fd) != 0) return make_error(ErrorCode::io, "cannot close {}", lf->relative_path);
    lf->fd = -1;
  }
  // resident.bin ends on an aligned boundary, so every part can be mapped and read with aligned I/O.
  const uint64_t resident_total = align_up(resident_size_, pack_alignment);
  if (::ftruncate(resident_fd_, off_t(resident_total)) != 0 || ::fsync(resident_fd_) != 0 || ::close(resident_fd_) != 0)
    return make_error(ErrorCode::io, "cannot finish resident.bin: {}", std::strerror(errno));
  resident_fd_ = -1;

  manifest_.model_type = model_type;
  manifest_.hparams = hparams;
  manifest_.source_config = source_config;
  manifest_.dense_format = dense_format;
  manifest_.expert_format = expert_format;
  manifest_.files.clear();
  {
    PackFileEntry f{"resident.bin", resident_total, 0};
    MF_ASSIGN_OR_RETURN(f.xxh3, hash_file(partial_dir_ + "/resident.bin"));
    manifest_.files.push_back(f);
  }
  for (auto& lf : layer_files_) {
    // An expert file's hash is XXH3-64 over its experts' hashes (little-endian u64 each), so it is
    // known without reading the file back; each blob's own hash is in experts.layers[].hashes.
    PackFileEntry f{lf->relative_path, manifest_.expert_stride * uint64_t(manifest_.n_expert),
                    hash_bytes(lf->hashes.data(), lf->hashes.size() * sizeof(uint64_t))};
    manifest_.files.push_back(f);
    manifest_.expert_layers.push_back({lf->layer, lf->relative_path, lf->hashes});
  }
  for (const auto& name : manifest_.tokenizer_files) {
    const std::string rel = "tokenizer/" + name;
    PackFileEntry f{rel, 0, 0};
    std::error_code ec;
    f.bytes = fs::file_size(partial_dir_ + "/" + rel, ec);
    MF_ASSIGN_OR_RETURN(f.xxh3, hash_file(partial_dir_ + "/" + rel));
    manifest_.files.push_back(f);
  }

  const std::string manifest_path = partial_dir_ + "/manifest.json";
  {
    std::ofstream out(manifest_path, std::ios::binary | std::ios::trunc);
    out << manifest_.to_json().dump(1) << "\n";
    out.close();
    if (!out) return make_error(ErrorCode::io, "cannot write {}", manifest_path);
  }
  std::error_code ec;
  fs::remove_all(dir_, ec);
  fs::rename(partial_dir_, dir_, ec);
  if (ec) return make_error(ErrorCode::io, "cannot rename {} to {}: {}", partial_dir_, dir_, ec.message());
  finished_ = true;
  return Status::ok();
}

// ---------------------------------------------------------------------------------------------------
// Pack

Result<std::unique_ptr<Pack>> Pack::open(const std::string& dir, const PackOpenOptions& options) {
  auto pack = std::unique_ptr<Pack>(new Pack());
  pack->dir_ = dir;
  const std::string manifest_path = dir + "/manifest.json";
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return make_error(ErrorCode::io, "{} is not a pack directory (does not exist or is not a directory)", dir);
  MF_ASSIGN_OR_RETURN(std::string text, read_text_file(manifest_path));
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    return make_error(ErrorCode::format, "{} is not valid JSON: {}", manifest_path, e.what());
  }
  auto manifest = Manifest::from_json(j);
  if (!manifest) return manifest.status().with_context(manifest_path);
  pack->manifest_ = std::move(manifest).value();
  const Manifest& m = pack->manifest_;

  // Every listed file present at its full size: a truncated pack fails here, not mid-generation.
  for (const auto& f : m.files) {
    const std::string path = dir + "/" + f.path;
    const auto size = fs::file_size(path, ec);
    if (ec) return make_error(ErrorCode::format, "pack file {} is missing: {}", path, ec.message());
    if (size != f.bytes) return make_error(ErrorCode::format, "pack file {} is {} bytes, expected {} (truncated or replaced)", path, size, f.bytes);
  }
  auto listed = [&](const std::string& rel) {
    return std::any_of(m.files.begin(), m.files.end(), [&](const PackFileEntry& f) { return f.path == rel; });
  };
  if (!listed("resident.bin")) return make_error(ErrorCode::format, "{}: resident.bin is not listed in files", manifest_path);
  for (const auto& l : m.expert_layers) {
    if (!listed(l.file)) return make_error(ErrorCode::format, "{}: expert file {} is not listed in files", manifest_path, l.file);
    const auto size = fs::file_size(dir + "/" + l.file, ec);
    if (ec || size < m.expert_stride * uint64_t(m.n_expert))
      return make_error(ErrorCode::format, "expert file {} holds {} bytes, expected {} ({} experts × stride {})", l.file, ec ? 0 : size,
                        m.expert_stride * uint64_t(m.n_expert), m.n_expert, m.expert_stride);
  }

  MF_ASSIGN_OR_RETURN(pack->resident_, MappedFile::open(dir + "/resident.bin"));
  for (const auto& t : m.tensors) {
    for (const TensorPart* p : {&t.data, &t.scales, &t.biases}) {
      if (p->bytes == 0) continue;
      if (p->offset % pack_alignment != 0 || p->offset + p->bytes > pack->resident_.size())
        return make_error(ErrorCode::format, "tensor {}: part at offset {} (+{} bytes) is misaligned or past the end of resident.bin ({} bytes)",
                          t.name, p->offset, p->bytes, pack->resident_.size());
    }
  }
  if (options.verify_resident_hash) {
    const uint64_t h = hash_bytes(pack->resident_.data(), pack->resident_.size());
    for (const auto& f : m.files)
      if (f.path == "resident.bin" && f.xxh3 != h)
        return make_error(ErrorCode::format, "{}/resident.bin is corrupt: content hash {:016x}, manifest says {:016x}", dir, h, f.xxh3);
  }
  return pack;
}

Result<WeightView> Pack::view(const uint8_t* base, const std::string& name, const std::vector<int64_t>& expected_shape) const {
  const PackTensor* t = manifest_.find_tensor(name);
  if (!t) return make_error(ErrorCode::format, "pack {}: tensor {} is missing", dir_, name);
  if (!expected_shape.empty() && t->shape != expected_shape)
    return make_error(ErrorCode::format, "pack {}: tensor {} has shape [{}], expected [{}]", dir_, name, fmt::join(t->shape, ","),
                      fmt::join(expected_shape, ","));
  WeightView v;
  v.format = t->format;
  matrix_dims(t->shape, &v.rows, &v.cols);
  v.data = base + t->data.offset;
  v.scales = t->scales.bytes ? base + t->scales.offset : nullptr;
  v.biases = t->biases.bytes ? base + t->biases.offset : nullptr;
  return v;
}

Result<const float*> Pack::view_f32(const uint8_t* base, const std::string& name, const std::vector<int64_t>& expected_shape) const {
  MF_ASSIGN_OR_RETURN(WeightView v, view(base, name, expected_shape));
  if (v.format != WeightFormat::f32)
    return make_error(ErrorCode::format, "pack {}: tensor {} is {}, expected f32", dir_, name, weight_format_name(v.format));
  return static_cast<const float*>(v.data);
}

Result<WeightView> Pack::resident(const std::string& name, const std::vector<int64_t>& expected_shape) const {
  return view(bound_ ? bound_ : resident_.data(), name, expected_shape);
}

Result<const float*> Pack::resident_f32(const std::string& name, int64_t expected_size) const {
  return resident_f32(name, std::vector<int64_t>{expected_size});
}

Result<const float*> Pack::resident_f32(const std::string& name, const std::vector<int64_t>& expected_shape) const {
  return view_f32(bound_ ? bound_ : resident_.data(), name, expected_shape);
}

Result<WeightView> Pack::resident_host(const std::string& name, const std::vector<int64_t>& expected_shape) const {
  return view(resident_.data(), name, expected_shape);
}

Result<const float*> Pack::resident_f32_host(const std::string& name, int64_t expected_size) const {
  return view_f32(resident_.data(), name, std::vector<int64_t>{expected_size});
}

std::string Pack::expert_file_path(int layer) const {
  const ExpertLayerFile* l = manifest_.find_expert_layer(layer);
  MF_CHECK_MSG(l != nullptr, "layer {} has no expert file", layer);
  return dir_ + "/" + l->file;
}

WeightView Pack::expert_view(const void* blob, size_t index) const {
  MF_CHECK(index < manifest_.expert_matrices.size());
  const ExpertMatrix& m = manifest_.expert_matrices[index];
  const uint8_t* base = static_cast<const uint8_t*>(blob);
  return {m.format, m.rows, m.cols, base + m.data.offset, m.scales.bytes ? base + m.scales.offset : nullptr,
          m.biases.bytes ? base + m.biases.offset : nullptr};
}

}  // namespace moeflux
