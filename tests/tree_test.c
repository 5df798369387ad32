/* The bounds tree (algo/tree.h, engine/batch_tree.c): every row it answers
 * holds its certified share of the bound, deterministically, on clustered
 * data, GloVe, an adversarial leaf, causal rows and several columns; the
 * cost model picks it where it pays; the monitor reports what it measures;
 * allocation failures leave y untouched and leak nothing. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#define KMV_STATIC_LINKING_ONLY
#include "algo/tree.h"
#include "engine/index_layout.h"
#include "kmv/kmv.h"
#include "kmv/kmv_experimental.h"
#include "tests/datagen.h"
#include "tests/realdata.h"
#include "tests/testutil.h"

typedef struct data {
    float *k, *q;
    size_t n, m, d;
    double sigma;
} data;

static data clustered(size_t n, size_t m, size_t d, uint64_t seed) {
    data ds = {malloc(n * d * sizeof(float)), malloc(m * d * sizeof(float)), n, m, d, 1.0};
    dg_clustered(ds.k, n, ds.q, m, d, 16, 1.0, seed);
    return ds;
}

static data glove(double sigma) {
    kmv_array a;
    char err[256];
    const char *paths[] = {"data/glove100d_first4096.npy", "../data/glove100d_first4096.npy"};
    int rc = KMV_EIO;
    for (size_t i = 0; i < 2 && rc != KMV_OK; i++) rc = kmv_npy_read(paths[i], NULL, &a, err, sizeof err);
    if (rc != KMV_OK) fail_msg("GloVe sample: %s", err);
    data ds = {a.data, NULL, a.rows, a.rows / 4, a.cols, sigma};
    ds.q = malloc(ds.m * ds.d * sizeof(float));
    for (size_t i = 0; i < ds.m; i++) memcpy(ds.q + i * ds.d, a.data + 4 * i * ds.d, ds.d * sizeof(float));
    return ds;
}

/* Every eighth U.S. postal code (data/zipcodes_latlon.npy), standardized:
 * real low-dimensional kernel-density data. Queries: every fourth key. */
static data zipcodes(double sigma) {
    char err[256];
    size_t n = 0, d = 0;
    float *k = rd_zipcodes(8, &n, &d, err, sizeof err);
    if (k == NULL) fail_msg("zip codes: %s", err);
    data ds = {k, malloc(n / 4 * d * sizeof(float)), n, n / 4, d, sigma};
    for (size_t i = 0; i < ds.m; i++) memcpy(ds.q + i * d, ds.k + 4 * i * d, d * sizeof(float));
    return ds;
}

static void data_free(data *ds) {
    free(ds->k);
    free(ds->q);
}

static kmv_params params(const data *ds, uint64_t seed, int backend, int threads) {
    kmv_params p;
    kmv_params_init(&p);
    p.sigma = ds->sigma;
    p.seed = seed;
    p.n_threads = threads;
    kmv_params_x x = tu_px(&p);
    x.backend = backend;
    assert_int_equal(kmv_params_set_x(&p, &x), KMV_OK);
    return p;
}

/* The product through an index under p. */
static int product(const data *ds, const kmv_params *p, const float *x, size_t c, float *y,
                   kmv_stats *st, size_t *tree_bytes) {
    kmv_ctx *ctx;
    assert_int_equal(kmv_ctx_create(p, &ctx), KMV_OK);
    kmv_index *ix;
    assert_int_equal(kmv_index_create(ctx, ds->d, &ix), KMV_OK);
    assert_int_equal(kmv_index_append(ix, ds->k, ds->n), KMV_OK);
    int rc = kmv_index_matvec(ix, ds->q, ds->m, x, c, y, st);
    if (tree_bytes != NULL) *tree_bytes = ix->tree_built ? ix->tree.bytes : 0;
    kmv_index_free(ix);
    kmv_ctx_free(ctx);
    return rc;
}

/* Every row within eps ||x|| / sqrt(m), against a float64 reference, with
 * room for the float rounding of the exactly summed part only. Returns the
 * worst row's error over its share. */
static double check_rows(const data *ds, const float *x, size_t c, const float *y, int causal,
                         double eps) {
    double *ye = malloc(ds->m * c * sizeof(double)), *ya = malloc(ds->m * c * sizeof(double));
    tu_ref_gauss(ds->q, ds->m, ds->k, ds->n, ds->d, x, c, ds->sigma, causal, ye, ya);
    double x2 = 0.0;
    for (size_t u = 0; u < ds->n * c; u++) x2 += (double)x[u] * x[u];
    double share = eps * sqrt(x2 / (double)ds->m), worst = 0.0;
    for (size_t i = 0; i < ds->m; i++) {
        double e2 = 0.0, a = 0.0;
        for (size_t t = 0; t < c; t++) {
            double dv = (double)y[i * c + t] - ye[i * c + t];
            e2 += dv * dv;
            a += ya[i * c + t];
        }
        double e = sqrt(e2);
        if (e > share + 1e-5 * a + 1e-30)
            fail_msg("row %zu: error %g past its share %g (sum |Kx| %g)", i, e, share, a);
        if (e / share > worst) worst = e / share;
    }
    free(ye);
    free(ya);
    return worst;
}

/* Forced tree over seeds, x kinds and column counts: every row holds. */
static void certified(const data *ds, int causal, const char *name) {
    dg_xkind kinds[] = {DG_X_GAUSS, DG_X_HUGE, DG_X_NONNEG, DG_X_ONES};
    size_t cols[] = {1, 3, 1, 1};
    uint64_t visited = 0, rows = 0, exact_rows = 0;
    double worst = 0.0;
    for (uint64_t s = 1; s <= 8; s++) {
        size_t kind = (size_t)(s - 1) % 4, c = cols[kind];
        float *x = malloc(ds->n * c * sizeof(float)), *y = malloc(ds->m * c * sizeof(float));
        dg_x(x, ds->n * c, kinds[kind], 300 + s);
        kmv_params p = params(ds, s, KMV_BACKEND_TREE, 0);
        p.causal = causal;
        kmv_stats st;
        assert_int_equal(product(ds, &p, x, c, y, &st, NULL), KMV_OK);
        kmv_stats_x sx = tu_x(&st);
        assert_int_equal(st.mode, KMV_MODE_APPROX);
        assert_int_equal(sx.backend, KMV_BACKEND_TREE);
        assert_int_equal(sx.deterministic, 1);
        assert_true(sx.certified_tail <= p.eps);
        assert_true(sx.tree_bytes > 0);
        double w = check_rows(ds, x, c, y, causal, p.eps);
        worst = w > worst ? w : worst;
        visited += sx.keys_visited;
        rows += ds->m;
        exact_rows += st.rows_exact;
        free(x);
        free(y);
    }
    printf("  %-20s worst row at %.3f of its share; keys visited per row %.1f of %zu; exact rows "
           "%llu of %llu\n",
           name, worst, (double)visited / (double)rows, ds->n, (unsigned long long)exact_rows,
           (unsigned long long)rows);
}

static void test_clustered(void **state) {
    (void)state;
    data ds = clustered(4096, 512, 16, 5);
    certified(&ds, 0, "clustered");
    data_free(&ds);
    /* wide enough that the tree prunes: most rows certified, few keys */
    ds = clustered(8192, 1024, 64, 6);
    float *x = malloc(ds.n * sizeof(float)), *y = malloc(ds.m * sizeof(float));
    dg_x(x, ds.n, DG_X_GAUSS, 7);
    kmv_params p = params(&ds, 1, KMV_BACKEND_TREE, 0);
    kmv_stats st;
    size_t bytes;
    assert_int_equal(product(&ds, &p, x, 1, y, &st, &bytes), KMV_OK);
    check_rows(&ds, x, 1, y, 0, p.eps);
    assert_true(st.rows_exact == 0);
    assert_true(tu_x(&st).keys_visited < 64 * ds.m);
    /* the memory target: at most 15% of the keys' bytes */
    assert_true(bytes <= 0.15 * (double)(ds.n * ds.d * sizeof(float)));
    assert_int_equal(tu_x(&st).tree_bytes, bytes);
    free(x);
    free(y);
    data_free(&ds);
}

static void test_glove(void **state) {
    (void)state;
    data ds = glove(1.0);
    certified(&ds, 0, "glove sigma 1");
    data_free(&ds);
    ds = glove(0.5);
    certified(&ds, 0, "glove sigma 0.5");
    data_free(&ds);
}

static void test_zipcodes(void **state) {
    (void)state;
    data ds = zipcodes(0.05);
    certified(&ds, 0, "zip codes sigma 0.05");
    data_free(&ds);
}

static void test_causal(void **state) {
    (void)state;
    data ds = clustered(2048, 2048, 16, 8);
    certified(&ds, 1, "causal");
    data_free(&ds);
}

/* One key far from the rest with x a million times the others': a leaf
 * whose bound must not hide it, and a leaf of ordinary keys beside a huge
 * one. */
static void test_adversarial(void **state) {
    (void)state;
    data ds = clustered(4096, 512, 16, 9);
    for (size_t u = 0; u < ds.d; u++) ds.k[100 * ds.d + u] = ds.q[3 * ds.d + u] + 0.3f;
    float *x = malloc(ds.n * sizeof(float)), *y = malloc(ds.m * sizeof(float));
    dg_x(x, ds.n, DG_X_GAUSS, 10);
    x[100] = 1e6f;
    x[2000] = -1e6f;
    kmv_params p = params(&ds, 2, KMV_BACKEND_TREE, 0);
    kmv_stats st;
    assert_int_equal(product(&ds, &p, x, 1, y, &st, NULL), KMV_OK);
    check_rows(&ds, x, 1, y, 0, p.eps);
    data_free(&ds);
    free(x);
    free(y);
}

/* The same seed gives the same bits, on one thread or two. */
static void test_deterministic(void **state) {
    (void)state;
    data ds = clustered(4096, 700, 16, 11);
    float *x = malloc(ds.n * sizeof(float)), *y1 = malloc(ds.m * sizeof(float)),
          *y2 = malloc(ds.m * sizeof(float));
    dg_x(x, ds.n, DG_X_GAUSS, 12);
    kmv_params p1 = params(&ds, 4, KMV_BACKEND_TREE, 1), p2 = params(&ds, 4, KMV_BACKEND_TREE, 2);
    assert_int_equal(product(&ds, &p1, x, 1, y1, NULL, NULL), KMV_OK);
    assert_int_equal(product(&ds, &p2, x, 1, y2, NULL, NULL), KMV_OK);
    assert_memory_equal(y1, y2, ds.m * sizeof(float));
    assert_int_equal(product(&ds, &p2, x, 1, y2, NULL, NULL), KMV_OK);
    assert_memory_equal(y1, y2, ds.m * sizeof(float));
    free(x);
    free(y1);
    free(y2);
    data_free(&ds);
}

/* A stream's product over its prefix goes through the same index and
 * tree: keys appended in blocks answer bit for bit as the batch over all
 * of them, and again after more keys (a new tree at the new count). */
static void test_stream_matches_batch(void **state) {
    (void)state;
    data ds = clustered(4096, 512, 16, 19);
    float *x = malloc(ds.n * sizeof(float)), *y1 = malloc(ds.m * sizeof(float)),
          *y2 = malloc(ds.m * sizeof(float));
    dg_x(x, ds.n, DG_X_GAUSS, 20);
    kmv_params p = params(&ds, 3, KMV_BACKEND_TREE, 0);
    kmv_ctx *ctx;
    assert_int_equal(kmv_ctx_create(&p, &ctx), KMV_OK);
    kmv_stream *s;
    assert_int_equal(kmv_stream_create(ctx, ds.d, 1, &s), KMV_OK);
    assert_int_equal(kmv_stream_append_queries(s, ds.q, ds.m), KMV_OK);
    size_t half = ds.n / 2;
    for (size_t j0 = 0; j0 < half; j0 += 500) {
        size_t cnt = half - j0 < 500 ? half - j0 : 500;
        assert_int_equal(kmv_stream_append_keys(s, ds.k + j0 * ds.d, x + j0, cnt), KMV_OK);
    }
    for (int round = 0; round < 2; round++) {
        data part = ds;
        part.n = round ? ds.n : half;
        kmv_stats st;
        assert_int_equal(kmv_stream_matvec(s, NULL, y1, &st), KMV_OK);
        assert_int_equal(tu_x(&st).backend, KMV_BACKEND_TREE);
        assert_int_equal(product(&part, &p, x, 1, y2, NULL, NULL), KMV_OK);
        assert_memory_equal(y1, y2, ds.m * sizeof(float));
        check_rows(&part, x, 1, y1, 0, p.eps);
        if (round == 0)
            assert_int_equal(kmv_stream_append_keys(s, ds.k + half * ds.d, x + half, ds.n - half),
                             KMV_OK);
    }
    kmv_stream_free(s);
    kmv_ctx_free(ctx);
    free(x);
    free(y1);
    free(y2);
    data_free(&ds);
}

/* AUTO takes the tree where its trial shows it cheap, and LSH never
 * builds one. */
static void test_cost_model(void **state) {
    (void)state;
    data ds = clustered(8192, 8192, 32, 13);
    float *x = malloc(ds.n * sizeof(float)), *y = malloc(ds.m * sizeof(float));
    dg_x(x, ds.n, DG_X_GAUSS, 14);
    kmv_params p = params(&ds, 1, KMV_BACKEND_AUTO, 0);
    kmv_stats st;
    assert_int_equal(product(&ds, &p, x, 1, y, &st, NULL), KMV_OK);
    assert_int_equal(st.mode, KMV_MODE_APPROX);
    assert_int_equal(tu_x(&st).backend, KMV_BACKEND_TREE);
    assert_true(tu_x(&st).cost_ratio < 0.5);
    p = params(&ds, 1, KMV_BACKEND_LSH, 0);
    size_t bytes;
    assert_int_equal(product(&ds, &p, x, 1, y, &st, &bytes), KMV_OK);
    assert_int_equal(bytes, 0);
    assert_true(tu_x(&st).backend != KMV_BACKEND_TREE);
    assert_int_equal(tu_x(&st).tree_bytes, 0);
    free(x);
    free(y);
    data_free(&ds);
}

/* The monitor: rows 0, N, 2N, ... computed exactly too; its figures are
 * those rows' errors on eps's scale. */
static void test_verify_every(void **state) {
    (void)state;
    data ds = clustered(4096, 1000, 16, 15);
    float *x = malloc(ds.n * sizeof(float)), *y = malloc(ds.m * sizeof(float));
    dg_x(x, ds.n, DG_X_GAUSS, 16);
    kmv_params p = params(&ds, 1, KMV_BACKEND_TREE, 0);
    kmv_params_x px = tu_px(&p);
    px.verify_every = 7;
    assert_int_equal(kmv_params_set_x(&p, &px), KMV_OK);
    kmv_stats st;
    assert_int_equal(product(&ds, &p, x, 1, y, &st, NULL), KMV_OK);
    kmv_stats_x sx = tu_x(&st);
    assert_int_equal(sx.verified, (1000 + 6) / 7);
    double *ye = malloc(ds.m * sizeof(double)), *ya = malloc(ds.m * sizeof(double));
    tu_ref_gauss(ds.q, ds.m, ds.k, ds.n, ds.d, x, 1, ds.sigma, 0, ye, ya);
    double x2 = 0.0, mx = 0.0, sum = 0.0;
    for (size_t j = 0; j < ds.n; j++) x2 += (double)x[j] * x[j];
    for (size_t i = 0; i < ds.m; i += 7) {
        double e = fabs((double)y[i] - ye[i]) * sqrt((double)ds.m / x2);
        mx = e > mx ? e : mx;
        sum += e;
    }
    assert_true(fabs(sx.verify_max - mx) <= 1e-3 * mx + 1e-6);
    assert_true(fabs(sx.verify_mean - sum / (double)sx.verified) <= 1e-3 * mx + 1e-6);
    assert_true(sx.verify_p99 <= sx.verify_max && sx.verify_mean <= sx.verify_max);
    assert_true(sx.verify_max <= p.eps * 1.001);
    px.verify_every = -1;
    assert_int_equal(kmv_params_set_x(&p, &px), KMV_EINVAL);
    free(ye);
    free(ya);
    free(x);
    free(y);
    data_free(&ds);
}

static void test_allocation_failures(void **state) {
    (void)state;
    data ds = clustered(1024, 128, 16, 17);
    float *x = malloc(ds.n * sizeof(float)), *y = malloc(ds.m * sizeof(float));
    dg_x(x, ds.n, DG_X_GAUSS, 18);
    int failures = 0;
    for (long fail_at = 1; fail_at < 400; fail_at++) {
        tu_alloc_state as = {0};
        as.fail_at = fail_at;
        kmv_params p = params(&ds, 1, KMV_BACKEND_TREE, 1);
        p.allocator = tu_allocator(&as);
        kmv_ctx *ctx;
        if (kmv_ctx_create(&p, &ctx) != KMV_OK) continue;
        kmv_index *ix;
        int rc = kmv_index_create(ctx, ds.d, &ix);
        if (rc == KMV_OK) {
            rc = kmv_index_append(ix, ds.k, ds.n);
            if (rc == KMV_OK) {
                for (size_t i = 0; i < ds.m; i++) y[i] = 42.0f;
                rc = kmv_index_matvec(ix, ds.q, ds.m, x, 1, y, NULL);
                for (size_t i = 0; rc != KMV_OK && i < ds.m; i++)
                    if (y[i] != 42.0f) fail_msg("allocation %ld failing wrote y[%zu]", fail_at, i);
                if (rc == KMV_OK) check_rows(&ds, x, 1, y, 0, p.eps);
            }
            kmv_index_free(ix);
        }
        assert_true(rc == KMV_OK || rc == KMV_ENOMEM);
        failures += rc == KMV_ENOMEM;
        kmv_ctx_free(ctx);
        if (as.live != 0) fail_msg("allocation %ld failing leaks %ld blocks", fail_at, as.live);
        if (rc == KMV_OK && as.calls < fail_at) break;
    }
    assert_true(failures > 10);
    free(x);
    free(y);
    data_free(&ds);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_clustered),     cmocka_unit_test(test_glove),
        cmocka_unit_test(test_zipcodes),
        cmocka_unit_test(test_causal),        cmocka_unit_test(test_adversarial),
        cmocka_unit_test(test_deterministic), cmocka_unit_test(test_stream_matches_batch),
        cmocka_unit_test(test_cost_model),
        cmocka_unit_test(test_verify_every),  cmocka_unit_test(test_allocation_failures),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
