/* The statistics every call starts from; see stats.h. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "algo/stats.h"

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
