/* A runner for llama2.c checkpoints (Karpathy's format: a 7-int header,
 * then float32 weights), whose attention goes through kmv: one attention
 * stream (kmv_stream_attention_create) per layer and key/value head. Each
 * token appends its key and value to its streams and asks the decoding
 * step for every query head's output. Uses only the public kmv.h.
 *
 * The forward pass follows llama2.c's run.c: RMSNorm, rotary position
 * embedding on q and k, grouped-query attention, SwiGLU feed-forward, a
 * classifier shared with the embedding unless the header's vocab_size is
 * negative. */
#ifndef KMV_LLAMA_H
#define KMV_LLAMA_H

#include <stddef.h>
#include <stdio.h>

#include "kmv/kmv.h"

typedef struct llm_config {
    int dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
} llm_config;

typedef struct llm_model llm_model;

/* Read a checkpoint. Every header field is checked against the file's
 * size before any weight is used: a truncated, padded or foreign file is a
 * clear error in err. Returns KMV_OK, KMV_EIO, KMV_EFORMAT or KMV_ENOMEM. */
int llm_load(const char *path, llm_model **out, char *err, size_t err_len);
void llm_free(llm_model *m);
const llm_config *llm_config_of(const llm_model *m);

/* One decoding session: the model's activations and its kmv streams,
 * under a copy of params (params.exact for exact attention) whose
 * attention scale is set to the model's, 1/sqrt(head size), for up to
 * max_pos positions (0: the checkpoint's seq_len; more runs the model past
 * the context it was trained on, the rotary angles computed per position).
 * keep_qkv: keep every position's q, k and v for llm_dump_*() (n_layers x
 * max_pos x dim floats each). Errors: KMV_EINVAL (max_pos < 0) and as
 * kmv_ctx_create() and kmv_stream_attention_create(). */
typedef struct llm_session llm_session;

int llm_session_create(const llm_model *m, const kmv_params *params, int max_pos, int keep_qkv,
                       llm_session **out);
void llm_session_free(llm_session *s);

/* Logits (vocab_size) for token at the next position. Errors: KMV_EINVAL
 * (token out of range, max_pos positions run, or a session that failed
 * before) or what the streams return, after which the session refuses
 * further tokens (its streams no longer agree on the positions). */
int llm_forward(llm_session *s, int token, const float **logits);

/* Tokens run so far. */
int llm_position(const llm_session *s);

/* Seconds spent in attention (the streams' appends and decoding steps) so
 * far, and in the whole forward passes. */
double llm_attention_seconds(const llm_session *s);
double llm_forward_seconds(const llm_session *s);

/* Every decoding step's stats, summed: steps, approximate steps, and the
 * largest error bound reported. */
typedef struct llm_attn_stats {
    size_t steps, approx_steps;
    size_t exact_why[KMV_FALLBACK_TREE + 1]; /* steps run exact, by kmv_fallback reason */
    double worst_bound;
} llm_attn_stats;
llm_attn_stats llm_attention_stats(const llm_session *s);
/* worst_bound back to 0, for a caller that reports it per stretch of
 * positions. */
void llm_attention_reset_worst(llm_session *s);

/* Per layer and head, the rotated q and k and the v of every token fed:
 * [pos][head][head size], for --dump-qk. NULL before the first token or
 * without keep_qkv. */
const float *llm_dump_q(const llm_session *s, int layer);
const float *llm_dump_k(const llm_session *s, int layer);
const float *llm_dump_v(const llm_session *s, int layer);

#endif /* KMV_LLAMA_H */
