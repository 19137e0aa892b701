#include "blocks/blocks.hpp"

#include <algorithm>

#include "experts/expert_store.hpp"
#include "format/pack.hpp"

namespace moeflux {

void project(Backend& be, const PendingNorm* norm, int64_t n_tokens, const MatmulJob* jobs, int64_t n_jobs) {
  if (norm)
    be.add_rms_norm_matmul(norm->x, norm->y, norm->weight, norm->eps, n_tokens, norm->dim, norm->x_out, norm->h, jobs, n_jobs);
  else if (n_jobs == 1)
    be.matmul(jobs[0].w, jobs[0].x, jobs[0].y, jobs[0].n_tokens);
  else
    be.matmul_many(jobs, n_jobs);
}

void gqa_attention(Backend& be, const AttentionWeights& w, const AttentionShape& s, const float* x, int64_t n_tokens,
                   int64_t n_past, const int32_t* positions, float* k_cache, float* v_cache, AttentionScratch& scratch,
                   float* y, const PendingNorm* norm) {
  const int64_t kv_dim = s.n_head_kv * s.head_dim;
  // K and V of this batch go straight into their cache rows: no copy.
  float* k_rows = k_cache + n_past * kv_dim;
  float* v_rows = v_cache + n_past * kv_dim;
  float* q_out = w.output_gate ? scratch.q_gate : scratch.q;
  const MatmulJob qkv[] = {{w.q_proj, x, q_out, n_tokens}, {w.k_proj, x, k_rows, n_tokens}, {w.v_proj, x, v_rows, n_tokens}};
  project(be, norm, n_tokens, qkv, 3);
  if (w.output_gate) {
    // Rows of head_dim floats alternate query, gate, query, gate, … (one pair per head and token): two
    // strided copies (no index rows to build and send).
    const int64_t n_rows = n_tokens * s.n_head;
    be.copy_rows(scratch.q_gate, 2 * s.head_dim, scratch.q, s.head_dim, n_rows, s.head_dim);
    be.copy_rows(scratch.q_gate + s.head_dim, 2 * s.head_dim, scratch.gate, s.head_dim, n_rows, s.head_dim);
  }
  // Per-head RMSNorm comes before rotary (qwen3: q_norm/k_norm shared by all heads).
  const AttentionLayout layout = AttentionLayout::gqa(s.n_head, s.n_head_kv, s.head_dim);
  if (w.q_norm && w.k_norm) {
    be.qk_norm_rope_attention(scratch.q, k_cache, v_cache, n_tokens, n_past, layout, s.scale, scratch.out, s.rot_dim, w.q_norm, w.k_norm,
                              s.norm_eps, positions, s.inv_freq);
  } else {
    if (w.q_norm) be.rms_norm(scratch.q, w.q_norm, s.norm_eps, n_tokens * s.n_head, s.head_dim, scratch.q);
    if (w.k_norm) be.rms_norm(k_rows, w.k_norm, s.norm_eps, n_tokens * s.n_head_kv, s.head_dim, k_rows);
    if (s.rot_dim > 0) {
      be.rope_neox(scratch.q, n_tokens, s.n_head, s.head_dim, s.rot_dim, positions, s.inv_freq);
      be.rope_neox(k_rows, n_tokens, s.n_head_kv, s.head_dim, s.rot_dim, positions, s.inv_freq);
    }
    be.attention(scratch.q, k_cache, v_cache, n_tokens, n_past, layout, s.scale, scratch.out);
  }
  if (w.output_gate) be.sigmoid_mul(scratch.out, scratch.gate, n_tokens, s.n_head * s.head_dim, false);
  be.matmul(w.o_proj, scratch.out, y, n_tokens);
}

void swiglu_mlp(Backend& be, const WeightView& gate, const WeightView& up, const WeightView& down, const float* x,
                int64_t n_tokens, MlpScratch& scratch, float* y, const PendingNorm* norm) {
  const MatmulJob gate_up[] = {{gate, x, scratch.gate, n_tokens}, {up, x, scratch.up, n_tokens}};
  project(be, norm, n_tokens, gate_up, 2);
  be.swiglu_matmul(scratch.gate, scratch.up, down, y, n_tokens);
}

namespace {

// The layout moe_decode reads: each expert matrix's parts as offsets into a blob.
ExpertLayout expert_layout(const Pack& pack) {
  ExpertLayout layout;
  WeightView* views[] = {&layout.gate, &layout.up, &layout.down};
  const auto& matrices = pack.manifest().expert_matrices;
  const auto offset = [](uint64_t at) { return reinterpret_cast<const void*>(uintptr_t(at)); };
  for (size_t i = 0; i < 3 && i < matrices.size(); ++i) {
    const ExpertMatrix& m = matrices[i];
    *views[i] = {m.format, m.rows, m.cols, offset(m.data.offset), m.scales.bytes ? offset(m.scales.offset) : nullptr,
                 m.biases.bytes ? offset(m.biases.offset) : nullptr};
  }
  return layout;
}

// routed: the ids and weights are already in scratch (add_rms_norm_route_device); else the router's
// logits are, and the device router ranks them here.
Status device_routed_token(Backend& be, ExpertStore& store, const Pack& pack, int layer, const MoeShape& s, const float* x,
                           MoeScratch& scratch, float* y, bool routed) {
  const int64_t k = s.n_expert_used;
  if (!routed && s.sigmoid_grouped)
    be.router_sigmoid_grouped_topk_device(scratch.router_logits, s.bias_backend, 1, s.n_expert, s.n_group, s.topk_group, k,
                                          s.normalize_topk, s.scaling, scratch.device_ids, scratch.device_weights);
  else if (!routed)
    be.router_softmax_topk_device(scratch.router_logits, 1, s.n_expert, k, s.normalize_topk, scratch.device_ids, scratch.device_weights);
  ExpertLayout layout = expert_layout(pack);
  layout.n_table = s.n_expert;
  const void* const* table = store.expert_table(layer);
  if (store.holds_layer(layer)) {
    store.record_held_uses(layer, int(k));
    be.moe_decode(layout, table, scratch.device_ids, scratch.device_weights, k, x, scratch.mlp.gate, scratch.y_rows, y);
    return Status::ok();
  }
  // Some experts may be missing: the ids come to the host, the store brings what it lacks — in groups of
  // what it can hold at once, each group's sum continuing the last (the same additions in the same order).
  scratch.ids.resize(size_t(k));
  be.copy_to_host(scratch.ids.data(), scratch.device_ids, size_t(k) * sizeof(int32_t));
  for (int32_t e : scratch.ids)
    if (e < 0 || e >= s.n_expert) return make_error(ErrorCode::internal, "router chose expert {} of {}", e, s.n_expert);
  const int64_t group = std::max(1, store.max_acquire());
  std::vector<const void*> blobs(static_cast<size_t>(k));
  for (int64_t j0 = 0; j0 < k; j0 += group) {
    const int n = int(std::min(group, k - j0));
    MF_TRY(store.acquire(layer, scratch.ids.data() + j0, n, blobs.data()));
    be.moe_decode(layout, table, scratch.device_ids + j0, scratch.device_weights + j0, n, x, scratch.mlp.gate, scratch.y_rows, y, j0 > 0);
    store.release(layer, scratch.ids.data() + j0, n);
  }
  return Status::ok();
}

}  // namespace

Status routed_moe(Backend& be, ExpertStore& store, const Pack& pack, int layer, const WeightView& router,
                  const MoeShape& s, const float* x, int64_t n_tokens, MoeScratch& scratch, float* y, const PendingNorm* norm,
                  const MatmulJob* also, int64_t n_also) {
  const int64_t k = s.n_expert_used;
  MF_CHECK(n_also >= 0 && n_also <= 3);
  const bool on_device = n_tokens == 1 && store.expert_table(layer) && scratch.device_ids;
  if (on_device && norm && norm->h == x && n_also == 0 && !s.sigmoid_grouped) {  // the norm, router and top-k as one op
    be.add_rms_norm_route_device(norm->x, norm->y, norm->weight, norm->eps, norm->dim, norm->x_out, norm->h, router,
                                 scratch.router_logits, k, s.normalize_topk, scratch.device_ids, scratch.device_weights);
    return device_routed_token(be, store, pack, layer, s, x, scratch, y, /*routed=*/true);
  }
  MatmulJob route[4] = {{router, x, scratch.router_logits, n_tokens}};
  for (int64_t i = 0; i < n_also; ++i) route[i + 1] = also[i];
  project(be, norm, n_tokens, route, 1 + n_also);
  if (on_device) return device_routed_token(be, store, pack, layer, s, x, scratch, y, /*routed=*/false);
  scratch.ids.resize(size_t(n_tokens * k));
  scratch.weights.resize(size_t(n_tokens * k));
  if (s.sigmoid_grouped)
    be.router_sigmoid_grouped_topk(scratch.router_logits, s.bias_host, n_tokens, s.n_expert, s.n_group, s.topk_group, k,
                                   s.normalize_topk, s.scaling, scratch.ids.data(), scratch.weights.data());
  else
    be.router_softmax_topk(scratch.router_logits, n_tokens, s.n_expert, k, s.normalize_topk, scratch.ids.data(),
                           scratch.weights.data());
  return run_routed_experts(be, store, pack, layer, s, x, n_tokens, scratch, y);
}

Status run_routed_experts(Backend& be, ExpertStore& store, const Pack& pack, int layer, const MoeShape& s, const float* x,
                          int64_t n_tokens, MoeScratch& scratch, float* y) {
  const int64_t k = s.n_expert_used;
  // Group (token, weight) pairs by expert; experts are then visited in ascending id, so each token's
  // sum has a fixed order whatever the batch, and each touched expert is fetched once.
  std::vector<std::vector<std::pair<int32_t, float>>> routed(size_t(s.n_expert));
  for (int64_t t = 0; t < n_tokens; ++t)
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = scratch.ids[size_t(t * k + j)];
      if (e < 0 || e >= s.n_expert) return make_error(ErrorCode::internal, "router chose expert {} of {}", e, s.n_expert);
      routed[size_t(e)].push_back({int32_t(t), scratch.weights[size_t(t * k + j)]});
    }
  std::vector<int32_t> touched;
  for (int64_t e = 0; e < s.n_expert; ++e)
    if (!routed[size_t(e)].empty()) touched.push_back(int32_t(e));

  be.fill(y, 0.0f, n_tokens * s.hidden);

  // Experts run in groups whose routed rows fit the scratch: gate and up of the whole group in one
  // matmul_many, one swiglu over all its rows, down in one matmul_many; then the weighted sums in
  // ascending expert id, as one expert at a time would add them.
  std::vector<int32_t> rows;
  std::vector<float> row_weights;
  std::vector<const void*> blobs;
  std::vector<int64_t> first_row;  // [n + 1] the group's experts' rows in the scratch
  std::vector<MatmulJob> jobs;
  for (size_t first = 0; first < touched.size();) {
    // Asked each time: a store may find it can hold fewer at once than it thought (a full GPU).
    const size_t batch = size_t(std::max(1, store.max_acquire()));
    const int n = int(std::min(batch, touched.size() - first));
    blobs.assign(size_t(n), nullptr);
    MF_TRY(store.acquire(layer, touched.data() + first, n, blobs.data()));
    auto pairs_of = [&](int i) -> const std::vector<std::pair<int32_t, float>>& { return routed[size_t(touched[first + size_t(i)])]; };
    for (int g0 = 0; g0 < n;) {
      first_row.assign(1, 0);
      int g1 = g0;
      while (g1 < n && first_row.back() + int64_t(pairs_of(g1).size()) <= scratch.max_rows) {
        first_row.push_back(first_row.back() + int64_t(pairs_of(g1).size()));
        ++g1;
      }
      if (g1 == g0) {
        store.release(layer, touched.data() + first, n);
        return make_error(ErrorCode::internal, "{} tokens routed to one expert, scratch holds {} rows", pairs_of(g0).size(), scratch.max_rows);
      }
      const int64_t inter = pack.expert_view(blobs[size_t(g0)], 0).rows;
      const int64_t n_rows = first_row.back();
      // The group's routed rows, expert after expert: their tokens (one gather for the group) and weights.
      rows.clear();
      row_weights.clear();
      for (int i = g0; i < g1; ++i)
        for (const auto& [token, weight] : pairs_of(i)) rows.push_back(token), row_weights.push_back(weight);
      const bool one_token = n_tokens == 1;  // its x is every row already
      if (!one_token) be.gather_rows(x, rows.data(), n_rows, s.hidden, scratch.x_rows);
      jobs.clear();
      for (int i = g0; i < g1; ++i) {
        const int64_t m = int64_t(pairs_of(i).size()), row0 = first_row[size_t(i - g0)];
        const float* xin = one_token ? x : scratch.x_rows + row0 * s.hidden;
        const void* blob = blobs[size_t(i)];
        jobs.push_back({pack.expert_view(blob, 0), xin, scratch.mlp.gate + row0 * inter, m});
        jobs.push_back({pack.expert_view(blob, 1), xin, scratch.mlp.up + row0 * inter, m});
      }
      be.matmul_many(jobs.data(), int64_t(jobs.size()));
      be.swiglu(scratch.mlp.gate, scratch.mlp.up, scratch.mlp.gate, n_rows * inter);
      jobs.clear();
      for (int i = g0; i < g1; ++i) {
        const int64_t row0 = first_row[size_t(i - g0)];
        jobs.push_back({pack.expert_view(blobs[size_t(i)], 2), scratch.mlp.gate + row0 * inter,
                        scratch.y_rows + row0 * s.hidden, int64_t(pairs_of(i).size())});
      }
      be.matmul_many(jobs.data(), int64_t(jobs.size()));
      // y[token] += weight · expert output, row after row: each token's terms in ascending expert id.
      be.scatter_add_rows(y, scratch.y_rows, rows.data(), row_weights.data(), n_rows, s.hidden);
      g0 = g1;
    }
    store.release(layer, touched.data() + first, n);
    first += size_t(n);
  }
  return Status::ok();
}

}  // namespace moeflux
