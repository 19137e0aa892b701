// Checkpoint → pack conversion. The whole checkpoint is validated from the shard headers first (every
// declared tensor present with its shape and a readable dtype, every F8_E4M3 tensor with its block
// scales), so a bad checkpoint fails in seconds, before anything is written; then shards are converted
// one at a time.
#include "format/convert.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <unordered_map>
#include <unordered_set>

#include <nlohmann/json.hpp>

#include "core/units.hpp"
#include "core/aligned_buffer.hpp"
#include "core/half.hpp"
#include "core/thread_pool.hpp"
#include "core/timer.hpp"
#include "format/pack.hpp"
#include "format/safetensors.hpp"
#include "models/model_family.hpp"
#include "quant/quantize.hpp"

namespace moeflux {

namespace fs = std::filesystem;
using nlohmann::json;

const std::vector<std::string>& tokenizer_file_names() {
  static const std::vector<std::string> names = {"tokenizer.json",         "tokenizer_config.json", "special_tokens_map.json",
                                                 "vocab.json",             "merges.txt",            "generation_config.json",
                                                 "chat_template.jinja",    "chat_template.json"};
  return names;
}

namespace {

std::string shape_string(const std::vector<int64_t>& shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

// "a, b, c and 12 more"
std::string name_list(const std::vector<std::string>& names, size_t shown = 3) {
  std::string s;
  for (size_t i = 0; i < names.size() && i < shown; ++i) s += (i ? ", " : "") + names[i];
  if (names.size() > shown) s += fmt::format(" and {} more", names.size() - shown);
  return s;
}

// Where a checkpoint tensor goes.
struct Target {
  enum class Kind : uint8_t { resident, expert, fused_gate_up, fused_down };
  Kind kind = Kind::resident;
  int layer = 0;        // expert kinds
  size_t layer_index = 0;  // position of layer in ExpertDecls::layers
  int64_t expert = 0;   // Kind::expert
  size_t index = 0;     // resident: index in Plan::sources; expert: matrix index in ExpertDecls::matrices
};

// Checkpoint names as the families declare them: the multimodal layout's text tower
// ("model.language_model.layers.N…", Qwen3.5) reads as the text-only one ("model.layers.N…").
std::string canonical_name(const std::string& name) {
  static const std::string multimodal = "model.language_model.";
  if (name.compare(0, multimodal.size(), multimodal) == 0) return "model." + name.substr(multimodal.size());
  return name;
}

// The block scales of an F8_E4M3 checkpoint matrix [rows, cols] (DeepSeek-V3's layout):
// w[r, c] = fp8[r, c] · inv[r / block_rows, c / block_cols], the product rounded once to f32.
struct BlockScales {
  std::string name;  // the checkpoint's "<weight>_scale_inv"
  int64_t block_rows = 0, block_cols = 0;
  int64_t cols = 0;        // ceil(weight cols / block_cols)
  std::vector<float> inv;  // [ceil(rows / block_rows), cols] f32, every value finite
};

std::string fp8_scale_name(const std::string& weight) { return weight + "_scale_inv"; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows [row, row + count) of the F8_E4M3 matrix [*, cols] at src, dequantized into out [count, cols].
// Returns −1, or the first of those rows holding an FP8 NaN (then out is incomplete).
int64_t dequantize_fp8_rows(const uint8_t* src, int64_t row, int64_t count, int64_t cols, const BlockScales& s, float* out) {
  decode_to_f32(SafetensorsDtype::f8_e4m3, src + size_t(row * cols), size_t(count * cols), out);
  for (int64_t r = 0; r < count; ++r) {
    const uint8_t* bits = src + size_t((row + r) * cols);
    // No FP8 quantizer writes a NaN, so one is corruption, refused whatever the pack's format (a finite
    // scale makes no other NaN).
    if (std::any_of(bits, bits + cols, f8_e4m3_is_nan)) return row + r;
    const float* inv = s.inv.data() + (row + r) / s.block_rows * s.cols;
    float* w = out + r * cols;
    for (int64_t j = 0, c0 = 0; c0 < cols; ++j, c0 += s.block_cols) {
      const int64_t c1 = std::min(cols, c0 + s.block_cols);
      for (int64_t c = c0; c < c1; ++c) w[c] *= inv[j];
    }
  }
  return -1;
}

Status fp8_nan_error(const std::string& path, const std::string& tensor, int64_t row) {
  return make_error(ErrorCode::format, "{}: tensor {}: row {} holds an F8_E4M3 NaN", path, tensor, row);
}

// Encodes matrices from checkpoint tensors into a weight format, spread over a thread pool.
class MatrixEncoder {
 public:
  explicit MatrixEncoder(int n_threads) : pool_(n_threads) {}

  // Encodes the [rows, cols] matrix starting at element `first` of t into format; data/scales/biases
  // receive weight_part_bytes(format, rows, cols) bytes each (unused parts may be null). An F8_E4M3 t
  // comes with its block scales (fp8) and is read whole (first = 0).
  Status encode(const SafetensorsFile& file, const SafetensorsTensor& t, const BlockScales* fp8, int64_t first, int64_t rows,
                int64_t cols, WeightFormat format, uint8_t* data, uint8_t* scales, uint8_t* biases) {
    if (!safetensors_dtype_is_float_readable(t.dtype))
      return make_error(ErrorCode::unsupported, "{}: tensor {} has dtype {}; only BF16, F16, F32 and F8_E4M3 can be converted",
                        file.path(), t.name, safetensors_dtype_name(t.dtype));
    MF_CHECK(first >= 0 && first + rows * cols <= t.elements());
    // validate() refuses F8_E4M3 anywhere but a whole 2-D tensor, and checked its scales.
    MF_CHECK((t.dtype == SafetensorsDtype::f8_e4m3) == (fp8 != nullptr));
    MF_CHECK(!fp8 || (first == 0 && t.shape.size() == 2 && t.shape[1] == cols));
    const size_t element = safetensors_dtype_size(t.dtype);
    const uint8_t* src = file.raw(t).data() + size_t(first) * element;
    // Same representation: a copy is exact and an order of magnitude faster than decode + encode.
    if ((format == WeightFormat::bf16 && t.dtype == SafetensorsDtype::bf16) || (format == WeightFormat::f32 && t.dtype == SafetensorsDtype::f32)) {
      std::memcpy(data, src, size_t(rows * cols) * element);
      return Status::ok();
    }
    auto decode = [&](int64_t row, int64_t count, float* out) -> int64_t {
      if (fp8) return dequantize_fp8_rows(src, row, count, cols, *fp8, out);
      decode_to_f32(t.dtype, src + size_t(row * cols) * element, size_t(count * cols), out);
      return -1;
    };
    const BadRow bad = encode_rows_of(rows, cols, format, decode, data, scales, biases);
    if (bad.source_nan) return fp8_nan_error(file.path(), t.name, bad.row);
    if (bad.row >= 0)
      return make_error(ErrorCode::format, "{}: tensor {}: row {} of the matrix at element {} holds a value {} cannot represent (inf, "
                        "NaN, or beyond the fp16 scale range)", file.path(), t.name, bad.row, first, weight_format_name(format));
    return Status::ok();
  }

  // The same from an fp32 matrix already in memory (rows gathered from a checkpoint tensor); `what` names
  // it in errors.
  Status encode_f32(const float* w, int64_t rows, int64_t cols, WeightFormat format, const std::string& what, uint8_t* data,
                    uint8_t* scales, uint8_t* biases) {
    auto decode = [&](int64_t row, int64_t count, float* out) -> int64_t {
      std::memcpy(out, w + row * cols, size_t(count * cols) * 4);
      return -1;
    };
    const BadRow bad = encode_rows_of(rows, cols, format, decode, data, scales, biases);
    if (bad.row >= 0)
      return make_error(ErrorCode::format, "{}: row {} holds a value {} cannot represent (inf, NaN, or beyond the fp16 scale range)",
                        what, bad.row, weight_format_name(format));
    return Status::ok();
  }

 private:
  struct BadRow {
    int64_t row = -1;         // −1: every row encoded
    bool source_nan = false;  // the row's source holds an F8_E4M3 NaN; else it holds a value the format can't
  };

  // Encodes rows [0, rows) fetched by decode(row, count, out) as fp32, on the pool; decode returns −1 or
  // the first of its rows whose source is bad. Returns the first bad row, if any (then nothing is
  // guaranteed written).
  template <typename Decode>
  BadRow encode_rows_of(int64_t rows, int64_t cols, WeightFormat format, Decode&& decode, uint8_t* data, uint8_t* scales,
                        uint8_t* biases) {
    // Row blocks keep the f32 staging near 32 MB whatever the tensor (an embedding is gigabytes).
    const int64_t block_rows = std::max<int64_t>(1, (int64_t(8) << 20) / cols);
    // 2·row + (0: bad source, 1: unrepresentable); the smallest across threads wins.
    std::atomic<int64_t> bad_key{INT64_MAX};
    auto report = [&](int64_t key) {
      int64_t expected = bad_key.load();
      while (key < expected && !bad_key.compare_exchange_weak(expected, key)) {}
    };
    for (int64_t r0 = 0; r0 < rows; r0 += block_rows) {
      const int64_t n = std::min(block_rows, rows - r0);
      pool_.parallel_range(n, std::max<int64_t>(1, 16384 / cols), [&](int64_t begin, int64_t end) {
        const int64_t row = r0 + begin, count = end - begin;
        std::vector<float> staging(size_t(count * cols));
        const int64_t bad_source = decode(row, count, staging.data());
        if (bad_source >= 0) return report(2 * bad_source);
        const int64_t bad = first_unrepresentable_row(staging.data(), count, cols, format);
        if (bad >= 0) return report(2 * (row + bad) + 1);
        encode_rows(staging.data(), row, count, cols, format, data, scales, biases);
      });
      if (bad_key.load() != INT64_MAX) break;
    }
    const int64_t key = bad_key.load();
    if (key == INT64_MAX) return {};
    return {key / 2, key % 2 == 0};
  }

  // The quantizers abort on values they cannot encode (a broken invariant for them); for convert such a
  // value is bad input, so it is found first. Returns the first such row, or −1.
  static int64_t first_unrepresentable_row(const float* w, int64_t count, int64_t cols, WeightFormat format) {
    if (format != WeightFormat::q8 && format != WeightFormat::q4) return -1;
    // q8's fp16 scale is max|w| / 127 and fp16 tops out at 65504.
    const float limit = format == WeightFormat::q8 ? 65504.0f * 127.0f : std::numeric_limits<float>::max() / 2;
    for (int64_t r = 0; r < count; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const float v = w[r * cols + c];
        if (!(std::fabs(v) <= limit)) return r;
      }
    return -1;
  }

  // Rows [row, row + count) of the destination. Every format's parts are row-major with a fixed size
  // per row, so a row block's parts start at weight_part_bytes(format, row, cols).
  static void encode_rows(const float* w, int64_t row, int64_t count, int64_t cols, WeightFormat format, uint8_t* data,
                          uint8_t* scales, uint8_t* biases) {
    const WeightPartBytes at = weight_part_bytes(format, row, cols);
    switch (format) {
      case WeightFormat::f32: std::memcpy(data + at.data, w, size_t(count * cols) * 4); return;
      case WeightFormat::bf16:
        for (int64_t i = 0; i < count * cols; ++i) {
          const uint16_t h = f32_to_bf16(w[i]);
          std::memcpy(data + at.data + size_t(i) * 2, &h, 2);
        }
        return;
      case WeightFormat::q8:
      case WeightFormat::q4: {
        const QuantizedMatrix q = quantize_matrix(w, count, cols, format);
        std::memcpy(data + at.data, q.data.data(), q.data.size());
        if (!q.scales.empty()) std::memcpy(scales + at.scales, q.scales.data(), q.scales.size());
        if (!q.biases.empty()) std::memcpy(biases + at.biases, q.biases.data(), q.biases.size());
        return;
      }
    }
  }

  ThreadPool pool_;
};

// Progress on stderr: one `\r`-updated line on a terminal, a line every few seconds otherwise.
class ProgressPrinter {
 public:
  explicit ProgressPrinter(const ConvertOptions& o) : enabled_(o.progress), callback_(o.on_progress), tty_(::isatty(2) == 1) {}

  void update(const ConvertProgress& p) {
    if (callback_) return callback_(p);
    if (!enabled_) return;
    // Terminals redraw at 10 Hz; logs get a line every 10 s so they stay readable.
    if (!p.finished && p.seconds - last_ < (tty_ ? 0.1 : 10.0)) return;
    last_ = p.seconds;
    const double rate = p.seconds > 0 ? double(p.bytes_done) / p.seconds : 0;
    const double eta = rate > 0 ? double(p.bytes_total - p.bytes_done) / rate : 0;
    const std::string line =
        fmt::format("shard {}/{}  tensors {}/{}  {} / {}  {}/s  ETA {}:{:02d}", p.shard, p.n_shards, p.tensors_done, p.tensors_total,
                    format_bytes(double(p.bytes_done)), format_bytes(double(p.bytes_total)), format_bytes(rate), int(eta) / 60, int(eta) % 60);
    if (tty_) {
      std::fprintf(stderr, "\r\033[K%s%s", line.c_str(), p.finished ? "\n" : "");
      line_open_ = !p.finished;
    } else {
      std::fprintf(stderr, "%s\n", line.c_str());
    }
    std::fflush(stderr);
  }

  void warn(const std::string& message) {
    if (!enabled_ || callback_) return;
    if (line_open_) std::fprintf(stderr, "\n");
    line_open_ = false;
    std::fprintf(stderr, "warning: %s\n", message.c_str());
  }

  // Ends an open `\r` line (on error, so the error message starts on its own line).
  void close() {
    if (line_open_) std::fprintf(stderr, "\n");
    line_open_ = false;
  }

 private:
  bool enabled_;
  std::function<void(const ConvertProgress&)> callback_;
  bool tty_;
  bool line_open_ = false;
  double last_ = -1e9;
};

Status check_destination(const ConvertOptions& o) {
  if (o.pack_dir.empty()) return make_error(ErrorCode::invalid_argument, "no pack directory given");
  std::error_code ec;
  if (!fs::exists(o.pack_dir, ec)) return Status::ok();
  if (!o.overwrite) return make_error(ErrorCode::invalid_argument, "{} already exists (use --force to replace it)", o.pack_dir);
  if (fs::equivalent(o.pack_dir, o.hf_dir, ec))
    return make_error(ErrorCode::invalid_argument, "the pack directory {} is the checkpoint directory", o.pack_dir);
  // --force replaces a pack, never an arbitrary directory a typo pointed at.
  if (!fs::is_directory(o.pack_dir, ec))
    return make_error(ErrorCode::invalid_argument, "{} exists and is not a directory; refusing to replace it", o.pack_dir);
  if (!fs::exists(o.pack_dir + "/manifest.json", ec) && !fs::is_empty(o.pack_dir, ec))
    return make_error(ErrorCode::invalid_argument, "{} exists and is not a moeflux pack (no manifest.json); refusing to replace it", o.pack_dir);
  return Status::ok();
}

Result<json> read_config(const std::string& hf_dir) {
  std::error_code ec;
  if (!fs::is_directory(hf_dir, ec)) return make_error(ErrorCode::io, "checkpoint directory {} does not exist", hf_dir);
  const std::string path = hf_dir + "/config.json";
  if (!fs::exists(path, ec))
    return make_error(ErrorCode::format, "{} has no config.json (expected a Hugging Face checkpoint directory)", hf_dir);
  MF_ASSIGN_OR_RETURN(std::string text, read_text_file(path));
  json config;
  try {
    config = json::parse(text);
  } catch (const json::exception& e) {
    return make_error(ErrorCode::format, "{} is not valid JSON: {}", path, e.what());
  }
  if (!config.is_object()) return make_error(ErrorCode::format, "{} is not a JSON object", path);
  if (!config.contains("model_type") || !config["model_type"].is_string())
    return make_error(ErrorCode::format, "{} has no \"model_type\" string", path);
  return config;
}

// The plan: where every checkpoint tensor goes, checked against the family's declarations.
struct Plan {
  std::vector<TensorDecl> resident;
  ExpertDecls experts;
  std::unordered_map<std::string, Target> targets;  // by canonical checkpoint name
  // Resident declarations grouped by the checkpoint tensor they come from (one, or several row
  // selections of one source); Target::index of a resident target indexes this.
  std::vector<std::vector<size_t>> sources;
  std::vector<std::string> extra;     // checkpoint tensors nobody declared
  std::vector<std::string> fallback;  // resident matrices stored bf16 instead of the dense format
  std::vector<WeightFormat> resident_format;  // per TensorDecl
  size_t gate = SIZE_MAX, up = SIZE_MAX, down = SIZE_MAX;  // matrix indices for the fused layout
  // F8_E4M3 checkpoint tensors (checkpoint names), each read with its "<name>_scale_inv" block scales;
  // the block is config.json's quantization_config.weight_block_size.
  std::vector<std::string> fp8;
  int64_t fp8_block_rows = 128, fp8_block_cols = 128;
};

WeightFormat format_for(const TensorDecl& d, WeightFormat dense) {
  switch (d.role) {
    case TensorRole::norm: return WeightFormat::f32;
    case TensorRole::router: return WeightFormat::bf16;
    case TensorRole::matrix:
    case TensorRole::embedding: return dense;
  }
  return dense;
}

// The checkpoint tensor a resident declaration reads and the shape it must have there.
const std::string& source_name(const TensorDecl& d) { return d.source.empty() ? d.name : d.source; }
const std::vector<int64_t>& source_shape(const TensorDecl& d) { return d.source.empty() ? d.shape : d.source_shape; }

Status build_targets(Plan& plan) {
  std::unordered_map<std::string, bool> pack_names;
  for (size_t i = 0; i < plan.resident.size(); ++i) {
    const auto& d = plan.resident[i];
    if (!pack_names.emplace(d.name, true).second) return make_error(ErrorCode::internal, "tensor {} declared twice", d.name);
    if (!d.source.empty() && (int64_t(d.source_rows.size()) != d.shape.front() || d.source_shape.size() < 2 ||
                              d.source_shape.back() != d.shape.back()))
      return make_error(ErrorCode::internal, "tensor {}: row selection from {} does not fit its shape", d.name, d.source);
    auto it = plan.targets.find(source_name(d));
    if (it != plan.targets.end()) {
      const size_t first = plan.sources[it->second.index].front();
      if (d.source.empty() || plan.resident[first].source.empty() || source_shape(plan.resident[first]) != source_shape(d))
        return make_error(ErrorCode::internal, "checkpoint tensor {} declared twice with different uses", source_name(d));
      plan.sources[it->second.index].push_back(i);
      continue;
    }
    Target t;
    t.kind = Target::Kind::resident;
    t.index = plan.sources.size();
    plan.sources.push_back({i});
    plan.targets.emplace(source_name(d), t);
  }
  const auto& m = plan.experts.matrices;
  for (size_t i = 0; i < m.size(); ++i) {
    if (m[i].part == "gate_proj") plan.gate = i;
    if (m[i].part == "up_proj") plan.up = i;
    if (m[i].part == "down_proj") plan.down = i;
  }
  for (size_t li = 0; li < plan.experts.layers.size(); ++li) {
    const int layer = plan.experts.layers[li];
    const std::string prefix = plan.experts.expert_prefix(layer);
    for (int64_t e = 0; e < plan.experts.n_expert; ++e)
      for (size_t i = 0; i < m.size(); ++i)
        plan.targets[fmt::format("{}.{}.{}.weight", prefix, e, m[i].part)] = {Target::Kind::expert, layer, li, e, i};
    if (plan.gate != SIZE_MAX && plan.up != SIZE_MAX && plan.down != SIZE_MAX) {
      plan.targets[prefix + ".gate_up_proj"] = {Target::Kind::fused_gate_up, layer, li, 0, 0};
      plan.targets[prefix + ".down_proj"] = {Target::Kind::fused_down, layer, li, 0, 0};
    }
  }
  return Status::ok();
}

// Checks every checkpoint tensor against the plan (shape, dtype, no duplicates) and that every
// declared tensor is present, before anything is written.
Status validate(const CheckpointIndex& index, const std::string& hf_dir, Plan& plan) {
  std::vector<bool> resident_seen(plan.sources.size(), false);
  const size_t n_layers = plan.experts.layers.size();
  const size_t n_matrices = plan.experts.matrices.size();
  const int64_t n_expert = plan.experts.n_expert;
  // seen[layer index][expert × n_matrices + matrix]
  std::vector<std::vector<bool>> expert_seen(n_layers, std::vector<bool>(size_t(n_expert) * n_matrices, false));
  std::vector<bool> layer_fused(n_layers, false);
  auto mark = [&](const Target& t, int64_t e, size_t m, const std::string& name) -> Status {
    std::vector<bool>& seen = expert_seen[t.layer_index];
    const size_t bit = size_t(e) * n_matrices + m;
    if (seen[bit]) return make_error(ErrorCode::format, "{}: expert {} {} of layer {} appears twice (tensor {} and another)", hf_dir, e,
                               plan.experts.matrices[m].part, t.layer, name);
    seen[bit] = true;
    return Status::ok();
  };

  for (const auto& shard : index.shards) {
    for (const auto& st : shard.tensors) {
      auto it = plan.targets.find(canonical_name(st.name));
      if (it == plan.targets.end()) {
        plan.extra.push_back(st.name);
        continue;
      }
      if (!safetensors_dtype_is_float_readable(st.dtype))
        return make_error(ErrorCode::unsupported, "{}: tensor {} has dtype {}; only BF16, F16, F32 and F8_E4M3 (with block scales) can be "
                          "converted", shard.path, st.name, safetensors_dtype_name(st.dtype));
      const Target& t = it->second;
      std::vector<int64_t> expected;
      const auto& mats = plan.experts.matrices;
      switch (t.kind) {
        case Target::Kind::resident: expected = source_shape(plan.resident[plan.sources[t.index].front()]); break;
        case Target::Kind::expert: expected = {mats[t.index].rows, mats[t.index].cols}; break;
        case Target::Kind::fused_gate_up: expected = {n_expert, mats[plan.gate].rows + mats[plan.up].rows, mats[plan.gate].cols}; break;
        case Target::Kind::fused_down: expected = {n_expert, mats[plan.down].rows, mats[plan.down].cols}; break;
      }
      if (st.shape != expected)
        return make_error(ErrorCode::mismatch, "{}: tensor {}: shape {}, expected {} (from config.json)", shard.path, st.name,
                          shape_string(st.shape), shape_string(expected));
      if (st.dtype == SafetensorsDtype::f8_e4m3) {
        if (t.kind == Target::Kind::fused_gate_up || t.kind == Target::Kind::fused_down)
          return make_error(ErrorCode::unsupported, "{}: tensor {} is F8_E4M3 in the fused expert layout, which no published checkpoint "
                            "uses; FP8 experts are read per expert ({}.{{e}}.{{gate,up,down}}_proj.weight with their _scale_inv)",
                            shard.path, st.name, plan.experts.expert_prefix(t.layer));
        if (st.shape.size() != 2)
          return make_error(ErrorCode::unsupported, "{}: tensor {} is F8_E4M3 with shape {}; block-scaled FP8 is read only for 2-D "
                            "matrices", shard.path, st.name, shape_string(st.shape));
        plan.fp8.push_back(st.name);
      }
      switch (t.kind) {
        case Target::Kind::resident: resident_seen[t.index] = true; break;
        case Target::Kind::expert: MF_TRY(mark(t, t.expert, t.index, st.name)); break;
        case Target::Kind::fused_gate_up:
          layer_fused[t.layer_index] = true;
          for (int64_t e = 0; e < n_expert; ++e) {
            MF_TRY(mark(t, e, plan.gate, st.name));
            MF_TRY(mark(t, e, plan.up, st.name));
          }
          break;
        case Target::Kind::fused_down:
          layer_fused[t.layer_index] = true;
          for (int64_t e = 0; e < n_expert; ++e) MF_TRY(mark(t, e, plan.down, st.name));
          break;
      }
    }
  }

  std::vector<std::string> missing;
  for (size_t i = 0; i < plan.sources.size(); ++i)
    if (!resident_seen[i]) missing.push_back(source_name(plan.resident[plan.sources[i].front()]));
  for (size_t li = 0; li < n_layers; ++li) {
    const std::string prefix = plan.experts.expert_prefix(plan.experts.layers[li]);
    for (int64_t e = 0; e < n_expert; ++e)
      for (size_t m = 0; m < n_matrices; ++m) {
        if (expert_seen[li][size_t(e) * n_matrices + m]) continue;
        // A layer stored fused is missing a fused tensor, named once; otherwise per-expert names.
        std::string name = !layer_fused[li] ? fmt::format("{}.{}.{}.weight", prefix, e, plan.experts.matrices[m].part)
                           : m == plan.down ? prefix + ".down_proj"
                                            : prefix + ".gate_up_proj";
        if (std::find(missing.begin(), missing.end(), name) == missing.end()) missing.push_back(std::move(name));
      }
  }
  if (!missing.empty())
    return make_error(ErrorCode::format, "{}: tensor {} is missing from the checkpoint ({} declared tensor{} missing: {})", hf_dir,
                      missing[0], missing.size(), missing.size() == 1 ? " is" : "s are", name_list(missing));
  return Status::ok();
}

// config.json's quantization_config, read when the checkpoint holds F8_E4M3 tensors: quant_method
// "fp8" (or absent) and weight_block_size [rows, cols] (absent: [128, 128], DeepSeek-V3's).
Status read_fp8_block(const json& config, const std::string& config_path, Plan& plan) {
  const std::string needed_by = fmt::format("needed by F8_E4M3 tensor {}{}", plan.fp8.front(),
                                            plan.fp8.size() > 1 ? fmt::format(" and {} more", plan.fp8.size() - 1) : "");
  if (!config.contains("quantization_config")) return Status::ok();
  const json& q = config["quantization_config"];
  if (!q.is_object()) return make_error(ErrorCode::format, "{}: quantization_config is not an object ({})", config_path, needed_by);
  if (q.contains("quant_method") && q["quant_method"] != "fp8")
    return make_error(ErrorCode::unsupported, "{}: quantization_config.quant_method is {}; F8_E4M3 tensors are read only as "
                      "block-scaled \"fp8\" with <name>_scale_inv companions ({})", config_path, q["quant_method"].dump(), needed_by);
  if (!q.contains("weight_block_size")) return Status::ok();
  const json& b = q["weight_block_size"];
  auto positive = [](const json& v) { return v.is_number_integer() && v.get<int64_t>() > 0; };
  if (!b.is_array() || b.size() != 2 || !positive(b[0]) || !positive(b[1]))
    return make_error(ErrorCode::format, "{}: quantization_config.weight_block_size is {}, expected two positive integers [rows, cols] "
                      "({})", config_path, b.dump(), needed_by);
  plan.fp8_block_rows = b[0].get<int64_t>();
  plan.fp8_block_cols = b[1].get<int64_t>();
  return Status::ok();
}

std::vector<int64_t> fp8_scale_shape(const std::vector<int64_t>& weight_shape, const Plan& plan) {
  return {ceil_div(weight_shape[0], plan.fp8_block_rows), ceil_div(weight_shape[1], plan.fp8_block_cols)};
}

Status scale_shape_error(const std::string& path, const SafetensorsTensor& scale, const SafetensorsTensor& weight, const Plan& plan) {
  return make_error(ErrorCode::mismatch, "{}: tensor {}: shape {}, expected {} (the block scales of {} {} in blocks of [{}, {}] from "
                    "quantization_config.weight_block_size)", path, scale.name, shape_string(scale.shape),
                    shape_string(fp8_scale_shape(weight.shape, plan)), weight.name, shape_string(weight.shape), plan.fp8_block_rows,
                    plan.fp8_block_cols);
}

// Every F8_E4M3 tensor's "<name>_scale_inv": present in some shard, F32, BF16 or F16, one value per
// block. The scales are read with their weights, so they are not reported as unused.
Status validate_fp8_scales(const CheckpointIndex& index, Plan& plan) {
  std::unordered_map<std::string, std::pair<const SafetensorsTensor*, const std::string*>> by_name;  // tensor, shard path
  for (const auto& shard : index.shards)
    for (const auto& t : shard.tensors) by_name.emplace(t.name, std::pair{&t, &shard.path});
  std::unordered_set<std::string> consumed;
  for (const std::string& name : plan.fp8) {
    auto weight_it = by_name.find(name);
    MF_CHECK(weight_it != by_name.end());  // validate() took the name from the index
    const auto [weight, weight_path] = weight_it->second;
    const std::string scale_name = fp8_scale_name(name);
    auto it = by_name.find(scale_name);
    if (it == by_name.end())
      return make_error(ErrorCode::format, "{}: tensor {} is F8_E4M3 but its block scales {} are missing from the checkpoint",
                        *weight_path, name, scale_name);
    const auto [scale, scale_path] = it->second;
    if (scale->dtype != SafetensorsDtype::f32 && scale->dtype != SafetensorsDtype::bf16 && scale->dtype != SafetensorsDtype::f16)
      return make_error(ErrorCode::unsupported, "{}: tensor {} (the block scales of {}) has dtype {}; expected F32, BF16 or F16",
                        *scale_path, scale_name, name, safetensors_dtype_name(scale->dtype));
    if (scale->shape != fp8_scale_shape(weight->shape, plan)) return scale_shape_error(*scale_path, *scale, *weight, plan);
    consumed.insert(scale_name);
  }
  std::erase_if(plan.extra, [&](const std::string& name) { return consumed.count(name) > 0; });
  return Status::ok();
}

// Drops the mapping's pages of a tensor already converted. They are clean file pages, so this loses
// nothing; it keeps the process's resident set at about one tensor instead of the whole shard.
void release_pages(std::span<const uint8_t> bytes) {
  const uintptr_t page = uintptr_t(::sysconf(_SC_PAGESIZE));
  const uintptr_t begin = align_up(uintptr_t(bytes.data()), page);
  const uintptr_t end = uintptr_t(bytes.data() + bytes.size()) / page * page;
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

// Expert blobs being assembled; an expert's matrices may straddle shards.
struct PendingExperts {
  struct Blob {
    std::vector<uint8_t> bytes;
    uint32_t have = 0;  // bit per matrix
  };
  std::map<std::pair<int, int64_t>, Blob> blobs;

  // The blob of (layer, expert), created zero-filled (padding between parts is zero, so hashes are
  // reproducible).
  Blob& get(int layer, int64_t expert, uint64_t bytes) {
    Blob& b = blobs[{layer, expert}];
    if (b.bytes.empty()) b.bytes.assign(bytes, 0);
    return b;
  }
};

}  // namespace

Status convert_checkpoint(const ConvertOptions& o, ConvertSummary* summary_out) {
  Timer timer;
  ProgressPrinter printer(o);
  ConvertSummary summary;
  MF_TRY(check_destination(o));
  MF_ASSIGN_OR_RETURN(json config, read_config(o.hf_dir));
  const std::string config_path = o.hf_dir + "/config.json";
  summary.model_type = config["model_type"].get<std::string>();
  auto family_result = find_model_family(summary.model_type);
  if (!family_result) return family_result.status().with_context(config_path);
  const ModelFamily& family = *family_result.value();
  auto hparams_result = family.normalize_config(config);
  if (!hparams_result) return hparams_result.status().with_context(config_path);
  const json hparams = std::move(hparams_result).value();

  Plan plan;
  MF_ASSIGN_OR_RETURN(plan.resident, family.resident_tensors(hparams));
  MF_ASSIGN_OR_RETURN(plan.experts, family.expert_tensors(hparams));
  if (plan.experts.layers.empty() || plan.experts.n_expert <= 0) {
    plan.experts.layers.clear();
    plan.experts.n_expert = 0;
  }
  for (const auto& m : plan.experts.matrices) {
    if (plan.experts.layers.empty()) break;
    if (!weight_format_fits(o.expert_format, m.cols))
      return make_error(ErrorCode::unsupported,
                        "expert matrix {} is [{}, {}]: {} columns are not a multiple of the {} group ({}); every expert blob shares "
                        "one layout, so experts cannot fall back to bf16 — choose another expert format",
                        m.part, m.rows, m.cols, m.cols, weight_format_name(o.expert_format), weight_format_group(o.expert_format));
  }
  for (const auto& d : plan.resident) {
    WeightFormat f = format_for(d, o.dense_format);
    if (!weight_format_fits(f, d.shape.back())) {
      plan.fallback.push_back(d.name);
      f = WeightFormat::bf16;
    }
    plan.resident_format.push_back(f);
  }
  MF_TRY(build_targets(plan));

  MF_ASSIGN_OR_RETURN(CheckpointIndex index, scan_checkpoint_dir(o.hf_dir));
  MF_TRY(validate(index, o.hf_dir, plan));
  if (!plan.fp8.empty()) {
    MF_TRY(read_fp8_block(config, config_path, plan));
    MF_TRY(validate_fp8_scales(index, plan));
  }
  if (!plan.extra.empty())
    printer.warn(fmt::format("skipping {} checkpoint tensor{} that {} does not use: {}", plan.extra.size(),
                             plan.extra.size() == 1 ? "" : "s", summary.model_type, name_list(plan.extra)));
  if (!plan.fallback.empty())
    printer.warn(fmt::format("{} matri{} stored as bf16 because the column count is not a multiple of the {} group ({}): {}",
                             plan.fallback.size(), plan.fallback.size() == 1 ? "x" : "ces", weight_format_name(o.dense_format),
                             weight_format_group(o.dense_format), name_list(plan.fallback)));

  MF_ASSIGN_OR_RETURN(auto writer, PackWriter::create(o.pack_dir, o.overwrite));
  if (!plan.experts.layers.empty()) {
    std::vector<ExpertMatrix> matrices;
    for (const auto& m : plan.experts.matrices) {
      ExpertMatrix em;
      em.part = m.part;
      em.format = o.expert_format;
      em.rows = m.rows;
      em.cols = m.cols;
      matrices.push_back(em);
    }
    MF_TRY(writer->set_expert_layout(plan.experts.n_expert, std::move(matrices), plan.experts.layers));
  }
  const std::vector<ExpertMatrix>& layout = writer->expert_matrices();
  const uint32_t full_mask = (1u << layout.size()) - 1;

  MatrixEncoder encoder(o.n_threads);
  PendingExperts pending;
  ConvertProgress progress;
  progress.n_shards = int(index.shards.size());
  progress.tensors_total = index.tensor_count();
  progress.bytes_total = index.tensor_bytes;

  // The shard a scale companion is read from when it is not the shard being converted: mapped while
  // needed, one at a time (Hugging Face's sharding keeps most scales beside their weights).
  std::optional<SafetensorsFile> scale_file;
  size_t scale_file_shard = SIZE_MAX;

  // The block scales of F8_E4M3 tensor t of shard `shard` (file), from whichever shard holds them.
  auto read_scales = [&](size_t shard, const SafetensorsFile& file, const SafetensorsTensor& t) -> Result<BlockScales> {
    BlockScales s;
    s.name = fp8_scale_name(t.name);
    s.block_rows = plan.fp8_block_rows;
    s.block_cols = plan.fp8_block_cols;
    auto shard_it = index.tensor_shard.find(s.name);
    MF_CHECK(shard_it != index.tensor_shard.end());  // validate_fp8_scales found it
    const size_t at = shard_it->second;
    const SafetensorsFile* from = &file;
    if (at != shard) {
      if (scale_file_shard != at) {
        scale_file.reset();
        scale_file_shard = SIZE_MAX;
        MF_ASSIGN_OR_RETURN(SafetensorsFile opened, SafetensorsFile::open(index.shards[at].path));
        scale_file.emplace(std::move(opened));
        scale_file_shard = at;
      }
      from = &*scale_file;
    }
    // The shard was opened again since the scan; what validate checked is checked again.
    const SafetensorsTensor* st = from->find(s.name);
    if (!st) return make_error(ErrorCode::format, "{}: no tensor {} (the file changed during conversion?)", from->path(), s.name);
    if (st->shape != fp8_scale_shape(t.shape, plan)) return scale_shape_error(from->path(), *st, t, plan);
    s.cols = st->shape[1];
    s.inv.resize(size_t(st->elements()));
    const std::span<const uint8_t> bytes = from->raw(*st);
    MF_TRY(from->to_f32(*st, 0, st->elements(), s.inv.data()));
    release_pages(bytes);
    for (size_t i = 0; i < s.inv.size(); ++i)
      if (!std::isfinite(s.inv[i]))
        return make_error(ErrorCode::format, "{}: tensor {}: block [{}, {}] is {}; block scales must be finite", from->path(), s.name,
                          int64_t(i) / s.cols, int64_t(i) % s.cols, s.inv[i]);
    return s;
  };

  // Encodes matrix m of (layer, expert) from `first` in t into its blob; writes the blob once complete.
  auto put_expert = [&](const SafetensorsFile& file, const SafetensorsTensor& t, const BlockScales* fp8, int64_t first, int layer,
                        int64_t expert, size_t m) -> Status {
    PendingExperts::Blob& blob = pending.get(layer, expert, writer->expert_bytes());
    const ExpertMatrix& em = layout[m];
    uint8_t* base = blob.bytes.data();
    MF_TRY(encoder.encode(file, t, fp8, first, em.rows, em.cols, em.format, base + em.data.offset,
                          em.scales.bytes ? base + em.scales.offset : nullptr, em.biases.bytes ? base + em.biases.offset : nullptr));
    blob.have |= 1u << m;
    if (blob.have == full_mask) {
      MF_TRY(writer->write_expert(layer, expert, blob.bytes.data()));
      pending.blobs.erase({layer, expert});
    }
    return Status::ok();
  };

  auto convert_shard = [&](size_t shard) -> Status {
    if (scale_file_shard == shard) {  // a second mapping of the shard being converted is of no use
      scale_file.reset();
      scale_file_shard = SIZE_MAX;
    }
    MF_ASSIGN_OR_RETURN(SafetensorsFile file, SafetensorsFile::open(index.shards[shard].path));
    for (const SafetensorsTensor& t : file.tensors()) {
      auto it = plan.targets.find(canonical_name(t.name));
      if (it != plan.targets.end()) {
        const Target& target = it->second;
        std::optional<BlockScales> block_scales;
        if (t.dtype == SafetensorsDtype::f8_e4m3) {
          MF_ASSIGN_OR_RETURN(BlockScales read, read_scales(shard, file, t));
          block_scales.emplace(std::move(read));
          ++summary.fp8_tensors;
        }
        const BlockScales* fp8 = block_scales ? &*block_scales : nullptr;
        switch (target.kind) {
          case Target::Kind::resident: {
            std::vector<float> whole;  // the source as fp32, decoded once for its row selections
            for (size_t i : plan.sources[target.index]) {
              const TensorDecl& d = plan.resident[i];
              const WeightFormat f = plan.resident_format[i];
              const int64_t cols = d.shape.back(), rows = d.source.empty() ? t.elements() / std::max<int64_t>(1, cols) : d.shape.front();
              const WeightPartBytes b = weight_part_bytes(f, rows, cols);
              std::vector<uint8_t> data(b.data), scales(b.scales), biases(b.biases);
              if (d.source.empty()) {
                MF_TRY(encoder.encode(file, t, fp8, 0, rows, cols, f, data.data(), scales.data(), biases.data()));
              } else {
                if (whole.empty()) {
                  whole.resize(size_t(t.elements()));
                  if (fp8) {
                    const int64_t bad = dequantize_fp8_rows(file.raw(t).data(), 0, t.shape[0], t.shape[1], *fp8, whole.data());
                    if (bad >= 0) return fp8_nan_error(file.path(), t.name, bad);
                  } else {
                    decode_to_f32(t.dtype, file.raw(t).data(), whole.size(), whole.data());
                  }
                }
                const int64_t source_rows = t.elements() / cols;
                std::vector<float> selected(size_t(rows * cols));
                for (int64_t r = 0; r < rows; ++r) {
                  const int64_t from = d.source_rows[size_t(r)];
                  if (from < 0 || from >= source_rows)
                    return make_error(ErrorCode::internal, "tensor {}: row {} of {} selected, which has {}", d.name, from, t.name, source_rows);
                  std::memcpy(selected.data() + r * cols, whole.data() + from * cols, size_t(cols) * 4);
                }
                MF_TRY(encoder.encode_f32(selected.data(), rows, cols, f, fmt::format("{}: tensor {} (from {})", file.path(), d.name, t.name),
                                          data.data(), scales.data(), biases.data()));
              }
              MF_TRY(writer->add_resident(d.name, f, d.shape, data.data(), data.size(), scales.data(), scales.size(), biases.data(),
                                          biases.size()));
              ++summary.resident_tensors;
            }
            break;
          }
          case Target::Kind::expert: MF_TRY(put_expert(file, t, fp8, 0, target.layer, target.expert, target.index)); break;
          case Target::Kind::fused_gate_up: {
            const int64_t gate_elements = layout[plan.gate].rows * layout[plan.gate].cols;
            const int64_t up_elements = layout[plan.up].rows * layout[plan.up].cols;
            for (int64_t e = 0; e < plan.experts.n_expert; ++e) {
              const int64_t first = e * (gate_elements + up_elements);
              MF_TRY(put_expert(file, t, fp8, first, target.layer, e, plan.gate));
              MF_TRY(put_expert(file, t, fp8, first + gate_elements, target.layer, e, plan.up));
            }
            break;
          }
          case Target::Kind::fused_down: {
            const int64_t elements = layout[plan.down].rows * layout[plan.down].cols;
            for (int64_t e = 0; e < plan.experts.n_expert; ++e) MF_TRY(put_expert(file, t, fp8, e * elements, target.layer, e, plan.down));
            break;
          }
        }
        ++summary.checkpoint_tensors;
      }
      release_pages(file.raw(t));
      ++progress.tensors_done;
      progress.bytes_done += t.bytes;
      progress.seconds = timer.seconds();
      printer.update(progress);
    }
    return Status::ok();
  };

  for (size_t s = 0; s < index.shards.size(); ++s) {
    progress.shard = int(s) + 1;
    const Status status = convert_shard(s);
    if (!status.is_ok()) {
      printer.close();
      return status;
    }
  }
  if (!pending.blobs.empty()) {
    // validate() proved every matrix present, so this is a bug, not bad input.
    const auto& [key, blob] = *pending.blobs.begin();
    return make_error(ErrorCode::internal, "expert {} of layer {} incomplete after the last shard", key.second, key.first);
  }

  for (const auto& name : tokenizer_file_names()) {
    const std::string path = o.hf_dir + "/" + name;
    std::error_code ec;
    if (!fs::is_regular_file(path, ec)) continue;
    MF_TRY(writer->add_file(path, name));
    summary.tokenizer_files.push_back(name);
  }
  MF_TRY(writer->finish(summary.model_type, hparams, config, o.dense_format, o.expert_format));

  std::error_code ec;
  summary.resident_bytes = fs::file_size(o.pack_dir + "/resident.bin", ec);
  summary.n_expert = plan.experts.n_expert;
  summary.n_expert_layers = plan.experts.layers.size();
  summary.expert_blob_bytes = writer->expert_bytes();
  summary.expert_stride = align_up(summary.expert_blob_bytes, pack_alignment);
  summary.expert_file_bytes = summary.expert_stride * uint64_t(summary.n_expert) * summary.n_expert_layers;
  summary.source_bytes = progress.bytes_done;
  summary.fallback_tensors = std::move(plan.fallback);
  summary.extra_tensors = std::move(plan.extra);
  summary.seconds = timer.seconds();
  progress.seconds = summary.seconds;
  progress.finished = true;
  printer.update(progress);
  if (summary_out) *summary_out = std::move(summary);
  return Status::ok();
}

}  // namespace moeflux
