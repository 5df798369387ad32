#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
/* The x^2-grouped kernel-density sketch (algo/sketch.h) against direct
 * computations: group membership and rounded weights, the running Wbar,
 * add/pop undoing each other, what a draw returns (ids, gathered rows,
 * scale, determinism in the seed, w_below), allocation failures, and a
 * statistical check that the estimator is unbiased for
 * sum_j xbar_j^2 f(j) and draws each key with probability
 * xbar_j^2 / Wbar.
 *
 * The statistical checks run a fixed list of seeds, so they are
 * deterministic; their tolerances are set so that a correct sketch fails
 * them with probability below 1e-6 (were the seeds random), while the
 * likely mistakes (weights not rounded, draws not weighted) miss them by
 * a wide margin, which the test asserts too. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/alloc.h"
#include "algo/keystore.h"
#include "algo/sketch.h"
#include "tests/datagen.h"
#include "tests/testutil.h"

/* Weights exp(U(lo, hi)): spread over many groups. */
static double *log_uniform(size_t n, double lo, double hi, uint64_t seed) {
    double *w = malloc(n * sizeof(double));
    uint64_t s = seed;
    for (size_t j = 0; j < n; j++) w[j] = exp(lo + (hi - lo) * dg_unit(&s));
    return w;
}

/* A store of n random keys of dimension d, ids 0..n-1. */
static void make_store(kmv__keystore *ks, const kmv_allocator *a, size_t n, size_t d,
                       uint64_t seed, float **keys_out) {
    float *k = tu_random(n * d, seed, 1.0f);
    kmv__keystore_init(ks, d, seed + 1);
    assert_int_equal(kmv__keystore_append(ks, a, k, n), KMV_OK);
    if (keys_out) *keys_out = k;
    else free(k);
}

static void fill(kmv__sketch *sk, const kmv_allocator *a, const double *w, size_t n) {
    for (size_t j = 0; j < n; j++) assert_int_equal(kmv__sketch_add(sk, a, (uint32_t)j, w[j]), KMV_OK);
}

/* The group holding id (index into sk->g), or fails. */
static size_t group_of(const kmv__sketch *sk, uint32_t id) {
    size_t found = SIZE_MAX;
    for (size_t b = 0; b < sk->ng; b++)
        for (size_t u = 0; u < sk->g[b].len; u++)
            if (sk->g[b].ids[u] == id) {
                if (found != SIZE_MAX) fail_msg("id %u in two groups", id);
                found = b;
            }
    if (found == SIZE_MAX) fail_msg("id %u in no group", id);
    return found;
}

/* Sum over groups of |B_m| xbar_m^2, optionally only those whose lower
 * edge is below w_below (what the header says a draw samples from). */
static double mass(const kmv__sketch *sk, double w_below, double eps) {
    double t = 0.0;
    for (size_t b = 0; b < sk->ng; b++)
        if (sk->g[b].wround / (1.0 + eps) < w_below) t += (double)sk->g[b].len * sk->g[b].wround;
    return t;
}

static void rel_close(double got, double want, double tol, const char *what) {
    if (!(fabs(got - want) <= tol * fabs(want)))
        fail_msg("%s: got %.17g, want %.17g", what, got, want);
}

/* Every key lands in exactly one group whose range ((1+eps)^(m-1),
 * (1+eps)^m] holds its weight, groups are sorted by m with wround =
 * (1+eps)^m, and Wbar is the sum of the rounded weights (so between the
 * sum of the weights and 1 + eps times it). */
static void check_groups(double eps, const double *w, size_t n) {
    tu_alloc_state st = {0, 0, 0};
    kmv_allocator a = tu_allocator(&st);
    kmv__sketch sk;
    kmv__sketch_init(&sk, eps);
    double base = 1.0 + (eps > 1e-6 ? eps : 1e-6); /* the header's floor on the spread */
    fill(&sk, &a, w, n);
    for (size_t b = 0; b < sk.ng; b++) {
        if (b > 0) assert_true(sk.g[b - 1].m < sk.g[b].m);
        rel_close(sk.g[b].wround, pow(base, (double)sk.g[b].m), 1e-9, "wround");
        assert_true(sk.g[b].len > 0); /* nothing popped: no empty groups */
    }
    double sum_w = 0.0, sum_round = 0.0;
    size_t total = 0;
    for (size_t b = 0; b < sk.ng; b++) total += sk.g[b].len;
    assert_int_equal(total, n);
    for (size_t j = 0; j < n; j++) {
        const kmv__sketch_group *g = &sk.g[group_of(&sk, (uint32_t)j)];
        /* The range, with room for the rounding of log(w) / log(base). */
        if (!(w[j] <= g->wround * (1.0 + 1e-12) && w[j] > g->wround / base * (1.0 - 1e-12)))
            fail_msg("w %.17g outside group m=%lld (%.17g, %.17g]", w[j], (long long)g->m,
                     g->wround / base, g->wround);
        sum_w += w[j];
        sum_round += g->wround;
    }
    rel_close(sk.wbar, sum_round, 1e-12, "wbar");
    assert_true(sk.wbar >= sum_w * (1.0 - 1e-12));
    assert_true(sk.wbar <= sum_w * base * (1.0 + 1e-12));
    kmv__sketch_free(&sk, &a);
    assert_int_equal(st.live, 0);
}

static void test_groups(void **state) {
    (void)state;
    size_t n = 500;
    double *w = log_uniform(n, -12.0, 12.0, 11);
    check_groups(0.25, w, n);
    check_groups(0.01, w, n);
    check_groups(1.0, w, n);
    /* Below the 1e-6 floor the group index would overflow int64 at
     * eps = 1e-300 (a fuzzer find); the floor keeps it sane. */
    check_groups(1e-300, w, n);
    /* Weights at exact powers of the base, and equal weights: one group. */
    double pw[6] = {1.0, 2.0, 4.0, 0.5, 1024.0, 0x1p-40};
    check_groups(1.0, pw, 6);
    double same[20];
    for (int j = 0; j < 20; j++) same[j] = 3.7;
    check_groups(0.1, same, 20);
    kmv__sketch sk;
    kmv__sketch_init(&sk, 0.1);
    tu_alloc_state st = {0, 0, 0};
    kmv_allocator a = tu_allocator(&st);
    fill(&sk, &a, same, 20);
    assert_int_equal(sk.ng, 1);
    assert_int_equal(sk.g[0].len, 20);
    for (uint32_t u = 0; u < 20; u++) assert_int_equal(sk.g[0].ids[u], u); /* in add order */
    kmv__sketch_free(&sk, &a);
    free(w);
}

/* Popping a block in reverse order leaves every group's keys as before and
 * Wbar as before (to rounding: it is a running sum), and the draws after
 * the pop are bit for bit the draws before the block. */
static void test_add_pop(void **state) {
    (void)state;
    tu_alloc_state st = {0, 0, 0};
    kmv_allocator a = tu_allocator(&st);
    size_t n0 = 200, nb = 150, n = n0 + nb;
    kmv__keystore ks;
    make_store(&ks, &a, n, 3, 5, NULL);
    double *w = log_uniform(n, -6.0, 6.0, 21);
    /* Block weights reach past the first keys' range: new groups, too. */
    for (size_t j = n0; j < n; j += 3) w[j] *= 1e4;
    kmv__sketch sk;
    kmv__sketch_init(&sk, 0.3);
    fill(&sk, &a, w, n0);
    size_t ng0 = sk.ng;
    double wbar0 = sk.wbar;
    int64_t *m0 = malloc(ng0 * sizeof(int64_t));
    size_t *len0 = malloc(ng0 * sizeof(size_t));
    uint32_t **ids0 = malloc(ng0 * sizeof(uint32_t *));
    for (size_t b = 0; b < ng0; b++) {
        m0[b] = sk.g[b].m;
        len0[b] = sk.g[b].len;
        ids0[b] = malloc(len0[b] * sizeof(uint32_t));
        memcpy(ids0[b], sk.g[b].ids, len0[b] * sizeof(uint32_t));
    }
    size_t r = 300;
    assert_int_equal(kmv__sketch_draw(&sk, &a, &ks, r, 77, INFINITY), KMV_OK);
    uint32_t *draw0 = malloc(r * sizeof(uint32_t));
    memcpy(draw0, sk.ids, r * sizeof(uint32_t));
    double scale0 = sk.scale;

    double block = 0.0;
    for (size_t j = n0; j < n; j++) {
        assert_int_equal(kmv__sketch_add(&sk, &a, (uint32_t)j, w[j]), KMV_OK);
        block += w[j];
    }
    assert_true(sk.ng > ng0); /* the block opened groups */
    assert_true(sk.wbar > wbar0 + block * (1.0 - 1e-12));
    for (size_t j = n; j-- > n0;) kmv__sketch_pop(&sk, w[j]);

    /* Every old group as it was; the block's new groups stay, empty. */
    size_t b0 = 0;
    for (size_t b = 0; b < sk.ng; b++) {
        if (b0 < ng0 && sk.g[b].m == m0[b0]) {
            assert_int_equal(sk.g[b].len, len0[b0]);
            assert_memory_equal(sk.g[b].ids, ids0[b0], len0[b0] * sizeof(uint32_t));
            b0++;
        } else {
            assert_int_equal(sk.g[b].len, 0);
        }
    }
    assert_int_equal(b0, ng0);
    /* A running sum: (a + b) - b is a only to the rounding of a + b. */
    if (!(fabs(sk.wbar - wbar0) <= 1e-12 * (wbar0 + 1.3 * block)))
        fail_msg("wbar after pop %.17g, before the block %.17g", sk.wbar, wbar0);
    assert_int_equal(kmv__sketch_draw(&sk, &a, &ks, r, 77, INFINITY), KMV_OK);
    assert_memory_equal(sk.ids, draw0, r * sizeof(uint32_t));
    assert_true(sk.scale == scale0);

    /* Popping a weight whose group does not exist, or is empty, is a no-op. */
    double wb = sk.wbar;
    kmv__sketch_pop(&sk, 1e30);
    assert_true(sk.wbar == wb);
    size_t emptied = 0;
    for (size_t b = 0; b < sk.ng; b++)
        if (sk.g[b].len == 0) {
            kmv__sketch_pop(&sk, sk.g[b].wround / sqrt(1.3)); /* mid-group in log scale */
            emptied++;
        }
    assert_true(emptied > 0);
    assert_true(sk.wbar == wb);

    for (size_t b = 0; b < ng0; b++) free(ids0[b]);
    free(ids0), free(len0), free(m0), free(draw0), free(w);
    kmv__sketch_free(&sk, &a);
    kmv__keystore_free(&ks, &a);
    assert_int_equal(st.live, 0);
}

/* A draw: r ids of stored keys, their rows copied from the store, scale
 * Wbar / r, the same draws for the same seed, others for another seed;
 * an earlier draw's buffers are released (ASan checks). */
static void test_draw(void **state) {
    (void)state;
    tu_alloc_state st = {0, 0, 0};
    kmv_allocator a = tu_allocator(&st);
    size_t n = 400, d = 5;
    kmv__keystore ks;
    float *keys;
    make_store(&ks, &a, n, d, 9, &keys);
    double *w = log_uniform(n, -5.0, 5.0, 31);
    kmv__sketch sk;
    kmv__sketch_init(&sk, 0.2);
    /* Only the even ids: a draw must never invent a key. */
    for (size_t j = 0; j < n; j += 2) assert_int_equal(kmv__sketch_add(&sk, &a, (uint32_t)j, w[j]), KMV_OK);

    size_t r = 1000;
    assert_int_equal(kmv__sketch_draw(&sk, &a, &ks, r, 123, INFINITY), KMV_OK);
    assert_int_equal(sk.r, r);
    rel_close(sk.scale, mass(&sk, INFINITY, 0.2) / (double)r, 1e-12, "scale");
    rel_close(sk.scale, sk.wbar / (double)r, 1e-12, "scale vs wbar");
    for (size_t t = 0; t < r; t++) {
        uint32_t id = sk.ids[t];
        assert_true(id < n && id % 2 == 0);
        /* The row gathered is the key appended as id, bit for bit. */
        assert_memory_equal(sk.rows + t * d, keys + (size_t)id * d, d * sizeof(float));
    }
    uint32_t *first = malloc(r * sizeof(uint32_t));
    memcpy(first, sk.ids, r * sizeof(uint32_t));
    assert_int_equal(kmv__sketch_draw(&sk, &a, &ks, r, 123, INFINITY), KMV_OK);
    assert_memory_equal(sk.ids, first, r * sizeof(uint32_t));
    assert_int_equal(kmv__sketch_draw(&sk, &a, &ks, r, 124, INFINITY), KMV_OK);
    size_t same = 0;
    for (size_t t = 0; t < r; t++) same += sk.ids[t] == first[t];
    assert_true(same < r / 4); /* 200 keys: a coincidence is rare */

    /* r = 1: one draw, scale Wbar. */
    assert_int_equal(kmv__sketch_draw(&sk, &a, &ks, 1, 5, INFINITY), KMV_OK);
    assert_int_equal(sk.r, 1);
    rel_close(sk.scale, sk.wbar, 1e-12, "scale at r=1");
    /* r = 0 draws nothing. */
    assert_int_equal(kmv__sketch_draw(&sk, &a, &ks, 0, 5, INFINITY), KMV_OK);
    assert_int_equal(sk.r, 0);
    assert_true(sk.scale == 0.0);
    assert_null(sk.ids);

    kmv__sketch_free(&sk, &a);
    /* An empty sketch draws nothing. */
    kmv__sketch_init(&sk, 0.2);
    assert_int_equal(kmv__sketch_draw(&sk, &a, &ks, 10, 5, INFINITY), KMV_OK);
    assert_int_equal(sk.r, 0);
    assert_true(sk.scale == 0.0);
    assert_null(sk.rows);
    kmv__sketch_free(&sk, &a);
    free(first), free(w), free(keys);
    kmv__keystore_free(&ks, &a);
    assert_int_equal(st.live, 0);
}

/* w_below leaves out exactly the groups whose every weight exceeds it:
 * drawn keys come from groups whose lower edge is below w_below (the
 * straddling group included, so a key above w_below may be drawn from
 * it), the scale is the remaining mass over r, and a w_below under every
 * weight draws nothing. */
static void test_w_below(void **state) {
    (void)state;
    tu_alloc_state st = {0, 0, 0};
    kmv_allocator a = tu_allocator(&st);
    size_t n = 300, d = 2;
    double eps = 0.5;
    kmv__keystore ks;
    make_store(&ks, &a, n, d, 3, NULL);
    double *w = log_uniform(n, -4.0, 4.0, 41);
    kmv__sketch sk;
    kmv__sketch_init(&sk, eps);
    fill(&sk, &a, w, n);
    size_t r = 4000;
    const double cuts[] = {0.05, 0.9, 1.0, 2.25, 7.0, 60.0};
    for (size_t c = 0; c < sizeof cuts / sizeof cuts[0]; c++) {
        double wb = cuts[c];
        assert_int_equal(kmv__sketch_draw(&sk, &a, &ks, r, 600 + c, wb), KMV_OK);
        double m = mass(&sk, wb, eps);
        assert_true(m > 0.0 && m <= sk.wbar * (1.0 + 1e-12));
        rel_close(sk.scale, m / (double)r, 1e-12, "scale under w_below");
        for (size_t t = 0; t < r; t++) {
            const kmv__sketch_group *g = &sk.g[group_of(&sk, sk.ids[t])];
            assert_true(g->wround / (1.0 + eps) < wb);
        }
    }
    /* Below every weight: nothing to draw. */
    double wmin = INFINITY;
    for (size_t j = 0; j < n; j++) wmin = w[j] < wmin ? w[j] : wmin;
    assert_int_equal(kmv__sketch_draw(&sk, &a, &ks, r, 1, wmin / (1.0 + eps) / 1.01), KMV_OK);
    assert_int_equal(sk.r, 0);
    assert_true(sk.scale == 0.0);
    assert_null(sk.ids);
    free(w);
    kmv__sketch_free(&sk, &a);
    kmv__keystore_free(&ks, &a);
    assert_int_equal(st.live, 0);
}

/* Over SEEDS fixed seeds, scale * sum_t f(id_t) averages to
 * mu = sum_j xbar_j^2 f(j) (f = K^2 to a query, as the engine uses it),
 * within 5 standard errors computed exactly from the sampling law; and
 * the draw counts per key fit the law xbar_j^2 / Wbar (chi-square). The
 * same is checked with w_below cutting off the heaviest groups. */
#define SEEDS 4000
#define DRAWS 8

static void unbiased_case(double w_below) {
    tu_alloc_state st = {0, 0, 0};
    kmv_allocator a = tu_allocator(&st);
    size_t n = 40, d = 2;
    double eps = 0.5; /* coarse: rounding moves weights by up to 50% */
    kmv__keystore ks;
    float *keys;
    make_store(&ks, &a, n, d, 17, &keys);
    /* f(j) = K(q, k_j)^2 at sigma = 0.5, in double. */
    const double q[2] = {0.3, -0.2};
    double *f = malloc(n * sizeof(double)), *xb = malloc(n * sizeof(double));
    for (size_t j = 0; j < n; j++) {
        double d2 = 0.0;
        for (size_t t = 0; t < d; t++) d2 += (q[t] - keys[j * d + t]) * (q[t] - keys[j * d + t]);
        f[j] = exp(-d2 / (2.0 * 0.25)) * exp(-d2 / (2.0 * 0.25));
    }
    /* Weights that grow with f, so that draws not weighted by them would
     * show (with weights independent of f, uniform draws are unbiased
     * too, and the check below would have no power against them). */
    double *w = log_uniform(n, -3.0, 3.0, 51);
    for (size_t j = 0; j < n; j++) w[j] *= 0.05 + f[j];
    kmv__sketch sk;
    kmv__sketch_init(&sk, eps);
    fill(&sk, &a, w, n);
    double mu = 0.0, total = 0.0, m2 = 0.0, mu_w = 0.0, f_sum = 0.0;
    for (size_t j = 0; j < n; j++) {
        const kmv__sketch_group *g = &sk.g[group_of(&sk, (uint32_t)j)];
        xb[j] = g->wround / (1.0 + eps) < w_below ? g->wround : 0.0;
        mu += xb[j] * f[j];
        total += xb[j];
        m2 += xb[j] * f[j] * f[j];
        mu_w += (xb[j] > 0.0 ? w[j] : 0.0) * f[j];
        f_sum += xb[j] > 0.0 ? f[j] : 0.0;
    }
    size_t n_in = 0;
    for (size_t j = 0; j < n; j++) n_in += xb[j] > 0.0;
    /* One draw Y = total f(J), P(J = j) = xb_j / total: E Y = mu,
     * Var Y = total sum xb_j f_j^2 - mu^2. */
    double var_y = total * m2 - mu * mu;
    double se = sqrt(var_y / ((double)DRAWS * SEEDS));
    /* The test has power: unrounded weights, or draws uniform over the
     * keys, would be off by far more than the tolerance. */
    double mu_uniform = total * f_sum / (double)n_in;
    assert_true(fabs(mu_w - mu) > 20.0 * se);
    assert_true(fabs(mu_uniform - mu) > 20.0 * se);

    double mean = 0.0;
    unsigned long *count = calloc(n, sizeof(unsigned long));
    for (uint64_t s = 1; s <= SEEDS; s++) {
        assert_int_equal(kmv__sketch_draw(&sk, &a, &ks, DRAWS, s, w_below), KMV_OK);
        assert_int_equal(sk.r, DRAWS);
        double e = 0.0;
        for (size_t t = 0; t < DRAWS; t++) {
            e += f[sk.ids[t]];
            count[sk.ids[t]]++;
        }
        mean += sk.scale * e;
    }
    mean /= SEEDS;
    if (!(fabs(mean - mu) <= 5.0 * se))
        fail_msg("w_below %g: mean %.9g, want %.9g +- 5 x %.3g", w_below, mean, mu, se);

    /* Chi-square of the counts against DRAWS * SEEDS * xb_j / total, on
     * n_in - 1 degrees of freedom; keys outside the draw law never drawn.
     * The bound df + 10 sqrt(2 df) is exceeded with probability below
     * 1e-9 for these df (Wilson-Hilferty). */
    double chi2 = 0.0, nd = (double)DRAWS * SEEDS;
    for (size_t j = 0; j < n; j++) {
        if (xb[j] == 0.0) {
            assert_int_equal(count[j], 0);
            continue;
        }
        double e = nd * xb[j] / total;
        chi2 += ((double)count[j] - e) * ((double)count[j] - e) / e;
    }
    double df = (double)n_in - 1.0;
    if (!(chi2 <= df + 10.0 * sqrt(2.0 * df)))
        fail_msg("w_below %g: chi-square %.1f on %.0f df", w_below, chi2, df);

    free(count), free(f), free(xb), free(w), free(keys);
    kmv__sketch_free(&sk, &a);
    kmv__keystore_free(&ks, &a);
    assert_int_equal(st.live, 0);
}

static void test_unbiased(void **state) {
    (void)state;
    unbiased_case(INFINITY);
    unbiased_case(0.3); /* the groups above 0.3 (9 of 40 keys) left out */
}

/* KMV_ENOMEM from add leaves the drawable mass as it was (a new group may
 * stay behind, empty: harmless, as the code notes); from draw, no draws. */
static void test_alloc_failures(void **state) {
    (void)state;
    tu_alloc_state st = {0, 0, 0};
    kmv_allocator a = tu_allocator(&st);
    kmv__keystore ks;
    make_store(&ks, &a, 64, 2, 1, NULL);
    kmv__sketch sk;

    /* The group array itself. */
    kmv__sketch_init(&sk, 0.1);
    st.fail_at = st.calls + 1;
    assert_int_equal(kmv__sketch_add(&sk, &a, 0, 1.0), KMV_ENOMEM);
    assert_int_equal(sk.ng, 0);
    assert_true(sk.wbar == 0.0);
    st.fail_at = 0;
    /* A new group's ids. */
    assert_int_equal(kmv__sketch_add(&sk, &a, 0, 1.0), KMV_OK);
    st.fail_at = st.calls + 1;
    assert_int_equal(kmv__sketch_add(&sk, &a, 1, 100.0), KMV_ENOMEM);
    st.fail_at = 0;
    assert_true(sk.wbar == sk.g[0].wround);
    size_t held = 0;
    for (size_t b = 0; b < sk.ng; b++) held += sk.g[b].len;
    assert_int_equal(held, 1);
    /* Growing a full group's ids (8 fit at first). */
    for (uint32_t j = 1; j < 8; j++) assert_int_equal(kmv__sketch_add(&sk, &a, j, 1.0), KMV_OK);
    double wb = sk.wbar;
    st.fail_at = st.calls + 1;
    assert_int_equal(kmv__sketch_add(&sk, &a, 8, 1.0), KMV_ENOMEM);
    st.fail_at = 0;
    assert_true(sk.wbar == wb);
    held = 0;
    for (size_t b = 0; b < sk.ng; b++) held += sk.g[b].len;
    assert_int_equal(held, 8);
    /* Draws still come only from the keys held. */
    assert_int_equal(kmv__sketch_draw(&sk, &a, &ks, 50, 3, INFINITY), KMV_OK);
    for (size_t t = 0; t < 50; t++) assert_true(sk.ids[t] < 8);
    rel_close(sk.scale, wb / 50.0, 1e-12, "scale after failed adds");
    /* Each allocation of a draw failing: ENOMEM, nothing drawn, no leak. */
    for (long k = 1; k <= 3; k++) {
        st.fail_at = st.calls + k;
        assert_int_equal(kmv__sketch_draw(&sk, &a, &ks, 50, 3, INFINITY), KMV_ENOMEM);
        st.fail_at = 0;
        assert_int_equal(sk.r, 0);
        assert_null(sk.ids);
        assert_null(sk.rows);
    }
    kmv__sketch_free(&sk, &a);
    kmv__keystore_free(&ks, &a);
    assert_int_equal(st.live, 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_groups),
        cmocka_unit_test(test_add_pop),
        cmocka_unit_test(test_draw),
        cmocka_unit_test(test_w_below),
        cmocka_unit_test(test_unbiased),
        cmocka_unit_test(test_alloc_failures),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
