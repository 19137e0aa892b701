// Writes safetensors files and tiny qwen3_moe checkpoints for tests (see test_checkpoint.hpp).
#include "test_checkpoint.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sys/wait.h>

#include "core/half.hpp"
#include "format/safetensors.hpp"

namespace moeflux::test {

namespace fs = std::filesystem;
using nlohmann::json;

const TestTensor* TinyCheckpoint::find(const std::string& name) const {
  for (const auto& t : tensors)
    if (t.name == name) return &t;
  return nullptr;
}

std::vector<float> TinyCheckpoint::values(const std::string& name) const {
  const TestTensor* t = find(name);
  if (!t) return {};
  if (t->dtype != "F8_E4M3") return tensor_values(*t);
  return tensor_values(*t, find(name + "_scale_inv"), config["quantization_config"]["weight_block_size"].get<std::vector<int64_t>>());
}

namespace {

SafetensorsDtype dtype_of(const std::string& name) {
  for (SafetensorsDtype d : {SafetensorsDtype::bf16, SafetensorsDtype::f16, SafetensorsDtype::f32, SafetensorsDtype::f8_e4m3})
    if (name == safetensors_dtype_name(d)) return d;
  MF_CHECK_MSG(false, "tensor_values: dtype {}", name);
  return SafetensorsDtype::f32;
}

int64_t elements_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// The nearest finite e4m3fn value (ties to the smaller magnitude): codes 0x00…0x7e increase with
// magnitude, so a binary search over them, then the sign.
uint8_t nearest_f8_e4m3(float v) {
  const float a = std::fabs(v);
  int lo = 0, hi = 0x7e;  // f(lo) ≤ |v| < f(hi) (or |v| ≥ 448) until they are adjacent
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    (f8_e4m3_to_f32(uint8_t(mid)) <= a ? lo : hi) = mid;
  }
  const int bits = a - f8_e4m3_to_f32(uint8_t(lo)) <= f8_e4m3_to_f32(uint8_t(hi)) - a ? lo : hi;
  return uint8_t(bits | (std::signbit(v) ? 0x80 : 0));
}

}  // namespace

std::vector<float> tensor_values(const TestTensor& t, const TestTensor* scale, const std::vector<int64_t>& block) {
  std::vector<float> out(size_t(elements_of(t.shape)));
  decode_to_f32(dtype_of(t.dtype), t.bytes.data(), out.size(), out.data());
  if (t.dtype != "F8_E4M3") return out;
  MF_CHECK_MSG(scale && block.size() == 2 && t.shape.size() == 2, "tensor_values: {} needs its scales and block", t.name);
  const std::vector<float> inv = tensor_values(*scale);
  const int64_t cols = t.shape[1], scale_cols = scale->shape[1];
  for (int64_t r = 0; r < t.shape[0]; ++r)
    for (int64_t c = 0; c < cols; ++c) out[size_t(r * cols + c)] *= inv[size_t(r / block[0] * scale_cols + c / block[1])];
  return out;
}

std::pair<TestTensor, TestTensor> quantize_fp8(const TestTensor& t, const std::vector<int64_t>& block, const std::string& scale_dtype) {
  MF_CHECK(t.shape.size() == 2 && block.size() == 2 && (scale_dtype == "F32" || scale_dtype == "BF16"));
  const int64_t rows = t.shape[0], cols = t.shape[1];
  const int64_t scale_rows = (rows + block[0] - 1) / block[0], scale_cols = (cols + block[1] - 1) / block[1];
  const std::vector<float> w = tensor_values(t);
  TestTensor q{t.name, "F8_E4M3", t.shape, std::vector<uint8_t>(size_t(rows * cols))};
  TestTensor s{t.name + "_scale_inv", scale_dtype, {scale_rows, scale_cols}, {}};
  for (int64_t br = 0; br < scale_rows; ++br)
    for (int64_t bc = 0; bc < scale_cols; ++bc) {
      const int64_t r1 = std::min(rows, (br + 1) * block[0]), c1 = std::min(cols, (bc + 1) * block[1]);
      float amax = 0;
      for (int64_t r = br * block[0]; r < r1; ++r)
        for (int64_t c = bc * block[1]; c < c1; ++c) amax = std::max(amax, std::fabs(w[size_t(r * cols + c)]));
      float scale = amax > 0 ? amax / 448.0f : 1.0f;
      if (scale_dtype == "BF16") {
        const uint16_t h = f32_to_bf16(scale);
        scale = bf16_to_f32(h);
        s.bytes.push_back(uint8_t(h & 0xff));
        s.bytes.push_back(uint8_t(h >> 8));
      } else {
        uint8_t b[4];
        std::memcpy(b, &scale, 4);
        s.bytes.insert(s.bytes.end(), b, b + 4);
      }
      for (int64_t r = br * block[0]; r < r1; ++r)
        for (int64_t c = bc * block[1]; c < c1; ++c) q.bytes[size_t(r * cols + c)] = nearest_f8_e4m3(w[size_t(r * cols + c)] / scale);
    }
  return {std::move(q), std::move(s)};
}

Status write_safetensors(const std::string& path, const std::vector<TestTensor>& tensors) {
  json header = json::object();
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  header["__metadata__"] = {{"format", "pt"}};
  std::string text = header.dump();
  // Real writers pad the header with spaces to 8 bytes; an odd length here keeps the data unaligned,
  // which the reader must handle.
  const uint64_t n = text.size();
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  for (int i = 0; i < 8; ++i) out.put(char((n >> (8 * i)) & 0xff));
  out.write(text.data(), std::streamsize(text.size()));
  for (const auto& t : tensors) out.write(reinterpret_cast<const char*>(t.bytes.data()), std::streamsize(t.bytes.size()));
  out.close();
  if (!out) return make_error(ErrorCode::io, "cannot write {}", path);
  return Status::ok();
}

namespace {

struct Generator {
  std::mt19937_64 rng;
  std::uniform_real_distribution<float> uniform{-0.1f, 0.1f};

  TestTensor bf16(const std::string& name, std::vector<int64_t> shape, float center = 0.0f) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    TestTensor t{name, "BF16", std::move(shape), std::vector<uint8_t>(size_t(n) * 2)};
    for (int64_t i = 0; i < n; ++i) {
      const uint16_t h = f32_to_bf16(center + uniform(rng));
      t.bytes[size_t(2 * i)] = uint8_t(h & 0xff);
      t.bytes[size_t(2 * i + 1)] = uint8_t(h >> 8);
    }
    return t;
  }
};

// Concatenates the per-expert matrices of one part of one layer into a [E, rows, cols] tensor; with
// `second`, each expert's slice is first's rows then second's (gate_up_proj: gate rows, then up rows).
TestTensor fuse(const std::string& name, const std::vector<const TestTensor*>& first, const std::vector<const TestTensor*>& second) {
  const int64_t rows = first[0]->shape[0] * (second.empty() ? 1 : 2);
  TestTensor t{name, first[0]->dtype, {int64_t(first.size()), rows, first[0]->shape[1]}, {}};
  for (size_t e = 0; e < first.size(); ++e) {
    t.bytes.insert(t.bytes.end(), first[e]->bytes.begin(), first[e]->bytes.end());
    if (!second.empty()) t.bytes.insert(t.bytes.end(), second[e]->bytes.begin(), second[e]->bytes.end());
  }
  return t;
}

}  // namespace

Result<TinyCheckpoint> make_tiny_qwen3_moe_checkpoint(const std::string& dir, const TinyCheckpointOptions& o) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return make_error(ErrorCode::io, "cannot create {}: {}", dir, ec.message());
  TinyCheckpoint ck;
  ck.config = {
      {"architectures", {"Qwen3MoeForCausalLM"}},
      {"model_type", "qwen3_moe"},
      {"hidden_size", o.hidden},
      {"num_hidden_layers", o.layers},
      {"num_attention_heads", o.heads},
      {"num_key_value_heads", o.kv_heads},
      {"head_dim", o.head_dim},
      {"num_experts", o.n_expert},
      {"num_experts_per_tok", o.top_k},
      {"moe_intermediate_size", o.moe_intermediate},
      {"intermediate_size", o.intermediate},
      {"vocab_size", o.vocab},
      {"mlp_only_layers", o.mlp_only_layers},
      {"decoder_sparse_step", 1},
      {"tie_word_embeddings", o.tied},
      {"norm_topk_prob", o.norm_topk_prob},
      {"rms_norm_eps", 1e-6},
      {"rope_theta", 1000000.0},
      {"max_position_embeddings", 4096},
      {"hidden_act", "silu"},
      {"attention_bias", false},
      {"use_sliding_window", false},
      {"torch_dtype", "bfloat16"},
  };
  const bool fp8 = !o.fp8_block.empty();
  if (fp8)
    ck.config["quantization_config"] = {
        {"quant_method", "fp8"}, {"fmt", "e4m3"}, {"activation_scheme", "dynamic"}, {"weight_block_size", o.fp8_block}};
  {
    std::ofstream out(dir + "/config.json");
    out << ck.config.dump(2) << "\n";
    if (!out) return make_error(ErrorCode::io, "cannot write {}/config.json", dir);
  }

  Generator g{std::mt19937_64(o.seed)};
  std::vector<TestTensor> files_tensors;  // what goes into the shards, in order
  std::vector<TestTensor> scales_first, scales_last;  // FP8 scales written before / after everything else
  auto add = [&](TestTensor t) {
    ck.tensors.push_back(t);
    files_tensors.push_back(std::move(t));
  };
  // A *_proj matrix as written: bf16, or F8_E4M3 and its scales.
  auto matrix = [&](const std::string& name, std::vector<int64_t> shape) -> std::vector<TestTensor> {
    TestTensor t = g.bf16(name, std::move(shape));
    if (!fp8) return {std::move(t)};
    auto [q, s] = quantize_fp8(t, o.fp8_block, o.fp8_scale_dtype);
    return {std::move(q), std::move(s)};
  };
  auto add_matrix = [&](std::vector<TestTensor> written, int64_t layer) {
    for (size_t i = 0; i < written.size(); ++i) {
      ck.tensors.push_back(written[i]);
      const bool scale = i == 1;
      if (scale && layer == 0) scales_last.push_back(std::move(written[i]));
      else if (scale && layer == o.layers - 1 && o.layers > 1) scales_first.push_back(std::move(written[i]));
      else files_tensors.push_back(std::move(written[i]));
    }
  };
  const int64_t q_dim = o.heads * o.head_dim, kv_dim = o.kv_heads * o.head_dim;
  add(g.bf16("model.embed_tokens.weight", {o.vocab, o.hidden}));
  for (int64_t l = 0; l < o.layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    add(g.bf16(p + "input_layernorm.weight", {o.hidden}, 1.0f));
    add(g.bf16(p + "post_attention_layernorm.weight", {o.hidden}, 1.0f));
    add_matrix(matrix(p + "self_attn.q_proj.weight", {q_dim, o.hidden}), l);
    add_matrix(matrix(p + "self_attn.k_proj.weight", {kv_dim, o.hidden}), l);
    add_matrix(matrix(p + "self_attn.v_proj.weight", {kv_dim, o.hidden}), l);
    add_matrix(matrix(p + "self_attn.o_proj.weight", {o.hidden, q_dim}), l);
    add(g.bf16(p + "self_attn.q_norm.weight", {o.head_dim}, 1.0f));
    add(g.bf16(p + "self_attn.k_norm.weight", {o.head_dim}, 1.0f));
    const bool moe = o.n_expert > 0 && std::find(o.mlp_only_layers.begin(), o.mlp_only_layers.end(), l) == o.mlp_only_layers.end();
    if (!moe) {
      add_matrix(matrix(p + "mlp.gate_proj.weight", {o.intermediate, o.hidden}), l);
      add_matrix(matrix(p + "mlp.up_proj.weight", {o.intermediate, o.hidden}), l);
      add_matrix(matrix(p + "mlp.down_proj.weight", {o.hidden, o.intermediate}), l);
      continue;
    }
    add(g.bf16(p + "mlp.gate.weight", {o.n_expert, o.hidden}));
    std::vector<std::vector<TestTensor>> experts;  // [3e + part]: gate_proj, up_proj, down_proj as written
    for (int64_t e = 0; e < o.n_expert; ++e) {
      const std::string ep = fmt::format("{}mlp.experts.{}.", p, e);
      experts.push_back(matrix(ep + "gate_proj.weight", {o.moe_intermediate, o.hidden}));
      experts.push_back(matrix(ep + "up_proj.weight", {o.moe_intermediate, o.hidden}));
      experts.push_back(matrix(ep + "down_proj.weight", {o.hidden, o.moe_intermediate}));
    }
    if (!o.fused_experts) {
      for (auto& m : experts) add_matrix(std::move(m), l);
      continue;
    }
    std::vector<const TestTensor*> gate, up, down;
    for (int64_t e = 0; e < o.n_expert; ++e) {
      gate.push_back(&experts[size_t(3 * e)][0]);
      up.push_back(&experts[size_t(3 * e + 1)][0]);
      down.push_back(&experts[size_t(3 * e + 2)][0]);
    }
    for (const auto& m : experts) ck.tensors.insert(ck.tensors.end(), m.begin(), m.end());
    files_tensors.push_back(fuse(p + "mlp.experts.gate_up_proj", gate, up));
    files_tensors.push_back(fuse(p + "mlp.experts.down_proj", down, {}));
  }
  add(g.bf16("model.norm.weight", {o.hidden}, 1.0f));
  if (!o.tied) add(g.bf16("lm_head.weight", {o.vocab, o.hidden}));
  files_tensors.insert(files_tensors.begin(), std::make_move_iterator(scales_first.begin()), std::make_move_iterator(scales_first.end()));
  files_tensors.insert(files_tensors.end(), std::make_move_iterator(scales_last.begin()), std::make_move_iterator(scales_last.end()));

  if (o.n_shards <= 1) {
    MF_TRY(write_safetensors(dir + "/model.safetensors", files_tensors));
    return ck;
  }
  // Contiguous runs of roughly equal count, as HF's sharding by size gives contiguous runs too.
  json weight_map = json::object();
  const size_t per_shard = (files_tensors.size() + size_t(o.n_shards) - 1) / size_t(o.n_shards);
  for (int s = 0; s < o.n_shards; ++s) {
    const std::string name = fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, o.n_shards);
    const size_t begin = std::min(files_tensors.size(), size_t(s) * per_shard);
    const size_t end = std::min(files_tensors.size(), begin + per_shard);
    std::vector<TestTensor> part(files_tensors.begin() + long(begin), files_tensors.begin() + long(end));
    for (const auto& t : part) weight_map[t.name] = name;
    MF_TRY(write_safetensors(dir + "/" + name, part));
  }
  std::ofstream out(dir + "/model.safetensors.index.json");
  out << json{{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}}.dump(2) << "\n";
  if (!out) return make_error(ErrorCode::io, "cannot write {}/model.safetensors.index.json", dir);
  return ck;
}

CliResult run_cli(const std::string& args, const std::string& scratch_dir) {
  const std::string out = scratch_dir + "/cli_stdout.txt", err = scratch_dir + "/cli_stderr.txt";
  const std::string command = fmt::format("'{}' {} > '{}' 2> '{}'", MOEFLUX_CLI_PATH, args, out, err);
  const int status = std::system(command.c_str());
  CliResult r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  auto slurp = [](const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  };
  r.out = slurp(out);
  r.err = slurp(err);
  return r;
}

}  // namespace moeflux::test

// Under AddressSanitizer a failed allocation aborts by default; the engine reports it as a status
// instead (tested with an impossible KV cache), so let allocations fail the way they do in a normal
// build. Unused without the sanitizer.
extern "C" const char* __asan_default_options() { return "allocator_may_return_null=1"; }
