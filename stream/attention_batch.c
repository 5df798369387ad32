/* Approximate batch attention (kmv_attention() without params.exact):
 * an attention stream over the keys and one decoding step per query, so
 * that every row carries the step's guarantee on the normalized output
 * (see kmv_stream_attention_create() in kmv.h). Causal: the keys enter as
 * the rows advance, row i stepping against keys 0..i.
 *
 * Rows where a sample cannot meet the guarantee would run exact inside
 * the step, one exact row without the exact engine's GEMM. So a
 * non-causal batch defers them and sums them together on the exact
 * engine afterwards, and the first rows probe: when none of them could
 * approximate, the rest go to the exact engine at once. Once a row has
 * approximated (its step prepared the stream's tables and draws for the
 * key count), the remaining rows of a non-causal batch without a memory
 * cap step concurrently, which the stream allows; each row's answer is
 * the one it would have alone, so the output does not depend on the
 * threads. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <math.h>
#include <string.h>

#include "common/alloc.h"
#include "stream/attention_batch.h"
#include "common/params.h"
#include "algo/exact.h"
#include "common/timer.h"
#include "stream/stream.h"

/* Rows stepped before deciding whether the approximate path gains. */
#define PROBE_ROWS 32

/* Add one row's step to the batch's stats. */
static void tally(kmv__stats *S, const kmv__stats *st, size_t *approx, size_t *why) {
    S->samples += st->samples;
    S->lsh_candidates += st->lsh_candidates;
    S->heavy_pairs += st->heavy_pairs;
    S->kernel_evals += st->kernel_evals;
    if (st->mode == KMV_MODE_APPROX) {
        (*approx)++;
    } else if (st->fallback_reason > 0 && st->fallback_reason < 8) {
        why[st->fallback_reason]++;
    }
}

int kmv__attention_approx(const kmv_ctx *ctx, const float *q, size_t m, const float *k,
                          size_t n, size_t d, const float *v, size_t c, double scale,
                          float *out, kmv__stats *stats) {
    double t0 = kmv__now();
    const kmv__params *pa = &ctx->params;
    kmv__params p = *pa;
    p.attn_scale = scale;
    p.measure_error = 0; /* measured here, on the whole output */
    kmv_stream *s;
    int rc = kmv__stream_attention_new(ctx, &p, d, c, &s);
    if (rc != KMV_OK) return rc;
    const kmv_allocator *a = &s->ix->alloc;
    float *res = kmv__malloc_array(a, m, c * sizeof(float));
    float *ye = NULL, *qd = NULL, *od = NULL;
    /* Rows a step left to the exact engine (non-causal only: a causal
     * row's keys depend on its position, so its step sums it). */
    unsigned char *deferred = kmv__malloc_array(a, m ? m : 1, 1);
    int defer = !pa->causal && pa->max_bytes == 0; /* under a cap, one row at a time */
    if (res == NULL || deferred == NULL) {
        rc = KMV_ENOMEM;
        goto out;
    }
    kmv__stats S;
    memset(&S, 0, sizeof S);
    size_t approx = 0, rows_done = 0, why[8] = {0};
    int nt = kmv__threads(pa), gave_up = 0;
    memset(deferred, 0, m ? m : 1);
    if (!pa->causal) rc = kmv_stream_append_keys(s, k, v, n);
    for (size_t i = 0; rc == KMV_OK && i < m; i++) {
        size_t have = s->ix->ks.n;
        if (pa->causal && have < n && have <= i)
            rc = kmv_stream_append_keys(s, k + have * d, v + have * c, (i < n ? i + 1 : n) - have);
        if (rc != KMV_OK) break;
        kmv__stats st;
        rc = kmv__stream_attn_decode(s, q + i * d, res + i * c, &st, defer);
        if (rc != KMV_OK) break;
        deferred[i] = defer && st.mode != KMV_MODE_APPROX;
        rows_done++;
        tally(&S, &st, &approx, why);
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
            kmv__stats st;
            memset(&st, 0, sizeof st);
            int seen;
#pragma omp atomic read
            seen = prc;
            int r = KMV_OK, ran = seen == KMV_OK;
            if (ran) r = kmv__stream_attn_decode(s, q + i * d, res + i * c, &st, defer);
            deferred[i] = ran && r == KMV_OK && st.mode != KMV_MODE_APPROX;
#pragma omp critical(kmv_attention_rows)
            {
                if (r != KMV_OK && prc == KMV_OK) {
#pragma omp atomic write
                    prc = r;
                }
                if (ran && r == KMV_OK && prc == KMV_OK) tally(&S, &st, &approx, why);
            }
        }
        rc = prc;
        if (rc != KMV_OK) goto out;
        rows_done = m;
        threads = nt;
    }
    if (rows_done < m && !defer) {
        /* The probe found nothing to gain. A causal row's keys are fixed by
         * its index in q, so a causal batch runs whole (its probe rows were
         * exact: nothing approximated). */
        size_t from = pa->causal ? 0 : rows_done;
        kmv__problem pr = {q + from * d, k, v, res + from * c, m - from, n, d, c,
                           pa->causal, kmv__threads(pa), NULL, NULL};
        rc = kmv__exact_attn(a, &pr, scale, &threads);
        if (rc != KMV_OK) goto out;
        S.kernel_evals += (uint64_t)(m - rows_done) * n;
    }
    if (defer) {
        /* The deferred rows, and those the probe gave up on, in one call
         * of the exact engine (GEMM blocks, every thread) instead of one
         * exact row per step. */
        for (size_t i = rows_done; i < m; i++) deferred[i] = 1;
        size_t nd = 0;
        for (size_t i = 0; i < m; i++) nd += deferred[i];
        if (nd) {
            qd = kmv__malloc_array(a, nd, d * sizeof(float));
            od = kmv__malloc_array(a, nd, c * sizeof(float));
            if (qd == NULL || od == NULL) {
                rc = KMV_ENOMEM;
                goto out;
            }
            for (size_t i = 0, u = 0; i < m; i++)
                if (deferred[i]) memcpy(qd + (u++) * d, q + i * d, d * sizeof(float));
            int et = 1;
            kmv__problem pr = {qd, k, v, od, nd, n, d, c, 0, nt, NULL, NULL};
            rc = kmv__exact_attn(a, &pr, scale, &et);
            if (rc != KMV_OK) goto out;
            for (size_t i = 0, u = 0; i < m; i++)
                if (deferred[i]) memcpy(res + i * c, od + (u++) * c, c * sizeof(float));
            S.kernel_evals += (uint64_t)nd * n;
            threads = et > threads ? et : threads;
        }
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
    /* Every row carries the step's bound (kmv.h), an exact one trivially;
     * under the empirical budget an approximated row carries none. */
    S.error_bound = approx && pa->attn_budget == KMV_BUDGET_EMPIRICAL
                        ? INFINITY
                        : pa->eps * sqrt(s->wmax) / (1.0 - pa->eps);
    S.error_measured = -1.0;
    if (pa->measure_error) {
        double tm = kmv__now();
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
        S.seconds_measure = kmv__now() - tm;
    }
    memcpy(out, res, m * c * sizeof(float));
    S.seconds = kmv__now() - t0;
    if (stats != NULL) *stats = S;
out:
    if (rc == KMV_ENOMEM) rc = kmv__meter_code(&s->ix->meter, rc); /* the cap's refusal */
    kmv__free(a, res);
    kmv__free(a, deferred);
    kmv__free(a, qd);
    kmv__free(a, od);
    kmv__free(a, ye);
    kmv_stream_free(s);
    return rc;
}
