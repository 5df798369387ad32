/* Where a certificate can gain: for each data set and bandwidth, the keys
 * per row the bounds tree visits to certify its rows (keys summed exactly,
 * plus every key of a row it gives up on) against an oracle's, the fewest
 * keys per row that leave at most the row's share eps ||x|| / sqrt(m)
 * outside (keys taken by |K_ij x_j|, largest first, the rest estimated as
 * 0), on a sample of rows; then the tree's time against the exact
 * engine's, and what the cost model picks (AUTO) and its time.
 *
 *   bounds_map [--glove PATH] [--n N] [--rows R] [--threads T]
 *
 * Defaults: n = 16384 keys = queries, 256 oracle rows, eps = 0.1, x Gaussian.
 * Prints CSV: data, n, d, sigma, oracle_frac, tree_frac, tree_exact_rows,
 * tree_speedup, auto_backend, auto_speedup. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KMV_STATIC_LINKING_ONLY
#include "kmv/kmv.h"
#include "kmv/kmv_experimental.h"
#include "bench/oracle.h"
#include "tests/datagen.h"
#include "tools/clock.h"

static double timed(const float *q, size_t m, const float *k, size_t n, size_t d, const float *x,
                    double sigma, int exact, int backend, int threads, float *y, kmv_stats *st) {
    kmv_params p;
    kmv_params_init(&p);
    p.sigma = sigma;
    p.exact = exact;
    p.n_threads = threads;
    kmv_params_x px;
    kmv_params_get_x(&p, &px);
    px.backend = backend;
    kmv_params_set_x(&p, &px);
    kmv_ctx *ctx;
    if (kmv_ctx_create(&p, &ctx) != KMV_OK) return -1.0;
    double t0 = tool_now();
    int rc = kmv_matvec(ctx, q, m, k, n, d, x, 1, y, st);
    double t = tool_now() - t0;
    kmv_ctx_free(ctx);
    return rc == KMV_OK ? t : -1.0;
}

static void row(const char *name, const float *q, const float *k, size_t n, size_t d, double sigma,
                size_t rows, int threads) {
    float *x = malloc(n * sizeof(float)), *y = malloc(n * sizeof(float));
    dg_x(x, n, DG_X_GAUSS, 5);
    double of = bench_oracle(q, n, k, n, d, x, sigma, 0.1, rows);
    kmv_stats se, st, sa;
    double te = timed(q, n, k, n, d, x, sigma, 1, 0, threads, y, &se);
    double tt = timed(q, n, k, n, d, x, sigma, 0, KMV_BACKEND_TREE, threads, y, &st);
    double ta = timed(q, n, k, n, d, x, sigma, 0, KMV_BACKEND_AUTO, threads, y, &sa);
    kmv_stats_x sx, ax;
    kmv_stats_get_x(&st, &sx);
    kmv_stats_get_x(&sa, &ax);
    double tf = ((double)sx.keys_visited + (double)st.rows_exact * (double)n) / ((double)n * (double)n);
    const char *ab = sa.mode != KMV_MODE_APPROX ? "exact"
                     : ax.backend == KMV_BACKEND_TREE ? "tree" : "lsh";
    printf("%s,%zu,%zu,%.2f,%.4f,%.4f,%zu,%.2f,%s,%.2f\n", name, n, d, sigma, of, tf,
           st.rows_exact, te / tt, ab, te / ta);
    fflush(stdout);
    free(x);
    free(y);
}

int main(int argc, char **argv) {
    const char *glove = "../shared/data/glove100d_first65536.npy";
    size_t n = 16384, rows = 256;
    int threads = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--glove") && i + 1 < argc) glove = argv[++i];
        else if (!strcmp(argv[i], "--n") && i + 1 < argc) n = (size_t)strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--rows") && i + 1 < argc) rows = (size_t)strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: bounds_map [--glove PATH] [--n N] [--rows R] [--threads T]\n");
            return 2;
        }
    }
    printf("data,n,d,sigma,oracle_frac,tree_frac,tree_exact_rows,tree_speedup,auto_backend,"
           "auto_speedup\n");
    size_t d = 64;
    float *k = malloc(n * d * sizeof(float)), *q = malloc(n * d * sizeof(float));
    dg_clustered(k, n, q, n, d, 16, 1.0, 42 + n);
    row("clustered", q, k, n, d, 0.5, rows, threads);
    row("clustered", q, k, n, d, 1.0, rows, threads);
    free(k);
    free(q);
    kmv_array a;
    char err[256];
    if (kmv_npy_read(glove, NULL, &a, err, sizeof err) != KMV_OK || a.rows < n) {
        fprintf(stderr, "GloVe rows skipped: %s\n", err);
        return 0;
    }
    double sigmas[] = {0.5, 0.7, 0.9, 1.0};
    for (size_t s = 0; s < 4; s++) row("glove", a.data, a.data, n, a.cols, sigmas[s], rows, threads);
    kmv_array_free(&a);
    return 0;
}
