/* moeflux C API: open a pack, create sessions, evaluate tokens, read logits, save and restore state.
 *
 * Conventions: every function that can fail returns a moeflux_status; MOEFLUX_OK is 0. On failure
 * moeflux_last_error() returns a message for the calling thread naming what went wrong (valid until
 * that thread's next moeflux call). Nothing is thrown across this API. Handles are opaque; a model
 * may be shared by several sessions, and must outlive them. A session is used by one thread at a time,
 * and the sessions of one model evaluate one at a time (they share its compute backend and scratch).
 */
#ifndef MOEFLUX_H
#define MOEFLUX_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum moeflux_status {
  MOEFLUX_OK = 0,
  MOEFLUX_ERR_INVALID_ARGUMENT = 1, /* a bad parameter, token id or call order */
  MOEFLUX_ERR_IO = 2,               /* open/read/write failed, short read */
  MOEFLUX_ERR_FORMAT = 3,           /* malformed or corrupt file */
  MOEFLUX_ERR_UNSUPPORTED = 4,      /* valid input this build does not handle */
  MOEFLUX_ERR_MISMATCH = 5,         /* input that contradicts another (state of another model) */
  MOEFLUX_ERR_OUT_OF_MEMORY = 6,
  MOEFLUX_ERR_INTERNAL = 7
} moeflux_status;

typedef struct moeflux_model moeflux_model;
typedef struct moeflux_session moeflux_session;

typedef struct moeflux_model_params {
  const char* pack_dir;          /* the pack directory written by `moeflux convert` */
  int32_t n_threads;             /* compute threads; 0 = all cores */
  uint64_t expert_cache_bytes;   /* host expert cache budget; 0 = keep none */
  int32_t n_io_threads;          /* expert reader threads; 0 = default (8) */
  int32_t io_direct;             /* 1: O_DIRECT reads (default), 0: page cache */
  int32_t verify_resident_hash;  /* 1: hash resident.bin at open (default) */
  int32_t device;                /* MOEFLUX_DEVICE_CPU (default) or MOEFLUX_DEVICE_CUDA: dense weights on the
                                    GPU, experts through a GPU cache over the host cache above */
  int32_t gpu;                   /* CUDA device index */
  uint64_t gpu_cache_bytes;      /* GPU expert cache budget; 0 = grow while 2 GiB of the device stay free */
  int32_t preload_experts;       /* 1: every expert onto the GPU at open (an error if they do not fit) */
} moeflux_model_params;

enum { MOEFLUX_DEVICE_CPU = 0, MOEFLUX_DEVICE_CUDA = 1 };

typedef struct moeflux_session_params {
  int64_t n_ctx;          /* context positions; 0 = 4096 (clamped to the model's maximum) */
  int64_t n_batch;        /* prompt tokens per forward pass; 0 = 512 */
  int64_t max_snapshots;  /* snapshots kept for going back (see below); 0 = 2, -1 = none */
} moeflux_session_params;

typedef struct moeflux_expert_stats {
  uint64_t hits, misses, bytes_read, reads, evictions, cached_experts, cached_bytes;
  double wait_seconds;
} moeflux_expert_stats;

const char* moeflux_last_error(void);
const char* moeflux_status_name(moeflux_status status);

moeflux_model_params moeflux_model_default_params(void);
moeflux_status moeflux_model_open(const moeflux_model_params* params, moeflux_model** out_model);
void moeflux_model_close(moeflux_model* model);
int64_t moeflux_model_n_vocab(const moeflux_model* model);
/* model_type of the pack ("qwen3_moe"); owned by the model. */
const char* moeflux_model_type(const moeflux_model* model);
/* The top expert tier's counters (the GPU cache with MOEFLUX_DEVICE_CUDA, else the host store). */
moeflux_status moeflux_model_expert_stats(const moeflux_model* model, moeflux_expert_stats* out_stats);

moeflux_session_params moeflux_session_default_params(void);
moeflux_status moeflux_session_create(moeflux_model* model, const moeflux_session_params* params,
                                      moeflux_session** out_session);
void moeflux_session_free(moeflux_session* session);

/* Evaluates n tokens at the current position (batched prefill); logits of the last one follow. Takes a
 * snapshot at its end (see "Going back"). */
moeflux_status moeflux_session_eval_prompt(moeflux_session* session, const int32_t* tokens, size_t n);
/* One decode step; takes no snapshot. */
moeflux_status moeflux_session_eval_token(moeflux_session* session, int32_t token);
/* The last position's logits [n_vocab], or NULL before any evaluation. Valid until the next eval. */
const float* moeflux_session_logits(const moeflux_session* session);
/* Greedy decoding's choice from the last logits: the first id of the largest value (ties to the lowest
 * id, NaN never chosen), picked where the logits are: on a GPU without copying them to the host, which
 * moeflux_session_logits does on its first call after an eval. -1 before any evaluation. */
int32_t moeflux_session_greedy_token(const moeflux_session* session);
int64_t moeflux_session_n_past(const moeflux_session* session);
void moeflux_session_reset(moeflux_session* session);

/* Going back.
 * Attention KV caches are addressed by position, so a model without recurrent state (qwen3_moe) can be
 * truncated to any position. Hybrid models (qwen3_next, qwen3_5_moe) also carry a recurrent state per
 * linear-attention layer (the Gated DeltaNet's conv and delta-rule states) that cannot be cut back by
 * position. The session therefore keeps snapshots of it: one at the end of every eval_prompt, and one
 * wherever moeflux_session_checkpoint is called (the oldest dropped beyond max_snapshots; each costs
 * the model's recurrent state — about 195 MB at Qwen3.5-397B — plus one row of logits).
 *   truncate(n):  exact. n may be any position for attention-only models; for hybrid models 0, the
 *                 current position or a snapshot position, else MOEFLUX_ERR_UNSUPPORTED (the message
 *                 lists the positions available). Going to a snapshot restores its logits too (sample
 *                 again without evaluating anything); going to an earlier position without one clears
 *                 them; the current position keeps them.
 *   rewind(n):    goes to the latest position <= n the session can return to exactly (n itself for
 *                 attention-only models), writes it to *out_n_past; re-evaluate the tokens after it.
 * A failed eval of a hybrid model leaves the session at the last snapshot (or 0) and says so.
 * state_save writes the state at the current position only; state_load drops the snapshots and takes
 * one at the loaded position. */
moeflux_status moeflux_session_truncate(moeflux_session* session, int64_t n_past);
moeflux_status moeflux_session_rewind(moeflux_session* session, int64_t n_past, int64_t* out_n_past);
moeflux_status moeflux_session_checkpoint(moeflux_session* session);
/* Writes up to capacity snapshot positions (ascending; positions may be NULL with capacity 0) and
 * returns how many there are. */
size_t moeflux_session_snapshot_positions(const moeflux_session* session, int64_t* positions, size_t capacity);

/* Snapshots: state_size gives the bytes state_save will write now. */
size_t moeflux_session_state_size(const moeflux_session* session);
moeflux_status moeflux_session_state_save(const moeflux_session* session, uint8_t* buffer, size_t capacity,
                                          size_t* out_written);
moeflux_status moeflux_session_state_load(moeflux_session* session, const uint8_t* data, size_t size);

/* ---- Text: tokenizer, streaming detokenizer, chat templates, sampling ------------------------------
 * Output buffers follow one rule: the call writes at most `capacity` items and sets *out_count to the
 * number the full result needs; a result larger than capacity returns MOEFLUX_ERR_INVALID_ARGUMENT
 * (call again with a buffer of *out_count). Text outputs are UTF-8 and NUL-terminated when room
 * remains (*out_len excludes the NUL). */

typedef struct moeflux_tokenizer moeflux_tokenizer;
typedef struct moeflux_stream_decoder moeflux_stream_decoder;
typedef struct moeflux_sampler moeflux_sampler;

/* path: a directory with tokenizer.json (+ tokenizer_config.json) — e.g. "<pack>/tokenizer" — or a
 * tokenizer.json file. */
moeflux_status moeflux_tokenizer_load(const char* path, moeflux_tokenizer** out_tokenizer);
void moeflux_tokenizer_free(moeflux_tokenizer* tokenizer);
int32_t moeflux_tokenizer_vocab_size(const moeflux_tokenizer* tokenizer);
/* The end-of-sequence id from tokenizer_config.json, or -1. */
int32_t moeflux_tokenizer_eos(const moeflux_tokenizer* tokenizer);
/* add_special = 0: no BOS/EOS, special tokens written in the text are recognized (Hugging Face's
 * encode(text, add_special_tokens=False)); 1: the tokenizer's post-processor adds them. */
moeflux_status moeflux_tokenize(const moeflux_tokenizer* tokenizer, const char* text, size_t text_len, int32_t add_special,
                                int32_t* tokens, size_t capacity, size_t* out_count);
moeflux_status moeflux_detokenize(const moeflux_tokenizer* tokenizer, const int32_t* tokens, size_t n, int32_t skip_special,
                                  char* text, size_t capacity, size_t* out_len);

/* Streaming detokenization: text comes out only as whole UTF-8 characters. */
moeflux_status moeflux_stream_decoder_create(const moeflux_tokenizer* tokenizer, int32_t skip_special,
                                             moeflux_stream_decoder** out_decoder);
void moeflux_stream_decoder_free(moeflux_stream_decoder* decoder);
/* Feeds one token (token ≥ 0) or, with token = -1, flushes what is held; writes the text now complete. */
moeflux_status moeflux_stream_decoder_next(moeflux_stream_decoder* decoder, int32_t token, char* text, size_t capacity,
                                           size_t* out_len);

/* Renders a conversation — JSON {"messages": [...], "tools": [...], "add_generation_prompt": true, ...}
 * — with the chat template of a tokenizer directory (tokenizer_config.json or chat_template.jinja). */
moeflux_status moeflux_chat_template_render(const char* tokenizer_dir, const char* conversation_json, char* text,
                                            size_t capacity, size_t* out_len);

typedef struct moeflux_sampler_params {
  float temperature;         /* 0 = greedy */
  int32_t top_k;             /* 0 = off */
  float top_p;               /* 1 = off */
  float min_p;               /* 0 = off */
  float repetition_penalty;  /* 1 = off */
  float presence_penalty;    /* 0 = off */
  float frequency_penalty;   /* 0 = off */
  int32_t penalty_last_n;    /* tokens the penalties see; -1 = all */
  uint64_t seed;             /* 0 = random */
} moeflux_sampler_params;

moeflux_sampler_params moeflux_sampler_default_params(void);
/* The model authors' sampling settings: the fields of *params that the pack's
 * tokenizer/generation_config.json names (temperature, top_k, top_p, min_p, repetition_penalty; do_sample
 * false sets temperature 0) are overwritten, the others kept, so a caller sets its own after this call.
 * MOEFLUX_OK with nothing changed where the pack has no such file; MOEFLUX_ERR_IO when pack_dir is not a
 * directory; MOEFLUX_ERR_FORMAT (nothing changed, moeflux_last_error names each bad field) when the file
 * is not a JSON object or a field has the wrong type. */
moeflux_status moeflux_sampler_params_from_pack(const char* pack_dir, moeflux_sampler_params* params);
moeflux_status moeflux_sampler_create(const moeflux_sampler_params* params, int64_t n_vocab, moeflux_sampler** out_sampler);
void moeflux_sampler_free(moeflux_sampler* sampler);
/* Picks a token from logits [n_vocab]; returns it, or -1 on a null argument. Does not record it. */
int32_t moeflux_sampler_sample(moeflux_sampler* sampler, const float* logits);
/* Records a token (prompt or generated) for the penalties. */
void moeflux_sampler_accept(moeflux_sampler* sampler, int32_t token);
uint64_t moeflux_sampler_seed(const moeflux_sampler* sampler);
/* The sampler's pick from the session's last logits — the token moeflux_sampler_sample would return on
 * moeflux_session_logits(session), draw for draw — taken where the logits are: greedy by
 * moeflux_session_greedy_token, top-k sampling (1 <= top_k <= 1024) and greedy or top-k picks with
 * penalties from at most 32 KB of candidates a GPU selects (with the penalty window's raw logits), every
 * other setting drawn on the GPU (only the id comes back); on a CPU backend from the row. Does not record it
 * (moeflux_sampler_accept). -1 before any evaluation, on a null argument or a sampler of another
 * vocabulary size (moeflux_last_error says which). */
int32_t moeflux_session_sample(const moeflux_session* session, moeflux_sampler* sampler);

#ifdef __cplusplus
}
#endif

#endif /* MOEFLUX_H */
