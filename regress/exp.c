/* EXP: placeholder until the solver lands (issue 22). */
#include "regress/regress.h"

int kmv__regress_exp(const kmv__params *pa, const kmv_allocator *al,
                     const kmv_regress_params *rp, const float *a, size_t n, size_t d,
                     const double *b, double *x, kmv_regress_stats *st) {
    (void)pa, (void)al, (void)rp, (void)a, (void)n, (void)d, (void)b, (void)x, (void)st;
    return KMV_EUNSUPPORTED;
}
