/* Approximate batch attention (kmv_attention() without params.exact):
 * an attention stream over the keys and one decoding step per query, so
 * that every row carries the step's guarantee on the normalized output
 * (see kmv_stream_attention_create() in kmv.h). Causal: the keys enter as
 * the rows advance, row i stepping against keys 0..i.
 *
 * Rows where Lemma 4.1's lifted kernel is too small for a sample to meet
 * the guarantee run exact inside the step, at the cost of an exact row
 * without the exact engine's GEMM. So the first rows probe: when none of
 * them could approximate, the rest go to the exact engine at once. Once a
 * row has approximated (its step prepared the stream's tables and draws
 * for the key count), the remaining rows of a non-causal batch without a
 * memory cap step concurrently, which the stream allows; each row's
 * answer is the one it would have alone, so the output does not depend on
 * the threads. */
#include <math.h>
#include <string.h>

#include "kmv/alloc.h"
#include "kmv/attention.h"
#include "kmv/context.h"
#include "kmv/exact.h"
#include "kmv/timer.h"
#include "stream/stream.h"

/* Rows stepped before deciding whether the approximate path gains. */
#define PROBE_ROWS 32

/* Add one row's step to the batch's stats. */
static void tally(kmv_stats *S, const kmv_stats *st, size_t *approx, double *bound, size_t *why) {
    S->samples += st->samples;
    S->lsh_candidates += st->lsh_candidates;
    S->heavy_pairs += st->heavy_pairs;
    S->kernel_evals += st->kernel_evals;
    if (st->mode == KMV_MODE_APPROX) {
        (*approx)++;
        *bound = st->error_bound > *bound ? st->error_bound : *bound;
    } else if (st->fallback_reason > 0 && st->fallback_reason < 8) {
        why[st->fallback_reason]++;
    }
}

int kmv__attention_approx(const kmv_ctx *ctx, const float *q, size_t m, const float *k,
                          size_t n, size_t d, const float *v, size_t c, double scale,
                          float *out, kmv_stats *stats) {
    double t0 = kmv__now();
    const kmv_params *pa = &ctx->params;
    kmv_params p = *pa;
    p.attn_scale = scale;
    p.measure_error = 0; /* measured here, on the whole output */
    kmv_stream *s;
    int rc = kmv__stream_attention_new(ctx, &p, d, c, &s);
    if (rc != KMV_OK) return rc;
    const kmv_allocator *a = &s->ix->alloc;
    float *res = kmv__malloc_array(a, m, c * sizeof(float));
    float *ye = NULL;
    if (res == NULL) {
        rc = KMV_ENOMEM;
        goto out;
    }
    kmv_stats S;
    memset(&S, 0, sizeof S);
    size_t approx = 0, rows_done = 0, why[8] = {0};
    double bound = 0.0;
    int nt = kmv__threads(pa), gave_up = 0;
    if (!pa->causal) rc = kmv_stream_append_keys(s, k, v, n);
    for (size_t i = 0; rc == KMV_OK && i < m; i++) {
        size_t have = s->ix->ks.n;
        if (pa->causal && have < n && have <= i)
            rc = kmv_stream_append_keys(s, k + have * d, v + have * c, (i < n ? i + 1 : n) - have);
        if (rc != KMV_OK) break;
        kmv_stats st;
        rc = kmv_stream_decode(s, q + i * d, res + i * c, &st);
        if (rc != KMV_OK) break;
        rows_done++;
        tally(&S, &st, &approx, &bound, why);
        /* The rest in parallel; not under a memory cap, where rows stepping
         * at once would hold more scratch than one, and which row met the
         * cap would depend on timing. */
        if (approx > 0 && !pa->causal && nt > 1 && pa->max_bytes == 0) break;
        if (pa->force_approx || approx > 0) continue;
        /* A refusal that holds for the whole size (no plan, the cap, too
         * few keys) makes every row exact: stop probing at once. */
        int size_wide = st.fallback_reason == KMV_FALLBACK_LSH ||
                        st.fallback_reason == KMV_FALLBACK_MEMORY ||
                        st.fallback_reason == KMV_FALLBACK_SMALL;
        if (i + 1 == PROBE_ROWS || (size_wide && !pa->causal)) {
            gave_up = 1;
            break;
        }
    }
    if (rc != KMV_OK) goto out;
    int threads = 1;
    if (!gave_up && rows_done < m) {
        size_t from = rows_done;
        int prc = KMV_OK;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 8)
        for (size_t i = from; i < m; i++) {
            kmv_stats st;
            int seen;
#pragma omp atomic read
            seen = prc;
            int r = seen == KMV_OK ? kmv_stream_decode(s, q + i * d, res + i * c, &st) : KMV_OK;
#pragma omp critical(kmv_attention_rows)
            {
                if (r != KMV_OK && prc == KMV_OK) {
#pragma omp atomic write
                    prc = r;
                }
                if (r == KMV_OK && prc == KMV_OK) tally(&S, &st, &approx, &bound, why);
            }
        }
        rc = prc;
        if (rc != KMV_OK) goto out;
        rows_done = m;
        threads = nt;
    }
    if (rows_done < m) { /* the probe found nothing to gain */
        kmv__problem pr = {q + rows_done * d, k, v, res + rows_done * c, m - rows_done, n, d, c,
                           0, kmv__threads(pa), NULL, NULL};
        rc = kmv__exact_attn(a, &pr, scale, &threads);
        if (rc != KMV_OK) goto out;
        S.kernel_evals += (uint64_t)(m - rows_done) * n;
    }
    S.mode = approx ? KMV_MODE_APPROX : KMV_MODE_FALLBACK;
    int top = 0;
    for (int r = 1; r < 8; r++)
        if (why[r] > why[top]) top = r;
    S.fallback_reason = approx ? 0 : top;
    S.rows_exact = m - approx;
    S.n_keys = n;
    S.n_queries = m;
    S.dim = d;
    S.n_cols = c;
    S.n_threads = threads;
    S.error_bound = bound;
    S.error_measured = -1.0;
    if (pa->measure_error) {
        ye = kmv__malloc_array(a, m, c * sizeof(float));
        if (ye == NULL) {
            rc = KMV_ENOMEM;
            goto out;
        }
        kmv__problem pr = {q, k, v, ye, m, n, d, c, pa->causal, kmv__threads(pa), NULL, NULL};
        rc = kmv__exact_attn(a, &pr, scale, &threads);
        if (rc != KMV_OK) goto out;
        double e2 = 0.0, v2 = 0.0;
        for (size_t u = 0; u < m * c; u++) e2 += ((double)res[u] - ye[u]) * ((double)res[u] - ye[u]);
        for (size_t u = 0; u < n * c; u++) v2 += (double)v[u] * v[u];
        S.error_measured = v2 > 0.0 ? sqrt(e2 / v2) : sqrt(e2);
    }
    memcpy(out, res, m * c * sizeof(float));
    S.seconds = kmv__now() - t0;
    if (stats != NULL) *stats = S;
out:
    kmv__free(a, res);
    kmv__free(a, ye);
    kmv_stream_free(s);
    return rc;
}
