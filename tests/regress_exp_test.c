/* kmv_regress's EXP problem, min ||(exp(s A A^T) + ridge I) x - b||,
 * through the public API: against a float64 solve of the formed matrix
 * (LAPACKE_dposv), with ridge and without, with and without the Nystrom
 * preconditioner; iteration counts; the approximate engine against its
 * floor; overflow; determinism; allocation failure. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>
#include <lapacke.h>

#include "tests/datagen.h"
#include "tests/realdata.h"
#include "tests/testutil.h"

/* M = exp(s A A^T) + ridge I in float64, row-major n x n. */
static double *form_m(const float *a, size_t n, size_t d, double s, double ridge) {
    double *m = malloc(n * n * sizeof(double));
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < n; j++) {
            double dot = 0.0;
            for (size_t c = 0; c < d; c++) dot += (double)a[i * d + c] * (double)a[j * d + c];
            m[i * n + j] = exp(s * dot) + (i == j ? ridge : 0.0);
        }
    return m;
}

/* ||M x - b|| / ||b||. */
static double rel_residual(const double *m, size_t n, const double *x, const double *b) {
    double r2 = 0.0, b2 = 0.0;
    for (size_t i = 0; i < n; i++) {
        double y = 0.0;
        for (size_t j = 0; j < n; j++) y += m[i * n + j] * x[j];
        r2 += (y - b[i]) * (y - b[i]);
        b2 += b[i] * b[i];
    }
    return sqrt(r2 / b2);
}

/* x = M^-1 b by Cholesky (M positive definite). */
static double *dense_solve(const double *m, size_t n, const double *b) {
    double *mc = malloc(n * n * sizeof(double)), *x = malloc(n * sizeof(double));
    memcpy(mc, m, n * n * sizeof(double));
    memcpy(x, b, n * sizeof(double));
    lapack_int info = LAPACKE_dposv(LAPACK_ROW_MAJOR, 'U', (lapack_int)n, 1, mc, (lapack_int)n, x, 1);
    assert_int_equal(info, 0);
    free(mc);
    return x;
}

static double rel_diff(const double *x, const double *y, size_t n) {
    double d2 = 0.0, y2 = 0.0;
    for (size_t i = 0; i < n; i++) {
        d2 += (x[i] - y[i]) * (x[i] - y[i]);
        y2 += y[i] * y[i];
    }
    return sqrt(d2 / y2);
}

static double *gauss_b(size_t n, uint64_t seed) {
    double *b = malloc(n * sizeof(double));
    for (size_t i = 0; i < n; i++) b[i] = dg_normal(&seed);
    return b;
}

/* n points uniform in [-w, w]^d. */
static float *uniform_a(size_t n, size_t d, double w, uint64_t seed) {
    return tu_random(n * d, seed, (float)w);
}

/* n points on the sphere of radius rad in R^d: equal norms, so M's
 * diagonal scaling is one number and plain CG is plain. */
static float *sphere_a(size_t n, size_t d, double rad, uint64_t seed) {
    float *a = malloc(n * d * sizeof(float));
    for (size_t i = 0; i < n; i++) {
        double nr = 0.0, v[128];
        for (size_t c = 0; c < d; c++) {
            v[c] = dg_normal(&seed);
            nr += v[c] * v[c];
        }
        for (size_t c = 0; c < d; c++) a[i * d + c] = (float)(v[c] * rad / sqrt(nr));
    }
    return a;
}

static kmv_ctx *make_ctx(int exact, int threads) {
    kmv_params p;
    kmv_params_init(&p);
    p.exact = exact;
    p.n_threads = threads;
    kmv_ctx *ctx = NULL;
    assert_int_equal(kmv_ctx_create(&p, &ctx), KMV_OK);
    return ctx;
}

static kmv_regress_params exp_params(double scale, double ridge, double tol, int pre) {
    kmv_regress_params rp;
    kmv_regress_params_init(&rp);
    rp.problem = KMV_REGRESS_EXP;
    rp.scale = scale;
    rp.ridge = ridge;
    rp.tol = tol;
    rp.precondition = pre;
    return rp;
}

/* Solve with exact products, compare with the dense solve: the residual
 * kmv reports is the one the formed matrix gives, under tol, and x is the
 * dense solution to within cond(M) times that. */
static void check_exact(const float *a, size_t n, size_t d, double scale, double ridge,
                        double tol, double xtol, const char *what) {
    double s = scale > 0.0 ? scale : 1.0 / sqrt((double)d);
    double *m = form_m(a, n, d, s, ridge), *b = gauss_b(n, 7 + n);
    double *xref = dense_solve(m, n, b), *x = malloc(n * sizeof(double));
    kmv_ctx *ctx = make_ctx(1, 0);
    int its[2];
    for (int pre = 0; pre <= 1; pre++) {
        kmv_regress_params rp = exp_params(scale, ridge, tol, pre);
        kmv_regress_stats st;
        assert_int_equal(kmv_regress(ctx, &rp, a, n, d, b, n, x, &st), KMV_OK);
        double res = rel_residual(m, n, x, b), dx = rel_diff(x, xref, n);
        print_message("%s pre=%d: iterations %d residual %.2e (ours %.2e) dx %.2e sketch %zu "
                      "products %llu\n", what, pre, st.iterations, st.residual, res, dx,
                      st.sketch_rows, (unsigned long long)st.products);
        assert_true(st.converged);
        assert_true(st.residual >= 0.0 && st.residual <= tol);
        assert_true(res <= tol * 1.01);
        /* Both float64 evaluations, equal down to their own rounding. */
        assert_true(fabs(st.residual - res) <= 1e-3 * res + 1e-12);
        assert_true(dx <= xtol);
        assert_int_equal(st.approx_products, 0);
        assert_true(st.product_error == 0.0);
        assert_true(st.residual_optimal == 0.0);
        assert_true(pre ? st.sketch_rows > 0 : st.sketch_rows == 0);
        its[pre] = st.iterations;
    }
    (void)its;
    kmv_ctx_free(ctx);
    free(m), free(b), free(xref), free(x);
}

static void test_exact_ridge(void **state) {
    (void)state;
    float *a = uniform_a(400, 6, 1.0, 11);
    /* Norms vary, so the diagonal scaling spans e^{0..5}. */
    check_exact(a, 400, 6, 0.0, 0.1, 1e-8, 1e-6, "uniform ridge 0.1");
    check_exact(a, 400, 6, 0.0, 1e-4, 1e-6, 1e-3, "uniform ridge 1e-4");
    free(a);
}

static void test_exact_no_ridge(void **state) {
    (void)state;
    /* Distinct, well-spread rows: K is well-conditioned at s = 1. */
    float *a = uniform_a(300, 6, 2.0, 12);
    check_exact(a, 300, 6, 1.0, 0.0, 1e-8, 1e-6, "uniform no ridge");
    free(a);
}

static void test_default_tol(void **state) {
    (void)state;
    float *a = uniform_a(500, 8, 1.0, 13);
    check_exact(a, 500, 8, 0.0, 1e-2, 1e-6, 1e-4, "default tol");
    free(a);
}

/* Plain and preconditioned iterations on one problem; their counts. */
static void count_iterations(const float *a, size_t n, size_t d, double scale, double ridge,
                             const char *what, int *plain, int *pre) {
    double *b = gauss_b(n, 99), *x = malloc(n * sizeof(double));
    kmv_ctx *ctx = make_ctx(1, 0);
    for (int p = 0; p <= 1; p++) {
        kmv_regress_params rp = exp_params(scale, ridge, 1e-6, p);
        rp.max_iter = 5000;
        kmv_regress_stats st;
        assert_int_equal(kmv_regress(ctx, &rp, a, n, d, b, n, x, &st), KMV_OK);
        print_message("%s, %s: %d iterations, residual %.2e, %zu columns, %.2f s (%.2f s "
                      "building)\n", what, p ? "Nystrom" : "plain", st.iterations, st.residual,
                      st.sketch_rows, st.seconds, st.seconds_precond);
        assert_true(st.converged && st.residual <= 1e-6);
        *(p ? pre : plain) = st.iterations;
    }
    kmv_ctx_free(ctx);
    free(b), free(x);
}

/* An ill-conditioned kernel: 1000 points on the unit sphere in R^3 (equal
 * norms: the diagonal scaling is one number, so "plain" is plain CG) at
 * sigma = 0.25, four times their spacing, and ridge 1e-3 of the diagonal:
 * K's spectrum falls off fast and the Nystrom columns catch its head. */
static void test_precond_sphere(void **state) {
    (void)state;
    float *a = sphere_a(1000, 3, 1.0, 5);
    int plain, pre;
    count_iterations(a, 1000, 3, 16.0, 1e-3 * exp(16.0), "sphere sigma 0.25", &plain, &pre);
    assert_true(3 * pre <= plain);
    free(a);
}

/* GloVe rows (the shipped sample's first n) scaled to norm r so that
 * sigma = 1/sqrt(s) is the median distance over `sep` (s = 1/sqrt(100)). */
static float *glove_rows(size_t n, double sep, double *diag) {
    kmv_array g;
    char err[256];
    assert_int_equal(rd_read("glove100d_first4096.npy", &g, err, sizeof err), KMV_OK);
    size_t d = g.cols;
    float *a = malloc(n * d * sizeof(float));
    for (size_t i = 0; i < n; i++) {
        double nr = 0.0;
        for (size_t c = 0; c < d; c++) nr += (double)g.data[i * d + c] * g.data[i * d + c];
        for (size_t c = 0; c < d; c++) a[i * d + c] = (float)(g.data[i * d + c] / sqrt(nr));
    }
    double med = 0.0, s = 1.0 / sqrt((double)d);
    for (size_t i = 0; i < 64; i++) {
        double d2 = 0.0;
        for (size_t c = 0; c < d; c++) {
            double t = (double)a[i * d + c] - a[(i + 1) * d + c];
            d2 += t * t;
        }
        med += sqrt(d2) / 64.0;
    }
    double r = sep / (med * sqrt(s));
    for (size_t i = 0; i < n * d; i++) a[i] = (float)(a[i] * r);
    *diag = exp(s * r * r);
    kmv_array_free(&g);
    return a;
}

/* GloVe at sigma = the median distance: the target holds. Where sigma is
 * a third of it and the kernel is sparse, K is close to I, plain CG is
 * already quick and a low-rank preconditioner has nothing to take: the
 * counts are recorded, not asserted. */
static void test_precond_glove(void **state) {
    (void)state;
    double diag;
    int plain, pre;
    float *a = glove_rows(1024, 1.0, &diag);
    count_iterations(a, 1024, 100, 0.0, 1e-3 * diag, "GloVe 1024, sigma = median distance",
                     &plain, &pre);
    assert_true(3 * pre <= plain);
    free(a);
    a = glove_rows(1024, 3.0, &diag);
    count_iterations(a, 1024, 100, 0.0, 1e-3 * diag, "GloVe 1024, sigma = median / 3 (sparse)",
                     &plain, &pre);
    free(a);
}

/* The approximate engine (forced at this size, as the cost model would
 * choose it at larger ones) on clustered rows of equal norm: every
 * product approximate, product_error its eps, and the residual, checked
 * here in float64, within the floor that eps sets. */
static void test_approx_floor(void **state) {
    (void)state;
    size_t n = 1024, d = 32;
    float *a = malloc(n * d * sizeof(float));
    dg_sphere(a, n, NULL, 0, d, 4.0, 3);
    double ridge = 1e-3 * exp(16.0), *m = form_m(a, n, d, 1.0, ridge), *b = gauss_b(n, 5);
    double *x = malloc(n * sizeof(double));
    kmv_params p;
    kmv_params_init(&p);
    p.eps = 0.1;
    kmv_params_x px = tu_px(&p);
    px.force_approx = 1;
    assert_int_equal(kmv_params_set_x(&p, &px), KMV_OK);
    kmv_ctx *ctx = NULL;
    assert_int_equal(kmv_ctx_create(&p, &ctx), KMV_OK);
    kmv_regress_params rp = exp_params(1.0, ridge, 1e-6, 1);
    kmv_regress_stats st;
    assert_int_equal(kmv_regress(ctx, &rp, a, n, d, b, n, x, &st), KMV_OK);
    double res = rel_residual(m, n, x, b);
    print_message("approximate: %d iterations, %llu products (%d approximate), product_error "
                  "%.2g, residual %.2e (float64 check %.2e), converged %d\n", st.iterations,
                  (unsigned long long)st.products, st.approx_products, st.product_error,
                  st.residual, res, st.converged);
    assert_true(st.approx_products > 0 && (uint64_t)st.approx_products == st.products);
    assert_true(st.product_error == p.eps);
    assert_true(st.residual <= st.product_error);
    assert_true(fabs(st.residual - res) <= 1e-6 * res);
    assert_true(st.converged == (st.residual <= rp.tol));
    kmv_ctx_free(ctx);
    free(a), free(m), free(b), free(x);
}

/* Past double's range: a row with s ||a||^2 / 2 = 400 makes exp(s ||a||^2)
 * overflow; and an x that would underflow entirely. Both KMV_EOVERFLOW with
 * x untouched and the largest scaled norm reported. */
static void test_overflow(void **state) {
    (void)state;
    size_t n = 50, d = 3;
    float *a = sphere_a(n, d, 2.0, 9);
    double *b = gauss_b(n, 2), x[50];
    kmv_ctx *ctx = make_ctx(1, 0);
    kmv_regress_params rp = exp_params(1.0, 1.0, 1e-8, 1);
    kmv_regress_stats st;
    a[7 * d] = (float)sqrt(800.0), a[7 * d + 1] = a[7 * d + 2] = 0.0f;
    for (size_t i = 0; i < n; i++) x[i] = 42.0;
    assert_int_equal(kmv_regress(ctx, &rp, a, n, d, b, n, x, &st), KMV_EOVERFLOW);
    assert_true(fabs(st.log_scale_max - 400.0) < 1e-3);
    for (size_t i = 0; i < n; i++) assert_true(x[i] == 42.0);
    /* Just inside: s ||a||^2 / 2 = 354 keeps exp(s ||a||^2) a double. Every
     * row there, spaced far beyond sigma: x_i ~ b_i e^-708, which b ~ 1
     * leaves representable and b ~ 1e-300 does not. */
    free(a);
    a = sphere_a(n, d, sqrt(708.0), 9);
    rp.ridge = 0.0;
    assert_int_equal(kmv_regress(ctx, &rp, a, n, d, b, n, x, &st), KMV_OK);
    print_message("x ~ e^-708: residual %.2e, x[0] %.3e\n", st.residual, x[0]);
    assert_true(st.residual <= 1e-8 && fabs(st.log_scale_max - 354.0) < 1e-3);
    assert_true(fabs(x[0] - b[0] * exp(-708.0)) <= 1e-3 * fabs(b[0]) * exp(-708.0));
    for (size_t i = 0; i < n; i++) b[i] *= 1e-300, x[i] = 42.0;
    assert_int_equal(kmv_regress(ctx, &rp, a, n, d, b, n, x, &st), KMV_EOVERFLOW);
    for (size_t i = 0; i < n; i++) assert_true(x[i] == 42.0);
    kmv_ctx_free(ctx);
    free(a), free(b);
}

/* s outside [2^-40, 2^40]: the index takes A scaled by a power of two. */
static void test_extreme_scale(void **state) {
    (void)state;
    size_t n = 200, d = 4;
    for (int sgn = -1; sgn <= 1; sgn += 2) {
        float *a = uniform_a(n, d, 1.0, 21);
        for (size_t i = 0; i < n * d; i++) a[i] = ldexpf(a[i], -sgn * 25);
        check_exact(a, n, d, ldexp(1.0, sgn * 50), 0.01, 1e-8, 1e-5,
                    sgn > 0 ? "s = 2^50" : "s = 2^-50");
        free(a);
    }
}

/* Ridge 0 with a repeated row: M is singular, residual_optimal unknown
 * (-1); with b consistent CG still solves it. With ridge > 0, 0. */
static void test_duplicates(void **state) {
    (void)state;
    size_t n = 100, d = 3;
    float *a = uniform_a(n, d, 2.0, 23);
    memcpy(a + 40 * d, a + 10 * d, d * sizeof(float));
    a[40 * d] = -0.0f * a[40 * d] + a[10 * d]; /* the same values */
    double *b = gauss_b(n, 4), x[100];
    b[40] = b[10];
    kmv_ctx *ctx = make_ctx(1, 0);
    kmv_regress_params rp = exp_params(1.0, 0.0, 1e-6, 1);
    kmv_regress_stats st;
    assert_int_equal(kmv_regress(ctx, &rp, a, n, d, b, n, x, &st), KMV_OK);
    print_message("duplicate rows, ridge 0: residual %.2e\n", st.residual);
    assert_true(st.residual_optimal == -1.0);
    assert_true(st.residual <= 1e-6);
    rp.ridge = 0.5;
    assert_int_equal(kmv_regress(ctx, &rp, a, n, d, b, n, x, &st), KMV_OK);
    assert_true(st.residual_optimal == 0.0 && st.residual <= 1e-6);
    kmv_ctx_free(ctx);
    free(a), free(b);
}

/* b = 0: x = 0 at once. */
static void test_zero_b(void **state) {
    (void)state;
    float *a = uniform_a(20, 3, 1.0, 3);
    double b[20] = {0}, x[20];
    for (size_t i = 0; i < 20; i++) x[i] = 42.0;
    kmv_ctx *ctx = make_ctx(0, 0);
    kmv_regress_params rp = exp_params(0.0, 0.0, 1e-6, 1);
    kmv_regress_stats st;
    assert_int_equal(kmv_regress(ctx, &rp, a, 20, 3, b, 20, x, &st), KMV_OK);
    for (size_t i = 0; i < 20; i++) assert_true(x[i] == 0.0);
    assert_true(st.iterations == 0 && st.converged && st.residual == 0.0 && st.products == 0);
    kmv_ctx_free(ctx);
    free(a);
}

/* The history: one relative residual per iteration, relative to b across
 * the refinements, nothing written past the count. */
static void test_history(void **state) {
    (void)state;
    size_t n = 300, d = 4;
    float *a = uniform_a(n, d, 1.0, 31);
    double *b = gauss_b(n, 6), *x = malloc(n * sizeof(double)), hist[400];
    for (size_t i = 0; i < 400; i++) hist[i] = -7.0;
    kmv_ctx *ctx = make_ctx(1, 0);
    kmv_regress_params rp = exp_params(0.0, 1e-2, 1e-9, 1);
    rp.history = hist;
    rp.history_len = 400;
    kmv_regress_stats st;
    assert_int_equal(kmv_regress(ctx, &rp, a, n, d, b, n, x, &st), KMV_OK);
    assert_true(st.iterations > 0 && st.iterations < 400);
    for (int i = 0; i < st.iterations; i++) assert_true(hist[i] > 0.0 && isfinite(hist[i]));
    for (int i = st.iterations; i < 400; i++) assert_true(hist[i] == -7.0);
    /* The last solve's own estimate, relative to b, sits near the float64
     * residual (float32 products: within a decade). */
    print_message("history: last %.2e, residual %.2e\n", hist[st.iterations - 1], st.residual);
    assert_true(hist[st.iterations - 1] < 10.0 * st.residual + 1e-9);
    kmv_ctx_free(ctx);
    free(a), free(b), free(x);
}

/* Same inputs and seed, same x bit for bit, whatever the thread count;
 * exact and approximate products. */
static void test_determinism(void **state) {
    (void)state;
    size_t n = 600, d = 8;
    float *a = malloc(n * d * sizeof(float));
    dg_sphere(a, n, NULL, 0, d, 3.0, 8);
    double *b = gauss_b(n, 8), *x[3];
    for (int exact = 1; exact >= 0; exact--) {
        for (int k = 0; k < 3; k++) {
            kmv_params p;
            kmv_params_init(&p);
            p.exact = exact;
            p.n_threads = k == 2 ? 1 : 2;
            p.seed = 77;
            kmv_params_x px = tu_px(&p);
            px.force_approx = !exact;
            assert_int_equal(kmv_params_set_x(&p, &px), KMV_OK);
            kmv_ctx *ctx = NULL;
            assert_int_equal(kmv_ctx_create(&p, &ctx), KMV_OK);
            kmv_regress_params rp = exp_params(0.5, 1e-2, 1e-6, 1);
            rp.max_iter = 100;
            kmv_regress_stats st;
            x[k] = malloc(n * sizeof(double));
            assert_int_equal(kmv_regress(ctx, &rp, a, n, d, b, n, x[k], &st), KMV_OK);
            assert_true(exact ? st.approx_products == 0 : st.approx_products > 0);
            kmv_ctx_free(ctx);
        }
        assert_memory_equal(x[0], x[1], n * sizeof(double));
        assert_memory_equal(x[0], x[2], n * sizeof(double));
        for (int k = 0; k < 3; k++) free(x[k]);
    }
    free(a), free(b);
}

/* Every allocation of a call failing in turn: KMV_ENOMEM, x untouched,
 * nothing leaked; and the memory cap: KMV_ELIMIT. */
static int call_exp(const kmv_allocator *al, int pre, double ridge, size_t cap) {
    size_t n = 64, d = 4;
    /* Spread out, so that K is near I and few products (each allocates)
     * are needed even without the preconditioner. */
    float *a = uniform_a(n, d, 4.0, 41);
    double *b = gauss_b(n, 41), x[64];
    kmv_params p;
    kmv_params_init(&p);
    p.exact = 1;
    p.n_threads = 1; /* the failing allocator counts without atomics */
    p.allocator = *al;
    p.max_bytes = cap;
    kmv_ctx *ctx = NULL;
    int rc = kmv_ctx_create(&p, &ctx);
    if (rc == KMV_OK) {
        kmv_regress_params rp = exp_params(1.0, ridge, 1e-6, pre);
        rp.sketch_rows = 16;
        for (size_t i = 0; i < n; i++) x[i] = 42.0;
        rc = kmv_regress(ctx, &rp, a, n, d, b, n, x, NULL);
        for (size_t i = 0; rc != KMV_OK && i < n; i++) assert_true(x[i] == 42.0);
    }
    kmv_ctx_free(ctx);
    free(a), free(b);
    return rc;
}

static void test_alloc_failures(void **state) {
    (void)state;
    for (int v = 0; v < 3; v++) {
        int pre = v != 1;
        double ridge = v == 2 ? 0.1 : 0.0;
        long k;
        for (k = 1; k < 10000; k++) {
            tu_alloc_state st = {0, 0, k};
            kmv_allocator al = tu_allocator(&st);
            int rc = call_exp(&al, pre, ridge, 0);
            if (st.live != 0) fail_msg("%ld blocks leaked when allocation %ld failed", st.live, k);
            if (rc == KMV_OK) {
                assert_true(st.calls < k);
                break;
            }
            if (rc != KMV_ENOMEM) fail_msg("allocation %ld failed: %s", k, kmv_errname(rc));
        }
        print_message("variant %d: %ld allocations walked\n", v, k - 1);
        assert_true(k > 5);
    }
    tu_alloc_state st = {0, 0, 0};
    kmv_allocator al = tu_allocator(&st);
    assert_int_equal(call_exp(&al, 1, 0.1, 4096), KMV_ELIMIT);
    assert_int_equal(st.live, 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_exact_ridge),
        cmocka_unit_test(test_exact_no_ridge),
        cmocka_unit_test(test_default_tol),
        cmocka_unit_test(test_precond_sphere),
        cmocka_unit_test(test_precond_glove),
        cmocka_unit_test(test_approx_floor),
        cmocka_unit_test(test_overflow),
        cmocka_unit_test(test_extreme_scale),
        cmocka_unit_test(test_duplicates),
        cmocka_unit_test(test_zero_b),
        cmocka_unit_test(test_history),
        cmocka_unit_test(test_determinism),
        cmocka_unit_test(test_alloc_failures),
    };
    return cmocka_run_group_tests_name("regress_exp", tests, NULL, NULL);
}
