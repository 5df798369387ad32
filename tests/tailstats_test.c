/* kmv_tail_stats: Assumption A's statistics against a brute force that
 * holds and sorts all n^2 entries, including matrices whose entries all
 * underflow, under several thread counts, and the refusals. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

#include "tests/testutil.h"

static int desc(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x < y) - (x > y);
}

/* The statistics from every log-entry, sorted: the definition itself. */
static kmv_tail_stats brute(const float *q, const float *k, size_t n, size_t d, double sigma) {
    double *l = malloc(n * n * sizeof(double));
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < n; j++) {
            double d2 = 0.0;
            for (size_t t = 0; t < d; t++) {
                double diff = (double)q[i * d + t] - k[j * d + t];
                d2 += diff * diff;
            }
            l[i * n + j] = -d2 / (2.0 * sigma * sigma);
        }
    qsort(l, n * n, sizeof(double), desc);
    double a = 0.0, all = 0.0;
    for (size_t r = 0; r < n * n; r++) {
        double e = exp(l[r] - l[0]);
        all += e;
        if (r < n) a += e;
    }
    kmv_tail_stats s = {(all - a) / a, exp(l[n - 1] - l[n]), exp(l[n - 1] - l[2 * n - 1])};
    free(l);
    return s;
}

static void close_to(double got, double want, double tol) {
    if (isinf(want) && got == want) return;
    if (!(fabs(got - want) <= tol * fabs(want))) fail_msg("got %.12g, want %.12g", got, want);
}

static void check(size_t n, size_t d, double sigma, float amp, uint64_t seed, int threads) {
    float *q = tu_random(n * d, seed, amp), *k = tu_random(n * d, seed + 100, amp);
    kmv_params p;
    kmv_params_init(&p);
    p.sigma = sigma;
    p.n_threads = threads;
    kmv_ctx *ctx = NULL;
    assert_int_equal(kmv_ctx_create(&p, &ctx), KMV_OK);
    kmv_tail_stats got;
    assert_int_equal(kmv_tail_stats_compute(ctx, q, k, n, d, &got), KMV_OK);
    kmv_tail_stats want = brute(q, k, n, d, sigma);
    /* Double arithmetic in both; the brute force takes differences, the
     * library dot products: ~1e-16 of the norms, over 2 sigma^2. */
    double tol = 1e-8;
    close_to(got.c, want.c, tol);
    close_to(got.ratio_next, want.ratio_next, tol);
    close_to(got.ratio_double, want.ratio_double, tol);
    kmv_ctx_free(ctx);
    free(q), free(k);
}

static void matches_brute_force(void **state) {
    (void)state;
    for (uint64_t seed = 1; seed <= 6; seed++) {
        for (int threads = 1; threads <= 3; threads++) {
            check(2, 3, 1.0, 1.0f, seed, threads);
            check(37, 4, 0.5, 1.0f, seed, threads);
            check(100, 8, 1.5, 1.0f, seed, threads);
        }
    }
}

/* sigma so small that exp of every entry but the best is 0 in double: the
 * log domain still gives the right (huge) ratios and c. */
static void underflow(void **state) {
    (void)state;
    check(40, 3, 2e-3, 1.0f, 9, 2);
    float q[8] = {0, 0, 10, 0, 20, 0, 30, 0};
    kmv_params p;
    kmv_params_init(&p);
    p.sigma = 0.01;
    kmv_ctx *ctx = NULL;
    assert_int_equal(kmv_ctx_create(&p, &ctx), KMV_OK);
    kmv_tail_stats s;
    /* Keys = queries: the four diagonal entries are 1, everything else
     * exp(-5e5) or less; c is 0 to double precision, the ratio to the
     * (n+1)-th is past double's range. */
    assert_int_equal(kmv_tail_stats_compute(ctx, q, q, 4, 2, &s), KMV_OK);
    assert_true(s.c >= 0.0 && s.c < 1e-300);
    assert_true(isinf(s.ratio_next) && isinf(s.ratio_double));
    kmv_ctx_free(ctx);
}

static void refusals(void **state) {
    (void)state;
    float q[12] = {0};
    kmv_params p;
    kmv_params_init(&p);
    kmv_ctx *ctx = NULL;
    assert_int_equal(kmv_ctx_create(&p, &ctx), KMV_OK);
    kmv_tail_stats s;
    assert_int_equal(kmv_tail_stats_compute(ctx, q, q, 1, 3, &s), KMV_EEMPTY);
    assert_int_equal(kmv_tail_stats_compute(NULL, q, q, 4, 3, &s), KMV_EINVAL);
    assert_int_equal(kmv_tail_stats_compute(ctx, NULL, q, 4, 3, &s), KMV_EINVAL);
    assert_int_equal(kmv_tail_stats_compute(ctx, q, q, 4, 3, NULL), KMV_EINVAL);
    assert_int_equal(kmv_tail_stats_compute(ctx, q, q, 4, 0, &s), KMV_EINVAL);
    assert_int_equal(kmv_tail_stats_compute(ctx, q, q, SIZE_MAX / 4, 3, &s), KMV_EOVERFLOW);
    q[7] = INFINITY;
    assert_int_equal(kmv_tail_stats_compute(ctx, q, q, 4, 3, &s), KMV_ENONFINITE);
    kmv_ctx_free(ctx);

    /* Memory: a cap below what it needs, and every allocation failing in
     * turn, with nothing leaked. */
    float *r = tu_random(64 * 4, 1, 1.0f);
    p.max_bytes = 256;
    assert_int_equal(kmv_ctx_create(&p, &ctx), KMV_OK);
    assert_int_equal(kmv_tail_stats_compute(ctx, r, r, 64, 4, &s), KMV_ELIMIT);
    kmv_ctx_free(ctx);
    p.max_bytes = 0;
    for (long at = 1;; at++) {
        tu_alloc_state st = {0, 0, 0};
        p.allocator = tu_allocator(&st);
        assert_int_equal(kmv_ctx_create(&p, &ctx), KMV_OK);
        st.fail_at = st.calls + at;
        long before = st.live;
        int rc = kmv_tail_stats_compute(ctx, r, r, 64, 4, &s);
        assert_int_equal(st.live, before);
        kmv_ctx_free(ctx);
        if (rc == KMV_OK) {
            assert_true(at > 2);
            break;
        }
        assert_int_equal(rc, KMV_ENOMEM);
    }
    free(r);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(matches_brute_force),
        cmocka_unit_test(underflow),
        cmocka_unit_test(refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
