// The C API's text half (include/moeflux/moeflux.h): tokenizer, streaming decoder, chat templates,
// sampler. Same rules as moeflux_c.cpp: every entry point catches everything.
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "capi/capi_errors.hpp"
#include "capi/capi_handles.hpp"
#include "moeflux/moeflux.h"
#include "sampling/generation_config.hpp"
#include "sampling/sampler.hpp"
#include "tokenizer/chat_template.hpp"
#include "tokenizer/tokenizer.hpp"

struct moeflux_tokenizer {
  std::unique_ptr<moeflux::Tokenizer> tokenizer;
};
struct moeflux_stream_decoder {
  moeflux::StreamingDecoder decoder;
};

using moeflux::capi::fail;
using moeflux::capi::guarded;

namespace {

// Writes text into a caller buffer by the header's rule (NUL-terminated when room remains).
moeflux_status put_text(const std::string& s, char* out, size_t capacity, size_t* out_len) {
  if (out_len) *out_len = s.size();
  if (s.size() > capacity) return fail(MOEFLUX_ERR_INVALID_ARGUMENT, ("output needs " + std::to_string(s.size()) + " bytes, the buffer holds " + std::to_string(capacity)).c_str());
  if (!s.empty()) std::memcpy(out, s.data(), s.size());
  if (s.size() < capacity) out[s.size()] = '\0';
  return MOEFLUX_OK;
}

}  // namespace

extern "C" {

moeflux_status moeflux_tokenizer_load(const char* path, moeflux_tokenizer** out) {
  return guarded([&] {
    if (!path || !out) return fail(MOEFLUX_ERR_INVALID_ARGUMENT, "tokenizer_load: null argument");
    *out = nullptr;
    auto t = moeflux::Tokenizer::load(path);
    if (!t) return fail(t.status());
    *out = new moeflux_tokenizer{std::move(t).value()};
    return MOEFLUX_OK;
  });
}

void moeflux_tokenizer_free(moeflux_tokenizer* tokenizer) { delete tokenizer; }

int32_t moeflux_tokenizer_vocab_size(const moeflux_tokenizer* tokenizer) { return tokenizer ? tokenizer->tokenizer->vocab_size() : 0; }

int32_t moeflux_tokenizer_eos(const moeflux_tokenizer* tokenizer) {
  if (!tokenizer) return -1;
  auto eos = tokenizer->tokenizer->eos_id();
  return eos ? *eos : -1;
}

moeflux_status moeflux_tokenize(const moeflux_tokenizer* tokenizer, const char* text, size_t text_len, int32_t add_special,
                                int32_t* tokens, size_t capacity, size_t* out_count) {
  return guarded([&] {
    if (!tokenizer || (!text && text_len > 0) || (!tokens && capacity > 0))
      return fail(MOEFLUX_ERR_INVALID_ARGUMENT, "tokenize: null argument");
    auto ids = tokenizer->tokenizer->encode(std::string_view(text ? text : "", text_len), add_special != 0);
    if (!ids) return fail(ids.status());
    if (out_count) *out_count = ids->size();
    if (ids->size() > capacity)
      return fail(MOEFLUX_ERR_INVALID_ARGUMENT, ("tokenize: " + std::to_string(ids->size()) + " tokens, the buffer holds " + std::to_string(capacity)).c_str());
    std::copy(ids->begin(), ids->end(), tokens);
    return MOEFLUX_OK;
  });
}

moeflux_status moeflux_detokenize(const moeflux_tokenizer* tokenizer, const int32_t* tokens, size_t n, int32_t skip_special,
                                  char* text, size_t capacity, size_t* out_len) {
  return guarded([&] {
    if (!tokenizer || (!tokens && n > 0) || (!text && capacity > 0)) return fail(MOEFLUX_ERR_INVALID_ARGUMENT, "detokenize: null argument");
    for (size_t i = 0; i < n; ++i)
      if (tokens[i] < 0 || tokens[i] >= tokenizer->tokenizer->vocab_size())
        return fail(MOEFLUX_ERR_INVALID_ARGUMENT, ("detokenize: token id " + std::to_string(tokens[i]) + " is outside the vocabulary").c_str());
    return put_text(tokenizer->tokenizer->decode(std::span<const int32_t>(tokens, n), skip_special != 0), text, capacity, out_len);
  });
}

moeflux_status moeflux_stream_decoder_create(const moeflux_tokenizer* tokenizer, int32_t skip_special, moeflux_stream_decoder** out) {
  return guarded([&] {
    if (!tokenizer || !out) return fail(MOEFLUX_ERR_INVALID_ARGUMENT, "stream_decoder_create: null argument");
    *out = new moeflux_stream_decoder{moeflux::StreamingDecoder(*tokenizer->tokenizer, skip_special != 0)};
    return MOEFLUX_OK;
  });
}

void moeflux_stream_decoder_free(moeflux_stream_decoder* decoder) { delete decoder; }

moeflux_status moeflux_stream_decoder_next(moeflux_stream_decoder* decoder, int32_t token, char* text, size_t capacity, size_t* out_len) {
  return guarded([&] {
    if (!decoder || (!text && capacity > 0)) return fail(MOEFLUX_ERR_INVALID_ARGUMENT, "stream_decoder_next: null argument");
    if (token < -1) return fail(MOEFLUX_ERR_INVALID_ARGUMENT, "stream_decoder_next: token must be ≥ 0, or -1 to flush");
    return put_text(token == -1 ? decoder->decoder.flush() : decoder->decoder.next(token), text, capacity, out_len);
  });
}

moeflux_status moeflux_chat_template_render(const char* tokenizer_dir, const char* conversation_json, char* text, size_t capacity,
                                            size_t* out_len) {
  return guarded([&] {
    if (!tokenizer_dir || !conversation_json || (!text && capacity > 0))
      return fail(MOEFLUX_ERR_INVALID_ARGUMENT, "chat_template_render: null argument");
    const auto conversation = nlohmann::ordered_json::parse(conversation_json, nullptr, /*allow_exceptions=*/false);
    if (conversation.is_discarded() || !conversation.is_object())
      return fail(MOEFLUX_ERR_FORMAT, "chat_template_render: the conversation is not a JSON object");
    auto config = moeflux::load_chat_template_config(tokenizer_dir);
    if (!config) return fail(config.status());
    auto rendered = moeflux::render_chat(config->source, conversation, config->bos_token, config->eos_token);
    if (!rendered) return fail(rendered.status());
    return put_text(*rendered, text, capacity, out_len);
  });
}

namespace {

moeflux::SamplerParams params_of(const moeflux_sampler_params& p) {
  moeflux::SamplerParams sp;
  sp.temperature = p.temperature;
  sp.top_k = p.top_k;
  sp.top_p = p.top_p;
  sp.min_p = p.min_p;
  sp.repetition_penalty = p.repetition_penalty;
  sp.presence_penalty = p.presence_penalty;
  sp.frequency_penalty = p.frequency_penalty;
  sp.penalty_last_n = p.penalty_last_n;
  sp.seed = p.seed;
  return sp;
}

moeflux_sampler_params c_params_of(const moeflux::SamplerParams& d) {
  return {d.temperature, d.top_k, d.top_p, d.min_p, d.repetition_penalty, d.presence_penalty, d.frequency_penalty, d.penalty_last_n, d.seed};
}

}  // namespace

moeflux_sampler_params moeflux_sampler_default_params(void) { return c_params_of(moeflux::SamplerParams{}); }

moeflux_status moeflux_sampler_params_from_pack(const char* pack_dir, moeflux_sampler_params* params) {
  return guarded([&] {
    if (!pack_dir || !params) return fail(MOEFLUX_ERR_INVALID_ARGUMENT, "sampler_params_from_pack: null argument");
    std::error_code ec;
    if (!std::filesystem::is_directory(pack_dir, ec))
      return fail(MOEFLUX_ERR_IO, (std::string("sampler_params_from_pack: ") + pack_dir + " is not a directory").c_str());
    auto config = moeflux::load_generation_config(std::string(pack_dir) + "/tokenizer");
    if (!config) return fail(config.status());
    moeflux::SamplerParams p = params_of(*params);
    moeflux::apply_generation_config(*config, p);
    *params = c_params_of(p);
    return MOEFLUX_OK;
  });
}

moeflux_status moeflux_sampler_create(const moeflux_sampler_params* p, int64_t n_vocab, moeflux_sampler** out) {
  return guarded([&] {
    if (!p || !out) return fail(MOEFLUX_ERR_INVALID_ARGUMENT, "sampler_create: null argument");
    *out = nullptr;
    auto s = moeflux::Sampler::create(params_of(*p), n_vocab);
    if (!s) return fail(s.status());
    *out = new moeflux_sampler{std::move(s).value(), {}};
    return MOEFLUX_OK;
  });
}

void moeflux_sampler_free(moeflux_sampler* sampler) { delete sampler; }

int32_t moeflux_sampler_sample(moeflux_sampler* sampler, const float* logits) {
  if (!sampler || !logits) return -1;
  return sampler->sampler.sample(logits);
}

void moeflux_sampler_accept(moeflux_sampler* sampler, int32_t token) {
  if (sampler && token >= 0 && token < sampler->sampler.n_vocab()) sampler->sampler.accept(token);
}

uint64_t moeflux_sampler_seed(const moeflux_sampler* sampler) { return sampler ? sampler->sampler.seed() : 0; }

}  // extern "C"
