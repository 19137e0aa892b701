// What a model family declares to the rest of the engine: how its config.json becomes normalized
// hyperparameters, which tensors a checkpoint must hold (with shapes and where each lives), and how
// its forward pass is built. One implementation per family under src/models/; nothing outside
// src/models/ names a family.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/status.hpp"

namespace moeflux {

class Backend;
class Pack;
class ExpertStore;
class ForwardState;

// Where a resident tensor lives and which format it may take.
enum class TensorRole : uint8_t {
  matrix,     // 2-D weight [out, in]; stored in the pack's dense format (bf16/q8/q4)
  embedding,  // [vocab, hidden]; dense format, read by row lookup (and as the output head when tied)
  router,     // 2-D routing weight; always bf16 (routing decisions are sensitive to rounding)
  norm,       // norm weight or another small parameter (conv kernel, decay constants); always f32
              // (exact copy of the bf16/f32 checkpoint value), any shape
};

struct TensorDecl {
  TensorDecl() = default;
  TensorDecl(std::string name_, std::vector<int64_t> shape_, TensorRole role_)
      : name(std::move(name_)), shape(std::move(shape_)), role(role_) {}
  TensorDecl(std::string name_, std::vector<int64_t> shape_, TensorRole role_, std::string source_,
             std::vector<int64_t> source_shape_, std::vector<int64_t> source_rows_)
      : name(std::move(name_)), shape(std::move(shape_)), role(role_), source(std::move(source_)),
        source_shape(std::move(source_shape_)), source_rows(std::move(source_rows_)) {}

  std::string name;            // the pack name; also the checkpoint name unless source is set
  std::vector<int64_t> shape;  // shape in the pack (and in the checkpoint unless source is set)
  TensorRole role = TensorRole::matrix;
  // A pack tensor made from rows of another checkpoint tensor (a layout the runtime does not want, e.g.
  // qwen3_next's head-grouped in_proj_qkvz): pack row i = row source_rows[i] of source, viewed as
  // [rows, shape.back()]. Several declarations may share one source.
  std::string source;                  // checkpoint name; empty: the tensor is copied as `name`
  std::vector<int64_t> source_shape;   // the checkpoint tensor's shape (with source)
  std::vector<int64_t> source_rows;    // [shape[0]] (with source)
};

// One matrix of a routed expert, e.g. gate_proj [I, H].
struct ExpertMatrixDecl {
  std::string part;  // "gate_proj", "up_proj", "down_proj"
  int64_t rows = 0;
  int64_t cols = 0;
};

struct ExpertDecls {
  int64_t n_expert = 0;
  std::vector<int> layers;                 // the layers whose MLP is a routed MoE block
  std::vector<ExpertMatrixDecl> matrices;  // gate_proj, up_proj, down_proj (this order in the pack)
  // Checkpoint names: per-expert "{prefix}.{e}.{part}.weight" or fused "{prefix}.gate_up_proj"
  // [E, 2I, H] (gate rows first) and "{prefix}.down_proj" [E, H, I]; prefix from expert_prefix(layer).
  std::string expert_prefix_template;      // with "{layer}", e.g. "model.layers.{layer}.mlp.experts"
  std::string expert_prefix(int layer) const;
};

// Wall time per part of the forward pass, summed while enabled (for `moeflux bench`). A scope waits for
// the backend's queued ops at both ends (Backend::synchronize; the CPU's ops are synchronous anyway), so
// its wall time is its ops' time. The rest of a forward (embedding,
// norms, residual adds, the output head) is its total time minus these parts.
struct ForwardProfile {
  enum Part : int { attention, delta_net, routed_experts, shared_expert, dense_mlp, n_parts };
  static const char* name(int part) {
    static const char* names[n_parts] = {"attention", "delta_net", "routed_experts", "shared_expert", "dense_mlp"};
    return names[part];
  }
  bool enabled = false;
  Backend* backend = nullptr;  // synchronized at each scope's ends when enabled (set by the graph's owner)
  double seconds[n_parts] = {};
  void reset() {
    for (double& s : seconds) s = 0;
  }
};

// Adds the lifetime of the scope to one part of a profile, when the profile is enabled.
class ProfileScope {
 public:
  ProfileScope(ForwardProfile& profile, ForwardProfile::Part part);
  ~ProfileScope();
  ProfileScope(const ProfileScope&) = delete;
  ProfileScope& operator=(const ProfileScope&) = delete;

 private:
  ForwardProfile* profile_;  // null when disabled
  ForwardProfile::Part part_;
  int64_t start_ns_ = 0;
};

// A forward pass over a pack: evaluates tokens at positions n_past .. n_past + T − 1 and writes logits.
class ModelGraph {
 public:
  virtual ~ModelGraph() = default;
  ForwardProfile profile;
  // Most tokens one forward call takes (scratch is sized for it); sessions split longer prompts.
  virtual int64_t max_batch_tokens() const = 0;
  // Allocates the per-session state (KV cache of up to n_ctx positions, recurrent state).
  virtual Result<std::unique_ptr<ForwardState>> make_state(int64_t n_ctx) const = 0;
  // logits: [T, vocab] host memory, or null to skip the output head (all positions computed when
  // logits_all, else only the last row is written to logits[0, :]).
  virtual Status forward(ForwardState& state, const int32_t* tokens, int64_t n_tokens, int64_t n_past,
                         float* logits, bool logits_all) = 0;
};

class ModelFamily {
 public:
  virtual ~ModelFamily() = default;
  virtual const char* model_type() const = 0;
  // config.json → normalized hyperparameters (stored in the pack manifest as "hparams").
  virtual Result<nlohmann::json> normalize_config(const nlohmann::json& hf_config) const = 0;
  virtual Result<std::vector<TensorDecl>> resident_tensors(const nlohmann::json& hparams) const = 0;
  virtual Result<ExpertDecls> expert_tensors(const nlohmann::json& hparams) const = 0;
  virtual Result<std::unique_ptr<ModelGraph>> build(const Pack& pack, Backend& backend, ExpertStore& experts) const = 0;
};

// The family for a model_type, or an unsupported error naming the types that are supported.
Result<const ModelFamily*> find_model_family(const std::string& model_type);

}  // namespace moeflux
