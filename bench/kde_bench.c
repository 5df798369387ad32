/* Kernel density on real low-dimensional data, against exact and a
 * DEANN-style peer in the same run.
 *
 *   kde_bench [--data PATH] [--threads T] [--rows R]
 *
 * Data: data/zipcodes_latlon.npy (the 42,049 U.S. postal codes' latitude
 * and longitude, data/README.md), both columns standardized; every point
 * is a key and a query, x = 1 (kernel density). For each bandwidth (in
 * standardized units) it prints:
 *   - the exact engine's time;
 *   - kmv's (backend AUTO, eps = 0.1): time, speed-up, what answered, the
 *     guarantee's error ||y - Kx|| / ||x|| and the relative one
 *     ||y - Kx|| / ||Kx||;
 *   - the oracle's fraction: the fewest keys per row (largest K_ij first)
 *     leaving at most the row's share eps ||x|| / sqrt(m) outside, over R
 *     rows spread through the queries (default 256), and the tree's, keys
 *     visited per row over n;
 *   - the DEANN-style peer (Karppa, Aumüller and Pagh, "DEANN: Speeding up
 *     kernel-density estimation using approximate nearest neighbor search",
 *     2022): the keys permuted once; per query its k nearest neighbours
 *     summed exactly (a k-d tree here, exact k-NN) plus a window of s
 *     consecutive permuted keys, those neighbours left out, scaled to the
 *     rest. For k in {32, 256, 1024}, s is bisected to the smallest window
 *     whose error is at most kmv's (equal error); the fastest of the three
 *     is reported, queries over the same threads (OpenMP).
 * Ratios are exact time over each method's time, measured in the same
 * run. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KMV_STATIC_LINKING_ONLY
#include "kmv/kmv.h"
#include "kmv/kmv_experimental.h"
#include "bench/oracle.h"
#include "tests/realdata.h"
#include "tools/clock.h"

#define KMAX 1024 /* neighbours at most */
#define LEAF 16

/* ------------------------------------------------------------ a k-d tree */

typedef struct kd {
    const float *p; /* n x d */
    size_t n, d;
    uint32_t *idx;  /* points, leaf by leaf */
    int *axis;      /* per node: split axis, -1 for a leaf */
    float *split;
    size_t *lo, *hi; /* per node: idx range */
    size_t nodes;
} kd;

static int g_axis;
static const float *g_pts;
static size_t g_d;

static int cmp_axis(const void *a, const void *b) {
    float x = g_pts[*(const uint32_t *)a * g_d + (size_t)g_axis];
    float y = g_pts[*(const uint32_t *)b * g_d + (size_t)g_axis];
    return (x > y) - (x < y);
}

/* Node u covers idx[lo, hi); children 2u + 1 and 2u + 2. */
static void kd_build(kd *t, size_t u, size_t lo, size_t hi) {
    t->lo[u] = lo;
    t->hi[u] = hi;
    if (hi - lo <= LEAF || 2 * u + 2 >= t->nodes) {
        t->axis[u] = -1;
        return;
    }
    float spread = -1.0f;
    int best = 0;
    for (size_t a = 0; a < t->d; a++) {
        float mn = INFINITY, mx = -INFINITY;
        for (size_t i = lo; i < hi; i++) {
            float v = t->p[t->idx[i] * t->d + a];
            mn = v < mn ? v : mn;
            mx = v > mx ? v : mx;
        }
        if (mx - mn > spread) spread = mx - mn, best = (int)a;
    }
    g_axis = best, g_pts = t->p, g_d = t->d;
    qsort(t->idx + lo, hi - lo, sizeof(uint32_t), cmp_axis);
    size_t mid = (lo + hi) / 2;
    t->axis[u] = best;
    t->split[u] = t->p[t->idx[mid] * t->d + (size_t)best];
    kd_build(t, 2 * u + 1, lo, mid);
    kd_build(t, 2 * u + 2, mid, hi);
}

static kd kd_new(const float *p, size_t n, size_t d) {
    kd t = {p, n, d, malloc(n * sizeof(uint32_t)), NULL, NULL, NULL, NULL, 1};
    while (t.nodes < 4 * n / LEAF + 4) t.nodes = 2 * t.nodes + 1;
    t.axis = malloc(t.nodes * sizeof(int));
    t.split = malloc(t.nodes * sizeof(float));
    t.lo = malloc(t.nodes * sizeof(size_t));
    t.hi = malloc(t.nodes * sizeof(size_t));
    for (size_t i = 0; i < n; i++) t.idx[i] = (uint32_t)i;
    kd_build(&t, 0, 0, n);
    return t;
}

static void kd_free(kd *t) {
    free(t->idx);
    free(t->axis);
    free(t->split);
    free(t->lo);
    free(t->hi);
}

/* A max-heap of the k best so far. */
typedef struct knn {
    float d2[KMAX];
    uint32_t id[KMAX];
    size_t len, k;
} knn;

static void knn_offer(knn *h, float d2, uint32_t id) {
    size_t K = h->k;
    if (h->len < K) {
        size_t i = h->len++;
        while (i > 0 && h->d2[(i - 1) / 2] < d2) {
            h->d2[i] = h->d2[(i - 1) / 2], h->id[i] = h->id[(i - 1) / 2];
            i = (i - 1) / 2;
        }
        h->d2[i] = d2, h->id[i] = id;
        return;
    }
    if (d2 >= h->d2[0]) return;
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, big = i;
        float bv = d2;
        if (l < K && h->d2[l] > bv) big = l, bv = h->d2[l];
        if (r < K && h->d2[r] > bv) big = r;
        if (big == i) break;
        h->d2[i] = h->d2[big], h->id[i] = h->id[big];
        i = big;
    }
    h->d2[i] = d2, h->id[i] = id;
}

static void kd_search(const kd *t, size_t u, const float *q, knn *h) {
    if (t->axis[u] < 0) {
        for (size_t i = t->lo[u]; i < t->hi[u]; i++) {
            const float *p = t->p + t->idx[i] * t->d;
            float s = 0.0f;
            for (size_t a = 0; a < t->d; a++) s += (q[a] - p[a]) * (q[a] - p[a]);
            knn_offer(h, s, t->idx[i]);
        }
        return;
    }
    float diff = q[t->axis[u]] - t->split[u];
    size_t near = diff < 0 ? 2 * u + 1 : 2 * u + 2, far = diff < 0 ? 2 * u + 2 : 2 * u + 1;
    kd_search(t, near, q, h);
    if (h->len < h->k || diff * diff < h->d2[0]) kd_search(t, far, q, h);
}

/* ------------------------------------------------------------- the peer */

typedef struct deann {
    const float *k;
    size_t n, d;
    kd tree;
    uint32_t *perm; /* a random permutation of the keys */
    float *pk;      /* the keys in that order */
    uint32_t *rank; /* key -> its place in perm */
} deann;

/* One query: its k nearest neighbours exactly, plus the window of s
 * permuted keys from off (wrapping) without them, scaled to the rest. */
static double deann_row(const deann *de, const float *q, size_t k, size_t s, size_t off,
                        float inv2s2, knn *h) {
    h->len = 0;
    h->k = k;
    kd_search(&de->tree, 0, q, h);
    double near = 0.0, far = 0.0, in_win = 0.0;
    size_t taken = s;
    for (size_t u = 0; u < h->len; u++) {
        float kv = expf(-h->d2[u] * inv2s2);
        near += kv;
        size_t p = de->rank[h->id[u]], rel = (p + de->n - off) % de->n;
        if (rel < s) in_win += kv, taken--;
    }
    for (size_t t = 0; t < s; t++) {
        size_t p = off + t < de->n ? off + t : off + t - de->n;
        const float *kp = de->pk + p * de->d;
        float d2 = 0.0f;
        for (size_t a = 0; a < de->d; a++) d2 += (q[a] - kp[a]) * (q[a] - kp[a]);
        far += expf(-d2 * inv2s2);
    }
    far -= in_win; /* the neighbours met in the window are summed above */
    /* the window's other keys are a uniform sample of the non-neighbours */
    return near + (taken ? far * (double)(de->n - h->len) / (double)taken : 0.0);
}

static void deann_run(const deann *de, const float *q, size_t m, size_t k, size_t s, double sigma,
                      float *y) {
    float inv2s2 = (float)(0.5 / (sigma * sigma));
#pragma omp parallel
    {
        knn *h = malloc(sizeof *h);
#pragma omp for schedule(dynamic, 64)
        for (size_t i = 0; i < m; i++) {
            size_t off = (size_t)((i * 2654435761u) % de->n);
            y[i] = (float)deann_row(de, q + i * de->d, k, s, off, inv2s2, h);
        }
        free(h);
    }
}

/* ----------------------------------------------------------------- main */

static double err_x(const float *y, const float *ye, size_t m, size_t n) {
    double e2 = 0.0;
    for (size_t i = 0; i < m; i++) e2 += ((double)y[i] - ye[i]) * ((double)y[i] - ye[i]);
    return sqrt(e2 / (double)n);
}

static double err_rel(const float *y, const float *ye, size_t m) {
    double e2 = 0.0, y2 = 0.0;
    for (size_t i = 0; i < m; i++) {
        e2 += ((double)y[i] - ye[i]) * ((double)y[i] - ye[i]);
        y2 += (double)ye[i] * ye[i];
    }
    return sqrt(e2 / y2);
}

static double product(const float *p, size_t n, size_t d, const float *x, double sigma, int exact,
                      int threads, float *y, kmv_stats *st) {
    kmv_params pa;
    kmv_params_init(&pa);
    pa.sigma = sigma;
    pa.exact = exact;
    pa.n_threads = threads;
    kmv_ctx *ctx;
    if (kmv_ctx_create(&pa, &ctx) != KMV_OK) return -1.0;
    double t0 = tool_now();
    int rc = kmv_matvec(ctx, p, n, p, n, d, x, 1, y, st);
    double t = tool_now() - t0;
    kmv_ctx_free(ctx);
    return rc == KMV_OK ? t : -1.0;
}

static deann deann_new(const float *p, size_t n, size_t d) {
    deann de = {p, n, d, kd_new(p, n, d), malloc(n * sizeof(uint32_t)), malloc(n * d * sizeof(float)),
                malloc(n * sizeof(uint32_t))};
    uint64_t s = 12345;
    for (size_t i = 0; i < n; i++) de.perm[i] = (uint32_t)i;
    for (size_t i = n - 1; i > 0; i--) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        size_t j = (size_t)((s >> 33) % (i + 1));
        uint32_t t = de.perm[i];
        de.perm[i] = de.perm[j], de.perm[j] = t;
    }
    for (size_t i = 0; i < n; i++) {
        memcpy(de.pk + i * d, p + (size_t)de.perm[i] * d, d * sizeof(float));
        de.rank[de.perm[i]] = (uint32_t)i;
    }
    return de;
}

int main(int argc, char **argv) {
    const char *path = "data/zipcodes_latlon.npy";
    int threads = 0;
    size_t rows = 256;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--data") && i + 1 < argc) path = argv[++i];
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--rows") && i + 1 < argc) rows = (size_t)strtoull(argv[++i], NULL, 10);
        else {
            fprintf(stderr, "usage: kde_bench [--data PATH] [--threads T] [--rows R]\n");
            return 2;
        }
    }
    kmv_array a;
    char err[256];
    if (kmv_npy_read(path, NULL, &a, err, sizeof err) != KMV_OK) {
        fprintf(stderr, "kde_bench: %s\n", err);
        return 1;
    }
    size_t n = a.rows, d = a.cols;
    rd_standardize(a.data, n, d);
    float *x = malloc(n * sizeof(float)), *ye = malloc(n * sizeof(float)), *y = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) x[i] = 1.0f;
    deann de = deann_new(a.data, n, d);
    printf("data,n,d,sigma,exact_s,kmv_s,kmv_speedup,kmv_backend,kmv_err,kmv_rel_err,oracle_frac,"
           "tree_frac,deann_k,deann_window,deann_s,deann_speedup,deann_err,deann_rel_err\n");
    double sigmas[] = {0.01, 0.02, 0.05, 0.1};
    for (size_t si = 0; si < sizeof sigmas / sizeof *sigmas; si++) {
        double sigma = sigmas[si];
        kmv_stats st;
        double te = product(a.data, n, d, x, sigma, 1, threads, ye, &st);
        double tk = product(a.data, n, d, x, sigma, 0, threads, y, &st);
        if (te < 0.0 || tk < 0.0) return 1;
        kmv_stats_x sx;
        kmv_stats_get_x(&st, &sx);
        double ek = err_x(y, ye, n, n), rk = err_rel(y, ye, n);
        const char *back = st.mode != KMV_MODE_APPROX ? "exact"
                           : sx.backend == KMV_BACKEND_TREE ? "tree" : "lsh";
        double tf = ((double)sx.keys_visited + (double)st.rows_exact * (double)n) / ((double)n * (double)n);
        double of = bench_oracle(a.data, n, a.data, n, d, x, sigma, 0.1, rows);
        /* equal error: for each neighbour count, the smallest window
         * whose error is at most kmv's (at least 1e-3, for when kmv's is
         * rounding only); the fastest of those */
        double target = ek > 1e-3 ? ek : 1e-3, td = INFINITY, ed = 0.0, rd = 0.0;
        size_t best_k = 0, best_s = 0, ks[] = {32, 256, 1024};
        for (size_t ki = 0; ki < 3; ki++) {
            size_t lo = 1, hi = n - ks[ki];
            while (lo < hi) {
                size_t mid = lo + (hi - lo) / 2;
                deann_run(&de, a.data, n, ks[ki], mid, sigma, y);
                if (err_x(y, ye, n, n) <= target) hi = mid;
                else lo = mid + 1;
            }
            double t0 = tool_now();
            deann_run(&de, a.data, n, ks[ki], lo, sigma, y);
            double t = tool_now() - t0;
            if (t < td) td = t, best_k = ks[ki], best_s = lo, ed = err_x(y, ye, n, n), rd = err_rel(y, ye, n);
        }
        printf("zipcodes,%zu,%zu,%.2f,%.4f,%.4f,%.2f,%s,%.5f,%.2e,%.4f,%.4f,%zu,%zu,%.4f,%.2f,%.5f,%.2e\n",
               n, d, sigma, te, tk, te / tk, back, ek, rk, of, tf, best_k, best_s, td, te / td, ed, rd);
        fflush(stdout);
    }
    kd_free(&de.tree);
    free(de.perm);
    free(de.pk);
    free(de.rank);
    free(x);
    free(y);
    free(ye);
    kmv_array_free(&a);
    return 0;
}
