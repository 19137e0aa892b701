/* The C API from plain C: open a pack, evaluate, save and restore state, go back, and see errors
 * reported. Usage: capi_smoke_c PACK_DIR OTHER_PACK_DIR DEMO_PACK_DIR HYBRID_PACK_DIR: OTHER is another
 * model, whose state must be refused; DEMO is the bundled demo model, which carries a tokenizer and a
 * chat template; HYBRID is a Gated DeltaNet model (recurrent state: going back only to snapshots). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "moeflux/moeflux.h"

static int failures = 0;
#define EXPECT(cond)                                                             \
  do {                                                                           \
    if (!(cond)) {                                                               \
      fprintf(stderr, "%s:%d: expected %s (last error: %s)\n", __FILE__, __LINE__, \
              #cond, moeflux_last_error());                                      \
      ++failures;                                                                \
    }                                                                            \
  } while (0)

int main(int argc, char** argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: %s PACK_DIR OTHER_PACK_DIR DEMO_PACK_DIR HYBRID_PACK_DIR\n", argv[0]);
    return 2;
  }
  moeflux_model_params params = moeflux_model_default_params();
  params.n_threads = 2;
  params.pack_dir = "/nonexistent/pack";
  moeflux_model* model = NULL;
  EXPECT(moeflux_model_open(&params, &model) == MOEFLUX_ERR_IO);
  EXPECT(model == NULL);
  EXPECT(strstr(moeflux_last_error(), "/nonexistent/pack") != NULL);

  params.pack_dir = argv[1];
  params.device = 7; /* neither CPU nor CUDA */
  EXPECT(moeflux_model_open(&params, &model) == MOEFLUX_ERR_INVALID_ARGUMENT);
  EXPECT(strstr(moeflux_last_error(), "device 7") != NULL);
  params.device = MOEFLUX_DEVICE_CPU;
  EXPECT(moeflux_model_open(&params, &model) == MOEFLUX_OK);
  if (!model) return 1;
  const int64_t n_vocab = moeflux_model_n_vocab(model);
  EXPECT(n_vocab > 0);
  EXPECT(strcmp(moeflux_model_type(model), "qwen3_moe") == 0);

  moeflux_session_params sp = moeflux_session_default_params();
  sp.n_ctx = 64;
  moeflux_session* session = NULL;
  EXPECT(moeflux_session_create(model, &sp, &session) == MOEFLUX_OK);
  if (!session) return 1;
  EXPECT(moeflux_session_logits(session) == NULL);
  EXPECT(moeflux_session_greedy_token(session) == -1);

  const int32_t prompt[5] = {1, 2, 3, 4, 5};
  EXPECT(moeflux_session_eval_prompt(session, prompt, 5) == MOEFLUX_OK);
  EXPECT(moeflux_session_n_past(session) == 5);
  const float* logits = moeflux_session_logits(session);
  EXPECT(logits != NULL);
  for (int64_t i = 0; logits && i < n_vocab; ++i) EXPECT(isfinite(logits[i]));
  int32_t best = 0; /* the first largest logit */
  for (int64_t i = 1; logits && i < n_vocab; ++i)
    if (logits[i] > logits[best]) best = (int32_t)i;
  EXPECT(moeflux_session_greedy_token(session) == best);

  /* Save, continue, restore, continue again: the same logits. */
  size_t size = moeflux_session_state_size(session);
  uint8_t* state = malloc(size);
  size_t written = 0;
  EXPECT(moeflux_session_state_save(session, state, size - 1, &written) == MOEFLUX_ERR_INVALID_ARGUMENT);
  EXPECT(moeflux_session_state_save(session, state, size, &written) == MOEFLUX_OK);
  EXPECT(written == size);
  EXPECT(moeflux_session_eval_token(session, 7) == MOEFLUX_OK);
  float* first = malloc((size_t)n_vocab * sizeof(float));
  memcpy(first, moeflux_session_logits(session), (size_t)n_vocab * sizeof(float));
  moeflux_session_reset(session);
  EXPECT(moeflux_session_n_past(session) == 0);
  EXPECT(moeflux_session_state_load(session, state, written) == MOEFLUX_OK);
  EXPECT(moeflux_session_n_past(session) == 5);
  EXPECT(moeflux_session_eval_token(session, 7) == MOEFLUX_OK);
  EXPECT(memcmp(first, moeflux_session_logits(session), (size_t)n_vocab * sizeof(float)) == 0);

  /* Going back on an attention-only model: any position; a snapshot also brings back its logits. */
  EXPECT(moeflux_session_checkpoint(session) == MOEFLUX_OK); /* at 6 */
  EXPECT(moeflux_session_eval_token(session, 9) == MOEFLUX_OK);
  int64_t positions[8];
  EXPECT(moeflux_session_snapshot_positions(session, positions, 8) == 2); /* 5 (state_load), 6 */
  EXPECT(positions[0] == 5 && positions[1] == 6);
  int64_t reached = -1;
  EXPECT(moeflux_session_rewind(session, 6, &reached) == MOEFLUX_OK);
  EXPECT(reached == 6 && moeflux_session_n_past(session) == 6);
  EXPECT(moeflux_session_logits(session) != NULL &&
         memcmp(first, moeflux_session_logits(session), (size_t)n_vocab * sizeof(float)) == 0);
  EXPECT(moeflux_session_truncate(session, 3) == MOEFLUX_OK);
  EXPECT(moeflux_session_logits(session) == NULL); /* no snapshot at 3 */

  /* Bad input: a token outside the vocabulary, a corrupt state, another model's state. */
  EXPECT(moeflux_session_eval_token(session, (int32_t)n_vocab) == MOEFLUX_ERR_INVALID_ARGUMENT);
  EXPECT(strstr(moeflux_last_error(), "vocabulary") != NULL);
  state[written / 2] ^= 1;
  EXPECT(moeflux_session_state_load(session, state, written) == MOEFLUX_ERR_FORMAT);
  EXPECT(moeflux_session_truncate(session, 1000) == MOEFLUX_ERR_INVALID_ARGUMENT);

  moeflux_model* other = NULL;
  params.pack_dir = argv[2];
  EXPECT(moeflux_model_open(&params, &other) == MOEFLUX_OK);
  if (other) {
    moeflux_session* other_session = NULL;
    EXPECT(moeflux_session_create(other, &sp, &other_session) == MOEFLUX_OK);
    state[written / 2] ^= 1;  /* undo the corruption: a valid state, but of the first model */
    EXPECT(moeflux_session_state_load(other_session, state, written) == MOEFLUX_ERR_MISMATCH);
    moeflux_session_free(other_session);
    moeflux_model_close(other);
  }

  /* A hybrid model: its recurrent state goes back exactly to snapshots, and only there. */
  moeflux_model* hybrid = NULL;
  params.pack_dir = argv[4];
  EXPECT(moeflux_model_open(&params, &hybrid) == MOEFLUX_OK);
  if (hybrid) {
    EXPECT(strcmp(moeflux_model_type(hybrid), "qwen3_5_moe_text") == 0);
    moeflux_session* h = NULL;
    EXPECT(moeflux_session_create(hybrid, &sp, &h) == MOEFLUX_OK);
    const int32_t ids[8] = {11, 12, 13, 14, 15, 16, 17, 18};
    EXPECT(moeflux_session_eval_prompt(h, ids, 4) == MOEFLUX_OK); /* snapshot at 4 */
    const int64_t nv = moeflux_model_n_vocab(hybrid);
    float* at4 = malloc((size_t)nv * sizeof(float));
    memcpy(at4, moeflux_session_logits(h), (size_t)nv * sizeof(float));
    for (int i = 4; i < 8; ++i) EXPECT(moeflux_session_eval_token(h, ids[i]) == MOEFLUX_OK);
    EXPECT(moeflux_session_truncate(h, 6) == MOEFLUX_ERR_UNSUPPORTED);
    EXPECT(strstr(moeflux_last_error(), "snapshot") != NULL);
    EXPECT(moeflux_session_n_past(h) == 8);
    int64_t back = -1;
    EXPECT(moeflux_session_rewind(h, 6, &back) == MOEFLUX_OK);
    EXPECT(back == 4 && moeflux_session_n_past(h) == 4);
    EXPECT(memcmp(at4, moeflux_session_logits(h), (size_t)nv * sizeof(float)) == 0);
    free(at4);
    moeflux_session_free(h);
    moeflux_model_close(hybrid);
  }

  moeflux_expert_stats stats;
  EXPECT(moeflux_model_expert_stats(model, &stats) == MOEFLUX_OK);
  EXPECT(stats.misses > 0 && stats.bytes_read > 0);

  free(first);
  free(state);
  moeflux_session_free(session);
  moeflux_model_close(model);

  /* Text: template → tokenize → greedy generation with a sampler → streamed detokenization. */
  char tokenizer_dir[4096];
  snprintf(tokenizer_dir, sizeof tokenizer_dir, "%s/tokenizer", argv[3]);
  moeflux_tokenizer* tok = NULL;
  EXPECT(moeflux_tokenizer_load("/nonexistent/tokenizer", &tok) == MOEFLUX_ERR_IO);
  EXPECT(moeflux_tokenizer_load(tokenizer_dir, &tok) == MOEFLUX_OK);
  if (!tok) return 1;
  char prompt_text[512];
  size_t len = 0;
  const char* conversation = "{\"messages\": [{\"role\": \"user\", \"content\": \"Tell me a fortune about food.\"}], "
                             "\"add_generation_prompt\": true}";
  EXPECT(moeflux_chat_template_render(tokenizer_dir, conversation, prompt_text, 8, &len) == MOEFLUX_ERR_INVALID_ARGUMENT);
  EXPECT(len > 8);
  EXPECT(moeflux_chat_template_render(tokenizer_dir, conversation, prompt_text, sizeof prompt_text, &len) == MOEFLUX_OK);
  EXPECT(strcmp(prompt_text, "<|im_start|>user\nTell me a fortune about food.<|im_end|>\n<|im_start|>assistant\n") == 0);
  EXPECT(moeflux_chat_template_render(tokenizer_dir, "not json", prompt_text, sizeof prompt_text, &len) == MOEFLUX_ERR_FORMAT);

  int32_t ids[256];
  size_t n_ids = 0;
  EXPECT(moeflux_tokenize(tok, prompt_text, len, 0, ids, 2, &n_ids) == MOEFLUX_ERR_INVALID_ARGUMENT);
  EXPECT(moeflux_tokenize(tok, prompt_text, len, 0, ids, 256, &n_ids) == MOEFLUX_OK);
  EXPECT(n_ids > 4 && ids[0] == 1); /* <|im_start|> is one special token (id 1 in the demo vocabulary) */
  char round_trip[512];
  EXPECT(moeflux_detokenize(tok, ids, n_ids, 0, round_trip, sizeof round_trip, &len) == MOEFLUX_OK);
  EXPECT(strcmp(round_trip, prompt_text) == 0);

  params.pack_dir = argv[3];
  moeflux_model* demo = NULL;
  EXPECT(moeflux_model_open(&params, &demo) == MOEFLUX_OK);
  if (!demo) return 1;
  moeflux_session* chat = NULL;
  EXPECT(moeflux_session_create(demo, &sp, &chat) == MOEFLUX_OK);
  moeflux_sampler_params spp = moeflux_sampler_default_params();
  moeflux_sampler* sampler = NULL;
  spp.top_p = 2.0f;
  EXPECT(moeflux_sampler_create(&spp, moeflux_model_n_vocab(demo), &sampler) == MOEFLUX_ERR_INVALID_ARGUMENT);
  spp = moeflux_sampler_default_params();
  spp.temperature = 0.0f;
  EXPECT(moeflux_sampler_create(&spp, moeflux_model_n_vocab(demo), &sampler) == MOEFLUX_OK);
  moeflux_stream_decoder* stream = NULL;
  EXPECT(moeflux_stream_decoder_create(tok, 1, &stream) == MOEFLUX_OK);
  EXPECT(moeflux_session_eval_prompt(chat, ids, n_ids) == MOEFLUX_OK);
  char reply[4096] = "";
  size_t reply_len = 0;
  int32_t generated[32];
  int n_generated = 0;
  for (; n_generated < 32; ++n_generated) {
    const int32_t next = moeflux_sampler_sample(sampler, moeflux_session_logits(chat));
    EXPECT(next >= 0 && next < moeflux_model_n_vocab(demo));
    generated[n_generated] = next;
    moeflux_sampler_accept(sampler, next);
    if (next == moeflux_tokenizer_eos(tok)) break;
    char piece[256];
    size_t piece_len = 0;
    EXPECT(moeflux_stream_decoder_next(stream, next, piece, sizeof piece, &piece_len) == MOEFLUX_OK);
    memcpy(reply + reply_len, piece, piece_len);
    reply_len += piece_len;
    EXPECT(moeflux_session_eval_token(chat, next) == MOEFLUX_OK);
  }
  reply[reply_len] = 0;
  /* The streamed pieces join to exactly the whole decode of the generated tokens. */
  char whole[4096];
  size_t whole_len = 0;
  const int n_text = n_generated < 32 ? n_generated : 32; /* without a final EOS */
  EXPECT(moeflux_detokenize(tok, generated, (size_t)n_text, 1, whole, sizeof whole, &whole_len) == MOEFLUX_OK);
  EXPECT(strcmp(whole, reply) == 0);
  EXPECT(reply_len > 0);
  printf("capi_smoke: demo reply: %s\n", reply);

  /* moeflux_session_sample: the sampler's token taken where the logits are, draw for draw the one
   * moeflux_sampler_sample takes from the copied row (a twin sampler of the same seed). */
  moeflux_sampler_params top = moeflux_sampler_default_params();
  top.temperature = 0.6f, top.top_k = 20, top.top_p = 0.95f, top.seed = 42;
  moeflux_sampler *picker = NULL, *twin = NULL, *small = NULL;
  EXPECT(moeflux_sampler_create(&top, moeflux_model_n_vocab(demo), &picker) == MOEFLUX_OK);
  EXPECT(moeflux_sampler_create(&top, moeflux_model_n_vocab(demo), &twin) == MOEFLUX_OK);
  EXPECT(moeflux_sampler_create(&top, 7, &small) == MOEFLUX_OK);
  EXPECT(moeflux_session_sample(chat, small) == -1);
  EXPECT(strstr(moeflux_last_error(), "vocabulary") != NULL);
  EXPECT(moeflux_session_sample(NULL, picker) == -1);
  for (int i = 0; picker && twin && i < 8; ++i) { /* the context holds 64 tokens */
    const int32_t a = moeflux_session_sample(chat, picker); /* before the logits are copied */
    const int32_t b = moeflux_sampler_sample(twin, moeflux_session_logits(chat));
    EXPECT(a >= 0 && a == b);
    moeflux_sampler_accept(picker, a);
    moeflux_sampler_accept(twin, b);
    if (moeflux_session_n_past(chat) + 1 >= 64) break;
    EXPECT(moeflux_session_eval_token(chat, a) == MOEFLUX_OK);
  }
  moeflux_sampler_free(small);
  moeflux_sampler_free(twin);
  moeflux_sampler_free(picker);

  /* The pack's sampling settings: the demo's generation_config.json names none (nothing changes); a pack
   * whose file names Qwen3's gets them; a malformed one is refused and changes nothing. */
  moeflux_sampler_params from_pack = moeflux_sampler_default_params();
  const moeflux_sampler_params defaults = from_pack;
  EXPECT(moeflux_sampler_params_from_pack(argv[3], &from_pack) == MOEFLUX_OK);
  EXPECT(memcmp(&from_pack, &defaults, sizeof from_pack) == 0);
  EXPECT(moeflux_sampler_params_from_pack("/nonexistent/pack", &from_pack) == MOEFLUX_ERR_IO);
  char fake_pack[] = "/tmp/moeflux_capi_pack_XXXXXX";
  if (mkdtemp(fake_pack)) {
    char path[512];
    snprintf(path, sizeof path, "%s/tokenizer", fake_pack);
    EXPECT(mkdir(path, 0700) == 0);
    snprintf(path, sizeof path, "%s/tokenizer/generation_config.json", fake_pack);
    FILE* f = fopen(path, "w");
    if (f) {
      fputs("{\"do_sample\": true, \"temperature\": 0.6, \"top_k\": 20, \"top_p\": 0.95}", f);
      fclose(f);
    }
    from_pack.min_p = 0.05f;
    EXPECT(moeflux_sampler_params_from_pack(fake_pack, &from_pack) == MOEFLUX_OK);
    EXPECT(from_pack.temperature == 0.6f && from_pack.top_k == 20 && from_pack.top_p == 0.95f && from_pack.min_p == 0.05f);
    f = fopen(path, "w");
    if (f) {
      fputs("{\"top_k\": \"twenty\"}", f);
      fclose(f);
    }
    const moeflux_sampler_params before = from_pack;
    EXPECT(moeflux_sampler_params_from_pack(fake_pack, &from_pack) == MOEFLUX_ERR_FORMAT);
    EXPECT(strstr(moeflux_last_error(), "top_k") != NULL);
    EXPECT(memcmp(&from_pack, &before, sizeof from_pack) == 0);
    remove(path);
    snprintf(path, sizeof path, "%s/tokenizer", fake_pack);
    rmdir(path);
    rmdir(fake_pack);
  }
  moeflux_stream_decoder_free(stream);
  moeflux_sampler_free(sampler);
  moeflux_session_free(chat);
  moeflux_model_close(demo);
  moeflux_tokenizer_free(tok);
  if (failures) {
    fprintf(stderr, "capi_smoke: %d failures\n", failures);
    return 1;
  }
  printf("capi_smoke: ok\n");
  return 0;
}
