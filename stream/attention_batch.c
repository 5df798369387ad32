/* Approximate batch attention (kmv_attention() without params.exact): an
 * attention stream over the keys and one decoding step per query, so that
 * every row carries the step's guarantee on the normalized output
 * (docs/guarantee-attention.md). Causal: the keys enter as the rows
 * advance, row i stepping against keys 0..i.
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

#include "algo/exact.h"
#include "algo/stats.h"
#include "common/alloc.h"
#include "common/timer.h"
#include "stream/attention_batch.h"
#include "stream/stream.h"

/* Rows stepped before deciding whether the approximate path gains. */
#define PROBE_ROWS 32

/* The batch's state. */
typedef struct batch {
    const kmv__params *pa;
    const float *q, *k, *v;
    size_t m, n, d, c;
    double scale;
    kmv_stream *s;
    const kmv_allocator *a;
    float *res;              /* m x c answers */
    unsigned char *deferred; /* rows left to the exact engine */
    int defer;               /* non-causal, no cap: exact rows are deferred */
    int nt, threads, gave_up;
    size_t approx, rows_done, why[KMV_FALLBACK_TREE + 1];
    kmv__stats *S;
} batch;

/* Add one row's step to the batch's stats. */
static void tally(batch *b, const kmv__stats *st) {
    kmv__stats *S = b->S;
    S->samples += st->samples;
    S->lsh_candidates += st->lsh_candidates;
    S->heavy_pairs += st->heavy_pairs;
    S->kernel_evals += st->kernel_evals;
    if (st->mode == KMV_MODE_APPROX) b->approx++;
    else if (st->fallback_reason > 0 && st->fallback_reason <= KMV_FALLBACK_TREE)
        b->why[st->fallback_reason]++;
}

/* Row i's step (its keys entering first when causal). */
static int step_row(batch *b, size_t i, kmv__stats *st) {
    size_t have = kmv__index_keys(b->s->ix)->n;
    if (b->pa->causal && have < b->n && have <= i) {
        int rc = kmv_stream_append_keys(b->s, b->k + have * b->d, b->v + have * b->c,
                                        (i < b->n ? i + 1 : b->n) - have);
        if (rc != KMV_OK) return rc;
    }
    int rc = kmv__stream_attn_decode(b->s, b->q + i * b->d, b->res + i * b->c, st,
                                     b->defer ? KMV__STEP_DEFER : 0u);
    if (rc == KMV_OK) b->deferred[i] = b->defer && st->mode != KMV_MODE_APPROX;
    return rc;
}

/* Rows one at a time until one approximates (then the rest may run in
 * parallel), or the probe shows nothing to gain (gave_up). */
static int probe(batch *b) {
    const kmv__params *pa = b->pa;
    for (size_t i = 0; i < b->m; i++) {
        kmv__stats st;
        int rc = step_row(b, i, &st);
        if (rc != KMV_OK) return rc;
        b->rows_done++;
        tally(b, &st);
        /* The rest in parallel; not under a memory cap, where rows stepping
         * at once would hold more scratch than one, and which row met the
         * cap would depend on timing. */
        if (b->approx > 0 && !pa->causal && b->nt > 1 && pa->max_bytes == 0) break;
        if (pa->force_approx || b->approx > 0) continue;
        /* A refusal that holds for the whole size (no plan, the cap, too
         * few keys) makes every row exact: stop probing at once. */
        int size_wide = st.fallback_reason == KMV_FALLBACK_LSH ||
                        st.fallback_reason == KMV_FALLBACK_MEMORY ||
                        st.fallback_reason == KMV_FALLBACK_SMALL;
        if (i + 1 == PROBE_ROWS || (size_wide && !pa->causal)) {
            b->gave_up = 1;
            break;
        }
    }
    return KMV_OK;
}

/* The rows after the probe, concurrently. */
static int step_rest(batch *b) {
    if (b->gave_up || b->rows_done == b->m) return KMV_OK;
    size_t from = b->rows_done;
    int prc = KMV_OK;
#pragma omp parallel for num_threads(b->nt) schedule(dynamic, 8)
    for (size_t i = from; i < b->m; i++) {
        kmv__stats st;
        memset(&st, 0, sizeof st);
        int seen;
#pragma omp atomic read
        seen = prc;
        int r = seen == KMV_OK ? step_row(b, i, &st) : KMV_OK;
#pragma omp critical
        {
            if (r != KMV_OK && prc == KMV_OK) {
#pragma omp atomic write
                prc = r;
            }
            if (seen == KMV_OK && r == KMV_OK && prc == KMV_OK) tally(b, &st);
        }
    }
    if (prc != KMV_OK) return prc;
    b->rows_done = b->m;
    b->threads = b->nt;
    return KMV_OK;
}

/* What the probe gave up on, on the exact engine. A causal row's keys are
 * fixed by its index in q, so a causal batch runs whole (its probe rows
 * were exact: nothing approximated). */
static int exact_rest(batch *b) {
    if (b->rows_done == b->m || b->defer) return KMV_OK;
    size_t from = b->pa->causal ? 0 : b->rows_done;
    kmv__problem pr = {b->q + from * b->d, b->k, b->v, b->res + from * b->c, b->m - from,
                       b->n, b->d, b->c, b->pa->causal, b->nt, NULL, NULL};
    int rc = kmv__exact_attn(b->a, &pr, b->scale, &b->threads);
    b->S->kernel_evals += (uint64_t)(b->m - b->rows_done) * b->n;
    return rc;
}

/* The deferred rows, and those the probe gave up on, in one call of the
 * exact engine (GEMM blocks, every thread) instead of one exact row per
 * step. */
static int exact_deferred(batch *b) {
    if (!b->defer) return KMV_OK;
    for (size_t i = b->rows_done; i < b->m; i++) b->deferred[i] = 1;
    size_t nd = 0, d = b->d, c = b->c;
    for (size_t i = 0; i < b->m; i++) nd += b->deferred[i];
    if (nd == 0) return KMV_OK;
    float *qd = kmv__malloc_array(b->a, nd, d * sizeof(float));
    float *od = kmv__malloc_array(b->a, nd, c * sizeof(float));
    int rc = qd && od ? KMV_OK : KMV_ENOMEM, et = 1;
    if (rc == KMV_OK) {
        for (size_t i = 0, u = 0; i < b->m; i++)
            if (b->deferred[i]) memcpy(qd + (u++) * d, b->q + i * d, d * sizeof(float));
        kmv__problem pr = {qd, b->k, b->v, od, nd, b->n, d, c, 0, b->nt, NULL, NULL};
        rc = kmv__exact_attn(b->a, &pr, b->scale, &et);
    }
    if (rc == KMV_OK) {
        for (size_t i = 0, u = 0; i < b->m; i++)
            if (b->deferred[i]) memcpy(b->res + i * c, od + (u++) * c, c * sizeof(float));
        b->S->kernel_evals += (uint64_t)nd * b->n;
        b->threads = et > b->threads ? et : b->threads;
    }
    kmv__free(b->a, qd);
    kmv__free(b->a, od);
    return rc;
}

/* Row i of softmax(scale Q K^T) V in double, with its causal mask. */
static void exact_attn_row(const batch *b, size_t i, double *o) {
    const float *qi = b->q + i * b->d;
    size_t lim = b->pa->causal && i + 1 < b->n ? i + 1 : b->n;
    double mx = -INFINITY, z = 0.0;
    for (size_t j = 0; j < lim; j++) {
        double s = 0.0;
        for (size_t u = 0; u < b->d; u++) s += (double)qi[u] * b->k[j * b->d + u];
        if (s * b->scale > mx) mx = s * b->scale;
    }
    for (size_t col = 0; col < b->c; col++) o[col] = 0.0;
    for (size_t j = 0; j < lim; j++) {
        double s = 0.0;
        for (size_t u = 0; u < b->d; u++) s += (double)qi[u] * b->k[j * b->d + u];
        double w = exp(s * b->scale - mx);
        z += w;
        for (size_t col = 0; col < b->c; col++) o[col] += w * b->v[j * b->c + col];
    }
    for (size_t col = 0; col < b->c; col++) o[col] /= z;
}

/* The monitor (params.verify_every = N): rows 0, N, 2N, ... against their
 * exact values; the errors ||o_i - exact_i|| are on error_bound's scale
 * (the bound is per row). */
static int verify(batch *b) {
    size_t N = (size_t)b->pa->verify_every;
    if (N == 0 || b->approx == 0) return KMV_OK;
    size_t nv = (b->m + N - 1) / N, c = b->c;
    double *err = kmv__malloc_array(b->a, nv, sizeof(double));
    double *o = kmv__malloc_array(b->a, nv, c * sizeof(double));
    int rc = err && o ? KMV_OK : KMV_ENOMEM;
    if (rc == KMV_OK) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(b->nt)
        for (size_t u = 0; u < nv; u++) {
            exact_attn_row(b, u * N, o + u * c);
            double e2 = 0.0;
            for (size_t col = 0; col < c; col++) {
                double t = (double)b->res[u * N * c + col] - o[u * c + col];
                e2 += t * t;
            }
            err[u] = sqrt(e2);
        }
        kmv__stats_verified(b->S, err, nv);
    }
    kmv__free(b->a, err);
    kmv__free(b->a, o);
    return rc;
}

/* Under params.measure_error, ||O - exact||_F / ||V||_F, as the paper's
 * appendix A.1.4 reports it. */
static int measure(batch *b) {
    if (!b->pa->measure_error) return KMV_OK;
    double tm = kmv__now();
    float *ye = kmv__malloc_array(b->a, b->m, b->c * sizeof(float));
    if (ye == NULL) return KMV_ENOMEM;
    kmv__problem pr = {b->q, b->k, b->v, ye, b->m, b->n, b->d, b->c, b->pa->causal, b->nt, NULL, NULL};
    int rc = kmv__exact_attn(b->a, &pr, b->scale, &b->threads);
    if (rc == KMV_OK) {
        double e2 = 0.0, v2 = 0.0;
        for (size_t u = 0; u < b->m * b->c; u++) e2 += ((double)b->res[u] - ye[u]) * ((double)b->res[u] - ye[u]);
        for (size_t u = 0; u < b->n * b->c; u++) v2 += (double)b->v[u] * b->v[u];
        b->S->error_measured = v2 > 0.0 ? sqrt(e2 / v2) : sqrt(e2);
        b->S->seconds_measure = kmv__now() - tm;
    }
    kmv__free(b->a, ye);
    return rc;
}

/* The batch's stats: the mode any row approximated in, the most common
 * reason otherwise, and the bound every row carries (kmv.h) — an exact one
 * trivially; under the empirical budget an approximated row carries none. */
static void report(batch *b) {
    kmv__stats *S = b->S;
    int top = 0;
    for (int r = 1; r <= KMV_FALLBACK_TREE; r++)
        if (b->why[r] > b->why[top]) top = r;
    S->mode = b->approx ? KMV_MODE_APPROX : KMV_MODE_FALLBACK;
    S->fallback_reason = b->approx ? KMV_FALLBACK_NONE : (kmv_fallback)top;
    S->rows_exact = b->m - b->approx;
    S->n_threads = b->threads;
    S->error_bound = b->approx && b->pa->attn_budget == KMV_BUDGET_EMPIRICAL
                         ? INFINITY
                         : b->pa->eps * sqrt(b->s->wmax) / (1.0 - b->pa->eps);
}

/* The batch's rows on b->s (its keys held, or entering row by row when
 * causal), into out. */
static int run(batch *b, float *out, double t0) {
    static int (*const steps[])(batch *) = {probe,          step_rest, exact_rest,
                                            exact_deferred, verify,    measure};
    size_t m = b->m, c = b->c;
    b->a = kmv__index_alloc(b->s->ix);
    b->res = kmv__malloc_array(b->a, m ? m : 1, c * sizeof(float));
    b->deferred = kmv__malloc_array(b->a, m ? m : 1, 1);
    int rc = b->res && b->deferred ? KMV_OK : KMV_ENOMEM;
    if (rc == KMV_OK) memset(b->deferred, 0, m ? m : 1);
    for (size_t u = 0; rc == KMV_OK && u < sizeof steps / sizeof *steps; u++) rc = steps[u](b);
    /* finite operands can still sum past float's range: an error, not an
     * infinity passed off as a result (out untouched) */
    if (rc == KMV_OK && kmv_find_nonfinite(b->res, m * c, NULL) != KMV_OK) rc = KMV_EOVERFLOW;
    if (rc == KMV_OK) {
        report(b);
        memcpy(out, b->res, m * c * sizeof(float));
        b->S->seconds = kmv__now() - t0;
    }
    if (rc == KMV_ENOMEM) rc = kmv__meter_code(kmv__index_meter(b->s->ix), rc); /* the cap's refusal */
    kmv__free(b->a, b->res);
    kmv__free(b->a, b->deferred);
    return rc;
}

int kmv__attention_stream_rows(kmv_stream *s, const float *q, size_t m, float *out,
                               kmv__stats *stats) {
    double t0 = kmv__now();
    const kmv__params *pa = kmv__index_params(s->ix);
    const kmv__keystore *ks = kmv__index_keys(s->ix);
    const kmv_allocator *a = kmv__index_alloc(s->ix);
    size_t n = ks->n, d = s->d - 1, c = s->c - 1;
    kmv__stats S;
    kmv__stats_start(&S, n, m, d, c, 1, pa->eps);
    /* The exact engine's operands: the keys unlifted and the values
     * without their ones column, in id order. */
    float *k = kmv__malloc_array(a, n ? n : 1, d * sizeof(float));
    float *v = kmv__malloc_array(a, n ? n : 1, c * sizeof(float));
    int rc = k && v ? KMV_OK : KMV_ENOMEM;
    for (size_t id = 0; rc == KMV_OK && id < n; id++) {
        memcpy(k + id * d, kmv__keystore_row(ks, id), d * sizeof(float));
        memcpy(v + id * c, s->x + id * s->c, c * sizeof(float));
    }
    batch b = {.pa = pa, .q = q, .k = k, .v = v, .m = m, .n = n, .d = d, .c = c,
               .scale = s->scale, .s = s, .nt = kmv__threads(pa), .threads = 1, .S = &S,
               .defer = pa->max_bytes == 0}; /* attention streams are not causal */
    if (rc == KMV_OK) rc = run(&b, out, t0);
    else rc = kmv__meter_code(kmv__index_meter(s->ix), rc);
    if (rc == KMV_OK) *stats = S;
    kmv__free(a, k);
    kmv__free(a, v);
    return rc;
}

int kmv__attention_approx(const kmv_ctx *ctx, const float *q, size_t m, const float *k,
                          size_t n, size_t d, const float *v, size_t c, double scale,
                          float *out, kmv__stats *stats) {
    double t0 = kmv__now();
    const kmv__params *pa = &ctx->params;
    kmv__params p = *pa;
    p.attn_scale = scale;
    p.measure_error = 0; /* measured here, on the whole output */
    kmv__stats S;
    kmv__stats_start(&S, n, m, d, c, 1, pa->eps);
    batch b = {.pa = pa, .q = q, .k = k, .v = v, .m = m, .n = n, .d = d, .c = c,
               .scale = scale, .nt = kmv__threads(pa), .threads = 1, .S = &S,
               /* under a cap, one row at a time */
               .defer = !pa->causal && pa->max_bytes == 0};
    int rc = kmv__stream_attention_new(&p, &ctx->alloc, d, c, &b.s);
    if (rc != KMV_OK) return rc;
    if (!pa->causal) rc = kmv_stream_append_keys(b.s, k, v, n);
    if (rc == KMV_OK) rc = run(&b, out, t0);
    else rc = kmv__meter_code(kmv__index_meter(b.s->ix), rc);
    if (rc == KMV_OK) *stats = S;
    kmv_stream_free(b.s);
    return rc;
}
