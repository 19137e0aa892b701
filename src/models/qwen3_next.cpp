// The hybrid Gated DeltaNet MoE family: qwen3_next (Qwen3-Next-80B-A3B) and qwen3_5_moe /
// qwen3_5_moe_text (Qwen3.5-397B-A17B, -122B-A10B, Qwen3.5/3.6-35B-A3B).
// Math (ref/model-families.md §3–4): per layer x += mixer(RMSNorm₁₊w(x)), the mixer a Gated DeltaNet
// (linear attention with a recurrent state) or gated full attention by the config's layer_types; then
// x += MoE(RMSNorm₁₊w(x)) with a sigmoid-gated shared expert (or a dense SwiGLU on qwen3_next's
// mlp_only_layers). Norms of the (1 + w) kind everywhere except the DeltaNet's gated output norm.
//
// The pack stores one layout for both model types: the DeltaNet input projections flat
// (in_proj_qkv rows [Q all heads | K | V], in_proj_z, in_proj_b, in_proj_a, as Qwen3.5 ships them);
// qwen3_next's head-grouped in_proj_qkvz / in_proj_ba are regrouped by row at conversion.
#include <algorithm>
#include <cmath>
#include <deque>
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
  int64_t n_layer = 0, hidden = 0, n_head = 0, n_head_kv = 0, head_dim = 0, rot_dim = 0, vocab = 0;
  int64_t n_expert = 0, n_expert_used = 0, moe_intermediate = 0, shared_intermediate = 0, intermediate = 0;
  int64_t conv_kernel = 0, lin_k_heads = 0, lin_v_heads = 0, lin_k_dim = 0, lin_v_dim = 0;
  bool norm_topk_prob = true, tied = false;
  double rms_norm_eps = 1e-6, rope_theta = 1e7;
  int64_t max_position = 0;
  std::vector<bool> layer_is_linear;  // else full attention
  std::vector<bool> layer_is_moe;     // else dense SwiGLU

  int64_t key_dim() const { return lin_k_heads * lin_k_dim; }
  int64_t value_dim() const { return lin_v_heads * lin_v_dim; }
  int64_t conv_dim() const { return 2 * key_dim() + value_dim(); }

  static Result<Hparams> from_json(const json& h) {
    Hparams p;
    try {
      p.n_layer = h.at("n_layer");
      p.hidden = h.at("hidden_size");
      p.n_head = h.at("n_head");
      p.n_head_kv = h.at("n_head_kv");
      p.head_dim = h.at("head_dim");
      p.rot_dim = h.at("rope_dim");
      p.vocab = h.at("vocab_size");
      p.n_expert = h.at("n_expert");
      p.n_expert_used = h.at("n_expert_used");
      p.moe_intermediate = h.at("moe_intermediate_size");
      p.shared_intermediate = h.at("shared_expert_intermediate_size");
      p.intermediate = h.at("intermediate_size");
      p.conv_kernel = h.at("linear_conv_kernel_dim");
      p.lin_k_heads = h.at("linear_num_key_heads");
      p.lin_v_heads = h.at("linear_num_value_heads");
      p.lin_k_dim = h.at("linear_key_head_dim");
      p.lin_v_dim = h.at("linear_value_head_dim");
      p.norm_topk_prob = h.at("norm_topk_prob");
      p.tied = h.at("tie_word_embeddings");
      p.rms_norm_eps = h.at("rms_norm_eps");
      p.rope_theta = h.at("rope_theta");
      p.max_position = h.at("max_position_embeddings");
      for (const auto& kind : h.at("layer_types")) p.layer_is_linear.push_back(kind.get<std::string>() == "linear_attention");
      for (const auto& kind : h.at("layer_ffn")) p.layer_is_moe.push_back(kind.get<std::string>() == "moe");
    } catch (const json::exception& e) {
      return make_error(ErrorCode::format, "hybrid DeltaNet hparams: {}", e.what());
    }
    if (int64_t(p.layer_is_linear.size()) != p.n_layer || int64_t(p.layer_is_moe.size()) != p.n_layer)
      return make_error(ErrorCode::format, "hparams: layer_types has {} and layer_ffn {} entries, expected n_layer = {}",
                        p.layer_is_linear.size(), p.layer_is_moe.size(), p.n_layer);
    // A pack's hparams are input too (a hand-edited manifest): every invariant the ops rely on.
    const bool any_moe = std::find(p.layer_is_moe.begin(), p.layer_is_moe.end(), true) != p.layer_is_moe.end();
    const bool any_dense = std::find(p.layer_is_moe.begin(), p.layer_is_moe.end(), false) != p.layer_is_moe.end();
    const bool ok = p.n_layer > 0 && p.hidden > 0 && p.n_head > 0 && p.n_head_kv > 0 && p.n_head % p.n_head_kv == 0 && p.head_dim > 0 &&
                    p.rot_dim > 0 && p.rot_dim % 2 == 0 && p.rot_dim <= p.head_dim && p.vocab > 0 && p.conv_kernel >= 1 &&
                    p.lin_k_heads > 0 && p.lin_v_heads > 0 && p.lin_v_heads % p.lin_k_heads == 0 && p.lin_k_dim > 0 && p.lin_v_dim > 0 &&
                    p.shared_intermediate >= 0 && (!any_dense || p.intermediate > 0) &&
                    (!any_moe || (p.n_expert > 0 && p.n_expert_used > 0 && p.n_expert_used <= p.n_expert && p.moe_intermediate > 0));
    if (!ok) return make_error(ErrorCode::format, "hybrid DeltaNet hparams are inconsistent: {}", h.dump());
    return p;
  }
};

std::string layer_name(int64_t l, const char* rest) { return fmt::format("model.layers.{}.{}", l, rest); }

// qwen3_next (its own config) or qwen3_5_moe / qwen3_5_moe_text (text hyperparameters, nested under
// text_config in the multimodal config).
class Qwen3NextFamily final : public ModelFamily {
 public:
  explicit Qwen3NextFamily(const char* type) : type_(type), qwen3_5_(std::string(type) != "qwen3_next") {}
  const char* model_type() const override { return type_; }

  Result<json> normalize_config(const json& top) const override {
    const json& c = top.contains("text_config") && top["text_config"].is_object() ? top["text_config"] : top;
    const char* t = type_;
    // Defaults are transformers' Qwen3NextConfig / Qwen3_5MoeTextConfig defaults.
    MF_ASSIGN_OR_RETURN(int64_t n_layer, config_required<int64_t>(c, "num_hidden_layers"));
    MF_ASSIGN_OR_RETURN(int64_t hidden, config_required<int64_t>(c, "hidden_size"));
    MF_ASSIGN_OR_RETURN(int64_t n_head, config_required<int64_t>(c, "num_attention_heads"));
    MF_ASSIGN_OR_RETURN(int64_t n_head_kv, config_value<int64_t>(c, "num_key_value_heads", 2));
    MF_ASSIGN_OR_RETURN(int64_t head_dim, config_value<int64_t>(c, "head_dim", 256));
    MF_ASSIGN_OR_RETURN(int64_t vocab, config_required<int64_t>(c, "vocab_size"));
    MF_ASSIGN_OR_RETURN(int64_t n_local_expert, config_value<int64_t>(c, "num_local_experts", qwen3_5_ ? 256 : 512));
    MF_ASSIGN_OR_RETURN(int64_t n_expert, config_value<int64_t>(c, "num_experts", n_local_expert));
    MF_ASSIGN_OR_RETURN(int64_t n_expert_used, config_value<int64_t>(c, "num_experts_per_tok", qwen3_5_ ? 8 : 10));
    MF_ASSIGN_OR_RETURN(int64_t moe_intermediate, config_value<int64_t>(c, "moe_intermediate_size", 512));
    MF_ASSIGN_OR_RETURN(int64_t shared_intermediate, config_value<int64_t>(c, "shared_expert_intermediate_size", 512));
    MF_ASSIGN_OR_RETURN(double eps, config_value<double>(c, "rms_norm_eps", 1e-6));
    MF_ASSIGN_OR_RETURN(int64_t max_pos, config_value<int64_t>(c, "max_position_embeddings", 32768));
    MF_ASSIGN_OR_RETURN(std::string act, config_value<std::string>(c, "hidden_act", "silu"));
    MF_ASSIGN_OR_RETURN(bool attention_bias, config_value<bool>(c, "attention_bias", false));
    MF_ASSIGN_OR_RETURN(int64_t conv_kernel, config_value<int64_t>(c, "linear_conv_kernel_dim", 4));
    MF_ASSIGN_OR_RETURN(int64_t k_heads, config_value<int64_t>(c, "linear_num_key_heads", 16));
    MF_ASSIGN_OR_RETURN(int64_t v_heads, config_value<int64_t>(c, "linear_num_value_heads", 32));
    MF_ASSIGN_OR_RETURN(int64_t k_dim, config_value<int64_t>(c, "linear_key_head_dim", 128));
    MF_ASSIGN_OR_RETURN(int64_t v_dim, config_value<int64_t>(c, "linear_value_head_dim", 128));
    MF_ASSIGN_OR_RETURN(int64_t interval, config_value<int64_t>(c, "full_attention_interval", 4));
    // The multimodal wrapper may carry tie_word_embeddings at the top level.
    MF_ASSIGN_OR_RETURN(bool tied_text, config_value<bool>(c, "tie_word_embeddings", false));
    MF_ASSIGN_OR_RETURN(bool tied, config_value<bool>(top, "tie_word_embeddings", tied_text));
    MF_ASSIGN_OR_RETURN(RopeConfig rope, read_rope_config(c, 10000.0, 0.25));
    // Qwen3.5 removed these: every layer is MoE and the top-k weights are always renormalized.
    bool norm_topk = true;
    int64_t intermediate = 0, sparse_step = 1;
    std::vector<int64_t> mlp_only;
    if (!qwen3_5_) {
      MF_ASSIGN_OR_RETURN(norm_topk, config_value<bool>(c, "norm_topk_prob", true));
      MF_ASSIGN_OR_RETURN(intermediate, config_value<int64_t>(c, "intermediate_size", 5120));
      MF_ASSIGN_OR_RETURN(sparse_step, config_value<int64_t>(c, "decoder_sparse_step", 1));
      MF_ASSIGN_OR_RETURN(mlp_only, config_value<std::vector<int64_t>>(c, "mlp_only_layers", {}));
    }

    if (act != "silu") return make_error(ErrorCode::unsupported, "{}: hidden_act \"{}\" (only silu)", t, act);
    if (attention_bias) return make_error(ErrorCode::unsupported, "{}: attention_bias = true", t);
    // Qwen3.5's interleaved M-RoPE equals plain partial rotary for text (all three position rows equal).
    if (rope.type != "default")
      return make_error(ErrorCode::unsupported, "{}: rope scaling \"{}\" (only the default rotary is supported so far)", t, rope.type);
    if (n_layer <= 0 || hidden <= 0 || n_head <= 0 || n_head_kv <= 0 || head_dim <= 0 || vocab <= 0)
      return make_error(ErrorCode::format, "{}: invalid dimensions (layers {}, hidden {}, heads {}/{}, head_dim {}, vocab {})", t, n_layer,
                        hidden, n_head, n_head_kv, head_dim, vocab);
    if (n_head % n_head_kv != 0)
      return make_error(ErrorCode::format, "{}: num_attention_heads {} is not a multiple of num_key_value_heads {}", t, n_head, n_head_kv);
    const int64_t rot_dim = int64_t(double(head_dim) * rope.partial_rotary_factor);
    if (rot_dim <= 0 || rot_dim > head_dim || rot_dim % 2 != 0)
      return make_error(ErrorCode::format, "{}: partial_rotary_factor {} gives {} rotary dims of head_dim {} (need an even count)", t,
                        rope.partial_rotary_factor, rot_dim, head_dim);
    if (conv_kernel < 1 || k_heads <= 0 || v_heads <= 0 || k_dim <= 0 || v_dim <= 0)
      return make_error(ErrorCode::format, "{}: invalid linear attention dimensions (kernel {}, key heads {}, value heads {}, dims {}/{})", t,
                        conv_kernel, k_heads, v_heads, k_dim, v_dim);
    if (v_heads % k_heads != 0)
      return make_error(ErrorCode::format, "{}: linear_num_value_heads {} is not a multiple of linear_num_key_heads {}", t, v_heads, k_heads);
    if (n_expert > 0 && (n_expert_used <= 0 || n_expert_used > n_expert))
      return make_error(ErrorCode::format, "{}: num_experts_per_tok {} outside [1, num_experts = {}]", t, n_expert_used, n_expert);
    if (sparse_step <= 0) return make_error(ErrorCode::format, "{}: decoder_sparse_step {} must be positive", t, sparse_step);
    if (shared_intermediate < 0) return make_error(ErrorCode::format, "{}: shared_expert_intermediate_size {} is negative", t, shared_intermediate);

    json layer_types = json::array();
    if (c.contains("layer_types") && !c["layer_types"].is_null()) {
      if (!c["layer_types"].is_array() || int64_t(c["layer_types"].size()) != n_layer)
        return make_error(ErrorCode::format, "{}: layer_types must list {} layers", t, n_layer);
      for (const auto& v : c["layer_types"]) {
        const std::string kind = v.is_string() ? v.get<std::string>() : v.dump();
        if (kind != "linear_attention" && kind != "full_attention")
          return make_error(ErrorCode::unsupported, "{}: layer type \"{}\" (expected linear_attention or full_attention)", t, kind);
        layer_types.push_back(kind);
      }
    } else {
      if (interval <= 0) return make_error(ErrorCode::format, "{}: full_attention_interval {} must be positive", t, interval);
      for (int64_t l = 0; l < n_layer; ++l) layer_types.push_back((l + 1) % interval == 0 ? "full_attention" : "linear_attention");
    }
    json layer_ffn = json::array();
    for (int64_t l = 0; l < n_layer; ++l) {
      const bool mlp_only_layer = std::find(mlp_only.begin(), mlp_only.end(), l) != mlp_only.end();
      layer_ffn.push_back(!mlp_only_layer && n_expert > 0 && (l + 1) % sparse_step == 0 ? "moe" : "dense");
    }
    const bool any_dense = std::find(layer_ffn.begin(), layer_ffn.end(), "dense") != layer_ffn.end();
    if (any_dense && intermediate <= 0) return make_error(ErrorCode::format, "{}: dense layers need intermediate_size > 0", t);

    json h;
    h["n_layer"] = n_layer;
    h["hidden_size"] = hidden;
    h["n_head"] = n_head;
    h["n_head_kv"] = n_head_kv;
    h["head_dim"] = head_dim;
    h["rope_dim"] = rot_dim;
    h["vocab_size"] = vocab;
    h["n_expert"] = n_expert;
    h["n_expert_used"] = n_expert_used;
    h["moe_intermediate_size"] = moe_intermediate;
    h["shared_expert_intermediate_size"] = shared_intermediate;
    h["intermediate_size"] = intermediate;
    h["linear_conv_kernel_dim"] = conv_kernel;
    h["linear_num_key_heads"] = k_heads;
    h["linear_num_value_heads"] = v_heads;
    h["linear_key_head_dim"] = k_dim;
    h["linear_value_head_dim"] = v_dim;
    h["norm_topk_prob"] = norm_topk;
    h["tie_word_embeddings"] = tied;
    h["rms_norm_eps"] = eps;
    h["rope_theta"] = rope.theta;
    h["max_position_embeddings"] = max_pos;
    h["layer_types"] = layer_types;
    h["layer_ffn"] = layer_ffn;
    return h;
  }

  Result<std::vector<TensorDecl>> resident_tensors(const json& hparams) const override {
    MF_ASSIGN_OR_RETURN(Hparams p, Hparams::from_json(hparams));
    std::vector<TensorDecl> d;
    const int64_t H = p.hidden, q_dim = p.n_head * p.head_dim, kv_dim = p.n_head_kv * p.head_dim;
    const int64_t Vd = p.value_dim(), nv = p.lin_v_heads;
    d.push_back({"model.embed_tokens.weight", {p.vocab, H}, TensorRole::embedding});
    for (int64_t l = 0; l < p.n_layer; ++l) {
      d.push_back({layer_name(l, "input_layernorm.weight"), {H}, TensorRole::norm});
      d.push_back({layer_name(l, "post_attention_layernorm.weight"), {H}, TensorRole::norm});
      if (p.layer_is_linear[size_t(l)]) {
        if (qwen3_5_) {
          d.push_back({layer_name(l, "linear_attn.in_proj_qkv.weight"), {p.conv_dim(), H}, TensorRole::matrix});
          d.push_back({layer_name(l, "linear_attn.in_proj_z.weight"), {Vd, H}, TensorRole::matrix});
          // b and a feed the decay and the write strength: kept bf16 like a router (they are small).
          d.push_back({layer_name(l, "linear_attn.in_proj_b.weight"), {nv, H}, TensorRole::router});
          d.push_back({layer_name(l, "linear_attn.in_proj_a.weight"), {nv, H}, TensorRole::router});
        } else {
          add_grouped_projections(p, l, d);
        }
        d.push_back({layer_name(l, "linear_attn.conv1d.weight"), {p.conv_dim(), 1, p.conv_kernel}, TensorRole::norm});
        d.push_back({layer_name(l, "linear_attn.dt_bias"), {nv}, TensorRole::norm});
        d.push_back({layer_name(l, "linear_attn.A_log"), {nv}, TensorRole::norm});
        d.push_back({layer_name(l, "linear_attn.norm.weight"), {p.lin_v_dim}, TensorRole::norm});
        d.push_back({layer_name(l, "linear_attn.out_proj.weight"), {H, Vd}, TensorRole::matrix});
      } else {
        d.push_back({layer_name(l, "self_attn.q_proj.weight"), {2 * q_dim, H}, TensorRole::matrix});
        d.push_back({layer_name(l, "self_attn.k_proj.weight"), {kv_dim, H}, TensorRole::matrix});
        d.push_back({layer_name(l, "self_attn.v_proj.weight"), {kv_dim, H}, TensorRole::matrix});
        d.push_back({layer_name(l, "self_attn.o_proj.weight"), {H, q_dim}, TensorRole::matrix});
        d.push_back({layer_name(l, "self_attn.q_norm.weight"), {p.head_dim}, TensorRole::norm});
        d.push_back({layer_name(l, "self_attn.k_norm.weight"), {p.head_dim}, TensorRole::norm});
      }
      if (p.layer_is_moe[size_t(l)]) {
        d.push_back({layer_name(l, "mlp.gate.weight"), {p.n_expert, H}, TensorRole::router});
        if (p.shared_intermediate > 0) {
          d.push_back({layer_name(l, "mlp.shared_expert.gate_proj.weight"), {p.shared_intermediate, H}, TensorRole::matrix});
          d.push_back({layer_name(l, "mlp.shared_expert.up_proj.weight"), {p.shared_intermediate, H}, TensorRole::matrix});
          d.push_back({layer_name(l, "mlp.shared_expert.down_proj.weight"), {H, p.shared_intermediate}, TensorRole::matrix});
          d.push_back({layer_name(l, "mlp.shared_expert_gate.weight"), {1, H}, TensorRole::router});
        }
      } else {
        d.push_back({layer_name(l, "mlp.gate_proj.weight"), {p.intermediate, H}, TensorRole::matrix});
        d.push_back({layer_name(l, "mlp.up_proj.weight"), {p.intermediate, H}, TensorRole::matrix});
        d.push_back({layer_name(l, "mlp.down_proj.weight"), {H, p.intermediate}, TensorRole::matrix});
      }
    }
    d.push_back({"model.norm.weight", {H}, TensorRole::norm});
    if (!p.tied) d.push_back({"lm_head.weight", {p.vocab, H}, TensorRole::matrix});
    return d;
  }

  Result<ExpertDecls> expert_tensors(const json& hparams) const override {
    MF_ASSIGN_OR_RETURN(Hparams p, Hparams::from_json(hparams));
    return swiglu_expert_decls(p.n_expert, p.layer_is_moe, p.moe_intermediate, p.hidden);
  }

  Result<std::unique_ptr<ModelGraph>> build(const Pack& pack, Backend& backend, ExpertStore& experts) const override;

 private:
  // qwen3_next's in_proj_qkvz [nk·(2dk + 2r·dv), H] holds per key head g: q_g (dk) | k_g (dk) | v_g (r·dv)
  // | z_g (r·dv), and in_proj_ba [2·nv, H] per key head: b_g (r) | a_g (r). The pack's flat
  // projections are these rows regrouped: in_proj_qkv = [q of every head | k … | v …], in_proj_z,
  // in_proj_b, in_proj_a (value head h = g·r + i, the order transformers' reshape gives).
  static void add_grouped_projections(const Hparams& p, int64_t l, std::vector<TensorDecl>& d) {
    const int64_t nk = p.lin_k_heads, dk = p.lin_k_dim, dv = p.lin_v_dim, r = p.lin_v_heads / p.lin_k_heads, H = p.hidden;
    const int64_t group = 2 * dk + 2 * r * dv;
    std::vector<int64_t> qkv, z, b, a;
    for (int64_t g = 0; g < nk; ++g)
      for (int64_t i = 0; i < dk; ++i) qkv.push_back(g * group + i);
    for (int64_t g = 0; g < nk; ++g)
      for (int64_t i = 0; i < dk; ++i) qkv.push_back(g * group + dk + i);
    for (int64_t g = 0; g < nk; ++g)
      for (int64_t i = 0; i < r * dv; ++i) qkv.push_back(g * group + 2 * dk + i);
    for (int64_t g = 0; g < nk; ++g)
      for (int64_t i = 0; i < r * dv; ++i) z.push_back(g * group + 2 * dk + r * dv + i);
    for (int64_t g = 0; g < nk; ++g)
      for (int64_t i = 0; i < r; ++i) {
        b.push_back(g * 2 * r + i);
        a.push_back(g * 2 * r + r + i);
      }
    const std::string qkvz_name = layer_name(l, "linear_attn.in_proj_qkvz.weight");
    const std::string ba_name = layer_name(l, "linear_attn.in_proj_ba.weight");
    const std::vector<int64_t> qkvz_shape = {nk * group, H}, ba_shape = {2 * p.lin_v_heads, H};
    d.push_back({layer_name(l, "linear_attn.in_proj_qkv.weight"), {int64_t(qkv.size()), H}, TensorRole::matrix, qkvz_name, qkvz_shape, qkv});
    d.push_back({layer_name(l, "linear_attn.in_proj_z.weight"), {int64_t(z.size()), H}, TensorRole::matrix, qkvz_name, qkvz_shape, z});
    d.push_back({layer_name(l, "linear_attn.in_proj_b.weight"), {int64_t(b.size()), H}, TensorRole::router, ba_name, ba_shape, b});
    d.push_back({layer_name(l, "linear_attn.in_proj_a.weight"), {int64_t(a.size()), H}, TensorRole::router, ba_name, ba_shape, a});
  }

  const char* type_;
  bool qwen3_5_;
};

struct LinearAttnWeights {
  WeightView in_qkv, in_z, in_b, in_a, out_proj;
  const float* conv = nullptr;     // [conv_dim, K]
  const float* dt_bias = nullptr;  // [nv]
  const float* a_log = nullptr;    // [nv]
  const float* norm = nullptr;     // [dv] gated RMSNorm weight (plain, not 1 + w)
};

struct LayerWeights {
  const float* input_norm = nullptr;  // [H], 1 + w
  const float* post_norm = nullptr;   // [H], 1 + w
  bool linear = false;
  LinearAttnWeights lin;
  AttentionWeights attn;              // full attention; q_norm/k_norm are 1 + w
  bool moe = false;
  WeightView router;                  // [E, H]
  WeightView shared_gate, shared_up, shared_down, shared_expert_gate;  // shared expert (if any)
  WeightView gate, up, down;          // dense MLP (not moe)
  int64_t state_index = 0;            // first of this layer's ForwardState buffers
};

struct Scratch final : ScratchArena {
  using ScratchArena::ScratchArena;
  int64_t max_tokens = 0;
  float* x = nullptr;          // [T, H] residual stream, and the buffer it alternates with (PendingNorm::x_out)
  float* x_next = nullptr;     // [T, H]
  float* h = nullptr;          // [T, H] normalized
  float* y = nullptr;          // [T, H] block output
  AttentionScratch attn;
  // Gated DeltaNet
  float* qkv = nullptr;        // [T, conv_dim] projections before the convolution
  float* conv_out = nullptr;   // [T, conv_dim]
  float* z = nullptr;          // [T, Vd] output gate
  float* b = nullptr;          // [T, nv] → beta
  float* a = nullptr;          // [T, nv]
  float* g = nullptr;          // [T, nv] log decay
  float* beta = nullptr;       // [T, nv]
  float* core = nullptr;       // [T, Vd]
  MoeScratch moe;
  MlpScratch shared;           // [T, I_shared]
  float* shared_y = nullptr;   // [T, H]
  float* shared_logit = nullptr;  // [T]
  MlpScratch dense;            // [T, I_dense]
  std::vector<int32_t> positions;
};

// Tokens per forward call; longer prompts are split by the session (the DeltaNet state carries over).
constexpr int64_t batch_tokens_limit = 512;

class Qwen3NextGraph final : public ModelGraph {
 public:
  Qwen3NextGraph(const Pack& pack, Backend& backend, ExpertStore& experts, Hparams p)
      : pack_(pack), be_(backend), store_(experts), p_(std::move(p)) {}

  Status load() {
    const int64_t H = p_.hidden, q_dim = p_.n_head * p_.head_dim, kv_dim = p_.n_head_kv * p_.head_dim;
    const int64_t Vd = p_.value_dim(), nv = p_.lin_v_heads;
    MF_ASSIGN_OR_RETURN(embed_, pack_.resident("model.embed_tokens.weight", {p_.vocab, H}));
    MF_ASSIGN_OR_RETURN(final_norm_, offset_norm("model.norm.weight", H));
    if (p_.tied) {
      lm_head_ = embed_;
    } else {
      MF_ASSIGN_OR_RETURN(lm_head_, pack_.resident("lm_head.weight", {p_.vocab, H}));
    }
    int64_t state_index = 0;
    for (int64_t l = 0; l < p_.n_layer; ++l) {
      LayerWeights w;
      MF_ASSIGN_OR_RETURN(w.input_norm, offset_norm(layer_name(l, "input_layernorm.weight"), H));
      MF_ASSIGN_OR_RETURN(w.post_norm, offset_norm(layer_name(l, "post_attention_layernorm.weight"), H));
      w.linear = p_.layer_is_linear[size_t(l)];
      w.state_index = state_index;
      state_index += 2;  // conv + recurrent state, or K + V cache
      if (w.linear) {
        LinearAttnWeights& a = w.lin;
        MF_ASSIGN_OR_RETURN(a.in_qkv, pack_.resident(layer_name(l, "linear_attn.in_proj_qkv.weight"), {p_.conv_dim(), H}));
        MF_ASSIGN_OR_RETURN(a.in_z, pack_.resident(layer_name(l, "linear_attn.in_proj_z.weight"), {Vd, H}));
        MF_ASSIGN_OR_RETURN(a.in_b, pack_.resident(layer_name(l, "linear_attn.in_proj_b.weight"), {nv, H}));
        MF_ASSIGN_OR_RETURN(a.in_a, pack_.resident(layer_name(l, "linear_attn.in_proj_a.weight"), {nv, H}));
        MF_ASSIGN_OR_RETURN(a.out_proj, pack_.resident(layer_name(l, "linear_attn.out_proj.weight"), {H, Vd}));
        MF_ASSIGN_OR_RETURN(a.conv, pack_.resident_f32(layer_name(l, "linear_attn.conv1d.weight"), {p_.conv_dim(), 1, p_.conv_kernel}));
        MF_ASSIGN_OR_RETURN(a.dt_bias, pack_.resident_f32(layer_name(l, "linear_attn.dt_bias"), nv));
        MF_ASSIGN_OR_RETURN(a.a_log, pack_.resident_f32(layer_name(l, "linear_attn.A_log"), nv));
        MF_ASSIGN_OR_RETURN(a.norm, pack_.resident_f32(layer_name(l, "linear_attn.norm.weight"), p_.lin_v_dim));
      } else {
        AttentionWeights& a = w.attn;
        a.output_gate = true;
        MF_ASSIGN_OR_RETURN(a.q_proj, pack_.resident(layer_name(l, "self_attn.q_proj.weight"), {2 * q_dim, H}));
        MF_ASSIGN_OR_RETURN(a.k_proj, pack_.resident(layer_name(l, "self_attn.k_proj.weight"), {kv_dim, H}));
        MF_ASSIGN_OR_RETURN(a.v_proj, pack_.resident(layer_name(l, "self_attn.v_proj.weight"), {kv_dim, H}));
        MF_ASSIGN_OR_RETURN(a.o_proj, pack_.resident(layer_name(l, "self_attn.o_proj.weight"), {H, q_dim}));
        MF_ASSIGN_OR_RETURN(a.q_norm, offset_norm(layer_name(l, "self_attn.q_norm.weight"), p_.head_dim));
        MF_ASSIGN_OR_RETURN(a.k_norm, offset_norm(layer_name(l, "self_attn.k_norm.weight"), p_.head_dim));
      }
      w.moe = p_.layer_is_moe[size_t(l)];
      if (w.moe) {
        MF_ASSIGN_OR_RETURN(w.router, pack_.resident(layer_name(l, "mlp.gate.weight"), {p_.n_expert, H}));
        if (p_.shared_intermediate > 0) {
          const int64_t I = p_.shared_intermediate;
          MF_ASSIGN_OR_RETURN(w.shared_gate, pack_.resident(layer_name(l, "mlp.shared_expert.gate_proj.weight"), {I, H}));
          MF_ASSIGN_OR_RETURN(w.shared_up, pack_.resident(layer_name(l, "mlp.shared_expert.up_proj.weight"), {I, H}));
          MF_ASSIGN_OR_RETURN(w.shared_down, pack_.resident(layer_name(l, "mlp.shared_expert.down_proj.weight"), {H, I}));
          MF_ASSIGN_OR_RETURN(w.shared_expert_gate, pack_.resident(layer_name(l, "mlp.shared_expert_gate.weight"), {1, H}));
        }
      } else {
        MF_ASSIGN_OR_RETURN(w.gate, pack_.resident(layer_name(l, "mlp.gate_proj.weight"), {p_.intermediate, H}));
        MF_ASSIGN_OR_RETURN(w.up, pack_.resident(layer_name(l, "mlp.up_proj.weight"), {p_.intermediate, H}));
        MF_ASSIGN_OR_RETURN(w.down, pack_.resident(layer_name(l, "mlp.down_proj.weight"), {H, p_.intermediate}));
      }
      layers_.push_back(w);
    }
    MF_TRY(check_swiglu_experts(pack_, p_.n_expert, p_.layer_is_moe, p_.moe_intermediate, H));
    // Rotary over the first rot_dim dims of each head: inv_freq[i] = θ^(−2i/rot_dim), fp32.
    inv_freq_.resize(size_t(p_.rot_dim / 2));
    for (int64_t i = 0; i < p_.rot_dim / 2; ++i)
      inv_freq_[size_t(i)] = 1.0f / std::pow(float(p_.rope_theta), float(2 * i) / float(p_.rot_dim));
    return Status::ok();
  }

  int64_t max_batch_tokens() const override { return batch_tokens_limit; }

  Result<std::unique_ptr<ForwardState>> make_state(int64_t n_ctx) const override {
    auto state = std::make_unique<ForwardState>(be_, n_ctx);
    const size_t kv = size_t(p_.n_head_kv * p_.head_dim);
    const size_t conv = size_t((p_.conv_kernel - 1) * p_.conv_dim());
    const size_t recurrent = size_t(p_.lin_v_heads * p_.lin_k_dim * p_.lin_v_dim);
    for (int64_t l = 0; l < p_.n_layer; ++l) {
      bool ok;
      if (p_.layer_is_linear[size_t(l)]) {
        // conv may be empty (kernel 1); add_fixed of 0 floats is still a registered buffer.
        ok = state->add_fixed(fmt::format("layer.{}.conv", l), conv) && state->add_fixed(fmt::format("layer.{}.recurrent", l), recurrent);
      } else {
        ok = state->add_per_position(fmt::format("layer.{}.k", l), kv) && state->add_per_position(fmt::format("layer.{}.v", l), kv);
      }
      if (!ok) return make_error(ErrorCode::out_of_memory, "session state for {} positions could not be allocated (layer {})", n_ctx, l);
    }
    auto s = std::make_unique<Scratch>(be_);
    const int64_t T = batch_tokens_limit, H = p_.hidden, q_dim = p_.n_head * p_.head_dim;
    const int64_t Vd = p_.value_dim(), nv = p_.lin_v_heads;
    s->max_tokens = T;
    s->x = s->alloc(T * H);
    s->x_next = s->alloc(T * H);
    s->h = s->alloc(T * H);
    s->y = s->alloc(T * H);
    s->attn.q = s->alloc(T * q_dim);
    s->attn.out = s->alloc(T * q_dim);
    s->attn.q_gate = s->alloc(T * 2 * q_dim);
    s->attn.gate = s->alloc(T * q_dim);
    s->qkv = s->alloc(T * p_.conv_dim());
    s->conv_out = s->alloc(T * p_.conv_dim());
    s->z = s->alloc(T * Vd);
    s->b = s->alloc(T * nv);
    s->a = s->alloc(T * nv);
    s->g = s->alloc(T * nv);
    s->beta = s->alloc(T * nv);
    s->core = s->alloc(T * Vd);
    if (p_.n_expert > 0) {
      alloc_moe_scratch(*s, s->moe, T, p_.n_expert, p_.n_expert_used, H, p_.moe_intermediate);
      if (p_.shared_intermediate > 0) {
        s->shared.gate = s->alloc(T * p_.shared_intermediate);
        s->shared.up = s->alloc(T * p_.shared_intermediate);
        s->shared_y = s->alloc(T * H);
        s->shared_logit = s->alloc(T);
      }
    }
    if (std::find(p_.layer_is_moe.begin(), p_.layer_is_moe.end(), false) != p_.layer_is_moe.end()) {
      s->dense.gate = s->alloc(T * p_.intermediate);
      s->dense.up = s->alloc(T * p_.intermediate);
    }
    s->alloc_logits_chunk(p_.vocab);
    MF_TRY(s->status());
    state->scratch = std::move(s);
    return state;
  }

  Status forward(ForwardState& state, const int32_t* tokens, int64_t n_tokens, int64_t n_past, float* logits,
                 bool logits_all) override {
    auto& s = static_cast<Scratch&>(*state.scratch);
    MF_TRY(check_forward_args(state, tokens, n_tokens, n_past, s.max_tokens, p_.vocab));

    const auto& buffers = state.buffers();
    // A sequence starts from zero recurrent state: position 0 (after reset or truncate(0)) clears it.
    if (n_past == 0)
      for (const auto& b : buffers)
        if (b.fixed_floats > 0) be_.fill(b.data, 0.0f, int64_t(b.fixed_floats));

    const int64_t H = p_.hidden;
    s.positions.resize(size_t(n_tokens));
    for (int64_t t = 0; t < n_tokens; ++t) s.positions[size_t(t)] = int32_t(n_past + t);
    const AttentionShape shape{p_.n_head, p_.n_head_kv, p_.head_dim, p_.rot_dim, float(p_.rms_norm_eps),
                               1.0f / std::sqrt(float(p_.head_dim)), inv_freq_.data()};
    const MoeShape moe_shape{p_.n_expert, p_.n_expert_used, H, p_.norm_topk_prob};
    const float eps = float(p_.rms_norm_eps);

    // The residual stream x alternates between two buffers: each norm takes the pending residual add
    // (x + the last block's output y) into the other one, together with the matmuls that read the norm.
    float* x = s.x;
    float* x_next = s.x_next;
    be_.embed_rows(embed_, tokens, n_tokens, x);
    for (int64_t l = 0; l < p_.n_layer; ++l) {
      const LayerWeights& w = layers_[size_t(l)];
      float* state0 = buffers[size_t(w.state_index)].data;
      float* state1 = buffers[size_t(w.state_index + 1)].data;
      // The previous layer's residual add goes with this layer's first norm.
      const PendingNorm input_norm{x, l == 0 ? nullptr : s.y, w.input_norm, eps, H, x_next, s.h};
      if (w.linear) {
        ProfileScope scope(profile, ForwardProfile::delta_net);
        delta_net(w.lin, s, n_tokens, state0, state1, input_norm);
      } else {
        ProfileScope scope(profile, ForwardProfile::attention);
        gqa_attention(be_, w.attn, shape, s.h, n_tokens, n_past, s.positions.data(), state0, state1, s.attn, s.y, &input_norm);
      }
      if (l > 0) std::swap(x, x_next);
      const PendingNorm post_norm{x, s.y, w.post_norm, eps, H, x_next, s.h};
      if (w.moe) {
        {
          ProfileScope scope(profile, ForwardProfile::routed_experts);
          // The shared expert's gate reads the same h: it goes with the router's projection (one launch on
          // a GPU: both are router-role matrices, stored in one format).
          const bool shared = p_.shared_intermediate > 0;
          const MatmulJob shared_gate{w.shared_expert_gate, s.h, s.shared_logit, n_tokens};
          MF_TRY(routed_moe(be_, store_, pack_, int(l), w.router, moe_shape, s.h, n_tokens, s.moe, s.y, &post_norm,
                            shared ? &shared_gate : nullptr, shared ? 1 : 0));
        }
        if (p_.shared_intermediate > 0) {
          ProfileScope scope(profile, ForwardProfile::shared_expert);
          // y += sigmoid(h · w_gate) · SharedMLP(h), one gate per token.
          swiglu_mlp(be_, w.shared_gate, w.shared_up, w.shared_down, s.h, n_tokens, s.shared, s.shared_y);
          be_.sigmoid_mul(s.shared_y, s.shared_logit, n_tokens, H, true);
          be_.axpy(s.y, s.shared_y, 1.0f, n_tokens * H);
        }
      } else {
        ProfileScope scope(profile, ForwardProfile::dense_mlp);
        swiglu_mlp(be_, w.gate, w.up, w.down, s.h, n_tokens, s.dense, s.y, &post_norm);
      }
      std::swap(x, x_next);
    }
    if (p_.n_layer > 0) be_.axpy(x, s.y, 1.0f, n_tokens * H);  // the last layer's residual add
    if (logits) output_head(be_, lm_head_, final_norm_, float(p_.rms_norm_eps), x, n_tokens, H, logits_all, s.h, s, state, logits);
    return Status::ok();
  }

 private:
  // Gated DeltaNet on s.h (the pending norm's) → s.y: projections, causal conv + SiLU (conv_state), gates,
  // the delta rule (recurrent_state), gated RMSNorm per value head, out_proj.
  void delta_net(const LinearAttnWeights& w, Scratch& s, int64_t T, float* conv_state, float* recurrent_state, const PendingNorm& norm) {
    const int64_t nv = p_.lin_v_heads, Kd = p_.key_dim(), conv_dim = p_.conv_dim();
    const MatmulJob proj[] = {{w.in_qkv, s.h, s.qkv, T}, {w.in_z, s.h, s.z, T}, {w.in_b, s.h, s.b, T}, {w.in_a, s.h, s.a, T}};
    project(be_, &norm, T, proj, 4);
    be_.causal_conv1d_silu(s.qkv, conv_state, w.conv, T, conv_dim, p_.conv_kernel, s.conv_out);
    be_.gated_delta_gates(s.a, s.b, w.a_log, w.dt_bias, T, nv, s.g, s.beta);
    be_.gated_delta_rule(s.conv_out, s.conv_out + Kd, s.conv_out + 2 * Kd, conv_dim, s.g, s.beta, recurrent_state, T,
                         p_.lin_k_heads, nv, p_.lin_k_dim, p_.lin_v_dim, 1.0f / std::sqrt(float(p_.lin_k_dim)), s.core);
    // Norm before gate: RMSNorm(o_h) · w, then · silu(z_h).
    be_.gated_rms_norm(s.core, w.norm, float(p_.rms_norm_eps), T * nv, p_.lin_v_dim, s.z, s.core);
    be_.matmul(w.out_proj, s.core, s.y, T);
  }

  // A zero-centred norm weight as the multiplier it stands for: 1 + w in fp32, as transformers computes.
  Result<const float*> offset_norm(const std::string& name, int64_t n) {
    MF_ASSIGN_OR_RETURN(const float* w, pack_.resident_f32_host(name, n));
    auto& v = offset_norms_.emplace_back(size_t(n));
    for (int64_t i = 0; i < n; ++i) v[size_t(i)] = 1.0f + w[i];
    MF_ASSIGN_OR_RETURN(const void* p, upload_derived(be_, v.data(), v.size() * sizeof(float), name));
    return static_cast<const float*>(p);
  }

  const Pack& pack_;
  Backend& be_;
  ExpertStore& store_;
  Hparams p_;
  WeightView embed_, lm_head_;
  const float* final_norm_ = nullptr;
  std::vector<LayerWeights> layers_;
  std::vector<float> inv_freq_;
  std::deque<std::vector<float>> offset_norms_;  // stable addresses
};

Result<std::unique_ptr<ModelGraph>> Qwen3NextFamily::build(const Pack& pack, Backend& backend, ExpertStore& experts) const {
  MF_ASSIGN_OR_RETURN(Hparams p, Hparams::from_json(pack.hparams()));
  auto graph = std::make_unique<Qwen3NextGraph>(pack, backend, experts, std::move(p));
  MF_TRY(graph->load());
  return std::unique_ptr<ModelGraph>(std::move(graph));
}

}  // namespace

const ModelFamily& qwen3_next_family() {
  static const Qwen3NextFamily family("qwen3_next");
  return family;
}
const ModelFamily& qwen3_5_moe_family() {
  static const Qwen3NextFamily family("qwen3_5_moe");
  return family;
}
const ModelFamily& qwen3_5_moe_text_family() {
  static const Qwen3NextFamily family("qwen3_5_moe_text");
  return family;
}

}  // namespace moeflux
