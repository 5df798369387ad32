/* The approximate engine against the exact one, in the same run.
 *
 *   approx_bench [--quick] [--glove PATH] [--csv OUT] [--threads T]
 *                [--only DATA:D:X] [--n N] [--approx-only] [--backend B]
 *
 * For n = m in {4096, 16384, 65536}: clustered synthetic data (d = 64 and
 * 100, x ~ N(0,1), sigma = 1), plus kernel density (x = 1) there, and the
 * GloVe vectors (d = 100, keys = queries) at two bandwidths where the
 * kernel is sparse: sigma = 1 (mean off-diagonal row sum 0.037 at
 * n = 16384, 1143 rows above 0.1) and sigma = 0.5 (0.0017, 45 rows: beside
 * itself, a query's heavy keys are near-duplicates).
 * Prints per row: approximate and exact seconds (the fastest of 3
 * alternating runs each for n <= 16384, one run at 65536), their ratio, the achieved
 * ||Kx - y|| / ||x||, the engine's own error estimate, the mode, and the
 * peak bytes each engine allocated through the allocator hook (BLAS's own
 * buffers excluded); then the log-log slope of the approximate time from
 * the smallest n to the largest. --quick stops at n = 16384; --only runs one
 * configuration (e.g. clustered:100:gauss) and --n one size, for profiling;
 * --approx-only skips the exact runs (its ratios and errors mean nothing). */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KMV_STATIC_LINKING_ONLY /* the engine's counters and knobs */
#include "kmv/kmv.h"
#include "kmv/kmv_experimental.h"
#include "tools/clock.h"
#include "tests/datagen.h"

/* Peak bytes live through the hook. The library allocates from its worker
 * threads too, so the counters are atomic. */
typedef struct peak {
    size_t live, peak;
} peak;

static void *p_alloc(void *o, size_t size) {
    peak *p = o;
    size_t *b = malloc(size + 64);
    if (b == NULL) return NULL;
    b[0] = size;
    size_t live = __atomic_add_fetch(&p->live, size, __ATOMIC_RELAXED);
    size_t old = __atomic_load_n(&p->peak, __ATOMIC_RELAXED);
    while (live > old &&
           !__atomic_compare_exchange_n(&p->peak, &old, live, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
    return (char *)b + 64;
}

static void p_free(void *o, void *ptr) {
    if (ptr == NULL) return;
    peak *p = o;
    size_t *b = (size_t *)((char *)ptr - 64);
    __atomic_sub_fetch(&p->live, b[0], __ATOMIC_RELAXED);
    free(b);
}

typedef struct result {
    double t_approx, t_exact, err, est;
    int mode, reason;
    size_t peak_approx, peak_exact;
    kmv_stats st;
} result;

static int approx_only; /* --approx-only: profiling, no exact runs */
static int backend;     /* --backend auto|lsh|tree */

/* One timed product: approximate (exact = 0) or exact. Returns seconds, or
 * -1 on error; y, stats and peak bytes through the out-parameters. */
static double once(const float *q, size_t m, const float *k, size_t n, size_t d, const float *x,
                   double sigma, double eps, int threads, int exact, float *y, kmv_stats *st,
                   size_t *peak_bytes) {
    kmv_params p;
    kmv_params_init(&p);
    p.sigma = sigma;
    p.eps = eps;
    p.n_threads = threads;
    p.exact = exact;
    kmv_params_x px;
    kmv_params_get_x(&p, &px);
    px.backend = backend;
    kmv_params_set_x(&p, &px);
    peak pk = {0, 0};
    p.allocator = (kmv_allocator){p_alloc, p_free, &pk};
    kmv_ctx *ctx;
    if (kmv_ctx_create(&p, &ctx) != KMV_OK) return -1.0;
    double t0 = tool_now();
    int rc = kmv_matvec(ctx, q, m, k, n, d, x, 1, y, st);
    double t = tool_now() - t0;
    kmv_ctx_free(ctx);
    if (rc != KMV_OK) {
        fprintf(stderr, "%s: %s\n", exact ? "exact" : "approx", kmv_strerror(rc));
        return -1.0;
    }
    *peak_bytes = pk.peak;
    return t;
}

/* Each engine runs `reps` times, alternating, and keeps its fastest time:
 * on a shared machine the minimum is the least noisy estimate, and
 * alternating gives both engines the same warm caches and thread pools. */

static int run(const float *q, size_t m, const float *k, size_t n, size_t d, const float *x,
               double sigma, double eps, int threads, int reps, result *r) {
    float *y = malloc(m * sizeof(float)), *ye = malloc(m * sizeof(float));
    kmv_stats se;
    r->t_approx = r->t_exact = INFINITY;
    for (int rep = 0; rep < reps; rep++) {
        double ta = once(q, m, k, n, d, x, sigma, eps, threads, 0, y, &r->st, &r->peak_approx);
        double te = approx_only ? 1.0 : once(q, m, k, n, d, x, sigma, eps, threads, 1, ye, &se, &r->peak_exact);
        if (approx_only) memcpy(ye, y, m * sizeof(float));
        if (ta < 0.0 || te < 0.0) {
            free(y);
            free(ye);
            return -1;
        }
        if (ta < r->t_approx) r->t_approx = ta;
        if (te < r->t_exact) r->t_exact = te;
    }
    double e2 = 0, x2 = 0;
    for (size_t i = 0; i < m; i++) e2 += ((double)y[i] - ye[i]) * ((double)y[i] - ye[i]);
    for (size_t j = 0; j < n; j++) x2 += (double)x[j] * x[j];
    r->err = sqrt(e2 / x2);
    kmv_stats_x sx;
    kmv_stats_get_x(&r->st, &sx);
    r->est = sx.error_estimate;
    r->mode = r->st.mode;
    r->reason = r->st.fallback_reason;
    free(y);
    free(ye);
    return 0;
}

static float *load_glove(const char *path, size_t *rows, size_t *cols) {
    kmv_array a;
    char err[256];
    if (kmv_npy_read(path, NULL, &a, err, sizeof err) != KMV_OK) {
        fprintf(stderr, "GloVe rows skipped: %s\n", err);
        return NULL;
    }
    *rows = a.rows;
    *cols = a.cols;
    return a.data;
}

int main(int argc, char **argv) {
    int quick = 0, threads = 0;
    size_t only_n = 0;
    const char *glove = "../shared/data/glove100d_first65536.npy", *csv = NULL, *only = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick")) quick = 1;
        else if (!strcmp(argv[i], "--approx-only")) approx_only = 1;
        else if (!strcmp(argv[i], "--glove") && i + 1 < argc) glove = argv[++i];
        else if (!strcmp(argv[i], "--csv") && i + 1 < argc) csv = argv[++i];
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--only") && i + 1 < argc) only = argv[++i];
        else if (!strcmp(argv[i], "--backend") && i + 1 < argc) {
            const char *b = argv[++i];
            backend = !strcmp(b, "tree") ? KMV_BACKEND_TREE : !strcmp(b, "lsh") ? KMV_BACKEND_LSH : KMV_BACKEND_AUTO;
        } else if (!strcmp(argv[i], "--n") && i + 1 < argc) only_n = (size_t)strtoull(argv[++i], NULL, 10);
        else {
            fprintf(stderr, "usage: approx_bench [--quick] [--glove PATH] [--csv OUT] [--threads T] "
                            "[--only DATA:D:X] [--n N] [--approx-only] [--backend auto|lsh|tree]\n");
            return 2;
        }
    }
    FILE *out = csv ? fopen(csv, "w") : NULL;
    const char *head =
        "data,n,d,x,sigma,eps,approx_s,exact_s,speedup,err,err_est,mode,fallback,heavy_threshold,"
        "lsh_L,lsh_k,cands_per_row,samples_per_row,rows_exact,peak_mb_approx,peak_mb_exact,"
        "backend,nodes_per_row,visited_per_row,tree_mb\n";
    fputs(head, stdout);
    if (out) fputs(head, out);
    /* Warm up OpenMP's team and OpenBLAS before anything is timed, so the
     * first row does not pay their start-up. */
    {
        float *wk = malloc(4096 * 64 * sizeof(float)), *wq = malloc(4096 * 64 * sizeof(float));
        float *wx = malloc(4096 * sizeof(float));
        dg_clustered(wk, 4096, wq, 4096, 64, 16, 1.0, 1);
        dg_x(wx, 4096, DG_X_GAUSS, 1);
        result wr;
        run(wq, 4096, wk, 4096, 64, wx, 1.0, 0.1, threads, 1, &wr);
        free(wk);
        free(wq);
        free(wx);
    }
    size_t ns[] = {4096, 16384, 65536};
    int nn = quick ? 2 : 3;
    size_t grows = 0, gcols = 0;
    float *g = load_glove(glove, &grows, &gcols);
    struct cfg {
        const char *data;
        size_t d;
        dg_xkind xk;
        const char *xname;
        double sigma;
    } cfgs[] = {{"clustered", 64, DG_X_GAUSS, "gauss", 1.0},
                {"clustered", 64, DG_X_GAUSS, "gauss", 0.5},
                {"clustered", 100, DG_X_GAUSS, "gauss", 1.0},
                {"clustered", 64, DG_X_ONES, "ones", 1.0},
                {"glove", 100, DG_X_GAUSS, "gauss", 1.0},
                {"glove", 100, DG_X_ONES, "ones", 1.0},
                {"glove", 100, DG_X_GAUSS, "gauss", 0.5},
                {"glove", 100, DG_X_ONES, "ones", 0.5}};
    for (size_t ci = 0; ci < sizeof cfgs / sizeof cfgs[0]; ci++) {
        char name[64];
        if (cfgs[ci].sigma == 1.0)
            snprintf(name, sizeof name, "%s:%zu:%s", cfgs[ci].data, cfgs[ci].d, cfgs[ci].xname);
        else
            snprintf(name, sizeof name, "%s:%zu:%s:%g", cfgs[ci].data, cfgs[ci].d, cfgs[ci].xname,
                     cfgs[ci].sigma);
        if (only != NULL && strcmp(only, name) != 0) continue;
        double t_first = 0, t_last = 0;
        size_t n_first = 0, n_last = 0;
        for (int ni = 0; ni < nn; ni++) {
            size_t n = ns[ni], d = cfgs[ci].d;
            if (only_n && n != only_n) continue;
            float *k, *q;
            int own = 1;
            if (!strcmp(cfgs[ci].data, "glove")) {
                if (g == NULL || grows < n || gcols != d) continue;
                k = q = g;
                own = 0;
            } else {
                k = malloc(n * d * sizeof(float));
                q = malloc(n * d * sizeof(float));
                dg_clustered(k, n, q, n, d, 16, 1.0, 42 + n);
            }
            float *x = malloc(n * sizeof(float));
            dg_x(x, n, cfgs[ci].xk, 7 + n);
            result r;
            memset(&r, 0, sizeof r);
            /* Small products repeat: their times are milliseconds. */
            if (run(q, n, k, n, d, x, cfgs[ci].sigma, 0.1, threads, n <= 16384 ? 3 : 1, &r) == 0) {
                kmv_stats_x sx;
                kmv_stats_get_x(&r.st, &sx);
                char line[512];
                snprintf(line, sizeof line,
                         "%s,%zu,%zu,%s,%.2f,%.2f,%.4f,%.4f,%.2f,%.4f,%.4f,%s,%s,%.3g,%d,%d,%.1f,%.1f,%zu,%.1f,%.1f,"
                         "%s,%.1f,%.1f,%.2f\n",
                         cfgs[ci].data, n, d, cfgs[ci].xname, cfgs[ci].sigma, 0.1, r.t_approx, r.t_exact,
                         r.t_exact / r.t_approx, r.err, r.est,
                         r.mode == KMV_MODE_APPROX ? "approx" : "fallback",
                         kmv_fallback_name(r.reason), sx.heavy_threshold, sx.lsh_tables,
                         sx.lsh_hash_len, (double)sx.lsh_candidates / (double)n,
                         (double)sx.samples / (double)n, r.st.rows_exact,
                         (double)r.peak_approx / 1048576.0, (double)r.peak_exact / 1048576.0,
                         sx.backend == KMV_BACKEND_TREE ? "tree"
                         : sx.backend == KMV_BACKEND_LSH ? "lsh" : "-",
                         (double)sx.nodes_bounded / (double)n, (double)sx.keys_visited / (double)n,
                         (double)sx.tree_bytes / 1048576.0);
                fputs(line, stdout);
                fflush(stdout);
                if (out) fputs(line, out);
                fprintf(stderr, "  phases: tree %.3f s, lsh %.3f s, heavy %.3f s, sample %.3f s; steps/row %.0f\n",
                        sx.seconds_tree, sx.seconds_lsh, sx.seconds_heavy, sx.seconds_sample,
                        (double)sx.lsh_steps / (double)n);
                if (!n_first) {
                    n_first = n;
                    t_first = r.t_approx;
                }
                n_last = n;
                t_last = r.t_approx;
            }
            free(x);
            if (own) {
                free(k);
                free(q);
            }
        }
        if (n_last > n_first) {
            char line[256];
            snprintf(line, sizeof line, "# slope %s d=%zu x=%s sigma=%g: %.2f (n %zu..%zu)\n",
                     cfgs[ci].data, cfgs[ci].d, cfgs[ci].xname, cfgs[ci].sigma,
                     log(t_last / t_first) / log((double)n_last / (double)n_first), n_first, n_last);
            fputs(line, stdout);
            if (out) fputs(line, out);
        }
    }
    if (out) fclose(out);
    kmv_array a = {g, grows, gcols, 2, {NULL, NULL, NULL}};
    if (g) kmv_array_free(&a);
    return 0;
}
