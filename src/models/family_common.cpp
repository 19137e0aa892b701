#include "models/family_common.hpp"

#include <algorithm>

#include "backends/backend.hpp"
#include "format/pack.hpp"

namespace moeflux {

ScratchArena::~ScratchArena() {
  for (float* p : owned_) backend_->free_activations(p);
}

float* ScratchArena::alloc(int64_t n_floats) {
  float* p = backend_->alloc_activations(size_t(n_floats));
  if (p) owned_.push_back(p);
  else failed_ = true;
  return p;
}

void ScratchArena::alloc_logits_chunk(int64_t vocab) {
  if (!backend_->host_memory()) logits_chunk = alloc(logits_chunk_rows * vocab);
}

Status ScratchArena::status() const {
  if (failed_ || owned_.empty()) return make_error(ErrorCode::out_of_memory, "scratch activations could not be allocated");
  return Status::ok();
}

Result<const void*> upload_derived(Backend& be, const void* host, size_t bytes, const std::string& what) {
  const void* p = be.upload_weights(host, bytes);
  if (!p) return make_error(ErrorCode::out_of_memory, "{}: {} bytes of derived weights could not be placed in {} memory", what, bytes, be.name());
  return p;
}

void alloc_moe_scratch(ScratchArena& arena, MoeScratch& scratch, int64_t max_tokens, int64_t n_expert, int64_t n_expert_used,
                       int64_t hidden, int64_t intermediate) {
  scratch.router_logits = arena.alloc(max_tokens * n_expert);
  const int64_t rows = max_tokens * n_expert_used;
  scratch.max_rows = rows;
  scratch.x_rows = arena.alloc(rows * hidden);
  scratch.y_rows = arena.alloc(rows * hidden);
  scratch.mlp.gate = arena.alloc(rows * intermediate);
  scratch.mlp.up = arena.alloc(rows * intermediate);
  static_assert(sizeof(int32_t) == sizeof(float));
  scratch.device_ids = reinterpret_cast<int32_t*>(arena.alloc(n_expert_used));
  scratch.device_weights = arena.alloc(n_expert_used);
}

ExpertDecls swiglu_expert_decls(int64_t n_expert, const std::vector<bool>& layer_is_moe, int64_t intermediate, int64_t hidden) {
  ExpertDecls d;
  d.n_expert = n_expert;
  for (size_t l = 0; l < layer_is_moe.size(); ++l)
    if (layer_is_moe[l]) d.layers.push_back(int(l));
  d.matrices = {{"gate_proj", intermediate, hidden}, {"up_proj", intermediate, hidden}, {"down_proj", hidden, intermediate}};
  d.expert_prefix_template = "model.layers.{layer}.mlp.experts";
  return d;
}

Status check_swiglu_experts(const Pack& pack, int64_t n_expert, const std::vector<bool>& layer_is_moe, int64_t intermediate,
                            int64_t hidden) {
  for (size_t l = 0; l < layer_is_moe.size(); ++l)
    if (layer_is_moe[l] && !pack.manifest().find_expert_layer(int(l)))
      return make_error(ErrorCode::format, "pack {}: layer {} is a MoE layer but has no expert file", pack.dir(), l);
  if (n_expert <= 0) return Status::ok();
  const auto& m = pack.manifest().expert_matrices;
  const int64_t I = intermediate, H = hidden;
  const bool ok = m.size() == 3 && m[0].part == "gate_proj" && m[0].rows == I && m[0].cols == H && m[1].part == "up_proj" &&
                  m[1].rows == I && m[1].cols == H && m[2].part == "down_proj" && m[2].rows == H && m[2].cols == I &&
                  pack.manifest().n_expert == n_expert;
  if (!ok)
    return make_error(ErrorCode::format, "pack {}: expert layout does not match the hparams (gate/up [{}, {}], down [{}, {}], {} experts)",
                      pack.dir(), I, H, H, I, n_expert);
  return Status::ok();
}

Status check_forward_args(const ForwardState& state, const int32_t* tokens, int64_t n_tokens, int64_t n_past, int64_t max_tokens,
                          int64_t vocab) {
  if (n_tokens <= 0 || n_tokens > max_tokens)
    return make_error(ErrorCode::internal, "forward of {} tokens (1 .. {} per call)", n_tokens, max_tokens);
  if (n_past + n_tokens > state.n_ctx())
    return make_error(ErrorCode::invalid_argument, "context full: {} + {} tokens exceed the context of {}", n_past, n_tokens, state.n_ctx());
  for (int64_t t = 0; t < n_tokens; ++t)
    if (tokens[t] < 0 || tokens[t] >= vocab)
      return make_error(ErrorCode::invalid_argument, "token id {} is outside the vocabulary [0, {})", tokens[t], vocab);
  return Status::ok();
}

void output_head(Backend& be, const WeightView& head, const float* final_norm, float eps, const float* x, int64_t n_tokens,
                 int64_t hidden, bool logits_all, float* normed, const ScratchArena& scratch, ForwardState& state, float* logits) {
  // Only the rows whose logits are wanted go through the final norm and the output head.
  const int64_t first = logits_all ? 0 : n_tokens - 1;
  const int64_t rows = n_tokens - first;
  be.rms_norm(x + first * hidden, final_norm, eps, rows, hidden, normed);
  if (be.host_memory()) {
    be.matmul(head, normed, logits, rows);
    return;
  }
  MF_CHECK_MSG(scratch.logits_chunk != nullptr, "output head: no logits chunk for a {} backend", be.name());
  if (state.logits_stay && rows == 1) {
    be.matmul(head, normed, scratch.logits_chunk, 1);
    state.backend_logits = scratch.logits_chunk;
    return;
  }
  const int64_t vocab = head.rows, chunk = ScratchArena::logits_chunk_rows;
  for (int64_t r = 0; r < rows; r += chunk) {
    const int64_t n = std::min(chunk, rows - r);
    be.matmul(head, normed + r * hidden, scratch.logits_chunk, n);
    be.copy_to_host(logits + r * vocab, scratch.logits_chunk, size_t(n * vocab) * sizeof(float));
  }
}

}  // namespace moeflux
