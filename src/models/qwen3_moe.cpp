// qwen3_moe (Qwen3-30B-A3B, Qwen3-235B-A22B): hyperparameters, tensors and forward pass.
// Math (ref/model-families.md §2): per layer x += o_proj(attn(rope(qk_norm(q, k)), v)) on
// RMSNorm(x); x += MoE or dense SwiGLU on RMSNorm(x); router softmax → top-k → optional renorm.
#include <cmath>
#include <utility>

#include "backends/backend.hpp"
#include "blocks/blocks.hpp"
#include "experts/expert_store.hpp"
#include "format/pack.hpp"
#include "models/hf_config.hpp"
#include "models/family_common.hpp"
#include "models/model_family.hpp"
#include "runtime/forward_state.hpp"

namespace moeflux {
namespace {

using nlohmann::json;

// Normalized hyperparameters, as stored in the pack (keys documented in docs/FORMAT.md).
struct Hparams {
  int64_t n_layer = 0, hidden = 0, n_head = 0, n_head_kv = 0, head_dim = 0, vocab = 0;
  int64_t n_expert = 0, n_expert_used = 0, moe_intermediate = 0, intermediate = 0;
  bool norm_topk_prob = false, tied = false;
  double rms_norm_eps = 1e-6, rope_theta = 1e6;
  int64_t max_position = 0;
  std::vector<bool> layer_is_moe;

  static Result<Hparams> from_json(const json& h) {
    Hparams p;
    try {
      p.n_layer = h.at("n_layer");
      p.hidden = h.at("hidden_size");
      p.n_head = h.at("n_head");
      p.n_head_kv = h.at("n_head_kv");
      p.head_dim = h.at("head_dim");
      p.vocab = h.at("vocab_size");
      p.n_expert = h.at("n_expert");
      p.n_expert_used = h.at("n_expert_used");
      p.moe_intermediate = h.at("moe_intermediate_size");
      p.intermediate = h.at("intermediate_size");
      p.norm_topk_prob = h.at("norm_topk_prob");
      p.tied = h.at("tie_word_embeddings");
      p.rms_norm_eps = h.at("rms_norm_eps");
      p.rope_theta = h.at("rope_theta");
      p.max_position = h.at("max_position_embeddings");
      for (const auto& kind : h.at("layer_ffn")) p.layer_is_moe.push_back(kind.get<std::string>() == "moe");
    } catch (const json::exception& e) {
      return make_error(ErrorCode::format, "qwen3_moe hparams: {}", e.what());
    }
    if (int64_t(p.layer_is_moe.size()) != p.n_layer)
      return make_error(ErrorCode::format, "qwen3_moe hparams: layer_ffn has {} entries, expected n_layer = {}", p.layer_is_moe.size(), p.n_layer);
    return p;
  }
};

std::string layer_name(int64_t l, const char* rest) { return fmt::format("model.layers.{}.{}", l, rest); }

class Qwen3MoeGraph;

class Qwen3MoeFamily final : public ModelFamily {
 public:
  const char* model_type() const override { return "qwen3_moe"; }

  Result<json> normalize_config(const json& c) const override {
    json h;
    // Defaults are transformers' Qwen3MoeConfig defaults.
    MF_ASSIGN_OR_RETURN(int64_t n_layer, config_required<int64_t>(c, "num_hidden_layers"));
    MF_ASSIGN_OR_RETURN(int64_t hidden, config_required<int64_t>(c, "hidden_size"));
    MF_ASSIGN_OR_RETURN(int64_t n_head, config_required<int64_t>(c, "num_attention_heads"));
    MF_ASSIGN_OR_RETURN(int64_t n_head_kv, config_value<int64_t>(c, "num_key_value_heads", n_head));
    MF_ASSIGN_OR_RETURN(int64_t head_dim, config_value<int64_t>(c, "head_dim", n_head > 0 ? hidden / n_head : 0));
    MF_ASSIGN_OR_RETURN(int64_t vocab, config_required<int64_t>(c, "vocab_size"));
    // transformers 5 writes num_local_experts; 4.x wrote num_experts.
    MF_ASSIGN_OR_RETURN(int64_t n_local_expert, config_value<int64_t>(c, "num_local_experts", 128));
    MF_ASSIGN_OR_RETURN(int64_t n_expert, config_value<int64_t>(c, "num_experts", n_local_expert));
    MF_ASSIGN_OR_RETURN(int64_t n_expert_used, config_value<int64_t>(c, "num_experts_per_tok", 8));
    MF_ASSIGN_OR_RETURN(int64_t moe_intermediate, config_value<int64_t>(c, "moe_intermediate_size", 768));
    MF_ASSIGN_OR_RETURN(int64_t intermediate, config_value<int64_t>(c, "intermediate_size", 6144));
    MF_ASSIGN_OR_RETURN(int64_t sparse_step, config_value<int64_t>(c, "decoder_sparse_step", 1));
    MF_ASSIGN_OR_RETURN(std::vector<int64_t> mlp_only, config_value<std::vector<int64_t>>(c, "mlp_only_layers", {}));
    MF_ASSIGN_OR_RETURN(bool norm_topk, config_value<bool>(c, "norm_topk_prob", false));
    MF_ASSIGN_OR_RETURN(bool tied, config_value<bool>(c, "tie_word_embeddings", false));
    MF_ASSIGN_OR_RETURN(double eps, config_value<double>(c, "rms_norm_eps", 1e-6));
    MF_ASSIGN_OR_RETURN(int64_t max_pos, config_value<int64_t>(c, "max_position_embeddings", 32768));
    MF_ASSIGN_OR_RETURN(std::string act, config_value<std::string>(c, "hidden_act", "silu"));
    MF_ASSIGN_OR_RETURN(bool attention_bias, config_value<bool>(c, "attention_bias", false));
    MF_ASSIGN_OR_RETURN(bool sliding, config_value<bool>(c, "use_sliding_window", false));

    // transformers 5 moves rope_theta / rope_scaling into rope_parameters.
    MF_ASSIGN_OR_RETURN(RopeConfig rope, read_rope_config(c, 10000.0));
    const double rope_theta = rope.theta;
    const std::string& rope_type = rope.type;

    if (act != "silu") return make_error(ErrorCode::unsupported, "qwen3_moe: hidden_act \"{}\" (only silu)", act);
    if (attention_bias) return make_error(ErrorCode::unsupported, "qwen3_moe: attention_bias = true");
    if (sliding) return make_error(ErrorCode::unsupported, "qwen3_moe: use_sliding_window = true");
    if (rope_type != "default")
      return make_error(ErrorCode::unsupported, "qwen3_moe: rope scaling \"{}\" (only the default rotary is supported so far)", rope_type);
    if (n_layer <= 0 || hidden <= 0 || n_head <= 0 || n_head_kv <= 0 || head_dim <= 0 || vocab <= 0 || head_dim % 2 != 0)
      return make_error(ErrorCode::format, "qwen3_moe: invalid dimensions (layers {}, hidden {}, heads {}/{}, head_dim {}, vocab {})",
                        n_layer, hidden, n_head, n_head_kv, head_dim, vocab);
    if (n_head % n_head_kv != 0)
      return make_error(ErrorCode::format, "qwen3_moe: num_attention_heads {} is not a multiple of num_key_value_heads {}", n_head, n_head_kv);
    if (n_expert > 0 && (n_expert_used <= 0 || n_expert_used > n_expert))
      return make_error(ErrorCode::format, "qwen3_moe: num_experts_per_tok {} outside [1, num_experts = {}]", n_expert_used, n_expert);
    if (sparse_step <= 0) return make_error(ErrorCode::format, "qwen3_moe: decoder_sparse_step {} must be positive", sparse_step);

    json layer_ffn = json::array();
    for (int64_t l = 0; l < n_layer; ++l) {
      const bool mlp_only_layer = std::find(mlp_only.begin(), mlp_only.end(), l) != mlp_only.end();
      const bool moe = !mlp_only_layer && n_expert > 0 && (l + 1) % sparse_step == 0;
      layer_ffn.push_back(moe ? "moe" : "dense");
    }
    h["n_layer"] = n_layer;
    h["hidden_size"] = hidden;
    h["n_head"] = n_head;
    h["n_head_kv"] = n_head_kv;
    h["head_dim"] = head_dim;
    h["vocab_size"] = vocab;
    h["n_expert"] = n_expert;
    h["n_expert_used"] = n_expert_used;
    h["moe_intermediate_size"] = moe_intermediate;
    h["intermediate_size"] = intermediate;
    h["norm_topk_prob"] = norm_topk;
    h["tie_word_embeddings"] = tied;
    h["rms_norm_eps"] = eps;
    h["rope_theta"] = rope_theta;
    h["max_position_embeddings"] = max_pos;
    h["layer_ffn"] = layer_ffn;
    return h;
  }

  Result<std::vector<TensorDecl>> resident_tensors(const json& hparams) const override {
    MF_ASSIGN_OR_RETURN(Hparams p, Hparams::from_json(hparams));
    std::vector<TensorDecl> d;
    const int64_t q_dim = p.n_head * p.head_dim, kv_dim = p.n_head_kv * p.head_dim;
    d.push_back({"model.embed_tokens.weight", {p.vocab, p.hidden}, TensorRole::embedding});
    for (int64_t l = 0; l < p.n_layer; ++l) {
      d.push_back({layer_name(l, "input_layernorm.weight"), {p.hidden}, TensorRole::norm});
      d.push_back({layer_name(l, "post_attention_layernorm.weight"), {p.hidden}, TensorRole::norm});
      d.push_back({layer_name(l, "self_attn.q_proj.weight"), {q_dim, p.hidden}, TensorRole::matrix});
      d.push_back({layer_name(l, "self_attn.k_proj.weight"), {kv_dim, p.hidden}, TensorRole::matrix});
      d.push_back({layer_name(l, "self_attn.v_proj.weight"), {kv_dim, p.hidden}, TensorRole::matrix});
      d.push_back({layer_name(l, "self_attn.o_proj.weight"), {p.hidden, q_dim}, TensorRole::matrix});
      d.push_back({layer_name(l, "self_attn.q_norm.weight"), {p.head_dim}, TensorRole::norm});
      d.push_back({layer_name(l, "self_attn.k_norm.weight"), {p.head_dim}, TensorRole::norm});
      if (p.layer_is_moe[size_t(l)]) {
        d.push_back({layer_name(l, "mlp.gate.weight"), {p.n_expert, p.hidden}, TensorRole::router});
      } else {
        d.push_back({layer_name(l, "mlp.gate_proj.weight"), {p.intermediate, p.hidden}, TensorRole::matrix});
        d.push_back({layer_name(l, "mlp.up_proj.weight"), {p.intermediate, p.hidden}, TensorRole::matrix});
        d.push_back({layer_name(l, "mlp.down_proj.weight"), {p.hidden, p.intermediate}, TensorRole::matrix});
      }
    }
    d.push_back({"model.norm.weight", {p.hidden}, TensorRole::norm});
    if (!p.tied) d.push_back({"lm_head.weight", {p.vocab, p.hidden}, TensorRole::matrix});
    return d;
  }

  Result<ExpertDecls> expert_tensors(const json& hparams) const override {
    MF_ASSIGN_OR_RETURN(Hparams p, Hparams::from_json(hparams));
    return swiglu_expert_decls(p.n_expert, p.layer_is_moe, p.moe_intermediate, p.hidden);
  }

  Result<std::unique_ptr<ModelGraph>> build(const Pack& pack, Backend& backend, ExpertStore& experts) const override;
};

struct LayerWeights {
  const float* input_norm = nullptr;  // [H]
  const float* post_norm = nullptr;   // [H]
  AttentionWeights attn;
  bool moe = false;
  WeightView router;                  // [E, H] (moe)
  WeightView gate, up, down;          // dense MLP (not moe)
};

struct Qwen3Scratch final : ScratchArena {
  using ScratchArena::ScratchArena;
  int64_t max_tokens = 0;
  float* x = nullptr;       // [T, H] residual stream, and the buffer it alternates with (PendingNorm::x_out)
  float* x_next = nullptr;  // [T, H]
  float* h = nullptr;       // [T, H] normalized
  float* y = nullptr;       // [T, H] block output
  AttentionScratch attn;    // [T, nH·hd]
  MoeScratch moe;
  MlpScratch dense;         // [T, I_dense]
  std::vector<int32_t> positions;
};

// Tokens per forward call: larger prompts are split by the session. Bounds scratch memory
// (Qwen3-235B: about 215 MiB of activations at 512 tokens, most of it the routed-expert rows).
constexpr int64_t batch_tokens_limit = 512;

class Qwen3MoeGraph final : public ModelGraph {
 public:
  Qwen3MoeGraph(const Pack& pack, Backend& backend, ExpertStore& experts, Hparams p)
      : pack_(pack), be_(backend), store_(experts), p_(std::move(p)) {}

  Status load() {
    const int64_t H = p_.hidden, q_dim = p_.n_head * p_.head_dim, kv_dim = p_.n_head_kv * p_.head_dim;
    MF_ASSIGN_OR_RETURN(embed_, pack_.resident("model.embed_tokens.weight", {p_.vocab, H}));
    MF_ASSIGN_OR_RETURN(final_norm_, pack_.resident_f32("model.norm.weight", H));
    if (p_.tied) {
      lm_head_ = embed_;
    } else {
      MF_ASSIGN_OR_RETURN(lm_head_, pack_.resident("lm_head.weight", {p_.vocab, H}));
    }
    for (int64_t l = 0; l < p_.n_layer; ++l) {
      LayerWeights w;
      MF_ASSIGN_OR_RETURN(w.input_norm, pack_.resident_f32(layer_name(l, "input_layernorm.weight"), H));
      MF_ASSIGN_OR_RETURN(w.post_norm, pack_.resident_f32(layer_name(l, "post_attention_layernorm.weight"), H));
      MF_ASSIGN_OR_RETURN(w.attn.q_proj, pack_.resident(layer_name(l, "self_attn.q_proj.weight"), {q_dim, H}));
      MF_ASSIGN_OR_RETURN(w.attn.k_proj, pack_.resident(layer_name(l, "self_attn.k_proj.weight"), {kv_dim, H}));
      MF_ASSIGN_OR_RETURN(w.attn.v_proj, pack_.resident(layer_name(l, "self_attn.v_proj.weight"), {kv_dim, H}));
      MF_ASSIGN_OR_RETURN(w.attn.o_proj, pack_.resident(layer_name(l, "self_attn.o_proj.weight"), {H, q_dim}));
      MF_ASSIGN_OR_RETURN(w.attn.q_norm, pack_.resident_f32(layer_name(l, "self_attn.q_norm.weight"), p_.head_dim));
      MF_ASSIGN_OR_RETURN(w.attn.k_norm, pack_.resident_f32(layer_name(l, "self_attn.k_norm.weight"), p_.head_dim));
      w.moe = p_.layer_is_moe[size_t(l)];
      if (w.moe) {
        MF_ASSIGN_OR_RETURN(w.router, pack_.resident(layer_name(l, "mlp.gate.weight"), {p_.n_expert, H}));
      } else {
        MF_ASSIGN_OR_RETURN(w.gate, pack_.resident(layer_name(l, "mlp.gate_proj.weight"), {p_.intermediate, H}));
        MF_ASSIGN_OR_RETURN(w.up, pack_.resident(layer_name(l, "mlp.up_proj.weight"), {p_.intermediate, H}));
        MF_ASSIGN_OR_RETURN(w.down, pack_.resident(layer_name(l, "mlp.down_proj.weight"), {H, p_.intermediate}));
      }
      layers_.push_back(w);
    }
    MF_TRY(check_swiglu_experts(pack_, p_.n_expert, p_.layer_is_moe, p_.moe_intermediate, H));
    // inv_freq[i] = θ^(−2i/hd) in fp32, as the reference computes it.
    inv_freq_.resize(size_t(p_.head_dim / 2));
    for (int64_t i = 0; i < p_.head_dim / 2; ++i)
      inv_freq_[size_t(i)] = 1.0f / std::pow(float(p_.rope_theta), float(2 * i) / float(p_.head_dim));
    return Status::ok();
  }

  int64_t max_batch_tokens() const override { return batch_tokens_limit; }

  Result<std::unique_ptr<ForwardState>> make_state(int64_t n_ctx) const override {
    auto state = std::make_unique<ForwardState>(be_, n_ctx);
    const size_t kv = size_t(p_.n_head_kv * p_.head_dim);
    for (int64_t l = 0; l < p_.n_layer; ++l) {
      if (!state->add_per_position(fmt::format("layer.{}.k", l), kv) || !state->add_per_position(fmt::format("layer.{}.v", l), kv))
        return make_error(ErrorCode::out_of_memory, "KV cache for {} positions ({} MiB) could not be allocated", n_ctx,
                          (2 * kv * 4 * size_t(n_ctx) * size_t(p_.n_layer)) >> 20);
    }
    auto s = std::make_unique<Qwen3Scratch>(be_);
    const int64_t T = batch_tokens_limit, H = p_.hidden, q_dim = p_.n_head * p_.head_dim;
    s->max_tokens = T;
    s->x = s->alloc(size_t(T * H));
    s->x_next = s->alloc(size_t(T * H));
    s->h = s->alloc(size_t(T * H));
    s->y = s->alloc(size_t(T * H));
    s->attn.q = s->alloc(size_t(T * q_dim));
    s->attn.out = s->alloc(size_t(T * q_dim));
    if (p_.n_expert > 0) {
      alloc_moe_scratch(*s, s->moe, T, p_.n_expert, p_.n_expert_used, H, p_.moe_intermediate);
    }
    const bool any_dense = std::find(p_.layer_is_moe.begin(), p_.layer_is_moe.end(), false) != p_.layer_is_moe.end();
    if (any_dense) {
      s->dense.gate = s->alloc(size_t(T * p_.intermediate));
      s->dense.up = s->alloc(size_t(T * p_.intermediate));
    }
    s->alloc_logits_chunk(p_.vocab);
    MF_TRY(s->status());
    state->scratch = std::move(s);
    return state;
  }

  Status forward(ForwardState& state, const int32_t* tokens, int64_t n_tokens, int64_t n_past, float* logits,
                 bool logits_all) override {
    auto& s = static_cast<Qwen3Scratch&>(*state.scratch);
    MF_TRY(check_forward_args(state, tokens, n_tokens, n_past, s.max_tokens, p_.vocab));

    const int64_t H = p_.hidden;
    s.positions.resize(size_t(n_tokens));
    for (int64_t t = 0; t < n_tokens; ++t) s.positions[size_t(t)] = int32_t(n_past + t);
    AttentionShape shape{p_.n_head, p_.n_head_kv, p_.head_dim, p_.head_dim, float(p_.rms_norm_eps),
                         1.0f / std::sqrt(float(p_.head_dim)), inv_freq_.data()};
    MoeShape moe_shape{p_.n_expert, p_.n_expert_used, H, p_.norm_topk_prob};

    // The residual stream x alternates between two buffers: each norm takes the pending residual add
    // (x + the last block's output y) into the other one, together with the matmuls that read the norm.
    float* x = s.x;
    float* x_next = s.x_next;
    be_.embed_rows(embed_, tokens, n_tokens, x);
    const auto& buffers = state.buffers();
    const float eps = float(p_.rms_norm_eps);
    for (int64_t l = 0; l < p_.n_layer; ++l) {
      const LayerWeights& w = layers_[size_t(l)];
      // The previous layer's residual add goes with this layer's first norm.
      const PendingNorm input_norm{x, l == 0 ? nullptr : s.y, w.input_norm, eps, H, x_next, s.h};
      {
        ProfileScope scope(profile, ForwardProfile::attention);
        gqa_attention(be_, w.attn, shape, s.h, n_tokens, n_past, s.positions.data(), buffers[size_t(2 * l)].data,
                      buffers[size_t(2 * l + 1)].data, s.attn, s.y, &input_norm);
      }
      if (l > 0) std::swap(x, x_next);
      const PendingNorm post_norm{x, s.y, w.post_norm, eps, H, x_next, s.h};
      if (w.moe) {
        ProfileScope scope(profile, ForwardProfile::routed_experts);
        MF_TRY(routed_moe(be_, store_, pack_, int(l), w.router, moe_shape, s.h, n_tokens, s.moe, s.y, &post_norm));
      } else {
        ProfileScope scope(profile, ForwardProfile::dense_mlp);
        swiglu_mlp(be_, w.gate, w.up, w.down, s.h, n_tokens, s.dense, s.y, &post_norm);
      }
      std::swap(x, x_next);
    }
    if (p_.n_layer > 0) be_.axpy(x, s.y, 1.0f, n_tokens * H);  // the last layer's residual add
    if (logits) output_head(be_, lm_head_, final_norm_, eps, x, n_tokens, H, logits_all, s.h, s, state, logits);
    return Status::ok();
  }

 private:
  const Pack& pack_;
  Backend& be_;
  ExpertStore& store_;
  Hparams p_;
  WeightView embed_, lm_head_;
  const float* final_norm_ = nullptr;
  std::vector<LayerWeights> layers_;
  std::vector<float> inv_freq_;
};

Result<std::unique_ptr<ModelGraph>> Qwen3MoeFamily::build(const Pack& pack, Backend& backend, ExpertStore& experts) const {
  MF_ASSIGN_OR_RETURN(Hparams p, Hparams::from_json(pack.hparams()));
  auto graph = std::make_unique<Qwen3MoeGraph>(pack, backend, experts, std::move(p));
  MF_TRY(graph->load());
  return std::unique_ptr<ModelGraph>(std::move(graph));
}

}  // namespace

const ModelFamily& qwen3_moe_family() {
  static const Qwen3MoeFamily family;
  return family;
}

}  // namespace moeflux
