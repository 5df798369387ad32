/* GRAM and AGRAM: placeholder until the solver lands (issue 22). */
#include "regress/regress.h"

int kmv__regress_gram(const kmv__params *pa, const kmv_allocator *al,
                      const kmv_regress_params *rp, const double *a, size_t n, size_t d,
                      const double *b, double *x, kmv_regress_stats *st) {
    (void)pa, (void)al, (void)rp, (void)a, (void)n, (void)d, (void)b, (void)x, (void)st;
    return KMV_EUNSUPPORTED;
}

int kmv__lsqr(const kmv_allocator *a, size_t m, size_t n, kmv__op_fn apply_a, kmv__op_fn apply_at,
              void *op_ctx, const double *b, double *x, double tol, int max_iter, kmv__history *h,
              kmv__krylov_result *out) {
    (void)a, (void)m, (void)n, (void)apply_a, (void)apply_at, (void)op_ctx, (void)b, (void)x;
    (void)tol, (void)max_iter, (void)h, (void)out;
    return KMV_EUNSUPPORTED;
}
