/* The statistics every call starts from, and the monitor's; see stats.h. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "algo/stats.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void kmv__stats_start(kmv__stats *S, size_t n, size_t m, size_t d, size_t c, int threads,
                      double bound) {
    memset(S, 0, sizeof *S);
    S->mode = KMV_MODE_APPROX;
    S->n_keys = n;
    S->n_queries = m;
    S->dim = d;
    S->n_cols = c;
    S->n_threads = threads;
    S->error_bound = bound;
    S->error_measured = -1.0;
}

void kmv__stats_fallback(kmv__stats *S, kmv_fallback reason, uint64_t evals) {
    S->mode = KMV_MODE_FALLBACK;
    S->fallback_reason = reason;
    S->kernel_evals = evals;
    S->error_estimate = 0.0;
}

void kmv__stats_tables(kmv__stats *S, double kappa, kmv__lsh_shape shape) {
    S->heavy_threshold = kappa;
    S->lsh_tables = shape.L;
    S->lsh_hash_len = shape.k;
    S->lsh_width = shape.w;
}

static int cmp_double(const void *pa, const void *pb) {
    double x = *(const double *)pa, y = *(const double *)pb;
    return (x > y) - (x < y);
}

void kmv__stats_verified(kmv__stats *S, double *err, size_t nv) {
    double sum = 0.0;
    for (size_t u = 0; u < nv; u++) sum += err[u];
    qsort(err, nv, sizeof(double), cmp_double);
    S->verified = nv;
    S->verify_mean = sum / (double)nv;
    S->verify_p99 = err[(size_t)ceil(0.99 * (double)nv) - 1];
    S->verify_max = err[nv - 1];
}
