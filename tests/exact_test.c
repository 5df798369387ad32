/* The exact engine against a float64 reference: both kernels, vector and
 * matrix x, causal and not, edge shapes, large logits, real GloVe rows. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "kmv/kmv.h"
#include "tests/testutil.h"

#define GLOVE "data/glove100d_first4096.npy"

/* The documented bound: 1e-5 relative to the float64 sum of |terms|. */
#define TOL 1e-5

typedef struct shape {
    size_t m, n, d, c;
} shape;

static kmv_ctx *make_ctx(int exact, double sigma, double scale, int causal, int threads) {
    kmv_params p;
    kmv_params_init(&p);
    p.exact = exact;
    p.sigma = sigma;
    p.attn_scale = scale;
    p.causal = causal;
    p.n_threads = threads;
    kmv_ctx *ctx = NULL;
    assert_int_equal(kmv_ctx_create(&p, &ctx), KMV_OK);
    return ctx;
}

/* Runs one product and checks every entry against the reference; returns the
 * worst error as a fraction of the bound, for messages. */
static double check_one(int attn, const float *q, const float *k, const float *x, shape s,
                        double sigma, double scale, int causal, int threads) {
    kmv_ctx *ctx = make_ctx(1, sigma, scale, causal, threads);
    float *y = malloc(s.m * s.c * sizeof(float) + 1);
    double *ref = malloc(s.m * s.c * sizeof(double) + 1);
    double *mag = malloc(s.m * s.c * sizeof(double) + 1);
    kmv_stats st;
    int rc = attn ? kmv_attention(ctx, q, s.m, k, s.n, s.d, x, s.c, y, &st)
                  : kmv_matvec(ctx, q, s.m, k, s.n, s.d, x, s.c, y, &st);
    assert_int_equal(rc, KMV_OK);
    assert_int_equal(st.mode, KMV_MODE_EXACT);
    assert_int_equal(st.n_queries, s.m);
    assert_int_equal(st.n_keys, s.n);
    if (attn) {
        double sc = scale > 0 ? scale : 1.0 / sqrt((double)s.d);
        tu_ref_attn(q, s.m, k, s.n, s.d, x, s.c, sc, causal, ref, mag);
    } else {
        tu_ref_gauss(q, s.m, k, s.n, s.d, x, s.c, sigma, causal, ref, mag);
    }
    double worst = 0.0;
    for (size_t i = 0; i < s.m * s.c; i++) {
        double err = fabs((double)y[i] - ref[i]);
        double bound = TOL * mag[i] + 1e-30;
        if (!(err <= bound)) {
            fail_msg("%s m=%zu n=%zu d=%zu c=%zu causal=%d entry %zu: got %.9g want %.9g "
                     "(|err| %.3g > bound %.3g)",
                     attn ? "attention" : "gauss", s.m, s.n, s.d, s.c, causal, i, (double)y[i],
                     ref[i], err, bound);
        }
        if (err / bound > worst) worst = err / bound;
    }
    free(y);
    free(ref);
    free(mag);
    kmv_ctx_free(ctx);
    return worst;
}

static const shape SHAPES[] = {
    {1, 1, 1, 1},     {1, 300, 8, 1},  {300, 1, 8, 1},   {7, 5, 1, 3},     {200, 700, 16, 1},
    {130, 513, 33, 4}, {257, 257, 64, 8}, {64, 1000, 3, 2}, {1000, 64, 5, 1}, {33, 31, 128, 1},
    {1200, 600, 5, 3}, /* causal with m > n, columns, several key blocks */
};

static void run_random(int attn, int causal) {
    for (size_t t = 0; t < sizeof SHAPES / sizeof SHAPES[0]; t++) {
        shape s = SHAPES[t];
        float *q = tu_random(s.m * s.d, 11 + t, 1.0f);
        float *k = tu_random(s.n * s.d, 23 + t, 1.0f);
        float *x = tu_random(s.n * s.c, 37 + t, 3.0f);
        /* Bandwidths near the data's spread so kernel values range widely. */
        double sigma = 0.3 * sqrt((double)s.d);
        check_one(attn, q, k, x, s, sigma, 0.0, causal, 0);
        check_one(attn, q, k, x, s, sigma, 0.0, causal, 1);
        free(q);
        free(k);
        free(x);
    }
}

static void test_gauss_random(void **state) {
    (void)state;
    run_random(0, 0);
}

static void test_gauss_random_causal(void **state) {
    (void)state;
    run_random(0, 1);
}

static void test_attn_random(void **state) {
    (void)state;
    run_random(1, 0);
}

static void test_attn_random_causal(void **state) {
    (void)state;
    run_random(1, 1);
}

/* Far from the origin, ||q||^2 + ||k||^2 - 2<q,k> cancels badly in float;
 * the engine centres the keys, so the bound still holds. */
static void test_gauss_offset_data(void **state) {
    (void)state;
    shape s = {150, 400, 32, 2};
    float *q = tu_random(s.m * s.d, 5, 0.5f);
    float *k = tu_random(s.n * s.d, 6, 0.5f);
    float *x = tu_random(s.n * s.c, 7, 1.0f);
    for (size_t i = 0; i < s.m * s.d; i++) q[i] += 100.0f;
    for (size_t i = 0; i < s.n * s.d; i++) k[i] += 100.0f;
    check_one(0, q, k, x, s, 1.0, 0.0, 0, 0);
    free(q);
    free(k);
    free(x);
}

/* Logits of size 1e4 would overflow exp many times over without the
 * running maximum; the result must be finite and match the reference. */
static void test_attn_huge_logits(void **state) {
    (void)state;
    shape s = {100, 600, 16, 3};
    float *q = tu_random(s.m * s.d, 8, 30.0f);
    float *k = tu_random(s.n * s.d, 9, 30.0f);
    float *v = tu_random(s.n * s.c, 10, 1.0f);
    for (int causal = 0; causal <= 1; causal++) {
        kmv_ctx *ctx = make_ctx(1, 1.0, 2.0, causal, 0);
        float *o = malloc(s.m * s.c * sizeof(float));
        assert_int_equal(kmv_attention(ctx, q, s.m, k, s.n, s.d, v, s.c, o, NULL), KMV_OK);
        for (size_t i = 0; i < s.m * s.c; i++) assert_true(isfinite(o[i]));
        free(o);
        kmv_ctx_free(ctx);
        check_one(1, q, k, v, s, 1.0, 2.0, causal, 0);
    }
    free(q);
    free(k);
    free(v);
}

/* The thread count must not change a single bit of the output. */
static void test_threads_bitwise(void **state) {
    (void)state;
    shape s = {700, 900, 24, 1};
    float *q = tu_random(s.m * s.d, 1, 1.0f);
    float *k = tu_random(s.n * s.d, 2, 1.0f);
    float *x = tu_random(s.n * 3, 3, 1.0f);
    /* Every path: both kernels, vector and columns, causal or not, and the
     * Gaussian's float32 (sigma 1.5) and float64 (sigma 0.3) dot products. */
    for (int run = 0; run < 16; run++) {
        size_t c = (run & 1) ? 3 : 1;
        int attn = (run >> 1) & 1, causal = (run >> 2) & 1;
        double sigma = (run >> 3) ? 0.3 : 1.5;
        {
            float *y1 = malloc(s.m * c * sizeof(float));
            float *y2 = malloc(s.m * c * sizeof(float));
            kmv_ctx *c1 = make_ctx(1, sigma, 0.0, causal, 1);
            kmv_ctx *c2 = make_ctx(1, sigma, 0.0, causal, 2);
            int r1 = attn ? kmv_attention(c1, q, s.m, k, s.n, s.d, x, c, y1, NULL)
                          : kmv_matvec(c1, q, s.m, k, s.n, s.d, x, c, y1, NULL);
            int r2 = attn ? kmv_attention(c2, q, s.m, k, s.n, s.d, x, c, y2, NULL)
                          : kmv_matvec(c2, q, s.m, k, s.n, s.d, x, c, y2, NULL);
            assert_int_equal(r1, KMV_OK);
            assert_int_equal(r2, KMV_OK);
            assert_memory_equal(y1, y2, s.m * c * sizeof(float));
            kmv_ctx_free(c1);
            kmv_ctx_free(c2);
            free(y1);
            free(y2);
        }
    }
    free(q);
    free(k);
    free(x);
}

/* Inputs at the edges of float's range: a clear refusal or the right
 * finite answer, never NaN or infinity. */
static void test_extreme_values(void **state) {
    (void)state;
    kmv_ctx *ctx = make_ctx(1, 1.0, 0.0, 0, 0);
    float y[2] = {7, 7};
    /* Dot products of 1e40 would overflow float: refused. */
    float q1[1] = {1e20f}, k2[2] = {1e20f, 1.0f}, v2[2] = {1, 2};
    assert_int_equal(kmv_attention(ctx, q1, 1, k2, 2, 1, v2, 1, y, NULL), KMV_EOVERFLOW);
    kmv_ctx_free(ctx);
    /* A scale beyond float's range: refused too. */
    float q2[2] = {2, 1};
    ctx = make_ctx(1, 1.0, 1e39, 0, 0);
    assert_int_equal(kmv_attention(ctx, q2, 2, q2, 2, 1, v2, 1, y, NULL), KMV_EOVERFLOW);
    kmv_ctx_free(ctx);
    /* Large but representable logits are answered, finite and right. */
    ctx = make_ctx(1, 1.0, 1e30, 0, 0);
    assert_int_equal(kmv_attention(ctx, q2, 2, q2, 2, 1, v2, 1, y, NULL), KMV_OK);
    assert_true(y[0] == 1.0f && y[1] == 1.0f); /* both rows pick key 0 */
    kmv_ctx_free(ctx);

    /* Gaussian: a bandwidth so narrow that 1/(2 sigma^2) is no float. */
    float qa[1] = {0.5f}, ka[2] = {0.5f, 0.7f}, ones[2] = {1, 1};
    ctx = make_ctx(1, 1e-20, 0.0, 0, 0);
    assert_int_equal(kmv_matvec(ctx, qa, 1, ka, 2, 1, ones, 1, y, NULL), KMV_OK);
    assert_true(y[0] == 1.0f);
    kmv_ctx_free(ctx);
    /* Coordinates whose squares are no float, with huge and unit sigma. */
    float qb[1] = {1e20f}, kb[2] = {1e20f, -1e20f};
    ctx = make_ctx(1, 1e30, 0.0, 0, 0);
    assert_int_equal(kmv_matvec(ctx, qb, 1, kb, 2, 1, ones, 1, y, NULL), KMV_OK);
    assert_true(fabsf(y[0] - 2.0f) < 1e-6f);
    kmv_ctx_free(ctx);
    ctx = make_ctx(1, 1.0, 0.0, 0, 0);
    assert_int_equal(kmv_matvec(ctx, qb, 1, kb, 2, 1, ones, 1, y, NULL), KMV_OK);
    assert_true(y[0] == 1.0f);
    kmv_ctx_free(ctx);
}

static void test_glove(void **state) {
    (void)state;
    kmv_array a;
    char err[256];
    assert_int_equal(kmv_npy_read(GLOVE, NULL, &a, err, sizeof err), KMV_OK);
    assert_int_equal(a.cols, 100);
    /* Keys: 1,024 words; queries: the next 256, then keys = queries for the
     * causal self-attention case. sigma = 1 is sparse, sigma = 3 dense. */
    size_t n = 1024, m = 256, d = a.cols;
    const float *k = a.data, *q = a.data + n * d;
    float *x = tu_random(n * 8, 99, 1.0f);
    double sigmas[] = {1.0, 3.0};
    for (int si = 0; si < 2; si++) {
        check_one(0, q, k, x, (shape){m, n, d, 1}, sigmas[si], 0.0, 0, 0);
        check_one(0, q, k, x, (shape){m, n, d, 8}, sigmas[si], 0.0, 0, 0);
    }
    /* sigma = 1 on norms near 6 is where float dot products would cost
     * 1e-5: the engine must have switched to float64 ones; at sigma = 3 the
     * float path is accurate enough and must be kept. */
    kmv_ctx *ctx = make_ctx(1, 1.0, 0.0, 0, 0);
    kmv_stats st;
    float *y = malloc(m * sizeof(float));
    assert_int_equal(kmv_matvec(ctx, q, m, k, n, d, x, 1, y, &st), KMV_OK);
    assert_int_equal(st.wide_dots, 1);
    kmv_ctx_free(ctx);
    ctx = make_ctx(1, 3.0, 0.0, 0, 0);
    assert_int_equal(kmv_matvec(ctx, q, m, k, n, d, x, 1, y, &st), KMV_OK);
    assert_int_equal(st.wide_dots, 0);
    kmv_ctx_free(ctx);
    free(y);
    check_one(1, q, k, x, (shape){m, n, d, 1}, 1.0, 0.0, 0, 0);
    check_one(1, k, k, x, (shape){n, n, d, 8}, 1.0, 0.0, 1, 0);
    check_one(0, k, k, x, (shape){n, n, d, 1}, 1.0, 0.0, 1, 0);
    free(x);
    kmv_array_free(&a);
}

/* Empty inputs are well defined (documented in kmv.h): no queries or no
 * columns give an empty result, no keys give y = 0 for the Gaussian product
 * and KMV_EEMPTY for attention, dim = 0 is invalid. */
static void test_empty_inputs(void **state) {
    (void)state;
    kmv_ctx *ctx = make_ctx(1, 1.0, 0.0, 0, 0);
    float q[4] = {1, 2, 3, 4}, k[4] = {1, 2, 3, 4}, x[2] = {1, 1};
    float y[4] = {7, 7, 7, 7};
    kmv_stats st;
    assert_int_equal(kmv_matvec(ctx, NULL, 0, k, 2, 2, x, 1, NULL, &st), KMV_OK);
    assert_int_equal(st.n_queries, 0);
    assert_int_equal(kmv_matvec(ctx, q, 2, k, 2, 2, x, 0, y, NULL), KMV_OK);
    assert_true(y[0] == 7.0f);
    assert_int_equal(kmv_matvec(ctx, q, 2, NULL, 0, 2, NULL, 1, y, &st), KMV_OK);
    assert_true(y[0] == 0.0f && y[1] == 0.0f && y[2] == 7.0f);
    assert_int_equal(st.kernel_evals, 0);
    assert_int_equal(kmv_attention(ctx, q, 2, NULL, 0, 2, NULL, 1, y, NULL), KMV_EEMPTY);
    assert_int_equal(kmv_attention(ctx, NULL, 0, k, 2, 2, x, 1, NULL, NULL), KMV_OK);
    assert_int_equal(kmv_matvec(ctx, q, 2, k, 2, 0, x, 1, y, NULL), KMV_EINVAL);
    assert_int_equal(kmv_attention(ctx, q, 2, k, 2, 0, x, 1, y, NULL), KMV_EINVAL);
    kmv_ctx_free(ctx);
}

/* A matrix x of c columns must equal c separate vector products. */
static void test_columns_match_vectors(void **state) {
    (void)state;
    shape s = {90, 333, 12, 5};
    float *q = tu_random(s.m * s.d, 41, 1.0f);
    float *k = tu_random(s.n * s.d, 42, 1.0f);
    float *x = tu_random(s.n * s.c, 43, 1.0f);
    float *col = malloc(s.n * sizeof(float));
    float *y = malloc(s.m * s.c * sizeof(float)), *yc = malloc(s.m * sizeof(float));
    double *ref = malloc(s.m * s.c * sizeof(double)), *mag = malloc(s.m * s.c * sizeof(double));
    for (int attn = 0; attn <= 1; attn++) {
        /* The two paths round differently (a fused sum for a vector, a GEMM
         * for columns): each is held to the documented bound. */
        if (attn)
            tu_ref_attn(q, s.m, k, s.n, s.d, x, s.c, 1.0 / sqrt((double)s.d), 1, ref, mag);
        else
            tu_ref_gauss(q, s.m, k, s.n, s.d, x, s.c, 1.2, 0, ref, mag);
        kmv_ctx *ctx = make_ctx(1, 1.2, 0.0, attn, 0);
        assert_int_equal(attn ? kmv_attention(ctx, q, s.m, k, s.n, s.d, x, s.c, y, NULL)
                              : kmv_matvec(ctx, q, s.m, k, s.n, s.d, x, s.c, y, NULL),
                         KMV_OK);
        for (size_t t = 0; t < s.c; t++) {
            for (size_t j = 0; j < s.n; j++) col[j] = x[j * s.c + t];
            assert_int_equal(attn ? kmv_attention(ctx, q, s.m, k, s.n, s.d, col, 1, yc, NULL)
                                  : kmv_matvec(ctx, q, s.m, k, s.n, s.d, col, 1, yc, NULL),
                             KMV_OK);
            for (size_t i = 0; i < s.m; i++)
                assert_true(fabs((double)yc[i] - y[i * s.c + t]) <= 2 * TOL * mag[i * s.c + t]);
        }
        kmv_ctx_free(ctx);
    }
    free(q);
    free(k);
    free(x);
    free(col);
    free(y);
    free(yc);
    free(ref);
    free(mag);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gauss_random),      cmocka_unit_test(test_gauss_random_causal),
        cmocka_unit_test(test_attn_random),       cmocka_unit_test(test_attn_random_causal),
        cmocka_unit_test(test_gauss_offset_data), cmocka_unit_test(test_attn_huge_logits),
        cmocka_unit_test(test_threads_bitwise),   cmocka_unit_test(test_glove),
        cmocka_unit_test(test_extreme_values),
        cmocka_unit_test(test_empty_inputs),      cmocka_unit_test(test_columns_match_vectors),
    };
    return cmocka_run_group_tests_name("exact", tests, NULL, NULL);
}
