// A session: one conversation's state over a shared Model — the KV cache and any recurrent state (the
// Gated DeltaNet's conv and delta-rule states), the position, and the last logits. eval_prompt
// prefills in batches, eval_token decodes one step; both leave logits for the sampler. Saved states
// are versioned, checksummed and tied to the model's fingerprint.
//
// Going back: attention caches are addressed by position, so truncate(n) is exact for any n. A
// recurrent state cannot be cut back by position, so the session keeps snapshots of it — at the end of
// every eval_prompt and wherever the caller calls checkpoint() — and truncate(n) of such a model goes
// back exactly to a snapshot (or to 0). rewind(n) goes to the latest snapshot at or before n and
// returns where it landed; the caller re-evaluates the tokens from there. A snapshot also keeps the
// logits of its position, so going back to one leaves them available (regenerate a reply without
// evaluating anything).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "core/status.hpp"
#include "runtime/forward_state.hpp"
#include "sampling/draw_weight.hpp"

namespace moeflux {

class ForwardState;
class Model;

struct SessionOptions {
  int64_t n_ctx = 4096;    // positions the KV cache holds (clamped to the model's maximum)
  int64_t n_batch = 512;   // prompt tokens per forward pass
  // Snapshots kept (the oldest is dropped first): the last two prompt ends by default. Each holds the model's recurrent state — 195 MB at
  // Qwen3.5-397B, 74 MB at Qwen3-Next-80B, none for attention-only models — plus one row of logits.
  int max_snapshots = 2;
  // One-token steps recorded and replayed as one GPU graph (Backend::begin_graph) when the expert store
  // holds every expert on the device, so nothing in the step needs the host. Off by default: a step is
  // recorded anew each token, and that host time (with the graph's update) now costs more than launching
  // op by op, where programmatic dependent launch overlaps the launches with the GPU's work (Qwen3-30B
  // dimensions on an H200: 250 tok/s with graphs, 304 without; docs/BENCHMARKS.md).
  bool graphs = false;
};

class Session {
 public:
  static Result<std::unique_ptr<Session>> create(Model& model, const SessionOptions& options = {});
  ~Session();

  // Evaluates tokens at positions n_past() … and leaves the last position's logits in logits().
  // When all_logits is given it receives [tokens.size(), n_vocab] logits, one row per token. Takes a
  // snapshot at its end (see checkpoint()).
  Status eval_prompt(std::span<const int32_t> tokens, float* all_logits = nullptr);
  // One decode step; takes no snapshot.
  Status eval_token(int32_t token);

  // [n_vocab], after an eval. On a GPU a decode step's logits stay in device memory until first asked
  // for here (one copy of the row); valid until the next eval.
  const float* logits() const { return host_logits().data(); }
  bool has_logits() const { return has_logits_; }
  // Greedy decoding's choice from the last logits: the first id of the largest value (ties to the lowest
  // id, NaN never chosen), picked where the logits are — on a GPU by a kernel, so only the id comes back.
  // The same id as argmax_first(logits(), n_vocab()). Requires has_logits().
  int32_t greedy_token() const;
  // For a sampler that samples from candidates (Sampler::candidate_k): the candidates selected where the
  // logits are (Backend::top_candidates: ids and z = logit / temperature, at least the k best), and the
  // raw logits of the `gather` ids (a penalty's window) into gathered, so a GPU sends up to `capacity`
  // candidates instead of the row; −1 where that is not offered (the caller samples from logits()).
  // Requires has_logits().
  int64_t top_candidates(float temperature, int64_t k, int32_t* ids, float* z, int64_t capacity, std::span<const int32_t> gather = {},
                         float* gathered = nullptr) const;
  // For a sampler that draws from the whole row (Sampler::device_draw): the token drawn where the logits
  // are (Backend::draw_token), −1 where that is not offered (the caller samples logits() with the same
  // bits). Requires has_logits().
  int64_t draw_token(const DeviceDraw& draw, uint64_t bits) const;
  int64_t n_past() const { return n_past_; }
  int64_t n_ctx() const;
  int64_t n_vocab() const;

  // Back to position 0; drops every snapshot.
  void reset();
  // Forgets positions ≥ n. Exact for any n when the model has no recurrent state; otherwise n must be
  // 0, n_past() or a snapshot position (an unsupported error names the positions available). Logits
  // are those of the snapshot at n when there is one, kept at n = n_past(), else cleared. Snapshots
  // after n are dropped.
  Status truncate(int64_t n);
  // Goes back to the latest position ≤ n the session can return to exactly (n itself when the model has
  // no recurrent state) and returns it.
  Result<int64_t> rewind(int64_t n);
  // Records a snapshot at the current position (replacing one already there).
  Status checkpoint();
  std::vector<int64_t> snapshot_positions() const;

  // The state at the current position (not the snapshots). Loading one drops the snapshots and takes a
  // snapshot at the loaded position.
  size_t state_size() const;
  Status state_save(std::vector<uint8_t>& out) const;
  Status state_load(std::span<const uint8_t> data);

  Model& model() { return model_; }
  // The family's state buffers (KV or latent cache rows per position, recurrent state).
  const std::vector<ForwardState::Buffer>& state_buffers() const;

 private:
  explicit Session(Model& model);
  Status eval(std::span<const int32_t> tokens, float* all_logits, bool snapshot_at_end);
  Status forward_batch(const int32_t* tokens, int64_t count, float* logits, bool logits_all);
  bool has_recurrent_state() const;
  const std::vector<float>& host_logits() const;  // logits_, copied from the backend first if they are there

  struct Snapshot {
    int64_t position = 0;
    std::vector<std::vector<float>> fixed;  // the recurrent buffers, in ForwardState order
    std::vector<float> logits;              // [n_vocab], empty when there were none
  };
  Model& model_;
  std::vector<Snapshot> snapshots_;  // ascending creation order
  SessionOptions options_;
  std::unique_ptr<ForwardState> state_;
  mutable std::vector<float> logits_;  // [n_vocab]
  bool has_logits_ = false;
  mutable bool logits_on_backend_ = false;  // the last logits are at state_->backend_logits, not yet in logits_
  int64_t n_past_ = 0;
};

}  // namespace moeflux
