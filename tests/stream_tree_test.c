/* Decoding steps through a stream's bounds tree (stream/step_tree.c): on
 * real low-dimensional data the cost model takes the tree, every step it
 * answers holds eps ||x|| with certainty while the tree grows key by key
 * and is built again at the doublings; the tree is a function of the keys
 * and the seed (key by key, one block, or a loaded snapshot: the same bits);
 * an adversarial far key with a huge value is held; where the trial finds
 * no gain (GloVe) no tree is kept; allocation failures and the memory cap
 * cost the tree only, never a wrong answer or a leak. */
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
#include "kmv/kmv.h"
#include "kmv/kmv_experimental.h"
#include "tests/datagen.h"
#include "tests/realdata.h"
#include "tests/testutil.h"

static kmv_ctx *make_ctx(double sigma, int backend, kmv_allocator *a, size_t max_bytes) {
    kmv_params p;
    kmv_params_init(&p);
    p.sigma = sigma;
    p.seed = 7;
    p.n_threads = 1;
    p.max_bytes = max_bytes;
    if (a != NULL) p.allocator = *a;
    kmv_params_x x = tu_px(&p);
    x.backend = backend;
    assert_int_equal(kmv_params_set_x(&p, &x), KMV_OK);
    kmv_ctx *ctx = NULL;
    if (kmv_ctx_create(&p, &ctx) != KMV_OK) return NULL;
    return ctx;
}

static float *zip(size_t every, size_t *n, size_t *d) {
    char err[256];
    float *k = rd_zipcodes(every, n, d, err, sizeof err);
    if (k == NULL) fail_msg("zip codes: %s", err);
    return k;
}

/* The step's answer y (c) for q against the first n keys, against float64:
 * within eps ||x|| (room for the float rounding of the summed part only).
 * Returns the error over ||x||. */
static double check_step(const float *k, size_t n, size_t d, const float *x, size_t c,
                         double sigma, const float *q, const float *y, double eps) {
    double *ye = malloc(c * sizeof(double)), *ya = malloc(c * sizeof(double));
    tu_ref_gauss(q, 1, k, n, d, x, c, sigma, 0, ye, ya);
    double x2 = 0.0, e2 = 0.0, a = 0.0;
    for (size_t u = 0; u < n * c; u++) x2 += (double)x[u] * x[u];
    for (size_t t = 0; t < c; t++) {
        e2 += ((double)y[t] - ye[t]) * ((double)y[t] - ye[t]);
        a += ya[t];
    }
    double e = sqrt(e2), bound = eps * sqrt(x2);
    if (e > bound + 1e-5 * a + 1e-30) fail_msg("step at n = %zu: error %g past %g", n, e, bound);
    free(ye);
    free(ya);
    return e / sqrt(x2);
}

/* Blocks of keys, steps after each: once the stream passes the steps'
 * minimum, the tree answers every step, within eps ||x||, for certain. */
static void test_steps_certified(void **state) {
    (void)state;
    size_t n = 0, d = 0;
    float *all = zip(2, &n, &d); /* 21,024 codes: keys the even ones */
    size_t nk = n / 2, c = 2, tree_steps = 0, steps = 0;
    float *k = malloc(nk * d * sizeof(float)), *q = malloc(nk * d * sizeof(float));
    for (size_t i = 0; i < nk; i++) {
        memcpy(k + i * d, all + 2 * i * d, d * sizeof(float));
        memcpy(q + i * d, all + (2 * i + 1) * d, d * sizeof(float));
    }
    float *x = malloc(nk * c * sizeof(float));
    dg_x(x, nk * c, DG_X_GAUSS, 3);
    const double sigma = 0.02;
    kmv_ctx *ctx = make_ctx(sigma, KMV_BACKEND_AUTO, NULL, 0);
    kmv_stream *s;
    assert_int_equal(kmv_stream_create(ctx, d, c, &s), KMV_OK);
    double worst = 0.0, tail = 0.0;
    for (size_t have = 0; have < nk;) {
        size_t blk = have < 4096 ? 1000 : 1777;
        if (blk > nk - have) blk = nk - have;
        assert_int_equal(kmv_stream_append_keys(s, k + have * d, x + have * c, blk), KMV_OK);
        have += blk;
        for (size_t i = 0; i < 16; i++) {
            const float *qi = q + ((have * 31 + i * 997) % nk) * d;
            float y[2];
            kmv_stats st;
            assert_int_equal(kmv_stream_decode(s, qi, y, &st), KMV_OK);
            double e = check_step(k, have, d, x, c, sigma, qi, y, 0.1);
            worst = e > worst ? e : worst;
            kmv_stats_x sx;
            kmv_stats_get_x(&st, &sx);
            if (have < 2048) continue;
            steps++;
            if (sx.backend == KMV_BACKEND_TREE && st.mode == KMV_MODE_APPROX) {
                tree_steps++;
                assert_int_equal(sx.deterministic, 1);
                assert_true(sx.certified_tail <= 0.1);
                assert_true(e <= sx.certified_tail + 1e-5);
                tail = sx.certified_tail > tail ? sx.certified_tail : tail;
            }
        }
    }
    kmv_stream_info info;
    assert_int_equal(kmv_stream_get_info(s, &info), KMV_OK);
    print_message("zip codes (%zu keys, sigma %g): %zu of %zu steps by the tree, worst error "
                  "%.4f of ||x||, worst certified tail %.4f; %llu builds, %llu inserts, "
                  "%.2f us per insert, tree %zu bytes\n",
                  nk, sigma, tree_steps, steps, worst, tail, (unsigned long long)info.tree_builds,
                  (unsigned long long)info.tree_inserts,
                  1e6 * info.tree_seconds_insert / (double)(info.tree_inserts ? info.tree_inserts : 1),
                  info.tree_bytes);
    assert_int_equal(tree_steps, steps); /* the cost model took it every time */
    assert_true(info.tree_builds >= 3);  /* 2048, 4096, 8192 */
    assert_true(info.tree_inserts > 0);
    assert_int_equal(info.tree_keys, nk);
    /* at d = 2 a node's fixed part (radius, counts, id range) outweighs
     * the keys' bytes; the tree stays within twice them */
    assert_true(info.tree_bytes > 0 && info.tree_bytes < 2 * nk * d * sizeof(float));
    kmv_stream_free(s);
    kmv_ctx_free(ctx);
    free(all);
    free(k);
    free(q);
    free(x);
}

static void tmp_path(char *buf, size_t len, const char *name) {
    const char *dir = getenv("TEST_TMPDIR");
    snprintf(buf, len, "%s/%s", dir ? dir : "/tmp", name);
}

/* Key by key with steps between, one block, and a snapshot of the first
 * loaded: the same tree, so the same answers bit for bit. */
static void test_history_free(void **state) {
    (void)state;
    size_t n = 0, d = 0;
    float *k = zip(4, &n, &d); /* 10,512 codes */
    const size_t nk = 6000, c = 1;
    float *x = malloc(nk * sizeof(float));
    dg_x(x, nk, DG_X_GAUSS, 5);
    kmv_ctx *ctx = make_ctx(0.02, KMV_BACKEND_AUTO, NULL, 0);
    kmv_stream *a, *b, *l;
    assert_int_equal(kmv_stream_create(ctx, d, c, &a), KMV_OK);
    assert_int_equal(kmv_stream_create(ctx, d, c, &b), KMV_OK);
    float y;
    for (size_t j = 0; j < nk; j++) {
        assert_int_equal(kmv_stream_append_keys(a, k + j * d, x + j, 1), KMV_OK);
        if (j >= 2040 && j % 7 == 0) assert_int_equal(kmv_stream_decode(a, k + (j + 3000) * d, &y, NULL), KMV_OK);
    }
    assert_int_equal(kmv_stream_append_keys(b, k, x, nk), KMV_OK);
    char path[512], err[512];
    tmp_path(path, sizeof path, "tree.kmvs");
    assert_int_equal(kmv_stream_save(a, path, err, sizeof err), KMV_OK);
    assert_int_equal(kmv_stream_load(ctx, path, &l, err, sizeof err), KMV_OK);
    size_t tree_steps = 0;
    for (size_t i = 0; i < 64; i++) {
        const float *qi = k + (nk + 50 * i) * d;
        float ya, yb, yl;
        kmv_stats sa, sb, sl;
        assert_int_equal(kmv_stream_decode(a, qi, &ya, &sa), KMV_OK);
        assert_int_equal(kmv_stream_decode(b, qi, &yb, &sb), KMV_OK);
        assert_int_equal(kmv_stream_decode(l, qi, &yl, &sl), KMV_OK);
        if (memcmp(&ya, &yb, sizeof ya) != 0 || memcmp(&ya, &yl, sizeof ya) != 0)
            fail_msg("query %zu: key by key %.9g, one block %.9g, loaded %.9g", i, ya, yb, yl);
        kmv_stats_x xa, xb;
        kmv_stats_get_x(&sa, &xa);
        kmv_stats_get_x(&sb, &xb);
        assert_int_equal(xa.backend, xb.backend);
        assert_int_equal(xa.keys_visited, xb.keys_visited);
        tree_steps += xa.backend == KMV_BACKEND_TREE && sa.mode == KMV_MODE_APPROX;
    }
    assert_int_equal(tree_steps, 64);
    kmv_stream_info ia, ib;
    kmv_stream_get_info(a, &ia);
    kmv_stream_get_info(b, &ib);
    assert_int_equal(ia.tree_keys, ib.tree_keys);
    assert_int_equal(ia.tree_bytes, ib.tree_bytes);
    remove(path);
    kmv_stream_free(a);
    kmv_stream_free(b);
    kmv_stream_free(l);
    kmv_ctx_free(ctx);
    free(k);
    free(x);
}

/* One key far from the rest with a huge value: its leaf's bound is what
 * the certificate must respect, near it and far from it. */
static void test_adversarial(void **state) {
    (void)state;
    const size_t n = 4096, d = 16, m = 64;
    float *k = malloc(n * d * sizeof(float)), *q = malloc(m * d * sizeof(float));
    float *x = malloc(n * sizeof(float));
    dg_clustered(k, n, q, m, d, 16, 1.0, 9);
    dg_x(x, n, DG_X_GAUSS, 10);
    for (size_t u = 0; u < d; u++) k[(n - 1) * d + u] = 6.0f; /* far from every cluster */
    x[n - 1] = 1e6f;
    for (size_t u = 0; u < d; u++) q[u] = 6.2f, q[d + u] = 5.0f; /* near it, and halfway */
    for (int backend = KMV_BACKEND_AUTO; backend <= KMV_BACKEND_TREE; backend += 2) {
        kmv_ctx *ctx = make_ctx(1.0, backend, NULL, 0);
        kmv_stream *s;
        assert_int_equal(kmv_stream_create(ctx, d, 1, &s), KMV_OK);
        assert_int_equal(kmv_stream_append_keys(s, k, x, n), KMV_OK);
        for (size_t i = 0; i < m; i++) {
            float y;
            kmv_stats st;
            assert_int_equal(kmv_stream_decode(s, q + i * d, &y, &st), KMV_OK);
            check_step(k, n, d, x, 1, 1.0, q + i * d, &y, 0.1);
            kmv_stats_x sx;
            kmv_stats_get_x(&st, &sx);
            if (backend == KMV_BACKEND_TREE)
                assert_true(sx.backend == KMV_BACKEND_TREE || st.fallback_reason == KMV_FALLBACK_TREE);
        }
        kmv_stream_free(s);
        kmv_ctx_free(ctx);
    }
    free(k);
    free(q);
    free(x);
}

/* A stream's tree at d = 64, grown by a fifth past its build (new
 * clusters, as a drifting context brings): at most 15% of the keys' bytes,
 * and every step within its bound. */
static void test_memory(void **state) {
    (void)state;
    const size_t n0 = 8192, n = 8192 + 1700, d = 64;
    float *k = malloc(n * d * sizeof(float)), *q = malloc(16 * d * sizeof(float));
    float *x = malloc(n * sizeof(float));
    dg_clustered(k, n, q, 16, d, 16, 1.0, 19);
    dg_x(x, n, DG_X_GAUSS, 20);
    kmv_ctx *ctx = make_ctx(1.0, KMV_BACKEND_TREE, NULL, 0);
    kmv_stream *s;
    assert_int_equal(kmv_stream_create(ctx, d, 1, &s), KMV_OK);
    assert_int_equal(kmv_stream_append_keys(s, k, x, n0), KMV_OK);
    float y;
    assert_int_equal(kmv_stream_decode(s, q, &y, NULL), KMV_OK);
    assert_int_equal(kmv_stream_append_keys(s, k + n0 * d, x + n0, n - n0), KMV_OK);
    for (size_t i = 0; i < 16; i++) {
        kmv_stats st;
        assert_int_equal(kmv_stream_decode(s, q + i * d, &y, &st), KMV_OK);
        check_step(k, n, d, x, 1, 1.0, q + i * d, &y, 0.1);
    }
    kmv_stream_info info;
    assert_int_equal(kmv_stream_get_info(s, &info), KMV_OK);
    double share = (double)info.tree_bytes / (double)(n * d * sizeof(float));
    print_message("tree at d = 64 over %zu keys (built at %zu): %zu bytes, %.1f%% of the keys\n",
                  info.tree_keys, n0, info.tree_bytes, 100.0 * share);
    assert_int_equal(info.tree_keys, n);
    assert_true(share > 0.0 && share <= 0.15);
    kmv_stream_free(s);
    kmv_ctx_free(ctx);
    free(k);
    free(q);
    free(x);
}

/* GloVe at sigma 1: the trial finds the certificate costs more than it
 * saves, and no tree is kept for the steps. */
static void test_glove_no_tree(void **state) {
    (void)state;
    kmv_array g;
    char err[256];
    if (rd_read("glove100d_first4096.npy", &g, err, sizeof err) != KMV_OK) fail_msg("GloVe: %s", err);
    float *x = malloc(g.rows * sizeof(float));
    dg_x(x, g.rows, DG_X_GAUSS, 11);
    kmv_ctx *ctx = make_ctx(1.0, KMV_BACKEND_AUTO, NULL, 0);
    kmv_stream *s;
    assert_int_equal(kmv_stream_create(ctx, g.cols, 1, &s), KMV_OK);
    assert_int_equal(kmv_stream_append_keys(s, g.data, x, g.rows), KMV_OK);
    for (size_t i = 0; i < 8; i++) {
        float y;
        kmv_stats st;
        assert_int_equal(kmv_stream_decode(s, g.data + 501 * i * g.cols, &y, &st), KMV_OK);
        kmv_stats_x sx;
        kmv_stats_get_x(&st, &sx);
        assert_true(sx.backend != KMV_BACKEND_TREE);
    }
    kmv_stream_info info;
    kmv_stream_get_info(s, &info);
    assert_true(info.tree_builds >= 1);
    assert_int_equal(info.tree_keys, 0);
    assert_int_equal(info.tree_bytes, 0);
    kmv_stream_free(s);
    kmv_ctx_free(ctx);
    kmv_array_free(&g);
    free(x);
}

/* Every allocation of the steps that build and use the tree failing in
 * turn: an error the caller sees (never a wrong answer, y untouched) or a
 * right answer without the tree; nothing leaks. A cap below the tree's
 * bytes: exact steps. */
static void test_allocation_failures(void **state) {
    (void)state;
    size_t n = 0, d = 0;
    float *k = zip(8, &n, &d);
    const size_t nk = 2500;
    float *x = malloc(nk * sizeof(float));
    dg_x(x, nk, DG_X_GAUSS, 13);
    int failures = 0, answered = 0;
    for (long fail_at = 1; fail_at < 600; fail_at++) {
        tu_alloc_state as = {0};
        kmv_allocator al = tu_allocator(&as);
        kmv_ctx *ctx = make_ctx(0.02, KMV_BACKEND_TREE, &al, 0);
        if (ctx == NULL) continue;
        kmv_stream *s;
        int rc = kmv_stream_create(ctx, d, 1, &s);
        if (rc == KMV_OK) {
            rc = kmv_stream_append_keys(s, k, x, nk);
            as.fail_at = as.calls + fail_at; /* the steps' allocations */
            for (size_t i = 0; rc == KMV_OK && i < 3; i++) {
                float y = 42.0f;
                rc = kmv_stream_decode(s, k + (nk + i) * d, &y, NULL);
                if (rc == KMV_OK) check_step(k, nk, d, x, 1, 0.02, k + (nk + i) * d, &y, 0.1);
                else assert_true(y == 42.0f);
            }
            answered += rc == KMV_OK;
            kmv_stream_free(s);
        }
        assert_true(rc == KMV_OK || rc == KMV_ENOMEM || rc == KMV_ELIMIT);
        failures += rc != KMV_OK;
        kmv_ctx_free(ctx);
        if (as.live != 0) fail_msg("allocation %ld failing leaks %ld blocks", fail_at, as.live);
        if (rc == KMV_OK && as.calls < as.fail_at) break;
    }
    print_message("allocation failures: %d errors, %d answered\n", failures, answered);
    assert_true(failures > 5);
    assert_true(answered > 5); /* a tree's allocation failing costs the tree only */
    /* the cap: room for the keys, not for a tree */
    kmv_ctx *ctx = make_ctx(0.02, KMV_BACKEND_TREE, NULL, 0);
    kmv_stream *s;
    assert_int_equal(kmv_stream_create(ctx, d, 1, &s), KMV_OK);
    assert_int_equal(kmv_stream_append_keys(s, k, x, nk), KMV_OK);
    kmv_stream_info info;
    kmv_stream_get_info(s, &info);
    size_t cap = info.bytes + 4096;
    kmv_stream_free(s);
    kmv_ctx_free(ctx);
    ctx = make_ctx(0.02, KMV_BACKEND_TREE, NULL, cap);
    assert_int_equal(kmv_stream_create(ctx, d, 1, &s), KMV_OK);
    assert_int_equal(kmv_stream_append_keys(s, k, x, nk), KMV_OK);
    for (size_t i = 0; i < 4; i++) {
        float y;
        kmv_stats st;
        assert_int_equal(kmv_stream_decode(s, k + (nk + i) * d, &y, &st), KMV_OK);
        check_step(k, nk, d, x, 1, 0.02, k + (nk + i) * d, &y, 0.1);
    }
    kmv_stream_get_info(s, &info);
    assert_int_equal(info.tree_keys, 0);
    assert_true(info.bytes <= cap);
    kmv_stream_free(s);
    kmv_ctx_free(ctx);
    free(k);
    free(x);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_steps_certified), cmocka_unit_test(test_history_free),
        cmocka_unit_test(test_adversarial),     cmocka_unit_test(test_glove_no_tree),
        cmocka_unit_test(test_memory),
        cmocka_unit_test(test_allocation_failures),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
