// Shared pieces of forward passes, written once over the Backend interface: grouped-query attention
// with optional per-head q/k RMSNorm and rotary, the SwiGLU MLP, and the routed-expert MoE FFN.
// Families compose these; blocks know no family and no backend internals.
#pragma once

#include <cstdint>
#include <vector>

#include "backends/backend.hpp"
#include "core/status.hpp"

namespace moeflux {

class ExpertStore;
class Pack;

// A norm still to be taken before a block's first matmuls, which then run with it as one op
// (Backend::add_rms_norm_matmul: a GPU normalizes a decode token inside the matmul's blocks). The block's
// input is h = rms_norm(x + y)·weight (y null: rms_norm(x)·weight); x + y is written to x_out.
struct PendingNorm {
  const float* x = nullptr;
  const float* y = nullptr;
  const float* weight = nullptr;
  float eps = 0.0f;
  int64_t dim = 0;
  float* x_out = nullptr;
  float* h = nullptr;
};

// A block's first matmuls, whose inputs are its input x: matmul_many, or with the pending norm (then x
// is norm->h) in one op.
void project(Backend& be, const PendingNorm* norm, int64_t n_tokens, const MatmulJob* jobs, int64_t n_jobs);

struct AttentionWeights {
  WeightView q_proj, k_proj, v_proj, o_proj;  // [nH·hd, H], [nKV·hd, H], [nKV·hd, H], [H, nH·hd]
  const float* q_norm = nullptr;              // [hd] or null (no per-head q/k norm)
  const float* k_norm = nullptr;              // [hd] or null
  // Gated attention (Qwen3-Next, Qwen3.5): q_proj is [nH·2·hd, H], each head's rows the query then an
  // output gate; the attention output is multiplied by sigmoid(gate) before o_proj.
  bool output_gate = false;
};

struct AttentionShape {
  int64_t n_head = 0, n_head_kv = 0, head_dim = 0, rot_dim = 0;
  float norm_eps = 1e-6f;
  float scale = 1.0f;            // usually head_dim^-0.5
  const float* inv_freq = nullptr;  // [rot_dim/2], host
};

struct AttentionScratch {
  float* q = nullptr;       // [T, nH·hd]
  float* out = nullptr;     // [T, nH·hd]
  float* q_gate = nullptr;  // [T, nH·2·hd] (output_gate only) q_proj's output before the split
  float* gate = nullptr;    // [T, nH·hd] (output_gate only)
};

// x: [T, H] normalized input; k_cache/v_cache: [n_ctx, nKV·hd] of this layer; positions: [T] host,
// n_past .. n_past+T−1. Writes this batch's K/V into the caches and o_proj(attention) into y [T, H]
// (which the pending norm, if any, reads first).
void gqa_attention(Backend& be, const AttentionWeights& w, const AttentionShape& s, const float* x, int64_t n_tokens,
                   int64_t n_past, const int32_t* positions, float* k_cache, float* v_cache, AttentionScratch& scratch,
                   float* y, const PendingNorm* norm = nullptr);

struct MlpScratch {
  float* gate = nullptr;  // [T, I]
  float* up = nullptr;    // [T, I]
};

// y = down(silu(gate(x)) · up(x)).   x: [T, H]; y: [T, H]
void swiglu_mlp(Backend& be, const WeightView& gate, const WeightView& up, const WeightView& down, const float* x,
                int64_t n_tokens, MlpScratch& scratch, float* y, const PendingNorm* norm = nullptr);

struct MoeScratch {
  std::vector<int32_t> ids;        // [T, k]
  std::vector<float> weights;      // [T, k]
  float* router_logits = nullptr;  // [T, E]
  // Routed (token, expert) rows of the experts run together, expert after expert: max_rows ≥ T; T·k
  // holds every row of a batch of T tokens at once (fewer rows run the experts in several groups).
  int64_t max_rows = 0;
  float* x_rows = nullptr;         // [max_rows, H] the tokens routed to each expert, gathered
  float* y_rows = nullptr;         // [max_rows, H] each expert's down output
  MlpScratch mlp;                  // [max_rows, I] each: gate (then swiglu), up
  // The device-routed decode (a store with an expert table, one token): the router's choice in backend
  // memory; mlp.gate and y_rows serve as moe_decode's h and part.
  int32_t* device_ids = nullptr;   // [k]
  float* device_weights = nullptr; // [k]
};

struct MoeShape {
  int64_t n_expert = 0, n_expert_used = 0, hidden = 0;
  bool normalize_topk = true;
  // DeepSeek-V3's router (Backend::router_sigmoid_grouped_topk) instead of softmax top-k.
  bool sigmoid_grouped = false;
  int64_t n_group = 1, topk_group = 1;
  float scaling = 1.0f;
  const float* bias_host = nullptr;    // [E] host memory
  const float* bias_backend = nullptr; // [E] backend memory
};

// Routed experts: the router (softmax → top-k → renormalize, or the grouped sigmoid router), then for
// each touched expert in ascending id,
// its SwiGLU on the tokens routed to it (each expert fetched once per call; the experts of a group run
// in one matmul_many per projection), accumulated into
// y [T, H] (overwritten) weighted by the router probability. Expert matrices are the pack's
// expert_matrices in order gate_proj, up_proj, down_proj.
// One token with a store that keeps an expert table (the GPU cache) is device-routed instead: router and
// experts run on the backend (Backend::moe_decode, experts summed in router order) and the host learns
// the ids only when the store lacks some of the layer's experts and must acquire them.
// also: up to 3 more projections of x (a shared expert's gate), run with the router's (one launch on a
// GPU where they share its format).
Status routed_moe(Backend& be, ExpertStore& store, const Pack& pack, int layer, const WeightView& router,
                  const MoeShape& s, const float* x, int64_t n_tokens, MoeScratch& scratch, float* y,
                  const PendingNorm* norm = nullptr, const MatmulJob* also = nullptr, int64_t n_also = 0);

// The expert half of routed_moe, for routers of another kind: scratch.ids / scratch.weights ([T, k],
// filled by the caller) choose the experts; y [T, H] is overwritten with their weighted sum.
Status run_routed_experts(Backend& be, ExpertStore& store, const Pack& pack, int layer, const MoeShape& s, const float* x,
                          int64_t n_tokens, MoeScratch& scratch, float* y);

}  // namespace moeflux
