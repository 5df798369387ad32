/* The one-shot operations, kmv_matvec() and kmv_attention(): validate
 * once, then hand the operands to an engine (the exact engine, an index
 * built for the call, or batch attention as a stream's steps). Everything
 * an engine may assume about its input is established here, so the
 * engines carry no argument checks of their own. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <limits.h>
#include <math.h>
#include <string.h>

#include "algo/exact.h"
#include "algo/lift.h"
#include "algo/stats.h"
#include "common/alloc.h"
#include "common/params.h"
#include "common/timer.h"
#include "engine/index.h"
#include "stream/attention_batch.h"

typedef enum { OP_GAUSS, OP_ATTN } op_kind;

/* One call's operands. */
typedef struct call {
    const kmv_ctx *ctx;
    const kmv__params *pa;
    op_kind op;
    const float *q, *k, *x;
    float *y;
    size_t m, n, d, c;
    double scale; /* attention's, resolved */
    double t0;    /* when the call began */
} call;

/* Every element count an engine forms (operands, copies, per-block scratch)
 * is a small multiple of these; a margin of 64 keeps all of them, times
 * sizeof(double), inside size_t. Arrays that large could not exist anyway. */
static int fits(size_t a, size_t b) {
    size_t prod;
    return kmv__mul_size(a, b, &prod) && prod <= SIZE_MAX / 64;
}

/* Logits near float's range are refused (algo/lift.h). Real attention
 * inputs are nowhere near. */
static int logits_fit(const call *cl) {
    return kmv__logits_fit(kmv_max_sq_norm(cl->q, cl->m, cl->d), kmv_max_sq_norm(cl->k, cl->n, cl->d),
                           cl->scale);
}

/* The checks every engine relies on. */
static int validate(const call *cl) {
    size_t m = cl->m, n = cl->n, d = cl->d, c = cl->c;
    if (d == 0) return KMV_EINVAL;
    if (!fits(m, d) || !fits(n, d) || !fits(n, c) || !fits(m, c) || !fits(m + n + 1, d + 1) ||
        m > SIZE_MAX / 64 || n > SIZE_MAX / 64)
        return KMV_EOVERFLOW;
    /* BLAS takes int dimensions and leading dimensions. */
    if (d > INT_MAX || c > INT_MAX) return KMV_EOVERFLOW;
    if ((m > 0 && cl->q == NULL) || (n > 0 && cl->k == NULL) || (n > 0 && c > 0 && cl->x == NULL) ||
        (m > 0 && c > 0 && cl->y == NULL))
        return KMV_EINVAL;
    if (kmv_find_nonfinite(cl->q, m * d, NULL) != KMV_OK ||
        kmv_find_nonfinite(cl->k, n * d, NULL) != KMV_OK ||
        kmv_find_nonfinite(cl->x, n * c, NULL) != KMV_OK)
        return KMV_ENONFINITE;
    if (cl->op == OP_ATTN && n == 0) return KMV_EEMPTY;
    if (cl->op == OP_ATTN && !logits_fit(cl)) return KMV_EOVERFLOW;
    return KMV_OK;
}

/* kmv_matvec's approximate path: an index built for this one call (the
 * operands' checks are not repeated). */
static int approx_gauss(const call *cl, kmv__stats *S) {
    double t0 = cl->t0;
    kmv_index *ix = NULL;
    int rc = kmv__index_new(cl->pa, &cl->ctx->alloc, cl->d, &ix);
    if (rc == KMV_OK) rc = kmv__index_append_keys(ix, cl->k, cl->n, 1);
    double t1 = kmv__now();
    if (rc == KMV_OK) rc = kmv__index_matvec_checked(ix, cl->q, cl->m, cl->x, cl->c, cl->y, S);
    kmv_index_free(ix);
    if (rc == KMV_OK) {
        S->seconds_prepare += t1 - t0;
        S->seconds = kmv__now() - t0;
    }
    return rc;
}

/* The exact engine. Not asked for (too small for the approximate path to
 * gain), it reports a fallback with the bound a call promises. */
static int exact(const call *cl, kmv__stats *S) {
    const kmv__params *pa = cl->pa;
    double t1 = kmv__now();
    size_t m = cl->m, n = cl->n, c = cl->c;
    kmv__problem p = {cl->q, cl->k, cl->x, cl->y, m, n, cl->d, c, pa->causal, kmv__threads(pa),
                      pa->progress, pa->progress_opaque};
    int wide = 0, threads = 1, rc = KMV_OK;
    /* The cap applies to each call's own working memory: a meter per call,
     * since calls on one context may run concurrently. */
    kmv__meter meter;
    kmv__meter_init(&meter, &cl->ctx->alloc, pa->max_bytes);
    kmv_allocator metered = kmv__meter_allocator(&meter);
    const kmv_allocator *al = pa->max_bytes ? &metered : &cl->ctx->alloc;
    if (m > 0 && c > 0 && n == 0) memset(cl->y, 0, m * c * sizeof(float));
    else if (m > 0 && c > 0 && cl->op == OP_GAUSS) rc = kmv__exact_gauss(al, &p, pa->sigma, &wide, &threads);
    else if (m > 0 && c > 0) rc = kmv__exact_attn(al, &p, cl->scale, &threads);
    if (rc != KMV_OK) return kmv__meter_code(&meter, rc);
    /* Finite inputs can still sum past float's range (x near FLT_MAX): an
     * error, not an infinity passed off as a result. */
    if (kmv_find_nonfinite(cl->y, m * c, NULL) != KMV_OK) return KMV_EOVERFLOW;
    if (pa->progress != NULL) pa->progress(pa->progress_opaque, 1.0);
    /* Causal: row i sees min(i + 1, n) keys. */
    size_t tri = m < n ? m : n;
    uint64_t evals = m == 0 || c == 0 ? 0
                     : pa->causal     ? (uint64_t)tri * (tri + 1) / 2 + (uint64_t)(m - tri) * n
                                      : (uint64_t)m * n;
    double bound = cl->op == OP_ATTN ? pa->eps * sqrt(1.0 + kmv_max_sq_norm(cl->x, n, c)) / (1.0 - pa->eps)
                                     : pa->eps;
    kmv__stats_start(S, n, m, cl->d, c, threads, pa->exact ? 0.0 : bound);
    S->mode = KMV_MODE_EXACT;
    if (!pa->exact) kmv__stats_fallback(S, KMV_FALLBACK_SMALL, evals);
    S->kernel_evals = evals;
    S->wide_dots = wide;
    S->error_measured = pa->measure_error ? 0.0 : -1.0;
    double t2 = kmv__now();
    S->seconds = t2 - cl->t0;
    S->seconds_prepare = t1 - cl->t0;
    S->seconds_kernel = t2 - t1;
    return KMV_OK;
}

static int run(const kmv_ctx *ctx, op_kind op, const float *q, size_t m, const float *k, size_t n,
               size_t d, const float *x, size_t c, float *y, kmv_stats *stats) {
    double t0 = kmv__now();
    if (ctx == NULL) return KMV_EINVAL;
    const kmv__params *pa = &ctx->params;
    double scale = pa->attn_scale > 0.0 ? pa->attn_scale : 1.0 / sqrt((double)(d ? d : 1));
    call cl = {ctx, pa, op, q, k, x, y, m, n, d, c, scale, t0};
    int rc = validate(&cl);
    if (rc != KMV_OK) return rc;
    /* Too small to gain: no index built just to fall back; the exact path
     * runs and the stats say why. */
    int approx = !pa->exact && m > 0 && c > 0 &&
                 ((double)m * (double)n >= KMV__APPROX_MIN_ENTRIES || pa->force_approx ||
                  pa->backend == KMV_BACKEND_TREE);
    kmv__stats S;
    if (!approx) rc = exact(&cl, &S);
    else if (op == OP_GAUSS) rc = approx_gauss(&cl, &S);
    else if ((rc = kmv__attention_approx(ctx, q, m, k, n, d, x, c, scale, y, &S)) == KMV_OK)
        S.seconds = kmv__now() - t0;
    if (rc == KMV_OK) kmv__stats_export(&S, stats);
    return rc;
}

int kmv_matvec(const kmv_ctx *ctx, const float *queries, size_t n_queries, const float *keys,
               size_t n_keys, size_t dim, const float *x, size_t n_cols, float *y,
               kmv_stats *stats) {
    return run(ctx, OP_GAUSS, queries, n_queries, keys, n_keys, dim, x, n_cols, y, stats);
}

int kmv_attention(const kmv_ctx *ctx, const float *q, size_t n_queries, const float *k,
                  size_t n_keys, size_t dim, const float *v, size_t n_cols, float *out,
                  kmv_stats *stats) {
    return run(ctx, OP_ATTN, q, n_queries, k, n_keys, dim, v, n_cols, out, stats);
}
