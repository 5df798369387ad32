/* Lemma 4.1's reduction (kmv_attention_lift): the identity between the
 * attention logit and the lifted Gaussian, normalized attention computed as
 * a ratio of two lifted Gaussian products, and the refusals. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

#include "tests/testutil.h"

#define D 12

static double sq(const float *v, size_t d) {
    double s = 0.0;
    for (size_t t = 0; t < d; t++) s += (double)v[t] * v[t];
    return s;
}

/* Keys of very different norms, so the extra coordinate matters. */
static float *keys_of_many_norms(size_t n, uint64_t seed) {
    float *k = tu_random(n * D, seed, 1.0f);
    for (size_t j = 0; j < n; j++)
        for (size_t t = 0; t < D; t++) k[j * D + t] *= (float)(0.2 + 3.0 * (double)j / (double)n);
    return k;
}

static void identity(void **state) {
    (void)state;
    size_t m = 30, n = 50;
    float *q = tu_random(m * D, 3, 1.5f), *k = keys_of_many_norms(n, 4);
    float *ql = malloc(m * (D + 1) * sizeof(float)), *kl = malloc(n * (D + 1) * sizeof(float));
    double alpha = kmv_max_sq_norm(k, n, D);
    assert_int_equal(kmv_attention_lift(q, m, D, 0, alpha, ql), KMV_OK);
    assert_int_equal(kmv_attention_lift(k, n, D, 1, alpha, kl), KMV_OK);
    const double scales[] = {0.0, 0.3, 2.0};
    for (size_t u = 0; u < 3; u++) {
        double s = scales[u] > 0 ? scales[u] : 1.0 / sqrt((double)D);
        double sigma = kmv_attention_sigma(scales[u], D);
        assert_true(fabs(sigma - 1.0 / sqrt(s)) < 1e-15 * sigma);
        for (size_t i = 0; i < m; i++) {
            assert_true(ql[i * (D + 1) + D] == 0.0f);
            for (size_t j = 0; j < n; j++) {
                double dot = 0.0, d2 = 0.0;
                for (size_t t = 0; t < D; t++) dot += (double)q[i * D + t] * k[j * D + t];
                for (size_t t = 0; t <= D; t++) {
                    double diff = (double)ql[i * (D + 1) + t] - kl[j * (D + 1) + t];
                    d2 += diff * diff;
                }
                /* log of both sides of the lemma */
                double lhs = s * dot;
                double rhs = s * (sq(q + i * D, D) + alpha) / 2.0 - d2 / (2.0 * sigma * sigma);
                assert_true(fabs(lhs - rhs) < 1e-5 * (1.0 + s * alpha));
            }
        }
    }
    /* The longest key is lifted by exactly 0; the others by their gap. */
    size_t longest = 0;
    for (size_t j = 0; j < n; j++)
        if (sq(k + j * D, D) == alpha) longest = j;
    assert_true(kl[longest * (D + 1) + D] == 0.0f);
    assert_true(kl[D] > 0.0f);
    free(q), free(k), free(ql), free(kl);
}

/* D^-1 A V equals diag(K' 1)^-1 K' V with K' the lifted Gaussian: the row
 * factor of the lemma cancels. Both sides from the exact engine. */
static void normalized_attention(void **state) {
    (void)state;
    size_t m = 40, n = 64, c = 3;
    float *q = tu_random(m * D, 5, 2.0f), *k = keys_of_many_norms(n, 6);
    float *v = tu_random(n * c, 7, 1.0f), *v1 = malloc(n * (c + 1) * sizeof(float));
    for (size_t j = 0; j < n; j++) {
        memcpy(v1 + j * (c + 1), v + j * c, c * sizeof(float));
        v1[j * (c + 1) + c] = 1.0f;
    }
    float *ql = malloc(m * (D + 1) * sizeof(float)), *kl = malloc(n * (D + 1) * sizeof(float));
    double alpha = kmv_max_sq_norm(k, n, D);
    assert_int_equal(kmv_attention_lift(q, m, D, 0, alpha, ql), KMV_OK);
    assert_int_equal(kmv_attention_lift(k, n, D, 1, alpha, kl), KMV_OK);
    kmv_params p;
    kmv_params_init(&p);
    p.exact = 1;
    p.sigma = kmv_attention_sigma(0.0, D);
    kmv_ctx *ctx = NULL;
    assert_int_equal(kmv_ctx_create(&p, &ctx), KMV_OK);
    float *o = malloc(m * c * sizeof(float)), *g = malloc(m * (c + 1) * sizeof(float));
    assert_int_equal(kmv_attention(ctx, q, m, k, n, D, v, c, o, NULL), KMV_OK);
    assert_int_equal(kmv_matvec(ctx, ql, m, kl, n, D + 1, v1, c + 1, g, NULL), KMV_OK);
    for (size_t i = 0; i < m; i++) {
        assert_true(g[i * (c + 1) + c] > 0.0f);
        for (size_t t = 0; t < c; t++) {
            double viaGauss = (double)g[i * (c + 1) + t] / g[i * (c + 1) + c];
            assert_true(fabs(viaGauss - o[i * c + t]) < 1e-4);
        }
    }
    kmv_ctx_free(ctx);
    free(q), free(k), free(v), free(v1), free(ql), free(kl), free(o), free(g);
}

static void refusals(void **state) {
    (void)state;
    float k[2 * D], out[2 * (D + 1)], keep[2 * (D + 1)];
    for (size_t t = 0; t < 2 * D; t++) k[t] = 0.5f;
    double alpha = kmv_max_sq_norm(k, 2, D);
    assert_true(alpha == 3.0);
    memset(out, 0x5a, sizeof out);
    memcpy(keep, out, sizeof out);
    /* A key past the bound: refused before anything is written. */
    assert_int_equal(kmv_attention_lift(k, 2, D, 1, alpha * 0.999, out), KMV_EINVAL);
    assert_memory_equal(out, keep, sizeof out);
    /* Queries are not bounded by alpha. */
    assert_int_equal(kmv_attention_lift(k, 2, D, 0, 0.0, out), KMV_OK);
    assert_int_equal(kmv_attention_lift(k, 2, D, 1, -1.0, out), KMV_EINVAL);
    assert_int_equal(kmv_attention_lift(k, 2, D, 1, NAN, out), KMV_EINVAL);
    assert_int_equal(kmv_attention_lift(k, 2, D, 1, INFINITY, out), KMV_EINVAL);
    assert_int_equal(kmv_attention_lift(k, 2, 0, 1, alpha, out), KMV_EINVAL);
    assert_int_equal(kmv_attention_lift(NULL, 2, D, 1, alpha, out), KMV_EINVAL);
    assert_int_equal(kmv_attention_lift(k, 2, D, 1, alpha, NULL), KMV_EINVAL);
    assert_int_equal(kmv_attention_lift(NULL, 0, D, 1, alpha, NULL), KMV_OK);
    assert_int_equal(kmv_attention_lift(k, SIZE_MAX / 2, D, 1, alpha, out), KMV_EOVERFLOW);
    k[5] = NAN;
    memcpy(keep, out, sizeof out);
    assert_int_equal(kmv_attention_lift(k, 2, D, 0, alpha, out), KMV_ENONFINITE);
    assert_memory_equal(out, keep, sizeof out);
    assert_true(kmv_max_sq_norm(NULL, 0, D) == 0.0);
    assert_true(kmv_attention_sigma(-1.0, D) == 0.0);
    assert_true(kmv_attention_sigma(NAN, D) == 0.0);
    assert_true(kmv_attention_sigma(1.0, 0) == 0.0);
    assert_true(kmv_attention_sigma(4.0, D) == 0.5);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(identity),
        cmocka_unit_test(normalized_attention),
        cmocka_unit_test(refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
