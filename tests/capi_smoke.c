/* The C API from plain C: open a pack, evaluate, save and restore state, and see errors reported.
 * Usage: capi_smoke_c PACK_DIR OTHER_PACK_DIR (another model, whose state must be refused). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
  if (argc != 3) {
    fprintf(stderr, "usage: %s PACK_DIR OTHER_PACK_DIR\n", argv[0]);
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

  const int32_t prompt[5] = {1, 2, 3, 4, 5};
  EXPECT(moeflux_session_eval_prompt(session, prompt, 5) == MOEFLUX_OK);
  EXPECT(moeflux_session_n_past(session) == 5);
  const float* logits = moeflux_session_logits(session);
  EXPECT(logits != NULL);
  for (int64_t i = 0; logits && i < n_vocab; ++i) EXPECT(isfinite(logits[i]));

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

  moeflux_expert_stats stats;
  EXPECT(moeflux_model_expert_stats(model, &stats) == MOEFLUX_OK);
  EXPECT(stats.misses > 0 && stats.bytes_read > 0);

  free(first);
  free(state);
  moeflux_session_free(session);
  moeflux_model_close(model);
  if (failures) {
    fprintf(stderr, "capi_smoke: %d failures\n", failures);
    return 1;
  }
  printf("capi_smoke: ok\n");
  return 0;
}
