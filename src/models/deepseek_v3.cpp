// deepseek_v3 (DeepSeek-V3, V3-0324, R1; Cogito-V2-preview 671B): multi-head latent attention, YaRN,
// noaux_tc group-limited routing with shared experts, the first first_k_dense_replace layers dense.
// Math (ref/model-families.md §5), as transformers computes it:
//   c_q = RMSNorm(q_a_proj(x)); q = q_b_proj(c_q) per head [q_nope | q_rope];
//   [c_kv | k_rope] = kv_a_proj_with_mqa(x); c_kv ← RMSNorm(c_kv); per head [k_nope | v] = kv_b_proj(c_kv);
//   rotary (YaRN inverse frequencies, cos/sin × attention factor) on q_rope and the shared k_rope;
//   scores (q_nope·k_nope + q_rope·k_rope) · qk_head_dim^-½ · mscale²; o_proj(Σ p v).
//
// The session caches the latent, not K and V: per position [RMSNorm(c_kv) (kv_lora_rank) | rotated k_rope
// (qk_rope_head_dim)], 576 floats at full size. A batch at position 0 expands it (k_nope and v from
// kv_b_proj, as transformers does); every other call absorbs kv_b_proj instead: the query becomes
// [W_kᵀ q_nope | q_rope] per head against the latent rows, the value is the latent itself, and W_v maps
// each head's attention output back — attention over one shared KV head of 576 dims.
//
// Rotary pairs: checkpoints hold q_rope and k_rope in interleaved (GPT-J) pair order when
// rope_interleave (the default); transformers permutes them to [even | odd] before rotate_half. The pack
// stores those weight rows already permuted, so the runtime rotates (i, i + d/2) like every other family.
#include <algorithm>
#include <cmath>
#include <numbers>

#include "backends/backend.hpp"
#include "blocks/blocks.hpp"
#include "core/half.hpp"
#include "experts/expert_store.hpp"
#include "format/pack.hpp"
#include "models/hf_config.hpp"
#include "models/family_common.hpp"
#include "models/model_family.hpp"
#include "quant/quantize.hpp"
#include "runtime/forward_state.hpp"

namespace moeflux {
namespace {

using nlohmann::json;

struct Hparams {
  int64_t n_layer = 0, hidden = 0, n_head = 0, vocab = 0;
  int64_t q_lora_rank = 0, kv_lora_rank = 0, nope_dim = 0, rope_dim = 0, v_dim = 0;
  int64_t n_expert = 0, n_expert_used = 0, moe_intermediate = 0, n_shared = 0, intermediate = 0;
  int64_t n_group = 1, topk_group = 1;
  double routed_scaling = 1.0;
  bool norm_topk_prob = true, tied = false, rope_interleave = true;
  double rms_norm_eps = 1e-6, rope_theta = 10000.0;
  // Rotary: "default" or "yarn" and YaRN's parameters (factor, original context, betas, truncate).
  std::string rope_type = "default";
  double yarn_factor = 1.0, yarn_beta_fast = 32.0, yarn_beta_slow = 1.0;
  int64_t yarn_original_max_position = 0;
  bool yarn_truncate = true;
  double rope_attention_factor = 1.0;  // multiplies cos and sin
  double softmax_scale = 0.0;          // qk_head_dim^-½ · mscale²
  int64_t max_position = 0;
  std::vector<bool> layer_is_moe;

  int64_t qk_head_dim() const { return nope_dim + rope_dim; }
  int64_t latent_dim() const { return kv_lora_rank + rope_dim; }

  static Result<Hparams> from_json(const json& h) {
    Hparams p;
    try {
      p.n_layer = h.at("n_layer");
      p.hidden = h.at("hidden_size");
      p.n_head = h.at("n_head");
      p.vocab = h.at("vocab_size");
      p.q_lora_rank = h.at("q_lora_rank");
      p.kv_lora_rank = h.at("kv_lora_rank");
      p.nope_dim = h.at("qk_nope_head_dim");
      p.rope_dim = h.at("qk_rope_head_dim");
      p.v_dim = h.at("v_head_dim");
      p.n_expert = h.at("n_expert");
      p.n_expert_used = h.at("n_expert_used");
      p.moe_intermediate = h.at("moe_intermediate_size");
      p.n_shared = h.at("n_shared_experts");
      p.intermediate = h.at("intermediate_size");
      p.n_group = h.at("n_group");
      p.topk_group = h.at("topk_group");
      p.routed_scaling = h.at("routed_scaling_factor");
      p.norm_topk_prob = h.at("norm_topk_prob");
      p.tied = h.at("tie_word_embeddings");
      p.rope_interleave = h.at("rope_interleave");
      p.rms_norm_eps = h.at("rms_norm_eps");
      p.rope_theta = h.at("rope_theta");
      p.rope_type = h.at("rope_type");
      p.yarn_factor = h.at("yarn_factor");
      p.yarn_beta_fast = h.at("yarn_beta_fast");
      p.yarn_beta_slow = h.at("yarn_beta_slow");
      p.yarn_original_max_position = h.at("yarn_original_max_position_embeddings");
      p.yarn_truncate = h.at("yarn_truncate");
      p.rope_attention_factor = h.at("rope_attention_factor");
      p.softmax_scale = h.at("softmax_scale");
      p.max_position = h.at("max_position_embeddings");
      for (const auto& kind : h.at("layer_ffn")) p.layer_is_moe.push_back(kind.get<std::string>() == "moe");
    } catch (const json::exception& e) {
      return make_error(ErrorCode::format, "deepseek_v3 hparams: {}", e.what());
    }
    if (int64_t(p.layer_is_moe.size()) != p.n_layer)
      return make_error(ErrorCode::format, "deepseek_v3 hparams: layer_ffn has {} entries, expected n_layer = {}", p.layer_is_moe.size(),
                        p.n_layer);
    // A pack's hparams are input too (a hand-edited manifest): every invariant the ops rely on.
    const bool any_moe = std::find(p.layer_is_moe.begin(), p.layer_is_moe.end(), true) != p.layer_is_moe.end();
    const bool any_dense = std::find(p.layer_is_moe.begin(), p.layer_is_moe.end(), false) != p.layer_is_moe.end();
    const bool routing_ok = p.n_expert > 0 && p.n_expert_used > 0 && p.n_expert_used <= p.n_expert && p.n_group > 0 &&
                            p.n_expert % p.n_group == 0 && p.topk_group > 0 && p.topk_group <= p.n_group &&
                            p.topk_group * (p.n_expert / p.n_group) >= p.n_expert_used && p.moe_intermediate > 0 && p.n_shared >= 0;
    const bool ok = p.n_layer > 0 && p.hidden > 0 && p.n_head > 0 && p.vocab > 0 && p.q_lora_rank >= 0 && p.kv_lora_rank > 0 &&
                    p.nope_dim > 0 && p.rope_dim > 0 && p.rope_dim % 2 == 0 && p.v_dim > 0 && (!any_moe || routing_ok) &&
                    (!any_dense || p.intermediate > 0) && std::isfinite(p.softmax_scale) && p.softmax_scale > 0 &&
                    std::isfinite(p.rope_attention_factor) && (p.rope_type == "default" || p.rope_type == "yarn") &&
                    (p.rope_type != "yarn" || (p.yarn_factor > 0 && p.yarn_original_max_position > 0));
    if (!ok) return make_error(ErrorCode::format, "deepseek_v3 hparams are inconsistent: {}", h.dump());
    return p;
  }
};

std::string layer_name(int64_t l, const char* rest) { return fmt::format("model.layers.{}.{}", l, rest); }

// YaRN's mscale: 0.1 · m · ln(s) + 1 (1 when s ≤ 1).
double yarn_mscale(double scale, double m) { return scale <= 1.0 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; }

// The rotary inverse frequencies in fp32, as transformers computes them (default or YaRN).
std::vector<float> rope_inv_freq(const Hparams& p) {
  const int64_t dim = p.rope_dim, half = dim / 2;
  std::vector<float> inv(static_cast<size_t>(half));
  const float base = float(p.rope_theta);
  for (int64_t i = 0; i < half; ++i) {
    const float pos_freq = std::pow(base, float(2 * i) / float(dim));
    inv[size_t(i)] = 1.0f / pos_freq;
  }
  if (p.rope_type != "yarn") return inv;
  // Dimensions rotating fewer than beta_slow times over the original context are interpolated by the
  // factor, those rotating more than beta_fast times keep their frequency, a linear ramp between.
  const double two_pi = 2.0 * std::numbers::pi;
  auto correction_dim = [&](double rotations) {
    return double(dim) * std::log(double(p.yarn_original_max_position) / (rotations * two_pi)) / (2.0 * std::log(p.rope_theta));
  };
  double low = correction_dim(p.yarn_beta_fast), high = correction_dim(p.yarn_beta_slow);
  if (p.yarn_truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, double(dim - 1));
  if (low == high) high += 0.001;
  const float factor = float(p.yarn_factor);
  for (int64_t i = 0; i < half; ++i) {
    const float extrapolation = inv[size_t(i)];
    const float interpolation = 1.0f / (factor * std::pow(base, float(2 * i) / float(dim)));
    const float ramp = std::clamp((float(i) - float(low)) / (float(high) - float(low)), 0.0f, 1.0f);
    const float extrapolation_factor = 1.0f - ramp;
    inv[size_t(i)] = interpolation * (1.0f - extrapolation_factor) + extrapolation * extrapolation_factor;
  }
  return inv;
}

class DeepseekV3Family final : public ModelFamily {
 public:
  const char* model_type() const override { return "deepseek_v3"; }

  Result<json> normalize_config(const json& c) const override {
    // Defaults are transformers' DeepseekV3Config defaults.
    MF_ASSIGN_OR_RETURN(int64_t n_layer, config_required<int64_t>(c, "num_hidden_layers"));
    MF_ASSIGN_OR_RETURN(int64_t hidden, config_required<int64_t>(c, "hidden_size"));
    MF_ASSIGN_OR_RETURN(int64_t n_head, config_required<int64_t>(c, "num_attention_heads"));
    MF_ASSIGN_OR_RETURN(int64_t vocab, config_required<int64_t>(c, "vocab_size"));
    // q_lora_rank null (DeepSeek-V2-Lite style): no query compression, a plain q_proj.
    const bool no_q_lora = c.contains("q_lora_rank") && c["q_lora_rank"].is_null();
    MF_ASSIGN_OR_RETURN(int64_t q_lora, config_value<int64_t>(c, "q_lora_rank", 1536));
    if (no_q_lora) q_lora = 0;
    MF_ASSIGN_OR_RETURN(int64_t kv_lora, config_value<int64_t>(c, "kv_lora_rank", 512));
    MF_ASSIGN_OR_RETURN(int64_t nope, config_value<int64_t>(c, "qk_nope_head_dim", 128));
    MF_ASSIGN_OR_RETURN(int64_t rope_dim, config_value<int64_t>(c, "qk_rope_head_dim", 64));
    MF_ASSIGN_OR_RETURN(int64_t v_dim, config_value<int64_t>(c, "v_head_dim", 128));
    MF_ASSIGN_OR_RETURN(int64_t n_expert, config_value<int64_t>(c, "n_routed_experts", 256));
    MF_ASSIGN_OR_RETURN(int64_t n_expert_used, config_value<int64_t>(c, "num_experts_per_tok", 8));
    MF_ASSIGN_OR_RETURN(int64_t moe_intermediate, config_value<int64_t>(c, "moe_intermediate_size", 2048));
    MF_ASSIGN_OR_RETURN(int64_t n_shared, config_value<int64_t>(c, "n_shared_experts", 1));
    MF_ASSIGN_OR_RETURN(int64_t intermediate, config_value<int64_t>(c, "intermediate_size", 18432));
    MF_ASSIGN_OR_RETURN(int64_t n_group, config_value<int64_t>(c, "n_group", 8));
    MF_ASSIGN_OR_RETURN(int64_t topk_group, config_value<int64_t>(c, "topk_group", 4));
    MF_ASSIGN_OR_RETURN(double routed_scaling, config_value<double>(c, "routed_scaling_factor", 2.5));
    MF_ASSIGN_OR_RETURN(int64_t first_dense, config_value<int64_t>(c, "first_k_dense_replace", 3));
    MF_ASSIGN_OR_RETURN(bool norm_topk, config_value<bool>(c, "norm_topk_prob", true));
    MF_ASSIGN_OR_RETURN(std::string scoring, config_value<std::string>(c, "scoring_func", "sigmoid"));
    MF_ASSIGN_OR_RETURN(std::string topk_method, config_value<std::string>(c, "topk_method", "noaux_tc"));
    MF_ASSIGN_OR_RETURN(bool tied, config_value<bool>(c, "tie_word_embeddings", false));
    MF_ASSIGN_OR_RETURN(bool interleave, config_value<bool>(c, "rope_interleave", true));
    MF_ASSIGN_OR_RETURN(double eps, config_value<double>(c, "rms_norm_eps", 1e-6));
    MF_ASSIGN_OR_RETURN(int64_t max_pos, config_value<int64_t>(c, "max_position_embeddings", 4096));
    MF_ASSIGN_OR_RETURN(std::string act, config_value<std::string>(c, "hidden_act", "silu"));
    MF_ASSIGN_OR_RETURN(bool attention_bias, config_value<bool>(c, "attention_bias", false));
    MF_ASSIGN_OR_RETURN(RopeConfig rope, read_rope_config(c, 10000.0));

    // YaRN parameters: rope_parameters (transformers 5) or rope_scaling (4.x, the published configs).
    const json* yarn = nullptr;
    if (c.contains("rope_parameters") && c["rope_parameters"].is_object()) yarn = &c["rope_parameters"];
    else if (c.contains("rope_scaling") && c["rope_scaling"].is_object()) yarn = &c["rope_scaling"];
    double factor = 1.0, beta_fast = 32.0, beta_slow = 1.0, mscale = 0.0, mscale_all_dim = 0.0, attention_factor = 0.0;
    int64_t original_max = max_pos;
    bool truncate = true;
    if (rope.type == "yarn") {
      MF_CHECK(yarn != nullptr);
      MF_ASSIGN_OR_RETURN(original_max, config_value<int64_t>(*yarn, "original_max_position_embeddings", max_pos));
      MF_ASSIGN_OR_RETURN(factor, config_value<double>(*yarn, "factor", double(max_pos) / double(std::max<int64_t>(1, original_max))));
      MF_ASSIGN_OR_RETURN(beta_fast, config_value<double>(*yarn, "beta_fast", 32.0));
      MF_ASSIGN_OR_RETURN(beta_slow, config_value<double>(*yarn, "beta_slow", 1.0));
      MF_ASSIGN_OR_RETURN(mscale, config_value<double>(*yarn, "mscale", 0.0));
      MF_ASSIGN_OR_RETURN(mscale_all_dim, config_value<double>(*yarn, "mscale_all_dim", 0.0));
      MF_ASSIGN_OR_RETURN(attention_factor, config_value<double>(*yarn, "attention_factor", 0.0));
      MF_ASSIGN_OR_RETURN(truncate, config_value<bool>(*yarn, "truncate", true));
      if (beta_fast == 0) beta_fast = 32.0;  // transformers: `or 32`
      if (beta_slow == 0) beta_slow = 1.0;
      if (factor <= 0 || original_max <= 0)
        return make_error(ErrorCode::format, "deepseek_v3: yarn factor {} and original_max_position_embeddings {} must be positive", factor,
                          original_max);
    }
    // cos and sin carry the attention factor: mscale / mscale_all_dim when both are set, else m(s, 1).
    double rope_attention_factor = 1.0;
    if (rope.type == "yarn") {
      if (attention_factor > 0) rope_attention_factor = attention_factor;
      else if (mscale != 0 && mscale_all_dim != 0) rope_attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim);
      else rope_attention_factor = yarn_mscale(factor, 1.0);
    }
    // The softmax scale gains mscale(factor, mscale_all_dim)² under any rope scaling with mscale_all_dim.
    double softmax_scale = 1.0 / std::sqrt(double(nope + rope_dim));
    if (rope.type != "default" && mscale_all_dim != 0) {
      const double m = yarn_mscale(factor, mscale_all_dim);
      softmax_scale *= m * m;
    }

    const char* t = "deepseek_v3";
    if (act != "silu") return make_error(ErrorCode::unsupported, "{}: hidden_act \"{}\" (only silu)", t, act);
    if (attention_bias) return make_error(ErrorCode::unsupported, "{}: attention_bias = true", t);
    if (rope.type != "default" && rope.type != "yarn")
      return make_error(ErrorCode::unsupported, "{}: rope scaling \"{}\" (default and yarn are supported)", t, rope.type);
    if (scoring != "sigmoid" || topk_method != "noaux_tc")
      return make_error(ErrorCode::unsupported, "{}: routing {} / {} (only sigmoid scoring with noaux_tc top-k)", t, scoring, topk_method);
    if (n_layer <= 0 || hidden <= 0 || n_head <= 0 || vocab <= 0 || kv_lora <= 0 || nope <= 0 || rope_dim <= 0 || rope_dim % 2 != 0 ||
        v_dim <= 0 || q_lora < 0)
      return make_error(ErrorCode::format, "{}: invalid dimensions (layers {}, hidden {}, heads {}, vocab {}, q/kv lora {}/{}, head dims {}+{}/{})", t,
                        n_layer, hidden, n_head, vocab, q_lora, kv_lora, nope, rope_dim, v_dim);
    if (n_expert > 0) {
      if (n_expert_used <= 0 || n_expert_used > n_expert)
        return make_error(ErrorCode::format, "{}: num_experts_per_tok {} outside [1, n_routed_experts = {}]", t, n_expert_used, n_expert);
      if (n_group <= 0 || n_expert % n_group != 0 || topk_group <= 0 || topk_group > n_group)
        return make_error(ErrorCode::format, "{}: n_group {} must divide n_routed_experts {}, and topk_group {} lie in [1, n_group]", t, n_group,
                          n_expert, topk_group);
      if (topk_group * (n_expert / n_group) < n_expert_used)
        return make_error(ErrorCode::format, "{}: topk_group {} groups of {} experts cannot hold num_experts_per_tok {}", t, topk_group,
                          n_expert / n_group, n_expert_used);
    }
    if (first_dense < 0) return make_error(ErrorCode::format, "{}: first_k_dense_replace {} is negative", t, first_dense);

    json layer_ffn = json::array();
    for (int64_t l = 0; l < n_layer; ++l) layer_ffn.push_back(n_expert > 0 && l >= first_dense ? "moe" : "dense");
    json h;
    h["n_layer"] = n_layer;
    h["hidden_size"] = hidden;
    h["n_head"] = n_head;
    h["vocab_size"] = vocab;
    h["q_lora_rank"] = q_lora;
    h["kv_lora_rank"] = kv_lora;
    h["qk_nope_head_dim"] = nope;
    h["qk_rope_head_dim"] = rope_dim;
    h["v_head_dim"] = v_dim;
    h["n_expert"] = n_expert;
    h["n_expert_used"] = n_expert_used;
    h["moe_intermediate_size"] = moe_intermediate;
    h["n_shared_experts"] = n_shared;
    h["intermediate_size"] = intermediate;
    h["n_group"] = n_group;
    h["topk_group"] = topk_group;
    h["routed_scaling_factor"] = routed_scaling;
    h["norm_topk_prob"] = norm_topk;
    h["tie_word_embeddings"] = tied;
    h["rope_interleave"] = interleave;
    h["rms_norm_eps"] = eps;
    h["rope_theta"] = rope.theta;
    h["rope_type"] = rope.type;
    h["yarn_factor"] = factor;
    h["yarn_beta_fast"] = beta_fast;
    h["yarn_beta_slow"] = beta_slow;
    h["yarn_original_max_position_embeddings"] = original_max;
    h["yarn_truncate"] = truncate;
    h["rope_attention_factor"] = rope_attention_factor;
    h["softmax_scale"] = softmax_scale;
    h["max_position_embeddings"] = max_pos;
    h["layer_ffn"] = layer_ffn;
    return h;
  }

  Result<std::vector<TensorDecl>> resident_tensors(const json& hparams) const override {
    MF_ASSIGN_OR_RETURN(Hparams p, Hparams::from_json(hparams));
    std::vector<TensorDecl> d;
    const int64_t H = p.hidden, nH = p.n_head;
    d.push_back({"model.embed_tokens.weight", {p.vocab, H}, TensorRole::embedding});
    for (int64_t l = 0; l < p.n_layer; ++l) {
      d.push_back({layer_name(l, "input_layernorm.weight"), {H}, TensorRole::norm});
      d.push_back({layer_name(l, "post_attention_layernorm.weight"), {H}, TensorRole::norm});
      const int64_t q_rows = nH * p.qk_head_dim();
      if (p.q_lora_rank > 0) {
        d.push_back({layer_name(l, "self_attn.q_a_proj.weight"), {p.q_lora_rank, H}, TensorRole::matrix});
        d.push_back({layer_name(l, "self_attn.q_a_layernorm.weight"), {p.q_lora_rank}, TensorRole::norm});
        d.push_back(rope_permuted(p, layer_name(l, "self_attn.q_b_proj.weight"), {q_rows, p.q_lora_rank}, nH, p.qk_head_dim(), p.nope_dim));
      } else {
        d.push_back(rope_permuted(p, layer_name(l, "self_attn.q_proj.weight"), {q_rows, H}, nH, p.qk_head_dim(), p.nope_dim));
      }
      d.push_back(rope_permuted(p, layer_name(l, "self_attn.kv_a_proj_with_mqa.weight"), {p.latent_dim(), H}, 1, p.latent_dim(),
                                p.kv_lora_rank));
      d.push_back({layer_name(l, "self_attn.kv_a_layernorm.weight"), {p.kv_lora_rank}, TensorRole::norm});
      d.push_back({layer_name(l, "self_attn.kv_b_proj.weight"), {nH * (p.nope_dim + p.v_dim), p.kv_lora_rank}, TensorRole::matrix});
      d.push_back({layer_name(l, "self_attn.o_proj.weight"), {H, nH * p.v_dim}, TensorRole::matrix});
      if (p.layer_is_moe[size_t(l)]) {
        d.push_back({layer_name(l, "mlp.gate.weight"), {p.n_expert, H}, TensorRole::router});
        d.push_back({layer_name(l, "mlp.gate.e_score_correction_bias"), {p.n_expert}, TensorRole::norm});
        if (p.n_shared > 0) {
          const int64_t I = p.moe_intermediate * p.n_shared;
          d.push_back({layer_name(l, "mlp.shared_experts.gate_proj.weight"), {I, H}, TensorRole::matrix});
          d.push_back({layer_name(l, "mlp.shared_experts.up_proj.weight"), {I, H}, TensorRole::matrix});
          d.push_back({layer_name(l, "mlp.shared_experts.down_proj.weight"), {H, I}, TensorRole::matrix});
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
  // A projection whose output rows hold n_blocks blocks of block_rows rows, each ending in rope_dim rotary
  // rows after rope_offset other rows. With rope_interleave those rotary rows are stored permuted from the
  // checkpoint's pair order (x0, x1), (x2, x3), … to [x0, x2, … | x1, x3, …], transformers' permutation,
  // so that rotate_half applies.
  static TensorDecl rope_permuted(const Hparams& p, const std::string& name, std::vector<int64_t> shape, int64_t n_blocks,
                                  int64_t block_rows, int64_t rope_offset) {
    if (!p.rope_interleave) return {name, std::move(shape), TensorRole::matrix};
    std::vector<int64_t> rows;
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t base = b * block_rows;
      for (int64_t i = 0; i < rope_offset; ++i) rows.push_back(base + i);
      for (int64_t i = 0; i < p.rope_dim; i += 2) rows.push_back(base + rope_offset + i);
      for (int64_t i = 1; i < p.rope_dim; i += 2) rows.push_back(base + rope_offset + i);
    }
    std::vector<int64_t> source_shape = shape;
    return {name, std::move(shape), TensorRole::matrix, name, std::move(source_shape), std::move(rows)};
  }
};

struct MlaWeights {
  WeightView q_a, q_b, q_proj, kv_a, kv_b, o_proj;
  const float* q_a_norm = nullptr;   // [q_lora]
  const float* kv_a_norm = nullptr;  // [kv_lora]
  // Absorption: per head h, W_kᵀ [kv_lora, nope] (rows h·kv_lora …), bf16, derived at load from kv_b's
  // key rows; W_v is kv_b's own value rows.
  std::vector<uint16_t> k_absorb;
  const uint16_t* k_absorb_data = nullptr;  // k_absorb in the backend's memory
};

struct LayerWeights {
  const float* input_norm = nullptr;
  const float* post_norm = nullptr;
  MlaWeights attn;
  bool moe = false;
  WeightView router;
  const float* router_bias = nullptr;          // [E] e_score_correction_bias, host memory
  const float* router_bias_backend = nullptr;  // the same in the backend's memory
  WeightView shared_gate, shared_up, shared_down;
  WeightView gate, up, down;
};

struct Scratch final : ScratchArena {
  using ScratchArena::ScratchArena;
  int64_t max_tokens = 0;
  float* x = nullptr;        // [T, H]
  float* h = nullptr;        // [T, H]
  float* y = nullptr;        // [T, H]
  float* q_a = nullptr;      // [T, q_lora]
  float* q = nullptr;        // [T, nH, qk_head]
  float* attn_out = nullptr; // [T, nH, v]
  // expanded form (a batch at position 0)
  float* c_kv = nullptr;     // [T, kv_lora]
  float* kv = nullptr;       // [T, nH, nope + v]
  float* k_full = nullptr;   // [T, nH, qk_head]
  float* v_full = nullptr;   // [T, nH, v]
  // absorbed form, mla_chunk tokens at a time
  float* q_nope = nullptr;   // [nH, chunk, nope]
  float* q_lat_h = nullptr;  // [nH, chunk, kv_lora]
  float* q_lat = nullptr;    // [chunk, nH, latent]
  float* o_lat = nullptr;    // [chunk, nH, kv_lora]
  float* o_lat_h = nullptr;  // [nH, chunk, kv_lora]
  float* o_v_h = nullptr;    // [nH, chunk, v]
  MoeScratch moe;
  MlpScratch shared;         // [T, I_shared]
  float* shared_y = nullptr; // [T, H]
  MlpScratch dense;          // [T, I_dense]
  std::vector<int32_t> positions;
  std::vector<MatmulJob> jobs;
};

// Tokens per forward call (scratch ∝ this; at 671B the expanded form's buffers are ~0.25 GB at 512).
constexpr int64_t batch_tokens_limit = 512;
// Tokens per absorbed-attention step: bounds its per-head buffers.
constexpr int64_t mla_chunk = 16;

class DeepseekV3Graph final : public ModelGraph {
 public:
  DeepseekV3Graph(const Pack& pack, Backend& backend, ExpertStore& experts, Hparams p)
      : pack_(pack), be_(backend), store_(experts), p_(std::move(p)) {}

  Status load() {
    const int64_t H = p_.hidden, nH = p_.n_head;
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
      MlaWeights& a = w.attn;
      const int64_t q_rows = nH * p_.qk_head_dim();
      if (p_.q_lora_rank > 0) {
        MF_ASSIGN_OR_RETURN(a.q_a, pack_.resident(layer_name(l, "self_attn.q_a_proj.weight"), {p_.q_lora_rank, H}));
        MF_ASSIGN_OR_RETURN(a.q_a_norm, pack_.resident_f32(layer_name(l, "self_attn.q_a_layernorm.weight"), p_.q_lora_rank));
        MF_ASSIGN_OR_RETURN(a.q_b, pack_.resident(layer_name(l, "self_attn.q_b_proj.weight"), {q_rows, p_.q_lora_rank}));
      } else {
        MF_ASSIGN_OR_RETURN(a.q_proj, pack_.resident(layer_name(l, "self_attn.q_proj.weight"), {q_rows, H}));
      }
      MF_ASSIGN_OR_RETURN(a.kv_a, pack_.resident(layer_name(l, "self_attn.kv_a_proj_with_mqa.weight"), {p_.latent_dim(), H}));
      MF_ASSIGN_OR_RETURN(a.kv_a_norm, pack_.resident_f32(layer_name(l, "self_attn.kv_a_layernorm.weight"), p_.kv_lora_rank));
      MF_ASSIGN_OR_RETURN(a.kv_b, pack_.resident(layer_name(l, "self_attn.kv_b_proj.weight"), {nH * (p_.nope_dim + p_.v_dim), p_.kv_lora_rank}));
      MF_ASSIGN_OR_RETURN(a.o_proj, pack_.resident(layer_name(l, "self_attn.o_proj.weight"), {H, nH * p_.v_dim}));
      {
        MF_ASSIGN_OR_RETURN(WeightView kv_b_host, pack_.resident_host(layer_name(l, "self_attn.kv_b_proj.weight")));
        a.k_absorb = transpose_key_rows(kv_b_host);
        MF_ASSIGN_OR_RETURN(const void* k_absorb, upload_derived(be_, a.k_absorb.data(), a.k_absorb.size() * sizeof(uint16_t),
                                                                 layer_name(l, "self_attn.kv_b_proj.weight (absorbed keys)")));
        a.k_absorb_data = static_cast<const uint16_t*>(k_absorb);
        if (!be_.host_memory()) std::vector<uint16_t>().swap(a.k_absorb);  // the device holds the copy
      }
      w.moe = p_.layer_is_moe[size_t(l)];
      if (w.moe) {
        MF_ASSIGN_OR_RETURN(w.router, pack_.resident(layer_name(l, "mlp.gate.weight"), {p_.n_expert, H}));
        MF_ASSIGN_OR_RETURN(w.router_bias, pack_.resident_f32_host(layer_name(l, "mlp.gate.e_score_correction_bias"), p_.n_expert));
        MF_ASSIGN_OR_RETURN(w.router_bias_backend, pack_.resident_f32(layer_name(l, "mlp.gate.e_score_correction_bias"), p_.n_expert));
        if (p_.n_shared > 0) {
          const int64_t I = p_.moe_intermediate * p_.n_shared;
          MF_ASSIGN_OR_RETURN(w.shared_gate, pack_.resident(layer_name(l, "mlp.shared_experts.gate_proj.weight"), {I, H}));
          MF_ASSIGN_OR_RETURN(w.shared_up, pack_.resident(layer_name(l, "mlp.shared_experts.up_proj.weight"), {I, H}));
          MF_ASSIGN_OR_RETURN(w.shared_down, pack_.resident(layer_name(l, "mlp.shared_experts.down_proj.weight"), {H, I}));
        }
      } else {
        MF_ASSIGN_OR_RETURN(w.gate, pack_.resident(layer_name(l, "mlp.gate_proj.weight"), {p_.intermediate, H}));
        MF_ASSIGN_OR_RETURN(w.up, pack_.resident(layer_name(l, "mlp.up_proj.weight"), {p_.intermediate, H}));
        MF_ASSIGN_OR_RETURN(w.down, pack_.resident(layer_name(l, "mlp.down_proj.weight"), {H, p_.intermediate}));
      }
      layers_.push_back(std::move(w));
    }
    MF_TRY(check_swiglu_experts(pack_, p_.n_expert, p_.layer_is_moe, p_.moe_intermediate, H));
    inv_freq_ = rope_inv_freq(p_);
    return Status::ok();
  }

  int64_t max_batch_tokens() const override { return batch_tokens_limit; }

  Result<std::unique_ptr<ForwardState>> make_state(int64_t n_ctx) const override {
    auto state = std::make_unique<ForwardState>(be_, n_ctx);
    for (int64_t l = 0; l < p_.n_layer; ++l)
      if (!state->add_per_position(fmt::format("layer.{}.latent", l), size_t(p_.latent_dim())))
        return make_error(ErrorCode::out_of_memory, "latent KV cache for {} positions ({} MiB) could not be allocated", n_ctx,
                          (size_t(p_.latent_dim()) * 4 * size_t(n_ctx) * size_t(p_.n_layer)) >> 20);
    auto s = std::make_unique<Scratch>(be_);
    const int64_t T = batch_tokens_limit, H = p_.hidden, nH = p_.n_head, C = mla_chunk;
    s->max_tokens = T;
    s->x = s->alloc(T * H);
    s->h = s->alloc(T * H);
    s->y = s->alloc(T * H);
    if (p_.q_lora_rank > 0) s->q_a = s->alloc(T * p_.q_lora_rank);
    s->q = s->alloc(T * nH * p_.qk_head_dim());
    s->attn_out = s->alloc(T * nH * p_.v_dim);
    s->c_kv = s->alloc(T * p_.kv_lora_rank);
    s->kv = s->alloc(T * nH * (p_.nope_dim + p_.v_dim));
    s->k_full = s->alloc(T * nH * p_.qk_head_dim());
    s->v_full = s->alloc(T * nH * p_.v_dim);
    s->q_nope = s->alloc(nH * C * p_.nope_dim);
    s->q_lat_h = s->alloc(nH * C * p_.kv_lora_rank);
    s->q_lat = s->alloc(C * nH * p_.latent_dim());
    s->o_lat = s->alloc(C * nH * p_.kv_lora_rank);
    s->o_lat_h = s->alloc(nH * C * p_.kv_lora_rank);
    s->o_v_h = s->alloc(nH * C * p_.v_dim);
    if (p_.n_expert > 0) {
      alloc_moe_scratch(*s, s->moe, T, p_.n_expert, p_.n_expert_used, H, p_.moe_intermediate);
      if (p_.n_shared > 0) {
        s->shared.gate = s->alloc(T * p_.moe_intermediate * p_.n_shared);
        s->shared.up = s->alloc(T * p_.moe_intermediate * p_.n_shared);
        s->shared_y = s->alloc(T * H);
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

    const int64_t H = p_.hidden;
    const float eps = float(p_.rms_norm_eps);
    s.positions.resize(size_t(n_tokens));
    for (int64_t t = 0; t < n_tokens; ++t) s.positions[size_t(t)] = int32_t(n_past + t);
    MoeShape moe_shape{p_.n_expert, p_.n_expert_used, H, p_.norm_topk_prob};
    moe_shape.sigmoid_grouped = true;
    moe_shape.n_group = p_.n_group;
    moe_shape.topk_group = p_.topk_group;
    moe_shape.scaling = float(p_.routed_scaling);

    be_.embed_rows(embed_, tokens, n_tokens, s.x);
    const auto& buffers = state.buffers();
    for (int64_t l = 0; l < p_.n_layer; ++l) {
      const LayerWeights& w = layers_[size_t(l)];
      // The previous layer's residual add goes with this layer's first norm.
      if (l == 0)
        be_.rms_norm(s.x, w.input_norm, eps, n_tokens, H, s.h);
      else
        be_.add_rms_norm(s.x, s.y, w.input_norm, eps, n_tokens, H, s.h);
      {
        ProfileScope scope(profile, ForwardProfile::attention);
        mla(w.attn, s, n_tokens, n_past, buffers[size_t(l)].data);
      }
      be_.add_rms_norm(s.x, s.y, w.post_norm, eps, n_tokens, H, s.h);
      if (w.moe) {
        {
          ProfileScope scope(profile, ForwardProfile::routed_experts);
          MoeShape shape = moe_shape;
          shape.bias_host = w.router_bias;
          shape.bias_backend = w.router_bias_backend;
          MF_TRY(routed_moe(be_, store_, pack_, int(l), w.router, shape, s.h, n_tokens, s.moe, s.y));
        }
        if (p_.n_shared > 0) {
          ProfileScope scope(profile, ForwardProfile::shared_expert);
          swiglu_mlp(be_, w.shared_gate, w.shared_up, w.shared_down, s.h, n_tokens, s.shared, s.shared_y);
          be_.axpy(s.y, s.shared_y, 1.0f, n_tokens * H);
        }
      } else {
        ProfileScope scope(profile, ForwardProfile::dense_mlp);
        swiglu_mlp(be_, w.gate, w.up, w.down, s.h, n_tokens, s.dense, s.y);
      }
    }
    if (p_.n_layer > 0) be_.axpy(s.x, s.y, 1.0f, n_tokens * H);  // the last layer's residual add
    if (logits) output_head(be_, lm_head_, final_norm_, float(p_.rms_norm_eps), s.x, n_tokens, H, logits_all, s.h, s, state, logits);
    return Status::ok();
  }

 private:
  // Multi-head latent attention on s.h → s.y; appends this batch's latent rows to the cache.
  void mla(const MlaWeights& w, Scratch& s, int64_t T, int64_t n_past, float* cache) {
    const int64_t nH = p_.n_head, qk = p_.qk_head_dim(), nope = p_.nope_dim, rope = p_.rope_dim;
    const int64_t lora = p_.kv_lora_rank, latent = p_.latent_dim();
    const float eps = float(p_.rms_norm_eps), af = float(p_.rope_attention_factor);
    float* rows = cache + n_past * latent;  // this batch's latent rows: [c_kv | k_rope]
    if (p_.q_lora_rank > 0) {
      const MatmulJob a[] = {{w.q_a, s.h, s.q_a, T}, {w.kv_a, s.h, rows, T}};
      be_.matmul_many(a, 2);
      be_.rms_norm(s.q_a, w.q_a_norm, eps, T, p_.q_lora_rank, s.q_a);
      be_.matmul(w.q_b, s.q_a, s.q, T);
    } else {
      const MatmulJob a[] = {{w.q_proj, s.h, s.q, T}, {w.kv_a, s.h, rows, T}};
      be_.matmul_many(a, 2);
    }
    // RMSNorm(c_kv) in place in the latent rows: one token directly; a batch gathered into s.c_kv, normed
    // as T rows and put back (three launches instead of one per token: the same rows, the same arithmetic).
    if (T == 1) {
      be_.rms_norm(rows, w.kv_a_norm, eps, 1, lora, rows);
    } else {
      be_.copy_rows(rows, latent, s.c_kv, lora, T, lora);
      be_.rms_norm(s.c_kv, w.kv_a_norm, eps, T, lora, s.c_kv);
      be_.copy_rows(s.c_kv, lora, rows, latent, T, lora);
    }
    // Rotary on each head's rope dims (after its nope dims) and on the shared k_rope.
    be_.rope_neox(s.q + nope, T, nH, qk, rope, s.positions.data(), inv_freq_.data(), af, nH * qk);
    be_.rope_neox(rows + lora, T, 1, rope, rope, s.positions.data(), inv_freq_.data(), af, latent);

    if (n_past == 0) {
      expanded_attention(w, s, T, rows);
    } else {
      for (int64_t c0 = 0; c0 < T; c0 += mla_chunk) absorbed_attention(w, s, c0, std::min(mla_chunk, T - c0), n_past, cache);
    }
    be_.matmul(w.o_proj, s.attn_out, s.y, T);
  }

  // transformers' form, for a batch that starts the sequence: per head K = [kv_b(c_kv) key rows | k_rope],
  // V = kv_b(c_kv) value rows, over this batch's positions only.
  void expanded_attention(const MlaWeights& w, Scratch& s, int64_t T, const float* rows) {
    const int64_t nH = p_.n_head, qk = p_.qk_head_dim(), nope = p_.nope_dim, rope = p_.rope_dim, v = p_.v_dim;
    const int64_t lora = p_.kv_lora_rank, latent = p_.latent_dim(), kvw = nope + v;
    be_.copy_rows(rows, latent, s.c_kv, lora, T, lora);
    be_.matmul(w.kv_b, s.c_kv, s.kv, T);  // [T, nH, nope + v]
    be_.copy_rows(s.kv, kvw, s.k_full, qk, T * nH, nope);
    // Every head's key ends with its token's shared k_rope: a launch per token or per head, whichever is fewer.
    if (T <= nH)
      for (int64_t t = 0; t < T; ++t) be_.copy_rows(rows + t * latent + lora, 0, s.k_full + t * nH * qk + nope, qk, nH, rope);
    else
      for (int64_t h = 0; h < nH; ++h) be_.copy_rows(rows + lora, latent, s.k_full + h * qk + nope, nH * qk, T, rope);
    be_.copy_rows(s.kv + nope, kvw, s.v_full, v, T * nH, v);
    const AttentionLayout layout{nH, nH, qk, v, nH * qk, nH * v};
    be_.attention(s.q, s.k_full, s.v_full, T, 0, layout, float(p_.softmax_scale), s.attn_out);
  }

  // Tokens c0 … c0 + C − 1 of the batch against the latent cache, kv_b absorbed: per head the query
  // [W_kᵀ q_nope | q_rope] meets the latent rows [c_kv | k_rope], the output W_v · (Σ p c_kv).
  void absorbed_attention(const MlaWeights& w, Scratch& s, int64_t c0, int64_t C, int64_t n_past, const float* cache) {
    const int64_t nH = p_.n_head, qk = p_.qk_head_dim(), nope = p_.nope_dim, rope = p_.rope_dim, v = p_.v_dim;
    const int64_t lora = p_.kv_lora_rank, latent = p_.latent_dim(), kvw = nope + v;
    const float* q = s.q + c0 * nH * qk;
    float* out = s.attn_out + c0 * nH * v;
    // The per-head matmuls read and write each head's tokens contiguously: gathered into per-head
    // buffers and scattered back, a copy launch per token (C ≤ mla_chunk, fewer than the heads) — except
    // for one token (a decode step), whose per-head vectors are already contiguous where they lie, so the
    // jobs use them in place (the same jobs on the same values, without the 4·128 copy launches a layer
    // this took per head, which bounded a GPU's step by the host's launch rate).
    const bool in_place = C == 1;
    const auto q_nope_of = [&](int64_t h) { return in_place ? q + h * qk : s.q_nope + h * C * nope; };
    const auto q_lat_of = [&](int64_t h) { return in_place ? s.q_lat + h * latent : s.q_lat_h + h * C * lora; };
    const auto o_lat_of = [&](int64_t h) { return in_place ? s.o_lat + h * lora : s.o_lat_h + h * C * lora; };
    const auto o_v_of = [&](int64_t h) { return in_place ? out + h * v : s.o_v_h + h * C * v; };
    // W_kᵀ q_nope for every head in one launch.
    if (!in_place)
      for (int64_t t = 0; t < C; ++t) be_.copy_rows(q + t * nH * qk, qk, s.q_nope + t * nope, C * nope, nH, nope);
    s.jobs.clear();
    for (int64_t h = 0; h < nH; ++h) {
      const WeightView k_t{WeightFormat::bf16, lora, nope, w.k_absorb_data + h * lora * nope, nullptr, nullptr};
      s.jobs.push_back({k_t, q_nope_of(h), q_lat_of(h), C});
    }
    be_.matmul_many(s.jobs.data(), int64_t(s.jobs.size()));
    if (!in_place)
      for (int64_t t = 0; t < C; ++t) be_.copy_rows(s.q_lat_h + t * lora, C * lora, s.q_lat + t * nH * latent, latent, nH, lora);
    be_.copy_rows(q + nope, qk, s.q_lat + lora, latent, C * nH, rope);
    // One KV head of latent dims; its value is the c_kv prefix of each row.
    const AttentionLayout layout{nH, 1, latent, lora, latent, latent};
    be_.attention(s.q_lat, cache, cache, C, n_past + c0, layout, float(p_.softmax_scale), s.o_lat);
    if (!in_place)
      for (int64_t t = 0; t < C; ++t) be_.copy_rows(s.o_lat + t * nH * lora, lora, s.o_lat_h + t * lora, C * lora, nH, lora);
    s.jobs.clear();
    for (int64_t h = 0; h < nH; ++h) s.jobs.push_back({rows_of(w.kv_b, h * kvw + nope, v), o_lat_of(h), o_v_of(h), C});
    be_.matmul_many(s.jobs.data(), int64_t(s.jobs.size()));
    if (!in_place)
      for (int64_t t = 0; t < C; ++t) be_.copy_rows(s.o_v_h + t * v, C * v, out + t * nH * v, v, nH, v);
  }

  // Rows [first, first + count) of a weight as a weight of their own (every format stores rows whole).
  static WeightView rows_of(const WeightView& w, int64_t first, int64_t count) {
    const WeightPartBytes at = weight_part_bytes(w.format, first, w.cols);
    WeightView r = w;
    r.rows = count;
    r.data = static_cast<const uint8_t*>(w.data) + at.data;
    if (w.scales) r.scales = static_cast<const uint8_t*>(w.scales) + at.scales;
    if (w.biases) r.biases = static_cast<const uint8_t*>(w.biases) + at.biases;
    return r;
  }

  // Per head h, the transpose of kv_b's key rows [nope, kv_lora] as [kv_lora, nope], bf16: exact for a
  // bf16 pack; for q8/q4 packs the dequantized weights rounded to bf16 (≤ 2⁻⁹ relative each).
  std::vector<uint16_t> transpose_key_rows(const WeightView& kv_b) const {
    const int64_t nH = p_.n_head, nope = p_.nope_dim, lora = p_.kv_lora_rank, kvw = p_.nope_dim + p_.v_dim;
    std::vector<uint16_t> out(static_cast<size_t>(nH * lora * nope));
    std::vector<float> row(static_cast<size_t>(lora));
    for (int64_t h = 0; h < nH; ++h)
      for (int64_t i = 0; i < nope; ++i) {
        dequantize_row(kv_b, h * kvw + i, row.data());
        for (int64_t j = 0; j < lora; ++j) out[size_t((h * lora + j) * nope + i)] = f32_to_bf16(row[size_t(j)]);
      }
    return out;
  }

  const Pack& pack_;
  Backend& be_;
  ExpertStore& store_;
  Hparams p_;
  WeightView embed_, lm_head_;
  const float* final_norm_ = nullptr;
  std::vector<LayerWeights> layers_;
  std::vector<float> inv_freq_;
};

Result<std::unique_ptr<ModelGraph>> DeepseekV3Family::build(const Pack& pack, Backend& backend, ExpertStore& experts) const {
  MF_ASSIGN_OR_RETURN(Hparams p, Hparams::from_json(pack.hparams()));
  auto graph = std::make_unique<DeepseekV3Graph>(pack, backend, experts, std::move(p));
  MF_TRY(graph->load());
  return std::unique_ptr<ModelGraph>(std::move(graph));
}

}  // namespace

const ModelFamily& deepseek_v3_family() {
  static const DeepseekV3Family family;
  return family;
}

}  // namespace moeflux
