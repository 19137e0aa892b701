// Pieces every family's graph shares: the scratch arena of a forward pass, the SwiGLU expert layout
// (declaration and the check of a pack against it), the argument checks at the top of forward and the
// output head at its end. Families stay free to differ everywhere else.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "blocks/blocks.hpp"
#include "core/status.hpp"
#include "models/model_family.hpp"
#include "quant/weight_format.hpp"
#include "runtime/forward_state.hpp"

namespace moeflux {

// Scratch activations from the backend, freed with the state. A failed allocation is remembered and
// reported once by status(), so make_state can allocate everything and check at the end.
struct ScratchArena : ForwardState::Scratch {
  explicit ScratchArena(Backend& backend) : backend_(&backend) {}
  ~ScratchArena() override;
  float* alloc(int64_t n_floats);
  Status status() const;

  // Rows of logits the output head computes at once in backend memory before copying them to the caller
  // (backends whose memory is not host memory); null for host-memory backends, which write in place.
  static constexpr int64_t logits_chunk_rows = 16;
  float* logits_chunk = nullptr;  // [logits_chunk_rows, vocab]
  void alloc_logits_chunk(int64_t vocab);

 private:
  Backend* backend_;
  std::vector<float*> owned_;
  bool failed_ = false;
};

// Weights a family derives at load (host memory that lives as long as the graph) made readable by the
// backend's ops: the host array itself for a host-memory backend, else a device copy. `what` names the
// tensor in the out-of-memory error.
Result<const void*> upload_derived(Backend& be, const void* host, size_t bytes, const std::string& what);

// A MoE scratch (blocks.hpp) for batches of up to max_tokens tokens: every routed row of a batch at once,
// and the device-routed decode's ids and weights.
void alloc_moe_scratch(ScratchArena& arena, MoeScratch& scratch, int64_t max_tokens, int64_t n_expert, int64_t n_expert_used,
                       int64_t hidden, int64_t intermediate);

// Routed SwiGLU experts (gate_proj, up_proj, down_proj) in every MoE layer, named
// model.layers.{layer}.mlp.experts.*.
ExpertDecls swiglu_expert_decls(int64_t n_expert, const std::vector<bool>& layer_is_moe, int64_t intermediate, int64_t hidden);

// The pack holds those experts: an expert file for every MoE layer and the matrix layout above.
Status check_swiglu_experts(const Pack& pack, int64_t n_expert, const std::vector<bool>& layer_is_moe, int64_t intermediate,
                            int64_t hidden);

// The checks every forward makes before touching state: batch size, context room, token ids.
Status check_forward_args(const ForwardState& state, const int32_t* tokens, int64_t n_tokens, int64_t n_past, int64_t max_tokens,
                          int64_t vocab);

// logits = head(RMSNorm(x)) for the last row, or every row when logits_all; normed: [T, hidden] scratch;
// logits: host memory [rows, vocab] (through scratch.logits_chunk unless the backend's memory is host memory).
// With state.logits_stay (one row, a backend whose memory is not host memory) the row stays in
// scratch.logits_chunk and state.backend_logits points at it; logits is then not written.
void output_head(Backend& be, const WeightView& head, const float* final_norm, float eps, const float* x, int64_t n_tokens,
                 int64_t hidden, bool logits_all, float* normed, const ScratchArena& scratch, ForwardState& state, float* logits);

}  // namespace moeflux
