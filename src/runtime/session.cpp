#include "runtime/session.hpp"

#include <algorithm>
#include <cstring>

#include "backends/backend.hpp"
#include "format/pack.hpp"
#include "models/model_family.hpp"
#include "runtime/forward_state.hpp"
#include "runtime/model.hpp"
#include "sampling/sampler.hpp"

namespace moeflux {

namespace {

// State snapshot layout (little-endian), version 1:
//   char[8] "MFSTATE\0" | u32 version | u32 flags (bit 0: logits present) | u64 model fingerprint |
//   i64 n_past | i64 n_vocab | u32 n_buffers | per buffer: u32 name length, name bytes, u64 float
//   count, floats | logits [n_vocab] floats if flagged | u64 XXH3-64 of every byte before it.
constexpr char state_magic[8] = {'M', 'F', 'S', 'T', 'A', 'T', 'E', 0};
constexpr uint32_t state_version = 1;

class Writer {
 public:
  explicit Writer(std::vector<uint8_t>& out) : out_(out) {}
  void bytes(const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    out_.insert(out_.end(), b, b + n);
  }
  // n more bytes at the end, for the caller to fill.
  uint8_t* extend(size_t n) {
    out_.resize(out_.size() + n);
    return out_.data() + out_.size() - n;
  }
  template <typename T> void put(T v) { bytes(&v, sizeof v); }

 private:
  std::vector<uint8_t>& out_;
};

class Reader {
 public:
  explicit Reader(std::span<const uint8_t> in) : in_(in) {}
  bool bytes(void* p, size_t n) {
    if (n > in_.size() - pos_) return false;
    std::memcpy(p, in_.data() + pos_, n);
    pos_ += n;
    return true;
  }
  template <typename T> bool get(T* v) { return bytes(v, sizeof *v); }
  // Returns a pointer to the next n bytes and moves past them, or null when fewer remain.
  const uint8_t* take(size_t n) {
    if (n > in_.size() - pos_) return nullptr;
    const uint8_t* p = in_.data() + pos_;
    pos_ += n;
    return p;
  }
  size_t remaining() const { return in_.size() - pos_; }

 private:
  std::span<const uint8_t> in_;
  size_t pos_ = 0;
};

Status state_error(const std::string& what) { return Status(ErrorCode::format, "session state is corrupt or truncated: " + what); }

}  // namespace

Result<std::unique_ptr<Session>> Session::create(Model& model, const SessionOptions& options) {
  if (options.n_ctx <= 0 || options.n_batch <= 0)
    return make_error(ErrorCode::invalid_argument, "session: n_ctx {} and n_batch {} must be positive", options.n_ctx, options.n_batch);
  auto session = std::unique_ptr<Session>(new Session(model));
  session->options_ = options;
  if (model.max_context() > 0) session->options_.n_ctx = std::min(options.n_ctx, model.max_context());
  MF_ASSIGN_OR_RETURN(session->state_, model.graph().make_state(session->options_.n_ctx));
  session->logits_.assign(size_t(model.n_vocab()), 0.0f);
  return session;
}

Session::Session(Model& model) : model_(model) {}
Session::~Session() = default;

int64_t Session::n_ctx() const { return state_->n_ctx(); }
const std::vector<ForwardState::Buffer>& Session::state_buffers() const { return state_->buffers(); }
int64_t Session::n_vocab() const { return model_.n_vocab(); }

Status Session::eval_prompt(std::span<const int32_t> tokens, float* all_logits) { return eval(tokens, all_logits, true); }

Status Session::eval_token(int32_t token) { return eval(std::span<const int32_t>(&token, 1), nullptr, false); }

Status Session::eval(std::span<const int32_t> tokens, float* all_logits, bool snapshot_at_end) {
  model_.backend().trace_mark("eval start");
  if (tokens.empty()) return make_error(ErrorCode::invalid_argument, "eval_prompt: no tokens");
  const int64_t n = int64_t(tokens.size());
  if (n_past_ + n > n_ctx())
    return make_error(ErrorCode::invalid_argument, "prompt of {} tokens at position {} exceeds the context of {}", n, n_past_, n_ctx());
  for (int32_t t : tokens)
    if (t < 0 || t >= n_vocab())
      return make_error(ErrorCode::invalid_argument, "token id {} is outside the vocabulary [0, {})", t, n_vocab());
  const int64_t batch = std::min(options_.n_batch, model_.graph().max_batch_tokens());
  for (int64_t first = 0; first < n; first += batch) {
    const int64_t count = std::min(batch, n - first);
    const bool last = first + count == n;
    float* out = all_logits ? all_logits + first * n_vocab() : (last ? logits_.data() : nullptr);
    state_->logits_stay = out == logits_.data() && !model_.backend().host_memory();
    state_->backend_logits = nullptr;
    logits_on_backend_ = false;
    Status s = forward_batch(tokens.data() + first, count, out, all_logits != nullptr);
    state_->logits_stay = false;
    if (!s.is_ok()) {
      // The KV rows of a failed batch are garbage: the session stays at the last good position. A
      // recurrent state has already moved on, though: only a snapshot (or 0) can restore it.
      has_logits_ = false;
      if (has_recurrent_state()) {
        int64_t back = 0;
        for (const auto& snap : snapshots_)
          if (snap.position <= n_past_) back = std::max(back, snap.position);
        // The recurrent state already took part of the failed batch: back to the last exact point.
        if (truncate(back).is_ok())
          return Status(s.code(), fmt::format("{} (the session went back to position {})", s.message(), back));
      }
      return s;
    }
    n_past_ += count;
  }
  model_.backend().trace_mark("eval forward done");
  if (all_logits) std::memcpy(logits_.data(), all_logits + (n - 1) * n_vocab(), size_t(n_vocab()) * sizeof(float));
  logits_on_backend_ = state_->backend_logits != nullptr;
  has_logits_ = true;
  // The tokens are evaluated whether or not the snapshot fits in memory; without it a later rewind
  // lands on an earlier snapshot and evaluates more again, so a failed snapshot is not the eval's error.
  if (snapshot_at_end) (void)checkpoint();
  return Status::ok();
}

const std::vector<float>& Session::host_logits() const {
  if (logits_on_backend_) {
    model_.backend().copy_to_host(logits_.data(), state_->backend_logits, logits_.size() * sizeof(float));
    logits_on_backend_ = false;
  }
  return logits_;
}

int32_t Session::greedy_token() const {
  MF_CHECK_MSG(has_logits_, "greedy_token: no logits (evaluate a token first)");
  if (logits_on_backend_) {
    const int64_t id = model_.backend().argmax(state_->backend_logits, n_vocab());
    if (id >= 0) return int32_t(id);
  }
  return int32_t(argmax_first(host_logits().data(), n_vocab()));
}

int64_t Session::top_candidates(float temperature, int64_t k, int32_t* ids, float* z, int64_t capacity, std::span<const int32_t> gather,
                                float* gathered) const {
  MF_CHECK_MSG(has_logits_, "top_candidates: no logits (evaluate a token first)");
  if (!logits_on_backend_) return -1;
  return model_.backend().top_candidates(state_->backend_logits, n_vocab(), temperature, k, ids, z, capacity, gather.data(),
                                         int64_t(gather.size()), gathered);
}

int64_t Session::draw_token(const DeviceDraw& draw, uint64_t bits) const {
  MF_CHECK_MSG(has_logits_, "draw_token: no logits (evaluate a token first)");
  if (!logits_on_backend_) return -1;
  return model_.backend().draw_token(state_->backend_logits, n_vocab(), draw, bits);
}

Status Session::forward_batch(const int32_t* tokens, int64_t count, float* logits, bool logits_all) {
  ModelGraph& graph = model_.graph();
  Backend& backend = model_.backend();
  // A one-token step with every expert on the device and no profiling needs nothing from the host: it
  // runs as a recorded graph. A step that fails to record changed nothing and runs again, op by op.
  if (count == 1 && options_.graphs && !graph.profile.enabled && model_.experts().holds_everything() && backend.begin_graph()) {
    const Status s = graph.forward(*state_, tokens, count, n_past_, logits, logits_all);
    const Status g = backend.end_graph(s.is_ok());
    if (!s.is_ok()) return s;
    if (g.is_ok()) return Status::ok();
  }
  return graph.forward(*state_, tokens, count, n_past_, logits, logits_all);
}

bool Session::has_recurrent_state() const {
  for (const auto& b : state_->buffers())
    if (b.fixed_floats > 0) return true;
  return false;
}

void Session::reset() {
  n_past_ = 0;
  has_logits_ = false;
  logits_on_backend_ = false;
  snapshots_.clear();
}

Status Session::checkpoint() {
  if (options_.max_snapshots <= 0) return Status::ok();
  // The new snapshot is copied before any old one is dropped: a failed copy loses nothing.
  Snapshot snap;
  snap.position = n_past_;
  try {
    for (const auto& b : state_->buffers())
      if (b.fixed_floats > 0) {
        auto& copy = snap.fixed.emplace_back(b.fixed_floats);
        model_.backend().copy_to_host(copy.data(), b.data, b.fixed_floats * sizeof(float));
      }
    if (has_logits_) snap.logits = host_logits();
  } catch (const std::bad_alloc&) {
    return make_error(ErrorCode::out_of_memory, "snapshot of the session state at position {} could not be allocated", n_past_);
  }
  std::erase_if(snapshots_, [&](const Snapshot& s) { return s.position == n_past_; });
  while (int64_t(snapshots_.size()) >= options_.max_snapshots) snapshots_.erase(snapshots_.begin());
  snapshots_.push_back(std::move(snap));
  return Status::ok();
}

std::vector<int64_t> Session::snapshot_positions() const {
  std::vector<int64_t> positions;
  for (const auto& s : snapshots_) positions.push_back(s.position);
  std::sort(positions.begin(), positions.end());
  return positions;
}

Status Session::truncate(int64_t n) {
  if (n < 0 || n > n_past_) return make_error(ErrorCode::invalid_argument, "truncate to {}: the session holds {} positions", n, n_past_);
  const Snapshot* snap = nullptr;
  for (const auto& s : snapshots_)
    if (s.position == n) snap = &s;
  if (has_recurrent_state() && n != 0 && n != n_past_ && !snap) {
    std::string available = "0";
    for (int64_t p : snapshot_positions())
      if (p < n_past_ && p > 0) available += fmt::format(", {}", p);
    return make_error(ErrorCode::unsupported,
                      "truncate to {}: this model's recurrent state can only go back to a snapshot (positions {}) or to {}; use "
                      "rewind, or take snapshots with checkpoint",
                      n, available, n_past_);
  }
  if (n == n_past_ && !snap) return Status::ok();  // nothing to forget; the logits stay
  if (snap) {
    size_t i = 0;
    for (const auto& b : state_->buffers())
      if (b.fixed_floats > 0) {
        model_.backend().copy_from_host(b.data, snap->fixed[i].data(), b.fixed_floats * sizeof(float));
        ++i;
      }
    has_logits_ = !snap->logits.empty();
    if (has_logits_) logits_ = snap->logits;
  } else {
    has_logits_ = false;
  }
  logits_on_backend_ = false;
  n_past_ = n;
  std::erase_if(snapshots_, [&](const Snapshot& s) { return s.position > n; });
  return Status::ok();
}

Result<int64_t> Session::rewind(int64_t n) {
  if (n < 0 || n > n_past_) return make_error(ErrorCode::invalid_argument, "rewind to {}: the session holds {} positions", n, n_past_);
  int64_t target = n;
  if (has_recurrent_state() && n != n_past_) {
    target = 0;
    for (const auto& s : snapshots_)
      if (s.position <= n) target = std::max(target, s.position);
  }
  MF_TRY(truncate(target));
  return target;
}

size_t Session::state_size() const {
  size_t size = 8 + 4 + 4 + 8 + 8 + 8 + 4;
  for (const auto& b : state_->buffers()) {
    const size_t floats = b.fixed_floats + b.floats_per_position * size_t(n_past_);
    size += 4 + b.name.size() + 8 + floats * sizeof(float);
  }
  if (has_logits_) size += logits_.size() * sizeof(float);
  return size + 8;
}

Status Session::state_save(std::vector<uint8_t>& out) const {
  out.clear();
  out.reserve(state_size());
  Writer w(out);
  w.bytes(state_magic, 8);
  w.put(state_version);
  w.put(uint32_t(has_logits_ ? 1 : 0));
  w.put(model_.fingerprint());
  w.put(int64_t(n_past_));
  w.put(int64_t(n_vocab()));
  w.put(uint32_t(state_->buffers().size()));
  for (const auto& b : state_->buffers()) {
    const uint64_t floats = b.fixed_floats + b.floats_per_position * uint64_t(n_past_);
    w.put(uint32_t(b.name.size()));
    w.bytes(b.name.data(), b.name.size());
    w.put(floats);
    model_.backend().copy_to_host(w.extend(floats * sizeof(float)), b.data, floats * sizeof(float));
  }
  if (has_logits_) w.bytes(host_logits().data(), logits_.size() * sizeof(float));
  w.put(hash_bytes(out.data(), out.size()));
  return Status::ok();
}

Status Session::state_load(std::span<const uint8_t> data) {
  if (data.size() < 8 + 8 || std::memcmp(data.data(), state_magic, 8) != 0)
    return Status(ErrorCode::format, "not a moeflux session state (bad magic)");
  uint64_t stored_hash;
  std::memcpy(&stored_hash, data.data() + data.size() - 8, 8);
  Reader r(data.first(data.size() - 8));
  char magic[8];
  uint32_t version = 0, flags = 0, n_buffers = 0;
  uint64_t fingerprint = 0;
  int64_t n_past = 0, vocab = 0;
  if (!r.bytes(magic, 8) || !r.get(&version)) return state_error("header");
  if (version != state_version)
    return make_error(ErrorCode::unsupported, "session state version {} (this build reads version {})", version, state_version);
  if (hash_bytes(data.data(), data.size() - 8) != stored_hash) return state_error("checksum mismatch");
  if (!r.get(&flags) || !r.get(&fingerprint) || !r.get(&n_past) || !r.get(&vocab) || !r.get(&n_buffers)) return state_error("header");
  if (fingerprint != model_.fingerprint())
    return make_error(ErrorCode::mismatch, "session state was saved from a different model (fingerprint {:016x}, this model {:016x})",
                      fingerprint, model_.fingerprint());
  if (vocab != n_vocab() || n_past < 0 || n_past > n_ctx())
    return make_error(ErrorCode::mismatch, "session state holds {} positions (vocab {}); this session holds at most {} (vocab {})", n_past,
                      vocab, n_ctx(), n_vocab());
  const auto& buffers = state_->buffers();
  if (n_buffers != buffers.size()) return make_error(ErrorCode::mismatch, "session state has {} buffers, expected {}", n_buffers, buffers.size());
  // Validate everything before touching the live state, so a bad file changes nothing.
  struct Piece {
    const uint8_t* src;
    size_t bytes;
  };
  std::vector<Piece> pieces;
  for (const auto& b : buffers) {
    uint32_t name_len = 0;
    uint64_t floats = 0;
    std::string name;
    if (!r.get(&name_len) || name_len > 4096) return state_error("buffer name");
    name.resize(name_len);
    if (!r.bytes(name.data(), name_len) || !r.get(&floats)) return state_error("buffer header");
    const uint64_t expected = b.fixed_floats + b.floats_per_position * uint64_t(n_past);
    if (name != b.name || floats != expected)
      return make_error(ErrorCode::mismatch, "session state buffer {} ({} floats), expected {} ({} floats)", name, floats, b.name, expected);
    const size_t bytes = size_t(floats) * sizeof(float);
    const uint8_t* src = r.take(bytes);
    if (!src) return state_error("buffer " + name);
    pieces.push_back({src, bytes});
  }
  const bool with_logits = flags & 1u;
  const uint8_t* logits_src = with_logits ? r.take(logits_.size() * sizeof(float)) : nullptr;
  if (with_logits && !logits_src) return state_error("logits");
  if (r.remaining() != 0) return state_error("trailing bytes");

  for (size_t i = 0; i < buffers.size(); ++i) model_.backend().copy_from_host(buffers[i].data, pieces[i].src, pieces[i].bytes);
  if (with_logits) std::memcpy(logits_.data(), logits_src, logits_.size() * sizeof(float));
  n_past_ = n_past;
  has_logits_ = with_logits;
  logits_on_backend_ = false;
  snapshots_.clear();
  (void)checkpoint();  // as after eval_prompt: a missing snapshot only makes rewinding coarser
  return Status::ok();
}

}  // namespace moeflux
