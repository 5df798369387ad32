/* The approximate engine: its guarantee measured over fixed lists of 100
 * seeds per case, the LSH stage's recall of heavy keys, determinism,
 * growing in place, the cost model's fallback, and failure paths.
 *
 * Guarantee tests force the approximate path (an internal switch) so that
 * they measure it even where the cost model would run the exact engine;
 * the fallback test does not force it.
 *
 * Binomial allowance: with delta = 0.01, 100 independent runs fail the
 * bound more than 4 times with probability 0.34% if the true failure rate
 * is delta, so "at most 4 failures" rejects a correct engine rarely and an
 * engine failing at 5 delta (about 99.6% of the time) almost always. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/alloc.h"
#include "algo/exact.h"
#include "engine/batch.h"
#include "engine/index_layout.h"
#include "kmv/kmv.h"
#include "algo/lsh.h"
#include "tests/datagen.h"
#include "tests/testutil.h"

#define SEEDS 100
#define ALLOWED_FAILURES 4

typedef struct dataset {
    float *k, *q;
    size_t n, m, d;
    double sigma;
} dataset;

static dataset clustered(size_t n, size_t m, size_t d, uint64_t seed) {
    dataset ds = {malloc(n * d * sizeof(float)), malloc(m * d * sizeof(float)), n, m, d, 1.0};
    dg_clustered(ds.k, n, ds.q, m, d, 16, 1.0, seed);
    return ds;
}

/* The GloVe sample shipped in data/ (4096 x 100): keys all of it, queries
 * every fourth row. sigma = 1 is sparse there (mean off-diagonal row sum
 * about 0.04). */
static dataset glove(void) {
    kmv_array a;
    char err[256];
    const char *paths[] = {"data/glove100d_first4096.npy", "../data/glove100d_first4096.npy"};
    int rc = KMV_EIO;
    for (size_t i = 0; i < 2 && rc != KMV_OK; i++) rc = kmv_npy_read(paths[i], NULL, &a, err, sizeof err);
    if (rc != KMV_OK) fail_msg("GloVe sample: %s", err);
    dataset ds = {a.data, NULL, a.rows, a.rows / 4, a.cols, 1.0};
    ds.q = malloc(ds.m * ds.d * sizeof(float));
    for (size_t i = 0; i < ds.m; i++) memcpy(ds.q + i * ds.d, a.data + 4 * i * ds.d, ds.d * sizeof(float));
    return ds;
}

static void dataset_free(dataset *ds) {
    free(ds->k);
    free(ds->q);
}

static kmv_ctx *make_ctx(double sigma, uint64_t seed, int exact, int threads) {
    kmv_params p;
    kmv_params_init(&p);
    p.sigma = sigma;
    p.seed = seed;
    p.exact = exact;
    p.n_threads = threads;
    kmv_ctx *ctx;
    assert_int_equal(kmv_ctx_create(&p, &ctx), KMV_OK);
    return ctx;
}

/* Approximate product through an index with the fallback disabled. */
static int approx(const dataset *ds, const float *x, size_t c, uint64_t seed, int threads,
                  float *y, kmv_stats *st) {
    kmv_ctx *ctx = make_ctx(ds->sigma, seed, 0, threads);
    kmv_index *ix;
    assert_int_equal(kmv_index_create(ctx, ds->d, &ix), KMV_OK);
    assert_int_equal(kmv_index_append(ix, ds->k, ds->n), KMV_OK);
    ix->force_approx = 1;
    int rc = kmv_index_matvec(ix, ds->q, ds->m, x, c, y, st);
    kmv_index_free(ix);
    kmv_ctx_free(ctx);
    return rc;
}

static void exact(const dataset *ds, const float *x, size_t c, float *y) {
    kmv_ctx *ctx = make_ctx(ds->sigma, 1, 1, 0);
    assert_int_equal(kmv_matvec(ctx, ds->q, ds->m, ds->k, ds->n, ds->d, x, c, y, NULL), KMV_OK);
    kmv_ctx_free(ctx);
}

static double rel_error(const float *y, const float *ye, size_t len, const float *x, size_t xlen) {
    double e2 = 0.0, x2 = 0.0;
    for (size_t i = 0; i < len; i++) e2 += ((double)y[i] - ye[i]) * ((double)y[i] - ye[i]);
    for (size_t j = 0; j < xlen; j++) x2 += (double)x[j] * x[j];
    return sqrt(e2 / x2);
}

/* The exact engine's product through ix (what a memory fallback runs). */
static int fallback_product(kmv_index *ix, const dataset *ds, const float *x, float *y) {
    return kmv__batch_fallback(ix, ds->q, ds->m, x, 1, y, KMV_FALLBACK_MEMORY, NULL);
}

/* Run SEEDS seeds of one case: fresh x and engine seed per run. */
static void guarantee(const dataset *ds, dg_xkind kind, size_t c, const char *name) {
    float *x = malloc(ds->n * c * sizeof(float));
    float *y = malloc(ds->m * c * sizeof(float)), *ye = malloc(ds->m * c * sizeof(float));
    int failures = 0;
    double worst = 0.0, sum = 0.0;
    uint64_t samples = 0, heavy = 0;
    size_t with_h1 = 0;
    for (uint64_t s = 1; s <= SEEDS; s++) {
        dg_x(x, ds->n * c, kind, 1000 + s);
        kmv_stats st;
        assert_int_equal(approx(ds, x, c, s, 0, y, &st), KMV_OK);
        assert_int_equal(st.mode, KMV_MODE_APPROX);
        exact(ds, x, c, ye);
        double e = rel_error(y, ye, ds->m * c, x, ds->n * c);
        if (e > 0.1) failures++;
        worst = e > worst ? e : worst;
        sum += e;
        samples += tu_x(&st).samples;
        heavy += tu_x(&st).heavy_pairs;
        with_h1 += tu_x(&st).keys_exact > 0;
    }
    printf("  %-24s failures %d/%d, mean error %.4f, worst %.4f, samples/row %.0f, heavy/row "
           "%.1f, runs with exact columns %zu\n",
           name, failures, SEEDS, sum / SEEDS, worst, (double)samples / SEEDS / (double)ds->m,
           (double)heavy / SEEDS / (double)ds->m, with_h1);
    assert_true(failures <= ALLOWED_FAILURES);
    /* The approximate path did its work: something sampled, something found. */
    assert_true(samples > 0);
    assert_true(heavy > 0);
    if (kind == DG_X_HUGE) assert_true(with_h1 > 0);
    free(x);
    free(y);
    free(ye);
}

static void test_clustered_mixed_signs(void **state) {
    (void)state;
    dataset ds = clustered(2048, 1024, 32, 5);
    guarantee(&ds, DG_X_GAUSS, 1, "clustered, N(0,1) x");
    dataset_free(&ds);
}

static void test_clustered_huge_entries(void **state) {
    (void)state;
    dataset ds = clustered(2048, 1024, 32, 6);
    guarantee(&ds, DG_X_HUGE, 1, "clustered, huge entries");
    dataset_free(&ds);
}

static void test_clustered_nonnegative(void **state) {
    (void)state;
    dataset ds = clustered(2048, 1024, 32, 7);
    guarantee(&ds, DG_X_NONNEG, 1, "clustered, x >= 0");
    dataset_free(&ds);
}

static void test_clustered_density(void **state) {
    (void)state;
    dataset ds = clustered(2048, 1024, 32, 8);
    guarantee(&ds, DG_X_ONES, 1, "clustered, x = 1 (KDE)");
    dataset_free(&ds);
}

static void test_clustered_matrix(void **state) {
    (void)state;
    dataset ds = clustered(2048, 512, 32, 9);
    guarantee(&ds, DG_X_GAUSS, 8, "clustered, V with 8 cols");
    dataset_free(&ds);
}

static void test_glove_sparse(void **state) {
    (void)state;
    dataset ds = glove();
    guarantee(&ds, DG_X_GAUSS, 1, "GloVe sigma=1, N(0,1) x");
    dataset_free(&ds);
}

static void test_glove_density(void **state) {
    (void)state;
    dataset ds = glove();
    guarantee(&ds, DG_X_ONES, 1, "GloVe sigma=1, x = 1");
    dataset_free(&ds);
}

/* Assumption A on the clustered data, stated: c = (||K||_1 - top n) / top n
 * where "top n" is the sum of K's n largest entries. */
static int cmp_desc(const void *a, const void *b) {
    double u = *(const double *)a, v = *(const double *)b;
    return (u < v) - (u > v);
}

static void test_clustered_assumption_a(void **state) {
    (void)state;
    size_t n = 2048;
    dataset ds = clustered(n, n, 32, 5);
    double *K = malloc(n * n * sizeof(double)), total = 0.0;
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < n; j++) {
            double d2 = 0.0;
            for (size_t t = 0; t < ds.d; t++) {
                double u = (double)ds.q[i * ds.d + t] - ds.k[j * ds.d + t];
                d2 += u * u;
            }
            K[i * n + j] = exp(-d2 / 2.0);
            total += K[i * n + j];
        }
    qsort(K, n * n, sizeof(double), cmp_desc);
    double top = 0.0;
    for (size_t i = 0; i < n; i++) top += K[i];
    double c = (total - top) / top;
    printf("  clustered data (n = %zu, d = 32, clusters of 16): Assumption A with c = %.2f\n", n, c);
    assert_true(c > 0.5 && c < 10.0);
    free(K);
    dataset_free(&ds);
}

/* Recall of heavy keys: the pairs with K_ij >= the threshold the engine
 * used, counted by brute force, against the pairs the LSH stage found. The
 * planner sizes L so that each such pair collides with probability
 * >= 1 - delta / 2, so the found fraction must reach that less a binomial
 * allowance of 4 standard deviations. */
static void recall_case(const dataset *ds, const char *name) {
    float *x = malloc(ds->n * sizeof(float)), *y = malloc(ds->m * sizeof(float));
    dg_x(x, ds->n, DG_X_GAUSS, 3);
    uint64_t found = 0, truth = 0;
    for (uint64_t s = 1; s <= 5; s++) {
        kmv_stats st;
        assert_int_equal(approx(ds, x, 1, s, 0, y, &st), KMV_OK);
        double kappa = tu_x(&st).heavy_threshold;
        assert_true(kappa > 0.0);
        uint64_t t = 0;
        for (size_t i = 0; i < ds->m; i++)
            for (size_t j = 0; j < ds->n; j++) {
                double d2 = 0.0;
                for (size_t u = 0; u < ds->d; u++) {
                    double v = (double)ds->q[i * ds->d + u] - ds->k[j * ds->d + u];
                    d2 += v * v;
                }
                /* float evaluation decides membership in the engine; keep
                 * pairs clearly above the threshold */
                t += exp(-d2 / (2.0 * ds->sigma * ds->sigma)) >= kappa * 1.001;
            }
        found += tu_x(&st).heavy_pairs;
        truth += t;
    }
    double target = 1.0 - 0.5 * 0.01;
    double sd = sqrt(target * (1.0 - target) / (double)truth);
    double recall = (double)found / (double)truth;
    printf("  %-24s heavy pairs %llu, found %llu: recall %.4f (target %.4f)\n", name,
           (unsigned long long)truth, (unsigned long long)found, recall, target);
    assert_true(truth > 1000);
    assert_true(recall >= target - 4.0 * sd);
    free(x);
    free(y);
}

static void test_recall_clustered(void **state) {
    (void)state;
    dataset ds = clustered(2048, 1024, 32, 11);
    recall_case(&ds, "clustered");
    dataset_free(&ds);
}

static void test_recall_glove(void **state) {
    (void)state;
    dataset ds = glove();
    recall_case(&ds, "GloVe sigma=1");
    dataset_free(&ds);
}

/* Same seed, same output, whatever the thread count; another seed, another
 * output (the sampling is real). */
/* Every key sits in its own bucket in every table, whether the keys went
 * in as uneven blocks on one thread or as one block on three: the tables
 * come out identical. A wide bucket width makes buckets of hundreds of
 * ids, so buckets move and grow many times. */
static void test_lsh_tables(void **state) {
    (void)state;
    dataset ds = clustered(3000, 1, 16, 21);
    kmv_allocator a;
    assert_int_equal(kmv__allocator_resolve(NULL, &a), KMV_OK);
    kmv__lsh_shape shapes[] = {{3, 5, 40.0}, {8, 4, 2.0}};
    for (size_t si = 0; si < 2; si++) {
        kmv__lsh h1, h3;
        assert_int_equal(kmv__lsh_init(&h1, &a, ds.d, shapes[si], 9), KMV_OK);
        assert_int_equal(kmv__lsh_init(&h3, &a, ds.d, shapes[si], 9), KMV_OK);
        size_t blocks[] = {1, 7, 300, 1500, 1192}, at = 0;
        for (size_t b = 0; b < 5; b++) {
            assert_int_equal(kmv__lsh_append(&h1, &a, ds.k + at * ds.d, blocks[b], 1), KMV_OK);
            at += blocks[b];
        }
        assert_int_equal(at, ds.n);
        assert_int_equal(kmv__lsh_append(&h3, &a, ds.k, ds.n, 3), KMV_OK);
        int L = shapes[si].L;
        float *scratch = malloc((size_t)shapes[si].k * (size_t)L * sizeof(float));
        uint64_t *codes = malloc((size_t)L * sizeof(uint64_t));
        size_t longest = 0;
        for (size_t j = 0; j < ds.n; j++) {
            kmv__lsh_codes(&h1, ds.k + j * ds.d, 1, L, scratch, codes);
            for (int t = 0; t < L; t++) {
                size_t len1, len3;
                const uint32_t *b1 = kmv__lsh_bucket(&h1, t, codes[t], &len1);
                const uint32_t *b3 = kmv__lsh_bucket(&h3, t, codes[t], &len3);
                assert_int_equal(len1, len3);
                assert_memory_equal(b1, b3, len1 * sizeof(uint32_t));
                int found = 0;
                for (size_t u = 0; u < len1; u++) {
                    if (u) assert_true(b1[u - 1] < b1[u]); /* ascending */
                    found |= b1[u] == j;
                }
                assert_true(found);
                if (len1 > longest) longest = len1;
            }
        }
        if (si == 0) assert_true(longest >= 256); /* the wide shape's buckets grew */
        free(scratch);
        free(codes);
        kmv__lsh_free(&h1, &a);
        kmv__lsh_free(&h3, &a);
    }
    dataset_free(&ds);
}

/* The cost model's view of the exact engine's precision matches the
 * engine's own choice: double on GloVe at a narrow bandwidth, float at a
 * wide one. */
static void test_exact_precision_predicted(void **state) {
    (void)state;
    dataset ds = glove();
    kmv_allocator a;
    assert_int_equal(kmv__allocator_resolve(NULL, &a), KMV_OK);
    float *x = malloc(ds.n * sizeof(float)), *y = calloc(ds.m, sizeof(float));
    dg_x(x, ds.n, DG_X_GAUSS, 3);
    double sigmas[] = {1.0, 100.0};
    int expect[] = {1, 0};
    for (int s = 0; s < 2; s++) {
        int predicted = -1, taken = -1, threads = 0;
        assert_int_equal(kmv__exact_gauss_wide(&a, ds.q, ds.m, ds.k, ds.n, ds.d, sigmas[s], &predicted),
                         KMV_OK);
        kmv__problem pr = {ds.q, ds.k, x, y, ds.m, ds.n, ds.d, 1, 0, 1, NULL, NULL};
        assert_int_equal(kmv__exact_gauss(&a, &pr, sigmas[s], &taken, &threads), KMV_OK);
        assert_int_equal(predicted, taken);
        assert_int_equal(predicted, expect[s]);
    }
    free(x);
    free(y);
    dataset_free(&ds);
}

static void test_deterministic(void **state) {
    (void)state;
    dataset ds = clustered(2048, 512, 32, 12);
    float *x = malloc(ds.n * sizeof(float));
    dg_x(x, ds.n, DG_X_GAUSS, 4);
    float *y1 = malloc(ds.m * sizeof(float)), *y2 = malloc(ds.m * sizeof(float)),
          *y3 = malloc(ds.m * sizeof(float));
    kmv_stats st;
    assert_int_equal(approx(&ds, x, 1, 77, 1, y1, &st), KMV_OK);
    assert_int_equal(approx(&ds, x, 1, 77, 3, y2, &st), KMV_OK);
    assert_memory_equal(y1, y2, ds.m * sizeof(float));
    assert_int_equal(approx(&ds, x, 1, 78, 1, y3, &st), KMV_OK);
    assert_memory_not_equal(y1, y3, ds.m * sizeof(float));
    free(x);
    free(y1);
    free(y2);
    free(y3);
    dataset_free(&ds);
}

/* Keys appended in uneven blocks give the same index, hence the same y, as
 * one append; a fresh x reuses the tables. */
static void test_grows_in_place(void **state) {
    (void)state;
    dataset ds = clustered(2048, 512, 32, 13);
    float *x = malloc(ds.n * sizeof(float)), *x2 = malloc(ds.n * sizeof(float));
    dg_x(x, ds.n, DG_X_GAUSS, 5);
    dg_x(x2, ds.n, DG_X_NONNEG, 6);
    float *y1 = malloc(ds.m * sizeof(float)), *y2 = malloc(ds.m * sizeof(float));
    kmv_ctx *ctx = make_ctx(1.0, 9, 0, 0);
    kmv_index *a, *b;
    assert_int_equal(kmv_index_create(ctx, ds.d, &a), KMV_OK);
    assert_int_equal(kmv_index_create(ctx, ds.d, &b), KMV_OK);
    assert_int_equal(kmv_index_append(a, ds.k, ds.n), KMV_OK);
    size_t blocks[] = {1, 7, 100, 1000, 940};
    size_t at = 0;
    for (size_t i = 0; i < 5; i++) {
        assert_int_equal(kmv_index_append(b, ds.k + at * ds.d, blocks[i]), KMV_OK);
        at += blocks[i];
    }
    assert_int_equal(at, ds.n);
    assert_int_equal(kmv_index_get_size(b), ds.n);
    a->force_approx = b->force_approx = 1;
    assert_int_equal(kmv_index_matvec(a, ds.q, ds.m, x, 1, y1, NULL), KMV_OK);
    assert_int_equal(kmv_index_matvec(b, ds.q, ds.m, x, 1, y2, NULL), KMV_OK);
    assert_memory_equal(y1, y2, ds.m * sizeof(float));
    /* A fresh x: same tables (same arena), a correct product. */
    const void *tables = a->lsh.tab[0].arena;
    size_t inserted = a->lsh.n;
    kmv_stats st;
    assert_int_equal(kmv_index_matvec(a, ds.q, ds.m, x2, 1, y1, &st), KMV_OK);
    assert_ptr_equal(a->lsh.tab[0].arena, tables);
    assert_int_equal(a->lsh.n, inserted);
    exact(&ds, x2, 1, y2);
    assert_true(rel_error(y1, y2, ds.m, x2, ds.n) <= 0.1);
    /* Appending after a product extends the built tables in place. */
    dataset more = clustered(256, 1, 32, 14);
    assert_int_equal(kmv_index_append(a, more.k, 256), KMV_OK);
    assert_int_equal(a->lsh.n, ds.n + 256);
    kmv_index_free(a);
    kmv_index_free(b);
    kmv_ctx_free(ctx);
    dataset_free(&more);
    free(x);
    free(x2);
    free(y1);
    free(y2);
    dataset_free(&ds);
}

/* Dense data, far from Assumption A (every K_ij near 1): the engine must run
 * exact instead, say so, and return the exact product. */
static void test_dense_falls_back(void **state) {
    (void)state;
    size_t n = 2048, m = 512, d = 16;
    float *k = tu_random(n * d, 1, 1.0f), *q = tu_random(m * d, 2, 1.0f);
    float *x = malloc(n * sizeof(float)), *y = malloc(m * sizeof(float)), *ye = malloc(m * sizeof(float));
    dg_x(x, n, DG_X_GAUSS, 7);
    kmv_ctx *ctx = make_ctx(3.0, 1, 0, 0), *ex = make_ctx(3.0, 1, 1, 0);
    kmv_stats st;
    assert_int_equal(kmv_matvec(ctx, q, m, k, n, d, x, 1, y, &st), KMV_OK);
    assert_int_equal(st.mode, KMV_MODE_FALLBACK);
    assert_int_not_equal(st.fallback_reason, KMV_FALLBACK_NONE);
    assert_int_equal(kmv_matvec(ex, q, m, k, n, d, x, 1, ye, NULL), KMV_OK);
    assert_true(rel_error(y, ye, m, x, n) < 1e-5);
    kmv_ctx_free(ctx);
    kmv_ctx_free(ex);
    free(k);
    free(q);
    free(x);
    free(y);
    free(ye);
}

static void test_small_and_zero(void **state) {
    (void)state;
    dataset ds = clustered(2048, 256, 32, 15);
    float *x = calloc(ds.n, sizeof(float)), *y = malloc(ds.m * sizeof(float));
    for (size_t i = 0; i < ds.m; i++) y[i] = 5.0f;
    kmv_stats st;
    assert_int_equal(approx(&ds, x, 1, 1, 0, y, &st), KMV_OK); /* x = 0: y = 0 */
    for (size_t i = 0; i < ds.m; i++) assert_true(y[i] == 0.0f);
    /* Too small to gain: the exact engine runs and says why. */
    kmv_ctx *ctx = make_ctx(1.0, 1, 0, 0);
    dg_x(x, 64, DG_X_GAUSS, 1);
    assert_int_equal(kmv_matvec(ctx, ds.q, 8, ds.k, 64, ds.d, x, 1, y, &st), KMV_OK);
    assert_int_equal(st.mode, KMV_MODE_FALLBACK);
    assert_int_equal(st.fallback_reason, KMV_FALLBACK_SMALL);
    kmv_ctx_free(ctx);
    free(x);
    free(y);
    dataset_free(&ds);
}

static void test_bad_input(void **state) {
    (void)state;
    kmv_ctx *ctx = make_ctx(1.0, 1, 0, 0);
    kmv_index *ix;
    assert_int_equal(kmv_index_create(NULL, 4, &ix), KMV_EINVAL);
    assert_null(ix);
    assert_int_equal(kmv_index_create(ctx, 0, &ix), KMV_EINVAL);
    assert_int_equal(kmv_index_create(ctx, 4, NULL), KMV_EINVAL);
    assert_int_equal(kmv_index_create(ctx, 4, &ix), KMV_OK);
    float k[8] = {0, 1, 2, 3, 4, 5, 6, NAN};
    assert_int_equal(kmv_index_append(ix, NULL, 2), KMV_EINVAL);
    assert_int_equal(kmv_index_append(ix, k, 2), KMV_ENONFINITE);
    assert_int_equal(kmv_index_get_size(ix), 0);
    assert_int_equal(kmv_index_append(ix, k, 1), KMV_OK);
    assert_int_equal(kmv_index_get_size(ix), 1);
    float x[1] = {INFINITY}, y[1] = {7.0f}, q[4] = {0};
    assert_int_equal(kmv_index_matvec(ix, q, 1, x, 1, y, NULL), KMV_ENONFINITE);
    assert_true(y[0] == 7.0f);
    assert_int_equal(kmv_index_matvec(ix, NULL, 1, x, 1, y, NULL), KMV_EINVAL);
    assert_int_equal(kmv_index_matvec(NULL, q, 1, x, 1, y, NULL), KMV_EINVAL);
    kmv_index_free(ix);
    kmv_index_free(NULL);
    /* Approximate attention over one key: too small to gain, run exact. */
    kmv_params p;
    x[0] = 1.0f;
    kmv_stats st;
    assert_int_equal(kmv_attention(ctx, q, 1, k, 1, 4, x, 1, y, &st), KMV_OK);
    assert_true(y[0] == 1.0f);
    assert_int_equal(st.mode, KMV_MODE_FALLBACK);
    /* Parameter ranges of the approximate engine. */
    kmv_params_init(&p);
    kmv_params_x px = tu_px(&p);
    px.alpha = 0.0;
    assert_int_equal(kmv_params_set_x(&p, &px), KMV_EINVAL);
    px = tu_px(&p);
    px.gamma = NAN;
    assert_int_equal(kmv_params_set_x(&p, &px), KMV_EINVAL);
    px = tu_px(&p);
    px.sketch_size = 8;
    assert_int_equal(kmv_params_set_x(&p, &px), KMV_EINVAL);
    px = tu_px(&p);
    px.min_samples = 1 << 20;
    assert_int_equal(kmv_params_set_x(&p, &px), KMV_EINVAL);
    assert_string_equal(kmv_fallback_name(KMV_FALLBACK_SAMPLES), "samples");
    assert_string_equal(kmv_fallback_name(99), "unknown");
    kmv_ctx_free(ctx);
}

/* Every allocation of an approximate product failing in turn: KMV_ENOMEM,
 * nothing leaked (the sanitizer runs check), y untouched, and an index
 * whose append failed still answers as before. */
static void test_allocation_failures(void **state) {
    (void)state;
    dataset ds = clustered(1024, 128, 16, 16);
    dataset more = clustered(512, 1, 16, 17);
    float *x = malloc((ds.n + more.n) * sizeof(float)), *y = malloc(ds.m * sizeof(float));
    float *y0 = malloc(ds.m * sizeof(float));
    dg_x(x, ds.n + more.n, DG_X_GAUSS, 8);
    int failures_seen = 0, append_failures = 0;
    for (long fail_at = 1; fail_at < 600; fail_at++) {
        tu_alloc_state as = {0};
        as.fail_at = fail_at;
        kmv_params p;
        kmv_params_init(&p);
        p.allocator = tu_allocator(&as);
        p.n_threads = 1; /* the counting hook is not thread-safe; one thread
                            also makes the failing call the same every run */
        kmv_ctx *ctx;
        if (kmv_ctx_create(&p, &ctx) != KMV_OK) continue;
        kmv_index *ix;
        int rc = kmv_index_create(ctx, ds.d, &ix);
        if (rc == KMV_OK) {
            rc = kmv_index_append(ix, ds.k, ds.n);
            if (rc == KMV_OK) {
                ix->force_approx = 1;
                for (size_t i = 0; i < ds.m; i++) y[i] = 42.0f;
                rc = kmv_index_matvec(ix, ds.q, ds.m, x, 1, y, NULL);
                for (size_t i = 0; rc != KMV_OK && i < ds.m; i++)
                    if (y[i] != 42.0f) fail_msg("allocation %ld failing wrote y[%zu]", fail_at, i);
            }
            if (rc == KMV_OK) {
                /* An append into the built tables; if it fails, the index
                 * must answer exactly as it did. */
                memcpy(y0, y, ds.m * sizeof(float));
                rc = kmv_index_append(ix, more.k, more.n);
                if (rc != KMV_OK) {
                    append_failures++;
                    assert_int_equal(kmv_index_get_size(ix), ds.n);
                    as.fail_at = 0; /* no more failures */
                    assert_int_equal(kmv_index_matvec(ix, ds.q, ds.m, x, 1, y, NULL), KMV_OK);
                    assert_memory_equal(y, y0, ds.m * sizeof(float));
                    rc = KMV_ENOMEM;
                }
            }
            kmv_index_free(ix);
        }
        assert_true(rc == KMV_OK || rc == KMV_ENOMEM);
        failures_seen += rc == KMV_ENOMEM;
        kmv_ctx_free(ctx);
        if (as.live != 0) fail_msg("allocation %ld failing leaks %ld blocks (rc %d)", fail_at, as.live, rc);
        if (rc == KMV_OK && as.calls < fail_at) break; /* every allocation passed */
    }
    assert_true(failures_seen > 10);
    assert_true(append_failures > 0);
    free(x);
    free(y);
    free(y0);
    dataset_free(&ds);
    dataset_free(&more);
}

static kmv_index *capped_index(const dataset *ds, size_t cap) {
    kmv_params p;
    kmv_params_init(&p);
    p.seed = 3;
    p.n_threads = 1;
    p.max_bytes = cap;
    kmv_ctx *ctx;
    assert_int_equal(kmv_ctx_create(&p, &ctx), KMV_OK);
    kmv_index *ix;
    assert_int_equal(kmv_index_create(ctx, ds->d, &ix), KMV_OK);
    kmv_ctx_free(ctx);
    ix->force_approx = 1;
    return ix;
}

/* params.max_bytes: the index never holds more; a refused append is
 * KMV_ELIMIT and changes no answer; a product whose plan does not fit runs
 * the exact engine and says so; a one-shot call past it is KMV_ELIMIT with
 * y untouched. */
static void test_memory_cap(void **state) {
    (void)state;
    dataset ds = clustered(2048, 256, 32, 18);
    dataset more = clustered(6144, 1, 32, 19);
    float *x = malloc(ds.n * sizeof(float)), *y = malloc(ds.m * sizeof(float));
    float *y1 = malloc(ds.m * sizeof(float)), *ye = malloc(ds.m * sizeof(float));
    dg_x(x, ds.n, DG_X_GAUSS, 9);
    exact(&ds, x, 1, ye);

    /* What the approximate and the exact product need, uncapped. */
    kmv_index *ix = capped_index(&ds, 0);
    assert_int_equal(kmv_index_get_bytes(ix), 0);
    assert_int_equal(kmv_index_append(ix, ds.k, ds.n), KMV_OK);
    size_t keys_bytes = kmv_index_get_bytes(ix);
    assert_true(keys_bytes >= ds.n * ds.d * sizeof(float));
    assert_int_equal(fallback_product(ix, &ds, x, y), KMV_OK);
    size_t exact_peak = kmv_index_get_peak_bytes(ix);
    kmv_stats st;
    assert_int_equal(kmv_index_matvec(ix, ds.q, ds.m, x, 1, y1, &st), KMV_OK);
    assert_int_equal(st.mode, KMV_MODE_APPROX);
    size_t approx_peak = kmv_index_get_peak_bytes(ix);
    kmv_index_free(ix);
    assert_true(approx_peak > exact_peak);

    /* Capped at the approximate plan's peak: the same answer, and an append
     * past the cap refused without a trace. */
    ix = capped_index(&ds, approx_peak);
    assert_int_equal(kmv_index_append(ix, ds.k, ds.n), KMV_OK);
    assert_int_equal(kmv_index_matvec(ix, ds.q, ds.m, x, 1, y, &st), KMV_OK);
    assert_int_equal(st.mode, KMV_MODE_APPROX);
    assert_memory_equal(y, y1, ds.m * sizeof(float));
    assert_true(kmv_index_get_peak_bytes(ix) <= approx_peak);
    assert_int_equal(kmv_index_append(ix, more.k, more.n), KMV_ELIMIT);
    assert_int_equal(kmv_index_get_size(ix), ds.n);
    assert_true(kmv_index_get_peak_bytes(ix) <= approx_peak);
    assert_int_equal(kmv_index_matvec(ix, ds.q, ds.m, x, 1, y, &st), KMV_OK);
    assert_memory_equal(y, y1, ds.m * sizeof(float));
    kmv_index_free(ix);

    /* Capped at the exact product's peak: the plan does not fit, the exact
     * engine runs and says why. */
    ix = capped_index(&ds, exact_peak);
    assert_int_equal(kmv_index_append(ix, ds.k, ds.n), KMV_OK);
    assert_int_equal(kmv_index_matvec(ix, ds.q, ds.m, x, 1, y, &st), KMV_OK);
    assert_int_equal(st.mode, KMV_MODE_FALLBACK);
    assert_int_equal(st.fallback_reason, KMV_FALLBACK_MEMORY);
    assert_string_equal(kmv_fallback_name(KMV_FALLBACK_MEMORY), "memory");
    assert_string_equal(kmv_fallback_name(KMV_FALLBACK_TREE), "tree");
    assert_true(rel_error(y, ye, ds.m, x, ds.n) < 1e-5);
    assert_true(kmv_index_get_peak_bytes(ix) <= exact_peak);
    /* The tables were dropped; the next product skips the plan it knows
     * does not fit, with the same answer. */
    assert_false(ix->lsh_built);
    memcpy(y1, y, ds.m * sizeof(float));
    assert_int_equal(kmv_index_matvec(ix, ds.q, ds.m, x, 1, y, &st), KMV_OK);
    assert_int_equal(st.fallback_reason, KMV_FALLBACK_MEMORY);
    assert_int_equal(tu_x(&st).heavy_pairs, 0);
    assert_memory_equal(y, y1, ds.m * sizeof(float));
    kmv_index_free(ix);

    /* Not even the keys fit: the append is refused. */
    ix = capped_index(&ds, keys_bytes / 2);
    assert_int_equal(kmv_index_append(ix, ds.k, ds.n), KMV_ELIMIT);
    assert_int_equal(kmv_index_get_size(ix), 0);
    assert_int_equal(kmv_index_get_bytes(ix), 0);
    kmv_index_free(ix);

    /* One-shot calls on a context: each call's working memory is capped.
     * The approximate one takes its index path only from 2^23 entries. */
    enum { BM = 1024, BN = 8192, BD = 2 };
    float *bq = tu_random(BM * BD, 20, 1.0f), *bk = tu_random(BN * BD, 21, 1.0f);
    float *bx = tu_random(BN, 22, 1.0f), *by = malloc(BM * sizeof(float));
    assert_true((double)BM * BN >= KMV__APPROX_MIN_ENTRIES);
    kmv_params p;
    kmv_params_init(&p);
    p.max_bytes = 4096;
    for (int exact_engine = 0; exact_engine <= 1; exact_engine++) {
        p.exact = exact_engine;
        kmv_ctx *ctx;
        assert_int_equal(kmv_ctx_create(&p, &ctx), KMV_OK);
        for (size_t i = 0; i < BM; i++) by[i] = 42.0f;
        assert_int_equal(kmv_matvec(ctx, bq, BM, bk, BN, BD, bx, 1, by, NULL), KMV_ELIMIT);
        if (exact_engine)
            assert_int_equal(kmv_attention(ctx, bq, BM, bk, BN, BD, bx, 1, by, NULL), KMV_ELIMIT);
        for (size_t i = 0; i < BM; i++) assert_true(by[i] == 42.0f);
        kmv_ctx_free(ctx);
    }
    free(bq);
    free(bk);
    free(bx);
    free(by);
    assert_string_equal(kmv_errname(KMV_ELIMIT), "KMV_ELIMIT");
    free(x);
    free(y);
    free(y1);
    free(ye);
    dataset_free(&ds);
    dataset_free(&more);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_small_and_zero),
        cmocka_unit_test(test_lsh_tables),
        cmocka_unit_test(test_exact_precision_predicted),
        cmocka_unit_test(test_deterministic),
        cmocka_unit_test(test_grows_in_place),
        cmocka_unit_test(test_dense_falls_back),
        cmocka_unit_test(test_allocation_failures),
        cmocka_unit_test(test_memory_cap),
        cmocka_unit_test(test_clustered_assumption_a),
        cmocka_unit_test(test_recall_clustered),
        cmocka_unit_test(test_recall_glove),
        cmocka_unit_test(test_clustered_mixed_signs),
        cmocka_unit_test(test_clustered_huge_entries),
        cmocka_unit_test(test_clustered_nonnegative),
        cmocka_unit_test(test_clustered_density),
        cmocka_unit_test(test_clustered_matrix),
        cmocka_unit_test(test_glove_sparse),
        cmocka_unit_test(test_glove_density),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
