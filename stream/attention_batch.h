/* Internal: approximate batch attention, an attention stream's decoding
 * steps row by row (attention_batch.c). */
#ifndef KMV_STREAM_ATTENTION_BATCH_H
#define KMV_STREAM_ATTENTION_BATCH_H

#include <stddef.h>

#include "common/params.h"

/* kmv_attention()'s approximate path, past run()'s checks (finite
 * operands, n >= 1, m >= 1, c >= 1, logits within range; scale
 * resolved). Stats: mode APPROX when any row approximated, error_bound
 * the per-row bound, rows_exact the rows computed exactly,
 * error_measured ||O - O_hat||_F / ||V||_F under params.measure_error. */
int kmv__attention_approx(const kmv_ctx *ctx, const float *q, size_t m, const float *k,
                          size_t n, size_t d, const float *v, size_t c, double scale,
                          float *out, kmv__stats *stats);

/* kmv_stream_matvec() on an attention stream past its checks: the m
 * queries q (m x (dim), unlifted) against every key the stream holds, as
 * the batch above does (one step per row, exact rows deferred to the
 * exact engine), out m x n_cols. The stream's tables and draws are
 * prepared as its steps would. */
struct kmv_stream;
int kmv__attention_stream_rows(struct kmv_stream *s, const float *q, size_t m, float *out,
                               kmv__stats *stats);

#endif /* KMV_STREAM_ATTENTION_BATCH_H */
