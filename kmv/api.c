/* The public operations: validate once, then hand a kmv__problem to an
 * engine. Everything an engine may assume about its input is established
 * here, so the engines carry no argument checks of their own. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <float.h>
#include <limits.h>
#include <math.h>
#include <string.h>

#include "common/alloc.h"
#include "stream/attention_batch.h"
#include "common/params.h"
#include "algo/exact.h"
#include "engine/index.h"
#include "common/timer.h"


/* Every element count an engine forms (operands, copies, per-block scratch)
 * is a small multiple of these; a margin of 64 keeps all of them, times
 * sizeof(double), inside size_t. Arrays that large could not exist anyway. */
static int fits(size_t a, size_t b) {
    size_t prod;
    return kmv__mul_size(a, b, &prod) && prod <= SIZE_MAX / 64;
}

/* Row norms' maximum, in double. */
static double max_norm(const float *v, size_t rows, size_t d) {
    double best = 0.0;
    for (size_t i = 0; i < rows; i++) {
        double s = 0.0;
        for (size_t t = 0; t < d; t++) s += (double)v[i * d + t] * v[i * d + t];
        best = s > best ? s : best;
    }
    return sqrt(best);
}

/* Attention computes dot products and logits in float. By Cauchy-Schwarz
 * no |<q, k>| exceeds max ||q|| max ||k||; when that bound, or the bound on
 * the logits, comes within 2^-10 of float's range, refuse rather than
 * return infinities or NaN. Real attention inputs are nowhere near. */
static int logits_fit(const float *q, size_t m, const float *k, size_t n, size_t d,
                      double scale) {
    double bound = max_norm(q, m, d) * max_norm(k, n, d);
    double limit = 0x1p-10 * FLT_MAX;
    return bound <= limit && bound * scale <= limit && scale <= limit;
}


typedef enum { OP_GAUSS, OP_ATTN } op_kind;

/* The per-row bound an attention call guarantees (kmv.h), for a call the
 * exact engine answered in its place: eps sqrt(1 + R^2) / (1 - eps). */
static double attn_bound(const kmv__params *pa, const float *v, size_t n, size_t c) {
    double r = kmv_max_sq_norm(v, n, c);
    return pa->eps * sqrt(1.0 + r) / (1.0 - pa->eps);
}

/* kmv_matvec's approximate path: an index built for this one call. */
static int approx_once(const kmv_ctx *ctx, const float *q, size_t m, const float *k, size_t n,
                       size_t d, const float *x, size_t c, float *y, kmv__stats *stats,
                       double t0) {
    kmv_index *ix = NULL;
    int rc = kmv_index_create(ctx, d, &ix);
    /* Operands were checked by run(): the O(n d) finiteness scans are not
     * repeated. */
    if (rc == KMV_OK) rc = kmv__index_append_checked(ix, k, n);
    double t1 = kmv__now();
    if (rc == KMV_OK) rc = kmv__index_matvec_checked(ix, q, m, x, c, y, stats);
    kmv_index_free(ix);
    if (rc == KMV_OK && stats != NULL) {
        stats->seconds_prepare += t1 - t0;
        stats->seconds = kmv__now() - t0;
    }
    return rc;
}

static int run(const kmv_ctx *ctx, op_kind op, const float *q, size_t m, const float *k,
               size_t n, size_t d, const float *x, size_t c, float *y, kmv__stats *stats) {
    double t0 = kmv__now();
    if (ctx == NULL) return KMV_EINVAL;
    const kmv__params *pa = &ctx->params;
    if (d == 0) return KMV_EINVAL;
    if (!fits(m, d) || !fits(n, d) || !fits(n, c) || !fits(m, c) || !fits(m + n + 1, d + 1) ||
        m > SIZE_MAX / 64 || n > SIZE_MAX / 64)
        return KMV_EOVERFLOW;
    /* BLAS takes int dimensions and leading dimensions. */
    if (d > INT_MAX || c > INT_MAX) return KMV_EOVERFLOW;
    if ((m > 0 && q == NULL) || (n > 0 && k == NULL) || (n > 0 && c > 0 && x == NULL) ||
        (m > 0 && c > 0 && y == NULL))
        return KMV_EINVAL;
    if (kmv_find_nonfinite(q, m * d, NULL) != KMV_OK ||
        kmv_find_nonfinite(k, n * d, NULL) != KMV_OK ||
        kmv_find_nonfinite(x, n * c, NULL) != KMV_OK)
        return KMV_ENONFINITE;
    if (op == OP_ATTN && n == 0) return KMV_EEMPTY;
    double scale = pa->attn_scale > 0.0 ? pa->attn_scale : 1.0 / sqrt((double)d);
    if (op == OP_ATTN && !logits_fit(q, m, k, n, d, scale)) return KMV_EOVERFLOW;
    if (!pa->exact) {
        /* Too small to gain: no index built just to fall back; the exact
         * path below runs and the stats say why. */
        if (((double)m * (double)n >= KMV__APPROX_MIN_ENTRIES || pa->force_approx) && m > 0 &&
            c > 0) {
            if (op == OP_GAUSS) return approx_once(ctx, q, m, k, n, d, x, c, y, stats, t0);
            int rc = kmv__attention_approx(ctx, q, m, k, n, d, x, c, scale, y, stats);
            if (rc == KMV_OK && stats != NULL) stats->seconds = kmv__now() - t0;
            return rc;
        }
    }

    kmv__problem p = {q, k, x, y, m, n, d, c, pa->causal, kmv__threads(pa), pa->progress,
                      pa->progress_opaque};
    uint64_t evals = 0;
    int wide = 0, threads = 1;
    double t1 = kmv__now();
    int rc = KMV_OK;
    /* The cap applies to each call's own working memory: a meter per call,
     * since calls on one context may run concurrently. */
    kmv__meter meter;
    kmv__meter_init(&meter, &ctx->alloc, pa->max_bytes);
    kmv_allocator metered = kmv__meter_allocator(&meter);
    const kmv_allocator *al = pa->max_bytes ? &metered : &ctx->alloc;
    if (m > 0 && c > 0) {
        if (n == 0) {
            memset(y, 0, m * c * sizeof(float));
        } else if (op == OP_GAUSS) {
            rc = kmv__exact_gauss(al, &p, pa->sigma, &wide, &threads);
        } else {
            rc = kmv__exact_attn(al, &p, scale, &threads);
        }
        /* Causal: row i sees min(i + 1, n) keys. */
        if (!pa->causal) {
            evals = (uint64_t)m * n;
        } else {
            size_t tri = m < n ? m : n;
            evals = (uint64_t)tri * (tri + 1) / 2 + (uint64_t)(m - tri) * n;
        }
    }
    if (rc != KMV_OK) return kmv__meter_code(&meter, rc);
    /* Finite inputs can still sum past float's range (x near FLT_MAX): an
     * error, not an infinity passed off as a result. */
    if (kmv_find_nonfinite(y, m * c, NULL) != KMV_OK) return KMV_EOVERFLOW;
    if (pa->progress != NULL) pa->progress(pa->progress_opaque, 1.0);
    double t2 = kmv__now();
    if (stats != NULL) {
        memset(stats, 0, sizeof *stats);
        stats->mode = KMV_MODE_EXACT;
        stats->n_keys = n;
        stats->n_queries = m;
        stats->dim = d;
        stats->n_cols = c;
        stats->n_threads = threads;
        stats->kernel_evals = evals;
        stats->wide_dots = wide;
        stats->seconds = t2 - t0;
        stats->seconds_prepare = t1 - t0;
        stats->seconds_kernel = t2 - t1;
        stats->error_measured = pa->measure_error ? 0.0 : -1.0;
        if (!pa->exact) {
            stats->mode = KMV_MODE_FALLBACK;
            stats->fallback_reason = KMV_FALLBACK_SMALL;
            stats->error_bound = op == OP_ATTN ? attn_bound(pa, x, n, c) : pa->eps;
        }
    }
    return KMV_OK;
}

int kmv_matvec(const kmv_ctx *ctx, const float *queries, size_t n_queries, const float *keys,
               size_t n_keys, size_t dim, const float *x, size_t n_cols, float *y,
               kmv_stats *stats) {
    kmv__stats S;
    int rc = run(ctx, OP_GAUSS, queries, n_queries, keys, n_keys, dim, x, n_cols, y, &S);
    if (rc == KMV_OK) kmv__stats_export(&S, stats);
    return rc;
}

int kmv_attention(const kmv_ctx *ctx, const float *q, size_t n_queries, const float *k,
                  size_t n_keys, size_t dim, const float *v, size_t n_cols, float *out,
                  kmv_stats *stats) {
    kmv__stats S;
    int rc = run(ctx, OP_ATTN, q, n_queries, k, n_keys, dim, v, n_cols, out, &S);
    if (rc == KMV_OK) kmv__stats_export(&S, stats);
    return rc;
}
