// The backend interface: every op a model family's forward pass is built from. Model code calls only
// these; each backend (CPU now, CUDA later) implements all of them, and the CPU reference backend is the
// oracle the op tests compare every other implementation against.
//
// Conventions: activations are fp32, row-major and contiguous; "[T, n]" means T rows of n floats.
// Pointers refer to memory of this backend (host memory for the CPU; device memory for a GPU backend),
// except those a contract calls host memory.
// Weight matrices come as WeightView (quant/weight_format.hpp): y = x · Wᵀ, W stored [out, in].
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "core/status.hpp"
#include "quant/weight_format.hpp"
#include "sampling/draw_weight.hpp"

namespace moeflux {

// The shape of an attention call (Backend::attention). Query head h of token t: q + (t·n_head + h)·k_dim;
// KV head j of position p: k_cache + p·k_stride + j·k_dim and v_cache + p·v_stride + j·v_dim; out head h
// of token t: out + (t·n_head + h)·v_dim. GQA: KV head j serves query heads j·g … j·g + g − 1,
// g = n_head / n_head_kv. MLA's latent cache is one KV head whose value is a prefix of its key
// (v_cache = k_cache, v_dim < k_dim, equal strides).
struct AttentionLayout {
  int64_t n_head = 0, n_head_kv = 0;
  int64_t k_dim = 0, v_dim = 0;        // query/key and value widths per head
  int64_t k_stride = 0, v_stride = 0;  // floats from one cache position to the next
  // The usual layout: caches [n_ctx, n_head_kv, head_dim].
  static AttentionLayout gqa(int64_t n_head, int64_t n_head_kv, int64_t head_dim) {
    return {n_head, n_head_kv, head_dim, head_dim, n_head_kv * head_dim, n_head_kv * head_dim};
  }
};

// One matmul of a batch (Backend::matmul_many): y = x · wᵀ, x: [n_tokens, w.cols], y: [n_tokens, w.rows].
struct MatmulJob {
  WeightView w;
  const float* x = nullptr;
  float* y = nullptr;
  int64_t n_tokens = 0;
};

// Where the matrices of a routed SwiGLU expert sit inside its blob (Backend::moe_decode): views whose
// data / scales / biases hold byte offsets from the blob's start instead of addresses.
struct ExpertLayout {
  WeightView gate, up, down;  // [I, H], [I, H], [H, I]
  // The table's entries (the layer's experts), where the caller knows them: a backend may then read the
  // whole table before the router's ids are in. 0: unknown.
  int64_t n_table = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;

  // Activation memory owned by the caller, freed with free_activations; null when it cannot be had
  // (callers turn that into an out_of_memory status: a too-large context is a user error, not a crash).
  virtual float* alloc_activations(size_t n_floats) = 0;
  virtual void free_activations(float* p) = 0;

  // Whether this backend's memory is host memory: ops may then read and write the caller's host arrays
  // directly. False for a GPU backend, whose callers move data with the copies below.
  virtual bool host_memory() const { return true; }

  // Weights for the ops: makes `bytes` of host memory at `host` readable by this backend and returns the
  // address its ops take. Host-memory backends return `host` itself (nothing is copied, so `host` must
  // outlive the use); a GPU backend returns a device copy that lives as long as the backend. Null when
  // the memory cannot be had.
  virtual const void* upload_weights(const void* host, size_t bytes) { return host; }

  // Copies between host memory and this backend's memory, in order after every op queued before; they
  // return when the copy is done (so the host side may be reused at once).
  virtual void copy_to_host(void* host_dst, const void* src, size_t bytes);
  virtual void copy_from_host(void* dst, const void* host_src, size_t bytes);

  // Waits for every op queued so far (a no-op for the synchronous CPU backends); profiling scopes call it
  // so a scope's wall time is its ops' time.
  virtual void synchronize() {}

  // Graphs: the ops between begin_graph() and end_graph() are recorded instead of run, then run by
  // end_graph() as one launch (a GPU replays a decode step at a fraction of the per-op launch cost;
  // a graph recorded before with the same shape of work is updated rather than built anew). Nothing runs
  // while recording, so a step that fails to record leaves every buffer as it was and may simply be run
  // again without a graph. Between the two, ops must not need the host: copy_to_host is deferred to
  // end_graph, copy_from_host and synchronize are refused. begin_graph returns false where there are no
  // graphs (the CPU backends: ops run as usual). end_graph(false) drops what was recorded.
  virtual bool begin_graph() { return false; }
  virtual Status end_graph(bool run) { return Status::ok(); }

  // A label in the backend's trace of ops, where it keeps one (the CUDA backend's MOEFLUX_CUDA_TRACE): the
  // runtime marks where an eval starts and where its forward passes end. `what` must outlive the
  // backend (a string literal). Nothing otherwise.
  virtual void trace_mark(const char* what) {}

  // The first index of the largest value of x[0, n) in backend memory (ties to the lowest index, NaN
  // never chosen, 0 when every value is NaN: argmax_first's contract), returned to the host: greedy
  // decoding without copying the logits. −1 where the backend does not offer it (the caller copies x and
  // picks there). Waits for the queued work. Default: argmax_first in place for a host-memory backend,
  // −1 otherwise.
  virtual int64_t argmax(const float* x, int64_t n);

  // What a top-k sampler needs from a row of logits x[0, n) in backend memory: z = x / temperature (an
  // fp32 division, as the host sampler's) for a set of distinct ids that holds the k best z (higher first,
  // ties to the lower id; all n when k ≥ n) and every id whose z is above the lowest z in the set (a
  // prefix of the row in the sampler's order), into the host arrays ids and z of `capacity`; returns how
  // many. With it, x[id] as it is for each of the n_gather ids in gather (each in [0, n), host) into the
  // host array gathered: the logits a penalizing sampler changes (Sampler::penalty_ids). −1 where the
  // backend does not offer it, or more than `capacity` candidates tie at its cut, or n_gather is more than
  // it takes (the caller then copies x and samples there). Waits for the queued work. Default: −1.
  virtual int64_t top_candidates(const float* x, int64_t n, float temperature, int64_t k, int32_t* ids, float* z, int64_t capacity,
                                 const int32_t* gather, int64_t n_gather, float* gathered) {
    return -1;
  }

  // The token Sampler::sample(row, bits) returns for the draw `draw` (Sampler::device_draw) over the whole
  // row x[0, n) in backend memory, without copying the row: the penalties on the window's logits, z = x /
  // temperature in fp32, top-k's k best and top-p's nucleus in the sampler's order (higher z first, ties to
  // the lower id; the nucleus's weight top_p_mass of the kept weight), min-p's cut z_max + log_min_p in fp32,
  // draw_weight.hpp's weights and exact sums, the target from the 53 random bits, walked in id order without
  // top-k and top-p and in the sampler's order with either; at temperature 0 the penalized row's argmax
  // (argmax_first: ties to the lowest id, NaN never chosen). −1 where the backend does not offer it or no
  // z is finite (the caller then samples the copied row, which reports that). Waits for the queued work.
  // Default: −1.
  virtual int64_t draw_token(const float* x, int64_t n, const DeviceDraw& draw, uint64_t bits) { return -1; }

  // y[t, r] = Σ_c W[r, c] · x[t, c].   x: [T, w.cols], y: [T, w.rows]. T = 1 is the decode matvec.
  virtual void matmul(const WeightView& w, const float* x, float* y, int64_t n_tokens) = 0;

  // matmul for each of n_jobs independent jobs, in one launch (the experts of a MoE layer, q/k/v). Each
  // job's y is bit-identical to matmul called alone on it. No job's y may overlap another job's x or y.
  virtual void matmul_many(const MatmulJob* jobs, int64_t n_jobs) = 0;

  // out[t, :] = W[ids[t], :] as fp32 (embedding row lookup).   out: [T, w.cols]
  virtual void embed_rows(const WeightView& w, const int32_t* ids, int64_t n_tokens, float* out) = 0;

  // RMSNorm, Llama style: out = x · rsqrt(mean(x²) + eps) · weight.   x, out: [n_rows, dim]; weight: [dim]
  // out may alias x.
  virtual void rms_norm(const float* x, const float* weight, float eps, int64_t n_rows, int64_t dim, float* out) = 0;

  // The residual add and the norm after it, in one pass: x += y, then out = RMSNorm(x) as rms_norm computes
  // it — the same results as axpy(x, y, 1, n_rows · dim) followed by rms_norm(x, …, out). out may alias x,
  // not y.
  virtual void add_rms_norm(float* x, const float* y, const float* weight, float eps, int64_t n_rows, int64_t dim, float* out);

  // Qwen3.5's gated norm of the delta rule's output, in one pass: out = swiglu(gate, rms_norm(x)·weight)
  // (silu(gate) times the normed row) — the same results as rms_norm(x, …, out) followed by
  // swiglu(gate, out, out, n_rows · dim). out may alias x, not gate.
  virtual void gated_rms_norm(const float* x, const float* weight, float eps, int64_t n_rows, int64_t dim, const float* gate, float* out);

  // A norm and the matmuls that read it, as one op (a GPU normalizes a decode token inside the matmul's
  // blocks instead of launching a norm before it): x_out = x + y as add_rms_norm adds (y null: x_out is
  // x and is not written), h = rms_norm(x_out)·weight, then matmul_many(jobs), whose inputs are h. x_out
  // and h are written as those ops write them, to the bit. x_out may be x, but a GPU then composes the
  // ops (its blocks read x while one writes x_out): callers alternate the residual between two buffers.
  virtual void add_rms_norm_matmul(const float* x, const float* y, const float* weight, float eps, int64_t n_rows, int64_t dim,
                                   float* x_out, float* h, const MatmulJob* jobs, int64_t n_jobs);

  // A SwiGLU MLP's down projection with its activation, as one op (a GPU forms a decode token's
  // silu(gate)·up inside the matmul's blocks instead of launching swiglu before it): swiglu(gate, up,
  // gate, n_tokens · w.cols), then matmul(w, gate, y, n_tokens). y as those ops in turn leave it, to the
  // bit; gate is scratch afterwards (the products, or as it was).
  virtual void swiglu_matmul(float* gate, const float* up, const WeightView& w, float* y, int64_t n_tokens);

  // Rotary embedding, rotate_half ("NeoX") layout, in place: for each head h of token t the pairs
  // (i, i + rot_dim/2), i < rot_dim/2, rotate by positions[t] · inv_freq[i], and the rotated dims are
  // multiplied by scale (YaRN's attention factor; 1 otherwise); dims ≥ rot_dim pass through.
  // Head h of token t starts at x + t·row_stride + h·head_dim (row_stride 0: n_heads·head_dim).
  // inv_freq: [rot_dim/2] (host memory).
  virtual void rope_neox(float* x, int64_t n_tokens, int64_t n_heads, int64_t head_dim, int64_t rot_dim,
                         const int32_t* positions, const float* inv_freq, float scale = 1.0f, int64_t row_stride = 0) = 0;

  // Qwen3's per-head q/k norm and rotary in one op, in place: rms_norm over each head_dim row of q
  // [T, n_head, head_dim] (weight q_norm) and of k [T, n_head_kv, head_dim] (weight k_norm), then rope_neox
  // on both (scale 1). Equals those four calls up to the summation order of the norms' Σx².
  virtual void qk_norm_rope(float* q, float* k, int64_t n_tokens, int64_t n_head, int64_t n_head_kv, int64_t head_dim,
                            int64_t rot_dim, const float* q_norm, const float* k_norm, float eps, const int32_t* positions,
                            const float* inv_freq);

  // qk_norm_rope of q and of the batch's new key rows (k_cache's rows n_past …, a GQA layout: k_stride
  // = n_head_kv · k_dim), then attention, as one op (a GPU takes a decode token's norms and rotary inside
  // the attention kernel). out and the key rows as the two ops in turn leave them, to the bit; q is
  // scratch afterwards (normalized and rotated, or as it was).
  virtual void qk_norm_rope_attention(float* q, float* k_cache, const float* v_cache, int64_t n_tokens, int64_t n_past,
                                      const AttentionLayout& layout, float scale, float* out, int64_t rot_dim, const float* q_norm,
                                      const float* k_norm, float eps, const int32_t* positions, const float* inv_freq);

  // Causal softmax attention over a KV cache holding positions 0 .. n_past + T − 1 (layout above):
  // query t sits at position n_past + t and sees keys 0 .. n_past + t; scores are q·k · scale.
  virtual void attention(const float* q, const float* k_cache, const float* v_cache, int64_t n_tokens,
                         int64_t n_past, const AttentionLayout& layout, float scale, float* out) = 0;

  // Router: p = softmax(logits[t, :]) over n_expert; the k largest (ties: lower id first), optionally
  // renormalized to sum 1.   logits: [T, n_expert]; ids: [T, k] int32 (host); weights: [T, k] (host).
  virtual void router_softmax_topk(const float* logits, int64_t n_tokens, int64_t n_expert, int64_t k,
                                   bool normalize, int32_t* ids, float* weights) = 0;

  // DeepSeek-V3's noaux_tc router, as transformers computes it: s = sigmoid(logits[t, :]); choice scores
  // c = s + bias; with n_group > 1, each group of n_expert / n_group experts scores the sum of its two
  // largest c, the topk_group best groups are kept (ties: lower group first) and the other groups'
  // experts get c = 0; the k largest c are chosen (ties: lower id first) and weighted by their s,
  // renormalized (w / (Σw + 1e-20)) when normalize, then multiplied by scaling.
  // logits: [T, n_expert]; bias: [n_expert] (host, f32); ids, weights: [T, k] (host).
  virtual void router_sigmoid_grouped_topk(const float* logits, const float* bias, int64_t n_tokens, int64_t n_expert,
                                           int64_t n_group, int64_t topk_group, int64_t k, bool normalize, float scaling,
                                           int32_t* ids, float* weights) = 0;

  // The routers above with ids and weights written to this backend's memory instead of the host's (a
  // GPU decodes without a host round trip); bias, when given, is backend memory too. Same contracts, with
  // the device's exp (a GPU's expf may differ from the host's by an ulp or two): weights agree within
  // 1e-6 and the ids are the same except where two scores are that close. A GPU backend may rank for the
  // host forms above the same way (the CUDA backend does), so that a prompt token and a decode token
  // with the same logits choose the same experts.
  virtual void router_softmax_topk_device(const float* logits, int64_t n_tokens, int64_t n_expert, int64_t k, bool normalize,
                                          int32_t* ids, float* weights);
  // One decode token routed on the device, as one op (a GPU runs it as one launch, the top-k inside the
  // router's): add_rms_norm_matmul(x, y, weight, eps, 1, dim, x_out, h, {router, h, logits, 1}) then
  // router_softmax_topk_device(logits, 1, router.rows, k, normalize, ids, weights). x_out and h as that
  // op writes them, to the bit; logits within the matmul's tolerance (a fused form may sum a row in
  // another order); ids and weights as the router takes them from those logits.
  virtual void add_rms_norm_route_device(const float* x, const float* y, const float* weight, float eps, int64_t dim, float* x_out,
                                         float* h, const WeightView& router, float* logits, int64_t k, bool normalize, int32_t* ids,
                                         float* weights);
  virtual void router_sigmoid_grouped_topk_device(const float* logits, const float* bias, int64_t n_tokens, int64_t n_expert,
                                                  int64_t n_group, int64_t topk_group, int64_t k, bool normalize, float scaling,
                                                  int32_t* ids, float* weights);

  // One token's routed SwiGLU experts through a table of blobs, ids and weights as a router left them:
  //   y = Σ_{j < k, in order} weights[j] · down_e(silu(gate_e · x) ⊙ (up_e · x)),  e = ids[j],
  // expert e's blob at table[e] (its matrices where `layout` says). table [n_expert], ids [k], weights [k],
  // x [H], h [k, I] and part [k, H] (scratch), y [H]: all backend memory. Every expert named by ids must
  // be in the table. The result depends only on the blobs' bytes, never on where they sit.
  // accumulate: y continues the sum (y += …, the same float additions in the same order as one call over
  // every expert), so a token's experts may run in groups when not all fit in memory at once.
  virtual void moe_decode(const ExpertLayout& layout, const void* const* table, const int32_t* ids, const float* weights, int64_t k,
                          const float* x, float* h, float* part, float* y, bool accumulate = false);

  // out[i] = silu(gate[i]) · up[i].   n elements; out may alias gate or up.
  virtual void swiglu(const float* gate, const float* up, float* out, int64_t n) = 0;

  // acc[i] += a · x[i]
  virtual void axpy(float* acc, const float* x, float a, int64_t n) = 0;

  // x[i] = value for i < n.
  virtual void fill(float* x, float value, int64_t n) = 0;

  // The weighted combine of expert outputs, as one op: for r = 0, 1, …, n_rows − 1 in that order,
  // axpy(dst + rows[r]·dim, src + r·dim, weights[r], dim) — a row of dst named several times receives its
  // terms in the order given. src: [n_rows, dim]; rows, weights: [n_rows] (host), each row ≥ 0 and within
  // dst (a caller's error otherwise, as for gather_rows). The default is that
  // sequence of axpy calls (the reference); a backend may do it in one pass with the same arithmetic.
  virtual void scatter_add_rows(float* dst, const float* src, const int32_t* rows, const float* weights, int64_t n_rows,
                                int64_t dim);

  // dst[i, :] = src[rows[i], :].   src: [*, dim]; rows: [n_rows] (host); dst: [n_rows, dim]
  virtual void gather_rows(const float* src, const int32_t* rows, int64_t n_rows, int64_t dim, float* dst) = 0;

  // Strided copy: dst[r·dst_stride + i] = src[r·src_stride + i] for r < n_rows, i < dim. src_stride 0
  // repeats one row. Regions must not overlap.
  virtual void copy_rows(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t n_rows, int64_t dim) = 0;

  // Sigmoid gating, in place: x[r, i] *= sigmoid(g), g = gate[r] when per_row (one gate per row, e.g. the
  // shared expert's), else gate[r, i] (elementwise, e.g. gated attention's output gate).
  // x: [n_rows, dim]; gate: [n_rows] or [n_rows, dim].
  virtual void sigmoid_mul(float* x, const float* gate, int64_t n_rows, int64_t dim, bool per_row) = 0;

  // Causal depthwise convolution + SiLU over a token sequence, continuing from a rolling state.
  // x: [T, channels] pre-convolution inputs; weight: [channels, kernel] (f32, backend memory, as every
  // weight); conv_state: [kernel − 1, channels], the inputs of the kernel − 1 positions before
  // this call, oldest first (zeros at the start of a sequence), replaced by the last kernel − 1 inputs
  // (state then x). out[t, c] = silu(Σ_j weight[c, j] · m[t − kernel + 1 + j, c]), m = state ++ x.
  // out: [T, channels], must not overlap x.
  virtual void causal_conv1d_silu(const float* x, float* conv_state, const float* weight, int64_t n_tokens,
                                  int64_t channels, int64_t kernel, float* out) = 0;

  // Gated DeltaNet gates per token and value head: g = −exp(a_log[h]) · softplus(a[t, h] + dt_bias[h])
  // (the log-decay, ≤ 0; softplus(x) = x above 20, as torch) and beta = sigmoid(b[t, h]).
  // a, b, g, beta: [T, n_heads]; a_log, dt_bias: [n_heads].
  virtual void gated_delta_gates(const float* a, const float* b, const float* a_log, const float* dt_bias,
                                 int64_t n_tokens, int64_t n_heads, float* g, float* beta) = 0;

  // The gated delta rule over T tokens (Gated DeltaNet linear attention), as transformers computes it
  // with use_qk_l2norm_in_kernel: per token t and value head h, with key head j = h / (n_v_heads /
  // n_k_heads), q̂ = l2norm(q[t, j]) · q_scale, k̂ = l2norm(k[t, j]) (l2norm(x) = x · rsqrt(Σx² + 1e-6)):
  //   S ← exp(g[t, h]) · S;  u = Sᵀ k̂;  S ← S + k̂ ⊗ beta[t, h] · (v[t, h] − u);  out[t, h] = Sᵀ q̂
  // with S = state[h]: [k_dim, v_dim], fp32, carried across calls. The result is that of this
  // token-by-token recurrence; a backend may compute it in the chunked (WY) form for long T.
  // q, k: token t's heads start at q + t·stride, k + t·stride ([n_k_heads, k_dim] each); v likewise
  // ([n_v_heads, v_dim]); g, beta: [T, n_v_heads]; state: [n_v_heads, k_dim, v_dim];
  // out: [T, n_v_heads, v_dim], contiguous, must not overlap the inputs.
  virtual void gated_delta_rule(const float* q, const float* k, const float* v, int64_t stride, const float* g,
                                const float* beta, float* state, int64_t n_tokens, int64_t n_k_heads,
                                int64_t n_v_heads, int64_t k_dim, int64_t v_dim, float q_scale, float* out) = 0;
};

// The plain reference of every op: simple loops, single thread. The oracle for op tests.
std::unique_ptr<Backend> make_reference_backend();

// The optimized CPU backend (SIMD chosen at run time, n_threads compute threads; 0 = all cores).
std::unique_ptr<Backend> make_cpu_backend(int n_threads = 0);

// The CUDA backend on GPU `device` (src/backends/cuda/): activations and every pointer the contracts do
// not call host memory are device memory. Null when the build has no CUDA or the device does not exist.
std::unique_ptr<Backend> make_cuda_backend(int device = 0);

// GPUs the CUDA backend can use: 0 when built without CUDA, without a driver, or without a GPU.
int cuda_device_count();
// Whether this build has the CUDA backend at all.
bool built_with_cuda();

}  // namespace moeflux
