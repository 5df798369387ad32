/* kmv_regress(): checks, dispatch to the problem's solver, and the final
 * residual. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <math.h>
#include <string.h>

#include "regress/regress.h"
#include "common/timer.h"

void kmv_regress_params_init(kmv_regress_params *p) {
    if (p == NULL) return;
    memset(p, 0, sizeof *p);
    p->problem = KMV_REGRESS_EXP;
    p->power = 1;
    p->tol = 1e-6;
    p->max_iter = 1000;
    p->precondition = 1;
}

static int check(const kmv_regress_params *rp) {
    if (rp->problem < KMV_REGRESS_EXP || rp->problem > KMV_REGRESS_AGRAM) return 0;
    if (rp->power < 1 || rp->power > 64) return 0;
    if (!(rp->scale >= 0.0) || !isfinite(rp->scale)) return 0;
    if (!(rp->ridge >= 0.0) || !isfinite(rp->ridge)) return 0;
    if (!(rp->tol > 0.0 && rp->tol < 1.0)) return 0;
    if (rp->max_iter < 1) return 0;
    if (rp->precondition != 0 && rp->precondition != 1) return 0;
    if (rp->history == NULL && rp->history_len > 0) return 0;
    return 1;
}

int kmv_regress(const kmv_ctx *ctx, const kmv_regress_params *rp, const float *a, size_t n,
                size_t d, const double *b, size_t b_len, double *x, kmv_regress_stats *stats) {
    if (ctx == NULL || rp == NULL || a == NULL || b == NULL || x == NULL || n == 0 || d == 0)
        return KMV_EINVAL;
    if (!check(rp)) return KMV_EINVAL;
    size_t nd, want = rp->problem == KMV_REGRESS_GRAM ? d : n;
    if (n > SIZE_MAX / d || (nd = n * d) > SIZE_MAX / sizeof(double)) return KMV_EOVERFLOW;
    if (b_len != want) return KMV_EDIM;
    if (kmv_find_nonfinite(a, nd, NULL) != KMV_OK) return KMV_ENONFINITE;
    for (size_t i = 0; i < b_len; i++)
        if (!isfinite(b[i])) return KMV_ENONFINITE;
    double t0 = kmv__now();
    kmv__meter meter;
    kmv__meter_init(&meter, &ctx->alloc, ctx->params.max_bytes);
    kmv_allocator al = kmv__meter_allocator(&meter);
    kmv_regress_stats st;
    memset(&st, 0, sizeof st);
    st.residual = st.residual_optimal = -1.0;
    size_t xn = rp->problem == KMV_REGRESS_EXP ? n : d;
    /* Written only on success: the solvers work in a copy. */
    double *xs = kmv__malloc_array(&al, xn, sizeof(double));
    int rc = xs == NULL ? KMV_ENOMEM : KMV_OK;
    if (rc == KMV_OK && rp->problem == KMV_REGRESS_EXP) {
        rc = kmv__regress_exp(&ctx->params, &al, rp, a, n, d, b, xs, &st);
    } else if (rc == KMV_OK) {
        double *ad = kmv__malloc_array(&al, nd, sizeof(double));
        if (ad == NULL) rc = KMV_ENOMEM;
        for (size_t i = 0; rc == KMV_OK && i < nd; i++) ad[i] = a[i];
        if (rc == KMV_OK) rc = kmv__regress_gram(&ctx->params, &al, rp, ad, n, d, b, xs, &st);
        kmv__free(&al, ad);
    }
    if (rc == KMV_OK) memcpy(x, xs, xn * sizeof(double));
    kmv__free(&al, xs);
    rc = kmv__meter_code(&meter, rc);
    st.seconds = kmv__now() - t0;
    if (stats != NULL && (rc == KMV_OK || rc == KMV_EOVERFLOW)) *stats = st;
    return rc;
}
