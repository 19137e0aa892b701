// `moeflux synth`: writes a pack of random weights at the real layer dimensions of a known model, so the
// engine and its I/O can be measured at full scale (experts of the real size and count) without a
// checkpoint. Owns the presets and the random fill; the layout itself comes from the family and PackWriter.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <numbers>

#include "commands.hpp"
#include "core/timer.hpp"
#include "format/pack.hpp"
#include "model_flags.hpp"
#include "models/model_family.hpp"
#include "quant/quantize.hpp"

namespace moeflux::cli {
namespace {

using nlohmann::json;

const char* const preset_names =
    "qwen3-30b-a3b, qwen3-235b-a22b, qwen3-next-80b-a3b, qwen3.5-35b-a3b, qwen3.5-397b-a17b or deepseek-v3 (also Cogito-V2 671B)";

// deepseek-ai/DeepSeek-V3's config.json (R1 and Cogito-V2-preview 671B share the dimensions).
json deepseek_preset_config(const std::string& name) {
  if (name != "deepseek-v3") return nullptr;
  return {{"model_type", "deepseek_v3"},
          {"hidden_size", 7168},
          {"intermediate_size", 18432},
          {"moe_intermediate_size", 2048},
          {"num_hidden_layers", 61},
          {"num_attention_heads", 128},
          {"num_key_value_heads", 128},
          {"n_routed_experts", 256},
          {"n_shared_experts", 1},
          {"num_experts_per_tok", 8},
          {"n_group", 8},
          {"topk_group", 4},
          {"routed_scaling_factor", 2.5},
          {"first_k_dense_replace", 3},
          {"norm_topk_prob", true},
          {"scoring_func", "sigmoid"},
          {"topk_method", "noaux_tc"},
          {"q_lora_rank", 1536},
          {"kv_lora_rank", 512},
          {"qk_nope_head_dim", 128},
          {"qk_rope_head_dim", 64},
          {"v_head_dim", 128},
          {"rope_theta", 10000},
          {"rope_scaling",
           {{"type", "yarn"}, {"factor", 40}, {"original_max_position_embeddings", 4096}, {"beta_fast", 32}, {"beta_slow", 1},
            {"mscale", 1.0}, {"mscale_all_dim", 1.0}}},
          {"max_position_embeddings", 163840},
          {"rms_norm_eps", 1e-6},
          {"vocab_size", 129280},
          {"tie_word_embeddings", false},
          {"hidden_act", "silu"}};
}

// The hybrid Gated DeltaNet presets (ref/model-families.md §9.1): Qwen/Qwen3-Next-80B-A3B-Instruct,
// Qwen/Qwen3.5-35B-A3B, Qwen/Qwen3.5-397B-A17B (their text configs).
json hybrid_preset_config(const std::string& name) {
  json c = {{"num_attention_heads", 16},
            {"num_key_value_heads", 2},
            {"head_dim", 256},
            {"hidden_size", 2048},
            {"moe_intermediate_size", 512},
            {"shared_expert_intermediate_size", 512},
            {"linear_conv_kernel_dim", 4},
            {"linear_key_head_dim", 128},
            {"linear_value_head_dim", 128},
            {"linear_num_key_heads", 16},
            {"linear_num_value_heads", 32},
            {"full_attention_interval", 4},
            {"rope_parameters", {{"rope_type", "default"}, {"rope_theta", 10000000.0}, {"partial_rotary_factor", 0.25}}},
            {"rms_norm_eps", 1e-6},
            {"max_position_embeddings", 262144},
            {"tie_word_embeddings", false},
            {"hidden_act", "silu"}};
  if (name == "qwen3-next-80b-a3b") {
    c["model_type"] = "qwen3_next";
    c["num_hidden_layers"] = 48;
    c["num_experts"] = 512;
    c["num_experts_per_tok"] = 10;
    c["vocab_size"] = 151936;
    c["intermediate_size"] = 5120;
    c["norm_topk_prob"] = true;
    return c;
  }
  c["model_type"] = "qwen3_5_moe_text";
  c["vocab_size"] = 248320;
  if (name == "qwen3.5-35b-a3b") {
    c["num_hidden_layers"] = 40;
    c["num_experts"] = 256;
    c["num_experts_per_tok"] = 8;
    return c;
  }
  if (name == "qwen3.5-397b-a17b") {
    c["hidden_size"] = 4096;
    c["num_hidden_layers"] = 60;
    c["num_attention_heads"] = 32;
    c["num_experts"] = 512;
    c["num_experts_per_tok"] = 10;
    c["moe_intermediate_size"] = 1024;
    c["shared_expert_intermediate_size"] = 1024;
    c["linear_num_value_heads"] = 64;
    return c;
  }
  return nullptr;
}

// config.json fields of the published checkpoints (Qwen/Qwen3-30B-A3B, Qwen/Qwen3-235B-A22B).
json preset_config(const std::string& name) {
  if (json hybrid = hybrid_preset_config(name); !hybrid.is_null()) return hybrid;
  if (json deepseek = deepseek_preset_config(name); !deepseek.is_null()) return deepseek;
  json c = {{"model_type", "qwen3_moe"},
            {"num_attention_heads", 32},
            {"num_key_value_heads", 4},
            {"head_dim", 128},
            {"num_experts", 128},
            {"num_experts_per_tok", 8},
            {"vocab_size", 151936},
            {"rope_theta", 1000000.0},
            {"norm_topk_prob", true},
            {"rms_norm_eps", 1e-6},
            {"max_position_embeddings", 40960},
            {"tie_word_embeddings", false},
            {"decoder_sparse_step", 1},
            {"mlp_only_layers", json::array()},
            {"hidden_act", "silu"}};
  if (name == "qwen3-30b-a3b") {
    c["hidden_size"] = 2048;
    c["num_hidden_layers"] = 48;
    c["moe_intermediate_size"] = 768;
    c["intermediate_size"] = 6144;
    return c;
  }
  if (name == "qwen3-235b-a22b") {
    c["hidden_size"] = 4096;
    c["num_hidden_layers"] = 94;
    c["num_attention_heads"] = 64;
    c["moe_intermediate_size"] = 1536;
    c["intermediate_size"] = 12288;
    return c;
  }
  return nullptr;
}

// splitmix64 + Box–Muller: the synthetic pack needs ~10⁹ normal samples for the embedding and head of
// a 150k vocabulary, and std::normal_distribution over mt19937 is several times slower on 2 cores.
class NormalSource {
 public:
  explicit NormalSource(uint64_t seed) : state_(seed) {}
  void fill(float* out, size_t n, float mean, float stddev) {
    size_t i = 0;
    for (; i + 1 < n; i += 2) {
      float a, b;
      pair(&a, &b);
      out[i] = mean + stddev * a;
      out[i + 1] = mean + stddev * b;
    }
    if (i < n) {
      float a, b;
      pair(&a, &b);
      out[i] = mean + stddev * a;
    }
  }

 private:
  uint64_t next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  void pair(float* a, float* b) {
    const uint64_t r = next();
    // Two 32-bit uniforms in (0, 1]; the +1 keeps log() finite.
    const float u1 = float((r >> 32) + 1) * (1.0f / 4294967296.0f);
    const float u2 = float((r & 0xffffffffu)) * (1.0f / 4294967296.0f);
    const float radius = std::sqrt(-2.0f * std::log(u1));
    const float angle = 2.0f * std::numbers::pi_v<float> * u2;
    *a = radius * std::cos(angle);
    *b = radius * std::sin(angle);
  }
  uint64_t state_;
};

QuantizedMatrix random_matrix(NormalSource& rng, int64_t rows, int64_t cols, float stddev, WeightFormat format) {
  std::vector<float> w(size_t(rows * cols));
  rng.fill(w.data(), w.size(), 0.0f, stddev);
  return quantize_matrix(w.data(), rows, cols, format);
}

struct SynthArgs {
  std::string pack_dir;
  std::string preset;
  int n_layer = 0;  // 0 = the preset's
  std::string expert_quant = "q4";
  std::string dense_quant = "q8";
  uint64_t seed = 1;
  int n_variants = 4;
  bool force = false;
};

Result<WeightFormat> parse_quant(const std::string& flag, const std::string& value) {
  const auto format = parse_weight_format(value);
  if (!format || *format == WeightFormat::f32)
    return make_error(ErrorCode::invalid_argument, "{} \"{}\": expected q4, q8 or bf16", flag, value);
  return *format;
}

Status synth(const SynthArgs& a) {
  json config = preset_config(a.preset);
  if (config.is_null())
    return make_error(ErrorCode::invalid_argument, "--preset \"{}\": expected {}", a.preset, preset_names);
  const int64_t full_layers = config["num_hidden_layers"];
  if (a.n_layer < 0 || a.n_layer > full_layers)
    return make_error(ErrorCode::invalid_argument, "--layers {}: expected 1..{} for {}", a.n_layer, full_layers, a.preset);
  if (a.n_layer > 0) config["num_hidden_layers"] = a.n_layer;
  if (a.n_variants < 1) return make_error(ErrorCode::invalid_argument, "--variants {}: expected at least 1", a.n_variants);
  MF_ASSIGN_OR_RETURN(const WeightFormat expert_format, parse_quant("--quant", a.expert_quant));
  MF_ASSIGN_OR_RETURN(const WeightFormat dense_format, parse_quant("--dense-quant", a.dense_quant));

  MF_ASSIGN_OR_RETURN(const ModelFamily* family, find_model_family(config["model_type"]));
  MF_ASSIGN_OR_RETURN(json hparams, family->normalize_config(config));
  MF_ASSIGN_OR_RETURN(std::vector<TensorDecl> resident, family->resident_tensors(hparams));
  MF_ASSIGN_OR_RETURN(ExpertDecls experts, family->expert_tensors(hparams));
  for (const auto& m : experts.matrices)
    if (!weight_format_fits(expert_format, m.cols))
      return make_error(ErrorCode::invalid_argument, "--quant {}: expert {} has {} columns, not a multiple of {}",
                        a.expert_quant, m.part, m.cols, weight_format_group(expert_format));

  MF_ASSIGN_OR_RETURN(auto writer, PackWriter::create(a.pack_dir, a.force));
  Timer timer;
  NormalSource rng(a.seed);

  uint64_t resident_bytes = 0;
  for (size_t i = 0; i < resident.size(); ++i) {
    const TensorDecl& t = resident[i];
    if (t.role == TensorRole::norm) {
      // RMSNorm gains near 1, as trained checkpoints have them, so activations keep a sane scale. The
      // other small f32 parameters (conv kernels, decay constants) take the same values: only sizes
      // matter here.
      int64_t n = 1;
      for (int64_t d : t.shape) n *= d;
      std::vector<float> w(static_cast<size_t>(n));
      rng.fill(w.data(), w.size(), 1.0f, 0.05f);
      MF_TRY(writer->add_resident(t.name, WeightFormat::f32, t.shape, w.data(), w.size() * sizeof(float)));
      resident_bytes += w.size() * sizeof(float);
      continue;
    }
    const int64_t rows = t.shape[0], cols = t.shape[1];
    const WeightFormat format = t.role == TensorRole::router ? WeightFormat::bf16 : dense_format;
    const float stddev = t.role == TensorRole::embedding ? 1.0f : 1.0f / std::sqrt(float(cols));
    const QuantizedMatrix q = random_matrix(rng, rows, cols, stddev, format);
    MF_TRY(writer->add_resident(t.name, format, t.shape, q.data.data(), q.data.size(), q.scales.empty() ? nullptr : q.scales.data(),
                                q.scales.size(), q.biases.empty() ? nullptr : q.biases.data(), q.biases.size()));
    resident_bytes += q.data.size() + q.scales.size() + q.biases.size();
    if (rows * cols >= (int64_t(1) << 26))
      std::fprintf(stderr, "synth: %s [%lld, %lld] %s (%.1f s)\n", t.name.c_str(), (long long)rows, (long long)cols,
                   weight_format_name(format), timer.seconds());
  }
  std::fprintf(stderr, "synth: %zu resident tensors, %s (%.1f s)\n", resident.size(), format_bytes(double(resident_bytes)).c_str(),
               timer.seconds());

  std::vector<ExpertMatrix> layout;
  for (const auto& m : experts.matrices) {
    ExpertMatrix em;
    em.part = m.part;
    em.format = expert_format;
    em.rows = m.rows;
    em.cols = m.cols;
    layout.push_back(em);
  }
  MF_TRY(writer->set_expert_layout(experts.n_expert, layout, experts.layers));
  const std::vector<ExpertMatrix>& placed = writer->expert_matrices();
  const uint64_t expert_bytes = writer->expert_bytes();

  // Quantizing every expert of even a few layers takes minutes on a small machine, and the engine's
  // speed does not depend on the values, so a few random blobs are quantized and repeated.
  std::vector<std::vector<uint8_t>> variants(size_t(a.n_variants));
  for (auto& blob : variants) {
    blob.assign(expert_bytes, 0);
    for (const ExpertMatrix& m : placed) {
      const QuantizedMatrix q = random_matrix(rng, m.rows, m.cols, 1.0f / std::sqrt(float(m.cols)), expert_format);
      std::memcpy(blob.data() + m.data.offset, q.data.data(), q.data.size());
      if (!q.scales.empty()) std::memcpy(blob.data() + m.scales.offset, q.scales.data(), q.scales.size());
      if (!q.biases.empty()) std::memcpy(blob.data() + m.biases.offset, q.biases.data(), q.biases.size());
    }
  }
  std::vector<uint8_t> blob(expert_bytes);
  for (size_t li = 0; li < experts.layers.size(); ++li) {
    const int layer = experts.layers[li];
    for (int64_t e = 0; e < experts.n_expert; ++e) {
      blob = variants[size_t(e + layer) % variants.size()];
      // The first weight bytes carry (layer, expert), so no two blobs (and no two manifest hashes) are
      // equal: a store that mixed experts up would fail its hash check (ExpertStoreOptions::verify_hashes).
      const uint32_t tag[2] = {uint32_t(layer), uint32_t(e)};
      std::memcpy(blob.data() + placed[0].data.offset, tag, sizeof tag);
      MF_TRY(writer->write_expert(layer, e, blob.data()));
    }
    std::fprintf(stderr, "synth: layer %d experts written (%zu/%zu, %.1f s)\n", layer, li + 1, experts.layers.size(),
                 timer.seconds());
  }

  MF_TRY(writer->finish(config["model_type"], hparams, config, dense_format, expert_format));
  const uint64_t stride = (expert_bytes + pack_alignment - 1) / pack_alignment * pack_alignment;
  const uint64_t all_experts = stride * uint64_t(experts.n_expert) * experts.layers.size();
  std::printf("%s: %s, %lld layers, dense %s, experts %s\n", a.pack_dir.c_str(), a.preset.c_str(),
              (long long)hparams["n_layer"].get<int64_t>(), weight_format_name(dense_format), weight_format_name(expert_format));
  std::printf("  resident   %s\n", format_bytes(double(resident_bytes)).c_str());
  std::printf("  experts    %s (%zu layers × %lld experts; expert %llu bytes, stride %llu)\n", format_bytes(double(all_experts)).c_str(),
              experts.layers.size(), (long long)experts.n_expert, (unsigned long long)expert_bytes, (unsigned long long)stride);
  std::printf("  written in %.1f s\n", timer.seconds());
  return Status::ok();
}

}  // namespace

void register_synth(CLI::App& app, Action& action) {
  auto args = std::make_shared<SynthArgs>();
  auto* sub = app.add_subcommand(
      "synth",
      "write a pack of random weights at a real model's dimensions, for benchmarks. The weights are random "
      "and repeat: a few expert blobs (--variants) are quantized and copied to every expert with a small tag, "
      "so outputs are meaningless; sizes, layout and I/O are those of the real model");
  sub->add_option("pack_dir", args->pack_dir, "output pack directory")->required();
  sub->add_option("--preset", args->preset, preset_names)->required();
  sub->add_option("--layers", args->n_layer, "keep only the first N layers (0 = all)");
  sub->add_option("--quant", args->expert_quant, "expert weight format: q4, q8 or bf16");
  sub->add_option("--dense-quant", args->dense_quant, "resident matrix format: q4, q8 or bf16");
  sub->add_option("--seed", args->seed, "random seed");
  sub->add_option("--variants", args->n_variants, "distinct random expert blobs to quantize and repeat");
  sub->add_flag("--force", args->force, "replace an existing pack directory");
  sub->callback([args, &action] {
    action = [args] {
      const Status s = synth(*args);
      if (!s.is_ok()) return report_error("synth", s);
      return 0;
    };
  });
}

}  // namespace moeflux::cli
