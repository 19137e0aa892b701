// The C API (include/moeflux/moeflux.h) over Model and Session. Every entry point catches everything:
// no exception crosses into C.
#include "moeflux/moeflux.h"

#include "capi/capi_errors.hpp"
#include "capi/capi_handles.hpp"

#include <algorithm>
#include <exception>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "runtime/model.hpp"
#include "runtime/session.hpp"

struct moeflux_model {
  std::unique_ptr<moeflux::Model> model;
};

using moeflux::capi::fail;
using moeflux::capi::guarded;

namespace moeflux::capi {
std::string& last_error() {
  thread_local std::string message;
  return message;
}
}  // namespace moeflux::capi

extern "C" {

const char* moeflux_last_error(void) { return moeflux::capi::last_error().c_str(); }

const char* moeflux_status_name(moeflux_status status) {
  return moeflux::error_code_name(moeflux::ErrorCode(int(status)));
}

moeflux_model_params moeflux_model_default_params(void) {
  moeflux_model_params p{};
  p.io_direct = 1;
  p.verify_resident_hash = 1;
  return p;
}

moeflux_status moeflux_model_open(const moeflux_model_params* params, moeflux_model** out_model) {
  return guarded([&] {
    if (!params || !out_model || !params->pack_dir) return fail(MOEFLUX_ERR_INVALID_ARGUMENT, "model_open: null argument");
    *out_model = nullptr;
    moeflux::ModelOptions o;
    o.pack_dir = params->pack_dir;
    o.n_threads = params->n_threads;
    o.verify_resident_hash = params->verify_resident_hash != 0;
    o.experts.cache_bytes = params->expert_cache_bytes;
    if (params->n_io_threads > 0) o.experts.n_readers = params->n_io_threads;
    o.experts.io_mode = params->io_direct ? moeflux::IoMode::direct : moeflux::IoMode::page_cache;
    if (params->device != MOEFLUX_DEVICE_CPU && params->device != MOEFLUX_DEVICE_CUDA)
      return fail(MOEFLUX_ERR_INVALID_ARGUMENT, fmt::format("model_open: device {} (MOEFLUX_DEVICE_CPU or MOEFLUX_DEVICE_CUDA)", params->device).c_str());
    o.device = params->device == MOEFLUX_DEVICE_CUDA ? moeflux::Device::cuda : moeflux::Device::cpu;
    o.gpu = params->gpu;
    o.gpu_cache.budget_bytes = params->gpu_cache_bytes;
    o.gpu_cache.preload = params->preload_experts != 0;
    auto model = moeflux::Model::open(o);
    if (!model) return fail(model.status());
    *out_model = new moeflux_model{std::move(model).value()};
    return MOEFLUX_OK;
  });
}

void moeflux_model_close(moeflux_model* model) { delete model; }

int64_t moeflux_model_n_vocab(const moeflux_model* model) { return model ? model->model->n_vocab() : 0; }

const char* moeflux_model_type(const moeflux_model* model) { return model ? model->model->model_type().c_str() : ""; }

moeflux_status moeflux_model_expert_stats(const moeflux_model* model, moeflux_expert_stats* out) {
  return guarded([&] {
    if (!model || !out) return fail(MOEFLUX_ERR_INVALID_ARGUMENT, "expert_stats: null argument");
    const moeflux::ExpertStoreStats s = model->model->experts().stats();
    *out = {s.hits, s.misses, s.bytes_read, s.reads, s.evictions, s.cached_experts, s.cached_bytes, s.wait_seconds};
    return MOEFLUX_OK;
  });
}

moeflux_session_params moeflux_session_default_params(void) { return moeflux_session_params{4096, 512, 2}; }

moeflux_status moeflux_session_create(moeflux_model* model, const moeflux_session_params* params, moeflux_session** out) {
  return guarded([&] {
    if (!model || !out) return fail(MOEFLUX_ERR_INVALID_ARGUMENT, "session_create: null argument");
    *out = nullptr;
    moeflux::SessionOptions o;
    if (params && params->n_ctx > 0) o.n_ctx = params->n_ctx;
    if (params && params->n_batch > 0) o.n_batch = params->n_batch;
    if (params && params->max_snapshots != 0) o.max_snapshots = int(std::clamp<int64_t>(params->max_snapshots, 0, 1 << 20));
    auto session = moeflux::Session::create(*model->model, o);
    if (!session) return fail(session.status());
    *out = new moeflux_session{std::move(session).value()};
    return MOEFLUX_OK;
  });
}

void moeflux_session_free(moeflux_session* session) { delete session; }

moeflux_status moeflux_session_eval_prompt(moeflux_session* session, const int32_t* tokens, size_t n) {
  return guarded([&] {
    if (!session || (!tokens && n > 0)) return fail(MOEFLUX_ERR_INVALID_ARGUMENT, "eval_prompt: null argument");
    const moeflux::Status s = session->session->eval_prompt(std::span<const int32_t>(tokens, n));
    return s.is_ok() ? MOEFLUX_OK : fail(s);
  });
}

moeflux_status moeflux_session_eval_token(moeflux_session* session, int32_t token) {
  return guarded([&] {
    if (!session) return fail(MOEFLUX_ERR_INVALID_ARGUMENT, "eval_token: null session");
    const moeflux::Status s = session->session->eval_token(token);
    return s.is_ok() ? MOEFLUX_OK : fail(s);
  });
}

const float* moeflux_session_logits(const moeflux_session* session) {
  if (!session || !session->session->has_logits()) return nullptr;
  return session->session->logits();
}

int32_t moeflux_session_greedy_token(const moeflux_session* session) {
  if (!session || !session->session->has_logits()) return -1;
  int32_t id = -1;
  guarded([&] {
    id = session->session->greedy_token();
    return MOEFLUX_OK;
  });
  return id;
}

int32_t moeflux_session_sample(const moeflux_session* session, moeflux_sampler* sampler) {
  if (!session || !sampler || !session->session->has_logits() || sampler->sampler.n_vocab() != session->session->n_vocab()) {
    moeflux::capi::fail(MOEFLUX_ERR_INVALID_ARGUMENT, !session || !sampler ? "session_sample: null argument"
                                                      : !session->session->has_logits()
                                                          ? "session_sample: no logits (evaluate a token first)"
                                                          : "session_sample: the sampler's vocabulary is not the model's");
    return -1;
  }
  int32_t id = -1;
  guarded([&] {
    id = sampler->picker.next(*session->session, sampler->sampler);
    return MOEFLUX_OK;
  });
  return id;
}

int64_t moeflux_session_n_past(const moeflux_session* session) { return session ? session->session->n_past() : 0; }

void moeflux_session_reset(moeflux_session* session) {
  if (session) session->session->reset();
}

moeflux_status moeflux_session_truncate(moeflux_session* session, int64_t n_past) {
  return guarded([&] {
    if (!session) return fail(MOEFLUX_ERR_INVALID_ARGUMENT, "truncate: null session");
    const moeflux::Status s = session->session->truncate(n_past);
    return s.is_ok() ? MOEFLUX_OK : fail(s);
  });
}

moeflux_status moeflux_session_rewind(moeflux_session* session, int64_t n_past, int64_t* out_n_past) {
  return guarded([&] {
    if (!session) return fail(MOEFLUX_ERR_INVALID_ARGUMENT, "rewind: null session");
    auto reached = session->session->rewind(n_past);
    if (!reached) return fail(reached.status());
    if (out_n_past) *out_n_past = *reached;
    return MOEFLUX_OK;
  });
}

moeflux_status moeflux_session_checkpoint(moeflux_session* session) {
  return guarded([&] {
    if (!session) return fail(MOEFLUX_ERR_INVALID_ARGUMENT, "checkpoint: null session");
    const moeflux::Status s = session->session->checkpoint();
    return s.is_ok() ? MOEFLUX_OK : fail(s);
  });
}

size_t moeflux_session_snapshot_positions(const moeflux_session* session, int64_t* positions, size_t capacity) {
  if (!session) return 0;
  try {
    const std::vector<int64_t> p = session->session->snapshot_positions();
    for (size_t i = 0; positions && i < p.size() && i < capacity; ++i) positions[i] = p[i];
    return p.size();
  } catch (...) {
    return 0;
  }
}

size_t moeflux_session_state_size(const moeflux_session* session) { return session ? session->session->state_size() : 0; }

moeflux_status moeflux_session_state_save(const moeflux_session* session, uint8_t* buffer, size_t capacity, size_t* out_written) {
  return guarded([&] {
    if (!session || !buffer) return fail(MOEFLUX_ERR_INVALID_ARGUMENT, "state_save: null argument");
    std::vector<uint8_t> bytes;
    const moeflux::Status s = session->session->state_save(bytes);
    if (!s.is_ok()) return fail(s);
    if (bytes.size() > capacity) {
      return fail(MOEFLUX_ERR_INVALID_ARGUMENT,
                  ("state_save: buffer of " + std::to_string(capacity) + " bytes, the state needs " + std::to_string(bytes.size())).c_str());
    }
    std::copy(bytes.begin(), bytes.end(), buffer);
    if (out_written) *out_written = bytes.size();
    return MOEFLUX_OK;
  });
}

moeflux_status moeflux_session_state_load(moeflux_session* session, const uint8_t* data, size_t size) {
  return guarded([&] {
    if (!session || (!data && size > 0)) return fail(MOEFLUX_ERR_INVALID_ARGUMENT, "state_load: null argument");
    const moeflux::Status s = session->session->state_load(std::span<const uint8_t>(data, size));
    return s.is_ok() ? MOEFLUX_OK : fail(s);
  });
}

}  // extern "C"
